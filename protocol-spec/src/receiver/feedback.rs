//! What a receiver tells the server for congestion control (PROTOCOL.md section 11.1): how many loss
//! events it has seen, the rate at which stream data reaches it, and the server's clock echoed back.

use std::collections::VecDeque;
use std::time::Duration;

use crate::Time;

/// A receive-rate sample spans at least this long and a round trip (a Status sooner keeps the
/// previous figure): a daemon that shares its CPU takes datagrams in bursts, and a shorter sample
/// would see those bursts, not the path (`bench line-rate`, 16 hosts on 2 cores: 1 ms samples
/// swung between 1 and 13 MB/s on a 12.5 MB/s path).
const MIN_RATE_SPAN: Duration = Duration::from_millis(10);

/// Losses closer together than this are one loss event when the server has not said its round
/// trip yet.
const DEFAULT_EVENT_GAP: Duration = Duration::from_micros(100);

/// A position found missing counts as lost only if it is still missing this long after (and a
/// quarter of the round trip, as RACK waits, RFC 8985): a datagram that merely arrives late is
/// no loss. Measured in `bench line-rate` beside a TCP flow: 142 of 49,155 Data packets arrived
/// after a later one (the lab's veth hands packets to whichever CPU's backlog the sender runs
/// on), and counted as losses they cut the rate 21 times in 35 s with no drop anywhere.
const REORDER_GRACE: Duration = Duration::from_millis(1);

/// The congestion feedback of one receiver.
#[derive(Debug, Default)]
pub(super) struct Feedback {
    /// Loss events seen (wrapping, as on the wire).
    loss_events: u32,
    /// When the current loss event began.
    event_at: Option<Time>,
    /// When the count of positions found missing grew, and to what (the last `reorder_grace`).
    marks: VecDeque<(Time, u64)>,
    /// Positions found missing before the grace window.
    old_missing: u64,
    /// Of them, counted lost so far.
    lost: u64,
    /// Stream bytes received (Data and Repair), for the receive rate.
    bytes: u64,
    /// Where the current receive-rate sample began: (when, `bytes` then).
    rate_from: Option<(Time, u64)>,
    /// The latest receive rate, bytes per second.
    rate: f64,
    /// The latest Clock: its timestamp and when it arrived.
    echo: Option<(u64, Time)>,
    /// The round-trip time the server announced (loss events are at least that far apart).
    rtt: Duration,
}

impl Feedback {
    /// Counts `len` bytes of stream data (Data or Repair) received.
    pub fn take_bytes(&mut self, len: usize) {
        self.bytes += len as u64;
    }

    /// Takes the stream's counts so far (after a datagram): positions found missing, and late
    /// datagrams that filled such a position. Returns true when a new loss event began: a loss
    /// (a position still missing [`REORDER_GRACE`] after it was found missing) at least a round
    /// trip after the last event began (RFC 5348 section 5.2: the losses of one congestion
    /// episode are one event).
    pub fn take_missing(&mut self, now: Time, missing: u64, late: u64) -> bool {
        if self.marks.back().is_none_or(|&(_, m)| missing > m) && missing > self.old_missing {
            self.marks.push_back((now, missing));
        }
        let grace = REORDER_GRACE.max(self.rtt / 4);
        while let Some(&(t, m)) = self.marks.front() {
            if now < t + grace {
                break;
            }
            self.old_missing = m;
            self.marks.pop_front();
        }
        let lost = self.old_missing.saturating_sub(late);
        let new = lost > self.lost;
        self.lost = self.lost.max(lost);
        if !new || self.event_at.is_some_and(|t| now < t + self.event_gap()) {
            return false;
        }
        self.event_at = Some(now);
        self.loss_events = self.loss_events.wrapping_add(1);
        true
    }

    /// Takes a Clock.
    pub fn take_clock(&mut self, now: Time, timestamp_us: u64, rtt_us: u32) {
        self.echo = Some((timestamp_us, now));
        self.rtt = Duration::from_micros(u64::from(rtt_us));
    }

    /// Whether a Clock has arrived: the server runs congestion control.
    pub fn clock_seen(&self) -> bool {
        self.echo.is_some()
    }

    /// Whether stream data arrived since the last Status.
    pub fn took_data_since_status(&self) -> bool {
        self.rate_from.is_none_or(|(_, b)| self.bytes > b)
    }

    fn event_gap(&self) -> Duration {
        if self.rtt.is_zero() {
            DEFAULT_EVENT_GAP
        } else {
            self.rtt
        }
    }

    /// The fields of a Status sent at `now`: (echo, echo delay µs, loss events, receive rate
    /// KiB/s). Starts a new receive-rate sample when the current one is long enough.
    pub fn status_fields(&mut self, now: Time) -> (u64, u32, u32, u32) {
        match self.rate_from {
            Some((t, b)) if now >= t + MIN_RATE_SPAN.max(self.rtt) => {
                self.rate = (self.bytes - b) as f64 / (now - t).as_secs_f64();
                self.rate_from = Some((now, self.bytes));
            }
            Some(_) => {}
            None => self.rate_from = Some((now, self.bytes)),
        }
        let (echo, delay) = match self.echo {
            Some((ts, at)) => (ts, u32::try_from((now - at).as_micros()).unwrap_or(u32::MAX)),
            None => (0, 0),
        };
        let kib = (self.rate / 1024.0).round().min(f64::from(u32::MAX)) as u32;
        (echo, delay, self.loss_events, kib)
    }

    /// Forgets the stream's counters (the server restarted; its stream starts again). The loss
    /// event count goes on: the server compares it with the last one it saw.
    pub fn reset_stream(&mut self) {
        self.marks.clear();
        (self.old_missing, self.lost) = (0, 0);
        self.event_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn losses_within_a_round_trip_are_one_event() {
        let t = |us: u64| Time::from_nanos(us * 1000);
        let mut f = Feedback::default();
        f.take_clock(t(0), 1, 4000);
        assert!(!f.take_missing(t(10), 0, 0));
        assert!(!f.take_missing(t(20), 3, 0), "not yet lost: it may be late");
        assert!(f.take_missing(t(1100), 3, 0), "still missing after the grace: the first event");
        assert!(!f.take_missing(t(1500), 5, 0));
        assert!(!f.take_missing(t(2600), 5, 0), "within a round trip of the first: the same event");
        assert!(!f.take_missing(t(3000), 6, 1), "one late arrival makes up for it");
        assert!(!f.take_missing(t(4100), 6, 1), "nothing new lost");
        assert!(!f.take_missing(t(5000), 7, 1));
        assert!(f.take_missing(t(6100), 7, 1), "a round trip later, a new event");
        assert_eq!(f.status_fields(t(6200)).2, 2);
        f.reset_stream();
        assert!(!f.take_missing(t(6300), 1, 0));
        assert!(f.take_missing(t(7400), 1, 0), "a new stream's first loss");
    }

    #[test]
    fn the_receive_rate_spans_at_least_its_minimum() {
        let t = |ms: u64| Time::from_nanos(ms * 1_000_000);
        let mut f = Feedback::default();
        f.status_fields(t(0));
        f.take_bytes(1_000_000);
        assert_eq!(f.status_fields(t(5)).3, 0, "5 ms is too short a sample");
        assert_eq!(f.status_fields(t(10)).3, (100_000_000.0f64 / 1024.0).round() as u32);
    }
}
