//! Shared harness for the userfaultfd tests: a clone's memory (an anonymous mapping registered with a
//! userfaultfd), a deterministic image, a fault server on its own thread, touching threads, and bounded
//! waits everywhere. Nothing sleeps to synchronise: every wait is on a channel or descriptor with a
//! deadline.

#![allow(dead_code, clippy::unwrap_used, clippy::manual_is_multiple_of)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use spindrift_client::uffd::{Uffd, UffdError};
use spindrift_client::{
    recv_uffd, send_handoff, FaultServer, HandoffMessage, PageCache, Region, ServerConfig, ServerHandle, ServerStats,
    Status, StopReason, PAGE_4K,
};

/// Every test's overall bound.
pub const DEADLINE: Duration = Duration::from_secs(30);
pub const PAGE: usize = 4096;

/// A userfaultfd, or `None` after printing why the test skips (failing it instead with
/// `NETLAB_REQUIRE=1`: see `netlab::require`).
pub fn uffd_or_skip(test: &str, features: u64) -> Option<Uffd> {
    match Uffd::create(features) {
        Ok(u) => Some(u),
        Err(e @ UffdError::Create(_)) => {
            let cause = std::error::Error::source(&e).map(|c| format!(" ({c})")).unwrap_or_default();
            netlab::require::skip_or_fail(test, format_args!("userfaultfd unavailable: {e}{cause}"));
            None
        }
        Err(e) => panic!("{test}: creating a userfaultfd failed: {e}"),
    }
}

/// Page `page` of the test image: `None` for zero pages, else a pattern unique to the page.
pub fn image_page(page: u64, is_zero: impl Fn(u64) -> bool) -> Option<Vec<u8>> {
    if is_zero(page) {
        return None;
    }
    let mut data: Vec<u8> =
        (0..PAGE as u64).map(|i| (page.wrapping_mul(31) ^ i.wrapping_mul(7) ^ (i >> 5)) as u8).collect();
    data[..8].copy_from_slice(&page.to_le_bytes());
    data[PAGE - 1] |= 1; // never all zero
    Some(data)
}

/// Expected bytes of a page (zeros for zero pages).
pub fn expected(page: u64, is_zero: impl Fn(u64) -> bool) -> Vec<u8> {
    image_page(page, is_zero).unwrap_or_else(|| vec![0; PAGE])
}

/// Inserts every page of the image except `missing` ones.
pub fn fill_cache(cache: &PageCache, is_zero: impl Fn(u64) -> bool + Copy, is_missing: impl Fn(u64) -> bool) {
    for page in 0..cache.page_count() {
        if is_missing(page) {
            continue;
        }
        match image_page(page, is_zero) {
            Some(data) => {
                cache.insert(page, &data).unwrap();
            }
            None => {
                cache.insert_zero(page, 1).unwrap();
            }
        }
    }
}

/// An anonymous private mapping standing in for a clone's guest memory.
pub struct Mapping {
    pub addr: u64,
    pub len: usize,
    leaked: bool,
}

impl Mapping {
    pub fn new(len: usize) -> Mapping {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap of {len} bytes failed: {}", std::io::Error::last_os_error());
        Mapping { addr: ptr as u64, len, leaked: false }
    }

    /// A hugetlbfs-backed mapping (2 MiB pages), or `None` if the host has no free huge pages.
    pub fn new_huge(len: usize) -> Option<Mapping> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases nothing.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        (ptr != libc::MAP_FAILED).then(|| Mapping { addr: ptr as u64, len, leaked: false })
    }

    /// Keeps the mapping after a failed test, so threads still blocked on it never see it vanish.
    pub fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.leaked {
            // SAFETY: we own the mapping, and every thread touching it has finished (or it was leaked).
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
        }
    }
}

/// Reads the page at `addr` (faulting it in) into a buffer.
pub fn read_page(addr: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PAGE];
    // SAFETY: `addr` is a page of a live test mapping (the caller keeps it mapped, leaking it on failure);
    // the userfaultfd server fills it before the read completes; `buf` is a separate allocation.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), PAGE) };
    buf
}

/// Writes one byte at `addr` (a write fault if the page is missing).
pub fn write_byte(addr: u64, value: u8) {
    // SAFETY: as for `read_page`; a single volatile byte store into a live mapping nobody else writes.
    unsafe { std::ptr::write_volatile(addr as *mut u8, value) };
}

/// The clone-side setup: a mapping registered with `uffd` (MISSING mode).
pub fn register(uffd: &Uffd, len: usize) -> Mapping {
    let m = Mapping::new(len);
    uffd.register_missing(m.addr, len as u64).unwrap();
    m
}

/// Hands `uffd` over a fresh socket pair and starts a fault server thread on the other end.
pub struct ServerThread {
    pub handle: ServerHandle,
    pub missing: Receiver<Vec<u64>>,
    done: Receiver<Result<(StopReason, ServerStats), String>>,
    join: Option<JoinHandle<()>>,
}

pub fn start_server(uffd: &Uffd, regions: Vec<Region>, cache: Arc<PageCache>, config: ServerConfig) -> ServerThread {
    let (vmm, daemon) = UnixStream::pair().unwrap();
    let message = HandoffMessage {
        regions,
        clone_id: Some(7),
        session: Some("test".into()),
        snapshot: None,
        fork: None,
        shared_cache: false,
    };
    send_handoff(&vmm, uffd.as_fd(), &message).unwrap();
    let (handle_tx, handle_rx) = mpsc::channel();
    let (missing_tx, missing) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    let join = std::thread::spawn(move || {
        let result = serve(&daemon, cache, config, &handle_tx, &missing_tx);
        let _ = done_tx.send(result);
        drop(vmm);
    });
    let handle = handle_rx.recv_timeout(DEADLINE).expect("fault server thread did not start");
    ServerThread { handle, missing, done, join: Some(join) }
}

fn serve(
    daemon: &UnixStream,
    cache: Arc<PageCache>,
    config: ServerConfig,
    handle_tx: &mpsc::Sender<ServerHandle>,
    missing_tx: &mpsc::Sender<Vec<u64>>,
) -> Result<(StopReason, ServerStats), String> {
    let (fd, handoff) = recv_uffd(daemon).map_err(|e| format!("recv_uffd: {e}"))?;
    let mut server = FaultServer::from_handoff(fd, handoff, cache, config).map_err(|e| format!("server: {e}"))?;
    handle_tx.send(server.handle()).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + DEADLINE;
    let mut missing = Vec::new();
    loop {
        missing.clear();
        let status = server.step(Some(Duration::from_millis(100)), &mut missing);
        match status {
            Ok(Status::Running) => {}
            Ok(Status::Stopped(reason)) => return Ok((reason, server.stats().clone())),
            Err(e) => {
                // Leave blocked faults blocked (not poisoned: that would kill the test process).
                std::mem::forget(server);
                return Err(format!("step: {e}"));
            }
        }
        if !missing.is_empty() {
            let _ = missing_tx.send(missing.clone());
        }
        if Instant::now() > deadline {
            std::mem::forget(server);
            return Err("fault server thread ran past the test deadline".into());
        }
    }
}

impl ServerThread {
    /// Stops the server and returns its stats (bounded wait).
    pub fn stop(mut self) -> ServerStats {
        self.handle.stop();
        let (reason, stats) = self
            .done
            .recv_timeout(DEADLINE)
            .expect("fault server did not stop in time")
            .unwrap_or_else(|e| panic!("fault server failed: {e}"));
        assert_eq!(reason, StopReason::StopRequested);
        if let Some(join) = self.join.take() {
            join.join().unwrap();
        }
        stats
    }
}

/// Runs `f` on a new thread and waits for it until `deadline`.
pub fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Waits for a thread started by [`on_thread`], failing the test (without joining it) on time-out.
pub fn wait<T>(rx: &Receiver<T>, deadline: Instant, what: &str) -> T {
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => panic!("{what}: timed out"),
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: thread panicked"),
    }
}

/// A 4 KiB region.
pub fn region(base: u64, size: u64, offset: u64) -> Region {
    Region { base_host_virt_addr: base, size, offset, page_size: PAGE_4K }
}

/// Reads every page in `pages` (clone page indices into `m`) and checks it against `expected`.
pub fn touch_and_check(base: u64, pages: Vec<u64>, expected: impl Fn(u64) -> Vec<u8>) -> Result<usize, String> {
    for &p in &pages {
        let got = read_page(base + p * PAGE as u64);
        let want = expected(p);
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("clone page {p}: byte {at} is {:#x}, expected {:#x}", got[at], want[at]));
        }
    }
    Ok(pages.len())
}

/// A deterministic permutation of `0..n` (seeded LCG shuffle).
pub fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut s = seed;
    for i in (1..v.len()).rev() {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        v.swap(i, (s >> 33) as usize % (i + 1));
    }
    v
}
