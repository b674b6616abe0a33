//! What the sender still has to send: requested pages by priority, then the background push.

use std::collections::VecDeque;

use super::PushPolicy;
use crate::wire::Priority;

const NOT_QUEUED: u8 = u8::MAX;

/// Pages waiting to be sent, most urgent first, each at most once.
#[derive(Debug)]
pub(super) struct PageQueue {
    /// One FIFO per priority (Fault, ReadAhead, Prefetch).
    lanes: [VecDeque<u32>; 3],
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

    /// Queues `page` at `priority`. False when it was already queued at that priority or higher.
    pub fn enqueue(&mut self, page: u32, priority: Priority) -> bool {
        let p = priority as u8;
        let slot = &mut self.queued[page as usize];
        if *slot <= p {
            return false;
        }
        if *slot == NOT_QUEUED {
            self.live += 1;
        }
        *slot = p;
        self.lanes[p as usize].push_back(page);
        true
    }

    /// Whether `page` is waiting.
    pub fn is_queued(&self, page: u32) -> bool {
        self.queued[page as usize] != NOT_QUEUED
    }

    /// The most urgent requested page, removed from the queue.
    /// The page [`Queue::pop_requested`] would return, without taking it (stale entries at the
    /// lanes' fronts are dropped).
    pub fn peek_requested(&mut self) -> Option<(u32, Priority)> {
        for (lane, prio) in self.lanes.iter_mut().zip([Priority::Fault, Priority::ReadAhead, Priority::Prefetch]) {
            while let Some(&page) = lane.front() {
                if self.queued[page as usize] == prio as u8 {
                    return Some((page, prio));
                }
                lane.pop_front();
            }
        }
        None
    }

    pub fn pop_requested(&mut self) -> Option<(u32, Priority)> {
        for (lane, prio) in self.lanes.iter_mut().zip([Priority::Fault, Priority::ReadAhead, Priority::Prefetch]) {
            while let Some(page) = lane.pop_front() {
                // A page re-queued at a higher priority left a stale entry in a lower lane.
                if self.queued[page as usize] == prio as u8 {
                    self.queued[page as usize] = NOT_QUEUED;
                    self.live -= 1;
                    return Some((page, prio));
                }
            }
        }
        None
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

    /// Whether the push has anything left.
    pub fn has_push(&self) -> bool {
        !self.push_hints.is_empty() || self.push_all_next.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_overtake_read_ahead_and_pages_are_sent_once() {
        let mut q = PageQueue::new(16, &PushPolicy::None);
        assert!(q.enqueue(3, Priority::ReadAhead));
        assert!(q.enqueue(4, Priority::ReadAhead));
        assert!(q.enqueue(4, Priority::Fault), "upgrade");
        assert!(!q.enqueue(4, Priority::ReadAhead), "already queued higher");
        assert_eq!(q.pop_requested(), Some((4, Priority::Fault)));
        assert_eq!(q.pop_requested(), Some((3, Priority::ReadAhead)));
        assert!(!q.has_requested(), "only a stale entry is left");
        assert_eq!(q.pop_requested(), None, "the stale read-ahead entry of page 4 is skipped");
    }

    #[test]
    fn skipping_sent_pages_shows_that_the_push_is_over() {
        let mut q = PageQueue::new(4, &PushPolicy::HintsThenAll(vec![3]));
        assert!(q.enqueue(2, Priority::Fault));
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
