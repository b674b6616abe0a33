//! The UDP backend on loopback (127.0.0.1), unprivileged: batches with contents and addresses
//! checked, chunking, mixed destinations, truncation, readiness, per-datagram send errors, and
//! multicast looped back on `lo` with TTL 0 (so nothing can leave the host).

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use common::{check_all, payload, recv_n, send_all, test_group};
use netio::udp::{UdpConfig, UdpError, UdpIo};
use netio::{Interest, IoError, PacketIo, RxBatch, TxBatch};

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;
const LIMIT: Duration = Duration::from_secs(5);

fn open(config: UdpConfig) -> UdpIo {
    UdpIo::open(&config).expect("open UDP backend on loopback")
}

/// 64 datagrams of different sizes in one batch, received through a smaller receive batch.
fn round_trip(max_batch: usize) {
    let mut rx = open(UdpConfig::new(LO, 0).max_batch(max_batch));
    let mut tx = open(UdpConfig::new(LO, 0).max_batch(max_batch));
    let caps = tx.capabilities();
    assert_eq!((caps.backend, caps.max_batch, caps.rx_destination), ("udp", max_batch, true));
    assert_eq!(*rx.local_addr().ip(), LO);
    assert_ne!(rx.local_addr().port(), 0);

    let expected: Vec<Vec<u8>> = (0..64).map(|i| payload(i, 4 + i * 23)).collect();
    let mut batch = TxBatch::new(64, 1472).expect("tx batch");
    for p in &expected {
        batch.push(rx.local_addr(), p).expect("push");
    }
    send_all(&mut tx, &mut batch, LIMIT);
    assert_eq!(batch.sent(), 64);

    let mut rbatch = RxBatch::new(24, 1472).expect("rx batch");
    let got = recv_n(&mut rx, &mut rbatch, 64, LIMIT);
    check_all(&got, &expected, tx.local_addr(), rx.local_addr());
}

#[test]
fn batch_of_64_round_trips_with_contents_and_addresses() {
    round_trip(64);
}

#[test]
fn batch_larger_than_max_batch_goes_out_in_chunks() {
    round_trip(1);
    round_trip(7);
}

#[test]
fn one_batch_to_several_destinations() {
    let mut a = open(UdpConfig::new(LO, 0));
    let mut b = open(UdpConfig::new(LO, 0));
    let mut tx = open(UdpConfig::new(LO, 0));
    let mut batch = TxBatch::new(10, 64).expect("tx batch");
    let (mut for_a, mut for_b) = (Vec::new(), Vec::new());
    for i in 0..10 {
        let p = payload(i, 16);
        let to = if i % 2 == 0 { a.local_addr() } else { b.local_addr() };
        batch.push(to, &p).expect("push");
        if i % 2 == 0 {
            for_a.push(p)
        } else {
            for_b.push(p)
        }
    }
    send_all(&mut tx, &mut batch, LIMIT);
    let mut rbatch = RxBatch::new(16, 64).expect("rx batch");
    let got = recv_n(&mut a, &mut rbatch, 5, LIMIT);
    check_all(&got, &for_a, tx.local_addr(), a.local_addr());
    let got = recv_n(&mut b, &mut rbatch, 5, LIMIT);
    check_all(&got, &for_b, tx.local_addr(), b.local_addr());
}

#[test]
fn long_datagram_arrives_truncated_and_flagged() {
    let mut rx = open(UdpConfig::new(LO, 0));
    let mut tx = open(UdpConfig::new(LO, 0));
    let mut batch = TxBatch::new(2, 300).expect("tx batch");
    let long = payload(1, 300);
    batch.push(rx.local_addr(), &long).expect("push");
    batch.push(rx.local_addr(), &long[..50]).expect("push");
    send_all(&mut tx, &mut batch, LIMIT);
    let mut rbatch = RxBatch::new(4, 100).expect("rx batch");
    let got = recv_n(&mut rx, &mut rbatch, 2, LIMIT);
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].payload.as_slice(), got[0].truncated), (&long[..100], true));
    assert_eq!((got[1].payload.as_slice(), got[1].truncated), (&long[..50], false));
}

#[test]
fn nothing_waiting_means_zero_and_wait_times_out() {
    let mut rx = open(UdpConfig::new(LO, 0));
    let mut rbatch = RxBatch::new(8, 64).expect("rx batch");
    assert_eq!(rx.recv_batch(&mut rbatch).expect("recv on empty socket"), 0);
    assert!(rbatch.is_empty());

    let start = Instant::now();
    let r = rx.wait(Interest::READABLE, Some(Duration::from_millis(60))).expect("wait");
    let waited = start.elapsed();
    assert!(r.is_timeout(), "{r:?}");
    assert!(waited >= Duration::from_millis(55), "woke after {waited:?}");
    assert!(waited < Duration::from_secs(2), "slept {waited:?}");

    let w = rx.wait(Interest::BOTH, Some(Duration::from_secs(2))).expect("wait writable");
    assert!(w.writable && !w.readable, "{w:?}");

    let mut tx = open(UdpConfig::new(LO, 0));
    let mut batch = TxBatch::new(1, 8).expect("tx batch");
    batch.push(rx.local_addr(), b"ping").expect("push");
    send_all(&mut tx, &mut batch, LIMIT);
    let r = rx.wait(Interest::READABLE, Some(LIMIT)).expect("wait readable");
    assert!(r.readable);

    // A descriptor of the caller's (a waker) ends the wait too, and is reported apart.
    let mut drain = RxBatch::new(4, 64).expect("rx batch");
    assert_eq!(rx.recv_batch(&mut drain).expect("recv"), 1);
    let (waker, mut signal) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let r = rx.wait_with(Interest::READABLE, Some(Duration::from_millis(20)), Some(waker.as_fd())).expect("wait");
    assert!(r.is_timeout(), "{r:?}");
    std::io::Write::write_all(&mut signal, b"x").expect("signal");
    let r = rx.wait_with(Interest::READABLE, Some(LIMIT), Some(waker.as_fd())).expect("wait");
    assert!(r.woken && !r.readable, "{r:?}");
}

#[test]
fn send_error_drops_only_the_failing_datagram() {
    let mut rx = open(UdpConfig::new(LO, 0));
    let mut tx = open(UdpConfig::new(LO, 0));
    let bad = SocketAddrV4::new(LO, 0); // port 0 cannot be sent to: EINVAL
    let mut batch = TxBatch::new(3, 8).expect("tx batch");
    batch.push(rx.local_addr(), b"first").expect("push");
    batch.push(bad, b"bad").expect("push");
    batch.push(rx.local_addr(), b"third").expect("push");

    assert_eq!(tx.send_batch(&mut batch).expect("first call sends the datagram before the bad one"), 1);
    let err = tx.send_batch(&mut batch).expect_err("second call reports the bad datagram");
    assert!(matches!(err, IoError::Send { index: 1, destination, .. } if destination == bad), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "sending datagram 1 of the batch from {} to 127.0.0.1:0 failed (the datagram was dropped): ",
            tx.local_addr()
        )),
        "{msg}"
    );
    assert_eq!(batch.sent(), 2);
    assert_eq!(tx.send_batch(&mut batch).expect("third call sends the rest"), 1);
    assert!(batch.is_sent());

    let mut rbatch = RxBatch::new(4, 8).expect("rx batch");
    let got = recv_n(&mut rx, &mut rbatch, 2, LIMIT);
    let payloads: Vec<&[u8]> = got.iter().map(|g| g.payload.as_slice()).collect();
    assert_eq!(payloads, vec![&b"first"[..], &b"third"[..]]);
}

#[test]
fn port_in_use_is_a_clear_error() {
    let first = open(UdpConfig::new(LO, 0).reuse_address(false));
    let port = first.local_addr().port();
    let err = UdpIo::open(&UdpConfig::new(LO, port).reuse_address(false)).expect_err("second bind must fail");
    assert!(matches!(err, UdpError::Bind { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("binding the UDP socket to 127.0.0.1:{port} failed: ")), "{msg}");
    assert!(msg.contains("another socket has this port"), "{msg}");
}

#[test]
fn unusable_addresses_are_refused_before_opening() {
    let err = UdpIo::open(&UdpConfig::new(Ipv4Addr::UNSPECIFIED, 0)).expect_err("0.0.0.0 is no interface");
    assert!(err.to_string().starts_with("interface address 0.0.0.0 is unusable"), "{err}");
    let err = UdpIo::open(&UdpConfig::new(LO, 0).join(LO)).expect_err("127.0.0.1 is no group");
    assert_eq!(err.to_string(), "127.0.0.1 is not an IPv4 multicast group address (224.0.0.0/4, e.g. 239.x.y.z)");
    let mut io = open(UdpConfig::new(LO, 0));
    let err = io.join(Ipv4Addr::new(127, 0, 0, 2)).expect_err("not a group");
    assert!(matches!(err, UdpError::InvalidGroup { .. }));
}

#[test]
fn joining_twice_says_so() {
    let group = test_group(5);
    let mut io = open(UdpConfig::new(LO, 0).join(group));
    let err = io.join(group).expect_err("second join of the same group");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("joining multicast group {group} on 127.0.0.1 failed: ")), "{msg}");
    assert!(msg.ends_with("(this socket has already joined that group)"), "{msg}");
    assert_eq!(io.groups(), &[group]);
}

#[test]
fn socket_options_follow_the_config() {
    let io = open(UdpConfig::new(LO, 0));
    let s = io.socket();
    assert_eq!(s.multicast_ttl_v4().expect("ttl"), 1, "default TTL 1");
    assert!(!s.multicast_loop_v4().expect("loop"), "default loop off");
    assert_eq!(s.multicast_if_v4().expect("if"), LO);
    assert!(s.nonblocking().expect("nonblocking"));
    assert!(!s.multicast_all_v4().expect("multicast_all"));
    let io = open(UdpConfig::new(LO, 0).multicast_ttl(4).multicast_loop(true));
    assert_eq!(io.socket().multicast_ttl_v4().expect("ttl"), 4);
    assert!(io.socket().multicast_loop_v4().expect("loop"));
    assert!(!io.capabilities().gso, "GSO is off unless asked for");
    assert_eq!(io.gso_max_segment(), 0);
}

#[test]
fn buffers_are_large() {
    let io = open(UdpConfig::new(LO, 0).recv_buffer(4 << 20).send_buffer(2 << 20));
    // As root SO_*BUFFORCE grants the request (Linux reports double); otherwise the sysctl caps it.
    if netlab::preflight::check_privileges().is_ok() {
        assert!(io.recv_buffer_size() >= 4 << 20, "rcvbuf {}", io.recv_buffer_size());
        assert!(io.send_buffer_size() >= 2 << 20, "sndbuf {}", io.send_buffer_size());
    }
    assert!(io.recv_buffer_size() > 0);
}

/// Multicast on `lo`: the route goes out of `lo` only (IP_MULTICAST_IF 127.0.0.1), which hands
/// every datagram back to the local members, and TTL 0 would stop it anywhere else.
#[test]
fn multicast_on_loopback_reaches_every_member_and_only_members() {
    let group = test_group(1);
    let mut a = open(UdpConfig::new(LO, 0).join(group));
    let port = a.local_addr().port();
    assert_eq!(a.local_addr(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), "members bind the wildcard");
    let mut b = open(UdpConfig::new(LO, port).join(group));
    assert_eq!(b.groups(), &[group]);
    // Same port, no group: IP_MULTICAST_ALL is off, so the others' joins do not deliver to it.
    let mut outsider = open(UdpConfig::new(LO, port).bind(netio::udp::Bind::Wildcard));
    let mut tx = open(UdpConfig::new(LO, 0).multicast_ttl(0).multicast_loop(true));

    let to = SocketAddrV4::new(group, port);
    let expected: Vec<Vec<u8>> = (0..64).map(|i| payload(i, 200)).collect();
    let mut batch = TxBatch::new(64, 1472).expect("tx batch");
    for p in &expected {
        batch.push(to, p).expect("push");
    }
    send_all(&mut tx, &mut batch, LIMIT);

    let mut rbatch = RxBatch::new(64, 1472).expect("rx batch");
    for member in [&mut a, &mut b] {
        let got = recv_n(member, &mut rbatch, 64, LIMIT);
        check_all(&got, &expected, tx.local_addr(), to);
    }
    let stray = recv_n(&mut outsider, &mut rbatch, 1, Duration::from_millis(200));
    assert!(stray.is_empty(), "a socket that joined nothing got {} datagrams", stray.len());

    // Leaving stops delivery to that socket only.
    b.leave(group).expect("leave");
    assert!(b.groups().is_empty());
    batch.clear();
    batch.push(to, b"after").expect("push");
    send_all(&mut tx, &mut batch, LIMIT);
    let got = recv_n(&mut a, &mut rbatch, 1, LIMIT);
    assert_eq!(got.iter().map(|g| g.payload.as_slice()).collect::<Vec<_>>(), vec![&b"after"[..]]);
    assert!(recv_n(&mut b, &mut rbatch, 1, Duration::from_millis(100)).is_empty(), "b left the group");
    // (IP_MULTICAST_LOOP cannot be checked here: `lo` loops every datagram back by itself.
    // tests/lab.rs checks it between namespaces.)
}

/// A mixed batch with GSO on: runs of equal sizes, a shorter last segment, another destination in
/// between, empty datagrams. Every datagram must arrive separately, whole, in order.
#[test]
fn gso_runs_arrive_as_separate_datagrams() {
    let mut a = open(UdpConfig::new(LO, 0));
    let mut b = open(UdpConfig::new(LO, 0));
    let mut tx = open(UdpConfig::new(LO, 0).gso(true));
    assert!(tx.capabilities().gso, "this kernel supports UDP GSO");
    assert_eq!(tx.gso_max_segment(), netio::udp::MAX_UDP_PAYLOAD);

    let mut plan: Vec<(bool, usize)> = Vec::new(); // (to a?, length)
    plan.extend(std::iter::repeat_n((true, 1000), 40)); // one run of 40
    plan.extend([(true, 500), (true, 500), (true, 500)]); // ends that run, then a run of 2
    plan.extend([(false, 700), (false, 700), (true, 0), (true, 0)]); // other destination, empties
    plan.extend(std::iter::repeat_n((true, 1400), 50)); // 46 fit in 64 KiB, then a run of 4
    plan.extend(std::iter::repeat_n((false, 100), 70)); // more than 64 segments
    let mut batch = TxBatch::new(plan.len(), 1472).expect("tx batch");
    let (mut for_a, mut for_b) = (Vec::new(), Vec::new());
    for (i, &(to_a, len)) in plan.iter().enumerate() {
        let p: Vec<u8> = if len == 0 { Vec::new() } else { payload(i, len.max(4)) };
        batch.push(if to_a { a.local_addr() } else { b.local_addr() }, &p).expect("push");
        if to_a {
            for_a.push(p)
        } else {
            for_b.push(p)
        }
    }
    send_all(&mut tx, &mut batch, LIMIT);
    assert_eq!(tx.gso_max_segment(), netio::udp::MAX_UDP_PAYLOAD, "no GSO run was refused");

    let mut rbatch = RxBatch::new(64, 1472).expect("rx batch");
    let got = recv_n(&mut a, &mut rbatch, for_a.len(), LIMIT);
    check_all(&got, &for_a, tx.local_addr(), a.local_addr());
    let got = recv_n(&mut b, &mut rbatch, for_b.len(), LIMIT);
    check_all(&got, &for_b, tx.local_addr(), b.local_addr());
}

/// A clone shares the socket: one thread receives while another sends on the same port.
#[test]
fn clone_receives_on_one_thread_while_the_original_sends() {
    let mut peer = open(UdpConfig::new(LO, 0));
    let mut io = open(UdpConfig::new(LO, 0));
    let mut rx_half = io.try_clone().expect("clone");
    assert_eq!(rx_half.local_addr(), io.local_addr());
    let receiver = std::thread::spawn(move || {
        let mut rbatch = RxBatch::new(16, 64).expect("rx batch");
        recv_n(&mut rx_half, &mut rbatch, 20, LIMIT)
    });
    // The peer sends 20 datagrams to the shared socket; the original handle sends 5 to the peer.
    let mut batch = TxBatch::new(20, 64).expect("tx batch");
    let expected: Vec<Vec<u8>> = (0..20).map(|i| payload(i, 32)).collect();
    for p in &expected {
        batch.push(io.local_addr(), p).expect("push");
    }
    send_all(&mut peer, &mut batch, LIMIT);
    batch.clear();
    for i in 0..5 {
        batch.push(peer.local_addr(), &payload(i, 8)).expect("push");
    }
    send_all(&mut io, &mut batch, LIMIT);
    let got = receiver.join().expect("receiver thread");
    check_all(&got, &expected, peer.local_addr(), io.local_addr());
    let mut rbatch = RxBatch::new(16, 64).expect("rx batch");
    assert_eq!(recv_n(&mut peer, &mut rbatch, 5, LIMIT).len(), 5);
}

#[test]
fn answers_on_the_reply_socket_are_read_before_what_queued_on_the_main_one() {
    let mut host = open(UdpConfig::new(LO, 0).reply_socket(true));
    let reply = host.reply_addr().expect("a reply socket");
    assert_ne!(reply.port(), host.local_addr().port(), "a second socket");
    let mut server = open(UdpConfig::new(LO, 0));

    // The host asks: the request goes from the reply socket.
    let mut batch = TxBatch::new(8, 64).expect("tx batch");
    batch.push(server.local_addr(), b"request").expect("push");
    send_all(&mut host, &mut batch, LIMIT);
    let mut rbatch = RxBatch::new(16, 64).expect("rx batch");
    let got = recv_n(&mut server, &mut rbatch, 1, LIMIT);
    assert_eq!(got[0].source, reply, "requests leave from the reply socket");

    // Bulk for the main socket first, then the answer to where the request came from.
    let mut batch = TxBatch::new(8, 64).expect("tx batch");
    let bulk: Vec<Vec<u8>> = (0..5).map(|i| payload(i, 32)).collect();
    for p in &bulk {
        batch.push(host.local_addr(), p).expect("push");
    }
    batch.push(got[0].source, b"answer").expect("push");
    send_all(&mut server, &mut batch, LIMIT);
    std::thread::sleep(Duration::from_millis(20));
    let got = recv_n(&mut host, &mut rbatch, 6, LIMIT);
    let order: Vec<&[u8]> = got.iter().map(|g| g.payload.as_slice()).collect();
    assert_eq!(order[0], b"answer", "the answer is read before the bulk queued ahead of it");
    assert_eq!(order[1..].iter().map(|p| p.to_vec()).collect::<Vec<_>>(), bulk);
    assert_eq!(got[0].destination, reply);

    // Waiting sees either socket.
    let mut batch = TxBatch::new(1, 64).expect("tx batch");
    batch.push(reply, b"late").expect("push");
    send_all(&mut server, &mut batch, LIMIT);
    let ready = host.wait(Interest::READABLE, Some(LIMIT)).expect("wait");
    assert!(ready.readable, "a datagram on the reply socket wakes the wait");
}
