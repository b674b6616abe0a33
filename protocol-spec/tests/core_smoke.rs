//! A minimal lock-step loop of one sender and a few receivers with scripted loss: a smoke test of
//! the state machines that does not depend on the simulator.

mod common;

use std::time::Duration;

use common::{Check, Image};

use spindrift_protocol::receiver::{Receiver, ReceiverConfig};
use spindrift_protocol::sender::{Sender, SenderConfig};
use spindrift_protocol::wire::{NodeId, SessionId, SessionKey, MAX_DATAGRAM};
use spindrift_protocol::Time;

fn image(pages: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut v = vec![0u8; pages * 4096];
    for (p, page) in v.chunks_mut(4096).enumerate() {
        match p % 3 {
            0 => {}
            1 => page.iter_mut().enumerate().for_each(|(i, b)| *b = b"spindrift memory "[i % 17]),
            _ => page.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }),
        }
    }
    v
}

/// Runs `receivers` receivers that each fault on every page in their own order; `drop(n, i)` says
/// whether the i-th datagram to receiver n (n = 0: to the server) is lost.
fn run(receivers: usize, pages: usize, drop: impl Fn(usize, u64) -> bool) -> (Vec<usize>, u64) {
    let img = image(pages);
    let key = SessionKey([7; 32]);
    let session = SessionId(42);
    let mut cfg = SenderConfig::new(session, 1, key.clone(), 12);
    cfg.seed = 1;
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
    let orders: Vec<Vec<u32>> = (0..receivers)
        .map(|n| {
            let mut o: Vec<u32> = (0..pages as u32).collect();
            o.rotate_left(n * pages / receivers.max(1));
            o
        })
        .collect();
    let (pos, _) = common::lockstep(&mut sender, &mut rx, &mut sinks, &orders, drop, 200_000);
    assert!(sinks.iter().all(|s| s.bad == 0), "a wrong page was stored");
    (pos, sender.stats().tx_bytes)
}

#[test]
fn lossless_receivers_get_every_page() {
    let (pos, _) = run(3, 64, |_, _| false);
    assert_eq!(pos, vec![64; 3]);
}

#[test]
fn scripted_loss_is_repaired() {
    // Every 7th datagram to each receiver and every 5th to the server is lost.
    let (pos, _) = run(4, 96, |n, i| if n == 0 { i.is_multiple_of(5) } else { (i + n as u64).is_multiple_of(7) });
    assert_eq!(pos, vec![96; 4]);
}

#[test]
fn multicast_answers_serve_every_receiver() {
    let (_, one) = run(1, 64, |_, _| false);
    let (_, four) = run(4, 64, |_, _| false);
    assert!((four as f64) < 1.3 * one as f64, "4 receivers cost {four} bytes, 1 receiver {one}");
}

/// Announces start fast and slow down: at 0, then after gaps doubling from 10 ms to one second, so
/// a host that lost the first one (or started listening just after the server) joins within
/// milliseconds.
#[test]
fn announces_ramp_up_from_ten_milliseconds_to_one_second() {
    use spindrift_protocol::sender::PushPolicy;
    use spindrift_protocol::wire::{peek_header, MsgType};
    let img = image(8);
    let mut config = SenderConfig::new(SessionId(3), 1, SessionKey([4; 32]), 12);
    config.push = PushPolicy::None;
    let mut sender = Sender::new(config, Image(img), Time::ZERO).expect("sender");
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut announced_ms = Vec::new();
    for ms in 0..2500u64 {
        let now = Time::ZERO + Duration::from_millis(ms);
        sender.handle_timeout(now);
        while let Some(t) = sender.poll_transmit(now, &mut buf) {
            if peek_header(&buf[..t.len]).expect("own datagram").msg_type == MsgType::Announce {
                announced_ms.push(ms);
            }
        }
    }
    assert_eq!(announced_ms, [0, 10, 30, 70, 150, 310, 630, 1270, 2270]);
}
