//! The AF_XDP backend across network namespaces (netlab): XDP to XDP and XDP to UDP, unicast and
//! multicast, at MTU 1500 and 9000 (multi-buffer frames), with random loss; ARP, ping and other
//! UDP ports still reach the kernel while the program is attached; `auto` falls back to UDP when
//! the interface is taken; and after every test no interface of the lab has an XDP program.
//! Needs root; prints SKIPPED otherwise (fails instead with NETLAB_REQUIRE=1).
//!
//! Where loss comes from: netlab's own link conditions (`LinkConditions::with_loss_rx` and
//! `with_loss_tx`). netlab puts its loss and cut rules on the switch's port towards each host (the
//! port's nftables ingress hook for what the host sends, its egress hook for what the switch
//! forwards to the host), not on the host's `eth0`, whose hooks AF_XDP bypasses (the XDP program
//! runs before the ingress hook, and AF_XDP transmission skips the egress hook and qdiscs). So an
//! XDP receiver's rx loss and an XDP sender's tx loss both act here, and so does the loss towards a
//! UDP receiver. (An AF_XDP sender does bypass a tx *rate* limit, a qdisc on its `eth0`; no test here
//! sets one.) Tests that set loss also need `nft` and are skipped without it.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use common::{check_all, payload, recv_n, say, send_all, test_group, Got};
use netio::udp::{UdpConfig, UdpIo};
use netio::xdp::{XdpConfig, XdpIo};
use netio::{IoKind, PacketIo, RxBatch, TxBatch};
use netlab::require;

const LIMIT: Duration = Duration::from_secs(5);
const PORT: u16 = 7400;

fn lab(tag: &str, hosts: usize, mtu: u32, conditions: &[(usize, netlab::LinkConditions)]) -> netlab::Lab {
    let mut cfg = netlab::LabConfig::new(netlab::unique_lab_name(tag), hosts).mtu(mtu);
    for (i, c) in conditions {
        cfg = cfg.host_conditions(*i, *c);
    }
    netlab::Lab::create(&cfg).expect("create lab")
}

fn open_xdp(h: &netlab::Host, config: UdpConfig) -> XdpIo {
    h.run(|| XdpIo::open(&XdpConfig::from_udp(&config))).expect("enter host").expect("open AF_XDP backend")
}

fn open_udp(h: &netlab::Host, config: UdpConfig) -> UdpIo {
    h.run(|| UdpIo::open(&config)).expect("enter host").expect("open UDP backend")
}

/// `p` as a netlab loss.
fn loss(p: f64) -> netlab::Loss {
    netlab::Loss::from_probability(p).expect("loss")
}

/// `ip link` output of every namespace of the lab.
fn ip_links(lab: &netlab::Lab) -> Vec<(String, String)> {
    let mut namespaces: Vec<String> = lab.hosts().iter().map(|h| h.netns().to_owned()).collect();
    namespaces.push(lab.switch_netns());
    namespaces
        .into_iter()
        .map(|ns| {
            let out = std::process::Command::new("ip").args(["-n", &ns, "link"]).output().expect("run ip link");
            (ns, String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .collect()
}

/// True if `ip link` output shows an XDP program (`prog/xdp`, `prog/xdpgeneric`, ...).
fn has_xdp(text: &str) -> bool {
    text.contains("prog/xdp")
}

/// Fails if any interface in any namespace of the lab still has an XDP program.
fn assert_no_xdp(lab: &netlab::Lab) {
    for (ns, links) in ip_links(lab) {
        assert!(!has_xdp(&links), "an XDP program is still attached in {ns}:\n{links}");
    }
}

/// Checks datagrams received over a lossy path: each is one of `expected` (by the index in its
/// first 4 bytes), intact, in increasing order, with the right addresses. Returns how many came.
fn check_subset(got: &[Got], expected: &[Vec<u8>], source: SocketAddrV4, destination: SocketAddrV4) -> usize {
    let mut last = None;
    for g in got {
        let i = u32::from_be_bytes([g.payload[0], g.payload[1], g.payload[2], g.payload[3]]) as usize;
        assert!(i < expected.len(), "unknown datagram index {i}");
        assert_eq!(g.payload, expected[i], "payload of datagram {i}");
        assert!(last.is_none_or(|l| i > l), "datagram {i} out of order or duplicated");
        assert_eq!((g.source, g.destination, g.truncated), (source, destination, false), "datagram {i}");
        last = Some(i);
    }
    got.len()
}

fn batch_of(expected: &[Vec<u8>], to: SocketAddrV4, slot: usize) -> TxBatch {
    let mut b = TxBatch::new(expected.len(), slot).expect("tx batch");
    for p in expected {
        b.push(to, p).expect("push");
    }
    b
}

/// XDP sender h0 to XDP receivers h1 (lossless) and h2 (5% rx loss on its link), multicast; then
/// again with 5% tx loss on the sender's link, which h1 sees too; then unicast both ways between
/// h0 and h1 (neighbour resolution from the XDP side) on lossless links.
fn xdp_to_xdp(mtu: u32, size: usize, count: usize) {
    let lab = lab("xx", 3, mtu, &[(2, netlab::LinkConditions::new().with_loss_rx(loss(0.05)))]);
    let hosts: Vec<&netlab::Host> = (0..3).map(|i| lab.host(i).expect("host")).collect();
    let group = test_group(40);
    {
        let mut sender = open_xdp(hosts[0], UdpConfig::new(hosts[0].addr(), PORT));
        let caps = sender.capabilities();
        assert_eq!((caps.backend, caps.max_datagram, caps.zero_copy), ("af_xdp", mtu as usize - 28, false));
        say(&format!("xdp_to_xdp mtu {mtu}: {}", sender.describe()));
        let mut receivers: Vec<XdpIo> =
            hosts[1..].iter().map(|h| open_xdp(h, UdpConfig::new(h.addr(), PORT).join(group))).collect();
        for (ns, links) in ip_links(&lab) {
            let is_host = hosts.iter().any(|h| h.netns() == ns);
            assert_eq!(has_xdp(&links), is_host, "XDP attached exactly on the hosts' eth0 ({ns}):\n{links}");
        }

        let to = SocketAddrV4::new(group, PORT);
        let expected: Vec<Vec<u8>> = (0..count).map(|i| payload(i, size - i % 7)).collect();
        let mut batch = batch_of(&expected, to, size);
        send_all(&mut sender, &mut batch, LIMIT);
        let source = SocketAddrV4::new(hosts[0].addr(), PORT);
        let mut rbatch = RxBatch::new(64, 9000).expect("rx batch");
        let got = recv_n(&mut receivers[0], &mut rbatch, count, LIMIT);
        check_all(&got, &expected, source, to);
        let got = recv_n(&mut receivers[1], &mut rbatch, count, Duration::from_millis(1500));
        let n = check_subset(&got, &expected, source, to);
        say(&format!("xdp_to_xdp mtu {mtu}: lossless receiver got {count}/{count}, 5%-loss receiver {n}/{count}"));
        assert!(n < count, "the loss rule dropped nothing");
        assert!(n * 100 >= count * 80, "too much loss: {n} of {count}");
        assert_eq!(receivers[1].stats().rx_malformed, 0);

        // 5% loss on what the AF_XDP sender transmits: every receiver misses packets now.
        lab.set_conditions(0, &netlab::LinkConditions::new().with_loss_tx(loss(0.05))).expect("sender loss");
        let mut batch = batch_of(&expected, to, size);
        send_all(&mut sender, &mut batch, LIMIT);
        let got = recv_n(&mut receivers[0], &mut rbatch, count, Duration::from_millis(1500));
        let n1 = check_subset(&got, &expected, source, to);
        // Drain h2 too (its own rx loss adds to the sender's), so no multicast is left for the unicast checks.
        let got = recv_n(&mut receivers[1], &mut rbatch, count, Duration::from_millis(1500));
        let n2 = check_subset(&got, &expected, source, to);
        say(&format!(
            "xdp_to_xdp mtu {mtu}: with 5% loss on the AF_XDP sender's tx, h1 got {n1}/{count}, h2 {n2}/{count}"
        ));
        assert!(n1 < count, "the sender's loss rule dropped nothing");
        assert!(n1 * 100 >= count * 80, "too much loss: {n1} of {count}");
        // h2 gets what passed the sender's rule (h1 got all of that) minus its own loss.
        assert!(n2 <= n1 && n2 * 100 >= count * 70, "h2 got {n2} of {count}, h1 {n1}");
        lab.set_conditions(0, &netlab::LinkConditions::new()).expect("clear sender loss");

        // Unicast h1 -> h0 and h0 -> h1.
        let unicast: Vec<Vec<u8>> = (0..50).map(|i| payload(i, size / 2 + i)).collect();
        let to_h0 = SocketAddrV4::new(hosts[0].addr(), PORT);
        send_all(&mut receivers[0], &mut batch_of(&unicast, to_h0, size), LIMIT);
        let got = recv_n(&mut sender, &mut rbatch, unicast.len(), LIMIT);
        check_all(&got, &unicast, SocketAddrV4::new(hosts[1].addr(), PORT), to_h0);
        let to_h1 = SocketAddrV4::new(hosts[1].addr(), PORT);
        send_all(&mut sender, &mut batch_of(&unicast, to_h1, size), LIMIT);
        let got = recv_n(&mut receivers[0], &mut rbatch, unicast.len(), LIMIT);
        check_all(&got, &unicast, source, to_h1);
        assert!(recv_n(&mut receivers[1], &mut rbatch, 1, Duration::from_millis(100)).is_empty(), "h2 got unicast");
    }
    assert_no_xdp(&lab);
}

#[test]
fn xdp_to_xdp_mtu_1500_with_loss() {
    if !require::lossy_lab("xdp_to_xdp_mtu_1500_with_loss") {
        return;
    }
    xdp_to_xdp(1500, 1472, 400);
}

#[test]
fn xdp_to_xdp_mtu_9000_multi_buffer_with_loss() {
    if !require::lossy_lab("xdp_to_xdp_mtu_9000_multi_buffer_with_loss") {
        return;
    }
    xdp_to_xdp(9000, 8972, 300);
}

/// h0 runs AF_XDP and joined the group; h1 is a UDP receiver of the group with 5% rx loss on
/// its link; h2 is a UDP sender. XDP multicast reaches the UDP receiver; UDP multicast and unicast
/// reach the XDP host; XDP unicast reaches a UDP socket.
fn xdp_and_udp(mtu: u32, size: usize, count: usize) {
    let lossy = netlab::LinkConditions::new().with_loss_rx(loss(0.05));
    let lab = lab("xu", 3, mtu, &[(1, lossy)]);
    let hosts: Vec<&netlab::Host> = (0..3).map(|i| lab.host(i).expect("host")).collect();
    let group = test_group(41);
    let to = SocketAddrV4::new(group, PORT);
    {
        let mut xdp = open_xdp(hosts[0], UdpConfig::new(hosts[0].addr(), PORT).join(group));
        let mut udp_rx = open_udp(hosts[1], UdpConfig::new(hosts[1].addr(), PORT).join(group));
        let mut udp_tx = open_udp(hosts[2], UdpConfig::new(hosts[2].addr(), PORT));
        let xdp_addr = SocketAddrV4::new(hosts[0].addr(), PORT);
        let mut rbatch = RxBatch::new(64, 9000).expect("rx batch");

        // AF_XDP multicast to a kernel UDP socket (lossy link).
        let expected: Vec<Vec<u8>> = (0..count).map(|i| payload(i, size - i % 5)).collect();
        send_all(&mut xdp, &mut batch_of(&expected, to, size), LIMIT);
        let got = recv_n(&mut udp_rx, &mut rbatch, count, Duration::from_millis(1500));
        let n = check_subset(&got, &expected, xdp_addr, to);
        say(&format!("xdp_and_udp mtu {mtu}: UDP receiver with 5% loss got {n}/{count} from AF_XDP"));
        assert!(n < count && n * 100 >= count * 80, "{n} of {count}");

        // Kernel UDP multicast and unicast to the AF_XDP host (lossless).
        let from_udp: Vec<Vec<u8>> = (0..count).map(|i| payload(i, size - i % 3)).collect();
        send_all(&mut udp_tx, &mut batch_of(&from_udp, to, size), LIMIT);
        let got = recv_n(&mut xdp, &mut rbatch, count, LIMIT);
        let udp_addr = SocketAddrV4::new(hosts[2].addr(), PORT);
        check_all(&got, &from_udp, udp_addr, to);
        let few = &from_udp[..40];
        send_all(&mut udp_tx, &mut batch_of(few, xdp_addr, size), LIMIT);
        check_all(&recv_n(&mut xdp, &mut rbatch, few.len(), LIMIT), few, udp_addr, xdp_addr);

        // AF_XDP unicast to a kernel UDP socket.
        send_all(&mut xdp, &mut batch_of(few, udp_addr, size), LIMIT);
        check_all(&recv_n(&mut udp_tx, &mut rbatch, few.len(), LIMIT), few, xdp_addr, udp_addr);
        let stats = xdp.stats();
        assert_eq!((stats.rx_malformed, stats.tx_dropped), (0, 0), "{stats:?}");
    }
    assert_no_xdp(&lab);
}

#[test]
fn xdp_and_udp_interoperate_mtu_1500_with_loss() {
    if !require::lossy_lab("xdp_and_udp_interoperate_mtu_1500_with_loss") {
        return;
    }
    xdp_and_udp(1500, 1472, 400);
}

#[test]
fn xdp_and_udp_interoperate_mtu_9000_with_loss() {
    if !require::lossy_lab("xdp_and_udp_interoperate_mtu_9000_with_loss") {
        return;
    }
    xdp_and_udp(9000, 8972, 300);
}

/// While the program is attached: ping both ways (ARP resolved afresh), UDP to another port of
/// the XDP host reaches its kernel socket, and TCP works.
#[test]
fn arp_ping_tcp_and_other_ports_reach_the_kernel_while_attached() {
    if !require::lab("arp_ping_tcp_and_other_ports_reach_the_kernel_while_attached") {
        return;
    }
    let lab = lab("xk", 2, 1500, &[]);
    let (h0, h1) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"));
    {
        let _xdp = open_xdp(h0, UdpConfig::new(h0.addr(), PORT));
        let ping = |from: &netlab::Host, to: Ipv4Addr| {
            from.output("ip", ["neigh", "flush", "all"]).expect("flush neighbours");
            let out = from.output("ping", ["-c", "2", "-i", "0.2", "-W", "2", &to.to_string()]).expect("run ping");
            assert!(out.status.success(), "ping {to} failed:\n{}", String::from_utf8_lossy(&out.stdout));
        };
        ping(h1, h0.addr());
        ping(h0, h1.addr());
        let other = h0.run(|| UdpSocket::bind((h0.addr(), PORT + 1))).expect("enter").expect("bind");
        other.set_read_timeout(Some(LIMIT)).expect("timeout");
        let tx = h1.run(|| UdpSocket::bind((h1.addr(), 0))).expect("enter").expect("bind");
        tx.send_to(b"to the kernel", (h0.addr(), PORT + 1)).expect("send");
        let mut buf = [0u8; 64];
        let (n, _) = other.recv_from(&mut buf).expect("the other port's datagram reaches the kernel socket");
        assert_eq!(&buf[..n], b"to the kernel");
        // TCP, even to the protocol's port number, is the kernel's too.
        let listener = h0.run(|| std::net::TcpListener::bind((h0.addr(), PORT))).expect("enter").expect("listen");
        let mut client = h1
            .run(|| std::net::TcpStream::connect_timeout(&SocketAddrV4::new(h0.addr(), PORT).into(), LIMIT))
            .expect("enter")
            .expect("TCP connects through the attached program");
        std::io::Write::write_all(&mut client, b"tcp").expect("write");
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(LIMIT)).expect("timeout");
        let mut got = [0u8; 3];
        std::io::Read::read_exact(&mut conn, &mut got).expect("read");
        assert_eq!(&got, b"tcp");
    }
    assert_no_xdp(&lab);
}

/// `auto` uses AF_XDP where it can, and falls back to UDP (logging why) when it cannot: here
/// because the interface already has this process's AF_XDP backend. `xdp` then fails with a
/// message naming the cause; so does an address that is not the host's.
#[test]
fn auto_falls_back_to_udp_and_xdp_errors_are_clear() {
    if !require::lab("auto_falls_back_to_udp_and_xdp_errors_are_clear") {
        return;
    }
    let lab = lab("xa", 2, 1500, &[]);
    let (h0, h1) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"));
    {
        let first =
            h0.run(|| netio::open(IoKind::Auto, &UdpConfig::new(h0.addr(), PORT))).expect("enter").expect("open");
        assert_eq!(first.capabilities().backend, "af_xdp");
        let second = h0
            .run(|| netio::open(IoKind::Auto, &UdpConfig::new(h0.addr(), PORT + 1)))
            .expect("enter")
            .expect("auto opens UDP instead");
        assert_eq!(second.capabilities().backend, "udp");
        let err = h0
            .run(|| netio::open(IoKind::Xdp, &UdpConfig::new(h0.addr(), PORT + 2)))
            .expect("enter")
            .err()
            .expect("a second AF_XDP backend on one interface must fail");
        let msg = err.to_string();
        assert!(msg.contains("one AF_XDP backend per interface"), "{msg}");
        let err = h0
            .run(|| XdpIo::open(&XdpConfig::new(h1.addr(), PORT)))
            .expect("enter")
            .expect_err("a foreign address must be refused");
        assert_eq!(
            err.to_string(),
            format!("{} is not the address of any interface in this network namespace", h1.addr())
        );
        let err = h0.run(|| XdpIo::open(&XdpConfig::new(Ipv4Addr::LOCALHOST, PORT))).expect("enter").expect_err("lo");
        assert!(err.to_string().contains("is not an Ethernet interface"), "{err}");
    }
    assert_no_xdp(&lab);
}

/// Environment variable that makes [`crash_child_holds_the_program`] act as the child of
/// [`program_is_detached_when_the_process_is_killed`]: it names the lab to open.
const CRASH_CHILD_LAB: &str = "NETIO_XDP_CRASH_CHILD_LAB";

/// Run by itself, does nothing. As the child of the crash test: opens the AF_XDP backend on h0 of
/// the parent's lab, says so on stdout, and waits to be killed (at most 30 s).
#[test]
fn crash_child_holds_the_program() {
    let Ok(name) = std::env::var(CRASH_CHILD_LAB) else {
        return;
    };
    let lab = netlab::Lab::open(&name).expect("open the parent's lab");
    let h0 = lab.host(0).expect("h0");
    let _xdp = open_xdp(h0, UdpConfig::new(h0.addr(), PORT));
    println!("ATTACHED");
    std::io::Write::flush(&mut std::io::stdout()).expect("flush");
    std::thread::sleep(Duration::from_secs(30));
}

/// A process killed with SIGKILL while its program is attached leaves nothing behind: the BPF
/// link is a file descriptor, and the kernel closes it (detaching the program) as the process dies.
#[test]
fn program_is_detached_when_the_process_is_killed() {
    if !require::lab("program_is_detached_when_the_process_is_killed") {
        return;
    }
    let lab = lab("xc", 2, 1500, &[]);
    let h0 = lab.host(0).expect("h0");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_child_holds_the_program", "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_LAB, lab.name())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the child");
    // Wait (bounded) for the child to attach.
    let mut out = child.stdout.take().expect("child stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.contains("ATTACHED") {
                let _ = tx.send(());
            }
        }
    });
    let attached = rx.recv_timeout(Duration::from_secs(20)).is_ok();
    let links =
        |h: &netlab::Host| String::from_utf8_lossy(&h.output("ip", ["link"]).expect("ip link").stdout).into_owned();
    let was_attached = attached && has_xdp(&links(h0));
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    assert!(was_attached, "the child did not attach its program: {}", links(h0));
    // The kernel releases the link as it tears the process down; allow it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while has_xdp(&links(h0)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_xdp(&lab);
}

/// Checksums left to the device: an AF_XDP sender asks for them in TX metadata. With the kernel
/// completing them in software (`ChecksumOffload::KernelSoftware`), an AF_XDP receiver that
/// verifies every checksum gets every datagram, so the partial sums and offsets are right; with
/// `Device` (on veth: `CHECKSUM_PARTIAL`, never computed), a kernel UDP socket accepts them as it
/// does its own stack's.
fn checksum_offload(mtu: u32, size: usize) {
    use netio::xdp::ChecksumOffload;
    let lab = lab("xc", 3, mtu, &[]);
    let hosts: Vec<&netlab::Host> = (0..3).map(|i| lab.host(i).expect("host")).collect();
    let group = test_group(42);
    let count = 200;
    // Every other datagram fits one UMEM frame: at MTU 9000 the rest are multi-buffer.
    let expected: Vec<Vec<u8>> =
        (0..count).map(|i| payload(i, if i % 2 == 0 { size - i % 13 } else { 1000 + i })).collect();
    let to = SocketAddrV4::new(group, PORT);
    let source = SocketAddrV4::new(hosts[0].addr(), PORT);
    let open = |h: &netlab::Host, c: XdpConfig| h.run(|| XdpIo::open(&c)).expect("enter host").expect("AF_XDP");
    {
        let cfg = XdpConfig::from_udp(&UdpConfig::new(hosts[0].addr(), PORT))
            .checksum_offload(ChecksumOffload::KernelSoftware);
        let mut sender = open(hosts[0], cfg);
        let rcfg = XdpConfig::from_udp(&UdpConfig::new(hosts[1].addr(), PORT).join(group)).verify_udp_checksum(true);
        let mut receiver = open(hosts[1], rcfg);
        send_all(&mut sender, &mut batch_of(&expected, to, size), LIMIT);
        let mut rbatch = RxBatch::new(64, 9000).expect("rx batch");
        let got = recv_n(&mut receiver, &mut rbatch, count, Duration::from_millis(2000));
        let st = receiver.stats();
        say(&format!("checksum_offload mtu {mtu}: {} of {count} verified, {} malformed", got.len(), st.rx_malformed));
        assert_eq!(st.rx_malformed, 0, "datagrams with a wrong checksum: the offload request is wrong");
        check_all(&got, &expected, source, to);
    }
    {
        let cfg = XdpConfig::from_udp(&UdpConfig::new(hosts[0].addr(), PORT)).checksum_offload(ChecksumOffload::Device);
        let mut sender = open(hosts[0], cfg);
        let mut receiver = open_udp(hosts[2], UdpConfig::new(hosts[2].addr(), PORT).join(group));
        send_all(&mut sender, &mut batch_of(&expected, to, size), LIMIT);
        let mut rbatch = RxBatch::new(64, 9000).expect("rx batch");
        let got = recv_n(&mut receiver, &mut rbatch, count, LIMIT);
        check_all(&got, &expected, source, to);
    }
    assert_no_xdp(&lab);
}

#[test]
fn checksum_offload_mtu_1500() {
    if require::lab("checksum_offload_mtu_1500") {
        checksum_offload(1500, 1472);
    }
}

#[test]
fn checksum_offload_mtu_9000_multi_buffer() {
    if require::lab("checksum_offload_mtu_9000_multi_buffer") {
        checksum_offload(9000, 8972);
    }
}
