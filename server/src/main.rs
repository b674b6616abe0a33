//! `spindrift-server`: multicasts a frozen VM memory image to spindrift host daemons.
//!
//! Exit codes: 0 after a clean stop (SIGINT/SIGTERM or `--duration-s`), 2 for a refused
//! configuration, 1 for any other error.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use spindrift_server::{serve, Args, ServerConfig};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = match ServerConfig::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spindrift-server: {e}");
            return ExitCode::from(2);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)) {
        eprintln!("spindrift-server: installing the SIGINT/SIGTERM handler: {e}");
        return ExitCode::from(1);
    }
    match serve(&config, &stop) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spindrift-server: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}
