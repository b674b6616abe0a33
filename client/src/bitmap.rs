//! Bitmaps over page indices: [`AtomicBitmap`] (shared between threads) and [`Bitmap`] (one owner).

use std::sync::atomic::{AtomicU64, Ordering};

/// `(word index, mask)` pieces covering bits `[first, first + count)`.
fn words(first: u64, count: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = first + count;
    let mut bit = first;
    std::iter::from_fn(move || {
        if bit >= end {
            return None;
        }
        let word = bit / 64;
        let lo = bit % 64;
        let hi = (end - word * 64).min(64);
        let mask = if hi - lo == 64 { u64::MAX } else { ((1u64 << (hi - lo)) - 1) << lo };
        bit = word * 64 + hi;
        Some((word as usize, mask))
    })
}

/// A fixed-size bitmap of atomic words. Every operation is `SeqCst`: the cache relies on a total order
/// between "page present" and "page wanted" (see `PageCache::want`).
#[derive(Debug)]
pub(crate) struct AtomicBitmap {
    words: Box<[AtomicU64]>,
}

impl AtomicBitmap {
    pub(crate) fn new(bits: u64) -> Self {
        AtomicBitmap { words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
    }

    pub(crate) fn get(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize].load(Ordering::SeqCst) & (1 << (bit % 64)) != 0
    }

    /// Sets `[first, first + count)`; calls `f(word, newly_set_mask)` for each word with new bits.
    pub(crate) fn set_range(&self, first: u64, count: u64, mut f: impl FnMut(usize, u64)) {
        for (w, mask) in words(first, count) {
            let old = self.words[w].fetch_or(mask, Ordering::SeqCst);
            if mask & !old != 0 {
                f(w, mask & !old);
            }
        }
    }

    /// Sets the bits of `mask` in word `w`; returns the bits that were already set.
    pub(crate) fn or_word(&self, w: usize, mask: u64) -> u64 {
        self.words[w].fetch_or(mask, Ordering::SeqCst) & mask
    }

    /// Clears the bits of `mask` in word `w`; returns the bits that were set.
    pub(crate) fn take_word(&self, w: usize, mask: u64) -> u64 {
        self.words[w].fetch_and(!mask, Ordering::SeqCst) & mask
    }

    /// Whether every bit of `[first, first + count)` is set.
    pub(crate) fn all(&self, first: u64, count: u64) -> bool {
        words(first, count).all(|(w, mask)| self.words[w].load(Ordering::SeqCst) & mask == mask)
    }
}

/// A fixed-size bitmap owned by one thread.
#[derive(Debug, Clone)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    pub(crate) fn new(bits: u64) -> Self {
        Bitmap { words: vec![0; bits.div_ceil(64) as usize] }
    }

    #[cfg(test)]
    pub(crate) fn get(&self, bit: u64) -> bool {
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    pub(crate) fn set_range(&mut self, first: u64, count: u64, value: bool) {
        for (w, mask) in words(first, count) {
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
        }
    }

    /// Whether any bit of `[first, first + count)` is set.
    pub(crate) fn any(&self, first: u64, count: u64) -> bool {
        words(first, count).any(|(w, mask)| self.words[w] & mask != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cross_word_boundaries() {
        let mut b = Bitmap::new(200);
        b.set_range(60, 70, true);
        assert!(!b.get(59) && b.get(60) && b.get(129) && !b.get(130));
        assert!(b.any(0, 61) && !b.any(0, 60) && !b.any(130, 70));
        b.set_range(64, 64, false);
        assert!(b.get(63) && !b.get(64) && !b.get(127) && b.get(128));

        let a = AtomicBitmap::new(200);
        let mut newly = 0;
        a.set_range(10, 120, |_, m| newly += m.count_ones());
        assert_eq!(newly, 120);
        a.set_range(0, 200, |_, m| newly += m.count_ones());
        assert_eq!(newly, 200);
        assert!(a.all(0, 200) && a.get(199));
    }
}
