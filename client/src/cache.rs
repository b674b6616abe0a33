//! [`PageCache`]: the host's copy of one snapshot image, shared by every clone of it on this host.
//!
//! * Memory: one memfd (shmem) of the image size, the single store of the host's pages, and the
//!   daemon's read-only `MAP_SHARED` view of it. A 64 GiB image costs address space only; each inserted
//!   page commits 4 KiB of shmem, charged to the daemon's cgroup once however many clones read it.
//!   Pages known to be zero are never written, so they cost nothing.
//! * Sharing with clones: a clone that maps the memfd `MAP_PRIVATE` ([`PageCache::clone_fd`], a
//!   read-only descriptor) and registers that view with userfaultfd in `MISSING` mode reads every page
//!   already here through the kernel, with no userfaultfd event and no copy; only holes fault to the
//!   daemon; a clone's write copies the page privately (the cache and the other clones keep theirs).
//! * Writing: a page goes in with one `pwrite(2)` of the whole page at its offset. The kernel copies
//!   it into a new shmem folio under the folio's lock and marks it up to date before unlocking, and a
//!   fault on the page takes that lock, so no clone ever maps a partly written page. Writing through a
//!   shared mapping instead would make the page visible (zero-filled) at the first store. For the same
//!   reason nothing here ever reads a hole through the daemon's view: a read fault there would put a
//!   zero page into the memfd, which every clone would then take for the image's bytes. The present
//!   bitmap is the only truth, and reads check it first.
//! * State: atomic bitmaps. A page is *claimed* by the one thread that writes it, then *present* once
//!   its bytes are complete; present pages are never written again, so readers (fault servers, on any
//!   thread) use them without locks.
//! * Waiting: the cache does not block fault servers. A server that finds a page missing marks it
//!   *wanted* ([`PageCache::want`]) and parks the fault; when a wanted page is inserted, the inserting
//!   thread signals every subscribed [`Waker`] ([`PageCache::subscribe`]) and the condition variable
//!   behind [`PageCache::wait_present`] (for simple blocking callers). Pages nobody wants cost no
//!   wake-ups, so bulk fills stay cheap.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};
use std::{io, slice};

use crate::bitmap::AtomicBitmap;
use crate::waker::Waker;

/// Work run when a page arrives ([`PageCache::on_arrival`]).
pub type Arrival = Box<dyn FnOnce() + Send>;

/// The cache's page size: image pages are numbered in units of 4 KiB.
pub const CACHE_PAGE_SIZE: u64 = 4096;

/// Errors from the page cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The image size is 0 or not a whole number of pages.
    #[error("image size {bytes} bytes is not a positive multiple of the 4096-byte page")]
    BadImageSize {
        /// The size asked for.
        bytes: u64,
    },
    /// memfd_create(2), ftruncate(2) or mmap(2) refused the cache.
    #[error("cannot create a {bytes}-byte memfd page cache")]
    Map {
        /// The size asked for.
        bytes: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A page index past the end of the image.
    #[error("pages [{first}, +{count}) are outside the image ({pages} pages)")]
    OutOfRange {
        /// First page.
        first: u64,
        /// Number of pages.
        count: u64,
        /// Pages in the image.
        pages: u64,
    },
    /// Writing a page into the memfd failed.
    #[error("page {page}: writing it into the cache memfd failed")]
    Write {
        /// The page.
        page: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Data that is not exactly one page.
    #[error("page {page}: got {len} bytes, a page is 4096")]
    BadLength {
        /// The page.
        page: u64,
        /// Bytes given.
        len: usize,
    },
}

/// What the cache knows about a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState<'a> {
    /// Not (yet) in the cache.
    Missing,
    /// All zero.
    Zero,
    /// Its bytes.
    Data(&'a [u8]),
}

/// Result of an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The page is new to the cache.
    New,
    /// The page was already present (or being written by another thread); the data was dropped.
    Duplicate,
}

/// The memfd and the daemon's read-only shared view of it, unmapped on drop.
#[derive(Debug)]
struct CacheMap {
    memfd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; all access goes through `PageCache`, whose
// claim/present protocol gives each page one writer (through the memfd, not the view) before
// publication and only readers after.
unsafe impl Send for CacheMap {}
// SAFETY: as above: the view is only read, and only where the present bitmap says the page is whole.
unsafe impl Sync for CacheMap {}

impl CacheMap {
    fn new(len: usize) -> io::Result<CacheMap> {
        let memfd = rustix::fs::memfd_create("spindrift-cache", rustix::fs::MemfdFlags::CLOEXEC)?;
        CacheMap::over(memfd, len)
    }

    /// Sizes `memfd` (a memfd, or an empty regular file opened read-write) to `len` and maps it.
    fn over(memfd: OwnedFd, len: usize) -> io::Result<CacheMap> {
        rustix::fs::ftruncate(&memfd, len as u64)?;
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        // SAFETY: a fresh shared mapping of our own memfd at an address of the kernel's choosing
        // aliases no Rust memory; it is read-only, so nothing in this process writes through it.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, flags, memfd.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))?;
        Ok(CacheMap { memfd, ptr, len })
    }
}

impl Drop for CacheMap {
    fn drop(&mut self) {
        // SAFETY: we own the mapping, and no borrow of it outlives `self` (slices borrow the cache).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The arrival callbacks by page.
#[derive(Default)]
struct Callbacks(HashMap<u64, Vec<Arrival>>);

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} pages with arrival callbacks", self.0.len())
    }
}

/// The page cache for one snapshot image. Share it as `Arc<PageCache>`.
#[derive(Debug)]
pub struct PageCache {
    map: CacheMap,
    pages: u64,
    claimed: AtomicBitmap,
    present: AtomicBitmap,
    zero: AtomicBitmap,
    wanted: AtomicBitmap,
    present_count: AtomicU64,
    subscribers: Mutex<Vec<Weak<Waker>>>,
    /// Work to run on the inserting thread when a page arrives (see [`PageCache::on_arrival`]).
    callbacks: Mutex<Callbacks>,
    /// Pages in `callbacks` (read without the lock on every insert).
    callback_pages: AtomicU64,
    arrivals: Mutex<u64>,
    arrived: Condvar,
}

impl PageCache {
    /// Reserves a cache for an image of `image_bytes` (a multiple of 4096). Commits no memory.
    pub fn new(image_bytes: u64) -> Result<PageCache, CacheError> {
        PageCache::with_map(image_bytes, CacheMap::new)
    }

    fn with_map(image_bytes: u64, map: impl FnOnce(usize) -> io::Result<CacheMap>) -> Result<PageCache, CacheError> {
        if image_bytes == 0 || image_bytes & (CACHE_PAGE_SIZE - 1) != 0 || usize::try_from(image_bytes).is_err() {
            return Err(CacheError::BadImageSize { bytes: image_bytes });
        }
        let map = map(image_bytes as usize).map_err(|source| CacheError::Map { bytes: image_bytes, source })?;
        let pages = image_bytes / CACHE_PAGE_SIZE;
        Ok(PageCache {
            map,
            pages,
            claimed: AtomicBitmap::new(pages),
            present: AtomicBitmap::new(pages),
            zero: AtomicBitmap::new(pages),
            wanted: AtomicBitmap::new(pages),
            present_count: AtomicU64::new(0),
            subscribers: Mutex::new(Vec::new()),
            callbacks: Mutex::new(Callbacks::default()),
            callback_pages: AtomicU64::new(0),
            arrivals: Mutex::new(0),
            arrived: Condvar::new(),
        })
    }

    /// A cache whose store is `file` instead of a memfd: an empty regular file opened read-write
    /// (a `fetch --out` target), sized to `image_bytes`, its holes the pages not yet here. Pages
    /// land in the file as they arrive, so the finished image needs no copy.
    pub fn over_file(file: OwnedFd, image_bytes: u64) -> Result<PageCache, CacheError> {
        PageCache::with_map(image_bytes, |len| CacheMap::over(file, len))
    }

    /// Pages in the image.
    pub fn page_count(&self) -> u64 {
        self.pages
    }

    /// Image size in bytes.
    pub fn image_bytes(&self) -> u64 {
        self.pages * CACHE_PAGE_SIZE
    }

    /// Pages present so far.
    pub fn present_count(&self) -> u64 {
        self.present_count.load(Ordering::Relaxed)
    }

    fn check(&self, first: u64, count: u64) -> Result<(), CacheError> {
        match first.checked_add(count) {
            Some(end) if end <= self.pages => Ok(()),
            _ => Err(CacheError::OutOfRange { first, count, pages: self.pages }),
        }
    }

    /// Inserts page `page` (4096 bytes). All-zero data is recorded as a zero page without writing.
    /// Safe to call from any thread, concurrently with readers and other inserters.
    pub fn insert(&self, page: u64, data: &[u8]) -> Result<Inserted, CacheError> {
        self.check(page, 1)?;
        if data.len() as u64 != CACHE_PAGE_SIZE {
            return Err(CacheError::BadLength { page, len: data.len() });
        }
        if data.iter().fold(0u8, |acc, &b| acc | b) == 0 {
            return Ok(if self.insert_zero(page, 1)? == 1 { Inserted::New } else { Inserted::Duplicate });
        }
        let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
        if self.claimed.or_word(w, bit) != 0 {
            return Ok(Inserted::Duplicate);
        }
        // One pwrite of the whole page: atomic for every reader of the memfd (see the module docs).
        let written = rustix::io::pwrite(&self.map.memfd, data, page * CACHE_PAGE_SIZE);
        match written {
            Ok(n) if n == data.len() => {}
            Ok(n) => {
                self.claimed.take_word(w, bit);
                return Err(CacheError::Write { page, source: io::Error::other(format!("short write of {n} bytes")) });
            }
            Err(e) => {
                self.claimed.take_word(w, bit);
                return Err(CacheError::Write { page, source: e.into() });
            }
        }
        self.publish(w, bit);
        Ok(Inserted::New)
    }

    /// Records pages `[first, first + count)` as zero (those not already present). Returns how many
    /// were new.
    pub fn insert_zero(&self, first: u64, count: u64) -> Result<u64, CacheError> {
        self.check(first, count)?;
        let mut new = 0;
        let mut notify = false;
        self.claimed.set_range(first, count, |w, mask| {
            self.zero.or_word(w, mask);
            self.present.or_word(w, mask);
            new += u64::from(mask.count_ones());
            notify |= self.wanted.take_word(w, mask) != 0;
        });
        self.present_count.fetch_add(new, Ordering::Relaxed);
        self.run_arrivals(first, count);
        if notify {
            self.notify();
        }
        Ok(new)
    }

    fn publish(&self, w: usize, bit: u64) {
        self.present.or_word(w, bit);
        self.present_count.fetch_add(1, Ordering::Relaxed);
        self.run_arrivals(w as u64 * 64 + u64::from(bit.trailing_zeros()), 1);
        if self.wanted.take_word(w, bit) != 0 {
            self.notify();
        }
    }

    /// Runs the arrival callbacks of `[first, first + count)` (their pages are present now).
    fn run_arrivals(&self, first: u64, count: u64) {
        // SeqCst: ordered after the present bits just set, as `on_arrival` orders its check.
        if self.callback_pages.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut due = Vec::new();
        {
            let mut map = self.callbacks.lock().unwrap_or_else(PoisonError::into_inner);
            for page in first..first + count {
                if let Some(list) = map.0.remove(&page) {
                    self.callback_pages.fetch_sub(1, Ordering::SeqCst);
                    due.extend(list);
                }
            }
        }
        for f in due {
            f();
        }
    }

    /// Runs `f` on the thread that inserts `page`, right after the page is present: a fault server
    /// of a clone that maps the cache memfd wakes the clone from there, without a hop to its own
    /// thread. Returns `f` back if the page is present already (the caller acts itself).
    pub fn on_arrival(&self, page: u64, f: Arrival) -> Option<Arrival> {
        if page >= self.pages {
            return Some(f);
        }
        let mut map = self.callbacks.lock().unwrap_or_else(PoisonError::into_inner);
        // Count the page before looking at its bit, and the publisher sets the bit before looking at
        // the count (both SeqCst): either we see the page present, or the publisher sees the count
        // and takes the lock, behind us, finding the callback. No arrival is missed.
        self.callback_pages.fetch_add(1, Ordering::SeqCst);
        if self.present.get(page) {
            self.callback_pages.fetch_sub(1, Ordering::SeqCst);
            return Some(f);
        }
        let list = map.0.entry(page).or_default();
        if !list.is_empty() {
            // The page was counted already.
            self.callback_pages.fetch_sub(1, Ordering::SeqCst);
        }
        list.push(f);
        None
    }

    fn notify(&self) {
        *self.arrivals.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.arrived.notify_all();
        let mut subs = self.subscribers.lock().unwrap_or_else(PoisonError::into_inner);
        subs.retain(|weak| match weak.upgrade() {
            Some(waker) => {
                waker.wake();
                true
            }
            None => false,
        });
    }

    /// A read-only descriptor of the cache's memfd for a clone to map `MAP_PRIVATE` (see the module
    /// docs). A new open file description: the clone can neither write nor resize the cache through it.
    pub fn clone_fd(&self) -> io::Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", self.map.memfd.as_raw_fd());
        Ok(rustix::fs::open(
            path.as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?)
    }

    /// Whether page `page` is present.
    pub fn is_present(&self, page: u64) -> bool {
        page < self.pages && self.present.get(page)
    }

    /// Whether all of `[first, first + count)` is present.
    pub fn all_present(&self, first: u64, count: u64) -> bool {
        self.check(first, count).is_ok() && self.present.all(first, count)
    }

    /// Whether all of `[first, first + count)` is present and zero.
    pub fn all_zero(&self, first: u64, count: u64) -> bool {
        self.all_present(first, count) && self.zero.all(first, count)
    }

    /// The page's state. Present pages never change, so the slice stays valid as long as the cache.
    pub fn state(&self, page: u64) -> PageState<'_> {
        if !self.is_present(page) {
            PageState::Missing
        } else if self.zero.get(page) {
            PageState::Zero
        } else {
            PageState::Data(self.slice(page, 1))
        }
    }

    /// The page's bytes, if present (zero pages read as zeros).
    pub fn get(&self, page: u64) -> Option<&[u8]> {
        self.is_present(page).then(|| self.slice(page, 1))
    }

    /// The bytes of `[first, first + count)`, if all of it is present.
    pub fn get_run(&self, first: u64, count: u64) -> Option<&[u8]> {
        self.all_present(first, count).then(|| self.slice(first, count))
    }

    /// Caller has checked that `[first, first + count)` is in range and present.
    fn slice(&self, first: u64, count: u64) -> &[u8] {
        let (offset, len) = ((first * CACHE_PAGE_SIZE) as usize, (count * CACHE_PAGE_SIZE) as usize);
        // SAFETY: the range lies in the mapping (checked by the callers) and every page of it is present:
        // written completely before its present bit was set (SeqCst, read above) and never written again.
        // Zero pages were never written at all. The borrow is tied to `self`, which owns the mapping.
        unsafe { slice::from_raw_parts(self.map.ptr.as_ptr().add(offset), len) }
    }

    /// Marks `page` wanted, so its insertion wakes the subscribers. Returns whether it is present
    /// already (checked after marking: then no wake-up will come, and none is needed).
    pub fn want(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        self.wanted.or_word((page / 64) as usize, 1 << (page % 64));
        self.present.get(page)
    }

    /// Subscribes `waker` to insertions of wanted pages. Held weakly: dropping the waker unsubscribes.
    pub fn subscribe(&self, waker: &Arc<Waker>) {
        self.subscribers.lock().unwrap_or_else(PoisonError::into_inner).push(Arc::downgrade(waker));
    }

    /// Blocks until `page` is present or `timeout` passes; returns whether it is present.
    pub fn wait_present(&self, page: u64, timeout: Duration) -> bool {
        if self.want(page) {
            return true;
        }
        let deadline = Instant::now() + timeout;
        let mut guard = self.arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            // Checked under the lock that `notify` takes after publishing, so no arrival is missed.
            if self.is_present(page) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self.arrived.wait_timeout(guard, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A clone's view: the cache's read-only descriptor mapped `MAP_PRIVATE`.
    struct View {
        ptr: *mut u8,
        len: usize,
    }

    impl View {
        fn of(cache: &PageCache) -> View {
            let fd = cache.clone_fd().unwrap();
            let len = cache.image_bytes() as usize;
            let flags = libc::MAP_PRIVATE;
            // SAFETY: a fresh private mapping of the memfd; only this test touches it.
            let ptr = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd.as_raw_fd(), 0)
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            View { ptr: ptr.cast(), len }
        }

        fn page(&self, page: u64) -> Vec<u8> {
            // SAFETY: the page lies inside the mapping, which lives as long as `self`.
            unsafe { std::slice::from_raw_parts(self.ptr.add((page * CACHE_PAGE_SIZE) as usize), 4096) }.to_vec()
        }

        fn write(&self, page: u64, byte: u8) {
            // SAFETY: inside the private mapping; the write stays in this process's copy.
            unsafe { *self.ptr.add((page * CACHE_PAGE_SIZE) as usize) = byte };
        }
    }

    impl Drop for View {
        fn drop(&mut self) {
            // SAFETY: our own mapping.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    #[test]
    fn clones_read_inserted_pages_through_the_memfd_and_write_privately() {
        let cache = PageCache::new(4 * 4096).unwrap();
        let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
        assert_eq!(cache.insert(1, &page).unwrap(), Inserted::New);
        assert_eq!(cache.insert(1, &page).unwrap(), Inserted::Duplicate);
        let (a, b) = (View::of(&cache), View::of(&cache));
        assert_eq!(a.page(1), page, "a page inserted before the clone mapped the cache");
        let later: Vec<u8> = vec![7; 4096];
        cache.insert(2, &later).unwrap();
        assert_eq!(b.page(2), later, "a page inserted after the clone mapped the cache");
        a.write(1, 0);
        assert_eq!(a.page(1)[0], 0, "the clone sees its own write");
        assert_eq!(b.page(1), page, "another clone keeps the image");
        assert_eq!(cache.get(1).unwrap(), page.as_slice(), "the cache keeps the image");
        assert_eq!(cache.present_count(), 2);
    }

    #[test]
    fn every_arrival_callback_runs_once_however_registration_and_insertion_race() {
        use std::sync::atomic::AtomicU64;
        const PAGES: u64 = 2000;
        let cache = Arc::new(PageCache::new(PAGES * 4096).unwrap());
        let ran = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let registrar = {
            let (cache, ran) = (cache.clone(), ran.clone());
            std::thread::spawn(move || {
                for page in 0..PAGES {
                    let ran = ran.clone();
                    let f: Arrival = Box::new(move || {
                        ran[page as usize].fetch_add(1, Ordering::SeqCst);
                    });
                    if let Some(f) = cache.on_arrival(page, f) {
                        f(); // present already: the caller acts itself
                    }
                }
            })
        };
        let data = vec![9u8; 4096];
        for page in 0..PAGES {
            if page % 3 == 0 {
                cache.insert_zero(page, 1).unwrap();
            } else {
                cache.insert(page, &data).unwrap();
            }
        }
        registrar.join().unwrap();
        for (page, n) in ran.iter().enumerate() {
            assert_eq!(n.load(Ordering::SeqCst), 1, "page {page}");
        }
    }

    #[test]
    fn the_clone_descriptor_is_read_only() {
        let cache = PageCache::new(4096).unwrap();
        let fd = cache.clone_fd().unwrap();
        assert!(rustix::io::pwrite(&fd, &[1u8; 16], 0).is_err(), "a clone must not write the shared cache");
        assert!(rustix::fs::ftruncate(&fd, 0).is_err(), "a clone must not resize the shared cache");
        assert!(!cache.is_present(0));
        assert!(matches!(cache.insert(0, &[1; 100]), Err(CacheError::BadLength { .. })));
        assert!(matches!(cache.insert(1, &[1; 4096]), Err(CacheError::OutOfRange { .. })));
    }
}
