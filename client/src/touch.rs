//! `spindrift-client touch`: a test process that stands in for a clone, to test the fault path
//! without a VM.
//!
//! It maps anonymous memory of the image's size, registers it with a new userfaultfd, hands that to
//! the host daemon (spindrift's handoff format, naming the session, or Firecracker's), then touches
//! pages in a given
//! order (a trace file, or a generated pattern) and checks each page byte for byte against the image
//! file. Every touch of a missing page blocks in the kernel until the daemon installs it; the time of
//! that first access is the touch latency.
//!
//! Failure is visible, never a hang: a page the daemon fails arrives as SIGBUS (the process dies of it,
//! after saying so on stderr), and if the daemon hangs up mid-run the process exits with status
//! [`HANGUP_EXIT_CODE`] (the touching thread may be blocked in a fault nobody will answer, so leaving
//! the process is the only way out).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cache::CACHE_PAGE_SIZE;
use crate::handoff::{recv_map_reply, send_handoff, send_map_request, send_uffd, HandoffError, HandoffMessage};
use crate::region::{Region, PAGE_4K};
use crate::uffd::{Uffd, UffdError};

/// Exit status of a touch process whose daemon hung up before it finished.
pub const HANGUP_EXIT_CODE: i32 = 3;
/// How long a touch waits for the daemon's socket to appear.
pub const CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);
/// Mismatching pages listed in the report.
const MISMATCHES_LISTED: usize = 10;

/// Errors of a touch run.
#[derive(Debug, thiserror::Error)]
pub enum TouchError {
    /// A bad flag.
    #[error("{0}")]
    Invalid(String),
    /// The trace file cannot be used.
    #[error("trace {path}: {reason}")]
    Trace {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image file cannot be read or has the wrong size.
    #[error("image {path}: {reason}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Memory could not be mapped.
    #[error("mapping {bytes} bytes of anonymous memory: {source}")]
    Map {
        /// The size.
        bytes: u64,
        /// The cause.
        source: std::io::Error,
    },
    /// The userfaultfd could not be created or registered.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The daemon's socket could not be reached.
    #[error("connecting to the daemon at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The handoff failed.
    #[error("handing the userfaultfd to the daemon: {0}")]
    Handoff(#[from] HandoffError),
}

/// A generated touch order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// The first pages of the image, in order.
    Sequential,
    /// Distinct pages chosen uniformly, in random order.
    Random,
    /// Runs of 1 to 4 contiguous pages at random places, in random order (faults come in short runs).
    Runs,
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pattern::Sequential => "sequential",
            Pattern::Random => "random",
            Pattern::Runs => "runs",
        })
    }
}

impl std::str::FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Pattern, String> {
        match s {
            "sequential" => Ok(Pattern::Sequential),
            "random" => Ok(Pattern::Random),
            "runs" => Ok(Pattern::Runs),
            other => Err(format!("unknown pattern {other:?}: use random, sequential or runs")),
        }
    }
}

/// Which pages to touch, in which order.
#[derive(Debug, Clone)]
pub enum Order {
    /// A file of page numbers, one per line (decimal or `0x` hex; `#` starts a comment).
    Trace(PathBuf),
    /// A generated pattern over `fraction` of the pages.
    Pattern {
        /// The pattern.
        pattern: Pattern,
        /// Fraction of the image's pages, in (0, 1].
        fraction: f64,
        /// Seed of the pattern.
        seed: u64,
    },
}

/// A touch run's settings.
#[derive(Debug, Clone)]
pub struct TouchConfig {
    /// The daemon's clone socket.
    pub daemon_socket: PathBuf,
    /// The session id (decimal).
    pub session: String,
    /// Image size in bytes (a multiple of 4096).
    pub image_bytes: u64,
    /// What to touch.
    pub order: Order,
    /// The image file to compare with.
    pub verify: PathBuf,
    /// The clone id to hand over (default: the process id).
    pub clone_id: Option<u64>,
    /// The fork to hand over.
    pub fork: Option<u32>,
    /// A report to send after touching, as a clone would: (status, result bytes).
    pub report: Option<(u32, Vec<u8>)>,
    /// Hand over in Firecracker's format (the bare region array: no session, no ids), as a
    /// Firecracker VM would; the daemon then serves it from the only session it knows.
    pub firecracker_format: bool,
    /// Use private anonymous memory that the daemon copies every page into, instead of mapping the
    /// host's cache memfd `MAP_PRIVATE` (the default for spindrift's format).
    pub private_copy: bool,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyUs {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// What a touch run found.
#[derive(Debug, Clone, Serialize)]
pub struct TouchReport {
    /// Pages in the image.
    pub image_pages: u64,
    /// Pages touched.
    pub pages_touched: u64,
    /// Pages whose bytes differ from the image.
    pub mismatches: u64,
    /// The first mismatching pages.
    pub mismatched_pages: Vec<u64>,
    /// Wall time of the touching, seconds.
    pub elapsed_s: f64,
    /// Pages touched per second.
    pub pages_per_s: f64,
    /// Time of each page's first access.
    pub latency_us: LatencyUs,
}

/// A deterministic generator (SplitMix64).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The pages a pattern touches over an image of `pages` pages, in touch order.
pub fn pattern_pages(pattern: Pattern, pages: u64, fraction: f64, seed: u64) -> Result<Vec<u64>, TouchError> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(TouchError::Invalid(format!("--fraction {fraction} is not in (0, 1]")));
    }
    let n = ((pages as f64 * fraction).round() as u64).clamp(1, pages);
    let mut rng = SplitMix(seed);
    Ok(match pattern {
        Pattern::Sequential => (0..n).collect(),
        Pattern::Random => {
            let mut all: Vec<u64> = (0..pages).collect();
            for i in 0..n as usize {
                let j = i + rng.below(pages - i as u64) as usize;
                all.swap(i, j);
            }
            all.truncate(n as usize);
            all
        }
        Pattern::Runs => {
            let mut chosen = vec![false; pages as usize];
            let mut runs: Vec<Vec<u64>> = Vec::new();
            let mut count = 0;
            let mut tries = 0u64;
            while count < n && tries < 64 * pages {
                tries += 1;
                let start = rng.below(pages);
                let len = 1 + rng.below(4);
                let mut run = Vec::new();
                for p in start..(start + len).min(pages) {
                    if count < n && !chosen[p as usize] {
                        chosen[p as usize] = true;
                        run.push(p);
                        count += 1;
                    }
                }
                if !run.is_empty() {
                    runs.push(run);
                }
            }
            // Nearly all pages asked for: fill what chance left out.
            let mut rest: Vec<u64> = (0..pages).filter(|&p| !chosen[p as usize]).take((n - count) as usize).collect();
            for i in (1..runs.len()).rev() {
                runs.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut order: Vec<u64> = runs.into_iter().flatten().collect();
            order.append(&mut rest);
            order
        }
    })
}

/// Reads a trace: one page number per line (decimal or `0x` hex); blank lines and `#` comments are
/// skipped. Every page must lie in the image.
pub fn read_trace(path: &Path, pages: u64) -> Result<Vec<u64>, TouchError> {
    let err = |reason: String| TouchError::Trace { path: path.to_path_buf(), reason };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let mut order = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| err(e.to_string()))?;
        let text = line.split('#').next().unwrap_or("").trim();
        if text.is_empty() {
            continue;
        }
        let page = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        }
        .map_err(|_| err(format!("line {}: {text:?} is not a page number", i + 1)))?;
        if page >= pages {
            return Err(err(format!("line {}: page {page} is past the image's {pages} pages", i + 1)));
        }
        order.push(page);
    }
    if order.is_empty() {
        return Err(err("no pages listed".into()));
    }
    Ok(order)
}

/// Anonymous memory standing in for guest memory; unmapped on drop.
struct Mapping {
    addr: u64,
    len: usize,
}

impl Mapping {
    fn new(bytes: u64) -> Result<Mapping, TouchError> {
        let len =
            usize::try_from(bytes).map_err(|_| TouchError::Invalid(format!("{bytes} bytes do not fit memory")))?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases nothing.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(TouchError::Map { bytes, source: std::io::Error::last_os_error() });
        }
        // SAFETY: `[ptr, ptr + len)` is the mapping just made; the advice changes no contents (it keeps
        // faults at 4 KiB, like the daemon's pages). Failure is harmless.
        unsafe { libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE) };
        Ok(Mapping { addr: ptr as u64, len })
    }

    /// The cache memfd `fd` mapped `MAP_PRIVATE`: the host's pages read through the kernel, writes
    /// stay private.
    fn private_file(fd: &std::os::fd::OwnedFd, bytes: u64) -> Result<Mapping, TouchError> {
        use std::os::fd::AsRawFd;
        let len =
            usize::try_from(bytes).map_err(|_| TouchError::Invalid(format!("{bytes} bytes do not fit memory")))?;
        let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        // SAFETY: a fresh private mapping of the memfd at an address of the kernel's choosing aliases
        // nothing; the descriptor is open for the call.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd.as_raw_fd(), 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(TouchError::Map { bytes, source: std::io::Error::last_os_error() });
        }
        Ok(Mapping { addr: ptr as u64, len })
    }

    /// The page at `page` (4 KiB units); the first access may block until the daemon installs it.
    fn page(&self, page: u64) -> &[u8] {
        let offset = (page * CACHE_PAGE_SIZE) as usize;
        // SAFETY: callers pass pages inside the mapping (checked against the image's page count, which
        // is the mapping's length); the mapping lives as long as `self`, and no one writes to it in this
        // process (the daemon fills missing pages through the userfaultfd before any read completes).
        unsafe { std::slice::from_raw_parts((self.addr as usize + offset) as *const u8, CACHE_PAGE_SIZE as usize) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping and no borrow of it outlives `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// Watches the daemon connection: an error line or a hang-up before the run is done ends the
/// process with [`HANGUP_EXIT_CODE`].
fn watch_daemon(stream: UnixStream, done: Arc<AtomicBool>) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.by_ref().take(64 * 1024).read_line(&mut line).unwrap_or(0);
        if done.load(Ordering::SeqCst) {
            return;
        }
        if n == 0 {
            eprintln!("spindrift-client touch: the daemon closed the connection before the run finished");
            std::process::exit(HANGUP_EXIT_CODE);
        }
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v.get("type").and_then(|t| t.as_str()) == Some("error") {
                let msg = v.get("message").and_then(|m| m.as_str()).unwrap_or("(no message)");
                eprintln!("spindrift-client touch: the daemon refused the handoff: {msg}");
                std::process::exit(HANGUP_EXIT_CODE);
            }
        }
    }
}

/// Connects to the daemon, retrying for [`CONNECT_PATIENCE`] while its socket is not there yet (a
/// daemon starting at the same time).
fn connect(path: &Path) -> Result<UnixStream, TouchError> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(source) => return Err(TouchError::Connect { path: path.to_path_buf(), source }),
        }
    }
}

/// What touching the pages found, before it becomes a [`TouchReport`].
struct Timed {
    latency: Histogram<u64>,
    touched: u64,
    mismatches: u64,
    mismatched_pages: Vec<u64>,
    elapsed: std::time::Duration,
}

impl Timed {
    fn report(&self, image_pages: u64) -> TouchReport {
        let us = |q: f64| self.latency.value_at_quantile(q) as f64 / 1e3;
        TouchReport {
            image_pages,
            pages_touched: self.touched,
            mismatches: self.mismatches,
            mismatched_pages: self.mismatched_pages.clone(),
            elapsed_s: self.elapsed.as_secs_f64(),
            pages_per_s: self.touched as f64 / self.elapsed.as_secs_f64().max(1e-9),
            latency_us: LatencyUs {
                p50: us(0.5),
                p99: us(0.99),
                p999: us(0.999),
                max: self.latency.max() as f64 / 1e3,
                mean: self.latency.mean() / 1e3,
            },
        }
    }
}

/// Reads the first byte of every page of `order` (timing each first access), then compares the page
/// with the image file.
fn touch_pages(memory: &Mapping, order: &[u64], image: &File, path: &Path) -> Result<Timed, TouchError> {
    let image_err = |reason: String| TouchError::Image { path: path.to_path_buf(), reason };
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000_000, 3)
        .map_err(|e| TouchError::Invalid(format!("latency histogram: {e}")))?;
    let mut expected = vec![0u8; CACHE_PAGE_SIZE as usize];
    let (mut mismatches, mut mismatched_pages) = (0u64, Vec::new());
    let started = Instant::now();
    for &page in order {
        let bytes = memory.page(page);
        let t = Instant::now();
        // SAFETY: `bytes` is a live page of our mapping; a volatile read forces the access (and the
        // fault) to happen here, where it is timed.
        let _ = unsafe { std::ptr::read_volatile(bytes.as_ptr()) };
        let took = t.elapsed();
        latency.saturating_record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1));
        image.read_exact_at(&mut expected, page * CACHE_PAGE_SIZE).map_err(|e| image_err(e.to_string()))?;
        if bytes != expected.as_slice() {
            mismatches += 1;
            if mismatched_pages.len() < MISMATCHES_LISTED {
                mismatched_pages.push(page);
            }
        }
    }
    Ok(Timed { latency, touched: order.len() as u64, mismatches, mismatched_pages, elapsed: started.elapsed() })
}

/// The naive baseline handler: the same touches served in this process by a thread that blocks on
/// the userfaultfd and answers each fault with one `pread` of the page from `image` and one 4 KiB
/// `UFFDIO_COPY` (no cache, no batching, no network): what a first userfaultfd handler does. The
/// latency is measured in the touching thread, as for [`run`].
pub fn run_naive(image_path: &Path, order: &[u64]) -> Result<TouchReport, TouchError> {
    let image_err = |reason: String| TouchError::Image { path: image_path.to_path_buf(), reason };
    let image = File::open(image_path).map_err(|e| image_err(e.to_string()))?;
    let bytes = image.metadata().map_err(|e| image_err(e.to_string()))?.len();
    if bytes == 0 || !bytes.is_multiple_of(CACHE_PAGE_SIZE) {
        return Err(image_err(format!("{bytes} bytes is not a positive multiple of 4096")));
    }
    let pages = bytes / CACHE_PAGE_SIZE;
    if let Some(&p) = order.iter().find(|&&p| p >= pages) {
        return Err(TouchError::Invalid(format!("page {p} is past the image's {pages} pages")));
    }
    let memory = Mapping::new(bytes)?;
    let uffd = Uffd::create(0)?;
    uffd.register_missing(memory.addr, bytes)?;
    let done = Arc::new(AtomicBool::new(false));
    let handler = {
        let (done, image) = (done.clone(), image.try_clone().map_err(|e| image_err(e.to_string()))?);
        let base = memory.addr;
        let mut uffd = uffd;
        std::thread::spawn(move || -> Result<u64, TouchError> {
            let mut events = Vec::with_capacity(64);
            let mut page = vec![0u8; CACHE_PAGE_SIZE as usize];
            let mut served = 0;
            while !done.load(Ordering::SeqCst) {
                let timeout = Some(std::time::Duration::from_millis(20));
                let ready = crate::waker::poll(&[(uffd.as_fd(), libc::POLLIN)], &mut [0], timeout)
                    .map_err(|e| TouchError::Invalid(format!("poll on the userfaultfd: {e}")))?;
                if ready == 0 {
                    continue;
                }
                events.clear();
                uffd.read_events(&mut events)?;
                for e in &events {
                    if let crate::uffd::Event::PageFault { addr, .. } = *e {
                        let addr = addr - addr % CACHE_PAGE_SIZE;
                        image.read_exact_at(&mut page, addr - base).map_err(|e| TouchError::Invalid(e.to_string()))?;
                        uffd.copy(addr, &page, true)?;
                        served += 1;
                    }
                }
            }
            Ok(served)
        })
    };
    let timed = touch_pages(&memory, order, &image, image_path);
    done.store(true, Ordering::SeqCst);
    let served = handler.join().map_err(|_| TouchError::Invalid("the naive handler thread panicked".into()))?;
    let timed = timed?;
    served?;
    Ok(timed.report(pages))
}

/// Runs a touch: see the module docs.
pub fn run(config: &TouchConfig) -> Result<TouchReport, TouchError> {
    if config.image_bytes == 0 || !config.image_bytes.is_multiple_of(CACHE_PAGE_SIZE) {
        return Err(TouchError::Invalid(format!(
            "--image-bytes {} is not a positive multiple of 4096",
            config.image_bytes
        )));
    }
    let pages = config.image_bytes / CACHE_PAGE_SIZE;
    let order = match &config.order {
        Order::Trace(path) => read_trace(path, pages)?,
        Order::Pattern { pattern, fraction, seed } => pattern_pages(*pattern, pages, *fraction, *seed)?,
    };
    let image_err = |reason: String| TouchError::Image { path: config.verify.clone(), reason };
    let image = File::open(&config.verify).map_err(|e| image_err(e.to_string()))?;
    let len = image.metadata().map_err(|e| image_err(e.to_string()))?.len();
    if len != config.image_bytes {
        return Err(image_err(format!("{len} bytes, but --image-bytes is {}", config.image_bytes)));
    }

    let uffd = Uffd::create(0)?;
    let stream = connect(&config.daemon_socket)?;
    let shared_cache = !config.firecracker_format && !config.private_copy;
    let memory = if shared_cache {
        send_map_request(&stream, Some(&config.session))?;
        let (memfd, bytes) = recv_map_reply(&stream, crate::handoff::DEFAULT_RECV_TIMEOUT)?;
        if bytes != config.image_bytes {
            return Err(TouchError::Invalid(format!(
                "the daemon's cache holds {bytes} bytes, but --image-bytes is {}",
                config.image_bytes
            )));
        }
        Mapping::private_file(&memfd, bytes)?
    } else {
        Mapping::new(config.image_bytes)?
    };
    uffd.register_missing(memory.addr, config.image_bytes)?;
    let message = HandoffMessage {
        regions: vec![Region {
            base_host_virt_addr: memory.addr,
            size: config.image_bytes,
            offset: 0,
            page_size: PAGE_4K,
        }],
        clone_id: Some(config.clone_id.unwrap_or(u64::from(std::process::id()))),
        session: Some(config.session.clone()),
        snapshot: None,
        fork: config.fork,
        shared_cache,
    };
    if config.firecracker_format {
        send_uffd(&stream, uffd.as_fd(), &message.regions)?;
    } else {
        send_handoff(&stream, uffd.as_fd(), &message)?;
    }
    let done = Arc::new(AtomicBool::new(false));
    let watcher = match stream.try_clone() {
        Ok(s) => {
            let done = done.clone();
            Some(std::thread::spawn(move || watch_daemon(s, done)))
        }
        Err(e) => {
            tracing::warn!("cannot watch the daemon connection: {e}");
            None
        }
    };

    let timed = touch_pages(&memory, &order, &image, &config.verify)?;
    if let Some((status, result)) = &config.report {
        let hex: String = result.iter().map(|b| format!("{b:02x}")).collect();
        let line = serde_json::json!({ "type": "report", "status": status, "result_hex": hex });
        if let Err(e) = writeln!(&stream, "{line}") {
            tracing::warn!("sending the report to the daemon: {e}");
        }
    }
    done.store(true, Ordering::SeqCst);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    drop(stream);
    drop(memory);
    drop(uffd);
    Ok(timed.report(pages))
}

extern "C" fn on_sigbus(_: libc::c_int) {
    const MSG: &[u8] = b"spindrift-client touch: SIGBUS: the daemon failed a page (server lost or daemon stopping)\n";
    // SAFETY: write(2) and signal(2) are async-signal-safe; MSG is a static buffer. Restoring the
    // default action and returning re-runs the faulting access, which then kills the process with
    // SIGBUS, so the exit status still says what happened.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Makes a SIGBUS (a failed page) say so on stderr before it kills the process.
pub fn report_sigbus() {
    let handler = on_sigbus as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installs an async-signal-safe handler (see `on_sigbus`) for SIGBUS.
    unsafe { libc::signal(libc::SIGBUS, handler) };
}

/// A short human summary of a report.
pub fn summary(report: &TouchReport) -> String {
    format!(
        "touched {} of {} pages in {:.3} s ({:.0} pages/s), {} mismatches; first-touch latency p50 {:.1} us, p99 {:.1} \
         us, p99.9 {:.1} us, max {:.1} us",
        report.pages_touched,
        report.image_pages,
        report.elapsed_s,
        report.pages_per_s,
        report.mismatches,
        report.latency_us.p50,
        report.latency_us.p99,
        report.latency_us.p999,
        report.latency_us.max
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn patterns_touch_distinct_pages_in_range() {
        for pattern in [Pattern::Sequential, Pattern::Random, Pattern::Runs] {
            for fraction in [0.001, 0.1, 0.5, 1.0] {
                let order = pattern_pages(pattern, 1000, fraction, 7).unwrap();
                let expected = (1000.0 * fraction).round().max(1.0) as usize;
                assert_eq!(order.len(), expected, "{pattern:?} {fraction}");
                let mut sorted = order.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), order.len(), "{pattern:?} repeats pages");
                assert!(order.iter().all(|&p| p < 1000));
            }
        }
        assert_eq!(
            pattern_pages(Pattern::Random, 100, 0.2, 1).unwrap(),
            pattern_pages(Pattern::Random, 100, 0.2, 1).unwrap()
        );
        assert_ne!(
            pattern_pages(Pattern::Random, 100, 0.2, 1).unwrap(),
            pattern_pages(Pattern::Random, 100, 0.2, 2).unwrap()
        );
        assert!(pattern_pages(Pattern::Random, 100, 0.0, 1).is_err());
        assert!(pattern_pages(Pattern::Random, 100, 1.5, 1).is_err());
        // Runs are mostly contiguous.
        let runs = pattern_pages(Pattern::Runs, 10_000, 0.1, 3).unwrap();
        let adjacent = runs.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(adjacent > runs.len() / 3, "{adjacent} adjacent pairs of {}", runs.len());
    }

    #[test]
    fn traces_parse_with_comments_and_refuse_bad_lines() {
        let dir = std::env::temp_dir().join(format!("spindrift-touch-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "# a trace\n3\n\n0x10 # hex\n  7  \n").unwrap();
        assert_eq!(read_trace(&good, 100).unwrap(), vec![3, 16, 7]);
        let bad = dir.join("bad");
        std::fs::write(&bad, "1\nfoo\n").unwrap();
        assert!(read_trace(&bad, 100).unwrap_err().to_string().contains("line 2"));
        std::fs::write(&bad, "100\n").unwrap();
        assert!(read_trace(&bad, 100).unwrap_err().to_string().contains("past the image"));
        std::fs::write(&bad, "# nothing\n").unwrap();
        assert!(read_trace(&bad, 100).unwrap_err().to_string().contains("no pages"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
