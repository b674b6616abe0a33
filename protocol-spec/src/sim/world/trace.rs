//! Datagrams decoded for `trace`-level logs (target `spindrift_sim`): only evaluated when enabled.

use crate::wire::Keys;

/// The message type of a datagram, for traces.
pub(super) fn msg_type(d: &[u8]) -> String {
    match crate::wire::peek_header(d) {
        Ok(h) => format!("{:?}#{}", h.msg_type, h.packet_number),
        Err(_) => "?".to_string(),
    }
}

/// A datagram the server sent, decoded for traces: stream position, block and the pages it carries.
pub(super) fn describe(d: &[u8], keys: &Keys) -> String {
    use crate::wire::{Message, Record, Records};
    let mut buf = d.to_vec();
    let Ok((h, body)) = crate::wire::open(&mut buf, keys) else { return format!("{} (unreadable)", msg_type(d)) };
    let head = format!("{:?}#{}", h.msg_type, h.packet_number);
    match Message::parse(h.msg_type, body) {
        Ok(Message::Data(data)) => {
            let mut pages = Vec::new();
            for r in Records::new(data.records).flatten() {
                match r {
                    Record::Page { page, offset, bytes, total_len, .. } => {
                        pages.push(format!("{page}[{offset}+{}/{total_len}]", bytes.len()))
                    }
                    Record::ZeroRun { first_page, count } => pages.push(format!("zero {first_page}+{count}")),
                    Record::Blob { id, .. } => pages.push(format!("blob {id}")),
                }
            }
            format!("{head} seq {} block {} idx {}: {}", data.seq, data.block, data.index, pages.join(" "))
        }
        Ok(Message::Repair(r)) => {
            format!("{head} block {} first {} k {} parity {}/{}", r.block, r.first_seq, r.k, r.index, r.total)
        }
        Ok(_) => head,
        Err(e) => format!("{head} (bad body: {e})"),
    }
}
