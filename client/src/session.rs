//! The host daemon's network side: one [`Session`] follows one multicast session of the memory server
//! and stores every page it carries into a [`PageCache`].
//!
//! The session only moves bytes: datagrams from the socket go into the protocol's
//! [`Receiver`], the pages it produces go into the cache, and the datagrams it wants sent go to the
//! server's unicast address. Every protocol decision (requests, read-ahead, NAKs, repair, timers) is
//! the receiver's. One thread drives a session:
//!
//! ```text
//!  loop: recv_batch ─> Receiver::handle_datagram ─> CacheSink ─> PageCache::insert / insert_zero
//!        handle_timeout when due; faults/prefetches (fetch mode: a window of faults in page order)
//!        poll_transmit ─> TxBatch ─> send_batch (unicast to the server)
//!        poll_event: ServerLost ─> error, Ended ─> stop, ServerRestarted ─> log
//!        wait(READABLE, min(poll_timeout, 100 ms))
//! ```
//!
//! [`Session::fetch`] pulls a whole image, like a multicast file receiver.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netio::udp::UdpConfig;
use netio::{Interest, IoError, IoKind, PacketIo, RxBatch, TxBatch};
use spindrift_protocol::receiver::{PageSink, Receiver, ReceiverConfig, ReceiverEvent, ReceiverStats};
use spindrift_protocol::wire::{self, NodeId, SessionId, SessionKey};
use spindrift_protocol::Time;

use crate::cache::{CacheError, PageCache, CACHE_PAGE_SIZE};

/// The page size of a session: 4 KiB (page shift 12), as the server uses.
pub const PAGE_SHIFT: u8 = 12;
/// The server's default UDP port.
pub const DEFAULT_PORT: u16 = 7700;
/// The longest the loop sleeps without looking at its timers.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Datagrams per receive/send batch.
const BATCH: usize = 64;

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
    u32::from(interface)
}

/// A packet number no earlier run of this host used: the current unix time in microseconds.
pub fn first_packet_number() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
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
    /// Pages the receiver reads ahead after each fault.
    pub read_ahead: u16,
    /// Fetch mode: faults outstanding at once.
    pub window: usize,
    /// Fetch mode: also prefetch every page at the start (faults then only raise priorities).
    pub prefetch_all: bool,
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
            read_ahead: 16,
            window: 256,
            prefetch_all: false,
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

/// Sends everything in `tx` (to `whom`, for the log), waiting up to 200 ms for socket space; what still
/// does not fit is dropped and logged (the receiver's timers ask again, as after a loss). Clears `tx`.
pub(crate) fn flush_batch(io: &mut dyn PacketIo, tx: &mut TxBatch, whom: &str) -> Result<(), IoError> {
    let deadline = Instant::now() + Duration::from_millis(200);
    while !tx.is_sent() {
        match io.send_batch(tx) {
            Ok(_) => {}
            // One datagram failed (and was dropped): the receiver's timers will ask again.
            Err(e @ IoError::Send { .. }) => tracing::warn!("{e}"),
            Err(e) => return Err(e),
        }
        if !tx.is_sent() {
            if Instant::now() >= deadline {
                tracing::warn!("socket full: dropping {} datagrams to {whom}", tx.pending());
                break;
            }
            io.wait(Interest::WRITABLE, Some(Duration::from_millis(10)))?;
        }
    }
    tx.clear();
    Ok(())
}

/// Stores the receiver's pages into the page cache.
pub(crate) struct CacheSink<'a> {
    /// The cache to fill.
    pub(crate) cache: &'a PageCache,
    /// Pages the cache refused (logged).
    pub(crate) errors: u64,
}

impl PageSink for CacheSink<'_> {
    fn store(&mut self, page: u32, data: &[u8]) {
        if let Err(e) = self.cache.insert(u64::from(page), data) {
            self.errors += 1;
            tracing::error!("page {page} not stored: {e}");
        }
    }

    fn store_zero(&mut self, first_page: u32, count: u32) {
        if let Err(e) = self.cache.insert_zero(u64::from(first_page), u64::from(count)) {
            self.errors += 1;
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

/// Why [`Session::poll`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polled {
    /// Keep going.
    Running,
    /// The server ended the session.
    Ended,
}

/// One host's side of a session: a receiver, its socket and the cache it fills. See the module docs.
pub struct Session {
    config: SessionConfig,
    receiver: Receiver,
    io: Box<dyn PacketIo + Send>,
    cache: Arc<PageCache>,
    rx: RxBatch,
    tx: TxBatch,
    start: Instant,
    ended: bool,
    sink_errors: u64,
    server_timeout: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("config", &self.config)
            .field("io", &self.io.capabilities().summary())
            .field("present", &self.cache.present_count())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Opens a session: validates `config`, binds `0.0.0.0:port` joined to the group on the
    /// interface, and sets up the receiver. `cache` must hold exactly `config.pages` pages.
    pub fn open(config: SessionConfig, cache: Arc<PageCache>) -> Result<Session, SessionError> {
        config.validate()?;
        if cache.page_count() != u64::from(config.pages) {
            return Err(SessionError::CacheSize { cache: cache.page_count(), session: config.pages });
        }
        let io = netio::open(config.io, &UdpConfig::new(config.interface, config.port).join(config.group))?;
        let start = Instant::now();
        let mut rc = ReceiverConfig::new(
            SessionId(config.session),
            NodeId(config.node),
            config.key.clone(),
            PAGE_SHIFT,
            config.pages,
        );
        rc.read_ahead = config.read_ahead;
        rc.first_packet_number = first_packet_number();
        rc.seed = rc.first_packet_number ^ u64::from(config.node);
        let server_timeout = rc.server_timeout;
        let receiver = Receiver::new(rc, Time::ZERO)?;
        Ok(Session {
            receiver,
            io,
            cache,
            rx: RxBatch::new(BATCH, wire::MAX_DATAGRAM)?,
            tx: TxBatch::new(BATCH, wire::MIN_DATAGRAM)?,
            start,
            ended: false,
            sink_errors: 0,
            server_timeout,
            config,
        })
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
    pub fn stats(&self) -> &ReceiverStats {
        self.receiver.stats()
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Pages the cache could not store (should stay 0).
    pub fn sink_errors(&self) -> u64 {
        self.sink_errors
    }

    fn now(&self) -> Time {
        Time::from_nanos(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    /// A clone touched `page`: true when it is present, else it is requested (with read-ahead).
    pub fn fault(&mut self, page: u32) -> bool {
        let now = self.now();
        self.receiver.fault(now, page)
    }

    /// Asks for pages ahead of need, at the lowest priority.
    pub fn prefetch(&mut self, pages: &[u32]) {
        self.receiver.prefetch(pages);
    }

    /// True when the receiver holds `page`.
    pub fn has_page(&self, page: u32) -> bool {
        self.receiver.has_page(page)
    }

    /// One turn of the event loop: takes what arrived, runs due timers, sends what the receiver
    /// wants sent, handles its events, then sleeps until a datagram arrives, the receiver's next
    /// timer, or `max_wait` (at most 100 ms).
    pub fn poll(&mut self, max_wait: Duration) -> Result<Polled, SessionError> {
        self.receive()?;
        let now = self.now();
        if self.receiver.poll_timeout().is_some_and(|t| t <= now) {
            self.receiver.handle_timeout(now);
        }
        self.transmit()?;
        if let Some(polled) = self.events()? {
            return Ok(polled);
        }
        let now = self.now();
        let mut wait = max_wait.min(MAX_SLEEP);
        if let Some(t) = self.receiver.poll_timeout() {
            wait = wait.min(t.saturating_since(now));
        }
        if !wait.is_zero() {
            self.io.wait(Interest::READABLE, Some(wait))?;
        }
        Ok(if self.ended { Polled::Ended } else { Polled::Running })
    }

    /// Drains the socket into the receiver (and the receiver's pages into the cache).
    fn receive(&mut self) -> Result<(), SessionError> {
        let mut sink = CacheSink { cache: &self.cache, errors: 0 };
        let result = loop {
            let n = match self.io.recv_batch(&mut self.rx) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            let now = Time::from_nanos(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX));
            for i in 0..n {
                if self.rx.get(i).is_some_and(|d| d.truncated) {
                    tracing::debug!("dropping a truncated datagram");
                    continue;
                }
                if let Some(payload) = self.rx.payload_mut(i) {
                    self.receiver.handle_datagram(now, payload, &mut sink);
                }
            }
            if n < self.rx.capacity() {
                break Ok(());
            }
        };
        self.sink_errors += sink.errors;
        Ok(result?)
    }

    /// Sends everything the receiver has to send, to the server.
    fn transmit(&mut self) -> Result<(), SessionError> {
        let now = self.now();
        loop {
            let receiver = &mut self.receiver;
            let queued = self.tx.push_with(self.config.server, |buf| receiver.poll_transmit(now, buf))?;
            if queued.is_none() || self.tx.is_full() {
                self.flush()?;
            }
            if queued.is_none() {
                return Ok(());
            }
        }
    }

    fn flush(&mut self) -> Result<(), SessionError> {
        Ok(flush_batch(&mut self.io, &mut self.tx, "the server")?)
    }

    fn events(&mut self) -> Result<Option<Polled>, SessionError> {
        while let Some(event) = self.receiver.poll_event() {
            match event {
                ReceiverEvent::ServerLost => {
                    return Err(SessionError::ServerLost {
                        server: self.config.server,
                        timeout: self.server_timeout,
                        present: self.cache.present_count(),
                        pages: self.config.pages,
                    });
                }
                ReceiverEvent::Ended => {
                    tracing::info!("server {} ended the session", self.config.server);
                    self.ended = true;
                    return Ok(Some(Polled::Ended));
                }
                ReceiverEvent::ServerRestarted { epoch } => {
                    tracing::warn!(
                        "server {} restarted (epoch {epoch}): waiting pages asked again",
                        self.config.server
                    );
                }
                ReceiverEvent::Blob { kind, id, bytes } => {
                    tracing::debug!("blob {kind:?} {id} ({} bytes) ignored in fetch mode", bytes.len());
                }
            }
        }
        Ok(None)
    }

    /// Pulls the whole image into the cache: faults the pages in order, keeping `window` faults
    /// outstanding (plus the receiver's read-ahead), until every page is present. `progress` is
    /// called about once a second.
    pub fn fetch(&mut self, mut progress: impl FnMut(&Progress)) -> Result<FetchReport, SessionError> {
        let pages = self.config.pages;
        let started = Instant::now();
        let deadline = started + self.config.timeout;
        if self.config.prefetch_all {
            let all: Vec<u32> = (0..pages).collect();
            self.receiver.prefetch(&all);
        }
        let mut next = 0u32;
        let mut outstanding: VecDeque<u32> = VecDeque::with_capacity(self.config.window);
        let (mut last_report, mut last_present) = (started, 0u64);
        loop {
            while outstanding.front().is_some_and(|&p| self.receiver.has_page(p)) {
                outstanding.pop_front();
            }
            let now = self.now();
            while outstanding.len() < self.config.window && next < pages {
                if !self.receiver.fault(now, next) {
                    outstanding.push_back(next);
                }
                next += 1;
            }
            let present = self.cache.present_count();
            if present >= u64::from(pages) && outstanding.is_empty() && next >= pages {
                break;
            }
            if Instant::now() >= deadline {
                return Err(SessionError::Timeout { timeout: self.config.timeout, present, pages });
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                let dt = last_report.elapsed().as_secs_f64();
                progress(&Progress {
                    present,
                    pages,
                    elapsed: started.elapsed(),
                    pages_per_sec: present.saturating_sub(last_present) as f64 / dt,
                });
                (last_report, last_present) = (Instant::now(), present);
            }
            if self.poll(Duration::from_millis(20))? == Polled::Ended && !self.cache.all_present(0, u64::from(pages)) {
                // Take what is still queued on the socket before judging.
                self.receive()?;
                if !self.cache.all_present(0, u64::from(pages)) {
                    return Err(SessionError::EndedEarly {
                        server: self.config.server,
                        present: self.cache.present_count(),
                        pages,
                    });
                }
            }
        }
        // Tell the server what we hold now rather than at the next status tick.
        self.transmit()?;
        let seconds = started.elapsed().as_secs_f64();
        let bytes = u64::from(pages) * CACHE_PAGE_SIZE;
        let stats = self.receiver.stats().clone();
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
