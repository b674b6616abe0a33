//! Endpoints: where sessions begin and end. A daemon hands its endpoint every datagram and every
//! command, and sends what the endpoint hands out, to where it says; it decides no protocol matter
//! itself (quinn-proto's `Endpoint` is the model).
//!
//! * [`HostEndpoint`]: a host daemon's sessions, discovered from Announces, routed by session id,
//!   followed across server restarts, and retired when they end and no clone uses them.
//! * [`ServerEndpoint`]: a memory server's sessions (one [`Sender`](crate::sender::Sender) each),
//!   datagrams routed to them by session id, transmissions addressed to each session's group.
//! * [`ids`]: node ids, packet-number bases and epochs from the numbers a daemon reads from its
//!   clocks and interfaces.

mod host;
pub mod ids;
mod server;

pub use host::{HostConfig, HostEndpoint, HostEvent, HostStats, RetireReason, SessionInfo, SessionView, Transmit};
pub use server::{ServerEndpoint, ServerStats, ServerTransmit};
