//! Pages this host wants and has not got: what goes into requests, and when to ask again.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::wire::{PageRun, Priority};
use crate::Time;

#[derive(Debug, Clone, Copy)]
struct Want {
    priority: Priority,
    requested_at: Option<Time>,
    attempts: u32,
    /// The server advertised the page as queued: it is on its way, so ask again only after a long
    /// safety timeout (the server restarted or dropped its queue), not after the usual one.
    queued: bool,
    /// Its arrival gives an unambiguous service-time sample (asked for once, by us, when noted).
    measure: bool,
}

/// How many timeouts an advertised page waits before it is asked for again, unless a fault waits
/// for it: a vCPU blocked on a page whose answer was lost would otherwise wait 16 timeouts, doubling
/// (the 4-host demo at 2% loss measured faults at p99 150-190 ms and clones 1.9-2.4 s that way;
/// 1.4-1.6 s without).
const QUEUED_PATIENCE: u32 = 16;

/// From this many unanswered re-requests on, a page is asked for *insisting*: the Request says it
/// follows no stream (`NO_STREAM`), so the server sends the page even if it was sent after this host
/// started following and should be repairable. Whatever made the repair path fail (a position
/// given up, a record lost after its packet arrived), the page then still comes.
pub(super) const INSIST_AFTER: u32 = 2;

/// The wanted pages.
#[derive(Debug, Default)]
pub(super) struct Wants {
    pages: BTreeMap<u32, Want>,
    /// Smoothed fault-service time and its deviation (RFC 6298 style), from first-attempt requests.
    srtt: Option<(Duration, Duration)>,
    /// Pages asked for again after their timeout (their request or answer was lost, or is late).
    pub(super) rerequested: u64,
}

impl Wants {
    /// Wants `page` at `priority` (raising the priority of a page already wanted). True if this
    /// made a request necessary.
    pub fn want(&mut self, page: u32, priority: Priority) -> bool {
        match self.pages.get_mut(&page) {
            Some(w) if w.priority <= priority => false,
            Some(w) => {
                // Raised to a fault: ask again now, at the higher priority.
                w.priority = priority;
                w.requested_at = None;
                true
            }
            None => {
                self.pages
                    .insert(page, Want { priority, requested_at: None, attempts: 0, queued: false, measure: true });
                true
            }
        }
    }

    /// Wants `page` as a fault although the server advertised it at a lower priority: ask (to raise
    /// its priority) only if it has not come within a timeout.
    pub fn want_deferred(&mut self, page: u32, now: Time) {
        if self.pages.contains_key(&page) {
            self.want(page, Priority::Fault);
            return;
        }
        // Due a timeout from now, as if asked for now.
        let want =
            Want { priority: Priority::Fault, requested_at: Some(now), attempts: 0, queued: false, measure: false };
        self.pages.insert(page, want);
    }

    /// Wants `page`, which the server has advertised as queued at `since`: as if requested then.
    pub fn want_advertised(&mut self, page: u32, priority: Priority, since: Time) {
        match self.pages.get_mut(&page) {
            Some(w) if w.priority <= priority => {}
            Some(w) => {
                // Wanted less urgently so far (read-ahead): a fault now waits for it. Left at its
                // old priority it would be dropped once due (read-ahead is asked for once), and the
                // fault would wait for ever.
                w.priority = priority;
                w.queued = true;
                w.measure = false;
                w.requested_at = Some(w.requested_at.map_or(since, |t| t.max(since)));
            }
            None => {
                let want = Want { priority, requested_at: Some(since), attempts: 0, queued: true, measure: false };
                self.pages.insert(page, want);
            }
        }
    }

    /// The server advertised `page` as queued at `priority` at `now`: if it is wanted no more
    /// urgently than that, stop the usual timeout.
    pub fn advertised(&mut self, page: u32, priority: Priority, now: Time) {
        if let Some(w) = self.pages.get_mut(&page) {
            if !w.queued && priority <= w.priority {
                w.queued = true;
                w.measure = false;
                w.requested_at = Some(w.requested_at.unwrap_or(now));
            }
        }
    }

    /// The page arrived at `now`.
    pub fn satisfied(&mut self, page: u32, now: Time) {
        let want = self.pages.remove(&page);
        if let Some(Want { requested_at: Some(t), attempts, priority, queued, .. }) = want {
            let waited = now.saturating_since(t);
            if waited > Duration::from_millis(5) {
                tracing::debug!(
                    "page {page}: arrived {waited:?} after its last request ({attempts} re-requests, {priority:?}, queued {queued}, rto {:?})",
                    self.measured_rto()
                );
            }
        }
        if let Some(Want { requested_at: Some(t), measure: true, .. }) = want {
            // Only unambiguous samples (Karn): the page was asked for once.
            let sample = now.saturating_since(t);
            self.srtt = Some(match self.srtt {
                None => (sample, sample / 2),
                Some((srtt, var)) => {
                    let diff = srtt.abs_diff(sample);
                    (srtt * 7 / 8 + sample / 8, var * 3 / 4 + diff / 4)
                }
            });
        }
    }

    /// The retransmission timeout from measured service times, if any were measured.
    pub fn measured_rto(&self) -> Option<Duration> {
        self.srtt.map(|(srtt, var)| srtt + 4 * var)
    }

    /// Whether anything is wanted.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Whether a fault (not only read-ahead) is waiting.
    pub fn has_fault(&self) -> bool {
        self.pages.values().any(|w| w.priority == Priority::Fault)
    }

    /// Ask for everything again (the server restarted or lost what it sent).
    pub fn rerequest_all(&mut self) {
        for w in self.pages.values_mut() {
            w.requested_at = None;
        }
    }

    fn timeout(w: &Want, rto: Duration) -> Duration {
        let patience = if w.queued && w.priority != Priority::Fault { QUEUED_PATIENCE } else { 1 };
        rto * (1u32 << w.attempts.min(6)) * patience
    }

    fn due(w: &Want, now: Time, rto: Duration) -> bool {
        match w.requested_at {
            None => true,
            Some(t) => now >= t + Self::timeout(w, rto),
        }
    }

    /// The runs to request now (most urgent first, at most `max_runs`), marking them requested.
    /// Read-ahead and prefetch are asked for once: if they do not come, a fault asks again. With
    /// `insist`, only pages already re-requested [`INSIST_AFTER`] times; without, only the others.
    pub fn take_request(&mut self, now: Time, rto: Duration, max_runs: usize, insist: bool) -> Vec<PageRun> {
        self.pages.retain(|_, w| w.priority == Priority::Fault || w.requested_at.is_none() || !Self::due(w, now, rto));
        let mut due: Vec<(Priority, u32)> = self
            .pages
            .iter()
            .filter(|(_, w)| Self::due(w, now, rto) && (w.attempts >= INSIST_AFTER) == insist)
            .map(|(&p, w)| (w.priority, p))
            .collect();
        due.sort_unstable();
        let mut runs: Vec<PageRun> = Vec::new();
        for (priority, page) in due {
            if !PageRun::append(&mut runs, page, priority, max_runs) {
                break;
            }
            if let Some(w) = self.pages.get_mut(&page) {
                if w.requested_at.is_some() {
                    w.attempts += 1;
                    w.measure = false;
                    self.rerequested += 1;
                }
                w.requested_at = Some(now);
                w.queued = false;
            }
        }
        runs
    }

    /// When the next page becomes due for asking again.
    pub fn next_due(&self, rto: Duration) -> Option<Time> {
        self.pages
            .values()
            .map(|w| match w.requested_at {
                None => Time::ZERO,
                Some(t) => t + Self::timeout(w, rto),
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_runs_and_backs_off() {
        let mut w = Wants::default();
        for p in [5, 6, 7, 9] {
            w.want(p, Priority::ReadAhead);
        }
        w.want(9, Priority::Fault);
        let rto = Duration::from_millis(1);
        let runs = w.take_request(Time::ZERO, rto, 16, false);
        assert_eq!(runs[0], PageRun { first_page: 9, count: 1, priority: Priority::Fault });
        assert_eq!(runs[1], PageRun { first_page: 5, count: 3, priority: Priority::ReadAhead });
        assert!(w.take_request(Time::ZERO, rto, 16, false).is_empty(), "nothing is due again at once");
        let again = w.take_request(Time::ZERO + rto, rto, 16, false);
        assert_eq!(
            again,
            vec![PageRun { first_page: 9, count: 1, priority: Priority::Fault }],
            "faults are retried, read-ahead is not"
        );
        assert!(w.take_request(Time::ZERO + rto * 2, rto, 16, false).is_empty(), "the second retry waits two rtos");
        let third = w.take_request(Time::ZERO + rto * 3, rto, 16, false);
        assert_eq!(third.len(), 1, "the second retry");
        assert!(w.take_request(Time::ZERO + rto * 7, rto, 16, false).is_empty(), "from now on it insists");
        assert_eq!(
            w.take_request(Time::ZERO + rto * 7, rto, 16, true),
            vec![PageRun { first_page: 9, count: 1, priority: Priority::Fault }],
            "after {INSIST_AFTER} unanswered retries the page is asked for insisting"
        );
    }
}
