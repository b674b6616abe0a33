//! `bench xdp-daemons`: the real memory server and host daemons over UDP and over AF_XDP, side by
//! side, in one netlab lab per MTU.
//!
//! ```text
//! bench xdp-daemons [--hosts 4] [--mib 64] [--mtu 1500,9000] [--io udp,xdp] [--loss 0]
//!                   [--fraction 0.1] [--zstd-level 0] [--repeat 3] [--rate RATE]
//!                   [--runs push,faults] [--timeout-s 30] [--cpu-split true] [--bridge-netfilter]
//!                   [--bin-dir DIR] [--keep] [--json]
//! ```
//!
//! For each MTU (1500: datagrams of up to 1472 bytes, the 1400-byte class; 9000: up to 8972, the
//! 8000-byte class) one lab is made: h0 serves, h1..hN receive, each receiving host losing `--loss`
//! of what reaches it. In it, `--repeat` times, for each backend (`--io`, passed to the server and
//! to every client; their order alternates from one repetition to the next):
//!
//! 1. **push**: `spindrift-server --io IO --mtu M --push all --min-receivers N` serves a generated
//!    image (mixed pages: zero, text-like, random; `--mib`) and `spindrift-client fetch --io IO
//!    --verify IMG` runs on every receiving host. Reported: the transfer time (the slowest fetch's
//!    own), the server process's CPU seconds from the fetches' start to the last one's exit
//!    (`/proc/<pid>/stat`, user + system, read while it still runs), its datagrams sent
//!    (`tx_packets` of its `--stats-json`; repairs and NAKs too), datagrams/s and datagrams per
//!    server CPU-second, goodput (image bits per second each host received) and image bits per
//!    server CPU-second, and whether every fetch exited with its image verified. (A fetch asks
//!    for the pages it lacks as well, so most pages travel as answers to requests: this is the
//!    whole server, not only its push loop.)
//! 2. **faults**: the server with `--push none` (only requested pages travel), `spindrift-client
//!    daemon --io IO` on every receiving host, and one `spindrift-client touch` process per host
//!    touching `--fraction` of the image in runs (the same pages on every host, as clones of one VM
//!    do) through its daemon and checking every byte. Reported: the daemons' fault-service
//!    latency for faults that went to the network (`latency_us.network` of their final stats: the
//!    median of the hosts' p50s and the worst host's p99) and for cache hits (median p50), the
//!    fault counts, the touch processes' wall time, and the server's datagrams and CPU seconds.
//!
//! The tables show each figure's median over the verified runs (a failed run, say a fetch that
//! stalled, is counted and left out); `--json` adds every run, with per-host fault figures.
//! Pages go raw by default (`--zstd-level 0`) so that the server's CPU is its protocol and packet
//! path rather than compression; `--zstd-level 1` is the server's own default.
//!
//! # Reading the figures
//!
//! As in `bench xdp`, everything the kernel does after a sender's system call (veth, the bridge
//! flooding each datagram to every port, every receiving host's input path up to its socket or
//! XDP program) runs in softirqs on the sending CPU and is charged to whatever runs there. By
//! default (`--cpu-split true`, with 2 or more CPUs) the server is pinned to CPU 0 (`taskset`)
//! and RPS on h0's switch port hands every frame it sends to the other CPUs, so the bridge, the
//! flooding and the receivers' input paths are not charged to the server: its CPU-seconds are its
//! own protocol work and transmit path plus one veth hop, as with a NIC. `--cpu-split false`
//! leaves the kernel alone (the server then pays for everyone's softirqs). The receivers, the
//! kernel's receive work and anything else running on the machine still share the other CPU(s),
//! so wall-clock figures (transfer time, datagrams/s, latency) depend on the machine's load; the
//! header shows the load average at the start. The bridge's `br_netfilter` hooks are turned off
//! in the switch namespace (a switch runs no firewall) unless `--bridge-netfilter`.
//!
//! `bench xdp --sink switch-drop` measures the backends' transmit paths alone; here the protocol
//! (FEC parity, BLAKE3 tags, building datagrams from pages, requests) is most of the server's
//! cost per datagram, and repairs, if receivers drop frames, add to it.
//!
//! Every process runs under a guard that kills it on every exit path, each run is bounded by
//! `--timeout-s`, and the lab is removed when the command ends (the lab's removal also kills
//! anything left inside it). The scratch directory is kept (and its path printed) when a run
//! failed; fetched images are deleted after each run. Needs root, nftables (for `--loss`),
//! `taskset`, and the release binaries beside this one (`cargo build --release -p bench -p
//! spindrift-server -p spindrift-client`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use netlab::{Lab, LabConfig, LinkConditions, Loss};
use serde::Serialize;
use serde_json::Value;

use crate::lab_run::{
    cpu_count, load_average, read_json, server_command, steer_switch_port, wait_all, Binaries, Proc, Push, Scratch,
    KEY_HEX,
};

/// A packet I/O backend of the daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Io {
    /// Kernel UDP sockets.
    Udp,
    /// AF_XDP.
    Xdp,
}

impl Io {
    fn flag(self) -> &'static str {
        match self {
            Io::Udp => "udp",
            Io::Xdp => "xdp",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Io::Udp => "udp",
            Io::Xdp => "af_xdp",
        }
    }
}

/// A part of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// Whole-image push to `spindrift-client fetch` on every host.
    Push,
    /// Page faults of touch processes served by the host daemons.
    Faults,
}

/// The knobs of `bench xdp-daemons`.
#[derive(Debug, Clone, Args)]
pub struct XdpDaemonsArgs {
    /// Receiving hosts (the server is one more), 1..=16.
    #[arg(long, default_value = "4", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub hosts: u16,
    /// Image size, MiB (1..=1024).
    #[arg(long, default_value = "64", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub mib: u32,
    /// Lab MTUs, comma-separated: 1500 (1472-byte datagrams) and/or 9000 (8972-byte datagrams).
    #[arg(long = "mtu", value_delimiter = ',', default_values_t = [1500usize, 9000], value_parser = crate::args::mtu)]
    pub mtus: Vec<usize>,
    /// Backends, comma-separated (each run uses one for the server and every client).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Io::Udp, Io::Xdp])]
    pub io: Vec<Io>,
    /// Receive loss of every receiving host, in [0, 1), for every run.
    #[arg(long, default_value = "0", value_parser = crate::args::probability)]
    pub loss: f64,
    /// Fraction of the image each touch process touches (faults runs).
    #[arg(long, default_value = "0.1", value_parser = crate::args::fraction)]
    pub fraction: f64,
    /// The server's zstd level (0: raw pages, so its CPU is the protocol and packet path).
    #[arg(long, default_value = "0", value_parser = clap::value_parser!(i32).range(0..=19))]
    pub zstd_level: i32,
    /// Runs of each (MTU, backend, part); the tables show each figure's median over them (the
    /// backends alternate in order from one repetition to the next), `--json` has every run.
    #[arg(long, default_value = "3", value_parser = clap::value_parser!(u16).range(1..=20))]
    pub repeat: u16,
    /// The server's pacing rate (its `--rate`, e.g. 500mbit; default: unpaced).
    #[arg(long)]
    pub rate: Option<String>,
    /// Parts to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Part::Push, Part::Faults])]
    pub runs: Vec<Part>,
    /// Longest one run may take, seconds.
    #[arg(long, default_value = "30", value_parser = clap::value_parser!(u64).range(5..=600))]
    pub timeout_s: u64,
    /// Pin the server to CPU 0 and steer the switch's and the receiving hosts' kernel work to the
    /// other CPUs (RPS on h0's switch port), so the server's CPU-seconds are its own data path
    /// rather than everyone's softirqs; `false` leaves the scheduler and the kernel alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cpu_split: bool,
    /// Leave the lab bridge's netfilter hooks (`br_netfilter`) on.
    #[arg(long)]
    pub bridge_netfilter: bool,
    /// Where spindrift-server and spindrift-client are (default: beside this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Keep the scratch directory (image, logs, statistics) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of the tables.
    #[arg(long)]
    pub json: bool,
}

/// One push run.
#[derive(Debug, Clone, Serialize)]
struct PushRow {
    mtu: usize,
    io: Io,
    /// Runs this row is the median of (1: a single run).
    runs: usize,
    /// Runs that failed (not verified), left out of the medians unless every run failed.
    failed_runs: usize,
    /// The slowest fetch's own transfer time, seconds.
    transfer_s: f64,
    /// From starting the fetches to the last one's exit (process start, setup, write, verify).
    wall_s: f64,
    server_cpu_s: f64,
    server_tx_packets: u64,
    server_tx_bytes: u64,
    repair_packets: u64,
    naks: u64,
    requests: u64,
    pages_pushed: u64,
    pages_sent: u64,
    /// Datagrams the server sent per second of transfer.
    pps: f64,
    /// Datagrams per server CPU-second.
    pps_per_server_cpu_s: f64,
    /// Image Gbit/s each host received.
    goodput_gbps: f64,
    /// Image Gbit per server CPU-second.
    goodput_per_server_cpu_s_gbps: f64,
    /// Every fetch exited successfully with its image verified.
    all_verified: bool,
    fetches: Vec<String>,
}

/// One host's fault-service figures.
#[derive(Debug, Clone, Serialize)]
struct HostFaults {
    host: usize,
    io: String,
    network_faults: u64,
    network_p50_us: f64,
    network_p99_us: f64,
    cache_hits: u64,
    cache_hit_p50_us: f64,
    naks: u64,
    touch: String,
    pages_touched: u64,
    mismatches: u64,
}

/// One faults run.
#[derive(Debug, Clone, Serialize)]
struct FaultRow {
    mtu: usize,
    io: Io,
    /// Runs this row is the median of (1: a single run).
    runs: usize,
    /// Runs that failed (not verified), left out of the medians unless every run failed.
    failed_runs: usize,
    /// The daemons' backend as they report it, e.g. `af_xdp, copy mode`.
    daemon_io: String,
    /// From starting the touch processes to the last one's exit.
    wall_s: f64,
    network_faults: u64,
    /// Median of the hosts' network-fault p50.
    network_p50_us: f64,
    /// Worst host's network-fault p99.
    network_p99_us: f64,
    cache_hits: u64,
    /// Median of the hosts' cache-hit p50.
    cache_hit_p50_us: f64,
    server_tx_packets: u64,
    server_cpu_s: f64,
    /// Every touch process exited successfully with no mismatching page.
    all_verified: bool,
    hosts: Vec<HostFaults>,
}

/// The median of `f` over `rows`.
fn med<T>(rows: &[&T], f: impl Fn(&T) -> f64) -> f64 {
    median(rows.iter().map(|r| f(r)).collect())
}

/// The median of a count over `rows`.
fn med_u<T>(rows: &[&T], f: impl Fn(&T) -> u64) -> u64 {
    med(rows, |r| f(r) as f64).round() as u64
}

/// Each figure's median over runs of one (MTU, backend); None without runs.
fn median_push(rows: &[&PushRow]) -> Option<PushRow> {
    let first = *rows.first()?;
    Some(PushRow {
        mtu: first.mtu,
        io: first.io,
        runs: rows.len(),
        failed_runs: 0,
        transfer_s: med(rows, |r| r.transfer_s),
        wall_s: med(rows, |r| r.wall_s),
        server_cpu_s: med(rows, |r| r.server_cpu_s),
        server_tx_packets: med_u(rows, |r| r.server_tx_packets),
        server_tx_bytes: med_u(rows, |r| r.server_tx_bytes),
        repair_packets: med_u(rows, |r| r.repair_packets),
        naks: med_u(rows, |r| r.naks),
        requests: med_u(rows, |r| r.requests),
        pages_pushed: med_u(rows, |r| r.pages_pushed),
        pages_sent: med_u(rows, |r| r.pages_sent),
        pps: med(rows, |r| r.pps),
        pps_per_server_cpu_s: med(rows, |r| r.pps_per_server_cpu_s),
        goodput_gbps: med(rows, |r| r.goodput_gbps),
        goodput_per_server_cpu_s_gbps: med(rows, |r| r.goodput_per_server_cpu_s_gbps),
        all_verified: rows.iter().all(|r| r.all_verified),
        fetches: rows.iter().find(|r| !r.all_verified).unwrap_or(&first).fetches.clone(),
    })
}

/// Each figure's median over runs of one (MTU, backend); None without runs.
fn median_faults(rows: &[&FaultRow]) -> Option<FaultRow> {
    let first = *rows.first()?;
    Some(FaultRow {
        mtu: first.mtu,
        io: first.io,
        runs: rows.len(),
        failed_runs: 0,
        daemon_io: first.daemon_io.clone(),
        wall_s: med(rows, |r| r.wall_s),
        network_faults: med_u(rows, |r| r.network_faults),
        network_p50_us: med(rows, |r| r.network_p50_us),
        network_p99_us: med(rows, |r| r.network_p99_us),
        cache_hits: med_u(rows, |r| r.cache_hits),
        cache_hit_p50_us: med(rows, |r| r.cache_hit_p50_us),
        server_tx_packets: med_u(rows, |r| r.server_tx_packets),
        server_cpu_s: med(rows, |r| r.server_cpu_s),
        all_verified: rows.iter().all(|r| r.all_verified),
        hosts: Vec::new(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Everything one run needs.
struct Ctx<'a> {
    args: &'a XdpDaemonsArgs,
    bins: &'a Binaries,
    scratch: &'a Scratch,
    image: &'a Path,
    image_bytes: u64,
    timeout: Duration,
    /// `taskset -c` CPUs of the server (the CPU split).
    server_cpus: Option<String>,
}

impl Ctx<'_> {
    /// Server flags every run passes.
    fn server_flags(&self) -> Vec<String> {
        let mut f = vec!["--zstd-level".to_string(), self.args.zstd_level.to_string()];
        if let Some(rate) = &self.args.rate {
            f.extend(["--rate".to_string(), rate.clone()]);
        }
        f
    }
}

const PORT_BASE: u16 = 7740;
const SESSION: u64 = 3;

fn push_run(c: &Ctx<'_>, lab: &Lab, mtu: usize, io: Io, run: u16) -> anyhow::Result<PushRow> {
    let tag = format!("push-{mtu}-{}-{run}", io.flag());
    let push = Push {
        bins: c.bins,
        scratch: c.scratch,
        tag: &tag,
        image: c.image,
        image_bytes: c.image_bytes,
        group: Ipv4Addr::new(239, 77, (lab.index() % 256) as u8, (run % 250 + 1) as u8),
        port: PORT_BASE + run,
        hosts: usize::from(c.args.hosts),
        io: Some(io.flag()),
        mtu: Some(mtu as u32),
        min_receivers: true,
        verify: true,
        remove_outputs: true,
        server_flags: c.server_flags(),
        server_cpus: c.server_cpus.clone(),
        fetch_flags: Vec::new(),
        timeout: c.timeout,
    };
    let out = push.run(lab)?;
    let all_verified = out.all_ok();
    let transfer_s = out.transfer_s();
    let server_cpu_s = out.server_cpu_s.unwrap_or(0.0);
    let tx_packets = out.server_stat("tx_packets");
    let per_cpu = |x: f64| if server_cpu_s > 0.0 { x / server_cpu_s } else { 0.0 };
    let bits = (c.image_bytes * 8) as f64;
    let fetches = out
        .fetched
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let r = f.report.as_ref();
            format!(
                "h{}: {}{}",
                i + 1,
                f.status.as_deref().unwrap_or("timed out"),
                r.map(|r| format!(
                    ", {:.2} s, {} requests, {} NAKs",
                    r["seconds"].as_f64().unwrap_or(0.0),
                    r["requests"],
                    r["naks"]
                ))
                .unwrap_or_default()
            )
        })
        .collect();
    Ok(PushRow {
        mtu,
        io,
        runs: 1,
        failed_runs: usize::from(!all_verified),
        transfer_s,
        wall_s: out.wall_s,
        server_cpu_s,
        server_tx_packets: tx_packets,
        server_tx_bytes: out.server_stat("tx_bytes"),
        repair_packets: out.server_stat("repair_packets"),
        naks: out.server_stat("naks"),
        requests: out.server_stat("requests"),
        pages_pushed: out.server_stat("pages_pushed"),
        pages_sent: out.server_stat("pages_sent"),
        pps: tx_packets as f64 / transfer_s,
        pps_per_server_cpu_s: per_cpu(tx_packets as f64),
        goodput_gbps: bits / transfer_s / 1e9,
        goodput_per_server_cpu_s_gbps: per_cpu(bits) / 1e9,
        all_verified,
        fetches,
    })
}

/// A daemon on one host, its socket and its statistics file.
struct Daemon {
    proc: Proc,
    socket: PathBuf,
    stats: PathBuf,
}

fn fault_run(c: &Ctx<'_>, lab: &Lab, mtu: usize, io: Io, run: u16) -> anyhow::Result<FaultRow> {
    let tag = format!("faults-{mtu}-{}-{run}", io.flag());
    let path = |name: &str| c.scratch.path(&format!("{tag}-{name}"));
    let deadline = Instant::now() + c.timeout;
    let h0 = lab.host(0)?;
    let group = Ipv4Addr::new(239, 77, (lab.index() % 256) as u8, (run % 250 + 1) as u8).to_string();
    let port = (PORT_BASE + run).to_string();
    let server_stats = path("server-stats.json");
    let mut cmd = server_command(h0, &c.bins.server, c.server_cpus.as_deref())?;
    cmd.args(["--image", &c.image.display().to_string(), "--iface", &h0.addr().to_string()])
        .args(["--group", &group, "--port", &port, "--key-hex", KEY_HEX, "--session", &SESSION.to_string()])
        .args(["--push", "none", "--io", io.flag(), "--mtu", &mtu.to_string()])
        .args(c.server_flags())
        .args(["--duration-s", &(c.timeout.as_secs() + 10).to_string()])
        .args(["--stats-json", &server_stats.display().to_string()]);
    let mut server = Proc::spawn_logged("spindrift-server", &mut cmd, &path("server.log"))?;
    let mut daemons = Vec::new();
    for i in 1..=usize::from(c.args.hosts) {
        let h = lab.host(i)?;
        let (socket, stats) = (path(&format!("h{i}.sock")), path(&format!("h{i}-stats.json")));
        let mut d = h.command(&c.bins.client)?;
        d.arg("daemon")
            .args(["--iface", &h.addr().to_string(), "--group", &group, "--port", &port, "--key-hex", KEY_HEX])
            .args(["--io", io.flag(), "--server-timeout-s", "10"])
            .arg("--socket")
            .arg(&socket)
            .arg("--run-dir")
            .arg(path(&format!("h{i}-run")))
            .arg("--stats-json")
            .arg(&stats)
            .env("RUST_LOG", "info");
        let proc = Proc::spawn_logged(format!("daemon h{i}"), &mut d, &path(&format!("h{i}-daemon.log")))?;
        daemons.push(Daemon { proc, socket, stats });
    }
    // Ready: every daemon's socket is there (and the server still runs).
    for d in &mut daemons {
        while !d.socket.exists() {
            if let Some(s) = d.proc.try_status() {
                bail!("{} exited at start ({s}): {}", d.proc.name(), d.proc.log_tail(5));
            }
            if Instant::now() >= deadline {
                bail!("{} did not open its socket in time: {}", d.proc.name(), d.proc.log_tail(5));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Some(s) = server.try_status() {
        bail!("spindrift-server exited at start ({s}): {}", server.log_tail(5));
    }
    let cpu0 = server.cpu_seconds();
    let started = Instant::now();
    let mut touches = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let h = lab.host(i + 1)?;
        let mut t = h.command(&c.bins.client)?;
        t.arg("touch")
            .arg("--daemon-socket")
            .arg(&d.socket)
            .args(["--session", &SESSION.to_string(), "--image-bytes", &c.image_bytes.to_string()])
            .args(["--pattern", "runs", "--fraction", &c.args.fraction.to_string(), "--seed", "11"])
            .arg("--verify")
            .arg(c.image)
            .arg("--json");
        let (json, log) = (path(&format!("h{}-touch.json", i + 1)), path(&format!("h{}-touch.log", i + 1)));
        touches.push(Proc::spawn_split(format!("touch h{}", i + 1), &mut t, &json, &log)?);
    }
    let done = wait_all(&mut touches, deadline);
    let wall_s = started.elapsed().as_secs_f64();
    let server_cpu_s = match (cpu0, server.cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => 0.0,
    };
    for (t, status) in touches.iter().zip(&done) {
        if status.as_deref() != Some("ok") {
            eprintln!("{tag} {}: {}: {}", t.name(), status.as_deref().unwrap_or("timed out"), t.log_tail(5));
        }
    }
    drop(touches);
    // The daemons write their final statistics as they exit.
    for d in &mut daemons {
        let status = d.proc.stop(Duration::from_secs(5));
        if !status.is_some_and(|s| s.success()) {
            eprintln!("{tag} {}: exited {status:?}: {}", d.proc.name(), d.proc.log_tail(5));
        }
    }
    server.stop(Duration::from_secs(5));
    let server_tx_packets = read_json(&server_stats).and_then(|v| v["tx_packets"].as_u64()).unwrap_or(0);
    let mut hosts = Vec::new();
    let mut all_verified = true;
    for (i, (d, status)) in daemons.iter().zip(&done).enumerate() {
        let v = read_json(&d.stats).unwrap_or(Value::Null);
        let l = &v["latency_us"];
        let report = read_json(&path(&format!("h{}-touch.json", i + 1))).unwrap_or(Value::Null);
        let mismatches = report["mismatches"].as_u64().unwrap_or(u64::MAX);
        all_verified &= status.as_deref() == Some("ok") && mismatches == 0;
        hosts.push(HostFaults {
            host: i + 1,
            io: v["io"].as_str().unwrap_or("?").to_string(),
            network_faults: l["network"]["count"].as_u64().unwrap_or(0),
            network_p50_us: l["network"]["p50"].as_f64().unwrap_or(0.0),
            network_p99_us: l["network"]["p99"].as_f64().unwrap_or(0.0),
            cache_hits: l["cache_hit"]["count"].as_u64().unwrap_or(0),
            cache_hit_p50_us: l["cache_hit"]["p50"].as_f64().unwrap_or(0.0),
            naks: v["sessions"].as_array().and_then(|a| a.first()).and_then(|s| s["naks"].as_u64()).unwrap_or(0),
            touch: status.clone().unwrap_or_else(|| "timed out".into()),
            pages_touched: report["pages_touched"].as_u64().unwrap_or(0),
            mismatches,
        });
    }
    let daemon_io = hosts.first().map(|h| h.io.clone()).unwrap_or_default();
    Ok(FaultRow {
        mtu,
        io,
        runs: 1,
        failed_runs: usize::from(!all_verified),
        daemon_io,
        wall_s,
        network_faults: hosts.iter().map(|h| h.network_faults).sum(),
        network_p50_us: median(hosts.iter().map(|h| h.network_p50_us).collect()),
        network_p99_us: hosts.iter().map(|h| h.network_p99_us).fold(0.0, f64::max),
        cache_hits: hosts.iter().map(|h| h.cache_hits).sum(),
        cache_hit_p50_us: median(hosts.iter().map(|h| h.cache_hit_p50_us).collect()),
        server_tx_packets,
        server_cpu_s,
        all_verified,
        hosts,
    })
}

/// Every run at one MTU, in one lab (removed on return, whatever happens).
fn measure_mtu(
    ctx: &Ctx<'_>,
    mtu: usize,
    split: Option<&str>,
    run: &mut u16,
    pushes: &mut Vec<PushRow>,
    faults: &mut Vec<FaultRow>,
) -> anyhow::Result<()> {
    let args = ctx.args;
    let hosts = usize::from(args.hosts);
    let mut cfg = LabConfig::new(netlab::unique_lab_name("bxdpd"), hosts + 1).mtu(mtu as u32);
    if args.loss > 0.0 {
        let loss = LinkConditions::new().with_loss_rx(Loss::from_probability(args.loss)?);
        for i in 1..=hosts {
            cfg = cfg.host_conditions(i, loss);
        }
    }
    let lab = Lab::create(&cfg).context("creating the lab")?;
    if !args.bridge_netfilter {
        crate::xdp_cmd::switch_netfilter_off(&lab)?;
    }
    if let Some(mask) = split {
        steer_switch_port(&lab, 0, mask)?;
    }
    for rep in 0..args.repeat {
        for part in [Part::Push, Part::Faults] {
            if !args.runs.contains(&part) {
                continue;
            }
            let mut ios = args.io.clone();
            if rep % 2 == 1 {
                ios.reverse();
            }
            for io in ios {
                *run += 1;
                let what = if part == Part::Push { "push" } else { "faults" };
                eprintln!("MTU {mtu}, {}: {what} (run {} of {})", io.name(), rep + 1, args.repeat);
                let context = || format!("{what}, MTU {mtu}, {}", io.name());
                match part {
                    Part::Push => pushes.push(push_run(ctx, &lab, mtu, io, *run).with_context(context)?),
                    Part::Faults => faults.push(fault_run(ctx, &lab, mtu, io, *run).with_context(context)?),
                }
            }
        }
    }
    drop(lab);
    Ok(())
}

/// Runs `bench xdp-daemons`.
pub fn run(args: &XdpDaemonsArgs) -> anyhow::Result<ExitCode> {
    netlab::check_prerequisites().context("bench xdp-daemons needs a netlab lab (root)")?;
    if args.loss > 0.0 {
        netlab::preflight::check_nft().context("netlab's loss needs nftables")?;
    }
    let bins = Binaries::find(args.bin_dir.as_deref())?;
    let mut scratch = Scratch::new("xdp-daemons", args.keep)?;
    let pages = args.mib * 256;
    let image = spindrift_protocol::sim::content::Image::generate(7, pages).into_bytes();
    let image_path = scratch.path("image.img");
    std::fs::write(&image_path, &image)?;
    let image_bytes = image.len() as u64;
    drop(image);
    let cpus = cpu_count();
    // The CPU split: the server on CPU 0, what it sends processed on CPUs 1.. (mask without bit 0).
    let split = (args.cpu_split && cpus >= 2).then(|| format!("{:x}", ((1u128 << cpus.min(64)) - 1) & !1));
    let load = load_average();
    let ctx = Ctx {
        server_cpus: split.as_ref().map(|_| "0".to_string()),
        args,
        bins: &bins,
        scratch: &scratch,
        image: &image_path,
        image_bytes,
        timeout: Duration::from_secs(args.timeout_s),
    };
    let (mut pushes, mut faults) = (Vec::new(), Vec::new());
    let mut run = 0u16;
    let mut measured = Ok(());
    for &mtu in &args.mtus {
        measured = measure_mtu(&ctx, mtu, split.as_deref(), &mut run, &mut pushes, &mut faults);
        if measured.is_err() {
            break;
        }
    }
    drop(ctx);
    if let Err(e) = measured {
        scratch.keep(); // the logs of the failed run
        return Err(e);
    }
    let ok = pushes.iter().all(|r| r.all_verified) && faults.iter().all(|r| r.all_verified);
    if !ok {
        scratch.keep(); // the logs of the failed run
    }
    let (push_runs, fault_runs) = (pushes, faults);
    let mut pushes = Vec::new();
    let mut faults = Vec::new();
    for &mtu in &args.mtus {
        for &io in &args.io {
            // A failed run's figures (a fetch that stalled, say) would skew the medians: they are
            // taken over the verified runs, unless none was.
            let p: Vec<&PushRow> = push_runs.iter().filter(|r| r.mtu == mtu && r.io == io).collect();
            let p_ok: Vec<&PushRow> = p.iter().copied().filter(|r| r.all_verified).collect();
            pushes.extend(median_push(if p_ok.is_empty() { &p } else { &p_ok }).map(|mut m| {
                m.failed_runs = p.len() - p_ok.len();
                m
            }));
            let f: Vec<&FaultRow> = fault_runs.iter().filter(|r| r.mtu == mtu && r.io == io).collect();
            let f_ok: Vec<&FaultRow> = f.iter().copied().filter(|r| r.all_verified).collect();
            faults.extend(median_faults(if f_ok.is_empty() { &f } else { &f_ok }).map(|mut m| {
                m.failed_runs = f.len() - f_ok.len();
                m
            }));
        }
    }
    if args.json {
        let v = serde_json::json!({
            "hosts": args.hosts,
            "image_bytes": image_bytes,
            "loss": args.loss,
            "fraction": args.fraction,
            "zstd_level": args.zstd_level,
            "bridge_netfilter": args.bridge_netfilter,
            "cpu_split": split.is_some(),
            "cpus": cpus,
            "load_average_1min_at_start": load,
            "repeat": args.repeat,
            "rate": args.rate,
            "push": pushes,
            "faults": faults,
            "push_runs": push_runs,
            "fault_runs": fault_runs,
            "ratios": ratios(&pushes, &faults),
            "all_verified": ok,
        });
        println!("{v}");
    } else {
        print!("{}", tables(args, image_bytes, split.is_some(), load, &pushes, &faults));
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The verified column: `yes`, `NO`, or how many runs failed (left out of the medians).
fn verified(all: bool, failed: usize, used: usize) -> String {
    match (all, failed) {
        (true, 0) => "yes".to_string(),
        (true, n) => format!("yes, {n} more run(s) FAILED and left out"),
        (false, _) => format!("NO ({used} runs failed)"),
    }
}

/// AF_XDP over UDP per MTU.
fn ratios(pushes: &[PushRow], faults: &[FaultRow]) -> Vec<Value> {
    let mut mtus: Vec<usize> = pushes.iter().map(|r| r.mtu).chain(faults.iter().map(|r| r.mtu)).collect();
    mtus.sort_unstable();
    mtus.dedup();
    let q = |a: f64, b: f64| if b > 0.0 { Some(a / b) } else { None };
    mtus.into_iter()
        .map(|mtu| {
            let p = |io| pushes.iter().find(|r| r.mtu == mtu && r.io == io);
            let f = |io| faults.iter().find(|r| r.mtu == mtu && r.io == io);
            let mut v = serde_json::json!({ "mtu": mtu });
            if let (Some(u), Some(x)) = (p(Io::Udp), p(Io::Xdp)) {
                v["push_pps"] = serde_json::json!(q(x.pps, u.pps));
                v["push_pps_per_server_cpu_s"] = serde_json::json!(q(x.pps_per_server_cpu_s, u.pps_per_server_cpu_s));
                v["push_goodput"] = serde_json::json!(q(x.goodput_gbps, u.goodput_gbps));
            }
            if let (Some(u), Some(x)) = (f(Io::Udp), f(Io::Xdp)) {
                v["fault_network_p50"] = serde_json::json!(q(x.network_p50_us, u.network_p50_us));
                v["fault_network_p99"] = serde_json::json!(q(x.network_p99_us, u.network_p99_us));
            }
            v
        })
        .collect()
}

fn tables(
    args: &XdpDaemonsArgs,
    image_bytes: u64,
    split: bool,
    load: f64,
    pushes: &[PushRow],
    faults: &[FaultRow],
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "spindrift-server on h0, {} receiving hosts, {} MiB image (mixed pages, zstd level {}), {}% receive loss \
         per host, one lab per MTU{}{}.\n{}; {} CPUs, load average {load:.2} at the start. Each figure is the \
         median of {} runs.",
        args.hosts,
        image_bytes >> 20,
        args.zstd_level,
        args.loss * 100.0,
        if args.bridge_netfilter { ", bridge netfilter on" } else { "" },
        args.rate.as_ref().map(|r| format!(", server paced at {r}")).unwrap_or_default(),
        if split {
            "server pinned to CPU 0, the switch's and receivers' kernel work steered to the others (RPS)"
        } else {
            "no CPU split: the switch's and receivers' kernel work runs in the server's softirqs"
        },
        cpu_count(),
        args.repeat
    );
    if !pushes.is_empty() {
        let _ = writeln!(s, "\npush (--push all to `spindrift-client fetch --verify` on every host):");
        let _ = writeln!(
            s,
            "| MTU | io | transfer s | server CPU s | server tx pkts | pkts/s | pkts/server CPU-s | \
             goodput Gbit/s | Gbit/server CPU-s | repairs | NAKs | verified |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in pushes {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.2} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {} | {} | {} |",
                r.mtu,
                r.io.name(),
                r.transfer_s,
                r.server_cpu_s,
                r.server_tx_packets,
                r.pps,
                r.pps_per_server_cpu_s,
                r.goodput_gbps,
                r.goodput_per_server_cpu_s_gbps,
                r.repair_packets,
                r.naks,
                verified(r.all_verified, r.failed_runs, r.runs)
            );
        }
    }
    if !faults.is_empty() {
        let _ = writeln!(
            s,
            "\nfaults (--push none; daemons on every host, one touch process each, {}% of the image in runs, \
             the same pages on every host):",
            args.fraction * 100.0
        );
        let _ = writeln!(
            s,
            "| MTU | io (daemons) | wall s | network faults | network p50 us | network p99 us | cache hits | \
             cache-hit p50 us | server tx pkts | server CPU s | verified |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        for r in faults {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {} | {:.0} | {:.0} | {} | {:.1} | {} | {:.2} | {} |",
                r.mtu,
                r.daemon_io,
                r.wall_s,
                r.network_faults,
                r.network_p50_us,
                r.network_p99_us,
                r.cache_hits,
                r.cache_hit_p50_us,
                r.server_tx_packets,
                r.server_cpu_s,
                verified(r.all_verified, r.failed_runs, r.runs)
            );
        }
        let _ = writeln!(s, "(network p50: median of the hosts' p50; p99: the worst host's p99)");
    }
    let _ = writeln!(s);
    for v in ratios(pushes, faults) {
        let f = |k: &str| v[k].as_f64().map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into());
        let mut parts = Vec::new();
        if !v["push_pps"].is_null() {
            parts.push(format!(
                "push {} pkts/s, {} pkts per server CPU-s, {} goodput",
                f("push_pps"),
                f("push_pps_per_server_cpu_s"),
                f("push_goodput")
            ));
        }
        if !v["fault_network_p50"].is_null() {
            parts.push(format!(
                "network-fault p50 {}, p99 {} (below 1: AF_XDP faster)",
                f("fault_network_p50"),
                f("fault_network_p99")
            ));
        }
        if !parts.is_empty() {
            let _ = writeln!(s, "MTU {}: AF_XDP / UDP = {}", v["mtu"], parts.join("; "));
        }
    }
    for r in pushes.iter().filter(|r| !r.all_verified) {
        let _ = writeln!(s, "push MTU {} {}: {}", r.mtu, r.io.name(), r.fetches.join("; "));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    fn push_row(io: Io, pps: f64) -> PushRow {
        PushRow {
            mtu: 1500,
            io,
            runs: 1,
            failed_runs: 0,
            transfer_s: 1.0,
            wall_s: 1.5,
            server_cpu_s: 0.5,
            server_tx_packets: pps as u64,
            server_tx_bytes: 0,
            repair_packets: 0,
            naks: 0,
            requests: 0,
            pages_pushed: 0,
            pages_sent: 0,
            pps,
            pps_per_server_cpu_s: pps * 2.0,
            goodput_gbps: 0.5,
            goodput_per_server_cpu_s_gbps: 1.0,
            all_verified: true,
            fetches: Vec::new(),
        }
    }

    #[test]
    fn runs_fold_into_medians_and_ratios() {
        let runs = [push_row(Io::Udp, 100.0), push_row(Io::Udp, 300.0), push_row(Io::Udp, 200.0)];
        let refs: Vec<&PushRow> = runs.iter().collect();
        let m = median_push(&refs).expect("rows");
        assert_eq!((m.runs, m.pps, m.server_tx_packets), (3, 200.0, 200));
        let xdp = push_row(Io::Xdp, 400.0);
        let r = ratios(&[m, xdp], &[]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["push_pps"].as_f64(), Some(2.0));
        assert!(r[0]["fault_network_p50"].is_null());
    }
}
