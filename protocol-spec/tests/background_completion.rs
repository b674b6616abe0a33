//! Background completion (PROTOCOL.md section 10.1): a push with a rate of its own fills every
//! host's copy of the image after the answers to requests, no faster than that rate, and only once
//! no request has come for the quiet period; the server's owner hears once of each host that holds
//! every page (its clones no longer need the server).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Check, Image};

use spindrift_protocol::receiver::{Receiver, ReceiverConfig};
use spindrift_protocol::sender::{PushPolicy, Sender, SenderConfig, SenderEvent};
use spindrift_protocol::wire::{NodeId, SessionId, SessionKey, MAX_DATAGRAM};
use spindrift_protocol::Time;

const PAGES: u32 = 512;
const HOSTS: usize = 3;
const RATE: u64 = 20_000_000;
const QUIET: Duration = Duration::from_millis(10);
/// Host 1 faults on one page every `FAULT_GAP` for the first `FAULTS` pages.
const FAULTS: u32 = 40;
const FAULT_GAP: Duration = Duration::from_millis(2);
/// Host 1's first fault.
const START: Duration = Duration::from_millis(1);

/// Incompressible non-zero pages (sent raw).
fn image() -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..PAGES as usize * 4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8 | 1
        })
        .collect()
}

struct Outcome {
    /// When every host held every page.
    complete_at: Option<Time>,
    /// Pages pushed while host 1 was faulting (up to its last fault plus the quiet period).
    pushed_while_faulting: u64,
    /// ReceiverComplete events per node.
    told: HashMap<u32, usize>,
    bad: usize,
    pushed: u64,
}

/// Runs the sender and `HOSTS` receivers in lock step, 20 µs a step. Every `lose_every`-th
/// datagram to each host is lost (0: none).
fn run(seed: u64, lose_every: u64) -> Outcome {
    let img = image();
    let key = SessionKey([5; 32]);
    let session = SessionId(91);
    let mut cfg = SenderConfig::new(session, 1, key.clone(), 12);
    cfg.zstd_level = None;
    cfg.push = PushPolicy::HintsThenAll(Vec::new());
    cfg.push_rate_bytes_per_sec = Some(RATE);
    cfg.push_quiet = QUIET;
    cfg.min_receivers = HOSTS as u32;
    cfg.seed = seed;
    let mut sender = Sender::new(cfg, Image(img.clone()), Time::ZERO).expect("sender");
    let mut rx: Vec<Receiver> = (0..HOSTS)
        .map(|n| {
            let mut c = ReceiverConfig::new(session, NodeId(n as u32 + 1), key.clone(), 12, PAGES);
            c.seed = seed ^ n as u64;
            Receiver::new(c, Time::ZERO).expect("receiver")
        })
        .collect();
    let mut sinks: Vec<Check<'_>> =
        (0..HOSTS).map(|_| Check { image: &img, stored: vec![false; PAGES as usize], bad: 0 }).collect();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut received = [0u64; HOSTS];
    let mut now = Time::ZERO;
    // The last fault is at START + (FAULTS - 1) gaps; the push may start a quiet period later.
    let faulting_until = Time::ZERO + (START + FAULT_GAP * (FAULTS - 1) + QUIET - Duration::from_micros(20));
    let mut out = Outcome { complete_at: None, pushed_while_faulting: 0, told: HashMap::new(), bad: 0, pushed: 0 };
    for _ in 0..1_000_000 {
        now += Duration::from_micros(20);
        let since = Duration::from_nanos(now.as_nanos());
        if since >= START {
            // Host 1 faults on page i at START + i * FAULT_GAP (once: a page it has is not asked for).
            let due = ((since - START).as_nanos() / FAULT_GAP.as_nanos()) as u32;
            if due < FAULTS && (since - START).as_nanos() % FAULT_GAP.as_nanos() < 20_000 {
                // No stride (read-ahead would then answer some faults without a request).
                rx[0].fault(now, (due * due * 31 + due * 7) % PAGES);
            }
        }
        for r in &mut rx {
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
        for _ in 0..8 {
            let Some(t) = sender.poll_transmit(now, &mut buf) else { break };
            for n in 0..HOSTS {
                if matches!(t.destination, spindrift_protocol::sender::Destination::Node(to) if to != NodeId(n as u32 + 1))
                {
                    continue;
                }
                received[n] += 1;
                if lose_every > 0 && received[n] % lose_every == 0 {
                    continue;
                }
                let mut copy = buf[..t.len].to_vec();
                rx[n].handle_datagram(now, &mut copy, &mut sinks[n]);
            }
        }
        while let Some(ev) = sender.poll_event() {
            if let SenderEvent::ReceiverComplete(node) = ev {
                *out.told.entry(node.0).or_default() += 1;
            }
        }
        if now <= faulting_until {
            out.pushed_while_faulting = sender.stats().pages_pushed;
        }
        if out.complete_at.is_none() && sinks.iter().all(|s| s.stored.iter().all(|&b| b)) {
            out.complete_at = Some(now);
        }
        // Run on a little after completion, for the Statuses that tell the server.
        if out.complete_at.is_some_and(|t| now.saturating_since(t) > Duration::from_millis(300)) {
            break;
        }
    }
    out.bad = sinks.iter().map(|s| s.bad).sum();
    out.pushed = sender.stats().pages_pushed;
    out
}

#[test]
fn background_completion_fills_every_host_at_its_rate_once_the_hosts_stop_faulting() {
    for (seed, lose_every) in [(1, 0), (2, 50), (3, 23)] {
        let o = run(seed, lose_every);
        let at = o.complete_at.unwrap_or_else(|| panic!("seed {seed}: the hosts never held every page"));
        assert_eq!(o.bad, 0, "seed {seed}: wrong pages stored");
        assert_eq!(o.pushed_while_faulting, 0, "seed {seed}: the push ran while a host was faulting");
        assert!(o.pushed > 0, "seed {seed}: nothing was pushed");
        // The push may not beat its rate: the pages it sent, raw, at RATE, after the faults.
        // (less the 2 ms of credit its token bucket may spend at once)
        let floor =
            Duration::from_nanos(o.pushed * 4096 * 1_000_000_000 / RATE).saturating_sub(Duration::from_millis(2));
        let since_faults = at.saturating_since(Time::ZERO + START + FAULT_GAP * (FAULTS - 1) + QUIET);
        assert!(
            since_faults >= floor,
            "seed {seed}: {} pages pushed in {since_faults:?}, faster than the rate",
            o.pushed
        );
        // Nor crawl: twice the rate's time, plus repair.
        assert!(
            since_faults < floor * 2 + Duration::from_millis(100),
            "seed {seed}: complete only {since_faults:?} after the faults"
        );
        for node in 1..=HOSTS as u32 {
            assert_eq!(
                o.told.get(&node),
                Some(&1),
                "seed {seed}: host {node} complete told {:?} times",
                o.told.get(&node)
            );
        }
    }
}
