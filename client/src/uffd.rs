//! A small, safe wrapper over the userfaultfd(2) ABI, written against `libc` only.
//!
//! Why not the `userfaultfd` crate: its `-sys` crate runs bindgen at build time (needs libclang, which a
//! fresh machine lacks), pulls in `nix` 0.27 and `thiserror` 1, and has no `UFFDIO_POISON`, which our
//! failure mode needs. The ABI is a handful of `#[repr(C)]` structs and six ioctls, kept here.
//!
//! Two users: the VMM side ([`Uffd::create`], [`Uffd::register_missing`]; our VMM and the tests) and
//! the fault server ([`Uffd::from_fd`], [`Uffd::read_events`], [`Uffd::copy`], [`Uffd::zeropage`],
//! [`Uffd::poison`], [`Uffd::wake`]). Never created with `UFFD_USER_MODE_ONLY`: guest (KVM) accesses
//! must fault here too, or they come back to the VMM as MMIO exits.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
compile_error!("uffd.rs encodes ioctl numbers with the generic _IOC layout (x86_64, aarch64, riscv64)");

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_EVENT_FORK`: the server receives a new uffd for a forked child.
pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`: mremap(2) of a registered range is reported.
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE`: madvise(DONTNEED/REMOVE) of a registered range is reported.
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_MISSING_HUGETLBFS`: MISSING mode on hugetlbfs mappings.
pub const FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM`: MISSING mode on shmem/memfd mappings.
pub const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_EVENT_UNMAP`: munmap(2) of a registered range is reported.
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `UFFD_FEATURE_SIGBUS`: missing faults raise SIGBUS instead of waiting (no handler at all).
pub const FEATURE_SIGBUS: u64 = 1 << 7;
/// `UFFD_FEATURE_THREAD_ID`: page-fault messages carry the faulting thread id.
pub const FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_EXACT_ADDRESS`: fault addresses are not rounded down to the page.
pub const FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
/// `UFFD_FEATURE_POISON`: advertises `UFFDIO_POISON` (Linux 6.6).
pub const FEATURE_POISON: u64 = 1 << 14;
/// Internal kernel bit shown in fdinfo once `UFFDIO_API` has been done (`UFFD_FEATURE_INITIALIZED`).
const FEATURE_INITIALIZED: u64 = 1 << 31;

/// `UFFD_PAGEFAULT_FLAG_WRITE`: the fault was a write.
pub const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;

const UFFD_API: u64 = 0xAA;
const REGISTER_MODE_MISSING: u64 = 1 << 0;
const COPY_MODE_DONTWAKE: u64 = 1 << 0;
const ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
const POISON_MODE_DONTWAKE: u64 = 1 << 0;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage` and `struct uffdio_poison` share this layout.
#[repr(C)]
#[derive(Default)]
struct UffdioFill {
    range: UffdioRange,
    mode: u64,
    result: i64,
}

/// `struct uffd_msg` (packed in the kernel, but every field is naturally aligned: 32 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(size_of::<RawMsg>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioFill>() == 32);

/// An ioctl request number tied to its argument type, so a request can only be issued with the struct
/// it was encoded for.
struct Req<T> {
    nr: u64,
    _arg: PhantomData<T>,
}

impl<T> Req<T> {
    /// `_IOC(dir, 0xAA, nr, sizeof(T))` in the generic layout.
    const fn new(read_write: bool, nr: u64) -> Self {
        let dir: u64 = if read_write { 3 } else { 2 };
        Req { nr: (dir << 30) | ((size_of::<T>() as u64) << 16) | (0xAA << 8) | nr, _arg: PhantomData }
    }
}

const UFFDIO_API: Req<UffdioApi> = Req::new(true, 0x3F);
const UFFDIO_REGISTER: Req<UffdioRegister> = Req::new(true, 0x00);
const UFFDIO_WAKE: Req<UffdioRange> = Req::new(false, 0x02);
const UFFDIO_COPY: Req<UffdioCopy> = Req::new(true, 0x03);
const UFFDIO_ZEROPAGE: Req<UffdioFill> = Req::new(true, 0x04);
const UFFDIO_POISON: Req<UffdioFill> = Req::new(true, 0x08);
/// `USERFAULTFD_IOC_NEW = _IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA << 8;

const _: () = assert!(UFFDIO_API.nr == 0xC018_AA3F);
const _: () = assert!(UFFDIO_COPY.nr == 0xC028_AA03);
const _: () = assert!(UFFDIO_WAKE.nr == 0x8010_AA02);

fn ioctl<T>(fd: BorrowedFd<'_>, req: &Req<T>, arg: &mut T) -> io::Result<()> {
    // SAFETY: `req` was encoded for exactly `T` (see `Req::new`), a `#[repr(C)]` struct matching the
    // kernel's; the kernel reads and writes only that struct, which `arg` borrows mutably for the call,
    // and `fd` is a live descriptor for the duration of the borrow.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req.nr as _, arg as *mut T) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Errors from userfaultfd system calls.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// Neither userfaultfd(2) nor /dev/userfaultfd gave a descriptor.
    #[error(
        "cannot create a userfaultfd (needs root, CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 or access to \
         /dev/userfaultfd)"
    )]
    Create(#[source] io::Error),
    /// `UFFDIO_API` refused the handshake or a feature.
    #[error("UFFDIO_API refused features {requested:#x} (kernel offers {supported:#x})")]
    Api {
        /// Features asked for.
        requested: u64,
        /// Features the kernel offers.
        supported: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// The descriptor is not a userfaultfd.
    #[error("fd {fd} is not a userfaultfd (it is {kind})")]
    NotUserfaultfd {
        /// The descriptor number.
        fd: RawFd,
        /// What /proc says it is.
        kind: String,
    },
    /// The userfaultfd exists but its creator never did `UFFDIO_API`.
    #[error("userfaultfd {fd} is not initialised: the VMM must do UFFDIO_API before handing it over")]
    NotInitialised {
        /// The descriptor number.
        fd: RawFd,
    },
    /// An ioctl failed for a reason the caller cannot retry.
    #[error("{op} on [{start:#x}, +{len:#x}) failed")]
    Ioctl {
        /// Which ioctl.
        op: &'static str,
        /// Start of the range.
        start: u64,
        /// Length of the range.
        len: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// Reading events or setting flags on the descriptor failed.
    #[error("{op} on the userfaultfd failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

/// Outcome of a fill ioctl (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_POISON`) that is not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The whole range was filled (and woken unless asked not to).
    Done,
    /// Only the first `bytes` were filled and woken; the rest hit an existing page or a changing mm.
    Partial {
        /// Bytes filled from the start of the range.
        bytes: u64,
    },
    /// `EAGAIN` with nothing filled: the mm is changing (a remove/unmap/remap event is pending); read
    /// events, then retry.
    Retry,
    /// `EEXIST`: the first page is already present; nothing was filled or woken.
    Exists,
    /// `ESRCH`: the target process has exited.
    TargetGone,
    /// `ENOENT`: the range is no longer mapped (or not registered any more).
    NoMapping,
    /// `EINVAL`/`ENOTTY` on `UFFDIO_POISON`: this kernel lacks it.
    Unsupported,
}

/// One event read from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread faulted on a missing page.
    PageFault {
        /// Faulting address (rounded down to the page unless `FEATURE_EXACT_ADDRESS`).
        addr: u64,
        /// `PAGEFAULT_FLAG_*` bits.
        flags: u64,
        /// Faulting thread id, with `FEATURE_THREAD_ID`.
        thread_id: u32,
    },
    /// The process forked; the child's registered ranges are served through this new userfaultfd.
    Fork {
        /// The child's userfaultfd, now owned by the server.
        uffd: OwnedFd,
    },
    /// `[from, from + len)` moved to `to`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `[start, end)` was dropped by madvise: it faults again and reads as zero.
    Remove {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// An event this code does not know.
    Unknown {
        /// The event code.
        code: u8,
    },
}

const EVENT_BATCH: usize = 64;

/// A userfaultfd with a message buffer for batched reads.
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    buf: Box<[RawMsg; EVENT_BATCH]>,
}

impl std::fmt::Debug for Uffd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uffd").field("fd", &self.fd).field("features", &format_args!("{:#x}", self.features)).finish()
    }
}

fn new_raw_uffd(flags: libc::c_int) -> Result<OwnedFd, UffdError> {
    // SAFETY: userfaultfd(2) takes one integer of flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the kernel just created `fd` for us; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let syscall_err = io::Error::last_os_error();
    // With vm.unprivileged_userfaultfd=0 the device node may still be usable.
    let dev = match File::options().read(true).write(true).open("/dev/userfaultfd") {
        Ok(dev) => dev,
        Err(_) => return Err(UffdError::Create(syscall_err)),
    };
    // SAFETY: USERFAULTFD_IOC_NEW takes the userfaultfd flags as a plain integer and returns a new fd.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(UffdError::Create(io::Error::last_os_error()));
    }
    // SAFETY: the kernel just created `fd` for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Uffd {
    /// Creates a userfaultfd (close-on-exec, non-blocking, *not* user-mode-only) and does `UFFDIO_API`
    /// with `features` (a mix of the `FEATURE_*` constants). This is the VMM's side.
    pub fn create(features: u64) -> Result<Uffd, UffdError> {
        let fd = new_raw_uffd(libc::O_CLOEXEC | libc::O_NONBLOCK)?;
        let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        if let Err(source) = ioctl(fd.as_fd(), &UFFDIO_API, &mut api) {
            let supported = Self::supported_features().unwrap_or(0);
            return Err(UffdError::Api { requested: features, supported, source });
        }
        Ok(Uffd { fd, features: api.features, buf: Box::new([RawMsg::default(); EVENT_BATCH]) })
    }

    /// The features this kernel offers (probed with a throw-away userfaultfd).
    pub fn supported_features() -> Result<u64, UffdError> {
        let fd = new_raw_uffd(libc::O_CLOEXEC)?;
        let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
        ioctl(fd.as_fd(), &UFFDIO_API, &mut api).map_err(|source| UffdError::Api {
            requested: 0,
            supported: 0,
            source,
        })?;
        Ok(api.features)
    }

    /// Adopts a userfaultfd received from a VMM: checks that it is one and is initialised, reads its
    /// features from `/proc/self/fdinfo`, and makes it non-blocking (a file status flag, shared with the
    /// VMM's copy; the VMM never reads it).
    pub fn from_fd(fd: OwnedFd) -> Result<Uffd, UffdError> {
        let raw = fd.as_raw_fd();
        check_userfaultfd(fd.as_fd())?;
        let features = read_fdinfo_features(raw);
        set_nonblocking(fd.as_fd()).map_err(|source| UffdError::Io { op: "setting O_NONBLOCK", source })?;
        // A non-blocking userfaultfd polls POLLERR only before UFFDIO_API.
        let revents = crate::waker::poll_now(fd.as_fd(), libc::POLLIN)
            .map_err(|source| UffdError::Io { op: "polling", source })?;
        if revents & libc::POLLERR != 0 {
            return Err(UffdError::NotInitialised { fd: raw });
        }
        Ok(Uffd {
            fd,
            features: features.unwrap_or(0) & !FEATURE_INITIALIZED,
            buf: Box::new([RawMsg::default(); EVENT_BATCH]),
        })
    }

    /// The features negotiated by `UFFDIO_API` (0 if they could not be read).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[start, start + len)` in MISSING mode; returns the ioctls allowed on that range.
    pub fn register_missing(&self, start: u64, len: u64) -> Result<u64, UffdError> {
        let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode: REGISTER_MODE_MISSING, ioctls: 0 };
        ioctl(self.fd.as_fd(), &UFFDIO_REGISTER, &mut reg).map_err(|source| UffdError::Ioctl {
            op: "UFFDIO_REGISTER",
            start,
            len,
            source,
        })?;
        Ok(reg.ioctls)
    }

    /// Reads up to 64 pending events without blocking and appends them to `out`; returns how many.
    /// Zero means none are pending.
    pub fn read_events(&mut self, out: &mut Vec<Event>) -> Result<usize, UffdError> {
        let bytes = size_of::<[RawMsg; EVENT_BATCH]>();
        // SAFETY: `buf` is writable memory of exactly `bytes` bytes that we borrow mutably; `RawMsg` is
        // plain integers, so whatever bytes the kernel writes form valid values.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), self.buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(UffdError::Io { op: "reading events", source: err }),
            };
        }
        let count = n as usize / size_of::<RawMsg>();
        for msg in &self.buf[..count] {
            out.push(parse(msg));
        }
        Ok(count)
    }

    /// `UFFDIO_COPY`: fills the missing pages at `dst` with `src` (whole pages) and, if `wake`, wakes
    /// the threads waiting on them. Only missing pages are ever filled (`EEXIST` otherwise), so this
    /// never changes memory anyone has observed.
    pub fn copy(&self, dst: u64, src: &[u8], wake: bool) -> Result<Fill, UffdError> {
        let len = src.len() as u64;
        let mode = if wake { 0 } else { COPY_MODE_DONTWAKE };
        let mut arg = UffdioCopy { dst, src: src.as_ptr() as u64, len, mode, copy: 0 };
        let res = ioctl(self.fd.as_fd(), &UFFDIO_COPY, &mut arg);
        fill_outcome("UFFDIO_COPY", dst, len, res, arg.copy)
    }

    /// `UFFDIO_ZEROPAGE`: maps the shared zero page at the missing pages of `[dst, dst + len)`.
    pub fn zeropage(&self, dst: u64, len: u64, wake: bool) -> Result<Fill, UffdError> {
        let mode = if wake { 0 } else { ZEROPAGE_MODE_DONTWAKE };
        let mut arg = UffdioFill { range: UffdioRange { start: dst, len }, mode, result: 0 };
        let res = ioctl(self.fd.as_fd(), &UFFDIO_ZEROPAGE, &mut arg);
        fill_outcome("UFFDIO_ZEROPAGE", dst, len, res, arg.result)
    }

    /// `UFFDIO_POISON`: marks the missing pages of `[dst, dst + len)` poisoned; the waiting threads
    /// wake and get SIGBUS (a vCPU's access makes KVM raise SIGBUS in the VMM).
    pub fn poison(&self, dst: u64, len: u64, wake: bool) -> Result<Fill, UffdError> {
        let mode = if wake { 0 } else { POISON_MODE_DONTWAKE };
        let mut arg = UffdioFill { range: UffdioRange { start: dst, len }, mode, result: 0 };
        let res = ioctl(self.fd.as_fd(), &UFFDIO_POISON, &mut arg);
        match res {
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => Ok(Fill::Unsupported),
            _ => fill_outcome("UFFDIO_POISON", dst, len, res, arg.result),
        }
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on `[start, start + len)` (they retry the access).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        ioctl(self.fd.as_fd(), &UFFDIO_WAKE, &mut range).map_err(|source| UffdError::Ioctl {
            op: "UFFDIO_WAKE",
            start,
            len,
            source,
        })
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(u: Uffd) -> OwnedFd {
        u.fd
    }
}

fn fill_outcome(op: &'static str, start: u64, len: u64, res: io::Result<()>, done: i64) -> Result<Fill, UffdError> {
    let err = match res {
        Ok(()) => return Ok(Fill::Done),
        Err(err) => err,
    };
    match err.raw_os_error() {
        Some(libc::EAGAIN) if done > 0 => Ok(Fill::Partial { bytes: done as u64 }),
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(Fill::Retry),
        Some(libc::EEXIST) => Ok(Fill::Exists),
        Some(libc::ESRCH) => Ok(Fill::TargetGone),
        Some(libc::ENOENT) => Ok(Fill::NoMapping),
        _ => Err(UffdError::Ioctl { op, start, len, source: err }),
    }
}

fn parse(msg: &RawMsg) -> Event {
    let [a0, a1, a2] = msg.arg;
    match msg.event {
        EVENT_PAGEFAULT => Event::PageFault { addr: a1, flags: a0, thread_id: low_u32(a2) },
        EVENT_FORK => {
            // SAFETY: for a fork event the kernel has installed a new userfaultfd into our descriptor
            // table and handed its number to us alone; each message is parsed exactly once.
            let uffd = unsafe { OwnedFd::from_raw_fd(low_u32(a0) as RawFd) };
            Event::Fork { uffd }
        }
        EVENT_REMAP => Event::Remap { from: a0, to: a1, len: a2 },
        EVENT_REMOVE => Event::Remove { start: a0, end: a1 },
        EVENT_UNMAP => Event::Unmap { start: a0, end: a1 },
        code => Event::Unknown { code },
    }
}

/// The first 4 bytes of a union member that is a `__u32` followed by padding.
fn low_u32(word: u64) -> u32 {
    let b = word.to_ne_bytes();
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

/// Checks that `fd` is a userfaultfd (by what `/proc/self/fd` says it is).
pub fn check_userfaultfd(fd: BorrowedFd<'_>) -> Result<(), UffdError> {
    let raw = fd.as_raw_fd();
    let kind = std::fs::read_link(format!("/proc/self/fd/{raw}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown: {e}"));
    if kind == "anon_inode:[userfaultfd]" {
        Ok(())
    } else {
        Err(UffdError::NotUserfaultfd { fd: raw, kind })
    }
}

/// Features from the `API:\taa:FEATURES:IOCTLS` line of a userfaultfd's fdinfo.
fn read_fdinfo_features(fd: RawFd) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    let line = info.lines().find_map(|l| l.strip_prefix("API:"))?;
    let features = line.trim().split(':').nth(1)?;
    u64::from_str_radix(features, 16).ok()
}

/// Sets `O_NONBLOCK` on `fd`.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's status flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an integer of status flags; we add O_NONBLOCK to the current ones.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
