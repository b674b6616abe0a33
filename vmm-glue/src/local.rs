//! In-process clones: [`LocalHost`] (a [`CloneHost`]) and [`LocalHandler`] (a [`MemoryHandler`]).
//!
//! Test-only shortcut: at `FORK`, [`LocalHost`] copies the parent's guest memory into a frozen image
//! (a copy of every page a clone may fetch, made while the parent is paused; the real system lets
//! `fork()` copy-on-write or the memory server keep the image). It then starts each clone on its own thread as an in-process VM from the
//! encoded descriptor. A clone's memory is served like on a host: the clone hands its userfaultfd over
//! a Unix socket pair to a [`spindrift_client::FaultServer`] on another thread, which serves from one
//! [`spindrift_client::PageCache`] shared by the fork's clones. The cache starts empty and is filled
//! on demand from the frozen image (the faulting page plus a little read-ahead), the way the network
//! fills it; every page fetched because a clone faulted on it is counted ([`FaultLog`]), so tests can
//! check which pages clones asked for.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use spindrift_client::uffd::Uffd;
use spindrift_client::{
    recv_uffd, send_handoff, FaultServer, HandoffMessage, PageCache, Region, ServerConfig, ServerHandle, ServerStats,
    Status,
};

use crate::abi::PAGE_SIZE;
use crate::clone::{CloneOptions, CloneStart};
use crate::descriptor::Descriptor;
use crate::host::{CloneHost, CloneIdentity, CloneReport, HandlerLink, HostError, MemoryHandler};
use crate::memory::GuestMemory;
use crate::ranges::PageRanges;
use crate::vm::{RunOutcome, Vm};

/// Pages fetched for faults, per page.
#[derive(Debug)]
pub struct FaultLog {
    per_page: Vec<AtomicU32>,
    total: AtomicU64,
}

impl FaultLog {
    fn new(pages: u64) -> FaultLog {
        FaultLog { per_page: (0..pages).map(|_| AtomicU32::new(0)).collect(), total: AtomicU64::new(0) }
    }

    fn record(&self, page: u64) {
        if let Some(c) = self.per_page.get(page as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times clones faulted on `page` while it was missing from the cache.
    pub fn count(&self, page: u64) -> u32 {
        self.per_page.get(page as usize).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Total such faults.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The pages faulted at least once.
    pub fn faulted_pages(&self) -> PageRanges {
        let mut out = PageRanges::new();
        for (i, c) in self.per_page.iter().enumerate() {
            if c.load(Ordering::Relaxed) > 0 {
                out.insert(i as u64, 1);
            }
        }
        out
    }
}

/// What the clones of one fork are served from.
#[derive(Debug)]
pub struct LocalSource {
    image: Vec<u8>,
    cache: Arc<PageCache>,
    faults: FaultLog,
    avoided: PageRanges,
    read_ahead: u64,
}

impl LocalSource {
    /// The parent's memory at the fork.
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// The pages clones must never fetch (zero map and discard hints).
    pub fn avoided(&self) -> &PageRanges {
        &self.avoided
    }

    /// The fault log.
    pub fn faults(&self) -> &FaultLog {
        &self.faults
    }

    /// Puts `page` (and up to `read_ahead` following pages that are not avoided) into the cache.
    fn fetch(&self, page: u64) {
        let pages = self.cache.page_count();
        let mut p = page;
        while p < pages && p <= page + self.read_ahead {
            if p != page && self.avoided.contains(p) {
                break;
            }
            if !self.cache.is_present(p) {
                let s = (p * PAGE_SIZE) as usize;
                if let Err(e) = self.cache.insert(p, &self.image[s..s + PAGE_SIZE as usize]) {
                    tracing::warn!("local cache insert of page {p} failed: {e}");
                }
            }
            p += 1;
        }
    }
}

/// Failure injection for tests: the handler vanishes (like a crashed daemon: no page is poisoned, its
/// end of the socket closes) once it has fetched this many pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VanishAfter(pub u64);

/// Serves one clone's faults from a [`LocalSource`] with a fault server thread. See the module docs.
#[derive(Debug)]
pub struct LocalHandler {
    source: Arc<LocalSource>,
    preload: bool,
    server_config: ServerConfig,
    vanish: Option<VanishAfter>,
    handle: Option<ServerHandle>,
    thread: Option<JoinHandle<Result<ServerStats, String>>>,
}

impl LocalHandler {
    /// A handler serving from `source`.
    pub fn new(source: Arc<LocalSource>, vanish: Option<VanishAfter>) -> LocalHandler {
        LocalHandler {
            source,
            preload: false,
            server_config: ServerConfig::default(),
            vanish,
            handle: None,
            thread: None,
        }
    }

    /// Writes the whole image into the clone's memory before it starts (see
    /// [`LocalHostConfig::preload`]).
    pub fn preloading(mut self, preload: bool) -> LocalHandler {
        self.preload = preload;
        self
    }

    /// Stops the fault server and returns its counters (the clone must be done with its memory).
    pub fn finish(&mut self) -> Result<ServerStats, String> {
        if self.preload && self.thread.is_none() {
            return Ok(ServerStats::default());
        }
        if let Some(h) = self.handle.take() {
            h.stop();
        }
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| "the fault server thread panicked".to_string())?,
            None => Err("the handler was never attached".into()),
        }
    }
}

impl Drop for LocalHandler {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.finish();
        }
    }
}

impl MemoryHandler for LocalHandler {
    fn preload(&mut self, memory: &GuestMemory) -> Result<bool, HostError> {
        if !self.preload {
            return Ok(false);
        }
        let image = self.source.image();
        for run in self.source.avoided().complement(memory.pages()).iter() {
            let (s, e) = ((run.start * PAGE_SIZE) as usize, (run.end() * PAGE_SIZE) as usize);
            memory
                .write(crate::memory::GuestAddress(run.start * PAGE_SIZE), &image[s..e])
                .map_err(|e| HostError::Other(format!("preloading the clone's memory: {e}")))?;
        }
        Ok(true)
    }

    fn attach(&mut self, uffd: &Uffd, regions: &[Region], clone: &CloneIdentity) -> Result<HandlerLink, HostError> {
        let (vmm_end, daemon_end) = UnixStream::pair().map_err(|source| HostError::Io { op: "socketpair", source })?;
        let message = HandoffMessage {
            regions: regions.to_vec(),
            clone_id: Some(u64::from(clone.clone_id)),
            session: clone.session.clone(),
            fork: Some(clone.fork_id),
            ..HandoffMessage::default()
        };
        send_handoff(&vmm_end, uffd.as_fd(), &message).map_err(HostError::Handoff)?;
        let (handle_tx, handle_rx) = mpsc::channel();
        let source = self.source.clone();
        let config = self.server_config.clone();
        let vanish = self.vanish;
        let thread = std::thread::Builder::new()
            .name(format!("local-fault-server-{}", clone.clone_id))
            .spawn(move || serve(daemon_end, source, config, vanish, handle_tx))
            .map_err(|source| HostError::Io { op: "spawning the fault server thread", source })?;
        self.thread = Some(thread);
        match handle_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(h) => self.handle = Some(h),
            Err(_) => {
                let why = self.finish().err().unwrap_or_else(|| "no reason".into());
                return Err(HostError::Other(format!("the local fault server did not start: {why}")));
            }
        }
        Ok(HandlerLink { watch: Some(vmm_end.into()) })
    }
}

fn serve(
    daemon_end: UnixStream,
    source: Arc<LocalSource>,
    config: ServerConfig,
    vanish: Option<VanishAfter>,
    handle_tx: Sender<ServerHandle>,
) -> Result<ServerStats, String> {
    let (fd, handoff) = recv_uffd(&daemon_end).map_err(|e| format!("receiving the userfaultfd: {e}"))?;
    let mut server = FaultServer::from_handoff(fd, handoff, source.cache.clone(), config)
        .map_err(|e| format!("starting the fault server: {e}"))?;
    handle_tx.send(server.handle()).map_err(|_| "the clone stopped waiting".to_string())?;
    let mut missing = Vec::new();
    let mut fetched = 0u64;
    loop {
        missing.clear();
        match server.step(Some(Duration::from_millis(100)), &mut missing) {
            Ok(Status::Running) => {}
            Ok(Status::Stopped(_)) => return Ok(server.stats().clone()),
            Err(e) => {
                // Leave blocked faults blocked: the clone's handler watch sees us go and stops it.
                std::mem::forget(server);
                return Err(format!("fault server step: {e}"));
            }
        }
        for &page in &missing {
            if vanish.is_some_and(|VanishAfter(n)| fetched >= n) {
                tracing::warn!("local handler vanishing after {fetched} pages (failure injection)");
                // Like a crashed daemon: nothing is poisoned, the socket closes.
                std::mem::forget(server);
                drop(daemon_end);
                return Err("vanished (failure injection)".into());
            }
            source.faults.record(page);
            source.fetch(page);
            fetched += 1;
        }
    }
}

/// How [`LocalHost`] runs clones.
#[derive(Debug, Clone)]
pub struct LocalHostConfig {
    /// Pages fetched after each faulting page (like the network's read-ahead), skipping avoided ones.
    pub read_ahead_pages: u64,
    /// Hash each clone's memory before its first instruction and compare with the parent's.
    pub verify_image: bool,
    /// Copy clone console output to stdout.
    pub echo_console: bool,
    /// Failure injection: clone `.0`'s handler vanishes after `.1` pages.
    pub vanish: Option<(u32, VanishAfter)>,
    /// Clones start with the whole image written into their memory (no userfaultfd, no faults): the
    /// ideal pre-provisioned cluster that `demo --local-baseline` compares with.
    pub preload: bool,
}

impl Default for LocalHostConfig {
    fn default() -> Self {
        LocalHostConfig { read_ahead_pages: 15, verify_image: false, echo_console: false, vanish: None, preload: false }
    }
}

/// How one local clone ended.
#[derive(Debug)]
pub struct CloneOutcome {
    /// The clone.
    pub clone_id: u32,
    /// Its run (or why it failed).
    pub result: Result<RunOutcome, String>,
    /// Start figures.
    pub start: Option<CloneStart>,
    /// Its fault server's counters.
    pub server: Option<ServerStats>,
}

enum Event {
    Report(CloneReport),
    Done(Box<CloneOutcome>),
}

/// One fork's clones.
#[derive(Debug)]
pub struct LocalFork {
    /// Clones asked for.
    pub count: u32,
    /// What they are served from.
    pub source: Arc<LocalSource>,
    /// The fork's zero map.
    pub zero_pages: PageRanges,
    /// Descriptor bytes.
    pub descriptor_bytes: usize,
    /// Time the host spent in `fork` (copy, checks, spawning), µs.
    pub host_fork_us: u64,
    events: Receiver<Event>,
    reports: BTreeMap<u32, CloneReport>,
    outcomes: BTreeMap<u32, CloneOutcome>,
    threads: Vec<JoinHandle<()>>,
}

impl LocalFork {
    /// Pages of the zero map that are not zero in the frozen image (a correct zero map has none).
    pub fn zero_map_violations(&self) -> u64 {
        let image = self.source.image();
        let mut bad = 0;
        for run in self.zero_pages.iter() {
            let s = (run.start * PAGE_SIZE) as usize;
            let e = ((run.end() * PAGE_SIZE) as usize).min(image.len());
            bad += image[s..e].chunks_exact(PAGE_SIZE as usize).filter(|p| p.iter().any(|&b| b != 0)).count() as u64;
        }
        bad
    }

    fn absorb(&mut self, event: Event) {
        match event {
            Event::Report(r) => {
                self.reports.insert(r.clone_id, r);
            }
            Event::Done(o) => {
                self.outcomes.insert(o.clone_id, *o);
            }
        }
    }
}

/// A [`CloneHost`] that runs clones as in-process VMs. See the module docs.
#[derive(Debug, Default)]
pub struct LocalHost {
    config: LocalHostConfig,
    forks: BTreeMap<u32, LocalFork>,
}

impl LocalHost {
    /// A host with `config`.
    pub fn new(config: LocalHostConfig) -> LocalHost {
        LocalHost { config, forks: BTreeMap::new() }
    }

    /// A fork's state.
    pub fn fork_state(&self, fork: u32) -> Option<&LocalFork> {
        self.forks.get(&fork)
    }

    /// Waits (at most `timeout` overall) until every clone of `fork` has finished, and returns their
    /// outcomes by clone id. Clones still running at the time-out are missing from the result.
    pub fn wait_clones(&mut self, fork: u32, timeout: Duration) -> Result<&BTreeMap<u32, CloneOutcome>, HostError> {
        let f = self.forks.get_mut(&fork).ok_or(HostError::UnknownFork(fork))?;
        let deadline = Instant::now() + timeout;
        while f.outcomes.len() < f.count as usize {
            match f.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(e) => f.absorb(e),
                Err(_) => break,
            }
        }
        if f.outcomes.len() == f.count as usize {
            for t in f.threads.drain(..) {
                let _ = t.join();
            }
        }
        Ok(&f.outcomes)
    }
}

impl Drop for LocalHost {
    fn drop(&mut self) {
        let forks: Vec<u32> = self.forks.keys().copied().collect();
        for fork in forks {
            let _ = self.wait_clones(fork, Duration::from_secs(30));
        }
    }
}

struct LocalCloneHost {
    events: Sender<Event>,
}

impl CloneHost for LocalCloneHost {
    fn fork(&mut self, _: u32, _: &Descriptor, _: &GuestMemory) -> Result<u32, HostError> {
        Err(HostError::Unsupported("FORK inside a local clone"))
    }
    fn join(&mut self, _: u32, _: Duration) -> Result<Vec<CloneReport>, HostError> {
        Err(HostError::Unsupported("JOIN inside a local clone"))
    }
    fn report(&mut self, report: &CloneReport) -> Result<(), HostError> {
        self.events.send(Event::Report(report.clone())).map_err(|_| HostError::Other("the parent is gone".into()))
    }
}

fn run_clone(
    bytes: Arc<Vec<u8>>,
    clone_id: u32,
    source: Arc<LocalSource>,
    options: CloneOptions,
    vanish: Option<VanishAfter>,
    preload: bool,
    events: Sender<Event>,
) {
    let mut outcome = CloneOutcome { clone_id, result: Err("not started".into()), start: None, server: None };
    let desc = match Descriptor::decode(&bytes) {
        Ok(d) => d,
        Err(e) => {
            outcome.result = Err(format!("decoding the descriptor: {e}"));
            let _ = events.send(Event::Done(Box::new(outcome)));
            return;
        }
    };
    let mut handler = LocalHandler::new(source, vanish).preloading(preload);
    match Vm::start_clone(&desc, clone_id, &mut handler, &options) {
        Ok((mut vm, start)) => {
            outcome.start = Some(start);
            let mut host = LocalCloneHost { events: events.clone() };
            outcome.result = vm.run(&mut host).map_err(|e| e.to_string());
            drop(vm);
        }
        Err(e) => outcome.result = Err(e.to_string()),
    }
    outcome.server = handler.finish().ok();
    let _ = events.send(Event::Done(Box::new(outcome)));
}

impl CloneHost for LocalHost {
    fn fork(&mut self, count: u32, descriptor: &Descriptor, memory: &GuestMemory) -> Result<u32, HostError> {
        let t0 = Instant::now();
        // Only pages a clone may fetch are copied: the avoided ones stay zero (never touched) here, as
        // clones see them.
        let avoided = descriptor.avoided_pages();
        let mut image = vec![0u8; memory.size() as usize];
        for run in avoided.complement(memory.pages()).iter() {
            let (s, e) = ((run.start * PAGE_SIZE) as usize, (run.end() * PAGE_SIZE) as usize);
            memory
                .read(crate::memory::GuestAddress(run.start * PAGE_SIZE), &mut image[s..e])
                .map_err(|e| HostError::Other(format!("copying guest memory: {e}")))?;
        }
        let cache = Arc::new(
            PageCache::new(memory.size()).map_err(|e| HostError::Other(format!("creating the page cache: {e}")))?,
        );
        let source = Arc::new(LocalSource {
            image,
            cache,
            faults: FaultLog::new(memory.pages()),
            avoided,
            read_ahead: self.config.read_ahead_pages,
        });
        let bytes = Arc::new(descriptor.encode());
        let (tx, rx) = mpsc::channel();
        let options = CloneOptions {
            verify_image: self.config.verify_image,
            echo_console: self.config.echo_console,
            ..CloneOptions::default()
        };
        let mut threads = Vec::new();
        for id in 1..=count {
            let (bytes, source, options, tx) = (bytes.clone(), source.clone(), options.clone(), tx.clone());
            let vanish = self.config.vanish.and_then(|(c, v)| (c == id).then_some(v));
            let preload = self.config.preload;
            let t = std::thread::Builder::new()
                .name(format!("local-clone-{id}"))
                .spawn(move || run_clone(bytes, id, source, options, vanish, preload, tx))
                .map_err(|source| HostError::Io { op: "spawning a clone thread", source })?;
            threads.push(t);
        }
        let fork_id = descriptor.fork_id;
        self.forks.insert(
            fork_id,
            LocalFork {
                count,
                source,
                zero_pages: descriptor.zero_pages.clone(),
                descriptor_bytes: bytes.len(),
                host_fork_us: t0.elapsed().as_micros() as u64,
                events: rx,
                reports: BTreeMap::new(),
                outcomes: BTreeMap::new(),
                threads,
            },
        );
        Ok(fork_id)
    }

    fn join(&mut self, fork: u32, timeout: Duration) -> Result<Vec<CloneReport>, HostError> {
        let f = self.forks.get_mut(&fork).ok_or(HostError::UnknownFork(fork))?;
        let deadline = Instant::now() + timeout;
        while f.reports.len() < f.count as usize {
            if let Some(o) = f.outcomes.values().find(|o| !f.reports.contains_key(&o.clone_id)) {
                let reason = match &o.result {
                    Err(e) => e.clone(),
                    Ok(r) => format!("exited with code {} without reporting", r.exit_code),
                };
                return Err(HostError::CloneFailed { fork, clone: o.clone_id, reason });
            }
            match f.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(e) => f.absorb(e),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(HostError::Timeout {
                        fork,
                        got: f.reports.len(),
                        expected: f.count as usize,
                        waited: timeout,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(HostError::Other(format!("every clone of fork {fork} is gone")))
                }
            }
        }
        Ok(f.reports.values().cloned().collect())
    }

    fn report(&mut self, _: &CloneReport) -> Result<(), HostError> {
        Err(HostError::Unsupported("REPORT to a local host (the parent keeps its own result)"))
    }
}
