//! Bulk prefetch ahead of a running push is left to the push (PROTOCOL.md section 10).
//!
//! Found with `bench line-rate` (4 hosts behind 250 Mbit/s, `fetch` on each, the server paced at
//! 225 Mbit/s with `--push all`): each fetch kept a window of prefetch ahead of its lowest missing
//! page and asked for one more page per arrival, so the server's demand queue never emptied, the
//! push (lowest priority) sent 0 of 16,414 pages, and the server took 53,519 requests for them.

mod common;

use std::time::Duration;

use common::{Check, Image};

use spindrift_protocol::receiver::{Receiver, ReceiverConfig};
use spindrift_protocol::sender::{PushPolicy, Sender, SenderConfig};
use spindrift_protocol::wire::{NodeId, SessionId, SessionKey, MAX_DATAGRAM};
use spindrift_protocol::Time;

const PAGES: u32 = 1024;
const WINDOW: u32 = 64;

fn image() -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut v = vec![0u8; PAGES as usize * 4096];
    for b in &mut v {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8 | 1;
    }
    v
}

/// Two hosts, each asking for a window of prefetch ahead of its lowest missing page and one more
/// page per arrival, against a server pushing the whole image. Returns the sender's counters.
fn run(push: PushPolicy) -> spindrift_protocol::sender::SenderStats {
    let img = image();
    let key = SessionKey([5; 32]);
    let session = SessionId(9);
    let mut cfg = SenderConfig::new(session, 1, key.clone(), 12);
    cfg.zstd_level = None;
    cfg.push = push;
    cfg.min_receivers = 2;
    cfg.rate_bytes_per_sec = Some(100_000_000);
    let mut sender = Sender::new(cfg, Image(img.clone()), Time::ZERO).expect("sender");
    let mut hosts: Vec<(Receiver, Check<'_>, u32)> = (1..=2)
        .map(|n| {
            let mut c = ReceiverConfig::new(session, NodeId(n), key.clone(), 12, PAGES);
            c.stream_start = Some(0);
            c.read_ahead = 0;
            let rx = Receiver::new(c, Time::ZERO).expect("receiver");
            (rx, Check { image: &img, stored: vec![false; PAGES as usize], bad: 0 }, 0)
        })
        .collect();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut now = Time::ZERO;
    for _ in 0..200_000 {
        now += Duration::from_micros(10);
        for (rx, _, asked) in &mut hosts {
            let low = (0..PAGES).find(|&p| !rx.has_page(p)).unwrap_or(PAGES);
            let fresh: Vec<u32> = (*asked..(low + WINDOW).min(PAGES)).collect();
            if !fresh.is_empty() {
                rx.prefetch(&fresh);
                *asked = low + WINDOW;
            }
            if rx.poll_timeout().is_some_and(|t| t <= now) {
                rx.handle_timeout(now);
            }
            while let Some(len) = rx.poll_transmit(now, &mut buf) {
                sender.handle_datagram(now, &mut buf[..len]);
            }
        }
        if sender.poll_timeout().is_some_and(|t| t <= now) {
            sender.handle_timeout(now);
        }
        while let Some(t) = sender.poll_transmit(now, &mut buf) {
            for (rx, sink, _) in &mut hosts {
                let mut copy = buf[..t.len].to_vec();
                rx.handle_datagram(now, &mut copy, sink);
            }
        }
        if hosts.iter().all(|(rx, _, _)| rx.pages_cached() == PAGES) {
            break;
        }
    }
    for (rx, sink, _) in &hosts {
        assert_eq!(sink.bad, 0, "a wrong page was stored");
        assert_eq!(rx.pages_cached(), PAGES, "a host is missing pages");
    }
    sender.stats().clone()
}

#[test]
fn a_push_takes_over_what_bulk_prefetch_asks_ahead_of_it() {
    let s = run(PushPolicy::HintsThenAll(Vec::new()));
    assert!(
        s.pages_pushed * 10 >= s.pages_sent * 9,
        "the push sent only {} of {} pages: prefetch took its turn",
        s.pages_pushed,
        s.pages_sent
    );
    assert!(s.prefetch_left_to_push > 0, "no prefetch was left to the push");
    assert!(s.pages_sent <= u64::from(PAGES) + 16, "{} pages sent for {PAGES}", s.pages_sent);
}

#[test]
fn without_a_push_prefetch_is_answered_on_demand() {
    let s = run(PushPolicy::None);
    assert_eq!((s.pages_pushed, s.prefetch_left_to_push), (0, 0));
    assert!(s.pages_sent >= u64::from(PAGES));
}

/// The pacer keeps up to `pace_burst` of credit: a driver that polls late sends what it owes at
/// once, bounded by the burst; polled on time it sends at the rate.
#[test]
fn a_late_poll_spends_at_most_the_pacer_s_credit() {
    let img = image();
    let key = SessionKey([5; 32]);
    let mut cfg = SenderConfig::new(SessionId(9), 1, key.clone(), 12);
    cfg.zstd_level = None;
    cfg.push = PushPolicy::HintsThenAll(Vec::new());
    cfg.rate_bytes_per_sec = Some(100_000_000); // 1472 bytes every 14.72 us
    cfg.pace_burst = Duration::from_millis(1);
    let mut sender = Sender::new(cfg, Image(img), Time::ZERO).expect("sender");
    let mut c = ReceiverConfig::new(SessionId(9), NodeId(1), key, 12, PAGES);
    c.stream_start = Some(0);
    let mut rx = Receiver::new(c, Time::ZERO).expect("receiver");
    let img2 = image();
    let mut sink = Check { image: &img2, stored: vec![false; PAGES as usize], bad: 0 };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut now = Time::ZERO;
    // Join: the push starts once a receiver is heard.
    for _ in 0..100 {
        now += Duration::from_micros(100);
        rx.handle_timeout(now);
        while let Some(len) = rx.poll_transmit(now, &mut buf) {
            sender.handle_datagram(now, &mut buf[..len]);
        }
        while let Some(t) = sender.poll_transmit(now, &mut buf) {
            rx.handle_datagram(now, &mut buf[..t.len], &mut sink);
        }
        if sender.stats().pages_pushed > 0 {
            break;
        }
    }
    assert!(sender.stats().pages_pushed > 0, "the push never started");
    let bytes = |s: &Sender<Image>| s.stats().tx_bytes;
    // 10 ms late: about 1 ms of credit goes out at once (68 datagrams), not 10 ms of it.
    now += Duration::from_millis(10);
    let before = bytes(&sender);
    while sender.poll_transmit(now, &mut buf).is_some() {}
    let burst = bytes(&sender) - before;
    assert!((90_000..=110_000 + 1472).contains(&burst), "a late poll sent {burst} bytes at once");
    // On time: the rate.
    let before = bytes(&sender);
    for _ in 0..1000 {
        now += Duration::from_micros(10);
        while sender.poll_transmit(now, &mut buf).is_some() {}
    }
    let sent = bytes(&sender) - before;
    assert!((950_000..=1_050_000).contains(&sent), "10 ms on time sent {sent} bytes");
}
