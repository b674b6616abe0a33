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
}

/// The wanted pages.
#[derive(Debug, Default)]
pub(super) struct Wants {
    pages: BTreeMap<u32, Want>,
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
                self.pages.insert(page, Want { priority, requested_at: None, attempts: 0 });
                true
            }
        }
    }

    /// The page arrived.
    pub fn satisfied(&mut self, page: u32) {
        self.pages.remove(&page);
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

    fn due(w: &Want, now: Time, rto: Duration) -> bool {
        match w.requested_at {
            None => true,
            Some(t) => now >= t + rto * (1u32 << w.attempts.min(6)),
        }
    }

    /// The runs to request now (most urgent first, at most `max_runs`), marking them requested.
    pub fn take_request(&mut self, now: Time, rto: Duration, max_runs: usize) -> Vec<PageRun> {
        let mut due: Vec<(Priority, u32)> =
            self.pages.iter().filter(|(_, w)| Self::due(w, now, rto)).map(|(&p, w)| (w.priority, p)).collect();
        due.sort_unstable();
        let mut runs: Vec<PageRun> = Vec::new();
        for (priority, page) in due {
            let extends = runs.last().is_some_and(|r: &PageRun| {
                r.priority == priority && r.first_page + u32::from(r.count) == page && r.count < u16::MAX
            });
            if extends {
                if let Some(r) = runs.last_mut() {
                    r.count += 1;
                }
            } else if runs.len() == max_runs {
                break;
            } else {
                runs.push(PageRun { first_page: page, count: 1, priority });
            }
            if let Some(w) = self.pages.get_mut(&page) {
                if w.requested_at.is_some() {
                    w.attempts += 1;
                }
                w.requested_at = Some(now);
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
                Some(t) => t + rto * (1u32 << w.attempts.min(6)),
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
        let runs = w.take_request(Time::ZERO, rto, 16);
        assert_eq!(runs[0], PageRun { first_page: 9, count: 1, priority: Priority::Fault });
        assert_eq!(runs[1], PageRun { first_page: 5, count: 3, priority: Priority::ReadAhead });
        assert!(w.take_request(Time::ZERO, rto, 16).is_empty(), "nothing is due again at once");
        let again = w.take_request(Time::ZERO + rto, rto, 16);
        assert_eq!(again.len(), 2, "due after one rto");
        assert!(w.take_request(Time::ZERO + rto * 2, rto, 16).is_empty(), "the second retry waits two rtos");
    }
}
