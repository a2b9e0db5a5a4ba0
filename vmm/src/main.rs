//! The `vmm` binary: a thin command-line wrapper over the `vmm` library.
//!
//! Exit status: 0 when the guest powered off, 2 when it rebooted (with `--on-reboot
//! exit`), 1 on any error. With `--on-reboot restart` a guest reboot restarts the VMM in
//! place: the process re-executes itself with the requested size the guest had, which is
//! a system reset (all hotplugged memory unplugged and returned to the host).

use std::os::unix::process::CommandExt;

use std::time::Duration;

use clap::Parser;
use vmm::cli::{Cli, Command, OnReboot, RunArgs};
use vmm::exit::ExitReason;

fn main() {
    // Microseconds: a resize's steps (ci/resize-timeline) are milliseconds apart.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(&args),
        Command::Resize(a) if a.wait => vmm::resize_wait::run(&a.api_socket, a.size, a.timeout()),
        Command::Resize(a) => report(vmm_api::client::resize_within(
            &a.api_socket,
            a.size,
            a.timeout(),
        )),
        Command::Status(a) => report(vmm_api::client::status_within(
            &a.api_socket,
            Duration::from_secs(a.timeout),
        )),
        Command::Autosize(a) => report(vmm_api::client::autosize_within(
            &a.api_socket,
            &a.policy,
            Duration::from_secs(a.timeout),
        )),
    };
    std::process::exit(code);
}

fn report(r: Result<vmm_api::MemoryStatus, vmm_api::client::ClientError>) -> i32 {
    match r {
        Ok(s) => {
            print!("{}", s.to_lines());
            0
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            1
        }
    }
}

fn run(args: &RunArgs) -> i32 {
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
    let result = vmm::vm::run_outcome(&cfg);
    drop(guard);
    match result {
        Ok(outcome) => {
            eprintln!("vmm: {}", outcome.reason);
            if matches!(outcome.reason, ExitReason::Reboot) && args.on_reboot == OnReboot::Restart {
                restart(outcome.requested_size)
            } else {
                outcome.reason.exit_code()
            }
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            1
        }
    }
}

/// Re-executes this VMM with the same arguments and the current requested size.
fn restart(requested_size: Option<u64>) -> i32 {
    let mut args: Vec<String> = Vec::new();
    let mut skip_value = false;
    for a in std::env::args().skip(1) {
        if skip_value {
            skip_value = false;
            continue;
        }
        if a == "--requested-size" {
            skip_value = true;
            continue;
        }
        if a.starts_with("--requested-size=") {
            continue;
        }
        args.push(a);
    }
    if let Some(size) = requested_size {
        args.push(format!("--requested-size={size}"));
    }
    eprintln!("vmm: restarting after the guest reboot (all hotplugged memory unplugged)");
    let err = std::process::Command::new("/proc/self/exe")
        .args(&args)
        .exec();
    eprintln!("vmm: cannot restart: {err}");
    1
}
