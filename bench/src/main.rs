//! spindrift's bench front end: the protocol simulator and the acceptance matrix.
//!
//! ```text
//! bench sim --receivers 16 --pages 65536 --working-set 0.1 --loss 0.02 --seed 1 [--burst] [--json]
//! bench matrix [--seeds 3] [--jobs 2] [--json]
//! bench push [--pages 4096] [--loss 0.05] [--json]
//! bench vs-udpcast [--hosts 4] [--mib 64] [--loss 0.05] [--json]
//! bench xdp [--hosts 4] [--size 1400,8000] [--seconds 5] [--sink hosts|switch-drop] [--json]
//! bench xdp-daemons [--hosts 4] [--mib 64] [--mtu 1500,9000] [--io udp,xdp] [--loss 0] [--json]
//! bench page-path [--mib 64] [--fraction 0.05] [--json]
//! bench memory [--pages 4096] [--seeds 1,2,3] [--bin-dir OLD --bin-dir NEW] [--json]
//! bench line-rate [--rows 1x1gbit,4x250mbit,16x100mbit] [--loss 0,0.02] [--modes paced,uftp] [--json]
//! ```
//! Logs go to stderr (`RUST_LOG=debug` for more); results go to stdout.

mod args;
mod lab_run;
mod line_rate_cmd;
mod matrix;
mod memory_cmd;
mod page_path_cmd;
mod push_cmd;
mod sim_cmd;
mod udpcast_cmd;
mod xdp_cmd;
mod xdp_daemons_cmd;

use clap::{Parser, Subcommand};

/// spindrift benchmarks and the deterministic protocol simulator.
#[derive(Debug, Parser)]
#[command(name = "bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Simulate one server and N receivers over faulty links, in virtual time.
    Sim(sim_cmd::SimArgs),
    /// Run the acceptance matrix (bit-exactness, multicast efficiency, NAK economy, corruption,
    /// determinism) and print a table; exits non-zero if any case fails.
    Matrix(matrix::MatrixArgs),
    /// Push a whole image with and without flow control, with and without loss, and compare the
    /// bytes sent; exits non-zero if a flow-controlled run is not bit-exact.
    Push(push_cmd::PushArgs),
    /// spindrift against udpcast: one image to N hosts of a netlab lab with loss, side by side
    /// (needs root, udpcast, and the release spindrift-server and spindrift-client).
    VsUdpcast(udpcast_cmd::VsUdpcastArgs),
    /// Compare the UDP and AF_XDP backends' sender throughput in a netlab lab (needs root).
    Xdp(xdp_cmd::XdpArgs),
    /// The real server and host daemons over UDP and over AF_XDP, side by side: push throughput
    /// per server CPU-second and fault-service latency (needs root and the release spindrift-server
    /// and spindrift-client).
    XdpDaemons(xdp_daemons_cmd::XdpDaemonsArgs),
    /// The page path from the wire to a clone's memory, stage by stage: plain UDP, a naive
    /// handler, a whole-image fetch, faults on an idle server, cache hits, faults during a push
    /// (needs root and the release spindrift-server and spindrift-client).
    PagePath(page_path_cmd::PagePathArgs),
    /// A whole image to hosts behind shaped links, paced at a fraction of the link, beside uftp
    /// at the same rate in the same lab (needs root, nftables, uftp and the release binaries).
    LineRate(line_rate_cmd::LineRateArgs),
    /// What hosts fetch against what clones touch, on the trace guest in the demo's lab: over-fetch
    /// of random runs, network faults of a sequential reader (needs root and the release binaries).
    Memory(memory_cmd::MemoryArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sim(args) => sim_cmd::run(&args),
        Command::Matrix(args) => matrix::run(&args),
        Command::Push(args) => push_cmd::run(&args),
        Command::VsUdpcast(args) => udpcast_cmd::run(&args),
        Command::Xdp(args) => xdp_cmd::run(&args),
        Command::XdpDaemons(args) => xdp_daemons_cmd::run(&args),
        Command::PagePath(args) => page_path_cmd::run(&args),
        Command::LineRate(args) => line_rate_cmd::run(&args),
        Command::Memory(args) => memory_cmd::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
