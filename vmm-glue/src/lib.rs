//! spindrift's VMM: a compact KVM VMM whose guests can clone themselves (SnowFlock's `sf_clone` on
//! modern Linux).
//!
//! * [`vm`]: a KVM VM with one vCPU in 64-bit long mode, a console and the cloning hypercalls
//!   ([`abi`] documents ports and registers).
//! * [`descriptor`]: the VM descriptor captured at `FORK` (vCPU state, memory layout, zero map, discard
//!   hints) and its compact, versioned, checksummed encoding.
//! * [`host`]: the seams to the environment: [`CloneHost`] (fork, join, report) and [`MemoryHandler`]
//!   (who answers a clone's page faults).
//! * [`clone`]: starting a clone from a descriptor: fresh memory registered with a userfaultfd, zero
//!   pages installed for every avoided page, the userfaultfd handed to a handler, vCPU state restored.
//! * [`local`]: in-process clones ([`LocalHost`]) served by a fault server thread ([`LocalHandler`]).
//! * [`daemon`]: a clone served by the host daemon over its Unix socket ([`DaemonLink`]).
//! * [`guest`]: the built-in guest programs (`hello`, `parallel`, `trace`), assembled at run time.
//! * [`cli`]: the `spindrift-vmm` subcommands.

pub mod abi;
pub mod cli;
pub mod clone;
pub mod daemon;
pub mod demo;
pub mod descriptor;
pub mod guest;
pub mod host;
pub mod local;
pub mod memory;
pub mod netfork;
pub mod ranges;
mod sys;
pub mod vm;

pub use clone::{CloneOptions, CloneStart};
pub use daemon::DaemonLink;
pub use descriptor::{Descriptor, DescriptorError, VcpuState, ZeroMapMethod};
pub use host::{CloneHost, CloneIdentity, CloneReport, HandlerLink, HostError, MemoryHandler, NoCloneHost};
pub use local::{LocalHandler, LocalHost, LocalHostConfig};
pub use memory::{GuestAddress, GuestMemory, MemoryError};
pub use ranges::{PageRanges, PageRun};
pub use sys::unix_us;
pub use vm::{KickHandle, RunOutcome, StopCause, Vm, VmConfig, VmError, ZeroMapChoice};
