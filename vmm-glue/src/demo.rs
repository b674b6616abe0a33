//! The main job: a parent VM forked to clones on simulated hosts, with a summary.
//!
//! [`run`] builds a netlab lab (host 0 runs the parent VMM, whose fork-time copy serves memory; hosts
//! 1..=N each run a host daemon), starts the parent with the parallel-job guest, which forks clones on
//! every host, waits for the parent to check their results, and gathers the figures every process
//! wrote: the parent's fork pause, each clone's start time, pages fetched against memory size, what
//! the memory server sent, NAKs and repairs.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use netlab::{Lab, LabConfig, LinkConditions, Loss};
use serde::Serialize;
use serde_json::Value;

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Hosts that run clones (the lab has one more: the parent's).
    pub hosts: usize,
    /// Clones in all, spread over the hosts.
    pub clones: u32,
    /// Random loss on every link, both directions (0..1).
    pub loss: f64,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// Whole-run bound.
    pub timeout: Duration,
    /// Keep the run directory (logs, JSON files) instead of removing it.
    pub keep: bool,
    /// Hash guest memory at the fork and in every clone before its first instruction (every clone
    /// then fetches all of memory).
    pub verify_image: bool,
    /// The packet I/O backend of the memory server and of every host daemon.
    pub io: netio::IoKind,
    /// Clones take private copies of every page instead of mapping their host's cache memfd.
    pub private_clone_memory: bool,
    /// After the networked run, run the same job in local clones whose memory is all present before
    /// their first instruction, and compare.
    pub local_baseline: bool,
    /// The host daemons' `--read-ahead-max` (None: their default).
    pub read_ahead_max: Option<u16>,
    /// More flags for every host daemon (e.g. `--busy-poll-us=300`).
    pub daemon_flags: Vec<String>,
    /// The parent's guest.
    pub guest: DemoGuest,
    /// Seed of the data set (and the trace guest's trace).
    pub seed: u64,
    /// The memory server's background completion rate, bytes per second (None: the parent's
    /// default; 0: off).
    pub background_rate: Option<u64>,
    /// Once every host holds the whole image (background completion), kill the memory server
    /// (SIGKILL) while the clones run: they must finish with the right results without it.
    pub kill_server_when_complete: bool,
}

/// The guest the demo's parent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemoGuest {
    /// The parallel job: every clone works on its share of a data set of half the memory.
    Parallel,
    /// The trace guest: every clone reads one qword of each of `pages` data-set pages in `pattern`'s
    /// order (for `bench memory`: what hosts fetch against what clones touch).
    Trace {
        /// The touch order.
        pattern: spindrift_client::touch::Pattern,
        /// Pages each clone touches.
        pages: u64,
        /// Iterations of an empty loop after each touch.
        spin: u64,
    },
}

impl DemoGuest {
    /// The `spindrift-vmm run` flags that choose this guest.
    fn run_args(&self) -> Vec<String> {
        match self {
            DemoGuest::Parallel => vec!["--guest".into(), "parallel".into()],
            DemoGuest::Trace { pattern, pages, spin } => vec![
                "--guest".into(),
                "trace".into(),
                "--trace-pattern".into(),
                pattern.to_string(),
                "--trace-pages".into(),
                pages.to_string(),
                "--trace-spin".into(),
                spin.to_string(),
            ],
        }
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            hosts: 8,
            clones: 8,
            loss: 0.02,
            mem_mib: 64,
            timeout: Duration::from_secs(180),
            keep: false,
            verify_image: false,
            io: netio::IoKind::Udp,
            private_clone_memory: false,
            local_baseline: false,
            read_ahead_max: None,
            daemon_flags: Vec::new(),
            guest: DemoGuest::Parallel,
            seed: 1,
            background_rate: None,
            kill_server_when_complete: false,
        }
    }
}

/// Why the demo could not run or did not pass.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Something the demo needs is missing on this machine.
    #[error("the demo needs {0}")]
    Missing(String),
    /// A bad setting.
    #[error("bad demo setting: {0}")]
    Config(String),
    /// The lab could not be built.
    #[error("building the lab: {0}")]
    Lab(#[from] netlab::LabError),
    /// A host command could not be prepared.
    #[error("host command: {0}")]
    Host(#[from] netlab::HostError),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// A process did not finish in time.
    #[error("{0} did not finish within {1:?}")]
    Timeout(String, Duration),
    /// A process wrote a result file the demo cannot read.
    #[error("reading {path}: {reason}")]
    BadResult {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Io { what, source }
}

/// One clone's figures.
#[derive(Debug, Clone, Serialize)]
pub struct CloneFigures {
    /// Its id.
    pub clone: u64,
    /// The host it ran on.
    pub host: String,
    /// Time from the parent's fork to the clone's first guest instruction, ms.
    pub start_ms: Option<f64>,
    /// Time from the parent's fork to the clone's exit, ms.
    pub done_ms: Option<f64>,
    /// Its reported status.
    pub status: Option<u64>,
    /// Its memory before the first instruction equalled the parent's at the fork (with `verify_image`).
    pub image_matches: Option<bool>,
    /// Faults that waited for the network (from its host daemon).
    pub network_faults: Option<u64>,
}

/// What the demo measured.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// The lab's name.
    pub lab: String,
    /// Hosts running clones.
    pub hosts: usize,
    /// Clones asked for.
    pub clones: u32,
    /// Link loss.
    pub loss: f64,
    /// Guest memory bytes.
    pub memory_bytes: u64,
    /// The parent's exit code (0: every clone's result checked out).
    pub parent_exit: Option<i32>,
    /// Clones whose results the parent checked and found right.
    pub results_ok: Option<u64>,
    /// Clones whose own result files hold status 0 and the result the parent expected (checked
    /// here, so it holds even when the parent never got the reports).
    pub clone_results_ok: u64,
    /// Time from the fork until every host held the whole image (background completion), ms.
    pub all_complete_ms: Option<f64>,
    /// With `kill_server_when_complete`: when the memory server was killed, ms after the fork.
    pub server_killed_ms: Option<f64>,
    /// Clones that exited after the memory server was killed.
    pub clones_done_after_kill: Option<usize>,
    /// How long the parent's vCPUs were paused for the fork, µs.
    pub fork_pause_us: Option<f64>,
    /// Descriptor size, bytes.
    pub descriptor_bytes: Option<u64>,
    /// Per clone.
    pub clone_figures: Vec<CloneFigures>,
    /// Pages present in all host daemons' caches together (what arrived, zero runs included).
    pub pages_fetched: u64,
    /// Pages the host daemons stored from the wire (data and zero-run records), summed.
    pub pages_stored: u64,
    /// With the trace guest: the pages each clone touches (its trace).
    pub touched_pages: Option<u64>,
    /// Pages of guest memory times hosts: what eager copying would move.
    pub pages_eager: u64,
    /// Bytes the memory server sent.
    pub server_tx_bytes: Option<u64>,
    /// NAKs the server received.
    pub server_naks: Option<u64>,
    /// Repair (parity) packets the server sent.
    pub server_repairs: Option<u64>,
    /// Requests the server received.
    pub server_requests: Option<u64>,
    /// Distinct page transmissions of the server (each serves every host that wants the page).
    pub server_pages_sent: Option<u64>,
    /// Clones whose memory matched the parent's at the fork (with `verify_image`).
    pub images_match: Option<usize>,
    /// The host daemons' packet I/O backend (e.g. `af_xdp, copy mode`).
    pub io: Option<String>,
    /// Per host daemon: its network faults' service latency (p50, p99), µs.
    pub network_fault_us: Vec<(String, f64, f64)>,
    /// How clones held their memory: `shared` (a private view of the host's cache memfd) or
    /// `private` (every page copied in).
    pub clone_memory: String,
    /// The longest clone's run, first instruction to exit, ms.
    pub network_run_ms: Option<f64>,
    /// With `--local-baseline`: the same job's longest clone run in local clones whose memory was all
    /// present before their first instruction (no userfaultfd), ms.
    pub local_run_ms: Option<f64>,
    /// `network_run_ms / local_run_ms`.
    pub run_ratio: Option<f64>,
    /// With `--local-baseline`: whether every local clone's result was right.
    pub local_results_ok: Option<bool>,
    /// Wall time of the whole run, s.
    pub wall_s: f64,
    /// Where the logs are (when kept).
    pub run_dir: Option<String>,
}

/// Kills and reaps a child when dropped.
struct Guard {
    name: String,
    child: Option<Child>,
}

impl Guard {
    fn spawn(name: impl Into<String>, mut cmd: Command, log: &Path) -> Result<Guard, DemoError> {
        let name = name.into();
        let out = fs::File::create(log).map_err(io_err(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io_err("duplicating a log file"))?;
        let child =
            cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().map_err(io_err(format!("starting {name}")))?;
        Ok(Guard { name, child: Some(child) })
    }

    fn wait_timeout(&mut self, limit: Duration) -> Result<ExitStatus, DemoError> {
        let deadline = Instant::now() + limit;
        let Some(child) = self.child.as_mut() else {
            return Err(DemoError::Config(format!("{} was already reaped", self.name)));
        };
        loop {
            if let Some(status) = child.try_wait().map_err(io_err(format!("waiting for {}", self.name)))? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(DemoError::Timeout(self.name.clone(), limit));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    fn terminate(&mut self, grace: Duration) {
        let Some(child) = self.child.as_mut() else { return };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) with a pid of a child we have not reaped yet (so it cannot be reused).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        self.child = None;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Finds a binary built beside this one.
fn sibling(name: &str) -> Result<PathBuf, DemoError> {
    let me = std::env::current_exe().map_err(io_err("locating this executable"))?;
    let path = me.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(DemoError::Missing(format!("{} (build every binary first: cargo build --release --bins)", path.display())))
    }
}

/// Checks what the demo needs and says what is missing.
fn preflight() -> Result<(), DemoError> {
    netlab::check_prerequisites().map_err(|e| DemoError::Missing(format!("network namespaces: {e}")))?;
    netlab::preflight::check_nft().map_err(|e| DemoError::Missing(format!("nftables for link loss: {e}")))?;
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| DemoError::Missing(format!("/dev/kvm read-write ({e})")))?;
    Ok(())
}

fn random_key_hex() -> Result<String, DemoError> {
    let mut key = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .map_err(io_err("reading /dev/urandom for a session key"))?;
    Ok(key.iter().map(|b| format!("{b:02x}")).collect())
}

fn read_json(path: &Path) -> Option<Value> {
    let text = fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

fn num(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

/// Runs the demo. See the module docs.
pub fn run(config: &DemoConfig) -> Result<DemoReport, DemoError> {
    if config.hosts == 0 || config.clones == 0 || !(0.0..1.0).contains(&config.loss) || config.mem_mib == 0 {
        return Err(DemoError::Config(format!(
            "need at least one host and one clone, loss in [0, 1), memory > 0 (got {} hosts, {} clones, loss {}, {} MiB)",
            config.hosts, config.clones, config.loss, config.mem_mib
        )));
    }
    preflight()?;
    let daemon_exe = sibling("spindrift-client")?;
    let vmm_exe = std::env::current_exe().map_err(io_err("locating this executable"))?;
    let started = Instant::now();
    let loss = Loss::from_probability(config.loss).map_err(|e| DemoError::Config(e.to_string()))?;
    let lab_name = netlab::unique_lab_name("demo");
    let lab = Lab::create(
        &LabConfig::new(lab_name.clone(), config.hosts + 1)
            .conditions(LinkConditions::new().with_loss_rx(loss).with_loss_tx(loss)),
    )?;
    tracing::info!(
        "lab {lab_name}: {} hosts, {:.1}% loss each way on every link",
        config.hosts + 1,
        config.loss * 100.0
    );
    let dir = std::env::temp_dir().join(format!("spindrift-{lab_name}"));
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let result = run_in_lab(config, &lab, &dir, &daemon_exe, &vmm_exe, started);
    if !config.keep && result.is_ok() {
        let _ = fs::remove_dir_all(&dir);
    }
    drop(lab);
    let mut report = result?;
    if config.local_baseline {
        let (local_ms, ok) = local_baseline(config, &vmm_exe)?;
        report.local_run_ms = Some(local_ms);
        report.local_results_ok = Some(ok);
        report.run_ratio = report.network_run_ms.map(|n| n / local_ms.max(1e-3));
        report.wall_s = started.elapsed().as_secs_f64();
    }
    Ok(report)
}

/// The same job in local clones whose memory is all written in before their first instruction
/// (`spindrift-vmm run --local --preload`): the longest clone's run, first instruction to exit, ms,
/// and whether every clone's result was right.
fn local_baseline(config: &DemoConfig, vmm_exe: &Path) -> Result<(f64, bool), DemoError> {
    let out = Command::new(vmm_exe)
        .arg("run")
        .args(config.guest.run_args())
        .args(["--seed", &config.seed.to_string(), "--mem-mib", &config.mem_mib.to_string()])
        .args(["--clones", &config.clones.to_string(), "--local", "--preload", "--json"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(io_err("running the local baseline"))?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| DemoError::Config(format!("the local baseline printed no JSON report: {e}")))?;
    let clones = v.pointer("/clone_results").and_then(Value::as_array).cloned().unwrap_or_default();
    let runs: Vec<f64> = clones
        .iter()
        .filter_map(|c| Some((num(c, "/exit_unix_us")? - num(c, "/first_run_unix_us")?) / 1000.0))
        .collect();
    if runs.len() != config.clones as usize {
        return Err(DemoError::Config(format!(
            "the local baseline ran {} of {} clones (exit {:?})",
            runs.len(),
            config.clones,
            out.status.code()
        )));
    }
    let ok = out.status.success()
        && clones.iter().all(|c| c.pointer("/result_correct").and_then(Value::as_bool) == Some(true));
    Ok((runs.iter().copied().fold(0.0, f64::max), ok))
}

fn run_in_lab(
    config: &DemoConfig,
    lab: &Lab,
    dir: &Path,
    daemon_exe: &Path,
    vmm_exe: &Path,
    started: Instant,
) -> Result<DemoReport, DemoError> {
    let key = random_key_hex()?;
    let group = Ipv4Addr::new(239, 77, (lab.index() >> 8) as u8, lab.index() as u8);
    let mut daemons = Vec::new();
    let mut host_addrs = Vec::new();
    for i in 1..=config.hosts {
        let host = lab.host(i)?;
        let hdir = dir.join(host.name());
        fs::create_dir_all(&hdir).map_err(io_err(format!("creating {}", hdir.display())))?;
        let mut cmd = host.command(daemon_exe)?;
        cmd.arg("daemon")
            .args(["--iface", &host.addr().to_string(), "--group", &group.to_string(), "--key-hex", &key])
            .arg("--socket")
            .arg(hdir.join("daemon.sock"))
            .arg("--run-dir")
            .arg(&hdir)
            .arg("--clone-exe")
            .arg(vmm_exe)
            .arg("--stats-json")
            .arg(hdir.join("daemon.json"))
            .args(["--io", &config.io.to_string()]);
        if config.private_clone_memory {
            cmd.env(crate::cli::CLONE_MEMORY_ENV, "private");
        }
        if let Some(max) = config.read_ahead_max {
            cmd.args(["--read-ahead-max", &max.to_string()]);
        }
        cmd.args(&config.daemon_flags);
        daemons.push((
            host.name().to_owned(),
            hdir.clone(),
            Guard::spawn(format!("host daemon on {}", host.name()), cmd, &hdir.join("daemon.log"))?,
        ));
        host_addrs.push(host.addr().to_string());
    }
    // The daemons are ready when their sockets exist.
    let ready_by = Instant::now() + Duration::from_secs(10);
    for (name, hdir, _) in &daemons {
        while !hdir.join("daemon.sock").exists() {
            if Instant::now() >= ready_by {
                return Err(DemoError::Timeout(format!("the host daemon on {name} (socket)"), Duration::from_secs(10)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let parent_host = lab.host(0)?;
    let parent_json = dir.join("parent.json");
    let mut cmd = parent_host.command(vmm_exe)?;
    cmd.arg("run")
        .args(config.guest.run_args())
        .args(["--seed", &config.seed.to_string(), "--mem-mib", &config.mem_mib.to_string()])
        .args(["--clones", &config.clones.to_string()])
        .args(["--net-iface", &parent_host.addr().to_string(), "--group", &group.to_string(), "--key-hex", &key])
        .args(["--hosts", &host_addrs.join(",")])
        .args(["--io", &config.io.to_string()])
        .arg("--out-json")
        .arg(&parent_json);
    if config.verify_image {
        cmd.arg("--verify-image");
    }
    if let Some(rate) = config.background_rate {
        cmd.args(["--background-rate", &rate.to_string()]);
    }
    let mut parent = Guard::spawn("the parent VMM", cmd, &dir.join("parent.log"))?;
    let deadline = started + config.timeout;
    let killed_unix_us = if config.kill_server_when_complete {
        Some(kill_server_when_complete(&mut parent, &daemons, deadline)?)
    } else {
        None
    };
    let status = parent.wait_timeout(deadline.saturating_duration_since(Instant::now()))?;
    if killed_unix_us.is_some() {
        // The parent's JOIN failed with its server; the clones run on: wait for all of them.
        wait_for_clone_files(&daemons, config.clones as usize, deadline)?;
    }
    for (_, _, d) in &mut daemons {
        d.terminate(Duration::from_secs(3));
    }
    let parent_out = read_json(&parent_json);
    let t_fork = parent_out.as_ref().and_then(|p| num(p, "/fork_unix_us"));
    let mut clone_figures = Vec::new();
    let mut pages_fetched = 0u64;
    let mut pages_stored = 0u64;
    for (name, hdir, _) in &daemons {
        if let Some(stats) = read_json(&hdir.join("daemon.json")) {
            let sum = |field: &str| {
                stats
                    .pointer("/sessions")
                    .and_then(Value::as_array)
                    .map(|s| s.iter().filter_map(|x| x.pointer(field).and_then(Value::as_u64)).sum::<u64>())
                    .unwrap_or(0)
            };
            pages_fetched += sum("/pages_present");
            pages_stored += sum("/receiver/pages_stored");
        }
        for clone_json in glob_clone_files(hdir) {
            let Some(c) = read_json(&clone_json) else { continue };
            let ms = |p: &str| Some((num(&c, p)? - t_fork?) / 1000.0);
            clone_figures.push(CloneFigures {
                clone: c.pointer("/clone_id").and_then(Value::as_u64).unwrap_or(0),
                host: name.clone(),
                start_ms: ms("/first_run_unix_us"),
                done_ms: ms("/exit_unix_us"),
                status: c.pointer("/report/status").and_then(Value::as_u64),
                image_matches: c.pointer("/image_matches").and_then(Value::as_bool),
                network_faults: None,
            });
        }
    }
    let mut io = None;
    let mut network_fault_us = Vec::new();
    for (name, hdir, _) in &daemons {
        let Some(stats) = read_json(&hdir.join("daemon.json")) else { continue };
        io = io.or_else(|| stats.pointer("/io").and_then(Value::as_str).map(str::to_owned));
        if let (Some(p50), Some(p99)) = (num(&stats, "/latency_us/network/p50"), num(&stats, "/latency_us/network/p99"))
        {
            network_fault_us.push((name.clone(), p50, p99));
        }
        for c in stats.pointer("/clones").and_then(Value::as_array).into_iter().flatten() {
            let id = c.pointer("/clone_id").and_then(Value::as_u64);
            if let Some(f) = clone_figures.iter_mut().find(|f| Some(f.clone) == id) {
                f.network_faults = c.pointer("/network_faults").and_then(Value::as_u64);
            }
        }
    }
    clone_figures.sort_by_key(|c| c.clone);
    let network_run_ms = clone_figures
        .iter()
        .filter_map(|c| Some(c.done_ms? - c.start_ms?))
        .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
    let p = parent_out.as_ref();
    let server = |k: &str| p.and_then(|p| p.pointer(&format!("/server/{k}"))).and_then(Value::as_u64);
    let memory_bytes = config.mem_mib << 20;
    let images_match =
        config.verify_image.then(|| clone_figures.iter().filter(|c| c.image_matches == Some(true)).count());
    let expected: Vec<String> = p
        .and_then(|p| p.pointer("/expected_results_hex"))
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    let clone_results_ok = daemons
        .iter()
        .flat_map(|(_, hdir, _)| glob_clone_files(hdir))
        .filter_map(|f| read_json(&f))
        .filter(|c| {
            let id = c.pointer("/clone_id").and_then(Value::as_u64).unwrap_or(0) as usize;
            let got = c.pointer("/report/result_hex").and_then(Value::as_str);
            c.pointer("/report/status").and_then(Value::as_u64) == Some(0)
                && id >= 1
                && got.is_some_and(|g| expected.get(id - 1).is_some_and(|e| g.starts_with(e.as_str())))
        })
        .count() as u64;
    let since_fork = |unix_us: Option<f64>| Some((unix_us? - t_fork?) / 1000.0);
    let server_killed_ms = since_fork(killed_unix_us.map(|t| t as f64));
    Ok(DemoReport {
        lab: lab.name().to_owned(),
        hosts: config.hosts,
        clones: config.clones,
        loss: config.loss,
        memory_bytes,
        parent_exit: status.code(),
        results_ok: p.and_then(|p| p.pointer("/results_ok")).and_then(Value::as_u64),
        clone_results_ok,
        all_complete_ms: since_fork(p.and_then(|p| num(p, "/all_complete_unix_us"))),
        server_killed_ms,
        clones_done_after_kill: server_killed_ms
            .map(|k| clone_figures.iter().filter(|c| c.done_ms.is_some_and(|d| d > k)).count()),
        fork_pause_us: p.and_then(|p| num(p, "/fork_pause_us")),
        descriptor_bytes: p.and_then(|p| p.pointer("/descriptor_bytes")).and_then(Value::as_u64),
        clone_figures,
        pages_fetched,
        pages_stored,
        touched_pages: match config.guest {
            DemoGuest::Trace { pages, .. } => Some(pages),
            DemoGuest::Parallel => None,
        },
        pages_eager: (memory_bytes / 4096) * config.hosts as u64,
        server_tx_bytes: server("tx_bytes"),
        server_naks: server("naks"),
        server_repairs: server("repair_packets"),
        server_requests: server("requests"),
        server_pages_sent: server("pages_sent"),
        images_match,
        io,
        network_fault_us,
        clone_memory: if config.private_clone_memory { "private" } else { "shared" }.to_owned(),
        network_run_ms,
        local_run_ms: None,
        run_ratio: None,
        local_results_ok: None,
        wall_s: started.elapsed().as_secs_f64(),
        run_dir: config.keep.then(|| dir.display().to_string()),
    })
}

/// Waits until every host daemon's stats say that it holds every page of a session, then kills
/// the parent's memory server child (SIGKILL). Returns when it was killed (Unix µs).
fn kill_server_when_complete(
    parent: &mut Guard,
    daemons: &[(String, PathBuf, Guard)],
    deadline: Instant,
) -> Result<u64, DemoError> {
    let complete = |hdir: &Path| {
        read_json(&hdir.join("daemon.json")).is_some_and(|stats| {
            stats.pointer("/sessions").and_then(Value::as_array).is_some_and(|sessions| {
                sessions.iter().any(|s| {
                    let pages = s.pointer("/pages").and_then(Value::as_u64).unwrap_or(0);
                    pages > 0 && s.pointer("/pages_present").and_then(Value::as_u64) >= Some(pages)
                })
            })
        })
    };
    let what = "every host holding the whole image (background completion)";
    while !daemons.iter().all(|(_, hdir, _)| complete(hdir)) {
        if Instant::now() >= deadline {
            return Err(DemoError::Timeout(what.into(), Duration::ZERO));
        }
        if parent.child.as_mut().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_)))) {
            return Err(DemoError::Config(format!("the parent exited before {what}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = parent.child.as_ref().map(Child::id).unwrap_or(0);
    let servers = child_pids(pid);
    if servers.is_empty() {
        return Err(DemoError::Config(format!("the parent (pid {pid}) has no memory server child to kill")));
    }
    for child in &servers {
        // SAFETY: kill(2) on a child of our child, read from /proc a moment ago; its parent (our
        // child, not yet reaped) has not reaped it either unless it exited, and then the pid
        // cannot have been reused by now.
        unsafe { libc::kill(*child, libc::SIGKILL) };
    }
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    tracing::info!("every host holds the whole image: killed the memory server (pid {servers:?})");
    Ok(u64::try_from(at.as_micros()).unwrap_or(u64::MAX))
}

/// The children of process `pid` (every thread's), from /proc.
fn child_pids(pid: u32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|text| text.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
        .collect()
}

/// Waits until the hosts hold `count` clone result files (every clone exited).
fn wait_for_clone_files(
    daemons: &[(String, PathBuf, Guard)],
    count: usize,
    deadline: Instant,
) -> Result<(), DemoError> {
    while daemons.iter().map(|(_, hdir, _)| glob_clone_files(hdir).len()).sum::<usize>() < count {
        if Instant::now() >= deadline {
            return Err(DemoError::Timeout(
                format!("{count} clones (after the memory server was killed)"),
                Duration::ZERO,
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn glob_clone_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(sessions) = fs::read_dir(dir) else { return out };
    for s in sessions.flatten() {
        let Ok(files) = fs::read_dir(s.path()) else { continue };
        for f in files.flatten() {
            let name = f.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("clone-") && name.ends_with(".json") {
                out.push(f.path());
            }
        }
    }
    out
}

/// `spindrift-vmm demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Hosts that run clones (the lab gets one more, for the parent).
    #[arg(long, default_value_t = 8)]
    pub hosts: usize,
    /// Clones in all, spread evenly over the hosts.
    #[arg(long, default_value_t = 8)]
    pub clones: u32,
    /// Random loss on every link, each way (0..1).
    #[arg(long, default_value_t = 0.02)]
    pub loss: f64,
    /// Guest memory, MiB (a multiple of 2); the parallel job's data set is half of it.
    #[arg(long, default_value_t = 128)]
    pub mem_mib: u64,
    /// Whole-run bound, seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout_s: u64,
    /// Keep the run directory (logs and JSON of every process).
    #[arg(long)]
    pub keep: bool,
    /// Check that every clone's memory at its first instruction equals the parent's at the fork (blake3
    /// of all of memory; every clone then fetches all of it).
    #[arg(long)]
    pub verify_image: bool,
    /// Packet I/O of the memory server and the host daemons: udp, xdp (AF_XDP kernel bypass) or
    /// auto (AF_XDP where it can be used, else UDP).
    #[arg(long, default_value_t = netio::IoKind::Udp)]
    pub io: netio::IoKind,
    /// Clones copy every page into private memory instead of mapping their host's page cache
    /// (the fallback path, as for a VMM with anonymous memory).
    #[arg(long)]
    pub private_clone_memory: bool,
    /// After the networked run, run the same job in local clones whose memory is all present before
    /// their first instruction (an ideal pre-provisioned cluster) and report the ratio.
    #[arg(long)]
    pub local_baseline: bool,
    /// The host daemons' largest sequential read-ahead window, pages (default: theirs; 0: fixed).
    #[arg(long)]
    pub read_ahead_max: Option<u16>,
    /// One more flag for every host daemon, e.g. `--daemon-flag=--busy-poll-us=300` (repeat it).
    #[arg(long = "daemon-flag", allow_hyphen_values = true)]
    pub daemon_flags: Vec<String>,
    /// The parent's guest: `parallel` (the parallel job) or `trace` (pages read in
    /// `--trace-pattern` order).
    #[arg(long, value_enum, default_value = "parallel")]
    pub guest: DemoGuestKind,
    /// Trace guest: the touch order (random, runs or sequential).
    #[arg(long, default_value = "runs")]
    pub trace_pattern: spindrift_client::touch::Pattern,
    /// Trace guest: pages each clone touches.
    #[arg(long, default_value_t = 4096)]
    pub trace_pages: u64,
    /// Trace guest: iterations of an empty loop after each touch.
    #[arg(long, default_value_t = 0)]
    pub trace_spin: u64,
    /// Seed of the data set and of the trace.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The memory server's background completion rate, bytes per second (default: the parent's,
    /// 12500000; 0: off).
    #[arg(long)]
    pub background_rate: Option<u64>,
    /// Once every host holds the whole image, kill the memory server while the clones run; pass
    /// only if every clone still finishes with the right result.
    #[arg(long)]
    pub kill_server_when_complete: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--guest` of `spindrift-vmm demo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoGuestKind {
    /// The parallel job.
    Parallel,
    /// The trace guest.
    Trace,
}

/// Runs `spindrift-vmm demo`: returns the exit code (0: every clone's result checked out).
pub fn demo_cmd(args: &DemoArgs) -> i32 {
    let config = DemoConfig {
        hosts: args.hosts,
        clones: args.clones,
        loss: args.loss,
        mem_mib: args.mem_mib,
        timeout: Duration::from_secs(args.timeout_s),
        keep: args.keep,
        verify_image: args.verify_image,
        io: args.io,
        private_clone_memory: args.private_clone_memory,
        local_baseline: args.local_baseline,
        read_ahead_max: args.read_ahead_max,
        daemon_flags: args.daemon_flags.clone(),
        guest: match args.guest {
            DemoGuestKind::Parallel => DemoGuest::Parallel,
            DemoGuestKind::Trace => {
                DemoGuest::Trace { pattern: args.trace_pattern, pages: args.trace_pages, spin: args.trace_spin }
            }
        },
        seed: args.seed,
        background_rate: args.background_rate,
        kill_server_when_complete: args.kill_server_when_complete,
    };
    if !args.json {
        eprintln!(
            "spindrift demo: a parent VM ({} MiB) forks {} clones onto {} hosts of a simulated cluster ({:.1}% loss per link) ...",
            config.mem_mib,
            config.clones,
            config.hosts,
            config.loss * 100.0
        );
    }
    let report = match run(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spindrift demo: {e}");
            return 2;
        }
    };
    let ok = if config.kill_server_when_complete {
        // The parent's JOIN fails with its server: the clones' own result files are the check.
        report.clone_results_ok == u64::from(report.clones) && report.server_killed_ms.is_some()
    } else {
        report.parent_exit == Some(0) && report.results_ok == Some(u64::from(report.clones))
    } && report.local_results_ok != Some(false);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print_report(&report);
    }
    if ok {
        0
    } else {
        1
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn print_report(r: &DemoReport) {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!();
    println!("clone  host   first instruction after fork   done after fork   status   pages from network   memory = parent's");
    for c in &r.clone_figures {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
        println!(
            "{:>5}  {:<5}  {:>29}   {:>15}   {:>6}   {:>18}   {}",
            c.clone,
            c.host,
            ms(c.start_ms),
            ms(c.done_ms),
            opt(c.status),
            opt(c.network_faults),
            c.image_matches.map_or("not checked", |m| if m { "yes" } else { "NO" })
        );
    }
    let starts: Vec<f64> = r.clone_figures.iter().filter_map(|c| c.start_ms).collect();
    let all_running = starts.iter().copied().fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
    println!();
    println!(
        "results checked by the parent   {} of {} correct (parent exit {})",
        opt(r.results_ok),
        r.clones,
        opt(r.parent_exit)
    );
    println!("results in the clones' files    {} of {} correct", r.clone_results_ok, r.clones);
    println!("fork pause of the parent        {} µs", opt(r.fork_pause_us.map(|v| v as u64)));
    if let Some(ms) = r.all_complete_ms {
        println!("every host holds the image      {ms:.1} ms after the fork (background completion)");
    }
    if let Some(ms) = r.server_killed_ms {
        println!(
            "memory server killed            {ms:.1} ms after the fork; {} clones exited after that",
            opt(r.clones_done_after_kill)
        );
    }
    println!(
        "fork to every clone running     {}",
        all_running.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"))
    );
    println!(
        "descriptor                      {} bytes ({:.0} KiB per GiB of guest memory)",
        opt(r.descriptor_bytes),
        r.descriptor_bytes.map_or(0.0, |d| d as f64 / 1024.0 / (r.memory_bytes as f64 / (1u64 << 30) as f64))
    );
    let pages = r.memory_bytes / 4096;
    let faulted: u64 = r.clone_figures.iter().filter_map(|c| c.network_faults).sum();
    println!(
        "memory fetched                  {} of {} pages sent once by multicast ({:.1}% of guest memory); clones faulted {} pages \
         to the network in all",
        opt(r.server_pages_sent),
        pages,
        100.0 * r.server_pages_sent.unwrap_or(0) as f64 / pages.max(1) as f64,
        faulted
    );
    println!(
        "host page caches                {:.1} MiB in all, {:.1}% of copying the memory to every host",
        mib(r.pages_fetched * 4096),
        100.0 * r.pages_fetched as f64 / r.pages_eager.max(1) as f64
    );
    if let Some(n) = r.images_match {
        println!(
            "clone memory = parent's at fork {n} of {} clones (blake3 of all guest memory)",
            r.clone_figures.len()
        );
    }
    println!(
        "memory server                   sent {} MiB; {} requests, {} NAKs, {} repair packets",
        r.server_tx_bytes.map_or_else(|| "-".to_owned(), |b| format!("{:.1}", mib(b))),
        opt(r.server_requests),
        opt(r.server_naks),
        opt(r.server_repairs)
    );
    if !r.network_fault_us.is_empty() {
        let range = |f: fn(&(String, f64, f64)) -> f64| {
            let v: Vec<f64> = r.network_fault_us.iter().map(f).collect();
            let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            format!("{:.2}-{:.2} ms", lo / 1000.0, hi / 1000.0)
        };
        println!(
            "network fault service           p50 {}, p99 {} over the hosts ({})",
            range(|x| x.1),
            range(|x| x.2),
            r.io.as_deref().unwrap_or("-")
        );
    }
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
    println!(
        "longest clone run               {} (first instruction to exit; clone memory {})",
        ms(r.network_run_ms),
        r.clone_memory
    );
    if let Some(local) = r.local_run_ms {
        println!(
            "local baseline                  {} (memory present before the first instruction; results {}); run_ratio {}",
            ms(Some(local)),
            if r.local_results_ok == Some(true) { "right" } else { "WRONG" },
            r.run_ratio.map_or_else(|| "-".to_owned(), |x| format!("{x:.2}"))
        );
    }
    println!("wall time                       {:.1} s (lab {})", r.wall_s, r.lab);
    if let Some(d) = &r.run_dir {
        println!("logs                            {d}");
    }
}
