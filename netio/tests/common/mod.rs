//! Helpers shared by the integration tests: bounded send and receive loops and payload patterns.
//! (Skipping lab tests without root is `netlab::require`.)
//!
//! Every loop here has a deadline, so a failing test ends in bounded time.

#![allow(dead_code)]

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use netio::{Interest, PacketIo, RxBatch, TxBatch};

/// One received datagram, copied out of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    pub payload: Vec<u8>,
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub truncated: bool,
}

/// Payload `i` of a test: its index and a byte pattern, `len` bytes long (at least 4).
pub fn payload(i: usize, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|k| (k * 7 + i * 13) as u8).collect();
    p[..4].copy_from_slice(&(i as u32).to_be_bytes());
    p
}

/// Sends every pending datagram of `batch`, waiting for writability in between, within `limit`.
pub fn send_all(io: &mut impl PacketIo, batch: &mut TxBatch, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !batch.is_sent() {
        io.send_batch(batch).expect("send_batch");
        if batch.is_sent() {
            break;
        }
        assert!(Instant::now() < deadline, "sending timed out with {} datagrams pending", batch.pending());
        io.wait(Interest::WRITABLE, Some(Duration::from_millis(20))).expect("wait writable");
    }
}

/// Receives until `n` datagrams arrived or `limit` passed; returns what arrived.
pub fn recv_n(io: &mut impl PacketIo, batch: &mut RxBatch, n: usize, limit: Duration) -> Vec<Got> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        io.wait(Interest::READABLE, Some(left.min(Duration::from_millis(50)))).expect("wait readable");
        io.recv_batch(batch).expect("recv_batch");
        got.extend(batch.iter().map(|d| Got {
            payload: d.payload.to_vec(),
            source: d.source,
            destination: d.destination,
            truncated: d.truncated,
        }));
    }
    got
}

/// Checks that `got` holds exactly datagrams `0..expected.len()` in order, with the expected
/// payloads and addresses.
pub fn check_all(got: &[Got], expected: &[Vec<u8>], source: SocketAddrV4, destination: SocketAddrV4) {
    assert_eq!(got.len(), expected.len(), "datagram count");
    for (i, (g, want)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g.payload, *want, "payload of datagram {i}");
        assert_eq!(g.source, source, "source of datagram {i}");
        assert_eq!(g.destination, destination, "destination of datagram {i}");
        assert!(!g.truncated, "datagram {i} truncated");
    }
}

/// A multicast group in 239.255.0.0/16 that differs between test processes and between calls.
pub fn test_group(salt: u8) -> Ipv4Addr {
    let pid = std::process::id();
    Ipv4Addr::new(239, 255, (pid % 250) as u8 + 1, salt)
}

/// Writes straight to stderr, bypassing the test harness's capture, so a figure is always visible.
pub fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}
