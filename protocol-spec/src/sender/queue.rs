//! What the sender still has to send: requested pages by priority, then the background push.
//!
//! Within a priority, hosts take turns: each lane holds one FIFO per asking host and serves them
//! round robin, a page at a time, so a host with hundreds of pages outstanding (a bulk `fetch`,
//! a clone streaming through memory) does not queue every other host's next fault behind all of
//! them. A page asked for by several hosts sits in the FIFO of the first; the others are answered
//! with it.

use std::collections::{HashMap, VecDeque};

use super::PushPolicy;
use crate::wire::Priority;

const NOT_QUEUED: u8 = u8::MAX;

/// The pages of one priority: a FIFO per host, the hosts in turn.
#[derive(Debug, Default)]
struct Lane {
    /// Per host (node id): its pages, oldest first. Entries of pages since sent or moved to another
    /// lane are stale and skipped.
    fifos: HashMap<u32, VecDeque<u32>>,
    /// The hosts with a non-empty FIFO, the next to be served first.
    turn: VecDeque<u32>,
}

impl Lane {
    fn push(&mut self, node: u32, page: u32) {
        let fifo = self.fifos.entry(node).or_default();
        if fifo.is_empty() {
            self.turn.push_back(node);
        }
        fifo.push_back(page);
    }

    /// The next host's oldest live page (`live` tells stale entries, which are dropped), left in
    /// place.
    fn front(&mut self, live: impl Fn(u32) -> bool) -> Option<u32> {
        while let Some(&node) = self.turn.front() {
            if let Some(fifo) = self.fifos.get_mut(&node) {
                while let Some(&page) = fifo.front() {
                    if live(page) {
                        return Some(page);
                    }
                    fifo.pop_front();
                }
            }
            self.fifos.remove(&node);
            self.turn.pop_front();
        }
        None
    }

    /// Removes the page [`Lane::front`] returned; its host goes to the back of the turn.
    fn pop_front(&mut self) {
        let Some(node) = self.turn.pop_front() else { return };
        if let Some(fifo) = self.fifos.get_mut(&node) {
            fifo.pop_front();
            if fifo.is_empty() {
                self.fifos.remove(&node);
            } else {
                self.turn.push_back(node);
            }
        }
    }
}

/// Pages waiting to be sent, most urgent first, each at most once.
#[derive(Debug)]
pub(super) struct PageQueue {
    /// One lane per priority (Fault, ReadAhead, Prefetch).
    lanes: [Lane; 3],
    /// Per page: the priority it is queued at, or NOT_QUEUED.
    queued: Vec<u8>,
    /// The background push: hinted pages, then (optionally) all pages.
    push_hints: VecDeque<u32>,
    push_all_next: Option<u32>,
    page_count: u32,
    /// Pages queued (each counted once, whatever lanes hold stale entries for it).
    live: usize,
}

impl PageQueue {
    pub fn new(page_count: u32, push: &PushPolicy) -> PageQueue {
        let (hints, all) = match push {
            PushPolicy::None => (Vec::new(), false),
            PushPolicy::Hints(h) => (h.clone(), false),
            PushPolicy::HintsThenAll(h) => (h.clone(), true),
        };
        PageQueue {
            lanes: Default::default(),
            queued: vec![NOT_QUEUED; page_count as usize],
            push_hints: hints.into_iter().filter(|&p| p < page_count).collect(),
            push_all_next: all.then_some(0),
            page_count,
            live: 0,
        }
    }

    /// Queues `page` at `priority` for host `node` (its turn in the lane; 0 for the sender's own
    /// hints). False when it was already queued at that priority or higher.
    pub fn enqueue(&mut self, page: u32, priority: Priority, node: u32) -> bool {
        let p = priority as u8;
        let slot = &mut self.queued[page as usize];
        if *slot <= p {
            return false;
        }
        if *slot == NOT_QUEUED {
            self.live += 1;
        }
        *slot = p;
        self.lanes[p as usize].push(node, page);
        true
    }

    /// Whether `page` is waiting.
    pub fn is_queued(&self, page: u32) -> bool {
        self.queued[page as usize] != NOT_QUEUED
    }

    /// The page [`PageQueue::pop_requested`] would return, without taking it (stale entries at the
    /// lanes' fronts are dropped).
    pub fn peek_requested(&mut self) -> Option<(u32, Priority)> {
        let queued = &self.queued;
        for (lane, prio) in self.lanes.iter_mut().zip([Priority::Fault, Priority::ReadAhead, Priority::Prefetch]) {
            // A page re-queued at a higher priority left a stale entry in a lower lane.
            if let Some(page) = lane.front(|page| queued[page as usize] == prio as u8) {
                return Some((page, prio));
            }
        }
        None
    }

    /// The most urgent requested page, the hosts of a priority in turn, removed from the queue.
    pub fn pop_requested(&mut self) -> Option<(u32, Priority)> {
        let (page, prio) = self.peek_requested()?;
        self.lanes[prio as usize].pop_front();
        self.queued[page as usize] = NOT_QUEUED;
        self.live -= 1;
        Some((page, prio))
    }

    /// Whether any requested page waits.
    pub fn has_requested(&self) -> bool {
        self.live > 0
    }

    /// The next page of the background push that `already_sent` does not rule out.
    pub fn pop_push(&mut self, already_sent: impl Fn(u32) -> bool) -> Option<u32> {
        while let Some(p) = self.push_hints.pop_front() {
            if !already_sent(p) && !self.is_queued(p) {
                return Some(p);
            }
        }
        while let Some(p) = self.push_all_next {
            self.push_all_next = (p + 1 < self.page_count).then_some(p + 1);
            if !already_sent(p) && !self.is_queued(p) {
                return Some(p);
            }
        }
        None
    }

    /// Drops the pages at the head of the push that [`PageQueue::pop_push`] would skip (those
    /// `already_sent` rules out, and those queued on demand), so that [`PageQueue::has_push`] says
    /// whether a page is really left to push.
    pub fn skip_push(&mut self, already_sent: impl Fn(u32) -> bool) {
        while let Some(&p) = self.push_hints.front() {
            if !already_sent(p) && !self.is_queued(p) {
                return;
            }
            self.push_hints.pop_front();
        }
        while let Some(p) = self.push_all_next {
            if !already_sent(p) && !self.is_queued(p) {
                return;
            }
            self.push_all_next = (p + 1 < self.page_count).then_some(p + 1);
        }
    }

    /// Whether the push will reach `page` within its next `horizon` pages: it is in the
    /// whole-image part of the push, at or after its next page and less than `horizon` beyond it,
    /// with no hinted pages left before it (a page among the hints is not looked for: the hints
    /// are short, and their order is the recorded one).
    pub fn push_reaches_soon(&self, page: u32, horizon: u32) -> bool {
        self.push_hints.is_empty() && self.push_all_next.is_some_and(|next| page >= next && page - next < horizon)
    }

    /// Whether the push has anything left.
    pub fn has_push(&self) -> bool {
        !self.push_hints.is_empty() || self.push_all_next.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_push_reaches_only_what_lies_within_its_horizon() {
        let mut q = PageQueue::new(100, &PushPolicy::HintsThenAll(vec![50]));
        assert!(!q.push_reaches_soon(3, 10), "hints come first");
        assert_eq!(q.pop_push(|_| false), Some(50));
        assert!(q.push_reaches_soon(0, 10) && q.push_reaches_soon(9, 10));
        assert!(!q.push_reaches_soon(10, 10), "beyond the horizon");
        assert_eq!(q.pop_push(|_| false), Some(0));
        assert!(!q.push_reaches_soon(0, 10), "already behind the push");
        assert!(!PageQueue::new(100, &PushPolicy::None).push_reaches_soon(0, 10), "no push");
    }

    #[test]
    fn faults_overtake_read_ahead_and_pages_are_sent_once() {
        let mut q = PageQueue::new(16, &PushPolicy::None);
        assert!(q.enqueue(3, Priority::ReadAhead, 1));
        assert!(q.enqueue(4, Priority::ReadAhead, 1));
        assert!(q.enqueue(4, Priority::Fault, 1), "upgrade");
        assert!(!q.enqueue(4, Priority::ReadAhead, 1), "already queued higher");
        assert_eq!(q.pop_requested(), Some((4, Priority::Fault)));
        assert_eq!(q.pop_requested(), Some((3, Priority::ReadAhead)));
        assert!(!q.has_requested(), "only a stale entry is left");
        assert_eq!(q.pop_requested(), None, "the stale read-ahead entry of page 4 is skipped");
    }

    #[test]
    fn hosts_take_turns_within_a_priority() {
        let mut q = PageQueue::new(1024, &PushPolicy::None);
        for p in 0..300 {
            assert!(q.enqueue(p, Priority::Fault, 7), "a bulk host's 300 faults");
        }
        assert!(q.enqueue(500, Priority::Fault, 9));
        assert!(q.enqueue(501, Priority::Fault, 9));
        assert!(!q.enqueue(5, Priority::Fault, 9), "page 5 is queued already (in host 7's turn)");
        assert!(q.enqueue(600, Priority::ReadAhead, 9));
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_requested().map(|(p, _)| p)).take(5).collect();
        assert_eq!(order, vec![0, 500, 1, 501, 2], "the second host's faults are not behind the first's 300");
        let rest: Vec<(u32, Priority)> = std::iter::from_fn(|| q.pop_requested()).collect();
        assert_eq!(rest.len(), 298);
        assert_eq!(rest.last(), Some(&(600, Priority::ReadAhead)), "read-ahead after every fault");
        assert!(!q.has_requested());
    }

    #[test]
    fn peek_names_what_pop_takes() {
        let mut q = PageQueue::new(16, &PushPolicy::None);
        q.enqueue(1, Priority::ReadAhead, 1);
        q.enqueue(2, Priority::Prefetch, 2);
        q.enqueue(1, Priority::Fault, 3);
        q.enqueue(3, Priority::Fault, 2);
        while let Some(peeked) = q.peek_requested() {
            assert_eq!(q.pop_requested(), Some(peeked));
        }
        assert_eq!(q.pop_requested(), None);
    }

    #[test]
    fn skipping_sent_pages_shows_that_the_push_is_over() {
        let mut q = PageQueue::new(4, &PushPolicy::HintsThenAll(vec![3]));
        assert!(q.enqueue(2, Priority::Fault, 1));
        assert_eq!(q.pop_push(|p| p == 3), Some(0));
        assert_eq!(q.pop_push(|p| p == 3), Some(1));
        assert!(q.has_push(), "pages 2 and 3 are still to be looked at");
        q.skip_push(|p| p == 3);
        assert!(!q.has_push(), "page 2 goes on demand and page 3 went already: nothing is left to push");
    }

    #[test]
    fn push_goes_hints_first_then_everything_else() {
        let mut q = PageQueue::new(4, &PushPolicy::HintsThenAll(vec![2]));
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_push(|p| p == 1)).collect();
        assert_eq!(order, vec![2, 0, 2, 3]);
    }
}
