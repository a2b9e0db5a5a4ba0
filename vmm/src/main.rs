//! The `vmm` binary: a thin command-line wrapper over the `vmm` library.
//!
//! Exit status: 0 when the guest powered off, 2 when it rebooted, 1 on any error.

use clap::Parser;
use vmm::cli::{Cli, Command};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(&args),
    };
    std::process::exit(code);
}

fn run(args: &vmm::cli::RunArgs) -> i32 {
    let cfg = match args.to_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return 1;
        }
    };
    let guard = match vmm::terminal::raw_stdin() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("vmm: cannot put the terminal in raw mode: {e}");
            None
        }
    };
    let result = vmm::vm::run(&cfg);
    drop(guard);
    match result {
        Ok(reason) => {
            eprintln!("vmm: {reason}");
            reason.exit_code()
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            1
        }
    }
}
