//! The event loop: moves bytes between the UDP socket and the protocol's sender, nothing more.

use std::net::SocketAddrV4;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use netio::udp::{Bind, UdpConfig, UdpError, UdpIo};
use netio::{Interest, IoError, PacketIo, RxBatch, TxBatch};
use spindrift_protocol::sender::{Sender, SenderEvent, SenderStats};
use spindrift_protocol::wire::{EndReason, MIN_DATAGRAM};
use spindrift_protocol::Time;

use crate::config::{ConfigError, ServerConfig};
use crate::image::MmapImage;

/// Datagrams per `recvmmsg`/`sendmmsg`.
const BATCH: usize = 64;
/// Longest sleep between looks at the clock and the stop flag.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How often the one-line summary is logged.
const SUMMARY_EVERY: Duration = Duration::from_secs(2);
/// Longest time spent flushing the End messages after a stop.
const END_FLUSH_LIMIT: Duration = Duration::from_secs(2);
/// Below this, a timer is waited for by yielding rather than sleeping (the socket wait has
/// millisecond granularity and the pacer keeps no credit for late sends).
const SPIN_BELOW: Duration = Duration::from_micros(200);

/// What stopped the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration (or the image) was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The protocol sender refused its configuration.
    #[error("{0}")]
    Sender(#[from] spindrift_protocol::sender::ConfigError),
    /// The socket could not be opened.
    #[error("opening the UDP socket: {0}")]
    Open(#[from] UdpError),
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
            ServerError::Config(_) | ServerError::Sender(_) => 2,
            _ => 1,
        }
    }
}

/// Serves `config` until `stop` is set (or `--duration-s` passes), then ends the session, flushes
/// the End messages, writes `--stats-json` and returns the final counters.
pub fn serve(config: &ServerConfig, stop: &AtomicBool) -> Result<SenderStats, ServerError> {
    let image = MmapImage::open(&config.image)?;
    let io = UdpIo::open(&UdpConfig::new(config.iface, config.port).bind(Bind::Interface).multicast_ttl(1))?;
    let mut server = Server::new(config, image, io)?;
    let result = server.run(stop);
    let stats = server.sender.stats().clone();
    tracing::info!("final: {}", summary(&stats));
    if let Some(path) = &config.stats_json {
        write_stats(path, &stats)?;
    }
    result.map(|()| stats)
}

/// Writes `stats` as JSON to `path`.
pub fn write_stats(path: &Path, stats: &SenderStats) -> Result<(), ServerError> {
    let err = |source| ServerError::Stats { path: path.display().to_string(), source };
    let json = serde_json::to_vec_pretty(stats).map_err(|e| err(std::io::Error::other(e)))?;
    std::fs::write(path, json).map_err(err)
}

/// The one-line summary of the counters.
pub fn summary(s: &SenderStats) -> String {
    format!(
        "tx {} pkts {} bytes (data {}, repair {}, control {}), pages sent {}, rx {} pkts, requests {}, naks {}, \
         statuses {}, rejected {}, receivers live {}",
        s.tx_packets,
        s.tx_bytes,
        s.data_packets,
        s.repair_packets,
        s.control_packets,
        s.pages_sent,
        s.rx_packets,
        s.requests,
        s.naks,
        s.statuses,
        s.rx_malformed + s.rx_unauthenticated + s.rx_stale,
        s.receivers_live
    )
}

struct Server {
    sender: Sender<MmapImage>,
    io: UdpIo,
    group: SocketAddrV4,
    rx: RxBatch,
    tx: TxBatch,
    start: Instant,
    duration: Option<Duration>,
}

impl Server {
    fn new(config: &ServerConfig, image: MmapImage, io: UdpIo) -> Result<Server, ServerError> {
        let start = Instant::now();
        let pages = image.bytes().len() / crate::image::PAGE_SIZE;
        let sender = Sender::new(config.sender_config(), image, Time::ZERO)?;
        tracing::info!(
            "serving {} ({pages} pages) on {}:{} to group {}:{}, session {}, epoch {}, max datagram {}",
            config.image.display(),
            config.iface,
            io.local_addr().port(),
            config.group,
            config.port,
            config.session,
            config.epoch,
            config.max_datagram
        );
        Ok(Server {
            sender,
            group: SocketAddrV4::new(config.group, config.port),
            rx: RxBatch::new(BATCH, config.max_datagram.max(MIN_DATAGRAM))?,
            tx: TxBatch::new(BATCH, config.max_datagram)?,
            io,
            start,
            duration: config.duration,
        })
    }

    fn now(&self) -> Time {
        Time::from_nanos(u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX))
    }

    fn run(&mut self, stop: &AtomicBool) -> Result<(), ServerError> {
        let mut ending: Option<Instant> = None;
        let mut next_summary = Instant::now() + SUMMARY_EVERY;
        loop {
            if ending.is_none()
                && (stop.load(Ordering::Relaxed) || self.duration.is_some_and(|d| self.start.elapsed() >= d))
            {
                tracing::info!("stopping: ending the session");
                self.sender.end(self.now(), EndReason::Shutdown);
                ending = Some(Instant::now());
            }
            self.receive()?;
            let now = self.now();
            if self.sender.poll_timeout().is_some_and(|t| t <= now) {
                self.sender.handle_timeout(now);
            }
            let blocked = self.transmit()?;
            while let Some(ev) = self.sender.poll_event() {
                match ev {
                    SenderEvent::ReceiverJoined(node) => tracing::info!("receiver {} joined", node.0),
                    SenderEvent::ReceiverLost(node) => tracing::info!("receiver {} lost", node.0),
                    SenderEvent::CloneReport { node, fork, clone, status, result } => tracing::info!(
                        "receiver {}: clone {fork}/{clone} exited with status {status} ({} result bytes)",
                        node.0,
                        result.len()
                    ),
                }
            }
            if Instant::now() >= next_summary {
                next_summary += SUMMARY_EVERY;
                tracing::info!("{}", summary(self.sender.stats()));
            }
            if let Some(since) = ending {
                let flushed = self.sender.poll_timeout().is_none() && self.tx.is_sent();
                if flushed || since.elapsed() >= END_FLUSH_LIMIT {
                    return Ok(());
                }
            }
            self.sleep(blocked)?;
        }
    }

    /// Feeds every datagram waiting to the sender.
    fn receive(&mut self) -> Result<(), ServerError> {
        loop {
            let n = self.io.recv_batch(&mut self.rx)?;
            let now = self.now();
            for i in 0..n {
                if let Some(payload) = self.rx.payload_mut(i) {
                    self.sender.handle_datagram(now, payload);
                }
            }
            if n < self.rx.capacity() {
                return Ok(());
            }
        }
    }

    /// Sends what the sender has due; returns true if the socket is full and datagrams wait.
    fn transmit(&mut self) -> Result<bool, ServerError> {
        loop {
            if self.tx.is_sent() {
                self.tx.clear();
                let now = self.now();
                while !self.tx.is_full() {
                    let sender = &mut self.sender;
                    let pushed = self.tx.push_with(self.group, |buf| sender.poll_transmit(now, buf).map(|t| t.len))?;
                    if pushed.is_none() {
                        break;
                    }
                }
                if self.tx.is_empty() {
                    return Ok(false);
                }
            }
            if let Err(e) = self.io.send_batch(&mut self.tx) {
                // One datagram was dropped (counted as sent); the protocol repairs it like a loss.
                tracing::warn!("{e}");
            }
            if !self.tx.is_sent() {
                return Ok(true);
            }
            if !self.tx.is_full() {
                // The sender had nothing more due.
                return Ok(false);
            }
        }
    }

    /// Sleeps until a datagram arrives, the socket can take more (when `blocked`), the sender's next
    /// timer, or [`MAX_WAIT`].
    fn sleep(&mut self, blocked: bool) -> Result<(), ServerError> {
        let now = self.now();
        let mut wait = MAX_WAIT;
        if let Some(t) = self.sender.poll_timeout() {
            wait = wait.min(t.saturating_since(now));
        }
        if let Some(d) = self.duration {
            wait = wait.min(d.saturating_sub(self.start.elapsed()).max(Duration::from_millis(1)));
        }
        if blocked {
            self.io.wait(Interest::BOTH, Some(wait))?;
        } else if wait < SPIN_BELOW {
            // Also covers a timer already due: give the other threads a turn and look again.
            std::thread::yield_now();
        } else if wait < Duration::from_millis(1) {
            std::thread::sleep(wait);
        } else {
            self.io.wait(Interest::READABLE, Some(wait - Duration::from_micros(500)))?;
        }
        Ok(())
    }
}
