//! Property tests of the wire codec: every valid message of every type survives encode → open → parse
//! (authenticated and encrypted); any single flipped bit, any truncation and any random bytes are
//! refused cleanly; anything that parses re-encodes to the same bytes (no ignored bits).

#![allow(clippy::unwrap_used, missing_docs)]

use proptest::prelude::*;
use spindrift_protocol::wire::*;

/// A message that owns its bytes, so a strategy can produce it.
#[derive(Debug, Clone, PartialEq)]
enum Owned {
    Announce(Announce),
    Heartbeat(Heartbeat),
    End(EndReason, u64),
    Data { seq: u64, block: u32, index: u8, flags: u8, records: Vec<u8> },
    Repair { first_seq: u64, block: u32, k: u16, index: u16, total: u16, symbol: Vec<u8> },
    Request { stream_start: u64, loss_ppm: u32, runs: Vec<PageRun> },
    Nak { stream_start: u64, highest_seen: u64, loss_ppm: u32, entries: Vec<NakEntry> },
    Status(Status),
    Report { fork: u32, clone: u32, status: u32, result: Vec<u8> },
    ReportAck(Vec<ReportKey>),
    Queued { next_seq: u64, runs: Vec<PageRun> },
    Clock(Clock),
}

impl Owned {
    fn message(&self) -> Message<'_> {
        match self {
            Owned::Announce(a) => Message::Announce(*a),
            Owned::Heartbeat(h) => Message::Heartbeat(*h),
            Owned::Clock(c) => Message::Clock(*c),
            Owned::End(reason, final_seq) => Message::End { reason: *reason, final_seq: *final_seq },
            Owned::Data { seq, block, index, flags, records } => {
                Message::Data(Data { seq: *seq, block: *block, index: *index, flags: *flags, records })
            }
            Owned::Repair { first_seq, block, k, index, total, symbol } => Message::Repair(Repair {
                first_seq: *first_seq,
                block: *block,
                k: *k,
                index: *index,
                total: *total,
                symbol,
            }),
            Owned::Request { stream_start, loss_ppm, runs } => {
                Message::Request(Request { stream_start: *stream_start, loss_ppm: *loss_ppm, runs: Items::Slice(runs) })
            }
            Owned::Nak { stream_start, highest_seen, loss_ppm, entries } => Message::Nak(Nak {
                stream_start: *stream_start,
                highest_seen: *highest_seen,
                loss_ppm: *loss_ppm,
                entries: Items::Slice(entries),
            }),
            Owned::Status(s) => Message::Status(*s),
            Owned::Report { fork, clone, status, result } => {
                Message::Report(Report { fork: *fork, clone: *clone, status: *status, result })
            }
            Owned::ReportAck(keys) => Message::ReportAck(Items::Slice(keys)),
            Owned::Queued { next_seq, runs } => {
                Message::Queued(Queued { next_seq: *next_seq, runs: Items::Slice(runs) })
            }
        }
    }

    /// The owned form of a parsed message (list items collected; they must all be valid).
    fn from_message(m: &Message<'_>) -> Owned {
        fn list<T: WireItem>(items: &Items<'_, T>) -> Vec<T> {
            items.iter().collect::<Result<_, _>>().unwrap()
        }
        match m {
            Message::Announce(a) => Owned::Announce(*a),
            Message::Heartbeat(h) => Owned::Heartbeat(*h),
            Message::End { reason, final_seq } => Owned::End(*reason, *final_seq),
            Message::Data(d) => {
                Owned::Data { seq: d.seq, block: d.block, index: d.index, flags: d.flags, records: d.records.to_vec() }
            }
            Message::Repair(r) => Owned::Repair {
                first_seq: r.first_seq,
                block: r.block,
                k: r.k,
                index: r.index,
                total: r.total,
                symbol: r.symbol.to_vec(),
            },
            Message::Request(r) => {
                Owned::Request { stream_start: r.stream_start, loss_ppm: r.loss_ppm, runs: list(&r.runs) }
            }
            Message::Nak(n) => Owned::Nak {
                stream_start: n.stream_start,
                highest_seen: n.highest_seen,
                loss_ppm: n.loss_ppm,
                entries: list(&n.entries),
            },
            Message::Status(s) => Owned::Status(*s),
            Message::Report(r) => {
                Owned::Report { fork: r.fork, clone: r.clone, status: r.status, result: r.result.to_vec() }
            }
            Message::ReportAck(k) => Owned::ReportAck(list(k)),
            Message::Queued(q) => Owned::Queued { next_seq: q.next_seq, runs: list(&q.runs) },
            Message::Clock(c) => Owned::Clock(*c),
        }
    }
}

const ALL_TYPES: [MsgType; 12] = [
    MsgType::Announce,
    MsgType::Heartbeat,
    MsgType::End,
    MsgType::Data,
    MsgType::Repair,
    MsgType::Request,
    MsgType::Nak,
    MsgType::Status,
    MsgType::Report,
    MsgType::ReportAck,
    MsgType::Queued,
    MsgType::Clock,
];

/// One record, valid by construction.
#[derive(Debug, Clone)]
enum RecordSpec {
    Page { page: u32, zstd: bool, total_len: u32, offset: u32, bytes: Vec<u8> },
    Zero { first_page: u32, count: u32 },
    Blob { fork: bool, id: u32, total_len: u32, offset: u32, bytes: Vec<u8> },
}

fn fragment(max_total: u32) -> impl Strategy<Value = (u32, u32, Vec<u8>)> {
    (prop::collection::vec(any::<u8>(), 1..200), any::<u32>(), any::<u32>()).prop_map(move |(bytes, extra, at)| {
        let len = bytes.len() as u32;
        let total = len + extra % (max_total - len + 1);
        let offset = at % (total - len + 1);
        (total, offset, bytes)
    })
}

fn record() -> impl Strategy<Value = RecordSpec> {
    prop_oneof![
        (any::<u32>(), any::<bool>(), fragment(MAX_PAGE_ENCODING)).prop_map(
            |(page, zstd, (total_len, offset, bytes))| { RecordSpec::Page { page, zstd, total_len, offset, bytes } }
        ),
        (any::<u32>(), 1..=u32::MAX)
            .prop_map(|(first_page, count)| RecordSpec::Zero { first_page: first_page.min(u32::MAX - count), count }),
        (any::<bool>(), any::<u32>(), fragment(MAX_BLOB_LEN)).prop_map(|(fork, id, (total_len, offset, bytes))| {
            RecordSpec::Blob { fork, id, total_len, offset, bytes }
        }),
    ]
}

/// A records area of valid records, as a sender's [`RecordWriter`] writes it into a 1472-byte datagram.
fn records() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(record(), 0..8).prop_map(|specs| {
        let mut buf = vec![0u8; max_records_len(1472)];
        let mut w = RecordWriter::new(&mut buf);
        for spec in specs {
            match spec {
                RecordSpec::Page { page, zstd, total_len, offset, bytes } => {
                    w.push_page(page, zstd, total_len, offset, &bytes);
                }
                RecordSpec::Zero { first_page, count } => {
                    w.push_zero_run(first_page, count);
                }
                RecordSpec::Blob { fork, id, total_len, offset, bytes } => {
                    let kind = if fork { BlobKind::Fork } else { BlobKind::Descriptor };
                    w.push_blob(kind, id, total_len, offset, &bytes);
                }
            }
        }
        w.as_bytes().to_vec()
    })
}

fn loss() -> impl Strategy<Value = u32> {
    0..=MAX_LOSS_PPM
}

fn priority() -> impl Strategy<Value = Priority> {
    prop_oneof![Just(Priority::Fault), Just(Priority::ReadAhead), Just(Priority::Prefetch)]
}

fn page_run() -> impl Strategy<Value = PageRun> {
    (any::<u32>(), 1..=u16::MAX, priority()).prop_map(|(first_page, count, priority)| PageRun {
        first_page: first_page.min(u32::MAX - u32::from(count)),
        count,
        priority,
    })
}

fn nak_entry() -> impl Strategy<Value = NakEntry> {
    prop_oneof![
        (0..NO_BLOCK, 1..=MAX_BLOCK as u16, 0..=MAX_PARITY as u16, any::<u64>()).prop_map(
            |(block, needed, parity_seen, first_seq)| NakEntry {
                block,
                needed,
                parity_seen,
                first_seq: first_seq.min(u64::MAX - u64::from(needed)),
            }
        ),
        (1..=u16::MAX, any::<u64>()).prop_map(|(needed, first_seq)| NakEntry {
            block: NO_BLOCK,
            needed,
            parity_seen: 0,
            first_seq: first_seq.min(u64::MAX - u64::from(needed)),
        }),
    ]
}

fn message() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (
            MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT,
            1..=MAX_BLOCK as u8,
            MIN_DATAGRAM as u16..=MAX_DATAGRAM as u16,
            any::<u32>(),
            any::<u64>(),
            any::<u32>()
        )
            .prop_map(|(page_shift, max_block, max_datagram, page_count, next_seq, descriptor)| {
                Owned::Announce(Announce { page_shift, max_block, max_datagram, page_count, next_seq, descriptor })
            }),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(a, b, c, d, e)| {
            Owned::Heartbeat(Heartbeat {
                next_seq: a,
                repairable_from: b,
                receivers: c,
                status_interval_ms: d,
                nak_backoff_us: e,
            })
        }),
        (prop_oneof![Just(EndReason::Shutdown), Just(EndReason::Complete), Just(EndReason::Error)], any::<u64>())
            .prop_map(|(r, s)| Owned::End(r, s)),
        (any::<u64>(), any::<u32>(), 0..MAX_BLOCK as u8, 0u8..4, records()).prop_map(
            |(seq, block, index, flags, records)| Owned::Data {
                seq: seq.max(u64::from(index)),
                block,
                index,
                flags,
                records
            }
        ),
        (any::<u64>(), any::<u32>(), 1..=MAX_BLOCK as u16, 1..=MAX_PARITY as u16, any::<u16>(), 1usize..700).prop_map(
            |(first_seq, block, k, total, index, half)| Owned::Repair {
                first_seq: first_seq.min(u64::MAX - u64::from(k)),
                block,
                k,
                index: index % total,
                total,
                symbol: (0..2 * half).map(|i| i as u8).collect(),
            }
        ),
        (any::<u64>(), loss(), prop::collection::vec(page_run(), 1..=max_request_runs(MAX_DATAGRAM)))
            .prop_map(|(stream_start, loss_ppm, runs)| Owned::Request { stream_start, loss_ppm, runs }),
        (any::<u64>(), any::<u64>(), loss(), prop::collection::vec(nak_entry(), 1..=max_nak_entries(MAX_DATAGRAM)))
            .prop_map(|(stream_start, highest_seen, loss_ppm, entries)| Owned::Nak {
                stream_start,
                highest_seen,
                loss_ppm,
                entries
            }),
        (any::<[u64; 4]>(), loss(), any::<[u32; 5]>(), any::<bool>()).prop_map(|(s, loss_ppm, w, leaving)| {
            Owned::Status(Status {
                stream_start: s[0],
                received_through: s[1],
                highest_seen: s[2],
                loss_ppm,
                window: w[0],
                pages_cached: w[1],
                flags: if leaving { STATUS_LEAVING } else { 0 },
                echo: s[3],
                echo_delay_us: w[2],
                loss_events: w[3],
                receive_rate_kib: w[4],
            })
        }),
        (1..=u64::MAX, any::<u32>(), any::<u32>()).prop_map(|(timestamp_us, rate_kib, rtt_us)| Owned::Clock(Clock {
            timestamp_us,
            rate_kib,
            rtt_us
        })),
        (any::<[u32; 3]>(), prop::collection::vec(any::<u8>(), 0..=MAX_REPORT_RESULT))
            .prop_map(|(f, result)| { Owned::Report { fork: f[0], clone: f[1], status: f[2], result } }),
        prop::collection::vec(any::<(u32, u32)>().prop_map(|(fork, clone)| ReportKey { fork, clone }), 0..200)
            .prop_map(Owned::ReportAck),
        (any::<u64>(), prop::collection::vec(page_run(), 1..=max_request_runs(MAX_DATAGRAM)))
            .prop_map(|(next_seq, runs)| Owned::Queued { next_seq, runs }),
    ]
}

fn keys() -> Keys {
    Keys::derive(&SessionKey([0x5a; 32]), SessionId(42), 7)
}

fn header(msg_type: MsgType, encrypted: bool, node: u32, packet_number: u64) -> Header {
    Header {
        msg_type,
        flags: if encrypted { FLAG_ENCRYPTED } else { 0 },
        session: SessionId(42),
        epoch: 7,
        node: NodeId(node),
        packet_number,
    }
}

fn encoded(msg: &Owned, encrypted: bool) -> Vec<u8> {
    let m = msg.message();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = encode(&header(m.msg_type(), encrypted, 3, 99), &m, &keys(), &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Errors a header check may give for a damaged header.
fn is_header_error(e: &DecodeError) -> bool {
    matches!(
        e,
        DecodeError::BadMagic(_)
            | DecodeError::BadVersion(_)
            | DecodeError::UnknownType(_)
            | DecodeError::UnknownFlags(_)
            | DecodeError::BadField { field: "header reserved", .. }
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in message(), encrypted in any::<bool>(), node in any::<u32>(), pn in any::<u64>()) {
        let m = msg.message();
        let h = header(m.msg_type(), encrypted, node, pn);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = encode(&h, &m, &keys(), &mut buf).unwrap();
        prop_assert_eq!(n, HEADER_LEN + m.body_len() + TAG_LEN);
        prop_assert_eq!(peek_header(&buf[..n]), Ok(h));
        let (got, body) = open(&mut buf[..n], &keys()).unwrap();
        prop_assert_eq!(got, h);
        prop_assert_eq!(body.len(), m.body_len());
        let parsed = Message::parse(got.msg_type, body).unwrap();
        prop_assert_eq!(Owned::from_message(&parsed), msg.clone());
        if let Message::Data(d) = parsed {
            prop_assert!(Records::new(d.records).all(|r| r.is_ok()));
        }
    }

    #[test]
    fn any_flipped_bit_is_refused(msg in message(), encrypted in any::<bool>(), bit in any::<prop::sample::Index>()) {
        let mut dgram = encoded(&msg, encrypted);
        let bit = bit.index(dgram.len() * 8);
        dgram[bit / 8] ^= 1 << (bit % 8);
        match open(&mut dgram, &keys()) {
            Ok((h, _)) => prop_assert!(false, "bit {} flipped, still opened as {:?}", bit, h),
            Err(e) => prop_assert!(e == DecodeError::BadTag || is_header_error(&e), "bit {}: {:?}", bit, e),
        }
    }

    #[test]
    fn any_truncation_is_refused(msg in message(), encrypted in any::<bool>(), cut in any::<prop::sample::Index>()) {
        let dgram = encoded(&msg, encrypted);
        let n = cut.index(dgram.len());
        let mut short = dgram[..n].to_vec();
        let err = open(&mut short, &keys()).map(|(h, _)| h).unwrap_err();
        if n < HEADER_LEN + TAG_LEN {
            prop_assert_eq!(err, DecodeError::TooShort { len: n, min: HEADER_LEN + TAG_LEN });
        } else {
            prop_assert_eq!(err, DecodeError::BadTag);
        }
        // A truncated body never panics the parser either.
        let body = &dgram[HEADER_LEN..dgram.len() - TAG_LEN];
        let _ = Message::parse(msg.message().msg_type(), &body[..n.min(body.len())]);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        for t in ALL_TYPES {
            if let Ok(m) = Message::parse(t, &bytes) {
                reencodes_identically(&m, &bytes)?;
            }
        }
        let _ = peek_header(&bytes);
        let mut copy = bytes.clone();
        let _ = open(&mut copy, &keys());
        let _ = Records::new(&bytes).count();
        let _ = ForkPlan::decode(&bytes);
    }

    #[test]
    fn a_mutated_body_that_parses_reencodes_identically(
        msg in message(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let m = msg.message();
        let mut body = vec![0u8; m.body_len()];
        m.write_body(&mut body).unwrap();
        if !body.is_empty() {
            let i = at.index(body.len());
            body[i] = byte;
        }
        for t in ALL_TYPES {
            if let Ok(parsed) = Message::parse(t, &body) {
                reencodes_identically(&parsed, &body)?;
            }
        }
    }

    #[test]
    fn fork_plans_round_trip(
        fork in any::<u32>(),
        descriptor in any::<u32>(),
        sizes in prop::collection::vec((1u32..1000, 0u32..10), 0..100),
        shuffle in any::<u64>(),
    ) {
        // Disjoint clone ranges (with gaps), distinct nodes, in an arbitrary order.
        let mut next = 0u32;
        let mut entries: Vec<ForkEntry> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(clones, gap))| {
                let e = ForkEntry { node: NodeId(i as u32 + 1), first_clone: next + gap, clones };
                next += gap + clones;
                e
            })
            .collect();
        if !entries.is_empty() {
            let len = entries.len();
            entries.rotate_left((shuffle % len as u64) as usize);
        }
        let plan = ForkPlan { fork, descriptor, entries };
        prop_assert_eq!(ForkPlan::decode(&plan.encode()), Ok(plan));
    }
}

/// A parsed body has no ignored bits: writing it again gives back the same bytes, and its lists and
/// records iterate without error.
fn reencodes_identically(m: &Message<'_>, body: &[u8]) -> Result<(), TestCaseError> {
    prop_assert_eq!(m.body_len(), body.len());
    let mut again = vec![0u8; body.len()];
    prop_assert_eq!(m.write_body(&mut again), Ok(body.len()));
    prop_assert_eq!(&again[..], body);
    let _ = Owned::from_message(m); // panics if a list item fails
    if let Message::Data(d) = m {
        prop_assert!(Records::new(d.records).all(|r| r.is_ok()));
    }
    Ok(())
}
