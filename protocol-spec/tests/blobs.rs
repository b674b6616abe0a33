//! Blobs (VM descriptors, fork plans) published at the start of a session: they wait for the first
//! receiver, and go out again for a receiver that starts following the stream after them
//! (PROTOCOL.md section 12). A lock-step loop of one sender and two receivers, no simulator.

use std::time::Duration;

use spindrift_protocol::receiver::{PageSink, Receiver, ReceiverConfig, ReceiverEvent};
use spindrift_protocol::sender::{PageSource, PushPolicy, Sender, SenderConfig};
use spindrift_protocol::wire::{BlobKind, NodeId, SessionId, SessionKey, MAX_DATAGRAM};
use spindrift_protocol::Time;

struct Zero;

impl PageSource for Zero {
    fn page_count(&self) -> u32 {
        64
    }
    fn page(&self, _page: u32) -> &[u8] {
        &[0; 4096]
    }
}

/// A blob as a receiver reported it.
type Blob = (BlobKind, u32, Vec<u8>);

struct Nothing;

impl PageSink for Nothing {
    fn store(&mut self, _page: u32, _data: &[u8]) {}
    fn store_zero(&mut self, _first_page: u32, _count: u32) {}
}

fn receiver(node: u32, stream_start: Option<u64>, now: Time) -> Receiver {
    let mut c = ReceiverConfig::new(SessionId(5), NodeId(node), SessionKey([9; 32]), 12, 64);
    c.stream_start = stream_start;
    Receiver::new(c, now).expect("receiver")
}

#[test]
fn blobs_wait_for_a_receiver_and_go_again_for_a_late_one() {
    let mut cfg = SenderConfig::new(SessionId(5), 3, SessionKey([9; 32]), 12);
    cfg.push = PushPolicy::HintsThenAll(Vec::new());
    let mut sender = Sender::new(cfg, Zero, Time::ZERO).expect("sender");
    let descriptor: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    sender.publish_blob(BlobKind::Descriptor, 7, descriptor.clone());
    sender.publish_blob(BlobKind::Fork, 8, b"the fork plan".to_vec());

    let mut receivers: Vec<(Receiver, Vec<Blob>)> = Vec::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut now = Time::ZERO;
    let step = Duration::from_micros(20);
    let mut data_before_anyone = 0;
    for i in 0..20_000u32 {
        now += step;
        if i == 500 {
            // Nobody was there: nothing of the stream went out, only announcements.
            data_before_anyone = sender.stats().data_packets;
            receivers.push((receiver(1, Some(0), now), Vec::new()));
        }
        if i == 5_000 {
            // Joins long after the blobs went out: it follows the stream from where it is now.
            receivers.push((receiver(2, None, now), Vec::new()));
        }
        for (r, _) in receivers.iter_mut() {
            if r.poll_timeout().is_some_and(|t| t <= now) {
                r.handle_timeout(now);
            }
            while let Some(len) = r.poll_transmit(now, &mut buf) {
                sender.handle_datagram(now, &mut buf[..len]);
            }
        }
        if sender.poll_timeout().is_some_and(|t| t <= now) {
            sender.handle_timeout(now);
        }
        while let Some(t) = sender.poll_transmit(now, &mut buf) {
            for (r, blobs) in receivers.iter_mut() {
                let mut copy = buf[..t.len].to_vec();
                r.handle_datagram(now, &mut copy, &mut Nothing);
                while let Some(ev) = r.poll_event() {
                    if let ReceiverEvent::Blob { kind, id, bytes } = ev {
                        blobs.push((kind, id, bytes));
                    }
                }
            }
        }
    }
    assert_eq!(data_before_anyone, 0, "data went out before any receiver was live");
    assert_eq!(receivers.len(), 2);
    for (n, (_, blobs)) in receivers.iter().enumerate() {
        assert_eq!(blobs.len(), 2, "receiver {} got {} blobs", n + 1, blobs.len());
        assert_eq!(blobs[0], (BlobKind::Descriptor, 7, descriptor.clone()), "receiver {}", n + 1);
        assert_eq!(blobs[1], (BlobKind::Fork, 8, b"the fork plan".to_vec()), "receiver {}", n + 1);
    }
}
