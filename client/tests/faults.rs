//! Fault service end to end, in one process: a "clone" (anonymous memory registered with a
//! userfaultfd, touched by several threads) and a fault server thread serving it from a page cache.

// `is_multiple_of` is newer than the workspace MSRV (1.85).
#![allow(clippy::unwrap_used, clippy::manual_is_multiple_of, missing_docs)]

mod common;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use spindrift_client::uffd::FEATURE_EVENT_REMOVE;
use spindrift_client::{PageCache, ServerConfig};

const PAGES: u64 = 1024; // 4 MiB image

fn is_zero(page: u64) -> bool {
    page % 5 == 0 || (600..700).contains(&page)
}

fn is_missing(page: u64) -> bool {
    page % 13 == 7 && !is_zero(page)
}

/// Two regions mapping the image crosswise: the clone's first half is the image's second half.
fn crosswise(base: u64) -> (Vec<spindrift_client::Region>, impl Fn(u64) -> u64 + Copy) {
    let half = PAGES / 2 * PAGE as u64;
    let regions = vec![region(base, half, half), region(base + half, half, 0)];
    (regions, |clone_page: u64| (clone_page + PAGES / 2) % PAGES)
}

#[test]
fn concurrent_touches_see_every_byte_and_missing_pages_arrive_on_request() {
    let Some(uffd) =
        uffd_or_skip("concurrent_touches_see_every_byte_and_missing_pages_arrive_on_request", FEATURE_EVENT_REMOVE)
    else {
        return;
    };
    let deadline = Instant::now() + DEADLINE;
    let cache = Arc::new(PageCache::new(PAGES * PAGE as u64).unwrap());
    fill_cache(&cache, is_zero, is_missing);
    let mut mem = register(&uffd, (PAGES * PAGE as u64) as usize);
    let (regions, image_of) = crosswise(mem.addr);
    let mut server = start_server(&uffd, regions, cache.clone(), ServerConfig::default());

    // The "network": insert exactly the pages the server reports missing, when it reports them.
    let net_cache = cache.clone();
    let (stop_net_tx, stop_net_rx) = std::sync::mpsc::channel::<()>();
    let missing = std::mem::replace(&mut server.missing, std::sync::mpsc::channel().1);
    let net = on_thread(move || {
        let mut inserted = Vec::new();
        loop {
            match missing.recv_timeout(Duration::from_millis(50)) {
                Ok(pages) => {
                    for p in pages {
                        assert!(is_missing(p), "server asked for page {p}, which the cache has");
                        net_cache.insert(p, &image_page(p, is_zero).unwrap()).unwrap();
                        inserted.push(p);
                    }
                }
                Err(_) if stop_net_rx.try_recv().is_ok() => return inserted,
                Err(_) => {}
            }
        }
    });

    let base = mem.addr;
    let expect = move |clone_page: u64| expected(image_of(clone_page), is_zero);
    let forward = on_thread(move || touch_and_check(base, (0..PAGES).collect(), expect));
    let backward = on_thread(move || touch_and_check(base, (0..PAGES).rev().collect(), expect));
    let random = on_thread(move || touch_and_check(base, shuffled(PAGES, 42), expect));
    let writer = on_thread(move || {
        // Write faults: store the byte that is already expected there, so readers stay consistent.
        for p in (3..PAGES).step_by(7) {
            write_byte(base + p * PAGE as u64 + 100, expect(p)[100]);
        }
    });
    for (rx, what) in [(&forward, "forward reader"), (&backward, "backward reader"), (&random, "random reader")] {
        if let Err(e) = wait(rx, deadline, what) {
            mem.leak();
            panic!("{what}: {e}");
        }
    }
    wait(&writer, deadline, "writer");

    stop_net_tx.send(()).unwrap();
    let mut inserted = wait(&net, deadline, "network thread");
    let stats = server.stop();
    inserted.sort_unstable();
    let want_missing: Vec<u64> = (0..PAGES).filter(|&p| is_missing(p)).collect();
    assert_eq!(inserted, want_missing, "each missing page is requested exactly once");
    assert_eq!(stats.missing_reported, want_missing.len() as u64);
    assert_eq!(stats.pages_copied + stats.pages_zeroed, PAGES, "every page installed exactly once: {stats:?}");
    assert!(stats.copy_ioctls < stats.pages_copied, "data pages went in batches: {stats:?}");
    assert!(stats.zero_ioctls < stats.pages_zeroed, "zero pages went in batches: {stats:?}");
    assert!(stats.parked > 0, "some faults waited for the network: {stats:?}");
    eprintln!("stats: {stats:?}");
}

#[test]
fn parked_fault_waits_for_the_page_and_wakes_when_it_is_inserted() {
    let Some(uffd) = uffd_or_skip("parked_fault_waits_for_the_page_and_wakes_when_it_is_inserted", 0) else { return };
    let deadline = Instant::now() + DEADLINE;
    let cache = Arc::new(PageCache::new(16 * PAGE as u64).unwrap());
    fill_cache(&cache, |_| false, |p| p == 5);
    let mut mem = register(&uffd, 16 * PAGE);
    let server =
        start_server(&uffd, vec![region(mem.addr, 16 * PAGE as u64, 0)], cache.clone(), ServerConfig::default());

    let base = mem.addr;
    let reader = on_thread(move || touch_and_check(base, vec![5], |p| expected(p, |_| false)));
    let asked = server.missing.recv_timeout(DEADLINE).expect("the server never reported page 5 missing");
    assert_eq!(asked, vec![5]);
    // The reader is blocked in the kernel until the page is there.
    assert!(reader.try_recv().is_err(), "the faulting thread finished before its page existed");
    let inserted_at = Instant::now();
    cache.insert(5, &image_page(5, |_| false).unwrap()).unwrap();
    let result = wait(&reader, deadline, "reader of the missing page");
    let woke_after = inserted_at.elapsed();
    if let Err(e) = result {
        mem.leak();
        panic!("{e}");
    }
    let stats = server.stop();
    assert_eq!((stats.parked, stats.missing_reported), (1, 1), "{stats:?}");
    eprintln!("insert -> faulting thread resumed: {woke_after:?}");
}

#[test]
fn eexist_from_a_racing_copy_still_wakes_the_faulting_thread() {
    let Some(uffd) = uffd_or_skip("eexist_from_a_racing_copy_still_wakes_the_faulting_thread", 0) else { return };
    let deadline = Instant::now() + DEADLINE;
    let cache = Arc::new(PageCache::new(16 * PAGE as u64).unwrap());
    fill_cache(&cache, |_| false, |_| false);
    let mut mem = register(&uffd, 16 * PAGE);
    let base = mem.addr;

    // The fault happens before any server exists...
    let reader = on_thread(move || touch_and_check(base, vec![3], |p| expected(p, |_| false)));
    let mut pfd = libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&uffd.as_fd()), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for a descriptor we hold; the kernel writes only `revents`.
    let ready = unsafe { libc::poll(&mut pfd, 1, DEADLINE.as_millis() as i32) };
    assert_eq!(ready, 1, "the touching thread never faulted");
    // ...then another party installs the page without waking anyone (a racing copy).
    let racing = uffd.copy(base + 3 * PAGE as u64, &expected(3, |_| false), false).unwrap();
    assert_eq!(racing, spindrift_client::uffd::Fill::Done);
    assert!(reader.try_recv().is_err(), "DONTWAKE copy woke the thread");

    // The server then reads the fault, gets EEXIST, and must wake the thread itself.
    let server = start_server(&uffd, vec![region(base, 16 * PAGE as u64, 0)], cache, ServerConfig::default());
    if let Err(e) = wait(&reader, deadline, "reader woken after EEXIST") {
        mem.leak();
        panic!("{e}");
    }
    let stats = server.stop();
    assert_eq!(stats.exists, 1, "{stats:?}");
}

#[test]
fn madvise_dontneed_forgets_the_range_and_retouch_reads_zeros() {
    let Some(uffd) = uffd_or_skip("madvise_dontneed_forgets_the_range_and_retouch_reads_zeros", FEATURE_EVENT_REMOVE)
    else {
        return;
    };
    let deadline = Instant::now() + DEADLINE;
    let pages = 64u64;
    let cache = Arc::new(PageCache::new(pages * PAGE as u64).unwrap());
    fill_cache(&cache, |_| false, |_| false);
    let mut mem = register(&uffd, (pages * PAGE as u64) as usize);
    let base = mem.addr;
    let server = start_server(&uffd, vec![region(base, pages * PAGE as u64, 0)], cache, ServerConfig::default());

    let first = on_thread(move || {
        let n = touch_and_check(base, (0..pages).collect(), |p| expected(p, |_| false))?;
        for p in 10..20 {
            write_byte(base + p * PAGE as u64, 0xAB);
        }
        Ok::<usize, String>(n)
    });
    wait(&first, deadline, "first touch").unwrap();

    // madvise blocks until the server has read the REMOVE event: run it on a thread, bounded.
    let (start, len) = (base + 8 * PAGE as u64, 16 * PAGE);
    let advise = on_thread(move || {
        // SAFETY: the range lies inside the live test mapping; DONTNEED only drops its pages.
        unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) }
    });
    assert_eq!(wait(&advise, deadline, "madvise(DONTNEED)"), 0);

    let retouch = on_thread(move || {
        touch_and_check(base, (0..pages).collect(), |p| {
            if (8..24).contains(&p) {
                vec![0; PAGE]
            } else {
                expected(p, |_| false)
            }
        })
    });
    if let Err(e) = wait(&retouch, deadline, "re-touch") {
        mem.leak();
        panic!("{e}");
    }
    let stats = server.stop();
    assert_eq!(stats.removes, 1, "{stats:?}");
    assert_eq!(stats.pages_zeroed, 16, "dropped pages faulted again and were served as zero: {stats:?}");
    assert_eq!(stats.pages_copied, pages, "{stats:?}");
}

#[test]
fn prefetch_installs_cached_pages_before_any_fault() {
    let Some(uffd) = uffd_or_skip("prefetch_installs_cached_pages_before_any_fault", 0) else { return };
    let deadline = Instant::now() + DEADLINE;
    let pages = 64u64;
    let cache = Arc::new(PageCache::new(pages * PAGE as u64).unwrap());
    fill_cache(&cache, |p| p % 4 == 0, |p| p == 20);
    let mut mem = register(&uffd, (pages * PAGE as u64) as usize);
    let base = mem.addr;
    // Image pages 0..32 sit at clone pages 32..64.
    let regions =
        vec![region(base, 32 * PAGE as u64, 32 * PAGE as u64), region(base + 32 * PAGE as u64, 32 * PAGE as u64, 0)];
    let fd = uffd.as_fd().try_clone_to_owned().unwrap();
    let mut server = spindrift_client::FaultServer::new(fd, regions, cache, ServerConfig::default()).unwrap();

    assert_eq!(server.prefetch(0, 32).unwrap(), 31, "all of image pages 0..32 but the missing page 20");
    // Nobody steps the server now: these reads complete only because the pages are already there.
    let image_of = |clone_page: u64| clone_page - 32;
    let reader = on_thread(move || {
        touch_and_check(base, (32..64).filter(|&p| p != 52).collect(), |p| expected(image_of(p), |i| i % 4 == 0))
    });
    if let Err(e) = wait(&reader, deadline, "reader of prefetched pages") {
        mem.leak();
        std::mem::forget(server);
        panic!("{e}");
    }
    let stats = server.stats();
    assert_eq!((stats.faults, stats.prefetched), (0, 31), "{stats:?}");
    assert!(stats.copy_ioctls + stats.zero_ioctls < 31, "prefetch went in runs: {stats:?}");
}

fn free_huge_pages() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines().find_map(|l| l.strip_prefix("HugePages_Free:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn huge_page_regions_are_served_whole() {
    const TEST: &str = "huge_page_regions_are_served_whole";
    let Some(uffd) = uffd_or_skip(TEST, 0) else { return };
    let len = 2 * spindrift_client::PAGE_2M;
    let free = free_huge_pages();
    let mapping = if free >= 2 { Mapping::new_huge(len as usize) } else { None };
    let Some(mut mem) = mapping else {
        netlab::require::skip_or_fail(
            TEST,
            format_args!(
                "needs 2 free 2 MiB huge pages, /proc/meminfo has HugePages_Free {free}: reserve some with \
                 scripts/setup.sh as root (or sysctl vm.nr_hugepages=8)"
            ),
        );
        return;
    };
    let deadline = Instant::now() + DEADLINE;
    uffd.register_missing(mem.addr, len).unwrap();
    let pages = len / PAGE as u64;
    let is_zero = |p: u64| p < 512; // the first huge page is all zero
    let cache = Arc::new(PageCache::new(len).unwrap());
    fill_cache(&cache, is_zero, |p| p == 600);
    let huge = spindrift_client::Region {
        base_host_virt_addr: mem.addr,
        size: len,
        offset: 0,
        page_size: spindrift_client::PAGE_2M,
    };
    let server = start_server(&uffd, vec![huge], cache.clone(), ServerConfig::default());
    let base = mem.addr;
    let reader = on_thread(move || touch_and_check(base, (0..pages).rev().collect(), move |p| expected(p, is_zero)));
    let asked = server.missing.recv_timeout(DEADLINE).expect("page 600 was never asked for");
    assert_eq!(asked, vec![600]);
    cache.insert(600, &image_page(600, is_zero).unwrap()).unwrap();
    if let Err(e) = wait(&reader, deadline, "reader of huge pages") {
        mem.leak();
        panic!("{e}");
    }
    let stats = server.stop();
    assert_eq!(
        stats.pages_copied, 2,
        "two whole huge pages (one of zeros, copied: no zero page for hugetlb): {stats:?}"
    );
}
