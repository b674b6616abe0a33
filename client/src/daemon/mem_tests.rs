//! The host daemon's real network thread and the real memory server, over the in-memory network
//! (`netio::mem`): no root, no namespaces. Each host is a `NetThread` with its registry, asked for
//! pages as its clones would ask (`NetCommand::Faults`); each server is `serve_source_on` in a thread.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver as ChannelRx;
use netio::mem::MemNet;
use netio::IoKind;
use spindrift_protocol::wire::SessionKey;
use spindrift_server::{serve_source_on, MemoryImage, Push, ServeOptions, ServerConfig};

use super::net::{BlobEvent, NetCommand, NetError, NetHandle, NetSettings, NetThread};
use super::registry::Registry;
use super::stats::DaemonStats;
use crate::cache::PageCache;

const GROUP: Ipv4Addr = Ipv4Addr::new(239, 7, 7, 7);
const PORT: u16 = 7700;
const KEY: [u8; 32] = [0x5a; 32];
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

fn host_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 10)) + i)
}

/// An image of `pages` pages, different for each session: mostly pseudo-random bytes (raw on the
/// wire), every fifth page compressible text, every seventh page zero.
fn image(session: u64, pages: usize) -> Arc<Vec<u8>> {
    let mut v = vec![0u8; pages * 4096];
    let mut x = session.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (p, page) in v.chunks_mut(4096).enumerate() {
        if p % 7 == 3 {
            continue;
        }
        for (i, b) in page.iter_mut().enumerate() {
            if p % 5 == 1 {
                *b = b"spindrift page "[i % 15];
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
    Arc::new(v)
}

/// One host daemon's network side.
struct Host {
    registry: Arc<Registry>,
    stats: Arc<DaemonStats>,
    net: NetHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), NetError>>>,
    _blobs: ChannelRx<BlobEvent>,
}

impl Host {
    fn start(net: &MemNet, i: u32, max_sessions: usize) -> Host {
        let interface = host_ip(i);
        let settings = NetSettings {
            interface,
            group: GROUP,
            port: PORT,
            key: SessionKey(KEY),
            node: u32::from(interface),
            read_ahead: 4,
            read_ahead_max: 0,
            busy_poll: Duration::ZERO,
            server_timeout: Duration::from_secs(3),
            max_sessions,
            linger: Duration::from_secs(3600),
            io: IoKind::Udp,
        };
        let io = net.open(interface, PORT, &[GROUP]).expect("open");
        let registry = Arc::new(Registry::default());
        let stats = Arc::new(DaemonStats::new(settings.node));
        let stop = Arc::new(AtomicBool::new(false));
        let (blob_tx, blobs) = crossbeam_channel::unbounded();
        let (thread, handle) =
            NetThread::with_io(settings, Box::new(io), registry.clone(), stats.clone(), blob_tx, stop.clone())
                .expect("net thread");
        let join = std::thread::spawn(move || thread.run());
        Host { registry, stats, net: handle, stop, thread: Some(join), _blobs: blobs }
    }

    /// Waits for `session`, asks for every page as faults, waits for them all, and checks each byte.
    fn fetch_and_verify(&self, session: u64, image: &[u8], limit: Duration) -> Result<(), String> {
        let (_, cache) = self.registry.wait_for(Some(session), limit).map_err(|e| format!("session {session}: {e}"))?;
        let pages = (image.len() / 4096) as u64;
        let deadline = Instant::now() + limit;
        let mut asked = Instant::now() - Duration::from_secs(1);
        while !cache.all_present(0, pages) {
            if asked.elapsed() >= Duration::from_millis(500) {
                // As a clone's fault server does after a timeout: ask again for what is missing.
                let missing: Vec<u64> = (0..pages).filter(|&p| !cache.is_present(p)).collect();
                self.net.send(NetCommand::Faults { session, pages: missing });
                asked = Instant::now();
            }
            if Instant::now() >= deadline {
                return Err(format!("session {session}: {} of {pages} pages after {limit:?}", cache.present_count()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        verify(&cache, image).map_err(|e| format!("session {session}: {e}"))
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.net.wake();
        if let Some(t) = self.thread.take() {
            t.join().expect("net thread panicked").expect("net thread failed");
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.store(true, Ordering::SeqCst);
            self.net.wake();
        }
    }
}

fn verify(cache: &PageCache, image: &[u8]) -> Result<(), String> {
    for (p, want) in image.chunks(4096).enumerate() {
        match cache.get(p as u64) {
            Some(got) if got == want => {}
            Some(_) => return Err(format!("page {p} differs from the image")),
            None => return Err(format!("page {p} is missing")),
        }
    }
    Ok(())
}

/// A memory server of `session` at `epoch`, serving `image` until `stop` is set.
fn serve(
    net: &MemNet,
    session: u64,
    epoch: u32,
    image: Arc<Vec<u8>>,
    push: Push,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<(), String>> {
    let io = net.open(SERVER, PORT, &[]).expect("open");
    std::thread::spawn(move || {
        let config = ServerConfig::new(SERVER, GROUP, PORT, session, KEY)
            .and_then(|c| c.with_epoch(epoch))
            .map_err(|e| e.to_string())?
            .with_push(push);
        let source = MemoryImage::new(&image).map_err(|e| e.to_string())?;
        serve_source_on(&config, source, ServeOptions::default(), &stop, Box::new(io))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Successive sessions through one daemon, each served, verified and ended; returns the daemon's
/// sessions-held count at the end and the RSS (KiB) after the 10th and the last session.
fn successive_sessions(count: u64) -> (usize, u64, u64) {
    let net = MemNet::new(1);
    let mut host = Host::start(&net, 1, 8);
    let mut rss_10 = 0;
    for session in 1..=count {
        let img = image(session, 48);
        let stop = Arc::new(AtomicBool::new(false));
        let server = serve(&net, session, 1, img.clone(), Push::None, stop.clone());
        let fetched = host.fetch_and_verify(session, &img, Duration::from_secs(10));
        stop.store(true, Ordering::SeqCst);
        server.join().expect("server panicked").expect("server failed");
        if let Err(e) = fetched {
            panic!("{e} (daemon: {})", host.stats.summary_line());
        }
        if session == 10 {
            rss_10 = rss_kib();
        }
    }
    let refused = host.stats.counters.sessions_refused.load(Ordering::Relaxed);
    assert_eq!(refused, 0, "sessions were refused");
    let held = host.registry.session_count();
    host.stop();
    (held, rss_10, rss_kib())
}

#[test]
fn one_daemon_serves_fifty_successive_sessions() {
    let (held, _, _) = successive_sessions(50);
    // Ended sessions linger (an hour here) but make room: at most the limit is ever held.
    assert!(held <= 8, "{held} sessions held at the end");
}

/// The acceptance run for long-lived daemons: 1,000 sessions, memory flat. About a minute.
#[test]
#[ignore = "long: cargo test -p spindrift-client --lib -- --ignored thousand"]
fn a_thousand_successive_sessions_keep_the_daemon_rss_flat() {
    let (held, rss_10, rss_end) = successive_sessions(1000);
    eprintln!("RSS after 10 sessions {rss_10} KiB, after 1000 {rss_end} KiB, {held} sessions held");
    assert!(held <= 8);
    assert!(rss_end as f64 <= rss_10 as f64 * 1.10, "RSS grew from {rss_10} KiB to {rss_end} KiB");
}

#[test]
fn sixteen_hosts_with_loss_and_a_server_restart_get_every_byte() {
    let net = MemNet::new(42);
    let hosts: Vec<Host> = (1..=16).map(|i| Host::start(&net, i, 8)).collect();
    for i in 1..=16 {
        net.set_loss(host_ip(i), 20_000); // 2% of what reaches each host
    }
    let session = 9;
    let img = image(session, 512);
    let stop1 = Arc::new(AtomicBool::new(false));
    let first = serve(&net, session, 100, img.clone(), Push::All, stop1.clone());
    // Every host discovers the session and gets part of the image ...
    let part = |h: &Host| -> u64 {
        h.registry.wait_for(Some(session), Duration::from_secs(10)).map(|(_, c)| c.present_count()).unwrap_or(0)
    };
    let start = Instant::now();
    while hosts.iter().any(|h| part(h) < 64) {
        assert!(start.elapsed() < Duration::from_secs(20), "hosts never got a first part of the image");
        std::thread::sleep(Duration::from_millis(5));
    }
    // ... then the server dies without a word (cut off, so its End is lost) and restarts with a
    // larger epoch at the same address.
    net.cut(SERVER, true);
    stop1.store(true, Ordering::SeqCst);
    first.join().expect("server panicked").expect("first server failed");
    net.cut(SERVER, false);
    let stop2 = Arc::new(AtomicBool::new(false));
    let second = serve(&net, session, 101, img.clone(), Push::All, stop2.clone());
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let tasks: Vec<_> =
            hosts.iter().map(|h| s.spawn(|| h.fetch_and_verify(session, &img, Duration::from_secs(60)))).collect();
        tasks.into_iter().map(|t| t.join().expect("fetch panicked")).collect()
    });
    stop2.store(true, Ordering::SeqCst);
    second.join().expect("server panicked").expect("second server failed");
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "host {}: {:?} ({})", i + 1, r, hosts[i].stats.summary_line());
    }
    let lost = net.stats().lost;
    assert!(lost > 0, "no loss was injected");
    // Every host followed the restart inside its session: none started the session twice.
    for h in &hosts {
        let snap = h.stats.snapshot();
        let s = snap.sessions.iter().find(|s| s.session == session).expect("session");
        assert!(s.restarts >= 1, "a host did not see the restart: {snap:?}");
    }
}
