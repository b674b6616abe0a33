//! The sender skips zstd for pages a sample of which looks random, and only for those.

use spindrift_protocol::sender::looks_incompressible;

fn random_page(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn random_pages_look_incompressible() {
    for seed in 1..=200 {
        assert!(looks_incompressible(&random_page(seed)), "random page {seed}");
    }
}

#[test]
fn compressible_pages_are_still_tried() {
    let zero = vec![0u8; 4096];
    let text: Vec<u8> =
        b"The quick brown fox jumps over the lazy dog; 0123456789. ".iter().copied().cycle().take(4096).collect();
    let mut half = random_page(7);
    half[2048..].fill(0);
    // Small integers in 32-bit words, as in a guest's data structures.
    let words: Vec<u8> = (0u32..1024).flat_map(|i| (i * 7 % 300).to_le_bytes()).collect();
    for (name, page) in [("zero", zero), ("text", text), ("half random", half), ("words", words)] {
        assert!(!looks_incompressible(&page), "{name} page");
        let frame = zstd::bulk::compress(&page, 1).expect("zstd");
        assert!(frame.len() < page.len(), "{name} page: zstd saves bytes, so it must be tried");
    }
    assert!(!looks_incompressible(&[0xAB; 100]), "too short to sample");
}
