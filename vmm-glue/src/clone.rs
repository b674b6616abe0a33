//! Starting a clone from a [`Descriptor`].
//!
//! [`Vm::start_clone`]:
//!
//! 1. creates the VM and its guest memory (fresh, private, anonymous: nothing in it yet); if the
//!    handler offers the host's page cache ([`MemoryHandler::shared_memory`]), the memory becomes a
//!    `MAP_PRIVATE` view of that memfd: pages the host has are then read with no fault at all, and
//!    the clone's writes stay its own;
//! 2. creates a userfaultfd (not user-mode-only: KVM's accesses must fault there too) and registers the
//!    whole memory in MISSING mode;
//! 3. installs zero pages (`UFFDIO_ZEROPAGE`, one ioctl per run) for every page of the descriptor's
//!    zero map and discard hints: the clone never faults on them, so the handler never fetches them;
//! 4. hands the userfaultfd and the regions to the [`MemoryHandler`], and watches the link it returns
//!    (a handler that goes away stops the clone with [`VmError::HandlerGone`] instead of a hang);
//! 5. restores the vCPU state with `RAX` = the clone id (the `FORK` hypercall's return value);
//! 6. with [`CloneOptions::verify_image`], hashes the memory (fetching every page) before the first
//!    instruction, to compare with the parent's hash at the fork.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use spindrift_client::uffd::{Fill, Uffd};
use spindrift_client::{Region, PAGE_4K};

use crate::abi::PAGE_SIZE;
use crate::descriptor::Descriptor;
use crate::host::{CloneIdentity, MemoryHandler};
use crate::ranges::PageRanges;
use crate::sys;
use crate::vm::{KickHandle, StopCause, Vm, VmConfig, VmError, ZeroMapChoice};

/// Called when the memory handler is gone and the clone cannot be stopped in an orderly way (a VMM
/// thread blocked on a page outside `KVM_RUN`, or a vCPU that neither the kick nor poisoning freed).
/// A clone process exits here; an in-process clone has no good option and leaves it unset.
pub type LastResort = Arc<dyn Fn() + Send + Sync>;

/// How to start a clone.
#[derive(Clone)]
pub struct CloneOptions {
    /// Hash the memory before the first instruction (fetches every page).
    pub verify_image: bool,
    /// Copy console output to stdout.
    pub echo_console: bool,
    /// Longest `JOIN` (a clone that forks again).
    pub join_timeout: Duration,
    /// The session the clone belongs to (passed to the handler).
    pub session: Option<String>,
    /// See [`LastResort`].
    pub last_resort: Option<LastResort>,
}

impl std::fmt::Debug for CloneOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneOptions")
            .field("verify_image", &self.verify_image)
            .field("echo_console", &self.echo_console)
            .field("join_timeout", &self.join_timeout)
            .field("session", &self.session)
            .field("last_resort", &self.last_resort.is_some())
            .finish()
    }
}

impl Default for CloneOptions {
    fn default() -> Self {
        CloneOptions {
            verify_image: false,
            echo_console: false,
            join_timeout: Duration::from_secs(60),
            session: None,
            last_resort: None,
        }
    }
}

/// What starting a clone did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CloneStart {
    /// Pages installed as zero pages before the handoff.
    pub prezeroed_pages: u64,
    /// `UFFDIO_ZEROPAGE` calls that did it.
    pub zero_ioctls: u64,
    /// When the userfaultfd was handed to the handler, unix µs.
    pub handoff_unix_us: u64,
    /// Time from the start of `start_clone` to the vCPU being ready, µs.
    pub setup_us: u64,
    /// The memory hash before the first instruction (with `verify_image`), hex.
    pub image_hash: Option<String>,
    /// Whether the clone's memory is a private view of the host's cache memfd (else pages are copied).
    pub shared_cache: bool,
    /// Whether the handler wrote the whole image in before the first instruction (no userfaultfd).
    pub preloaded: bool,
    /// Whether it equals the parent's hash in the descriptor (`None`: not checked, or the parent did
    /// not record one).
    pub image_matches: Option<bool>,
}

/// Watches a handler's link on a thread; stops the VM when the handler is gone.
pub(crate) struct Watch {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the watch needs to fail the clone's memory when its handler is gone.
struct Orphan {
    /// The clone's userfaultfd (a duplicate of the VM's).
    uffd: Uffd,
    /// Its memory.
    base: u64,
    size: u64,
    last_resort: Option<LastResort>,
}

impl Watch {
    fn spawn(fd: OwnedFd, kick: KickHandle, orphan: Orphan) -> std::io::Result<Watch> {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::Builder::new().name("vmm-handler-watch".into()).spawn(move || {
            watch(fd, &kick, &flag, &orphan);
        })?;
        Ok(Watch { done, thread: Some(thread) })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for the handler's link to hang up, then stops the clone:
///
/// 1. kicks the vCPU thread with a signal: where KVM waits for a userfaultfd page interruptibly (the
///    hardware MMU path), `KVM_RUN` returns `EINTR`;
/// 2. if the thread is still inside `KVM_RUN` after 200 ms, poisons every page still missing
///    (`UFFDIO_POISON`, which also wakes the waiters). This host's KVM emulates guest accesses with
///    kernel-mode copies, whose userfaultfd waits only fatal signals interrupt: a poisoned page makes
///    the copy fail and the access come back as an MMIO exit, which the run loop turns into
///    [`VmError::HandlerGone`]. Poisoning is the last resort because on the hardware path KVM raises
///    SIGBUS for a poisoned page;
/// 3. if the VM has still not stopped after 3 s (or a VMM thread is blocked on a page outside
///    `KVM_RUN`, e.g. hashing the image), calls [`CloneOptions::last_resort`].
fn watch(fd: OwnedFd, kick: &KickHandle, done: &AtomicBool, orphan: &Orphan) {
    let mut buf = [0u8; 256];
    while !done.load(Ordering::SeqCst) {
        let revents = match sys::poll_one(fd.as_fd(), libc::POLLIN | libc::POLLRDHUP, Duration::from_millis(50)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("watching the memory handler failed: {e}");
                break;
            }
        };
        if revents == 0 {
            continue;
        }
        if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL | libc::POLLRDHUP) != 0 {
            break;
        }
        match sys::read_some(fd.as_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => tracing::debug!("ignoring {n} bytes from the memory handler"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if done.load(Ordering::SeqCst) {
        return;
    }
    tracing::error!("the memory handler went away: stopping the clone");
    let started = Instant::now();
    let mut poisoned = false;
    loop {
        // Re-kick until the vCPU thread has left `run` (a signal landing just before KVM_RUN is lost).
        kick.stop(StopCause::HandlerGone);
        if done.load(Ordering::SeqCst) || kick.is_finished() {
            return;
        }
        let running = kick.is_running();
        if running && !poisoned && started.elapsed() > Duration::from_millis(200) {
            poisoned = true;
            match poison_missing(&orphan.uffd, orphan.base, orphan.size) {
                Ok(n) => tracing::warn!("poisoned the clone's missing memory ({n} poison calls) to stop its vCPU"),
                Err(e) => tracing::error!("cannot poison the clone's missing memory: {e}"),
            }
        }
        if started.elapsed() > Duration::from_secs(3) {
            tracing::error!(
                "the clone is stuck on memory nobody will serve ({}): giving up on it",
                if running { "vCPU still in KVM_RUN" } else { "a VMM thread outside KVM_RUN" }
            );
            if let Some(f) = &orphan.last_resort {
                f();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Poisons every missing page of `[base, base + size)`, waking whoever waits on them. Returns the
/// number of ioctls.
fn poison_missing(uffd: &Uffd, base: u64, size: u64) -> Result<u64, spindrift_client::uffd::UffdError> {
    let end = base + size;
    let mut addr = base;
    let mut calls = 0;
    let mut retries = 0;
    while addr < end {
        calls += 1;
        match uffd.poison(addr, end - addr, true)? {
            Fill::Done | Fill::TargetGone | Fill::NoMapping | Fill::Unsupported => break,
            Fill::Partial { bytes } => addr += bytes.max(PAGE_SIZE) - bytes.max(PAGE_SIZE) % PAGE_SIZE,
            // A present (or already poisoned) page: step over it.
            Fill::Exists => addr += PAGE_SIZE,
            Fill::Retry if retries < 1000 => retries += 1,
            Fill::Retry => break,
        }
    }
    Ok(calls)
}

fn clone_err(d: &Descriptor, clone_id: u32, reason: impl Into<String>) -> VmError {
    VmError::CloneStart { fork_id: d.fork_id, clone_id, reason: reason.into() }
}

impl Vm {
    /// Starts clone `clone_id` (1-based) of the fork `d` describes, with its memory served by
    /// `handler`. The returned VM is ready to [`Vm::run`]. See the module docs.
    pub fn start_clone(
        d: &Descriptor,
        clone_id: u32,
        handler: &mut dyn MemoryHandler,
        options: &CloneOptions,
    ) -> Result<(Vm, CloneStart), VmError> {
        let t0 = Instant::now();
        let mut start = CloneStart::default();
        if clone_id == 0 || clone_id > d.clone_count {
            return Err(clone_err(d, clone_id, format!("clone id must be in 1..={}", d.clone_count)));
        }
        if d.memory.len() != 1 || d.memory[0].guest_addr != 0 {
            return Err(clone_err(d, clone_id, "only one memory region at guest-physical 0 is supported"));
        }
        if d.vcpus.len() != 1 {
            return Err(clone_err(d, clone_id, format!("{} vCPUs (this VMM runs exactly 1)", d.vcpus.len())));
        }
        let config = VmConfig {
            mem_bytes: d.memory_bytes(),
            vcpus: 1,
            zero_map: ZeroMapChoice::Auto,
            verify_image: options.verify_image,
            join_timeout: options.join_timeout,
            echo_console: options.echo_console,
        };
        let mut vm = Vm::new(config)?;
        let identity = CloneIdentity { fork_id: d.fork_id, clone_id, session: options.session.clone() };
        let base = vm.memory.host_addr();
        let size = vm.memory.size();
        if handler.preload(&vm.memory).map_err(VmError::Handler)? {
            start.preloaded = true;
            let mut state = d.vcpus[0].clone();
            state.regs.rax = u64::from(clone_id);
            vm.restore_vcpu(&state)?;
            vm.set_clone_start(identity, d.avoided_pages());
            if options.verify_image {
                let hash = vm.memory.image_hash(&d.discard_pages)?;
                start.image_hash = Some(crate::host::to_hex(&hash));
                start.image_matches = d.image_hash.map(|h| h == hash);
            }
            start.setup_us = t0.elapsed().as_micros() as u64;
            return Ok((vm, start));
        }
        if let Some(cache) = handler.shared_memory(&identity, size).map_err(VmError::Handler)? {
            vm.memory.map_shared_cache(cache.as_fd())?;
            start.shared_cache = true;
        }
        let uffd = Uffd::create(0)?;
        uffd.register_missing(base, size)?;
        let avoided = d.avoided_pages();
        prezero(&uffd, base, &avoided, &mut start)?;
        let regions = [Region { base_host_virt_addr: base, size, offset: 0, page_size: PAGE_4K }];
        let link = handler.attach(&uffd, &regions, &identity).map_err(VmError::Handler)?;
        start.handoff_unix_us = sys::unix_us();
        if let Some(fd) = link.watch {
            let dup = uffd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| VmError::Io { op: "duplicating the userfaultfd", source })?;
            let orphan = Orphan { uffd: Uffd::from_fd(dup)?, base, size, last_resort: options.last_resort.clone() };
            let watch = Watch::spawn(fd, vm.kick_handle(), orphan)
                .map_err(|source| VmError::Io { op: "spawning the handler watch thread", source })?;
            vm.watch = Some(watch);
        }
        vm.uffd = Some(uffd);
        let mut state = d.vcpus[0].clone();
        state.regs.rax = u64::from(clone_id);
        vm.restore_vcpu(&state)?;
        vm.set_clone_start(identity, avoided);
        if options.verify_image {
            let hash = vm.memory.image_hash(&d.discard_pages)?;
            start.image_hash = Some(crate::host::to_hex(&hash));
            start.image_matches = d.image_hash.map(|h| h == hash);
        }
        start.setup_us = t0.elapsed().as_micros() as u64;
        Ok((vm, start))
    }
}

/// Installs zero pages over every run of `avoided`.
fn prezero(uffd: &Uffd, base: u64, avoided: &PageRanges, start: &mut CloneStart) -> Result<(), VmError> {
    for run in avoided.iter() {
        let mut addr = base + run.start * PAGE_SIZE;
        let end = base + run.end() * PAGE_SIZE;
        let mut retries = 0;
        while addr < end {
            let len = end - addr;
            let done = match uffd.zeropage(addr, len, false)? {
                Fill::Done => len,
                Fill::Partial { bytes } => bytes - bytes % PAGE_SIZE,
                // Already present (cannot happen in fresh memory, but harmless): skip that page.
                Fill::Exists => {
                    addr += PAGE_SIZE;
                    continue;
                }
                Fill::Retry if retries < 1000 => {
                    retries += 1;
                    continue;
                }
                other => {
                    return Err(VmError::Unsupported(format!(
                        "UFFDIO_ZEROPAGE on [{addr:#x}, +{len:#x}) answered {other:?}"
                    )))
                }
            };
            start.zero_ioctls += 1;
            start.prezeroed_pages += done / PAGE_SIZE;
            addr += done;
        }
    }
    Ok(())
}
