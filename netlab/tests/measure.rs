//! Measurements in real labs: multicast reach, loss, rate limits, cutting a host
//! off, and iperf3 (a tool nobody here wrote) seeing the lab as a real network.
//!
//! Run as root; without root or the tools each test prints why it is skipped.
//! `cargo test -p netlab --test measure -- --nocapture` shows the figures.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Collector;
use netlab::require::lossy_lab;
use netlab::{unique_lab_name, Lab, LabConfig, LinkConditions, Loss, Rate};

fn loss(p: f64) -> Loss {
    Loss::from_probability(p).expect("valid loss")
}

/// Checks a measured loss count against Binomial(n, p) within 5 standard
/// deviations (a false alarm about once in 1.7 million runs).
fn assert_binomial(what: &str, lost: u64, n: u64, p: f64) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    let z = (lost as f64 - mean) / sd;
    println!(
        "{what}: lost {lost} of {n} = {:.4} (set {p}, expected {mean:.0} +- {sd:.1}, z = {z:+.2})",
        lost as f64 / n as f64
    );
    assert!(z.abs() <= 5.0, "{what}: lost {lost} of {n}, expected {mean:.0} +- 5 x {sd:.1}");
}

#[test]
fn multicast_from_one_host_reaches_all_others() {
    if !lossy_lab("multicast_from_one_host_reaches_all_others") {
        return;
    }
    let lab = Lab::create(&LabConfig::new(unique_lab_name("mcast"), 4)).expect("lab");
    let group = Ipv4Addr::new(239, 77, 0, 1);
    let port = common::port();
    let done = Arc::new(AtomicBool::new(false));
    let count = 500;
    let collectors: Vec<Collector> = lab.hosts()[1..]
        .iter()
        .map(|h| Collector::start(common::mcast_receiver(h, group, port), count, done.clone()))
        .collect();
    let tx = common::sender(lab.host(0).expect("h0"));
    common::send_numbered(&tx, SocketAddrV4::new(group, port), count, 20_000);
    done.store(true, Ordering::SeqCst);
    for (i, c) in collectors.into_iter().enumerate() {
        let got = c.finish().len();
        println!("multicast: h{} received {got} of {count}", i + 1);
        assert_eq!(got, count as usize, "h{} missed multicast packets", i + 1);
    }
}

#[test]
fn multicast_with_igmp_snooping_reaches_joined_hosts_only() {
    if !lossy_lab("multicast_with_igmp_snooping_reaches_joined_hosts_only") {
        return;
    }
    let lab = Lab::create(&LabConfig::new(unique_lab_name("snoop"), 3).igmp_snooping(true)).expect("lab");
    let group = Ipv4Addr::new(239, 77, 0, 2);
    let port = common::port();
    let done = Arc::new(AtomicBool::new(false));
    let count = 300;
    let h1 = lab.host(1).expect("h1");
    let joined = Collector::start(common::mcast_receiver(h1, group, port), count, done.clone());
    // The switch floods until its querier's first response interval (1 s) is
    // over; see the crate documentation.
    std::thread::sleep(Duration::from_millis(1300));
    let before = switch_port_tx_packets(&lab, 2);
    let tx = common::sender(lab.host(0).expect("h0"));
    common::send_numbered(&tx, SocketAddrV4::new(group, port), count, 20_000);
    done.store(true, Ordering::SeqCst);
    let got = joined.finish().len();
    let to_h2 = switch_port_tx_packets(&lab, 2) - before;
    println!("igmp snooping: joined h1 received {got} of {count}; the switch sent {to_h2} packets to the port of h2, which did not join");
    assert_eq!(got, count as usize);
    assert!(
        to_h2 < u64::from(count) / 10,
        "snooping switch flooded the group to a host that did not join ({to_h2} packets)"
    );
}

/// Packets the switch transmitted on its port towards host `index`.
fn switch_port_tx_packets(lab: &Lab, index: usize) -> u64 {
    let port = lab.host(index).expect("host").switch_port();
    let out = std::process::Command::new("ip")
        .args(["-n", &lab.switch_netns(), "-s", "link", "show", "dev", &port])
        .output()
        .expect("ip -s link");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let i = lines.iter().position(|l| l.trim_start().starts_with("TX:")).expect("TX line");
    lines[i + 1].split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("tx packets")
}

#[test]
fn receive_loss_matches_setting() {
    if !lossy_lab("receive_loss_matches_setting") {
        return;
    }
    let p = 0.05;
    let cfg =
        LabConfig::new(unique_lab_name("rxloss"), 2).host_conditions(1, LinkConditions::new().with_loss_rx(loss(p)));
    let lab = Lab::create(&cfg).expect("lab");
    let (h0, h1) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"));
    let port = common::port();
    let n = 20_000u32;
    let done = Arc::new(AtomicBool::new(false));
    let overflow_before = common::udp_rcvbuf_errors(h1);
    let rx = Collector::start(common::udp_in(h1, h1.addr(), port), n, done.clone());
    let tx = common::sender(h0);
    let started = Instant::now();
    common::send_numbered(&tx, SocketAddrV4::new(h1.addr(), port), n, 25_000);
    done.store(true, Ordering::SeqCst);
    let got = rx.finish().len() as u64;
    let overflow = common::udp_rcvbuf_errors(h1) - overflow_before;
    println!("rx loss: sent {n} in {:.2} s, socket buffer overflows {overflow}", started.elapsed().as_secs_f64());
    assert_eq!(overflow, 0, "the receiver's socket overflowed: the measurement is void");
    assert_binomial("rx loss on h1", u64::from(n) - got, u64::from(n), p);
}

#[test]
fn send_loss_on_multicast_sender_hits_all_receivers_alike() {
    if !lossy_lab("send_loss_on_multicast_sender_hits_all_receivers_alike") {
        return;
    }
    let p = 0.10;
    let cfg =
        LabConfig::new(unique_lab_name("txloss"), 3).host_conditions(0, LinkConditions::new().with_loss_tx(loss(p)));
    let lab = Lab::create(&cfg).expect("lab");
    let group = Ipv4Addr::new(239, 77, 0, 3);
    let port = common::port();
    let n = 20_000u32;
    let done = Arc::new(AtomicBool::new(false));
    let receivers = [lab.host(1).expect("h1"), lab.host(2).expect("h2")];
    let before: Vec<u64> = receivers.iter().map(|h| common::udp_rcvbuf_errors(h)).collect();
    let collectors: Vec<Collector> =
        receivers.iter().map(|h| Collector::start(common::mcast_receiver(h, group, port), n, done.clone())).collect();
    let tx = common::sender(lab.host(0).expect("h0"));
    common::send_numbered(&tx, SocketAddrV4::new(group, port), n, 25_000);
    done.store(true, Ordering::SeqCst);
    let seen: Vec<_> = collectors.into_iter().map(Collector::finish).collect();
    for (h, b) in receivers.iter().zip(&before) {
        assert_eq!(common::udp_rcvbuf_errors(h) - b, 0, "socket overflow on {}", h.name());
    }
    assert_binomial("tx loss on h0 seen by h1", u64::from(n) - seen[0].len() as u64, u64::from(n), p);
    assert_eq!(seen[0], seen[1], "loss at the sender must drop the same packets for every receiver");
    println!("tx loss: h1 and h2 received exactly the same {} packets", seen[0].len());
}

/// The `counter packets` of the loss rules of host `index`'s link, read from
/// its table in the switch namespace: (rx: chain `to_host`, tx: chain
/// `from_host`); 0 for a chain without a loss rule, `None` without a table.
fn switch_loss_drops(lab: &Lab, index: usize) -> Option<(u64, u64)> {
    let table = netlab::conditions::nft_table(&lab.host(index).expect("host").switch_port());
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.switch_netns(), "nft", "list", "table", "netdev", &table])
        .output()
        .expect("nft list table");
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut chain, mut rx, mut tx) = ("", 0, 0);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("chain ") {
            chain = name.trim_end_matches(" {");
        } else if line.ends_with("comment \"loss\"") {
            let packets = line
                .split_once("counter packets ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .expect("loss rule with a counter");
            match chain {
                netlab::conditions::CHAIN_TO_HOST => rx += packets,
                netlab::conditions::CHAIN_FROM_HOST => tx += packets,
                other => panic!("loss rule in unexpected chain {other:?}:\n{text}"),
            }
        }
    }
    Some((rx, tx))
}

/// Unicast `n` numbered datagrams from `from` to `to` and returns how many
/// arrived, checking that the receiving socket dropped none itself.
fn unicast_delivered(from: &netlab::Host, to: &netlab::Host, n: u32) -> u64 {
    let port = common::port();
    let done = Arc::new(AtomicBool::new(false));
    let overflow_before = common::udp_rcvbuf_errors(to);
    let rx = Collector::start(common::udp_in(to, to.addr(), port), n, done.clone());
    common::send_numbered(&common::sender(from), SocketAddrV4::new(to.addr(), port), n, 25_000);
    done.store(true, Ordering::SeqCst);
    let got = rx.finish().len() as u64;
    assert_eq!(common::udp_rcvbuf_errors(to) - overflow_before, 0, "{} overflowed: the count is void", to.name());
    got
}

/// Loss on one link acts on both of its directions, each with its own
/// probability, at the switch's port: h1 loses `loss_rx` of what it receives
/// and `loss_tx` of what it sends, the h0 -> h2 path (not through h1's link)
/// loses nothing, the rules' drop counters in the switch namespace account for
/// exactly the missing datagrams, the hosts' namespaces have no rules, and
/// clearing the loss removes the table.
#[test]
fn loss_on_one_link_applies_in_both_directions_at_the_switch_port() {
    if !lossy_lab("loss_on_one_link_applies_in_both_directions_at_the_switch_port") {
        return;
    }
    let (p_rx, p_tx) = (0.05, 0.10);
    let lossy = LinkConditions::new().with_loss_rx(loss(p_rx)).with_loss_tx(loss(p_tx));
    let lab = Lab::create(&LabConfig::new(unique_lab_name("bothloss"), 3).host_conditions(1, lossy)).expect("lab");
    // Applying the same conditions again changes nothing (the script is idempotent).
    lab.set_conditions(1, &lossy).expect("set again");
    let (h0, h1, h2) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"), lab.host(2).expect("h2"));
    for h in [h0, h1, h2] {
        let tables = h.output("nft", ["list", "tables"]).expect("nft list tables");
        assert!(
            String::from_utf8_lossy(&tables.stdout).trim().is_empty(),
            "{} has nftables tables of its own: the rules belong to the switch",
            h.name()
        );
    }
    assert_eq!(switch_loss_drops(&lab, 0), None, "h0's port has no loss, so no table");
    assert_eq!(switch_loss_drops(&lab, 1), Some((0, 0)));

    let n = 10_000u32;
    let rx_lost = u64::from(n) - unicast_delivered(h0, h1, n);
    assert_binomial("h1 rx (h0 -> h1)", rx_lost, u64::from(n), p_rx);
    let tx_lost = u64::from(n) - unicast_delivered(h1, h2, n);
    assert_binomial("h1 tx (h1 -> h2)", tx_lost, u64::from(n), p_tx);
    let clean = unicast_delivered(h0, h2, n);
    assert_eq!(clean, u64::from(n), "a path not through h1's link lost datagrams");
    let drops = switch_loss_drops(&lab, 1).expect("h1's table");
    println!("switch port h1: the loss rules dropped {} (rx) and {} (tx)", drops.0, drops.1);
    assert_eq!(drops, (rx_lost, tx_lost), "the rules' counters must account for every missing datagram");

    // Clearing the loss removes h1's table; both directions are lossless again.
    lab.update_conditions(1, |c| {
        c.loss_rx = Loss::NONE;
        c.loss_tx = Loss::NONE;
    })
    .expect("clear loss");
    assert_eq!(switch_loss_drops(&lab, 1), None, "h1's table is still there without loss or cut");
    let m = 2_000u32;
    assert_eq!((unicast_delivered(h0, h1, m), unicast_delivered(h1, h2, m)), (u64::from(m), u64::from(m)));
}

#[test]
fn rate_limit_holds_and_changes_on_a_running_lab() {
    if !lossy_lab("rate_limit_holds_and_changes_on_a_running_lab") {
        return;
    }
    let rate = Rate::mbit(50).expect("rate");
    let cfg =
        LabConfig::new(unique_lab_name("rate"), 2).host_conditions(0, LinkConditions::new().with_rate(Some(rate)));
    let lab = Lab::create(&cfg).expect("lab");
    let (h0, h1) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"));
    let warmup = Duration::from_millis(500);
    let window = Duration::from_secs(2);
    let check = |what: &str, measured: f64, set: Rate| {
        let set = set.bits_per_sec() as f64;
        println!(
            "{what}: TCP goodput {:.2} Mbit/s with the rate set to {:.0} Mbit/s ({:.1} %)",
            measured / 1e6,
            set / 1e6,
            100.0 * measured / set
        );
        assert!((measured - set).abs() <= 0.15 * set, "{what}: {measured} bit/s is not within 15 % of {set}");
    };

    // 1. The sender's egress limit.
    check("h0 tx 50mbit", common::tcp_goodput(h0, h1, warmup, window), rate);

    // 2. Change the running lab: no limit on h0, 20 mbit on what h1 receives.
    let rx_rate = Rate::mbit(20).expect("rate");
    lab.set_conditions(0, &LinkConditions::new()).expect("clear h0");
    lab.update_conditions(1, |c| c.rate_rx = Some(rx_rate)).expect("limit h1");
    check("h1 rx 20mbit", common::tcp_goodput(h0, h1, warmup, window), rx_rate);

    // 3. Without limits the same path is far faster.
    lab.set_conditions(1, &LinkConditions::new()).expect("clear h1");
    let free = common::tcp_goodput(h0, h1, Duration::from_millis(100), Duration::from_millis(300));
    println!("no limit: TCP goodput {:.0} Mbit/s", free / 1e6);
    assert!(free > 200e6, "an unlimited link carried only {free} bit/s");
}

#[test]
fn cut_host_receives_nothing_and_recovers_after_restore() {
    if !lossy_lab("cut_host_receives_nothing_and_recovers_after_restore") {
        return;
    }
    let lab = Lab::create(&LabConfig::new(unique_lab_name("cut"), 3)).expect("lab");
    let (h0, h1, h2) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"), lab.host(2).expect("h2"));
    let group = Ipv4Addr::new(239, 77, 0, 4);
    let n = 200u32;

    // One round: h0 multicasts to h1 and h2 and unicasts to h1; h1 unicasts to h2.
    let round = |label: &str| -> (usize, usize, usize, usize) {
        let (mport, uport, back) = (common::port(), common::port(), common::port());
        let done = Arc::new(AtomicBool::new(false));
        let m1 = Collector::start(common::mcast_receiver(h1, group, mport), n, done.clone());
        let m2 = Collector::start(common::mcast_receiver(h2, group, mport), n, done.clone());
        let u1 = Collector::start(common::udp_in(h1, h1.addr(), uport), n, done.clone());
        let u2 = Collector::start(common::udp_in(h2, h2.addr(), back), n, done.clone());
        let tx0 = common::sender(h0);
        let tx1 = common::sender(h1);
        common::send_numbered(&tx0, SocketAddrV4::new(group, mport), n, 10_000);
        common::send_numbered(&tx0, SocketAddrV4::new(h1.addr(), uport), n, 10_000);
        common::send_numbered(&tx1, SocketAddrV4::new(h2.addr(), back), n, 10_000);
        done.store(true, Ordering::SeqCst);
        let r = (m1.finish().len(), m2.finish().len(), u1.finish().len(), u2.finish().len());
        println!(
            "{label}: h1 got {} multicast + {} unicast of {n} each; h2 got {} multicast, {} unicast from h1",
            r.0, r.2, r.1, r.3
        );
        r
    };

    lab.cut(1).expect("cut");
    assert!(lab.conditions(1).expect("conditions").cut);
    let (m1, m2, u1, u2) = round("h1 cut");
    assert_eq!((m1, u1), (0, 0), "a cut host received packets");
    assert_eq!(u2, 0, "a cut host's packets got out");
    assert_eq!(m2, n as usize, "other hosts must be unaffected");

    lab.restore(1).expect("restore");
    // Multicast needs no address resolution: it flows at once.
    let restored = Instant::now();
    // Unicast needs ARP again (it was cut too): the neighbour entries that
    // failed during the cut are retried by the kernel (every second by default).
    let port = common::port();
    let probe = common::udp_in(h1, h1.addr(), port);
    let tx0 = common::sender(h0);
    let mut buf = [0u8; 16];
    let recovered = loop {
        let _ = tx0.send_to(b"probe", (h1.addr(), port));
        if probe.recv_from(&mut buf).is_ok() {
            break restored.elapsed();
        }
        assert!(restored.elapsed() < Duration::from_secs(5), "h1 unreachable by unicast 5 s after restore");
    };
    println!(
        "h1 restored: unicast from h0 got through again after {:.0} ms (ARP retry)",
        recovered.as_secs_f64() * 1e3
    );
    let (m1, m2, u1, u2) = round("h1 restored");
    assert_eq!(m1, n as usize);
    assert_eq!(m2, n as usize);
    assert_eq!(u1, n as usize);
    // h1's own ARP entry for h2 is retried on the same schedule.
    assert!(u2 > 0, "h1 cannot send after restore");
}

#[test]
fn iperf3_between_two_hosts_is_capped_by_the_rate() {
    if !lossy_lab("iperf3_between_two_hosts_is_capped_by_the_rate") {
        return;
    }
    if !netlab::require::program("iperf3_between_two_hosts_is_capped_by_the_rate", "iperf3", "iperf3") {
        return;
    }
    let rate = Rate::mbit(50).expect("rate");
    let cfg = LabConfig::new(unique_lab_name("iperf"), 2).conditions(LinkConditions::new().with_rate(Some(rate)));
    let lab = Lab::create(&cfg).expect("lab");
    let (h0, h1) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"));
    let port = common::port().to_string();
    let server = h1
        .command("iperf3")
        .expect("command")
        .args(["-s", "-1", "-B", &h1.addr().to_string(), "-p", &port])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start iperf3 server");
    let _server = common::KillOnDrop(server);
    // Wait until the server listens (ss is in iproute2, like ip).
    let listening = Instant::now() + Duration::from_secs(5);
    loop {
        let out = h1.output("ss", ["-Hltn"]).expect("ss");
        if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port}")) {
            break;
        }
        assert!(Instant::now() < listening, "iperf3 server did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = h0
        .command("iperf3")
        .expect("command")
        .args(["-c", &h1.addr().to_string(), "-p", &port, "-t", "3", "-O", "1", "-J"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start iperf3 client");
    let mut client = common::KillOnDrop(client);
    let status = client.wait_for(Duration::from_secs(20));
    let mut json = String::new();
    if let Some(mut out) = client.0.stdout.take() {
        use std::io::Read;
        let _ = out.read_to_string(&mut json);
    }
    assert!(status.is_some_and(|s| s.success()), "iperf3 client failed ({status:?}):\n{json}");
    let received = json
        .find("\"sum_received\"")
        .map(|i| &json[i..])
        .and_then(|s| s.find("\"bits_per_second\"").map(|j| &s[j..]))
        .and_then(|s| s.split_once(':'))
        .and_then(|(_, v)| v.trim_start().split([',', '\n', '}']).next())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("iperf3 JSON has end.sum_received.bits_per_second");
    let set = rate.bits_per_sec() as f64;
    println!(
        "iperf3 h0 -> h1 through 50mbit links: {:.2} Mbit/s received ({:.1} % of the rate)",
        received / 1e6,
        100.0 * received / set
    );
    assert!((received - set).abs() <= 0.15 * set, "iperf3 measured {received} bit/s; expected 50 Mbit/s within 15 %");
}

#[test]
fn thirty_two_hosts_come_up_fast_and_all_hear_multicast() {
    if !lossy_lab("thirty_two_hosts_come_up_fast_and_all_hear_multicast") {
        return;
    }
    let started = Instant::now();
    let cfg = LabConfig::new(unique_lab_name("big"), 32)
        .mtu(9000)
        .conditions(LinkConditions::new().with_rate(Rate::mbit(1000)).with_loss_rx(Loss::NONE));
    let lab = Lab::create(&cfg).expect("lab");
    let up = started.elapsed();
    println!("32 hosts (MTU 9000, 1gbit limits) up in {:.0} ms", up.as_secs_f64() * 1e3);
    assert!(up < Duration::from_secs(10), "creating 32 hosts took {up:?}");
    let group = Ipv4Addr::new(239, 77, 0, 5);
    let port = common::port();
    let n = 50u32;
    let done = Arc::new(AtomicBool::new(false));
    let collectors: Vec<Collector> = lab.hosts()[1..]
        .iter()
        .map(|h| Collector::start(common::mcast_receiver(h, group, port), n, done.clone()))
        .collect();
    // 8000-byte datagrams fit the 9000-byte MTU unfragmented.
    let tx = common::sender(lab.host(0).expect("h0"));
    let big = vec![0u8; 8000];
    for seq in 0..n {
        let mut pkt = big.clone();
        pkt[..4].copy_from_slice(&seq.to_be_bytes());
        tx.send_to(&pkt, SocketAddrV4::new(group, port)).expect("send");
        std::thread::sleep(Duration::from_millis(1));
    }
    done.store(true, Ordering::SeqCst);
    let counts: Vec<usize> = collectors.into_iter().map(|c| c.finish().len()).collect();
    println!("32 hosts: every one of 31 receivers got {:?} of {n}", counts.iter().min());
    assert!(counts.iter().all(|&c| c == n as usize), "{counts:?}");
    let down = Instant::now();
    let name = lab.name().to_owned();
    lab.down().expect("down");
    println!("32 hosts torn down in {:.0} ms", down.elapsed().as_secs_f64() * 1e3);
    common::assert_gone(&name);
}
