//! netio: batched packet I/O for the spindrift daemons, one trait over several backends.
//!
//! The memory server multicasts pages and the host daemons receive them and send NAKs back. Both
//! move many small datagrams, so every operation here works on a *batch*, and both sides run one
//! event loop written against the [`PacketIo`] trait, whichever backend is underneath:
//!
//! * [`udp::UdpIo`]: a UDP socket (`socket2`), batched with `sendmmsg`/`recvmmsg`. Works
//!   everywhere, unprivileged, multicast included.
//! * [`xdp::XdpIo`]: AF_XDP sockets (one per NIC receive queue) with a UMEM and four rings, and an
//!   XDP program that hands them only the protocol's UDP port. For rates the socket path cannot
//!   reach; needs root (or `CAP_NET_ADMIN` + `CAP_BPF`).
//!
//! Daemons pick one at run time with [`open`] and an [`IoKind`] (`udp`, `xdp`, `auto`), from the
//! same [`udp::UdpConfig`] either way; `auto` falls back to UDP with the reason logged.
//!
//! # The contract
//!
//! * **Caller-owned batches.** [`RxBatch`] and [`TxBatch`] are allocated once by the caller and
//!   reused: one contiguous buffer of fixed-size slots plus per-datagram length and addresses. No
//!   call allocates per packet.
//! * **Non-blocking.** [`PacketIo::recv_batch`] takes what has arrived (possibly nothing) and
//!   [`PacketIo::send_batch`] sends what fits now and records its progress in the batch.
//! * **Readiness with a timeout.** [`PacketIo::wait_with`] sleeps until the backend is readable or
//!   writable, a descriptor of the caller's (a waker for commands) is readable, or a timeout passes:
//!   the daemon passes the time to its next protocol timer. It polls every descriptor the backend
//!   has (each AF_XDP queue's socket) and the caller's in one system call, so no caller needs the
//!   backend's descriptors or sleeps blind. [`driver::Driver`] is the one loop built on it.
//! * **Addresses.** Every datagram carries `SocketAddrV4`s. A destination is a unicast address or
//!   the session's multicast group (group address and port); a received datagram reports its
//!   source and where it was sent to, so group traffic and unicast replies on one socket can be
//!   told apart.
//! * **Capabilities.** [`PacketIo::capabilities`] says what the backend can do (largest datagram,
//!   largest batch per system call, offloads, zero copy), fixed when the backend is opened.
//! * **Errors.** Setup errors are the backend's own type ([`udp::UdpError`]); the data path returns
//!   [`IoError`]. Each message names the operation, the addresses involved and the system's reason.
//!
//! ```no_run
//! use std::net::{Ipv4Addr, SocketAddrV4};
//! use std::time::Duration;
//! use netio::{udp::{UdpConfig, UdpIo}, Interest, PacketIo, RxBatch, TxBatch};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let group = Ipv4Addr::new(239, 1, 2, 3);
//! let mut io = UdpIo::open(&UdpConfig::new(Ipv4Addr::new(198, 18, 0, 2), 7000).join(group))?;
//! let mut tx = TxBatch::new(32, 1472)?;
//! tx.push(SocketAddrV4::new(group, 7000), b"page 17")?;
//! while !tx.is_sent() {
//!     io.send_batch(&mut tx)?;
//!     if !tx.is_sent() {
//!         io.wait(Interest::WRITABLE, Some(Duration::from_millis(10)))?;
//!     }
//! }
//! let mut rx = RxBatch::new(32, 1472)?;
//! if io.wait(Interest::READABLE, Some(Duration::from_millis(5)))?.readable {
//!     io.recv_batch(&mut rx)?;
//!     for d in &rx {
//!         println!("{} bytes from {} to {}", d.payload.len(), d.source, d.destination);
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # How AF_XDP fits
//!
//! An AF_XDP socket owns a UMEM (an array of equal frames shared with the kernel) and four rings:
//! fill and RX for receiving, TX and completion for sending. Behind [`PacketIo`] (details in
//! [`xdp`]):
//!
//! * `recv_batch` takes descriptors from the RX ring, checks and strips the Ethernet/IPv4/UDP
//!   headers (pure parsing code, [`xdp::frame`], property-tested), copies each payload into the
//!   next [`RxBatch`] slot with [`RxBatch::push`], and returns the frames to the fill ring at once.
//!   On veth AF_XDP runs in copy mode anyway, so this copy costs what the kernel would.
//! * `send_batch` takes free frames back from the completion ring, writes the headers (destination
//!   MAC from the neighbour table, or `01:00:5e` plus the low 23 bits of a group address), copies
//!   each pending payload behind them, posts the descriptors on the TX ring, kicks the kernel with
//!   `sendto` when it asks to, and advances the batch's `sent` cursor by the number posted. Out of
//!   frames is the same "sent fewer" answer as a full socket buffer.
//! * `wait_with` polls every queue's XSK file descriptor (and the caller's), as for a socket.
//! * [`Capabilities`] reports the link MTU less 28 as `max_datagram`, and whether the driver runs
//!   the socket in zero-copy mode.
//!
//! The fixed-stride batch layout is what makes those copies one `memcpy` each, and the same layout
//! serves `recvmmsg`'s one-`iovec`-per-slot.

pub mod batch;
pub mod caps;
pub mod driver;
pub mod error;
pub mod mem;
pub mod select;
pub mod udp;
pub mod xdp;

use std::os::fd::BorrowedFd;
use std::time::Duration;

pub use batch::{BatchError, RxBatch, RxDatagram, RxIter, TxBatch, TxDatagram, TxIter};
pub use caps::Capabilities;
pub use error::IoError;
pub use select::{open, open_with, IoKind, IoKindError, OpenError};

/// What to wait for in [`PacketIo::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// Wake when datagrams can be received.
    pub readable: bool,
    /// Wake when datagrams can be sent.
    pub writable: bool,
}

impl Interest {
    /// Wake when datagrams can be received.
    pub const READABLE: Interest = Interest { readable: true, writable: false };
    /// Wake when datagrams can be sent.
    pub const WRITABLE: Interest = Interest { readable: false, writable: true };
    /// Wake when either is possible.
    pub const BOTH: Interest = Interest { readable: true, writable: true };
}

/// What [`PacketIo::wait`] found ready. Both false means the timeout passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    /// Datagrams can be received (or a receive error is waiting to be reported).
    pub readable: bool,
    /// Datagrams can be sent.
    pub writable: bool,
    /// The caller's own descriptor given to [`PacketIo::wait_with`] is readable.
    pub woken: bool,
}

impl Readiness {
    /// True if nothing became ready before the timeout.
    pub fn is_timeout(&self) -> bool {
        !self.readable && !self.writable && !self.woken
    }
}

/// A batched, non-blocking datagram endpoint: the one interface between the spindrift daemons and
/// the network. See the [crate docs](crate) for the contract and how each backend meets it.
pub trait PacketIo {
    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// The address and port this endpoint is bound to (`0.0.0.0` when bound to every address, as a
    /// multicast receiver is).
    fn local_addr(&self) -> std::net::SocketAddrV4;

    /// Clears `batch`, then fills it with the datagrams that have arrived, up to its capacity,
    /// without blocking. Returns how many it received (0 if none were waiting).
    fn recv_batch(&mut self, batch: &mut RxBatch) -> Result<usize, IoError>;

    /// Sends the pending datagrams of `batch` (from [`TxBatch::sent`] on) as far as the backend
    /// accepts them now, without blocking, and advances the batch's `sent` cursor past them.
    /// Returns how many it sent; fewer than pending means "full for now": [`wait`](Self::wait)
    /// for [`Interest::WRITABLE`] and call again.
    ///
    /// If one datagram fails (say, its destination is unreachable), the ones before it are sent,
    /// it is dropped (counted as sent), and the call returns [`IoError::Send`] for it; call again
    /// to go on with the rest.
    fn send_batch(&mut self, batch: &mut TxBatch) -> Result<usize, IoError>;

    /// Blocks until the endpoint is ready for `interest` or `timeout` passes (`None`: no limit).
    /// May return early with nothing ready (e.g. on a signal); callers loop on their own deadline.
    fn wait(&mut self, interest: Interest, timeout: Option<Duration>) -> Result<Readiness, IoError> {
        self.wait_with(interest, timeout, None)
    }

    /// As [`wait`](Self::wait), and also wakes when `also` (the caller's eventfd, say) is readable,
    /// reported as [`Readiness::woken`]. Every descriptor the backend has (all its queues) and
    /// `also` are waited for in one call.
    fn wait_with(
        &mut self,
        interest: Interest,
        timeout: Option<Duration>,
        also: Option<BorrowedFd<'_>>,
    ) -> Result<Readiness, IoError>;

    /// The backend's own counters of what it dropped or refused, as one line for a daemon's log
    /// and status (`None` if the backend keeps none: the kernel counts a UDP socket's drops).
    fn counters(&self) -> Option<String> {
        None
    }
}

impl<T: PacketIo + ?Sized> PacketIo for Box<T> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    fn local_addr(&self) -> std::net::SocketAddrV4 {
        (**self).local_addr()
    }
    fn recv_batch(&mut self, batch: &mut RxBatch) -> Result<usize, IoError> {
        (**self).recv_batch(batch)
    }
    fn send_batch(&mut self, batch: &mut TxBatch) -> Result<usize, IoError> {
        (**self).send_batch(batch)
    }
    fn wait_with(
        &mut self,
        interest: Interest,
        timeout: Option<Duration>,
        also: Option<BorrowedFd<'_>>,
    ) -> Result<Readiness, IoError> {
        (**self).wait_with(interest, timeout, also)
    }
    fn counters(&self) -> Option<String> {
        (**self).counters()
    }
}
