//! The group: which receivers are live, what they report, and how much proactive parity their loss
//! rates call for.

use std::collections::HashMap;

use crate::replay::ReplayWindow;
use crate::wire::{NodeId, NO_STREAM};
use crate::Time;

/// What the server knows of one receiver.
#[derive(Debug, Clone)]
pub(super) struct Member {
    pub last_heard: Time,
    pub loss_ppm: Option<u32>,
    pub stream_start: u64,
    pub received_through: u64,
    pub window: u32,
    pub replay: ReplayWindow,
}

/// The live receivers.
#[derive(Debug, Default)]
pub(super) struct Group {
    members: HashMap<NodeId, Member>,
    /// Cached loss histogram: (loss rate, receivers at that rate); rebuilt when reports change.
    histogram: Vec<(f64, u32)>,
    dirty: bool,
}

impl Group {
    /// The member for `node`, created if new; the bool says whether it was new.
    pub fn touch(&mut self, node: NodeId, now: Time) -> (&mut Member, bool) {
        let mut joined = false;
        let m = self.members.entry(node).or_insert_with(|| {
            joined = true;
            Member {
                last_heard: now,
                loss_ppm: None,
                stream_start: NO_STREAM,
                received_through: 0,
                window: u32::MAX,
                replay: ReplayWindow::default(),
            }
        });
        if joined {
            self.dirty = true;
        }
        (m, joined)
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
        gone
    }

    /// Removes and returns receivers silent since before `deadline`.
    pub fn expire(&mut self, deadline: Time) -> Vec<NodeId> {
        let mut gone: Vec<NodeId> =
            self.members.iter().filter(|(_, m)| m.last_heard < deadline).map(|(n, _)| *n).collect();
        gone.sort();
        for n in &gone {
            self.members.remove(n);
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

    /// How far the push stream may run: the smallest `received_through + window` over members,
    /// and nowhere while no receiver is live (a push to nobody would be sent again on demand).
    pub fn push_limit(&self) -> u64 {
        self.members.values().map(|m| m.received_through.saturating_add(u64::from(m.window))).min().unwrap_or(0)
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

    #[test]
    fn nothing_is_pushed_before_a_receiver_joins() {
        let mut g = Group::default();
        assert_eq!(g.push_limit(), 0);
        g.touch(NodeId(1), Time::ZERO);
        assert_eq!(g.push_limit(), u64::from(u32::MAX), "a new member has not reported a window yet");
    }

    #[test]
    fn parity_grows_with_group_size() {
        let mut small = Group::default();
        let mut large = Group::default();
        for i in 1..=1024u32 {
            if i == 1 {
                small.touch(NodeId(i), Time::ZERO);
                small.report_loss(NodeId(i), 10_000);
            }
            large.touch(NodeId(i), Time::ZERO);
            large.report_loss(NodeId(i), 10_000);
        }
        let p1 = small.proactive_parity(32, 0.01, 0.25);
        let p1024 = large.proactive_parity(32, 0.01, 0.25);
        assert!(p1 <= 1, "one receiver at 1% needs little parity, got {p1}");
        assert!((3..=6).contains(&p1024), "1024 receivers at 1% need a few parity packets, got {p1024}");
    }
}
