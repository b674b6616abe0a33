//! Helpers shared by the integration tests: measuring UDP delivery and TCP
//! goodput inside a lab, and checking for leftovers. (Skipping without root is
//! `netlab::require`.)
//!
//! Every socket has a timeout and every child process is killed on drop, so a
//! failing test ends in bounded time; every lab is a `Lab` value, removed on drop.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netlab::Host;

/// A port number no other test in this process uses.
pub fn port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(20000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A UDP socket bound inside `host` to `addr:port`, with a read timeout.
pub fn udp_in(host: &Host, addr: Ipv4Addr, port: u16) -> UdpSocket {
    let sock = host.run(|| UdpSocket::bind((addr, port))).expect("enter host").expect("bind udp");
    sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    force_rcvbuf(&sock, 8 << 20);
    sock
}

/// Gives `sock` a receive buffer of `bytes`, past `net.core.rmem_max`
/// (SO_RCVBUFFORCE, root only), so that a receiver thread descheduled for a
/// moment on a busy 2-core machine does not drop datagrams itself.
pub fn force_rcvbuf(sock: &UdpSocket, bytes: i32) {
    use std::os::fd::AsRawFd;
    let value: libc::c_int = bytes;
    // SAFETY: the descriptor is valid (borrowed from `sock` for the call), and
    // the option value points to a live c_int whose size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
}

/// A UDP socket inside `host` that joined multicast `group` on `port`.
pub fn mcast_receiver(host: &Host, group: Ipv4Addr, port: u16) -> UdpSocket {
    let sock = udp_in(host, Ipv4Addr::UNSPECIFIED, port);
    sock.join_multicast_v4(&group, &host.addr()).expect("join group");
    sock
}

/// A UDP sender bound to `host`'s address, multicast TTL 1.
pub fn sender(host: &Host) -> UdpSocket {
    let sock = udp_in(host, host.addr(), 0);
    sock.set_multicast_ttl_v4(1).expect("ttl");
    sock.set_multicast_loop_v4(false).expect("loop");
    sock
}

/// Sends `count` 64-byte datagrams numbered 0.. to `dest`, paced at `pps`.
pub fn send_numbered(sock: &UdpSocket, dest: SocketAddrV4, count: u32, pps: u32) {
    let start = Instant::now();
    let mut buf = [0u8; 64];
    for seq in 0..count {
        buf[..4].copy_from_slice(&seq.to_be_bytes());
        // A full queue (rate limit) is a valid outcome of the experiment: the
        // receiver counts what arrived.
        let _ = sock.send_to(&buf, dest);
        if seq % 64 == 63 {
            let due = start + Duration::from_secs_f64(f64::from(seq + 1) / f64::from(pps));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
}

/// Receives numbered datagrams on its own thread until `count` distinct ones
/// arrived, or `done` is set and the socket was idle for 300 ms, or 20 s passed.
pub struct Collector {
    handle: std::thread::JoinHandle<HashSet<u32>>,
}

impl Collector {
    /// Starts receiving on `sock`.
    pub fn start(sock: UdpSocket, count: u32, done: Arc<AtomicBool>) -> Collector {
        let handle = std::thread::spawn(move || {
            let mut seen = HashSet::new();
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut idle_since: Option<Instant> = None;
            while Instant::now() < deadline && seen.len() < count as usize {
                match sock.recv_from(&mut buf) {
                    Ok((n, _)) if n >= 4 => {
                        idle_since = None;
                        seen.insert(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if done.load(Ordering::SeqCst) {
                            let since = *idle_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_millis(300) {
                                break;
                            }
                        }
                    }
                }
            }
            seen
        });
        Collector { handle }
    }

    /// The sequence numbers received.
    pub fn finish(self) -> HashSet<u32> {
        self.handle.join().expect("collector thread")
    }
}

/// `RcvbufErrors` of UDP in `host` (datagrams dropped because a socket buffer
/// was full): a loss measurement is only valid if this did not move.
pub fn udp_rcvbuf_errors(host: &Host) -> u64 {
    let snmp =
        host.run(|| std::fs::read_to_string("/proc/thread-self/net/snmp")).expect("enter host").expect("read snmp");
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    assert!(udp.len() >= 2, "no Udp lines in snmp");
    let names: Vec<&str> = udp[0].split_whitespace().collect();
    let values: Vec<&str> = udp[1].split_whitespace().collect();
    let i = names.iter().position(|n| *n == "RcvbufErrors").expect("RcvbufErrors column");
    values[i].parse().expect("number")
}

/// Measures TCP goodput (bits/s of payload) from `from` to `to`: bytes read by
/// the receiver between `warmup` and `warmup + window` after the first byte.
pub fn tcp_goodput(from: &Host, to: &Host, warmup: Duration, window: Duration) -> f64 {
    let port = port();
    let listener = to.run(|| TcpListener::bind((to.addr(), port))).expect("enter host").expect("listen");
    let total = warmup + window;
    let receiver = std::thread::spawn(move || -> f64 {
        listener.set_nonblocking(false).expect("blocking");
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let mut buf = vec![0u8; 256 * 1024];
        let mut first: Option<Instant> = None;
        let mut counted = 0u64;
        loop {
            let n = match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let t0 = *first.get_or_insert_with(Instant::now);
            let t = t0.elapsed();
            if t >= total {
                break;
            }
            if t >= warmup {
                counted += n as u64;
            }
        }
        counted as f64 * 8.0 / window.as_secs_f64()
    });
    let dest = SocketAddrV4::new(to.addr(), port);
    let mut stream = from
        .run(|| TcpStream::connect_timeout(&dest.into(), Duration::from_secs(3)))
        .expect("enter host")
        .expect("connect");
    stream.set_write_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let chunk = vec![0x5au8; 64 * 1024];
    let deadline = Instant::now() + total + Duration::from_secs(3);
    while Instant::now() < deadline {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    drop(stream);
    receiver.join().expect("receiver")
}

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Waits up to `limit` for the child; kills it if it is still running then.
    pub fn wait_for(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        None
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Namespaces of lab `name` according to `ip netns list` (not the library).
pub fn namespaces_of(name: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| netlab::names::classify_netns(ns).is_some_and(|r| r.lab() == Some(name)))
        .map(str::to_owned)
        .collect()
}

/// Asserts that nothing of lab `name` is left: no namespace, and nothing in
/// `ip link` of the machine's own namespace refers to it.
pub fn assert_gone(name: &str) {
    let left = namespaces_of(name);
    assert!(left.is_empty(), "namespaces of lab {name} left: {left:?}");
    let links = Command::new("ip").args(["-d", "link", "show"]).output().expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    let prefix = format!("{}{name}-", netlab::PREFIX);
    assert!(!links.contains(&prefix), "ip link of the root namespace mentions lab {name}:\n{links}");
    assert!(netlab::list_labs().expect("list").iter().all(|l| l.name != name), "lab {name} still listed");
}
