//! Shared by the integration tests: an image to serve and a sink that checks what arrives.

#![allow(dead_code)]

use std::time::Duration;

use spindrift_protocol::receiver::{PageSink, Receiver};
use spindrift_protocol::sender::{Destination, PageSource, Sender};
use spindrift_protocol::wire::{NodeId, MAX_DATAGRAM};
use spindrift_protocol::Time;

/// An image of 4 KiB pages to serve.
pub struct Image(pub Vec<u8>);

impl PageSource for Image {
    fn page_count(&self) -> u32 {
        (self.0.len() / 4096) as u32
    }
    fn page(&self, page: u32) -> &[u8] {
        &self.0[page as usize * 4096..(page as usize + 1) * 4096]
    }
}

/// Checks every stored page against the image.
pub struct Check<'a> {
    pub image: &'a [u8],
    pub stored: Vec<bool>,
    pub bad: usize,
}

impl PageSink for Check<'_> {
    fn store(&mut self, page: u32, data: &[u8]) {
        let p = page as usize;
        if data != &self.image[p * 4096..(p + 1) * 4096] {
            self.bad += 1;
        }
        self.stored[p] = true;
    }
    fn store_zero(&mut self, first_page: u32, count: u32) {
        for p in first_page as usize..(first_page + count) as usize {
            if self.image[p * 4096..(p + 1) * 4096].iter().any(|&b| b != 0) {
                self.bad += 1;
            }
            self.stored[p] = true;
        }
    }
}

/// Runs one sender and `rx` (receiver `n` is node `n + 1`) in lock step, 20 µs a step, for at most
/// `steps` steps or until every receiver has faulted through its order: receiver `n` faults on
/// `orders[n]` in turn, storing into `sinks[n]`. `drop(n, i)` loses the i-th datagram to receiver n
/// (n = 0: to the server). A datagram for one node reaches that receiver alone. Returns how far each
/// receiver got through its order and how many datagrams each received.
pub fn lockstep<S: PageSource>(
    sender: &mut Sender<S>,
    rx: &mut [Receiver],
    sinks: &mut [Check<'_>],
    orders: &[Vec<u32>],
    drop: impl Fn(usize, u64) -> bool,
    steps: usize,
) -> (Vec<usize>, Vec<u64>) {
    let receivers = rx.len();
    let mut pos = vec![0usize; receivers];
    let mut counts = vec![0u64; receivers + 1];
    let mut received = vec![0u64; receivers];
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut now = Time::ZERO;
    for _ in 0..steps {
        now += Duration::from_micros(20);
        for n in 0..receivers {
            while pos[n] < orders[n].len() && rx[n].fault(now, orders[n][pos[n]]) {
                pos[n] += 1;
            }
            if rx[n].poll_timeout().is_some_and(|t| t <= now) {
                rx[n].handle_timeout(now);
            }
            while let Some(len) = rx[n].poll_transmit(now, &mut buf) {
                counts[0] += 1;
                if !drop(0, counts[0]) {
                    sender.handle_datagram(now, &mut buf[..len]);
                }
            }
        }
        if sender.poll_timeout().is_some_and(|t| t <= now) {
            sender.handle_timeout(now);
        }
        for _ in 0..8 {
            let Some(t) = sender.poll_transmit(now, &mut buf) else { break };
            for n in 0..receivers {
                if matches!(t.destination, Destination::Node(to) if to != NodeId(n as u32 + 1)) {
                    continue;
                }
                counts[n + 1] += 1;
                if !drop(n + 1, counts[n + 1]) {
                    received[n] += 1;
                    let mut copy = buf[..t.len].to_vec();
                    rx[n].handle_datagram(now, &mut copy, &mut sinks[n]);
                }
            }
        }
        if pos.iter().zip(orders).all(|(&p, o)| p == o.len()) {
            break;
        }
    }
    (pos, received)
}

/// Runs a simulation that must finish bit-exact; panics naming `name` and what went wrong.
pub fn run_exact(name: &str, c: &spindrift_protocol::sim::SimConfig) -> spindrift_protocol::sim::SimReport {
    let r = spindrift_protocol::sim::run(c).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        r.all_bit_exact,
        "{name}: completed={} stopped_by={:?} mismatched={} unfinished={:?}",
        r.completed, r.stopped_by, r.mismatched_pages, r.unfinished
    );
    r
}
