//! The few OS calls `libc` offers only unsafely: anonymous mappings, `poll(2)`, and the signal that
//! kicks a vCPU thread out of `KVM_RUN`. Every `unsafe` block of the crate outside [`crate::memory`]
//! and [`crate::vm`] is here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A private anonymous read-write mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct AnonMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is not tied to the creating thread.
unsafe impl Send for AnonMapping {}
// SAFETY: `AnonMapping` itself hands out only raw pointers; whoever dereferences them (GuestMemory)
// states its own invariants.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` bytes (a multiple of the page size) of zeroed private memory, `MAP_NORESERVE`:
    /// pages commit memory only when written.
    pub(crate) fn new(len: usize) -> io::Result<AnonMapping> {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing aliases nothing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(AnonMapping { ptr, len })
    }

    /// Replaces the mapping's pages with a private (copy-on-write) view of `fd` from offset 0
    /// (`MAP_FIXED` over the same range): reads see the file, writes stay in this process. The KVM
    /// memslot over the range keeps working (it names addresses, not pages). Call it before anything
    /// is written or registered.
    pub(crate) fn map_file_private(&self, fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: `[ptr, ptr + len)` is this value's own mapping, which nothing in Rust borrows (guest
        // memory is only accessed by raw copies); MAP_FIXED replaces exactly that range, so no other
        // mapping is affected; the descriptor is open for the call.
        let ptr = unsafe {
            libc::mmap(
                self.ptr.as_ptr().cast(),
                self.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; its users (KVM memslots, uffd registrations) are torn down before
        // (the owning GuestMemory is dropped after the VM fd, see `Vm`'s field order).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `poll(2)` on one descriptor; returns its `revents` (0 on time-out).
pub(crate) fn poll_one(fd: BorrowedFd<'_>, events: i16, timeout: Duration) -> io::Result<i16> {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd that we own for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        n if n >= 0 => Ok(pfd.revents),
        _ => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(err)
            }
        }
    }
}

/// One `read(2)` into `buf` (after `poll` said the descriptor is readable).
pub(crate) fn read_some(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable memory of `buf.len()` bytes that we borrow mutably for the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Microseconds since the Unix epoch.
pub fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (`SIGRTMIN + 3`, as rust-vmm VMMs use a
/// real-time signal for this).
pub(crate) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs a no-op handler for [`kick_signal`] (once per process), without `SA_RESTART`, so a kicked
/// thread's blocking call (`KVM_RUN`, a userfaultfd wait inside it) returns `EINTR`.
pub(crate) fn install_kick_handler() -> io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: all-zero is a valid sigaction; we then set the handler and an empty mask.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_kick as *const () as usize;
        sa.sa_flags = 0;
        // SAFETY: `sa.sa_mask` is a sigset_t we own.
        unsafe { libc::sigemptyset(&mut sa.sa_mask) };
        // SAFETY: installs a handler that does nothing (async-signal-safe) for a real-time signal this
        // crate reserves; `sa` is fully initialised.
        if unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) } != 0 {
            result = Err(io::Error::last_os_error());
        }
    });
    result
}

/// The calling thread's pthread id.
pub(crate) fn current_thread() -> libc::pthread_t {
    // SAFETY: pthread_self has no preconditions.
    unsafe { libc::pthread_self() }
}

/// Sends [`kick_signal`] to `thread`.
///
/// The caller must know that `thread` is still running (a kicked thread that exited would make the
/// id dangling); [`crate::vm::KickHandle`] only kicks while the vCPU thread is inside `Vm::run`.
pub(crate) fn kick_thread(thread: libc::pthread_t) -> io::Result<()> {
    // SAFETY: `thread` is a live thread of this process (see above) and the signal has a handler.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}
