//! [`Liveness`]: how a fault server notices that its clone has gone.
//!
//! A userfaultfd says nothing when the process that registered memory exits: `poll` stays quiet and
//! `read` returns `EAGAIN`; only the fill ioctls start failing with `ESRCH`. So the server also polls a
//! descriptor that does signal the exit: a pidfd of the VMM (from the handoff's `SO_PEERPIDFD`, or
//! [`Liveness::from_pid`]), or the handoff connection if the VMM keeps it open for its lifetime.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// What tells the server that the clone is gone.
#[derive(Debug)]
pub enum Liveness {
    /// Nothing: the server notices only when a fill ioctl reports `ESRCH`.
    Unwatched,
    /// A pidfd of the clone's process: readable once it exits.
    Pidfd(OwnedFd),
    /// A connection the VMM holds open while it lives: hang-up means gone.
    Connection(UnixStream),
}

impl Liveness {
    /// Watches process `pid` through a new pidfd.
    pub fn from_pid(pid: i32) -> io::Result<Liveness> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just created `fd` for us; nothing else owns it.
        Ok(Liveness::Pidfd(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// The descriptor and poll events to watch, if any.
    pub(crate) fn poll_target(&self) -> Option<(BorrowedFd<'_>, i16)> {
        match self {
            Liveness::Unwatched => None,
            Liveness::Pidfd(fd) => Some((fd.as_fd(), libc::POLLIN)),
            Liveness::Connection(stream) => Some((stream.as_fd(), libc::POLLRDHUP)),
        }
    }

    /// Sends SIGKILL to the clone's process, if this is a pidfd of another process. Returns whether a
    /// signal was sent.
    pub(crate) fn kill(&self) -> bool {
        let Liveness::Pidfd(fd) = self else { return false };
        if pidfd_pid(fd.as_fd()) == Some(std::process::id()) {
            return false; // The "clone" is this very process (tests): never kill ourselves.
        }
        // SAFETY: pidfd_send_signal(2) takes a pidfd, a signal number, a null siginfo and flags 0.
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0)
        };
        rc == 0
    }
}

/// The pid a pidfd refers to (its fdinfo `Pid:` line).
fn pidfd_pid(fd: BorrowedFd<'_>) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines().find_map(|l| l.strip_prefix("Pid:")).and_then(|p| p.trim().parse().ok())
}
