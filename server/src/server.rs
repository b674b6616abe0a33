//! The server's side of the [`Driver`] loop: moves bytes between the packet I/O and the protocol's
//! sender, nothing more (the same loop drives the host daemon and `fetch`).
//!
//! [`serve_source`] is the library entry point: any [`PageSource`] (a mapped file, a memfd handed
//! over by a local VMM, a forked VMM's own guest memory) is served under a [`ServerConfig`] until a
//! stop flag is set, the configured duration passes or a [`ServeCommand::End`] arrives. [`serve`]
//! is the command line's wrapper around it.

use std::net::SocketAddrV4;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netio::driver::{Driver, DriverConfig, Flow, Machine};
use netio::udp::{Bind, UdpConfig};
use netio::IoError;
use spindrift_protocol::endpoint::ServerEndpoint;
use spindrift_protocol::sender::{PageSource, PushPolicy, Sender, SenderEvent, SenderStats};
use spindrift_protocol::wire::{BlobKind, EndReason, Priority, SessionId, MIN_DATAGRAM};
use spindrift_protocol::Time;

use crate::config::{ConfigError, ImageInput, ServerConfig, PAGE_SHIFT};
use crate::handover::HandoverError;
use crate::image::MmapImage;

/// How often the one-line summary is logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(2);
/// Longest time spent flushing the End messages after a stop.
const END_FLUSH_LIMIT: Duration = Duration::from_secs(2);
/// The default interval of [`ServeOptions::stats_every`].
pub const DEFAULT_STATS_EVERY: Duration = Duration::from_secs(1);

/// What stopped the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration (or the image) was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The protocol sender refused its configuration.
    #[error("{0}")]
    Sender(#[from] spindrift_protocol::sender::ConfigError),
    /// The page source does not fit the server's page size.
    #[error("the page source has {0} pages of another size than the server's 4096 bytes, or none")]
    Source(u32),
    /// No image was configured for [`serve`] (a program passes its source to [`serve_source`]).
    #[error("no image to serve: give --image or --image-socket")]
    NoImage,
    /// The memory handover over the Unix socket failed.
    #[error(transparent)]
    Handover(#[from] HandoverError),
    /// The packet I/O backend could not be opened.
    #[error("opening the packet I/O backend: {0}")]
    Open(#[from] netio::OpenError),
    /// The data path failed.
    #[error("{0}")]
    Io(#[from] IoError),
    /// The batches could not be allocated.
    #[error("allocating packet batches: {0}")]
    Batch(#[from] netio::BatchError),
    /// The statistics file could not be written.
    #[error("--stats-json {path}: {source}")]
    Stats {
        /// The path.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
}

impl ServerError {
    /// The process exit code for this error: 2 for configuration errors, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServerError::Config(_) | ServerError::Sender(_) | ServerError::NoImage => 2,
            _ => 1,
        }
    }
}

/// A command to a running server, sent over [`ServeOptions::commands`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeCommand {
    /// Adds a blob (a VM descriptor or a fork plan) to the stream, ahead of pages.
    PublishBlob {
        /// Descriptor or fork plan.
        kind: BlobKind,
        /// Its id (unique within the session; a blob's content never changes).
        id: u32,
        /// Its bytes (at most 16 MiB).
        bytes: Vec<u8>,
    },
    /// Queues pages as if a host had asked for them (e.g. a local VMM's working-set hints).
    EnqueuePages {
        /// The pages (those past the image are ignored).
        pages: Vec<u32>,
        /// Their priority.
        priority: Priority,
    },
    /// Ends the session (End goes out) and returns, like the stop flag.
    End(EndReason),
}

/// A callback for sender events (see [`ServeOptions::on_event`]).
pub type EventHook = Box<dyn FnMut(&SenderEvent) + Send>;
/// A callback for the counters (see [`ServeOptions::on_stats`]).
pub type StatsHook = Box<dyn FnMut(&SenderStats) + Send>;

/// What a server does besides serving pages: blobs to publish first, the push, and where its
/// events and counters go.
pub struct ServeOptions {
    /// Blobs published before anything else, in this order: (kind, id, bytes). A VM descriptor
    /// also becomes the session's descriptor in Announce. They go out once the first host is heard
    /// from and again for hosts that join after they went out.
    pub blobs: Vec<(BlobKind, u32, Vec<u8>)>,
    /// Replaces the configured push (e.g. `HintsThenAll(working_set)`); None keeps
    /// [`ServerConfig::push`].
    pub push: Option<PushPolicy>,
    /// Called with every sender event (hosts joining and lost, clone reports), on the serving
    /// thread; keep it short (send it on a channel or a pipe).
    pub on_event: Option<EventHook>,
    /// Called with the counters every [`ServeOptions::stats_every`] and once at the end.
    pub on_stats: Option<StatsHook>,
    /// How often the counters go to `on_stats` and the `--stats-json` file.
    pub stats_every: Duration,
    /// Commands for the running server (blobs published later, hints, end).
    pub commands: Option<mpsc::Receiver<ServeCommand>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            blobs: Vec::new(),
            push: None,
            on_event: None,
            on_stats: None,
            stats_every: DEFAULT_STATS_EVERY,
            commands: None,
        }
    }
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("blobs", &self.blobs.iter().map(|(k, id, b)| (k, id, b.len())).collect::<Vec<_>>())
            .field("push", &self.push)
            .field("on_event", &self.on_event.is_some())
            .field("on_stats", &self.on_stats.is_some())
            .field("stats_every", &self.stats_every)
            .field("commands", &self.commands.is_some())
            .finish()
    }
}

/// Serves the image `config.image` names (an `--image` file, or the memory a local VMM hands over
/// on `--image-socket`) until `stop` is set or `--duration-s` passes; see [`serve_source`]. Stopped
/// while still waiting for a VMM, it returns empty statistics.
pub fn serve(config: &ServerConfig, stop: &AtomicBool) -> Result<SenderStats, ServerError> {
    match &config.image {
        None => Err(ServerError::NoImage),
        Some(ImageInput::File { path, .. }) => {
            let image = MmapImage::open(path)?;
            serve_source(config, image, ServeOptions::default(), stop)
        }
        Some(ImageInput::Socket(path)) => {
            let handed = match crate::handover::receive(path, config, stop) {
                Ok(h) => h,
                Err(HandoverError::Stopped(_)) => {
                    tracing::info!("stopped before any VMM handed memory over");
                    return Ok(SenderStats::default());
                }
                Err(e) => return Err(e.into()),
            };
            let (config, options) = handed.session(config)?;
            serve_source(&config, handed.image, options, stop)
        }
    }
}

/// Serves `source` under `config` until `stop` is set, `config.duration` passes or a
/// [`ServeCommand::End`] arrives; then ends the session, flushes the End messages, writes
/// `config.stats_json` and returns the final counters.
///
/// `options.blobs` are published before the first page. The source must not change while it is
/// served (a frozen snapshot, a paused VM's memory, a forked child's copy-on-write view).
pub fn serve_source<S: PageSource>(
    config: &ServerConfig,
    source: S,
    options: ServeOptions,
    stop: &AtomicBool,
) -> Result<SenderStats, ServerError> {
    let udp = UdpConfig::new(config.iface, config.port).bind(Bind::Interface).multicast_ttl(1).gso(config.gso);
    let io = netio::open(config.io, &udp)?;
    serve_source_on(config, source, options, stop, io)
}

/// As [`serve_source`], over a packet I/O the caller opened (bound to the server's address; the
/// in-memory network of the tests, say) instead of the one `config.io` names.
pub fn serve_source_on<S: PageSource>(
    config: &ServerConfig,
    source: S,
    mut options: ServeOptions,
    stop: &AtomicBool,
    io: Box<dyn netio::PacketIo + Send>,
) -> Result<SenderStats, ServerError> {
    let pages = source.page_count();
    if pages == 0 || source.page(0).len() != 1 << PAGE_SHIFT {
        return Err(ServerError::Source(pages));
    }
    let mut sender = Sender::new(config.sender_config(options.push.take()), source, Time::ZERO)?;
    for (kind, id, bytes) in std::mem::take(&mut options.blobs) {
        sender.publish_blob(kind, id, bytes);
    }
    tracing::info!(
        "serving {pages} pages on {}:{} ({}) to group {}:{}, session {}, epoch {}, max datagram {}, flow control {}",
        config.iface,
        io.local_addr().port(),
        io.capabilities().summary(),
        config.group,
        config.port,
        config.session,
        config.epoch,
        config.max_datagram,
        if config.flow_control { "on" } else { "off" }
    );
    // Paced, the pacer keeps no credit for late sends: below 200 µs the loop yields, below 1 ms it
    // naps (requests arriving meanwhile are answered together). Unpaced, every request wakes the
    // loop at once: a nap after each answer delayed the next fault's request by up to 1 ms (see
    // netio::driver for the figures).
    let (spin, nap) = match config.rate_bytes_per_sec {
        Some(_) => (Duration::from_micros(200), Duration::from_millis(1)),
        None => (Duration::ZERO, Duration::ZERO),
    };
    let driver_config =
        DriverConfig::new(config.max_datagram.max(MIN_DATAGRAM), config.max_datagram).spin_below(spin).nap_below(nap);
    let mut driver = Driver::new(io, driver_config)?;
    let mut endpoint = ServerEndpoint::new();
    let session = endpoint.serve(sender, SocketAddrV4::new(config.group, config.port));
    let mut server = Server {
        endpoint,
        session,
        duration: config.duration,
        options,
        stats_json: config.stats_json.as_deref(),
        stop,
        ending: None,
        next_summary: Instant::now() + SUMMARY_EVERY,
        next_stats: Instant::now(),
        urgent: false,
    };
    server.next_stats += server.options.stats_every;
    let result = driver.run(&mut server, END_FLUSH_LIMIT);
    let stats = server.stats();
    tracing::info!("final: {}", summary(&stats));
    if let Some(c) = driver.io().counters() {
        tracing::info!("packet I/O: {c}");
    }
    if let Some(f) = server.options.on_stats.as_mut() {
        f(&stats);
    }
    if let Some(path) = &config.stats_json {
        write_stats(path, &stats)?;
    }
    result?;
    Ok(stats)
}

/// Writes `stats` as JSON to `path` atomically: to a temporary file beside it, renamed over it, so
/// a reader never sees a partial file.
pub fn write_stats(path: &Path, stats: &SenderStats) -> Result<(), ServerError> {
    let err = |source| ServerError::Stats { path: path.display().to_string(), source };
    let json = serde_json::to_vec_pretty(stats).map_err(|e| err(std::io::Error::other(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, json).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        err(e)
    })
}

/// The one-line summary of the counters.
pub fn summary(s: &SenderStats) -> String {
    format!(
        "tx {} pkts {} bytes (data {}, repair {}, control {}), pages sent {} (pushed {}), rx {} pkts, requests {}, \
         naks {}, statuses {}, rejected {}, receivers live {}, push window-blocked {}",
        s.tx_packets,
        s.tx_bytes,
        s.data_packets,
        s.repair_packets,
        s.control_packets,
        s.pages_sent,
        s.pages_pushed,
        s.rx_packets,
        s.requests,
        s.naks,
        s.statuses,
        s.rx_malformed + s.rx_unauthenticated + s.rx_stale,
        s.receivers_live,
        s.push_window_stalls
    )
}

/// The server's side of the driver loop: the endpoint (its session's sender), the commands, the
/// counters' outlets.
struct Server<'a, S: PageSource> {
    endpoint: ServerEndpoint<S>,
    session: SessionId,
    duration: Option<Duration>,
    options: ServeOptions,
    stats_json: Option<&'a Path>,
    stop: &'a AtomicBool,
    /// When the session was ended (End going out), if it was.
    ending: Option<Instant>,
    next_summary: Instant,
    next_stats: Instant,
    /// The datagram just written answers a fault ([`Machine::urgent`]).
    urgent: bool,
}

impl<S: PageSource> Machine for Server<'_, S> {
    fn on_datagram(&mut self, now: Duration, source: SocketAddrV4, datagram: &mut [u8]) {
        self.endpoint.handle_datagram(Time::ZERO + now, source, datagram);
    }

    fn on_turn(&mut self, elapsed: Duration) -> Flow {
        let now = Time::ZERO + elapsed;
        if self.ending.is_none() {
            let expired = self.duration.is_some_and(|d| elapsed >= d);
            let reason =
                if self.stop.load(Ordering::Relaxed) || expired { Some(EndReason::Shutdown) } else { self.commands() };
            if let Some(reason) = reason {
                tracing::info!("stopping: ending the session ({reason:?})");
                self.endpoint.end(now, reason);
                self.ending = Some(Instant::now());
            }
        }
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        while let Some((_, ev)) = self.endpoint.poll_event() {
            match &ev {
                SenderEvent::ReceiverJoined(node) => tracing::info!("receiver {} joined", node.0),
                SenderEvent::ReceiverLost(node) => tracing::info!("receiver {} lost", node.0),
                SenderEvent::ReceiverComplete(node) => {
                    tracing::info!("receiver {} holds every page: it no longer needs this server", node.0);
                }
                SenderEvent::CloneReport { node, fork, clone, status, result } => tracing::info!(
                    "receiver {}: clone {fork}/{clone} exited with status {status} ({} result bytes)",
                    node.0,
                    result.len()
                ),
            }
            if let Some(f) = self.options.on_event.as_mut() {
                f(&ev);
            }
        }
        if Instant::now() >= self.next_summary {
            self.next_summary += SUMMARY_EVERY;
            tracing::info!("{}", summary(&self.stats()));
        }
        if Instant::now() >= self.next_stats {
            self.next_stats = Instant::now() + self.options.stats_every;
            self.report_stats();
        }
        match self.ending {
            // The End messages are all out once the sender has no timer left (the driver then
            // flushes what it still holds).
            Some(since) if self.endpoint.poll_timeout().is_none() || since.elapsed() >= END_FLUSH_LIMIT => Flow::Stop,
            _ => Flow::Continue,
        }
    }

    fn poll_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Option<(SocketAddrV4, usize)> {
        let t = self.endpoint.poll_transmit(Time::ZERO + now, buf)?;
        self.urgent = t.urgent;
        Some((t.destination, t.len))
    }

    fn urgent(&self) -> bool {
        self.urgent
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let timer = self.endpoint.poll_timeout().map(|t| t - Time::ZERO);
        match (timer, self.duration.filter(|_| self.ending.is_none())) {
            (Some(t), Some(d)) => Some(t.min(d)),
            (t, d) => t.or(d),
        }
    }
}

impl<S: PageSource> Server<'_, S> {
    /// The session's counters, with what the endpoint dropped before the sender saw it (malformed
    /// headers, other sessions) counted as the sender counts them.
    fn stats(&self) -> SenderStats {
        let mut stats = self.endpoint.sender(self.session).map(|s| s.stats().clone()).unwrap_or_default();
        let e = self.endpoint.stats();
        stats.rx_packets += e.malformed + e.from_servers + e.unknown_session;
        stats.rx_malformed += e.malformed;
        stats.rx_stale += e.from_servers + e.unknown_session;
        stats
    }

    /// Applies the commands waiting; returns the end reason if one asked to end.
    fn commands(&mut self) -> Option<EndReason> {
        let rx = self.options.commands.as_ref()?;
        let mut end = None;
        while let Ok(cmd) = rx.try_recv() {
            match cmd {
                ServeCommand::PublishBlob { kind, id, bytes } => {
                    if let Some(s) = self.endpoint.sender_mut(self.session) {
                        s.publish_blob(kind, id, bytes);
                    }
                }
                ServeCommand::EnqueuePages { pages, priority } => {
                    if let Some(s) = self.endpoint.sender_mut(self.session) {
                        s.enqueue_pages(&pages, priority);
                    }
                }
                ServeCommand::End(reason) => end = Some(reason),
            }
        }
        end
    }

    /// Hands the counters to `on_stats` and the stats file (a failed write is logged, not fatal:
    /// the file is written once more at exit, and that failure is returned).
    fn report_stats(&mut self) {
        let stats = self.stats();
        if let Some(f) = self.options.on_stats.as_mut() {
            f(&stats);
        }
        if let Some(path) = self.stats_json {
            if let Err(e) = write_stats(path, &stats) {
                tracing::warn!("{e}");
            }
        }
    }
}
