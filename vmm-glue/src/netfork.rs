//! [`NetForkHost`]: forks a VM to clones on other hosts over a multicast session.
//!
//! At the guest's `FORK`, with every vCPU paused, the VMM process `fork()`s. The child keeps guest
//! memory exactly as it was (copy-on-write: the parent's later writes make private copies) and becomes
//! the memory server of a new session: it publishes the VM descriptor and the fork plan (which host
//! starts which clone ids) as blobs in the session's stream, then answers the hosts' page requests by
//! multicast. The parent resumes its guest at once. Clone reports reach the child as protocol Reports;
//! it passes each one to the parent as a JSON line on a pipe, where `JOIN` collects them.
//!
//! The child stops when the parent closes its end of a control pipe (at [`NetForkHost::finish`], or
//! when the parent dies), ends the session, and writes its final counters on the report pipe.
//!
//! With a background rate, the child also completes every host's copy of the image in the
//! background (PROTOCOL.md section 10.1): it pushes every page at that rate, after every answer,
//! once all the plan's hosts are live. A host holding every page says so in its Status; the child
//! passes that on (a `complete` line with the time), and from then on that host's clones no longer
//! need the child: they keep running if it dies.
//!
//! After `fork()` the child runs only its own thread (the vCPU threads and others are not copied);
//! they were parked outside any lock when the VMM called [`CloneHost::fork`], and glibc's `fork`
//! keeps the allocator usable, so the child can run the ordinary server code.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use spindrift_protocol::wire::{BlobKind, ForkEntry, ForkPlan, NodeId};
use spindrift_server::{serve_source, MemoryImage, SenderEvent, ServeOptions, ServerConfig};

use crate::descriptor::Descriptor;
use crate::host::{CloneHost, CloneReport, HostError};
use crate::memory::GuestMemory;

/// The descriptor's blob id in every fork session.
const DESCRIPTOR_BLOB: u32 = 1;
/// The fork plan's blob id.
const PLAN_BLOB: u32 = 2;

/// Where and how to fork.
#[derive(Debug, Clone)]
pub struct NetForkConfig {
    /// This host's interface address (the server binds there).
    pub iface: Ipv4Addr,
    /// The multicast group.
    pub group: Ipv4Addr,
    /// The UDP port.
    pub port: u16,
    /// The group key (every session's keys derive from it).
    pub key: [u8; 32],
    /// The hosts that run clones, by interface address (their node ids).
    pub hosts: Vec<Ipv4Addr>,
    /// Pacing rate of the memory server, bytes per second.
    pub rate_bytes_per_sec: Option<u64>,
    /// The memory server's packet I/O backend.
    pub io: netio::IoKind,
    /// Background completion: push every page at this rate, bytes per second (None: off).
    pub background_rate: Option<u64>,
}

/// One line the child writes on the report pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ChildLine {
    /// A clone's report.
    Report { node: u32, clone: u32, status: u32, result_hex: String },
    /// A host holds every page (its first such Status), at this Unix time.
    Complete { node: u32, unix_us: u64 },
    /// The server's final counters.
    Stats { stats: serde_json::Value },
    /// The server failed.
    Error { message: String },
}

/// One fork's memory server child.
#[derive(Debug)]
struct ForkChild {
    fork: u32,
    session: u64,
    pid: libc::pid_t,
    count: u32,
    /// Hosts the plan names.
    hosts: usize,
    /// Hosts that hold every page, and when they said so (Unix µs).
    complete: Vec<(u32, u64)>,
    reports: BufReader<File>,
    control: Option<File>,
    received: Vec<CloneReport>,
    stats: Option<serde_json::Value>,
    error: Option<String>,
}

/// What one fork's server did.
#[derive(Debug, Clone, Serialize)]
pub struct ForkFigures {
    /// The fork.
    pub fork: u32,
    /// Its session.
    pub session: u64,
    /// Clones.
    pub clones: u32,
    /// Reports received.
    pub reports: usize,
    /// Hosts the plan names.
    pub hosts: usize,
    /// Hosts that said they hold every page (background completion).
    pub hosts_complete: usize,
    /// When the last of the plan's hosts said so (Unix µs): from then on no clone needs the server.
    pub all_complete_unix_us: Option<u64>,
    /// The server's final counters (its `SenderStats`).
    pub server: Option<serde_json::Value>,
    /// The server's error, if it failed.
    pub error: Option<String>,
}

/// A [`CloneHost`] that forks to host daemons over the network. See the module docs.
#[derive(Debug)]
pub struct NetForkHost {
    config: NetForkConfig,
    next_fork: u32,
    children: Vec<ForkChild>,
}

impl NetForkHost {
    /// A host forking to `config.hosts`.
    pub fn new(config: NetForkConfig) -> Result<NetForkHost, HostError> {
        if config.hosts.is_empty() {
            return Err(HostError::Other("no hosts to fork to".into()));
        }
        // The server checks the rest when it starts; check it now so a bad address fails before a fork.
        ServerConfig::new(config.iface, config.group, config.port, 1, config.key)
            .map_err(|e| HostError::Other(format!("memory server settings: {e}")))?;
        Ok(NetForkHost { config, next_fork: 1, children: Vec::new() })
    }

    /// The fork plan for `count` clones: as even as possible over the hosts, contiguous ids per host.
    pub fn plan(&self, fork: u32, count: u32) -> ForkPlan {
        let hosts = u32::try_from(self.config.hosts.len()).unwrap_or(u32::MAX);
        let mut entries = Vec::new();
        let mut next = 1u32;
        for (i, addr) in self.config.hosts.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let clones = count / hosts + u32::from(i < count % hosts);
            if clones > 0 {
                entries.push(ForkEntry { node: NodeId(u32::from(*addr)), first_clone: next, clones });
                next += clones;
            }
        }
        ForkPlan { fork, descriptor: DESCRIPTOR_BLOB, entries }
    }

    /// Stops every fork's memory server and returns what each did. Waits at most `timeout` in all.
    pub fn finish(mut self, timeout: Duration) -> Vec<ForkFigures> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for mut child in std::mem::take(&mut self.children) {
            child.control = None;
            while child.stats.is_none() && child.error.is_none() && Instant::now() < deadline {
                if !child.read_line(deadline) {
                    break;
                }
            }
            child.reap(deadline);
            out.push(ForkFigures {
                fork: child.fork,
                session: child.session,
                clones: child.count,
                reports: child.received.len(),
                hosts: child.hosts,
                hosts_complete: child.complete.len(),
                all_complete_unix_us: (child.complete.len() >= child.hosts)
                    .then(|| child.complete.iter().map(|c| c.1).max())
                    .flatten(),
                server: child.stats.take(),
                error: child.error.take(),
            });
        }
        out
    }
}

fn pipe() -> Result<(File, File), HostError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given, which has room for two.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r != 0 {
        return Err(HostError::Io { op: "pipe2", source: std::io::Error::last_os_error() });
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nothing else.
    Ok(unsafe { (File::from(OwnedFd::from_raw_fd(fds[0])), File::from(OwnedFd::from_raw_fd(fds[1]))) })
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(b)
}

impl CloneHost for NetForkHost {
    fn fork(&mut self, count: u32, descriptor: &Descriptor, memory: &GuestMemory) -> Result<u32, HostError> {
        let fork = self.next_fork;
        self.next_fork += 1;
        let session = random_u64().max(1);
        let plan = self.plan(fork, count);
        let blobs = vec![
            (BlobKind::Descriptor, DESCRIPTOR_BLOB, descriptor.encode()),
            (BlobKind::Fork, PLAN_BLOB, plan.encode()),
        ];
        let server =
            ServerConfig::new(self.config.iface, self.config.group, self.config.port, session, self.config.key)
                .and_then(|c| c.with_rate(self.config.rate_bytes_per_sec))
                .map_err(|e| HostError::Other(format!("memory server settings: {e}")))?
                .with_push(match self.config.background_rate {
                    Some(_) => spindrift_server::Push::All,
                    None => spindrift_server::Push::None,
                })
                .with_push_rate(self.config.background_rate)
                .map_err(|e| HostError::Other(format!("background rate: {e}")))?
                .with_push_quiet(BACKGROUND_QUIET)
                .with_min_receivers(u32::try_from(plan.entries.len()).unwrap_or(u32::MAX))
                .with_io(self.config.io);
        let (report_r, report_w) = pipe()?;
        let (control_r, control_w) = pipe()?;
        let (addr, len) = (memory.host_addr(), memory.size());
        // SAFETY: fork(2) has no memory-safety preconditions; see the module docs for why the child may
        // run ordinary code (every other thread of this process was parked outside any lock).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(HostError::Io { op: "fork", source: std::io::Error::last_os_error() });
        }
        if pid == 0 {
            drop(report_r);
            drop(control_w);
            // SAFETY: in the child, guest memory is a private copy-on-write view of the parent's at the
            // fork; no vCPU thread exists here and nothing in the child writes it, so it stays valid and
            // unchanged for the child's life, which ends in `_exit` below without unmapping it.
            let image = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
            let code = child_main(&server, image, blobs, report_w, control_r);
            // SAFETY: _exit ends the child without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        drop(report_w);
        drop(control_r);
        tracing::info!(
            "fork {fork}: memory server pid {pid}, session {session}, {count} clones on {} hosts",
            plan.entries.len()
        );
        self.children.push(ForkChild {
            fork,
            session,
            pid,
            count,
            hosts: plan.entries.len(),
            complete: Vec::new(),
            reports: BufReader::new(report_r),
            control: Some(control_w),
            received: Vec::new(),
            stats: None,
            error: None,
        });
        Ok(fork)
    }

    fn join(&mut self, fork: u32, timeout: Duration) -> Result<Vec<CloneReport>, HostError> {
        let child = self.children.iter_mut().find(|c| c.fork == fork).ok_or(HostError::UnknownFork(fork))?;
        let deadline = Instant::now() + timeout;
        while child.received.len() < child.count as usize {
            if let Some(e) = &child.error {
                return Err(HostError::Other(format!("the memory server of fork {fork} failed: {e}")));
            }
            if Instant::now() >= deadline || !child.read_line(deadline) {
                return Err(HostError::Timeout {
                    fork,
                    got: child.received.len(),
                    expected: child.count as usize,
                    waited: timeout,
                });
            }
        }
        Ok(child.received.clone())
    }

    fn report(&mut self, _: &CloneReport) -> Result<(), HostError> {
        Err(HostError::Unsupported("REPORT in a parent"))
    }
}

impl ForkChild {
    /// Reads one line (waiting until `deadline`); false on end of file or time-out.
    fn read_line(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd: self.reports.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        if self.reports.buffer().is_empty() {
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: poll reads and writes exactly the one pollfd it is given.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n <= 0 {
                return false;
            }
        }
        let mut line = String::new();
        match self.reports.read_line(&mut line) {
            Ok(0) | Err(_) => false,
            Ok(_) => {
                match serde_json::from_str::<ChildLine>(&line) {
                    Ok(ChildLine::Report { clone, status, result_hex, .. }) => {
                        if !self.received.iter().any(|r| r.clone_id == clone) {
                            self.received.push(CloneReport {
                                fork_id: self.fork,
                                clone_id: clone,
                                status,
                                result: from_hex(&result_hex),
                            });
                        }
                    }
                    Ok(ChildLine::Complete { node, unix_us }) => {
                        if !self.complete.iter().any(|c| c.0 == node) {
                            self.complete.push((node, unix_us));
                        }
                    }
                    Ok(ChildLine::Stats { stats }) => self.stats = Some(stats),
                    Ok(ChildLine::Error { message }) => self.error = Some(message),
                    Err(e) => tracing::warn!("fork {}: unreadable line from the memory server: {e}", self.fork),
                }
                true
            }
        }
    }

    fn reap(&mut self, deadline: Instant) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child, with a valid pointer for the status.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r != 0 {
                return;
            }
            if Instant::now() >= deadline {
                // SAFETY: kill(2) on our own unreaped child (its pid cannot have been reused).
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
                // SAFETY: as above.
                unsafe { libc::waitpid(self.pid, &mut status, 0) };
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NetForkHost {
    fn drop(&mut self) {
        for child in &mut self.children {
            child.control = None;
            child.reap(Instant::now() + Duration::from_secs(3));
        }
    }
}

fn unix_us() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(t.as_micros()).unwrap_or(u64::MAX)
}

fn from_hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

/// The child: serves `image` until the parent closes the control pipe.
fn child_main(
    config: &ServerConfig,
    image: &[u8],
    blobs: Vec<(BlobKind, u32, Vec<u8>)>,
    report: File,
    control: File,
) -> i32 {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        let mut control = control;
        let mut buf = [0u8; 64];
        while matches!(std::io::Read::read(&mut control, &mut buf), Ok(n) if n > 0) {}
        stop2.store(true, Ordering::SeqCst);
    });
    let Ok(mut out) = report.try_clone() else { return 3 };
    let mut events = report;
    let on_event = move |ev: &SenderEvent| {
        let line = match ev {
            SenderEvent::CloneReport { node, clone, status, result, .. } => ChildLine::Report {
                node: node.0,
                clone: *clone,
                status: *status,
                result_hex: result.iter().map(|b| format!("{b:02x}")).collect(),
            },
            SenderEvent::ReceiverComplete(node) => ChildLine::Complete { node: node.0, unix_us: unix_us() },
            _ => return,
        };
        if let Ok(mut text) = serde_json::to_string(&line) {
            text.push('\n');
            let _ = events.write_all(text.as_bytes());
        }
    };
    let options = ServeOptions { blobs, on_event: Some(Box::new(on_event)), ..ServeOptions::default() };
    let result = MemoryImage::new(image)
        .map_err(spindrift_server::ServerError::from)
        .and_then(|img| serve_source(config, img, options, &stop));
    let line = match &result {
        Ok(stats) => ChildLine::Stats { stats: serde_json::to_value(stats).unwrap_or_default() },
        Err(e) => ChildLine::Error { message: e.to_string() },
    };
    if let Ok(mut text) = serde_json::to_string(&line) {
        text.push('\n');
        let _ = out.write_all(text.as_bytes());
    }
    i32::from(result.is_err())
}

/// `spindrift-vmm run` options for forking over the network (all four of `--net-iface`, `--group`, a key
/// and `--hosts` turn it on).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NetArgs {
    /// Fork over the network: this host's interface address (the memory server binds there).
    #[arg(long)]
    pub net_iface: Option<Ipv4Addr>,
    /// The multicast group (239.0.0.0/8) the host daemons listen on.
    #[arg(long)]
    pub group: Option<Ipv4Addr>,
    /// The UDP port.
    #[arg(long, default_value_t = 7700)]
    pub port: u16,
    /// The group key the host daemons use: 64 hex digits.
    #[arg(long)]
    pub key_hex: Option<String>,
    /// The hosts whose daemons start the clones, by address, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub hosts: Vec<Ipv4Addr>,
    /// Pacing rate of the memory server, bytes per second.
    #[arg(long)]
    pub server_rate: Option<u64>,
    /// The memory server's packet I/O backend: udp, xdp (AF_XDP) or auto.
    #[arg(long, default_value_t = netio::IoKind::Udp)]
    pub io: netio::IoKind,
    /// Background completion (PROTOCOL.md section 10.1): the memory server pushes every page to
    /// every host at this rate, bytes per second, after every answer, so that clones outlive it;
    /// 0 turns it off.
    #[arg(long, default_value_t = DEFAULT_BACKGROUND_RATE)]
    pub background_rate: u64,
}

/// The default `--background-rate`: 100 Mbit/s.
pub const DEFAULT_BACKGROUND_RATE: u64 = 12_500_000;

/// Background completion waits until no request has come for this long: it runs while the hosts
/// are not faulting, so it takes nothing from clones that are starting or fetching.
const BACKGROUND_QUIET: Duration = Duration::from_millis(20);

impl NetArgs {
    /// True when any network option is given.
    pub fn wanted(&self) -> bool {
        self.net_iface.is_some() || self.group.is_some() || self.key_hex.is_some() || !self.hosts.is_empty()
    }

    /// The checked configuration.
    pub fn config(&self) -> Result<NetForkConfig, HostError> {
        let missing = |what: &str| HostError::Other(format!("forking over the network needs {what}"));
        let key_hex = self.key_hex.as_deref().ok_or_else(|| missing("--key-hex"))?;
        let key = spindrift_server::config::parse_key_hex(key_hex)
            .map_err(|e| HostError::Other(format!("--key-hex: {e}")))?;
        if self.hosts.is_empty() {
            return Err(missing("--hosts"));
        }
        Ok(NetForkConfig {
            iface: self.net_iface.ok_or_else(|| missing("--net-iface"))?,
            group: self.group.ok_or_else(|| missing("--group"))?,
            port: self.port,
            key,
            hosts: self.hosts.clone(),
            rate_bytes_per_sec: self.server_rate,
            io: self.io,
            background_rate: (self.background_rate > 0).then_some(self.background_rate),
        })
    }
}

/// Runs `spindrift-vmm run` with its forks going over the network ([`NetForkHost`]). Prints a summary
/// (or JSON with `--json`) and writes `--out-json`; returns the guest's exit code.
pub fn run_net(args: &crate::cli::RunArgs) -> Result<i32, crate::cli::CliError> {
    let net = args.net.config()?;
    let hosts = net.hosts.len();
    let wall = Instant::now();
    let (mut vm, expected) = crate::cli::build_vm(args)?;
    let mem = vm.memory().size();
    let setup_ms = wall.elapsed().as_secs_f64() * 1e3;
    let mut host = NetForkHost::new(net)?;
    let outcome = match vm.run(&mut host) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("spindrift-vmm: the VM failed: {e}");
            vm.outcome().clone()
        }
    };
    let run_ms = wall.elapsed().as_secs_f64() * 1e3 - setup_ms;
    let servers = host.finish(Duration::from_secs(10));
    let fork = outcome.forks.first();
    let join = outcome.joins.first();
    let correct = join.map(|j| {
        j.reports
            .iter()
            .filter(|r| {
                let got = r.result.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes);
                r.status == 0 && got.is_some() && got == expected.get(r.clone_id as usize - 1).copied()
            })
            .count()
    });
    let server = servers.first();
    let summary = serde_json::json!({
        "guest": format!("{:?}", args.guest).to_lowercase(),
        "memory_bytes": mem,
        "clones": args.clones,
        "hosts": hosts,
        "exit_code": outcome.exit_code,
        "results_ok": correct,
        "guest_verdict": outcome.own_report.as_ref().map(|r| r.status),
        "fork_unix_us": fork.map(|f| f.fork_unix_us),
        "fork_pause_us": fork.map(|f| f.pause_us),
        "fork_capture_us": fork.map(|f| f.capture_us),
        "fork_host_us": fork.map(|f| f.host_us),
        "descriptor_bytes": fork.map(|f| f.descriptor_bytes),
        "zero_pages": fork.map(|f| f.zero_pages),
        "discard_pages": fork.map(|f| f.discard_pages),
        "zero_map_method": fork.map(|f| f.zero_map_method),
        "fork_error": fork.and_then(|f| f.error.clone()),
        "join_wait_us": join.map(|j| j.wait_us),
        "join_error": join.and_then(|j| j.error.clone()),
        "pages_total": mem / 4096,
        "setup_ms": setup_ms,
        "run_ms": run_ms,
        "session": server.map(|s| s.session),
        "hosts_complete": server.map(|s| s.hosts_complete),
        "all_complete_unix_us": server.and_then(|s| s.all_complete_unix_us),
        "expected_results_hex": expected.iter().map(|v| v.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>()).collect::<Vec<_>>(),
        "server": server.and_then(|s| s.server.clone()),
        "server_error": server.and_then(|s| s.error.clone()),
        "host_errors": outcome.host_errors,
        "console": String::from_utf8_lossy(&outcome.console),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
    } else {
        println!(
            "exit code {}, {} of {} clone results correct; fork pause {} µs, descriptor {} bytes; join waited {} µs",
            outcome.exit_code,
            correct.unwrap_or(0),
            args.clones,
            fork.map_or(0, |f| f.pause_us),
            fork.map_or(0, |f| f.descriptor_bytes),
            join.map_or(0, |j| j.wait_us),
        );
    }
    if let Some(path) = &args.out_json {
        crate::cli::write_json(path, &summary)?;
    }
    Ok(outcome.exit_code.min(255) as i32)
}
