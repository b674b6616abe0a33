//! The server's congestion controller (PROTOCOL.md section 11.1).
//!
//! Multicast congestion control after PGMCC and TFMCC (RFC 4654): the group's rate follows the
//! worst receiver. Every receiver reports, in each Status, its count of loss events (losses at
//! least a round trip apart), its receive rate and an echo of the latest Clock, which gives the
//! server its round-trip time. The server runs one TCP-like controller, in rate form, on the
//! union of those signals, so that the session takes from the slowest receiver's bottleneck what
//! a TCP flow would:
//!
//! * **slow start**: the rate doubles every round trip while the server sends as fast as the rate
//!   lets it, but never beyond twice the lowest receive rate (a path that delivers less than half
//!   of what is sent is overrun); it ends at a loss event, or at the lowest receive rate once the
//!   smoothed round trip of a receiver grows by [`SLOW_START_DELAY`] over its least sample (a
//!   queue is building on its path: HyStart++'s delay exit, RFC 9406, which spares the overflow
//!   that a loss exit costs);
//! * **congestion avoidance: CUBIC** (RFC 9438) in rate form: a loss event at any receiver that
//!   counts multiplies the rate by [`BETA`] (once per round trip), and between losses the rate
//!   follows the cubic curve of the window `rate × RTT / datagram` towards and past the rate of
//!   the last loss, never slower than Reno would (RFC 9438's Reno-friendly region). The round
//!   trip is the largest smoothed one among the receivers that count at the last loss, queueing
//!   included, and stays fixed until the next: a rate recomputed from every new smoothed round
//!   trip swung with the queue it built itself (measured in the simulator: a 1 ms path behind a
//!   50 ms queue took 8.9 s for an image the uncontrolled push sent in 5.0 s);
//! * **a floor: TFMCC's equation.** The rate never falls below the lowest, over the receivers that
//!   count, of the TCP throughput equation (RFC 5348 section 3.1) of the receiver's loss event rate
//!   (measured here from its loss event counts, TFRC's average loss interval) and its round trip:
//!   what a TCP Reno flow would get on that path. Random loss on a short path (2% on a LAN) costs
//!   CUBIC's multiplicative decrease a loss event every few round trips; the equation keeps the
//!   rate TCP would keep. (`bench line-rate` at 2% loss, one run each: 16.7, 28.2 and 35.0% of
//!   the link at 1, 4 and 16 hosts with CUBIC alone, 25.4, 55.5 and 47.8% with the floor, against
//!   80-83, 87-88 and 75-76% uncontrolled: loss-based control still pays for random loss.)
//!
//! The equation alone (TFMCC) was tried first and measured: beside one CUBIC flow through a
//! 50 ms tbf queue it kept 1.6-4.5% of the link (`bench line-rate --modes cc-tcp`), because
//! after a congestion episode it grows by about one datagram per round trip per round trip and
//! the queue's round trip is long.
//!
//! The server only grows the rate while it is not data-limited (it sent at least
//! [`DATA_LIMITED_BELOW`] of the rate since the last update): a server with little to send (demand
//! only, or a push held by flow control) must not build up a rate it never tried.

use std::time::Duration;

use crate::Time;

/// The lowest rate, bytes per second: demand still moves on a badly congested path.
pub const MIN_RATE: f64 = 64.0 * 1024.0;
/// Slow start ends once the round trip exceeds the least seen by an eighth of it, clamped to
/// these (HyStart++'s thresholds, RFC 9406 section 4.2).
pub const SLOW_START_DELAY: (Duration, Duration) = (Duration::from_millis(4), Duration::from_millis(16));
/// CUBIC's multiplicative decrease (RFC 9438 section 4.6).
pub const BETA: f64 = 0.7;
/// CUBIC's constant C, in datagrams per second cubed (RFC 9438 section 5).
const CUBIC_C: f64 = 0.4;
/// Rate updates are at least this far apart (Status from many receivers arrive together).
const MIN_UPDATE_GAP: Duration = Duration::from_micros(500);
/// The server counts as data-limited when it sent less than this fraction of its rate since the
/// last update.
const DATA_LIMITED_BELOW: f64 = 0.5;
/// Clocks are at least this far apart ...
const MIN_CLOCK_GAP: Duration = Duration::from_millis(1);
/// ... and at most this.
const MAX_CLOCK_GAP: Duration = Duration::from_millis(25);

/// What the controller needs of one receiver that counts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Feedback {
    /// Its smoothed round-trip time, if measured.
    pub rtt: Option<Duration>,
    /// Its least round-trip sample, if measured.
    pub min_rtt: Option<Duration>,
    /// Its receive rate, bytes per second (0: not reported).
    pub receive_rate: f64,
    /// Its loss event rate (0: not known yet).
    pub loss_event_rate: f64,
}

/// The throughput, bytes per second, of a TCP flow with segments of `s` bytes, round-trip time
/// `rtt` and loss event rate `p` (RFC 5348 section 3.1, with b = 1 and t_RTO = 4 R).
/// Infinite when `p` is 0.
pub fn tcp_rate(s: f64, rtt: Duration, p: f64) -> f64 {
    if p <= 0.0 {
        return f64::INFINITY;
    }
    let r = rtt.as_secs_f64().max(1e-6);
    let t_rto = 4.0 * r;
    s / (r * (2.0 * p / 3.0).sqrt() + t_rto * (3.0 * (3.0 * p / 8.0).sqrt()) * p * (1.0 + 32.0 * p * p))
}

/// CUBIC's state between two losses.
#[derive(Debug, Clone, Copy)]
struct Epoch {
    /// When it began (the last reduction), moved forward while the server is data-limited.
    start: Time,
    /// The window before the last reduction, datagrams.
    w_max: f64,
    /// When the curve reaches `w_max` again, seconds after `start`.
    k: f64,
    /// The round trip that turns windows into rates during this epoch, seconds.
    rtt: f64,
}

/// The rate controller.
#[derive(Debug)]
pub(super) struct Controller {
    rate: f64,
    cap: f64,
    /// None: slow start.
    epoch: Option<Epoch>,
    /// When the rate was last reduced for a loss.
    reduced_at: Option<Time>,
    updated_at: Time,
    sent_since: u64,
    /// The largest round-trip time among the receivers that count (the hint until measured).
    max_rtt: Duration,
    next_clock: Time,
    /// Datagram size the window counts in.
    segment: f64,
}

impl Controller {
    /// A controller starting, as TCP does, at about four datagrams per round trip.
    pub fn new(now: Time, rtt_hint: Duration, segment: usize, cap: Option<u64>) -> Controller {
        let rtt = rtt_hint.max(Duration::from_micros(20));
        let cap = cap.map_or(f64::INFINITY, |c| c as f64);
        let initial = (4.0 * segment as f64 / rtt.as_secs_f64()).clamp(MIN_RATE, cap.max(MIN_RATE));
        Controller {
            rate: initial,
            cap,
            epoch: None,
            reduced_at: None,
            updated_at: now,
            sent_since: 0,
            max_rtt: rtt,
            next_clock: now,
            segment: segment as f64,
        }
    }

    /// The rate to pace at now, bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate.max(1.0) as u64
    }

    /// The round trip receivers should group losses by.
    pub fn max_rtt(&self) -> Duration {
        self.max_rtt
    }

    /// True until the first loss event or delay exit.
    #[cfg(test)]
    pub fn in_slow_start(&self) -> bool {
        self.epoch.is_none()
    }

    /// Counts a datagram sent.
    pub fn on_sent(&mut self, len: usize) {
        self.sent_since += len as u64;
    }

    /// Whether a Clock is due at `now`; if so, schedules the next one.
    pub fn clock_due(&mut self, now: Time) -> bool {
        if now < self.next_clock {
            return false;
        }
        self.next_clock = now + (self.max_rtt / 2).clamp(MIN_CLOCK_GAP, MAX_CLOCK_GAP);
        true
    }

    fn clamp(&self, rate: f64) -> f64 {
        rate.clamp(MIN_RATE, self.cap.max(MIN_RATE))
    }

    fn window(&self, rate: f64) -> f64 {
        rate * self.max_rtt.as_secs_f64() / self.segment
    }

    /// Starts a CUBIC epoch at `now` from window `w_max` (the window before the reduction).
    fn begin_epoch(&mut self, now: Time, w_max: f64, reduced: bool) {
        let k = if reduced { (w_max * (1.0 - BETA) / CUBIC_C).cbrt() } else { 0.0 };
        self.epoch = Some(Epoch { start: now, w_max, k, rtt: self.max_rtt.as_secs_f64() });
    }

    /// Takes feedback: `new_loss` when the Status that prompted it reported a new loss event, and
    /// the receivers that count (`fallback_rtt` for those not yet measured). Returns the new rate
    /// if it was recomputed.
    pub fn update(
        &mut self,
        now: Time,
        fallback_rtt: Duration,
        members: impl Iterator<Item = Feedback>,
        new_loss: bool,
    ) -> Option<u64> {
        let mut changed = false;
        if new_loss && self.reduced_at.is_none_or(|t| now >= t + self.max_rtt) {
            // One reduction per round trip: the other receivers' reports of the same episode
            // arrive within it. Fast convergence (RFC 9438 section 4.7): a window that did not
            // regain the last maximum gives up some of it.
            let w = self.window(self.rate);
            let w_max = match self.epoch {
                Some(e) if self.rate < e.w_max * self.segment / e.rtt => w * (1.0 + BETA) / 2.0,
                _ => w,
            };
            self.rate = self.clamp(self.rate * BETA);
            self.reduced_at = Some(now);
            self.begin_epoch(now, w_max, true);
            changed = true;
        }
        if now < self.updated_at + MIN_UPDATE_GAP {
            return changed.then(|| self.rate());
        }
        let dt = now - self.updated_at;
        let data_limited = (self.sent_since as f64) < DATA_LIMITED_BELOW * self.rate * dt.as_secs_f64();
        let (mut min_receive, mut max_rtt, mut queue_building, mut floor, mut any) =
            (f64::INFINITY, Duration::ZERO, false, f64::INFINITY, false);
        for m in members {
            any = true;
            max_rtt = max_rtt.max(m.rtt.unwrap_or(fallback_rtt));
            // HyStart++ per receiver: its round trip against its own least (paths differ: one
            // may sit behind another flow's standing queue from the start).
            if let (Some(rtt), Some(base)) = (m.rtt, m.min_rtt) {
                queue_building |= rtt > base + (base / 8).clamp(SLOW_START_DELAY.0, SLOW_START_DELAY.1);
            }
            floor = floor.min(tcp_rate(self.segment, m.rtt.unwrap_or(fallback_rtt), m.loss_event_rate));
            if m.receive_rate > 0.0 {
                min_receive = min_receive.min(m.receive_rate);
            }
        }
        if !any {
            return changed.then(|| self.rate());
        }
        self.updated_at = now;
        self.sent_since = 0;
        self.max_rtt = max_rtt.max(Duration::from_micros(20));
        let r = self.max_rtt.as_secs_f64();
        let mut rate = self.rate;
        match self.epoch {
            None if queue_building => {
                // HyStart: a queue builds. Leave slow start at what the path delivers.
                if min_receive.is_finite() {
                    rate = rate.min(min_receive);
                }
                let w = self.window(rate);
                self.begin_epoch(now, w, false);
            }
            None => {
                // Growth needs evidence: never more than twice what the slowest receiver is
                // getting, so nothing before the first receive rate.
                if !data_limited && min_receive.is_finite() {
                    rate = (rate * (1.0 + (dt.as_secs_f64() / r).min(1.0))).min(2.0 * min_receive);
                }
            }
            Some(mut e) => {
                if data_limited {
                    // The curve waits while the server has too little to send.
                    e.start += dt;
                    self.epoch = Some(e);
                } else {
                    let t = (now - e.start).as_secs_f64() + e.rtt;
                    let cubic = CUBIC_C * (t - e.k).powi(3) + e.w_max;
                    let reno = e.w_max * BETA + 3.0 * (1.0 - BETA) / (1.0 + BETA) * t / e.rtt;
                    let target = cubic.max(reno) * self.segment / e.rtt;
                    // At most 1.5 times per round trip (RFC 9438 section 4.2's cap on growth).
                    rate = target.min(rate * (1.0 + 0.5 * (dt.as_secs_f64() / r).min(1.0)));
                }
            }
        }
        if self.epoch.is_some() && floor.is_finite() {
            rate = rate.max(floor);
        }
        self.rate = self.clamp(rate);
        tracing::trace!(
            floor,
            at_ms = (now - Time::ZERO).as_secs_f64() * 1e3,
            rate = self.rate,
            min_receive,
            rtt_us = self.max_rtt.as_micros() as u64,
            slow_start = self.epoch.is_none(),
            data_limited,
            "congestion control update"
        );
        Some(self.rate())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn at(ms: u64) -> Time {
        Time::from_nanos(ms * 1_000_000)
    }

    fn fb(rtt_ms: u64, recv: f64) -> std::iter::Once<Feedback> {
        std::iter::once(Feedback {
            rtt: Some(Duration::from_millis(rtt_ms)),
            min_rtt: Some(Duration::from_millis(rtt_ms.min(10))),
            receive_rate: recv,
            loss_event_rate: 0.0,
        })
    }

    #[test]
    fn slow_start_doubles_per_round_trip_only_while_the_server_is_not_data_limited() {
        let mut c = Controller::new(at(0), 10 * MS, 1472, None);
        let r0 = c.rate() as f64;
        assert!((r0 - 4.0 * 1472.0 / 0.01).abs() < 1.0, "{r0}");
        // Data-limited (nothing sent): the rate stays.
        c.update(at(10), 10 * MS, fb(10, 0.0), false);
        assert_eq!(c.rate() as f64, r0);
        // Without a receive rate there is no evidence to grow on.
        c.on_sent((r0 * 0.01) as usize);
        c.update(at(20), 10 * MS, fb(10, 0.0), false);
        assert_eq!(c.rate() as f64, r0);
        // Sending at the rate for a round trip doubles it.
        c.on_sent((r0 * 0.01) as usize);
        c.update(at(30), 10 * MS, fb(10, r0), false);
        assert!((c.rate() as f64 / r0 - 2.0).abs() < 0.01, "{}", c.rate());
        assert!(c.in_slow_start());
        // A receiver getting a quarter of the rate caps it at twice that.
        let r1 = c.rate() as f64;
        c.on_sent((r1 * 0.01) as usize);
        c.update(at(40), 10 * MS, fb(10, r1 / 4.0), false);
        assert!((c.rate() as f64 - r1 / 2.0).abs() < 2.0, "{} vs {}", c.rate(), r1 / 2.0);
    }

    #[test]
    fn a_growing_round_trip_ends_slow_start_at_the_receive_rate() {
        let mut c = Controller::new(at(0), 10 * MS, 1472, None);
        c.update(at(10), 10 * MS, fb(10, 0.0), false);
        c.on_sent(1 << 20);
        c.update(at(20), 10 * MS, fb(16, 300_000.0), false);
        assert!(!c.in_slow_start());
        assert_eq!(c.rate(), 300_000);
    }

    #[test]
    fn a_loss_event_cuts_the_rate_once_per_round_trip_and_cubic_regains_it() {
        let mut c = Controller::new(at(0), 10 * MS, 1472, None);
        let r0 = c.rate() as f64;
        c.update(at(1), 10 * MS, fb(10, 1e9), true);
        assert_eq!(c.rate(), (r0 * BETA) as u64);
        assert!(!c.in_slow_start());
        // A second report of the same episode within the round trip changes nothing.
        c.update(at(5), 10 * MS, fb(10, 1e9), true);
        assert_eq!(c.rate(), (r0 * BETA) as u64);
        // Sending at the rate, the window comes back to its old maximum in about K seconds.
        let w_max = r0 * 0.01 / 1472.0;
        let k = (w_max * (1.0 - BETA) / CUBIC_C).cbrt();
        let mut t: u64 = 5;
        while (t as f64) < (k * 1000.0 + 200.0) {
            t += 5;
            c.on_sent((c.rate() as f64 * 0.005) as usize + 1);
            c.update(at(t), 10 * MS, fb(10, 1e9), false);
        }
        assert!(c.rate() as f64 > r0 * 0.99, "{} after {t} ms vs {r0}", c.rate());
        // A cap holds.
        let mut capped = Controller::new(at(0), MS, 1472, Some(100_000));
        capped.on_sent(1 << 20);
        capped.update(at(10), MS, fb(1, 1e9), false);
        assert_eq!(capped.rate(), 100_000);
    }

    #[test]
    fn the_equation_is_a_floor_after_slow_start() {
        let s = 1472.0;
        assert!(tcp_rate(s, MS, 0.0).is_infinite());
        // RFC 5348's figure: about 164 kB/s for 1460-byte segments, 100 ms and 1% loss.
        let x = tcp_rate(1460.0, 100 * MS, 0.01);
        assert!((150_000.0..180_000.0).contains(&x), "{x}");
        assert!(tcp_rate(s, 10 * MS, 0.01) > tcp_rate(s, 20 * MS, 0.01));
        let mut c = Controller::new(at(0), MS, 1472, None);
        c.update(at(1), MS, fb(1, 1e9), true);
        let floor = tcp_rate(s, MS, 0.02);
        let lossy = Feedback { rtt: Some(MS), min_rtt: Some(MS), receive_rate: 1e9, loss_event_rate: 0.02 };
        for t in 0..20 {
            c.on_sent(1 << 20);
            c.update(at(3 + 2 * t), MS, std::iter::once(lossy), true);
        }
        assert!(c.rate() as f64 >= floor * 0.999, "{} below the equation's {floor}", c.rate());
    }
}
