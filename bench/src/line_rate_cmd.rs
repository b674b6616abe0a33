//! `bench line-rate`: a whole image to hosts behind shaped links, paced at a fraction of the link,
//! beside uftp at the same rate in the same lab.
//!
//! ```text
//! bench line-rate [--rows 1x1gbit,4x250mbit,16x100mbit] [--loss 0,0.02] [--modes paced,uftp]
//!                 [--pace 0.9] [--mib 64] [--timeout-s 120] [--json]
//! ```
//!
//! For each row `HxRATE` and each loss, one netlab lab: h0 serves, h1..hH receive, each behind
//! a link of `RATE` (a `tbf` qdisc on its switch port, netlab's queue of 50 ms) that loses the
//! given fraction of what it carries (nftables, independently per packet and per host). In it,
//! every mode moves the same random image to every receiver:
//!
//! * `paced`: `spindrift-server --push all --min-receivers H --rate PACE*RATE` on h0,
//!   `spindrift-client fetch --verify` on each receiver;
//! * `unpaced`: the same without `--rate`: as fast as the receivers' windows let it;
//! * `cc`: the same with `--congestion-control on` (PROTOCOL.md 11.1): the server finds the rate;
//! * `unpaced-tcp`, `cc-tcp`: `unpaced` or `cc` while one TCP flow (iperf3, `--tcp-cc`, cubic
//!   by default) from h0 to h1 shares h1's bottleneck: it starts 1 s before the fetches and runs
//!   until they end, and its throughput over the fetches' time is reported beside spindrift's
//!   goodput (bytes over the image then count the TCP flow's bytes too). Both iperf3 ends run
//!   at `nice -n -10`: on 2 cores the fetches would otherwise starve the TCP receiver of CPU
//!   (seen: its window closed, 0 bytes for 2 s and no retransmission), which measures the
//!   scheduler, not the bottleneck;
//! * `uftp`: Debian's uftp (`uftp -R PACE*RATE`, closed group of the H receivers, no encryption,
//!   the lab's sub-millisecond round trip as its initial GRTT) to `uftpd` on each receiver;
//! * `uftp-cc`: uftp with TFMCC congestion control (`-C tfmcc`), the link rate as its cap.
//!
//! Reported per run: wall time (spindrift: from starting the fetches to the last one's exit;
//! uftp: the sender's whole run, registration and completion included; both write every
//! receiver's image to a file, in `/dev/shm` when it exists), spindrift's longest fetch's own transfer time, goodput (image bytes
//! over wall) as a fraction of the link, what h0's `eth0` sent over the image, spindrift's
//! requests per page it sent (Request messages, the figure a request storm inflates) and pages
//! asked for per page sent, and the packets the receivers' bottleneck qdiscs dropped as a
//! fraction of those they carried. Needs root, nftables and uftp (`scripts/setup.sh`) and the
//! release spindrift binaries beside this one (or `--bin-dir`). Every process is killed and the
//! lab removed whatever happens.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use netlab::{Lab, LabConfig, LinkConditions, Loss, Rate};
use serde::Serialize;

use crate::args;
use crate::lab_run::{
    check_receivers, lossy_lab_preflight, random_image, tx_counters, wait_all, which, Binaries, Proc, Push, Scratch,
};

/// One way of moving the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// spindrift paced at `--pace` of the link.
    Paced,
    /// spindrift without a rate.
    Unpaced,
    /// `unpaced` beside one iperf3 TCP flow through h1's bottleneck.
    UnpacedTcp,
    /// spindrift with congestion control.
    Cc,
    /// `cc` beside one iperf3 TCP flow through h1's bottleneck.
    CcTcp,
    /// uftp at `--pace` of the link.
    Uftp,
    /// uftp with TFMCC, capped at the link rate.
    UftpCc,
}

/// The benchmark's knobs.
#[derive(Debug, Clone, Args)]
pub struct LineRateArgs {
    /// Rows as HOSTSxRATE (receiving hosts and each one's link), comma-separated.
    #[arg(long, default_value = "1x1gbit,4x250mbit,16x100mbit", value_delimiter = ',')]
    pub rows: Vec<String>,
    /// Link loss rates to run every row with, each in [0, 1).
    #[arg(long, default_value = "0,0.02", value_delimiter = ',', value_parser = args::probability)]
    pub loss: Vec<f64>,
    /// Modes to run in every row and loss.
    #[arg(long, default_value = "paced,uftp", value_delimiter = ',')]
    pub modes: Vec<Mode>,
    /// Pacing rate as a fraction of the link rate, in (0, 1].
    #[arg(long, default_value = "0.9", value_parser = args::fraction)]
    pub pace: f64,
    /// Image size, MiB (random bytes).
    #[arg(long, default_value = "64")]
    pub mib: u32,
    /// Seed of the image.
    #[arg(long, default_value = "1")]
    pub seed: u64,
    /// Longest one run may take, seconds.
    #[arg(long, default_value = "120")]
    pub timeout_s: u64,
    /// Where spindrift-server and spindrift-client are (default: beside this binary).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Extra flags for spindrift-server (split on spaces).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub server_flags: String,
    /// TCP congestion control of the `unpaced-tcp` and `cc-tcp` flow (iperf3 `-C`).
    #[arg(long, default_value = "cubic")]
    pub tcp_cc: String,
    /// Extra flags for every `spindrift-client fetch` (split on spaces).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub fetch_flags: String,
    /// Keep the scratch directory (logs, statistics) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One run of one mode in one row.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Receiving hosts.
    pub hosts: usize,
    /// Each receiver's link, bits per second.
    pub link_bps: u64,
    /// Link loss.
    pub loss: f64,
    /// The mode.
    pub mode: Mode,
    /// The sender's rate setting, bits per second (None: none).
    pub rate_bps: Option<u64>,
    /// Seconds (see the module docs for what each mode's wall covers).
    pub wall_s: f64,
    /// spindrift: the longest fetch's own transfer time (its report's `seconds`: from its first
    /// request to its last page, without process start and writing the image out).
    pub transfer_s: Option<f64>,
    /// Image bits over wall, over the link rate.
    pub goodput_of_link: f64,
    /// Bytes h0's eth0 sent (layer 2), over the image.
    pub bytes_per_image: f64,
    /// spindrift: Request messages received per page sent.
    pub requests_per_page: Option<f64>,
    /// spindrift: pages asked for (all requests together) per page sent.
    pub pages_requested_per_page: Option<f64>,
    /// spindrift: pages sent by the push, over pages sent.
    pub pushed_fraction: Option<f64>,
    /// Packets dropped by the receivers' bottleneck qdiscs.
    pub bottleneck_drops: u64,
    /// Those drops over the packets the qdiscs carried.
    pub drop_fraction: f64,
    /// The sender's CPU seconds during the run (spindrift only; the bridge's fan-out to every
    /// receiver runs in its context and counts here).
    pub server_cpu_s: Option<f64>,
    /// The receivers' CPU seconds together (spindrift: the fetches; uftp: the uftpd daemons).
    pub receivers_cpu_s: Option<f64>,
    /// `unpaced-tcp`, `cc-tcp`: the TCP flow's throughput while the fetches ran, over the link rate.
    pub tcp_of_link: Option<f64>,
    /// Every receiver got the whole image, bit for bit.
    pub all_correct: bool,
}

/// Everything the benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Image bytes.
    pub image_bytes: u64,
    /// Pacing fraction.
    pub pace: f64,
    /// One entry per row, loss and mode.
    pub runs: Vec<RunResult>,
}

const SPINDRIFT_PORT: u16 = 7710;
const UFTP_PORT: u16 = 7720;
const IPERF_PORT: u16 = 7730;
/// How long the TCP flow runs before the fetches start (its slow start is over by then).
const TCP_LEAD: Duration = Duration::from_secs(1);
/// iperf3's report interval: the TCP throughput over the fetches' time is summed from these.
const TCP_INTERVAL_S: f64 = 0.1;

/// Runs `bench line-rate`.
pub fn run(a: &LineRateArgs) -> anyhow::Result<ExitCode> {
    if a.mib == 0 || a.mib > 1024 {
        bail!("--mib {} is out of range: 1..=1024", a.mib);
    }
    let rows = a.rows.iter().map(|r| parse_row(r)).collect::<anyhow::Result<Vec<_>>>()?;
    let bins = lossy_lab_preflight(a.bin_dir.as_deref())?;
    if a.modes.iter().any(|m| matches!(m, Mode::Uftp | Mode::UftpCc)) {
        for tool in ["uftp", "uftpd"] {
            which(tool).with_context(|| format!("{tool} not found: install uftp (scripts/setup.sh)"))?;
        }
    }
    if a.modes.iter().any(|m| matches!(m, Mode::UnpacedTcp | Mode::CcTcp)) {
        which("iperf3").context("iperf3 not found: install it (scripts/setup.sh)")?;
    }
    // Received images go to memory (tmpfs) when there is one: writing 16 x 64 MiB to this
    // machine's disk took 1.8 s of wall and 3.3 CPU-s, which would measure the disk, not the link.
    let shm = std::path::Path::new("/dev/shm");
    let scratch =
        if shm.is_dir() { Scratch::in_dir(shm, "line-rate", a.keep)? } else { Scratch::new("line-rate", a.keep)? };
    let image = random_image(u64::from(a.mib) * 256, a.seed);
    let image_path = scratch.path("image.img");
    std::fs::write(&image_path, &image)?;
    let timeout = Duration::from_secs(a.timeout_s);
    let mut runs = Vec::new();
    for &(hosts, link) in &rows {
        for &loss in &a.loss {
            let mut cond = LinkConditions::new().with_rate_rx(Some(link));
            if loss > 0.0 {
                cond = cond.with_loss_rx(Loss::from_probability(loss)?);
            }
            let mut cfg = LabConfig::new(netlab::unique_lab_name("lrate"), hosts + 1);
            for i in 1..=hosts {
                cfg = cfg.host_conditions(i, cond);
            }
            let lab = Lab::create(&cfg).context("creating the lab")?;
            eprintln!("lab {}: h1..h{hosts} behind {link} each, {}% loss", lab.name(), loss * 100.0);
            for &mode in &a.modes {
                let ctx =
                    RunCtx { a, lab: &lab, bins: &bins, scratch: &scratch, image: &image, image_path: &image_path };
                let tag = format!("{hosts}x{link}-{}-{mode:?}", loss * 100.0);
                let r = ctx.run(&tag, hosts, link, loss, mode, timeout)?;
                eprintln!(
                    "  {mode:?}: {:.2} s, {:.1}% of the link{}, {:.3}x the image, drops {:.2}%{}",
                    r.wall_s,
                    r.goodput_of_link * 100.0,
                    r.tcp_of_link.map_or(String::new(), |t| format!(" (TCP {:.1}%)", t * 100.0)),
                    r.bytes_per_image,
                    r.drop_fraction * 100.0,
                    if r.all_correct { "" } else { ", NOT ALL CORRECT" }
                );
                runs.push(r);
            }
            drop(lab);
        }
    }
    let report = Report { image_bytes: image.len() as u64, pace: a.pace, runs };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(if report.runs.iter().all(|r| r.all_correct) { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Parses `HOSTSxRATE`, e.g. `4x250mbit`.
fn parse_row(text: &str) -> anyhow::Result<(usize, Rate)> {
    let (h, r) = text.split_once('x').with_context(|| format!("row `{text}` is not HOSTSxRATE (e.g. 4x250mbit)"))?;
    let hosts: usize = h.trim().parse().with_context(|| format!("row `{text}`: `{h}` is not a host count"))?;
    if hosts == 0 || hosts > 64 {
        bail!("row `{text}`: {hosts} hosts is out of range 1..=64");
    }
    let rate: Rate = r.parse().with_context(|| format!("row `{text}`: bad rate"))?;
    Ok((hosts, rate))
}

/// Sums (packets, drops) of the receivers' bottleneck qdiscs (their switch ports' root `tbf`).
fn bottleneck_counters(lab: &Lab, hosts: usize) -> anyhow::Result<(u64, u64)> {
    let mut total = (0, 0);
    for i in 1..=hosts {
        let port = lab.host(i)?.switch_port();
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.switch_netns(), "tc", "-s", "-j", "qdisc", "show", "dev", &port])
            .output()
            .context("running tc in the switch namespace")?;
        if !out.status.success() {
            bail!("tc -s qdisc show dev {port} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("tc -j output")?;
        let root = v
            .as_array()
            .and_then(|qs| qs.iter().find(|q| q["kind"] == "tbf"))
            .with_context(|| format!("no tbf qdisc on {port}: {v}"))?;
        total.0 += root["packets"].as_u64().unwrap_or(0);
        total.1 += root["drops"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

struct RunCtx<'a> {
    a: &'a LineRateArgs,
    lab: &'a Lab,
    bins: &'a Binaries,
    scratch: &'a Scratch,
    image: &'a [u8],
    image_path: &'a std::path::Path,
}

impl RunCtx<'_> {
    fn run(
        &self,
        tag: &str,
        hosts: usize,
        link: Rate,
        loss: f64,
        mode: Mode,
        timeout: Duration,
    ) -> anyhow::Result<RunResult> {
        let paced = (link.bits_per_sec() as f64 * self.a.pace).round() as u64;
        let rate_bps = match mode {
            Mode::Paced | Mode::Uftp => Some(paced),
            Mode::UftpCc => Some(link.bits_per_sec()),
            Mode::Unpaced | Mode::UnpacedTcp | Mode::Cc | Mode::CcTcp => None,
        };
        let h0 = self.lab.host(0)?;
        let (tx0, _) = tx_counters(h0)?;
        let (pk0, dr0) = bottleneck_counters(self.lab, hosts)?;
        let index = (self.lab.index() % 256) as u8;
        let mut tcp_of_link = None;
        let (wall_s, transfer_s, all_correct, server_cpu_s, receivers_cpu_s, stats) = match mode {
            Mode::Paced | Mode::Unpaced | Mode::UnpacedTcp | Mode::Cc | Mode::CcTcp => {
                let mut server_flags: Vec<String> =
                    self.a.server_flags.split_whitespace().map(str::to_string).collect();
                if let Some(bps) = rate_bps {
                    server_flags.extend(["--rate".to_string(), format!("{bps}bit")]);
                }
                if matches!(mode, Mode::Cc | Mode::CcTcp) {
                    server_flags.extend(["--congestion-control".to_string(), "on".to_string()]);
                }
                let push = Push {
                    bins: self.bins,
                    scratch: self.scratch,
                    tag,
                    image: self.image_path,
                    image_bytes: self.image.len() as u64,
                    group: Ipv4Addr::new(239, 79, index, 1),
                    port: SPINDRIFT_PORT,
                    hosts,
                    io: None,
                    mtu: None,
                    min_receivers: true,
                    verify: false,
                    remove_outputs: false,
                    server_flags,
                    server_cpus: None,
                    fetch_flags: self.a.fetch_flags.split_whitespace().map(str::to_string).collect(),
                    timeout,
                };
                let tcp = if matches!(mode, Mode::UnpacedTcp | Mode::CcTcp) {
                    Some(TcpFlow::start(self, tag)?)
                } else {
                    None
                };
                // The fetches start now, this far into the TCP flow's clock.
                let tcp = tcp.map(|t| (t.started.elapsed().as_secs_f64(), t));
                let outcome = push.run(self.lab)?;
                if let Some((from, mut tcp)) = tcp {
                    let bits = tcp.bits_between(from, from + outcome.wall_s)?;
                    tcp_of_link = Some(bits / outcome.wall_s.max(1e-9) / link.bits_per_sec() as f64);
                }
                let done: Vec<_> = outcome.fetched.iter().map(|f| (f.status.clone(), f.out.clone())).collect();
                let (ok, _) = check_receivers("spindrift", &done, self.image, |i| {
                    self.scratch.path(&format!("{tag}-h{i}-fetch.log"))
                });
                for f in &outcome.fetched {
                    std::fs::remove_file(&f.out).ok();
                }
                let stat = |k: &str| outcome.server_stat(k) as f64;
                let sent = stat("pages_sent").max(1.0);
                let stats = (stat("requests") / sent, stat("pages_requested") / sent, stat("pages_pushed") / sent);
                let clients = Some(outcome.clients_cpu_s);
                (outcome.wall_s, Some(outcome.transfer_s()), ok, outcome.server_cpu_s, clients, Some(stats))
            }
            Mode::Uftp | Mode::UftpCc => {
                let (wall, ok, cpu) =
                    self.uftp(tag, hosts, rate_bps.unwrap_or(0), mode == Mode::UftpCc, index, timeout)?;
                (wall, None, ok, None, cpu, None)
            }
        };
        let (tx1, _) = tx_counters(h0)?;
        let (pk1, dr1) = bottleneck_counters(self.lab, hosts)?;
        let image_bits = self.image.len() as f64 * 8.0;
        let (drops, carried) = (dr1.saturating_sub(dr0), pk1.saturating_sub(pk0));
        Ok(RunResult {
            hosts,
            link_bps: link.bits_per_sec(),
            loss,
            mode,
            rate_bps,
            wall_s,
            transfer_s,
            goodput_of_link: image_bits / wall_s.max(1e-9) / link.bits_per_sec() as f64,
            bytes_per_image: tx1.saturating_sub(tx0) as f64 / self.image.len() as f64,
            requests_per_page: stats.map(|s| s.0),
            pages_requested_per_page: stats.map(|s| s.1),
            pushed_fraction: stats.map(|s| s.2),
            bottleneck_drops: drops,
            drop_fraction: drops as f64 / (carried + drops).max(1) as f64,
            server_cpu_s,
            receivers_cpu_s,
            tcp_of_link,
            all_correct,
        })
    }

    /// One uftp transfer: `uftpd` on every receiver, then `uftp` on h0 until it exits.
    fn uftp(
        &self,
        tag: &str,
        hosts: usize,
        rate_bps: u64,
        cc: bool,
        index: u8,
        timeout: Duration,
    ) -> anyhow::Result<(f64, bool, Option<f64>)> {
        let public = Ipv4Addr::new(239, 80, index, 1).to_string();
        let private = Ipv4Addr::new(239, 80, index, 2).to_string();
        let port = UFTP_PORT.to_string();
        let mut daemons = Vec::new();
        let mut uids = Vec::new();
        let mut outs = Vec::new();
        for i in 1..=hosts {
            let h = self.lab.host(i)?;
            let dir = self.scratch.path(&format!("{tag}-uftp-h{i}"));
            std::fs::create_dir_all(&dir)?;
            let uid = format!("0x{:08x}", u32::from(h.addr()));
            let mut c = h.command("uftpd")?;
            c.args(["-d", "-q", "-x", "1", "-I", h.ifname(), "-M", &public, "-p", &port, "-U", &uid])
                .arg("-D")
                .arg(&dir);
            daemons.push(Proc::spawn_logged(
                format!("uftpd h{i}"),
                &mut c,
                &self.scratch.path(&format!("{tag}-uftpd-h{i}.log")),
            )?);
            uids.push(uid);
            outs.push(dir.join(self.image_path.file_name().context("image file name")?));
        }
        std::thread::sleep(Duration::from_millis(300));
        let h0 = self.lab.host(0)?;
        let mut c = h0.command("uftp")?;
        c.args(["-x", "1", "-Y", "none", "-I", h0.ifname(), "-M", &public, "-P", &private, "-p", &port])
            .args(["-H", &uids.join(","), "-r", "0.01:0.001:1.0", "-b", "1400"])
            .args(["-R", &(rate_bps / 1000).to_string()]);
        if cc {
            c.args(["-C", "tfmcc"]);
        }
        c.arg(self.image_path);
        let started = Instant::now();
        let mut sender = vec![Proc::spawn_logged("uftp", &mut c, &self.scratch.path(&format!("{tag}-uftp.log")))?];
        let status = wait_all(&mut sender, started + timeout);
        let wall = started.elapsed().as_secs_f64();
        drop(sender);
        let cpu: Option<f64> = daemons.iter().map(Proc::cpu_seconds).sum();
        for d in &mut daemons {
            d.stop(Duration::from_secs(2));
        }
        let done: Vec<_> = outs.iter().map(|o| (status[0].clone(), o.clone())).collect();
        let (ok, _) =
            check_receivers("uftp", &done, self.image, |i| self.scratch.path(&format!("{tag}-uftpd-h{i}.log")));
        for o in &outs {
            std::fs::remove_file(o).ok();
        }
        if !ok {
            let log = std::fs::read_to_string(self.scratch.path(&format!("{tag}-uftp.log"))).unwrap_or_default();
            eprintln!("uftp: {}", log.lines().rev().take(8).collect::<Vec<_>>().join(" | "));
        }
        Ok((wall, ok, cpu))
    }
}

/// One iperf3 TCP flow from h0 to h1, reporting every [`TCP_INTERVAL_S`] seconds.
struct TcpFlow {
    _server: Proc,
    client: Proc,
    out: PathBuf,
    started: Instant,
}

impl TcpFlow {
    /// Starts `iperf3 -s` on h1 and the client on h0, then waits [`TCP_LEAD`].
    fn start(ctx: &RunCtx<'_>, tag: &str) -> anyhow::Result<TcpFlow> {
        let (h0, h1) = (ctx.lab.host(0)?, ctx.lab.host(1)?);
        let port = IPERF_PORT.to_string();
        let mut s = h1.command("nice")?;
        s.args(["-n", "-10", "iperf3", "-s", "-1", "-B", &h1.addr().to_string(), "-p", &port]);
        let server = Proc::spawn_logged("iperf3 -s", &mut s, &ctx.scratch.path(&format!("{tag}-iperf3-s.log")))?;
        std::thread::sleep(Duration::from_millis(200));
        let out = ctx.scratch.path(&format!("{tag}-iperf3-c.log"));
        let mut c = h0.command("nice")?;
        c.args(["-n", "-10", "iperf3", "-c", &h1.addr().to_string(), "-B", &h0.addr().to_string(), "-p", &port])
            .args(["-C", &ctx.a.tcp_cc])
            .args(["-t", &(ctx.a.timeout_s + 5).to_string(), "-i", &TCP_INTERVAL_S.to_string(), "--forceflush"]);
        let client = Proc::spawn_logged("iperf3 -c", &mut c, &out)?;
        let started = Instant::now();
        std::thread::sleep(TCP_LEAD);
        Ok(TcpFlow { _server: server, client, out, started })
    }

    /// Stops the flow and sums the bits of its report intervals within `from..to` seconds after
    /// the client started (the client's clock: its first interval starts when it connected).
    fn bits_between(&mut self, from: f64, to: f64) -> anyhow::Result<f64> {
        self.client.stop(Duration::from_secs(2));
        let log = std::fs::read_to_string(&self.out).context("reading iperf3's output")?;
        let intervals = parse_iperf_intervals(&log);
        if intervals.is_empty() {
            bail!("iperf3 reported no intervals: {}", log.lines().take(5).collect::<Vec<_>>().join(" | "));
        }
        Ok(intervals
            .iter()
            .map(|&(a, b, bits)| {
                let overlap = (b.min(to) - a.max(from)).max(0.0);
                bits * overlap / (b - a).max(1e-9)
            })
            .sum())
    }
}

/// The `(start s, end s, bits)` of iperf3's per-interval lines, e.g.
/// `[  5]   0.10-0.20   sec  2.88 MBytes   241 Mbits/sec    0    410 KBytes` (summary lines,
/// with a `sender`/`receiver` suffix, are left out).
fn parse_iperf_intervals(log: &str) -> Vec<(f64, f64, f64)> {
    log.lines()
        .filter(|l| l.starts_with('[') && l.contains(" sec ") && !l.contains("sender") && !l.contains("receiver"))
        .filter_map(|l| {
            let rest = l.split_once(']')?.1;
            let mut w = rest.split_whitespace();
            let (a, b) = w.next()?.split_once('-')?;
            (w.next()? == "sec").then_some(())?;
            let (n, unit) = (w.next()?.parse::<f64>().ok()?, w.next()?);
            let bytes = match unit {
                "Bytes" => n,
                "KBytes" => n * 1024.0,
                "MBytes" => n * 1024.0 * 1024.0,
                "GBytes" => n * 1024.0 * 1024.0 * 1024.0,
                _ => return None,
            };
            Some((a.parse().ok()?, b.parse().ok()?, bytes * 8.0))
        })
        .collect()
}

fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} MiB random image from h0 to every receiver; paced modes at {:.0}% of the link.\n",
        r.image_bytes >> 20,
        r.pace * 100.0
    );
    let _ = writeln!(
        s,
        "| hosts x link | loss | mode | wall (s) | transfer (s) | goodput / link | bytes / image | requests / page | \
         pages asked / page | pushed | bottleneck drops | TCP / link | correct |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for x in &r.runs {
        let _ = writeln!(
            s,
            "| {} x {} | {}% | {:?} | {:.2} | {} | {:.1}% | {:.3} | {} | {} | {} | {} ({:.2}%) | {} | {} |",
            x.hosts,
            Rate::from_bits_per_sec(x.link_bps).map_or(x.link_bps.to_string(), |r| r.to_string()),
            x.loss * 100.0,
            x.mode,
            x.wall_s,
            opt(x.transfer_s, 2),
            x.goodput_of_link * 100.0,
            x.bytes_per_image,
            opt(x.requests_per_page, 2),
            opt(x.pages_requested_per_page, 2),
            x.pushed_fraction.map_or("-".to_string(), |p| format!("{:.0}%", p * 100.0)),
            x.bottleneck_drops,
            x.drop_fraction * 100.0,
            x.tcp_of_link.map_or("-".to_string(), |t| format!("{:.1}%", t * 100.0)),
            if x.all_correct { "yes" } else { "NO" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_parse_and_bad_rows_say_why() {
        let (h, r) = parse_row("4x250mbit").expect("a good row");
        assert_eq!((h, r.bits_per_sec()), (4, 250_000_000));
        for bad in ["4", "0x1gbit", "x1gbit", "4xfast", "65x1gbit"] {
            let e = parse_row(bad).expect_err("a bad row");
            assert!(format!("{e:#}").contains(bad), "{bad}: {e:#}");
        }
    }

    #[test]
    fn iperf_intervals_parse_and_summaries_are_left_out() {
        let log = "Connecting to host 198.18.0.2, port 7730\n\
            [  5] local 198.18.0.1 port 40000 connected to 198.18.0.2 port 7730\n\
            [ ID] Interval           Transfer     Bitrate         Retr  Cwnd\n\
            [  5]   0.00-0.10   sec  2.50 MBytes   210 Mbits/sec    0    410 KBytes\n\
            [  5]   0.10-0.20   sec   512 KBytes  41.9 Mbits/sec    3    100 KBytes\n\
            [  5]   0.00-0.20   sec  3.00 MBytes   126 Mbits/sec    3             sender\n";
        let v = parse_iperf_intervals(log);
        assert_eq!(v.len(), 2, "{v:?}");
        assert_eq!(v[0], (0.0, 0.1, 2.5 * 1024.0 * 1024.0 * 8.0));
        assert_eq!(v[1], (0.1, 0.2, 512.0 * 1024.0 * 8.0));
    }
}
