//! Datagrams per second through the UDP backend on loopback (127.0.0.1), one sender thread and
//! one receiver thread, for several batch sizes. Bounded: about one second per batch size.
//!
//! ```sh
//! cargo run --release -p netio --example loopback_rate [-- SIZE_BYTES SECONDS]
//! ```
//!
//! Sent counts what `sendmmsg` accepted, received what `recvmmsg` delivered; on loopback the
//! difference is what the receiver's socket buffer dropped while the receiver thread was behind.
//! The CPU columns are each thread's on-CPU time per datagram (`/proc/thread-self/schedstat`),
//! which a busy machine disturbs far less than the rates. On loopback the sender's system call
//! also runs the receive path up to the receiver's socket buffer.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netio::udp::{UdpConfig, UdpIo};
use netio::{Interest, PacketIo, RxBatch, TxBatch};

/// This thread's on-CPU time so far, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|t| t.parse().ok()))
        .unwrap_or(0)
}

struct Row {
    sent_per_s: f64,
    got_per_s: f64,
    tx_ns: f64,
    rx_ns: f64,
}

fn run(batch: usize, size: usize, secs: f64) -> Result<Row, Box<dyn std::error::Error>> {
    let config = UdpConfig::new(Ipv4Addr::LOCALHOST, 0).max_batch(batch);
    let mut rx = UdpIo::open(&config)?;
    let mut tx = UdpIo::open(&config)?;
    let to = rx.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(u64, u64), netio::IoError> {
            let cpu0 = thread_cpu_ns();
            let mut rbatch = RxBatch::new(batch, 2048).expect("rx batch");
            let mut got = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if rx.wait(Interest::READABLE, Some(Duration::from_millis(20)))?.readable {
                    got += rx.recv_batch(&mut rbatch)? as u64;
                }
            }
            got += rx.recv_batch(&mut rbatch)? as u64;
            Ok((got, thread_cpu_ns() - cpu0))
        })
    };
    let mut tbatch = TxBatch::new(batch, size)?;
    let payload = vec![0xa5u8; size];
    for _ in 0..batch {
        tbatch.push(to, &payload)?;
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
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let (got, rx_cpu) = receiver.join().map_err(|_| "receiver thread panicked")??;
    Ok(Row {
        sent_per_s: sent as f64 / elapsed,
        got_per_s: got as f64 / elapsed,
        tx_ns: tx_cpu as f64 / sent.max(1) as f64,
        rx_ns: rx_cpu as f64 / got.max(1) as f64,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let size: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1400);
    let secs: f64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1.0);
    println!("UDP backend on loopback, {size}-byte datagrams, {secs} s per row");
    println!(
        "{:>6} {:>12} {:>12} {:>10} {:>12} {:>12}",
        "batch", "sent/s", "received/s", "Gbit/s rx", "tx CPU ns/dg", "rx CPU ns/dg"
    );
    for batch in [1, 8, 32, 64] {
        let r = run(batch, size, secs)?;
        println!(
            "{batch:>6} {:>12.0} {:>12.0} {:>10.2} {:>12.0} {:>12.0}",
            r.sent_per_s,
            r.got_per_s,
            r.got_per_s * size as f64 * 8.0 / 1e9,
            r.tx_ns,
            r.rx_ns
        );
    }
    Ok(())
}
