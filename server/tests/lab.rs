//! The server in a four-host netlab: h0 runs `serve` in-process, h1..h3 each run a minimal receiver
//! loop (the protocol's `Receiver` over `netio`) that faults on every page in order, with 5% loss on
//! each host's receive side. Every received image must equal the file. The server first serves h1
//! alone, which is what one unicast copy of the image costs in this run (FEC, repairs and control
//! traffic included), then all three at once: multicast must send well under three such copies.
//! Needs root (and nft); prints SKIPPED otherwise, or fails with `NETLAB_REQUIRE=1`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use netio::udp::{UdpConfig, UdpIo};
use netio::{Interest, PacketIo, RxBatch, TxBatch};
use spindrift_protocol::receiver::{PageSink, Receiver, ReceiverConfig, ReceiverEvent};
use spindrift_protocol::wire::{NodeId, SessionId, SessionKey};
use spindrift_protocol::Time;
use spindrift_server::{serve, Args, SenderStats, ServerConfig, PAGE_SIZE};

const PORT: u16 = 7710;
/// Makes the image file names of tests running at once differ.
static FILE_SEQ: AtomicUsize = AtomicUsize::new(0);
const GROUP: &str = "239.77.0.1";
const KEY: &str = "5ab1e5ab1e5ab1e5ab1e5ab1e5ab1e5ab1e5ab1e5ab1e5ab1e5ab1e5ab1e5ab1";
const SESSION: u64 = 9;
/// The session of the run to one host alone (what one unicast copy costs).
const SESSION_ALONE: u64 = 8;
/// Hosts receiving at once in the multicast run: h1..h3 of the lab (h0 serves).
const HOSTS: usize = 3;
/// Multicast to [`HOSTS`] hosts must send less than this share of [`HOSTS`] unicast copies.
const MAX_SHARE_OF_UNICAST: f64 = 0.6;
const IMAGE_BYTES: usize = 8 << 20;
const DEADLINE: Duration = Duration::from_secs(60);

/// 8 MiB of mixed content (zero, text-like and random pages), from the simulator's generator.
fn make_image() -> Vec<u8> {
    spindrift_protocol::sim::content::Image::generate(7, (IMAGE_BYTES / PAGE_SIZE) as u32).into_bytes()
}

/// The receiving host's page cache: the pages stored, checked against the image as they come.
struct Sink {
    expected: Arc<Vec<u8>>,
    got: Vec<u8>,
    stored: Vec<bool>,
    mismatches: u32,
}

impl Sink {
    fn put(&mut self, page: u32, data: Option<&[u8]>) {
        let range = page as usize * PAGE_SIZE..(page as usize + 1) * PAGE_SIZE;
        match data {
            Some(d) => self.got[range.clone()].copy_from_slice(d),
            None => self.got[range.clone()].fill(0),
        }
        if self.got[range.clone()] != self.expected[range] {
            self.mismatches += 1;
        }
        self.stored[page as usize] = true;
    }
}

impl PageSink for Sink {
    fn store(&mut self, page: u32, data: &[u8]) {
        self.put(page, Some(data));
    }
    fn store_zero(&mut self, first_page: u32, count: u32) {
        for p in first_page..first_page + count {
            self.put(p, None);
        }
    }
}

/// The minimal host loop: the protocol's receiver between a UDP socket and the sink.
struct Host {
    rcv: Receiver,
    io: UdpIo,
    sink: Sink,
    server: SocketAddrV4,
    rx: RxBatch,
    tx: TxBatch,
    start: Instant,
    ended: bool,
}

impl Host {
    fn now(&self) -> Time {
        Time::from_nanos(self.start.elapsed().as_nanos() as u64)
    }

    /// One round: receive, run timers, send, handle events, sleep until the next timer or datagram.
    fn drive(&mut self) {
        loop {
            let n = self.io.recv_batch(&mut self.rx).expect("recv_batch");
            let now = self.now();
            for i in 0..n {
                let payload = self.rx.payload_mut(i).expect("payload");
                self.rcv.handle_datagram(now, payload, &mut self.sink);
            }
            if n < self.rx.capacity() {
                break;
            }
        }
        let now = self.now();
        if self.rcv.poll_timeout().is_some_and(|t| t <= now) {
            self.rcv.handle_timeout(now);
        }
        self.tx.clear();
        while !self.tx.is_full() {
            let rcv = &mut self.rcv;
            if self.tx.push_with(self.server, |buf| rcv.poll_transmit(now, buf)).expect("push").is_none() {
                break;
            }
        }
        while !self.tx.is_sent() {
            self.io.send_batch(&mut self.tx).expect("send_batch");
            if !self.tx.is_sent() {
                self.io.wait(Interest::WRITABLE, Some(Duration::from_millis(10))).expect("wait");
            }
        }
        while let Some(ev) = self.rcv.poll_event() {
            match ev {
                ReceiverEvent::Ended => self.ended = true,
                ReceiverEvent::ServerLost => panic!("receiver lost the server"),
                other => eprintln!("receiver event: {other:?}"),
            }
        }
        let mut wait = Duration::from_millis(10);
        if let Some(t) = self.rcv.poll_timeout() {
            wait = wait.min(t.saturating_since(self.now()));
        }
        if !wait.is_zero() {
            self.io.wait(Interest::READABLE, Some(wait)).expect("wait");
        }
    }
}

fn scratch_image(bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!(
        "spindrift-server-lab-{}-{}.img",
        std::process::id(),
        FILE_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, bytes).expect("write image");
    path
}

#[test]
fn serves_an_8mib_image_to_three_lossy_hosts_for_well_under_three_unicast_copies() {
    run_lab("serves_an_8mib_image_to_three_lossy_hosts_for_well_under_three_unicast_copies", &[]);
}

/// The same with pages sent raw (no zstd) and encrypted: the overhead of FEC and repairs is not
/// hidden by compression.
#[test]
fn serves_raw_encrypted_pages_to_three_lossy_hosts_for_well_under_three_unicast_copies() {
    run_lab(
        "serves_raw_encrypted_pages_to_three_lossy_hosts_for_well_under_three_unicast_copies",
        &["--zstd-level", "0", "--encrypt"],
    );
}

/// Runs the server in h0 with `extra` flags twice: first to h1 alone (what one unicast copy of the
/// image costs, FEC, repairs and control traffic included), then to h1..h3 at once, and checks that
/// multicast sent clearly less than [`HOSTS`] such copies.
fn run_lab(test: &str, extra: &[&str]) {
    if !netlab::require::lossy_lab(test) {
        return;
    }
    let image = Arc::new(make_image());
    let path = scratch_image(&image);
    let loss = netlab::Loss::from_probability(0.05).expect("loss");
    let mut cfg = netlab::LabConfig::new(netlab::unique_lab_name("srv"), HOSTS + 1);
    for i in 1..=HOSTS {
        cfg = cfg.host_conditions(i, netlab::LinkConditions::new().with_loss_rx(loss));
    }
    let lab = netlab::Lab::create(&cfg).expect("create lab");
    let alone = serve_hosts(test, &lab, &path, &image, extra, SESSION_ALONE, &[1]);
    let all: Vec<usize> = (1..=HOSTS).collect();
    let together = serve_hosts(test, &lab, &path, &image, extra, SESSION, &all);
    std::fs::remove_file(&path).ok();

    let unicast = HOSTS as u64 * alone.tx_bytes;
    let ratio = together.tx_bytes as f64 / unicast as f64;
    eprintln!(
        "{test}: to {HOSTS} hosts at once the server sent {} bytes = {ratio:.3} x the {unicast} bytes of {HOSTS} \
         unicast copies (one host alone took {} bytes)",
        together.tx_bytes, alone.tx_bytes
    );
    assert!(
        ratio < MAX_SHARE_OF_UNICAST,
        "multicast to {HOSTS} hosts sent {} bytes = {ratio:.3} x what {HOSTS} unicast copies would send ({HOSTS} x {} \
         bytes, the server's tx for one host alone in this run); expected under {MAX_SHARE_OF_UNICAST}",
        together.tx_bytes,
        alone.tx_bytes
    );
}

/// Serves the image from h0 in session `session` to the test's receiver on each of `hosts` at once
/// (each faulting on every page in order), checks what every host received, and returns the
/// server's stats.
fn serve_hosts(
    test: &str,
    lab: &netlab::Lab,
    path: &Path,
    image: &Arc<Vec<u8>>,
    extra: &[&str],
    session: u64,
    hosts: &[usize],
) -> SenderStats {
    let h0 = lab.host(0).expect("h0");
    let server_addr = h0.addr();
    let group: Ipv4Addr = GROUP.parse().expect("group");

    let mut flags: Vec<String> = [
        "spindrift-server",
        "--image",
        path.to_str().expect("utf-8 path"),
        "--iface",
        &*server_addr.to_string(),
        "--group",
        GROUP,
        "--port",
        &*PORT.to_string(),
        "--session",
        &*session.to_string(),
        "--key-hex",
        KEY,
        "--duration-s",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.extend(extra.iter().map(|s| s.to_string()));
    let args = Args::try_parse_from(flags).expect("flags");
    let config = ServerConfig::from_args(&args).expect("config");
    let pages = config.image_pages().expect("an image file");
    let key = config.key;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let server = {
        let stop = Arc::clone(&stop);
        h0.spawn(move || serve(&config, &stop)).expect("start server in h0")
    };

    let receivers: Vec<_> = hosts
        .iter()
        .map(|&i| {
            let h = lab.host(i).expect("receiving host");
            let addr = h.addr();
            let expected = Arc::clone(image);
            h.spawn(move || {
                let io = UdpIo::open(&UdpConfig::new(addr, PORT).join(group)).expect("open receiver socket");
                let start = Instant::now();
                let rc = ReceiverConfig::new(SessionId(session), NodeId(i as u32), SessionKey(key), 12, pages);
                let mut host = Host {
                    rcv: Receiver::new(rc, Time::ZERO).expect("receiver"),
                    io,
                    sink: Sink {
                        expected,
                        got: vec![0xAA; IMAGE_BYTES],
                        stored: vec![false; pages as usize],
                        mismatches: 0,
                    },
                    server: SocketAddrV4::new(server_addr, PORT),
                    rx: RxBatch::new(64, 1472).expect("rx batch"),
                    tx: TxBatch::new(16, 1472).expect("tx batch"),
                    start,
                    ended: false,
                };
                for page in 0..pages {
                    let now = host.now();
                    if host.rcv.fault(now, page) {
                        continue;
                    }
                    while !host.rcv.has_page(page) {
                        assert!(
                            start.elapsed() < DEADLINE,
                            "h{i}: page {page} of {pages} not received within {DEADLINE:?}"
                        );
                        host.drive();
                    }
                }
                let took = start.elapsed();
                (host, took)
            })
            .expect("start receiver")
        })
        .collect();
    let mut received: Vec<(usize, Host, Duration)> = Vec::new();
    for (&i, r) in hosts.iter().zip(receivers) {
        let (host, took) = r.join().expect("receiver thread");
        received.push((i, host, took));
    }

    // Stop the server: it ends the session (End reaches the hosts), writes its stats and returns.
    stop.store(true, Ordering::Relaxed);
    let stats = server.join().expect("server thread").expect("server");
    let end_by = Instant::now() + Duration::from_secs(3);
    while received.iter().any(|(_, h, _)| !h.ended) && Instant::now() < end_by {
        for (_, host, _) in received.iter_mut().filter(|(_, h, _)| !h.ended) {
            host.drive();
        }
    }

    let image_bytes = IMAGE_BYTES as u64;
    eprintln!(
        "{test}, session {session} to h{hosts:?}: total {:.2} s; server tx {} bytes = {:.3} x image, {} packets \
         ({} data, {} repair of which {} proactive), {} requests, {} naks, {} pages sent",
        started.elapsed().as_secs_f64(),
        stats.tx_bytes,
        stats.tx_bytes as f64 / image_bytes as f64,
        stats.tx_packets,
        stats.data_packets,
        stats.repair_packets,
        stats.proactive_repairs,
        stats.requests,
        stats.naks,
        stats.pages_sent,
    );
    for (i, host, took) in &received {
        eprintln!("  h{i}: received {pages} pages in {:.2} s; receiver {:?}", took.as_secs_f64(), host.rcv.stats());
        assert_eq!(host.sink.mismatches, 0, "h{i}: pages stored with the wrong content");
        assert!(host.sink.stored.iter().all(|&s| s), "h{i}: some pages were never stored");
        assert!(host.sink.got == **image, "h{i}: the received image differs from the file");
        assert!(host.ended, "h{i} did not see the session's End");
    }
    // A sanity bound per run (the comparison with unicast in `run_lab` is the one that tells
    // multicast apart): a server repeating itself would inflate the one-host run too.
    assert!(stats.tx_bytes < 2 * image_bytes, "server sent {} bytes for a {image_bytes}-byte image", stats.tx_bytes);
    assert!(stats.rx_packets > 0 && stats.requests + stats.statuses > 0, "server heard nothing: {stats:?}");
    stats
}
