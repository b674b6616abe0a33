//! `bench vs-udpcast`: spindrift against Debian's udpcast, side by side, in one netlab run.
//!
//! ```text
//! bench vs-udpcast [--hosts 4] [--mib 64] [--loss 0.05] [--timeout-s 180] [--json]
//! ```
//!
//! One lab: h0 sends, h1..hN receive, every receiving host loses `--loss` of what it receives
//! (nftables, independently per packet). The same image (mixed content from the simulator's
//! generator: zero, text-like and random pages) goes to every receiver twice:
//!
//! 1. **spindrift**: `spindrift-server --image IMG --push all --min-receivers N` on h0 and
//!    `spindrift-client fetch --verify IMG` on each receiver;
//! 2. **udpcast**: `udp-sender --file IMG --min-receivers N --nokbd --rexmit-hello-interval 100` on h0
//!    and `udp-receiver --file OUT` on each receiver, data and rendezvous on 239.0.0.0/8 groups (its
//!    defaults otherwise: full duplex, no FEC, no rate limit).
//!
//! Reported per tool: wall time from the receivers' start to the last receiver's exit, the bytes h0's
//! `eth0` transmitted (`ip -s link`, layer-2 bytes, everything the sender sent), that over the image
//! size, and whether every receiver's file equals the image. The spindrift binaries are taken from
//! beside this one (build them with `cargo build --release -p spindrift-server -p spindrift-client`)
//! or `--bin-dir`. Needs root and udpcast (`scripts/setup.sh` installs it). Processes are killed and
//! the lab removed whatever happens (the lab's drop kills what is left inside it).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use netlab::{Lab, LabConfig, LinkConditions, Loss};
use serde::Serialize;

use crate::args;
use crate::lab_run::{check_receivers, lossy_lab_preflight, tx_counters, wait_all, which, Proc, Push, Scratch};

/// The comparison's knobs.
#[derive(Debug, Clone, Args)]
pub struct VsUdpcastArgs {
    /// Receiving hosts.
    #[arg(long, default_value = "4")]
    pub hosts: usize,
    /// Image size, MiB.
    #[arg(long, default_value = "64")]
    pub mib: u32,
    /// Receive loss of every receiving host, in [0, 1).
    #[arg(long, default_value = "0.05", value_parser = args::probability)]
    pub loss: f64,
    /// Longest a tool may take for the whole transfer, seconds.
    #[arg(long, default_value = "180")]
    pub timeout_s: u64,
    /// spindrift-server's pacing rate (its `--rate`), e.g. 1gbit (default: unpaced).
    #[arg(long)]
    pub rate: Option<String>,
    /// Where spindrift-server and spindrift-client are (default: beside this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Skip the second spindrift run with raw pages (--zstd-level 0), which shows what is left of
    /// the difference without compression.
    #[arg(long)]
    pub no_raw_row: bool,
    /// Do not pass --min-receivers to spindrift-server (for server builds that predate it).
    #[arg(long)]
    pub no_min_receivers: bool,
    /// Extra flags for spindrift-server, e.g. "--flow-control off" (split on spaces).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub server_flags: String,
    /// Keep the scratch directory (image, received files, logs, server statistics) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// What one tool did.
#[derive(Debug, Clone, Serialize)]
pub struct ToolResult {
    /// The tool.
    pub tool: String,
    /// Seconds from starting the receivers to the last one's exit.
    pub wall_s: f64,
    /// Bytes h0's eth0 transmitted during the run.
    pub sender_tx_bytes: u64,
    /// Packets h0's eth0 transmitted.
    pub sender_tx_packets: u64,
    /// `sender_tx_bytes` over the image size.
    pub tx_per_image: f64,
    /// Every receiver exited successfully and its file equals the image.
    pub all_correct: bool,
    /// Per receiver: exit status and whether the file matched.
    pub receivers: Vec<String>,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Receiving hosts.
    pub hosts: usize,
    /// Image bytes.
    pub image_bytes: u64,
    /// Receive loss per host.
    pub loss: f64,
    /// The two runs.
    pub results: Vec<ToolResult>,
}

const SPINDRIFT_PORT: u16 = 7700;
const UDPCAST_PORTBASE: u16 = 9000;

/// Runs `bench vs-udpcast`.
pub fn run(a: &VsUdpcastArgs) -> anyhow::Result<ExitCode> {
    if a.hosts == 0 || a.hosts > 64 {
        bail!("--hosts {} is out of range: 1..=64", a.hosts);
    }
    if a.mib == 0 || a.mib > 4096 {
        bail!("--mib {} is out of range: 1..=4096", a.mib);
    }
    let bins = lossy_lab_preflight(a.bin_dir.as_deref())?;
    for tool in ["udp-sender", "udp-receiver"] {
        which(tool).with_context(|| format!("{tool} not found: install udpcast (scripts/setup.sh)"))?;
    }

    let scratch = Scratch::new("vs-udpcast", a.keep)?;
    let pages = a.mib * 256;
    let image = spindrift_protocol::sim::content::Image::generate(7, pages).into_bytes();
    let image_path = scratch.path("image.img");
    std::fs::write(&image_path, &image)?;
    let image_bytes = image.len() as u64;

    let loss = LinkConditions::new().with_loss_rx(Loss::from_probability(a.loss)?);
    let mut cfg = LabConfig::new(netlab::unique_lab_name("vsudp"), a.hosts + 1);
    for i in 1..=a.hosts {
        cfg = cfg.host_conditions(i, loss);
    }
    let lab = Lab::create(&cfg).context("creating the lab")?;
    eprintln!("lab {} up: h0 sends, h1..h{} receive with {}% receive loss", lab.name(), a.hosts, a.loss * 100.0);
    let timeout = Duration::from_secs(a.timeout_s);
    let group = Ipv4Addr::new(239, 77, (lab.index() % 256) as u8, 1);
    let mut results = Vec::new();
    let mut variants = vec![("spindrift", "spindrift", Vec::new())];
    if !a.no_raw_row {
        variants.push(("spindrift, raw pages (--zstd-level 0)", "spindrift-raw", vec!["--zstd-level", "0"]));
    }
    for (name, tag, flags) in variants {
        let mut server_flags: Vec<String> = a.server_flags.split_whitespace().map(str::to_string).collect();
        server_flags.extend(flags.iter().map(|s| s.to_string()));
        if let Some(rate) = &a.rate {
            server_flags.extend(["--rate".to_string(), rate.clone()]);
        }
        let push = Push {
            bins: &bins,
            scratch: &scratch,
            tag,
            image: &image_path,
            image_bytes,
            group,
            port: SPINDRIFT_PORT,
            hosts: a.hosts,
            io: None,
            mtu: None,
            min_receivers: !a.no_min_receivers,
            verify: false,
            remove_outputs: false,
            server_flags,
            server_cpus: None,
            fetch_flags: Vec::new(),
            timeout,
        };
        results.push(spindrift(&lab, &push, name, &image)?);
    }
    let data_group = Ipv4Addr::new(239, 78, (lab.index() % 256) as u8, 1);
    let rdv_group = Ipv4Addr::new(239, 78, (lab.index() % 256) as u8, 2);
    results.push(udpcast(a, &lab, &image_path, &image, data_group, rdv_group, timeout, &scratch)?);
    drop(lab);

    let cmp = Comparison { hosts: a.hosts, image_bytes, loss: a.loss, results };
    if a.json {
        println!("{}", serde_json::to_string(&cmp)?);
    } else {
        print!("{}", table(&cmp));
    }
    Ok(if cmp.results.iter().all(|r| r.all_correct) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn spindrift(lab: &Lab, push: &Push<'_>, name: &str, image: &[u8]) -> anyhow::Result<ToolResult> {
    let h0 = lab.host(0)?;
    let (tx0, pk0) = tx_counters(h0)?;
    let outcome = push.run(lab)?;
    let (tx1, pk1) = tx_counters(h0)?;
    let done: Vec<_> = outcome.fetched.iter().map(|f| (f.status.clone(), f.out.clone())).collect();
    let (all_correct, receivers) =
        check_receivers("spindrift", &done, image, |i| push.scratch.path(&format!("{}-h{i}-fetch.log", push.tag)));
    if let Some(v) = &outcome.server_stats {
        eprintln!(
            "spindrift server: tx {} bytes ({} data, {} repair packets), {} NAKs, {} statuses, {} requests, \
             pages pushed {} of {} sent, window holds {}",
            v["tx_bytes"],
            v["data_packets"],
            v["repair_packets"],
            v["naks"],
            v["statuses"],
            v["requests"],
            v["pages_pushed"],
            v["pages_sent"],
            v["push_window_stalls"]
        );
    }
    let bytes = tx1.saturating_sub(tx0);
    Ok(ToolResult {
        tool: name.to_string(),
        wall_s: outcome.wall_s,
        sender_tx_bytes: bytes,
        sender_tx_packets: pk1.saturating_sub(pk0),
        tx_per_image: bytes as f64 / image.len() as f64,
        all_correct,
        receivers,
    })
}

#[allow(clippy::too_many_arguments)]
fn udpcast(
    a: &VsUdpcastArgs,
    lab: &Lab,
    image_path: &Path,
    image: &[u8],
    data_group: Ipv4Addr,
    rdv_group: Ipv4Addr,
    timeout: Duration,
    scratch: &Scratch,
) -> anyhow::Result<ToolResult> {
    let h0 = lab.host(0)?;
    let (tx0, pk0) = tx_counters(h0)?;
    let portbase = UDPCAST_PORTBASE.to_string();
    let mut receivers_c = Vec::new();
    let mut outs = Vec::new();
    let started = Instant::now();
    for i in 1..=a.hosts {
        let h = lab.host(i)?;
        let out = scratch.path(&format!("udpcast-h{i}.img"));
        let mut c = h.command("udp-receiver")?;
        c.args(["--file", &out.display().to_string(), "--interface", h.ifname(), "--nokbd"]).args([
            "--portbase",
            &portbase,
            "--mcast-rdv-address",
            &rdv_group.to_string(),
        ]);
        receivers_c.push(Proc::spawn_logged(
            format!("udp-receiver h{i}"),
            &mut c,
            &scratch.path(&format!("udpr-h{i}.log")),
        )?);
        outs.push(out);
    }
    let mut sender = h0.command("udp-sender")?;
    sender
        .args(["--file", &image_path.display().to_string(), "--interface", h0.ifname(), "--nokbd"])
        .args(["--portbase", &portbase, "--min-receivers", &a.hosts.to_string()])
        .args(["--mcast-data-address", &data_group.to_string(), "--mcast-rdv-address", &rdv_group.to_string()])
        // Under loss, a receiver that missed the one HELLO (or the answer to its connection) never
        // joins: have the sender repeat HELLO until the transfer starts.
        .args(["--start-timeout", "30", "--rexmit-hello-interval", "100"]);
    let mut senders = vec![Proc::spawn_logged("udp-sender", &mut sender, &scratch.path("udps.log"))?];
    let done = wait_all(&mut receivers_c, started + timeout);
    let wall_s = started.elapsed().as_secs_f64();
    let _ = wait_all(&mut senders, Instant::now() + Duration::from_secs(5));
    drop(senders);
    drop(receivers_c);
    let (tx1, pk1) = tx_counters(h0)?;
    let done: Vec<_> = done.into_iter().zip(outs).collect();
    let (all_correct, receivers) =
        check_receivers("udpcast", &done, image, |i| scratch.path(&format!("udpr-h{i}.log")));
    if !all_correct {
        let log = std::fs::read_to_string(scratch.path("udps.log")).unwrap_or_default();
        eprintln!("udp-sender: {}", log.lines().rev().take(12).collect::<Vec<_>>().join(" | "));
    }
    let bytes = tx1.saturating_sub(tx0);
    Ok(ToolResult {
        tool: "udpcast".to_string(),
        wall_s,
        sender_tx_bytes: bytes,
        sender_tx_packets: pk1.saturating_sub(pk0),
        tx_per_image: bytes as f64 / image.len() as f64,
        all_correct,
        receivers,
    })
}

fn table(c: &Comparison) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} MiB image (mixed pages) from h0 to {} hosts, {}% receive loss per host, one netlab run.\n",
        c.image_bytes >> 20,
        c.hosts,
        c.loss * 100.0
    );
    let _ =
        writeln!(s, "| tool | wall time (s) | sender tx bytes (eth0) | tx packets | tx / image | all files correct |");
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in &c.results {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} | {} | {:.3} | {} |",
            r.tool,
            r.wall_s,
            r.sender_tx_bytes,
            r.sender_tx_packets,
            r.tx_per_image,
            if r.all_correct { "yes" } else { "NO" }
        );
    }
    for r in &c.results {
        let _ = writeln!(s, "\n{}: {}", r.tool, r.receivers.join("; "));
    }
    s
}
