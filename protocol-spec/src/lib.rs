//! spindrift's page-distribution protocol: the wire codec, the sender (memory server) and receiver
//! (host daemon) state machines, and a deterministic simulator of one server and many receivers.
//!
//! # Contract
//! This crate is *sans-IO* and fully deterministic: it opens no sockets, starts no threads, never reads
//! the system clock and draws randomness only from seeds it is given. (One exception, outside the
//! protocol: [`sim::run`] reads the monotonic clock to report its own run time and to stop a runaway
//! simulation; it never feeds that clock to the state machines.) Every input carries the current
//! [`Time`]; outputs are pulled with `poll_*` into buffers the caller owns (an mmsg slot, an AF_XDP
//! frame, a simulator queue). The daemons move bytes between this core and the network and are the
//! only place where I/O happens. The same inputs always give the same outputs, which is what makes the
//! [`sim`] simulator reproducible by seed.
//!
//! # Driving a state machine
//! For both [`sender::Sender`] and [`receiver::Receiver`], the order is the one quinn-proto uses:
//! 1. feed inputs: `handle_datagram(now, ..)` for each datagram received, `handle_timeout(now)` when
//!    the deadline from `poll_timeout()` has passed, and commands (a fault, a blob to publish);
//! 2. drain outputs: `poll_transmit(now, buf)` until it returns `None`, then `poll_event()`;
//! 3. sleep until `poll_timeout()` or the next datagram.
//!
//! A host daemon drives one [`endpoint::HostEndpoint`] instead of receivers: it routes datagrams to
//! sessions, creates them from Announces and retires them, in the same handle / poll order.
//!
//! See `PROTOCOL.md` beside this crate for the normative protocol.

pub mod endpoint;
pub mod fec;
pub mod receiver;
mod replay;
pub mod sender;
pub mod sim;
mod time;
pub mod wire;

pub use time::Time;
