//! Clone processes started by fork plans.
//!
//! Blobs arrive from the network thread. A descriptor blob is kept and written to
//! `<run-dir>/<session>/descriptor-<id>.bin`; a fork plan ([`ForkPlan`]) whose entry names this
//! daemon's node starts one process per clone id, once the descriptor the plan names is here:
//!
//! ```text
//! <clone-exe> clone --descriptor <file> --session <S> --fork <F> --clone-id <I>
//!             --daemon-socket <socket> --out-json <run-dir>/<S>/clone-<I>.json
//! ```
//!
//! with stdout and stderr in `<run-dir>/<S>/clone-<I>.log`. Children are reaped as they exit and
//! their statuses logged and counted; at shutdown the ones still running get SIGTERM, then SIGKILL.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as ChannelRx, RecvTimeoutError};
use spindrift_protocol::wire::{BlobKind, ForkPlan, NodeId};

use super::net::BlobEvent;
use super::stats::DaemonStats;

/// How often children are reaped.
const REAP_EVERY: Duration = Duration::from_millis(200);
/// How long children get between SIGTERM and SIGKILL at shutdown.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// How clones are started.
#[derive(Debug, Clone)]
pub(crate) struct ChildSettings {
    pub(crate) node: u32,
    pub(crate) run_dir: PathBuf,
    pub(crate) clone_exe: PathBuf,
    pub(crate) socket: PathBuf,
}

/// The default clone program: `spindrift-vmm` next to this executable, else on `PATH`.
pub(crate) fn default_clone_exe() -> PathBuf {
    let beside = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join("spindrift-vmm")));
    match beside {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("spindrift-vmm"),
    }
}

struct Running {
    child: Child,
    session: u64,
    fork: u32,
    clone: u32,
}

/// The children thread's state.
struct Children {
    settings: ChildSettings,
    stats: Arc<DaemonStats>,
    descriptors: HashMap<(u64, u32), PathBuf>,
    /// Plans waiting for their descriptor: (session, plan, first clone, clones).
    pending: Vec<(u64, ForkPlan, u32, u32)>,
    forks_started: HashSet<(u64, u32)>,
    running: Vec<Running>,
}

/// Handles blobs and reaps children until `stop` is set, then ends the children still running.
pub(crate) fn run_children(
    settings: ChildSettings,
    blobs: ChannelRx<BlobEvent>,
    stats: Arc<DaemonStats>,
    stop: Arc<AtomicBool>,
) {
    let mut c = Children {
        settings,
        stats,
        descriptors: HashMap::new(),
        pending: Vec::new(),
        forks_started: HashSet::new(),
        running: Vec::new(),
    };
    while !stop.load(Ordering::SeqCst) {
        match blobs.recv_timeout(REAP_EVERY) {
            Ok(blob) => c.on_blob(blob),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(REAP_EVERY),
        }
        c.reap();
    }
    c.terminate();
}

impl Children {
    fn session_dir(&self, session: u64) -> PathBuf {
        self.settings.run_dir.join(session.to_string())
    }

    fn on_blob(&mut self, blob: BlobEvent) {
        match blob.kind {
            BlobKind::Descriptor => self.on_descriptor(blob.session, blob.id, &blob.bytes),
            BlobKind::Fork => self.on_plan(blob.session, &blob.bytes),
        }
    }

    fn on_descriptor(&mut self, session: u64, id: u32, bytes: &[u8]) {
        let dir = self.session_dir(session);
        let path = dir.join(format!("descriptor-{id}.bin"));
        if let Err(e) = write_atomically(&dir, &path, bytes) {
            tracing::error!("session {session}: cannot store descriptor {id} at {}: {e}", path.display());
            return;
        }
        tracing::info!("session {session}: descriptor {id} stored at {} ({} bytes)", path.display(), bytes.len());
        self.descriptors.insert((session, id), path);
        let (ready, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(|(s, p, _, _)| *s == session && p.descriptor == id);
        self.pending = waiting;
        for (session, plan, first, count) in ready {
            self.start_clones(session, &plan, first, count);
        }
    }

    fn on_plan(&mut self, session: u64, bytes: &[u8]) {
        let plan = match ForkPlan::decode(bytes) {
            Ok(p) => p,
            Err(e) => {
                DaemonStats::bump(&self.stats.counters.fork_plans_bad);
                tracing::warn!("session {session}: invalid fork plan ignored: {e}");
                return;
            }
        };
        let node = NodeId(self.settings.node);
        let Some(entry) = plan.entries.iter().find(|e| e.node == node).copied() else {
            tracing::info!("session {session}: fork {} starts no clones on node {}", plan.fork, node.0);
            return;
        };
        if !self.forks_started.insert((session, plan.fork)) {
            tracing::debug!("session {session}: fork {} seen again; its clones were started already", plan.fork);
            return;
        }
        DaemonStats::bump(&self.stats.counters.fork_plans_for_us);
        if self.descriptors.contains_key(&(session, plan.descriptor)) {
            self.start_clones(session, &plan, entry.first_clone, entry.clones);
        } else {
            tracing::info!(
                "session {session}: fork {} ({} clones here) waits for descriptor {}",
                plan.fork,
                entry.clones,
                plan.descriptor
            );
            self.pending.push((session, plan, entry.first_clone, entry.clones));
        }
    }

    fn start_clones(&mut self, session: u64, plan: &ForkPlan, first: u32, count: u32) {
        let Some(descriptor) = self.descriptors.get(&(session, plan.descriptor)).cloned() else { return };
        let dir = self.session_dir(session);
        tracing::info!(
            "session {session}: fork {} starts clones {first}..{} with {}",
            plan.fork,
            u64::from(first) + u64::from(count),
            self.settings.clone_exe.display()
        );
        for clone in first..first.saturating_add(count) {
            match self.spawn(&dir, &descriptor, session, plan.fork, clone) {
                Ok(child) => {
                    DaemonStats::bump(&self.stats.counters.children_spawned);
                    tracing::info!(
                        "session {session}: clone {clone} of fork {} started, pid {}",
                        plan.fork,
                        child.id()
                    );
                    self.running.push(Running { child, session, fork: plan.fork, clone });
                }
                Err(e) => {
                    DaemonStats::bump(&self.stats.counters.children_spawn_failed);
                    tracing::error!(
                        "session {session}: cannot start clone {clone} of fork {} with {}: {e}",
                        plan.fork,
                        self.settings.clone_exe.display()
                    );
                }
            }
        }
    }

    fn spawn(&self, dir: &Path, descriptor: &Path, session: u64, fork: u32, clone: u32) -> std::io::Result<Child> {
        let log = std::fs::File::create(dir.join(format!("clone-{clone}.log")))?;
        Command::new(&self.settings.clone_exe)
            .arg("clone")
            .arg("--descriptor")
            .arg(descriptor)
            .args(["--session", &session.to_string(), "--fork", &fork.to_string(), "--clone-id", &clone.to_string()])
            .arg("--daemon-socket")
            .arg(&self.settings.socket)
            .arg("--out-json")
            .arg(dir.join(format!("clone-{clone}.json")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
    }

    fn reap(&mut self) {
        let stats = &self.stats;
        self.running.retain_mut(|r| match r.child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                if status.success() {
                    DaemonStats::bump(&stats.counters.children_exited_ok);
                    tracing::info!("session {}: clone {} of fork {} exited: {status}", r.session, r.clone, r.fork);
                } else {
                    DaemonStats::bump(&stats.counters.children_exited_failed);
                    tracing::warn!("session {}: clone {} of fork {} failed: {status}", r.session, r.clone, r.fork);
                }
                false
            }
            Err(e) => {
                tracing::error!("session {}: waiting for clone {}: {e}", r.session, r.clone);
                false
            }
        });
    }

    fn terminate(&mut self) {
        if self.running.is_empty() {
            return;
        }
        tracing::info!("stopping {} clone processes", self.running.len());
        for r in &self.running {
            if let Ok(pid) = libc::pid_t::try_from(r.child.id()) {
                // SAFETY: kill(2) with a pid of our own child that has not been reaped yet (so the pid
                // cannot have been reused) and a valid signal number.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + TERM_GRACE;
        while !self.running.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            self.reap();
        }
        for r in &mut self.running {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        self.running.clear();
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
