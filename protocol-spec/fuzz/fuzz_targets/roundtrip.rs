//! Arbitrary field values (valid or not) through encode → open → parse: encoding never panics, a
//! datagram that encodes always opens, and whatever parses equals what was encoded. Also drives the
//! `RecordWriter` and `ForkPlan::encode`/`decode` the same way.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use spindrift_protocol::wire::*;

#[derive(Debug, Arbitrary)]
enum RecordSpec {
    Page { page: u32, zstd: bool, total_len: u32, offset: u32, bytes: Vec<u8> },
    Zero { first_page: u32, count: u32 },
    Blob { fork: bool, id: u32, total_len: u32, offset: u32, bytes: Vec<u8> },
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Input {
    Announce { page_shift: u8, max_block: u8, max_datagram: u16, page_count: u32, next_seq: u64, descriptor: u32 },
    Heartbeat { a: u64, b: u64, c: u32, d: u32, e: u32 },
    End { reason: u8, final_seq: u64 },
    Data { seq: u64, block: u32, index: u8, flags: u8, room: u16, records: Vec<RecordSpec> },
    Repair { first_seq: u64, block: u32, k: u16, index: u16, total: u16, symbol: Vec<u8> },
    Request { stream_start: u64, loss_ppm: u32, runs: Vec<(u32, u16, u8)> },
    Nak { stream_start: u64, highest_seen: u64, loss_ppm: u32, entries: Vec<(u32, u16, u16, u64)> },
    Status { s: [u64; 4], loss_ppm: u32, window: u32, pages_cached: u32, flags: u32, cc: [u32; 3] },
    Clock { timestamp_us: u64, rate_kib: u32, rtt_us: u32 },
    Report { fork: u32, clone: u32, status: u32, result: Vec<u8> },
    ReportAck(Vec<(u32, u32)>),
    Fork { fork: u32, descriptor: u32, entries: Vec<(u32, u32, u32)> },
}

fn priority(p: u8) -> Priority {
    match p % 3 {
        0 => Priority::Fault,
        1 => Priority::ReadAhead,
        _ => Priority::Prefetch,
    }
}

fn reason(r: u8) -> EndReason {
    match r % 3 {
        0 => EndReason::Shutdown,
        1 => EndReason::Complete,
        _ => EndReason::Error,
    }
}

fn records(room: u16, specs: &[RecordSpec]) -> Vec<u8> {
    let mut buf = vec![0u8; usize::from(room)];
    let mut w = RecordWriter::new(&mut buf);
    let mut raw = Vec::new();
    for spec in specs {
        let before = (w.len(), w.room());
        match spec {
            RecordSpec::Page { page, zstd, total_len, offset, bytes } => {
                let n = w.push_page(*page, *zstd, *total_len, *offset, bytes);
                assert_eq!(n, before.1.min(bytes.len()).min(65_535));
                assert_eq!(w.len(), before.0 + if n == 0 { 0 } else { RECORD_HEADER_LEN + n });
            }
            RecordSpec::Zero { first_page, count } => {
                let fits = w.push_zero_run(*first_page, *count);
                assert_eq!(w.len(), before.0 + if fits { RECORD_HEADER_LEN } else { 0 });
            }
            RecordSpec::Blob { fork, id, total_len, offset, bytes } => {
                let kind = if *fork { BlobKind::Fork } else { BlobKind::Descriptor };
                let n = w.push_blob(kind, *id, *total_len, *offset, bytes);
                assert_eq!(n, before.1.min(bytes.len()).min(65_535));
            }
            RecordSpec::Raw(bytes) => raw.extend_from_slice(bytes),
        }
    }
    let mut out = w.as_bytes().to_vec();
    out.extend_from_slice(&raw);
    out
}

fn check(msg: &Message<'_>) {
    let keys = Keys::derive(&SessionKey([7; 32]), SessionId(9), 2);
    for flags in [0, FLAG_ENCRYPTED] {
        let h = Header {
            msg_type: msg.msg_type(),
            flags,
            session: SessionId(9),
            epoch: 2,
            node: NodeId(4),
            packet_number: 5,
        };
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let Ok(n) = encode(&h, msg, &keys, &mut buf) else { continue };
        let (got, body) = open(&mut buf[..n], &keys).expect("an encoded datagram opens");
        assert_eq!(got, h);
        let mut expect = vec![0u8; msg.body_len()];
        assert_eq!(msg.write_body(&mut expect), Ok(body.len()));
        assert_eq!(body, &expect[..]);
        if let Ok(parsed) = Message::parse(got.msg_type, body) {
            assert_eq!(format!("{:?}", Fields(&parsed)), format!("{:?}", Fields(msg)));
        }
    }
}

/// A message's fields with its lists collected (so wire and slice forms compare equal).
struct Fields<'m, 'a>(&'m Message<'a>);

impl std::fmt::Debug for Fields<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Message::Request(r) => {
                write!(f, "Request {} {} {:?}", r.stream_start, r.loss_ppm, r.runs.iter().collect::<Vec<_>>())
            }
            Message::Nak(n) => write!(
                f,
                "Nak {} {} {} {:?}",
                n.stream_start,
                n.highest_seen,
                n.loss_ppm,
                n.entries.iter().collect::<Vec<_>>()
            ),
            Message::ReportAck(k) => write!(f, "ReportAck {:?}", k.iter().collect::<Vec<_>>()),
            other => write!(f, "{other:?}"),
        }
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Announce { page_shift, max_block, max_datagram, page_count, next_seq, descriptor } => {
            check(&Message::Announce(Announce {
                page_shift,
                max_block,
                max_datagram,
                page_count,
                next_seq,
                descriptor,
            }))
        }
        Input::Heartbeat { a, b, c, d, e } => check(&Message::Heartbeat(Heartbeat {
            next_seq: a,
            repairable_from: b,
            receivers: c,
            status_interval_ms: d,
            nak_backoff_us: e,
        })),
        Input::End { reason: r, final_seq } => check(&Message::End { reason: reason(r), final_seq }),
        Input::Data { seq, block, index, flags, room, records: specs } => {
            let records = records(room, &specs);
            check(&Message::Data(Data { seq, block, index, flags, records: &records }))
        }
        Input::Repair { first_seq, block, k, index, total, symbol } => {
            check(&Message::Repair(Repair { first_seq, block, k, index, total, symbol: &symbol }))
        }
        Input::Request { stream_start, loss_ppm, runs } => {
            let runs: Vec<PageRun> = runs
                .iter()
                .map(|&(first_page, count, p)| PageRun { first_page, count, priority: priority(p) })
                .collect();
            check(&Message::Request(Request { stream_start, loss_ppm, runs: Items::Slice(&runs) }))
        }
        Input::Nak { stream_start, highest_seen, loss_ppm, entries } => {
            let entries: Vec<NakEntry> = entries
                .iter()
                .map(|&(block, needed, parity_seen, first_seq)| NakEntry { block, needed, parity_seen, first_seq })
                .collect();
            check(&Message::Nak(Nak { stream_start, highest_seen, loss_ppm, entries: Items::Slice(&entries) }))
        }
        Input::Status { s, loss_ppm, window, pages_cached, flags, cc } => check(&Message::Status(Status {
            stream_start: s[0],
            received_through: s[1],
            highest_seen: s[2],
            loss_ppm,
            window,
            pages_cached,
            flags,
            echo: s[3],
            echo_delay_us: cc[0],
            loss_events: cc[1],
            receive_rate_kib: cc[2],
        })),
        Input::Clock { timestamp_us, rate_kib, rtt_us } => {
            check(&Message::Clock(Clock { timestamp_us, rate_kib, rtt_us }))
        }
        Input::Report { fork, clone, status, result } => {
            check(&Message::Report(Report { fork, clone, status, result: &result }))
        }
        Input::ReportAck(keys) => {
            let keys: Vec<ReportKey> = keys.iter().map(|&(fork, clone)| ReportKey { fork, clone }).collect();
            check(&Message::ReportAck(Items::Slice(&keys)))
        }
        Input::Fork { fork, descriptor, entries } => {
            let entries = entries
                .iter()
                .map(|&(node, first_clone, clones)| ForkEntry { node: NodeId(node), first_clone, clones })
                .collect();
            let plan = ForkPlan { fork, descriptor, entries };
            if let Ok(back) = ForkPlan::decode(&plan.encode()) {
                assert_eq!(back, plan);
            }
        }
    }
});
