//! [`PageRanges`]: a set of guest pages kept as sorted, disjoint, non-adjacent runs. The zero map,
//! the discard hints and the pages the VMM loaded are all such sets; the descriptor stores them
//! run-length encoded.

use std::collections::BTreeMap;

/// A run of pages: `[start, start + count)`, in page numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRun {
    /// First page.
    pub start: u64,
    /// Number of pages (never 0 in a [`PageRanges`]).
    pub count: u64,
}

impl PageRun {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.count)
    }
}

/// A set of pages as runs. Runs are merged on insertion, so equal sets have equal representations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRanges {
    /// start -> end (exclusive).
    runs: BTreeMap<u64, u64>,
    pages: u64,
}

impl PageRanges {
    /// The empty set.
    pub fn new() -> PageRanges {
        PageRanges::default()
    }

    /// Adds `[start, start + count)`.
    pub fn insert(&mut self, start: u64, count: u64) {
        if count == 0 {
            return;
        }
        let mut lo = start;
        let mut hi = start.saturating_add(count);
        // A run starting at or before `lo` that reaches it absorbs us.
        if let Some((&s, &e)) = self.runs.range(..=lo).next_back() {
            if e >= lo {
                lo = s;
                hi = hi.max(e);
            }
        }
        // Runs starting inside [lo, hi] merge in.
        let inside: Vec<(u64, u64)> = self.runs.range(lo..=hi).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            hi = hi.max(e);
            self.runs.remove(&s);
            self.pages -= e - s;
        }
        if let Some(e) = self.runs.remove(&lo) {
            self.pages -= e - lo;
        }
        self.runs.insert(lo, hi);
        self.pages += hi - lo;
    }

    /// Adds every run of `other`.
    pub fn extend(&mut self, other: &PageRanges) {
        for run in other.iter() {
            self.insert(run.start, run.count);
        }
    }

    /// Whether `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        self.runs.range(..=page).next_back().is_some_and(|(_, &e)| page < e)
    }

    /// Whether any page of `[start, start + count)` is in the set.
    pub fn intersects(&self, start: u64, count: u64) -> bool {
        let end = start.saturating_add(count);
        if count == 0 {
            return false;
        }
        if self.contains(start) {
            return true;
        }
        self.runs.range(start..end).next().is_some()
    }

    /// The runs, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = PageRun> + '_ {
        self.runs.iter().map(|(&s, &e)| PageRun { start: s, count: e - s })
    }

    /// Number of runs.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// Number of pages.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// One past the highest page (0 if empty).
    pub fn end(&self) -> u64 {
        self.runs.iter().next_back().map_or(0, |(_, &e)| e)
    }

    /// The pages of `[0, total)` not in the set.
    pub fn complement(&self, total: u64) -> PageRanges {
        let mut out = PageRanges::new();
        let mut at = 0;
        for run in self.iter() {
            if run.start >= total {
                break;
            }
            if run.start > at {
                out.insert(at, run.start - at);
            }
            at = at.max(run.end());
        }
        if at < total {
            out.insert(at, total - at);
        }
        out
    }

    /// The set minus `other`.
    pub fn subtract(&self, other: &PageRanges) -> PageRanges {
        let mut out = PageRanges::new();
        for run in self.iter() {
            let mut at = run.start;
            let holes = other.runs.range(..run.end()).filter(|(_, &e)| e > run.start);
            for (&s, &e) in holes {
                if s > at {
                    out.insert(at, s - at);
                }
                at = at.max(e);
            }
            if at < run.end() {
                out.insert(at, run.end() - at);
            }
        }
        out
    }

    /// Builds the set of pages whose bit is set in `bitmap` (bit `i % 64` of word `i / 64` is page
    /// `first + i`), as KVM's dirty log is laid out. Bits past `pages` are ignored.
    pub fn from_bitmap(bitmap: &[u64], first: u64, pages: u64) -> PageRanges {
        let mut out = PageRanges::new();
        let mut run_start: Option<u64> = None;
        for i in 0..pages {
            let word = bitmap.get((i / 64) as usize).copied().unwrap_or(0);
            let set = word & (1 << (i % 64)) != 0;
            match (set, run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(s)) => {
                    out.insert(first + s, i - s);
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            out.insert(first + s, pages - s);
        }
        out
    }
}

impl FromIterator<PageRun> for PageRanges {
    fn from_iter<I: IntoIterator<Item = PageRun>>(iter: I) -> PageRanges {
        let mut out = PageRanges::new();
        for run in iter {
            out.insert(run.start, run.count);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn runs(r: &PageRanges) -> Vec<(u64, u64)> {
        r.iter().map(|x| (x.start, x.count)).collect()
    }

    #[test]
    fn merges_overlapping_and_adjacent_runs() {
        let mut r = PageRanges::new();
        r.insert(10, 5);
        r.insert(20, 5);
        assert_eq!(runs(&r), vec![(10, 5), (20, 5)]);
        r.insert(15, 5); // fills the gap exactly: one run
        assert_eq!(runs(&r), vec![(10, 15)]);
        r.insert(0, 11);
        assert_eq!(runs(&r), vec![(0, 25)]);
        r.insert(3, 2);
        assert_eq!(runs(&r), vec![(0, 25)]);
        assert_eq!(r.page_count(), 25);
        assert!(r.contains(24) && !r.contains(25));
    }

    #[test]
    fn complement_and_subtract() {
        let r: PageRanges = [PageRun { start: 2, count: 3 }, PageRun { start: 8, count: 1 }].into_iter().collect();
        assert_eq!(runs(&r.complement(10)), vec![(0, 2), (5, 3), (9, 1)]);
        let mut big = PageRanges::new();
        big.insert(0, 10);
        assert_eq!(runs(&big.subtract(&r)), vec![(0, 2), (5, 3), (9, 1)]);
        assert!(r.intersects(4, 10) && !r.intersects(5, 3));
    }

    #[test]
    fn from_bitmap_reads_kvm_layout() {
        let bm = [0b1110u64, 1 << 63, 1];
        let r = PageRanges::from_bitmap(&bm, 100, 130);
        assert_eq!(runs(&r), vec![(101, 3), (227, 2)]);
    }

    proptest! {
        #[test]
        fn behaves_like_a_set(ops in proptest::collection::vec((0u64..200, 0u64..20), 0..40)) {
            let mut r = PageRanges::new();
            let mut set = std::collections::BTreeSet::new();
            for (s, c) in ops {
                r.insert(s, c);
                set.extend(s..s + c);
            }
            prop_assert_eq!(r.page_count(), set.len() as u64);
            for p in 0..230 {
                prop_assert_eq!(r.contains(p), set.contains(&p));
            }
            // Canonical: no two runs touch.
            let v = runs(&r);
            for w in v.windows(2) {
                prop_assert!(w[0].0 + w[0].1 < w[1].0);
            }
            let c = r.complement(230);
            prop_assert_eq!(c.page_count() + r.page_count(), 230);
        }
    }
}
