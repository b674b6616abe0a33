//! Encoding and parsing of headers and message bodies.
//!
//! Parsing checks every length and every field range before it returns a message, so a [`Message`]
//! that parsed is well-formed: list items and records it borrows were validated once and iterating them
//! does not fail. Encoding writes what it is given (a caller's out-of-range field is written as is and
//! refused by the receiver); it fails only when the message does not fit the buffer or the datagram.

use super::bytes::{Reader, Writer};
use super::{
    max_body_len, seal, Announce, Clock, Data, DecodeError, EncodeError, EndReason, Header, Heartbeat, Items, Keys,
    Message, MsgType, Nak, NakEntry, NodeId, PageRun, Priority, Records, Repair, Report, ReportKey, Request, SessionId,
    Status, WireItem, ANNOUNCE_LEN, CLOCK_LEN, DATA_FIXED_LEN, DATA_LAST_IN_BLOCK, DATA_PUSH, DATA_UNICAST, END_LEN,
    HEADER_LEN, HEARTBEAT_LEN, KNOWN_FLAGS, MAGIC, MAX_BLOCK, MAX_DATAGRAM, MAX_LOSS_PPM, MAX_PAGE_SHIFT, MAX_PARITY,
    MAX_REPORT_RESULT, MIN_DATAGRAM, MIN_PAGE_SHIFT, NAK_FIXED_LEN, NO_BLOCK, NO_STREAM, REPAIR_FIXED_LEN,
    REPORT_ACK_FIXED_LEN, REPORT_FIXED_LEN, REQUEST_FIXED_LEN, STATUS_LEAVING, STATUS_LEN, TAG_LEN, VERSION,
};

/// Reads and checks the header of `datagram` (length, magic, version, type, flags) without
/// authenticating it: use it only to route the datagram to the session whose keys will [`super::open`] it.
///
/// Checks run in wire order, so the error names the first thing wrong: length (too short for header and
/// tag, or longer than [`MAX_DATAGRAM`]), magic, version, type, flags, then the reserved field.
pub fn peek_header(datagram: &[u8]) -> Result<Header, DecodeError> {
    let len = datagram.len();
    if len < HEADER_LEN + TAG_LEN {
        return Err(DecodeError::TooShort { len, min: HEADER_LEN + TAG_LEN });
    }
    if len > MAX_DATAGRAM {
        return Err(DecodeError::TooLong { len, max: MAX_DATAGRAM });
    }
    let mut r = Reader::new("header", datagram);
    let magic = r.u16()?;
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError::BadVersion(version));
    }
    let msg_type = MsgType::from_u8(r.u8()?)?;
    let flags = r.u16()?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError::UnknownFlags(flags & !KNOWN_FLAGS));
    }
    let reserved = r.u16()?;
    if reserved != 0 {
        return Err(DecodeError::BadField { field: "header reserved", value: u64::from(reserved) });
    }
    Ok(Header {
        msg_type,
        flags,
        session: SessionId(r.u64()?),
        epoch: r.u32()?,
        node: NodeId(r.u32()?),
        packet_number: r.u64()?,
    })
}

/// Writes `header` into the first [`HEADER_LEN`] bytes of `out` (the reserved field as zero).
pub(super) fn write_header(header: &Header, out: &mut [u8]) -> Result<usize, EncodeError> {
    let mut w = Writer::new(out);
    w.u16(MAGIC);
    w.u8(VERSION);
    w.u8(header.msg_type as u8);
    w.u16(header.flags);
    w.u16(0);
    w.u64(header.session.0);
    w.u32(header.epoch);
    w.u32(header.node.0);
    w.u64(header.packet_number);
    w.finish()
}

/// Encodes a whole datagram (header, body, tag) into `buf`; returns its length.
/// `header.msg_type` must equal `msg.msg_type()`.
///
/// Never panics. If `header.msg_type` differs from `msg.msg_type()`, the message's own type is written
/// (the header describes the body, never the other way round). Fails with
/// [`EncodeError::TooLarge`] when the datagram would exceed [`MAX_DATAGRAM`] (or a report result
/// exceeds [`MAX_REPORT_RESULT`]) and with [`EncodeError::BufferTooSmall`] when `buf` cannot hold it.
/// Field values are written as given: a receiver refuses out-of-range ones with the error
/// [`Message::parse`] names. Header flags are written as given too, and only [`super::FLAG_ENCRYPTED`]
/// changes what is written (see [`super::seal`]).
pub fn encode(header: &Header, msg: &Message<'_>, keys: &Keys, buf: &mut [u8]) -> Result<usize, EncodeError> {
    let header = Header { msg_type: msg.msg_type(), ..*header };
    let body_len = msg.body_len();
    let total = HEADER_LEN.saturating_add(body_len).saturating_add(TAG_LEN);
    if total > MAX_DATAGRAM {
        return Err(EncodeError::TooLarge { len: total, max: MAX_DATAGRAM });
    }
    let have = buf.len();
    let body =
        buf.get_mut(HEADER_LEN..HEADER_LEN + body_len).ok_or(EncodeError::BufferTooSmall { need: total, have })?;
    msg.write_body(body)?;
    seal(&header, body_len, buf, keys)
}

pub(super) fn parse_body(msg_type: MsgType, body: &[u8]) -> Result<Message<'_>, DecodeError> {
    match msg_type {
        MsgType::Announce => parse_announce(body).map(Message::Announce),
        MsgType::Heartbeat => parse_heartbeat(body).map(Message::Heartbeat),
        MsgType::End => parse_end(body),
        MsgType::Data => parse_data(body).map(Message::Data),
        MsgType::Repair => parse_repair(body).map(Message::Repair),
        MsgType::Request => parse_request(body).map(Message::Request),
        MsgType::Nak => parse_nak(body).map(Message::Nak),
        MsgType::Status => parse_status(body).map(Message::Status),
        MsgType::Clock => parse_clock(body).map(Message::Clock),
        MsgType::Report => parse_report(body).map(Message::Report),
        MsgType::ReportAck => parse_report_ack(body).map(Message::ReportAck),
        MsgType::Queued => parse_queued(body).map(Message::Queued),
    }
}

fn bad(field: &'static str, value: impl Into<u64>) -> DecodeError {
    DecodeError::BadField { field, value: value.into() }
}

fn check_reserved(field: &'static str, value: impl Into<u64>) -> Result<(), DecodeError> {
    let value = value.into();
    if value == 0 {
        Ok(())
    } else {
        Err(bad(field, value))
    }
}

fn check_loss(field: &'static str, loss_ppm: u32) -> Result<u32, DecodeError> {
    if loss_ppm <= MAX_LOSS_PPM {
        Ok(loss_ppm)
    } else {
        Err(bad(field, loss_ppm))
    }
}

/// Checks that `bytes`, the rest of a `msg` body of `body_len` bytes, is a whole list of exactly
/// `count` valid items.
fn items<'a, T: WireItem>(
    msg: &'static str,
    body_len: usize,
    bytes: &'a [u8],
    count: u16,
) -> Result<Items<'a, T>, DecodeError> {
    if bytes.len() != usize::from(count) * T::LEN {
        return Err(DecodeError::BadLength { msg, len: body_len });
    }
    let items = Items::Wire(bytes);
    for item in items.iter() {
        item?;
    }
    Ok(items)
}

fn parse_announce(body: &[u8]) -> Result<Announce, DecodeError> {
    let mut r = Reader::new("announce", body);
    if body.len() != ANNOUNCE_LEN {
        return Err(r.bad_length());
    }
    let page_shift = r.u8()?;
    let max_block = r.u8()?;
    let max_datagram = r.u16()?;
    let a = Announce {
        page_shift,
        max_block,
        max_datagram,
        page_count: r.u32()?,
        next_seq: r.u64()?,
        descriptor: r.u32()?,
    };
    r.end()?;
    if !(MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&page_shift) {
        return Err(bad("announce page_shift", page_shift));
    }
    if !(1..=MAX_BLOCK).contains(&usize::from(max_block)) {
        return Err(bad("announce max_block", max_block));
    }
    if !(MIN_DATAGRAM..=MAX_DATAGRAM).contains(&usize::from(max_datagram)) {
        return Err(bad("announce max_datagram", max_datagram));
    }
    Ok(a)
}

fn parse_heartbeat(body: &[u8]) -> Result<Heartbeat, DecodeError> {
    let mut r = Reader::new("heartbeat", body);
    if body.len() != HEARTBEAT_LEN {
        return Err(r.bad_length());
    }
    let h = Heartbeat {
        next_seq: r.u64()?,
        repairable_from: r.u64()?,
        receivers: r.u32()?,
        status_interval_ms: r.u32()?,
        nak_backoff_us: r.u32()?,
    };
    r.end()?;
    Ok(h)
}

fn parse_end(body: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader::new("end", body);
    if body.len() != END_LEN {
        return Err(r.bad_length());
    }
    let reason = match r.u8()? {
        1 => EndReason::Shutdown,
        2 => EndReason::Complete,
        3 => EndReason::Error,
        other => return Err(bad("end reason", other)),
    };
    let reserved = [r.u8()?, r.u8()?, r.u8()?];
    let final_seq = r.u64()?;
    r.end()?;
    for b in reserved {
        check_reserved("end reserved", b)?;
    }
    Ok(Message::End { reason, final_seq })
}

fn parse_data(body: &[u8]) -> Result<Data<'_>, DecodeError> {
    let mut r = Reader::new("data", body);
    let seq = r.u64()?;
    let block = r.u32()?;
    let index = r.u8()?;
    let flags = r.u8()?;
    let reserved = r.u16()?;
    if flags & !(DATA_LAST_IN_BLOCK | DATA_PUSH | DATA_UNICAST) != 0 {
        return Err(bad("data flags", flags));
    }
    check_reserved("data reserved", reserved)?;
    if flags & DATA_UNICAST != 0 && (flags != DATA_UNICAST || seq != NO_STREAM || block != NO_BLOCK || index != 0) {
        // An out-of-stream answer has no stream position, block or other flag.
        return Err(bad("unicast data", flags));
    }
    // The block starts at `seq - index`: index must be a position in a block and not precede position 0.
    if usize::from(index) >= MAX_BLOCK || u64::from(index) > seq {
        return Err(bad("data index", index));
    }
    let records = r.rest();
    for record in Records::new(records) {
        record?;
    }
    Ok(Data { seq, block, index, flags, records })
}

fn parse_repair(body: &[u8]) -> Result<Repair<'_>, DecodeError> {
    let mut r = Reader::new("repair", body);
    let first_seq = r.u64()?;
    let block = r.u32()?;
    let k = r.u16()?;
    let index = r.u16()?;
    let total = r.u16()?;
    let reserved = r.u16()?;
    if !(1..=MAX_BLOCK).contains(&usize::from(k)) {
        return Err(bad("repair k", k));
    }
    if !(1..=MAX_PARITY).contains(&usize::from(total)) {
        return Err(bad("repair total", total));
    }
    if index >= total {
        return Err(bad("repair index", index));
    }
    check_reserved("repair reserved", reserved)?;
    if first_seq.checked_add(u64::from(k)).is_none() {
        return Err(bad("repair first_seq", first_seq));
    }
    let symbol = r.rest();
    if symbol.is_empty() || symbol.len() & 1 != 0 {
        return Err(DecodeError::BadLength { msg: "repair", len: body.len() });
    }
    Ok(Repair { first_seq, block, k, index, total, symbol })
}

fn parse_request(body: &[u8]) -> Result<Request<'_>, DecodeError> {
    let mut r = Reader::new("request", body);
    let stream_start = r.u64()?;
    let loss_ppm = check_loss("request loss_ppm", r.u32()?)?;
    let count = r.u16()?;
    let reserved = r.u16()?;
    check_reserved("request reserved", reserved)?;
    if count == 0 {
        return Err(bad("request count", count));
    }
    let bytes = r.rest();
    let runs = items("request", body.len(), bytes, count)?;
    Ok(Request { stream_start, loss_ppm, runs })
}

fn parse_queued(body: &[u8]) -> Result<super::Queued<'_>, DecodeError> {
    let mut r = Reader::new("queued", body);
    let next_seq = r.u64()?;
    let count = r.u16()?;
    check_reserved("queued reserved", r.u16()?)?;
    check_reserved("queued reserved", r.u32()?)?;
    if count == 0 {
        return Err(bad("queued count", count));
    }
    let bytes = r.rest();
    let runs = items("queued", body.len(), bytes, count)?;
    Ok(super::Queued { next_seq, runs })
}

fn parse_nak(body: &[u8]) -> Result<Nak<'_>, DecodeError> {
    let mut r = Reader::new("nak", body);
    let stream_start = r.u64()?;
    let highest_seen = r.u64()?;
    let loss_ppm = check_loss("nak loss_ppm", r.u32()?)?;
    let count = r.u16()?;
    let reserved = r.u16()?;
    check_reserved("nak reserved", reserved)?;
    if count == 0 {
        return Err(bad("nak count", count));
    }
    let bytes = r.rest();
    let entries = items("nak", body.len(), bytes, count)?;
    Ok(Nak { stream_start, highest_seen, loss_ppm, entries })
}

fn parse_status(body: &[u8]) -> Result<Status, DecodeError> {
    let mut r = Reader::new("status", body);
    if body.len() != STATUS_LEN {
        return Err(r.bad_length());
    }
    let s = Status {
        stream_start: r.u64()?,
        received_through: r.u64()?,
        highest_seen: r.u64()?,
        loss_ppm: check_loss("status loss_ppm", r.u32()?)?,
        window: r.u32()?,
        pages_cached: r.u32()?,
        flags: r.u32()?,
        echo: r.u64()?,
        echo_delay_us: r.u32()?,
        loss_events: r.u32()?,
        receive_rate_kib: r.u32()?,
    };
    check_reserved("status reserved", r.u32()?)?;
    r.end()?;
    if s.flags & !STATUS_LEAVING != 0 {
        return Err(bad("status flags", s.flags));
    }
    Ok(s)
}

fn parse_clock(body: &[u8]) -> Result<Clock, DecodeError> {
    let mut r = Reader::new("clock", body);
    if body.len() != CLOCK_LEN {
        return Err(r.bad_length());
    }
    let c = Clock { timestamp_us: r.u64()?, rate_kib: r.u32()?, rtt_us: r.u32()? };
    r.end()?;
    if c.timestamp_us == 0 {
        return Err(bad("clock timestamp", 0u64));
    }
    Ok(c)
}

fn parse_report(body: &[u8]) -> Result<Report<'_>, DecodeError> {
    let mut r = Reader::new("report", body);
    let fork = r.u32()?;
    let clone = r.u32()?;
    let status = r.u32()?;
    let len = r.u16()?;
    let reserved = r.u16()?;
    check_reserved("report reserved", reserved)?;
    if usize::from(len) > MAX_REPORT_RESULT {
        return Err(bad("report len", len));
    }
    let result = r.rest();
    if result.len() != usize::from(len) {
        return Err(DecodeError::BadLength { msg: "report", len: body.len() });
    }
    Ok(Report { fork, clone, status, result })
}

fn parse_report_ack(body: &[u8]) -> Result<Items<'_, ReportKey>, DecodeError> {
    let mut r = Reader::new("reportack", body);
    let count = r.u16()?;
    let reserved = r.u16()?;
    check_reserved("reportack reserved", reserved)?;
    let bytes = r.rest();
    items("reportack", body.len(), bytes, count)
}

fn items_len<T: WireItem>(items: &Items<'_, T>) -> usize {
    items.len().saturating_mul(T::LEN)
}

pub(super) fn body_len(msg: &Message<'_>) -> usize {
    match msg {
        Message::Announce(_) => ANNOUNCE_LEN,
        Message::Heartbeat(_) => HEARTBEAT_LEN,
        Message::End { .. } => END_LEN,
        Message::Data(d) => DATA_FIXED_LEN.saturating_add(d.records.len()),
        Message::Repair(r) => REPAIR_FIXED_LEN.saturating_add(r.symbol.len()),
        Message::Request(r) => REQUEST_FIXED_LEN.saturating_add(items_len(&r.runs)),
        Message::Nak(n) => NAK_FIXED_LEN.saturating_add(items_len(&n.entries)),
        Message::Status(_) => STATUS_LEN,
        Message::Clock(_) => CLOCK_LEN,
        Message::Report(r) => REPORT_FIXED_LEN.saturating_add(r.result.len()),
        Message::ReportAck(keys) => REPORT_ACK_FIXED_LEN.saturating_add(items_len(keys)),
        Message::Queued(q) => REQUEST_FIXED_LEN.saturating_add(items_len(&q.runs)),
    }
}

/// Writes the items of a list (its count is the caller's).
fn write_items<T: WireItem>(w: &mut Writer<'_>, items: &Items<'_, T>) {
    match items {
        Items::Wire(bytes) => {
            // A whole number of items only: `Items::len` ignores a partial trailing item.
            let whole = items_len(items);
            w.bytes(bytes.get(..whole).unwrap_or(bytes));
        }
        Items::Slice(values) => {
            for v in *values {
                if let Some(slot) = w.slot(T::LEN) {
                    v.write(slot);
                }
            }
        }
    }
}

fn count_u16(n: usize) -> Result<u16, EncodeError> {
    u16::try_from(n).map_err(|_| EncodeError::TooLarge { len: n, max: usize::from(u16::MAX) })
}

pub(super) fn write_body(msg: &Message<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    let len = body_len(msg);
    let max = max_body_len(MAX_DATAGRAM);
    if len > max {
        return Err(EncodeError::TooLarge { len, max });
    }
    if out.len() < len {
        return Err(EncodeError::BufferTooSmall { need: len, have: out.len() });
    }
    let mut w = Writer::new(out);
    match msg {
        Message::Announce(a) => {
            w.u8(a.page_shift);
            w.u8(a.max_block);
            w.u16(a.max_datagram);
            w.u32(a.page_count);
            w.u64(a.next_seq);
            w.u32(a.descriptor);
        }
        Message::Heartbeat(h) => {
            w.u64(h.next_seq);
            w.u64(h.repairable_from);
            w.u32(h.receivers);
            w.u32(h.status_interval_ms);
            w.u32(h.nak_backoff_us);
        }
        Message::End { reason, final_seq } => {
            w.u8(*reason as u8);
            w.bytes(&[0; 3]);
            w.u64(*final_seq);
        }
        Message::Data(d) => {
            w.u64(d.seq);
            w.u32(d.block);
            w.u8(d.index);
            w.u8(d.flags);
            w.u16(0);
            w.bytes(d.records);
        }
        Message::Repair(r) => {
            w.u64(r.first_seq);
            w.u32(r.block);
            w.u16(r.k);
            w.u16(r.index);
            w.u16(r.total);
            w.u16(0);
            w.bytes(r.symbol);
        }
        Message::Request(r) => {
            w.u64(r.stream_start);
            w.u32(r.loss_ppm);
            w.u16(count_u16(r.runs.len())?);
            w.u16(0);
            write_items(&mut w, &r.runs);
        }
        Message::Nak(n) => {
            w.u64(n.stream_start);
            w.u64(n.highest_seen);
            w.u32(n.loss_ppm);
            w.u16(count_u16(n.entries.len())?);
            w.u16(0);
            write_items(&mut w, &n.entries);
        }
        Message::Status(s) => {
            w.u64(s.stream_start);
            w.u64(s.received_through);
            w.u64(s.highest_seen);
            w.u32(s.loss_ppm);
            w.u32(s.window);
            w.u32(s.pages_cached);
            w.u32(s.flags);
            w.u64(s.echo);
            w.u32(s.echo_delay_us);
            w.u32(s.loss_events);
            w.u32(s.receive_rate_kib);
            w.u32(0);
        }
        Message::Clock(c) => {
            w.u64(c.timestamp_us);
            w.u32(c.rate_kib);
            w.u32(c.rtt_us);
        }
        Message::Report(r) => {
            if r.result.len() > MAX_REPORT_RESULT {
                return Err(EncodeError::TooLarge { len: r.result.len(), max: MAX_REPORT_RESULT });
            }
            w.u32(r.fork);
            w.u32(r.clone);
            w.u32(r.status);
            w.u16(count_u16(r.result.len())?);
            w.u16(0);
            w.bytes(r.result);
        }
        Message::ReportAck(keys) => {
            w.u16(count_u16(keys.len())?);
            w.u16(0);
            write_items(&mut w, keys);
        }
        Message::Queued(q) => {
            w.u64(q.next_seq);
            w.u16(count_u16(q.runs.len())?);
            w.u16(0);
            w.u32(0);
            write_items(&mut w, &q.runs);
        }
    }
    w.finish()
}

impl WireItem for PageRun {
    const LEN: usize = 8;
    fn write(&self, out: &mut [u8]) {
        let mut w = Writer::new(out);
        w.u32(self.first_page);
        w.u16(self.count);
        w.u8(self.priority as u8);
        w.u8(0);
    }
    fn read(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new("page run", b);
        let first_page = r.u32()?;
        let count = r.u16()?;
        let priority = r.u8()?;
        let reserved = r.u8()?;
        r.end()?;
        if count == 0 {
            return Err(DecodeError::BadField { field: "page run count", value: 0 });
        }
        if first_page.checked_add(u32::from(count)).is_none() {
            return Err(bad("page run first_page", first_page));
        }
        let priority = Priority::from_u8(priority)?;
        check_reserved("page run reserved", reserved)?;
        Ok(PageRun { first_page, count, priority })
    }
}

impl WireItem for NakEntry {
    const LEN: usize = 16;
    fn write(&self, out: &mut [u8]) {
        let mut w = Writer::new(out);
        w.u32(self.block);
        w.u16(self.needed);
        w.u16(self.parity_seen);
        w.u64(self.first_seq);
    }
    fn read(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new("nak entry", b);
        let e = NakEntry { block: r.u32()?, needed: r.u16()?, parity_seen: r.u16()?, first_seq: r.u64()? };
        r.end()?;
        if e.needed == 0 {
            return Err(bad("nak entry needed", e.needed));
        }
        if e.block == NO_BLOCK {
            // A range entry: `parity_seen` has no meaning and must be zero.
            check_reserved("nak entry parity_seen", e.parity_seen)?;
        } else {
            if usize::from(e.needed) > MAX_BLOCK {
                return Err(bad("nak entry needed", e.needed));
            }
            if usize::from(e.parity_seen) > MAX_PARITY {
                return Err(bad("nak entry parity_seen", e.parity_seen));
            }
        }
        if e.first_seq.checked_add(u64::from(e.needed)).is_none() {
            return Err(bad("nak entry first_seq", e.first_seq));
        }
        Ok(e)
    }
}

impl WireItem for ReportKey {
    const LEN: usize = 8;
    fn write(&self, out: &mut [u8]) {
        let mut w = Writer::new(out);
        w.u32(self.fork);
        w.u32(self.clone);
    }
    fn read(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new("report key", b);
        let k = ReportKey { fork: r.u32()?, clone: r.u32()? };
        r.end()?;
        Ok(k)
    }
}
