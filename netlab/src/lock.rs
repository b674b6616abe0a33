//! The machine-wide lock that serialises creating and cleaning labs.
//!
//! Creating a lab picks the lowest free address block by looking at the labs
//! that exist; two creators must not pick the same one. They take an exclusive
//! `flock` on `/run/netlab/lock` (a 0-byte file on tmpfs) for the whole
//! creation. Threads of one process open the file separately, so they exclude
//! each other too. `netlab clean` takes the lock while it removes labs, and
//! removing the last lab (clean, down or drop) deletes the file and directory
//! if nobody holds the lock; a waiter that then locks the deleted file notices
//! (the path no longer names its inode) and retries.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Directory of the lock file.
pub const LOCK_DIR: &str = "/run/netlab";
/// The lock file.
pub const LOCK_FILE: &str = "/run/netlab/lock";

/// Errors taking the lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock file could not be created or opened.
    #[error("cannot open the lock file {LOCK_FILE}: {0}")]
    Open(std::io::Error),
    /// `flock` failed.
    #[error("cannot lock {LOCK_FILE}: {0}")]
    Flock(std::io::Error),
}

/// Holds the lock until dropped.
#[derive(Debug)]
pub struct LabLock {
    file: File,
}

impl LabLock {
    /// Waits for and takes the lock.
    pub fn acquire() -> Result<LabLock, LockError> {
        loop {
            std::fs::create_dir_all(LOCK_DIR).map_err(LockError::Open)?;
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(LOCK_FILE)
                .map_err(LockError::Open)?;
            flock(&file, libc::LOCK_EX)?;
            let mine = file.metadata().map_err(LockError::Open)?;
            match std::fs::metadata(LOCK_FILE) {
                Ok(on_disk) if on_disk.ino() == mine.ino() && on_disk.dev() == mine.dev() => {
                    return Ok(LabLock { file });
                }
                // Removed (or replaced) by `clean` while we waited: try again.
                _ => continue,
            }
        }
    }

    /// Takes the lock only if the lock file exists and nobody holds the lock.
    pub fn try_acquire_existing() -> Option<LabLock> {
        let file = OpenOptions::new().read(true).open(LOCK_FILE).ok()?;
        flock(&file, libc::LOCK_EX | libc::LOCK_NB).ok()?;
        let mine = file.metadata().ok()?;
        let on_disk = std::fs::metadata(LOCK_FILE).ok()?;
        (on_disk.ino() == mine.ino() && on_disk.dev() == mine.dev()).then_some(LabLock { file })
    }

    /// Removes the lock file and its directory while holding the lock (used
    /// when no lab is left), then releases it.
    pub fn remove_files(self) {
        let _ = std::fs::remove_file(LOCK_FILE);
        let _ = std::fs::remove_dir(Path::new(LOCK_DIR));
        drop(self);
    }
}

impl Drop for LabLock {
    fn drop(&mut self) {
        // Closing the file releases the lock anyway; unlocking first makes it explicit.
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

fn flock(file: &File, op: libc::c_int) -> Result<(), LockError> {
    loop {
        // SAFETY: flock takes a descriptor and an operation code; the descriptor
        // is valid because `file` is borrowed for the call. No memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(LockError::Flock(err));
        }
    }
}
