//! The page cache on its own: lazy reservation, insert/get, zero pages, wake-ups, concurrency.

// `is_multiple_of` is newer than the workspace MSRV (1.85).
#![allow(clippy::unwrap_used, clippy::manual_is_multiple_of, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use spindrift_client::waker::Waker;
use spindrift_client::{Inserted, PageCache, PageState};

const PAGE: usize = 4096;

fn page_of(byte: u8) -> Vec<u8> {
    vec![byte; PAGE]
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
}

#[test]
fn a_64_gib_image_reserves_address_space_only() {
    let before = rss_kib();
    let cache = PageCache::new(64 << 30).unwrap();
    let last = cache.page_count() - 1;
    cache.insert(last, &page_of(7)).unwrap();
    cache.insert_zero(0, 1 << 20).unwrap(); // 4 GiB of zero pages: bitmap work only.
    let grown = rss_kib().saturating_sub(before);
    // Four bitmaps of 2 MiB each plus one page (other tests in this process add a few MiB): nothing
    // near the 4 GiB of zero pages, let alone the image size. (Without MAP_NORESERVE the mapping itself
    // would fail under heuristic overcommit on a machine with less memory than the image.)
    assert!(grown < 128 * 1024, "RSS grew by {grown} KiB");
    assert_eq!(cache.get(last), Some(&page_of(7)[..]));
    assert_eq!(cache.state(5), PageState::Zero);
    assert_eq!(cache.present_count(), (1 << 20) + 1);
}

#[test]
fn inserts_are_write_once_and_zero_data_becomes_a_zero_page() {
    let cache = PageCache::new(8 * PAGE as u64).unwrap();
    assert_eq!(cache.state(1), PageState::Missing);
    assert_eq!(cache.insert(1, &page_of(1)).unwrap(), Inserted::New);
    assert_eq!(cache.insert(1, &page_of(2)).unwrap(), Inserted::Duplicate);
    assert_eq!(cache.get(1), Some(&page_of(1)[..]));
    assert_eq!(cache.insert(2, &page_of(0)).unwrap(), Inserted::New);
    assert_eq!(cache.state(2), PageState::Zero);
    assert_eq!(cache.insert_zero(0, 4).unwrap(), 2, "pages 1 and 2 were present already");
    assert_eq!(cache.get_run(0, 4).map(|r| r.len()), Some(4 * PAGE));
    assert_eq!(cache.get_run(0, 5), None);
}

#[test]
fn bad_input_is_reported() {
    assert_eq!(
        PageCache::new(1000).unwrap_err().to_string(),
        "image size 1000 bytes is not a positive multiple of the 4096-byte page"
    );
    let cache = PageCache::new(4 * PAGE as u64).unwrap();
    assert_eq!(cache.insert(4, &page_of(1)).unwrap_err().to_string(), "pages [4, +1) are outside the image (4 pages)");
    assert_eq!(cache.insert(0, &[1; 10]).unwrap_err().to_string(), "page 0: got 10 bytes, a page is 4096");
    assert_eq!(cache.insert_zero(2, 3).unwrap_err().to_string(), "pages [2, +3) are outside the image (4 pages)");
}

#[test]
fn only_wanted_pages_wake_subscribers() {
    let cache = PageCache::new(8 * PAGE as u64).unwrap();
    let waker = Arc::new(Waker::new().unwrap());
    cache.subscribe(&waker);
    cache.insert(0, &page_of(1)).unwrap();
    assert!(!waker.take(), "nobody wanted page 0");
    assert!(!cache.want(3));
    cache.insert_zero(2, 3).unwrap();
    assert!(waker.take(), "page 3 was wanted");
    assert!(cache.want(3), "present now: want() says so");
    assert!(cache.wait_present(3, Duration::ZERO));
}

#[test]
fn wait_present_returns_on_insert_or_times_out() {
    let cache = Arc::new(PageCache::new(8 * PAGE as u64).unwrap());
    let started = Instant::now();
    assert!(!cache.wait_present(6, Duration::from_millis(20)));
    assert!(started.elapsed() >= Duration::from_millis(20));

    let c = cache.clone();
    let waiter = std::thread::spawn(move || c.wait_present(5, Duration::from_secs(30)));
    cache.insert(5, &page_of(5)).unwrap();
    assert!(waiter.join().unwrap());
}

#[test]
fn concurrent_inserters_and_readers_only_see_whole_pages() {
    let pages = 4096u64;
    let cache = Arc::new(PageCache::new(pages * PAGE as u64).unwrap());
    let inserters: Vec<_> = (0..2u64)
        .map(|t| {
            let c = cache.clone();
            std::thread::spawn(move || {
                for p in (0..pages).filter(|p| p % 2 == t) {
                    c.insert(p, &page_of((p % 251) as u8 + 1)).unwrap();
                }
            })
        })
        .collect();
    let c = cache.clone();
    let reader = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = 0;
        while seen < pages {
            assert!(Instant::now() < deadline, "only {seen} of {pages} pages appeared");
            seen = 0;
            for p in 0..pages {
                if let Some(data) = c.get(p) {
                    assert!(data.iter().all(|&b| b == (p % 251) as u8 + 1), "torn page {p}");
                    seen += 1;
                }
            }
        }
    });
    for t in inserters {
        t.join().unwrap();
    }
    reader.join().unwrap();
    assert_eq!(cache.present_count(), pages);
}
