//! The sender: the memory server's side of a session.
//!
//! It owns the stream of Data packets (answers to requests first, then the background push), groups
//! them into FEC blocks, adds proactive parity sized to the group's loss, answers NAKs with parity that
//! serves every receiver at once, and keeps the group's liveness and flow-control state.

mod congestion;
mod group;
mod history;
mod queue;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::receiver::MIN_WINDOW;
use crate::wire::{
    self, Announce, BlobKind, Data, EndReason, Header, Heartbeat, Items, Keys, Message, NodeId, Priority, RecordWriter,
    Repair, ReportKey, SessionId, SessionKey, DATA_FIXED_LEN, DATA_LAST_IN_BLOCK, DATA_PUSH, DATA_UNICAST, HEADER_LEN,
    NO_BLOCK, NO_STREAM, RECORD_HEADER_LEN, STATUS_LEAVING, TAG_LEN,
};
use crate::Time;
use group::{FlowParams, Group};
use history::History;
use queue::PageQueue;

/// Bytes of a page sampled by [`looks_incompressible`].
const ENTROPY_SAMPLES: usize = 512;

/// Distinct byte values among [`ENTROPY_SAMPLES`] sampled bytes from which a page counts as random:
/// uniformly random bytes give 221 on average (256 × (1 − e^−2)), with a standard deviation of about
/// 5; a page half zeros, text or machine code, far fewer.
const RANDOM_DISTINCT_BYTES: u32 = 205;

/// Whether `page` looks incompressible: many distinct byte values in an even sample of it (the
/// byte-set heuristic of btrfs's compression). Trying zstd on such a page costs more than sending it
/// (`bench line-rate`, 1 host at 900 Mbit/s, a random image: the server's CPU 0.68-0.71 s with the
/// attempts, 0.62-0.63 s without, and 71-73% of the link against 79-82%).
pub fn looks_incompressible(page: &[u8]) -> bool {
    if page.len() < ENTROPY_SAMPLES * 2 {
        return false;
    }
    let stride = page.len() / ENTROPY_SAMPLES;
    let mut seen = [0u64; 4];
    for i in 0..ENTROPY_SAMPLES {
        let b = page[i * stride];
        seen[usize::from(b >> 6)] |= 1 << (b & 63);
    }
    seen.iter().map(|w| w.count_ones()).sum::<u32>() >= RANDOM_DISTINCT_BYTES
}

/// A prefetch for a page the push reaches within this many pages is left to the push (PROTOCOL.md
/// section 10): 8 MiB of 4 KiB pages, well beyond a fetch's window (256 pages by default).
pub const PUSH_FOLD_HORIZON: u32 = 2048;

/// The pacer's default credit ([`SenderConfig::pace_burst`]). `bench line-rate` (4 hosts behind
/// 250 Mbit/s, paced at 225): without credit the server, sharing 2 cores with the receivers, sent at
/// half its rate (36% of the link).
pub const DEFAULT_PACE_BURST: Duration = Duration::from_millis(2);

/// Frozen memory the sender serves: a snapshot file, a forked parent's memory, a simulated image.
pub trait PageSource {
    /// Number of pages.
    fn page_count(&self) -> u32;
    /// The bytes of `page` (exactly the session's page size). `page < page_count()`.
    fn page(&self, page: u32) -> &[u8];
}

/// What the server pushes without being asked, after the answers to requests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PushPolicy {
    /// Nothing: pages travel only when requested.
    #[default]
    None,
    /// The hinted pages (a recorded working set), in the given order.
    Hints(Vec<u32>),
    /// The hinted pages first, then every other page of the image.
    HintsThenAll(Vec<u32>),
}

/// How the sender is set up.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The session id.
    pub session: SessionId,
    /// The server's incarnation; must grow every time the server restarts a session.
    pub epoch: u32,
    /// The session key shared with the hosts.
    pub key: SessionKey,
    /// log2 of the page size (12..=21).
    pub page_shift: u8,
    /// Largest datagram to send (between `wire::MIN_DATAGRAM` and `wire::MAX_DATAGRAM`).
    pub max_datagram: usize,
    /// Largest FEC block, in source packets (1..=64).
    pub max_block: u8,
    /// Largest FEC block of pushed pages only (1..=64): longer blocks need less parity for the same
    /// losses (the unluckiest receiver's share of a block shrinks), and the push does not wait for
    /// a block to fill. Announce carries the larger of the two.
    pub push_max_block: u8,
    /// Encrypt page payloads (ChaCha20-Poly1305) rather than only authenticate them.
    pub encrypt: bool,
    /// zstd level for pages (None: send pages raw). A page is sent compressed only when that saves bytes.
    pub zstd_level: Option<i32>,
    /// Pacing rate for everything the server sends, bytes per second (None: unpaced). With
    /// congestion control on, the most it may send at.
    pub rate_bytes_per_sec: Option<u64>,
    /// Congestion control (PROTOCOL.md section 11.1): pace at the rate the slowest receiver's path
    /// sustains, found from the receivers' loss event rates, receive rates and round trips.
    pub congestion_control: bool,
    /// How far behind its schedule the pacer may fall and still catch up (a token bucket of this
    /// much time at the rate): a driver loop that wakes late, because it shares the CPU with other
    /// work, sends what it owes in one burst instead of losing the time. Zero keeps no credit at
    /// all (every late wake-up lowers the rate).
    pub pace_burst: Duration,
    /// A first estimate of the round-trip time to the hosts.
    pub rtt_hint: Duration,
    /// What to push in the background.
    pub push: PushPolicy,
    /// A rate of its own for the push, bytes per second, within the pacing rate (None: the push
    /// goes as fast as pacing and flow control allow). Rate-limited, the push is *background
    /// completion* (PROTOCOL.md section 10.1): it fills every host's copy of the image slowly,
    /// after every answer, so hosts outlive the server; it is then not the hosts' fetch, so
    /// prefetch is not left to it and read-ahead answers may leave the stream.
    pub push_rate_bytes_per_sec: Option<u64>,
    /// The push waits until no request has arrived for this long (zero: it does not wait): with
    /// background completion, the push then runs only while the hosts are not faulting, so it
    /// takes no CPU or link from clones that are starting or fetching their working set.
    pub push_quiet: Duration,
    /// Bytes of sent stream kept for repair; older blocks cannot be repaired (they are re-sent on request).
    pub repair_history_bytes: usize,
    /// A receiver silent for this long is dropped from the group.
    pub receiver_timeout: Duration,
    /// Keep the push within the slowest live receiver's window (PROTOCOL.md section 11). Off, the
    /// push is only paced: for measurements of what flow control saves.
    pub flow_control: bool,
    /// The window, in stream positions, assumed for a receiver that has not reported one yet.
    pub initial_window: u32,
    /// The push starts once this many receivers are live (like udp-sender's `--min-receivers`):
    /// set it to the hosts a fork plan names, so that none of them joins a push already under way
    /// (the server cannot hold the push for a host it has not heard from).
    pub min_receivers: u32,
    /// A receiver whose last Status is older than this (and than four status intervals) no longer
    /// holds back the push, though it stays in the group until `receiver_timeout`.
    pub flow_timeout: Duration,
    /// Loss rate assumed for a receiver that has not reported one.
    pub assumed_loss: f64,
    /// Proactive parity is sized so that the expected number of receivers that must still NAK a block
    /// stays below this.
    pub target_nakers_per_block: f64,
    /// For blocks of pushed pages only, the target above is raised to this fraction of the live
    /// receivers: the push is background traffic, so a NAK round trip costs no vCPU anything, and
    /// parity sent on NAK follows the receivers' actual losses where proactive parity must cover the
    /// unluckiest receiver's. 0 treats push blocks like any other.
    pub push_nakers_fraction: f64,
    /// Seed for the sender's randomness.
    pub seed: u64,
    /// Answer a page that exactly one host asked for (and that no other host asked for while it
    /// was queued) by unicast to that host, outside the stream (PROTOCOL.md section 8.1): the other
    /// hosts neither receive nor process it. Off: every answer is multicast in the stream.
    pub unicast_answers: bool,
}

impl SenderConfig {
    /// A configuration with the defaults a LAN deployment wants.
    pub fn new(session: SessionId, epoch: u32, key: SessionKey, page_shift: u8) -> SenderConfig {
        SenderConfig {
            session,
            epoch,
            key,
            page_shift,
            max_datagram: 1472,
            max_block: 32,
            push_max_block: 64,
            encrypt: false,
            zstd_level: Some(1),
            rate_bytes_per_sec: None,
            congestion_control: false,
            pace_burst: DEFAULT_PACE_BURST,
            rtt_hint: Duration::from_micros(200),
            push: PushPolicy::None,
            push_rate_bytes_per_sec: None,
            push_quiet: Duration::ZERO,
            repair_history_bytes: 64 << 20,
            receiver_timeout: Duration::from_secs(5),
            flow_control: true,
            initial_window: MIN_WINDOW,
            min_receivers: 1,
            flow_timeout: Duration::from_secs(1),
            assumed_loss: 0.01,
            target_nakers_per_block: 0.25,
            push_nakers_fraction: 0.5,
            seed: 0,
            unicast_answers: false,
        }
    }
}

/// Where a datagram from [`Sender::poll_transmit`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The session's multicast group.
    Group,
    /// One host (an out-of-stream answer, [`SenderConfig::unicast_answers`]).
    Node(NodeId),
}

/// A datagram ready to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Its length in the caller's buffer.
    pub len: usize,
    /// Where it goes.
    pub destination: Destination,
    /// It finished a page a host faulted on: send it, and what is queued before it, now, before
    /// more is written (the next pages' encoding would hold the fault's answer back).
    pub urgent: bool,
}

/// Things the sender tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// A receiver was heard from for the first time.
    ReceiverJoined(crate::wire::NodeId),
    /// A receiver left or went silent past the timeout.
    ReceiverLost(crate::wire::NodeId),
    /// A receiver's Status said, for the first time, that it holds every page of the image: its
    /// clones no longer need this server.
    ReceiverComplete(crate::wire::NodeId),
    /// A clone reported its result.
    CloneReport {
        /// The host that sent it.
        node: crate::wire::NodeId,
        /// The fork.
        fork: u32,
        /// The clone.
        clone: u32,
        /// Its exit status.
        status: u32,
        /// Its result bytes.
        result: Vec<u8>,
    },
}

/// Counters, readable at any time.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SenderStats {
    /// Datagrams sent.
    pub tx_packets: u64,
    /// Bytes sent (datagram payloads, headers and tags included).
    pub tx_bytes: u64,
    /// Data packets sent.
    pub data_packets: u64,
    /// Parity packets sent, proactive and on NAK.
    pub repair_packets: u64,
    /// Of which proactive (at block close, before any NAK).
    pub proactive_repairs: u64,
    /// Heartbeats, announcements and queue advertisements sent.
    pub control_packets: u64,
    /// Of which queue advertisements.
    pub adverts: u64,
    /// Datagrams received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Requests received.
    pub requests: u64,
    /// NAKs received.
    pub naks: u64,
    /// Status messages received.
    pub statuses: u64,
    /// Pages asked for in requests.
    pub pages_requested: u64,
    /// Requested pages not sent because they were queued, or sent where the requester can repair them.
    pub pages_deduplicated: u64,
    /// Prefetch-priority pages left to the running push, which reaches them soon (PROTOCOL.md
    /// section 10): not queued on demand.
    pub prefetch_left_to_push: u64,
    /// Pages sent (zero pages included).
    pub pages_sent: u64,
    /// Of them, pages answered out of the stream to the one host that asked.
    pub unicast_pages: u64,
    /// Out-of-stream (unicast) Data packets sent.
    pub unicast_packets: u64,
    /// Pages sent to one host out of the stream and then asked for by another.
    pub unicast_second_askers: u64,
    /// Of which zero pages (sent as a run marker).
    pub zero_pages_sent: u64,
    /// Of which compressed.
    pub compressed_pages_sent: u64,
    /// Pages sent raw without a compression attempt: a sample of their bytes looked random
    /// ([`looks_incompressible`]).
    pub incompressible_pages: u64,
    /// Of which pushed (not asked for).
    pub pages_pushed: u64,
    /// Times the push had pages left but the window of the slowest live receiver held it back.
    pub push_window_stalls: u64,
    /// Receivers that said they hold every page (each counted once).
    pub receivers_complete: u64,
    /// Received datagrams dropped as malformed (bad length, magic, version, type, fields).
    pub rx_malformed: u64,
    /// Received datagrams dropped because authentication failed.
    pub rx_unauthenticated: u64,
    /// Received datagrams dropped as replayed or of another session or epoch.
    pub rx_stale: u64,
    /// NAK entries that named blocks no longer in the repair history.
    pub repairs_expired: u64,
    /// Receivers currently live.
    pub receivers_live: u64,
    /// Congestion control: the rate it paces at now, bytes per second (0: off).
    pub congestion_rate: u64,
    /// Congestion control: the lowest rate it has set, bytes per second (0: off or never set).
    pub congestion_min_rate: u64,
    /// Congestion control: rate updates.
    pub congestion_updates: u64,
    /// Congestion control: Clock messages sent (PROTOCOL.md 3.13).
    pub clocks: u64,
    /// Congestion control: the largest smoothed round trip among the receivers that count, µs.
    pub congestion_rtt_us: u64,
}

/// Why a sender could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A configuration value is out of range.
    #[error("invalid sender configuration: {0}")]
    Invalid(String),
}

/// The memory server's protocol state machine. See the crate docs for how to drive it.
pub struct Sender<S: PageSource> {
    config: SenderConfig,
    source: S,
    stats: SenderStats,
    keys: Keys,
    /// Keys for receivers that have not learned the epoch yet (they send epoch 0).
    keys_epoch0: Keys,
    next_pn: u64,
    next_seq: u64,
    /// The open (not yet closed) block: its id, first position and bodies.
    block_id: u32,
    block_first: u64,
    block_bodies: Vec<Vec<u8>>,
    /// Whether every packet of the open block so far is pushed (its parity may then wait for NAKs).
    block_push_only: bool,
    history: History,
    /// Per page: the block it was last sent in, or NO_BLOCK.
    page_block: Vec<u32>,
    queue: PageQueue,
    /// Every blob published, for receivers that join after it went out.
    published: Vec<Published>,
    /// Blobs to send (indices into `published`), the first possibly under way.
    blobs: VecDeque<BlobOut>,
    /// The id of the session's descriptor blob, for Announce (0: none).
    descriptor: u32,
    /// The push had pages left but the window held it back, at the last look.
    push_blocked: bool,
    /// `min_receivers` were live once: the push may run.
    push_started: bool,
    /// With a push rate: the push sends nothing before this time.
    push_pace_at: Time,
    /// When the last request arrived (for `push_quiet`).
    last_request_at: Option<Time>,
    /// The latest time given to any input.
    now: Time,
    current: Option<Encoding>,
    /// Requested pages in the queue: the one host that asked for each (None: several did).
    requester: HashMap<u32, Option<NodeId>>,
    /// The out-of-stream page being sent, and to whom.
    unicast: Option<(NodeId, Encoding)>,
    /// Pages sent out of the stream lately: to whom and when (a re-request from that host soon
    /// after is its answer still on the way, not a loss).
    unicast_sent: HashMap<u32, (NodeId, Time)>,
    /// Per page, the host it last went to out of the stream (0: none since it went to the group).
    unicast_to: Vec<u32>,
    /// How often pages sent to one host were then asked for by another: decaying counts of
    /// out-of-stream sends and of such second askers (see [`Sender::unicast_pays`]).
    unicast_recent: (f64, f64),
    /// Single-host pages seen while out-of-stream answers do not pay (every 16th still goes so).
    unicast_probe: u32,
    /// Where the datagram `next_datagram` just wrote goes.
    next_destination: Destination,
    /// The datagram `next_datagram` just wrote finished a page a host faulted on.
    next_urgent: bool,
    /// The datagram `take_datagram` just took was authentic.
    authentic: bool,
    /// Parity to send: (block, parity counter).
    repairs: VecDeque<(u32, u32)>,
    group: Group,
    events: VecDeque<SenderEvent>,
    acks: Vec<ReportKey>,
    /// Pages queued since the last advertisement, with their priority.
    advert: Vec<(u32, Priority)>,
    reports_seen: HashSet<(u32, u32)>,
    announce_at: Time,
    /// The gap before the next Announce (doubles from [`ANNOUNCE_FIRST_GAP`] to [`ANNOUNCE_EVERY`]).
    announce_gap: Duration,
    heartbeat_at: Option<Time>,
    heartbeat_gap: Duration,
    pace_at: Time,
    /// The congestion controller (PROTOCOL.md 11.1), when congestion control is on.
    congestion: Option<congestion::Controller>,
    ends_to_send: u8,
    end_reason: Option<EndReason>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    body: Vec<u8>,
    rng: ChaCha8Rng,
}

/// A blob published in the session.
struct Published {
    kind: BlobKind,
    id: u32,
    bytes: Vec<u8>,
    /// The position of its first fragment in its latest transmission (None: not sent yet).
    sent_from: Option<u64>,
}

/// A blob being sent: which one, and how far.
struct BlobOut {
    index: usize,
    offset: usize,
}

/// A page's encoding being cut into fragments.
struct Encoding {
    page: u32,
    /// Pushed, not asked for.
    push: bool,
    /// Asked for by a fault (the answer someone waits on, see [`Transmit::urgent`]).
    fault: bool,
    zstd: bool,
    bytes: Vec<u8>,
    offset: usize,
}

impl Encoding {
    /// Writes as much of the page as fits into `w`; true once all of it is written.
    fn write_into(&mut self, w: &mut RecordWriter<'_>) -> bool {
        let n =
            w.push_page(self.page, self.zstd, self.bytes.len() as u32, self.offset as u32, &self.bytes[self.offset..]);
        self.offset += n;
        self.offset >= self.bytes.len()
    }
}

/// How long a re-request from the host a page was just sent to alone is taken for its answer
/// still on the way (and ignored) rather than a loss.
const UNICAST_HOLD: Duration = Duration::from_millis(20);
/// Weight of the past in the counts of out-of-stream sends and second askers, per send (a memory
/// of about 500 sends).
const UNICAST_DECAY: f64 = 0.998;
/// Above this share of out-of-stream pages asked for again by another host, answers go to the group.
const UNICAST_SHARED_LIMIT: f64 = 0.1;
/// Entries of recent out-of-stream sends kept before the old ones are dropped.
const UNICAST_HOLD_PAGES: usize = 4096;

/// Announce period once the session has started.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// The first gap between Announces: the gaps double from it up to [`ANNOUNCE_EVERY`], so a host
/// that lost the first Announce, or started a moment after the server, joins within milliseconds
/// instead of a second later (10, 20, 40 ... 640 ms: 7 more 20-byte packets in the first 1.3 s).
const ANNOUNCE_FIRST_GAP: Duration = Duration::from_millis(10);
/// Parity sent after a position a receiver has not seen counts as on its way to it for at most
/// this long (then it was lost, or the receiver is stuck).
const PARITY_FLIGHT_LIMIT: Duration = Duration::from_millis(250);

/// The send time of parity still queued (not sent yet) in a block's parity log.
const NOT_SENT: Time = Time::from_nanos(u64::MAX);
const MAX_HEARTBEAT_GAP: Duration = Duration::from_secs(1);
const MAX_PAGES_PER_REQUEST: usize = 4096;
/// How much longer a Repair body is than the longest Data body of its block, at most: the symbol
/// holds the whole Data body plus a 2-byte length, rounded up to even, behind the Repair fields.
const REPAIR_OVERHEAD: usize = wire::REPAIR_FIXED_LEN + 3;

impl<S: PageSource> Sender<S> {
    /// A sender serving `source` under `config`.
    pub fn new(config: SenderConfig, source: S, now: Time) -> Result<Sender<S>, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(12..=21).contains(&config.page_shift) {
            return bad(format!("page_shift {} is outside 12..=21 (4 KiB to 2 MiB pages)", config.page_shift));
        }
        if !(wire::MIN_DATAGRAM..=wire::MAX_DATAGRAM).contains(&config.max_datagram) {
            return bad(format!(
                "max_datagram {} is outside {}..={}",
                config.max_datagram,
                wire::MIN_DATAGRAM,
                wire::MAX_DATAGRAM
            ));
        }
        if !(1..=64).contains(&config.max_block) || !(1..=64).contains(&config.push_max_block) {
            return bad(format!(
                "max_block {} and push_max_block {} must be within 1..=64",
                config.max_block, config.push_max_block
            ));
        }
        if !(0.0..1.0).contains(&config.assumed_loss) || config.target_nakers_per_block <= 0.0 {
            return bad("assumed_loss must be in [0, 1) and target_nakers_per_block positive".into());
        }
        if config.rate_bytes_per_sec == Some(0) {
            return bad("rate_bytes_per_sec must be positive when set".into());
        }
        if config.push_rate_bytes_per_sec == Some(0) {
            return bad("push_rate_bytes_per_sec must be positive when set".into());
        }
        let page_count = source.page_count();
        let page_size = 1usize << config.page_shift;
        if page_count == 0 {
            return bad("the image has no pages".into());
        }
        if source.page(0).len() != page_size {
            return bad(format!("the page source gives {}-byte pages, not {page_size}", source.page(0).len()));
        }
        let compressor = match config.zstd_level {
            Some(level) => Some(
                zstd::bulk::Compressor::new(level)
                    .map_err(|e| ConfigError::Invalid(format!("zstd level {level}: {e}")))?,
            ),
            None => None,
        };
        let keys = Keys::derive(&config.key, config.session, config.epoch);
        let keys_epoch0 = Keys::derive(&config.key, config.session, 0);
        Ok(Sender {
            stats: SenderStats::default(),
            keys,
            keys_epoch0,
            next_pn: 0,
            next_seq: 0,
            block_id: 0,
            block_first: 0,
            block_bodies: Vec::new(),
            block_push_only: true,
            history: History::new(config.repair_history_bytes),
            page_block: vec![NO_BLOCK; page_count as usize],
            queue: PageQueue::new(page_count, &config.push),
            published: Vec::new(),
            blobs: VecDeque::new(),
            descriptor: 0,
            push_blocked: false,
            push_started: false,
            push_pace_at: now,
            last_request_at: None,
            now,
            current: None,
            requester: HashMap::new(),
            unicast: None,
            unicast_sent: HashMap::new(),
            unicast_to: vec![0; page_count as usize],
            unicast_recent: (0.0, 0.0),
            unicast_probe: 0,
            next_destination: Destination::Group,
            next_urgent: false,
            authentic: false,
            repairs: VecDeque::new(),
            group: Group::default(),
            events: VecDeque::new(),
            acks: Vec::new(),
            advert: Vec::new(),
            reports_seen: HashSet::new(),
            announce_at: now,
            announce_gap: ANNOUNCE_FIRST_GAP,
            heartbeat_at: None,
            heartbeat_gap: config.rtt_hint,
            pace_at: now,
            congestion: config.congestion_control.then(|| {
                congestion::Controller::new(now, config.rtt_hint, config.max_datagram, config.rate_bytes_per_sec)
            }),
            ends_to_send: 0,
            end_reason: None,
            compressor,
            body: vec![0; wire::MAX_DATAGRAM],
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            config,
            source,
        })
    }

    /// The session this sender serves.
    pub fn session(&self) -> SessionId {
        self.config.session
    }

    /// Takes a datagram a receiver sent. Malformed, unauthenticated and stale datagrams are counted
    /// in [`SenderStats`] and otherwise ignored. Returns true when the datagram was authentic, of
    /// this session and its epoch, and no replay: its source is then the host's address.
    pub fn handle_datagram(&mut self, now: Time, datagram: &mut [u8]) -> bool {
        self.authentic = false;
        self.take_datagram(now, datagram);
        self.authentic
    }

    fn take_datagram(&mut self, now: Time, datagram: &mut [u8]) {
        self.now = self.now.max(now);
        self.stats.rx_packets += 1;
        self.stats.rx_bytes += datagram.len() as u64;
        let header = match wire::peek_header(datagram) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("dropping malformed datagram: {e}");
                self.stats.rx_malformed += 1;
                return;
            }
        };
        if header.session != self.config.session || header.node == NodeId::SERVER {
            self.stats.rx_stale += 1;
            return;
        }
        let keys = if header.epoch == self.config.epoch {
            &self.keys
        } else if header.epoch == 0 {
            &self.keys_epoch0
        } else {
            self.stats.rx_stale += 1;
            return;
        };
        let (header, body) = match wire::open(datagram, keys) {
            Ok(x) => x,
            Err(wire::DecodeError::BadTag) => {
                self.stats.rx_unauthenticated += 1;
                return;
            }
            Err(e) => {
                tracing::debug!("dropping malformed datagram: {e}");
                self.stats.rx_malformed += 1;
                return;
            }
        };
        let msg = match Message::parse(header.msg_type, body) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("dropping malformed {:?} from {:?}: {e}", header.msg_type, header.node);
                self.stats.rx_malformed += 1;
                return;
            }
        };
        if !matches!(msg, Message::Request(_) | Message::Nak(_) | Message::Status(_) | Message::Report(_)) {
            self.stats.rx_malformed += 1;
            return;
        }
        let node = header.node;
        // Until its first Status, a new member counts in the push window from the least position it
        // may still be reading: its NAK's Highest Seen, its Request's Stream Start.
        let from = match &msg {
            Message::Nak(n) => n.highest_seen.min(self.next_seq),
            Message::Request(r) if r.stream_start != NO_STREAM => r.stream_start.min(self.next_seq),
            _ => self.next_seq,
        };
        let (member, joined) = self.group.touch(node, now, from);
        if !member.replay.accept(header.packet_number) {
            self.stats.rx_stale += 1;
            return;
        }
        self.authentic = true;
        member.last_heard = now;
        if joined {
            self.events.push_back(SenderEvent::ReceiverJoined(node));
        }
        match msg {
            Message::Request(r) => {
                self.stats.requests += 1;
                // An insisting Request (section 5.3) claims no stream; the member's position stands.
                if r.stream_start != NO_STREAM {
                    member.stream_start = r.stream_start;
                }
                self.blobs_for(r.stream_start);
                self.group.report_loss(node, r.loss_ppm);
                self.handle_request(node, r.stream_start, r.runs);
            }
            Message::Nak(n) => {
                self.stats.naks += 1;
                member.stream_start = n.stream_start;
                self.blobs_for(n.stream_start);
                self.group.report_loss(node, n.loss_ppm);
                let rtt = self.group.srtt(node).unwrap_or(self.config.rtt_hint).max(self.config.rtt_hint);
                self.handle_nak(now, rtt, n.highest_seen, n.entries);
            }
            Message::Status(s) => {
                self.stats.statuses += 1;
                member.stream_start = s.stream_start;
                let complete = s.pages_cached >= self.page_block.len() as u32;
                if self.group.status(node, now, s.received_through, s.window, complete) {
                    self.stats.receivers_complete += 1;
                    self.events.push_back(SenderEvent::ReceiverComplete(node));
                }
                self.group.report_loss(node, s.loss_ppm);
                if self.congestion.is_some() {
                    self.take_feedback(now, node, &s);
                }
                self.blobs_for(s.stream_start);
                if s.flags & STATUS_LEAVING != 0 && self.group.remove(node) {
                    self.events.push_back(SenderEvent::ReceiverLost(node));
                }
            }
            Message::Report(r) => {
                let key = ReportKey { fork: r.fork, clone: r.clone };
                if self.reports_seen.insert((r.fork, r.clone)) {
                    self.events.push_back(SenderEvent::CloneReport {
                        node,
                        fork: r.fork,
                        clone: r.clone,
                        status: r.status,
                        result: r.result.to_vec(),
                    });
                }
                if !self.acks.contains(&key) {
                    self.acks.push(key);
                }
            }
            _ => {}
        }
        self.stats.receivers_live = self.group.len() as u64;
        if !self.push_started && self.group.len() >= self.config.min_receivers.max(1) as usize {
            self.push_started = true;
            // A quiet period counts from the push's start too: the hosts are about to fault.
            self.last_request_at = Some(self.last_request_at.unwrap_or(now).max(now));
            tracing::debug!("{} receivers live: the push may start", self.group.len());
        }
    }

    /// The first stream position of the block page `page` was last sent in, if the page went out
    /// and can still be repaired.
    fn sent_at(&self, page: u32) -> Option<u64> {
        let block = self.page_block[page as usize];
        if block == NO_BLOCK {
            None
        } else if block == self.block_id {
            Some(self.block_first)
        } else {
            self.history.first_seq(block)
        }
    }

    fn handle_request(&mut self, node: NodeId, stream_start: u64, runs: Items<'_, wire::PageRun>) {
        self.last_request_at = Some(self.now);
        let page_count = self.page_block.len() as u64;
        let mut budget = MAX_PAGES_PER_REQUEST;
        for run in runs.iter() {
            let Ok(run) = run else {
                self.stats.rx_malformed += 1;
                return;
            };
            if u64::from(run.first_page) + u64::from(run.count) > page_count {
                tracing::debug!("request for pages {}+{} beyond the image", run.first_page, run.count);
                self.stats.rx_malformed += 1;
                return;
            }
            for page in run.first_page..run.first_page + u32::from(run.count) {
                if budget == 0 {
                    return;
                }
                budget -= 1;
                self.stats.pages_requested += 1;
                let will_reach = stream_start != NO_STREAM && self.sent_at(page).is_some_and(|s| s >= stream_start);
                let in_flight = self
                    .unicast_sent
                    .get(&page)
                    .is_some_and(|&(to, at)| to == node && self.now.saturating_since(at) < UNICAST_HOLD);
                let went_to = self.unicast_to[page as usize];
                if went_to != 0 && went_to != node.0 {
                    // Sent to one host, wanted by another: out-of-stream answers cost a second send.
                    self.unicast_to[page as usize] = 0;
                    self.unicast_recent.1 += 1.0;
                    self.stats.unicast_second_askers += 1;
                }
                if will_reach || in_flight {
                    self.stats.pages_deduplicated += 1;
                    continue;
                }
                if run.priority == Priority::Prefetch
                    && self.push_is_the_fetch()
                    && self.push_started
                    && !self.group.is_empty()
                    && self.queue.push_reaches_soon(page, PUSH_FOLD_HORIZON)
                {
                    // The running push sends it within its next pages anyway: on demand it would
                    // take the push's turn, and a bulk fetch asking ahead of a push would keep the
                    // push from ever running.
                    self.stats.prefetch_left_to_push += 1;
                    continue;
                }
                let raised = self.queue.enqueue(page, run.priority, node.0);
                let mut became_shared = false;
                self.requester
                    .entry(page)
                    .and_modify(|asker| {
                        if asker.is_some_and(|a| a != node) {
                            became_shared = true;
                        }
                        if *asker != Some(node) {
                            *asker = None;
                        }
                    })
                    .or_insert(Some(node));
                if !raised {
                    self.stats.pages_deduplicated += 1;
                }
                // Queued announces "it is coming to the group": with unicast answers that holds only
                // once a second host asked (the page then goes to the group), so only then is it
                // advertised; the hosts after the second stay quiet.
                let advertise = if self.config.unicast_answers {
                    became_shared || (raised && self.requester.get(&page) == Some(&None))
                } else {
                    raised
                };
                if advertise && self.group.len() > 1 {
                    self.advert.push((page, run.priority));
                }
            }
        }
    }

    /// Takes a NAK from a receiver `rtt` away.
    fn handle_nak(&mut self, now: Time, rtt: Duration, highest_seen: u64, entries: Items<'_, wire::NakEntry>) {
        for entry in entries.iter() {
            let Ok(e) = entry else {
                self.stats.rx_malformed += 1;
                return;
            };
            if e.block == NO_BLOCK {
                let end = e.first_seq.saturating_add(u64::from(e.needed));
                let blocks = self.history.blocks_in(e.first_seq, end);
                if blocks.is_empty() && e.first_seq < self.history.repairable_from(self.next_seq) {
                    self.stats.repairs_expired += 1;
                }
                for (block, missing) in blocks {
                    // The receiver knows nothing of the block, so it saw none of its parity.
                    self.queue_parity(now, rtt, block, missing as u32, None, Some(highest_seen));
                }
            } else if self.history.contains(e.block) {
                self.queue_parity(
                    now,
                    rtt,
                    e.block,
                    u32::from(e.needed),
                    Some(u32::from(e.parity_seen)),
                    Some(highest_seen),
                );
            } else if e.block < self.block_id {
                self.stats.repairs_expired += 1;
            }
        }
    }

    /// Queues parity for `block` so that a receiver `rtt` away needing `needed` more symbols, having
    /// seen parity below `parity_seen` and stream positions below `highest_seen`, gets them. Parity
    /// it has not seen is still on its way, and counts, if it is still queued here (paced), if it
    /// went out within the last two round trips, or after a position the receiver has not seen yet
    /// (the stream is FIFO: a receiver whose socket holds a backlog sees that parity after the
    /// backlog); other parity it has not seen was lost. This is what makes NAKs that cross repairs in flight cost nothing extra, from
    /// nearby and from slow, deeply queued receivers alike, and NAKs from many receivers for one
    /// block answered once.
    fn queue_parity(
        &mut self,
        now: Time,
        rtt: Duration,
        block: u32,
        needed: u32,
        parity_seen: Option<u32>,
        highest_seen: Option<u64>,
    ) {
        let window = rtt * 2;
        let next_seq = self.next_seq;
        let Some(b) = self.history.get_mut(block) else { return };
        let from = parity_seen.map_or(0, |s| s as usize).min(b.parity_log.len());
        let on_its_way = |&(t, stamp): &(Time, u64)| {
            t == NOT_SENT
                || t + window > now
                || highest_seen.is_some_and(|h| stamp > h && t + PARITY_FLIGHT_LIMIT > now)
        };
        let in_flight = b.parity_log[from..].iter().filter(|e| on_its_way(e)).count() as u32;
        let cap = 2 * b.k() as u32 + 2;
        let send = needed.saturating_sub(in_flight).min(cap);
        for _ in 0..send {
            self.repairs.push_back((block, b.parity_log.len() as u32));
            // Stamped when it goes out (`write_repair`): a paced queue may hold it a while.
            b.parity_log.push((NOT_SENT, next_seq));
        }
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = self.now.max(now);
        if now.as_nanos() > self.config.receiver_timeout.as_nanos() as u64 {
            let deadline = Time::from_nanos(now.as_nanos() - self.config.receiver_timeout.as_nanos() as u64);
            for node in self.group.expire(deadline) {
                tracing::info!(
                    "receiver {:?} silent for {:?}: dropped from the group",
                    node,
                    self.config.receiver_timeout
                );
                self.events.push_back(SenderEvent::ReceiverLost(node));
            }
            self.stats.receivers_live = self.group.len() as u64;
        }
    }

    /// How long a receiver's last Status keeps it in the push window: the configured flow timeout,
    /// and at least four of the status intervals the heartbeats announce.
    fn flow_timeout(&self) -> Duration {
        let interval = Duration::from_millis(u64::from(self.status_interval_ms()));
        self.config.flow_timeout.max(interval * 4)
    }

    /// How far the push may run now (PROTOCOL.md section 11); nowhere while no receiver is live.
    fn push_limit(&self) -> u64 {
        if !self.push_started {
            return 0;
        }
        if !self.config.flow_control {
            return if self.group.is_empty() { 0 } else { u64::MAX };
        }
        self.group.push_limit(self.now, self.flow_params())
    }

    fn flow_params(&self) -> FlowParams {
        FlowParams { timeout: self.flow_timeout(), initial_window: self.config.initial_window, min_window: MIN_WINDOW }
    }

    fn push_allowed(&self) -> bool {
        self.queue.has_push() && self.next_seq < self.push_limit() && self.now >= self.push_may_go_at()
    }

    /// The push's own rate and quiet period allow it from this time on.
    fn push_may_go_at(&self) -> Time {
        let quiet = self.last_request_at.map_or(Time::ZERO, |t| t + self.config.push_quiet);
        self.push_pace_at.max(quiet)
    }

    /// Whether the push is what hosts fetch by (it runs at the session's pace), rather than
    /// background completion at a rate of its own (PROTOCOL.md section 10.1).
    fn push_is_the_fetch(&self) -> bool {
        self.config.push_rate_bytes_per_sec.is_none() && self.queue.has_push()
    }

    /// When the push's own rate or quiet period holds back a push that could otherwise run: the
    /// time it may.
    fn push_rate_wait(&self) -> Option<Time> {
        let held = self.push_started && self.queue.has_push() && self.next_seq < self.push_limit();
        let at = self.push_may_go_at();
        (held && self.now < at).then_some(at)
    }

    fn has_data(&self) -> bool {
        self.current.is_some()
            || self.unicast.is_some()
            || (!self.blobs.is_empty() && !self.group.is_empty())
            || self.queue.has_requested()
            || self.push_allowed()
    }

    /// Counts the moments the window starts holding the push back.
    fn note_push_window(&mut self) {
        let blocked = self.push_started && self.queue.has_push() && !self.group.is_empty() && !self.push_allowed();
        if blocked && !self.push_blocked {
            self.stats.push_window_stalls += 1;
        }
        self.push_blocked = blocked;
    }

    /// Queues again every blob a receiver whose stream starts at `stream_start` cannot get from its
    /// last transmission (it went out before that receiver followed the stream).
    fn blobs_for(&mut self, stream_start: u64) {
        if stream_start == NO_STREAM {
            return;
        }
        for (index, blob) in self.published.iter_mut().enumerate() {
            let missed = blob.sent_from.is_some_and(|from| from < stream_start);
            if missed && !self.blobs.iter().any(|b| b.index == index) {
                tracing::debug!("blob {} goes again for a receiver that joined after it went out", blob.id);
                blob.sent_from = None;
                self.blobs.push_back(BlobOut { index, offset: 0 });
            }
        }
    }

    /// Writes the next datagram to send into `buf` (at least `max_datagram` bytes), or returns None
    /// when nothing is due now (see [`Sender::poll_timeout`]).
    pub fn poll_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<Transmit> {
        if buf.len() < self.config.max_datagram {
            tracing::error!("poll_transmit buffer of {} bytes is below max_datagram", buf.len());
            return None;
        }
        let buf = &mut buf[..self.config.max_datagram];
        self.now = self.now.max(now);
        self.note_push_window();
        let pace = self.pace_rate();
        if pace.is_some() && now < self.pace_at {
            return None;
        }
        let len = self.next_datagram(now, buf)?;
        self.stats.tx_packets += 1;
        self.stats.tx_bytes += len as u64;
        if let Some(c) = &mut self.congestion {
            c.on_sent(len);
        }
        if let Some(rate) = pace {
            let cost = Duration::from_nanos((len as u64).saturating_mul(1_000_000_000) / rate);
            // A token bucket: the schedule may lag `now` by at most `pace_burst`, the credit a
            // late loop may spend at once.
            let floor = Time::ZERO + (now - Time::ZERO).saturating_sub(self.config.pace_burst);
            self.pace_at = self.pace_at.max(floor) + cost;
        }
        Some(Transmit {
            len,
            destination: std::mem::replace(&mut self.next_destination, Destination::Group),
            urgent: std::mem::take(&mut self.next_urgent),
        })
    }

    /// The next datagram, most urgent first; a branch that fails to produce one falls through to
    /// the next, so `None` always means nothing is due now.
    fn next_datagram(&mut self, now: Time, buf: &mut [u8]) -> Option<usize> {
        if self.ends_to_send > 0 {
            self.ends_to_send -= 1;
            let reason = self.end_reason.unwrap_or(EndReason::Shutdown);
            self.stats.control_packets += 1;
            return self.seal(Message::End { reason, final_seq: self.next_seq }, buf);
        }
        if self.end_reason.is_some() {
            return None;
        }
        if now >= self.announce_at {
            self.announce_at = now + self.announce_gap;
            self.announce_gap = (self.announce_gap * 2).min(ANNOUNCE_EVERY);
            self.stats.control_packets += 1;
            let msg = Message::Announce(Announce {
                page_shift: self.config.page_shift,
                max_block: self.config.max_block.max(self.config.push_max_block),
                max_datagram: self.config.max_datagram as u16,
                page_count: self.page_block.len() as u32,
                next_seq: self.next_seq,
                descriptor: self.descriptor,
            });
            if let Some(len) = self.seal(msg, buf) {
                return Some(len);
            }
        }
        if let Some(len) = self.write_next_repair(buf) {
            return Some(len);
        }
        if !self.advert.is_empty() {
            if let Some(len) = self.write_advert(buf) {
                return Some(len);
            }
        }
        if self.config.unicast_answers && (self.unicast.is_some() || self.queue.has_requested()) {
            if let Some(len) = self.write_unicast(now, buf) {
                return Some(len);
            }
            // The open block was closed for it: its parity goes first.
            if let Some(len) = self.write_next_repair(buf) {
                return Some(len);
            }
        }
        if self.has_data() && !self.group.is_empty() && self.congestion.as_mut().is_some_and(|c| c.clock_due(now)) {
            if let Some(len) = self.write_clock(now, buf) {
                return Some(len);
            }
        }
        if self.has_data() {
            self.heartbeat_gap = (self.config.rtt_hint * 2).max(Duration::from_micros(100));
            self.heartbeat_at = Some(now + self.heartbeat_gap);
            if let Some(len) = self.write_data(now, buf) {
                return Some(len);
            }
        }
        if !self.block_bodies.is_empty() {
            // Nothing more may follow the open block now (the push window closed since its last
            // packet, or the push found only pages already sent), yet that packet did not carry
            // DATA_LAST_IN_BLOCK. Close the block here: left open, it would be outside the repair
            // history (NAKs for it ignored) while requests for its pages are deduplicated as "sent
            // at or after your Stream Start", so a host that lost one of its packets could get
            // those pages only by insisting. Receivers learn its k from its parity, the next
            // Heartbeat (whose Next Seq ends it) or the next block.
            self.close_block(now);
            if let Some(len) = self.write_next_repair(buf) {
                return Some(len);
            }
        }
        if self.heartbeat_at.is_some_and(|t| now >= t) {
            self.heartbeat_gap = (self.heartbeat_gap * 2).min(MAX_HEARTBEAT_GAP);
            self.heartbeat_at = Some(now + self.heartbeat_gap);
            self.stats.control_packets += 1;
            let msg = Message::Heartbeat(self.heartbeat());
            if let Some(len) = self.seal(msg, buf) {
                return Some(len);
            }
        }
        if !self.acks.is_empty() {
            let max = (self.config.max_datagram - HEADER_LEN - TAG_LEN - 4) / 8;
            let n = self.acks.len().min(max);
            let acks: Vec<ReportKey> = self.acks.drain(..n).collect();
            self.stats.control_packets += 1;
            return self.seal(Message::ReportAck(Items::Slice(&acks)), buf);
        }
        None
    }

    /// The rate to pace at now, bytes per second: the congestion controller's (within the
    /// configured rate), else the configured rate; None: unpaced.
    fn pace_rate(&self) -> Option<u64> {
        match &self.congestion {
            Some(c) => Some(c.rate()),
            None => self.config.rate_bytes_per_sec,
        }
    }

    /// Microseconds on the clock Clock messages carry (never 0, which means "no echo").
    fn clock_us(now: Time) -> u64 {
        u64::try_from((now - Time::ZERO).as_micros()).unwrap_or(u64::MAX).saturating_add(1)
    }

    /// A Clock (PROTOCOL.md 3.13): the server's clock, its rate and the round trip receivers group
    /// losses by.
    fn write_clock(&mut self, now: Time, buf: &mut [u8]) -> Option<usize> {
        let c = self.congestion.as_ref()?;
        let msg = Message::Clock(wire::Clock {
            timestamp_us: Self::clock_us(now),
            rate_kib: u32::try_from(c.rate() / 1024).unwrap_or(u32::MAX),
            rtt_us: u32::try_from(c.max_rtt().as_micros()).unwrap_or(u32::MAX),
        });
        self.stats.control_packets += 1;
        self.stats.clocks += 1;
        self.seal(msg, buf)
    }

    /// Takes a Status's congestion feedback and updates the rate (PROTOCOL.md 11.1).
    fn take_feedback(&mut self, now: Time, node: NodeId, s: &wire::Status) {
        let rtt_sample = (s.echo != 0)
            .then(|| Self::clock_us(now).checked_sub(s.echo)?.checked_sub(u64::from(s.echo_delay_us)))
            .flatten()
            .filter(|&us| us < 10_000_000)
            .map(|us| Duration::from_micros(us.max(1)));
        let new_loss = self.group.feedback(node, rtt_sample, s.loss_events, s.receive_rate_kib, s.highest_seen);
        let timeout = self.flow_params().timeout;
        let Some(c) = self.congestion.as_mut() else { return };
        if let Some(rate) = c.update(now, self.config.rtt_hint, self.group.congestion_feedback(now, timeout), new_loss)
        {
            self.stats.congestion_updates += 1;
            self.stats.congestion_rate = rate;
            self.stats.congestion_min_rate =
                if self.stats.congestion_min_rate == 0 { rate } else { self.stats.congestion_min_rate.min(rate) };
            self.stats.congestion_rtt_us = u64::try_from(c.max_rtt().as_micros()).unwrap_or(u64::MAX);
        }
    }

    /// Advertises pages queued since the last advertisement (as many runs as fit one datagram).
    fn write_advert(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.advert.sort_unstable_by_key(|&(page, prio)| (prio, page));
        self.advert.dedup_by_key(|&mut (page, _)| page);
        let max_runs = wire::max_request_runs(self.config.max_datagram);
        let mut runs: Vec<wire::PageRun> = Vec::new();
        let mut used = 0;
        for &(page, priority) in &self.advert {
            if !wire::PageRun::append(&mut runs, page, priority, max_runs) {
                break;
            }
            used += 1;
        }
        self.advert.drain(..used);
        self.stats.control_packets += 1;
        self.stats.adverts += 1;
        let msg = Message::Queued(wire::Queued { next_seq: self.next_seq, runs: Items::Slice(&runs) });
        self.seal(msg, buf)
    }

    /// The status interval the heartbeats announce: 250 ms, or 2 ms per receiver in large groups
    /// (at most 500 Status per second in all).
    fn status_interval_ms(&self) -> u32 {
        (2 * self.group.len() as u32).max(250)
    }

    fn heartbeat(&self) -> Heartbeat {
        let receivers = self.group.len() as u32;
        let log2 = 32 - (receivers + 1).leading_zeros();
        let rtt_us = self.config.rtt_hint.as_micros() as u32;
        Heartbeat {
            next_seq: self.next_seq,
            repairable_from: self.history.repairable_from(self.next_seq),
            receivers,
            status_interval_ms: self.status_interval_ms(),
            nak_backoff_us: (rtt_us * log2.max(1) / 2).max(50),
        }
    }

    fn seal(&mut self, msg: Message<'_>, buf: &mut [u8]) -> Option<usize> {
        let header = Header {
            msg_type: msg.msg_type(),
            flags: if self.config.encrypt { wire::FLAG_ENCRYPTED } else { 0 },
            session: self.config.session,
            epoch: self.config.epoch,
            node: NodeId::SERVER,
            packet_number: self.next_pn,
        };
        self.next_pn += 1;
        match wire::encode(&header, &msg, &self.keys, buf) {
            Ok(len) => Some(len),
            Err(e) => {
                tracing::error!("could not encode {:?}: {e}", header.msg_type);
                None
            }
        }
    }

    fn write_repair(&mut self, block: u32, counter: u32, buf: &mut [u8]) -> Option<usize> {
        let first_seq = self.history.first_seq(block)?;
        let k = self.history.get_mut(block)?.k() as u16;
        let symbol = match self.history.parity_symbol(block, counter)? {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("parity for block {block}: {e}");
                return None;
            }
        };
        let msg = Message::Repair(Repair {
            first_seq,
            block,
            k,
            index: symbol.index,
            total: symbol.total,
            symbol: &symbol.symbol,
        });
        self.stats.repair_packets += 1;
        let len = self.seal(msg, buf)?;
        // Repairs go out before any new Data, so `next_seq` is the position they follow.
        let (now, next_seq) = (self.now, self.next_seq);
        if let Some(entry) = self.history.get_mut(block).and_then(|b| b.parity_log.get_mut(counter as usize)) {
            *entry = (now, next_seq);
        }
        Some(len)
    }

    /// Fills one Data packet with the most urgent content and appends it to the open block.
    fn write_data(&mut self, now: Time, buf: &mut [u8]) -> Option<usize> {
        // Leave room so every parity packet of the block fits a datagram.
        let room = self.config.max_datagram - HEADER_LEN - TAG_LEN - REPAIR_OVERHEAD;
        let mut body = std::mem::take(&mut self.body);
        let mut push = false;
        // A fragment of a pushed page goes in this datagram (the push's own rate counts it).
        let mut carries_push = false;
        let mut demand = false;
        let records_len = {
            let mut w = RecordWriter::new(&mut body[DATA_FIXED_LEN..room]);
            loop {
                if let Some(enc) = &mut self.current {
                    demand |= !enc.push;
                    carries_push |= enc.push;
                    if !enc.write_into(&mut w) {
                        break;
                    }
                    self.next_urgent |= enc.fault;
                    self.current = None;
                    continue;
                }
                if w.room() < 64 {
                    break;
                }
                if let Some(out) = self.blobs.front_mut().filter(|_| !self.group.is_empty()) {
                    demand = true;
                    let blob = &mut self.published[out.index];
                    if out.offset == 0 {
                        blob.sent_from = Some(self.next_seq);
                    }
                    let n = w.push_blob(
                        blob.kind,
                        blob.id,
                        blob.bytes.len() as u32,
                        out.offset as u32,
                        &blob.bytes[out.offset..],
                    );
                    out.offset += n;
                    if out.offset >= blob.bytes.len() {
                        self.blobs.pop_front();
                    }
                    continue;
                }
                let mut pushed = false;
                let mut fault = false;
                let page = if let Some((page, priority)) = self.queue.pop_requested() {
                    self.requester.remove(&page);
                    demand = true;
                    fault = priority == Priority::Fault;
                    page
                } else if self.push_allowed() {
                    let page_block = &self.page_block;
                    match self.queue.pop_push(|p| page_block[p as usize] != NO_BLOCK) {
                        Some(p) => {
                            push = true;
                            carries_push = true;
                            pushed = true;
                            self.stats.pages_pushed += 1;
                            p
                        }
                        None => break,
                    }
                } else {
                    break;
                };
                self.page_block[page as usize] = self.block_id;
                match self.encode(page, pushed, fault) {
                    // Room for a header was checked above.
                    None => {
                        w.push_zero_run(page, 1);
                        self.next_urgent |= fault;
                    }
                    Some(enc) => self.current = Some(enc),
                }
            }
            w.len()
        };
        if records_len == 0 {
            self.body = body;
            return None;
        }
        debug_assert!(records_len + DATA_FIXED_LEN <= room && RECORD_HEADER_LEN > 0);
        let index = self.block_bodies.len() as u8;
        let seq = self.next_seq;
        // The block closes when full or when nothing more may follow it now (the queue drained, or
        // the push window closes at the next position): its parity goes out at once.
        self.next_seq += 1;
        // Drop the push pages that would be skipped anyway (sent already, or queued on demand), so
        // `has_data` below sees whether the push really has a page left. Otherwise a packet that a
        // page filled (a raw 4 KiB page that starts a 1472-byte packet leaves 11 bytes of its third
        // packet free, too few for another record) goes out without DATA_LAST_IN_BLOCK although
        // nothing follows it: the block is then left open (see `next_datagram`).
        let page_block = &self.page_block;
        self.queue.skip_push(|p| page_block[p as usize] != NO_BLOCK);
        self.block_push_only &= !demand;
        let max_block = if self.block_push_only { self.config.push_max_block } else { self.config.max_block };
        let last = usize::from(index) + 1 >= usize::from(max_block) || !self.has_data();
        let flags = if last { DATA_LAST_IN_BLOCK } else { 0 } | if push { DATA_PUSH } else { 0 };
        let msg = Message::Data(Data {
            seq,
            block: self.block_id,
            index,
            flags,
            records: &body[DATA_FIXED_LEN..DATA_FIXED_LEN + records_len],
        });
        let len = self.seal(msg, buf);
        if let (true, Some(rate), Some(n)) = (carries_push, self.config.push_rate_bytes_per_sec, len) {
            // The push's own token bucket, like the pacer's (`poll_transmit`).
            let cost = Duration::from_nanos((n as u64).saturating_mul(1_000_000_000) / rate.max(1));
            let floor = Time::ZERO + (now - Time::ZERO).saturating_sub(self.config.pace_burst);
            self.push_pace_at = self.push_pace_at.max(floor) + cost;
        }
        // Keep the body exactly as encoded (plaintext) for parity.
        let body_len = DATA_FIXED_LEN + records_len;
        let mut kept = vec![0u8; body_len];
        if let Err(e) = msg.write_body(&mut kept) {
            tracing::error!("re-encoding a data body failed: {e}");
        }
        self.body = body;
        self.stats.data_packets += 1;
        self.block_bodies.push(kept);
        if last {
            self.close_block(now);
        }
        len
    }

    /// The first queued parity packet that can still be written (parity of a block that fell out of
    /// the history is skipped).
    fn write_next_repair(&mut self, buf: &mut [u8]) -> Option<usize> {
        while let Some((block, counter)) = self.repairs.pop_front() {
            if let Some(len) = self.write_repair(block, counter, buf) {
                return Some(len);
            }
        }
        None
    }

    /// The page's encoding (compressed where that saves bytes), or None for an all-zero page (sent
    /// as a zero run). Counts it as sent.
    fn encode(&mut self, page: u32, push: bool, fault: bool) -> Option<Encoding> {
        self.stats.pages_sent += 1;
        let data = self.source.page(page);
        if data.iter().all(|&b| b == 0) {
            self.stats.zero_pages_sent += 1;
            return None;
        }
        let compressed = match self.compressor.as_mut() {
            Some(_) if looks_incompressible(data) => {
                self.stats.incompressible_pages += 1;
                None
            }
            Some(c) => c.compress(data).ok().filter(|c| c.len() < data.len()),
            None => None,
        };
        let (zstd, bytes) = match compressed {
            Some(c) => {
                self.stats.compressed_pages_sent += 1;
                (true, c)
            }
            None => (false, data.to_vec()),
        };
        Some(Encoding { page, push, fault, zstd, bytes, offset: 0 })
    }

    /// An out-of-stream answer (see [`SenderConfig::unicast_answers`]): the page at the head of the
    /// request queue if one host alone asked for it, with the following pages only that host asked
    /// for, into one datagram for that host. None when the head page is for several hosts (the
    /// stream takes it) or nothing is queued.
    fn write_unicast(&mut self, now: Time, buf: &mut [u8]) -> Option<usize> {
        let room = self.config.max_datagram - HEADER_LEN - TAG_LEN;
        let mut body = std::mem::take(&mut self.body);
        let mut node = self.unicast.as_ref().map(|(n, _)| *n);
        let records_len = {
            let mut w = RecordWriter::new(&mut body[DATA_FIXED_LEN..room]);
            loop {
                if let Some((_, enc)) = &mut self.unicast {
                    if !enc.write_into(&mut w) {
                        break;
                    }
                    self.next_urgent |= enc.fault;
                    self.unicast = None;
                    continue;
                }
                if w.room() < 64 {
                    break;
                }
                let Some((page, priority)) = self.queue.peek_requested() else { break };
                let asker = match self.requester.get(&page) {
                    Some(&Some(asker)) if node.is_none_or(|n| n == asker) => asker,
                    _ => break,
                };
                // While a push runs, only faults leave the stream: in it, the answer would reach the
                // host behind the push data already on its way (up to a flow window, ~1.4 MiB), and
                // the page goes to the group again when the push reaches it. Read-ahead and
                // prefetch wait for the stream, which spares the push their second transmission.
                // Whether they pay is not asked then: the page goes to the group once more anyway
                // (the push, or the stream for a host that asks before the push reaches it), whoever
                // else wants it.
                let pushing = self.push_is_the_fetch();
                if pushing && priority != Priority::Fault {
                    break;
                }
                if node.is_none() && !pushing && !self.unicast_pays() {
                    break;
                }
                if node.is_none() && !self.block_bodies.is_empty() {
                    // The stream's open block ends here: nothing more may follow it for a while.
                    self.close_block(now);
                }
                // The page peeked at above, at that priority.
                self.queue.pop_requested();
                self.requester.remove(&page);
                if self.unicast_sent.len() > 4 * UNICAST_HOLD_PAGES {
                    let now = self.now;
                    self.unicast_sent.retain(|_, &mut (_, at)| now.saturating_since(at) < UNICAST_HOLD);
                }
                self.unicast_sent.insert(page, (asker, self.now));
                // Only pages a host faulted on or prefetched (a bulk fetch, working-set hints) count
                // towards "another host then wanted it": read-ahead that ran past the end of a clone's
                // share into another's is not sharing. During a push a second asker costs nothing
                // more (see above): not counted.
                let counted = priority != Priority::ReadAhead && !pushing;
                self.unicast_to[page as usize] = if counted { asker.0 } else { 0 };
                if !pushing {
                    self.unicast_recent =
                        (self.unicast_recent.0 * UNICAST_DECAY + 1.0, self.unicast_recent.1 * UNICAST_DECAY);
                }
                node = Some(asker);
                self.stats.unicast_pages += 1;
                let fault = priority == Priority::Fault;
                match self.encode(page, false, fault) {
                    None => {
                        w.push_zero_run(page, 1);
                        self.next_urgent |= fault;
                    }
                    Some(enc) => self.unicast = Some((asker, enc)),
                }
            }
            w.len()
        };
        let (Some(node), true) = (node, records_len > 0) else {
            self.body = body;
            return None;
        };
        let msg = Message::Data(Data {
            seq: NO_STREAM,
            block: NO_BLOCK,
            index: 0,
            flags: DATA_UNICAST,
            records: &body[DATA_FIXED_LEN..DATA_FIXED_LEN + records_len],
        });
        let len = self.seal(msg, buf);
        self.body = body;
        self.stats.unicast_packets += 1;
        self.next_destination = Destination::Node(node);
        len
    }

    /// Whether out-of-stream answers pay now: unless more than [`UNICAST_SHARED_LIMIT`] of the pages
    /// lately sent to one host (that it faulted on) were then asked for by another (clones on several hosts wanting the
    /// same pages, one after the other: the group should have had them once). While they do not pay,
    /// every 16th single-host datagram still goes out of the stream, to notice when they pay again.
    fn unicast_pays(&mut self) -> bool {
        let (sent, second) = self.unicast_recent;
        if sent < 32.0 || second <= UNICAST_SHARED_LIMIT * sent {
            return true;
        }
        self.unicast_probe = self.unicast_probe.wrapping_add(1);
        self.unicast_probe.is_multiple_of(16)
    }

    fn close_block(&mut self, now: Time) {
        let bodies = std::mem::take(&mut self.block_bodies);
        let k = bodies.len();
        let id = self.block_id;
        self.history.push(id, self.block_first, bodies);
        self.block_id += 1;
        self.block_first = self.next_seq;
        let mut target = self.config.target_nakers_per_block;
        if std::mem::replace(&mut self.block_push_only, true) {
            target = target.max(self.config.push_nakers_fraction * self.group.len() as f64);
        }
        let p = self.group.proactive_parity(k, self.config.assumed_loss, target);
        if p > 0 {
            self.stats.proactive_repairs += p as u64;
            self.queue_parity(now, self.config.rtt_hint, id, p as u32, Some(0), None);
        }
    }

    /// When [`Sender::handle_timeout`] must next be called (or transmit polled again, when paced).
    pub fn poll_timeout(&self) -> Option<Time> {
        if self.end_reason.is_some() && self.ends_to_send == 0 {
            return None;
        }
        let mut sends = vec![self.announce_at];
        sends.extend(self.heartbeat_at);
        if self.has_data()
            || !self.repairs.is_empty()
            || self.ends_to_send > 0
            || !self.acks.is_empty()
            || !self.advert.is_empty()
        {
            sends.push(self.pace_at);
        }
        sends.extend(self.push_rate_wait());
        let mut t = sends.into_iter().min()?;
        if self.pace_rate().is_some() {
            // Paced: nothing goes out before the pacer allows it.
            t = t.max(self.pace_at);
        }
        let mut expiry = self.group.oldest_heard().map(|h| h + self.config.receiver_timeout);
        if self.push_blocked {
            // A silent receiver that holds the push back stops counting at its flow timeout.
            let flow = self.group.next_flow_expiry(self.now, self.flow_params());
            expiry = match (expiry, flow) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Some(expiry.map_or(t, |e| e.min(t)))
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    /// Adds a blob (a VM descriptor or fork plan) to the reliable stream, ahead of pages. It goes
    /// out once a receiver is live, and again for receivers that start following the stream after
    /// it went out. A descriptor becomes the session's descriptor in Announce.
    pub fn publish_blob(&mut self, kind: BlobKind, id: u32, bytes: Vec<u8>) {
        if kind == BlobKind::Descriptor {
            self.descriptor = id;
        }
        self.blobs.push_back(BlobOut { index: self.published.len(), offset: 0 });
        self.published.push(Published { kind, id, bytes, sent_from: None });
    }

    /// Asks for pages as if a receiver that never saw the stream had requested them (e.g. a local
    /// VMM's hints).
    pub fn enqueue_pages(&mut self, pages: &[u32], priority: Priority) {
        for &p in pages {
            if (p as usize) < self.page_block.len() {
                self.queue.enqueue(p, priority, 0);
            }
        }
    }

    /// Ends the session: End goes out three times and the sender then falls silent.
    pub fn end(&mut self, now: Time, reason: EndReason) {
        let _ = now;
        self.end_reason = Some(reason);
        self.ends_to_send = 3;
    }

    /// The counters.
    pub fn stats(&self) -> &SenderStats {
        &self.stats
    }

    /// A random value from the sender's seeded generator (for callers that want jitter in step).
    pub fn jitter(&mut self, max: Duration) -> Duration {
        Duration::from_nanos(self.rng.random_range(0..=max.as_nanos() as u64))
    }
}
