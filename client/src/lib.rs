//! spindrift host daemon library: the userfaultfd side.
//!
//! A clone's VMM hands its userfaultfd to the host daemon over a Unix socket ([`handoff`]); the daemon
//! keeps one [`cache::PageCache`] per snapshot image, shared by all clones of it on the host, and runs
//! one [`fault_server::FaultServer`] per clone that answers page faults from the cache with batched
//! `UFFDIO_COPY`/`UFFDIO_ZEROPAGE`, reports pages the cache lacks, and installs them when they arrive.
//! The fault server itself knows nothing of the network: [`daemon`] is the glue that feeds the cache
//! from the multicast sessions (`spindrift-client daemon`).
//!
//! ```text
//!  VMM ──(unix socket: uffd + JSON regions)──> recv_uffd ──> FaultServer::from_handoff(uffd, handoff, cache)
//!                                                                  │ step(): faults ─> cache hit ─> UFFDIO_COPY (runs)
//!                                                                  │               └─> miss ─> `missing` ─> glue fetches
//!  glue: cache.insert(page, bytes) ──> cache wakes the servers that wanted it ──> next step installs + wakes
//! ```
//!
//! Failure model (a clone must never block forever):
//! * a page the glue cannot fetch: [`FaultServer::fail`] (or [`ServerHandle::fail`]) answers every
//!   waiting and later fault with `UFFDIO_POISON`, so the faulting thread (or, through KVM, the VMM)
//!   gets SIGBUS; on kernels without it, the clone is killed through its pidfd;
//! * a server dropped with faults waiting poisons them;
//! * the clone exiting: the userfaultfd says nothing, so the server watches the VMM's pidfd (from the
//!   handoff) and stops with [`StopReason::CloneExited`];
//! * the daemon dying: the VMM still holds its userfaultfd, so its faults would wait forever; our VMM
//!   keeps the handoff connection open and must exit when it hangs up. It must not just close its
//!   userfaultfd: a released userfaultfd turns every missing page into a silent zero page.
//!
//! [`session`] is a single multicast session's receiver event loop that fills a cache
//! (`spindrift-client fetch` pulls a whole image with it). [`daemon`] is the host daemon: it follows
//! every session announced on its group, serves clones' faults over the network, starts the clones of
//! fork plans and reports their results. [`touch`] is a test process that maps a snapshot lazily
//! through the daemon and verifies the pages it touches (`spindrift-client touch`).
//!
//! Modules: [`uffd`] (the syscall wrapper), [`region`] and [`region_map`] (what memory maps where),
//! [`handoff`] (both sides of the socket), [`cache`], [`waker`], [`liveness`], [`fault_server`].

mod bitmap;
pub mod cache;
pub mod daemon;
pub mod fault_server;
pub mod handoff;
pub mod liveness;
pub mod region;
pub mod region_map;
pub mod session;
pub mod touch;
pub mod uffd;
pub mod waker;

pub use cache::{Inserted, PageCache, PageState, CACHE_PAGE_SIZE};
pub use fault_server::{FaultObserver, FaultServer, ServerConfig, ServerHandle, ServerStats, Status, StopReason};
pub use handoff::{recv_uffd, recv_uffd_timeout, send_handoff, send_uffd, Handoff, HandoffFormat, HandoffMessage};
pub use liveness::Liveness;
pub use region::{Region, PAGE_2M, PAGE_4K};
