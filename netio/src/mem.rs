//! [`MemNet`]: an in-memory network behind [`PacketIo`], so whole daemons (the memory server, host
//! daemons) run in one process, in tests, without root or namespaces (s2n-quic's `io/testing` is
//! the model).
//!
//! A `MemNet` is one Ethernet segment: endpoints opened on it ([`MemNet::open`]) have a host address
//! and a port, may join multicast groups, and exchange datagrams through per-endpoint queues:
//!
//! * a datagram to a group address reaches every *other* endpoint on that port that joined the group
//!   (multicast loop off, as the daemons configure their sockets); one to a unicast address reaches
//!   the endpoint of that host and port; anything else is dropped, counted as unroutable;
//! * each delivery to a host is dropped with that host's loss probability ([`MemNet::set_loss`]),
//!   drawn from a seeded generator, or always while the host is cut off ([`MemNet::cut`]);
//! * a receive queue holds at most [`MemNet::QUEUE_LIMIT`] datagrams; more are dropped, as a full
//!   socket buffer drops them;
//! * sends never block (the segment is infinitely fast); readiness is a socket pair per endpoint
//!   that holds a byte while its queue is non-empty, so [`PacketIo::wait_with`] polls it together with
//!   the caller's waker, exactly as for a real socket.
//!
//! Threads make the interleaving, and so the runs, nondeterministic; the seed fixes which deliveries
//! are lost only for a given order of sends.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::{Capabilities, Interest, IoError, PacketIo, Readiness, RxBatch, TxBatch};

/// Counters of the whole segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Datagrams sent by any endpoint.
    pub sent: u64,
    /// Copies delivered to a receive queue.
    pub delivered: u64,
    /// Copies dropped by a host's loss probability or a cut.
    pub lost: u64,
    /// Copies dropped because a receive queue was full.
    pub overflowed: u64,
    /// Datagrams to an address no endpoint has.
    pub unroutable: u64,
}

struct Queue {
    datagrams: VecDeque<(SocketAddrV4, SocketAddrV4, Vec<u8>)>,
    /// Written once when the queue becomes non-empty, drained when it empties: readable exactly
    /// while datagrams wait.
    signal: UnixStream,
}

struct Port {
    host: Ipv4Addr,
    port: u16,
    groups: Vec<Ipv4Addr>,
    queue: Arc<Mutex<Queue>>,
}

struct Inner {
    ports: Vec<Port>,
    loss_ppm: HashMap<Ipv4Addr, u32>,
    cut: Vec<Ipv4Addr>,
    rng: u64,
    stats: MemStats,
}

/// An in-memory segment. See the module docs. Cheap to clone (all clones are the same segment).
#[derive(Clone)]
pub struct MemNet {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for MemNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemNet").field("stats", &self.stats()).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemNet {
    /// Datagrams a receive queue holds before it drops (about an 8 MiB socket buffer of 1472-byte
    /// datagrams).
    pub const QUEUE_LIMIT: usize = 5_000;
    /// The largest datagram carried.
    pub const MAX_DATAGRAM: usize = 65_507;

    /// A lossless segment whose losses, once set, are drawn from `seed`.
    pub fn new(seed: u64) -> MemNet {
        let inner = Inner {
            ports: Vec::new(),
            loss_ppm: HashMap::new(),
            cut: Vec::new(),
            rng: seed | 1,
            stats: MemStats::default(),
        };
        MemNet { inner: Arc::new(Mutex::new(inner)) }
    }

    /// Opens an endpoint of host `host` on `port`, joined to `groups`.
    pub fn open(&self, host: Ipv4Addr, port: u16, groups: &[Ipv4Addr]) -> Result<MemIo, std::io::Error> {
        let (signal, ready) = UnixStream::pair()?;
        signal.set_nonblocking(true)?;
        ready.set_nonblocking(true)?;
        let queue = Arc::new(Mutex::new(Queue { datagrams: VecDeque::new(), signal }));
        lock(&self.inner).ports.push(Port { host, port, groups: groups.to_vec(), queue: queue.clone() });
        Ok(MemIo { net: self.clone(), local: SocketAddrV4::new(host, port), queue, ready })
    }

    /// Drops each delivery to `host` with probability `ppm` / 1,000,000.
    pub fn set_loss(&self, host: Ipv4Addr, ppm: u32) {
        lock(&self.inner).loss_ppm.insert(host, ppm.min(1_000_000));
    }

    /// Cuts `host` off (every delivery to it and from it is lost) or restores it.
    pub fn cut(&self, host: Ipv4Addr, cut: bool) {
        let mut inner = lock(&self.inner);
        inner.cut.retain(|&h| h != host);
        if cut {
            inner.cut.push(host);
        }
    }

    /// The segment's counters.
    pub fn stats(&self) -> MemStats {
        lock(&self.inner).stats
    }

    fn send(&self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) {
        let mut inner = lock(&self.inner);
        inner.stats.sent += 1;
        let sender_cut = inner.cut.contains(from.ip());
        let group = to.ip().is_multicast();
        let targets: Vec<(Ipv4Addr, Arc<Mutex<Queue>>)> = inner
            .ports
            .iter()
            .filter(|p| p.port == to.port())
            .filter(|p| {
                if group {
                    p.groups.contains(to.ip()) && SocketAddrV4::new(p.host, p.port) != from
                } else {
                    p.host == *to.ip()
                }
            })
            .map(|p| (p.host, p.queue.clone()))
            .collect();
        if targets.is_empty() {
            inner.stats.unroutable += 1;
            return;
        }
        for (host, queue) in targets {
            let ppm = inner.loss_ppm.get(&host).copied().unwrap_or(0);
            if sender_cut || inner.cut.contains(&host) || (ppm > 0 && inner.draw() < ppm) {
                inner.stats.lost += 1;
                continue;
            }
            let mut q = lock(&queue);
            if q.datagrams.len() >= Self::QUEUE_LIMIT {
                inner.stats.overflowed += 1;
                continue;
            }
            if q.datagrams.is_empty() {
                // A full signal buffer still leaves it readable, which is all it must say.
                let _ = q.signal.write(&[1]);
            }
            q.datagrams.push_back((from, to, payload.to_vec()));
            inner.stats.delivered += 1;
        }
    }
}

impl Inner {
    /// A uniform draw in 0..1,000,000 (xorshift64*).
    fn draw(&mut self) -> u32 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((x >> 32) % 1_000_000) as u32
    }
}

/// One endpoint on a [`MemNet`].
pub struct MemIo {
    net: MemNet,
    local: SocketAddrV4,
    queue: Arc<Mutex<Queue>>,
    /// The other end of the queue's signal: readable while datagrams wait.
    ready: UnixStream,
}

impl std::fmt::Debug for MemIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemIo").field("local", &self.local).finish_non_exhaustive()
    }
}

impl Drop for MemIo {
    fn drop(&mut self) {
        let mut inner = lock(&self.net.inner);
        inner.ports.retain(|p| !Arc::ptr_eq(&p.queue, &self.queue));
    }
}

impl PacketIo for MemIo {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new("mem", MemNet::MAX_DATAGRAM, 1024);
        caps.rx_destination = true;
        caps
    }

    fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    fn recv_batch(&mut self, batch: &mut RxBatch) -> Result<usize, IoError> {
        batch.clear();
        let mut q = lock(&self.queue);
        while !batch.is_full() {
            let Some((source, destination, payload)) = q.datagrams.pop_front() else { break };
            batch
                .push(&payload, source, destination)
                .map_err(|e| IoError::Recv { local: self.local, source: std::io::Error::other(e.to_string()) })?;
        }
        if q.datagrams.is_empty() {
            let mut drain = [0u8; 64];
            while matches!(self.ready.read(&mut drain), Ok(n) if n > 0) {}
        }
        Ok(batch.len())
    }

    fn send_batch(&mut self, batch: &mut TxBatch) -> Result<usize, IoError> {
        let pending: Vec<(SocketAddrV4, Vec<u8>)> =
            batch.pending_iter().map(|d| (d.destination, d.payload.to_vec())).collect();
        for (to, payload) in &pending {
            self.net.send(self.local, *to, payload);
        }
        batch.mark_sent(pending.len());
        Ok(pending.len())
    }

    fn wait_with(
        &mut self,
        interest: Interest,
        timeout: Option<Duration>,
        also: Option<BorrowedFd<'_>>,
    ) -> Result<Readiness, IoError> {
        if interest.writable {
            return Ok(Readiness { writable: true, readable: interest.readable && self.has_datagrams(), woken: false });
        }
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            match crate::udp::poll_readable(self.ready.as_fd(), left, also) {
                Ok(r) => return Ok(Readiness { readable: r.readable || self.has_datagrams(), ..r }),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(IoError::Wait { local: self.local, source }),
            }
        }
    }
}

impl MemIo {
    fn has_datagrams(&self) -> bool {
        !lock(&self.queue).datagrams.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GROUP: Ipv4Addr = Ipv4Addr::new(239, 9, 9, 9);

    fn host(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, i)
    }

    #[test]
    fn multicast_reaches_the_other_members_and_unicast_one_host() {
        let net = MemNet::new(1);
        let mut server = net.open(host(1), 7000, &[]).unwrap();
        let mut a = net.open(host(2), 7000, &[GROUP]).unwrap();
        let mut b = net.open(host(3), 7000, &[GROUP]).unwrap();
        let mut other_port = net.open(host(4), 7001, &[GROUP]).unwrap();
        let mut tx = TxBatch::new(4, 64).unwrap();
        tx.push(SocketAddrV4::new(GROUP, 7000), b"to all").unwrap();
        tx.push(SocketAddrV4::new(host(3), 7000), b"to b").unwrap();
        tx.push(SocketAddrV4::new(host(9), 7000), b"to nobody").unwrap();
        assert_eq!(server.send_batch(&mut tx).unwrap(), 3);
        let mut rx = RxBatch::new(8, 64).unwrap();
        assert!(a.wait(Interest::READABLE, Some(Duration::from_secs(1))).unwrap().readable);
        assert_eq!(a.recv_batch(&mut rx).unwrap(), 1);
        assert_eq!(rx.get(0).unwrap().payload, b"to all");
        assert_eq!(rx.get(0).unwrap().source, SocketAddrV4::new(host(1), 7000));
        assert!(a.wait(Interest::READABLE, Some(Duration::ZERO)).unwrap().is_timeout(), "drained");
        assert_eq!(b.recv_batch(&mut rx).unwrap(), 2);
        assert_eq!(other_port.recv_batch(&mut rx).unwrap(), 0);
        assert_eq!(server.recv_batch(&mut rx).unwrap(), 0, "no multicast loop");
        let s = net.stats();
        assert_eq!((s.sent, s.delivered, s.unroutable), (3, 3, 1));
    }

    #[test]
    fn loss_is_seeded_and_a_cut_host_hears_nothing() {
        let count = |seed: u64| {
            let net = MemNet::new(seed);
            let mut server = net.open(host(1), 7000, &[]).unwrap();
            let mut a = net.open(host(2), 7000, &[GROUP]).unwrap();
            net.set_loss(host(2), 100_000);
            let mut tx = TxBatch::new(1000, 8).unwrap();
            for _ in 0..1000 {
                tx.push(SocketAddrV4::new(GROUP, 7000), b"x").unwrap();
            }
            server.send_batch(&mut tx).unwrap();
            let mut rx = RxBatch::new(1000, 8).unwrap();
            (a.recv_batch(&mut rx).unwrap(), net.stats().lost)
        };
        let (got, lost) = count(7);
        assert_eq!(got as u64 + lost, 1000);
        assert!((50..150).contains(&lost), "lost {lost} of 1000 at 10%");
        assert_eq!(count(7), (got, lost), "same seed, same losses");
        let net = MemNet::new(1);
        let mut server = net.open(host(1), 7000, &[]).unwrap();
        let mut a = net.open(host(2), 7000, &[GROUP]).unwrap();
        net.cut(host(2), true);
        let mut tx = TxBatch::new(1, 8).unwrap();
        tx.push(SocketAddrV4::new(GROUP, 7000), b"x").unwrap();
        server.send_batch(&mut tx).unwrap();
        let mut rx = RxBatch::new(1, 8).unwrap();
        assert_eq!(a.recv_batch(&mut rx).unwrap(), 0);
    }
}
