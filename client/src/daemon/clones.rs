//! Clone connections: the daemon's Unix socket and one thread per clone.
//!
//! A clone (a VMM, or `spindrift-client touch`) connects and hands over its userfaultfd with its
//! memory regions ([`crate::handoff`]). The clone's thread finds the session's page cache (waiting a
//! bounded time for a session to be announced), runs a [`FaultServer`] on it, and passes the pages the
//! cache lacks to the network thread. A second thread reads what the clone sends afterwards:
//! newline-terminated JSON lines, of which one kind is defined,
//!
//! ```text
//! {"type":"report","status":<u32>,"result_hex":"<hex>"}
//! ```
//!
//! passed to the protocol as the clone's Report (keyed by the handoff's `fork` and `clone_id`). Bad
//! lines are counted and logged. A refused handoff gets one line back,
//! `{"type":"error","message":"..."}`, and the connection is closed.
//!
//! A spindrift-format clone keeps the connection open while it runs: when it closes it, the fault
//! server stops. Firecracker does not promise that, so for its format only the clone's exit (its
//! pidfd) stops the server.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use spindrift_protocol::wire::MAX_REPORT_RESULT;

use super::net::{NetCommand, NetHandle};
use super::registry::Registry;
use super::stats::DaemonStats;
use crate::fault_server::{FaultServer, ServerConfig, ServerHandle, Status, StopReason};
use crate::handoff::{recv_opening, send_map_reply, HandoffFormat, Opening};
use crate::waker::Waker;

/// Longest line a clone may send.
const MAX_LINE: usize = 64 * 1024;
/// How long the listener waits for clone threads at shutdown.
const JOIN_GRACE: Duration = Duration::from_secs(3);

/// Errors setting up the clone socket.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// Something that is not a socket is in the way.
    #[error("--socket {0}: the path exists and is not a Unix socket; refusing to remove it")]
    NotASocket(PathBuf),
    /// Another daemon answers on the socket.
    #[error("--socket {0}: another daemon is listening there")]
    InUse(PathBuf),
    /// Binding or configuring failed.
    #[error("--socket {path}: {op}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

/// The listening socket; removes its file when dropped.
pub(crate) struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Binds `path`, removing a stale socket file left by an earlier daemon.
    pub(crate) fn bind(path: &Path) -> Result<Listener, CloneError> {
        let io = |op, source| CloneError::Io { path: path.to_path_buf(), op, source };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(CloneError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(CloneError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(|e| io("removing the stale socket", e))?;
            tracing::info!("removed a stale socket at {}", path.display());
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("creating its directory", e))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| io("bind", e))?;
        listener.set_nonblocking(true).map_err(|e| io("setting O_NONBLOCK", e))?;
        Ok(Listener { listener, path: path.to_path_buf() })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How clone connections are handled.
#[derive(Debug, Clone)]
pub(crate) struct CloneSettings {
    /// How long a handoff waits for its session to be announced.
    pub(crate) session_wait: Duration,
    /// How long a connection may take to deliver its handoff.
    pub(crate) handoff_timeout: Duration,
}

/// What every clone thread shares.
pub(crate) struct CloneContext {
    pub(crate) settings: CloneSettings,
    pub(crate) registry: Arc<Registry>,
    pub(crate) net: NetHandle,
    pub(crate) stats: Arc<DaemonStats>,
}

/// Accepts clone connections until `stop` is set (and `waker` woken), then waits a bounded time for
/// the clone threads to finish.
pub(crate) fn run_listener(listener: Listener, ctx: Arc<CloneContext>, waker: Arc<Waker>, stop: Arc<AtomicBool>) {
    let next_conn = AtomicU64::new(1);
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let fds = [(listener.listener.as_fd(), libc::POLLIN), (waker.as_fd(), libc::POLLIN)];
        let mut revents = [0i16; 2];
        if let Err(e) = crate::waker::poll(&fds, &mut revents, Some(Duration::from_millis(500))) {
            tracing::error!("waiting for clone connections: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        waker.take();
        loop {
            match listener.listener.accept() {
                Ok((stream, _)) => {
                    let conn = next_conn.fetch_add(1, Ordering::Relaxed);
                    let ctx = ctx.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("clone-{conn}"))
                        .spawn(move || serve_clone(&ctx, stream, conn));
                    match spawned {
                        Ok(t) => threads.push(t),
                        Err(e) => tracing::error!("connection {conn}: cannot start its thread: {e}"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!("accepting a clone connection: {e}");
                    break;
                }
            }
        }
        threads.retain(|t| !t.is_finished());
    }
    let deadline = Instant::now() + JOIN_GRACE;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = threads.iter().filter(|t| !t.is_finished()).count();
    if left > 0 {
        tracing::warn!("{left} clone threads still busy at shutdown");
    }
    drop(listener);
}

/// Best-effort error line to a refused clone.
fn reply_error(stream: &UnixStream, message: &str) {
    let line = serde_json::json!({ "type": "error", "message": message });
    let _ = writeln!(&*stream, "{line}");
}

fn format_name(format: HandoffFormat) -> &'static str {
    match format {
        HandoffFormat::Firecracker => "firecracker",
        HandoffFormat::Spindrift => "spindrift",
    }
}

/// One clone: handoff, session look-up, fault server until the clone goes.
fn serve_clone(ctx: &CloneContext, stream: UnixStream, conn: u64) {
    let refuse = |message: String| {
        DaemonStats::bump(&ctx.stats.counters.handoffs_refused);
        tracing::warn!("connection {conn}: handoff refused: {message}");
        reply_error(&stream, &message);
    };
    let parse_session = |named: Option<&str>| match named.map(|s| (s, s.trim().parse::<u64>())) {
        None => Ok(None),
        Some((_, Ok(id))) => Ok(Some(id)),
        Some((s, Err(_))) => Err(format!("session {s:?} is not a decimal session id")),
    };
    // A shared-cache clone asks for the cache memfd first, then hands over on the same connection.
    let mut mapped: Option<(u64, Arc<crate::cache::PageCache>)> = None;
    let (fd, handoff) = loop {
        match recv_opening(&stream, ctx.settings.handoff_timeout) {
            Ok(Opening::Handoff(fd, handoff)) => break (fd, handoff),
            Ok(Opening::Map { .. }) if mapped.is_some() => return refuse("a second map request".to_string()),
            Ok(Opening::Map { session }) => {
                let wanted = match parse_session(session.as_deref()) {
                    Ok(w) => w,
                    Err(e) => return refuse(e),
                };
                let (session, cache) = match ctx.registry.wait_for(wanted, ctx.settings.session_wait) {
                    Ok(x) => x,
                    Err(e) => return refuse(e.to_string()),
                };
                let sent = cache
                    .clone_fd()
                    .map_err(|e| format!("cannot open the cache memfd read-only: {e}"))
                    .and_then(|fd| send_map_reply(&stream, fd.as_fd(), cache.image_bytes()).map_err(|e| e.to_string()));
                if let Err(e) = sent {
                    return refuse(e);
                }
                mapped = Some((session, cache));
            }
            Err(e) => return refuse(e.to_string()),
        }
    };
    let format = handoff.format;
    let wanted = match parse_session(handoff.message.session.as_deref()) {
        Ok(w) => w,
        Err(e) => return refuse(e),
    };
    let shared_cache = handoff.message.shared_cache;
    let (session, cache) = match (shared_cache, mapped) {
        (true, Some((session, cache))) if wanted.is_none_or(|w| w == session) => (session, cache),
        (true, Some((session, _))) => {
            return refuse(format!("the handoff names session {wanted:?}, but the cache mapped is session {session}'s"))
        }
        (true, None) => return refuse("shared_cache without a map request on this connection".to_string()),
        (false, _) => match ctx.registry.wait_for(wanted, ctx.settings.session_wait) {
            Ok(x) => x,
            Err(e) => return refuse(e.to_string()),
        },
    };
    let (clone_id, fork) = (handoff.message.clone_id, handoff.message.fork);
    let pid = handoff.peer.map(|p| p.pid);
    let regions = handoff.message.regions.len();
    let mut server = match FaultServer::from_handoff(fd, handoff, cache, ServerConfig::default())
        .and_then(|mut s| s.set_shared_cache(shared_cache).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => return refuse(e.to_string()),
    };
    server.set_observer(ctx.stats.clone_started(conn, session, clone_id, fork, pid, format_name(format)));
    let handle = server.handle();
    ctx.registry.attach(session, conn, handle.clone());
    DaemonStats::bump(&ctx.stats.counters.handoffs_accepted);
    tracing::info!(
        "connection {conn}: serving clone {} (pid {}) of session {session}, {regions} regions, {} format{}",
        clone_id.map_or("-".to_string(), |c| c.to_string()),
        pid.map_or("?".to_string(), |p| p.to_string()),
        format_name(format),
        if shared_cache { ", shared cache" } else { "" }
    );
    let key = clone_id.and_then(|c| u32::try_from(c).ok()).map(|c| (fork.unwrap_or(0), c));
    let lines = LineContext {
        net: ctx.net.clone(),
        stats: ctx.stats.clone(),
        session,
        conn,
        key,
        handle: handle.clone(),
        stop_on_close: format == HandoffFormat::Spindrift,
    };
    let reader = match stream.try_clone() {
        Ok(s) => std::thread::Builder::new().name(format!("lines-{conn}")).spawn(move || read_lines(s, &lines)).ok(),
        Err(e) => {
            tracing::warn!("connection {conn}: cannot read reports: {e}");
            None
        }
    };
    let why = run_server(&mut server, ctx, session, conn);
    ctx.registry.detach(session, conn);
    ctx.stats.clone_finished(conn, &why, server.stats());
    tracing::info!("connection {conn}: fault server stopped ({why}): {:?}", server.stats());
    // Dropping the server fails (poisons) any fault still waiting.
    drop(server);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Some(r) = reader {
        let _ = r.join();
    }
}

/// Steps the fault server until it stops; returns why it stopped.
fn run_server(server: &mut FaultServer, ctx: &CloneContext, session: u64, conn: u64) -> String {
    let mut missing = Vec::new();
    loop {
        match server.step(Some(Duration::from_millis(500)), &mut missing) {
            Ok(Status::Running) => {
                if !missing.is_empty() {
                    let pages = std::mem::take(&mut missing);
                    if !ctx.net.send(NetCommand::Faults { session, pages }) {
                        tracing::error!("connection {conn}: the network thread is gone; failing the clone's faults");
                        if let Err(e) = server.fail("the daemon's network thread is gone") {
                            return format!("failing its faults failed: {e}");
                        }
                    }
                }
            }
            Ok(Status::Stopped(StopReason::CloneExited)) => return "clone exited".to_string(),
            Ok(Status::Stopped(StopReason::StopRequested)) => {
                return "stopped: connection closed or daemon stopping".to_string()
            }
            Err(e) => {
                tracing::error!("connection {conn}: fault server failed: {e}");
                return format!("fault server error: {e}");
            }
        }
    }
}

/// What the line reader of one clone needs.
struct LineContext {
    net: NetHandle,
    stats: Arc<DaemonStats>,
    session: u64,
    conn: u64,
    /// (fork, clone) of the clone's reports, if the handoff named a clone id that fits a u32.
    key: Option<(u32, u32)>,
    handle: ServerHandle,
    stop_on_close: bool,
}

/// A line a clone may send.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
enum CloneLine {
    /// The clone's result.
    Report {
        /// Exit status.
        status: u32,
        /// Result bytes, hex.
        #[serde(default)]
        result_hex: String,
    },
}

/// Parses one report line into (status, result bytes).
fn parse_report(line: &[u8]) -> Result<(u32, Vec<u8>), String> {
    let CloneLine::Report { status, result_hex } =
        serde_json::from_slice::<CloneLine>(line).map_err(|e| format!("not a report line: {e}"))?;
    let result = decode_hex(result_hex.trim())?;
    if result.len() > MAX_REPORT_RESULT {
        return Err(format!("result of {} bytes exceeds the protocol's {MAX_REPORT_RESULT}", result.len()));
    }
    Ok((status, result))
}

fn decode_hex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err(format!("result_hex has an odd number of digits ({})", text.len()));
    }
    (0..text.len() / 2)
        .map(|i| {
            let pair = text.get(2 * i..2 * i + 2).ok_or("result_hex is not ASCII")?;
            u8::from_str_radix(pair, 16).map_err(|_| format!("result_hex: {pair:?} is not hex"))
        })
        .collect()
}

/// Reads report lines until the clone closes the connection (or it is shut down).
fn read_lines(stream: UnixStream, ctx: &LineContext) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("connection {}: reading lines: {e}", ctx.conn);
                break;
            }
        }
        if line.len() > MAX_LINE && line.last() != Some(&b'\n') {
            bad_line(ctx, &format!("line longer than {MAX_LINE} bytes"));
            if !skip_to_newline(&mut reader) {
                break;
            }
            continue;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        handle_line(ctx, &line);
    }
    if ctx.stop_on_close {
        ctx.handle.stop();
    }
}

fn skip_to_newline(reader: &mut BufReader<UnixStream>) -> bool {
    let mut scrap = Vec::new();
    loop {
        scrap.clear();
        match reader.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut scrap) {
            Ok(0) | Err(_) => return false,
            Ok(_) if scrap.last() == Some(&b'\n') => return true,
            Ok(_) => {}
        }
    }
}

fn bad_line(ctx: &LineContext, why: &str) {
    DaemonStats::bump(&ctx.stats.counters.bad_lines);
    tracing::warn!("connection {}: bad line from the clone: {why}", ctx.conn);
}

fn handle_line(ctx: &LineContext, line: &[u8]) {
    let (status, result) = match parse_report(line) {
        Ok(r) => r,
        Err(why) => return bad_line(ctx, &why),
    };
    let Some((fork, clone)) = ctx.key else {
        return bad_line(ctx, "a report from a clone whose handoff named no clone_id (or one past 2^32)");
    };
    DaemonStats::bump(&ctx.stats.counters.report_lines);
    ctx.net.send(NetCommand::Report { session: ctx.session, fork, clone, status, result });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_parse_and_bad_ones_say_why() {
        assert_eq!(parse_report(br#"{"type":"report","status":3,"result_hex":"00ff10"}"#), Ok((3, vec![0, 255, 16])));
        assert_eq!(parse_report(br#"{"type":"report","status":0}"#), Ok((0, vec![])));
        assert!(parse_report(br#"{"type":"report","status":-1}"#).unwrap_err().contains("not a report line"));
        assert!(parse_report(br#"{"type":"hello"}"#).is_err());
        assert!(parse_report(b"garbage").is_err());
        assert!(parse_report(br#"{"type":"report","status":1,"result_hex":"abc"}"#).unwrap_err().contains("odd"));
        assert!(parse_report(br#"{"type":"report","status":1,"result_hex":"zz"}"#).unwrap_err().contains("not hex"));
        let long = format!(r#"{{"type":"report","status":1,"result_hex":"{}"}}"#, "ab".repeat(MAX_REPORT_RESULT + 1));
        assert!(parse_report(long.as_bytes()).unwrap_err().contains("exceeds"));
    }
}
