//! Guest memory handed over by a local VMM on a Unix socket (`spindrift-server --image-socket PATH`).
//!
//! # The contract
//!
//! The server listens on a stream Unix socket at PATH (mode 0600: only its user may connect). A VMM
//! connects and sends **one message**: a JSON header ending in a newline, with the memfd that holds
//! guest memory attached as `SCM_RIGHTS` (exactly one descriptor):
//!
//! ```json
//! {"bytes": 67108864, "offset": 0, "session": 7, "epoch": 42, "hints": [0, 1, 2], "end_on_close": true}
//! ```
//!
//! | key | meaning |
//! |---|---|
//! | `bytes` | required: the image's length, a non-zero multiple of 4096 |
//! | `offset` | where the image starts in the memfd, a multiple of the system page size (default 0) |
//! | `session` | the session id to serve under (default: `--session`) |
//! | `epoch` | the server epoch (default: `--epoch`, i.e. the clock) |
//! | `hints` | pages to push first, in this order (a recorded working set) |
//! | `end_on_close` | end the session when the VMM closes its end of the connection (default false) |
//!
//! The memfd **must be sealed** with `F_SEAL_WRITE` and `F_SEAL_SHRINK` (`F_SEAL_GROW` and
//! `F_SEAL_SEAL` are welcome). The server maps it `PROT_READ`/`MAP_PRIVATE` and trusts its bytes
//! never to change: a page that changed between two transmissions would reach hosts as two
//! different versions, and parity computed over one would rebuild garbage from the other; a file
//! truncated under the mapping would kill the server with SIGBUS. Seals make both impossible, which
//! is why an unsealed or only `F_SEAL_FUTURE_WRITE`-sealed memfd (writable shared mappings made
//! before the seal still write) is refused rather than trusted. A VMM whose guest memory is a
//! writable shared mapping of the memfd cannot add `F_SEAL_WRITE` while that mapping exists; it
//! hands over a copy (or a sealed snapshot memfd), or embeds the server after `fork()` and calls
//! [`crate::serve_source`] on its copy-on-write view instead.
//!
//! The server answers with one JSON line: `{"ok":true,"pages":N,"session":S,"epoch":E}`, or
//! `{"ok":false,"error":"..."}` after which it waits for another VMM. After a successful handover the
//! socket file is removed (one server serves one image), and the connection carries the session's
//! events to the VMM as JSON lines, dropped rather than waited for if the VMM does not read them:
//! `{"event":"joined","node":N}`, `{"event":"lost","node":N}`, `{"event":"complete","node":N}`,
//! `{"event":"clone_report","node":N,"fork":F,"clone":C,"status":S,"result_len":L}`.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use spindrift_protocol::sender::{PageSource, PushPolicy, SenderEvent};
use spindrift_protocol::wire::EndReason;

use crate::config::{pages_for_len, ConfigError, Push, ServerConfig};
use crate::image::PAGE_SIZE;
use crate::server::{ServeCommand, ServeOptions};
use crate::sys::{self, ReadOnlyMap};

/// Longest header accepted.
const MAX_HEADER: usize = 64 << 10;
/// How long a connected VMM has to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(50);

/// Why no memory could be taken over.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The socket could not be set up.
    #[error("--image-socket {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The system's error.
        source: std::io::Error,
    },
    /// Something that is not a socket is in the way.
    #[error("--image-socket {0}: exists and is not a socket (refusing to remove it)")]
    NotASocket(PathBuf),
    /// The server was stopped before a VMM handed memory over.
    #[error("stopped while waiting for a VMM on --image-socket {0}")]
    Stopped(PathBuf),
    /// A connection's handover was refused (the VMM is told why; the server waits for another).
    #[error("{0}")]
    Refused(String),
}

/// The header a VMM sends (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The image's length in bytes.
    pub bytes: u64,
    /// Where the image starts in the memfd.
    #[serde(default)]
    pub offset: u64,
    /// The session id to serve under.
    #[serde(default)]
    pub session: Option<u64>,
    /// The epoch to serve under.
    #[serde(default)]
    pub epoch: Option<u32>,
    /// Pages to push first.
    #[serde(default)]
    pub hints: Vec<u32>,
    /// End the session when the VMM closes the connection.
    #[serde(default)]
    pub end_on_close: bool,
}

/// Guest memory mapped from a handed-over memfd.
#[derive(Debug)]
pub struct MemfdImage {
    map: ReadOnlyMap,
    pages: u32,
}

impl MemfdImage {
    /// Maps `bytes` of `fd` from `offset` after checking its seals and size (see the module docs).
    pub fn map(fd: &OwnedFd, offset: u64, bytes: u64) -> Result<MemfdImage, String> {
        let pages = pages_for_len(bytes).map_err(|why| format!("bytes {bytes} {why}"))?;
        let seals = sys::seals(fd.as_fd())
            .map_err(|e| format!("the descriptor is not a sealable memfd ({e}); hand over a sealed memfd"))?;
        let need = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK;
        if seals & need != need {
            return Err(format!(
                "the memfd is not sealed against writing and shrinking (seals {seals:#x}, need F_SEAL_WRITE | \
                 F_SEAL_SHRINK = {need:#x}): the image must not change while it is served"
            ));
        }
        if !offset.is_multiple_of(sys::page_size() as u64) {
            return Err(format!("offset {offset} is not a multiple of the {}-byte system page size", sys::page_size()));
        }
        let size = std::fs::File::from(fd.try_clone().map_err(|e| format!("duplicating the memfd: {e}"))?)
            .metadata()
            .map_err(|e| format!("fstat of the memfd: {e}"))?
            .len();
        let end = offset.checked_add(bytes).ok_or_else(|| "offset + bytes overflows".to_string())?;
        if end > size {
            return Err(format!("offset {offset} + bytes {bytes} is past the memfd's {size} bytes"));
        }
        let len = usize::try_from(bytes).map_err(|_| format!("bytes {bytes} does not fit this machine"))?;
        // SAFETY: the memfd is sealed against writing and shrinking (checked above; seals cannot be
        // removed), and `offset + len` lies within its size, so the mapped bytes never change and
        // never disappear while the mapping lives.
        let map =
            unsafe { ReadOnlyMap::new(fd.as_fd(), offset, len) }.map_err(|e| format!("mmap of the memfd: {e}"))?;
        Ok(MemfdImage { map, pages })
    }

    /// The whole image.
    pub fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }
}

impl PageSource for MemfdImage {
    fn page_count(&self) -> u32 {
        self.pages
    }

    fn page(&self, page: u32) -> &[u8] {
        let start = page as usize * PAGE_SIZE;
        &self.map.bytes()[start..start + PAGE_SIZE]
    }
}

/// Memory a VMM handed over, with its header and the connection it came on.
#[derive(Debug)]
pub struct Handed {
    /// The image.
    pub image: MemfdImage,
    /// The VMM's header.
    pub header: Header,
    /// The connection (events go back on it).
    pub conn: UnixStream,
}

impl Handed {
    /// `config` with the header's session and epoch, and the options that push the header's hints,
    /// send events to the VMM and (with `end_on_close`) end the session when the VMM hangs up.
    pub fn session(&self, config: &ServerConfig) -> Result<(ServerConfig, ServeOptions), ConfigError> {
        let mut config = config.clone();
        if let Some(s) = self.header.session {
            config.session = s;
        }
        if let Some(e) = self.header.epoch {
            config = config.with_epoch(e)?;
        }
        let mut options = ServeOptions::default();
        if !self.header.hints.is_empty() {
            let hints = self.header.hints.clone();
            options.push = Some(match config.push {
                Push::All => PushPolicy::HintsThenAll(hints),
                Push::None => PushPolicy::Hints(hints),
            });
        }
        if let Ok(events) = self.conn.try_clone() {
            options.on_event = Some(Box::new(EventWriter { conn: events, dropped: 0 }.into_fn()));
        }
        if self.header.end_on_close {
            if let Ok(mut watch) = self.conn.try_clone() {
                let (tx, rx) = mpsc::channel();
                options.commands = Some(rx);
                let spawned = std::thread::Builder::new().name("vmm-watch".into()).spawn(move || {
                    let mut buf = [0u8; 256];
                    // Anything the VMM sends is ignored; EOF or an error means it hung up.
                    while matches!(watch.read(&mut buf), Ok(n) if n > 0) {}
                    tracing::info!("the VMM closed the image socket connection: ending the session");
                    tx.send(ServeCommand::End(EndReason::Complete)).ok();
                });
                if let Err(e) = spawned {
                    tracing::warn!("cannot watch the VMM connection ({e}); end_on_close is ignored");
                }
            }
        }
        Ok((config, options))
    }
}

/// Writes events to the VMM without ever blocking the server.
struct EventWriter {
    conn: UnixStream,
    dropped: u64,
}

impl EventWriter {
    fn into_fn(mut self) -> impl FnMut(&SenderEvent) + Send {
        move |ev| {
            let line = match ev {
                SenderEvent::ReceiverJoined(n) => serde_json::json!({"event": "joined", "node": n.0}),
                SenderEvent::ReceiverLost(n) => serde_json::json!({"event": "lost", "node": n.0}),
                SenderEvent::ReceiverComplete(n) => serde_json::json!({"event": "complete", "node": n.0}),
                SenderEvent::CloneReport { node, fork, clone, status, result } => serde_json::json!({
                    "event": "clone_report", "node": node.0, "fork": fork, "clone": clone, "status": status,
                    "result_len": result.len()
                }),
            };
            let mut bytes = line.to_string().into_bytes();
            bytes.push(b'\n');
            // Never blocks the server: a full socket buffer drops the line (a partial line is
            // possible only if the buffer fills mid-line; the VMM then sees one garbled line).
            match sys::send_nonblocking(&self.conn, &bytes) {
                Ok(n) if n == bytes.len() => {}
                Ok(_) | Err(_) => {
                    self.dropped += 1;
                    if self.dropped.is_power_of_two() {
                        tracing::debug!("{} events for the VMM dropped (it does not read them)", self.dropped);
                    }
                }
            }
        }
    }
}

/// Listens on `path` until a VMM hands over valid memory (or `stop` is set). Refused handovers are
/// answered with the reason and logged; the server keeps waiting.
pub fn receive(path: &Path, config: &ServerConfig, stop: &AtomicBool) -> Result<Handed, HandoverError> {
    let listen_err = |source| HandoverError::Listen { path: path.to_path_buf(), source };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(listen_err)?,
        Ok(_) => return Err(HandoverError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    let _cleanup = RemoveOnDrop(path);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    listener.set_nonblocking(true).map_err(listen_err)?;
    tracing::info!("waiting for a VMM to hand over guest memory on {}", path.display());
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(HandoverError::Stopped(path.to_path_buf()));
        }
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) => return Err(listen_err(e)),
        };
        match take(conn, config) {
            Ok(handed) => {
                tracing::info!(
                    "a VMM handed over {} bytes ({} pages) of guest memory",
                    handed.header.bytes,
                    handed.image.page_count()
                );
                return Ok(handed);
            }
            Err(e) => tracing::warn!("refused a handover on {}: {e}", path.display()),
        }
    }
}

/// Reads one handover from `conn`, answers it, and returns it if it was accepted.
fn take(mut conn: UnixStream, config: &ServerConfig) -> Result<Handed, HandoverError> {
    let result = read_handover(&conn);
    let reply = match &result {
        Ok((image, header)) => serde_json::json!({
            "ok": true,
            "pages": image.page_count(),
            "session": header.session.unwrap_or(config.session),
            "epoch": header.epoch.unwrap_or(config.epoch)
        }),
        Err(e) => serde_json::json!({"ok": false, "error": e}),
    };
    let mut line = reply.to_string().into_bytes();
    line.push(b'\n');
    if let Err(e) = conn.write_all(&line) {
        tracing::warn!("answering the VMM: {e}");
    }
    let (image, header) = result.map_err(HandoverError::Refused)?;
    conn.set_read_timeout(None).ok();
    Ok(Handed { image, header, conn })
}

fn read_handover(conn: &UnixStream) -> Result<(MemfdImage, Header), String> {
    conn.set_nonblocking(false).map_err(|e| format!("socket: {e}"))?;
    conn.set_read_timeout(Some(HEADER_TIMEOUT)).map_err(|e| format!("socket: {e}"))?;
    let mut buf = vec![0u8; MAX_HEADER];
    let (mut len, fds) = sys::recv_with_fds(conn, &mut buf).map_err(|e| format!("receiving the handover: {e}"))?;
    // The header may arrive in pieces after the first (which carried the descriptor).
    while !buf[..len].contains(&b'\n') {
        if len == buf.len() {
            return Err(format!("header longer than {MAX_HEADER} bytes"));
        }
        let mut reader = conn;
        match reader.read(&mut buf[len..]) {
            Ok(0) => return Err("the connection closed before the header's newline".into()),
            Ok(n) => len += n,
            Err(e) => return Err(format!("reading the header: {e}")),
        }
    }
    let end = buf[..len].iter().position(|&b| b == b'\n').unwrap_or(len);
    let header: Header =
        serde_json::from_slice(&buf[..end]).map_err(|e| format!("the header is not valid JSON for a handover: {e}"))?;
    if header.epoch == Some(0) {
        return Err("epoch 0 is reserved (receivers use 0 before they learn the epoch)".into());
    }
    let fd = match <[OwnedFd; 1]>::try_from(fds) {
        Ok([fd]) => fd,
        Err(fds) => return Err(format!("expected exactly one file descriptor (the memfd), got {}", fds.len())),
    };
    let image = MemfdImage::map(&fd, header.offset, header.bytes)?;
    Ok((image, header))
}

/// Removes the socket file when the handover is over (served or failed).
struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        std::fs::remove_file(self.0).ok();
    }
}

/// The VMM's side: connects to `path`, hands over `memfd` with `header`, and returns the server's
/// answer line and the connection (which then carries events; closing it ends the session when
/// `end_on_close` is set).
pub fn hand_over(path: &Path, memfd: &OwnedFd, header: &Header) -> std::io::Result<(serde_json::Value, UnixStream)> {
    let conn = UnixStream::connect(path)?;
    let mut line = serde_json::to_vec(header).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let sent = sys::send_with_fd(&conn, &line, memfd.as_fd())?;
    (&conn).write_all(&line[sent..])?;
    conn.set_read_timeout(Some(HEADER_TIMEOUT))?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.last() != Some(&b'\n') {
        match (&conn).read(&mut byte)? {
            0 => break,
            _ => answer.push(byte[0]),
        }
    }
    let value = serde_json::from_slice(&answer).map_err(std::io::Error::other)?;
    Ok((value, conn))
}

/// A sealed memfd holding `bytes` (see [`crate::sys::memfd_with`]).
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    sys::memfd_with(name, bytes, true)
}
