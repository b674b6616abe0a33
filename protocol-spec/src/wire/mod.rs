//! The wire format: every datagram is a [`Header`], a message body and an authentication tag.
//!
//! `PROTOCOL.md` at the crate root is the normative description with packet diagrams; this module is its
//! implementation. All integers are big-endian. Encoding writes into a buffer the caller owns; decoding
//! borrows from the datagram and never allocates.
//!
//! Decoding is two steps, so a receiver can route a datagram to its session before it knows the key:
//! [`peek_header`] reads the header without authenticating it; [`open`] checks the tag (and decrypts an
//! encrypted body in place) and returns the authenticated header and body; [`Message::parse`] then
//! reads the body.

mod auth;
mod bytes;
mod codec;
mod fork;
mod records;
#[cfg(test)]
mod tests;

pub use auth::{open, seal, Keys, SessionKey};
pub use codec::{encode, peek_header};
pub use fork::{ForkEntry, ForkPlan, MAX_FORK_ENTRIES};
pub use records::{BlobKind, Record, RecordWriter, Records};

use thiserror::Error;

/// The first two bytes of every datagram: ASCII "SD".
pub const MAGIC: u16 = 0x5344;
/// The protocol version this crate speaks.
pub const VERSION: u8 = 2;
/// Length of the fixed header that starts every datagram.
pub const HEADER_LEN: usize = 32;
/// Length of the authentication tag that ends every datagram.
pub const TAG_LEN: usize = 16;
/// Length of the fixed part of a [`Message::Data`] body (before its records).
pub const DATA_FIXED_LEN: usize = 16;
/// Length of the fixed part of a [`Message::Repair`] body (before the parity symbol).
pub const REPAIR_FIXED_LEN: usize = 20;
/// Length of one record header inside a data body.
pub const RECORD_HEADER_LEN: usize = 16;
/// The largest datagram this protocol ever sends or accepts (a 9000-byte MTU less IPv4 and UDP headers).
pub const MAX_DATAGRAM: usize = 8972;
/// The smallest datagram size a session may be configured with (a 1280-byte path less headers).
pub const MIN_DATAGRAM: usize = 1232;
/// Block id carried by a NAK entry whose block is unknown to the receiver (a range entry).
pub const NO_BLOCK: u32 = u32::MAX;
/// Stream position meaning "this receiver has not yet seen the stream".
pub const NO_STREAM: u64 = u64::MAX;

/// Most source packets in one FEC block (the limit of [`Announce::max_block`] and [`Repair::k`]).
pub const MAX_BLOCK: usize = 64;
/// Most parity symbols one block's code may be built for (the limit of [`Repair::total`]).
pub const MAX_PARITY: usize = 1024;
/// Smallest page size, as log2 (4 KiB).
pub const MIN_PAGE_SHIFT: u8 = 12;
/// Largest page size, as log2 (2 MiB).
pub const MAX_PAGE_SHIFT: u8 = 21;
/// Longest encoding of one page a record may describe: a 2 MiB page plus 64 KiB, because a zstd frame
/// of an incompressible page is slightly longer than the page (senders only use zstd when it saves
/// bytes, but a receiver must not depend on that).
pub const MAX_PAGE_ENCODING: u32 = (2 << 20) + (64 << 10);
/// Longest blob (VM descriptor, fork plan) the stream carries.
pub const MAX_BLOB_LEN: u32 = 16 << 20;
/// The largest loss rate a message may report, in parts per million (everything lost).
pub const MAX_LOSS_PPM: u32 = 1_000_000;
/// Length of a [`Message::Announce`] body.
pub const ANNOUNCE_LEN: usize = 20;
/// Length of a [`Message::Heartbeat`] body.
pub const HEARTBEAT_LEN: usize = 28;
/// Length of a [`Message::End`] body.
pub const END_LEN: usize = 12;
/// Length of a [`Message::Status`] body.
pub const STATUS_LEN: usize = 64;
/// Length of a [`Message::Clock`] body.
pub const CLOCK_LEN: usize = 16;
/// Length of the fixed part of a [`Message::Request`] body (before its runs).
pub const REQUEST_FIXED_LEN: usize = 16;
/// Length of the fixed part of a [`Message::Nak`] body (before its entries).
pub const NAK_FIXED_LEN: usize = 24;
/// Length of the fixed part of a [`Message::Report`] body (before the result).
pub const REPORT_FIXED_LEN: usize = 16;
/// Length of the fixed part of a [`Message::ReportAck`] body (before its keys).
pub const REPORT_ACK_FIXED_LEN: usize = 4;

/// Room for a body in a datagram of `max_datagram` bytes (0 if not even a header and tag fit).
pub const fn max_body_len(max_datagram: usize) -> usize {
    max_datagram.saturating_sub(HEADER_LEN + TAG_LEN)
}

/// Room for records in a Data packet of at most `max_datagram` bytes: the size to give
/// [`RecordWriter::new`].
pub const fn max_records_len(max_datagram: usize) -> usize {
    max_body_len(max_datagram).saturating_sub(DATA_FIXED_LEN)
}

/// Most [`PageRun`]s one Request may carry in a datagram of `max_datagram` bytes
/// (1113 at [`MAX_DATAGRAM`], 176 at 1472).
pub const fn max_request_runs(max_datagram: usize) -> usize {
    max_body_len(max_datagram).saturating_sub(REQUEST_FIXED_LEN) / 8
}

/// Most [`NakEntry`]s one Nak may carry in a datagram of `max_datagram` bytes
/// (556 at [`MAX_DATAGRAM`], 87 at 1472).
pub const fn max_nak_entries(max_datagram: usize) -> usize {
    max_body_len(max_datagram).saturating_sub(NAK_FIXED_LEN) / 16
}

/// Most [`ReportKey`]s one ReportAck may carry in a datagram of `max_datagram` bytes
/// (1115 at [`MAX_DATAGRAM`], 177 at 1472).
pub const fn max_report_acks(max_datagram: usize) -> usize {
    max_body_len(max_datagram).saturating_sub(REPORT_ACK_FIXED_LEN) / 8
}

/// Header flag: the body is encrypted (ChaCha20-Poly1305) rather than only authenticated.
pub const FLAG_ENCRYPTED: u16 = 0x0001;
/// All header flags this version defines; any other bit set is an error.
pub const KNOWN_FLAGS: u16 = FLAG_ENCRYPTED;

/// Data flag: this packet is the last source packet of its FEC block.
pub const DATA_LAST_IN_BLOCK: u8 = 0x01;
/// Data flag: the packet belongs to the background push stream rather than answering a request.
pub const DATA_PUSH: u8 = 0x02;
/// Data flag (version 2): an out-of-stream answer sent by unicast to the one host that asked; its
/// Seq is [`NO_STREAM`] and its Block [`NO_BLOCK`], it belongs to no FEC block and no stream
/// position, and is recovered from loss by asking again (PROTOCOL.md section 8.1).
pub const DATA_UNICAST: u8 = 0x04;

/// Status flag: the receiver is leaving the session.
pub const STATUS_LEAVING: u32 = 0x0001;

/// A session (one frozen memory image) as named on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// A participant in a session: 0 is the server, every host daemon has its own non-zero id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl NodeId {
    /// The memory server's node id.
    pub const SERVER: NodeId = NodeId(0);
}

/// The kind of message a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgType {
    /// Server to group: session parameters.
    Announce = 1,
    /// Server to group: stream position (tail-loss probe), group size, status interval.
    Heartbeat = 2,
    /// Server to group: the session is over.
    End = 3,
    /// Server to group: source packet of the reliable stream (pages, descriptor, fork plans).
    Data = 4,
    /// Server to group: an FEC parity symbol of a block of Data packets.
    Repair = 5,
    /// Receiver to server: a batch of page requests.
    Request = 6,
    /// Receiver to server: negative acknowledgement of lost stream packets.
    Nak = 7,
    /// Receiver to server: progress, loss and window (flow control and liveness).
    Status = 8,
    /// Receiver to server: a clone's result, to be returned to the parent.
    Report = 9,
    /// Server to group: acknowledgement of clone reports.
    ReportAck = 10,
    /// Server to group: pages just queued for sending (request suppression).
    Queued = 11,
    /// Server to group (version 2): the server's clock, for round-trip times, and its sending rate
    /// (congestion control, PROTOCOL.md section 11.1).
    Clock = 12,
}

impl MsgType {
    /// The message type with this wire value.
    pub fn from_u8(v: u8) -> Result<MsgType, DecodeError> {
        Ok(match v {
            1 => MsgType::Announce,
            2 => MsgType::Heartbeat,
            3 => MsgType::End,
            4 => MsgType::Data,
            5 => MsgType::Repair,
            6 => MsgType::Request,
            7 => MsgType::Nak,
            8 => MsgType::Status,
            9 => MsgType::Report,
            10 => MsgType::ReportAck,
            11 => MsgType::Queued,
            12 => MsgType::Clock,
            other => return Err(DecodeError::UnknownType(other)),
        })
    }
}

/// The fixed 32-byte header of every datagram.
///
/// ```text
///  0      2   3   4      6      8              16      20      24              32
///  +------+---+---+------+------+--------------+-------+-------+---------------+
///  |magic |ver|typ|flags | rsvd | session (u64)| epoch | node  | packet number |
///  +------+---+---+------+------+--------------+-------+-------+---------------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the body is.
    pub msg_type: MsgType,
    /// Header flags (`FLAG_*`).
    pub flags: u16,
    /// The session this datagram belongs to.
    pub session: SessionId,
    /// The server's incarnation: it grows each time the server (re)starts the session.
    pub epoch: u32,
    /// Who sent it.
    pub node: NodeId,
    /// Per-sender packet number, strictly increasing within (session, epoch, node); replay protection
    /// and, for encrypted bodies, the nonce.
    pub packet_number: u64,
}

/// How urgently a page is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Priority {
    /// A vCPU is blocked on this page.
    Fault = 0,
    /// Read-ahead around a fault.
    ReadAhead = 1,
    /// Prefetch (working-set hints); lowest.
    Prefetch = 2,
}

impl Priority {
    /// The priority with this wire value.
    pub fn from_u8(v: u8) -> Result<Priority, DecodeError> {
        match v {
            0 => Ok(Priority::Fault),
            1 => Ok(Priority::ReadAhead),
            2 => Ok(Priority::Prefetch),
            other => Err(DecodeError::BadField { field: "priority", value: u64::from(other) }),
        }
    }
}

/// One run of pages in a [`Message::Request`]: 8 bytes on the wire
/// (`first_page u32 | count u16 | priority u8 | reserved u8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// The first page (index into the image, in pages).
    pub first_page: u32,
    /// How many pages, at least 1.
    pub count: u16,
    /// How urgently.
    pub priority: Priority,
}

impl PageRun {
    /// Appends `page` to `runs`, extending the last run when `page` continues it at the same
    /// priority. False (and nothing appended) when that needs a new run and `runs` holds `max` already.
    pub fn append(runs: &mut Vec<PageRun>, page: u32, priority: Priority, max: usize) -> bool {
        if let Some(r) = runs.last_mut() {
            if r.priority == priority
                && r.count < u16::MAX
                && r.first_page.checked_add(u32::from(r.count)) == Some(page)
            {
                r.count += 1;
                return true;
            }
        }
        if runs.len() >= max {
            return false;
        }
        runs.push(PageRun { first_page: page, count: 1, priority });
        true
    }
}

/// One entry of a [`Message::Nak`]: 16 bytes on the wire
/// (`block u32 | needed u16 | parity_seen u16 | first_seq u64`).
///
/// A *block entry* (`block != NO_BLOCK`) says: of block `block`, which starts at stream position
/// `first_seq`, I still need `needed` more symbols, and I have seen parity symbols with indices below
/// `parity_seen`. A *range entry* (`block == NO_BLOCK`) says: I received nothing at positions
/// `first_seq .. first_seq + needed` and do not know which blocks they belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NakEntry {
    /// The block, or [`NO_BLOCK`] for a range entry.
    pub block: u32,
    /// Symbols still needed (block entry) or length of the missing range (range entry).
    pub needed: u16,
    /// One more than the highest parity index seen for this block (0: none).
    pub parity_seen: u16,
    /// The block's first stream position, or the start of the missing range.
    pub first_seq: u64,
}

/// One acknowledged clone report in a [`Message::ReportAck`]: 8 bytes (`fork u32 | clone u32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportKey {
    /// The fork the clone belongs to.
    pub fork: u32,
    /// The clone's id within the fork.
    pub clone: u32,
}

/// Fixed-size items that travel in lists inside a message body.
pub trait WireItem: Sized + Copy {
    /// Encoded length in bytes.
    const LEN: usize;
    /// Writes the item into `out` (exactly `LEN` bytes).
    fn write(&self, out: &mut [u8]);
    /// Reads an item from `bytes` (exactly `LEN` bytes).
    fn read(bytes: &[u8]) -> Result<Self, DecodeError>;
}

/// A list of fixed-size items: either borrowed from a decoded datagram or from a slice to encode.
/// Iterating never allocates; a malformed item in wire form ends the iteration with an error.
#[derive(Debug, Clone, Copy)]
pub enum Items<'a, T: WireItem> {
    /// Items still in wire form (validated to be a whole number of items by the decoder).
    Wire(&'a [u8]),
    /// Items as values, for encoding.
    Slice(&'a [T]),
}

impl<'a, T: WireItem> Items<'a, T> {
    /// Number of items.
    pub fn len(&self) -> usize {
        match self {
            Items::Wire(b) => b.len() / T::LEN,
            Items::Slice(s) => s.len(),
        }
    }

    /// True when there are no items.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items, in order. Wire items that fail to decode are yielded as errors.
    pub fn iter(&self) -> impl Iterator<Item = Result<T, DecodeError>> + 'a {
        let this = *self;
        (0..this.len()).map(move |i| match this {
            Items::Wire(b) => T::read(&b[i * T::LEN..(i + 1) * T::LEN]),
            Items::Slice(s) => Ok(s[i]),
        })
    }
}

/// Session parameters, announced by the server (and given to receivers out of band with the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announce {
    /// log2 of the page size (12 for 4 KiB .. 21 for 2 MiB).
    pub page_shift: u8,
    /// Largest number of source packets in one FEC block.
    pub max_block: u8,
    /// Largest datagram the server sends (receivers must accept it).
    pub max_datagram: u16,
    /// Number of pages in the image.
    pub page_count: u32,
    /// The stream position the server will use next.
    pub next_seq: u64,
    /// Id of the VM descriptor blob of this session (0: none).
    pub descriptor: u32,
}

/// A heartbeat: the server's stream position and the group parameters receivers adapt to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The stream position the server will use next: everything below it has been sent.
    pub next_seq: u64,
    /// The oldest stream position the server can still repair.
    pub repairable_from: u64,
    /// Receivers the server currently counts as live.
    pub receivers: u32,
    /// How often each receiver should send a status message, in milliseconds.
    pub status_interval_ms: u32,
    /// The largest random delay, in microseconds, a receiver waits before sending a NAK.
    pub nak_backoff_us: u32,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    /// The server was asked to stop.
    Shutdown = 1,
    /// Every clone has finished with the image.
    Complete = 2,
    /// The server hit an error it cannot recover from.
    Error = 3,
}

/// A source packet of the reliable stream.
///
/// ```text
///  0               8       12  13  14      16
///  +---------------+-------+---+---+-------+------------------------+
///  | seq (u64)     | block |idx|flg| rsvd  | records ...            |
///  +---------------+-------+---+---+-------+------------------------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    /// Stream position; consecutive Data packets have consecutive positions.
    pub seq: u64,
    /// The FEC block this packet belongs to.
    pub block: u32,
    /// Index of this packet within its block (`seq - index` is the block's first position).
    pub index: u8,
    /// `DATA_*` flags.
    pub flags: u8,
    /// The records, still encoded; iterate with [`Records`].
    pub records: &'a [u8],
}

/// An FEC parity symbol for one block.
///
/// ```text
///  0               8       12      14      16      18      20
///  +---------------+-------+-------+-------+-------+-------+-----------------+
///  | first_seq     | block |   k   | index | total | rsvd  | symbol ...      |
///  +---------------+-------+-------+-------+-------+-------+-----------------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repair<'a> {
    /// Stream position of the block's first source packet.
    pub first_seq: u64,
    /// The block.
    pub block: u32,
    /// Number of source packets in the block.
    pub k: u16,
    /// Index of this parity symbol, below `total`.
    pub index: u16,
    /// Number of parity symbols the block's code was built for (the decoder needs it).
    pub total: u16,
    /// The symbol (even length; each source symbol is `len u16 | Data body | zero padding`).
    pub symbol: &'a [u8],
}

/// Receiver to server: pages wanted.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// First stream position this receiver has followed ([`NO_STREAM`]: none yet).
    pub stream_start: u64,
    /// The receiver's recent loss rate, parts per million.
    pub loss_ppm: u32,
    /// The runs of pages, most urgent first.
    pub runs: Items<'a, PageRun>,
}

/// Receiver to server: lost stream packets.
#[derive(Debug, Clone, Copy)]
pub struct Nak<'a> {
    /// First stream position this receiver has followed.
    pub stream_start: u64,
    /// Highest stream position seen plus one.
    pub highest_seen: u64,
    /// The receiver's recent loss rate, parts per million.
    pub loss_ppm: u32,
    /// What is missing.
    pub entries: Items<'a, NakEntry>,
}

/// Receiver to server: progress, for flow control and liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// First stream position this receiver has followed.
    pub stream_start: u64,
    /// Every stream position below this one has been received or repaired.
    pub received_through: u64,
    /// Highest stream position seen plus one.
    pub highest_seen: u64,
    /// The receiver's recent loss rate, parts per million.
    pub loss_ppm: u32,
    /// How many more stream packets beyond `received_through` the receiver can take.
    pub window: u32,
    /// Pages the receiver holds.
    pub pages_cached: u32,
    /// `STATUS_*` flags.
    pub flags: u32,
    /// The Timestamp of the latest [`Clock`] received (0: none yet).
    pub echo: u64,
    /// Microseconds between that Clock's arrival and this Status (saturating).
    pub echo_delay_us: u32,
    /// Loss events the receiver has seen in this epoch (losses at least a round trip apart,
    /// PROTOCOL.md 11.1; wrapping): the server backs off when it grows.
    pub loss_events: u32,
    /// Stream bytes the receiver took in per second since its previous Status, in KiB/s.
    pub receive_rate_kib: u32,
}

/// Server to group (version 2): the server's clock and its current sending rate, sent while
/// congestion control runs (PROTOCOL.md section 11.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// The server's clock, microseconds (any origin; receivers echo it back in Status).
    pub timestamp_us: u64,
    /// The rate the server sends at now, KiB/s (0: unpaced).
    pub rate_kib: u32,
    /// The round-trip time receivers use to group losses into loss events, microseconds.
    pub rtt_us: u32,
}

/// Receiver to server: a clone's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report<'a> {
    /// The fork.
    pub fork: u32,
    /// The clone.
    pub clone: u32,
    /// The clone's exit status (0: success).
    pub status: u32,
    /// The result the guest reported (at most [`MAX_REPORT_RESULT`] bytes).
    pub result: &'a [u8],
}

/// Server to group: the server has just queued these pages (because some host asked). A host that
/// faults on an advertised page waits for it instead of asking again: this is what keeps requests
/// from growing with the group (NORM's repair advertisement, applied to requests).
///
/// ```text
///  0               8       10      12      16
///  +---------------+-------+-------+-------+------------------------+
///  | next_seq      | count | rsvd  | rsvd  | count x PageRun ...    |
///  +---------------+-------+-------+-------+------------------------+
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Queued<'a> {
    /// The stream position the server will use next: the advertised pages go out at or after it.
    pub next_seq: u64,
    /// The runs, with the priority each is queued at.
    pub runs: Items<'a, PageRun>,
}

/// Largest result a clone report may carry.
pub const MAX_REPORT_RESULT: usize = 1024;

/// A decoded (or to-be-encoded) message body.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    /// See [`Announce`].
    Announce(Announce),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// The session is over.
    End {
        /// Why.
        reason: EndReason,
        /// The stream position after the last Data packet.
        final_seq: u64,
    },
    /// See [`Data`].
    Data(Data<'a>),
    /// See [`Repair`].
    Repair(Repair<'a>),
    /// See [`Request`].
    Request(Request<'a>),
    /// See [`Nak`].
    Nak(Nak<'a>),
    /// See [`Status`].
    Status(Status),
    /// See [`Report`].
    Report(Report<'a>),
    /// Acknowledged clone reports.
    ReportAck(Items<'a, ReportKey>),
    /// See [`Queued`].
    Queued(Queued<'a>),
    /// See [`Clock`].
    Clock(Clock),
}

/// Why a datagram could not be decoded. Every variant names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Shorter than a header and tag.
    #[error("datagram too short: {len} bytes, need at least {min}")]
    TooShort {
        /// Its length.
        len: usize,
        /// The least that could be valid.
        min: usize,
    },
    /// Longer than [`MAX_DATAGRAM`].
    #[error("datagram too long: {len} bytes, at most {max} allowed")]
    TooLong {
        /// Its length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// Not our magic number.
    #[error("bad magic 0x{0:04x}: not a spindrift datagram")]
    BadMagic(u16),
    /// A version we do not speak.
    #[error("unsupported protocol version {0} (this build speaks version 2)")]
    BadVersion(u8),
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Header flags this version does not define.
    #[error("unknown header flags 0x{0:04x}")]
    UnknownFlags(u16),
    /// The authentication tag does not match: forged, corrupted or under another key.
    #[error("authentication failed: tag mismatch (forged, corrupted, or wrong session key)")]
    BadTag,
    /// The body's length does not fit its type.
    #[error("{msg} body has bad length {len}")]
    BadLength {
        /// Which message.
        msg: &'static str,
        /// The body length found.
        len: usize,
    },
    /// A field holds a value outside its range.
    #[error("field {field} has invalid value {value}")]
    BadField {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A record inside a Data body is malformed.
    #[error("malformed record at byte {offset} of a data body: {why}")]
    BadRecord {
        /// Where in the records area.
        offset: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The caller's buffer is too small for this message.
    #[error("buffer too small: message needs {need} bytes, buffer has {have}")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The message would exceed [`MAX_DATAGRAM`] or a list limit.
    #[error("message too large: {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

impl<'a> Message<'a> {
    /// The type of this message.
    pub fn msg_type(&self) -> MsgType {
        match self {
            Message::Announce(_) => MsgType::Announce,
            Message::Heartbeat(_) => MsgType::Heartbeat,
            Message::End { .. } => MsgType::End,
            Message::Data(_) => MsgType::Data,
            Message::Repair(_) => MsgType::Repair,
            Message::Request(_) => MsgType::Request,
            Message::Nak(_) => MsgType::Nak,
            Message::Status(_) => MsgType::Status,
            Message::Report(_) => MsgType::Report,
            Message::ReportAck(_) => MsgType::ReportAck,
            Message::Queued(_) => MsgType::Queued,
            Message::Clock(_) => MsgType::Clock,
        }
    }

    /// Parses a message body of type `msg_type` (the plaintext body returned by [`open`]).
    pub fn parse(msg_type: MsgType, body: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        codec::parse_body(msg_type, body)
    }

    /// Encoded length of the body.
    pub fn body_len(&self) -> usize {
        codec::body_len(self)
    }

    /// Writes the body into `out`, returning its length.
    pub fn write_body(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        codec::write_body(self, out)
    }
}
