//! `plot-timeline --csv FILE --png FILE [--title T] [--y-label L] [--scale N]`: draws the
//! samples of a CSV file (see the `plot` crate) as a PNG timeline and prints its path.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Draws a CSV of samples as a PNG timeline.
#[derive(Debug, Parser)]
#[command(name = "plot-timeline")]
struct Args {
    /// Samples: `t_s,NAME...` header, rows, `# mark SECONDS LABEL` lines.
    #[arg(long)]
    csv: PathBuf,
    /// Where to write the PNG.
    #[arg(long)]
    png: PathBuf,
    /// Title of the chart.
    #[arg(long, default_value = "")]
    title: String,
    /// Label of the value axis.
    #[arg(long, default_value = "MiB")]
    y_label: String,
    /// Values are divided by this (1048576: bytes to MiB).
    #[arg(long, default_value_t = 1_048_576.0)]
    scale: f64,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let text = match std::fs::read_to_string(&a.csv) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("plot-timeline: cannot read {}: {e}", a.csv.display());
            return ExitCode::FAILURE;
        }
    };
    let drawn = plot::Timeline::parse_csv(&text, a.scale).and_then(|t| {
        plot::Timeline {
            title: a.title.clone(),
            y_label: a.y_label.clone(),
            ..t
        }
        .draw_png(&a.png, 1200, 600)
    });
    match drawn {
        Ok(()) => {
            println!("{}", a.png.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("plot-timeline: {}: {e}", a.csv.display());
            ExitCode::FAILURE
        }
    }
}
