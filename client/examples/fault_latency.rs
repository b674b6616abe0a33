//! Fault-service latency for cache hits: single-page installs against batched ones.
//!
//! A thread touches every page of a 64 MiB userfaultfd-registered mapping (sequentially, then in a
//! seeded random order) while a fault server serves it from a full page cache, once with a sleeping
//! server (`poll` with a time-out) and once busy-polling. Prints, per configuration, the latency of
//! each touch (hdrhistogram, µs) and of the touches that faulted (taken as those of 2 µs or more: a
//! resident page reads in well under that), and the server's install counts. Printed, not asserted.
//!
//! `cargo run --release -p spindrift-client --example fault_latency` (needs root or
//! `vm.unprivileged_userfaultfd=1`).

#![allow(clippy::unwrap_used)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use spindrift_client::uffd::Uffd;
use spindrift_client::{
    recv_uffd, send_uffd, FaultServer, PageCache, Region, ServerConfig, ServerStats, Status, PAGE_4K,
};

const PAGES: u64 = 16 * 1024; // 64 MiB
const PAGE: u64 = 4096;
const FAULT_THRESHOLD_NS: u64 = 2_000;

#[derive(Clone, Copy)]
enum Order {
    Sequential,
    Random,
}

struct Row {
    all: Histogram<u64>,
    faults: Histogram<u64>,
    total: Duration,
    stats: ServerStats,
}

fn main() {
    let uffd_ok = Uffd::create(0).map_err(|e| format!("userfaultfd unavailable: {e}"));
    if netlab::require::ok_or_skip("fault_latency", uffd_ok).is_none() {
        return;
    }
    let cache = Arc::new(PageCache::new(PAGES * PAGE).unwrap());
    for p in 0..PAGES {
        let mut data = vec![(p % 251) as u8 | 1; PAGE as usize];
        data[..8].copy_from_slice(&p.to_le_bytes());
        cache.insert(p, &data).unwrap();
    }
    println!("fault_latency: {PAGES} pages (64 MiB), all cache hits; latencies in µs; 'faulting' = touches >= 2 µs");
    println!(
        "{:<14} {:<8} {:<10} | {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>8} | {:>7} {:>7} {:>8}",
        "install",
        "server",
        "order",
        "p50",
        "p99",
        "µs/pg",
        "faults",
        "f.p50",
        "f.p99",
        "f.max",
        "faults",
        "ioctls",
        "pages"
    );
    for busy in [false, true] {
        for order in [Order::Sequential, Order::Random] {
            for (name, batch, wake_first) in [
                ("single 4 KiB", PAGE, false),
                ("batch 64 KiB", 64 * 1024, false),
                ("batch 256 KiB", 256 * 1024, false),
                ("1st+64 KiB", 64 * 1024, true),
                ("1st+256 KiB", 256 * 1024, true),
            ] {
                let row = measure(cache.clone(), batch, wake_first, busy, order);
                println!(
                    "{:<14} {:<8} {:<10} | {:>7.2} {:>7.2} {:>7.2} | {:>7} {:>7.2} {:>7.2} {:>8.1} | {:>7} {:>7} {:>8}",
                    name,
                    if busy { "busy" } else { "sleeping" },
                    match order {
                        Order::Sequential => "sequential",
                        Order::Random => "random",
                    },
                    us(row.all.value_at_quantile(0.5)),
                    us(row.all.value_at_quantile(0.99)),
                    row.total.as_secs_f64() * 1e6 / PAGES as f64,
                    row.faults.len(),
                    us(row.faults.value_at_quantile(0.5)),
                    us(row.faults.value_at_quantile(0.99)),
                    us(row.faults.max()),
                    row.stats.faults,
                    row.stats.copy_ioctls,
                    row.stats.pages_copied,
                );
            }
        }
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn measure(cache: Arc<PageCache>, batch: u64, wake_first: bool, busy: bool, order: Order) -> Row {
    let len = (PAGES * PAGE) as usize;
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases nothing.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    let base = mem as u64;
    let uffd = Uffd::create(0).unwrap();
    uffd.register_missing(base, len as u64).unwrap();
    let (vmm, daemon) = UnixStream::pair().unwrap();
    send_uffd(
        &vmm,
        uffd.as_fd(),
        &[Region { base_host_virt_addr: base, size: len as u64, offset: 0, page_size: PAGE_4K }],
    )
    .unwrap();
    let (fd, handoff) = recv_uffd(&daemon).unwrap();
    let config = ServerConfig { max_batch_bytes: batch, wake_first, ..ServerConfig::default() };
    let mut server = FaultServer::from_handoff(fd, handoff, cache, config).unwrap();
    let handle = server.handle();
    let timeout = if busy { Duration::ZERO } else { Duration::from_millis(100) };
    let serving = std::thread::spawn(move || {
        let mut missing = Vec::new();
        while server.step(Some(timeout), &mut missing).unwrap() == Status::Running {}
        server.stats().clone()
    });

    let pages: Vec<u64> = match order {
        Order::Sequential => (0..PAGES).collect(),
        Order::Random => shuffled(PAGES, 7),
    };
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    let mut faults = all.clone();
    let start = Instant::now();
    for p in pages {
        let t = Instant::now();
        // SAFETY: `base + p * PAGE` is inside the live mapping; the fault server fills it before the read
        // completes; the value is checked so the read cannot be elided.
        let first = unsafe { std::ptr::read_volatile((base + p * PAGE + 8) as *const u8) };
        let ns = t.elapsed().as_nanos() as u64;
        assert_eq!(first, (p % 251) as u8 | 1, "page {p}");
        all.record(ns.max(1)).unwrap();
        if ns >= FAULT_THRESHOLD_NS {
            faults.record(ns).unwrap();
        }
    }
    let total = start.elapsed();
    handle.stop();
    let stats = serving.join().unwrap();
    drop(uffd);
    // SAFETY: the mapping is ours and no thread touches it any more.
    unsafe { libc::munmap(mem, len) };
    Row { all, faults, total, stats }
}

fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut s = seed;
    for i in (1..v.len()).rev() {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, (s >> 33) as usize % (i + 1));
    }
    v
}
