//! Out-of-stream answers (PROTOCOL.md section 8.1): a page one host alone asked for goes to that
//! host by unicast; a page several hosts asked for while it was queued goes to the group in the
//! stream; lost unicast answers are asked for again and every page arrives right.

mod common;

use common::{Check, Image};

use spindrift_protocol::receiver::{Receiver, ReceiverConfig};
use spindrift_protocol::sender::{PushPolicy, Sender, SenderConfig};
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

const KEY: SessionKey = SessionKey([9; 32]);
const SESSION: SessionId = SessionId(7);

/// The server of `img` at 1472-byte datagrams.
fn sender(img: &[u8], unicast: bool, push: PushPolicy) -> Sender<Image> {
    let mut cfg = SenderConfig::new(SESSION, 1, KEY, 12);
    cfg.unicast_answers = unicast;
    cfg.max_datagram = 1472;
    cfg.push = push;
    Sender::new(cfg, Image(img.to_vec()), Time::ZERO).expect("sender")
}

/// Host `node` of an image of `pages` pages, following the stream from its start.
fn receiver(node: u32, pages: usize, read_ahead: u16) -> Receiver {
    let mut c = ReceiverConfig::new(SESSION, NodeId(node), KEY, 12, pages as u32);
    c.stream_start = Some(0);
    c.read_ahead = read_ahead;
    Receiver::new(c, Time::ZERO).expect("receiver")
}

/// What one run did.
struct Outcome {
    /// Datagrams each receiver got.
    received: Vec<u64>,
    /// Out-of-stream datagrams the sender sent.
    unicast_packets: u64,
    /// Datagrams the sender sent in all.
    sent: u64,
    /// Pages the sender sent out of the stream.
    unicast_pages: u64,
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
    run_with(receivers, pages, unicast, PushPolicy::None, wants, drop)
}

/// As [`run`], with the server pushing as `push` says.
fn run_with(
    receivers: usize,
    pages: usize,
    unicast: bool,
    push: PushPolicy,
    wants: impl Fn(usize) -> Vec<u32>,
    drop: impl Fn(usize, u64) -> bool,
) -> Outcome {
    let img = image(pages);
    let mut sender = sender(&img, unicast, push);
    let mut rx: Vec<Receiver> = (1..=receivers).map(|n| receiver(n as u32, pages, 2)).collect();
    let mut sinks: Vec<Check<'_>> =
        (0..receivers).map(|_| Check { image: &img, stored: vec![false; pages], bad: 0 }).collect();
    let orders: Vec<Vec<u32>> = (0..receivers).map(&wants).collect();
    let (pos, received) = common::lockstep(&mut sender, &mut rx, &mut sinks, &orders, drop, 400_000);
    let done: Vec<bool> = pos.iter().zip(&orders).map(|(&p, o)| p == o.len()).collect();
    assert!(done.iter().all(|&d| d), "not every receiver got its pages: {pos:?}");
    assert!(sinks.iter().all(|s| s.bad == 0), "a wrong page was stored");
    let stats = sender.stats();
    Outcome {
        received,
        unicast_packets: stats.unicast_packets,
        sent: stats.tx_packets,
        unicast_pages: stats.unicast_pages,
    }
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

/// During a push, a fault one host alone asked for leaves the stream (in it, the answer would reach
/// the host behind the push in flight), whoever else asks later; its read-ahead stays in the stream.
#[test]
fn during_a_push_only_faults_leave_the_stream() {
    // Each host faults on pages the push reaches last, far apart (each fault reads ahead 2 pages).
    let late = |n: usize| vec![400 + n as u32 * 40, 460 + n as u32 * 20, 500 + n as u32 * 5];
    let push = run_with(2, 512, true, PushPolicy::HintsThenAll(Vec::new()), late, |_, _| false);
    assert!(push.unicast_pages > 0, "no fault was answered out of the stream during the push");
    assert!(push.unicast_pages <= 6, "{} pages left the stream for 6 faults: read-ahead did too", push.unicast_pages);
    let idle = run(2, 512, true, late, |_, _| false);
    assert!(idle.unicast_pages > push.unicast_pages, "without a push the read-ahead goes out of the stream too");
}

/// The datagram that finishes a faulting page is marked urgent (the driver sends it at once, not
/// after the read-ahead's encoding fills the batch); read-ahead and pushed pages are not.
#[test]
fn the_datagram_finishing_a_faulted_page_is_urgent() {
    for unicast in [false, true] {
        let pages = 64;
        let mut sender = sender(&image(pages), unicast, PushPolicy::None);
        let mut rx = receiver(1, pages, 4);
        let now = Time::ZERO;
        let mut buf = vec![0u8; 2048];
        assert!(!rx.fault(now, 10));
        while let Some(len) = rx.poll_transmit(now, &mut buf) {
            sender.handle_datagram(now, &mut buf[..len]);
        }
        let mut flags = Vec::new();
        while let Some(t) = sender.poll_transmit(now, &mut buf) {
            flags.push(t.urgent);
        }
        let urgent: Vec<usize> = flags.iter().enumerate().filter(|(_, &u)| u).map(|(i, _)| i).collect();
        assert_eq!(urgent.len(), 1, "one faulting page, one urgent datagram (unicast {unicast}): {flags:?}");
        // A raw 4 KiB page spans three 1472-byte datagrams; the third finishes it (an Announce may
        // go first).
        assert!((2..=3).contains(&urgent[0]), "urgent at datagram {} (unicast {unicast}): {flags:?}", urgent[0]);
        assert!(flags.len() > urgent[0] + 1, "the read-ahead follows the urgent datagram");
    }
}
