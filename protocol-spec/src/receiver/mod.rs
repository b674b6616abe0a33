//! The receiver: a host daemon's side of a session.
//!
//! It follows the server's stream, stores every page it carries through a [`PageSink`] (one host
//! cache serves all local clones, so no page crosses the network twice to a host), repairs losses with
//! FEC parity after a randomized NAK backoff, and turns faults into batched requests with read-ahead.

mod assembly;
mod feedback;
mod readahead;
mod stream;
mod wants;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::wire::{
    self, BlobKind, Data, Header, Items, Keys, Message, NakEntry, NodeId, PageRun, Priority, Record, Records,
    SessionId, SessionKey, HEADER_LEN, MAX_REPORT_RESULT, TAG_LEN,
};
use crate::Time;
use assembly::Assembler;
use feedback::Feedback;
use readahead::ReadAhead;
use stream::{Stream, Taken};
use wants::Wants;

/// Where received pages go: the host's page cache (the simulator checks them instead).
pub trait PageSink {
    /// `data` (one whole page) is the content of `page`.
    fn store(&mut self, page: u32, data: &[u8]);
    /// Pages `first_page .. first_page + count` are all zero.
    fn store_zero(&mut self, first_page: u32, count: u32);
}

/// How the receiver is set up.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The session to follow.
    pub session: SessionId,
    /// This host's node id (non-zero, unique within the session).
    pub node: NodeId,
    /// The session key.
    pub key: SessionKey,
    /// log2 of the page size.
    pub page_shift: u8,
    /// Pages in the image.
    pub page_count: u32,
    /// Pages to read ahead after a faulting page: with a fixed window, after every fault; with a
    /// growing one, the first window once a sequential or strided pattern holds (see `readahead.rs`).
    pub read_ahead: u16,
    /// The largest read-ahead window a pattern grows to (see `readahead.rs`): above `read_ahead`,
    /// read-ahead follows the access pattern; at most `read_ahead` (the default, 0) keeps a fixed
    /// window after every fault.
    pub read_ahead_max: u16,
    /// A first estimate of the round-trip time to the server.
    pub rtt_hint: Duration,
    /// Where this receiver starts following the stream, when known in advance (a receiver present
    /// from the session's start uses 0); otherwise it starts at the first position it hears of.
    pub stream_start: Option<u64>,
    /// The server is declared gone when silent this long while faults wait.
    pub server_timeout: Duration,
    /// How many stream positions beyond the highest it has seen the receiver can take: what its
    /// socket receive buffer holds, with room left for the repairs and control among them. Its
    /// Status window (PROTOCOL.md section 11) is this plus the positions it holds in incomplete
    /// blocks, so the server's push never runs further ahead of what it has read. At least
    /// [`MIN_WINDOW`].
    pub window: u32,
    /// Seed for the receiver's randomness (NAK backoff).
    pub seed: u64,
    /// The first packet number to use. Packet numbers must never repeat under one session key and
    /// epoch (they are the nonce and the replay-window position), so a host daemon that restarts
    /// with the same node id starts above any number it used before, e.g. at the current time in
    /// microseconds.
    pub first_packet_number: u64,
}

impl ReceiverConfig {
    /// A configuration with LAN defaults.
    pub fn new(session: SessionId, node: NodeId, key: SessionKey, page_shift: u8, page_count: u32) -> ReceiverConfig {
        ReceiverConfig {
            session,
            node,
            key,
            page_shift,
            page_count,
            read_ahead: 8,
            read_ahead_max: 0,
            rtt_hint: Duration::from_micros(200),
            stream_start: None,
            server_timeout: Duration::from_secs(3),
            window: DEFAULT_WINDOW,
            seed: u64::from(node.0),
            first_packet_number: 0,
        }
    }
}

/// Things the receiver tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// A blob (VM descriptor, fork plan) arrived whole.
    Blob {
        /// Its kind.
        kind: BlobKind,
        /// Its id.
        id: u32,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// The server restarted (a new epoch): outstanding faults were requested again.
    ServerRestarted {
        /// The new epoch.
        epoch: u32,
    },
    /// The server ended the session.
    Ended,
    /// The server has been silent past the timeout while faults were waiting.
    ServerLost,
}

/// Counters, readable at any time.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReceiverStats {
    /// Datagrams received.
    pub rx_packets: u64,
    /// Loss events (congestion feedback, PROTOCOL.md 11.1): losses at least a round trip apart.
    pub loss_events: u64,
    /// Data packets received (duplicates included).
    pub data_packets: u64,
    /// Parity packets received.
    pub repair_packets: u64,
    /// Data packets rebuilt from parity.
    pub recovered_packets: u64,
    /// Duplicate data packets ignored.
    pub duplicates: u64,
    /// Data packets that filled a position already counted missing (reordered, or sent again).
    pub late_packets: u64,
    /// Out-of-stream Data packets (answers sent to this host alone) taken.
    pub unicast_packets: u64,
    /// Pages stored into the sink.
    pub pages_stored: u64,
    /// Page records (or fragments of them) that arrived for pages already here, and were skipped.
    pub pages_skipped: u64,
    /// Bytes the receiver copied in user space: Data bodies kept for FEC until their block is
    /// complete, page fragments reassembled, compressed pages decoded. (Raw pages go from the
    /// reassembly buffer to the sink without another copy.)
    pub bytes_copied: u64,
    /// Datagrams sent.
    pub tx_packets: u64,
    /// Requests sent.
    pub requests: u64,
    /// Pages asked for in the requests sent (a page asked again counts again).
    pub pages_requested: u64,
    /// Of them, pages asked for again after their timeout (a request or an out-of-stream answer
    /// lost, or late).
    pub pages_rerequested: u64,
    /// NAKs sent.
    pub naks: u64,
    /// Requests that insisted (pages re-requested in vain several times: sent without a stream
    /// position, so the server sends them whatever it believes this host can repair).
    pub insisted_requests: u64,
    /// Status messages sent.
    pub statuses: u64,
    /// Dropped: malformed.
    pub rx_malformed: u64,
    /// Dropped: authentication failed.
    pub rx_unauthenticated: u64,
    /// Dropped: another session, an old epoch, or a replay.
    pub rx_stale: u64,
    /// Dropped: an authentic Announce of another image (page count or size) under this session.
    pub rx_mismatched: u64,
}

/// Why a receiver could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A configuration value is out of range.
    #[error("invalid receiver configuration: {0}")]
    Invalid(String),
}

/// A host daemon's protocol state machine. See the crate docs for how to drive it.
pub struct Receiver {
    config: ReceiverConfig,
    stats: ReceiverStats,
    page_size: usize,
    /// Keys by epoch (the server's epoch is learned from its packets; 0 before that).
    keys: HashMap<u32, Keys>,
    epoch: Option<u32>,
    next_pn: u64,
    present: Vec<u64>,
    pages_cached: u32,
    pages: Assembler<u32>,
    blobs: Assembler<(BlobKind, u32)>,
    blobs_done: HashSet<(BlobKind, u32)>,
    stream: Stream,
    /// Congestion feedback for the server (PROTOCOL.md 11.1).
    feedback: Feedback,
    wants: Wants,
    read_ahead: ReadAhead,
    events: VecDeque<ReceiverEvent>,
    reports: Vec<PendingReport>,
    pending_nak: Option<Vec<NakEntry>>,
    /// Pages the server advertised as queued: when, and at what priority.
    advertised: HashMap<u32, (Time, Priority)>,
    /// The latest time given to any input.
    now: Time,
    nak_at: Option<Time>,
    nak_backoff: Duration,
    status_at: Time,
    status_interval: Duration,
    /// Flow-control feedback: a Status is wanted soon (push progress, the stream starting, the
    /// server idle after new push data), no sooner than `progress_gap` after the last one.
    status_due: bool,
    last_status_at: Option<Time>,
    /// Received Through as of the last Status sent.
    last_status_rt: u64,
    /// Push data arrived since the last Status: progress reports are for the push only (demand
    /// answers are not window-limited, so reporting their progress would be wasted traffic).
    push_since_status: bool,
    /// Push data has arrived in this epoch: Heartbeats (the server idle, perhaps because the push
    /// waits for our window after a lost Status) are answered with a Status.
    push_seen: bool,
    /// When push data last arrived (this epoch).
    last_push_at: Option<Time>,
    /// No Data has arrived yet in this epoch: the server may not have heard our first Status (it
    /// does not push to hosts it has not heard from), so Status repeats with a doubling interval.
    join_retry: Option<Duration>,
    /// When the server was last heard from, or when the first fault began waiting.
    last_heard: Option<Time>,
    server_lost: bool,
    ended: bool,
    decompressor: zstd::bulk::Decompressor<'static>,
    page_buf: Vec<u8>,
    rng: ChaCha8Rng,
}

struct PendingReport {
    fork: u32,
    clone: u32,
    status: u32,
    result: Vec<u8>,
    next_at: Time,
    attempts: u32,
}

const BITS: usize = 64;

/// The smallest window a receiver reports (PROTOCOL.md section 11): two full FEC blocks.
pub const MIN_WINDOW: u32 = 128;
/// The default window: 1024 positions, 1.4 MiB of 1472-byte datagrams, well within the 8 MiB socket
/// buffers the host daemon asks for.
pub const DEFAULT_WINDOW: u32 = 1024;
/// A progress Status goes out when Received Through has moved this fraction of the window since the
/// last Status (Aeron's receiver sends a status message at a quarter of its window).
const PROGRESS_FRACTION: u64 = 4;
/// Progress Status messages are at least this fraction of the status interval apart (1 ms in
/// groups of up to 128 receivers, 8 ms at 1024: a bound on status traffic in large groups) ...
const PROGRESS_GAP_DIVISOR: u32 = 256;
/// ... and at least this far apart.
const MIN_PROGRESS_GAP: Duration = Duration::from_micros(500);
/// The positions a receiver holds beyond Received Through (incomplete blocks waiting for repair)
/// count in its window up to this many windows: losses then do not close the window while their
/// repair is on its way, yet a receiver stuck on one hole stops the push after a bounded run.
const HOLE_ALLOWANCE: u64 = 3;

impl Receiver {
    /// A receiver for one session.
    pub fn new(config: ReceiverConfig, now: Time) -> Result<Receiver, ConfigError> {
        if !(12..=21).contains(&config.page_shift) {
            return Err(ConfigError::Invalid(format!("page_shift {} is outside 12..=21", config.page_shift)));
        }
        if config.node == NodeId::SERVER {
            return Err(ConfigError::Invalid("node id 0 belongs to the server; hosts need a non-zero id".into()));
        }
        if config.page_count == 0 {
            return Err(ConfigError::Invalid("the image has no pages".into()));
        }
        if config.window < MIN_WINDOW {
            return Err(ConfigError::Invalid(format!(
                "window {} is below the minimum of {MIN_WINDOW} stream positions",
                config.window
            )));
        }
        let decompressor =
            zstd::bulk::Decompressor::new().map_err(|e| ConfigError::Invalid(format!("zstd decompressor: {e}")))?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let status_interval = Duration::from_millis(250);
        let status_at = now + Duration::from_nanos(rng.random_range(0..status_interval.as_nanos() as u64));
        let mut stream = Stream::default();
        if let Some(s) = config.stream_start {
            stream.begin(s);
        }
        Ok(Receiver {
            stats: ReceiverStats::default(),
            page_size: 1 << config.page_shift,
            keys: HashMap::new(),
            epoch: None,
            next_pn: config.first_packet_number,
            present: vec![0; (config.page_count as usize).div_ceil(BITS)],
            pages_cached: 0,
            pages: Assembler::default(),
            blobs: Assembler::default(),
            blobs_done: HashSet::new(),
            stream,
            feedback: Feedback::default(),
            wants: Wants::default(),
            read_ahead: ReadAhead::default(),
            events: VecDeque::new(),
            reports: Vec::new(),
            pending_nak: None,
            advertised: HashMap::new(),
            now,
            nak_at: None,
            nak_backoff: config.rtt_hint / 2,
            status_at,
            status_interval,
            // A receiver that follows the stream from the start says so at once.
            status_due: config.stream_start.is_some(),
            last_status_at: None,
            last_status_rt: 0,
            push_since_status: false,
            push_seen: false,
            last_push_at: None,
            join_retry: Some(Duration::ZERO),
            last_heard: None,
            server_lost: false,
            ended: false,
            decompressor,
            page_buf: vec![0; 1 << config.page_shift],
            rng,
            config,
        })
    }

    fn keys_for(&mut self, epoch: u32) -> &Keys {
        let (key, session) = (&self.config.key, self.config.session);
        self.keys.entry(epoch).or_insert_with(|| Keys::derive(key, session, epoch))
    }

    /// True when `page` has been stored.
    pub fn has_page(&self, page: u32) -> bool {
        (page as usize) < self.config.page_count as usize
            && self.present[page as usize / BITS] & (1 << (page as usize % BITS)) != 0
    }

    fn mark_present(&mut self, page: u32) -> bool {
        let (w, b) = (page as usize / BITS, 1u64 << (page as usize % BITS));
        if self.present[w] & b != 0 {
            return false;
        }
        self.present[w] |= b;
        self.pages_cached += 1;
        self.wants.satisfied(page, self.now);
        self.advertised.remove(&page);
        true
    }

    /// When push data last arrived in this epoch (None: none yet). While it keeps arriving the
    /// push is bringing pages in its order, and a host with nothing urgent to ask need not ask
    /// (PROTOCOL.md section 10).
    pub fn last_push_at(&self) -> Option<Time> {
        self.last_push_at
    }

    /// Whether a fault (not only read-ahead or prefetch) waits for its page.
    pub fn faults_waiting(&self) -> bool {
        self.wants.has_fault()
    }

    /// Pages held.
    pub fn pages_cached(&self) -> u32 {
        self.pages_cached
    }

    /// Takes a datagram from the server; pages it carries (or that parity rebuilds) go to `sink`.
    /// Returns true when the datagram was authentic and current (of this session and its current
    /// or a newer epoch): what an owner counts as "the server was heard".
    pub fn handle_datagram(&mut self, now: Time, datagram: &mut [u8], sink: &mut dyn PageSink) -> bool {
        self.now = self.now.max(now);
        self.stats.rx_packets += 1;
        let header = match wire::peek_header(datagram) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("dropping malformed datagram: {e}");
                self.stats.rx_malformed += 1;
                return false;
            }
        };
        if header.session != self.config.session || header.node != NodeId::SERVER {
            self.stats.rx_stale += 1;
            return false;
        }
        self.open_routed(now, &header, datagram, sink)
    }

    /// Takes a datagram whose header its caller has already read and found to be of this session
    /// and from the server (the endpoint routes by it, so it is not parsed twice). Counts it as
    /// received. Returns what [`Receiver::handle_datagram`] does.
    pub(crate) fn handle_routed(
        &mut self,
        now: Time,
        header: &Header,
        datagram: &mut [u8],
        sink: &mut dyn PageSink,
    ) -> bool {
        self.now = self.now.max(now);
        self.stats.rx_packets += 1;
        self.open_routed(now, header, datagram, sink)
    }

    /// Drops a stale epoch, authenticates and opens the datagram, and takes what it carries.
    fn open_routed(&mut self, now: Time, header: &Header, datagram: &mut [u8], sink: &mut dyn PageSink) -> bool {
        if self.epoch.is_some_and(|e| header.epoch < e) {
            self.stats.rx_stale += 1;
            return false;
        }
        let keys = self.keys_for(header.epoch).clone();
        let (header, body) = match wire::open(datagram, &keys) {
            Ok(x) => x,
            Err(wire::DecodeError::BadTag) => {
                self.stats.rx_unauthenticated += 1;
                return false;
            }
            Err(e) => {
                tracing::debug!("dropping malformed datagram: {e}");
                self.stats.rx_malformed += 1;
                return false;
            }
        };
        self.take_opened(now, &header, body, sink)
    }

    /// Takes a datagram that its caller has already authenticated and opened with this session's
    /// keys (the endpoint does so for the Announce that creates a session, so no datagram is
    /// authenticated twice). Counts it as received. Returns what [`Receiver::handle_datagram`] does.
    pub(crate) fn handle_opened(&mut self, now: Time, header: &Header, body: &[u8], sink: &mut dyn PageSink) -> bool {
        self.now = self.now.max(now);
        self.stats.rx_packets += 1;
        if header.session != self.config.session || self.epoch.is_some_and(|e| header.epoch < e) {
            self.stats.rx_stale += 1;
            return false;
        }
        self.take_opened(now, header, body, sink)
    }

    fn take_opened(&mut self, now: Time, header: &Header, body: &[u8], sink: &mut dyn PageSink) -> bool {
        let msg = match Message::parse(header.msg_type, body) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("dropping malformed {:?}: {e}", header.msg_type);
                self.stats.rx_malformed += 1;
                return false;
            }
        };
        if let Message::Announce(a) = &msg {
            if a.page_count != self.config.page_count || a.page_shift != self.config.page_shift {
                // Authentic, but not the image this receiver follows: a server misconfigured with
                // another image under the same session id. Its pages must not mix with ours.
                tracing::warn!(
                    "announce of {} pages of 2^{} bytes, not {} of 2^{}: ignored",
                    a.page_count,
                    a.page_shift,
                    self.config.page_count,
                    self.config.page_shift
                );
                self.stats.rx_mismatched += 1;
                return false;
            }
        }
        self.learn_epoch(header.epoch);
        self.last_heard = Some(now);
        self.server_lost = false;
        let started = self.stream.start() != wire::NO_STREAM;
        if matches!(msg, Message::Data(_) | Message::Repair(_)) {
            self.feedback.take_bytes(body.len() + HEADER_LEN + TAG_LEN);
        }
        self.take_message(now, msg, body, sink);
        let (missing, late) = self.stream.loss_counts();
        if self.feedback.take_missing(now, missing, late) {
            self.stats.loss_events += 1;
            // With congestion control running (Clocks arrive), the server's rate should follow a
            // new loss event within a round trip; without it, Status stays as rare as it was.
            if self.feedback.clock_seen() {
                self.status_due = true;
            }
        }
        if !started && self.stream.start() != wire::NO_STREAM {
            // The stream just started for us: say so at once, so the server counts us in its
            // window (and sends blobs and the push) without waiting for the periodic Status.
            self.status_due = true;
        }
        let progress = self.stream.received_through().saturating_sub(self.last_status_rt);
        if self.push_since_status && progress >= u64::from(self.config.window) / PROGRESS_FRACTION {
            self.status_due = true;
        }
        true
    }

    /// True once the server ended the session (and no later epoch started it again).
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// True while the server is declared lost (silent past the timeout with faults waiting); an
    /// authentic datagram clears it.
    pub fn is_server_lost(&self) -> bool {
        self.server_lost
    }

    /// The server's current epoch, once it has been heard.
    pub fn epoch(&self) -> Option<u32> {
        self.epoch
    }

    /// The session this receiver follows.
    pub fn session(&self) -> SessionId {
        self.config.session
    }

    /// Pages in the image.
    pub fn page_count(&self) -> u32 {
        self.config.page_count
    }

    /// When the server was last heard from (or the first fault began waiting).
    pub fn last_heard(&self) -> Option<Time> {
        self.last_heard
    }

    fn take_message(&mut self, now: Time, msg: Message<'_>, body: &[u8], sink: &mut dyn PageSink) {
        match msg {
            Message::Data(d) => {
                self.stats.data_packets += 1;
                self.take_data(now, &d, body, sink);
            }
            Message::Repair(r) => {
                self.stats.repair_packets += 1;
                match self.stream.take_parity(r.first_seq, r.block, r.k, r.index, r.total, r.symbol) {
                    Ok(rebuilt) => self.take_rebuilt(rebuilt, sink),
                    Err(e) => {
                        tracing::warn!("block {} could not be rebuilt: {e}", r.block);
                        self.stats.rx_malformed += 1;
                    }
                }
                self.schedule_nak(now);
            }
            Message::Announce(a) => {
                self.stream.begin(a.next_seq);
                if self.stream.extend_to(a.next_seq) > 0 {
                    self.schedule_nak(now);
                }
            }
            Message::Heartbeat(h) => {
                if self.push_seen && self.pages_cached < self.config.page_count {
                    // The server is idle during a push: perhaps the push waits for our window
                    // (our last progress Status may have been lost). Tell it where we are.
                    // Heartbeats back off exponentially while the server idles, and so do these.
                    self.status_due = true;
                }
                self.status_interval = Duration::from_millis(u64::from(h.status_interval_ms.max(10)));
                self.nak_backoff = Duration::from_micros(u64::from(h.nak_backoff_us));
                self.stream.begin(h.next_seq);
                self.stream.extend_to(h.next_seq);
                self.stream.closed_at(h.next_seq);
                if self.stream.received_through() < h.repairable_from {
                    let lost = self.stream.give_up_below(h.repairable_from);
                    if lost > 0 {
                        tracing::warn!("{lost} stream packets fell out of the server's repair history: asking again");
                        self.wants.rerequest_all();
                    }
                }
                if self.stream.has_missing() {
                    self.schedule_nak(now);
                }
            }
            Message::Clock(c) => {
                self.feedback.take_clock(now, c.timestamp_us, c.rtt_us);
                // Congestion control runs: feedback once per Clock while stream data arrives,
                // no more often than the progress gap allows (PROTOCOL.md 11.1).
                if self.feedback.took_data_since_status() {
                    self.status_due = true;
                }
            }
            Message::End { .. } => {
                if !self.ended {
                    self.ended = true;
                    self.events.push_back(ReceiverEvent::Ended);
                }
            }
            Message::ReportAck(keys) => {
                for k in keys.iter().flatten() {
                    self.reports.retain(|r| !(r.fork == k.fork && r.clone == k.clone));
                }
            }
            Message::Queued(q) => {
                for run in q.runs.iter().flatten() {
                    let end = run.first_page.saturating_add(u32::from(run.count)).min(self.config.page_count);
                    for page in run.first_page..end {
                        if !self.has_page(page) {
                            let entry = self.advertised.entry(page).or_insert((now, run.priority));
                            if run.priority < entry.1 {
                                *entry = (now, run.priority);
                            }
                            self.wants.advertised(page, run.priority, now);
                        }
                    }
                }
            }
            Message::Request(_) | Message::Nak(_) | Message::Status(_) | Message::Report(_) => {
                self.stats.rx_malformed += 1;
            }
        }
    }

    fn learn_epoch(&mut self, epoch: u32) {
        match self.epoch {
            None => self.epoch = Some(epoch),
            Some(e) if epoch > e => {
                tracing::info!("server restarted (epoch {e} -> {epoch}): following its new stream");
                self.epoch = Some(epoch);
                self.stream.reset();
                self.feedback.reset_stream();
                self.pages.clear();
                self.blobs.clear();
                self.pending_nak = None;
                self.advertised.clear();
                self.nak_at = None;
                self.last_status_rt = 0;
                self.push_since_status = false;
                self.push_seen = false;
                self.last_push_at = None;
                self.join_retry = Some(Duration::ZERO);
                self.wants.rerequest_all();
                self.read_ahead.clear();
                self.keys.retain(|&k, _| k >= epoch);
                // A session its server ended (or that was lost) and then started again goes on:
                // the wants, reports and cached pages are kept (the image is the same).
                self.ended = false;
                self.server_lost = false;
                self.events.push_back(ReceiverEvent::ServerRestarted { epoch });
            }
            _ => {}
        }
    }

    fn take_data(&mut self, now: Time, d: &Data<'_>, body: &[u8], sink: &mut dyn PageSink) {
        if d.flags & wire::DATA_UNICAST != 0 {
            // An answer for this host alone, outside the stream (PROTOCOL.md 8.1): its pages are
            // taken as they are; it has no position to follow and no block to repair.
            self.stats.unicast_packets += 1;
            self.take_records(d, sink);
            return;
        }
        self.join_retry = None;
        if d.flags & wire::DATA_PUSH != 0 {
            self.push_since_status = true;
            self.push_seen = true;
            self.last_push_at = Some(now);
        }
        let before = self.stream.highest();
        let last = d.flags & wire::DATA_LAST_IN_BLOCK != 0;
        match self.stream.take_data(d.seq, d.block, d.index, last, body) {
            Taken::Duplicate => {
                self.stats.duplicates += 1;
                return;
            }
            Taken::Late => self.stats.late_packets += 1,
            Taken::New => {}
        }
        self.stats.bytes_copied += body.len() as u64;
        // A late (reordered) packet can complete a set that parity started.
        match self.stream.try_decode(d.block) {
            Ok(rebuilt) => self.take_rebuilt(rebuilt, sink),
            Err(e) => {
                tracing::warn!("block {} could not be rebuilt: {e}", d.block);
                self.stats.rx_malformed += 1;
            }
        }
        if d.seq > before || (last && self.stream.has_missing()) {
            // A gap before this packet, or the end of a block that had one.
            if self.stream.has_missing() {
                self.schedule_nak(now);
            }
        }
        self.take_records(d, sink);
    }

    /// Processes Data bodies rebuilt from parity as if they had arrived.
    fn take_rebuilt(&mut self, rebuilt: Vec<(u64, Vec<u8>)>, sink: &mut dyn PageSink) {
        for (seq, body) in rebuilt {
            self.stats.recovered_packets += 1;
            match Message::parse(wire::MsgType::Data, &body) {
                Ok(Message::Data(d)) if d.seq == seq => self.take_records(&d, sink),
                _ => self.stats.rx_malformed += 1,
            }
        }
    }

    fn take_records(&mut self, d: &Data<'_>, sink: &mut dyn PageSink) {
        for record in Records::new(d.records) {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!("bad record: {e}");
                    self.stats.rx_malformed += 1;
                    return;
                }
            };
            match record {
                Record::Page { page, zstd, total_len, offset, bytes } => {
                    if page >= self.config.page_count {
                        self.stats.rx_malformed += 1;
                        continue;
                    }
                    if self.has_page(page) {
                        self.stats.pages_skipped += 1;
                        continue;
                    }
                    self.stats.bytes_copied += bytes.len() as u64;
                    if let Some((zstd, encoded)) = self.pages.add(page, zstd, total_len, offset, bytes) {
                        self.finish_page(page, zstd, &encoded, sink);
                    }
                }
                Record::ZeroRun { first_page, count } => {
                    let end = first_page.saturating_add(count).min(self.config.page_count);
                    let mut p = first_page;
                    while p < end {
                        if self.has_page(p) {
                            p += 1;
                            continue;
                        }
                        let start = p;
                        while p < end && !self.has_page(p) {
                            self.mark_present(p);
                            self.pages.forget(p);
                            p += 1;
                        }
                        self.stats.pages_stored += u64::from(p - start);
                        sink.store_zero(start, p - start);
                    }
                }
                Record::Blob { kind, id, total_len, offset, bytes } => {
                    if self.blobs_done.contains(&(kind, id)) {
                        continue;
                    }
                    if let Some((_, blob)) = self.blobs.add((kind, id), false, total_len, offset, bytes) {
                        self.blobs_done.insert((kind, id));
                        self.events.push_back(ReceiverEvent::Blob { kind, id, bytes: blob });
                    }
                }
            }
        }
    }

    fn finish_page(&mut self, page: u32, zstd: bool, encoded: &[u8], sink: &mut dyn PageSink) {
        // A raw page goes to the sink as it was reassembled (no copy); a compressed one is decoded
        // into the receiver's page buffer first.
        let ok = if zstd {
            self.stats.bytes_copied += self.page_size as u64;
            matches!(self.decompressor.decompress_to_buffer(encoded, &mut self.page_buf), Ok(n) if n == self.page_size)
        } else {
            encoded.len() == self.page_size
        };
        if !ok {
            tracing::warn!("page {page}: encoding does not decode to one {}-byte page; dropped", self.page_size);
            self.stats.rx_malformed += 1;
            return;
        }
        if self.mark_present(page) {
            self.stats.pages_stored += 1;
            sink.store(page, if zstd { &self.page_buf } else { encoded });
        }
    }

    fn rtt(&self) -> Duration {
        self.config.rtt_hint.max(Duration::from_micros(20))
    }

    /// How long to wait before asking again for a page requested but not received: from measured
    /// fault-service times once there are some (they include the server's queueing, which grows
    /// with the group), else a conservative multiple of the round trip.
    fn request_rto(&self) -> Duration {
        let floor = (self.rtt() * 2).max(Duration::from_millis(1));
        match self.wants.measured_rto() {
            Some(rto) => (rto + self.nak_backoff).max(floor),
            None => (self.rtt() * 8 + self.nak_backoff * 2).max(Duration::from_millis(2)),
        }
    }

    /// How long a NAKed block waits before it is NAKed again.
    fn nak_retry(&self) -> Duration {
        self.rtt() * 3 + self.nak_backoff
    }

    fn schedule_nak(&mut self, now: Time) {
        if self.nak_at.is_none() && self.stream.has_missing() {
            // A short grace lets the block's end and its proactive parity arrive; the random part
            // spreads the NAKs of many receivers so the server's answer to the first suppresses the rest.
            let grace = self.rtt() / 4;
            let jitter = Duration::from_nanos(self.rng.random_range(0..=self.nak_backoff.as_nanos() as u64));
            self.nak_at = Some(now + grace + jitter);
        }
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = self.now.max(now);
        if self.nak_at.is_some_and(|t| now >= t) {
            self.nak_at = None;
            let max = (wire::MIN_DATAGRAM - HEADER_LEN - TAG_LEN - 24) / 16;
            let entries = self.stream.nak_entries(now, self.nak_retry(), max);
            if !entries.is_empty() {
                self.pending_nak = Some(entries);
            }
            if self.stream.has_missing() {
                // Come back when a NAKed block is due again or the rest of a block has had time.
                let again = self.stream.next_renak(self.nak_retry()).unwrap_or(now + self.nak_retry());
                self.nak_at = Some(again.max(now + self.rtt() / 4));
            }
        }
        let waiting = self.wants.has_fault();
        if waiting && self.last_heard.is_none() {
            self.last_heard = Some(now);
        }
        if waiting && !self.server_lost && self.last_heard.is_some_and(|t| now >= t + self.config.server_timeout) {
            tracing::warn!("server silent for {:?} while faults wait", self.config.server_timeout);
            self.server_lost = true;
            self.events.push_back(ReceiverEvent::ServerLost);
        }
    }

    /// A clone touched `page`. Returns true when the page is already here; otherwise the page (and
    /// read-ahead around it) will be requested, and it arrives through the sink.
    pub fn fault(&mut self, now: Time, page: u32) -> bool {
        if page >= self.config.page_count || self.has_page(page) {
            return page < self.config.page_count;
        }
        self.now = self.now.max(now);
        if self.wants.is_empty() && self.last_heard.is_none() {
            self.last_heard = Some(now);
        }
        match self.advertised.get(&page) {
            // Queued at the server as a fault because another host asked: wait rather than ask.
            Some(&(since, Priority::Fault)) => self.wants.want_advertised(page, Priority::Fault, since),
            // Queued behind read-ahead: ask to raise its priority if it is not here soon (the
            // server advertises the raise, so the other hosts faulting on it stay quiet).
            Some(_) => self.wants.want_deferred(page, now),
            None => {
                self.wants.want(page, Priority::Fault);
            }
        }
        let (base, max) = (u32::from(self.config.read_ahead), u32::from(self.config.read_ahead_max));
        for p in self.read_ahead.on_fault(page, base, max, self.config.page_count) {
            if !self.has_page(p) && !self.advertised.contains_key(&p) {
                self.wants.want(p, Priority::ReadAhead);
            }
        }
        false
    }

    /// Asks for pages ahead of need (working-set hints), at the lowest priority.
    pub fn prefetch(&mut self, pages: &[u32]) {
        for &p in pages {
            if p < self.config.page_count && !self.has_page(p) {
                self.wants.want(p, Priority::Prefetch);
            }
        }
    }

    /// Queues a clone's report for the server (sent until acknowledged). Results longer than
    /// `MAX_REPORT_RESULT` are cut.
    pub fn report(&mut self, fork: u32, clone: u32, status: u32, mut result: Vec<u8>) {
        result.truncate(MAX_REPORT_RESULT);
        self.reports.push(PendingReport { fork, clone, status, result, next_at: Time::ZERO, attempts: 0 });
    }

    fn seal(&mut self, msg: Message<'_>, buf: &mut [u8]) -> Option<usize> {
        let epoch = self.epoch.unwrap_or(0);
        let header = Header {
            msg_type: msg.msg_type(),
            flags: 0,
            session: self.config.session,
            epoch,
            node: self.config.node,
            packet_number: self.next_pn,
        };
        self.next_pn += 1;
        let keys = self.keys_for(epoch).clone();
        match wire::encode(&header, &msg, &keys, buf) {
            Ok(len) => {
                self.stats.tx_packets += 1;
                Some(len)
            }
            Err(e) => {
                tracing::error!("could not encode {:?}: {e}", header.msg_type);
                None
            }
        }
    }

    /// Writes the next datagram for the server into `buf` (at least `wire::MIN_DATAGRAM` bytes);
    /// returns its length.
    pub fn poll_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<usize> {
        let buf_len = buf.len().min(wire::MIN_DATAGRAM);
        let buf = &mut buf[..buf_len];
        if let Some(entries) = self.pending_nak.take() {
            self.stats.naks += 1;
            let msg = Message::Nak(wire::Nak {
                stream_start: self.stream.start(),
                highest_seen: self.stream.highest(),
                loss_ppm: self.stream.loss_ppm(),
                entries: Items::Slice(&entries),
            });
            return self.seal(msg, buf);
        }
        let max_runs = (buf_len - HEADER_LEN - TAG_LEN - 16) / 8;
        for insist in [true, false] {
            let runs: Vec<PageRun> = self.wants.take_request(now, self.request_rto(), max_runs, insist);
            self.stats.pages_rerequested = self.wants.rerequested;
            if runs.is_empty() {
                continue;
            }
            self.stats.requests += 1;
            self.stats.pages_requested += runs.iter().map(|r| u64::from(r.count)).sum::<u64>();
            if insist {
                self.stats.insisted_requests += 1;
            }
            // Insisting: claim to follow no stream, so the server cannot count on repairs.
            let stream_start = if insist { wire::NO_STREAM } else { self.stream.start() };
            let msg = Message::Request(wire::Request {
                stream_start,
                loss_ppm: self.stream.loss_ppm(),
                runs: Items::Slice(&runs),
            });
            return self.seal(msg, buf);
        }
        let rto = self.request_rto();
        if let Some(i) = self.reports.iter().position(|r| r.next_at <= now) {
            let r = &mut self.reports[i];
            r.next_at = now + rto * (1 << r.attempts.min(6));
            r.attempts += 1;
            let (fork, clone, status, result) = (r.fork, r.clone, r.status, r.result.clone());
            return self.seal(Message::Report(wire::Report { fork, clone, status, result: &result }), buf);
        }
        let due = now >= self.status_at || self.status_due && self.progress_status_at().is_none_or(|t| now >= t);
        if due && self.stream.start() != wire::NO_STREAM {
            self.status_at = now + self.status_interval;
            if let Some(retry) = self.join_retry {
                let retry = (retry * 2).max(self.rtt() * 4).max(self.progress_gap()).min(self.status_interval);
                self.status_at = now + retry;
                self.join_retry = Some(retry);
            }
            self.status_due = false;
            self.last_status_at = Some(now);
            self.last_status_rt = self.stream.received_through();
            self.push_since_status = false;
            self.stats.statuses += 1;
            let (echo, echo_delay_us, loss_events, receive_rate_kib) = self.feedback.status_fields(now);
            let msg = Message::Status(wire::Status {
                stream_start: self.stream.start(),
                received_through: self.stream.received_through(),
                highest_seen: self.stream.highest(),
                loss_ppm: self.stream.loss_ppm(),
                window: self.window(),
                pages_cached: self.pages_cached,
                flags: 0,
                echo,
                echo_delay_us,
                loss_events,
                receive_rate_kib,
            });
            return self.seal(msg, buf);
        }
        None
    }

    /// The window to report: `config.window` positions beyond what this receiver has seen (its
    /// socket buffer holds that many), plus the positions it has seen but holds incomplete beyond
    /// Received Through, up to [`HOLE_ALLOWANCE`] windows of them.
    fn window(&self) -> u32 {
        let w = u64::from(self.config.window);
        let holes = self.stream.highest().saturating_sub(self.stream.received_through()).min(w * HOLE_ALLOWANCE);
        u32::try_from(w + holes).unwrap_or(u32::MAX)
    }

    /// The least time between two Status messages sent for flow control (progress, start, idle).
    fn progress_gap(&self) -> Duration {
        (self.status_interval / PROGRESS_GAP_DIVISOR).max(MIN_PROGRESS_GAP)
    }

    /// When a wanted flow-control Status may go (None: at once).
    fn progress_status_at(&self) -> Option<Time> {
        self.last_status_at.map(|t| t + self.progress_gap())
    }

    /// When [`Receiver::handle_timeout`] (or [`Receiver::poll_transmit`]) must next be called.
    pub fn poll_timeout(&self) -> Option<Time> {
        let mut t: Option<Time> = None;
        let mut earliest = |x: Option<Time>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        earliest(self.nak_at);
        earliest(self.wants.next_due(self.request_rto()));
        earliest(self.reports.iter().map(|r| r.next_at).min());
        if self.stream.start() != wire::NO_STREAM && !self.ended {
            earliest(Some(self.status_at));
            if self.status_due {
                earliest(Some(self.progress_status_at().unwrap_or(self.now)));
            }
        }
        if self.wants.has_fault() && !self.server_lost {
            earliest(self.last_heard.map(|h| h + self.config.server_timeout));
        }
        t
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// The counters.
    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }
}
