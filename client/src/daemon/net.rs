//! The network thread: one packet I/O backend joined to the group, one [`HostEndpoint`] for every
//! session, one [`Driver`] loop.
//!
//! Every protocol matter (which sessions exist, authentication, epochs, when a session ends and
//! goes) is the endpoint's; the thread only moves bytes and tells the rest of the daemon what
//! happened:
//!
//! ```text
//!  clone threads ──NetCommand (crossbeam)──┐ + Waker (eventfd, in the driver's one wait)
//!                                          v
//!  Driver turn: recv_batch ─> HostEndpoint::handle_datagram ─> the session's CacheSink (wakes clones)
//!               on_turn: commands ─> fault / report; timers; which sessions clones use;
//!                        events: Started ─> Registry::add_session, Ended / ServerLost ─> fail_session,
//!                        Restarted / ServerBack ─> recover, Retired ─> Registry::retire, blobs ─> children
//!               poll_transmit ─> send_batch (to each session's server)
//!               wait_with(socket queues + waker, until the endpoint's next timer)
//! ```

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver as ChannelRx, Sender as ChannelTx};
use netio::driver::{Driver, DriverConfig, Flow, Machine};
use netio::udp::UdpConfig;
use netio::{IoError, IoKind, PacketIo};
use spindrift_protocol::endpoint::{HostConfig, HostEndpoint, HostEvent, SessionInfo};
use spindrift_protocol::receiver::PageSink;
use spindrift_protocol::wire::{self, BlobKind, NodeId, SessionId, SessionKey};
use spindrift_protocol::Time;

use super::registry::Registry;
use super::stats::{DaemonStats, SessionSnapshot};
use crate::cache::{PageCache, CACHE_PAGE_SIZE};
use crate::session::{first_packet_number, CacheSink, PAGE_SHIFT};
use crate::waker::{Waker, WakerError};

/// How often the sessions' counters are published to the stats (and which sessions clones use is
/// looked up).
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

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
    /// The protocol endpoint refused its configuration.
    #[error("host endpoint: {0}")]
    Endpoint(spindrift_protocol::receiver::ConfigError),
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
    pub(crate) read_ahead_max: u16,
    pub(crate) busy_poll: Duration,
    pub(crate) server_timeout: Duration,
    pub(crate) max_sessions: usize,
    pub(crate) linger: Duration,
    pub(crate) io: IoKind,
}

/// A session's page cache, as the endpoint's sink: what the receiver produces is stored here.
pub(crate) struct SessionCache {
    sink: CacheSink,
    faults_forwarded: u64,
}

impl PageSink for SessionCache {
    fn store(&mut self, page: u32, data: &[u8]) {
        self.sink.store(page, data);
    }
    fn store_zero(&mut self, first_page: u32, count: u32) {
        self.sink.store_zero(first_page, count);
    }
}

/// The network thread's state. See the module docs.
pub(crate) struct NetThread {
    driver: Driver,
    node: NetNode,
}

/// The daemon's side of the driver loop.
struct NetNode {
    endpoint: HostEndpoint<SessionCache>,
    server_timeout: Duration,
    registry: Arc<Registry>,
    stats: Arc<DaemonStats>,
    blobs: ChannelTx<BlobEvent>,
    commands: ChannelRx<NetCommand>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    last_publish: Instant,
    faults_forwarded: u64,
    rx_truncated: u64,
    /// Pages the caches refused, over all sessions.
    sink_errors: Arc<AtomicU64>,
}

impl NetThread {
    /// Opens the packet I/O (joined to the group) and returns the thread's state and a handle to it.
    pub(crate) fn open(
        settings: NetSettings,
        registry: Arc<Registry>,
        stats: Arc<DaemonStats>,
        blobs: ChannelTx<BlobEvent>,
        stop: Arc<AtomicBool>,
    ) -> Result<(NetThread, NetHandle), NetError> {
        // Requests go from a reply socket, read first: out-of-stream fault answers (PROTOCOL.md 8.2)
        // come back on it and never wait behind the push queued on the group's socket.
        let udp = UdpConfig::new(settings.interface, settings.port).join(settings.group).reply_socket(true);
        let io = netio::open(settings.io, &udp).map_err(|source| NetError::Socket {
            interface: settings.interface,
            port: settings.port,
            group: settings.group,
            source,
        })?;
        Self::with_io(settings, io, registry, stats, blobs, stop)
    }

    /// As [`NetThread::open`], over a packet I/O the caller opened (the in-memory network in tests).
    pub(crate) fn with_io(
        settings: NetSettings,
        io: Box<dyn PacketIo + Send>,
        registry: Arc<Registry>,
        stats: Arc<DaemonStats>,
        blobs: ChannelTx<BlobEvent>,
        stop: Arc<AtomicBool>,
    ) -> Result<(NetThread, NetHandle), NetError> {
        stats.set_io(io.capabilities().summary());
        tracing::info!(io = %io.capabilities().summary(), "packet I/O open");
        let mut hc = HostConfig::new(NodeId(settings.node), settings.key.clone(), PAGE_SHIFT);
        hc.read_ahead = settings.read_ahead;
        hc.read_ahead_max = settings.read_ahead_max;
        hc.server_timeout = settings.server_timeout;
        hc.max_sessions = settings.max_sessions;
        hc.linger = settings.linger;
        hc.first_packet_number = first_packet_number();
        hc.seed = hc.first_packet_number ^ u64::from(settings.node);
        let endpoint = HostEndpoint::new(hc).map_err(NetError::Endpoint)?;
        let waker = Arc::new(Waker::new()?);
        let (tx, commands) = crossbeam_channel::unbounded();
        let driver =
            Driver::new(io, DriverConfig::new(wire::MAX_DATAGRAM, wire::MIN_DATAGRAM).busy_poll(settings.busy_poll))?
                .with_waker(waker.clone() as Arc<dyn AsFd + Send + Sync>);
        let node = NetNode {
            endpoint,
            server_timeout: settings.server_timeout,
            registry,
            stats,
            blobs,
            commands,
            waker: waker.clone(),
            stop,
            last_publish: Instant::now(),
            faults_forwarded: 0,
            rx_truncated: 0,
            sink_errors: Arc::default(),
        };
        Ok((NetThread { driver, node }, NetHandle { tx, waker }))
    }

    /// Runs until the stop flag is set (or the packet I/O fails).
    pub(crate) fn run(mut self) -> Result<(), NetError> {
        let result = self.driver.run(&mut self.node, Duration::from_millis(200));
        self.node.rx_truncated = self.driver.stats().rx_truncated;
        self.node.publish(&self.driver);
        if let Some(c) = self.driver.io().counters() {
            tracing::info!("packet I/O: {c}");
        }
        Ok(result?)
    }
}

impl Machine for NetNode {
    fn on_datagram(&mut self, now: Duration, source: SocketAddrV4, datagram: &mut [u8]) {
        let sink_errors = &self.sink_errors;
        let mut open = |info: &SessionInfo| -> Result<SessionCache, String> {
            let bytes = u64::from(info.page_count) * CACHE_PAGE_SIZE;
            let cache = PageCache::new(bytes).map_err(|e| format!("page cache for {} pages: {e}", info.page_count))?;
            Ok(SessionCache { sink: CacheSink::new(Arc::new(cache), sink_errors.clone()), faults_forwarded: 0 })
        };
        self.endpoint.handle_datagram(Time::ZERO + now, source, datagram, &mut open);
    }

    fn on_turn(&mut self, now: Duration) -> Flow {
        if self.stop.load(Ordering::SeqCst) {
            return Flow::Stop;
        }
        let now = Time::ZERO + now;
        self.waker.take();
        self.take_commands(now);
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        self.events();
        if self.last_publish.elapsed() >= PUBLISH_EVERY {
            self.last_publish = Instant::now();
            let in_use = self.registry.sessions_in_use();
            let ids: Vec<SessionId> = self.endpoint.sessions().map(|s| s.id()).collect();
            for id in ids {
                self.endpoint.set_in_use(id, in_use.contains(&id.0));
            }
            self.publish_sessions();
        }
        Flow::Continue
    }

    fn poll_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Option<(SocketAddrV4, usize)> {
        let t = self.endpoint.poll_transmit(Time::ZERO + now, buf)?;
        if t.pages_requested > 0 {
            self.stats.record_request(t.pages_requested);
        }
        Some((t.destination, t.len))
    }

    fn poll_timeout(&self) -> Option<Duration> {
        self.endpoint.poll_timeout().map(|t| t - Time::ZERO)
    }

    fn busy(&self) -> bool {
        self.endpoint.faults_waiting()
    }
}

impl NetNode {
    fn take_commands(&mut self, now: Time) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                NetCommand::Faults { session, pages } => {
                    let id = SessionId(session);
                    if self.endpoint.session(id).is_none() {
                        tracing::warn!("faults for unknown session {session} dropped");
                        continue;
                    }
                    let mut forwarded = 0;
                    for page in pages {
                        match u32::try_from(page) {
                            Ok(p) => {
                                self.endpoint.fault(now, id, p);
                                forwarded += 1;
                            }
                            Err(_) => tracing::warn!("session {session}: page {page} is past the protocol's range"),
                        }
                    }
                    self.faults_forwarded += forwarded;
                    if let Some(sink) = self.endpoint.sink_mut(id) {
                        sink.faults_forwarded += forwarded;
                    }
                }
                NetCommand::Report { session, fork, clone, status, result } => {
                    if self.endpoint.report(SessionId(session), fork, clone, status, result) {
                        tracing::info!("session {session}: clone {clone} of fork {fork} reports status {status}");
                    } else {
                        tracing::warn!("report of clone {clone} for unknown session {session} dropped");
                    }
                }
            }
        }
    }

    /// Tells the rest of the daemon what the endpoint decided.
    fn events(&mut self) {
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                HostEvent::Started(info) => {
                    let id = info.session.0;
                    tracing::info!(
                        "session {id}: discovered; {} pages ({} MiB), server {}, epoch {}, descriptor blob {}",
                        info.page_count,
                        (u64::from(info.page_count) * CACHE_PAGE_SIZE) >> 20,
                        info.server,
                        info.epoch,
                        info.descriptor
                    );
                    if let Some(s) = self.endpoint.session(info.session) {
                        self.registry.add_session(id, s.sink().sink.cache.clone());
                    }
                }
                HostEvent::Refused { session, reason } => tracing::warn!("session {} refused: {reason}", session.0),
                HostEvent::ServerMoved { session, from, to } => {
                    tracing::warn!("session {}: server moved from {from} to {to}", session.0);
                }
                HostEvent::Restarted { session, epoch } => {
                    tracing::warn!(
                        "session {}: server restarted (epoch {epoch}); waiting pages are asked again",
                        session.0
                    );
                    self.registry.recover(session.0);
                }
                HostEvent::Blob { session, kind, id, bytes } => {
                    DaemonStats::bump(&self.stats.counters.blobs_received);
                    tracing::info!("session {}: {kind:?} blob {id} arrived ({} bytes)", session.0, bytes.len());
                    if self.blobs.send(BlobEvent { session: session.0, kind, id, bytes }).is_err() {
                        tracing::warn!("session {}: blob {id} dropped: the children thread is gone", session.0);
                    }
                }
                HostEvent::Ended(session) => {
                    let reason = format!("session {}: the server ended the session", session.0);
                    let n = self.registry.fail_session(session.0, &reason);
                    tracing::warn!("{reason}; failing the waiting faults of {n} clones");
                }
                HostEvent::ServerLost(session) => {
                    let server = self.endpoint.session(session).map(|s| s.server().to_string()).unwrap_or_default();
                    let reason = format!(
                        "session {}: server {server} lost: silent for more than {:?} while pages were wanted",
                        session.0, self.server_timeout
                    );
                    let n = self.registry.fail_session(session.0, &reason);
                    tracing::error!("{reason}; failing the faults of {n} clones");
                }
                HostEvent::ServerBack(session) => {
                    self.registry.recover(session.0);
                    tracing::info!("session {}: the server is back; new clones are served again", session.0);
                }
                HostEvent::Retired { session, reason } => {
                    tracing::info!(
                        "session {}: retired ({reason:?}); its cache is freed once no clone holds it",
                        session.0
                    );
                    self.registry.retire(session.0);
                }
            }
        }
    }

    fn publish_sessions(&self) {
        let snapshots = self
            .endpoint
            .sessions()
            .map(|s| {
                let r = s.stats();
                SessionSnapshot {
                    session: s.id().0,
                    server: s.server().to_string(),
                    epoch: s.epoch().unwrap_or(0),
                    pages: s.page_count(),
                    pages_present: s.sink().sink.cache.present_count(),
                    lost: s.is_server_lost(),
                    ended: s.is_ended(),
                    restarts: s.restarts(),
                    faults_forwarded: s.sink().faults_forwarded,
                    requests: r.requests,
                    naks: r.naks,
                    receiver: r.clone(),
                }
            })
            .collect();
        self.stats.publish_sessions(snapshots);
        let c = &self.stats.counters;
        let h = self.endpoint.stats();
        c.pages_faulted_to_network.store(self.faults_forwarded, Ordering::Relaxed);
        c.datagrams_malformed.store(h.malformed + self.rx_truncated, Ordering::Relaxed);
        c.datagrams_from_hosts.store(h.from_hosts, Ordering::Relaxed);
        c.datagrams_unknown_session.store(h.unknown_session, Ordering::Relaxed);
        c.announces_unauthenticated.store(h.announces_unauthenticated, Ordering::Relaxed);
        c.sessions_refused.store(h.sessions_refused, Ordering::Relaxed);
        c.sink_errors.store(self.sink_errors.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    fn publish(&mut self, driver: &Driver) {
        self.publish_sessions();
        if let Some(c) = driver.io().counters() {
            self.stats.set_io_counters(c);
        }
    }
}
