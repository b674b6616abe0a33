//! A real clone process: this test binary re-runs itself as a "VMM" child (test `child_vmm`, which
//! does nothing unless `SPINDRIFT_CHILD_SOCKET` is set). The child creates a userfaultfd, registers its
//! memory, connects to the daemon socket, hands the userfaultfd over and touches its pages. The
//! parent serves it and checks how the server learns that the clone is gone, and that a failed
//! server makes the clone fail visibly (SIGBUS) instead of hanging.

// `is_multiple_of` is newer than the workspace MSRV (1.85).
#![allow(clippy::unwrap_used, clippy::manual_is_multiple_of, missing_docs)]

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use spindrift_client::uffd::FEATURE_EVENT_REMOVE;
use spindrift_client::{
    recv_uffd, send_handoff, FaultServer, HandoffMessage, PageCache, ServerConfig, Status, StopReason,
};

const PAGES: u64 = 256;
const MISSING_PAGE: u64 = 77;

fn child_expected(page: u64) -> Vec<u8> {
    expected(page, |p| p % 3 == 0)
}

/// The child side. Exit codes: 0 all pages verified; 2 setup failed; 3 wrong bytes; 4 survived a
/// fault that should have killed it.
#[test]
fn child_vmm() {
    let (Ok(path), Ok(mode)) = (std::env::var("SPINDRIFT_CHILD_SOCKET"), std::env::var("SPINDRIFT_CHILD_MODE")) else {
        return; // Only meaningful when spawned by the tests below.
    };
    let setup = || -> Result<(spindrift_client::uffd::Uffd, Mapping, UnixStream), String> {
        let uffd = spindrift_client::uffd::Uffd::create(FEATURE_EVENT_REMOVE).map_err(|e| e.to_string())?;
        let mem = register(&uffd, (PAGES * PAGE as u64) as usize);
        let stream = UnixStream::connect(&path).map_err(|e| e.to_string())?;
        let message = HandoffMessage {
            regions: vec![region(mem.addr, PAGES * PAGE as u64, 0)],
            clone_id: Some(u64::from(std::process::id())),
            ..HandoffMessage::default()
        };
        send_handoff(&stream, uffd.as_fd(), &message).map_err(|e| e.to_string())?;
        Ok((uffd, mem, stream))
    };
    let (_uffd, mem, _stream) = match setup() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("child setup failed: {e}");
            std::process::exit(2);
        }
    };
    let code = match mode.as_str() {
        "touch_all" => match touch_and_check(mem.addr, (0..PAGES).collect(), child_expected) {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("child: {e}");
                3
            }
        },
        "touch_missing" => {
            let _ = read_page(mem.addr + MISSING_PAGE * PAGE as u64);
            4
        }
        "touch_present_then_missing" => {
            match touch_and_check(mem.addr, (0..PAGES).filter(|&p| p != MISSING_PAGE).collect(), child_expected) {
                Ok(_) => {
                    let _ = read_page(mem.addr + MISSING_PAGE * PAGE as u64);
                    4
                }
                Err(e) => {
                    eprintln!("child: {e}");
                    3
                }
            }
        }
        other => {
            eprintln!("child: unknown mode {other}");
            2
        }
    };
    std::process::exit(code);
}

/// A spawned child VMM, killed if the test fails before it exits.
struct ChildVmm {
    child: Child,
    _socket: PathBuf,
}

impl Drop for ChildVmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self._socket);
    }
}

/// Starts a child in `mode`, accepts its connection and receives its userfaultfd into a server.
fn spawn_and_serve(mode: &str, cache: Arc<PageCache>) -> (ChildVmm, FaultServer) {
    let socket = std::env::temp_dir().join(format!("spindrift-client-test-{}-{mode}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_vmm", "--nocapture", "--test-threads=1"])
        .env("SPINDRIFT_CHILD_SOCKET", &socket)
        .env("SPINDRIFT_CHILD_MODE", mode)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let vmm = ChildVmm { child, _socket: socket };
    let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for a listener we hold; the kernel writes only `revents`.
    let ready = unsafe { libc::poll(&mut pfd, 1, DEADLINE.as_millis() as i32) };
    assert_eq!(ready, 1, "the child VMM never connected");
    let (stream, _) = listener.accept().unwrap();
    let (fd, handoff) = recv_uffd(&stream).unwrap();
    assert_eq!(handoff.message.clone_id, Some(u64::from(vmm.child.id())));
    assert_eq!(handoff.peer.map(|p| p.pid as u32), Some(vmm.child.id()));
    assert!(handoff.peer_pidfd.is_some(), "no pidfd for the child: the server could not see it exit");
    let server = FaultServer::from_handoff(fd, handoff, cache, ServerConfig::default()).unwrap();
    (vmm, server)
}

/// Steps `server` until it stops; `on_missing` sees each batch of missing pages.
fn serve_until_stopped(server: &mut FaultServer, mut on_missing: impl FnMut(&mut FaultServer, &[u64])) -> StopReason {
    let deadline = Instant::now() + DEADLINE;
    let mut missing = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "the server did not stop in time: {:?}", server.stats());
        missing.clear();
        match server.step(Some(Duration::from_millis(100)), &mut missing).unwrap() {
            Status::Stopped(reason) => return reason,
            Status::Running if !missing.is_empty() => on_missing(server, &missing),
            Status::Running => {}
        }
    }
}

#[test]
fn clone_exit_is_noticed_through_its_pidfd() {
    if uffd_or_skip("clone_exit_is_noticed_through_its_pidfd", 0).is_none() {
        return;
    }
    let cache = Arc::new(PageCache::new(PAGES * PAGE as u64).unwrap());
    fill_cache(&cache, |p| p % 3 == 0, |_| false);
    let (mut vmm, mut server) = spawn_and_serve("touch_all", cache);
    let reason =
        serve_until_stopped(&mut server, |_, pages| panic!("nothing is missing, yet {pages:?} were asked for"));
    assert_eq!(reason, StopReason::CloneExited);
    let status = vmm.child.wait().unwrap();
    assert!(status.success(), "child VMM failed: {status:?}");
    let stats = server.stats();
    assert_eq!(stats.pages_copied + stats.pages_zeroed, PAGES, "{stats:?}");
}

#[test]
fn a_failed_server_poisons_the_waiting_fault_and_the_clone_gets_sigbus() {
    if uffd_or_skip("a_failed_server_poisons_the_waiting_fault_and_the_clone_gets_sigbus", 0).is_none() {
        return;
    }
    let cache = Arc::new(PageCache::new(PAGES * PAGE as u64).unwrap());
    fill_cache(&cache, |p| p % 3 == 0, |p| p == MISSING_PAGE);
    let (mut vmm, mut server) = spawn_and_serve("touch_missing", cache);
    let mut asked = Vec::new();
    let reason = serve_until_stopped(&mut server, |server, pages| {
        asked.extend_from_slice(pages);
        // The "network" gives up on the page: fail the clone rather than leave it blocked.
        server.fail("test: fetch of page 77 abandoned").unwrap();
    });
    assert_eq!(asked, vec![MISSING_PAGE]);
    assert_eq!(reason, StopReason::CloneExited);
    let status = vmm.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGBUS), "child VMM should die of SIGBUS: {status:?}");
    assert_eq!(server.stats().poisoned, 1, "{:?}", server.stats());
}

/// A session that failed (its memory server lost) still serves what the host has: pages in the
/// cache are installed; only a fault that would wait for the network gets SIGBUS.
#[test]
fn a_failed_server_still_serves_cached_pages_and_poisons_only_missing_ones() {
    if uffd_or_skip("a_failed_server_still_serves_cached_pages_and_poisons_only_missing_ones", 0).is_none() {
        return;
    }
    let cache = Arc::new(PageCache::new(PAGES * PAGE as u64).unwrap());
    fill_cache(&cache, |p| p % 3 == 0, |p| p == MISSING_PAGE);
    let (mut vmm, mut server) = spawn_and_serve("touch_present_then_missing", cache);
    server.fail("test: the memory server is gone").unwrap();
    let mut asked = Vec::new();
    let reason = serve_until_stopped(&mut server, |_, pages| asked.extend_from_slice(pages));
    assert_eq!(reason, StopReason::CloneExited);
    let status = vmm.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGBUS), "the child should die at the missing page: {status:?}");
    let stats = server.stats();
    assert_eq!(stats.pages_copied + stats.pages_zeroed, PAGES - 1, "cached pages are still served: {stats:?}");
    assert_eq!(stats.poisoned, 1, "{stats:?}");
    assert!(asked.is_empty(), "a failed session asks the network for nothing: {asked:?}");
}
