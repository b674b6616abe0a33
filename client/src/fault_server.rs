//! [`FaultServer`]: serves one clone's page faults from the host's [`PageCache`].
//!
//! One server per clone, driven by one thread through [`FaultServer::step`] (or [`FaultServer::run`]):
//!
//! 1. `poll(2)` the userfaultfd, the server's [`Waker`] and the clone's [`Liveness`] descriptor.
//! 2. Read up to 64 events per `read(2)`. madvise/unmap/mremap events are applied before any fault of
//!    the same batch is served (a fault read alongside a remove is served as if it came after it).
//! 3. Serve every waiting fault, lowest address first. A fault whose page is in the cache starts a
//!    *run*: the following pages of the same region that are also in the cache, of the same kind (data
//!    or zero) and not yet installed, up to `max_batch_bytes`, go in with one `UFFDIO_COPY` (data) or
//!    `UFFDIO_ZEROPAGE` (zero), which also wakes every thread waiting in that range.
//! 4. A fault whose page is not in the cache is *parked*: the page is marked wanted in the cache and
//!    reported once in `step`'s `missing` output. Whoever fetches it calls [`PageCache::insert`]; the
//!    cache wakes this server, and the next step installs the page and wakes the faulting threads.
//!
//! Kernel answers: `EEXIST` (page already there, e.g. a racing copy) counts as served and the range is
//! woken explicitly (the failed copy woke nobody); `EAGAIN` (the mm is changing) keeps the fault waiting
//! and polls again within `retry_interval`; `ESRCH` means the clone exited: the server stops.
//!
//! madvise(`MADV_DONTNEED`/`MADV_REMOVE`) reported by `UFFD_EVENT_REMOVE` (if the VMM enabled it):
//! the range is forgotten (no longer installed) and *discarded*: its next faults get zero pages, which
//! is what the clone would read without userfaultfd (and what Firecracker's handler does for the
//! balloon). Snapshot bytes are never served again for a discarded page.
//!
//! Failure ([`FaultServer::fail`], or [`ServerHandle::fail`] from another thread): every waiting fault
//! and every later one whose page is not in the host's cache is answered with `UFFDIO_POISON`, so the
//! faulting thread gets SIGBUS (KVM turns a vCPU's access into SIGBUS for the VMM) instead of waiting
//! forever; pages the cache has are still installed. On kernels without
//! `UFFDIO_POISON` the clone is killed through its pidfd instead. Dropping a server poisons the faults
//! still waiting; a clone whose server is gone for good should be killed by the glue.
//!
//! Latency: a [`FaultObserver`] set with [`FaultServer::set_observer`] hears of every fault answered
//! with the page's bytes: the time from reading the fault to installing its page, and whether the
//! fault had to wait for the cache (a network fetch) or was a cache hit.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::bitmap::Bitmap;
use crate::cache::{PageCache, CACHE_PAGE_SIZE};
use crate::handoff::Handoff;
use crate::liveness::Liveness;
use crate::region::{validate_regions, Region, RegionError, PAGE_4K};
use crate::region_map::RegionMap;
use crate::uffd::{Event, Fill, Uffd, UffdError};
use crate::waker::{Waker, WakerError};

/// Tuning knobs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest single install (bytes): a fault pulls in up to this much of the cached pages after it.
    /// One page disables batching.
    pub max_batch_bytes: u64,
    /// With batching: install the faulting page alone first (its thread resumes after a single-page
    /// copy), then the read-ahead with a second ioctl.
    pub wake_first: bool,
    /// How soon to retry faults that got `EAGAIN`.
    pub retry_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { max_batch_bytes: 64 * 1024, wake_first: false, retry_interval: Duration::from_millis(1) }
    }
}

/// Why a server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The clone's process exited (liveness fd fired, or the kernel said `ESRCH`).
    CloneExited,
    /// [`ServerHandle::stop`] was called.
    StopRequested,
}

/// Result of a [`FaultServer::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Keep stepping.
    Running,
    /// Done; further steps return the same.
    Stopped(StopReason),
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Events read (all kinds).
    pub events: u64,
    /// Page-fault events read.
    pub faults: u64,
    /// Faults that had to wait for the cache.
    pub parked: u64,
    /// Cache pages reported missing.
    pub missing_reported: u64,
    /// Pages installed with `UFFDIO_COPY`.
    pub pages_copied: u64,
    /// `UFFDIO_COPY` calls that installed something.
    pub copy_ioctls: u64,
    /// Pages installed with `UFFDIO_ZEROPAGE`.
    pub pages_zeroed: u64,
    /// `UFFDIO_ZEROPAGE` calls that installed something.
    pub zero_ioctls: u64,
    /// Pages installed ahead of any fault by [`FaultServer::prefetch`].
    pub prefetched: u64,
    /// Faults on pages that were already present (`EEXIST`).
    pub exists: u64,
    /// `EAGAIN` answers (retried).
    pub retries: u64,
    /// Remove (madvise) events.
    pub removes: u64,
    /// Unmap and remap events.
    pub remaps: u64,
    /// Fork events (the child's userfaultfd is closed: forks are not served).
    pub forks_ignored: u64,
    /// Faults outside every region (poisoned).
    pub outside_regions: u64,
    /// Pages poisoned.
    pub poisoned: u64,
    /// Shared-cache clones: faults answered with a wake-up alone (the page was already in the
    /// cache memfd, which the clone maps).
    pub pages_woken: u64,
    /// Shared-cache clones: faults woken by the thread that inserted their page (no hop to the
    /// fault server's thread); counted in `pages_woken` too.
    pub early_wakes: u64,
    /// Shared-cache clones: faults again on a page already woken (the clone's view is not the cache
    /// memfd it said it was): answered with a copy instead.
    pub shared_refaults: u64,
}

/// Errors that stop a fault server.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// The configuration makes no sense.
    #[error("bad fault server configuration: {0}")]
    BadConfig(&'static str),
    /// The regions failed validation.
    #[error("invalid regions for the fault server: {0}")]
    Regions(#[from] RegionError),
    /// A region maps bytes past the end of the image.
    #[error("region at {base:#x} maps image bytes up to {end:#x}, past the end of the image ({image_bytes:#x} bytes)")]
    OutsideImage {
        /// The region's address.
        base: u64,
        /// End of its image range.
        end: u64,
        /// Image size.
        image_bytes: u64,
    },
    /// A userfaultfd call failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The waker could not be created.
    #[error(transparent)]
    Waker(#[from] WakerError),
    /// `poll(2)` failed.
    #[error("waiting for page faults (poll) failed")]
    Poll(#[source] io::Error),
    /// A fault could not be answered, nor failed visibly.
    #[error(
        "cannot fail the fault at {addr:#x} visibly: this kernel lacks UFFDIO_POISON and the clone's pidfd is \
         unknown ({reason})"
    )]
    CannotFail {
        /// The fault address.
        addr: u64,
        /// Why it was being failed.
        reason: String,
    },
}

/// Hears how long each fault took to answer (see the module docs). Called on the server's thread.
pub trait FaultObserver: Send + Sync + std::fmt::Debug {
    /// A fault was answered with its page: `latency` from reading the fault to installing the page;
    /// `fetched` when it waited for the cache (the page came over the network), else a cache hit.
    fn fault_served(&self, latency: Duration, fetched: bool);
}

/// State shared with [`ServerHandle`]s.
#[derive(Debug)]
struct Shared {
    waker: Arc<Waker>,
    stop: AtomicBool,
    fail: Mutex<Option<String>>,
}

/// Controls a server from other threads. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// Makes the server look at its waiting faults again (the cache does this on its own when a page
    /// the server wanted arrives).
    pub fn wake(&self) {
        self.shared.waker.wake();
    }

    /// Asks the server to stop at its next step. Faults still waiting are poisoned when it is dropped.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
    }

    /// Asks the server to fail every waiting and future fault (see the module docs).
    pub fn fail(&self, reason: impl Into<String>) {
        *self.shared.fail.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.into());
        self.shared.waker.wake();
    }
}

/// Wakes a shared-cache clone's faults from the thread that inserts their pages.
#[derive(Debug)]
struct EarlyWake {
    /// A duplicate of the clone's userfaultfd, for `UFFDIO_WAKE` only.
    uffd: Uffd,
    observer: Option<Arc<dyn FaultObserver>>,
    /// Fault addresses woken so: the server forgets them at its next step.
    woken: Mutex<Vec<u64>>,
}

/// What serving one fault came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    /// Installed (or already there) and woken: addresses below `until` are covered.
    Done { until: u64 },
    /// Waiting for the cache.
    Parked,
    /// `EAGAIN`: try again soon.
    Retry,
    /// The range is gone; nothing to serve.
    Dropped,
    /// The clone exited.
    Gone,
}

/// What the cache (and the clone's own history) says about one region page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Missing,
    Zero,
    Data,
}

/// Serves one clone's faults. See the module docs.
#[derive(Debug)]
pub struct FaultServer {
    uffd: Uffd,
    regions: RegionMap,
    cache: Arc<PageCache>,
    config: ServerConfig,
    shared: Arc<Shared>,
    liveness: Liveness,
    /// Cache pages installed in this clone (read-ahead skips them).
    installed: Bitmap,
    /// Cache pages the clone dropped with madvise: served as zero from now on.
    discarded: Bitmap,
    /// The clone maps the cache memfd itself (see [`FaultServer::set_shared_cache`]).
    shared_cache: bool,
    /// Shared mode: cache pages whose faults were answered with a wake-up alone.
    woken: Bitmap,
    /// Shared mode: what the cache's arrival callbacks use to wake the clone from the inserting
    /// thread (made at the first parked fault).
    early: Option<Arc<EarlyWake>>,
    /// Fault addresses (aligned to their region's page) not answered yet, with when they were read.
    waiting: BTreeMap<u64, Instant>,
    /// The waiting faults that wait for the cache.
    parked: BTreeSet<u64>,
    /// Cache pages reported missing and not seen present since.
    requested: BTreeSet<u64>,
    retry_soon: bool,
    failing: Option<String>,
    stopped: Option<StopReason>,
    events: Vec<Event>,
    huge_zero: Vec<u8>,
    stats: ServerStats,
    observer: Option<Arc<dyn FaultObserver>>,
}

impl FaultServer {
    /// A server for the clone behind `uffd` (as received from the VMM) with `regions`, serving from
    /// `cache`.
    pub fn new(
        uffd: OwnedFd,
        regions: Vec<Region>,
        cache: Arc<PageCache>,
        config: ServerConfig,
    ) -> Result<FaultServer, FaultError> {
        if config.max_batch_bytes < PAGE_4K {
            return Err(FaultError::BadConfig("max_batch_bytes must be at least one page (4096)"));
        }
        validate_regions(&regions)?;
        for r in &regions {
            let end = r.offset + r.size;
            if end > cache.image_bytes() {
                return Err(FaultError::OutsideImage {
                    base: r.base_host_virt_addr,
                    end,
                    image_bytes: cache.image_bytes(),
                });
            }
        }
        let uffd = Uffd::from_fd(uffd)?;
        let waker = Arc::new(Waker::new()?);
        cache.subscribe(&waker);
        let pages = cache.page_count();
        Ok(FaultServer {
            uffd,
            regions: RegionMap::new(regions),
            cache,
            config,
            shared: Arc::new(Shared { waker, stop: AtomicBool::new(false), fail: Mutex::new(None) }),
            liveness: Liveness::Unwatched,
            installed: Bitmap::new(pages),
            discarded: Bitmap::new(pages),
            shared_cache: false,
            woken: Bitmap::new(pages),
            early: None,
            waiting: BTreeMap::new(),
            parked: BTreeSet::new(),
            requested: BTreeSet::new(),
            retry_soon: false,
            failing: None,
            stopped: None,
            events: Vec::with_capacity(64),
            huge_zero: Vec::new(),
            stats: ServerStats::default(),
            observer: None,
        })
    }

    /// A server from a received handoff; the VMM's pidfd (if the kernel gave one) becomes its liveness
    /// watch.
    pub fn from_handoff(
        uffd: OwnedFd,
        handoff: Handoff,
        cache: Arc<PageCache>,
        config: ServerConfig,
    ) -> Result<FaultServer, FaultError> {
        let mut server = FaultServer::new(uffd, handoff.message.regions, cache, config)?;
        if let Some(pidfd) = handoff.peer_pidfd {
            server.liveness = Liveness::Pidfd(pidfd);
        }
        Ok(server)
    }

    /// Serves a clone whose regions are `MAP_PRIVATE` views of this cache's memfd (at file offset
    /// `offset`): a fault on a page the cache holds raced with its arrival, so it is answered with
    /// `UFFDIO_WAKE` alone and the kernel maps the page from the memfd; zero pages still get
    /// `UFFDIO_ZEROPAGE` (private to the clone), and a page that faults again after its wake-up is
    /// copied in (the view was not what the clone said). Dropped ranges (`UFFD_EVENT_REMOVE`) go back
    /// to the image, as the kernel does for a private file mapping. Refused for 2 MiB regions.
    pub fn set_shared_cache(&mut self, shared: bool) -> Result<(), FaultError> {
        if shared && self.regions.regions().iter().any(|r| r.page_size != PAGE_4K) {
            return Err(FaultError::BadConfig("a shared-cache clone must map its memory in 4 KiB pages"));
        }
        self.shared_cache = shared;
        Ok(())
    }

    /// Whether the clone maps the cache memfd itself.
    pub fn is_shared_cache(&self) -> bool {
        self.shared_cache
    }

    /// Reports every answered fault's latency to `observer`.
    pub fn set_observer(&mut self, observer: Arc<dyn FaultObserver>) {
        self.observer = Some(observer);
    }

    /// Replaces the liveness watch.
    pub fn set_liveness(&mut self, liveness: Liveness) {
        self.liveness = liveness;
    }

    /// A handle for other threads.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle { shared: self.shared.clone() }
    }

    /// Counters so far.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// The clone's regions (after any unmap/mremap events).
    pub fn regions(&self) -> &[Region] {
        self.regions.regions()
    }

    /// The userfaultfd's negotiated features.
    pub fn uffd_features(&self) -> u64 {
        self.uffd.features()
    }

    /// Faults not answered yet.
    pub fn waiting_faults(&self) -> usize {
        self.waiting.len()
    }

    /// Cache pages reported missing that have not turned up yet (to re-request after a loss).
    pub fn outstanding_missing(&self) -> impl Iterator<Item = u64> + '_ {
        self.requested.iter().copied().filter(|&p| !self.cache.is_present(p))
    }

    /// Runs until the server stops, passing newly missing cache pages to `on_missing`.
    pub fn run(&mut self, mut on_missing: impl FnMut(&[u64])) -> Result<StopReason, FaultError> {
        let mut missing = Vec::new();
        loop {
            missing.clear();
            match self.step(None, &mut missing)? {
                Status::Running if !missing.is_empty() => on_missing(&missing),
                Status::Running => {}
                Status::Stopped(reason) => return Ok(reason),
            }
        }
    }

    /// Waits up to `timeout` (`None`: until something happens) for events, then serves what it can.
    /// Cache pages that faults need and that are newly missing are appended to `missing` (each page is
    /// reported once; see [`FaultServer::outstanding_missing`]).
    pub fn step(&mut self, timeout: Option<Duration>, missing: &mut Vec<u64>) -> Result<Status, FaultError> {
        self.take_requests()?;
        if let Some(reason) = self.stopped {
            return Ok(Status::Stopped(reason));
        }
        let timeout = match (self.retry_soon, timeout) {
            (true, Some(t)) => Some(t.min(self.config.retry_interval)),
            (true, None) => Some(self.config.retry_interval),
            (false, t) => t,
        };
        let retry = self.retry_soon;
        let mut revents = [0i16; 3];
        let liveness = self.liveness.poll_target();
        let mut fds = vec![(self.uffd.as_fd(), libc::POLLIN), (self.shared.waker.as_fd(), libc::POLLIN)];
        fds.extend(liveness);
        crate::waker::poll(&fds, &mut revents, timeout).map_err(FaultError::Poll)?;
        drop(fds);
        if revents[1] != 0 {
            self.shared.waker.take();
            self.take_requests()?;
        }
        if revents[2] != 0 {
            self.stopped = Some(StopReason::CloneExited);
        }
        if let Some(reason) = self.stopped {
            return Ok(Status::Stopped(reason));
        }
        // After the wait, before reading events: a fault its page's arrival woke meanwhile is not
        // served (and reported) a second time, and a fault on the same address read from now on
        // (a zero page's hole faults again) is a new one.
        self.forget_early_wakes();
        if revents[0] != 0 {
            self.read_events()?;
        }
        // Nothing new on a plain time-out: parked faults wait for the waker (shared-cache faults for
        // their arrival callbacks, looked at again here as a safety net).
        let recheck = self.shared_cache && !self.parked.is_empty();
        if revents[0] != 0 || revents[1] != 0 || retry || recheck {
            self.serve_waiting(missing)?;
        }
        Ok(self.stopped.map_or(Status::Running, Status::Stopped))
    }

    /// Installs the cached pages of image pages `[first, first + count)` into the clone before it
    /// faults on them (e.g. a recorded working set), in runs of up to `max_batch_bytes`; a run may go
    /// on past the end of the range. Pages not in the cache, or already installed, are skipped.
    /// Returns how many pages went in.
    pub fn prefetch(&mut self, first: u64, count: u64) -> Result<u64, FaultError> {
        if self.shared_cache {
            // The clone maps what the cache has without any event.
            return Ok(0);
        }
        let (start, end) = (first * CACHE_PAGE_SIZE, (first + count) * CACHE_PAGE_SIZE);
        let pieces: Vec<Region> = self
            .regions
            .regions()
            .iter()
            .filter_map(|r| {
                let (lo, hi) = (start.max(r.offset), end.min(r.offset + r.size));
                (lo < hi).then(|| r.slice(r.addr_of_image_offset(lo), r.addr_of_image_offset(hi)))?
            })
            .collect();
        let before = self.stats.pages_copied + self.stats.pages_zeroed;
        for piece in pieces {
            let Some(region) = self.regions.find(piece.base_host_virt_addr) else { continue };
            let cp = region.page_size / CACHE_PAGE_SIZE;
            let first_addr =
                piece.base_host_virt_addr - (piece.base_host_virt_addr - region.base_host_virt_addr) % region.page_size;
            let mut addr = first_addr;
            while addr < piece.end() && self.stopped.is_none() {
                let page = region.image_offset(addr) / CACHE_PAGE_SIZE;
                let kind = self.peek_kind(page, cp);
                if self.installed.any(page, cp) || kind == Kind::Missing {
                    addr += region.page_size;
                    continue;
                }
                addr = match self.install_run(addr, region, kind)? {
                    Served::Done { until } => until.max(addr + region.page_size),
                    Served::Gone => {
                        self.stopped = Some(StopReason::CloneExited);
                        break;
                    }
                    _ => addr + region.page_size,
                };
            }
        }
        let installed = self.stats.pages_copied + self.stats.pages_zeroed - before;
        self.stats.prefetched += installed;
        Ok(installed)
    }

    /// Fails every waiting fault and every later one that needs the network, visibly (see the module
    /// docs); pages in the cache are still served.
    pub fn fail(&mut self, reason: impl Into<String>) -> Result<(), FaultError> {
        self.failing = Some(reason.into());
        self.serve_waiting(&mut Vec::new())
    }

    fn take_requests(&mut self) -> Result<(), FaultError> {
        if self.shared.stop.load(Ordering::SeqCst) && self.stopped.is_none() {
            self.stopped = Some(StopReason::StopRequested);
        }
        let fail = self.shared.fail.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(reason) = fail {
            if self.failing.is_none() {
                self.fail(reason)?;
            }
        }
        Ok(())
    }

    fn read_events(&mut self) -> Result<(), FaultError> {
        let mut events = std::mem::take(&mut self.events);
        // Bounded, so a flood of faults cannot starve the waker and liveness checks.
        for _ in 0..16 {
            if self.uffd.read_events(&mut events)? < 64 {
                break;
            }
        }
        self.stats.events += events.len() as u64;
        let read_at = Instant::now();
        for event in events.drain(..) {
            match event {
                Event::PageFault { addr, .. } => {
                    self.stats.faults += 1;
                    let aligned = match self.regions.find(addr) {
                        Some(r) => addr - (addr - r.base_host_virt_addr) % r.page_size,
                        None => addr - addr % PAGE_4K,
                    };
                    self.waiting.entry(aligned).or_insert(read_at);
                }
                Event::Remove { start, end } => self.on_remove(start, end),
                Event::Unmap { start, end } => {
                    self.stats.remaps += 1;
                    self.forget(start, end);
                    self.drop_waiting(start, end);
                    self.regions.remove(start, end);
                }
                Event::Remap { from, to, len } => {
                    self.stats.remaps += 1;
                    self.drop_waiting(from, from.saturating_add(len));
                    self.regions.remap(from, to, len);
                }
                Event::Fork { uffd } => {
                    self.stats.forks_ignored += 1;
                    drop(uffd);
                }
                Event::Unknown { .. } => {}
            }
        }
        self.events = events;
        Ok(())
    }

    /// madvise dropped `[start, end)`: not installed any more, and zero from now on.
    fn on_remove(&mut self, start: u64, end: u64) {
        self.stats.removes += 1;
        let pieces: Vec<Region> = self.regions.pieces(start, end).collect();
        for p in pieces {
            let first = p.offset / CACHE_PAGE_SIZE;
            let count = p.size.div_ceil(CACHE_PAGE_SIZE);
            self.installed.set_range(first, count, false);
            self.woken.set_range(first, count, false);
            if self.shared_cache {
                // A private file mapping reads the file again where its pages were dropped.
                continue;
            }
            self.discarded.set_range(first, count, true);
            // Served as zero from now on: no need to fetch them any more.
            self.requested.retain(|page| !(first..first + count).contains(page));
        }
    }

    fn forget(&mut self, start: u64, end: u64) {
        let pieces: Vec<Region> = self.regions.pieces(start, end).collect();
        for p in pieces {
            self.installed.set_range(p.offset / CACHE_PAGE_SIZE, p.size.div_ceil(CACHE_PAGE_SIZE), false);
        }
    }

    /// Waiting faults in `[start, end)` lost their mapping: wake them (they fault again and the kernel
    /// deals with the now-unmapped address) and forget them.
    fn drop_waiting(&mut self, start: u64, end: u64) {
        let gone: Vec<u64> = self.waiting.range(start..end).map(|(&a, _)| a).collect();
        for addr in gone {
            self.resolved(addr, false);
            let _ = self.uffd.wake(addr, PAGE_4K);
        }
    }

    fn serve_waiting(&mut self, missing: &mut Vec<u64>) -> Result<(), FaultError> {
        self.retry_soon = false;
        let addrs: Vec<u64> = self.waiting.keys().copied().collect();
        let mut covered_until = 0;
        let mut covered_by_fill = false;
        for addr in addrs {
            if addr < covered_until {
                // Installed and woken by the run of an earlier fault.
                self.resolved(addr, covered_by_fill);
                continue;
            }
            let poisoned = self.stats.poisoned;
            match self.serve(addr, missing)? {
                Served::Done { until } => {
                    covered_by_fill = self.stats.poisoned == poisoned && self.failing.is_none();
                    self.resolved(addr, covered_by_fill);
                    covered_until = until;
                }
                Served::Parked => {}
                Served::Retry => self.retry_soon = true,
                Served::Dropped => self.resolved(addr, false),
                Served::Gone => {
                    self.stopped = Some(StopReason::CloneExited);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Faults the cache's arrival callbacks already woke (and reported): forgotten, their pages
    /// marked woken.
    fn forget_early_wakes(&mut self) {
        let Some(early) = &self.early else { return };
        let addrs = std::mem::take(&mut *early.woken.lock().unwrap_or_else(PoisonError::into_inner));
        for addr in addrs {
            if let Some(region) = self.regions.find(addr) {
                self.woken.set_range(region.image_offset(addr) / CACHE_PAGE_SIZE, 1, true);
            }
            self.stats.pages_woken += 1;
            self.stats.early_wakes += 1;
            self.waiting.remove(&addr);
            self.parked.remove(&addr);
        }
    }

    /// Shared mode: has the cache wake the clone's fault at `addr` (on `page`, 4 KiB) from the
    /// inserting thread when the page arrives. False if the page is already there.
    fn wake_on_arrival(&mut self, addr: u64, page: u64) -> Result<bool, FaultError> {
        if self.early.is_none() {
            let dup = self.uffd.as_fd().try_clone_to_owned().map_err(|source| UffdError::Ioctl {
                op: "F_DUPFD_CLOEXEC",
                start: 0,
                len: 0,
                source,
            })?;
            self.early = Some(Arc::new(EarlyWake {
                uffd: Uffd::from_fd(dup)?,
                observer: self.observer.clone(),
                woken: Mutex::new(Vec::new()),
            }));
        }
        let Some(early) = &self.early else { return Ok(false) };
        let weak = Arc::downgrade(early);
        let read_at = self.waiting.get(&addr).copied().unwrap_or_else(Instant::now);
        let wake: crate::cache::Arrival = Box::new(move || {
            let Some(e) = weak.upgrade() else { return };
            if e.uffd.wake(addr, PAGE_4K).is_ok() {
                if let Some(o) = &e.observer {
                    o.fault_served(read_at.elapsed(), true);
                }
                e.woken.lock().unwrap_or_else(PoisonError::into_inner).push(addr);
            }
        });
        Ok(self.cache.on_arrival(page, wake).is_none())
    }

    /// Forgets a waiting fault; `installed` when its page went in (its latency is reported).
    fn resolved(&mut self, addr: u64, installed: bool) {
        let read_at = self.waiting.remove(&addr);
        let fetched = self.parked.remove(&addr);
        if let (true, Some(observer), Some(read_at)) = (installed, &self.observer, read_at) {
            observer.fault_served(read_at.elapsed(), fetched);
        }
    }

    fn serve(&mut self, addr: u64, missing: &mut Vec<u64>) -> Result<Served, FaultError> {
        let Some(region) = self.regions.find(addr) else {
            self.stats.outside_regions += 1;
            return self.poison(addr, PAGE_4K, "fault outside every handed-over region");
        };
        let cp = region.page_size / CACHE_PAGE_SIZE;
        let page = region.image_offset(addr) / CACHE_PAGE_SIZE;
        if let Some(reason) = self.failing.clone() {
            // A failed session still serves what the host has; only a fault that would wait for
            // the network fails.
            return match self.peek_kind(page, cp) {
                Kind::Missing => self.poison(addr, region.page_size, &reason),
                kind => self.install_run(addr, region, kind),
            };
        }
        match self.fault_kind(page, cp, missing) {
            Kind::Missing => {
                if self.parked.insert(addr) {
                    self.stats.parked += 1;
                    if self.shared_cache && cp == 1 && !self.wake_on_arrival(addr, page)? {
                        // Arrived meanwhile: serve it now.
                        self.parked.remove(&addr);
                        return self.install_run(addr, region, self.peek_kind(page, cp));
                    }
                }
                Ok(Served::Parked)
            }
            kind => self.install_run(addr, region, kind),
        }
    }

    /// The kind of a faulting page; marks missing cache pages wanted and reports the new ones.
    fn fault_kind(&mut self, page: u64, cp: u64, missing: &mut Vec<u64>) -> Kind {
        if self.discarded.any(page, cp) {
            return Kind::Zero;
        }
        let mut absent = false;
        // A shared-cache clone's 4 KiB fault is woken by the page's arrival callback: no need to
        // have the cache wake this thread too.
        let subscribe = !(self.shared_cache && cp == 1);
        for p in page..page + cp {
            if self.cache.is_present(p) || (subscribe && self.cache.want(p)) {
                if !self.requested.is_empty() {
                    self.requested.remove(&p);
                }
                continue;
            }
            absent = true;
            if self.requested.insert(p) {
                missing.push(p);
                self.stats.missing_reported += 1;
            }
        }
        if absent {
            Kind::Missing
        } else if self.cache.all_zero(page, cp) {
            Kind::Zero
        } else {
            Kind::Data
        }
    }

    /// The kind of a page, without side effects.
    fn peek_kind(&self, page: u64, cp: u64) -> Kind {
        if self.discarded.any(page, cp) {
            Kind::Zero
        } else if !self.cache.all_present(page, cp) {
            Kind::Missing
        } else if self.cache.all_zero(page, cp) {
            Kind::Zero
        } else {
            Kind::Data
        }
    }

    /// Installs the page at `addr` (of `kind`) and the following pages of the same kind that are in the
    /// cache and not installed, up to `max_batch_bytes`: with one ioctl, or, with `wake_first`, the
    /// faulting page alone first (so its thread resumes after a single-page copy) and the read-ahead
    /// right after.
    fn install_run(&mut self, addr: u64, region: Region, kind: Kind) -> Result<Served, FaultError> {
        let ps = region.page_size;
        let cp = ps / CACHE_PAGE_SIZE;
        let page = region.image_offset(addr) / CACHE_PAGE_SIZE;
        if self.shared_cache && kind == Kind::Data {
            if !self.woken.any(page, cp) {
                self.woken.set_range(page, cp, true);
                self.uffd.wake(addr, ps)?;
                self.stats.pages_woken += 1;
                return Ok(Served::Done { until: addr + ps });
            }
            self.stats.shared_refaults += 1;
        }
        let huge = ps != PAGE_4K;
        let max_pages = if huge && kind == Kind::Zero { 1 } else { (self.config.max_batch_bytes / ps).max(1) };
        let mut n = 1;
        while n < max_pages {
            let next = addr + n * ps;
            let next_page = page + n * cp;
            if next >= region.end() || self.installed.any(next_page, cp) || self.peek_kind(next_page, cp) != kind {
                break;
            }
            n += 1;
        }
        if !(self.config.wake_first && n > 1 && kind == Kind::Data) {
            return self.fill(addr, ps, page, n, kind);
        }
        let first = self.fill(addr, ps, page, 1, kind)?;
        if first != (Served::Done { until: addr + ps }) {
            return Ok(first);
        }
        match self.fill(addr + ps, ps, page + cp, n - 1, kind)? {
            Served::Done { until } => Ok(Served::Done { until }),
            Served::Gone => Ok(Served::Gone),
            // Read-ahead is best effort: whoever faults there later is served then.
            Served::Parked | Served::Retry | Served::Dropped => Ok(first),
        }
    }

    /// One fill ioctl for `n` region pages (of size `ps`) at `addr`, image page `page` onwards.
    fn fill(&mut self, addr: u64, ps: u64, page: u64, n: u64, kind: Kind) -> Result<Served, FaultError> {
        let cp = ps / CACHE_PAGE_SIZE;
        let huge = ps != PAGE_4K;
        let len = n * ps;
        let fill = match kind {
            Kind::Zero if !huge => self.uffd.zeropage(addr, len, true)?,
            Kind::Zero => {
                if self.huge_zero.len() as u64 != ps {
                    self.huge_zero = vec![0; ps as usize];
                }
                self.uffd.copy(addr, &self.huge_zero, true)?
            }
            Kind::Data => match self.cache.get_run(page, n * cp) {
                Some(src) => self.uffd.copy(addr, src, true)?,
                None => return Ok(Served::Parked),
            },
            Kind::Missing => return Ok(Served::Parked),
        };
        let done = match fill {
            Fill::Done => len,
            Fill::Partial { bytes } if bytes >= ps => bytes - bytes % ps,
            Fill::Partial { .. } => {
                self.stats.retries += 1;
                return Ok(Served::Retry);
            }
            Fill::Exists => {
                self.stats.exists += 1;
                self.installed.set_range(page, cp, true);
                self.uffd.wake(addr, ps)?;
                return Ok(Served::Done { until: addr + ps });
            }
            Fill::Retry => {
                self.stats.retries += 1;
                return Ok(Served::Retry);
            }
            Fill::TargetGone => return Ok(Served::Gone),
            Fill::NoMapping | Fill::Unsupported => return Ok(Served::Dropped),
        };
        self.installed.set_range(page, done / CACHE_PAGE_SIZE, true);
        if kind == Kind::Zero && !huge {
            self.stats.pages_zeroed += done / ps;
            self.stats.zero_ioctls += 1;
        } else {
            self.stats.pages_copied += done / ps;
            self.stats.copy_ioctls += 1;
        }
        Ok(Served::Done { until: addr + done.max(ps) })
    }

    fn poison(&mut self, addr: u64, ps: u64, reason: &str) -> Result<Served, FaultError> {
        match self.uffd.poison(addr, ps, true)? {
            Fill::Done | Fill::Partial { .. } => {
                self.stats.poisoned += 1;
                Ok(Served::Done { until: addr + ps })
            }
            Fill::Exists => {
                self.uffd.wake(addr, ps)?;
                Ok(Served::Done { until: addr + ps })
            }
            Fill::Retry => {
                self.stats.retries += 1;
                Ok(Served::Retry)
            }
            Fill::TargetGone => Ok(Served::Gone),
            Fill::NoMapping => Ok(Served::Dropped),
            Fill::Unsupported if self.liveness.kill() => Ok(Served::Gone),
            Fill::Unsupported => Err(FaultError::CannotFail { addr, reason: reason.to_string() }),
        }
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.forget_early_wakes();
        if self.stopped != Some(StopReason::CloneExited) && !self.waiting.is_empty() {
            if self.failing.is_none() {
                self.failing = Some("fault server dropped".to_string());
            }
            let _ = self.serve_waiting(&mut Vec::new());
        }
    }
}
