//! The host daemon end to end in netlab: a memory server on h0, `spindrift-client daemon` on the
//! other hosts, and `spindrift-client touch` processes standing in for clones (they map the image
//! lazily through the daemon and verify every page they touch). 5% loss on every link.
//!
//! The server is the real one (`spindrift_server::serve`), run in a child process (this test binary
//! re-executed as `server_child`), so it can be killed outright and restarted. The fork-plan test
//! uses a minimal in-process server (the protocol's `Sender`) to publish blobs and collect reports,
//! and a fake clone program (this binary again, as `fake_clone`).
//!
//! Needs root, network namespaces and nftables: without them the tests print SKIPPED, or fail
//! when `NETLAB_REQUIRE=1`. The lab tests take a lock so they run one at a time (2 cores).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use clap::Parser;
use netlab::{Host, Lab, LabConfig, LinkConditions, Loss};
use serde_json::Value;
use spindrift_client::touch::{self, Order, Pattern, TouchConfig};
use spindrift_protocol::sender::SenderEvent;
use spindrift_protocol::wire::{BlobKind, ForkEntry, ForkPlan, NodeId};
use spindrift_server::{serve_source, MemoryImage, Push, ServeCommand, ServeOptions, ServerConfig};

const PAGE: u64 = 4096;
const GROUP: &str = "239.77.4.1";
const PORT: u16 = 7720;
const SESSION: u64 = 5;
const KEY_HEX: &str = "5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d";
const DESCRIPTOR: &[u8] = b"spindrift test descriptor v1";
const BOUND: Duration = Duration::from_secs(60);

/// One lab test at a time: they are heavy for two cores.
static LAB: Mutex<()> = Mutex::new(());

fn lab_lock() -> MutexGuard<'static, ()> {
    LAB.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A scratch directory, removed when the test passes and kept (with the logs) when it fails or
/// `SPINDRIFT_KEEP_LOGS` is set.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("sd-daemon-lab-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn log(&self, name: &str) -> File {
        File::create(self.path(name)).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("SPINDRIFT_KEEP_LOGS").is_some() {
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A child process, killed if still running when dropped.
struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    fn spawn(name: impl Into<String>, cmd: &mut Command) -> Proc {
        let name = name.into();
        let child = cmd.stdin(Stdio::null()).spawn().unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { name, child, status: None }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: kill(2) on our own unreaped child (its pid cannot have been reused).
            unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Waits until it exits or `deadline` passes.
    fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn expect_exit(&mut self, deadline: Instant) -> ExitStatus {
        let name = self.name.clone();
        self.wait_until(deadline).unwrap_or_else(|| panic!("{name} did not exit in time"))
    }

    /// SIGTERM, then SIGKILL after 5 s.
    fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        if let Some(s) = self.wait_until(Instant::now() + Duration::from_secs(5)) {
            return s;
        }
        self.kill()
    }

    fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        let s = self.child.wait().unwrap();
        self.status = Some(s);
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            self.kill();
        }
    }
}

/// The memory server, run by `server_child` in a re-executed test binary.
#[test]
fn server_child() {
    let Ok(args) = std::env::var("SPINDRIFT_TEST_SERVER_ARGS") else { return };
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    let parsed = spindrift_server::Args::try_parse_from(std::iter::once("spindrift-server".to_string()).chain(args))
        .unwrap_or_else(|e| {
            eprintln!("server_child: {e}");
            std::process::exit(2)
        });
    let config = spindrift_server::ServerConfig::from_args(&parsed).unwrap_or_else(|e| {
        eprintln!("server_child: {e}");
        std::process::exit(2)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)).unwrap();
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_writer(std::io::stderr).try_init();
    match spindrift_server::serve(&config, &stop) {
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("server_child: {e}");
            std::process::exit(1)
        }
    }
}

/// The packet I/O every daemon and the server use, and the lab's MTU.
#[derive(Debug, Clone, Copy)]
struct Net {
    io: &'static str,
    mtu: u32,
}

impl Net {
    const UDP: Net = Net { io: "udp", mtu: 1500 };
    const XDP_1500: Net = Net { io: "xdp", mtu: 1500 };
    const XDP_9000: Net = Net { io: "xdp", mtu: 9000 };
}

/// The lab, the image, and the processes of one test.
struct Setup {
    scratch: Scratch,
    lab: Lab,
    net: Net,
    image: PathBuf,
    image_bytes: u64,
}

impl Setup {
    fn new(test: &str, hosts: usize, image_mib: u64) -> Setup {
        Setup::with_net(test, hosts, image_mib, Net::UDP)
    }

    fn with_net(test: &str, hosts: usize, image_mib: u64, net: Net) -> Setup {
        let scratch = Scratch::new(test);
        let pages = (image_mib << 20) / PAGE;
        let image = scratch.path("image.bin");
        let bytes = spindrift_protocol::sim::content::Image::generate(7, pages as u32).into_bytes();
        std::fs::write(&image, &bytes).unwrap();
        let loss = LinkConditions::new().with_loss_rx(Loss::from_probability(0.05).unwrap());
        let config = LabConfig::new(netlab::unique_lab_name("cdmn"), hosts).conditions(loss).mtu(net.mtu);
        let lab = Lab::create(&config).expect("lab");
        Setup { scratch, lab, net, image, image_bytes: image_mib << 20 }
    }

    /// Whether host `i`'s interface has an XDP program attached.
    fn xdp_attached(&self, i: usize) -> bool {
        let out = self.host(i).command("ip").unwrap().args(["-d", "link", "show", "dev", "eth0"]).output().unwrap();
        assert!(out.status.success(), "ip link on h{i}: {out:?}");
        String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
    }

    /// Fails if an XDP program is still attached to any host's interface (a daemon or server that
    /// exited must leave none behind).
    fn assert_no_xdp_left(&self) {
        for i in 0..self.lab.len() {
            assert!(!self.xdp_attached(i), "h{i}: XDP left attached after its process exited");
        }
    }

    fn host(&self, i: usize) -> &Host {
        self.lab.host(i).unwrap()
    }

    /// The server on h0 with `epoch` and extra flags; only requested pages travel (`--push none`).
    fn server(&self, epoch: u32, extra: &[&str]) -> Proc {
        self.server_of(SESSION, epoch, extra)
    }

    /// As [`Setup::server`], for `session`.
    fn server_of(&self, session: u64, epoch: u32, extra: &[&str]) -> Proc {
        let h0 = self.host(0);
        let mut args: Vec<String> = [
            "--image",
            self.image.to_str().unwrap(),
            "--iface",
            &h0.addr().to_string(),
            "--group",
            GROUP,
            "--port",
            &PORT.to_string(),
            "--session",
            &session.to_string(),
            "--key-hex",
            KEY_HEX,
            "--epoch",
            &epoch.to_string(),
            "--push",
            "none",
            "--duration-s",
            "120",
            "--stats-json",
            self.scratch.path(&format!("server-{session}-{epoch}.json")).to_str().unwrap(),
            "--io",
            self.net.io,
            "--mtu",
            &self.net.mtu.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = h0.command(std::env::current_exe().unwrap()).unwrap();
        cmd.args(["--exact", "server_child", "--nocapture", "--test-threads=1"])
            .env("SPINDRIFT_TEST_SERVER_ARGS", serde_json::to_string(&args).unwrap())
            .stdout(Stdio::null())
            .stderr(self.scratch.log(&format!("server-{session}-{epoch}.log")));
        Proc::spawn(format!("server (session {session}, epoch {epoch})"), &mut cmd)
    }

    /// A daemon on host `i`.
    fn daemon(&self, i: usize, server_timeout_s: u32, extra: &[&str]) -> Daemon {
        let h = self.host(i);
        let socket = self.scratch.path(&format!("h{i}.sock"));
        let stats = self.scratch.path(&format!("h{i}-stats.json"));
        let run_dir = self.scratch.path(&format!("h{i}-run"));
        let mut cmd = h.command(env!("CARGO_BIN_EXE_spindrift-client")).unwrap();
        cmd.arg("daemon")
            .args(["--iface", &h.addr().to_string(), "--group", GROUP, "--port", &PORT.to_string()])
            .args(["--key-hex", KEY_HEX, "--server-timeout-s", &server_timeout_s.to_string()])
            .arg("--socket")
            .arg(&socket)
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--stats-json")
            .arg(&stats)
            .args(["--io", self.net.io])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.scratch.log(&format!("h{i}-daemon.log")));
        Daemon { proc: Proc::spawn(format!("daemon h{i}"), &mut cmd), socket, stats, run_dir }
    }

    /// A touch process against `daemon`, touching `fraction` of the image in `pattern` order.
    fn touch(&self, daemon: &Daemon, tag: &str, pattern: &str, fraction: f64, seed: u64) -> Touch {
        self.touch_with(daemon, tag, pattern, fraction, seed, &[])
    }

    fn touch_with(&self, daemon: &Daemon, tag: &str, pattern: &str, fraction: f64, seed: u64, extra: &[&str]) -> Touch {
        self.touch_of(SESSION, daemon, tag, pattern, fraction, seed, extra)
    }

    #[allow(clippy::too_many_arguments)]
    fn touch_of(
        &self,
        session: u64,
        daemon: &Daemon,
        tag: &str,
        pattern: &str,
        fraction: f64,
        seed: u64,
        extra: &[&str],
    ) -> Touch {
        let json = self.scratch.path(&format!("touch-{tag}.json"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spindrift-client"));
        cmd.arg("touch")
            .arg("--daemon-socket")
            .arg(&daemon.socket)
            .args(["--session", &session.to_string(), "--image-bytes", &self.image_bytes.to_string()])
            .args(["--pattern", pattern, "--fraction", &fraction.to_string(), "--seed", &seed.to_string()])
            .arg("--verify")
            .arg(&self.image)
            .arg("--json")
            .args(extra)
            .stdout(File::create(&json).unwrap())
            .stderr(self.scratch.log(&format!("touch-{tag}.log")));
        Touch { proc: Proc::spawn(format!("touch {tag}"), &mut cmd), json }
    }
}

struct Daemon {
    proc: Proc,
    socket: PathBuf,
    stats: PathBuf,
    run_dir: PathBuf,
}

impl Daemon {
    fn stats(&self) -> Option<Value> {
        serde_json::from_slice(&std::fs::read(&self.stats).ok()?).ok()
    }

    /// Waits until the stats file satisfies `f`.
    fn wait_stats(&self, what: &str, deadline: Instant, f: impl Fn(&Value) -> bool) -> Value {
        loop {
            if let Some(v) = self.stats().filter(|v| f(v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{}: timed out waiting for {what}; stats: {:?}",
                self.proc.name,
                self.stats()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn session_field(stats: &Value, field: &str) -> u64 {
    stats["sessions"].as_array().and_then(|a| a.first()).and_then(|s| s[field].as_u64()).unwrap_or(0)
}

fn session_flag(stats: &Value, field: &str) -> bool {
    stats["sessions"].as_array().and_then(|a| a.first()).and_then(|s| s[field].as_bool()).unwrap_or(false)
}

struct Touch {
    proc: Proc,
    json: PathBuf,
}

impl Touch {
    /// Waits for a successful exit and returns the report.
    fn expect_success(&mut self, deadline: Instant) -> Value {
        let status = self.proc.expect_exit(deadline);
        assert!(status.success(), "{} failed: {status:?}", self.proc.name);
        let report: Value = serde_json::from_slice(&std::fs::read(&self.json).unwrap()).unwrap();
        assert_eq!(report["mismatches"].as_u64(), Some(0), "{}: {report}", self.proc.name);
        report
    }
}

fn show_latency(name: &str, stats: &Value) {
    let l = &stats["latency_us"];
    let ppr = &stats["pages_per_request"];
    eprintln!(
        "{name}: cache hits {} (p50 {:.1} p99 {:.1} p99.9 {:.1} us), network {} (p50 {:.0} p99 {:.0} p99.9 {:.0} us), \
         {} requests of {:.1} pages, {} naks",
        l["cache_hit"]["count"],
        l["cache_hit"]["p50"].as_f64().unwrap_or(0.0),
        l["cache_hit"]["p99"].as_f64().unwrap_or(0.0),
        l["cache_hit"]["p999"].as_f64().unwrap_or(0.0),
        l["network"]["count"],
        l["network"]["p50"].as_f64().unwrap_or(0.0),
        l["network"]["p99"].as_f64().unwrap_or(0.0),
        l["network"]["p999"].as_f64().unwrap_or(0.0),
        ppr["count"],
        ppr["mean"].as_f64().unwrap_or(0.0),
        session_field(stats, "naks"),
    );
    if let Some(c) = stats["io_counters"].as_str() {
        eprintln!("{name}: packet I/O: {c}");
    }
}

/// Four hosts touch a tenth of the image each (the same working set, as clones of one VM do);
/// then a second process on h1 touches the same pages, which must come from h1's cache.
fn four_hosts_touch_a_tenth(test: &str, image_mib: u64, bound: Duration, net: Net) {
    let _lock = lab_lock();
    if !netlab::require::lossy_lab(test) {
        return;
    }
    let deadline = Instant::now() + bound;
    let s = Setup::with_net(test, 5, image_mib, net);
    let mut server = s.server(1, &[]);
    let mut daemons: Vec<Daemon> = (1..5).map(|i| s.daemon(i, 10, &[])).collect();
    let started = Instant::now();
    let mut touches: Vec<Touch> =
        daemons.iter().enumerate().map(|(i, d)| s.touch(d, &format!("h{}", i + 1), "runs", 0.1, 11)).collect();
    let mut touched = 0;
    for t in &mut touches {
        let r = t.expect_success(deadline);
        eprintln!("{}: {r}", t.proc.name);
        touched = r["pages_touched"].as_u64().unwrap();
    }
    let wall = started.elapsed();
    // A second clone on h1 with the same working set, handed over in Firecracker's format (no
    // session named: the daemon's only session serves it): served from h1's cache.
    let mut again = s.touch_with(&daemons[0], "h1-again", "runs", 0.1, 11, &["--firecracker"]);
    let r = again.expect_success(deadline);
    eprintln!("{}: {r}", again.proc.name);
    let pid = u64::from(again.proc.pid());
    let stats = daemons[0].wait_stats("the second clone's counters", deadline, |v| {
        v["clones"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["pid"].as_u64() == Some(pid) && !c["finished"].is_null()))
    });
    let clones = stats["clones"].as_array().unwrap();
    let second = clones.iter().find(|c| c["pid"].as_u64() == Some(pid)).unwrap();
    let first = clones.iter().find(|c| c["pid"].as_u64() != Some(pid)).unwrap();
    assert_eq!(second["format"], "firecracker");
    assert_eq!(second["finished"], "clone exited", "a Firecracker clone is served until it exits");
    eprintln!("h1 first clone: {first}\nh1 second clone: {second}");
    let (hits, fetched) = (second["cache_hits"].as_u64().unwrap(), second["network_faults"].as_u64().unwrap());
    assert!(hits > 0 && fetched * 10 <= hits, "the second clone on h1 should be served from the cache: {second}");
    assert!(first["network_faults"].as_u64().unwrap() > 0, "the first clone fetched nothing? {first}");

    // A malformed handoff is refused with a reason, counted, and disturbs nothing.
    let bad = UnixStream::connect(&daemons[0].socket).unwrap();
    (&bad).write_all(b"this is not a handoff\n").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = String::new();
    BufReader::new(&bad).read_line(&mut reply).unwrap();
    assert!(reply.contains(r#""type":"error""#) && reply.contains("not valid"), "reply to garbage: {reply:?}");
    daemons[0].wait_stats("the refused handoff to be counted", deadline, |v| {
        v["counters"]["handoffs_refused"].as_u64() == Some(1)
    });

    let (mut naks, mut rerequested) = (0, 0);
    for (i, d) in daemons.iter().enumerate() {
        let v = d.wait_stats("final counters", deadline, |v| session_field(v, "pages_present") > 0);
        show_latency(&format!("h{}", i + 1), &v);
        let io = v["io"].as_str().unwrap_or_default();
        assert!(io.starts_with(if net.io == "xdp" { "af_xdp" } else { "udp" }), "h{}: backend {io:?}", i + 1);
        naks += session_field(&v, "naks");
        rerequested += v["sessions"][0]["receiver"]["pages_rerequested"].as_u64().unwrap_or(0);
    }
    // 5% loss towards every host: the receivers must have seen it, whichever backend: as gaps in the
    // stream they NAK, or as out-of-stream answers (PROTOCOL.md 8.2) they ask for again.
    assert!(
        naks + rerequested > 0,
        "no NAKs and no re-requests from 4 hosts at 5% loss: the loss did not reach the {} path",
        net.io
    );
    let requested: u64 = daemons
        .iter()
        .filter_map(|d| d.stats())
        .map(|v| {
            let ppr = &v["pages_per_request"];
            (ppr["count"].as_f64().unwrap_or(0.0) * ppr["mean"].as_f64().unwrap_or(0.0)).round() as u64
        })
        .sum();
    server.stop();
    let server_stats: Value =
        serde_json::from_slice(&std::fs::read(s.scratch.path(&format!("server-{SESSION}-1.json"))).unwrap()).unwrap();
    let tx = server_stats["tx_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "{test}: 4 hosts x {touched} pages touched ({:.1} MiB working set) of a {image_mib} MiB image in {:.2} s; \
         daemons requested {requested} pages ({:.1} MiB) in all; server sent {tx} bytes ({:.2}x the working set, \
         {:.3}x the image)",
        (touched * PAGE) as f64 / 1048576.0,
        wall.as_secs_f64(),
        (requested * PAGE) as f64 / 1048576.0,
        tx as f64 / (touched * PAGE) as f64,
        tx as f64 / s.image_bytes as f64
    );
    for d in &mut daemons {
        let status = d.proc.stop();
        assert!(status.success(), "{} exited badly: {status:?}", d.proc.name);
        assert!(!d.socket.exists(), "{} left its socket behind", d.proc.name);
    }
    s.assert_no_xdp_left();
    assert!(Instant::now() < deadline, "{test} ran past its bound");
}

#[test]
fn four_hosts_fault_a_tenth_of_the_image_and_share_the_host_cache() {
    four_hosts_touch_a_tenth("fault_path", 32, BOUND, Net::UDP);
}

/// The same over AF_XDP on the server and every daemon (copy mode on veth), MTU 1500.
#[test]
fn four_hosts_fault_a_tenth_over_af_xdp_mtu_1500() {
    four_hosts_touch_a_tenth("fault_path_xdp_1500", 32, BOUND, Net::XDP_1500);
}

/// The same over AF_XDP at MTU 9000: 8972-byte datagrams, three-buffer frames (`XDP_USE_SG`).
#[test]
fn four_hosts_fault_a_tenth_over_af_xdp_mtu_9000() {
    four_hosts_touch_a_tenth("fault_path_xdp_9000", 32, BOUND, Net::XDP_9000);
}

/// The acceptance size, for figures: `cargo test --release -p spindrift-client --test daemon_lab --
/// --ignored --nocapture full_size`.
#[test]
#[ignore = "256 MiB image: run by hand for figures"]
fn full_size_four_hosts_fault_a_tenth_of_256_mib() {
    four_hosts_touch_a_tenth("full_size", 256, Duration::from_secs(300), Net::UDP);
}

/// Waits until h`i`'s daemon has at least `pages` pages of the session.
fn wait_progress(d: &Daemon, pages: u64, deadline: Instant) {
    d.wait_stats("transfer progress", deadline, |v| session_field(v, "pages_present") >= pages);
}

#[test]
fn a_server_killed_and_restarted_mid_transfer_is_resumed() {
    server_restart("server_restart", Net::UDP);
}

/// The restart over AF_XDP at MTU 9000: the killed server's XDP program goes with it (a BPF link),
/// so the new one can attach.
#[test]
fn a_server_killed_and_restarted_mid_transfer_is_resumed_over_af_xdp_mtu_9000() {
    server_restart("server_restart_xdp", Net::XDP_9000);
}

/// One daemon, twelve memory servers one after another (sessions 1..=12, as successive forks make
/// them), each checked by a verifying clone. Before sessions ended on a host, the ninth was refused
/// ("not announced by any server within 10s"): ended sessions counted against `--max-sessions 8`.
#[test]
fn one_daemon_serves_twelve_successive_sessions() {
    let test = "one_daemon_serves_twelve_successive_sessions";
    let _lock = lab_lock();
    if !netlab::require::lossy_lab(test) {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let s = Setup::new(test, 2, 4);
    let daemon = s.daemon(1, 10, &["--session-linger-s", "3600"]);
    for session in 1..=12u64 {
        let mut server = s.server_of(session, 1, &[]);
        let mut touch = s.touch_of(session, &daemon, &format!("s{session}"), "random", 0.25, session, &[]);
        let report = touch.expect_success(deadline);
        assert!(report["pages_touched"].as_u64().unwrap_or(0) > 0, "session {session}: nothing touched: {report}");
        let status = server.stop();
        assert!(status.success(), "session {session}: server exited with {status:?}");
    }
    let v = daemon.wait_stats("twelve sessions", deadline, |v| {
        v["counters"]["sessions_refused"].as_u64() == Some(0) && v["sessions"].as_array().is_some()
    });
    let held = v["sessions"].as_array().map_or(0, Vec::len);
    assert!(held <= 8, "the daemon holds {held} sessions");
    assert!(Instant::now() < deadline, "{test} ran past its bound");
}

fn server_restart(test: &str, net: Net) {
    let _lock = lab_lock();
    if !netlab::require::lossy_lab(test) {
        return;
    }
    let deadline = Instant::now() + BOUND;
    let s = Setup::with_net(test, 5, 16, net);
    let rate = ["--rate", "16mbit"];
    let mut server = s.server(1, &rate);
    let daemons: Vec<Daemon> = (1..5).map(|i| s.daemon(i, 10, &[])).collect();
    let mut touches: Vec<Touch> =
        daemons.iter().enumerate().map(|(i, d)| s.touch(d, &format!("h{}", i + 1), "runs", 0.4, 5)).collect();
    // Every host must have joined the first epoch, or it has no restart to show.
    wait_progress(&daemons[0], 300, deadline);
    for d in &daemons {
        wait_progress(d, 1, deadline);
    }
    server.kill();
    let finished_early = touches.iter_mut().map(|t| t.proc.try_status()).filter(Option::is_some).count();
    eprintln!("server killed; {finished_early} touch processes had finished");
    std::thread::sleep(Duration::from_millis(800));
    let mut server2 = s.server(2, &rate);
    for t in &mut touches {
        let r = t.expect_success(deadline);
        eprintln!("{}: {r}", t.proc.name);
    }
    for (i, d) in daemons.iter().enumerate() {
        let v = d.wait_stats("the restart to show", deadline, |v| session_field(v, "restarts") >= 1);
        assert!(!session_flag(&v, "lost"), "h{}: the server was declared lost", i + 1);
        assert_eq!(session_field(&v, "epoch"), 2);
    }
    server2.stop();
    drop(daemons);
    s.assert_no_xdp_left();
    assert!(Instant::now() < deadline, "{test} ran past its bound");
}

#[test]
fn a_killed_daemon_fails_its_clone_visibly_and_spares_the_others() {
    daemon_killed("daemon_killed", Net::UDP);
}

/// Over AF_XDP at MTU 9000: the killed daemon's XDP program goes with it, the others keep theirs.
#[test]
fn a_killed_daemon_fails_its_clone_visibly_and_spares_the_others_over_af_xdp_mtu_9000() {
    daemon_killed("daemon_killed_xdp", Net::XDP_9000);
}

fn daemon_killed(test: &str, net: Net) {
    let _lock = lab_lock();
    if !netlab::require::lossy_lab(test) {
        return;
    }
    let deadline = Instant::now() + BOUND;
    let s = Setup::with_net(test, 5, 16, net);
    let _server = s.server(1, &["--rate", "16mbit"]);
    let mut daemons: Vec<Daemon> = (1..5).map(|i| s.daemon(i, 10, &[])).collect();
    let mut touches: Vec<Touch> =
        daemons.iter().enumerate().map(|(i, d)| s.touch(d, &format!("h{}", i + 1), "runs", 0.4, 5)).collect();
    wait_progress(&daemons[1], 200, deadline);
    assert!(touches[1].proc.try_status().is_none(), "h2's touch finished before its daemon could be killed");
    daemons[1].proc.kill();
    let killed = Instant::now();
    let status = touches[1].proc.expect_exit(killed + Duration::from_secs(10));
    eprintln!("h2's touch ended {:.2} s after its daemon was killed: {status:?}", killed.elapsed().as_secs_f64());
    assert!(!status.success(), "h2's touch should fail without its daemon");
    assert_eq!(status.code(), Some(touch::HANGUP_EXIT_CODE), "{status:?}");
    if net.io == "xdp" {
        assert!(!s.xdp_attached(2), "the killed daemon's XDP program is still attached on h2");
        assert!(s.xdp_attached(1) && s.xdp_attached(3), "the other daemons lost their XDP programs");
    }
    for (i, t) in touches.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
        let r = t.expect_success(deadline);
        eprintln!("h{}: {r}", i + 1);
    }
    for (i, d) in daemons.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
        assert!(d.proc.try_status().is_none(), "daemon h{} died", i + 1);
    }
    drop((daemons, _server));
    s.assert_no_xdp_left();
    assert!(Instant::now() < deadline, "{test} ran past its bound");
}

#[test]
fn clones_fail_within_the_server_timeout_when_the_server_is_gone_for_good() {
    server_gone("server_gone", Net::UDP);
}

/// Over AF_XDP at MTU 1500.
#[test]
fn clones_fail_within_the_server_timeout_when_the_server_is_gone_for_good_over_af_xdp_mtu_1500() {
    server_gone("server_gone_xdp", Net::XDP_1500);
}

fn server_gone(test: &str, net: Net) {
    let _lock = lab_lock();
    if !netlab::require::lossy_lab(test) {
        return;
    }
    let deadline = Instant::now() + BOUND;
    let timeout = Duration::from_secs(3);
    let s = Setup::with_net(test, 5, 16, net);
    let mut server = s.server(1, &["--rate", "16mbit"]);
    let mut daemons: Vec<Daemon> = (1..5).map(|i| s.daemon(i, timeout.as_secs() as u32, &[])).collect();
    let mut touches: Vec<Touch> =
        daemons.iter().enumerate().map(|(i, d)| s.touch(d, &format!("h{}", i + 1), "runs", 0.5, 5)).collect();
    // Every host must have joined (and its clone be waiting on the network) before the server goes:
    // a host that never heard of the session refuses the handoff instead, a different failure.
    wait_progress(&daemons[0], 200, deadline);
    for d in &daemons {
        wait_progress(d, 1, deadline);
    }
    server.kill();
    let killed = Instant::now();
    for t in &mut touches {
        let status = t.proc.expect_exit(killed + timeout + Duration::from_secs(7));
        eprintln!(
            "{} ended {:.2} s after the server was killed: {status:?}",
            t.proc.name,
            killed.elapsed().as_secs_f64()
        );
        assert!(!status.success(), "{} succeeded without a server", t.proc.name);
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{}: {status:?}", t.proc.name);
    }
    for (i, d) in daemons.iter_mut().enumerate() {
        assert!(d.proc.try_status().is_none(), "daemon h{} died", i + 1);
        d.wait_stats("the server to be declared lost", deadline, |v| session_flag(v, "lost"));
    }
    assert!(Instant::now() < deadline, "{test} ran past its bound");
}

// ---- Fork plans: an in-process server publishes a descriptor and a plan; clones report back. ----

/// What the minimal server collected.
#[derive(Debug, Default)]
struct Collected {
    reports: HashMap<(u32, u32), (u32, Vec<u8>)>,
}

/// The memory server library in this process (no push): publishes the blobs it is sent and collects
/// clone reports, until `stop`.
fn minimal_server(
    addr: Ipv4Addr,
    image: Vec<u8>,
    commands: mpsc::Receiver<ServeCommand>,
    collected: Arc<Mutex<Collected>>,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    let key = spindrift_server::config::parse_key_hex(KEY_HEX).map_err(|e| e.to_string())?;
    let config = ServerConfig::new(addr, GROUP.parse().unwrap(), PORT, SESSION, key)
        .map_err(|e| e.to_string())?
        .with_push(Push::None);
    let on_event = move |event: &SenderEvent| {
        if let SenderEvent::CloneReport { fork, clone, status, result, .. } = event {
            collected.lock().unwrap().reports.insert((*fork, *clone), (*status, result.clone()));
        }
    };
    let options =
        ServeOptions { on_event: Some(Box::new(on_event)), commands: Some(commands), ..ServeOptions::default() };
    let image = MemoryImage::new(&image).map_err(|e| e.to_string())?;
    serve_source(&config, image, options, &stop).map(|_| ()).map_err(|e| e.to_string())
}

fn fake_clone_result(clone: u32) -> Vec<u8> {
    format!("clone {clone} verified its pages").into_bytes()
}

/// The clone program of the fork test, run by the daemon through a shell script:
/// `clone --descriptor F --session S --fork F --clone-id I --daemon-socket P --out-json J`.
#[test]
fn fake_clone() {
    let Ok(args) = std::env::var("SPINDRIFT_FAKE_CLONE_ARGS") else { return };
    let words: Vec<&str> = args.split_whitespace().collect();
    if words.first() != Some(&"clone") {
        eprintln!("fake_clone: expected the clone subcommand, got {args}");
        std::process::exit(2);
    }
    let flags: HashMap<&str, &str> = words[1..].chunks(2).filter_map(|c| Some((c[0], *c.get(1)?))).collect();
    let flag = |name: &str| -> &str {
        flags.get(name).copied().unwrap_or_else(|| {
            eprintln!("fake_clone: missing {name} in {args}");
            std::process::exit(2)
        })
    };
    let descriptor = std::fs::read(flag("--descriptor")).unwrap_or_default();
    if descriptor != DESCRIPTOR {
        eprintln!("fake_clone: the descriptor file does not hold the published descriptor");
        std::process::exit(4);
    }
    let clone: u32 = flag("--clone-id").parse().unwrap();
    let image = PathBuf::from(std::env::var("SPINDRIFT_FAKE_CLONE_IMAGE").unwrap());
    let config = TouchConfig {
        daemon_socket: PathBuf::from(flag("--daemon-socket")),
        session: flag("--session").to_string(),
        image_bytes: std::fs::metadata(&image).unwrap().len(),
        order: Order::Pattern { pattern: Pattern::Random, fraction: 0.05, seed: u64::from(clone) },
        verify: image,
        clone_id: Some(u64::from(clone)),
        fork: Some(flag("--fork").parse().unwrap()),
        report: Some((0, fake_clone_result(clone))),
        firecracker_format: false,
        private_copy: clone.is_multiple_of(2),
    };
    match touch::run(&config) {
        Ok(report) => {
            std::fs::write(flag("--out-json"), serde_json::to_vec(&report).unwrap()).unwrap();
            std::process::exit(if report.mismatches == 0 { 0 } else { 3 });
        }
        Err(e) => {
            eprintln!("fake_clone: {e}");
            std::process::exit(5);
        }
    }
}

#[test]
fn a_fork_plan_starts_clones_that_verify_pages_and_report_back() {
    let test = "fork_plan";
    let _lock = lab_lock();
    if !netlab::require::lossy_lab(test) {
        return;
    }
    let deadline = Instant::now() + BOUND;
    let s = Setup::new(test, 3, 4);
    let script = s.scratch.path("fake-clone.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nSPINDRIFT_FAKE_CLONE_ARGS=\"$*\" SPINDRIFT_FAKE_CLONE_IMAGE='{}' exec '{}' --exact fake_clone --nocapture --test-threads=1\n",
            s.image.display(),
            std::env::current_exe().unwrap().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let (blob_tx, blob_rx) = mpsc::channel();
    let collected = Arc::new(Mutex::new(Collected::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let h0 = s.host(0);
    let server = {
        let (image, collected, stop, addr) =
            (std::fs::read(&s.image).unwrap(), collected.clone(), stop.clone(), h0.addr());
        h0.spawn(move || minimal_server(addr, image, blob_rx, collected, stop)).unwrap()
    };
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_server = StopOnDrop(stop.clone());
    let exe = ["--clone-exe", script.to_str().unwrap()];
    let mut daemons: Vec<Daemon> = (1..3).map(|i| s.daemon(i, 10, &exe)).collect();
    for d in &daemons {
        d.wait_stats("the session to be discovered", deadline, |v| {
            v["sessions"].as_array().is_some_and(|a| !a.is_empty())
        });
    }
    let node = |i: usize| NodeId(u32::from(s.host(i).addr()));
    let plan = ForkPlan {
        fork: 7,
        descriptor: 1,
        entries: vec![
            ForkEntry { node: node(1), first_clone: 0, clones: 2 },
            ForkEntry { node: node(2), first_clone: 2, clones: 1 },
        ],
    };
    blob_tx.send(ServeCommand::PublishBlob { kind: BlobKind::Descriptor, id: 1, bytes: DESCRIPTOR.to_vec() }).unwrap();
    blob_tx.send(ServeCommand::PublishBlob { kind: BlobKind::Fork, id: 2, bytes: plan.encode() }).unwrap();
    loop {
        if collected.lock().unwrap().reports.len() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "reports so far: {:?}", collected.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    for clone in 0..3u32 {
        let got = collected.lock().unwrap().reports.get(&(7, clone)).cloned();
        assert_eq!(got, Some((0, fake_clone_result(clone))), "report of clone {clone}");
    }
    for (i, d) in daemons.iter().enumerate() {
        let clones = if i == 0 { 2 } else { 1 };
        let v = d.wait_stats("the clones to be reaped", deadline, |v| {
            v["counters"]["children_exited_ok"].as_u64() == Some(clones)
        });
        assert_eq!(v["counters"]["children_spawned"].as_u64(), Some(clones), "{v}");
        assert_eq!(v["counters"]["report_lines"].as_u64(), Some(clones), "{v}");
        let first = if i == 0 { 0 } else { 2 };
        for clone in first..first + clones {
            let out = d.run_dir.join(SESSION.to_string()).join(format!("clone-{clone}.json"));
            let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
            assert_eq!(report["mismatches"].as_u64(), Some(0), "{report}");
        }
        assert_eq!(std::fs::read(d.run_dir.join(SESSION.to_string()).join("descriptor-1.bin")).unwrap(), DESCRIPTOR);
    }
    for d in &mut daemons {
        assert!(d.proc.stop().success());
    }
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap().unwrap();
    assert!(Instant::now() < deadline, "{test} ran past its bound");
}
