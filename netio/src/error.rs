//! Errors of the data path: [`IoError`].

use std::io;
use std::net::SocketAddrV4;

/// A receive, send or wait that failed. Setup errors are each backend's own
/// (e.g. [`UdpError`](crate::udp::UdpError)).
///
/// "Nothing to receive" and "the send buffer is full" are not errors: `recv_batch` returns 0 and
/// `send_batch` returns how many it sent.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// Receiving failed.
    #[error("receiving datagrams on {local} failed: {source}")]
    Recv {
        /// The backend's bound address.
        local: SocketAddrV4,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// Sending one datagram failed; it was dropped (counted as sent) so that the rest of the batch
    /// can go on.
    #[error("sending datagram {index} of the batch from {local} to {destination} failed (the datagram was dropped): {source}")]
    Send {
        /// The backend's bound address.
        local: SocketAddrV4,
        /// Where the datagram was going.
        destination: SocketAddrV4,
        /// Its index in the batch.
        index: usize,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// Waiting for readiness failed.
    #[error("waiting for {local} to become ready failed: {source}")]
    Wait {
        /// The backend's bound address.
        local: SocketAddrV4,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}
