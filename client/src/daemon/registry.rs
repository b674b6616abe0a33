//! [`Registry`]: the sessions the daemon knows, shared between the network thread (which discovers
//! sessions and learns when their server is lost) and the clone threads (which look up the page cache
//! of the session a handoff names and register their fault servers, so a lost server fails them).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::cache::PageCache;
use crate::fault_server::ServerHandle;

/// Why a handoff found no session to serve it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The session the handoff named was not announced in time.
    #[error("session {session} was not announced by any server within {waited:?}")]
    Unknown {
        /// The session asked for.
        session: u64,
        /// How long the handoff waited.
        waited: Duration,
    },
    /// A handoff without a session (Firecracker's format) came when no session was known.
    #[error("no session was announced within {waited:?}, and the handoff names none")]
    NoSession {
        /// How long the handoff waited.
        waited: Duration,
    },
    /// A handoff without a session came while several sessions were known.
    #[error("the handoff names no session and {count} sessions are known: name one (spindrift's format)")]
    Ambiguous {
        /// Sessions known.
        count: usize,
    },
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// One session as the clone threads see it.
struct Entry {
    cache: Arc<PageCache>,
    /// The network side retired the session: the entry goes with its last clone.
    retired: bool,
    /// Why the session's faults fail (server lost, session ended), while that holds.
    failed: Option<String>,
    /// The fault servers of its clones, by the daemon's connection number.
    clones: HashMap<u64, ServerHandle>,
}

#[derive(Default)]
struct Inner {
    sessions: BTreeMap<u64, Entry>,
    shutting_down: Option<String>,
}

/// The daemon's sessions. See the module docs.
#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    changed: Condvar,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A newly discovered session and its cache; wakes handoffs waiting for it.
    pub(crate) fn add_session(&self, session: u64, cache: Arc<PageCache>) {
        let mut inner = self.lock();
        match inner.sessions.get_mut(&session) {
            // A retired session that clones still hold, started again: new clones get the new cache.
            Some(e) => {
                e.cache = cache;
                e.retired = false;
                e.failed = None;
            }
            None => {
                inner.sessions.insert(session, Entry { cache, retired: false, failed: None, clones: HashMap::new() });
            }
        }
        drop(inner);
        self.changed.notify_all();
    }

    /// The session `wanted` names (or the only session, for `None`), waiting up to `wait` for it
    /// to be announced.
    pub(crate) fn wait_for(&self, wanted: Option<u64>, wait: Duration) -> Result<(u64, Arc<PageCache>), LookupError> {
        let deadline = Instant::now() + wait;
        let mut inner = self.lock();
        loop {
            if inner.shutting_down.is_some() {
                return Err(LookupError::ShuttingDown);
            }
            match wanted {
                Some(id) => {
                    if let Some(e) = inner.sessions.get(&id).filter(|e| !e.retired) {
                        return Ok((id, e.cache.clone()));
                    }
                }
                None => {
                    let mut live = inner.sessions.iter().filter(|(_, e)| !e.retired);
                    match (live.next(), live.count()) {
                        (None, _) => {}
                        (Some((&id, e)), 0) => return Ok((id, e.cache.clone())),
                        (Some(_), more) => return Err(LookupError::Ambiguous { count: more + 1 }),
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(match wanted {
                    Some(session) => LookupError::Unknown { session, waited: wait },
                    None => LookupError::NoSession { waited: wait },
                });
            }
            inner = self.changed.wait_timeout(inner, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Registers a clone's fault server. If the session's faults are failing already (or the daemon
    /// is stopping), the server is failed at once, under the same lock that failing takes, so no
    /// clone slips between a failure and its registration.
    pub(crate) fn attach(&self, session: u64, clone: u64, handle: ServerHandle) {
        let mut inner = self.lock();
        let stopping = inner.shutting_down.clone();
        let Some(entry) = inner.sessions.get_mut(&session) else {
            handle.fail(format!("session {session} is gone"));
            return;
        };
        if let Some(reason) = stopping.clone().or_else(|| entry.failed.clone()) {
            handle.fail(reason);
        }
        if stopping.is_some() {
            handle.stop();
        }
        entry.clones.insert(clone, handle);
    }

    /// Forgets a clone whose server stopped (and a retired session with its last clone).
    pub(crate) fn detach(&self, session: u64, clone: u64) {
        let mut inner = self.lock();
        if let Some(entry) = inner.sessions.get_mut(&session) {
            entry.clones.remove(&clone);
            if entry.retired && entry.clones.is_empty() {
                inner.sessions.remove(&session);
            }
        }
    }

    /// The network side retired the session (it ended and no clone used it): it goes now, or with
    /// its last clone if one attached since, and its cache with it. Handoffs no longer find it.
    pub(crate) fn retire(&self, session: u64) {
        let mut inner = self.lock();
        if let Some(entry) = inner.sessions.get_mut(&session) {
            if entry.clones.is_empty() {
                inner.sessions.remove(&session);
            } else {
                entry.retired = true;
            }
        }
    }

    /// The sessions some clone uses now.
    pub(crate) fn sessions_in_use(&self) -> BTreeSet<u64> {
        self.lock().sessions.iter().filter(|(_, e)| !e.clones.is_empty()).map(|(&id, _)| id).collect()
    }

    /// Sessions known now (retired ones that clones still hold included).
    #[cfg(test)]
    pub(crate) fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Fails every waiting and later fault of the session's clones, and of clones that arrive until
    /// [`Registry::recover`]. Returns how many clones were failed.
    pub(crate) fn fail_session(&self, session: u64, reason: &str) -> usize {
        let mut inner = self.lock();
        let Some(entry) = inner.sessions.get_mut(&session) else { return 0 };
        entry.failed = Some(reason.to_string());
        for handle in entry.clones.values() {
            handle.fail(reason);
        }
        entry.clones.len()
    }

    /// The session's server is back: clones that arrive from now on are served again (those failed
    /// stay failed).
    pub(crate) fn recover(&self, session: u64) {
        if let Some(entry) = self.lock().sessions.get_mut(&session) {
            entry.failed = None;
        }
    }

    /// Whether the session's faults are failing now.
    #[cfg(test)]
    pub(crate) fn is_failed(&self, session: u64) -> bool {
        self.lock().sessions.get(&session).is_some_and(|e| e.failed.is_some())
    }

    /// Daemon shutdown: fails every clone's waiting and later faults, refuses new handoffs and wakes
    /// the handoffs waiting for a session. Returns the fault servers, to be stopped.
    pub(crate) fn shut_down(&self, reason: &str) -> Vec<ServerHandle> {
        let mut inner = self.lock();
        inner.shutting_down = Some(reason.to_string());
        let handles: Vec<ServerHandle> = inner.sessions.values().flat_map(|e| e.clones.values().cloned()).collect();
        for h in &handles {
            h.fail(reason);
        }
        drop(inner);
        self.changed.notify_all();
        handles
    }

    /// Clones registered now, over all sessions.
    pub(crate) fn clone_count(&self) -> usize {
        self.lock().sessions.values().map(|e| e.clones.len()).sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lookups_wait_for_sessions_and_refuse_ambiguity() {
        let r = Arc::new(Registry::default());
        let short = Duration::from_millis(20);
        assert_eq!(r.wait_for(Some(5), short).unwrap_err(), LookupError::Unknown { session: 5, waited: short });
        assert_eq!(r.wait_for(None, short).unwrap_err(), LookupError::NoSession { waited: short });
        let cache = Arc::new(PageCache::new(4096).unwrap());
        let waiter = {
            let r = r.clone();
            std::thread::spawn(move || r.wait_for(Some(5), Duration::from_secs(10)).map(|(id, _)| id))
        };
        r.add_session(5, cache.clone());
        assert_eq!(waiter.join().unwrap(), Ok(5));
        assert_eq!(r.wait_for(None, short).unwrap().0, 5);
        r.add_session(6, cache);
        assert_eq!(r.wait_for(None, short).unwrap_err(), LookupError::Ambiguous { count: 2 });
        r.fail_session(6, "lost");
        assert!(r.is_failed(6) && !r.is_failed(5));
        r.recover(6);
        assert!(!r.is_failed(6));
        r.shut_down("bye");
        assert_eq!(r.wait_for(Some(5), short).unwrap_err(), LookupError::ShuttingDown);
    }

    #[test]
    fn retired_sessions_go_and_are_not_found() {
        let r = Registry::default();
        let short = Duration::from_millis(10);
        let cache = Arc::new(PageCache::new(4096).unwrap());
        r.add_session(1, cache.clone());
        r.add_session(2, cache.clone());
        assert!(r.sessions_in_use().is_empty());
        r.retire(1);
        assert_eq!(r.session_count(), 1, "a retired session without clones goes at once");
        assert_eq!(r.wait_for(Some(1), short).unwrap_err(), LookupError::Unknown { session: 1, waited: short });
        assert_eq!(r.wait_for(None, short).unwrap().0, 2, "only the live session is left to pick");
        r.add_session(1, cache);
        assert_eq!(r.wait_for(Some(1), short).unwrap().0, 1, "a session started again is found again");
    }
}
