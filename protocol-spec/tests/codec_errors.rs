//! Bad input → the exact error message a user (an operator reading a receiver's log) sees.

#![allow(clippy::unwrap_used, missing_docs)]

use spindrift_protocol::wire::*;

fn keys() -> Keys {
    Keys::derive(&SessionKey([1; 32]), SessionId(5), 1)
}

fn header(msg_type: MsgType) -> Header {
    Header { msg_type, flags: 0, session: SessionId(5), epoch: 1, node: NodeId(0), packet_number: 1 }
}

/// A valid, sealed End datagram.
fn datagram() -> Vec<u8> {
    let mut buf = vec![0u8; 128];
    let n =
        encode(&header(MsgType::End), &Message::End { reason: EndReason::Complete, final_seq: 3 }, &keys(), &mut buf)
            .unwrap();
    buf.truncate(n);
    buf
}

/// The error `open` gives for `dgram`, as displayed.
fn open_error(mut dgram: Vec<u8>) -> String {
    let peeked = peek_header(&dgram).map(|_| ());
    let opened = open(&mut dgram, &keys()).map(|_| ()).unwrap_err();
    if let Err(e) = peeked {
        assert_eq!(e, opened, "peek_header and open agree on header errors");
    }
    opened.to_string()
}

#[test]
fn a_valid_datagram_opens() {
    let mut d = datagram();
    let (h, body) = open(&mut d, &keys()).unwrap();
    assert_eq!(h, header(MsgType::End));
    assert!(matches!(Message::parse(h.msg_type, body), Ok(Message::End { reason: EndReason::Complete, final_seq: 3 })));
}

#[test]
fn wrong_magic() {
    let mut d = datagram();
    d[0..2].copy_from_slice(b"HT");
    assert_eq!(open_error(d), "bad magic 0x4854: not a spindrift datagram");
}

#[test]
fn version_1_and_version_3() {
    for v in [1u8, 3] {
        let mut d = datagram();
        d[2] = v;
        assert_eq!(open_error(d), format!("unsupported protocol version {v} (this build speaks version 2)"));
    }
}

#[test]
fn unknown_type_99() {
    let mut d = datagram();
    d[3] = 99;
    assert_eq!(open_error(d), "unknown message type 99");
}

#[test]
fn unknown_flags() {
    let mut d = datagram();
    d[4..6].copy_from_slice(&0x0003u16.to_be_bytes());
    assert_eq!(open_error(d), "unknown header flags 0x0002");
}

#[test]
fn reserved_header_bits() {
    let mut d = datagram();
    d[6..8].copy_from_slice(&0x0100u16.to_be_bytes());
    assert_eq!(open_error(d), "field header reserved has invalid value 256");
}

#[test]
fn tag_mismatch() {
    let mut d = datagram();
    let last = d.len() - 1;
    d[last] ^= 0x80;
    assert_eq!(open_error(d), "authentication failed: tag mismatch (forged, corrupted, or wrong session key)");
}

#[test]
fn wrong_key() {
    let mut d = datagram();
    let other = Keys::derive(&SessionKey([2; 32]), SessionId(5), 1);
    assert_eq!(
        open(&mut d, &other).map(|_| ()).unwrap_err().to_string(),
        "authentication failed: tag mismatch (forged, corrupted, or wrong session key)"
    );
}

#[test]
fn too_short() {
    let mut d = datagram();
    d.truncate(20);
    assert_eq!(open_error(d), "datagram too short: 20 bytes, need at least 48");
}

#[test]
fn too_long() {
    assert_eq!(open_error(vec![0; 9000]), "datagram too long: 9000 bytes, at most 8972 allowed");
}

#[test]
fn data_with_a_bad_record() {
    // A sender bug: a page fragment that runs past the page's encoding. It encodes and authenticates,
    // and the receiver's parse names the record and what is wrong with it.
    let mut records = [0u8; 64];
    let mut w = RecordWriter::new(&mut records);
    assert!(w.push_zero_run(0, 8));
    assert_eq!(w.push_page(9, false, 4096, 4090, &[7; 16]), 16);
    let len = w.len();
    let msg = Message::Data(Data { seq: 0, block: 0, index: 0, flags: 0, records: &records[..len] });
    let mut buf = vec![0u8; 256];
    let n = encode(&header(MsgType::Data), &msg, &keys(), &mut buf).unwrap();
    let (h, body) = open(&mut buf[..n], &keys()).unwrap();
    assert_eq!(
        Message::parse(h.msg_type, body).map(|_| ()).unwrap_err().to_string(),
        "malformed record at byte 16 of a data body: page fragment ends beyond the page's encoding length"
    );
}

#[test]
fn data_with_an_unknown_record_type() {
    let mut body = vec![0u8; DATA_FIXED_LEN + RECORD_HEADER_LEN];
    body[DATA_FIXED_LEN] = 9;
    assert_eq!(
        Message::parse(MsgType::Data, &body).map(|_| ()).unwrap_err().to_string(),
        "malformed record at byte 0 of a data body: unknown record type (this version knows types 1 to 5)"
    );
}

#[test]
fn field_and_length_errors() {
    let parse = |t, body: &[u8]| Message::parse(t, body).map(|_| ()).unwrap_err().to_string();
    let mut announce = [0u8; 20];
    announce[0] = 30;
    assert_eq!(parse(MsgType::Announce, &announce), "field announce page_shift has invalid value 30");
    assert_eq!(parse(MsgType::Status, &[0; 39]), "status body has bad length 39");
    let mut request = [0u8; 24];
    request[13] = 1;
    request[21] = 1; // count 1
    request[22] = 7;
    assert_eq!(parse(MsgType::Request, &request), "field priority has invalid value 7");
    assert_eq!(parse(MsgType::Request, &request[..20]), "request body has bad length 20");
    assert_eq!(
        ForkPlan::decode(&[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
            .unwrap_err()
            .to_string(),
        "field fork entry node has invalid value 0"
    );
}

#[test]
fn encode_errors() {
    let h = header(MsgType::Data);
    let mut small = [0u8; 57];
    assert_eq!(
        seal(&h, 10, &mut small, &keys()).unwrap_err().to_string(),
        "buffer too small: message needs 58 bytes, buffer has 57"
    );
    let records = vec![0u8; 9000];
    let msg = Message::Data(Data { seq: 0, block: 0, index: 0, flags: 0, records: &records });
    let mut buf = vec![0u8; 10_000];
    assert_eq!(
        encode(&h, &msg, &keys(), &mut buf).unwrap_err().to_string(),
        "message too large: 9064 bytes exceeds the limit of 8972"
    );
}
