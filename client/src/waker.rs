//! [`Waker`]: an eventfd that another thread signals to get a fault server out of `poll(2)`, plus the
//! small `poll(2)` wrapper the crate uses.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Errors creating a [`Waker`].
#[derive(Debug, thiserror::Error)]
pub enum WakerError {
    /// eventfd(2) failed.
    #[error("cannot create the eventfd that wakes a fault server")]
    Eventfd(#[source] io::Error),
}

/// A coalescing wake-up signal: any number of [`Waker::wake`] calls between two [`Waker::take`]s cost
/// one eventfd write.
#[derive(Debug)]
pub struct Waker {
    efd: File,
    signalled: AtomicBool,
}

impl Waker {
    /// Creates a waker (non-blocking, close-on-exec eventfd).
    pub fn new() -> Result<Waker, WakerError> {
        // SAFETY: eventfd(2) takes an initial value and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(WakerError::Eventfd(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just created `fd` for us; nothing else owns it.
        let efd = unsafe { File::from_raw_fd(fd) };
        Ok(Waker { efd, signalled: AtomicBool::new(false) })
    }

    /// Signals the owner. Cheap when already signalled.
    pub fn wake(&self) {
        if !self.signalled.swap(true, Ordering::AcqRel) {
            // An eventfd write only fails when the counter would overflow, i.e. when it is already
            // readable, which is all a wake needs.
            let _ = (&self.efd).write(&1u64.to_ne_bytes());
        }
    }

    /// Clears the signal (owner side); returns whether it was set. Call before re-checking state, so a
    /// wake that races with the check signals again.
    ///
    /// The eventfd is drained *before* the flag is cleared: the other order loses a wake that lands
    /// between the two (its write would be drained while the flag stays set, so no later wake would
    /// write again and the owner would sleep forever). In this order a wake that lands in between finds
    /// the flag still set and writes nothing, but the owner re-checks state after `take` and sees it.
    pub fn take(&self) -> bool {
        let mut buf = [0u8; 8];
        // EAGAIN (nothing to read) is the normal case for a spurious poll wake-up.
        let _ = (&self.efd).read(&mut buf);
        self.signalled.swap(false, Ordering::AcqRel)
    }
}

impl AsFd for Waker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
}

/// `ppoll(2)` on `fds` (`(fd, events)` pairs); fills `revents` and returns how many are ready. `None`
/// waits forever. `EINTR` counts as a time-out with nothing ready.
pub(crate) fn poll(fds: &[(BorrowedFd<'_>, i16)], revents: &mut [i16], timeout: Option<Duration>) -> io::Result<usize> {
    let mut pfds: Vec<libc::pollfd> =
        fds.iter().map(|(fd, events)| libc::pollfd { fd: fd.as_raw_fd(), events: *events, revents: 0 }).collect();
    // ppoll rather than poll: its timeout is a timespec, so the protocol's sub-millisecond timers
    // (NAK back-off, pacing) are not rounded up to whole milliseconds.
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(t.subsec_nanos()),
    });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs that the kernel only writes
    // `revents` into; every fd in it is borrowed for the duration of the call; `ts_ptr` is null or
    // points at `ts`, which outlives the call; a null signal mask leaves the mask unchanged.
    let n = unsafe { libc::ppoll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ts_ptr, std::ptr::null()) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            revents.iter_mut().for_each(|r| *r = 0);
            return Ok(0);
        }
        return Err(err);
    }
    for (r, p) in revents.iter_mut().zip(&pfds) {
        *r = p.revents;
    }
    Ok(n as usize)
}

/// `poll(2)` on one descriptor without waiting; returns its `revents`.
pub(crate) fn poll_now(fd: BorrowedFd<'_>, events: i16) -> io::Result<i16> {
    let mut rev = [0i16];
    poll(&[(fd, events)], &mut rev, Some(Duration::ZERO))?;
    Ok(rev[0])
}
