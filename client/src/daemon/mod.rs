//! The host daemon: the fault path over the network.
//!
//! One daemon per host follows every session announced on its multicast group and keeps one
//! [`PageCache`](crate::PageCache) per session (snapshot), shared by all clones of it on the host, so
//! no page crosses the network twice to the same host. Clones hand over their userfaultfd on a Unix
//! socket; their faults are served from the cache, and the pages it lacks are asked for in batches
//! (the faulting pages first, plus the receiver's read-ahead).
//!
//! Threads:
//!
//! ```text
//!  main ─────── stats: JSON snapshot (tmp + rename) every second, summary line every 5 s; signals
//!  net ──────── UDP socket + one protocol Receiver per session (net.rs)
//!  listener ─── Unix socket; one thread per clone: handoff, FaultServer, report lines (clones.rs)
//!  children ─── descriptors and fork plans: clone processes started and reaped (children.rs)
//! ```
//!
//! A clone is never left blocked for good: when a session's server is lost (silent past
//! `--server-timeout-s` while pages are wanted) or ends the session, the waiting faults of its clones
//! are poisoned (SIGBUS in the clone) and the error is logged; a restarted server (a new epoch) is
//! followed transparently. At shutdown (SIGINT/SIGTERM) every clone's faults fail, the stats are
//! written and the socket is removed.

mod children;
mod clones;
#[cfg(test)]
mod mem_tests;
mod net;
mod registry;
mod stats;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use netio::IoKind;
use spindrift_protocol::wire::SessionKey;

pub use clones::CloneError;
pub use net::NetError;
pub use stats::{CounterSnapshot, LatencySnapshot, Snapshot, StatsError, Summary};

use crate::waker::{Waker, WakerError};
use registry::Registry;
use stats::DaemonStats;

/// How the daemon is set up (the `daemon` subcommand's flags).
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// This host's interface address (the group is joined there).
    pub interface: Ipv4Addr,
    /// The multicast group (239.0.0.0/8).
    pub group: Ipv4Addr,
    /// The UDP port of the group and the servers.
    pub port: u16,
    /// The group key: every session's keys are derived from it and the session id.
    pub key: SessionKey,
    /// The clone socket's path.
    pub socket: PathBuf,
    /// This host's node id (non-zero).
    pub node: u32,
    /// Where descriptors, clone outputs and logs go (`<run-dir>/<session>/...`).
    pub run_dir: PathBuf,
    /// The program fork plans start clones with.
    pub clone_exe: PathBuf,
    /// Where the stats snapshot is rewritten about once a second.
    pub stats_json: Option<PathBuf>,
    /// A server silent this long while pages are wanted is declared lost.
    pub server_timeout: Duration,
    /// The first read-ahead window once faults follow a pattern (a fixed window after every fault
    /// when `read_ahead_max` is at most this).
    pub read_ahead: u16,
    /// The window read-ahead that follows a pattern grows to (0 or at most `read_ahead`: fixed).
    pub read_ahead_max: u16,
    /// How long the network thread polls, instead of sleeping, while a clone's fault waits (zero:
    /// never).
    pub busy_poll: Duration,
    /// Most sessions live at once (ended sessions no clone uses do not count).
    pub max_sessions: usize,
    /// How long an ended session that no clone uses keeps its cache (its server may start it again).
    pub session_linger: Duration,
    /// How long a handoff waits for its session to be announced.
    pub session_wait: Duration,
    /// How often the summary line is logged.
    pub summary_every: Duration,
    /// The packet I/O backend.
    pub io: IoKind,
}

impl DaemonConfig {
    /// A configuration with defaults: port 7700, node id from the interface address, run directory
    /// `<tmp>/spindrift-client-<iface>`, `spindrift-vmm` as the clone program, 10 s server timeout,
    /// read-ahead 16, 8 live sessions, ended sessions kept 30 s, 10 s session wait, a summary every 5 s.
    pub fn new(interface: Ipv4Addr, group: Ipv4Addr, key: SessionKey, socket: PathBuf) -> DaemonConfig {
        DaemonConfig {
            interface,
            group,
            port: crate::session::DEFAULT_PORT,
            key,
            socket,
            node: crate::session::default_node(interface),
            run_dir: std::env::temp_dir().join(format!("spindrift-client-{interface}")),
            clone_exe: children::default_clone_exe(),
            stats_json: None,
            server_timeout: Duration::from_secs(10),
            read_ahead: 4,
            read_ahead_max: 256,
            busy_poll: Duration::from_micros(300),
            max_sessions: 8,
            session_linger: Duration::from_secs(30),
            session_wait: Duration::from_secs(10),
            summary_every: Duration::from_secs(5),
            io: IoKind::Udp,
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), DaemonError> {
        if self.group.octets()[0] != 239 {
            return Err(DaemonError::Invalid(format!(
                "--group {} is not a multicast address in 239.0.0.0/8",
                self.group
            )));
        }
        if self.interface.is_unspecified() || self.interface.is_multicast() || self.interface.is_broadcast() {
            return Err(DaemonError::Invalid(format!("--iface {} is not a usable unicast address", self.interface)));
        }
        if self.port == 0 {
            return Err(DaemonError::Invalid("--port 0 is not a valid port".into()));
        }
        if self.node == 0 {
            return Err(DaemonError::Invalid("--node 0 is reserved for the server".into()));
        }
        if self.server_timeout.is_zero() {
            return Err(DaemonError::Invalid("--server-timeout-s must be positive".into()));
        }
        if self.max_sessions == 0 {
            return Err(DaemonError::Invalid("--max-sessions must be at least 1".into()));
        }
        Ok(())
    }
}

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A flag out of range.
    #[error("{0}")]
    Invalid(String),
    /// The run directory could not be created.
    #[error("creating the run directory {path}: {source}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The network side failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The clone socket could not be set up.
    #[error(transparent)]
    Socket(#[from] CloneError),
    /// A waker could not be created.
    #[error(transparent)]
    Waker(#[from] WakerError),
    /// A thread could not be started.
    #[error("starting the {what} thread: {source}")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// A thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// What a daemon run ends with: its final stats.
#[derive(Debug, Clone)]
pub struct DaemonReport {
    /// The last snapshot.
    pub snapshot: Snapshot,
}

fn spawn<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, DaemonError> {
    std::thread::Builder::new().name(what.to_string()).spawn(f).map_err(|source| DaemonError::Thread { what, source })
}

/// Runs the daemon until `stop` is set (the binary sets it on SIGINT/SIGTERM) or the network side
/// fails. See the module docs.
pub fn run(config: &DaemonConfig, stop: &AtomicBool) -> Result<DaemonReport, DaemonError> {
    config.validate()?;
    std::fs::create_dir_all(&config.run_dir)
        .map_err(|source| DaemonError::RunDir { path: config.run_dir.clone(), source })?;
    let stats = Arc::new(DaemonStats::new(config.node));
    let registry = Arc::new(Registry::default());
    let halt = Arc::new(AtomicBool::new(false));
    let (blob_tx, blob_rx) = crossbeam_channel::unbounded();
    let settings = net::NetSettings {
        interface: config.interface,
        group: config.group,
        port: config.port,
        key: config.key.clone(),
        node: config.node,
        read_ahead: config.read_ahead,
        read_ahead_max: config.read_ahead_max,
        busy_poll: config.busy_poll,
        server_timeout: config.server_timeout,
        max_sessions: config.max_sessions,
        linger: config.session_linger,
        io: config.io,
    };
    let (net_thread, net) = net::NetThread::open(settings, registry.clone(), stats.clone(), blob_tx, halt.clone())?;
    let listener = clones::Listener::bind(&config.socket)?;
    let listener_waker = Arc::new(Waker::new()?);
    tracing::info!(
        "daemon on {} (node {}), group {}:{}, clone socket {}, run directory {}",
        config.interface,
        config.node,
        config.group,
        config.port,
        config.socket.display(),
        config.run_dir.display()
    );
    let net_join = spawn("net", move || net_thread.run())?;
    let ctx = Arc::new(clones::CloneContext {
        settings: clones::CloneSettings {
            session_wait: config.session_wait,
            handoff_timeout: crate::handoff::DEFAULT_RECV_TIMEOUT,
        },
        registry: registry.clone(),
        net: net.clone(),
        stats: stats.clone(),
    });
    let listener_join = {
        let (waker, halt) = (listener_waker.clone(), halt.clone());
        spawn("listener", move || clones::run_listener(listener, ctx, waker, halt))?
    };
    let children_join = {
        let child_settings = children::ChildSettings {
            node: config.node,
            run_dir: config.run_dir.clone(),
            clone_exe: config.clone_exe.clone(),
            socket: config.socket.clone(),
        };
        let (stats, halt) = (stats.clone(), halt.clone());
        spawn("children", move || children::run_children(child_settings, blob_rx, stats, halt))?
    };

    // The main thread: stats, summary, and waiting for the stop signal or a failed network thread.
    let (mut last_write, mut last_summary) = (Instant::now(), Instant::now());
    while !stop.load(Ordering::SeqCst) && !net_join.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
        if last_write.elapsed() >= Duration::from_secs(1) {
            write_stats(&stats, config);
            last_write = Instant::now();
        }
        if last_summary.elapsed() >= config.summary_every {
            tracing::info!("{}", stats.summary_line());
            last_summary = Instant::now();
        }
    }

    let reason =
        if net_join.is_finished() { "the daemon's network side failed" } else { "the daemon is shutting down" };
    let handles = registry.shut_down(reason);
    for h in &handles {
        h.stop();
    }
    tracing::info!("stopping: {} clones failed and stopped ({reason})", handles.len());
    halt.store(true, Ordering::SeqCst);
    net.wake();
    listener_waker.wake();
    let net_result = net_join.join().map_err(|_| DaemonError::Panicked("net"))?;
    listener_join.join().map_err(|_| DaemonError::Panicked("listener"))?;
    children_join.join().map_err(|_| DaemonError::Panicked("children"))?;
    write_stats(&stats, config);
    tracing::info!("final: {}", stats.summary_line());
    if registry.clone_count() > 0 {
        tracing::warn!("{} clones were still registered at exit", registry.clone_count());
    }
    net_result?;
    Ok(DaemonReport { snapshot: stats.snapshot() })
}

fn write_stats(stats: &DaemonStats, config: &DaemonConfig) {
    if let Some(path) = &config.stats_json {
        if let Err(e) = stats.write(path) {
            tracing::warn!("{e}");
        }
    }
}
