//! Entering a network namespace from a thread, and finding the processes inside one.
//!
//! A closure runs "inside a host" on a fresh thread that first calls
//! `setns(fd, CLONE_NEWNET)` on the namespace file `/run/netns/<name>`. Only
//! that thread moves; the rest of the process stays where it was. Sockets the
//! closure creates belong to the host's namespace for their whole life, so a
//! closure can create sockets and hand them back to be used from any thread.
//! Processes spawned from such a thread are also inside the namespace.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

/// Where `ip netns add` puts its namespace files.
pub const NETNS_DIR: &str = "/run/netns";

/// Errors entering or inspecting a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened (the lab is gone, or no privileges).
    #[error("cannot open network namespace {path}: {error}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// `setns` failed.
    #[error("setns(CLONE_NEWNET) into {path} failed: {error} (it needs CAP_SYS_ADMIN, i.e. root)")]
    Setns {
        /// The namespace file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a thread for namespace {path}: {error}")]
    Thread {
        /// The namespace file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// The namespace directory could not be read.
    #[error("cannot list {NETNS_DIR}: {0}")]
    List(std::io::Error),
}

/// Path of the namespace file for `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Names of all namespaces in [`NETNS_DIR`] (empty if the directory does not exist).
pub fn list_netns() -> Result<Vec<String>, NetnsError> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetnsError::List(e)),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.map_err(NetnsError::List)?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// True if the namespace file exists.
pub fn netns_exists(name: &str) -> bool {
    netns_path(name).exists()
}

fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|error| NetnsError::Open { path: path.to_owned(), error })
}

/// Moves the calling thread into the network namespace behind `file`.
fn enter(file: &File, path: &Path) -> Result<(), NetnsError> {
    // SAFETY: setns only reads its two integer arguments; the descriptor is valid
    // because `file` is borrowed for the duration of the call. It changes the
    // network namespace of the calling thread only, which is a thread this module
    // started for exactly this purpose and which never goes back to serving
    // other code.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Setns { path: path.to_owned(), error: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// Runs `f` on a new thread inside namespace `name` and waits for its result.
///
/// A panic in `f` is passed on to the caller.
pub fn run_in<T, F>(name: &str, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let path = netns_path(name);
    let file = open(&path)?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns:{name}"))
            .spawn_scoped(scope, || -> Result<T, NetnsError> {
                enter(&file, &path)?;
                Ok(f())
            })
            .map_err(|error| NetnsError::Thread { path: path.clone(), error })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A thread started inside a namespace by [`spawn_in`]; join it for the closure's result.
#[derive(Debug)]
pub struct NsThread<T> {
    inner: JoinHandle<Option<T>>,
}

impl<T> NsThread<T> {
    /// Waits for the thread and returns the closure's value; `Err` carries the
    /// panic payload if the closure panicked (as [`JoinHandle::join`] does).
    pub fn join(self) -> std::thread::Result<T> {
        match self.inner.join() {
            Ok(Some(v)) => Ok(v),
            // `spawn_in` only returns an NsThread once the thread entered the
            // namespace, and such a thread always runs the closure.
            Ok(None) => Err(Box::new("netlab: the namespace thread did not run its closure")),
            Err(panic) => Err(panic),
        }
    }

    /// True once the closure has returned (or panicked).
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }
}

/// Starts `f` on a new thread inside namespace `name` and returns once the
/// thread is inside (so a failure to enter is reported here, not at join).
pub fn spawn_in<T, F>(name: &str, f: F) -> Result<NsThread<T>, NetnsError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let path = netns_path(name);
    let file = open(&path)?;
    let (tx, rx) = mpsc::sync_channel::<Result<(), NetnsError>>(1);
    let thread_path = path.clone();
    let inner = std::thread::Builder::new()
        .name(format!("netns:{name}"))
        .spawn(move || {
            let entered = enter(&file, &thread_path);
            drop(file);
            let ok = entered.is_ok();
            // The receiver waits for this message; if it is gone there is nobody to tell.
            let _ = tx.send(entered);
            ok.then(f)
        })
        .map_err(|error| NetnsError::Thread { path: path.clone(), error })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(NsThread { inner }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(NetnsError::Thread {
            path,
            error: std::io::Error::other("the thread ended before entering the namespace"),
        }),
    }
}

/// Identity (device and inode) of a namespace file.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Process ids (other than this process) whose network namespace is one of `names`.
pub fn pids_in(names: &[String]) -> Vec<i32> {
    let ids: Vec<(u64, u64)> = names.iter().filter_map(|n| ns_id(&netns_path(n))).collect();
    if ids.is_empty() {
        return Vec::new();
    }
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let Ok(proc_dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in proc_dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Some(id) = ns_id(&entry.path().join("ns/net")) {
            if ids.contains(&id) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Sends SIGKILL to `pid`; a process that is already gone is not an error.
pub fn kill(pid: i32) {
    // SAFETY: kill takes two plain integers and touches no memory of ours. The
    // pid comes from /proc and is never our own (callers filter it out); at
    // worst the process has exited and kill fails with ESRCH, which we ignore.
    let _ = unsafe { libc::kill(pid, libc::SIGKILL) };
}
