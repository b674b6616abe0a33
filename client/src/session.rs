//! The host daemon's network side: one [`Session`] follows one multicast session of the memory server
//! and stores every page it carries into a [`PageCache`].
//!
//! The session only moves bytes: datagrams from the socket go into the protocol's
//! [`HostEndpoint`] (following this one session), the pages it produces go into the cache, and the
//! datagrams it wants sent go to the server. Every protocol decision (requests, read-ahead, NAKs,
//! repair, timers, epochs) is the endpoint's. The same [`Driver`] loop as the host daemon's runs it:
//!
//! ```text
//!  turn: recv_batch ─> HostEndpoint::handle_datagram ─> CacheSink ─> PageCache::insert / insert_zero
//!        on_turn: timers; events (ServerLost ─> error, Ended ─> done or error); a window of faults
//!        poll_transmit ─> send_batch (to the server)
//!        wait_with(READABLE, until the endpoint's next timer)
//! ```
//!
//! [`Session::fetch`] pulls a whole image, like a multicast file receiver.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netio::driver::{Driver, DriverConfig, Flow, Machine};
use netio::udp::UdpConfig;
use netio::{IoError, IoKind};
use spindrift_protocol::endpoint::{ids, HostConfig, HostEndpoint, HostEvent, SessionInfo};
use spindrift_protocol::receiver::{PageSink, ReceiverStats};
use spindrift_protocol::wire::{self, NodeId, SessionId, SessionKey};
use spindrift_protocol::Time;

use crate::cache::{CacheError, PageCache, CACHE_PAGE_SIZE};

/// The page size of a session: 4 KiB (page shift 12), as the server uses.
pub const PAGE_SHIFT: u8 = 12;
/// The server's default UDP port.
pub const DEFAULT_PORT: u16 = 7700;

/// Errors of the session: bad settings, socket set-up, I/O, and the server going away.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The group is not an administratively scoped multicast address.
    #[error("--group {0} is not a multicast address in 239.0.0.0/8")]
    NotMulticast(Ipv4Addr),
    /// An interface or server address that cannot be used.
    #[error("{what} {addr} is not a usable unicast IPv4 address")]
    BadAddress {
        /// Which flag.
        what: &'static str,
        /// The address given.
        addr: Ipv4Addr,
    },
    /// Port 0.
    #[error("--port 0 is not a valid port")]
    BadPort,
    /// An image without pages.
    #[error("the image has no pages: --pages must be at least 1")]
    NoPages,
    /// An image size that is not a whole number of pages.
    #[error("--image-bytes {0} is not a positive multiple of the 4096-byte page")]
    BadImageBytes(u64),
    /// Too many pages for the protocol's 32-bit page numbers.
    #[error("{0} pages is more than the protocol's 32-bit page numbers allow")]
    TooManyPages(u64),
    /// Node id 0 is the server's.
    #[error("--node 0 is reserved for the server; host node ids are non-zero")]
    ZeroNode,
    /// A window of 0 outstanding faults would never fetch anything.
    #[error("--window must be at least 1")]
    ZeroWindow,
    /// The key is not 64 hex digits.
    #[error("bad --key-hex: {0}")]
    BadKeyHex(String),
    /// The key file cannot be read or is not 32 bytes.
    #[error("bad --key-file {path}: {reason}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The protocol refused the receiver configuration.
    #[error("receiver configuration: {0}")]
    Receiver(#[from] spindrift_protocol::receiver::ConfigError),
    /// The page cache could not be set up or refused a page.
    #[error("page cache: {0}")]
    Cache(#[from] CacheError),
    /// The cache was made for a different image size.
    #[error("the page cache holds {cache} pages but the session has {session}")]
    CacheSize {
        /// Pages in the cache.
        cache: u64,
        /// Pages in the session.
        session: u32,
    },
    /// The socket could not be opened.
    #[error("opening the session socket: {0}")]
    Socket(#[from] netio::OpenError),
    /// A batch could not be allocated.
    #[error("allocating packet batches: {0}")]
    Batch(#[from] netio::BatchError),
    /// Receiving or waiting failed.
    #[error("network I/O: {0}")]
    Io(#[from] IoError),
    /// The receiver declared the server lost.
    #[error(
        "server {server} lost: silent for more than {timeout:?} while pages were wanted ({present} of {pages} pages \
         received)"
    )]
    ServerLost {
        /// The server's address.
        server: SocketAddrV4,
        /// The receiver's server timeout.
        timeout: Duration,
        /// Pages present.
        present: u64,
        /// Pages in the image.
        pages: u32,
    },
    /// The server ended the session before the image was complete.
    #[error("server {server} ended the session with {present} of {pages} pages received")]
    EndedEarly {
        /// The server's address.
        server: SocketAddrV4,
        /// Pages present.
        present: u64,
        /// Pages in the image.
        pages: u32,
    },
    /// The fetch did not finish in time.
    #[error("timed out after {timeout:?} with {present} of {pages} pages received")]
    Timeout {
        /// The limit.
        timeout: Duration,
        /// Pages present.
        present: u64,
        /// Pages in the image.
        pages: u32,
    },
}

/// Parses a 32-byte session key written as 64 hex digits.
pub fn parse_key_hex(text: &str) -> Result<SessionKey, SessionError> {
    let text = text.trim();
    if text.len() != 64 {
        return Err(SessionError::BadKeyHex(format!(
            "expected 64 hex digits (32 bytes), got {} characters",
            text.len()
        )));
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        let pair = &text[2 * i..2 * i + 2];
        *byte = u8::from_str_radix(pair, 16)
            .map_err(|_| SessionError::BadKeyHex(format!("{pair:?} at position {} is not hex", 2 * i)))?;
    }
    Ok(SessionKey(key))
}

/// Reads a session key from a file holding exactly 32 raw bytes.
pub fn read_key_file(path: &Path) -> Result<SessionKey, SessionError> {
    let bad = |reason: String| SessionError::BadKeyFile { path: path.to_path_buf(), reason };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let key: [u8; 32] =
        bytes.as_slice().try_into().map_err(|_| bad(format!("holds {} bytes, a key is 32 raw bytes", bytes.len())))?;
    Ok(SessionKey(key))
}

/// Pages in an image of `bytes` bytes.
pub fn pages_for_bytes(bytes: u64) -> Result<u32, SessionError> {
    if bytes == 0 || !bytes.is_multiple_of(CACHE_PAGE_SIZE) {
        return Err(SessionError::BadImageBytes(bytes));
    }
    let pages = bytes / CACHE_PAGE_SIZE;
    u32::try_from(pages).map_err(|_| SessionError::TooManyPages(pages))
}

/// The default node id of a host: its interface address as a number (unique in the subnet).
pub fn default_node(interface: Ipv4Addr) -> u32 {
    ids::node_id_for(interface).0
}

/// A packet number no earlier run of this host used (the wall clock in microseconds).
pub fn first_packet_number() -> u64 {
    ids::packet_number_base(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// How a session is set up.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The server's unicast address (its interface address and the session port).
    pub server: SocketAddrV4,
    /// This host's interface address (multicast is joined there).
    pub interface: Ipv4Addr,
    /// The session's multicast group (in 239.0.0.0/8).
    pub group: Ipv4Addr,
    /// The session's UDP port.
    pub port: u16,
    /// The session id.
    pub session: u64,
    /// The session key.
    pub key: SessionKey,
    /// This host's node id (non-zero).
    pub node: u32,
    /// Pages in the image (4 KiB each).
    pub pages: u32,
    /// Pages the receiver reads ahead after each fault (default 0: the fetch's window already asks
    /// ahead, and read-ahead would raise the window's next pages above prefetch on every arrival,
    /// a stream of demand that can keep a push from starting).
    pub read_ahead: u16,
    /// Fetch mode: pages outstanding at once.
    pub window: usize,
    /// Fetch mode: also prefetch every page at the start (faults then only raise priorities).
    pub prefetch_all: bool,
    /// Let arrivals gather this long before taking them (see `netio::driver::DriverConfig::coalesce`):
    /// a fetch is bulk, nothing waits on one page, and a paced stream otherwise costs a wake-up
    /// per datagram. Zero: take each as it comes.
    pub coalesce: Duration,
    /// Fetch mode: give up after this long.
    pub timeout: Duration,
    /// The packet I/O backend.
    pub io: IoKind,
}

impl SessionConfig {
    /// A configuration with the defaults (port 7700 unless changed, node id from the interface address,
    /// read-ahead 16, window 256, 60 s timeout).
    pub fn new(
        server: Ipv4Addr,
        interface: Ipv4Addr,
        group: Ipv4Addr,
        session: u64,
        key: SessionKey,
        pages: u32,
    ) -> SessionConfig {
        SessionConfig {
            server: SocketAddrV4::new(server, DEFAULT_PORT),
            interface,
            group,
            port: DEFAULT_PORT,
            session,
            key,
            node: default_node(interface),
            pages,
            read_ahead: 0,
            window: 256,
            prefetch_all: false,
            coalesce: DEFAULT_COALESCE,
            timeout: Duration::from_secs(60),
            io: IoKind::Udp,
        }
    }

    /// Sets the port (of the server and of the group).
    pub fn port(mut self, port: u16) -> SessionConfig {
        self.port = port;
        self.server.set_port(port);
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), SessionError> {
        if self.group.octets()[0] != 239 {
            return Err(SessionError::NotMulticast(self.group));
        }
        for (what, addr) in [("--iface", self.interface), ("--server", *self.server.ip())] {
            if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
                return Err(SessionError::BadAddress { what, addr });
            }
        }
        if self.port == 0 || self.server.port() == 0 {
            return Err(SessionError::BadPort);
        }
        if self.pages == 0 {
            return Err(SessionError::NoPages);
        }
        if self.node == 0 {
            return Err(SessionError::ZeroNode);
        }
        if self.window == 0 {
            return Err(SessionError::ZeroWindow);
        }
        Ok(())
    }
}

/// Stores the receiver's pages into a page cache; pages the cache refuses are logged and counted
/// in `errors` (shared, so the count outlives the session).
pub(crate) struct CacheSink {
    /// The cache to fill.
    pub(crate) cache: Arc<PageCache>,
    /// Pages the cache refused.
    pub(crate) errors: Arc<AtomicU64>,
}

impl CacheSink {
    /// A sink into `cache`, counting refusals in `errors`.
    pub(crate) fn new(cache: Arc<PageCache>, errors: Arc<AtomicU64>) -> CacheSink {
        CacheSink { cache, errors }
    }
}

impl PageSink for CacheSink {
    fn store(&mut self, page: u32, data: &[u8]) {
        if let Err(e) = self.cache.insert(u64::from(page), data) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("page {page} not stored: {e}");
        }
    }

    fn store_zero(&mut self, first_page: u32, count: u32) {
        if let Err(e) = self.cache.insert_zero(u64::from(first_page), u64::from(count)) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("zero pages {first_page}+{count} not stored: {e}");
        }
    }
}

/// Progress of a fetch, handed to the progress callback about once a second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Pages present.
    pub present: u64,
    /// Pages in the image.
    pub pages: u32,
    /// Time since the fetch started.
    pub elapsed: Duration,
    /// Pages per second over the last interval.
    pub pages_per_sec: f64,
}

/// The result of a whole-image fetch.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchReport {
    /// Pages fetched.
    pub pages: u32,
    /// Image bytes.
    pub bytes: u64,
    /// Wall time of the fetch, seconds.
    pub seconds: f64,
    /// Image megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Requests sent.
    pub requests: u64,
    /// NAKs sent.
    pub naks: u64,
    /// The receiver's counters.
    pub receiver: ReceiverStats,
}

/// One host's side of a session: a host endpoint following it, its packet I/O and the cache it
/// fills. See the module docs.
pub struct Session {
    config: SessionConfig,
    driver: Driver,
    endpoint: HostEndpoint<CacheSink>,
    cache: Arc<PageCache>,
    sink_errors: Arc<AtomicU64>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("config", &self.config)
            .field("io", &self.driver.io().capabilities().summary())
            .field("present", &self.cache.present_count())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Opens a session: validates `config`, binds `0.0.0.0:port` joined to the group on the
    /// interface, and follows the session. `cache` must hold exactly `config.pages` pages.
    pub fn open(config: SessionConfig, cache: Arc<PageCache>) -> Result<Session, SessionError> {
        config.validate()?;
        if cache.page_count() != u64::from(config.pages) {
            return Err(SessionError::CacheSize { cache: cache.page_count(), session: config.pages });
        }
        let io = netio::open(config.io, &UdpConfig::new(config.interface, config.port).join(config.group))?;
        let driver =
            Driver::new(io, DriverConfig::new(wire::MAX_DATAGRAM, wire::MIN_DATAGRAM).coalesce(config.coalesce))?;
        let mut hc = HostConfig::new(NodeId(config.node), config.key.clone(), PAGE_SHIFT);
        hc.read_ahead = config.read_ahead;
        hc.max_sessions = 1;
        hc.first_packet_number = first_packet_number();
        hc.seed = hc.first_packet_number ^ u64::from(config.node);
        let mut endpoint = HostEndpoint::new(hc)?;
        let sink_errors = Arc::new(AtomicU64::new(0));
        endpoint.follow(
            Time::ZERO,
            SessionId(config.session),
            config.pages,
            config.server,
            CacheSink::new(cache.clone(), sink_errors.clone()),
        )?;
        Ok(Session { config, driver, endpoint, cache, sink_errors })
    }

    /// Opens a session with a new cache of the right size.
    pub fn open_with_new_cache(config: SessionConfig) -> Result<Session, SessionError> {
        let cache = Arc::new(PageCache::new(u64::from(config.pages) * CACHE_PAGE_SIZE)?);
        Session::open(config, cache)
    }

    /// The cache the session fills.
    pub fn cache(&self) -> &Arc<PageCache> {
        &self.cache
    }

    /// The receiver's counters.
    pub fn stats(&self) -> ReceiverStats {
        self.endpoint.session(SessionId(self.config.session)).map(|s| s.stats().clone()).unwrap_or_default()
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Pages the cache could not store (should stay 0).
    pub fn sink_errors(&self) -> u64 {
        self.sink_errors.load(Ordering::Relaxed)
    }

    /// Pulls the whole image into the cache: asks for the pages in order, keeping `window` of them
    /// outstanding (the oldest as a fault, with the receiver's read-ahead; the rest as prefetch),
    /// until every page is present. While the server's push brings pages, it asks for nothing
    /// new and leaves the stream to deliver them (PROTOCOL.md section 10). `progress` is called
    /// about once a second.
    pub fn fetch(&mut self, mut progress: impl FnMut(&Progress)) -> Result<FetchReport, SessionError> {
        let pages = self.config.pages;
        let started = Instant::now();
        let id = SessionId(self.config.session);
        if self.config.prefetch_all {
            let all: Vec<u32> = (0..pages).collect();
            self.endpoint.prefetch(id, &all);
        }
        let mut fetch = Fetch {
            endpoint: &mut self.endpoint,
            config: &self.config,
            cache: &self.cache,
            id,
            next: 0,
            outstanding: VecDeque::with_capacity(self.config.window),
            faulted: None,
            head: None,
            deadline: started + self.config.timeout,
            started,
            last_report: (started, 0),
            progress: &mut progress,
            outcome: None,
        };
        self.driver.run(&mut fetch, Duration::from_millis(200))?;
        if let Some(Err(e)) = fetch.outcome {
            return Err(e);
        }
        let seconds = started.elapsed().as_secs_f64();
        let bytes = u64::from(pages) * CACHE_PAGE_SIZE;
        let stats = self.stats();
        Ok(FetchReport {
            pages,
            bytes,
            seconds,
            mb_per_s: bytes as f64 / 1e6 / seconds.max(1e-9),
            requests: stats.requests,
            naks: stats.naks,
            receiver: stats,
        })
    }
}

/// The fetch's default [`SessionConfig::coalesce`].
pub const DEFAULT_COALESCE: Duration = Duration::from_micros(500);

/// Push data within this long means a push is bringing pages: the fetch asks for nothing new.
const PUSH_QUIET: Duration = Duration::from_millis(50);

/// During a push, the lowest missing page is faulted once it has waited this long.
const HEAD_PATIENCE: Duration = Duration::from_millis(20);

/// A whole-image fetch as the driver's machine: a window of pages in page order, its head a fault.
struct Fetch<'a> {
    endpoint: &'a mut HostEndpoint<CacheSink>,
    config: &'a SessionConfig,
    cache: &'a PageCache,
    id: SessionId,
    next: u32,
    /// Pages asked for and not yet present, in page order.
    outstanding: VecDeque<u32>,
    /// The page at the window's head last asked for as a fault.
    faulted: Option<u32>,
    /// The lowest page waited for, and since when.
    head: Option<(u32, Time)>,
    deadline: Instant,
    started: Instant,
    /// When progress was last reported, and the pages present then.
    last_report: (Instant, u64),
    progress: &'a mut dyn FnMut(&Progress),
    /// Set when the fetch is over: done, or why not.
    outcome: Option<Result<(), SessionError>>,
}

impl Fetch<'_> {
    fn present(&self) -> u64 {
        self.cache.present_count()
    }

    /// What the endpoint says about the session: an error ends the fetch.
    fn events(&mut self) -> Option<Result<(), SessionError>> {
        let pages = self.config.pages;
        while let Some(event) = self.endpoint.poll_event() {
            match event {
                HostEvent::ServerLost(_) => {
                    return Some(Err(SessionError::ServerLost {
                        server: self.config.server,
                        timeout: self.endpoint.config().server_timeout,
                        present: self.present(),
                        pages,
                    }));
                }
                HostEvent::Ended(_) => {
                    tracing::info!("server {} ended the session", self.config.server);
                    if !self.cache.all_present(0, u64::from(pages)) {
                        return Some(Err(SessionError::EndedEarly {
                            server: self.config.server,
                            present: self.present(),
                            pages,
                        }));
                    }
                }
                HostEvent::Restarted { epoch, .. } => {
                    tracing::warn!(
                        "server {} restarted (epoch {epoch}): waiting pages asked again",
                        self.config.server
                    );
                }
                HostEvent::ServerMoved { from, to, .. } => tracing::warn!("server moved from {from} to {to}"),
                HostEvent::Blob { kind, id, bytes, .. } => {
                    tracing::debug!("blob {kind:?} {id} ({} bytes) ignored in fetch mode", bytes.len());
                }
                HostEvent::Started(_)
                | HostEvent::Refused { .. }
                | HostEvent::ServerBack(_)
                | HostEvent::Retired { .. } => {}
            }
        }
        None
    }
}

impl Machine for Fetch<'_> {
    fn on_datagram(&mut self, now: Duration, source: SocketAddrV4, datagram: &mut [u8]) {
        let mut no_new_sessions = |_: &SessionInfo| Err("this fetch follows one session".to_string());
        self.endpoint.handle_datagram(Time::ZERO + now, source, datagram, &mut no_new_sessions);
    }

    fn on_turn(&mut self, now: Duration) -> Flow {
        let now = Time::ZERO + now;
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        if let Some(outcome) = self.events() {
            self.outcome = Some(outcome);
            return Flow::Stop;
        }
        let pages = self.config.pages;
        let Some(session) = self.endpoint.session(self.id) else {
            self.outcome =
                Some(Err(SessionError::EndedEarly { server: self.config.server, present: self.present(), pages }));
            return Flow::Stop;
        };
        while self.outstanding.front().is_some_and(|&p| session.has_page(p)) {
            self.outstanding.pop_front();
        }
        // While a push brings pages (PROTOCOL.md section 10), the stream is the fetch: it comes
        // in page order, repaired by NAK, so nothing new is asked for, and the lowest missing page
        // is faulted only once it has waited HEAD_PATIENCE (lost past repair, or the push went
        // elsewhere). Asking ahead of a push only took the push's turn and, paced, filled the link
        // with requests (`bench line-rate`).
        let pushing = session.last_push_at().is_some_and(|t| now.saturating_since(t) < PUSH_QUIET);
        if pushing {
            while self.outstanding.is_empty() && self.next < pages && session.has_page(self.next) {
                self.next += 1;
            }
        } else {
            // The window is bulk: nothing waits on its pages, so they are asked for as prefetch,
            // and only the oldest (what the fetch waits on) as a fault. A server answers a fault
            // out of the stream during a push (PROTOCOL.md 8.2) and then pushes the page again: a
            // whole window of faults would be sent twice, and would take other hosts' faults'
            // turn.
            let first_new = self.outstanding.len();
            while self.outstanding.len() < self.config.window && self.next < pages {
                if !session.has_page(self.next) {
                    self.outstanding.push_back(self.next);
                }
                self.next += 1;
            }
            let fresh: Vec<u32> = self.outstanding.iter().skip(first_new).copied().collect();
            if !fresh.is_empty() {
                self.endpoint.prefetch(self.id, &fresh);
            }
        }
        let head = self.outstanding.front().copied().or((pushing && self.next < pages).then_some(self.next));
        if let Some(head) = head {
            if self.head.is_none_or(|(p, _)| p != head) {
                self.head = Some((head, now));
            }
            let waited = self.head.map_or(Duration::ZERO, |(_, since)| now.saturating_since(since));
            if self.faulted != Some(head) && (!pushing || waited >= HEAD_PATIENCE) {
                self.faulted = Some(head);
                if self.outstanding.is_empty() {
                    self.outstanding.push_back(head);
                    self.next = head + 1;
                }
                self.endpoint.fault(now, self.id, head);
            }
        }
        let present = self.present();
        if present >= u64::from(pages) && self.outstanding.is_empty() && self.next >= pages {
            self.outcome = Some(Ok(()));
            return Flow::Stop;
        }
        if Instant::now() >= self.deadline {
            self.outcome = Some(Err(SessionError::Timeout { timeout: self.config.timeout, present, pages }));
            return Flow::Stop;
        }
        let (at, before) = self.last_report;
        if at.elapsed() >= Duration::from_secs(1) {
            let dt = at.elapsed().as_secs_f64();
            (self.progress)(&Progress {
                present,
                pages,
                elapsed: self.started.elapsed(),
                pages_per_sec: present.saturating_sub(before) as f64 / dt,
            });
            self.last_report = (Instant::now(), present);
        }
        Flow::Continue
    }

    fn poll_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Option<(SocketAddrV4, usize)> {
        self.endpoint.poll_transmit(Time::ZERO + now, buf).map(|t| (t.destination, t.len))
    }

    fn poll_timeout(&self) -> Option<Duration> {
        self.endpoint.poll_timeout().map(|t| t - Time::ZERO)
    }
}
