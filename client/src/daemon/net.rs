//! The network thread: one UDP socket joined to the group, and one protocol [`Receiver`] per session.
//!
//! Sessions are discovered: the first authenticated Announce of an unknown session id creates its
//! receiver and [`PageCache`] (page count from the Announce, server address from the datagram's
//! source, keys derived from the group key given to the daemon). Every datagram is routed by the
//! session id in its header; the receiver does all protocol work (authentication, repair, requests,
//! timers). The thread only moves bytes:
//!
//! ```text
//!  clone threads ──NetCommand (crossbeam)──┐ + Waker (eventfd)
//!                                          v
//!  loop: take commands ─> Receiver::fault / report
//!        recv_batch ─> peek header ─> session's Receiver::handle_datagram ─> PageCache (wakes clones)
//!        timers, poll_transmit ─> send_batch (unicast to each session's server)
//!        events: ServerLost / Ended ─> Registry::fail_session; blobs ─> the children thread
//!        poll(socket, waker, next timer)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as ChannelRx, Sender as ChannelTx, TryRecvError};
use netio::udp::UdpConfig;
use netio::{IoError, IoKind, PacketIo, RxBatch, TxBatch};
use spindrift_protocol::receiver::{Receiver, ReceiverConfig, ReceiverEvent, ReceiverStats};
use spindrift_protocol::wire::{
    self, Announce, BlobKind, Header, Keys, Message, MsgType, NodeId, SessionId, SessionKey, FLAG_ENCRYPTED,
    HEADER_LEN, TAG_LEN,
};
use spindrift_protocol::Time;

use super::registry::Registry;
use super::stats::{DaemonStats, SessionSnapshot};
use crate::cache::{PageCache, CACHE_PAGE_SIZE};
use crate::session::{first_packet_number, flush_batch, CacheSink, PAGE_SHIFT};
use crate::waker::{Waker, WakerError};

/// Datagrams per receive/send batch.
const BATCH: usize = 64;
/// The longest the loop sleeps without looking at its timers and the stop flag.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// How often the sessions' counters are published to the stats.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// Refused session ids remembered (to log each once).
const REFUSED_KEPT: usize = 1024;

/// Errors of the network thread.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The socket could not be opened or joined to the group.
    #[error("opening the daemon's packet I/O on {interface} port {port} (group {group}): {source}")]
    Socket {
        /// The interface.
        interface: Ipv4Addr,
        /// The port.
        port: u16,
        /// The group.
        group: Ipv4Addr,
        /// The cause.
        source: netio::OpenError,
    },
    /// Packet batches could not be allocated.
    #[error("allocating packet batches: {0}")]
    Batch(#[from] netio::BatchError),
    /// The waker could not be created.
    #[error("creating the network thread's waker: {0}")]
    Waker(#[from] WakerError),
    /// Receiving, sending or waiting failed.
    #[error("network I/O: {0}")]
    Io(#[from] IoError),
    /// poll(2) failed.
    #[error("waiting for datagrams and commands (poll): {0}")]
    Poll(std::io::Error),
}

/// What clone threads ask of the network thread.
#[derive(Debug)]
pub(crate) enum NetCommand {
    /// Cache pages a clone faulted on and the cache lacks.
    Faults {
        /// The session.
        session: u64,
        /// The pages (4 KiB cache pages, the protocol's pages).
        pages: Vec<u64>,
    },
    /// A clone's report, for the server.
    Report {
        /// The session.
        session: u64,
        /// The fork.
        fork: u32,
        /// The clone.
        clone: u32,
        /// Its status.
        status: u32,
        /// Its result bytes.
        result: Vec<u8>,
    },
}

/// A blob that arrived whole, for the children thread.
#[derive(Debug)]
pub(crate) struct BlobEvent {
    /// The session it came in.
    pub(crate) session: u64,
    /// Descriptor or fork plan.
    pub(crate) kind: BlobKind,
    /// Its id.
    pub(crate) id: u32,
    /// Its bytes.
    pub(crate) bytes: Vec<u8>,
}

/// Sends commands to the network thread and wakes it. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct NetHandle {
    tx: ChannelTx<NetCommand>,
    waker: Arc<Waker>,
}

impl NetHandle {
    /// Queues `command` and wakes the thread; false if the thread is gone.
    pub(crate) fn send(&self, command: NetCommand) -> bool {
        let ok = self.tx.send(command).is_ok();
        self.waker.wake();
        ok
    }

    /// Wakes the thread (to notice the stop flag).
    pub(crate) fn wake(&self) {
        self.waker.wake();
    }
}

/// How the network side is set up.
#[derive(Debug, Clone)]
pub(crate) struct NetSettings {
    pub(crate) interface: Ipv4Addr,
    pub(crate) group: Ipv4Addr,
    pub(crate) port: u16,
    pub(crate) key: SessionKey,
    pub(crate) node: u32,
    pub(crate) read_ahead: u16,
    pub(crate) server_timeout: Duration,
    pub(crate) max_sessions: usize,
    pub(crate) io: IoKind,
}

/// One followed session.
struct NetSession {
    receiver: Receiver,
    cache: Arc<PageCache>,
    server: SocketAddrV4,
    epoch: u32,
    /// The server was declared lost; `heard_mark` is the authentic-datagram count at that moment.
    lost: bool,
    heard_mark: u64,
    ended: bool,
    restarts: u64,
    faults_forwarded: u64,
}

/// Datagrams the receiver accepted as authentic and current.
fn authentic(r: &ReceiverStats) -> u64 {
    r.rx_packets.saturating_sub(r.rx_malformed + r.rx_unauthenticated + r.rx_stale)
}

/// Authenticates an Announce of `session` (a copy of the datagram is opened, so the original stays
/// intact for the receiver) and returns its header and parameters.
fn authentic_announce(key: &SessionKey, header: &Header, datagram: &[u8]) -> Option<(Header, Announce)> {
    let keys = Keys::derive(key, header.session, header.epoch);
    let mut copy = datagram.to_vec();
    let (h, body) = wire::open(&mut copy, &keys).ok()?;
    match Message::parse(h.msg_type, body) {
        Ok(Message::Announce(a)) => Some((h, a)),
        _ => None,
    }
}

/// The sessions and what discovering one needs.
struct Sessions {
    settings: NetSettings,
    map: BTreeMap<u64, NetSession>,
    refused: BTreeSet<u64>,
    registry: Arc<Registry>,
    stats: Arc<DaemonStats>,
    blobs: ChannelTx<BlobEvent>,
}

impl Sessions {
    fn new_receiver(&self, session: u64, pages: u32, now: Time) -> Option<Receiver> {
        let s = &self.settings;
        let mut rc = ReceiverConfig::new(SessionId(session), NodeId(s.node), s.key.clone(), PAGE_SHIFT, pages);
        rc.read_ahead = s.read_ahead;
        rc.server_timeout = s.server_timeout;
        rc.first_packet_number = first_packet_number();
        rc.seed = rc.first_packet_number ^ u64::from(s.node) ^ session;
        match Receiver::new(rc, now) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!("session {session}: cannot set up a receiver: {e}");
                None
            }
        }
    }

    fn refuse(&mut self, session: u64, why: &str) {
        DaemonStats::bump(&self.stats.counters.sessions_refused);
        if self.refused.len() < REFUSED_KEPT && self.refused.insert(session) {
            tracing::warn!("session {session} refused: {why}");
        }
    }

    /// Routes one datagram from `source` to its session, discovering new sessions from Announces.
    fn handle(&mut self, now: Time, datagram: &mut [u8], source: SocketAddrV4) {
        let header = match wire::peek_header(datagram) {
            Ok(h) => h,
            Err(e) => {
                DaemonStats::bump(&self.stats.counters.datagrams_malformed);
                tracing::trace!("dropping a datagram from {source}: {e}");
                return;
            }
        };
        if header.node != NodeId::SERVER {
            DaemonStats::bump(&self.stats.counters.datagrams_from_hosts);
            return;
        }
        let id = header.session.0;
        if header.msg_type == MsgType::Announce {
            self.on_announce(now, &header, datagram, source);
        }
        let Some(s) = self.map.get_mut(&id) else {
            DaemonStats::bump(&self.stats.counters.datagrams_unknown_session);
            return;
        };
        let mut sink = CacheSink { cache: &s.cache, errors: 0 };
        s.receiver.handle_datagram(now, datagram, &mut sink);
        if sink.errors > 0 {
            self.stats.counters.sink_errors.fetch_add(sink.errors, Ordering::Relaxed);
        }
        if s.lost && authentic(s.receiver.stats()) > s.heard_mark {
            s.lost = false;
            self.registry.recover(id);
            tracing::info!("session {id}: server {} is back; new clones are served again", s.server);
        }
    }

    /// An Announce: discovers a new session, follows a server that moved, or renews an ended session
    /// whose server started again (new epoch; the cache is kept: the image is the same).
    fn on_announce(&mut self, now: Time, header: &Header, datagram: &[u8], source: SocketAddrV4) {
        let id = header.session.0;
        if let Some(s) = self.map.get(&id) {
            let renew = s.ended && header.epoch > s.epoch;
            if source == s.server && !renew {
                return;
            }
            let Some((h, a)) = authentic_announce(&self.settings.key, header, datagram) else {
                DaemonStats::bump(&self.stats.counters.announces_unauthenticated);
                return;
            };
            if u64::from(a.page_count) != s.cache.page_count() {
                tracing::warn!(
                    "session {id}: announce from {source} says {} pages, not {}: ignored",
                    a.page_count,
                    s.cache.page_count()
                );
                return;
            }
            let receiver = if renew { self.new_receiver(id, a.page_count, now) } else { None };
            let Some(s) = self.map.get_mut(&id) else { return };
            if source != s.server {
                tracing::warn!("session {id}: server moved from {} to {source}", s.server);
                s.server = source;
            }
            if let Some(receiver) = receiver {
                tracing::info!("session {id}: server {source} started the ended session again (epoch {})", h.epoch);
                s.receiver = receiver;
                s.ended = false;
                s.lost = false;
                s.epoch = h.epoch;
                s.restarts += 1;
                self.registry.recover(id);
            }
            return;
        }
        if self.refused.contains(&id) {
            DaemonStats::bump(&self.stats.counters.sessions_refused);
            return;
        }
        let Some((h, a)) = authentic_announce(&self.settings.key, header, datagram) else {
            DaemonStats::bump(&self.stats.counters.announces_unauthenticated);
            return;
        };
        if self.map.len() >= self.settings.max_sessions {
            let why = format!("already following {} sessions (--max-sessions)", self.map.len());
            self.refuse(id, &why);
            return;
        }
        if a.page_shift != PAGE_SHIFT {
            let why = format!("page shift {} (only 4 KiB pages are served)", a.page_shift);
            self.refuse(id, &why);
            return;
        }
        let cache = match PageCache::new(u64::from(a.page_count) * CACHE_PAGE_SIZE) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                self.refuse(id, &format!("page cache for {} pages: {e}", a.page_count));
                return;
            }
        };
        let Some(receiver) = self.new_receiver(id, a.page_count, now) else {
            self.refuse(id, "receiver set-up failed");
            return;
        };
        tracing::info!(
            "session {id}: discovered; {} pages ({} MiB), server {source}, epoch {}, descriptor blob {}",
            a.page_count,
            (u64::from(a.page_count) * CACHE_PAGE_SIZE) >> 20,
            h.epoch,
            a.descriptor
        );
        self.map.insert(
            id,
            NetSession {
                receiver,
                cache: cache.clone(),
                server: source,
                epoch: h.epoch,
                lost: false,
                heard_mark: 0,
                ended: false,
                restarts: 0,
                faults_forwarded: 0,
            },
        );
        self.registry.add_session(id, cache);
    }

    fn command(&mut self, now: Time, command: NetCommand) {
        match command {
            NetCommand::Faults { session, pages } => {
                let Some(s) = self.map.get_mut(&session) else {
                    tracing::warn!("faults for unknown session {session} dropped");
                    return;
                };
                for page in pages {
                    match u32::try_from(page) {
                        Ok(p) => {
                            s.receiver.fault(now, p);
                            s.faults_forwarded += 1;
                        }
                        Err(_) => tracing::warn!("session {session}: page {page} is past the protocol's range"),
                    }
                }
            }
            NetCommand::Report { session, fork, clone, status, result } => match self.map.get_mut(&session) {
                Some(s) => {
                    tracing::info!("session {session}: clone {clone} of fork {fork} reports status {status}");
                    s.receiver.report(fork, clone, status, result);
                }
                None => tracing::warn!("report of clone {clone} for unknown session {session} dropped"),
            },
        }
    }

    fn timers(&mut self, now: Time) {
        for s in self.map.values_mut() {
            if s.receiver.poll_timeout().is_some_and(|t| t <= now) {
                s.receiver.handle_timeout(now);
            }
        }
    }

    fn events(&mut self) {
        for (&id, s) in self.map.iter_mut() {
            while let Some(event) = s.receiver.poll_event() {
                match event {
                    ReceiverEvent::ServerLost => {
                        let reason = format!(
                            "session {id}: server {} lost: silent for more than {:?} while pages were wanted",
                            s.server, self.settings.server_timeout
                        );
                        s.lost = true;
                        s.heard_mark = authentic(s.receiver.stats());
                        let n = self.registry.fail_session(id, &reason);
                        tracing::error!("{reason}; failing the faults of {n} clones");
                    }
                    ReceiverEvent::Ended => {
                        s.ended = true;
                        let reason = format!("session {id}: server {} ended the session", s.server);
                        let n = self.registry.fail_session(id, &reason);
                        tracing::warn!("{reason}; failing the waiting faults of {n} clones");
                    }
                    ReceiverEvent::ServerRestarted { epoch } => {
                        s.epoch = epoch;
                        s.restarts += 1;
                        tracing::warn!(
                            "session {id}: server {} restarted (epoch {epoch}); waiting pages are asked again",
                            s.server
                        );
                    }
                    ReceiverEvent::Blob { kind, id: blob, bytes } => {
                        DaemonStats::bump(&self.stats.counters.blobs_received);
                        tracing::info!("session {id}: {kind:?} blob {blob} arrived ({} bytes)", bytes.len());
                        if self.blobs.send(BlobEvent { session: id, kind, id: blob, bytes }).is_err() {
                            tracing::warn!("session {id}: blob {blob} dropped: the children thread is gone");
                        }
                    }
                }
            }
        }
    }

    fn publish(&self) {
        let snapshots = self
            .map
            .iter()
            .map(|(&id, s)| {
                let r = s.receiver.stats();
                SessionSnapshot {
                    session: id,
                    server: s.server.to_string(),
                    epoch: s.epoch,
                    pages: u32::try_from(s.cache.page_count()).unwrap_or(u32::MAX),
                    pages_present: s.cache.present_count(),
                    lost: s.lost,
                    ended: s.ended,
                    restarts: s.restarts,
                    faults_forwarded: s.faults_forwarded,
                    requests: r.requests,
                    naks: r.naks,
                    receiver: r.clone(),
                }
            })
            .collect();
        self.stats.publish_sessions(snapshots);
        let forwarded: u64 = self.map.values().map(|s| s.faults_forwarded).sum();
        self.stats.counters.pages_faulted_to_network.store(forwarded, Ordering::Relaxed);
    }
}

/// The network thread's state. See the module docs.
pub(crate) struct NetThread {
    io: Box<dyn PacketIo + Send>,
    rx: RxBatch,
    tx: TxBatch,
    sessions: Sessions,
    commands: ChannelRx<NetCommand>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    start: Instant,
    last_publish: Instant,
}

impl NetThread {
    /// Opens the socket (joined to the group) and returns the thread's state and a handle to it.
    pub(crate) fn open(
        settings: NetSettings,
        registry: Arc<Registry>,
        stats: Arc<DaemonStats>,
        blobs: ChannelTx<BlobEvent>,
        stop: Arc<AtomicBool>,
    ) -> Result<(NetThread, NetHandle), NetError> {
        let udp = UdpConfig::new(settings.interface, settings.port).join(settings.group);
        let io = netio::open(settings.io, &udp).map_err(|source| NetError::Socket {
            interface: settings.interface,
            port: settings.port,
            group: settings.group,
            source,
        })?;
        stats.set_io(io.capabilities().summary());
        tracing::info!(io = %io.capabilities().summary(), "packet I/O open");
        let waker = Arc::new(Waker::new()?);
        let (tx, commands) = crossbeam_channel::unbounded();
        let thread = NetThread {
            io,
            rx: RxBatch::new(BATCH, wire::MAX_DATAGRAM)?,
            tx: TxBatch::new(BATCH, wire::MIN_DATAGRAM)?,
            sessions: Sessions { settings, map: BTreeMap::new(), refused: BTreeSet::new(), registry, stats, blobs },
            commands,
            waker: waker.clone(),
            stop,
            start: Instant::now(),
            last_publish: Instant::now(),
        };
        Ok((thread, NetHandle { tx, waker }))
    }

    fn now(&self) -> Time {
        Time::from_nanos(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    /// Runs until the stop flag is set (or the socket fails).
    pub(crate) fn run(mut self) -> Result<(), NetError> {
        let result = self.run_loop();
        self.publish();
        if let Some(c) = self.io.counters() {
            tracing::info!("packet I/O: {c}");
        }
        result
    }

    fn run_loop(&mut self) -> Result<(), NetError> {
        while !self.stop.load(Ordering::SeqCst) {
            self.waker.take();
            self.take_commands();
            self.receive()?;
            let now = self.now();
            self.sessions.timers(now);
            self.transmit()?;
            self.sessions.events();
            if self.last_publish.elapsed() >= PUBLISH_EVERY {
                self.publish();
                self.last_publish = Instant::now();
            }
            self.sleep()?;
        }
        Ok(())
    }

    fn publish(&mut self) {
        self.sessions.publish();
        if let Some(c) = self.io.counters() {
            self.sessions.stats.set_io_counters(c);
        }
    }

    fn take_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(command) => {
                    let now = self.now();
                    self.sessions.command(now, command);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    fn receive(&mut self) -> Result<(), NetError> {
        loop {
            let n = self.io.recv_batch(&mut self.rx)?;
            let now = self.now();
            for i in 0..n {
                let Some((source, truncated)) = self.rx.get(i).map(|d| (d.source, d.truncated)) else { continue };
                if truncated {
                    DaemonStats::bump(&self.sessions.stats.counters.datagrams_malformed);
                    continue;
                }
                if let Some(payload) = self.rx.payload_mut(i) {
                    self.sessions.handle(now, payload, source);
                }
            }
            if n < self.rx.capacity() {
                return Ok(());
            }
        }
    }

    /// Sends what every session's receiver wants sent, to its server.
    fn transmit(&mut self) -> Result<(), NetError> {
        let now = self.now();
        let ids: Vec<u64> = self.sessions.map.keys().copied().collect();
        for id in ids {
            loop {
                if self.tx.is_full() {
                    self.flush()?;
                }
                let Some(s) = self.sessions.map.get_mut(&id) else { break };
                let receiver = &mut s.receiver;
                let Some(index) = self.tx.push_with(s.server, |buf| receiver.poll_transmit(now, buf))? else { break };
                if let Some(pages) = self.tx.get(index).and_then(|d| requested_pages(d.payload)) {
                    self.sessions.stats.record_request(pages);
                }
            }
        }
        self.flush()
    }

    fn flush(&mut self) -> Result<(), NetError> {
        Ok(flush_batch(&mut self.io, &mut self.tx, "servers")?)
    }

    /// Sleeps until a datagram or a command arrives, or the next receiver timer.
    fn sleep(&mut self) -> Result<(), NetError> {
        let now = self.now();
        let mut wait = MAX_SLEEP;
        for s in self.sessions.map.values() {
            if let Some(t) = s.receiver.poll_timeout() {
                wait = wait.min(t.saturating_since(now));
            }
        }
        if wait.is_zero() {
            return Ok(());
        }
        let Some(socket) = self.io.poll_fd() else {
            std::thread::sleep(wait);
            return Ok(());
        };
        let mut revents = [0i16; 2];
        let fds = [(socket, libc::POLLIN), (std::os::fd::AsFd::as_fd(&*self.waker), libc::POLLIN)];
        crate::waker::poll(&fds, &mut revents, Some(wait)).map_err(NetError::Poll)?;
        Ok(())
    }
}

/// Pages asked for by a Request datagram this host is sending (`None` for other messages). Reads
/// our own, authenticated-only datagram; no key is needed.
fn requested_pages(datagram: &[u8]) -> Option<u64> {
    let header = wire::peek_header(datagram).ok()?;
    if header.msg_type != MsgType::Request || header.flags & FLAG_ENCRYPTED != 0 {
        return None;
    }
    let body = datagram.get(HEADER_LEN..datagram.len().checked_sub(TAG_LEN)?)?;
    match Message::parse(MsgType::Request, body).ok()? {
        Message::Request(r) => Some(r.runs.iter().flatten().map(|run| u64::from(run.count)).sum()),
        _ => None,
    }
}
