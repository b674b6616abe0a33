//! `spindrift-vmm`: the spindrift VMM's command line. See [`vmm_glue::cli`] for the subcommands.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm_glue::cli::{clone_cmd, run_cmd, CloneArgs, RunArgs};

/// spindrift's KVM VMM: guests that clone themselves.
#[derive(Debug, Parser)]
#[command(name = "spindrift-vmm", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a built-in guest; its forks become clones (--local: in-process).
    Run(RunArgs),
    /// Start one clone from a descriptor, memory served by the host daemon (the daemon runs this).
    Clone(CloneArgs),
    /// The main job: a parent VM forked to clones on simulated hosts (a netlab lab), with a summary.
    Demo(vmm_glue::demo::DemoArgs),
}

fn main() -> ExitCode {
    let started = vmm_glue::unix_us();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run_cmd(args),
        Command::Clone(args) => clone_cmd(args, started),
        Command::Demo(args) => Ok(vmm_glue::demo::demo_cmd(args)),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("spindrift-vmm: {e}");
            ExitCode::from(2)
        }
    }
}
