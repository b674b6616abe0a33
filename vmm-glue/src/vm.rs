//! [`Vm`]: one KVM virtual machine with one vCPU in 64-bit long mode, its memory, its console and the
//! cloning hypercalls (see [`crate::abi`]).
//!
//! Life of a VM:
//!
//! ```text
//! Vm::new(config)            KVM VM + guest memory (one memslot at 0, dirty logging on) + vCPU
//!   vm.load(addr, bytes)     the VMM writes guest memory (recorded: those pages are not zero)
//!   vm.boot_long_mode(rip)   GDT, identity page tables (2 MiB pages), CR0/CR4/EFER, RIP/RSP
//!   vm.run(&mut host)        runs to EXIT; FORK/JOIN/REPORT go to the CloneHost
//! Vm::start_clone(descriptor, id, handler, options)   (crate::clone) a clone, from a descriptor
//! ```
//!
//! At `FORK` the vCPU is already out of `KVM_RUN` (it made the hypercall), so the VM is
//! paused by construction; with more vCPUs the others would be kicked and parked first. The VMM
//! completes the pending port write (`KVM_RUN` with `immediate_exit`), sets the parent's return value,
//! captures the vCPU state, the zero map (pages neither loaded by the VMM nor dirtied by the guest since
//! creation, from KVM's dirty log) and the discard hints, asks the host to fork, and resumes. The
//! figures of every fork (pause, capture, host time, descriptor size) are in [`RunOutcome::forks`].
//!
//! Stopping from outside: [`KickHandle::stop`] sets a reason and signals the vCPU thread, whose
//! `KVM_RUN` (or a userfaultfd wait inside it) returns `EINTR`; the run loop then returns
//! [`VmError::HandlerGone`] or [`VmError::Stopped`].

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use spindrift_client::uffd::Uffd;

use crate::abi::{self, layout, PAGE_SIZE};
use crate::descriptor::{Descriptor, MemoryLayout, VcpuState, ZeroMapMethod};
use crate::host::{CloneHost, CloneIdentity, CloneReport, HostError};
use crate::memory::{GuestAddress, GuestMemory, MemoryError};
use crate::ranges::PageRanges;
use crate::sys;

/// How to compute the zero map at a fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMapChoice {
    /// Dirty logging if KVM accepts it for the memslot, else a scan.
    Auto,
    /// Read every page.
    Scan,
    /// No zero map: clones fetch every page they touch.
    Off,
}

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest memory, bytes (a multiple of 2 MiB).
    pub mem_bytes: u64,
    /// vCPUs. Only 1 is implemented; the descriptor format and state capture handle any number.
    pub vcpus: u32,
    /// Zero-map method.
    pub zero_map: ZeroMapChoice,
    /// Hash the memory image at every fork (into the descriptor), to check clones against it.
    pub verify_image: bool,
    /// Longest `JOIN`.
    pub join_timeout: Duration,
    /// Copy console output to stdout as it comes (it is always kept in [`RunOutcome::console`]).
    pub echo_console: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_bytes: 64 << 20,
            vcpus: 1,
            zero_map: ZeroMapChoice::Auto,
            verify_image: false,
            join_timeout: Duration::from_secs(60),
            echo_console: false,
        }
    }
}

/// Why a VM stopped abnormally, or could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up or accessed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Something this VMM does not implement.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The guest did something that stops it (triple fault, access outside memory, halt, ...).
    #[error("the guest stopped abnormally at rip {rip:#x}: {reason}")]
    Guest {
        /// What happened.
        reason: String,
        /// Where.
        rip: u64,
    },
    /// The clone's memory handler went away while the clone ran: its faults would never be answered.
    #[error("the clone's memory handler is gone (daemon exited or hung up): stopping the clone")]
    HandlerGone,
    /// [`KickHandle::stop`] was called.
    #[error("the VM was stopped from outside")]
    Stopped,
    /// A clone could not be started.
    #[error("cannot start clone {clone_id} of fork {fork_id}: {reason}")]
    CloneStart {
        /// The fork.
        fork_id: u32,
        /// The clone.
        clone_id: u32,
        /// Why.
        reason: String,
    },
    /// The userfaultfd could not be set up.
    #[error("userfaultfd setup for the clone failed")]
    Uffd(#[from] spindrift_client::uffd::UffdError),
    /// The memory handler refused the clone.
    #[error("the memory handler refused the clone")]
    Handler(#[source] HostError),
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Setting up the kick signal failed.
    #[error("installing the vCPU kick signal handler failed")]
    Signal(#[source] std::io::Error),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Why the VM was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The memory handler is gone.
    HandlerGone,
    /// Somebody asked.
    Requested,
}

#[derive(Debug, Default)]
struct KickShared {
    /// The vCPU thread while it is inside `Vm::run` (guarded: kicks happen only then).
    thread: Mutex<Option<libc::pthread_t>>,
    cause: Mutex<Option<StopCause>>,
    stopping: AtomicBool,
    /// `run` has returned (for good or ill).
    finished: AtomicBool,
}

/// Stops a running VM from another thread. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct KickHandle {
    shared: Arc<KickShared>,
}

impl KickHandle {
    /// Asks the VM to stop with `cause` and signals its vCPU thread (if it is running). Call again to
    /// re-signal: a signal that lands just before the thread enters `KVM_RUN` is lost, so watchers
    /// repeat it until [`KickHandle::is_running`] turns false.
    pub fn stop(&self, cause: StopCause) {
        {
            let mut c = self.shared.cause.lock().unwrap_or_else(PoisonError::into_inner);
            c.get_or_insert(cause);
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        let thread = self.shared.thread.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = *thread {
            // Under the lock: the vCPU thread cannot leave `run` (and die) meanwhile.
            if let Err(e) = sys::kick_thread(t) {
                tracing::warn!("kicking the vCPU thread failed: {e}");
            }
        }
    }

    /// Whether the VM's vCPU thread is inside [`Vm::run`].
    pub fn is_running(&self) -> bool {
        self.shared.thread.lock().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// Whether [`Vm::run`] has returned.
    pub fn is_finished(&self) -> bool {
        self.shared.finished.load(Ordering::SeqCst)
    }

    fn cause(&self) -> Option<StopCause> {
        if !self.shared.stopping.load(Ordering::SeqCst) {
            return None;
        }
        *self.shared.cause.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One fork's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ForkRecord {
    /// The fork id the host returned (0 if the fork failed).
    pub fork_id: u32,
    /// Clones asked for.
    pub clones: u32,
    /// When the guest's `FORK` exit reached the VMM, unix µs.
    pub fork_unix_us: u64,
    /// The parent's pause: from the `FORK` exit to the vCPU's resumption, µs.
    pub pause_us: u64,
    /// Of which: completing the port write and capturing state, zero map and hashes, µs.
    pub capture_us: u64,
    /// Of which: the host's `fork`, µs.
    pub host_us: u64,
    /// Encoded descriptor size, bytes.
    pub descriptor_bytes: u64,
    /// Pages in the zero map.
    pub zero_pages: u64,
    /// Runs in the zero map.
    pub zero_runs: u64,
    /// Pages in the discard hints.
    pub discard_pages: u64,
    /// How the zero map was computed.
    pub zero_map_method: ZeroMapMethod,
    /// The host's error, if the fork failed.
    pub error: Option<String>,
}

/// One `JOIN`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JoinRecord {
    /// The fork joined.
    pub fork_id: u32,
    /// How long the guest waited, µs.
    pub wait_us: u64,
    /// The reports, by clone id (empty if the join failed).
    pub reports: Vec<CloneReport>,
    /// The host's error, if the join failed.
    pub error: Option<String>,
}

/// Counters of one run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunStats {
    /// `KVM_RUN` calls that returned an exit.
    pub exits: u64,
    /// Console bytes.
    pub console_bytes: u64,
    /// Hypercalls.
    pub hypercalls: u64,
}

/// How a run ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunOutcome {
    /// The guest's `EXIT` code.
    pub exit_code: u32,
    /// Console output.
    #[serde(serialize_with = "lossy")]
    pub console: Vec<u8>,
    /// The VM's own `REPORT` (a VM that is not a clone): status and bytes.
    pub own_report: Option<CloneReport>,
    /// Every fork.
    pub forks: Vec<ForkRecord>,
    /// Every join.
    pub joins: Vec<JoinRecord>,
    /// `MARK` calls: (tag, unix µs).
    pub marks: Vec<(u64, u64)>,
    /// Errors the clone host returned (the guest saw error codes).
    pub host_errors: Vec<String>,
    /// When the first `KVM_RUN` started, unix µs.
    pub first_run_unix_us: u64,
    /// When the guest exited, unix µs.
    pub exit_unix_us: u64,
    /// Counters.
    pub stats: RunStats,
}

fn lossy<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(bytes))
}

/// MSRs captured at a fork (those KVM lists; EFER and the FS/GS bases travel in the special registers).
const MSRS: [u32; 12] = [
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK (SFMASK)
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

const MAX_CONSOLE: usize = 1 << 20;

/// A KVM VM. See the module docs.
pub struct Vm {
    // Field order is drop order: the vCPU and VM descriptors go before the memory they map.
    vcpu: VcpuFd,
    vm: VmFd,
    _kvm: Kvm,
    /// A clone's handler watch (stopped before the memory goes).
    pub(crate) watch: Option<crate::clone::Watch>,
    pub(crate) memory: GuestMemory,
    /// A clone's userfaultfd (kept open while the memory lives: closing it would turn every missing
    /// page into a silent zero page).
    pub(crate) uffd: Option<Uffd>,
    config: VmConfig,
    dirty_log: bool,
    xsave: bool,
    msr_list: Vec<u32>,
    /// Pages written by the VMM.
    loaded: PageRanges,
    /// Pages that were zero when the VM started (all of them for a new VM; the avoided ones in a clone).
    initially_zero: PageRanges,
    /// Guest-dirtied pages collected so far.
    dirtied: PageRanges,
    discard: PageRanges,
    pub(crate) identity: Option<CloneIdentity>,
    last_fork: Option<u32>,
    next_fork_id: u32,
    kick: KickHandle,
    outcome: RunOutcome,
    pub(crate) on_first_run: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("mem_bytes", &self.memory.size())
            .field("dirty_log", &self.dirty_log)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates a VM: KVM, guest memory, the memslot (with dirty logging when the zero map uses it), and
    /// one vCPU with the host's supported CPUID. Memory is all zero; nothing is loaded yet.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        if config.vcpus != 1 {
            return Err(VmError::Unsupported(format!("{} vCPUs (this VMM runs exactly 1)", config.vcpus)));
        }
        sys::install_kick_handler().map_err(VmError::Signal)?;
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        for (cap, name) in [(Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"), (Cap::UserMemory, "KVM_CAP_USER_MEMORY")] {
            if !kvm.check_extension(cap) {
                return Err(VmError::Unsupported(format!("this KVM lacks {name}")));
            }
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let memory = GuestMemory::new(config.mem_bytes)?;
        let want_log = config.zero_map == ZeroMapChoice::Auto;
        let mut region = kvm_userspace_memory_region {
            slot: 0,
            flags: if want_log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: memory.size(),
            userspace_addr: memory.host_addr(),
        };
        // SAFETY: the region is our own live mapping of exactly `memory_size` bytes, which outlives the
        // VM fd (field order of `Vm`: `vm` drops before `memory`).
        let mut res = unsafe { vm.set_user_memory_region(region) };
        let mut dirty_log = want_log;
        if res.is_err() && want_log {
            tracing::warn!("KVM refused dirty logging on the memslot ({:?}); the zero map falls back to a scan", res);
            region.flags = 0;
            dirty_log = false;
            // SAFETY: as above.
            res = unsafe { vm.set_user_memory_region(region) };
        }
        res.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let xsave = kvm.check_extension(Cap::Xsave) && xsave2 <= 4096;
        if kvm.check_extension(Cap::Xsave) && !xsave {
            tracing::warn!("XSAVE area is {xsave2} bytes (> 4096): capturing legacy FPU/SSE state only");
        }
        let listed = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let msr_list = MSRS.iter().copied().filter(|m| listed.as_slice().contains(m)).collect();
        let pages = memory.pages();
        let mut initially_zero = PageRanges::new();
        initially_zero.insert(0, pages);
        Ok(Vm {
            vcpu,
            vm,
            _kvm: kvm,
            watch: None,
            memory,
            uffd: None,
            config,
            dirty_log,
            xsave,
            msr_list,
            loaded: PageRanges::new(),
            initially_zero,
            dirtied: PageRanges::new(),
            discard: PageRanges::new(),
            identity: None,
            last_fork: None,
            next_fork_id: 1,
            kick: KickHandle::default(),
            outcome: RunOutcome {
                exit_code: 0,
                console: Vec::new(),
                own_report: None,
                forks: Vec::new(),
                joins: Vec::new(),
                marks: Vec::new(),
                host_errors: Vec::new(),
                first_run_unix_us: 0,
                exit_unix_us: 0,
                stats: RunStats::default(),
            },
            on_first_run: None,
        })
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// A handle to stop the VM from another thread.
    pub fn kick_handle(&self) -> KickHandle {
        self.kick.clone()
    }

    /// Whether KVM dirty logging backs the zero map.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_log
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Which clone this VM is, if it is one.
    pub fn identity(&self) -> Option<&CloneIdentity> {
        self.identity.as_ref()
    }

    /// Writes `data` into guest memory at `addr`, as a disk read or a loader would. Those pages are
    /// recorded as not zero for the zero map.
    pub fn load(&mut self, addr: GuestAddress, data: &[u8]) -> Result<(), VmError> {
        self.memory.write(addr, data)?;
        if !data.is_empty() {
            let first = addr.0 / PAGE_SIZE;
            let last = (addr.0 + data.len() as u64 - 1) / PAGE_SIZE;
            self.loaded.insert(first, last - first + 1);
        }
        Ok(())
    }

    /// Builds the GDT and identity page tables (2 MiB pages over all of guest memory) and puts the vCPU
    /// in 64-bit long mode at `rip` with the stack at [`layout::STACK_TOP`].
    pub fn boot_long_mode(&mut self, rip: u64) -> Result<(), VmError> {
        // GDT: null, 64-bit code (selector 8), data (selector 0x10).
        let gdt: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
        let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
        self.load(GuestAddress(layout::GDT), &bytes)?;
        let two_mib = 2u64 << 20;
        let pds = self.memory.size().div_ceil(1 << 30);
        let mut pml4 = vec![0u8; 4096];
        pml4[..8].copy_from_slice(&(layout::PDPT | 0x3).to_le_bytes());
        self.load(GuestAddress(layout::PML4), &pml4)?;
        let mut pdpt = vec![0u8; 4096];
        for i in 0..pds {
            let e = (layout::PD + i * 4096) | 0x3;
            pdpt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
        }
        self.load(GuestAddress(layout::PDPT), &pdpt)?;
        let mut pd = vec![0u8; (pds * 4096) as usize];
        for i in 0..self.memory.size() / two_mib {
            let e = (i * two_mib) | 0x83; // present, writable, 2 MiB page
            pd[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
        }
        self.load(GuestAddress(layout::PD), &pd)?;

        let mut sregs = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let code = kvm_bindings::kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: layout::CODE_SELECTOR,
            type_: 11,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_bindings::kvm_segment { selector: layout::DATA_SELECTOR, type_: 3, l: 0, db: 1, ..code };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = layout::GDT;
        sregs.gdt.limit = 23;
        sregs.cr3 = layout::PML4;
        sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
        sregs.cr0 = 0x8005_0033; // PG, AM, WP, NE, ET, MP, PE
        sregs.efer = 0x501; // LMA, LME, SCE
        self.vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = kvm_bindings::kvm_regs { rip, rsp: layout::STACK_TOP, rflags: 0x2, ..Default::default() };
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Captures vCPU 0's state.
    pub fn capture_vcpu(&self) -> Result<VcpuState, VmError> {
        let v = &self.vcpu;
        let regs = v.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let fpu = v.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
        let xsave =
            if self.xsave { Some(v.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?.region.to_vec()) } else { None };
        let xcrs = match v.get_xcrs() {
            Ok(x) => x.xcrs[..(x.nr_xcrs as usize).min(16)].iter().map(|x| (x.xcr, x.value)).collect(),
            Err(_) => Vec::new(),
        };
        let entries: Vec<kvm_msr_entry> =
            self.msr_list.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| VmError::Unsupported(format!("building the MSR list: {e:?}")))?;
        let n = v.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect();
        let events = v.get_vcpu_events().ok();
        let mp_state = v.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?.mp_state;
        Ok(VcpuState { regs, sregs, fpu, xsave, xcrs, msrs, events, mp_state })
    }

    /// Restores vCPU 0's state (a clone, before its first instruction).
    pub fn restore_vcpu(&mut self, s: &VcpuState) -> Result<(), VmError> {
        let v = &self.vcpu;
        v.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let entries: Vec<kvm_msr_entry> =
            s.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs =
            Msrs::from_entries(&entries).map_err(|e| VmError::Unsupported(format!("building the MSR list: {e:?}")))?;
        let n = v.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != entries.len() {
            let failed = entries.get(n).map_or(0, |e| e.index);
            return Err(VmError::Unsupported(format!("KVM refused MSR {failed:#x} ({n} of {} set)", entries.len())));
        }
        if !s.xcrs.is_empty() {
            let mut x = kvm_bindings::kvm_xcrs { nr_xcrs: s.xcrs.len().min(16) as u32, ..Default::default() };
            for (slot, &(xcr, value)) in x.xcrs.iter_mut().zip(&s.xcrs) {
                slot.xcr = xcr;
                slot.value = value;
            }
            v.set_xcrs(&x).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        match (&s.xsave, self.xsave) {
            (Some(words), true) if words.len() == 1024 => {
                let mut x = kvm_bindings::kvm_xsave::default();
                x.region.copy_from_slice(words);
                // SAFETY: KVM_SET_XSAVE reads the 4096-byte `kvm_xsave`; we checked at VM creation that
                // KVM_CAP_XSAVE2 reports at most 4096 bytes and this process enables no dynamic XSTATE
                // features (no arch_prctl), so the kernel reads nothing past the struct.
                unsafe { v.set_xsave(&x) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
            }
            _ => v.set_fpu(&s.fpu).map_err(kvm_err("KVM_SET_FPU"))?,
        }
        v.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        if let Some(e) = &s.events {
            v.set_vcpu_events(e).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        }
        v.set_mp_state(kvm_bindings::kvm_mp_state { mp_state: s.mp_state }).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        Ok(())
    }

    /// Records that the pages in `zero` are zero at the start (a clone's avoided pages) and that this
    /// VM is the clone `identity`.
    pub(crate) fn set_clone_start(&mut self, identity: CloneIdentity, zero: PageRanges) {
        self.identity = Some(identity);
        self.initially_zero = zero;
    }

    /// The pages known to be zero now: zero at the start, never loaded, never dirtied by the guest.
    pub fn zero_map(&mut self) -> Result<(PageRanges, ZeroMapMethod), VmError> {
        match self.config.zero_map {
            ZeroMapChoice::Off => Ok((PageRanges::new(), ZeroMapMethod::None)),
            ZeroMapChoice::Auto if self.dirty_log => {
                let bitmap =
                    self.vm.get_dirty_log(0, self.memory.size() as usize).map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
                self.dirtied.extend(&PageRanges::from_bitmap(&bitmap, 0, self.memory.pages()));
                let mut written = self.loaded.clone();
                written.extend(&self.dirtied);
                Ok((self.initially_zero.subtract(&written), ZeroMapMethod::DirtyLog))
            }
            _ => Ok((self.memory.scan_zero_pages()?, ZeroMapMethod::Scan)),
        }
    }

    /// Runs the VM until the guest exits (`EXIT`), returning what happened. Hypercalls of the cloning
    /// API go to `host`.
    pub fn run(&mut self, host: &mut dyn CloneHost) -> Result<RunOutcome, VmError> {
        *self.kick.shared.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(sys::current_thread());
        let result = self.run_loop(host);
        *self.kick.shared.thread.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.kick.shared.finished.store(true, Ordering::SeqCst);
        let code = result?;
        self.outcome.exit_code = code;
        self.outcome.exit_unix_us = sys::unix_us();
        Ok(self.outcome.clone())
    }

    /// Figures so far (also after a failed run).
    pub fn outcome(&self) -> &RunOutcome {
        &self.outcome
    }

    fn run_loop(&mut self, host: &mut dyn CloneHost) -> Result<u32, VmError> {
        if let Some(f) = self.on_first_run.take() {
            f();
        }
        self.outcome.first_run_unix_us = sys::unix_us();
        loop {
            if let Some(cause) = self.kick.cause() {
                return Err(match cause {
                    StopCause::HandlerGone => VmError::HandlerGone,
                    StopCause::Requested => VmError::Stopped,
                });
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    if self.kick.cause().is_some() {
                        continue;
                    }
                    return Err(VmError::Kvm { op: "KVM_RUN", source: e });
                }
            };
            self.outcome.stats.exits += 1;
            if self.kick.cause().is_some() {
                // Stopping: whatever this exit is (a poisoned page shows up as MMIO), it is not served.
                continue;
            }
            let action = match exit {
                VcpuExit::IoOut(abi::CONSOLE_PORT, data) => {
                    let byte = data.first().copied();
                    Action::Console(byte)
                }
                VcpuExit::IoOut(abi::HYPERCALL_PORT, data) => {
                    let mut nr = [0u8; 4];
                    let n = data.len().min(4);
                    nr[..n].copy_from_slice(&data[..n]);
                    Action::Hypercall(u32::from_le_bytes(nr))
                }
                VcpuExit::IoOut(port, _) => {
                    tracing::debug!("ignoring a write to port {port:#x}");
                    Action::None
                }
                VcpuExit::IoIn(_, data) => {
                    data.fill(0xff);
                    Action::None
                }
                VcpuExit::Hlt => Action::Fail("halted (HLT with no interrupts to wake it)".into()),
                VcpuExit::Shutdown => Action::Fail("triple fault (shutdown)".into()),
                VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => {
                    Action::Fail(format!("access to {addr:#x}, outside guest memory"))
                }
                VcpuExit::InternalError => Action::Fail("KVM internal error (emulation failure)".into()),
                VcpuExit::FailEntry(reason, _) => Action::Fail(format!("VM entry failed, reason {reason:#x}")),
                VcpuExit::MemoryFault { gpa, .. } => Action::Fail(format!("memory fault at guest {gpa:#x}")),
                VcpuExit::Intr => Action::None,
                other => Action::Fail(format!("unexpected exit {other:?}")),
            };
            match action {
                Action::None => {}
                Action::Console(Some(b)) => self.console(&[b]),
                Action::Console(None) => {}
                Action::Hypercall(nr) => {
                    self.outcome.stats.hypercalls += 1;
                    if let Some(code) = self.hypercall(nr, host)? {
                        return Ok(code);
                    }
                }
                Action::Fail(reason) => {
                    if self.kick.cause().is_some() {
                        continue;
                    }
                    let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(VmError::Guest { reason, rip });
                }
            }
        }
    }

    fn console(&mut self, bytes: &[u8]) {
        self.outcome.stats.console_bytes += bytes.len() as u64;
        let room = MAX_CONSOLE.saturating_sub(self.outcome.console.len());
        self.outcome.console.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if self.config.echo_console {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
    }

    /// Completes the pending port write (`KVM_RUN` with `immediate_exit`: KVM finishes the instruction,
    /// moving RIP past it, and returns at once).
    fn complete_io(&mut self) -> Result<(), VmError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let res = self.vcpu.run().map(|_| ());
        self.vcpu.set_kvm_immediate_exit(0);
        match res {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Ok(()) => Ok(()),
            Err(e) => Err(VmError::Kvm { op: "KVM_RUN (completing a hypercall)", source: e }),
        }
    }

    /// Handles hypercall `nr`; `Some(code)` when the guest exits.
    fn hypercall(&mut self, nr: u32, host: &mut dyn CloneHost) -> Result<Option<u32>, VmError> {
        if nr == abi::HC_FORK {
            return self.fork(host).map(|()| None);
        }
        self.complete_io()?;
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let (a0, a1, a2) = (regs.rdi, regs.rsi, regs.rdx);
        let ret = match nr {
            abi::HC_EXIT => return Ok(Some(a0 as u32)),
            abi::HC_CONSOLE_WRITE => {
                if a1 > abi::MAX_CONSOLE_WRITE {
                    abi::EINVAL
                } else {
                    let mut buf = vec![0u8; a1 as usize];
                    match self.memory.read(GuestAddress(a0), &mut buf) {
                        Ok(()) => {
                            self.console(&buf);
                            a1
                        }
                        Err(_) => abi::EINVAL,
                    }
                }
            }
            abi::HC_REPORT => self.report(a0, a1, a2, host),
            abi::HC_JOIN => self.join(a0, a1, host)?,
            abi::HC_HINT_DISCARD => self.hint_discard(a0, a1),
            abi::HC_MARK => {
                self.outcome.marks.push((a0, sys::unix_us()));
                0
            }
            _ => abi::ENOSYS,
        };
        regs.rax = ret;
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(None)
    }

    fn hint_discard(&mut self, addr: u64, len: u64) -> u64 {
        let Some(end) = addr.checked_add(len) else { return abi::EINVAL };
        if end > self.memory.size() {
            return abi::EINVAL;
        }
        let first = addr.div_ceil(PAGE_SIZE);
        let last = end / PAGE_SIZE;
        if last > first {
            self.discard.insert(first, last - first);
        }
        0
    }

    fn report(&mut self, status: u64, addr: u64, len: u64, host: &mut dyn CloneHost) -> u64 {
        if len > abi::MAX_REPORT_BYTES {
            return abi::EINVAL;
        }
        let mut result = vec![0u8; len as usize];
        if self.memory.read(GuestAddress(addr), &mut result).is_err() {
            return abi::EINVAL;
        }
        let Some(id) = self.identity.clone() else {
            self.outcome.own_report = Some(CloneReport { fork_id: 0, clone_id: 0, status: status as u32, result });
            return 0;
        };
        let report = CloneReport { fork_id: id.fork_id, clone_id: id.clone_id, status: status as u32, result };
        self.outcome.own_report = Some(report.clone());
        match host.report(&report) {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!("sending the report of clone {} failed: {e}", id.clone_id);
                self.outcome.host_errors.push(format!("report: {e}"));
                abi::EIO
            }
        }
    }

    fn join(&mut self, buf: u64, buf_len: u64, host: &mut dyn CloneHost) -> Result<u64, VmError> {
        let Some(fork) = self.last_fork else { return Ok(abi::EPERM) };
        if buf.checked_add(buf_len).is_none_or(|end| end > self.memory.size()) {
            return Ok(abi::EINVAL);
        }
        let started = Instant::now();
        let result = host.join(fork, self.config.join_timeout);
        let wait_us = started.elapsed().as_micros() as u64;
        let mut reports = match result {
            Ok(r) => r,
            Err(e) => {
                let code = match e {
                    HostError::Timeout { .. } => abi::ETIMEDOUT,
                    _ => abi::EIO,
                };
                tracing::warn!("JOIN of fork {fork} failed: {e}");
                self.outcome.host_errors.push(format!("join: {e}"));
                self.outcome.joins.push(JoinRecord {
                    fork_id: fork,
                    wait_us,
                    reports: Vec::new(),
                    error: Some(e.to_string()),
                });
                return Ok(code);
            }
        };
        reports.sort_by_key(|r| r.clone_id);
        let mut at = buf;
        let end = buf + buf_len;
        let mut written = 0u64;
        for r in &reports {
            let len = r.result.len() as u64;
            let size = abi::join_entry_size(len);
            if at + size > end {
                break;
            }
            let mut entry = Vec::with_capacity(size as usize);
            entry.extend_from_slice(&r.clone_id.to_le_bytes());
            entry.extend_from_slice(&r.status.to_le_bytes());
            entry.extend_from_slice(&(len as u32).to_le_bytes());
            entry.extend_from_slice(&0u32.to_le_bytes());
            entry.extend_from_slice(&r.result);
            entry.resize(size as usize, 0);
            // Through `load`: pages the VMM writes are not zero at the next fork.
            self.load(GuestAddress(at), &entry)?;
            at += size;
            written += 1;
        }
        self.outcome.joins.push(JoinRecord { fork_id: fork, wait_us, reports, error: None });
        Ok(written)
    }

    /// `FORK`: see the module docs.
    fn fork(&mut self, host: &mut dyn CloneHost) -> Result<(), VmError> {
        let t0 = Instant::now();
        let fork_unix_us = sys::unix_us();
        self.complete_io()?;
        let mut regs = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let count = regs.rdi;
        if count == 0 || count > abi::MAX_CLONES {
            regs.rax = abi::EINVAL;
            self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            return Ok(());
        }
        regs.rax = 0;
        self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        let vcpu = self.capture_vcpu()?;
        let (zero_pages, zero_map_method) = self.zero_map()?;
        let discard_pages = std::mem::take(&mut self.discard);
        let image_hash = if self.config.verify_image { Some(self.memory.image_hash(&discard_pages)?) } else { None };
        let descriptor = Descriptor {
            fork_id: self.next_fork_id,
            clone_count: count as u32,
            captured_unix_us: fork_unix_us,
            zero_map_method,
            memory: vec![MemoryLayout { guest_addr: 0, size: self.memory.size() }],
            vcpus: vec![vcpu],
            zero_pages,
            discard_pages,
            image_hash,
        };
        let capture_us = t0.elapsed().as_micros() as u64;
        let t1 = Instant::now();
        let result = host.fork(count as u32, &descriptor, &self.memory);
        let host_us = t1.elapsed().as_micros() as u64;
        let (fork_id, ret, error) = match result {
            Ok(id) => (id, 0, None),
            Err(e) => {
                tracing::warn!("FORK of {count} clones failed: {e}");
                self.outcome.host_errors.push(format!("fork: {e}"));
                let code = if matches!(e, HostError::Unsupported(_)) { abi::EPERM } else { abi::EIO };
                (0, code, Some(e.to_string()))
            }
        };
        if error.is_none() {
            self.last_fork = Some(fork_id);
            self.next_fork_id = fork_id.max(self.next_fork_id) + 1;
        }
        if ret != 0 {
            regs.rax = ret;
            self.vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        let pause_us = t0.elapsed().as_micros() as u64;
        self.outcome.forks.push(ForkRecord {
            fork_id,
            clones: count as u32,
            fork_unix_us,
            pause_us,
            capture_us,
            host_us,
            descriptor_bytes: descriptor.encode().len() as u64,
            zero_pages: descriptor.zero_pages.page_count(),
            zero_runs: descriptor.zero_pages.run_count() as u64,
            discard_pages: descriptor.discard_pages.page_count(),
            zero_map_method,
            error,
        });
        Ok(())
    }
}

enum Action {
    None,
    Console(Option<u8>),
    Hypercall(u32),
    Fail(String),
}
