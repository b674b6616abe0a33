//! Link models: seeded faults on one path, and rate-limited FIFO pipes.
//!
//! A path from the server to receiver `i` is: the server's egress [`Pipe`] (one serialization for the
//! whole group: multicast is one transmission), the switch's downlink pipe (every downlink carries the
//! same multicast stream at the same rate, so one pipe models them all), then the downlink's own
//! [`Faults`] and its propagation delay. A path back is the receiver's uplink pipe and faults, then the
//! server's ingress pipe, shared by all receivers (incast).
//!
//! Faults follow s2n-quic's testing network model: drop (Bernoulli, or Gilbert-Elliott bursts with the
//! same average rate), corrupt (1-3 flipped bits or replaced bytes), duplicate, and reorder (extra
//! random delay so later packets overtake).

use std::time::Duration;

use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::Time;

/// The faults one link injects.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FaultConfig {
    /// Average fraction of packets lost, in `[0, 1)`.
    pub loss: f64,
    /// Bursty loss: a Gilbert-Elliott channel with this mean burst length (in packets) and the same
    /// average loss rate. `None`: independent (Bernoulli) loss.
    pub burst: Option<f64>,
    /// Probability a delivered packet is delivered twice.
    pub duplicate: f64,
    /// Probability a packet gets an extra random delay in `0..=reorder_jitter` (so others overtake it).
    pub reorder: f64,
    /// The largest extra delay of a reordered packet.
    pub reorder_jitter: Duration,
    /// Probability a delivered packet has 1-3 bits flipped or bytes replaced.
    pub corrupt: f64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            loss: 0.0,
            burst: None,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_jitter: Duration::from_micros(100),
            corrupt: 0.0,
        }
    }
}

impl FaultConfig {
    /// True when this link never changes, drops, delays or copies a packet.
    pub fn is_perfect(&self) -> bool {
        self.loss == 0.0 && self.duplicate == 0.0 && self.reorder == 0.0 && self.corrupt == 0.0
    }
}

/// Up to three byte edits (XOR masks) applied to one delivered copy of a datagram. Kept apart from the
/// bytes so one shared multicast datagram can reach each receiver with its own damage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Corruption {
    n: u8,
    at: [u16; 3],
    xor: [u8; 3],
}

impl Corruption {
    /// No damage.
    pub const NONE: Corruption = Corruption { n: 0, at: [0; 3], xor: [0; 3] };

    /// True when this changes nothing.
    pub fn is_none(&self) -> bool {
        self.n == 0
    }

    /// Number of edits.
    pub fn edits(&self) -> usize {
        usize::from(self.n)
    }

    /// Draws 1-3 edits within a datagram of `len` bytes: each flips one bit or replaces a byte.
    pub fn random(rng: &mut impl Rng, len: usize) -> Corruption {
        let mut c = Corruption::NONE;
        if len == 0 {
            return c;
        }
        c.n = rng.random_range(1..=3u8);
        for i in 0..usize::from(c.n) {
            c.at[i] = rng.random_range(0..len.min(usize::from(u16::MAX))) as u16;
            c.xor[i] = if rng.random_bool(0.5) { 1 << rng.random_range(0..8u8) } else { rng.random_range(1..=255u8) };
        }
        c
    }

    /// Applies the edits to `buf` (a copy of the datagram).
    pub fn apply(&self, buf: &mut [u8]) {
        for i in 0..usize::from(self.n) {
            if let Some(b) = buf.get_mut(usize::from(self.at[i])) {
                *b ^= self.xor[i];
            }
        }
    }
}

/// What a link does to one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Lost.
    Lost,
    /// Delivered after the base delay plus `extra` nanoseconds, damaged by `corruption`; and, if
    /// `duplicate` is set, delivered a second time with its own extra delay and damage.
    Deliver {
        /// Extra delay (reordering jitter), nanoseconds.
        extra: u64,
        /// Damage to this copy.
        corruption: Corruption,
        /// A second copy.
        duplicate: Option<(u64, Corruption)>,
    },
}

impl Fate {
    /// An undamaged, undelayed, single delivery.
    pub const CLEAN: Fate = Fate::Deliver { extra: 0, corruption: Corruption::NONE, duplicate: None };
}

/// Counters of one link's faults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultStats {
    /// Packets offered.
    pub offered: u64,
    /// Packets lost.
    pub lost: u64,
    /// Copies delivered damaged.
    pub corrupted: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Copies delayed by reordering jitter.
    pub reordered: u64,
}

impl FaultStats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &FaultStats) {
        self.offered += other.offered;
        self.lost += other.lost;
        self.corrupted += other.corrupted;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
    }
}

/// One link's fault injector with its own random stream.
///
/// Bursty loss is a two-state Gilbert-Elliott channel (every packet is lost in the bad state, none in
/// the good one) that evolves in *time*: one step per packet slot (the time a full-size packet takes at
/// the link's rate). Back-to-back packets see bursts of the configured mean length; a sparse flow (an
/// uplink sending a request now and then) sees the same average loss, but a burst does not stretch over
/// its next dozen packets and seconds.
#[derive(Debug, Clone)]
pub struct Faults {
    config: FaultConfig,
    perfect: bool,
    /// Gilbert-Elliott: P(good -> bad) and P(bad -> good) per slot.
    p_gb: f64,
    p_bg: f64,
    bad: bool,
    slot_ns: u64,
    last: Option<Time>,
    jitter_ns: u64,
    rng: ChaCha8Rng,
    stats: FaultStats,
}

fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    if p <= 0.0 {
        return false;
    }
    // 53 random bits, as a float in [0, 1).
    ((rng.next_u64() >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < p
}

impl Faults {
    /// A link with `config` drawing from `rng`, whose burst channel steps once per `slot`.
    pub fn new(config: FaultConfig, mut rng: ChaCha8Rng, slot: Duration) -> Faults {
        let (p_gb, p_bg, bad) = match config.burst {
            Some(mean) if config.loss > 0.0 => {
                let mean = mean.max(1.0);
                let p_bg = 1.0 / mean;
                let p_gb = (config.loss * p_bg / (1.0 - config.loss)).min(1.0);
                // Start in the stationary distribution.
                let bad = chance(&mut rng, config.loss);
                (p_gb, p_bg, bad)
            }
            _ => (0.0, 0.0, false),
        };
        Faults {
            perfect: config.is_perfect(),
            jitter_ns: u64::try_from(config.reorder_jitter.as_nanos()).unwrap_or(u64::MAX),
            config,
            p_gb,
            p_bg,
            bad,
            slot_ns: u64::try_from(slot.as_nanos()).unwrap_or(u64::MAX).max(1),
            last: None,
            rng,
            stats: FaultStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &FaultStats {
        &self.stats
    }

    fn lost(&mut self, now: Time) -> bool {
        if self.config.loss <= 0.0 {
            return false;
        }
        if self.config.burst.is_some() {
            // Steps since the last packet: at least one per packet, more when the link sat idle.
            let steps = match self.last {
                Some(last) => (now.as_nanos().saturating_sub(last.as_nanos()) / self.slot_ns).max(1),
                None => 1,
            };
            self.last = Some(now);
            let p_bad = if steps == 1 {
                if self.bad {
                    1.0 - self.p_bg
                } else {
                    self.p_gb
                }
            } else {
                // n-step transition of the two-state chain: pi + (x - pi) * lambda^n.
                let pi = self.p_gb / (self.p_gb + self.p_bg);
                let lambda = 1.0 - self.p_gb - self.p_bg;
                let decay = lambda.powi(steps.min(1 << 20) as i32);
                if self.bad {
                    pi + (1.0 - pi) * decay
                } else {
                    pi * (1.0 - decay)
                }
            };
            self.bad = chance(&mut self.rng, p_bad);
            self.bad
        } else {
            chance(&mut self.rng, self.config.loss)
        }
    }

    fn copy(&mut self, len: usize) -> (u64, Corruption) {
        let extra = if chance(&mut self.rng, self.config.reorder) {
            self.stats.reordered += 1;
            self.rng.random_range(0..=self.jitter_ns)
        } else {
            0
        };
        let corruption = if chance(&mut self.rng, self.config.corrupt) {
            self.stats.corrupted += 1;
            Corruption::random(&mut self.rng, len)
        } else {
            Corruption::NONE
        };
        (extra, corruption)
    }

    /// Decides what happens to the next packet (of `len` bytes), entering the link at `now`.
    pub fn fate(&mut self, now: Time, len: usize) -> Fate {
        self.stats.offered += 1;
        if self.perfect {
            return Fate::CLEAN;
        }
        if self.lost(now) {
            self.stats.lost += 1;
            return Fate::Lost;
        }
        let (extra, corruption) = self.copy(len);
        let duplicate = if chance(&mut self.rng, self.config.duplicate) {
            self.stats.duplicated += 1;
            Some(self.copy(len))
        } else {
            None
        };
        Fate::Deliver { extra, corruption, duplicate }
    }
}

/// Bytes a datagram occupies on an Ethernet wire besides its UDP payload: IPv4 and UDP headers (28),
/// Ethernet header and FCS (18), preamble and inter-frame gap (20).
pub const WIRE_OVERHEAD: usize = 66;

/// A rate-limited FIFO: packets are serialized one after another at `rate`; a packet that would find
/// more than `queue_limit` bytes waiting is dropped at the tail (congestion loss).
#[derive(Debug, Clone)]
pub struct Pipe {
    /// Picoseconds per byte (0: infinitely fast).
    ps_per_byte: u64,
    queue_limit: u64,
    /// When the last queued byte has left, picoseconds.
    busy_until_ps: u64,
    stats: PipeStats,
}

/// Counters of one pipe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PipeStats {
    /// Packets that went through.
    pub packets: u64,
    /// Their bytes on the wire (overhead included).
    pub wire_bytes: u64,
    /// Packets dropped at the tail of a full queue.
    pub dropped: u64,
    /// Most bytes ever waiting.
    pub max_backlog: u64,
}

impl Pipe {
    /// A pipe at `rate_bps` bits per second (None: unlimited) holding at most `queue_limit` bytes.
    pub fn new(rate_bps: Option<u64>, queue_limit: u64) -> Pipe {
        let ps_per_byte = match rate_bps {
            Some(r) if r > 0 => (8_000_000_000_000u64 / r).max(1),
            _ => 0,
        };
        Pipe { ps_per_byte, queue_limit, busy_until_ps: 0, stats: PipeStats::default() }
    }

    /// Offers a datagram of `len` payload bytes at `now`; returns when its last bit has left, or None
    /// when the queue is full and it was dropped.
    pub fn send(&mut self, now: Time, len: usize) -> Option<Time> {
        let wire = (len + WIRE_OVERHEAD) as u64;
        if self.ps_per_byte == 0 {
            self.stats.packets += 1;
            self.stats.wire_bytes += wire;
            return Some(now);
        }
        let now_ps = now.as_nanos().saturating_mul(1000);
        let start = self.busy_until_ps.max(now_ps);
        let backlog = (start - now_ps) / self.ps_per_byte;
        if backlog + wire > self.queue_limit && backlog > 0 {
            self.stats.dropped += 1;
            return None;
        }
        self.stats.max_backlog = self.stats.max_backlog.max(backlog + wire);
        self.busy_until_ps = start + wire * self.ps_per_byte;
        self.stats.packets += 1;
        self.stats.wire_bytes += wire;
        Some(Time::from_nanos(self.busy_until_ps.div_ceil(1000)))
    }

    /// The counters.
    pub fn stats(&self) -> &PipeStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::rng::{self, Domain};

    const SLOT: Duration = Duration::from_nanos(1000);

    /// `n` packets `gap` nanoseconds apart.
    fn run_spaced(config: FaultConfig, n: usize, gap: u64) -> (FaultStats, Vec<bool>) {
        let mut f = Faults::new(config, rng::stream(1, Domain::Downlink, 0), SLOT);
        let lost = (0..n as u64).map(|i| f.fate(Time::from_nanos(i * gap), 1000) == Fate::Lost).collect();
        (*f.stats(), lost)
    }

    fn run(config: FaultConfig, n: usize) -> (FaultStats, Vec<bool>) {
        run_spaced(config, n, 1000)
    }

    #[test]
    fn bernoulli_loss_rate() {
        let (s, _) = run(FaultConfig { loss: 0.05, ..Default::default() }, 200_000);
        let rate = s.lost as f64 / s.offered as f64;
        assert!((rate - 0.05).abs() < 0.003, "{rate}");
    }

    #[test]
    fn gilbert_elliott_rate_and_burst_length() {
        let (s, lost) = run(FaultConfig { loss: 0.05, burst: Some(4.0), ..Default::default() }, 400_000);
        let rate = s.lost as f64 / s.offered as f64;
        assert!((rate - 0.05).abs() < 0.006, "{rate}");
        let bursts = lost.windows(2).filter(|w| w[1] && !w[0]).count();
        let mean = s.lost as f64 / bursts as f64;
        assert!((mean - 4.0).abs() < 0.4, "mean burst {mean}");
    }

    #[test]
    fn gilbert_elliott_sparse_traffic_keeps_the_rate_but_not_the_bursts() {
        // Packets 50 slots apart: the same average loss, and runs of losses are short.
        let cfg = FaultConfig { loss: 0.05, burst: Some(4.0), ..Default::default() };
        let (s, lost) = run_spaced(cfg, 200_000, 50_000);
        let rate = s.lost as f64 / s.offered as f64;
        assert!((rate - 0.05).abs() < 0.005, "{rate}");
        let bursts = lost.windows(2).filter(|w| w[1] && !w[0]).count();
        let mean = s.lost as f64 / bursts as f64;
        assert!(mean < 1.3, "mean burst {mean}");
        // Back-to-back packets at the same instant still see bursts.
        let (s, lost) = run_spaced(cfg, 200_000, 0);
        let bursts = lost.windows(2).filter(|w| w[1] && !w[0]).count();
        assert!((s.lost as f64 / bursts as f64 - 4.0).abs() < 0.5);
    }

    #[test]
    fn perfect_link_draws_nothing() {
        let (s, lost) = run(FaultConfig::default(), 1000);
        assert_eq!(s.lost, 0);
        assert!(lost.iter().all(|l| !l));
    }

    #[test]
    fn corruption_duplication_reordering() {
        let cfg = FaultConfig { corrupt: 0.1, duplicate: 0.1, reorder: 0.1, ..Default::default() };
        let mut f = Faults::new(cfg, rng::stream(2, Domain::Uplink, 5), SLOT);
        let (mut corrupted, mut dups, mut delayed) = (0, 0, 0);
        for _ in 0..20_000 {
            match f.fate(Time::ZERO, 1472) {
                Fate::Lost => panic!("no loss configured"),
                Fate::Deliver { extra, corruption, duplicate } => {
                    if !corruption.is_none() {
                        corrupted += 1;
                        let mut buf = vec![0u8; 1472];
                        corruption.apply(&mut buf);
                        let changed = buf.iter().filter(|&&b| b != 0).count();
                        assert!(changed <= corruption.edits(), "{changed} bytes changed");
                    }
                    if extra > 0 {
                        delayed += 1;
                        assert!(extra <= 100_000);
                    }
                    dups += usize::from(duplicate.is_some());
                }
            }
        }
        for (n, what) in [(corrupted, "corrupted"), (dups, "duplicated"), (delayed, "delayed")] {
            assert!((1700..2400).contains(&n), "{what}: {n}");
        }
    }

    #[test]
    fn pipe_serializes_and_tail_drops() {
        // 1 Gbit/s: 8 ns per byte; a 1000-byte datagram is 1066 wire bytes = 8528 ns.
        let mut p = Pipe::new(Some(1_000_000_000), 4 * 1066);
        let t0 = Time::ZERO;
        assert_eq!(p.send(t0, 1000), Some(Time::from_nanos(8528)));
        assert_eq!(p.send(t0, 1000), Some(Time::from_nanos(2 * 8528)));
        assert_eq!(p.send(t0, 1000), Some(Time::from_nanos(3 * 8528)));
        assert_eq!(p.send(t0, 1000), Some(Time::from_nanos(4 * 8528)));
        assert_eq!(p.send(t0, 1000), None, "queue full");
        assert_eq!(p.stats().dropped, 1);
        // Once drained, a packet goes straight through.
        let later = Time::from_nanos(1_000_000);
        assert_eq!(p.send(later, 1000), Some(Time::from_nanos(1_000_000 + 8528)));
        // Unlimited pipes add no delay.
        let mut u = Pipe::new(None, 0);
        assert_eq!(u.send(later, 9000), Some(later));
    }
}
