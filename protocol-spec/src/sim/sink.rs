//! A [`PageSink`] that checks every page a receiver stores against the server's image.

use std::rc::Rc;

use serde::Serialize;

use super::content::{Image, PAGE_SIZE};
use crate::receiver::PageSink;

/// What a verifying sink saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SinkStats {
    /// Pages stored (a page stored twice counts twice; zero runs count each page).
    pub pages_stored: u64,
    /// Distinct pages stored.
    pub unique_pages: u64,
    /// Pages stored whose bytes differ from the image (or out of range, or of the wrong size).
    pub mismatches: u64,
    /// Of the mismatches: pages stored as zero that are not zero in the image.
    pub zero_mismatches: u64,
}

impl SinkStats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &SinkStats) {
        self.pages_stored += other.pages_stored;
        self.unique_pages += other.unique_pages;
        self.mismatches += other.mismatches;
        self.zero_mismatches += other.zero_mismatches;
    }
}

/// A receiver's page cache in the simulator: keeps no bytes, only which pages arrived, and compares
/// each stored page with the image as it is stored.
#[derive(Debug)]
pub struct VerifyingSink {
    image: Rc<Image>,
    have: Vec<u64>,
    stats: SinkStats,
    first_mismatch: Option<u32>,
}

impl VerifyingSink {
    /// An empty cache for pages of `image`.
    pub fn new(image: Rc<Image>) -> VerifyingSink {
        let words = (image.page_count() as usize).div_ceil(64);
        VerifyingSink { image, have: vec![0; words], stats: SinkStats::default(), first_mismatch: None }
    }

    /// True when `page` has been stored.
    pub fn has(&self, page: u32) -> bool {
        self.have.get(page as usize / 64).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The counters.
    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }

    /// The first page stored with wrong contents, if any.
    pub fn first_mismatch(&self) -> Option<u32> {
        self.first_mismatch
    }

    fn mark(&mut self, page: u32, ok: bool) {
        self.stats.pages_stored += 1;
        if !ok {
            self.stats.mismatches += 1;
            self.first_mismatch.get_or_insert(page);
            tracing::warn!(page, "simulated receiver stored a page that differs from the image");
        }
        if let Some(w) = self.have.get_mut(page as usize / 64) {
            let bit = 1 << (page % 64);
            if *w & bit == 0 {
                *w |= bit;
                self.stats.unique_pages += 1;
            }
        }
    }
}

impl PageSink for VerifyingSink {
    fn store(&mut self, page: u32, data: &[u8]) {
        let ok = page < self.image.page_count() && data.len() == PAGE_SIZE && self.image.page(page) == data;
        self.mark(page, ok);
    }

    fn store_zero(&mut self, first_page: u32, count: u32) {
        for page in first_page..first_page.saturating_add(count) {
            let ok = page < self.image.page_count() && self.image.is_zero(page);
            if !ok {
                self.stats.zero_mismatches += 1;
            }
            self.mark(page, ok);
            if page >= self.image.page_count() {
                // Do not walk a corrupt run across billions of pages.
                self.stats.mismatches += u64::from(first_page.saturating_add(count) - page - 1);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::content::PageKind;

    #[test]
    fn checks_pages_and_zero_runs() {
        let img = Rc::new(Image::generate(4, 64));
        let mut sink = VerifyingSink::new(img.clone());
        let data_page = (0..64).find(|&p| img.kind(p) != PageKind::Zero).expect("a non-zero page");
        let zero_page = (0..64).find(|&p| img.kind(p) == PageKind::Zero).expect("a zero page");
        sink.store(data_page, img.page(data_page));
        assert!(sink.has(data_page));
        assert_eq!(sink.stats().mismatches, 0);
        sink.store_zero(zero_page, 1);
        assert_eq!(sink.stats().mismatches, 0);
        assert_eq!(sink.stats().unique_pages, 2);

        let mut bad = img.page(data_page).to_vec();
        bad[100] ^= 1;
        sink.store(data_page, &bad);
        assert_eq!(sink.stats().mismatches, 1);
        assert_eq!(sink.first_mismatch(), Some(data_page));
        sink.store_zero(data_page, 1);
        assert_eq!(sink.stats().zero_mismatches, 1);
        sink.store_zero(60, 1_000_000);
        assert!(sink.stats().mismatches >= 1_000_000 - 4);
        assert!((60..64).all(|p| sink.has(p)));
    }
}
