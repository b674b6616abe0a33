//! Unit tests of the codec: each message's layout, its range checks, authentication and records.

#![allow(clippy::unwrap_used)]

use super::*;

const KEY: SessionKey = SessionKey([7; 32]);
const SESSION: SessionId = SessionId(0x0102_0304_0506_0708);

fn keys() -> Keys {
    Keys::derive(&KEY, SESSION, 3)
}

fn header(msg_type: MsgType, flags: u16) -> Header {
    Header { msg_type, flags, session: SESSION, epoch: 3, node: NodeId(9), packet_number: 0x1122_3344 }
}

/// A message with its lists collected, so two messages can be compared.
#[derive(Debug, PartialEq)]
enum Owned {
    Announce(Announce),
    Heartbeat(Heartbeat),
    End(EndReason, u64),
    Data(u64, u32, u8, u8, Vec<u8>),
    Repair(u64, u32, u16, u16, u16, Vec<u8>),
    Request(u64, u32, Vec<PageRun>),
    Nak(u64, u64, u32, Vec<NakEntry>),
    Status(Status),
    Report(u32, u32, u32, Vec<u8>),
    ReportAck(Vec<ReportKey>),
    Queued(u64, Vec<PageRun>),
    Clock(Clock),
}

fn owned(m: &Message<'_>) -> Owned {
    fn list<T: WireItem>(items: &Items<'_, T>) -> Vec<T> {
        items.iter().collect::<Result<_, _>>().unwrap()
    }
    match m {
        Message::Announce(a) => Owned::Announce(*a),
        Message::Heartbeat(h) => Owned::Heartbeat(*h),
        Message::End { reason, final_seq } => Owned::End(*reason, *final_seq),
        Message::Data(d) => Owned::Data(d.seq, d.block, d.index, d.flags, d.records.to_vec()),
        Message::Repair(r) => Owned::Repair(r.first_seq, r.block, r.k, r.index, r.total, r.symbol.to_vec()),
        Message::Request(r) => Owned::Request(r.stream_start, r.loss_ppm, list(&r.runs)),
        Message::Nak(n) => Owned::Nak(n.stream_start, n.highest_seen, n.loss_ppm, list(&n.entries)),
        Message::Status(s) => Owned::Status(*s),
        Message::Report(r) => Owned::Report(r.fork, r.clone, r.status, r.result.to_vec()),
        Message::ReportAck(k) => Owned::ReportAck(list(k)),
        Message::Queued(q) => Owned::Queued(q.next_seq, list(&q.runs)),
        Message::Clock(c) => Owned::Clock(*c),
    }
}

/// Encodes `msg` (authenticated, then encrypted), opens and parses it back; returns the plaintext body.
fn round_trip(msg: &Message<'_>) -> Vec<u8> {
    let mut body = vec![0u8; msg.body_len()];
    assert_eq!(msg.write_body(&mut body), Ok(msg.body_len()));
    for flags in [0, FLAG_ENCRYPTED] {
        let h = header(msg.msg_type(), flags);
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = encode(&h, msg, &keys(), &mut buf).unwrap();
        assert_eq!(n, HEADER_LEN + msg.body_len() + TAG_LEN);
        assert_eq!(peek_header(&buf[..n]), Ok(h));
        let (got, plain) = open(&mut buf[..n], &keys()).unwrap();
        assert_eq!(got, h);
        assert_eq!(plain, &body[..]);
        assert_eq!(owned(&Message::parse(h.msg_type, plain).unwrap()), owned(msg));
    }
    body
}

fn parse_err(t: MsgType, body: &[u8]) -> DecodeError {
    Message::parse(t, body).map(|m| owned(&m)).unwrap_err()
}

fn field(field: &'static str, value: u64) -> DecodeError {
    DecodeError::BadField { field, value }
}

fn announce() -> Announce {
    Announce { page_shift: 12, max_block: 32, max_datagram: 1472, page_count: 262_144, next_seq: 5, descriptor: 1 }
}

#[test]
fn header_layout_is_big_endian_and_reserved_must_be_zero() {
    let mut buf = [0u8; 64];
    let h = header(MsgType::Status, FLAG_ENCRYPTED);
    assert_eq!(codec::write_header(&h, &mut buf), Ok(HEADER_LEN));
    assert_eq!(
        buf[..HEADER_LEN],
        [
            0x53, 0x44, 2, 8, 0, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 0, 0x11, 0x22, 0x33,
            0x44
        ]
    );
    assert_eq!(peek_header(&buf), Ok(h));
    buf[7] = 1;
    assert_eq!(peek_header(&buf), Err(field("header reserved", 1)));
}

#[test]
fn peek_header_checks_in_wire_order() {
    let mut buf = [0u8; 64];
    codec::write_header(&header(MsgType::Data, 0), &mut buf).unwrap();
    assert_eq!(peek_header(&buf[..47]), Err(DecodeError::TooShort { len: 47, min: 48 }));
    assert_eq!(peek_header(&[0u8; MAX_DATAGRAM + 1]), Err(DecodeError::TooLong { len: 8973, max: 8972 }));
    let mut b = buf;
    b[3] = 0;
    assert_eq!(peek_header(&b), Err(DecodeError::UnknownType(0)));
    b[2] = 0; // the version is checked before the type
    assert_eq!(peek_header(&b), Err(DecodeError::BadVersion(0)));
    b[0] = 0; // and the magic first
    assert_eq!(peek_header(&b), Err(DecodeError::BadMagic(0x0044)));
    let mut b = buf;
    b[4..6].copy_from_slice(&0x8001u16.to_be_bytes());
    assert_eq!(peek_header(&b), Err(DecodeError::UnknownFlags(0x8000)));
}

#[test]
fn announce_round_trips_and_checks_ranges() {
    let body = round_trip(&Message::Announce(announce()));
    assert_eq!(body, [12, 32, 0x05, 0xc0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 1]);
    for (shift, ok) in [(11, false), (12, true), (21, true), (22, false)] {
        let mut b = body.clone();
        b[0] = shift;
        assert_eq!(Message::parse(MsgType::Announce, &b).is_ok(), ok, "page_shift {shift}");
    }
    let mut b = body.clone();
    b[1] = 65;
    assert_eq!(parse_err(MsgType::Announce, &b), field("announce max_block", 65));
    b[1] = 0;
    assert_eq!(parse_err(MsgType::Announce, &b), field("announce max_block", 0));
    let mut b = body.clone();
    b[2..4].copy_from_slice(&1231u16.to_be_bytes());
    assert_eq!(parse_err(MsgType::Announce, &b), field("announce max_datagram", 1231));
    b[2..4].copy_from_slice(&8973u16.to_be_bytes());
    assert_eq!(parse_err(MsgType::Announce, &b), field("announce max_datagram", 8973));
    assert_eq!(parse_err(MsgType::Announce, &body[..19]), DecodeError::BadLength { msg: "announce", len: 19 });
}

#[test]
fn heartbeat_round_trips() {
    let h = Heartbeat { next_seq: 10, repairable_from: 2, receivers: 40, status_interval_ms: 100, nak_backoff_us: 700 };
    let body = round_trip(&Message::Heartbeat(h));
    assert_eq!(body.len(), 28);
    let mut long = body.clone();
    long.push(0);
    assert_eq!(parse_err(MsgType::Heartbeat, &long), DecodeError::BadLength { msg: "heartbeat", len: 29 });
}

#[test]
fn end_round_trips_and_checks_reason_and_reserved() {
    for reason in [EndReason::Shutdown, EndReason::Complete, EndReason::Error] {
        let body = round_trip(&Message::End { reason, final_seq: 77 });
        assert_eq!(body, [reason as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 77]);
    }
    assert_eq!(parse_err(MsgType::End, &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), field("end reason", 4));
    assert_eq!(parse_err(MsgType::End, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), field("end reason", 0));
    assert_eq!(parse_err(MsgType::End, &[1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]), field("end reserved", 2));
}

fn some_records() -> Vec<u8> {
    let mut buf = [0u8; 600];
    let mut w = RecordWriter::new(&mut buf);
    assert_eq!(w.push_page(3, false, 4096, 100, &[1; 50]), 50);
    assert_eq!(w.push_page(4, true, 300, 0, &[2; 300]), 300);
    assert!(w.push_zero_run(10, 20));
    assert_eq!(w.push_blob(BlobKind::Fork, 2, 36, 0, &[3; 36]), 36);
    assert_eq!(w.push_blob(BlobKind::Descriptor, 1, 1 << 20, 5000, &[4; 500]), 134);
    w.as_bytes().to_vec()
}

#[test]
fn data_round_trips_with_every_record_type() {
    let records = some_records();
    let msg = Message::Data(Data { seq: 100, block: 7, index: 3, flags: DATA_PUSH, records: &records });
    let body = round_trip(&msg);
    assert_eq!(body[..16], [0, 0, 0, 0, 0, 0, 0, 100, 0, 0, 0, 7, 3, DATA_PUSH, 0, 0]);
    let got: Vec<Record<'_>> = Records::new(&records).collect::<Result<_, _>>().unwrap();
    assert_eq!(
        got,
        vec![
            Record::Page { page: 3, zstd: false, total_len: 4096, offset: 100, bytes: &[1; 50] },
            Record::Page { page: 4, zstd: true, total_len: 300, offset: 0, bytes: &[2; 300] },
            Record::ZeroRun { first_page: 10, count: 20 },
            Record::Blob { kind: BlobKind::Fork, id: 2, total_len: 36, offset: 0, bytes: &[3; 36] },
            Record::Blob { kind: BlobKind::Descriptor, id: 1, total_len: 1 << 20, offset: 5000, bytes: &[4; 134] },
        ]
    );
    // No records at all is a valid (if useless) Data packet.
    round_trip(&Message::Data(Data { seq: 0, block: 0, index: 0, flags: DATA_LAST_IN_BLOCK, records: &[] }));
}

#[test]
fn data_checks_fixed_fields() {
    let mut body = [0u8; 16];
    body[7] = 5; // seq 5
    body[12] = 5; // index 5: the block starts at 0
    assert!(Message::parse(MsgType::Data, &body).is_ok());
    body[12] = 6;
    assert_eq!(parse_err(MsgType::Data, &body), field("data index", 6));
    body[7] = 200;
    body[12] = 64;
    assert_eq!(parse_err(MsgType::Data, &body), field("data index", 64));
    body[12] = 0;
    body[13] = 8;
    assert_eq!(parse_err(MsgType::Data, &body), field("data flags", 8));
    // An out-of-stream answer: Seq NO_STREAM, Block NO_BLOCK, index 0, no other flag.
    let mut unicast = [0u8; 16];
    unicast[..8].copy_from_slice(&NO_STREAM.to_be_bytes());
    unicast[8..12].copy_from_slice(&NO_BLOCK.to_be_bytes());
    unicast[13] = DATA_UNICAST;
    assert!(matches!(Message::parse(MsgType::Data, &unicast), Ok(Message::Data(d)) if d.flags == DATA_UNICAST));
    for (at, byte) in [(7, 0u8), (11, 0), (12, 1)] {
        let mut bad = unicast;
        bad[at] = byte;
        assert_eq!(parse_err(MsgType::Data, &bad), field("unicast data", u64::from(DATA_UNICAST)), "byte {at}");
    }
    unicast[13] = DATA_UNICAST | DATA_PUSH;
    assert_eq!(parse_err(MsgType::Data, &unicast), field("unicast data", u64::from(DATA_UNICAST | DATA_PUSH)));
    body[13] = 3;
    body[15] = 1;
    assert_eq!(parse_err(MsgType::Data, &body), field("data reserved", 1));
    assert_eq!(parse_err(MsgType::Data, &body[..15]), DecodeError::BadLength { msg: "data", len: 15 });
}

#[test]
fn data_with_a_bad_record_is_refused_with_its_offset() {
    let mut body = vec![0u8; 16];
    body.extend_from_slice(&some_records());
    let second = 16 + 50; // the second record starts after the first one's header and 50 bytes
    body[16 + second + 1] = 1; // its reserved byte
    assert_eq!(
        parse_err(MsgType::Data, &body),
        DecodeError::BadRecord { offset: second, why: "reserved byte is not zero" }
    );
}

fn record(ty: u8, len: u16, a: u32, b: u32, c: u32, payload: usize) -> Vec<u8> {
    let mut r = vec![ty, 0];
    r.extend_from_slice(&len.to_be_bytes());
    for v in [a, b, c] {
        r.extend_from_slice(&v.to_be_bytes());
    }
    r.resize(16 + payload, 0xaa);
    r
}

fn record_err(bytes: &[u8]) -> &'static str {
    match Records::new(bytes).find_map(Result::err) {
        Some(DecodeError::BadRecord { why, .. }) => why,
        other => panic!("expected a record error, got {other:?}"),
    }
}

#[test]
fn records_are_validated() {
    assert_eq!(record_err(&[1; 15]), "truncated record header (fewer than 16 bytes left)");
    assert_eq!(record_err(&record(0, 0, 0, 1, 0, 0)), "unknown record type (this version knows types 1 to 5)");
    assert_eq!(record_err(&record(6, 0, 0, 1, 0, 0)), "unknown record type (this version knows types 1 to 5)");
    assert_eq!(record_err(&record(1, 10, 0, 4096, 0, 9)), "record length runs past the end of the data body");
    assert_eq!(record_err(&record(1, 0, 0, 4096, 0, 0)), "page fragment is empty");
    assert_eq!(record_err(&record(2, 1, 0, 0, 0, 1)), "page encoding length is 0 or above 2 MiB + 64 KiB");
    assert_eq!(
        record_err(&record(2, 1, 0, MAX_PAGE_ENCODING + 1, 0, 1)),
        "page encoding length is 0 or above 2 MiB + 64 KiB"
    );
    assert_eq!(record_err(&record(1, 10, 0, 4096, 4090, 10)), "page fragment ends beyond the page's encoding length");
    assert_eq!(
        record_err(&record(1, 10, 0, 4096, u32::MAX, 10)),
        "page fragment ends beyond the page's encoding length"
    );
    assert_eq!(record_err(&record(3, 1, 0, 1, 0, 1)), "zero-page run carries payload bytes");
    assert_eq!(record_err(&record(3, 0, 0, 0, 0, 0)), "zero-page run has count 0");
    assert_eq!(record_err(&record(3, 0, u32::MAX, 1, 0, 0)), "zero-page run extends beyond page 2^32 - 1");
    assert_eq!(record_err(&record(3, 0, 0, 1, 1, 0)), "zero-page run has non-zero field c");
    assert_eq!(record_err(&record(4, 0, 0, 1, 0, 0)), "blob fragment is empty");
    assert_eq!(record_err(&record(5, 1, 0, MAX_BLOB_LEN + 1, 0, 1)), "blob length exceeds 16 MiB");
    assert_eq!(record_err(&record(5, 2, 0, 10, 9, 2)), "blob fragment ends beyond the blob's length");
    // Limits themselves are fine.
    assert!(Records::new(&record(2, 1, 0, MAX_PAGE_ENCODING, MAX_PAGE_ENCODING - 1, 1)).all(|r| r.is_ok()));
    assert!(Records::new(&record(3, 0, u32::MAX - 1, 1, 0, 0)).all(|r| r.is_ok()));
    assert!(Records::new(&record(5, 1, 0, MAX_BLOB_LEN, MAX_BLOB_LEN - 1, 1)).all(|r| r.is_ok()));
}

#[test]
fn records_iteration_stops_after_the_first_error() {
    let mut bytes = record(3, 0, 0, 1, 0, 0);
    bytes.extend_from_slice(&record(9, 0, 0, 0, 0, 0));
    bytes.extend_from_slice(&record(3, 0, 0, 1, 0, 0));
    let got: Vec<_> = Records::new(&bytes).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], Ok(Record::ZeroRun { first_page: 0, count: 1 }));
    assert_eq!(
        got[1],
        Err(DecodeError::BadRecord { offset: 16, why: "unknown record type (this version knows types 1 to 5)" })
    );
}

#[test]
fn record_writer_fills_exactly_and_never_overruns() {
    let mut buf = [0u8; 40];
    let mut w = RecordWriter::new(&mut buf);
    assert!(w.is_empty());
    assert_eq!(w.room(), 24);
    assert_eq!(w.push_page(1, false, 4096, 0, &[9; 100]), 24);
    assert_eq!(w.len(), 40);
    assert_eq!(w.room(), 0);
    assert_eq!(w.push_page(1, false, 4096, 24, &[9; 100]), 0);
    assert!(!w.push_zero_run(5, 1));
    assert_eq!(w.push_blob(BlobKind::Descriptor, 1, 10, 0, &[1; 10]), 0);
    assert_eq!(w.len(), 40);

    let mut buf = [0u8; 20];
    let mut w = RecordWriter::new(&mut buf);
    assert_eq!(w.push_page(1, false, 4096, 0, &[]), 0, "an empty fragment writes nothing");
    assert!(w.is_empty());
    assert!(w.push_zero_run(5, 1), "a zero run needs no room for payload");
    assert_eq!(w.len(), 16);
    assert_eq!(w.room(), 0);
    assert!(!w.push_zero_run(6, 1));

    let mut big = vec![0u8; 70_000];
    let mut w = RecordWriter::new(&mut big);
    assert_eq!(w.push_blob(BlobKind::Descriptor, 1, 100_000, 0, &[1; 69_000]), 65_535, "len is a u16");
}

#[test]
fn repair_round_trips_and_checks_ranges() {
    let symbol = [5u8; 64];
    let msg = Message::Repair(Repair { first_seq: 40, block: 3, k: 8, index: 15, total: 16, symbol: &symbol });
    let body = round_trip(&msg);
    assert_eq!(body[..20], [0, 0, 0, 0, 0, 0, 0, 40, 0, 0, 0, 3, 0, 8, 0, 15, 0, 16, 0, 0]);
    let with = |at: usize, v: u16| {
        let mut b = body.clone();
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
        parse_err(MsgType::Repair, &b)
    };
    assert_eq!(with(12, 0), field("repair k", 0));
    assert_eq!(with(12, 65), field("repair k", 65));
    assert_eq!(with(16, 0), field("repair total", 0));
    assert_eq!(with(16, 1025), field("repair total", 1025));
    assert_eq!(with(14, 16), field("repair index", 16));
    assert_eq!(with(18, 1), field("repair reserved", 1));
    let mut b = body.clone();
    b[..8].copy_from_slice(&(u64::MAX - 3).to_be_bytes());
    assert_eq!(parse_err(MsgType::Repair, &b), field("repair first_seq", u64::MAX - 3));
    assert_eq!(parse_err(MsgType::Repair, &body[..20]), DecodeError::BadLength { msg: "repair", len: 20 });
    assert_eq!(parse_err(MsgType::Repair, &body[..21]), DecodeError::BadLength { msg: "repair", len: 21 });
}

#[test]
fn request_round_trips_and_checks_its_runs() {
    let runs = [
        PageRun { first_page: 9, count: 1, priority: Priority::Fault },
        PageRun { first_page: 10, count: 8, priority: Priority::ReadAhead },
        PageRun { first_page: u32::MAX - 5, count: 5, priority: Priority::Prefetch },
    ];
    let msg = Message::Request(Request { stream_start: NO_STREAM, loss_ppm: 1_000_000, runs: Items::Slice(&runs) });
    let body = round_trip(&msg);
    assert_eq!(body.len(), 16 + 24);
    assert_eq!(body[12..16], [0, 3, 0, 0]);
    assert_eq!(body[16..24], [0, 0, 0, 9, 0, 1, 0, 0]);
    let with = |at: usize, v: u8| {
        let mut b = body.clone();
        b[at] = v;
        parse_err(MsgType::Request, &b)
    };
    assert_eq!(with(13, 0), field("request count", 0));
    assert_eq!(with(13, 2), DecodeError::BadLength { msg: "request", len: 40 });
    assert_eq!(with(13, 4), DecodeError::BadLength { msg: "request", len: 40 });
    assert_eq!(with(15, 1), field("request reserved", 1));
    assert_eq!(with(11, 0x41), field("request loss_ppm", 1_000_001));
    assert_eq!(with(22, 3), field("priority", 3));
    assert_eq!(with(23, 1), field("page run reserved", 1));
    assert_eq!(with(21, 0), field("page run count", 0));
    assert_eq!(with(37, 6), field("page run first_page", u64::from(u32::MAX - 5)));
    // Wire items re-encode as they came.
    let parsed = Message::parse(MsgType::Request, &body).unwrap();
    assert_eq!(round_trip(&parsed), body);
}

#[test]
fn nak_round_trips_and_checks_entries() {
    let entries = [
        NakEntry { block: 4, needed: 2, parity_seen: 3, first_seq: 64 },
        NakEntry { block: NO_BLOCK, needed: 10, parity_seen: 0, first_seq: 200 },
    ];
    let msg =
        Message::Nak(Nak { stream_start: 0, highest_seen: 211, loss_ppm: 20_000, entries: Items::Slice(&entries) });
    let body = round_trip(&msg);
    assert_eq!(body.len(), 24 + 32);
    assert_eq!(body[24..40], [0, 0, 0, 4, 0, 2, 0, 3, 0, 0, 0, 0, 0, 0, 0, 64]);
    let with = |at: usize, v: &[u8]| {
        let mut b = body.clone();
        b[at..at + v.len()].copy_from_slice(v);
        parse_err(MsgType::Nak, &b)
    };
    assert_eq!(with(20, &[0, 0]), field("nak count", 0));
    assert_eq!(with(20, &[0, 1]), DecodeError::BadLength { msg: "nak", len: 56 });
    assert_eq!(with(22, &[0, 1]), field("nak reserved", 1));
    assert_eq!(with(28, &[0, 0]), field("nak entry needed", 0));
    assert_eq!(with(28, &[0, 65]), field("nak entry needed", 65));
    assert_eq!(with(30, &[4, 1]), field("nak entry parity_seen", 1025));
    assert_eq!(with(46, &[0, 1]), field("nak entry parity_seen", 1));
    assert_eq!(with(48, &[0xff; 8]), field("nak entry first_seq", u64::MAX));
    assert_eq!(with(16, &[0, 0x0f, 0x42, 0x41]), field("nak loss_ppm", 1_000_001));
}

#[test]
fn status_round_trips_and_checks_flags() {
    let s = Status {
        stream_start: 1,
        received_through: 50,
        highest_seen: 60,
        loss_ppm: 0,
        window: 4096,
        pages_cached: 1000,
        flags: STATUS_LEAVING,
        echo: 123_456_789,
        echo_delay_us: 250,
        loss_events: u32::MAX,
        receive_rate_kib: 30_000,
    };
    let body = round_trip(&Message::Status(s));
    let mut b = body.clone();
    b[39] = 3;
    assert_eq!(parse_err(MsgType::Status, &b), field("status flags", 3));
    assert_eq!(parse_err(MsgType::Status, &body[..63]), DecodeError::BadLength { msg: "status", len: 63 });
    let mut b = body.clone();
    b[63] = 1;
    assert_eq!(parse_err(MsgType::Status, &b), field("status reserved", 1));
}

#[test]
fn clock_round_trips_and_refuses_a_zero_timestamp() {
    let c = Clock { timestamp_us: 42, rate_kib: 30_000, rtt_us: 1_500 };
    let body = round_trip(&Message::Clock(c));
    assert_eq!(body.len(), CLOCK_LEN);
    let mut b = body.clone();
    b[..8].fill(0);
    assert_eq!(parse_err(MsgType::Clock, &b), field("clock timestamp", 0));
    assert_eq!(parse_err(MsgType::Clock, &body[..15]), DecodeError::BadLength { msg: "clock", len: 15 });
}

#[test]
fn report_round_trips_and_checks_its_length() {
    let result = [0x42u8; MAX_REPORT_RESULT];
    let body = round_trip(&Message::Report(Report { fork: 1, clone: 2, status: 3, result: &result }));
    assert_eq!(body[..16], [0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 4, 0, 0, 0]);
    round_trip(&Message::Report(Report { fork: 1, clone: 2, status: 0, result: &[] }));
    let mut b = body.clone();
    b[12..14].copy_from_slice(&1025u16.to_be_bytes());
    assert_eq!(parse_err(MsgType::Report, &b), field("report len", 1025));
    assert_eq!(parse_err(MsgType::Report, &body[..1000]), DecodeError::BadLength { msg: "report", len: 1000 });
    let too_long = [0u8; MAX_REPORT_RESULT + 1];
    let msg = Message::Report(Report { fork: 1, clone: 2, status: 3, result: &too_long });
    let mut buf = [0u8; MAX_DATAGRAM];
    assert_eq!(
        encode(&header(MsgType::Report, 0), &msg, &keys(), &mut buf),
        Err(EncodeError::TooLarge { len: 1025, max: 1024 })
    );
}

#[test]
fn report_ack_round_trips() {
    let acks = [ReportKey { fork: 1, clone: 2 }, ReportKey { fork: 1, clone: 3 }];
    let body = round_trip(&Message::ReportAck(Items::Slice(&acks)));
    assert_eq!(body, [0, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3]);
    round_trip(&Message::ReportAck(Items::Slice(&[])));
    assert_eq!(parse_err(MsgType::ReportAck, &body[..19]), DecodeError::BadLength { msg: "reportack", len: 19 });
    assert_eq!(parse_err(MsgType::ReportAck, &[0, 0, 0, 1]), field("reportack reserved", 1));
}

#[test]
fn tags_follow_the_specified_derivation() {
    let mut material = KEY.0.to_vec();
    material.extend_from_slice(&SESSION.0.to_be_bytes());
    material.extend_from_slice(&3u32.to_be_bytes());
    let mac_key = blake3::derive_key("spindrift v1 mac key", &material);
    let enc_key = blake3::derive_key("spindrift v1 enc key", &material);

    let msg = Message::End { reason: EndReason::Complete, final_seq: 9 };
    let mut buf = [0u8; 128];
    let n = encode(&header(MsgType::End, 0), &msg, &keys(), &mut buf).unwrap();
    let expected = blake3::keyed_hash(&mac_key, &buf[..n - TAG_LEN]);
    assert_eq!(buf[n - TAG_LEN..n], expected.as_bytes()[..TAG_LEN]);

    use chacha20poly1305::aead::AeadInPlace;
    use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
    let h = header(MsgType::End, FLAG_ENCRYPTED);
    let n = encode(&h, &msg, &keys(), &mut buf).unwrap();
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&9u32.to_be_bytes());
    nonce[4..].copy_from_slice(&0x1122_3344u64.to_be_bytes());
    let mut body = [0u8; END_LEN];
    msg.write_body(&mut body).unwrap();
    assert_ne!(buf[HEADER_LEN..n - TAG_LEN], body, "the body is encrypted on the wire");
    let tag = ChaCha20Poly1305::new(&enc_key.into())
        .encrypt_in_place_detached(&nonce.into(), &buf[..HEADER_LEN], &mut body)
        .unwrap();
    assert_eq!(buf[HEADER_LEN..n - TAG_LEN], body);
    assert_eq!(buf[n - TAG_LEN..n], tag[..]);
}

#[test]
fn open_refuses_other_keys_and_leaves_nothing_behind() {
    let msg = Message::Heartbeat(Heartbeat {
        next_seq: 1,
        repairable_from: 0,
        receivers: 1,
        status_interval_ms: 1,
        nak_backoff_us: 1,
    });
    for flags in [0, FLAG_ENCRYPTED] {
        let mut buf = [0u8; 128];
        let n = encode(&header(MsgType::Heartbeat, flags), &msg, &keys(), &mut buf).unwrap();
        let sealed = buf;
        for other in [
            Keys::derive(&SessionKey([8; 32]), SESSION, 3),
            Keys::derive(&KEY, SessionId(1), 3),
            Keys::derive(&KEY, SESSION, 4),
        ] {
            assert_eq!(open(&mut buf[..n], &other).map(|(h, _)| h), Err(DecodeError::BadTag));
            assert_eq!(buf, sealed, "a failed open does not decrypt");
        }
        // The header is authenticated too: another packet number is another datagram.
        buf[31] ^= 1;
        assert_eq!(open(&mut buf[..n], &keys()).map(|(h, _)| h), Err(DecodeError::BadTag));
    }
}

#[test]
fn seal_and_encode_refuse_what_does_not_fit() {
    let keys = keys();
    let h = header(MsgType::Data, 0);
    let mut buf = vec![0u8; MAX_DATAGRAM + 100];
    assert_eq!(seal(&h, MAX_DATAGRAM - 47, &mut buf, &keys), Err(EncodeError::TooLarge { len: 8973, max: 8972 }));
    assert_eq!(seal(&h, MAX_DATAGRAM - 48, &mut buf, &keys), Ok(MAX_DATAGRAM));
    assert_eq!(seal(&h, 10, &mut buf[..57], &keys), Err(EncodeError::BufferTooSmall { need: 58, have: 57 }));
    assert_eq!(seal(&h, usize::MAX, &mut buf, &keys), Err(EncodeError::TooLarge { len: usize::MAX, max: 8972 }));

    let records = vec![0u8; max_records_len(MAX_DATAGRAM) + 1];
    let data = Message::Data(Data { seq: 0, block: 0, index: 0, flags: 0, records: &records });
    assert_eq!(encode(&h, &data, &keys, &mut buf), Err(EncodeError::TooLarge { len: 8973, max: 8972 }));
    assert_eq!(data.write_body(&mut buf), Err(EncodeError::TooLarge { len: 8925, max: 8924 }));
    let data = Message::Data(Data { seq: 0, block: 0, index: 0, flags: 0, records: &records[..100] });
    assert_eq!(encode(&h, &data, &keys, &mut buf[..163]), Err(EncodeError::BufferTooSmall { need: 164, have: 163 }));
    assert_eq!(data.write_body(&mut buf[..115]), Err(EncodeError::BufferTooSmall { need: 116, have: 115 }));

    let runs = vec![PageRun { first_page: 0, count: 1, priority: Priority::Fault }; max_request_runs(MAX_DATAGRAM)];
    let req = Message::Request(Request { stream_start: 0, loss_ppm: 0, runs: Items::Slice(&runs) });
    assert!(encode(&header(MsgType::Request, 0), &req, &keys, &mut buf).is_ok());
    let runs = vec![PageRun { first_page: 0, count: 1, priority: Priority::Fault }; 70_000];
    let req = Message::Request(Request { stream_start: 0, loss_ppm: 0, runs: Items::Slice(&runs) });
    assert!(matches!(encode(&header(MsgType::Request, 0), &req, &keys, &mut buf), Err(EncodeError::TooLarge { .. })));
}

#[test]
fn encode_writes_the_message_type_whatever_the_header_says() {
    let msg = Message::End { reason: EndReason::Shutdown, final_seq: 1 };
    let mut buf = [0u8; 64];
    let n = encode(&header(MsgType::Data, 0), &msg, &keys(), &mut buf).unwrap();
    let (h, body) = open(&mut buf[..n], &keys()).unwrap();
    assert_eq!(h.msg_type, MsgType::End);
    assert!(matches!(Message::parse(h.msg_type, body), Ok(Message::End { .. })));
}

#[test]
fn limits_match_the_spec() {
    assert_eq!(max_request_runs(MAX_DATAGRAM), 1113);
    assert_eq!(max_request_runs(1472), 176);
    assert_eq!(max_nak_entries(MAX_DATAGRAM), 556);
    assert_eq!(max_nak_entries(1472), 87);
    assert_eq!(max_report_acks(1472), 177);
    assert_eq!(max_records_len(1472), 1408);
    assert_eq!(max_body_len(10), 0);
}

fn plan() -> ForkPlan {
    ForkPlan {
        fork: 5,
        descriptor: 1,
        entries: vec![
            ForkEntry { node: NodeId(2), first_clone: 10, clones: 4 },
            ForkEntry { node: NodeId(1), first_clone: 0, clones: 10 },
            ForkEntry { node: NodeId(3), first_clone: u32::MAX - 1, clones: 1 },
        ],
    }
}

#[test]
fn fork_plan_round_trips() {
    let bytes = plan().encode();
    assert_eq!(bytes.len(), 12 + 36);
    assert_eq!(bytes[..24], [0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 2, 0, 0, 0, 10, 0, 0, 0, 4]);
    assert_eq!(ForkPlan::decode(&bytes), Ok(plan()));
    let empty = ForkPlan { fork: 1, descriptor: 2, entries: vec![] };
    assert_eq!(ForkPlan::decode(&empty.encode()), Ok(empty));
}

#[test]
fn fork_plan_refusals() {
    let bytes = plan().encode();
    let len = |n| DecodeError::BadLength { msg: "fork plan", len: n };
    assert_eq!(ForkPlan::decode(&bytes[..11]), Err(len(11)));
    assert_eq!(ForkPlan::decode(&bytes[..47]), Err(len(47)));
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(ForkPlan::decode(&long), Err(len(49)));
    let mut many = bytes.clone();
    many[8..12].copy_from_slice(&(MAX_FORK_ENTRIES as u32 + 1).to_be_bytes());
    assert_eq!(ForkPlan::decode(&many), Err(field("fork plan count", 65_537)));
    many[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(ForkPlan::decode(&many), Err(field("fork plan count", u64::from(u32::MAX))));

    let refuse = |entries: Vec<ForkEntry>| ForkPlan::decode(&ForkPlan { fork: 1, descriptor: 1, entries }.encode());
    let e = |node, first_clone, clones| ForkEntry { node: NodeId(node), first_clone, clones };
    assert_eq!(refuse(vec![e(0, 0, 1)]), Err(field("fork entry node", 0)));
    assert_eq!(refuse(vec![e(1, 0, 0)]), Err(field("fork entry clones", 0)));
    assert_eq!(refuse(vec![e(1, u32::MAX, 1)]), Err(field("fork entry first_clone", u64::from(u32::MAX))));
    assert_eq!(refuse(vec![e(1, 0, 5), e(2, 4, 1)]), Err(field("fork entry first_clone", 4)));
    assert_eq!(refuse(vec![e(2, 4, 1), e(1, 0, 5)]), Err(field("fork entry first_clone", 4)));
    assert_eq!(refuse(vec![e(1, 0, 5), e(2, 5, 1), e(1, 6, 1)]), Err(field("fork entry node", 1)));
    assert!(refuse(vec![e(1, 0, 5), e(2, 5, 1)]).is_ok());
}

#[test]
fn queued_round_trips_and_checks_its_fields() {
    let runs = [
        PageRun { first_page: 7, count: 3, priority: Priority::Fault },
        PageRun { first_page: 100, count: 1, priority: Priority::ReadAhead },
    ];
    let msg = Message::Queued(super::Queued { next_seq: 0x0102_0304_0506_0708, runs: Items::Slice(&runs) });
    let body = round_trip(&msg);
    assert_eq!(body.len(), 16 + 2 * 8);
    assert_eq!(&body[..12], &[1, 2, 3, 4, 5, 6, 7, 8, 0, 2, 0, 0]);
    let mut no_runs = body[..16].to_vec();
    no_runs[9] = 0;
    assert_eq!(parse_err(MsgType::Queued, &no_runs), field("queued count", 0));
    let mut reserved = body.clone();
    reserved[13] = 1;
    assert!(matches!(parse_err(MsgType::Queued, &reserved), DecodeError::BadField { field: "queued reserved", .. }));
    assert!(Message::parse(MsgType::Queued, &body[..20]).is_err(), "a partial run is refused");
}
