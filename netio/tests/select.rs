//! Choosing a backend at run time with `netio::open`, without a lab: on loopback AF_XDP cannot
//! work (not Ethernet), so `xdp` fails with a message saying so and `auto` falls back to UDP.
//! Runs as any user: the interface check comes before anything that needs privileges.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use netio::udp::UdpConfig;
use netio::{Interest, IoKind, PacketIo, RxBatch, TxBatch};

#[test]
fn auto_on_loopback_falls_back_to_a_working_udp_backend() {
    let mut io = netio::open(IoKind::Auto, &UdpConfig::new(Ipv4Addr::LOCALHOST, 0)).expect("auto opens");
    assert_eq!(io.capabilities().backend, "udp");
    let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, io.local_addr().port());
    let mut tx = TxBatch::new(1, 16).expect("batch");
    tx.push(to, b"fell back").expect("push");
    assert_eq!(io.send_batch(&mut tx).expect("send"), 1);
    assert!(io.wait(Interest::READABLE, Some(Duration::from_secs(5))).expect("wait").readable);
    let mut rx = RxBatch::new(1, 16).expect("batch");
    assert_eq!(io.recv_batch(&mut rx).expect("recv"), 1);
    assert_eq!(rx.get(0).map(|d| d.payload), Some(&b"fell back"[..]));
}

#[test]
fn xdp_on_loopback_is_a_clear_error_and_udp_is_udp() {
    let err = netio::open(IoKind::Xdp, &UdpConfig::new(Ipv4Addr::LOCALHOST, 0)).err().expect("xdp must fail on lo");
    let msg = err.to_string();
    // Checked before anything privileged, so the message is the same with or without root.
    assert!(msg.starts_with("interface lo (127.0.0.1) is not an Ethernet interface"), "{msg}");
    let udp = netio::open(IoKind::Udp, &UdpConfig::new(Ipv4Addr::LOCALHOST, 0)).expect("udp opens");
    assert_eq!(udp.capabilities().backend, "udp");
}
