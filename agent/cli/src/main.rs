#![forbid(unsafe_code)]
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: supervise one process instance (started by the host target).
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        spec: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Supervise { spec } => sluice_host::supervise::run(&spec),
    }
}
