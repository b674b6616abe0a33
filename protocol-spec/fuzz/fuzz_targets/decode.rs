//! Arbitrary bytes through every decoding entry point: `peek_header`, `open` (with a fixed key), and —
//! because the fuzzer cannot forge a MAC — `Message::parse` of every type, `Records` and
//! `ForkPlan::decode` directly on the raw bytes. Also re-seals any input with a valid header so `open`'s
//! success path (MAC and AEAD) and the parse after it are reached. Must never panic; whatever parses
//! must iterate without error and re-encode to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spindrift_protocol::wire::*;

const ALL_TYPES: [MsgType; 11] = [
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
];

fn keys() -> Keys {
    Keys::derive(&SessionKey([0x42; 32]), SessionId(1), 1)
}

/// Everything a receiver or the server does with a parsed message's borrowed parts.
fn walk(msg: &Message<'_>, body: &[u8]) {
    match msg {
        Message::Data(d) => {
            for r in Records::new(d.records) {
                let r = r.expect("records of a parsed Data body are valid");
                if let Record::Blob { kind: BlobKind::Fork, bytes, .. } = r {
                    let _ = ForkPlan::decode(bytes);
                }
            }
        }
        Message::Request(r) => assert!(r.runs.iter().all(|x| x.is_ok()), "runs of a parsed Request are valid"),
        Message::Nak(n) => assert!(n.entries.iter().all(|x| x.is_ok()), "entries of a parsed Nak are valid"),
        Message::ReportAck(k) => assert!(k.iter().all(|x| x.is_ok()), "keys of a parsed ReportAck are valid"),
        Message::Queued(q) => assert!(q.runs.iter().all(|x| x.is_ok()), "runs of a parsed Queued are valid"),
        _ => {}
    }
    assert_eq!(msg.body_len(), body.len());
    let mut again = vec![0u8; body.len()];
    assert_eq!(msg.write_body(&mut again), Ok(body.len()));
    assert_eq!(again, body, "a parsed body re-encodes to the same bytes");
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    let header = peek_header(data);

    // The receive path as it is: forged input stops at `open`.
    let mut buf = data.to_vec();
    if let Ok((h, body)) = open(&mut buf, &keys) {
        if let Ok(m) = Message::parse(h.msg_type, body) {
            walk(&m, body);
        }
    }

    // The same bytes sealed under the key: `open` must accept them and give back the body.
    if let Ok(h) = header {
        let mut sealed = data.to_vec();
        let body_len = data.len() - HEADER_LEN - TAG_LEN;
        let n = seal(&h, body_len, &mut sealed, &keys).expect("a datagram that fits seals");
        assert_eq!(n, data.len());
        let (got, body) = open(&mut sealed, &keys).expect("a sealed datagram opens");
        assert_eq!(got, h);
        assert_eq!(body, &data[HEADER_LEN..HEADER_LEN + body_len]);
        if let Ok(m) = Message::parse(h.msg_type, body) {
            walk(&m, body);
        }
    }

    // The parsers directly on the raw bytes.
    for t in ALL_TYPES {
        if let Ok(m) = Message::parse(t, data) {
            walk(&m, data);
        }
    }
    for r in Records::new(data) {
        let _ = r;
    }
    if let Ok(plan) = ForkPlan::decode(data) {
        assert_eq!(plan.encode(), data, "a decoded fork plan re-encodes to the same bytes");
    }
});
