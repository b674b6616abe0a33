//! The seams between the VMM and its environment.
//!
//! * [`CloneHost`]: what the VMM asks for when the guest uses the cloning API (`FORK`, `JOIN`,
//!   `REPORT`). Implementations: [`crate::local::LocalHost`] (in-process clones, for tests and
//!   `spindrift-vmm run --local`), [`crate::daemon::DaemonLink`] (a clone reporting to its host daemon)
//!   and, in the lead's network code, a host that multicasts descriptors to host daemons.
//! * [`MemoryHandler`]: who serves a clone's memory. The clone VMM creates its guest memory and a
//!   userfaultfd, registers the memory, installs zero pages for everything the descriptor says to
//!   avoid, then calls [`MemoryHandler::attach`] with the userfaultfd and the regions; from then on every
//!   missing-page fault goes to the handler. Implementations: [`crate::daemon::DaemonLink`] (hands the
//!   userfaultfd to the host daemon over its Unix socket) and [`crate::local::LocalHandler`] (a fault
//!   server thread in this process).
//!
//! A handler must stay reachable while the clone runs: [`HandlerLink::watch`] is a descriptor that
//! hangs up when the handler is gone (the daemon died, the local server thread stopped). The VMM
//! watches it and stops the clone with [`crate::VmError::HandlerGone`] instead of letting its vCPU wait
//! forever on a fault nobody will answer.

use std::os::fd::OwnedFd;
use std::time::Duration;

use spindrift_client::uffd::Uffd;
use spindrift_client::Region;

use crate::descriptor::Descriptor;
use crate::memory::GuestMemory;

/// A clone's result, as `REPORT` gave it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CloneReport {
    /// The fork it belongs to.
    pub fork_id: u32,
    /// The clone (1..=count).
    pub clone_id: u32,
    /// The status the guest passed.
    pub status: u32,
    /// The result bytes (at most [`crate::abi::MAX_REPORT_BYTES`]).
    #[serde(serialize_with = "hex_bytes")]
    pub result: Vec<u8>,
}

fn hex_bytes<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(bytes))
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What went wrong in a [`CloneHost`] or [`MemoryHandler`].
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The host cannot do this (e.g. `FORK` inside a clone of a host that does not nest).
    #[error("the clone host does not support {0}")]
    Unsupported(&'static str),
    /// `JOIN` for a fork this host does not know.
    #[error("fork {0} is unknown to this clone host")]
    UnknownFork(u32),
    /// Not every clone reported in time.
    #[error("only {got} of {expected} clones of fork {fork} reported within {waited:?}")]
    Timeout {
        /// The fork.
        fork: u32,
        /// Reports received.
        got: usize,
        /// Clones asked for.
        expected: usize,
        /// How long we waited.
        waited: Duration,
    },
    /// A clone failed before reporting.
    #[error("clone {clone} of fork {fork} failed before reporting: {reason}")]
    CloneFailed {
        /// The fork.
        fork: u32,
        /// The clone.
        clone: u32,
        /// What happened.
        reason: String,
    },
    /// A system call or socket operation failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Handing the userfaultfd over failed.
    #[error("handing the userfaultfd to the memory handler failed")]
    Handoff(#[source] spindrift_client::handoff::HandoffError),
    /// Anything else, with the reason.
    #[error("{0}")]
    Other(String),
}

/// What the VMM asks of its environment when the guest uses the cloning API.
pub trait CloneHost {
    /// The guest asked for `count` clones. Called on the vCPU thread that made the hypercall, with every
    /// other vCPU thread parked (so an implementation may `fork()` the process: the child sees guest
    /// memory as it is now; the child must not use the KVM descriptors). `descriptor` is captured;
    /// `memory` is the guest memory, frozen until this returns. Returns the fork id (the descriptor's
    /// `fork_id` unless the host numbers forks itself).
    fn fork(&mut self, count: u32, descriptor: &Descriptor, memory: &GuestMemory) -> Result<u32, HostError>;

    /// In the parent: waits (at most `timeout`) for the reports of fork `fork`'s clones.
    fn join(&mut self, fork: u32, timeout: Duration) -> Result<Vec<CloneReport>, HostError>;

    /// In a clone: sends its report to the parent.
    fn report(&mut self, report: &CloneReport) -> Result<(), HostError>;
}

/// A host for VMs that never fork: `FORK` and `JOIN` fail (`-EPERM`/`-EIO` in the guest), `REPORT`
/// is kept by the VM itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCloneHost;

impl CloneHost for NoCloneHost {
    fn fork(&mut self, _: u32, _: &Descriptor, _: &GuestMemory) -> Result<u32, HostError> {
        Err(HostError::Unsupported("FORK"))
    }
    fn join(&mut self, fork: u32, _: Duration) -> Result<Vec<CloneReport>, HostError> {
        Err(HostError::UnknownFork(fork))
    }
    fn report(&mut self, _: &CloneReport) -> Result<(), HostError> {
        Ok(())
    }
}

/// Which clone a handler serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneIdentity {
    /// The fork.
    pub fork_id: u32,
    /// The clone (1..=count).
    pub clone_id: u32,
    /// The session it belongs to (network clones).
    pub session: Option<String>,
}

/// What an attached handler leaves with the VMM.
#[derive(Debug, Default)]
pub struct HandlerLink {
    /// Readable or hung up when the handler is gone; `None` if the handler cannot go away.
    pub watch: Option<OwnedFd>,
}

/// Serves a clone's memory faults. See the module docs.
pub trait MemoryHandler {
    /// Before the clone registers its memory: a descriptor of the host's page cache (a memfd of at
    /// least `bytes` bytes holding the parent's image at its guest-physical offsets) for the clone
    /// to map `MAP_PRIVATE` as its memory, so that pages the host already has are read with no fault
    /// at all. `None` (the default): the handler copies every page in.
    fn shared_memory(&mut self, clone: &CloneIdentity, bytes: u64) -> Result<Option<OwnedFd>, HostError> {
        let _ = (clone, bytes);
        Ok(None)
    }

    /// Before anything else: writes the whole image into `memory` and returns true, for a clone
    /// whose memory is all present before its first instruction (an ideal pre-provisioned host: no
    /// userfaultfd at all, and [`MemoryHandler::attach`] is not called). The default: false.
    fn preload(&mut self, memory: &GuestMemory) -> Result<bool, HostError> {
        let _ = memory;
        Ok(false)
    }

    /// Takes over the clone's memory: `uffd` is registered in MISSING mode over `regions` (their
    /// `offset` is the guest-physical address, i.e. the byte offset in the parent's memory image) and
    /// every avoided page is already installed. From the return on, the handler answers every fault.
    fn attach(&mut self, uffd: &Uffd, regions: &[Region], clone: &CloneIdentity) -> Result<HandlerLink, HostError>;
}
