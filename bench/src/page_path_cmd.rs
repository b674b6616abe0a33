//! `bench page-path`: the page path from the wire to a clone's memory, one figure per stage, in one
//! netlab lab (MTU 1500, the server's defaults, a random image).
//!
//! ```text
//! bench page-path [--mib 64] [--fraction 0.05] [--seed 1] [--udp-seconds 1] [--timeout-s 60]
//!                 [--bin-dir DIR] [--keep] [--json]
//! ```
//!
//! One lab of three hosts: h0 serves, h1 runs the host daemon (or a fetch), h2 fetches while the
//! push runs. In order:
//!
//! 1. **udp**: a plain `sendmmsg` sender on h0 multicasting 1472-byte datagrams (the protocol's
//!    datagram size at MTU 1500) for `--udp-seconds` to a plain `recvmmsg` receiver on h1, both in
//!    this process (netio's UDP backend, no protocol): `udp_rx_mb_per_s` is what the receiver got.
//! 2. **naive**: the touch order served in this process by the naive handler
//!    ([`spindrift_client::touch::run_naive`]: blocking userfaultfd read, one `pread` and one 4 KiB
//!    `UFFDIO_COPY` per fault from the image file): `naive_hit_p50_us`/p99.
//! 3. **fetch**: `spindrift-server` (defaults: push all, zstd level 1) and `spindrift-client fetch
//!    --verify` on h1: `fetch_mb_per_s` (the fetch's own figure) and `fetch_mb_per_cpu_s`, image bytes
//!    over the CPU seconds of the server (`/proc`, while the fetch ran) plus the fetch
//!    (`getrusage(RUSAGE_CHILDREN)` around its wait).
//! 4. **idle faults**: the server with `--push none`, the daemon on h1 and a `spindrift-client touch`
//!    process touching `--fraction` of the pages in random order, one page at a time:
//!    `net_idle_p50_us`/p99 as the toucher measured each first access. Then a second touch process
//!    (a second clone) touches the same pages, now in the host's cache: `hit_p50_us`/p99. The
//!    daemon's receive-path counters of this phase are reported too (`counters`).
//! 5. **faults during a push**: the server with its defaults (`--min-receivers 2`), the daemon on h1,
//!    a fetch on h2 (whose transfer rate is `push_mb_per_s`) and a touch on h1 of a quarter as many
//!    pages, from the image's last quarter, in random order (pages the push reaches last):
//!    `net_push_p50_us`/p99 as the toucher measured them, and the daemon's own figures for the faults
//!    of that touch that waited for the network (`net_push_daemon`: from reading the fault to waking
//!    the clone). `push_overlap` says whether the touch ended before the fetch did (the faults all
//!    happened during the push).
//!
//! 6. **host memory**: a memory cgroup holding the daemon and 1, then 4, touch processes that read the
//!    same half of the image at once (the peak of the cgroup over the touches; the daemon's start-up
//!    is in both), with the shared cache and with private copies (`--private-copy`): `host_memory`.
//!
//! Every touch verifies every page it touched against the image. The daemons log at `info`
//! (`SPINDRIFT_DAEMON_LOG` sets their `RUST_LOG` instead). One run; this machine's two
//! cores are shared by the server, the daemon, the toucher and the kernel's packet path, so the
//! latencies include waiting for a CPU. Needs root and the release `spindrift-server` and
//! `spindrift-client` beside this binary (or in `--bin-dir`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use netio::udp::UdpConfig;
use netio::{Interest, PacketIo, RxBatch, TxBatch};
use netlab::{Lab, LabConfig};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::Value;

use crate::lab_run::{read_json, server_command, wait_all, Binaries, Proc, Push, Scratch, KEY_HEX};

/// The knobs of `bench page-path`.
#[derive(Debug, Clone, Args)]
pub struct PagePathArgs {
    /// Image size in MiB (random bytes).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub mib: u64,
    /// Fraction of the pages each touch process touches.
    #[arg(long, default_value_t = 0.05)]
    pub fraction: f64,
    /// Seed of the image and the touch orders.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Length of the plain UDP run.
    #[arg(long, default_value_t = 1.0)]
    pub udp_seconds: f64,
    /// Longest any phase may take.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// An extra flag for every `spindrift-server` (repeat it; e.g. `--server-flag=--zstd-level=0`).
    #[arg(long = "server-flag", allow_hyphen_values = true)]
    pub server_flags: Vec<String>,
    /// An extra flag for the host daemon (repeat it; e.g. `--daemon-flag=--read-ahead=0`).
    #[arg(long = "daemon-flag", allow_hyphen_values = true)]
    pub daemon_flags: Vec<String>,
    /// Where the release binaries are (default: beside this one).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Keep the scratch directory (logs, statistics).
    #[arg(long)]
    pub keep: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Percentiles of one latency, µs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Lat {
    p50_us: f64,
    p99_us: f64,
}

impl Lat {
    fn of_touch(report: &Value) -> Lat {
        let l = &report["latency_us"];
        Lat { p50_us: l["p50"].as_f64().unwrap_or(0.0), p99_us: l["p99"].as_f64().unwrap_or(0.0) }
    }
}

/// The figures of one run.
#[derive(Debug, Clone, Default, Serialize)]
struct PagePath {
    image_bytes: u64,
    touched_pages: u64,
    udp_rx_mb_per_s: f64,
    fetch_mb_per_s: f64,
    fetch_mb_per_cpu_s: f64,
    fetch_server_cpu_s: f64,
    fetch_client_cpu_s: f64,
    fetch_verified: bool,
    naive_hit: Lat,
    hit: Lat,
    net_idle: Lat,
    net_push: Lat,
    net_push_daemon: Lat,
    net_push_daemon_faults: u64,
    push_mb_per_s: f64,
    push_overlap: bool,
    all_verified: bool,
    /// The daemon's receive-path counters of the idle-faults phase.
    counters: serde_json::Map<String, Value>,
    /// Host memory for 1 and 4 clones, shared cache and private copies.
    host_memory: Vec<HostMemory>,
}

const PORT: u16 = 7790;
const GROUP_UDP: Ipv4Addr = Ipv4Addr::new(239, 78, 0, 1);
/// The protocol's largest datagram payload at MTU 1500.
const UDP_PAYLOAD: usize = 1472;

fn group(lab: &Lab, n: u8) -> Ipv4Addr {
    Ipv4Addr::new(239, 78, (lab.index() % 256) as u8, n)
}

/// Plain UDP from h0 to h1: MB/s received.
fn udp_baseline(lab: &Lab, seconds: f64) -> anyhow::Result<f64> {
    let (h0, h1) = (lab.host(0)?, lab.host(1)?);
    let mut tx_io = h0.run(|| netio::udp::UdpIo::open(&UdpConfig::new(h0.addr(), PORT).max_batch(64)))??;
    let mut rx_io = h1.run(|| netio::udp::UdpIo::open(&UdpConfig::new(h1.addr(), PORT).join(GROUP_UDP)))??;
    let stop = Arc::new(AtomicBool::new(false));
    let rx_stop = stop.clone();
    let receiver = std::thread::spawn(move || -> anyhow::Result<(u64, Option<Instant>, Option<Instant>)> {
        let mut batch = RxBatch::new(64, 2048)?;
        let (mut bytes, mut first, mut last) = (0u64, None, None);
        while !rx_stop.load(Ordering::Relaxed) {
            let n = rx_io.recv_batch(&mut batch)?;
            if n == 0 {
                rx_io.wait(Interest::READABLE, Some(Duration::from_millis(20)))?;
                continue;
            }
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            bytes += batch.iter().map(|d| d.payload.len() as u64).sum::<u64>();
        }
        Ok((bytes, first, last))
    });
    let mut tx = TxBatch::new(64, UDP_PAYLOAD)?;
    let payload = vec![0xa5u8; UDP_PAYLOAD];
    for _ in 0..64 {
        tx.push(SocketAddrV4::new(GROUP_UDP, PORT), &payload)?;
    }
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        tx_io.send_batch(&mut tx)?;
        if tx.is_sent() {
            tx.rewind();
        } else {
            tx_io.wait(Interest::WRITABLE, Some(Duration::from_millis(20)))?;
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let (bytes, first, last) = receiver.join().map_err(|_| anyhow::anyhow!("the UDP receiver panicked"))??;
    let span = match (first, last) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => bail!("the plain UDP receiver got nothing"),
    };
    Ok(bytes as f64 / span / 1e6)
}

/// `count` distinct pages of `[lo, hi)` in random order, from `seed`.
fn random_pages(lo: u64, hi: u64, count: u64, seed: u64) -> Vec<u64> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut all: Vec<u64> = (lo..hi).collect();
    let n = (count as usize).min(all.len());
    for i in 0..n {
        let j = rng.random_range(i..all.len());
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

struct Ctx<'a> {
    args: &'a PagePathArgs,
    bins: &'a Binaries,
    scratch: &'a Scratch,
    image: &'a Path,
    image_bytes: u64,
    timeout: Duration,
}

impl Ctx<'_> {
    fn server(&self, lab: &Lab, tag: &str, g: Ipv4Addr, session: u64, flags: &[&str]) -> anyhow::Result<Proc> {
        let h0 = lab.host(0)?;
        let mut cmd = server_command(h0, &self.bins.server, None)?;
        cmd.args(["--image", &self.image.display().to_string(), "--iface", &h0.addr().to_string()])
            .args(["--group", &g.to_string(), "--port", &PORT.to_string(), "--key-hex", KEY_HEX])
            .args(["--session", &session.to_string(), "--mtu", "1500"])
            .args(["--duration-s", &(self.timeout.as_secs() + 10).to_string()])
            .arg("--stats-json")
            .arg(self.scratch.path(&format!("{tag}-server-stats.json")))
            .args(flags)
            .args(&self.args.server_flags);
        Proc::spawn_logged("spindrift-server", &mut cmd, &self.scratch.path(&format!("{tag}-server.log")))
    }

    fn daemon(&self, lab: &Lab, tag: &str, g: Ipv4Addr) -> anyhow::Result<(Proc, PathBuf, PathBuf)> {
        self.daemon_in(lab, tag, g, None, &[])
    }

    /// The daemon on h1, in memory cgroup `cg` if given, with `extra` flags.
    fn daemon_in(
        &self,
        lab: &Lab,
        tag: &str,
        g: Ipv4Addr,
        cg: Option<&Cgroup>,
        extra: &[&str],
    ) -> anyhow::Result<(Proc, PathBuf, PathBuf)> {
        let h1 = lab.host(1)?;
        let (socket, stats) =
            (self.scratch.path(&format!("{tag}-h1.sock")), self.scratch.path(&format!("{tag}-h1-stats.json")));
        let mut d = h1.command(&self.bins.client)?;
        d.arg("daemon")
            .args(["--iface", &h1.addr().to_string(), "--group", &g.to_string(), "--port", &PORT.to_string()])
            .args(["--key-hex", KEY_HEX, "--server-timeout-s", "10"])
            .arg("--socket")
            .arg(&socket)
            .arg("--run-dir")
            .arg(self.scratch.path(&format!("{tag}-h1-run")))
            .arg("--stats-json")
            .arg(&stats)
            .args(&self.args.daemon_flags)
            .args(extra)
            .env("RUST_LOG", std::env::var("SPINDRIFT_DAEMON_LOG").unwrap_or_else(|_| "info".into()));
        let mut d = match cg {
            Some(cg) => cg.wrap(&d),
            None => d,
        };
        let mut proc = Proc::spawn_logged("daemon h1", &mut d, &self.scratch.path(&format!("{tag}-h1-daemon.log")))?;
        let deadline = Instant::now() + self.timeout;
        while !socket.exists() {
            if let Some(s) = proc.try_status() {
                bail!("the daemon exited at start ({s}): {}", proc.log_tail(5));
            }
            if Instant::now() >= deadline {
                bail!("the daemon did not open its socket in time: {}", proc.log_tail(5));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((proc, socket, stats))
    }

    /// Starts a touch process on h1 of the pages in `trace`.
    fn touch(&self, lab: &Lab, name: &str, socket: &Path, session: u64, trace: &Path) -> anyhow::Result<Proc> {
        self.touch_in(lab, name, socket, session, trace, None, false)
    }

    /// A touch on h1, in memory cgroup `cg` if given, with `--private-copy` if `private`.
    #[allow(clippy::too_many_arguments)]
    fn touch_in(
        &self,
        lab: &Lab,
        name: &str,
        socket: &Path,
        session: u64,
        trace: &Path,
        cg: Option<&Cgroup>,
        private: bool,
    ) -> anyhow::Result<Proc> {
        let mut t = lab.host(1)?.command(&self.bins.client)?;
        if private {
            t.arg("touch").arg("--private-copy");
        } else {
            t.arg("touch");
        }
        t.arg("--daemon-socket")
            .arg(socket)
            .args(["--session", &session.to_string(), "--image-bytes", &self.image_bytes.to_string()])
            .arg("--trace")
            .arg(trace)
            .arg("--verify")
            .arg(self.image)
            .arg("--json");
        let (json, log) = (self.scratch.path(&format!("{name}.json")), self.scratch.path(&format!("{name}.log")));
        let mut t = match cg {
            Some(cg) => cg.wrap(&t),
            None => t,
        };
        Proc::spawn_split(name.to_string(), &mut t, &json, &log)
    }

    /// Runs a touch to its end; its report, or why it failed.
    fn touch_to_end(&self, lab: &Lab, name: &str, socket: &Path, session: u64, trace: &Path) -> anyhow::Result<Value> {
        let mut p = vec![self.touch(lab, name, socket, session, trace)?];
        let status = wait_all(&mut p, Instant::now() + self.timeout).remove(0);
        let report = read_json(&self.scratch.path(&format!("{name}.json")));
        match (status.as_deref(), report) {
            (Some("ok"), Some(r)) if r["mismatches"].as_u64() == Some(0) => Ok(r),
            (s, r) => bail!(
                "{name}: {} ({} mismatches): {}",
                s.unwrap_or("timed out"),
                r.map_or("?".into(), |r| r["mismatches"].to_string()),
                p[0].log_tail(5)
            ),
        }
    }
}

/// A memory cgroup (v1 or v2) made for one measurement, removed on drop.
struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

impl Cgroup {
    /// A new child of this process's own memory cgroup.
    fn new(name: &str) -> anyhow::Result<Cgroup> {
        let own = std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let (base, v2) =
            if let Some(rel) = own.lines().find_map(|l| l.split_once(":memory:").map(|(_, r)| r.to_string())) {
                (PathBuf::from("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/')), false)
            } else if let Some(rel) = own.lines().find_map(|l| l.strip_prefix("0::").map(str::to_string)) {
                (PathBuf::from("/sys/fs/cgroup").join(rel.trim_start_matches('/')), true)
            } else {
                bail!("no memory cgroup in /proc/self/cgroup");
            };
        let dir = base.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating the cgroup {}", dir.display()))?;
        Ok(Cgroup { dir, v2 })
    }

    /// `cmd`, started inside this cgroup (a shell moves itself in, then execs it).
    fn wrap(&self, cmd: &std::process::Command) -> std::process::Command {
        let mut c = std::process::Command::new("sh");
        c.arg("-c").arg("echo $$ > \"$0\" && exec \"$@\"").arg(self.dir.join("cgroup.procs"));
        c.arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }

    /// The peak memory charged since the last reset, bytes.
    fn peak(&self) -> anyhow::Result<u64> {
        let file = if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
        let text = std::fs::read_to_string(self.dir.join(file)).with_context(|| format!("reading {file}"))?;
        text.trim().parse().with_context(|| format!("{file}: {text:?}"))
    }

    /// Starts a new peak from the current usage.
    fn reset_peak(&self) -> anyhow::Result<()> {
        let file = if self.v2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
        std::fs::write(self.dir.join(file), if self.v2 { "reset" } else { "0" })
            .with_context(|| format!("resetting {file}"))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes are gone by now (killed and reaped); an empty cgroup is removed with rmdir.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove the cgroup {}", self.dir.display());
    }
}

/// Host memory for `clones` touch processes reading the same pages (`trace`) at once through one
/// daemon: the peak of one memory cgroup holding the daemon and the clones, bytes.
fn host_memory(
    ctx: &Ctx<'_>,
    lab: &Lab,
    session: u64,
    trace: &Path,
    clones: usize,
    private: bool,
) -> anyhow::Result<u64> {
    let tag = format!("mem-{session}");
    let cg = Cgroup::new(&format!("spindrift-page-path-{}-{session}", std::process::id()))?;
    let g = group(lab, (session % 200 + 10) as u8);
    let mut server = ctx.server(lab, &tag, g, session, &["--push", "none"])?;
    let (mut daemon, socket, _) = ctx.daemon_in(lab, &tag, g, Some(&cg), &[])?;
    // The daemon's own start-up is in the baseline of both figures; the peak covers the clones.
    std::thread::sleep(Duration::from_millis(200));
    cg.reset_peak()?;
    let mut touches = Vec::new();
    for i in 0..clones {
        touches.push(ctx.touch_in(lab, &format!("{tag}-touch{i}"), &socket, session, trace, Some(&cg), private)?);
    }
    let done = wait_all(&mut touches, Instant::now() + ctx.timeout);
    let peak = cg.peak();
    drop(touches);
    daemon.stop(Duration::from_secs(5));
    server.stop(Duration::from_secs(5));
    drop(daemon);
    if let Some(bad) = done.iter().position(|d| d.as_deref() != Some("ok")) {
        bail!("memory phase, touch {bad}: {:?}", done[bad]);
    }
    peak
}

fn write_trace(path: &Path, pages: &[u64]) -> anyhow::Result<()> {
    let text: String = pages.iter().map(|p| format!("{p}\n")).collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The receive-path counters of a daemon's final stats.
fn counters(stats: &Value) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    let session = stats["sessions"].as_array().and_then(|a| a.first()).cloned().unwrap_or(Value::Null);
    for key in [
        "rx_packets",
        "data_packets",
        "pages_stored",
        "pages_skipped",
        "bytes_copied",
        "duplicates",
        "requests",
        "pages_requested",
        "recovered_packets",
    ] {
        if let Some(v) = session["receiver"].get(key) {
            out.insert(format!("receiver.{key}"), v.clone());
        }
    }
    if let (Some(copied), Some(stored)) =
        (session["receiver"]["bytes_copied"].as_u64(), session["receiver"]["pages_stored"].as_u64())
    {
        out.insert(
            "user_copies_per_page_stored".into(),
            serde_json::json!(copied as f64 / 4096.0 / stored.max(1) as f64),
        );
    }
    for c in stats["clones"].as_array().into_iter().flatten() {
        for key in ["faults", "pages_woken", "pages_copied", "network_faults", "cache_hits"] {
            if let Some(v) = c.get(key).and_then(Value::as_u64) {
                let total = out.get(&format!("clones.{key}")).and_then(Value::as_u64).unwrap_or(0);
                out.insert(format!("clones.{key}"), Value::from(total + v));
            }
        }
    }
    out
}

fn measure(ctx: &Ctx<'_>, lab: &Lab, args: &PagePathArgs, out: &mut PagePath) -> anyhow::Result<()> {
    let pages = ctx.image_bytes / 4096;
    let count = ((pages as f64 * args.fraction).round() as u64).clamp(1, pages);
    out.touched_pages = count;
    let order = random_pages(0, pages, count, args.seed);
    let trace = ctx.scratch.path("order.trace");
    write_trace(&trace, &order)?;
    // A quarter as many pages, in the image's last quarter: pages the push reaches last, touched
    // while it is still at the start.
    let late = random_pages(pages - pages / 4, pages, (count / 4).clamp(1, pages / 4), args.seed + 1);
    let late_trace = ctx.scratch.path("late.trace");
    write_trace(&late_trace, &late)?;

    eprintln!("page-path: plain UDP");
    out.udp_rx_mb_per_s = udp_baseline(lab, args.udp_seconds)?;

    eprintln!("page-path: naive handler");
    let naive = spindrift_client::touch::run_naive(ctx.image, &order)?;
    if naive.mismatches != 0 {
        bail!("the naive handler served {} wrong pages", naive.mismatches);
    }
    out.naive_hit = Lat { p50_us: naive.latency_us.p50, p99_us: naive.latency_us.p99 };

    eprintln!("page-path: fetch");
    let push = Push {
        bins: ctx.bins,
        scratch: ctx.scratch,
        tag: "fetch",
        image: ctx.image,
        image_bytes: ctx.image_bytes,
        group: group(lab, 1),
        port: PORT,
        hosts: 1,
        io: None,
        mtu: Some(1500),
        min_receivers: false,
        verify: true,
        remove_outputs: true,
        server_flags: ctx.args.server_flags.clone(),
        server_cpus: None,
        fetch_flags: Vec::new(),
        timeout: ctx.timeout,
    };
    let fetched = push.run(lab)?;
    out.fetch_verified = fetched.all_ok();
    out.fetch_mb_per_s = fetched.fetched[0].report.as_ref().and_then(|r| r["mb_per_s"].as_f64()).unwrap_or(0.0);
    out.fetch_server_cpu_s = fetched.server_cpu_s.unwrap_or(0.0);
    out.fetch_client_cpu_s = fetched.clients_cpu_s;
    let cpu = out.fetch_server_cpu_s + out.fetch_client_cpu_s;
    out.fetch_mb_per_cpu_s = if cpu > 0.0 { ctx.image_bytes as f64 / 1e6 / cpu } else { 0.0 };

    eprintln!("page-path: faults on an idle server, then cache hits");
    {
        let g = group(lab, 2);
        let mut server = ctx.server(lab, "idle", g, 2, &["--push", "none"])?;
        let (mut daemon, socket, stats) = ctx.daemon(lab, "idle", g)?;
        let first = ctx.touch_to_end(lab, "idle-touch1", &socket, 2, &trace)?;
        let second = ctx.touch_to_end(lab, "idle-touch2", &socket, 2, &trace)?;
        out.net_idle = Lat::of_touch(&first);
        out.hit = Lat::of_touch(&second);
        daemon.stop(Duration::from_secs(5));
        server.stop(Duration::from_secs(5));
        out.counters = counters(&read_json(&stats).unwrap_or(Value::Null));
    }

    eprintln!("page-path: faults during a push");
    {
        let g = group(lab, 3);
        let mut server = ctx.server(lab, "push", g, 3, &["--min-receivers", "2"])?;
        let (mut daemon, socket, stats) = ctx.daemon(lab, "push", g)?;
        let h2 = lab.host(2)?;
        let fetch_out = ctx.scratch.path("push-h2.img");
        let mut f = h2.command(&ctx.bins.client)?;
        f.args(["fetch", "--server", &lab.host(0)?.addr().to_string(), "--iface", &h2.addr().to_string()])
            .args(["--group", &g.to_string(), "--port", &PORT.to_string(), "--key-hex", KEY_HEX, "--session", "3"])
            .args(["--image-bytes", &ctx.image_bytes.to_string(), "--out", &fetch_out.display().to_string()])
            .args(["--timeout-s", &ctx.timeout.as_secs().to_string(), "--json"])
            .arg("--verify")
            .arg(ctx.image);
        let (json, log) = (ctx.scratch.path("push-fetch.json"), ctx.scratch.path("push-fetch.log"));
        let mut fetch = vec![Proc::spawn_split("fetch h2", &mut f, &json, &log)?];
        let touch = ctx.touch_to_end(lab, "push-touch", &socket, 3, &late_trace);
        let fetch_running_after_touch = fetch[0].try_status().is_none();
        let status = wait_all(&mut fetch, Instant::now() + ctx.timeout).remove(0);
        std::fs::remove_file(&fetch_out).ok();
        daemon.stop(Duration::from_secs(5));
        server.stop(Duration::from_secs(5));
        let touch = touch?;
        let report = read_json(&json).unwrap_or(Value::Null);
        if status.as_deref() != Some("ok") {
            bail!("the push phase's fetch: {}: {}", status.as_deref().unwrap_or("timed out"), fetch[0].log_tail(5));
        }
        out.net_push = Lat::of_touch(&touch);
        let d = read_json(&stats).unwrap_or(Value::Null);
        let n = &d["latency_us"]["network"];
        out.net_push_daemon =
            Lat { p50_us: n["p50"].as_f64().unwrap_or(0.0), p99_us: n["p99"].as_f64().unwrap_or(0.0) };
        out.net_push_daemon_faults = n["count"].as_u64().unwrap_or(0);
        out.push_mb_per_s = report["mb_per_s"].as_f64().unwrap_or(0.0);
        out.push_overlap = fetch_running_after_touch;
    }
    eprintln!("page-path: host memory, 1 and 4 clones on one host");
    {
        // Half the image, so the pages dominate the processes' own memory.
        let half = random_pages(0, pages, pages / 2, args.seed + 2);
        let half_trace = ctx.scratch.path("half.trace");
        write_trace(&half_trace, &half)?;
        let mut session = 10;
        for private in [false, true] {
            let mut peaks = [0u64; 2];
            for (i, clones) in [1usize, 4].into_iter().enumerate() {
                session += 1;
                peaks[i] = host_memory(ctx, lab, session, &half_trace, clones, private)?;
            }
            let m = HostMemory {
                clone_memory: if private { "private" } else { "shared" }.into(),
                touched_bytes: half.len() as u64 * 4096,
                one_clone_bytes: peaks[0],
                four_clones_bytes: peaks[1],
                ratio: peaks[1] as f64 / peaks[0].max(1) as f64,
            };
            out.host_memory.push(m);
        }
    }
    out.all_verified = out.fetch_verified;
    Ok(())
}

/// Host memory (daemon and clones, one cgroup's peak) for 1 and 4 clones reading the same pages.
#[derive(Debug, Clone, Default, Serialize)]
struct HostMemory {
    clone_memory: String,
    touched_bytes: u64,
    one_clone_bytes: u64,
    four_clones_bytes: u64,
    ratio: f64,
}

fn table(p: &PagePath) -> String {
    let mut s = String::new();
    let mb = p.image_bytes as f64 / 1e6;
    s += &format!(
        "bench page-path: {mb:.1} MB random image, MTU 1500, {} pages per touch, one run\n\n",
        p.touched_pages
    );
    s += "| figure | value |\n|---|---|\n";
    let mut row = |k: &str, v: String| s += &format!("| {k} | {v} |\n");
    row("udp_rx_mb_per_s (plain sendmmsg -> recvmmsg)", format!("{:.0}", p.udp_rx_mb_per_s));
    row("fetch_mb_per_s", format!("{:.1}", p.fetch_mb_per_s));
    row(
        "fetch_mb_per_cpu_s (server + fetch CPU)",
        format!("{:.1} ({:.2} + {:.2} CPU-s)", p.fetch_mb_per_cpu_s, p.fetch_server_cpu_s, p.fetch_client_cpu_s),
    );
    row("naive_hit p50 / p99 us", format!("{:.1} / {:.1}", p.naive_hit.p50_us, p.naive_hit.p99_us));
    row("hit p50 / p99 us (second clone)", format!("{:.1} / {:.1}", p.hit.p50_us, p.hit.p99_us));
    row("net_idle p50 / p99 us", format!("{:.1} / {:.1}", p.net_idle.p50_us, p.net_idle.p99_us));
    row(
        "net_push p50 / p99 us (push_mb_per_s)",
        format!(
            "{:.1} / {:.1} ({:.1} MB/s{})",
            p.net_push.p50_us,
            p.net_push.p99_us,
            p.push_mb_per_s,
            if p.push_overlap { "" } else { "; the push ended before the touch" }
        ),
    );
    row(
        "net_push, the daemon's network faults: p50 / p99 us (count)",
        format!("{:.1} / {:.1} ({})", p.net_push_daemon.p50_us, p.net_push_daemon.p99_us, p.net_push_daemon_faults),
    );
    row("verified", if p.all_verified { "yes".into() } else { "NO".into() });
    s += "\nhost memory (one cgroup: the daemon and its clones, peak), clones reading the same pages:\n";
    s += "| clone memory | pages touched | 1 clone | 4 clones | ratio |\n|---|---|---|---|---|\n";
    for m in &p.host_memory {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        s += &format!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.2} |\n",
            m.clone_memory,
            mib(m.touched_bytes),
            mib(m.one_clone_bytes),
            mib(m.four_clones_bytes),
            m.ratio
        );
    }
    s += "\nreceive-path counters (idle-faults phase, daemon on h1):\n";
    for (k, v) in &p.counters {
        s += &format!("  {k} = {v}\n");
    }
    s
}

/// Runs `bench page-path`.
pub fn run(args: &PagePathArgs) -> anyhow::Result<ExitCode> {
    if !(args.fraction > 0.0 && args.fraction <= 0.5) {
        bail!("--fraction {} is not in (0, 0.5]", args.fraction);
    }
    netlab::check_prerequisites().context("bench page-path needs a netlab lab (root)")?;
    let bins = Binaries::find(args.bin_dir.as_deref())?;
    let mut scratch = Scratch::new("page-path", args.keep)?;
    let pages = args.mib * 256;
    let image_path = scratch.path("image.img");
    std::fs::write(&image_path, crate::lab_run::random_image(pages, args.seed))?;
    let mut out = PagePath { image_bytes: pages * 4096, ..PagePath::default() };
    let measured = {
        let ctx = Ctx {
            args,
            bins: &bins,
            scratch: &scratch,
            image: &image_path,
            image_bytes: pages * 4096,
            timeout: Duration::from_secs(args.timeout_s),
        };
        let lab =
            Lab::create(&LabConfig::new(netlab::unique_lab_name("bpath"), 3).mtu(1500)).context("creating the lab")?;
        crate::xdp_cmd::switch_netfilter_off(&lab)?;
        measure(&ctx, &lab, args, &mut out)
    };
    if let Err(e) = measured {
        scratch.keep();
        return Err(e);
    }
    if args.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        print!("{}", table(&out));
    }
    Ok(if out.all_verified { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn random_pages_are_distinct_and_in_range() {
        let p = random_pages(100, 200, 50, 3);
        assert_eq!(p.len(), 50);
        let mut s = p.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), 50);
        assert!(p.iter().all(|&x| (100..200).contains(&x)));
        assert_eq!(random_pages(0, 10, 20, 1).len(), 10);
    }
}
