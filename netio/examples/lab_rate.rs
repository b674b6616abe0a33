//! Multicast datagrams per second through the UDP backend between network namespaces (netlab):
//! one sender on h0, receivers on h1 and h2 that joined the group, for batch sizes 1 to 64,
//! without and with UDP GSO on the sender.
//! Needs root; bounded: about one second per batch size, and the lab is removed at the end.
//!
//! ```sh
//! cargo run --release -p netio --example lab_rate [-- SIZE_BYTES SECONDS MTU]
//! ```
//!
//! The sender sends as fast as `sendmmsg` takes datagrams (no flow control), so "received" is
//! what each receiver kept up with; CPU columns are on-CPU nanoseconds per datagram of the sender
//! thread and of the first receiver thread (`/proc/thread-self/schedstat`).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netio::udp::{UdpConfig, UdpIo};
use netio::{Interest, PacketIo, RxBatch, TxBatch};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// This thread's on-CPU time so far, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|t| t.parse().ok()))
        .unwrap_or(0)
}

fn receive(mut rx: UdpIo, batch: usize, stop: Arc<AtomicBool>) -> Result<(u64, u64), netio::IoError> {
    let cpu0 = thread_cpu_ns();
    let mut rbatch = RxBatch::new(batch, 9000).expect("rx batch");
    let mut got = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if rx.wait(Interest::READABLE, Some(Duration::from_millis(20)))?.readable {
            got += rx.recv_batch(&mut rbatch)? as u64;
        }
    }
    got += rx.recv_batch(&mut rbatch)? as u64;
    Ok((got, thread_cpu_ns() - cpu0))
}

fn main() -> Result<(), Error> {
    if !netlab::require::lab("lab_rate") {
        return Ok(());
    }
    let args: Vec<String> = std::env::args().collect();
    let size: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1400);
    let secs: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    let mtu: u32 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(if size > 1472 { 9000 } else { 1500 });
    let lab = netlab::Lab::create(&netlab::LabConfig::new(netlab::unique_lab_name("netiorate"), 3).mtu(mtu))?;
    let group = Ipv4Addr::new(239, 255, 200, 1);
    let port = 7000;
    println!(
        "UDP backend, multicast h0 -> h1,h2 over a netlab bridge, {size}-byte datagrams, MTU {mtu}, {secs} s per row"
    );
    println!(
        "{:>6} {:>4} {:>12} {:>12} {:>12} {:>10} {:>12} {:>12}",
        "batch", "gso", "sent/s", "h1 recv/s", "h2 recv/s", "Gbit/s h1", "tx CPU ns/dg", "rx CPU ns/dg"
    );
    for (batch, gso) in [(1, false), (8, false), (32, false), (64, false), (8, true), (32, true), (64, true)] {
        let open_in =
            |h: usize, config: UdpConfig| -> Result<UdpIo, Error> { Ok(lab.host(h)?.run(|| UdpIo::open(&config))??) };
        let addr = |h: usize| -> Result<Ipv4Addr, Error> { Ok(lab.host(h)?.addr()) };
        let mut tx = open_in(0, UdpConfig::new(addr(0)?, 0).max_batch(batch).gso(gso))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut receivers = Vec::new();
        for h in [1, 2] {
            let rx = open_in(h, UdpConfig::new(addr(h)?, port).join(group).max_batch(batch))?;
            let stop = stop.clone();
            receivers.push(std::thread::spawn(move || receive(rx, batch, stop)));
        }
        let mut tbatch = TxBatch::new(batch, size)?;
        let payload = vec![0x5au8; size];
        for _ in 0..batch {
            tbatch.push(SocketAddrV4::new(group, port), &payload)?;
        }
        let cpu0 = thread_cpu_ns();
        let start = Instant::now();
        let limit = Duration::from_secs_f64(secs);
        let mut sent = 0u64;
        while start.elapsed() < limit {
            sent += tx.send_batch(&mut tbatch)? as u64;
            if tbatch.is_sent() {
                tbatch.rewind();
            } else {
                tx.wait(Interest::WRITABLE, Some(Duration::from_millis(20)))?;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let tx_cpu = thread_cpu_ns() - cpu0;
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let mut results = Vec::new();
        for r in receivers {
            results.push(r.join().map_err(|_| "receiver thread panicked")??);
        }
        let per_s = |n: u64| n as f64 / elapsed;
        println!(
            "{batch:>6} {:>4} {:>12.0} {:>12.0} {:>12.0} {:>10.2} {:>12.0} {:>12.0}",
            if gso { "on" } else { "off" },
            per_s(sent),
            per_s(results[0].0),
            per_s(results[1].0),
            per_s(results[0].0) * size as f64 * 8.0 / 1e9,
            tx_cpu as f64 / sent.max(1) as f64,
            results[0].1 as f64 / results[0].0.max(1) as f64,
        );
    }
    Ok(())
}
