//! The UDP backend across network namespaces (netlab): multicast from one host reaches receivers
//! on two others, unicast replies come back on the same sockets, and a wrong interface address
//! gives a clear error. Needs root; prints SKIPPED otherwise.

mod common;

use std::net::SocketAddrV4;
use std::time::Duration;

use common::{check_all, payload, recv_n, send_all, test_group};
use netio::udp::{UdpConfig, UdpError, UdpIo};
use netio::{PacketIo, RxBatch, TxBatch};
use netlab::require;

const LIMIT: Duration = Duration::from_secs(5);
const PORT: u16 = 7000;

#[test]
fn multicast_reaches_receivers_in_two_namespaces() {
    if !require::lab("multicast_reaches_receivers_in_two_namespaces") {
        return;
    }
    let lab = netlab::Lab::create(&netlab::LabConfig::new(netlab::unique_lab_name("netio"), 3)).expect("create lab");
    let hosts: Vec<&netlab::Host> = (0..3).map(|i| lab.host(i).expect("host")).collect();
    let group = test_group(2);
    let open_in = |h: &netlab::Host, config: UdpConfig| -> UdpIo {
        h.run(|| UdpIo::open(&config)).expect("enter host").expect("open UDP backend")
    };
    let mut sender = open_in(hosts[0], UdpConfig::new(hosts[0].addr(), PORT));
    let mut receivers: Vec<UdpIo> =
        hosts[1..].iter().map(|h| open_in(h, UdpConfig::new(h.addr(), PORT).join(group))).collect();

    let to = SocketAddrV4::new(group, PORT);
    let expected: Vec<Vec<u8>> = (0..64).map(|i| payload(i, 1000 + i)).collect();
    let mut batch = TxBatch::new(64, 1472).expect("tx batch");
    for p in &expected {
        batch.push(to, p).expect("push");
    }
    send_all(&mut sender, &mut batch, LIMIT);

    let mut rbatch = RxBatch::new(32, 1472).expect("rx batch");
    for (i, r) in receivers.iter_mut().enumerate() {
        let got = recv_n(r, &mut rbatch, 64, LIMIT);
        assert_eq!(got.len(), 64, "receiver h{} got {} of 64", i + 1, got.len());
        check_all(&got, &expected, sender.local_addr(), to);
    }

    // Unicast replies (NAKs) from both receivers reach the sender, addressed to its own address.
    for (i, r) in receivers.iter_mut().enumerate() {
        batch.clear();
        batch.push(sender.local_addr(), format!("nak from h{}", i + 1).as_bytes()).expect("push");
        send_all(r, &mut batch, LIMIT);
    }
    let got = recv_n(&mut sender, &mut rbatch, 2, LIMIT);
    assert_eq!(got.len(), 2);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.payload, format!("nak from h{}", i + 1).into_bytes());
        assert_eq!(g.source, SocketAddrV4::new(hosts[i + 1].addr(), PORT));
        assert_eq!(g.destination, sender.local_addr());
    }
    // The sender did not join: its own multicast must not have come back to it.
    assert!(recv_n(&mut sender, &mut rbatch, 1, Duration::from_millis(100)).is_empty());
}

/// Multicast with GSO to two namespaces: runs of 1400-byte datagrams (fit the 1500 MTU) go as GSO;
/// 3000-byte ones do not fit unfragmented, so the kernel refuses that run and the backend falls
/// back to plain (fragmented) sends for that size, and still uses GSO for smaller ones.
#[test]
fn gso_multicast_reaches_two_namespaces_and_falls_back_for_long_datagrams() {
    if !require::lab("gso_multicast_reaches_two_namespaces_and_falls_back_for_long_datagrams") {
        return;
    }
    let lab = netlab::Lab::create(&netlab::LabConfig::new(netlab::unique_lab_name("netio"), 3)).expect("create lab");
    let hosts: Vec<&netlab::Host> = (0..3).map(|i| lab.host(i).expect("host")).collect();
    let group = test_group(6);
    let open_in = |h: &netlab::Host, config: UdpConfig| -> UdpIo {
        h.run(|| UdpIo::open(&config)).expect("enter host").expect("open UDP backend")
    };
    let mut sender = open_in(hosts[0], UdpConfig::new(hosts[0].addr(), PORT).gso(true));
    assert!(sender.capabilities().gso);
    let mut receivers: Vec<UdpIo> =
        hosts[1..].iter().map(|h| open_in(h, UdpConfig::new(h.addr(), PORT).join(group))).collect();
    let to = SocketAddrV4::new(group, PORT);
    let mut rbatch = RxBatch::new(64, 4096).expect("rx batch");

    let mut check_round = |sender: &mut UdpIo, sizes: &[usize]| {
        let expected: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &len)| payload(i, len)).collect();
        let mut batch = TxBatch::new(expected.len(), 4096).expect("tx batch");
        for p in &expected {
            batch.push(to, p).expect("push");
        }
        send_all(sender, &mut batch, LIMIT);
        for (i, r) in receivers.iter_mut().enumerate() {
            let got = recv_n(r, &mut rbatch, expected.len(), LIMIT);
            assert_eq!(got.len(), expected.len(), "receiver h{} got {} of {}", i + 1, got.len(), expected.len());
            check_all(&got, &expected, sender.local_addr(), to);
        }
    };
    check_round(&mut sender, &[1400; 64]);
    assert_eq!(sender.gso_max_segment(), netio::udp::MAX_UDP_PAYLOAD, "1400-byte runs fit the MTU");
    check_round(&mut sender, &[3000; 8]);
    assert!(sender.gso_max_segment() < 3000, "3000-byte runs cannot be GSO at MTU 1500");
    let limit = sender.gso_max_segment();
    check_round(&mut sender, &[1000; 16]);
    assert_eq!(sender.gso_max_segment(), limit, "smaller runs still go as GSO");
}

#[test]
fn multicast_loop_is_off_by_default_and_can_be_turned_on() {
    if !require::lab("multicast_loop_is_off_by_default_and_can_be_turned_on") {
        return;
    }
    let lab = netlab::Lab::create(&netlab::LabConfig::new(netlab::unique_lab_name("netio"), 2)).expect("create lab");
    let (h0, h1) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"));
    let group = test_group(4);
    let to = SocketAddrV4::new(group, PORT);
    let open_in = |h: &netlab::Host, config: UdpConfig| -> UdpIo {
        h.run(|| UdpIo::open(&config)).expect("enter host").expect("open UDP backend")
    };
    // A member on the sender's own host, and one on another host.
    let mut local_member = open_in(h0, UdpConfig::new(h0.addr(), PORT).join(group));
    let mut remote_member = open_in(h1, UdpConfig::new(h1.addr(), PORT).join(group));
    let mut quiet = open_in(h0, UdpConfig::new(h0.addr(), 0));
    let mut looping = open_in(h0, UdpConfig::new(h0.addr(), 0).multicast_loop(true));

    let mut batch = TxBatch::new(1, 64).expect("tx batch");
    batch.push(to, b"loop off").expect("push");
    send_all(&mut quiet, &mut batch, LIMIT);
    batch.clear();
    batch.push(to, b"loop on").expect("push");
    send_all(&mut looping, &mut batch, LIMIT);

    let mut rbatch = RxBatch::new(8, 64).expect("rx batch");
    let remote = recv_n(&mut remote_member, &mut rbatch, 2, LIMIT);
    let remote: Vec<&[u8]> = remote.iter().map(|g| g.payload.as_slice()).collect();
    assert_eq!(remote, vec![&b"loop off"[..], &b"loop on"[..]], "the other host gets both");
    let local = recv_n(&mut local_member, &mut rbatch, 2, Duration::from_millis(300));
    let local: Vec<&[u8]> = local.iter().map(|g| g.payload.as_slice()).collect();
    assert_eq!(local, vec![&b"loop on"[..]], "the sender's own host gets only the looped one");
}

#[test]
fn address_of_another_host_is_a_clear_error() {
    if !require::lab("address_of_another_host_is_a_clear_error") {
        return;
    }
    let lab = netlab::Lab::create(&netlab::LabConfig::new(netlab::unique_lab_name("netio"), 2)).expect("create lab");
    let (h0, h1) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"));
    let foreign = h1.addr();
    let try_open = |config: UdpConfig| -> UdpError {
        h0.run(|| UdpIo::open(&config)).expect("enter host").expect_err("a foreign address must be refused")
    };

    let err = try_open(UdpConfig::new(foreign, PORT));
    assert!(matches!(err, UdpError::Bind { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("binding the UDP socket to {foreign}:{PORT} failed: ")), "{msg}");
    assert!(
        msg.ends_with(&format!("({foreign} is not the address of any interface in this network namespace)")),
        "{msg}"
    );

    let group = test_group(3);
    let err = try_open(UdpConfig::new(foreign, PORT).join(group));
    assert!(matches!(err, UdpError::MulticastInterface { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "selecting {foreign} as the interface for outgoing multicast (IP_MULTICAST_IF) failed: "
        )),
        "{msg}"
    );
    assert!(msg.contains("is not the address of any interface in this network namespace"), "{msg}");

    // On the host's own address the same settings work.
    let mut ok = h0.run(|| UdpIo::open(&UdpConfig::new(h0.addr(), PORT))).expect("enter").expect("open");
    ok.join(group).expect("join on own interface");
    assert_eq!(ok.groups(), &[group]);
}
