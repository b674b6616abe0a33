//! `spindrift-vmm clone` as a host daemon runs it: a separate process started from a descriptor file,
//! its memory served over the daemon's Unix socket, its report sent back on the same stream. The daemon
//! here is this test: a fault server over a page cache filled from the parent's memory at the fork.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spindrift_client::handoff::{recv_opening, send_map_reply, Opening};
use spindrift_client::{FaultServer, Handoff, PageCache, ServerConfig, Status};
use vmm_glue::daemon::ReportLine;
use vmm_glue::guest::ParallelJob;
use vmm_glue::{Descriptor, Vm, VmConfig};

const MEM: u64 = 16 << 20;

/// A parent that forks 2 clones of the parallel job; returns its descriptor, image and the checksums.
fn record_fork() -> (Descriptor, Vec<u8>, Vec<u64>) {
    common::bounded(Duration::from_secs(60), "parent", || {
        let config = VmConfig { mem_bytes: MEM, verify_image: true, ..VmConfig::default() };
        let mut vm = Vm::new(config).unwrap();
        let job = ParallelJob { clones: 2, data_bytes: 8 << 20, seed: 3 };
        let layout = job.install(&mut vm).unwrap();
        let mut rec = common::Recorder::default();
        vm.run(&mut rec).unwrap();
        let expected = (1..=2).map(|i| job.expected(&layout, i)).collect();
        (rec.descriptor.unwrap(), rec.image, expected)
    })
}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("vmm-glue-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_clone(dir: &Path, clone_id: u32, verify_image: bool) -> Child {
    spawn_clone_with(dir, clone_id, verify_image, false)
}

/// `private`: the clone takes private copies of its pages instead of mapping the cache memfd.
fn spawn_clone_with(dir: &Path, clone_id: u32, verify_image: bool, private: bool) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spindrift-vmm"))
        .env(vmm_glue::cli::CLONE_MEMORY_ENV, if private { "private" } else { "shared" })
        .args(["clone", "--session", "s1", "--fork", "1"])
        .args(verify_image.then_some("--verify-image"))
        .arg("--clone-id")
        .arg(clone_id.to_string())
        .arg("--descriptor")
        .arg(dir.join("desc.bin"))
        .arg("--daemon-socket")
        .arg(dir.join("daemon.sock"))
        .arg("--out-json")
        .arg(dir.join("out.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_child(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the clone process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon's side of a clone's opening: answers a map request (if the clone sends one) with
/// `cache`'s memfd, then takes the handoff.
fn take_handoff(stream: &UnixStream, cache: &PageCache) -> (OwnedFd, Handoff) {
    loop {
        match recv_opening(stream, Duration::from_secs(20)).unwrap() {
            Opening::Map { session } => {
                assert_eq!(session.as_deref(), Some("s1"));
                send_map_reply(stream, cache.clone_fd().unwrap().as_fd(), cache.image_bytes()).unwrap();
            }
            Opening::Handoff(fd, handoff) => return (fd, handoff),
        }
    }
}

#[test]
fn clone_process_runs_from_a_descriptor_served_by_the_daemon_socket() {
    if !common::can_run("clone_process_runs_from_a_descriptor_served_by_the_daemon_socket") {
        return;
    }
    for private in [false, true] {
        run_served_clone(private);
    }
}

/// One clone process served from a cache holding the fork-time image: through the kernel from the
/// cache memfd it maps (no fault at all), or with every page copied in (`private`).
fn run_served_clone(private: bool) {
    let (desc, image, expected) = record_fork();
    let dir = Dir::new(if private { "clone-ok-private" } else { "clone-ok" });
    std::fs::write(dir.0.join("desc.bin"), desc.encode()).unwrap();
    let listener = UnixListener::bind(dir.0.join("daemon.sock")).unwrap();
    let mut child = spawn_clone_with(&dir.0, 2, true, private);
    let cache = Arc::new(PageCache::new(MEM).unwrap());
    for (page, bytes) in image.chunks_exact(4096).enumerate() {
        cache.insert(page as u64, bytes).unwrap();
    }

    // The daemon: accept, take the userfaultfd, serve from a cache holding the fork-time image.
    let (stream, _) = common::bounded(Duration::from_secs(20), "accept", move || listener.accept().unwrap());
    let (fd, handoff) = take_handoff(&stream, &cache);
    assert_eq!(handoff.message.shared_cache, !private);
    assert_eq!(handoff.message.clone_id, Some(2));
    assert_eq!(handoff.message.session.as_deref(), Some("s1"));
    assert_eq!(handoff.message.fork, Some(1));
    assert_eq!(handoff.message.regions.len(), 1);
    assert_eq!(handoff.message.regions[0].size, MEM);
    let mut server = FaultServer::from_handoff(fd, handoff, cache, ServerConfig::default()).unwrap();
    server.set_shared_cache(!private).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    let server_thread = std::thread::spawn(move || {
        let mut missing = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(40);
        while !server_stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            match server.step(Some(Duration::from_millis(50)), &mut missing).unwrap() {
                Status::Running => assert!(missing.is_empty(), "the cache holds every page"),
                Status::Stopped(_) => break,
            }
        }
        server.stats().clone()
    });

    // The report arrives on the handoff stream as one JSON line.
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    let report: ReportLine = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(report.kind, "report");
    assert_eq!(report.status, 0);
    let want: String = expected[1].to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(report.result_hex, want);

    let status = wait_child(&mut child, Duration::from_secs(30));
    stop.store(true, Ordering::SeqCst);
    let stats = server_thread.join().unwrap();
    assert!(status.success(), "clone exited with {status}");
    let out: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.0.join("out.json")).unwrap()).unwrap();
    assert_eq!(out["clone_id"], 2);
    assert_eq!(out["image_matches"], true, "{out}");
    assert_eq!(out["report"]["result_hex"], want);
    let t = |k: &str| out[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {out}"));
    assert!(t("start_unix_us") <= t("descriptor_loaded_unix_us"));
    assert!(t("descriptor_loaded_unix_us") <= t("handoff_unix_us"));
    assert!(t("handoff_unix_us") <= t("first_run_unix_us"));
    assert!(t("first_run_unix_us") <= t("exit_unix_us"));
    assert_eq!(t("prezeroed_pages"), desc.avoided_pages().page_count());
    assert_eq!(out["shared_cache"], !private, "{out}");
    if private {
        assert!(stats.faults > 0 && stats.pages_copied > 0, "{stats:?}");
    } else {
        // Every page is in the cache the clone maps: the kernel maps them all, no fault reaches us.
        assert_eq!((stats.faults, stats.pages_copied), (0, 0), "{stats:?}");
    }
    eprintln!(
        "clone process (private {private}): start->handoff {} µs, handoff->first run {} µs, run {} µs, {} faults",
        t("handoff_unix_us") - t("start_unix_us"),
        t("first_run_unix_us") - t("handoff_unix_us"),
        t("exit_unix_us") - t("first_run_unix_us"),
        stats.faults
    );
}

#[test]
fn clone_process_exits_when_the_daemon_hangs_up() {
    if !common::can_run("clone_process_exits_when_the_daemon_hangs_up") {
        return;
    }
    let (desc, _, _) = record_fork();
    // Without --verify-image the vCPU is what waits for a page; with it, the VMM's own hashing thread.
    for verify_image in [false, true] {
        let dir = Dir::new(if verify_image { "hangup-verify" } else { "hangup" });
        std::fs::write(dir.0.join("desc.bin"), desc.encode()).unwrap();
        let listener = UnixListener::bind(dir.0.join("daemon.sock")).unwrap();
        let mut child = spawn_clone(&dir.0, 1, verify_image);
        let (stream, _) = common::bounded(Duration::from_secs(20), "accept", move || listener.accept().unwrap());
        // An empty cache: every page the clone touches faults to us, and we never answer.
        let (fd, _) = take_handoff(&stream, &PageCache::new(MEM).unwrap());
        // The daemon dies: its userfaultfd and its end of the socket close, nothing is served.
        drop(fd);
        drop(stream);
        let started = Instant::now();
        let status = wait_child(&mut child, Duration::from_secs(20));
        assert_eq!(status.code(), Some(3), "clone (verify_image {verify_image}) exited with {status}");
        let out: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.0.join("out.json")).unwrap()).unwrap();
        let err = out["error"].as_str().unwrap_or_default();
        assert!(err.contains("memory handler is gone"), "{out}");
        eprintln!(
            "clone (verify_image {verify_image}) stopped {} ms after the daemon hung up",
            started.elapsed().as_millis()
        );
    }
}
