//! The daemon's counters and histograms, readable while it runs: a JSON snapshot rewritten
//! atomically (temporary file, then rename) and a one-line summary for the log.
//!
//! Latency is measured per fault, from reading it off the userfaultfd to installing its page, and
//! kept in two `hdrhistogram`s: cache hits and faults that waited for the network. A third histogram
//! holds the pages asked for per Request datagram (faulting pages plus read-ahead).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use spindrift_protocol::receiver::ReceiverStats;

use crate::fault_server::{FaultObserver, ServerStats};

/// Finished clones kept in the snapshot.
const FINISHED_KEPT: usize = 64;
/// Largest latency recorded (longer ones are clamped): 10 minutes, in nanoseconds.
const MAX_LATENCY_NS: u64 = 600_000_000_000;

/// Errors writing the stats file.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The snapshot could not be encoded.
    #[error("encoding the stats snapshot: {0}")]
    Encode(#[from] serde_json::Error),
    /// Writing or renaming the file failed.
    #[error("writing the stats file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Counters of the daemon as a whole.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) handoffs_accepted: AtomicU64,
    pub(crate) handoffs_refused: AtomicU64,
    pub(crate) clones_finished: AtomicU64,
    pub(crate) report_lines: AtomicU64,
    pub(crate) bad_lines: AtomicU64,
    pub(crate) sessions_refused: AtomicU64,
    pub(crate) datagrams_unknown_session: AtomicU64,
    pub(crate) datagrams_malformed: AtomicU64,
    pub(crate) datagrams_from_hosts: AtomicU64,
    pub(crate) announces_unauthenticated: AtomicU64,
    pub(crate) pages_faulted_to_network: AtomicU64,
    pub(crate) blobs_received: AtomicU64,
    pub(crate) fork_plans_bad: AtomicU64,
    pub(crate) fork_plans_for_us: AtomicU64,
    pub(crate) children_spawned: AtomicU64,
    pub(crate) children_spawn_failed: AtomicU64,
    pub(crate) children_exited_ok: AtomicU64,
    pub(crate) children_exited_failed: AtomicU64,
    pub(crate) sink_errors: AtomicU64,
}

/// What the network thread publishes about one session.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SessionSnapshot {
    pub(crate) session: u64,
    pub(crate) server: String,
    pub(crate) epoch: u32,
    pub(crate) pages: u32,
    pub(crate) pages_present: u64,
    pub(crate) lost: bool,
    pub(crate) ended: bool,
    pub(crate) restarts: u64,
    pub(crate) faults_forwarded: u64,
    pub(crate) requests: u64,
    pub(crate) naks: u64,
    pub(crate) receiver: ReceiverStats,
}

/// Who a clone is: fixed at its handoff, shown as is in the snapshot.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CloneIdentity {
    pub(crate) conn: u64,
    pub(crate) session: u64,
    pub(crate) clone_id: Option<u64>,
    pub(crate) fork: Option<u32>,
    pub(crate) pid: Option<i32>,
    pub(crate) format: &'static str,
}

/// Per-clone counters, shared with the clone's fault observer.
#[derive(Debug)]
pub(crate) struct CloneCounters {
    pub(crate) id: CloneIdentity,
    pub(crate) hits: AtomicU64,
    pub(crate) fetched: AtomicU64,
    started: Instant,
}

/// One clone in the snapshot.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CloneSnapshot {
    #[serde(flatten)]
    pub(crate) id: CloneIdentity,
    pub(crate) cache_hits: u64,
    pub(crate) network_faults: u64,
    pub(crate) seconds: f64,
    pub(crate) finished: Option<String>,
    pub(crate) pages_copied: u64,
    pub(crate) pages_zeroed: u64,
    pub(crate) poisoned: u64,
    pub(crate) faults: u64,
    /// Shared-cache clones: faults answered with a wake-up alone.
    pub(crate) pages_woken: u64,
}

impl CloneCounters {
    fn snapshot(&self, finished: Option<(&str, &ServerStats)>) -> CloneSnapshot {
        let s = finished.map(|(_, s)| s.clone()).unwrap_or_default();
        CloneSnapshot {
            id: self.id.clone(),
            cache_hits: self.hits.load(Ordering::Relaxed),
            network_faults: self.fetched.load(Ordering::Relaxed),
            seconds: self.started.elapsed().as_secs_f64(),
            finished: finished.map(|(why, _)| why.to_string()),
            pages_copied: s.pages_copied,
            pages_zeroed: s.pages_zeroed,
            poisoned: s.poisoned,
            faults: s.faults,
            pages_woken: s.pages_woken,
        }
    }
}

struct Histograms {
    hits: Histogram<u64>,
    fetched: Histogram<u64>,
    pages_per_request: Histogram<u64>,
}

/// Everything the stats file shows; shared by all the daemon's threads.
pub(crate) struct DaemonStats {
    pub(crate) counters: Counters,
    node: u32,
    io: OnceLock<String>,
    io_counters: Mutex<Option<String>>,
    started: Instant,
    histograms: Mutex<Histograms>,
    sessions: Mutex<BTreeMap<u64, SessionSnapshot>>,
    active: Mutex<BTreeMap<u64, Arc<CloneCounters>>>,
    finished: Mutex<VecDeque<CloneSnapshot>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn histogram(high: u64) -> Histogram<u64> {
    // Bounds and precision are constants that hdrhistogram accepts (high >= 2, 3 significant digits).
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, high, 3).expect("constant histogram bounds are valid")
}

impl DaemonStats {
    pub(crate) fn new(node: u32) -> DaemonStats {
        DaemonStats {
            counters: Counters::default(),
            node,
            io: OnceLock::new(),
            io_counters: Mutex::new(None),
            started: Instant::now(),
            histograms: Mutex::new(Histograms {
                hits: histogram(MAX_LATENCY_NS),
                fetched: histogram(MAX_LATENCY_NS),
                pages_per_request: histogram(1 << 20),
            }),
            sessions: Mutex::new(BTreeMap::new()),
            active: Mutex::new(BTreeMap::new()),
            finished: Mutex::new(VecDeque::new()),
        }
    }

    /// Records the packet I/O backend in use (its [`netio::Capabilities::summary`]).
    pub(crate) fn set_io(&self, io: String) {
        let _ = self.io.set(io);
    }

    /// Records the packet I/O backend's latest counters ([`netio::PacketIo::counters`]).
    pub(crate) fn set_io_counters(&self, counters: String) {
        *lock(&self.io_counters) = Some(counters);
    }

    /// Counts one: `DaemonStats::bump(&stats.counters.x)`.
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A Request datagram left asking for `pages` pages.
    pub(crate) fn record_request(&self, pages: u64) {
        lock(&self.histograms).pages_per_request.saturating_record(pages.max(1));
    }

    /// Replaces the network thread's view of its sessions.
    pub(crate) fn publish_sessions(&self, sessions: Vec<SessionSnapshot>) {
        *lock(&self.sessions) = sessions.into_iter().map(|s| (s.session, s)).collect();
    }

    /// A clone was accepted: its counters, and the observer its fault server reports to.
    pub(crate) fn clone_started(
        self: &Arc<Self>,
        conn: u64,
        session: u64,
        clone_id: Option<u64>,
        fork: Option<u32>,
        pid: Option<i32>,
        format: &'static str,
    ) -> Arc<CloneObserver> {
        let counters = Arc::new(CloneCounters {
            id: CloneIdentity { conn, session, clone_id, fork, pid, format },
            hits: AtomicU64::new(0),
            fetched: AtomicU64::new(0),
            started: Instant::now(),
        });
        lock(&self.active).insert(conn, counters.clone());
        Arc::new(CloneObserver { stats: self.clone(), counters })
    }

    /// A clone's fault server stopped (`why`), with its final counters.
    pub(crate) fn clone_finished(&self, conn: u64, why: &str, server: &ServerStats) {
        Self::bump(&self.counters.clones_finished);
        let Some(c) = lock(&self.active).remove(&conn) else { return };
        let mut finished = lock(&self.finished);
        if finished.len() >= FINISHED_KEPT {
            finished.pop_front();
        }
        finished.push_back(c.snapshot(Some((why, server))));
    }

    /// The snapshot as JSON.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let h = lock(&self.histograms);
        let mut clones: Vec<CloneSnapshot> = lock(&self.finished).iter().cloned().collect();
        clones.extend(lock(&self.active).values().map(|c| c.snapshot(None)));
        Snapshot {
            node: self.node,
            io: self.io.get().cloned().unwrap_or_default(),
            io_counters: lock(&self.io_counters).clone(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            counters: CounterSnapshot {
                handoffs_accepted: get(&c.handoffs_accepted),
                handoffs_refused: get(&c.handoffs_refused),
                clones_active: lock(&self.active).len() as u64,
                clones_finished: get(&c.clones_finished),
                report_lines: get(&c.report_lines),
                bad_lines: get(&c.bad_lines),
                sessions_refused: get(&c.sessions_refused),
                datagrams_unknown_session: get(&c.datagrams_unknown_session),
                datagrams_malformed: get(&c.datagrams_malformed),
                datagrams_from_hosts: get(&c.datagrams_from_hosts),
                announces_unauthenticated: get(&c.announces_unauthenticated),
                pages_faulted_to_network: get(&c.pages_faulted_to_network),
                blobs_received: get(&c.blobs_received),
                fork_plans_bad: get(&c.fork_plans_bad),
                fork_plans_for_us: get(&c.fork_plans_for_us),
                children_spawned: get(&c.children_spawned),
                children_spawn_failed: get(&c.children_spawn_failed),
                children_exited_ok: get(&c.children_exited_ok),
                children_exited_failed: get(&c.children_exited_failed),
                sink_errors: get(&c.sink_errors),
            },
            sessions: lock(&self.sessions).values().cloned().collect(),
            latency_us: LatencySnapshot {
                cache_hit: Summary::of(&h.hits, 1e-3),
                network: Summary::of(&h.fetched, 1e-3),
            },
            pages_per_request: Summary::of(&h.pages_per_request, 1.0),
            clones,
        }
    }

    /// Writes the snapshot to `path` atomically.
    pub(crate) fn write(&self, path: &Path) -> Result<(), StatsError> {
        let json = serde_json::to_vec_pretty(&self.snapshot())?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let err = |source| StatsError::Write { path: path.to_path_buf(), source };
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&json).map_err(err)?;
        f.write_all(b"\n").map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// One line for the log.
    pub(crate) fn summary_line(&self) -> String {
        let s = self.snapshot();
        let present: u64 = s.sessions.iter().map(|x| x.pages_present).sum();
        let requests: u64 = s.sessions.iter().map(|x| x.requests).sum();
        let naks: u64 = s.sessions.iter().map(|x| x.naks).sum();
        format!(
            "{} sessions ({} pages cached), {} clones active, {} finished; faults: {} cache hits (p99 {:.0} us), \
             {} network (p50 {:.0} us, p99 {:.0} us); {} requests ({:.1} pages each), {} NAKs",
            s.sessions.len(),
            present,
            s.counters.clones_active,
            s.counters.clones_finished,
            s.latency_us.cache_hit.count,
            s.latency_us.cache_hit.p99,
            s.latency_us.network.count,
            s.latency_us.network.p50,
            s.latency_us.network.p99,
            requests,
            s.pages_per_request.mean,
            naks
        )
    }
}

/// Reports each fault's latency to the daemon's histograms and the clone's counters.
#[derive(Debug)]
pub(crate) struct CloneObserver {
    stats: Arc<DaemonStats>,
    counters: Arc<CloneCounters>,
}

impl std::fmt::Debug for DaemonStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonStats").field("node", &self.node).finish_non_exhaustive()
    }
}

impl FaultObserver for CloneObserver {
    fn fault_served(&self, latency: Duration, fetched: bool) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).clamp(1, MAX_LATENCY_NS);
        let mut h = lock(&self.stats.histograms);
        if fetched {
            h.fetched.saturating_record(ns);
            self.counters.fetched.fetch_add(1, Ordering::Relaxed);
        } else {
            h.hits.saturating_record(ns);
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The stats file's content.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// This daemon's node id.
    pub node: u32,
    /// The packet I/O backend in use, e.g. `af_xdp, copy mode` or `udp`.
    pub io: String,
    /// The backend's own drop counters, for backends that keep them (AF_XDP).
    pub io_counters: Option<String>,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// Daemon-wide counters.
    pub counters: CounterSnapshot,
    /// Per session.
    pub(crate) sessions: Vec<SessionSnapshot>,
    /// Fault-service latency, microseconds.
    pub latency_us: LatencySnapshot,
    /// Pages per Request datagram.
    pub pages_per_request: Summary,
    /// Active clones and the last finished ones.
    clones: Vec<CloneSnapshot>,
}

/// Daemon-wide counters.
#[derive(Debug, Clone, Serialize)]
pub struct CounterSnapshot {
    /// Handoffs that became fault servers.
    pub handoffs_accepted: u64,
    /// Handoffs refused (malformed, unknown session, bad regions).
    pub handoffs_refused: u64,
    /// Clones being served.
    pub clones_active: u64,
    /// Clones whose fault server stopped.
    pub clones_finished: u64,
    /// Report lines passed to the protocol.
    pub report_lines: u64,
    /// Lines from clones that were not valid reports.
    pub bad_lines: u64,
    /// Sessions refused (limit reached, unusable parameters).
    pub sessions_refused: u64,
    /// Datagrams of sessions the daemon does not follow.
    pub datagrams_unknown_session: u64,
    /// Datagrams without a valid header.
    pub datagrams_malformed: u64,
    /// Datagrams from other hosts (not the server).
    pub datagrams_from_hosts: u64,
    /// Announces of new sessions that failed authentication.
    pub announces_unauthenticated: u64,
    /// Missing pages passed to the protocol as faults.
    pub pages_faulted_to_network: u64,
    /// Blobs (descriptors, fork plans) received.
    pub blobs_received: u64,
    /// Fork plans that did not decode.
    pub fork_plans_bad: u64,
    /// Fork plans with an entry for this node.
    pub fork_plans_for_us: u64,
    /// Clone processes started.
    pub children_spawned: u64,
    /// Clone processes that could not be started.
    pub children_spawn_failed: u64,
    /// Clone processes that exited with status 0.
    pub children_exited_ok: u64,
    /// Clone processes that failed or were killed.
    pub children_exited_failed: u64,
    /// Pages the cache refused.
    pub sink_errors: u64,
}

/// Latency histograms.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySnapshot {
    /// Faults answered from the cache.
    pub cache_hit: Summary,
    /// Faults that waited for the network.
    pub network: Summary,
}

/// A histogram's summary.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Summary {
    fn of(h: &Histogram<u64>, scale: f64) -> Summary {
        let q = |q: f64| h.value_at_quantile(q) as f64 * scale;
        Summary {
            count: h.len(),
            mean: h.mean() * scale,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            max: h.max() as f64 * scale,
        }
    }
}
