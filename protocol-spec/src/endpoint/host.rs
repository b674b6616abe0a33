//! [`HostEndpoint`]: every session a host follows, behind one datagram entry point.
//!
//! The host daemon hands the endpoint every datagram it receives and every fault and report its
//! clones raise; the endpoint routes each by session, and decides every protocol matter on the way:
//!
//! * **Discovery.** An Announce of an unknown session is authenticated (once: the new session's
//!   receiver takes the opened datagram) and, if the host can follow it, creates the session. The
//!   owner's `open` callback makes the session's [`PageSink`] (its page cache); a refusal is counted
//!   and reported as [`HostEvent::Refused`], and asked again at the next Announce.
//! * **Routing.** Every later datagram goes to its session's [`Receiver`], which authenticates it.
//!   The server's address is the source of the session's latest authentic datagram.
//! * **Epochs.** A restarted server (a larger epoch) is followed inside the same receiver: wants,
//!   reports and cached pages are kept, also when the session had ended or its server was lost.
//! * **Endings.** A session ends when its server sends End, when its server is lost, or when it is
//!   idle past [`HostConfig::idle_limit`]. An ended session whose clones are gone ([`HostEndpoint::set_in_use`])
//!   lingers for [`HostConfig::linger`] (its server may start it again) and is then retired
//!   ([`HostEvent::Retired`]): its sink is dropped and the owner frees its cache. A retired session
//!   is remembered with its epoch, so a stray Announce of that epoch does not create it again.
//! * **Limits.** At most [`HostConfig::max_sessions`] sessions are *live* (not ended, or still used
//!   by clones). A new session at the limit retires the longest-ended unused one first; only if
//!   every session is live is it refused.
//!
//! Outputs are pulled as in quinn-proto: [`HostEndpoint::poll_transmit`] writes the next datagram
//! into the caller's buffer and says where it goes, [`HostEndpoint::poll_event`] drains events, and
//! [`HostEndpoint::poll_timeout`] says when to call [`HostEndpoint::handle_timeout`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddrV4;
use std::ops::Bound;
use std::time::Duration;

use crate::receiver::{ConfigError, PageSink, Receiver, ReceiverConfig, ReceiverEvent, ReceiverStats, DEFAULT_WINDOW};
use crate::wire::{self, BlobKind, Header, Keys, Message, MsgType, NodeId, SessionId, SessionKey};
use crate::Time;

/// Retired sessions remembered (with their epoch) against stray Announces.
const RETIRED_KEPT: usize = 4096;
/// Refused session ids remembered, so each refusal is reported once.
const REFUSED_KEPT: usize = 1024;

/// How a host endpoint is set up.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// This host's node id (non-zero, unique within each session).
    pub node: NodeId,
    /// The group key every session's keys derive from.
    pub key: SessionKey,
    /// The page size the host serves (log2); sessions of another page size are refused.
    pub page_shift: u8,
    /// Pages read ahead after each fault.
    pub read_ahead: u16,
    /// The window a sequential reader's read-ahead grows to (see [`ReceiverConfig::read_ahead_max`];
    /// 0: fixed).
    pub read_ahead_max: u16,
    /// A server silent this long while faults wait is declared lost.
    pub server_timeout: Duration,
    /// The receivers' flow-control window (see [`ReceiverConfig::window`]).
    pub window: u32,
    /// Sessions live at once (see the module docs).
    pub max_sessions: usize,
    /// How long an ended session with no clone is kept for its server to start it again.
    pub linger: Duration,
    /// A live session whose server has sent nothing authentic for this long, and that no clone
    /// uses, is retired (a server that vanished without End while no fault waited).
    pub idle_limit: Duration,
    /// The first packet number of the endpoint's first session (see
    /// [`ids::packet_number_base`](super::ids::packet_number_base)); a session created at time `t`
    /// starts `t` in microseconds above it, so numbers never repeat across sessions or restarts.
    pub first_packet_number: u64,
    /// Seed for the receivers' randomness (mixed with each session id).
    pub seed: u64,
}

impl HostConfig {
    /// A configuration with the daemon's defaults: read-ahead 16, 3 s server timeout, 8 live
    /// sessions, a 30 s linger and a 10 minute idle limit.
    pub fn new(node: NodeId, key: SessionKey, page_shift: u8) -> HostConfig {
        HostConfig {
            node,
            key,
            page_shift,
            read_ahead: 16,
            read_ahead_max: 0,
            server_timeout: Duration::from_secs(3),
            window: DEFAULT_WINDOW,
            max_sessions: 8,
            linger: Duration::from_secs(30),
            idle_limit: Duration::from_secs(600),
            first_packet_number: 1,
            seed: u64::from(node.0),
        }
    }
}

/// What a newly announced session is, for the owner's `open` callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session.
    pub session: SessionId,
    /// The server's address (the Announce's source).
    pub server: SocketAddrV4,
    /// The server's epoch.
    pub epoch: u32,
    /// Pages in the image.
    pub page_count: u32,
    /// log2 of the page size.
    pub page_shift: u8,
    /// The id of the session's VM descriptor blob (0: none).
    pub descriptor: u32,
}

/// Why a session was retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetireReason {
    /// Its server ended it, and it lingered unused.
    Ended,
    /// Its server was lost, and it lingered unused.
    ServerLost,
    /// Its server sent nothing authentic for the idle limit, and no clone used it.
    Idle,
    /// Room was needed for a new session, and it had ended and was unused.
    Evicted,
}

/// Things the endpoint tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// A session was discovered and is followed from now on.
    Started(SessionInfo),
    /// An authentic Announce of a session the host cannot follow now (asked again at its next
    /// Announce). Reported once per session id.
    Refused {
        /// The session.
        session: SessionId,
        /// Why, for the log.
        reason: String,
    },
    /// The session's server is now at another address.
    ServerMoved {
        /// The session.
        session: SessionId,
        /// The old address.
        from: SocketAddrV4,
        /// The new address.
        to: SocketAddrV4,
    },
    /// The server restarted the session (a new epoch); waiting pages were asked again. Clears an
    /// earlier `Ended` or `ServerLost`.
    Restarted {
        /// The session.
        session: SessionId,
        /// The new epoch.
        epoch: u32,
    },
    /// A blob (VM descriptor, fork plan) of the session arrived whole.
    Blob {
        /// The session.
        session: SessionId,
        /// Its kind.
        kind: BlobKind,
        /// Its id.
        id: u32,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// The server ended the session: faults that need the network fail.
    Ended(SessionId),
    /// The server was silent past the timeout while faults waited: they fail.
    ServerLost(SessionId),
    /// A lost server was heard again: new faults are served again.
    ServerBack(SessionId),
    /// The session is gone from the endpoint: its sink was dropped, and its cache can go.
    Retired {
        /// The session.
        session: SessionId,
        /// Why.
        reason: RetireReason,
    },
}

/// A datagram [`HostEndpoint::poll_transmit`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Its length in the caller's buffer.
    pub len: usize,
    /// Where it goes: the session's server.
    pub destination: SocketAddrV4,
    /// The session it belongs to.
    pub session: SessionId,
    /// Pages it asks the server for (0 unless it is a Request).
    pub pages_requested: u64,
}

/// The endpoint's own counters (each session's receiver keeps its own, see [`HostEndpoint::receiver`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostStats {
    /// Datagrams handed to the endpoint.
    pub datagrams: u64,
    /// Dropped before routing: no valid header.
    pub malformed: u64,
    /// Dropped: sent by a host, not a server.
    pub from_hosts: u64,
    /// Dropped: of a session the host does not follow (and not an Announce).
    pub unknown_session: u64,
    /// Announces of unknown sessions that failed authentication.
    pub announces_unauthenticated: u64,
    /// Announces of retired sessions at their retired epoch (or older), ignored.
    pub announces_of_retired: u64,
    /// Sessions started.
    pub sessions_started: u64,
    /// Authentic Announces of sessions refused (each Announce counts).
    pub sessions_refused: u64,
    /// Sessions restarted by their server (a new epoch).
    pub sessions_restarted: u64,
    /// Sessions retired.
    pub sessions_retired: u64,
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Live,
    /// Ended by End or a lost server, since the time given.
    Over {
        since: Time,
        reason: RetireReason,
    },
}

struct HostSession<S> {
    receiver: Receiver,
    sink: S,
    server: SocketAddrV4,
    phase: Phase,
    in_use: bool,
    /// The last authentic datagram (or the creation).
    heard: Time,
    restarts: u64,
}

impl<S> HostSession<S> {
    /// True when the session counts against the limit: live, or used by clones.
    fn counts(&self) -> bool {
        self.in_use || self.phase == Phase::Live
    }

    /// When this session is to be retired, if no clone uses it.
    fn retire_at(&self, config: &HostConfig) -> Option<(Time, RetireReason)> {
        if self.in_use {
            return None;
        }
        let (at, reason) = match self.phase {
            Phase::Live => (self.heard + config.idle_limit, RetireReason::Idle),
            Phase::Over { since, reason } => (since + config.linger, reason),
        };
        // A limit of `Duration::MAX` means never.
        (at != Time::from_nanos(u64::MAX)).then_some((at, reason))
    }
}

/// A host's sessions. See the module docs. `S` is the owner's per-session page sink (its cache).
pub struct HostEndpoint<S: PageSink> {
    config: HostConfig,
    sessions: BTreeMap<SessionId, HostSession<S>>,
    retired: BTreeMap<SessionId, u32>,
    retired_order: VecDeque<SessionId>,
    refused: BTreeSet<SessionId>,
    events: VecDeque<HostEvent>,
    stats: HostStats,
    /// The session that sent last: `poll_transmit` asks the next one first (round robin, so one busy
    /// session cannot starve the others).
    next_tx: Option<SessionId>,
    now: Time,
}

impl<S: PageSink> HostEndpoint<S> {
    /// An endpoint following no session yet.
    pub fn new(config: HostConfig) -> Result<HostEndpoint<S>, ConfigError> {
        if config.node == NodeId::SERVER {
            return Err(ConfigError::Invalid("node id 0 belongs to the server; hosts need a non-zero id".into()));
        }
        if config.max_sessions == 0 {
            return Err(ConfigError::Invalid("max_sessions must be at least 1".into()));
        }
        Ok(HostEndpoint {
            config,
            sessions: BTreeMap::new(),
            retired: BTreeMap::new(),
            retired_order: VecDeque::new(),
            refused: BTreeSet::new(),
            events: VecDeque::new(),
            stats: HostStats::default(),
            next_tx: None,
            now: Time::ZERO,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The endpoint's counters.
    pub fn stats(&self) -> &HostStats {
        &self.stats
    }

    fn receiver_config(&self, session: SessionId, page_count: u32, now: Time) -> ReceiverConfig {
        let c = &self.config;
        let mut rc = ReceiverConfig::new(session, c.node, c.key.clone(), c.page_shift, page_count);
        rc.read_ahead = c.read_ahead;
        rc.read_ahead_max = c.read_ahead_max;
        rc.server_timeout = c.server_timeout;
        rc.window = c.window;
        rc.first_packet_number = c.first_packet_number.saturating_add(now.as_nanos() / 1000);
        rc.seed = c.seed ^ session.0.rotate_left(17) ^ rc.first_packet_number;
        rc
    }

    /// Follows `session` without waiting for its Announce (a fetch that knows its server, or a test):
    /// `server` is where requests go until the server is heard from elsewhere.
    pub fn follow(
        &mut self,
        now: Time,
        session: SessionId,
        page_count: u32,
        server: SocketAddrV4,
        sink: S,
    ) -> Result<(), ConfigError> {
        self.follow_with(now, self.receiver_config(session, page_count, now), server, sink)
    }

    /// As [`HostEndpoint::follow`], with a receiver configuration of the caller's (the simulator
    /// sets stream starts, windows and round-trip hints per host).
    pub fn follow_with(
        &mut self,
        now: Time,
        config: ReceiverConfig,
        server: SocketAddrV4,
        sink: S,
    ) -> Result<(), ConfigError> {
        self.now = self.now.max(now);
        let session = config.session;
        let receiver = Receiver::new(config, now)?;
        self.insert(session, receiver, sink, server, now);
        Ok(())
    }

    fn insert(&mut self, id: SessionId, receiver: Receiver, sink: S, server: SocketAddrV4, now: Time) {
        self.retired.remove(&id);
        self.refused.remove(&id);
        self.stats.sessions_started += 1;
        let session =
            HostSession { receiver, sink, server, phase: Phase::Live, in_use: false, heard: now, restarts: 0 };
        self.sessions.insert(id, session);
    }

    /// Takes one datagram received from `source`. An Announce of a new session calls `open` to make
    /// its sink (an `Err` refuses the session, with the reason).
    pub fn handle_datagram(
        &mut self,
        now: Time,
        source: SocketAddrV4,
        datagram: &mut [u8],
        open: &mut dyn FnMut(&SessionInfo) -> Result<S, String>,
    ) {
        self.now = self.now.max(now);
        self.stats.datagrams += 1;
        let header = match wire::peek_header(datagram) {
            Ok(h) => h,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::trace!("dropping a datagram from {source}: {e}");
                return;
            }
        };
        if header.node != NodeId::SERVER {
            self.stats.from_hosts += 1;
            return;
        }
        let id = header.session;
        let Some(s) = self.sessions.get_mut(&id) else {
            if header.msg_type == MsgType::Announce {
                self.discover(now, source, header, datagram, open);
            } else {
                self.stats.unknown_session += 1;
            }
            return;
        };
        if !s.receiver.handle_routed(now, &header, datagram, &mut s.sink) {
            return;
        }
        s.heard = now;
        if s.server != source {
            self.events.push_back(HostEvent::ServerMoved { session: id, from: s.server, to: source });
            s.server = source;
        }
        Self::absorb(&mut self.events, &mut self.stats, id, s, now);
        let lost = matches!(s.phase, Phase::Over { reason: RetireReason::ServerLost, .. });
        if lost && !s.receiver.is_server_lost() && !s.receiver.is_ended() {
            // The receiver heard its server again (an authentic datagram clears its verdict).
            s.phase = Phase::Live;
            self.events.push_back(HostEvent::ServerBack(id));
        }
    }

    /// An Announce of a session not followed: authenticate it (in place) and start the session.
    fn discover(
        &mut self,
        now: Time,
        source: SocketAddrV4,
        header: Header,
        datagram: &mut [u8],
        open: &mut dyn FnMut(&SessionInfo) -> Result<S, String>,
    ) {
        let id = header.session;
        if self.retired.get(&id).is_some_and(|&epoch| header.epoch <= epoch) {
            self.stats.announces_of_retired += 1;
            return;
        }
        let keys = Keys::derive(&self.config.key, id, header.epoch);
        let Ok((header, body)) = wire::open(datagram, &keys) else {
            self.stats.announces_unauthenticated += 1;
            return;
        };
        let Ok(Message::Announce(a)) = Message::parse(header.msg_type, body) else {
            self.stats.announces_unauthenticated += 1;
            return;
        };
        let info = SessionInfo {
            session: id,
            server: source,
            epoch: header.epoch,
            page_count: a.page_count,
            page_shift: a.page_shift,
            descriptor: a.descriptor,
        };
        if a.page_shift != self.config.page_shift {
            let reason =
                format!("page shift {} (this host serves only 2^{} pages)", a.page_shift, self.config.page_shift);
            return self.refuse(id, reason);
        }
        if !self.make_room() {
            let reason = format!("already following {} live sessions (the limit)", self.config.max_sessions);
            return self.refuse(id, reason);
        }
        let receiver = match Receiver::new(self.receiver_config(id, a.page_count, now), now) {
            Ok(r) => r,
            Err(e) => return self.refuse(id, format!("receiver set-up: {e}")),
        };
        let sink = match open(&info) {
            Ok(s) => s,
            Err(reason) => return self.refuse(id, reason),
        };
        self.insert(id, receiver, sink, source, now);
        self.events.push_back(HostEvent::Started(info));
        if let Some(s) = self.sessions.get_mut(&id) {
            s.receiver.handle_opened(now, &header, body, &mut s.sink);
            Self::absorb(&mut self.events, &mut self.stats, id, s, now);
        }
    }

    /// Makes room for one more session: true if there is room (retiring the longest-ended unused
    /// session if that is what it takes).
    fn make_room(&mut self) -> bool {
        if self.sessions.values().filter(|s| s.counts()).count() >= self.config.max_sessions {
            return false;
        }
        // Ended sessions do not count, but they hold caches: keep their number bounded too.
        if self.sessions.len() >= self.config.max_sessions {
            let oldest = self
                .sessions
                .iter()
                .filter(|(_, s)| !s.in_use)
                .filter_map(|(&id, s)| match s.phase {
                    Phase::Over { since, .. } => Some((since, id)),
                    Phase::Live => None,
                })
                .min();
            match oldest {
                Some((_, id)) => self.retire(id, RetireReason::Evicted),
                None => return false,
            }
        }
        true
    }

    fn refuse(&mut self, id: SessionId, reason: String) {
        self.stats.sessions_refused += 1;
        if self.refused.len() < REFUSED_KEPT && self.refused.insert(id) {
            self.events.push_back(HostEvent::Refused { session: id, reason });
        }
    }

    fn retire(&mut self, id: SessionId, reason: RetireReason) {
        let Some(s) = self.sessions.remove(&id) else { return };
        self.stats.sessions_retired += 1;
        self.retired.insert(id, s.receiver.epoch().unwrap_or(0));
        self.retired_order.push_back(id);
        while self.retired_order.len() > RETIRED_KEPT {
            if let Some(old) = self.retired_order.pop_front() {
                self.retired.remove(&old);
            }
        }
        if self.next_tx == Some(id) {
            self.next_tx = None;
        }
        self.events.push_back(HostEvent::Retired { session: id, reason });
    }

    /// Moves a receiver's events into the endpoint's, updating the session's phase.
    fn absorb(
        events: &mut VecDeque<HostEvent>,
        stats: &mut HostStats,
        id: SessionId,
        s: &mut HostSession<S>,
        now: Time,
    ) {
        while let Some(event) = s.receiver.poll_event() {
            events.push_back(match event {
                ReceiverEvent::Blob { kind, id: blob, bytes } => HostEvent::Blob { session: id, kind, id: blob, bytes },
                ReceiverEvent::Ended => {
                    s.phase = Phase::Over { since: now, reason: RetireReason::Ended };
                    HostEvent::Ended(id)
                }
                ReceiverEvent::ServerLost => {
                    if s.phase == Phase::Live {
                        s.phase = Phase::Over { since: now, reason: RetireReason::ServerLost };
                    }
                    HostEvent::ServerLost(id)
                }
                ReceiverEvent::ServerRestarted { epoch } => {
                    s.phase = Phase::Live;
                    s.restarts += 1;
                    stats.sessions_restarted += 1;
                    HostEvent::Restarted { session: id, epoch }
                }
            });
        }
    }

    /// Runs the timers due at `now`: every session's, and retirement.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = self.now.max(now);
        for (&id, s) in self.sessions.iter_mut() {
            if s.receiver.poll_timeout().is_some_and(|t| t <= now) {
                s.receiver.handle_timeout(now);
                Self::absorb(&mut self.events, &mut self.stats, id, s, now);
            }
        }
        let due: Vec<(SessionId, RetireReason)> = self
            .sessions
            .iter()
            .filter_map(|(&id, s)| s.retire_at(&self.config).filter(|&(t, _)| t <= now).map(|(_, r)| (id, r)))
            .collect();
        for (id, reason) in due {
            self.retire(id, reason);
        }
    }

    /// When [`HostEndpoint::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.sessions
            .values()
            .flat_map(|s| [s.receiver.poll_timeout(), s.retire_at(&self.config).map(|(t, _)| t)])
            .flatten()
            .min()
    }

    /// Writes the next datagram any session wants sent into `buf` (at least `wire::MIN_DATAGRAM`
    /// bytes), taking the sessions in turn.
    pub fn poll_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<Transmit> {
        self.now = self.now.max(now);
        // Round robin: from the session after the one that sent last, in id order, wrapping once.
        let last = self.next_tx;
        let (after, before) = match last {
            Some(l) => (self.sessions.range_mut((Bound::Excluded(l), Bound::Unbounded)), Some(l)),
            None => (self.sessions.range_mut(..), None),
        };
        for (&id, s) in after {
            if let Some(t) = Self::transmit_of(id, s, now, buf) {
                self.next_tx = Some(id);
                return Some(t);
            }
        }
        if let Some(l) = before {
            for (&id, s) in self.sessions.range_mut(..=l) {
                if let Some(t) = Self::transmit_of(id, s, now, buf) {
                    self.next_tx = Some(id);
                    return Some(t);
                }
            }
        }
        self.next_tx = None;
        None
    }

    fn transmit_of(id: SessionId, s: &mut HostSession<S>, now: Time, buf: &mut [u8]) -> Option<Transmit> {
        let before = s.receiver.stats().pages_requested;
        let len = s.receiver.poll_transmit(now, buf)?;
        let pages_requested = s.receiver.stats().pages_requested - before;
        Some(Transmit { len, destination: s.server, session: id, pages_requested })
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<HostEvent> {
        self.events.pop_front()
    }

    /// A clone of `session` touched `page`: true when it is present; otherwise it is requested (with
    /// read-ahead) and arrives through the session's sink. False also for an unknown session.
    pub fn fault(&mut self, now: Time, session: SessionId, page: u32) -> bool {
        self.now = self.now.max(now);
        let Some(s) = self.sessions.get_mut(&session) else { return false };
        let present = s.receiver.fault(now, page);
        Self::absorb(&mut self.events, &mut self.stats, session, s, now);
        present
    }

    /// Asks for pages of `session` ahead of need, at the lowest priority.
    pub fn prefetch(&mut self, session: SessionId, pages: &[u32]) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.receiver.prefetch(pages);
        }
    }

    /// Queues a clone's report for `session`'s server; false if the session is unknown.
    pub fn report(&mut self, session: SessionId, fork: u32, clone: u32, status: u32, result: Vec<u8>) -> bool {
        let Some(s) = self.sessions.get_mut(&session) else { return false };
        s.receiver.report(fork, clone, status, result);
        true
    }

    /// Whether clones use `session` now (the owner says so whenever that changes): a used session is
    /// never retired, and counts against the limit even after it ended.
    pub fn set_in_use(&mut self, session: SessionId, in_use: bool) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.in_use = in_use;
        }
    }

    /// The sessions followed now.
    pub fn sessions(&self) -> impl Iterator<Item = SessionView<'_, S>> + '_ {
        self.sessions.iter().map(|(&id, s)| SessionView { id, session: s })
    }

    /// One session, if followed.
    pub fn session(&self, id: SessionId) -> Option<SessionView<'_, S>> {
        self.sessions.get(&id).map(|session| SessionView { id, session })
    }

    /// The owner's sink of `session`, to change what it keeps beside the pages.
    pub fn sink_mut(&mut self, session: SessionId) -> Option<&mut S> {
        self.sessions.get_mut(&session).map(|s| &mut s.sink)
    }

    /// Whether a fault of any session waits for its page (a driver may busy-poll meanwhile).
    pub fn faults_waiting(&self) -> bool {
        self.sessions.values().any(|s| s.receiver.faults_waiting())
    }

    /// Sessions followed now (live or lingering).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }
}

/// A read-only view of one followed session.
pub struct SessionView<'a, S> {
    id: SessionId,
    session: &'a HostSession<S>,
}

impl<'a, S> SessionView<'a, S> {
    /// The session id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The owner's sink.
    pub fn sink(&self) -> &'a S {
        &self.session.sink
    }

    /// The server's address.
    pub fn server(&self) -> SocketAddrV4 {
        self.session.server
    }

    /// The receiver's counters.
    pub fn stats(&self) -> &'a ReceiverStats {
        self.session.receiver.stats()
    }

    /// True when the receiver holds `page`.
    pub fn has_page(&self, page: u32) -> bool {
        self.session.receiver.has_page(page)
    }

    /// The server's epoch, once heard.
    pub fn epoch(&self) -> Option<u32> {
        self.session.receiver.epoch()
    }

    /// When push data last arrived (see [`crate::receiver::Receiver::last_push_at`]).
    pub fn last_push_at(&self) -> Option<Time> {
        self.session.receiver.last_push_at()
    }

    /// Pages in the image.
    pub fn page_count(&self) -> u32 {
        self.session.receiver.page_count()
    }

    /// True once the server ended the session (and did not start it again).
    pub fn is_ended(&self) -> bool {
        self.session.receiver.is_ended()
    }

    /// True while the server is declared lost.
    pub fn is_server_lost(&self) -> bool {
        self.session.receiver.is_server_lost()
    }

    /// Times the server restarted the session.
    pub fn restarts(&self) -> u64 {
        self.session.restarts
    }

    /// Whether the owner said clones use it.
    pub fn in_use(&self) -> bool {
        self.session.in_use
    }
}
