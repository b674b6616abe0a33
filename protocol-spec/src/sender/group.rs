//! The group: which receivers are live, what they report, and how much proactive parity their loss
//! rates call for.

use std::collections::HashMap;
use std::time::Duration;

use crate::replay::ReplayWindow;
use crate::wire::{NodeId, NO_STREAM};
use crate::Time;

/// What the server knows of one receiver.
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub last_heard: Time,
    pub loss_ppm: Option<u32>,
    pub stream_start: u64,
    /// Flow control: the receiver's Received Through (the sender's next position when it joined,
    /// until its first Status) and its window (None until its first Status).
    pub received_through: u64,
    pub window: Option<u32>,
    /// When its last Status came (when it joined, before its first).
    pub reported_at: Time,
    /// Its last Status said it holds every page: the push cannot help it, so it does not hold the
    /// push back.
    pub complete: bool,
    /// Some Status of it said so (it is told once, in [`Group::status`]).
    pub ever_complete: bool,
    pub replay: ReplayWindow,
    /// Congestion feedback (PROTOCOL.md 11.1): smoothed round-trip time from Clock echoes, the
    /// loss event count and the receive rate of its last Status.
    pub srtt: Option<Duration>,
    /// The least round-trip sample (its path without queueing).
    pub min_rtt: Option<Duration>,
    pub loss_events: Option<u32>,
    pub receive_rate: f64,
    /// Stream positions between its recent loss events (newest first), and its Highest Seen at
    /// the last one: its loss event rate, measured here (TFRC's average loss interval).
    pub loss_intervals: Vec<f64>,
    pub seen_at_event: Option<u64>,
    /// Highest Seen of its last Status.
    pub highest_seen: u64,
}

impl Member {
    /// Positions it has seen since its last loss event (0 before its first).
    fn open_interval(&self) -> f64 {
        match (self.seen_at_event, self.highest_seen) {
            (Some(a), b) if b != NO_STREAM => b.saturating_sub(a) as f64,
            _ => 0.0,
        }
    }

    /// Where the push must stop for this member, if it counts (see [`Group::push_limit`]).
    fn limit(&self, now: Time, p: &FlowParams) -> Option<u64> {
        (now < self.reported_at + p.timeout && !self.complete).then(|| {
            self.received_through.saturating_add(u64::from(self.window.unwrap_or(p.initial_window).max(p.min_window)))
        })
    }
}

/// How members count in the push window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FlowParams {
    /// A member whose last Status is older stops counting.
    pub timeout: Duration,
    /// The window of a member that has not reported one.
    pub initial_window: u32,
    /// Smaller reported windows count as this.
    pub min_window: u32,
}

/// The push limit as last computed: valid until a member that counted stops counting, and kept up
/// to date by Status messages, so that the per-datagram check costs O(1), not O(receivers).
#[derive(Debug, Clone, Copy)]
struct LimitCache {
    params: FlowParams,
    limit: u64,
    argmin: Option<NodeId>,
    valid_until: Time,
}

/// The live receivers.
#[derive(Debug, Default)]
pub(super) struct Group {
    members: HashMap<NodeId, Member>,
    /// Cached loss histogram: (loss rate, receivers at that rate); rebuilt when reports change.
    histogram: Vec<(f64, u32)>,
    dirty: bool,
    limit: std::cell::Cell<Option<LimitCache>>,
}

impl Group {
    /// The member for `node`, created if new (with `next_seq` as its position until it reports
    /// one); the bool says whether it was new.
    pub fn touch(&mut self, node: NodeId, now: Time, next_seq: u64) -> (&mut Member, bool) {
        let mut joined = false;
        let m = self.members.entry(node).or_insert_with(|| {
            joined = true;
            Member {
                last_heard: now,
                loss_ppm: None,
                stream_start: NO_STREAM,
                received_through: next_seq,
                window: None,
                reported_at: now,
                complete: false,
                ever_complete: false,
                replay: ReplayWindow::default(),
                srtt: None,
                min_rtt: None,
                loss_events: None,
                receive_rate: 0.0,
                loss_intervals: Vec::new(),
                seen_at_event: None,
                highest_seen: NO_STREAM,
            }
        });
        if joined {
            self.dirty = true;
            if let Some(mut c) = self.limit.get() {
                if let Some(l) = m.limit(now, &c.params) {
                    if c.argmin.is_none() || l < c.limit {
                        (c.limit, c.argmin) = (l, Some(node));
                    }
                    c.valid_until = c.valid_until.min(m.reported_at + c.params.timeout);
                    self.limit.set(Some(c));
                }
            }
        }
        (m, joined)
    }

    /// Takes a Status from `node`: positions only move forward (a reordered older Status changes
    /// nothing). True when it is the first to say that `node` holds every page.
    pub fn status(&mut self, node: NodeId, now: Time, received_through: u64, window: u32, complete: bool) -> bool {
        let Some(m) = self.members.get_mut(&node) else { return false };
        m.received_through = m.received_through.max(received_through);
        m.window = Some(window);
        m.reported_at = now;
        let newly_complete = complete && !m.ever_complete;
        m.complete = complete;
        m.ever_complete |= complete;
        if let Some(mut c) = self.limit.get() {
            match m.limit(now, &c.params) {
                Some(l) if c.argmin.is_none() || l < c.limit => {
                    (c.limit, c.argmin) = (l, Some(node));
                    self.limit.set(Some(c));
                }
                // The member that set the limit moved on (or stopped counting): look again.
                _ if c.argmin == Some(node) => self.limit.set(None),
                _ => {}
            }
        }
        newly_complete
    }

    /// Takes the congestion feedback of a Status from `node` (PROTOCOL.md 11.1): `rtt_sample`, if
    /// its echo gave one, joins the smoothed round-trip time (gain 1/8, as TCP's). Returns true
    /// if the member saw a new loss event since its last Status (its first only sets the count).
    pub fn feedback(
        &mut self,
        node: NodeId,
        rtt_sample: Option<Duration>,
        loss_events: u32,
        receive_rate_kib: u32,
        highest_seen: u64,
    ) -> bool {
        let Some(m) = self.members.get_mut(&node) else { return false };
        if let Some(sample) = rtt_sample {
            m.srtt = Some(m.srtt.map_or(sample, |s| (s * 7 + sample) / 8));
            m.min_rtt = Some(m.min_rtt.map_or(sample, |s| s.min(sample)));
        }
        let events = m.loss_events.map_or(0, |seen| loss_events.wrapping_sub(seen));
        m.highest_seen = highest_seen;
        m.loss_events = Some(loss_events);
        m.receive_rate = f64::from(receive_rate_kib) * 1024.0;
        if events > 0 && highest_seen != NO_STREAM {
            if let Some(from) = m.seen_at_event {
                // The positions since the last event, shared by the events this Status reports.
                let each = (highest_seen.saturating_sub(from) as f64 / f64::from(events.min(8))).max(1.0);
                for _ in 0..events.min(8) {
                    m.loss_intervals.insert(0, each);
                }
                m.loss_intervals.truncate(LOSS_INTERVALS);
            }
            m.seen_at_event = Some(highest_seen);
        } else if m.seen_at_event.is_none() && highest_seen != NO_STREAM {
            m.seen_at_event = Some(highest_seen);
        }
        events > 0
    }

    /// The smoothed round trip of `node`, if measured (congestion control's Clock echoes).
    pub fn srtt(&self, node: NodeId) -> Option<Duration> {
        self.members.get(&node)?.srtt
    }

    /// The congestion feedback of the members that count in flow control (reported within
    /// `timeout` and still lacking pages).
    pub fn congestion_feedback(
        &self,
        now: Time,
        timeout: Duration,
    ) -> impl Iterator<Item = super::congestion::Feedback> + '_ {
        self.members.values().filter(move |m| now < m.reported_at + timeout && !m.complete).map(|m| {
            super::congestion::Feedback {
                rtt: m.srtt,
                min_rtt: m.min_rtt,
                receive_rate: m.receive_rate,
                loss_event_rate: loss_event_rate(&m.loss_intervals, m.open_interval()),
            }
        })
    }

    /// Forgets the cached push limit if `node` set it.
    fn forget_limit_of(&self, node: NodeId) {
        if self.limit.get().is_some_and(|c| c.argmin == Some(node)) {
            self.limit.set(None);
        }
    }

    /// Records a loss report.
    pub fn report_loss(&mut self, node: NodeId, loss_ppm: u32) {
        if let Some(m) = self.members.get_mut(&node) {
            // Quantize so small fluctuations do not force a rebuild.
            let q = quantize(loss_ppm);
            if m.loss_ppm != Some(q) {
                m.loss_ppm = Some(q);
                self.dirty = true;
            }
        }
    }

    /// Removes `node` (it left).
    pub fn remove(&mut self, node: NodeId) -> bool {
        let gone = self.members.remove(&node).is_some();
        self.dirty |= gone;
        self.forget_limit_of(node);
        gone
    }

    /// Removes and returns receivers silent since before `deadline`.
    pub fn expire(&mut self, deadline: Time) -> Vec<NodeId> {
        let mut gone: Vec<NodeId> =
            self.members.iter().filter(|(_, m)| m.last_heard < deadline).map(|(n, _)| *n).collect();
        gone.sort();
        for n in &gone {
            self.members.remove(n);
            self.forget_limit_of(*n);
        }
        self.dirty |= !gone.is_empty();
        gone
    }

    /// The earliest time any member was last heard from.
    pub fn oldest_heard(&self) -> Option<Time> {
        self.members.values().map(|m| m.last_heard).min()
    }

    /// Live receivers.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when no receiver is live.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// How far the push stream may run (PROTOCOL.md section 11): the smallest
    /// `received_through + window` over the members that reported within `p.timeout` and still lack
    /// pages (a member that has not reported yet counts with `p.initial_window` from where it may
    /// still be reading when it joined; windows below `p.min_window` count as `p.min_window`).
    /// Nowhere (0) while no member counts: a push to nobody would be sent again on demand.
    pub fn push_limit(&self, now: Time, p: FlowParams) -> u64 {
        if let Some(c) = self.limit.get() {
            if c.params == p && now < c.valid_until {
                return c.limit;
            }
        }
        let mut c = LimitCache { params: p, limit: u64::MAX, argmin: None, valid_until: Time::from_nanos(u64::MAX) };
        for (&node, m) in &self.members {
            if let Some(l) = m.limit(now, &p) {
                if l < c.limit || (l == c.limit && c.argmin.is_some_and(|a| node < a)) {
                    (c.limit, c.argmin) = (l, Some(node));
                }
                c.valid_until = c.valid_until.min(m.reported_at + p.timeout);
            }
        }
        if c.argmin.is_none() {
            c.limit = 0;
        }
        self.limit.set(Some(c));
        c.limit
    }

    /// When the next member that counts in the push window stops counting (its last Status gets
    /// older than the timeout), if any counts.
    pub fn next_flow_expiry(&self, now: Time, p: FlowParams) -> Option<Time> {
        self.push_limit(now, p);
        self.limit.get().filter(|c| c.argmin.is_some()).map(|c| c.valid_until)
    }

    /// Parity packets to add to a closing block of `k` sources so that the expected number of
    /// receivers still missing symbols stays below `target`. At most `k` (beyond that, NAKs are cheaper).
    pub fn proactive_parity(&mut self, k: usize, assumed_loss: f64, target: f64) -> usize {
        if self.dirty {
            let mut counts: HashMap<u32, u32> = HashMap::new();
            for m in self.members.values() {
                let ppm = m.loss_ppm.unwrap_or_else(|| quantize((assumed_loss * 1e6) as u32));
                *counts.entry(ppm).or_default() += 1;
            }
            let mut h: Vec<(f64, u32)> = counts.into_iter().map(|(ppm, c)| (f64::from(ppm) / 1e6, c)).collect();
            h.sort_by(|a, b| a.0.total_cmp(&b.0));
            self.histogram = h;
            self.dirty = false;
        }
        if self.histogram.iter().all(|(l, _)| *l <= 0.0) {
            return 0;
        }
        (0..=k)
            .find(|&p| {
                let expected: f64 =
                    self.histogram.iter().map(|&(loss, n)| f64::from(n) * binomial_tail(k + p, loss, p)).sum();
                expected < target
            })
            .unwrap_or(k)
    }
}

/// Loss intervals kept per receiver (RFC 5348 section 5.4).
const LOSS_INTERVALS: usize = 8;

/// The loss event rate of `intervals` (newest first) and the open interval since the last event:
/// one over TFRC's weighted average, the open interval counted when it raises it (RFC 5348
/// section 5.4); 0 before the first.
fn loss_event_rate(intervals: &[f64], open: f64) -> f64 {
    const WEIGHTS: [f64; LOSS_INTERVALS] = [1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2];
    if intervals.is_empty() {
        return 0.0;
    }
    let mean = |xs: &mut dyn Iterator<Item = f64>| {
        let (mut sum, mut w) = (0.0, 0.0);
        for (x, wt) in xs.zip(WEIGHTS) {
            sum += x * wt;
            w += wt;
        }
        sum / w
    };
    let closed = mean(&mut intervals.iter().copied());
    let with_open = mean(&mut std::iter::once(open).chain(intervals.iter().copied()));
    1.0 / closed.max(with_open).max(1.0)
}

/// Rounds a loss rate to about two significant digits (in ppm), so reports cluster into few buckets.
fn quantize(ppm: u32) -> u32 {
    let ppm = ppm.min(1_000_000);
    if ppm < 100 {
        return ppm;
    }
    let mag = 10u32.pow(ppm.ilog10() - 1);
    (ppm / mag) * mag
}

/// P[X > p] for X ~ Binomial(n, loss).
fn binomial_tail(n: usize, loss: f64, p: usize) -> f64 {
    if loss <= 0.0 {
        return 0.0;
    }
    let q = 1.0 - loss;
    let mut term = q.powi(n as i32); // P[X = 0]
    let mut cdf = term;
    for i in 0..p.min(n) {
        term *= (n - i) as f64 / (i + 1) as f64 * loss / q;
        cdf += term;
    }
    (1.0 - cdf).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binomial_tail_matches_closed_forms() {
        // P[X > 0] = 1 - q^n.
        assert!((binomial_tail(10, 0.1, 0) - (1.0 - 0.9f64.powi(10))).abs() < 1e-12);
        assert_eq!(binomial_tail(10, 0.0, 0), 0.0);
        assert!(binomial_tail(10, 0.1, 10) < 1e-12);
    }

    const SEC: Duration = Duration::from_secs(1);
    const P: FlowParams = FlowParams { timeout: SEC, initial_window: 256, min_window: 128 };

    /// The limit, cached and from scratch (they must agree).
    fn limit(g: &Group, now: Time) -> u64 {
        let cached = g.push_limit(now, P);
        g.limit.set(None);
        assert_eq!(cached, g.push_limit(now, P), "the cached push limit is stale");
        cached
    }

    #[test]
    fn nothing_is_pushed_before_a_receiver_joins() {
        let mut g = Group::default();
        assert_eq!(limit(&g, Time::ZERO), 0);
        g.touch(NodeId(1), Time::ZERO, 1000);
        assert_eq!(limit(&g, Time::ZERO), 1256, "a new member counts with the initial window");
    }

    #[test]
    fn the_slowest_reporting_member_sets_the_limit_and_a_silent_one_stops_counting() {
        let mut g = Group::default();
        let t = |ms: u64| Time::from_nanos(ms * 1_000_000);
        let status = |g: &mut Group, node: u32, at: u64, rt: u64, window: u32, complete: bool| {
            g.touch(NodeId(node), t(at), 0);
            let _ = g.status(NodeId(node), t(at), rt, window, complete);
        };
        g.push_limit(t(0), P);
        for (node, rt) in [(1, 5000), (2, 3000), (3, 9000)] {
            status(&mut g, node, 0, rt, 1024, false);
        }
        assert_eq!(limit(&g, t(10)), 4024);
        // A reordered, older Status does not move a member back.
        status(&mut g, 2, 20, 2000, 1024, false);
        assert_eq!(limit(&g, t(20)), 4024);
        // A tiny window counts as the minimum.
        status(&mut g, 2, 30, 3000, 1, false);
        assert_eq!(limit(&g, t(30)), 3128);
        // Node 2 falls silent: after the timeout the others set the limit.
        for node in [1, 3] {
            status(&mut g, node, 900, 8000, 1024, false);
        }
        // The cached expiry may be early (a wake-up that finds nothing to do), never late.
        assert!(g.next_flow_expiry(t(900), P).is_some_and(|e| e <= t(1030)));
        g.limit.set(None);
        assert_eq!(g.next_flow_expiry(t(900), P), Some(t(1030)));
        assert_eq!(limit(&g, t(1031)), 9024);
        // A member that holds every page does not hold the push back.
        status(&mut g, 1, 1000, 8000, 1024, true);
        assert_eq!(limit(&g, t(1031)), 10024);
        // The slowest moves on: the next one sets the limit (the cache follows).
        status(&mut g, 3, 1040, 12000, 1024, false);
        assert_eq!(limit(&g, t(1041)), 13024);
        // Everyone silent: nothing is pushed.
        assert_eq!(limit(&g, t(5000)), 0);
    }

    #[test]
    fn loss_event_rates_follow_the_reported_loss_events() {
        let mut g = Group::default();
        let n = NodeId(1);
        g.touch(n, Time::ZERO, 0);
        let rate = |g: &Group| {
            g.congestion_feedback(Time::ZERO, SEC).next().map(|f| f.loss_event_rate).expect("the member counts")
        };
        // The first Status only sets the count and where counting starts.
        assert!(!g.feedback(n, None, 5, 0, 100));
        assert_eq!(rate(&g), 0.0);
        assert!(g.feedback(n, None, 6, 0, 1_000));
        assert!((rate(&g) - 1.0 / 900.0).abs() < 1e-9, "{:?}", rate(&g));
        // Events 100 positions apart: 1%.
        for i in 1..=8u64 {
            assert!(g.feedback(n, None, 6 + i as u32, 0, 1_000 + 100 * i));
        }
        assert!((rate(&g) - 0.01).abs() < 1e-9, "{:?}", rate(&g));
        // A long run without loss counts once it raises the average.
        assert!(!g.feedback(n, None, 14, 0, 1_000_000));
        assert!(rate(&g) < 1e-4, "{:?}", rate(&g));
        // The count wraps.
        assert!(g.feedback(n, Some(Duration::from_millis(3)), 15, 0, 1_000_100));
        g.feedback(n, None, u32::MAX, 0, 1_000_200);
        assert!(g.feedback(n, None, 0, 0, 1_000_300));
    }

    #[test]
    fn parity_grows_with_group_size() {
        let mut small = Group::default();
        let mut large = Group::default();
        for i in 1..=1024u32 {
            if i == 1 {
                small.touch(NodeId(i), Time::ZERO, 0);
                small.report_loss(NodeId(i), 10_000);
            }
            large.touch(NodeId(i), Time::ZERO, 0);
            large.report_loss(NodeId(i), 10_000);
        }
        let p1 = small.proactive_parity(32, 0.01, 0.25);
        let p1024 = large.proactive_parity(32, 0.01, 0.25);
        assert!(p1 <= 1, "one receiver at 1% needs little parity, got {p1}");
        assert!((3..=6).contains(&p1024), "1024 receivers at 1% need a few parity packets, got {p1024}");
    }
}
