//! A deterministic memory image: the pages the simulated server serves and the receivers check.
//!
//! Pages are of three kinds, drawn independently per page so any subset of pages (the working set, the
//! rest) follows the same mix: zero pages, text-like pages (words from a small vocabulary and structured
//! records, which compress) and random pages (which do not).

use rand::Rng;
use serde::Serialize;

use super::rng::{self, Domain, SplitMix64};
use crate::sender::PageSource;

/// log2 of the simulated page size.
pub const PAGE_SHIFT: u8 = 12;
/// The simulated page size (4 KiB).
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;

/// What fraction of pages is of each kind (random pages make up the rest).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ContentMix {
    /// Fraction of all-zero pages.
    pub zero: f64,
    /// Fraction of text-like, compressible pages.
    pub text: f64,
}

impl Default for ContentMix {
    fn default() -> Self {
        ContentMix { zero: 0.4, text: 0.3 }
    }
}

/// The kind of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// All zero bytes.
    Zero,
    /// Text and records: compressible.
    Text,
    /// Random bytes: incompressible.
    Random,
}

/// A memory image of `page_count` 4 KiB pages, all in one buffer.
pub struct Image {
    data: Vec<u8>,
    kinds: Vec<PageKind>,
    /// Bit per page: set when the page's bytes are all zero (computed from the bytes).
    zero: Vec<u64>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("pages", &self.kinds.len()).finish()
    }
}

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "page", "memory", "clone", "host", "server", "fault", "cache", "stream", "block", "parity", "of",
    "and", "to", "in", "a", "is", "that", "for", "with", "as", "on", "kernel", "guest", "vcpu", "snapshot",
    "multicast", "receiver", "sender", "packet", "loss", "repair", "request", "working", "set", "data",
    "node", "session", "epoch", "window", "rate", "delay", "queue", "timer", "event", "report", "fork",
    "image", "zero", "run", "offset", "length", "record", "value", "name", "id", "state", "ready", "done",
    "error", "retry", "count", "total", "index",
];

/// Length of the shared text corpus text pages are cut from.
const CORPUS_LEN: usize = 64 << 10;

/// A corpus of prose-like lines and structured records, with a page's worth of wrap-around at the end
/// so any offset below `CORPUS_LEN` starts a whole page.
fn corpus(rng: &mut impl Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(CORPUS_LEN + PAGE_SIZE + 128);
    let mut id = 0u32;
    while out.len() < CORPUS_LEN {
        if rng.random_bool(0.5) {
            // A prose-like line.
            let n = rng.random_range(6..16);
            for i in 0..n {
                if i > 0 {
                    out.push(b' ');
                }
                out.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
            }
            out.extend_from_slice(b".\n");
        } else {
            // A structured record.
            id += 1;
            let name = WORDS[rng.random_range(0..WORDS.len())];
            let state = WORDS[rng.random_range(0..WORDS.len())];
            let value: u32 = rng.random_range(0..100_000);
            let line = format!("{{\"id\":{id:08},\"name\":\"{name}\",\"state\":\"{state}\",\"value\":{value}}}\n");
            out.extend_from_slice(line.as_bytes());
        }
    }
    out.truncate(CORPUS_LEN);
    let head = out[..PAGE_SIZE].to_vec();
    out.extend_from_slice(&head);
    out
}

impl Image {
    /// The image of `page_count` pages for `seed` with the default mix.
    pub fn generate(seed: u64, page_count: u32) -> Image {
        Image::generate_with(seed, page_count, ContentMix::default())
    }

    /// The image of `page_count` pages for `seed` with the given mix.
    pub fn generate_with(seed: u64, page_count: u32, mix: ContentMix) -> Image {
        let mut rng = rng::stream(seed, Domain::Content, 0);
        let corpus = corpus(&mut rng);
        let pages = page_count as usize;
        let mut data = vec![0u8; pages * PAGE_SIZE];
        let mut kinds = Vec::with_capacity(pages);
        let filler_base = rng.random::<u64>();
        for (page, buf) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
            let x: f64 = rng.random();
            let kind = if x < mix.zero {
                PageKind::Zero
            } else if x < mix.zero + mix.text {
                PageKind::Text
            } else {
                PageKind::Random
            };
            kinds.push(kind);
            match kind {
                PageKind::Zero => {}
                PageKind::Random => {
                    SplitMix64(filler_base ^ (page as u64).wrapping_mul(0xA076_1D64_78BD_642F)).fill(buf);
                }
                PageKind::Text => {
                    let off = rng.random_range(0..CORPUS_LEN);
                    buf.copy_from_slice(&corpus[off..off + PAGE_SIZE]);
                    // Stamp the page number every 512 bytes so no two text pages are equal.
                    let stamp = format!("<{page:08x}>");
                    for at in (0..PAGE_SIZE).step_by(512) {
                        buf[at..at + stamp.len()].copy_from_slice(stamp.as_bytes());
                    }
                }
            }
        }
        let mut zero = vec![0u64; pages.div_ceil(64)];
        for (page, bytes) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let is_zero = match kinds[page] {
                PageKind::Zero => true,
                _ => bytes.chunks_exact(8).all(|w| w == [0u8; 8]),
            };
            if is_zero {
                zero[page / 64] |= 1 << (page % 64);
            }
        }
        Image { data, kinds, zero }
    }

    /// The whole image, page after page (for writing it to a file or serving it from memory).
    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }

    /// Number of pages.
    pub fn page_count(&self) -> u32 {
        self.kinds.len() as u32
    }

    /// The bytes of `page`.
    pub fn page(&self, page: u32) -> &[u8] {
        let at = page as usize * PAGE_SIZE;
        &self.data[at..at + PAGE_SIZE]
    }

    /// The kind of `page`.
    pub fn kind(&self, page: u32) -> PageKind {
        self.kinds[page as usize]
    }

    /// True when `page` holds only zero bytes.
    pub fn is_zero(&self, page: u32) -> bool {
        self.zero[page as usize / 64] & (1 << (page % 64)) != 0
    }
}

impl PageSource for Image {
    fn page_count(&self) -> u32 {
        Image::page_count(self)
    }
    fn page(&self, page: u32) -> &[u8] {
        Image::page(self, page)
    }
}

impl PageSource for std::rc::Rc<Image> {
    fn page_count(&self) -> u32 {
        Image::page_count(self)
    }
    fn page(&self, page: u32) -> &[u8] {
        Image::page(self, page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_close_to_requested_and_kinds_match_bytes() {
        let img = Image::generate(3, 4096);
        let mut counts = [0usize; 3];
        for p in 0..img.page_count() {
            match img.kind(p) {
                PageKind::Zero => {
                    counts[0] += 1;
                    assert!(img.is_zero(p));
                    assert!(img.page(p).iter().all(|&b| b == 0));
                }
                PageKind::Text => {
                    counts[1] += 1;
                    assert!(!img.is_zero(p));
                    assert!(img.page(p).iter().all(|b| b.is_ascii()));
                }
                PageKind::Random => {
                    counts[2] += 1;
                    assert!(!img.is_zero(p));
                }
            }
        }
        let frac = |c: usize| c as f64 / 4096.0;
        assert!((frac(counts[0]) - 0.4).abs() < 0.04, "{counts:?}");
        assert!((frac(counts[1]) - 0.3).abs() < 0.04, "{counts:?}");
        assert!((frac(counts[2]) - 0.3).abs() < 0.04, "{counts:?}");
    }

    #[test]
    fn deterministic_by_seed() {
        let a = Image::generate(9, 256);
        let b = Image::generate(9, 256);
        let c = Image::generate(10, 256);
        assert!((0..256).all(|p| a.page(p) == b.page(p)));
        assert!((0..256).any(|p| a.page(p) != c.page(p)));
    }

    #[test]
    fn text_pages_compress_and_random_pages_do_not() {
        let img = Image::generate(5, 512);
        for p in 0..img.page_count() {
            let c = zstd::bulk::compress(img.page(p), 1).expect("compress");
            match img.kind(p) {
                PageKind::Text => assert!(c.len() < PAGE_SIZE * 3 / 4, "text page {p} -> {}", c.len()),
                PageKind::Random => assert!(c.len() >= PAGE_SIZE, "random page {p} -> {}", c.len()),
                PageKind::Zero => assert!(c.len() < 64),
            }
        }
    }
}
