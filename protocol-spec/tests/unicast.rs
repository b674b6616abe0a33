//! Out-of-stream answers (PROTOCOL.md section 8.1): a page one host alone asked for goes to that
//! host by unicast; a page several hosts asked for while it was queued goes to the group in the
//! stream; lost unicast answers are asked for again and every page arrives right.

mod common;

use common::{Check, Image};

use spindrift_protocol::receiver::{Receiver, ReceiverConfig};
use spindrift_protocol::sender::{Sender, SenderConfig};
use spindrift_protocol::wire::{NodeId, SessionId, SessionKey};
use spindrift_protocol::Time;

/// Incompressible pages (a raw page is three datagrams at 1472 bytes), so datagram counts follow
/// page counts.
fn image(pages: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..pages * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What one run did.
struct Outcome {
    /// Datagrams each receiver got.
    received: Vec<u64>,
    /// Out-of-stream datagrams the sender sent.
    unicast_packets: u64,
    /// Datagrams the sender sent in all.
    sent: u64,
}

/// Receiver `n` (of `receivers`) faults on `wants(n)`, in order; `drop(n, i)` loses the i-th
/// datagram to receiver n (n = 0: to the server).
fn run(
    receivers: usize,
    pages: usize,
    unicast: bool,
    wants: impl Fn(usize) -> Vec<u32>,
    drop: impl Fn(usize, u64) -> bool,
) -> Outcome {
    let img = image(pages);
    let key = SessionKey([9; 32]);
    let session = SessionId(7);
    let mut cfg = SenderConfig::new(session, 1, key.clone(), 12);
    cfg.unicast_answers = unicast;
    cfg.max_datagram = 1472;
    let mut sender = Sender::new(cfg, Image(img.clone()), Time::ZERO).expect("sender");
    let mut rx: Vec<Receiver> = (1..=receivers)
        .map(|n| {
            let mut c = ReceiverConfig::new(session, NodeId(n as u32), key.clone(), 12, pages as u32);
            c.stream_start = Some(0);
            c.read_ahead = 2;
            Receiver::new(c, Time::ZERO).expect("receiver")
        })
        .collect();
    let mut sinks: Vec<Check<'_>> =
        (0..receivers).map(|_| Check { image: &img, stored: vec![false; pages], bad: 0 }).collect();
    let orders: Vec<Vec<u32>> = (0..receivers).map(&wants).collect();
    let (pos, received) = common::lockstep(&mut sender, &mut rx, &mut sinks, &orders, drop, 400_000);
    let done: Vec<bool> = pos.iter().zip(&orders).map(|(&p, o)| p == o.len()).collect();
    assert!(done.iter().all(|&d| d), "not every receiver got its pages: {pos:?}");
    assert!(sinks.iter().all(|s| s.bad == 0), "a wrong page was stored");
    Outcome { received, unicast_packets: sender.stats().unicast_packets, sent: sender.stats().tx_packets }
}

/// Two hosts wanting disjoint halves: with unicast answers each receives about its own half.
#[test]
fn a_page_one_host_asked_for_reaches_that_host_alone() {
    let halves = |n: usize| (n as u32 * 64..(n as u32 + 1) * 64).collect::<Vec<u32>>();
    let multicast = run(2, 128, false, halves, |_, _| false);
    let unicast = run(2, 128, true, halves, |_, _| false);
    assert_eq!(multicast.unicast_packets, 0);
    assert!(unicast.unicast_packets > 0);
    let (m, u): (u64, u64) = (multicast.received.iter().sum(), unicast.received.iter().sum());
    assert!((u as f64) < 0.6 * m as f64, "receivers got {u} datagrams with unicast answers, {m} without");
}

/// Two hosts wanting the same pages at the same moment: the answers go to the group, once.
#[test]
fn a_page_several_hosts_asked_for_goes_to_the_group() {
    let same = |_| (0..64u32).collect::<Vec<u32>>();
    let out = run(2, 64, true, same, |_, _| false);
    assert!(
        out.unicast_packets * 4 < out.sent,
        "{} of {} datagrams were unicast although both hosts asked for every page",
        out.unicast_packets,
        out.sent
    );
}

/// Lost unicast answers (every 5th datagram to each host, every 7th request) are asked for again.
#[test]
fn lost_unicast_answers_are_asked_for_again() {
    let halves = |n: usize| (n as u32 * 48..(n as u32 + 1) * 48).rev().collect::<Vec<u32>>();
    let out = run(2, 96, true, halves, |n, i| if n == 0 { i.is_multiple_of(7) } else { i.is_multiple_of(5) });
    assert!(out.unicast_packets > 0);
}
