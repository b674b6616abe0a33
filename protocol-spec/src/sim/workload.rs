//! The working set and the order each receiver touches it in.
//!
//! Every receiver touches the same working set: a fraction of the image made of runs of contiguous
//! pages (faults come in short runs, REAP saw 2-3 pages) with geometric lengths, placed at random
//! without overlap. Each receiver visits those pages in its own shuffled order, like one vCPU.

use rand::seq::SliceRandom;
use rand::Rng;

use super::rng::{self, Domain};

/// Mean length of a run of contiguous working-set pages.
pub const MEAN_RUN: f64 = 4.0;
/// Longest run generated.
const MAX_RUN: u32 = 64;

/// The working set: sorted, distinct page numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    pages: Vec<u32>,
    runs: usize,
}

impl WorkingSet {
    /// The working set for `seed`: `round(fraction * page_count)` pages (at least one) of an image of
    /// `page_count` pages, in runs of mean length [`MEAN_RUN`].
    pub fn generate(seed: u64, page_count: u32, fraction: f64) -> WorkingSet {
        assert!(page_count > 0, "empty image");
        let want = ((fraction * f64::from(page_count)).round() as u64).clamp(1, u64::from(page_count)) as u32;
        let mut rng = rng::stream(seed, Domain::WorkingSet, 0);
        if want == page_count {
            return WorkingSet { pages: (0..page_count).collect(), runs: 1 };
        }
        // Run lengths, geometric on 1.. with the given mean, truncated so they sum to `want`.
        let p = 1.0 / MEAN_RUN;
        let mut lens = Vec::new();
        let mut total = 0u32;
        while total < want {
            let mut len = 1;
            while len < MAX_RUN && !rng.random_bool(p) {
                len += 1;
            }
            let len = len.min(want - total);
            lens.push(len);
            total += len;
        }
        // Free pages left to spread as gaps; keep at least one page between runs when there is room,
        // so runs stay distinct.
        let runs = lens.len() as u32;
        let min_gap = u32::from(page_count - want >= runs.saturating_sub(1));
        let free = page_count - want - min_gap * runs.saturating_sub(1);
        // Uniformly random placement: sorted offsets in 0..=free (stars and bars).
        let mut offsets: Vec<u32> = (0..runs).map(|_| rng.random_range(0..=free)).collect();
        offsets.sort_unstable();
        let mut pages = Vec::with_capacity(want as usize);
        let mut base = 0u32;
        for (i, (&len, &off)) in lens.iter().zip(&offsets).enumerate() {
            let start = base + off;
            pages.extend(start..start + len);
            base += len + if i + 1 < lens.len() { min_gap } else { 0 };
        }
        debug_assert!(pages.windows(2).all(|w| w[0] < w[1]));
        WorkingSet { pages, runs: lens.len() }
    }

    /// The pages, sorted.
    pub fn pages(&self) -> &[u32] {
        &self.pages
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True when empty (never, for a generated set).
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Number of runs it was built from (adjacent runs may touch when the set is dense).
    pub fn runs(&self) -> usize {
        self.runs
    }

    /// The order receiver `index` touches the pages in: its own shuffle, page by page.
    pub fn order_for(&self, seed: u64, index: u32) -> Vec<u32> {
        let mut rng = rng::stream(seed, Domain::Workload, u64::from(index));
        let mut order = self.pages.clone();
        order.shuffle(&mut rng);
        order
    }
}

/// When receiver `index` starts: at 0, or uniformly within `0..=stagger`.
pub fn start_time_ns(seed: u64, index: u32, stagger_ns: u64) -> u64 {
    if stagger_ns == 0 {
        return 0;
    }
    // A stream of its own, so the start does not shift the receiver's order.
    let mut rng = rng::stream(seed, Domain::Workload, (1u64 << 32) | u64::from(index));
    rng.random_range(0..=stagger_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_runs_and_bounds() {
        for (pages, frac) in [(4096u32, 0.1), (65536, 0.1), (100, 0.5), (10, 0.95), (7, 1.0), (1, 0.1)] {
            let ws = WorkingSet::generate(1, pages, frac);
            let want = ((frac * f64::from(pages)).round() as u32).max(1);
            assert_eq!(ws.len() as u32, want, "pages {pages} frac {frac}");
            assert!(ws.pages().windows(2).all(|w| w[0] < w[1]));
            assert!(ws.pages().iter().all(|&p| p < pages));
        }
    }

    #[test]
    fn runs_have_mean_length_about_four() {
        let ws = WorkingSet::generate(2, 65536, 0.1);
        let mean = ws.len() as f64 / ws.runs() as f64;
        assert!((3.3..4.7).contains(&mean), "mean run {mean}");
        // Distinct runs: count maximal contiguous stretches; with gaps enforced it equals runs().
        let stretches = 1 + ws.pages().windows(2).filter(|w| w[1] != w[0] + 1).count();
        assert_eq!(stretches, ws.runs());
    }

    #[test]
    fn orders_are_permutations_and_differ() {
        let ws = WorkingSet::generate(3, 4096, 0.1);
        let a = ws.order_for(3, 0);
        let b = ws.order_for(3, 1);
        assert_ne!(a, b);
        assert_eq!(a, ws.order_for(3, 0));
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, ws.pages());
    }

    #[test]
    fn staggered_starts() {
        assert_eq!(start_time_ns(1, 5, 0), 0);
        let t = start_time_ns(1, 5, 1_000_000);
        assert!(t <= 1_000_000);
        assert_eq!(t, start_time_ns(1, 5, 1_000_000));
    }
}
