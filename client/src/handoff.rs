//! The userfaultfd handoff over a Unix socket: a VMM connects to the daemon and sends its userfaultfd
//! as `SCM_RIGHTS` ancillary data together with a JSON message describing the registered memory.
//!
//! Two message shapes are accepted:
//! * Firecracker's: a bare JSON array of regions,
//!   `[{"base_host_virt_addr": u64, "size": u64, "offset": u64, "page_size": u64}, ...]`
//!   (older Firecracker sends `"page_size_kib"` instead of `"page_size"`; both are read).
//! * spindrift's: an object,
//!   `{"regions": [...], "clone_id": u64, "session": "...", "snapshot": "...", "fork": u32}`
//!   (all but `regions` optional; unknown fields are ignored for forward compatibility). `session` is
//!   the protocol session id in decimal; `fork` and `clone_id` key the clone's reports.
//!
//! A clone that maps the host's cache itself (spindrift's shared cache) first sends
//! `{"type":"map","session":"..."}` without a descriptor; the daemon answers
//! `{"type":"map","image_bytes":N}` with a read-only descriptor of the session's cache memfd (or an
//! error line). The clone maps it `MAP_PRIVATE` as its memory, registers that with its userfaultfd, and
//! sends its handoff on the same connection with `"shared_cache": true`.
//!
//! The message is one JSON value; it may span several reads (the fd rides on the first) and anything
//! after it is ignored. The receiver bounds size ([`MAX_HANDOFF_BYTES`]) and time.
//!
//! Liveness: the receiver also takes the peer's credentials and, where the kernel has
//! `SO_PEERPIDFD` (6.5+), a pidfd of the VMM process, which the fault server polls to notice the clone
//! exiting (the userfaultfd itself says nothing when its process dies). A VMM that keeps the
//! connection open should also treat the daemon closing it as fatal and exit, not close its userfaultfd:
//! a released userfaultfd turns every page still missing into a silent zero page.

use std::io::{self, Write};
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::region::{validate_regions, Region, RegionError};
use crate::uffd::{check_userfaultfd, UffdError};

/// Largest handoff message accepted.
pub const MAX_HANDOFF_BYTES: usize = 1 << 20;
/// How long [`recv_uffd`] waits for a complete message.
pub const DEFAULT_RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// `SO_PEERPIDFD` (asm-generic; x86_64, aarch64, riscv64). Not in `libc` 0.2.191.
const SO_PEERPIDFD: libc::c_int = 77;
/// Most descriptors taken from one message (the rest would be truncated and reported).
const MAX_FDS: usize = 8;

/// spindrift's handoff message (Firecracker's is the bare `regions` array).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffMessage {
    /// The registered memory and where each range lives in the image.
    pub regions: Vec<Region>,
    /// Which clone this is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_id: Option<u64>,
    /// Protocol session the clone belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Which snapshot image (page cache) serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The fork (of the session's fork plans) this clone was started for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<u32>,
    /// The regions are `MAP_PRIVATE` views of the cache memfd this connection was given
    /// ([`recv_map_reply`]), each at file offset `offset`: pages the cache holds need no answer but
    /// a wake-up. Without it, every page is copied into the clone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_cache: bool,
}

/// What a clone sends first on its connection.
#[derive(Debug)]
pub enum Opening {
    /// `{"type":"map","session":"..."}`: the clone asks for the session's cache memfd, to map it
    /// before it registers its memory and sends its handoff on the same connection.
    Map {
        /// The session named (None: the only one there is).
        session: Option<String>,
    },
    /// The handoff itself (the userfaultfd and its message).
    Handoff(OwnedFd, Handoff),
}

/// The map request's shape.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum MapMessage {
    Map {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
}

/// The daemon's answer to a map request (with the memfd).
#[derive(Debug, Serialize, Deserialize)]
struct MapReply {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    image_bytes: u64,
    #[serde(default)]
    message: Option<String>,
}

/// Asks the daemon for the session's cache memfd (the first message of a shared-cache clone).
pub fn send_map_request(stream: &UnixStream, session: Option<&str>) -> Result<(), HandoffError> {
    let json =
        serde_json::to_vec(&MapMessage::Map { session: session.map(str::to_string) }).map_err(HandoffError::Encode)?;
    send_with_fd(stream, None, &json)
}

/// The daemon's side: sends the (read-only) cache memfd and the image size.
pub fn send_map_reply(stream: &UnixStream, memfd: BorrowedFd<'_>, image_bytes: u64) -> Result<(), HandoffError> {
    let reply = MapReply { kind: "map".into(), image_bytes, message: None };
    let mut json = serde_json::to_vec(&reply).map_err(HandoffError::Encode)?;
    json.push(b'\n');
    send_with_fd(stream, Some(memfd), &json)
}

/// The clone's side: waits for the cache memfd and the image size. A refusal (the daemon's error
/// line) comes back as [`HandoffError::Refused`].
pub fn recv_map_reply(stream: &UnixStream, timeout: Duration) -> Result<(OwnedFd, u64), HandoffError> {
    let (bytes, mut fds) = recv_json(stream, timeout)?;
    let reply: MapReply = serde_json::from_slice(&bytes).map_err(HandoffError::BadJson)?;
    if reply.kind != "map" {
        return Err(HandoffError::Refused(reply.message.unwrap_or_else(|| format!("a {:?} reply", reply.kind))));
    }
    match fds.len() {
        1 => Ok((fds.remove(0), reply.image_bytes)),
        0 => Err(HandoffError::NoFd),
        count => Err(HandoffError::TooManyFds { count }),
    }
}

/// Receives a clone's first message: a map request or its handoff (see [`recv_uffd_timeout`]).
pub fn recv_opening(stream: &UnixStream, timeout: Duration) -> Result<Opening, HandoffError> {
    let (bytes, fds) = recv_json(stream, timeout)?;
    if let Ok(MapMessage::Map { session }) = serde_json::from_slice::<MapMessage>(&bytes) {
        if !fds.is_empty() {
            return Err(HandoffError::TooManyFds { count: fds.len() });
        }
        return Ok(Opening::Map { session });
    }
    let (fd, handoff) = handoff_from(stream, &bytes, fds)?;
    Ok(Opening::Handoff(fd, handoff))
}

/// Which shape the message had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffFormat {
    /// Firecracker's bare array.
    Firecracker,
    /// spindrift's object.
    Spindrift,
}

/// Credentials of the process at the other end of the socket (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// A received handoff (the userfaultfd is returned beside it).
#[derive(Debug)]
pub struct Handoff {
    /// The message, with validated regions (Firecracker's array becomes `regions` with no ids).
    pub message: HandoffMessage,
    /// The shape it came in.
    pub format: HandoffFormat,
    /// The sender's credentials, if the socket reports them.
    pub peer: Option<PeerCred>,
    /// A pidfd for the sender's process (readable when it exits), if the kernel offers `SO_PEERPIDFD`.
    pub peer_pidfd: Option<OwnedFd>,
}

/// What went wrong in a handoff.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// A socket call failed.
    #[error("{op} on the handoff socket failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// No complete message in time.
    #[error("no complete handoff message within {waited:?} ({received} bytes received)")]
    Timeout {
        /// How long we waited.
        waited: Duration,
        /// Bytes received.
        received: usize,
    },
    /// The peer closed the connection early.
    #[error("the VMM closed the connection after {received} bytes, before a complete handoff message")]
    Closed {
        /// Bytes received.
        received: usize,
    },
    /// Too big.
    #[error("handoff message exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Not JSON, or JSON of the wrong shape.
    #[error("handoff message is not valid: {0}")]
    BadJson(serde_json::Error),
    /// Neither an array nor an object.
    #[error(
        "handoff message must be a JSON array of regions (Firecracker) or an object with \"regions\" \
         (spindrift), but starts with {found:?}"
    )]
    BadShape {
        /// The first character.
        found: char,
    },
    /// The regions failed validation.
    #[error("invalid memory regions in the handoff: {0}")]
    Regions(#[from] RegionError),
    /// No descriptor came with the message.
    #[error(
        "the handoff message carried no file descriptor: send the userfaultfd as SCM_RIGHTS ancillary data \
         with the message"
    )]
    NoFd,
    /// More than one descriptor came with the message.
    #[error("the handoff carried {count} file descriptors, expected exactly one (the userfaultfd)")]
    TooManyFds {
        /// How many.
        count: usize,
    },
    /// Ancillary data did not fit.
    #[error("ancillary data was truncated (more than {MAX_FDS} descriptors sent?)")]
    ControlTruncated,
    /// The descriptor is not a userfaultfd.
    #[error("the descriptor sent is not a usable userfaultfd")]
    NotUffd(#[source] UffdError),
    /// The daemon refused (its error line).
    #[error("the daemon refused: {0}")]
    Refused(String),
    /// The message could not be encoded.
    #[error("cannot encode the handoff message")]
    Encode(#[source] serde_json::Error),
}

/// Sends `uffd` with `regions` as Firecracker's bare JSON array.
pub fn send_uffd(stream: &UnixStream, uffd: BorrowedFd<'_>, regions: &[Region]) -> Result<(), HandoffError> {
    let json = serde_json::to_vec(regions).map_err(HandoffError::Encode)?;
    send_with_fd(stream, Some(uffd), &json)
}

/// Sends `uffd` with spindrift's message.
pub fn send_handoff(stream: &UnixStream, uffd: BorrowedFd<'_>, message: &HandoffMessage) -> Result<(), HandoffError> {
    let json = serde_json::to_vec(message).map_err(HandoffError::Encode)?;
    send_with_fd(stream, Some(uffd), &json)
}

/// Sends `bytes`, with `fd` (if any) as `SCM_RIGHTS` on the first segment.
pub fn send_with_fd(stream: &UnixStream, fd: Option<BorrowedFd<'_>>, bytes: &[u8]) -> Result<(), HandoffError> {
    let io_err = |source| HandoffError::Io { op: "sendmsg", source };
    let Some(fd) = fd else {
        return (&*stream).write_all(bytes).map_err(io_err);
    };
    let raw: RawFd = fd.as_raw_fd();
    let mut control = vec![0u64; 4]; // 32 bytes: room for CMSG_SPACE(4) = 24, 8-byte aligned.
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as _;
    // SAFETY: `msg.msg_control` points at `control` (32 zeroed, aligned bytes) and `msg_controllen`
    // (24) fits in it, so the first header and its 4 data bytes are in bounds; we write only there.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), raw);
    }
    let sent = loop {
        // SAFETY: `msg` points at `iov` (over `bytes`) and `control`, all alive for the call; the kernel
        // only reads them. `fd` stays open during the call (borrowed).
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(io_err(err));
        }
    };
    (&*stream).write_all(&bytes[sent..]).map_err(io_err)
}

/// Receives a userfaultfd and its handoff message, waiting at most [`DEFAULT_RECV_TIMEOUT`].
pub fn recv_uffd(stream: &UnixStream) -> Result<(OwnedFd, Handoff), HandoffError> {
    recv_uffd_timeout(stream, DEFAULT_RECV_TIMEOUT)
}

/// Receives a userfaultfd and its handoff message, waiting at most `timeout` for the whole message.
///
/// Checks, in order: a complete JSON value within the size limit, its shape and regions, exactly one
/// descriptor attached, and that the descriptor is a userfaultfd.
pub fn recv_uffd_timeout(stream: &UnixStream, timeout: Duration) -> Result<(OwnedFd, Handoff), HandoffError> {
    let (bytes, fds) = recv_json(stream, timeout)?;
    handoff_from(stream, &bytes, fds)
}

/// Checks a received handoff message and its descriptors.
fn handoff_from(stream: &UnixStream, bytes: &[u8], mut fds: Vec<OwnedFd>) -> Result<(OwnedFd, Handoff), HandoffError> {
    let (message, format) = parse_message(bytes)?;
    validate_regions(&message.regions)?;
    let uffd = match fds.len() {
        0 => return Err(HandoffError::NoFd),
        1 => fds.remove(0),
        count => return Err(HandoffError::TooManyFds { count }),
    };
    check_userfaultfd(uffd.as_fd()).map_err(HandoffError::NotUffd)?;
    let peer = peer_cred(stream);
    let peer_pidfd = peer_pidfd(stream);
    Ok((uffd, Handoff { message, format, peer, peer_pidfd }))
}

/// Receives one complete JSON value (within the size limit and `timeout`) and the descriptors that
/// came with it.
fn recv_json(stream: &UnixStream, timeout: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>), HandoffError> {
    let start = Instant::now();
    let mut buf = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let end = loop {
        if let Some(end) = json_end(&buf)? {
            break end;
        }
        if buf.len() > MAX_HANDOFF_BYTES {
            return Err(HandoffError::TooLarge { limit: MAX_HANDOFF_BYTES });
        }
        let left = timeout.saturating_sub(start.elapsed());
        let ready = crate::waker::poll(&[(stream.as_fd(), libc::POLLIN)], &mut [0], Some(left))
            .map_err(|source| HandoffError::Io { op: "poll", source })?;
        if ready == 0 {
            if left.is_zero() {
                return Err(HandoffError::Timeout { waited: timeout, received: buf.len() });
            }
            continue;
        }
        match recv_chunk(stream, &mut chunk, &mut fds)? {
            Some(0) => return Err(HandoffError::Closed { received: buf.len() }),
            Some(n) => buf.extend_from_slice(&chunk[..n]),
            None => continue,
        }
    };
    buf.truncate(end);
    Ok((buf, fds))
}

/// Parses a complete handoff message (either shape). Public for tests and other transports.
pub fn parse_message(bytes: &[u8]) -> Result<(HandoffMessage, HandoffFormat), HandoffError> {
    match bytes.iter().copied().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => {
            let regions = serde_json::from_slice(bytes).map_err(HandoffError::BadJson)?;
            Ok((HandoffMessage { regions, ..HandoffMessage::default() }, HandoffFormat::Firecracker))
        }
        Some(b'{') => Ok((serde_json::from_slice(bytes).map_err(HandoffError::BadJson)?, HandoffFormat::Spindrift)),
        Some(other) => Err(HandoffError::BadShape { found: char::from(other) }),
        None => Err(HandoffError::BadShape { found: ' ' }),
    }
}

/// Where the first JSON value in `buf` ends, or `None` if more bytes are needed.
fn json_end(buf: &[u8]) -> Result<Option<usize>, HandoffError> {
    if buf.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<serde::de::IgnoredAny>();
    match values.next() {
        Some(Ok(_)) => Ok(Some(values.byte_offset())),
        Some(Err(e)) if e.is_eof() => Ok(None),
        Some(Err(e)) => Err(HandoffError::BadJson(e)),
        None => Ok(None),
    }
}

/// One `recvmsg`: bytes into `chunk`, descriptors into `fds`. `None` if nothing was ready.
fn recv_chunk(stream: &UnixStream, chunk: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<Option<usize>, HandoffError> {
    let mut control = vec![0u64; 16]; // 128 bytes: room for CMSG_SPACE(4 * MAX_FDS) = 48.
    let mut iov = libc::iovec { iov_base: chunk.as_mut_ptr().cast(), iov_len: chunk.len() };
    // SAFETY: all-zero is a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE((size_of::<RawFd>() * MAX_FDS) as u32) } as _;
    // SAFETY: `msg` points at `iov` (over `chunk`) and `control`, both writable, alive for the call and
    // at least as large as the lengths given.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(HandoffError::Io { op: "recvmsg", source: err }),
        };
    }
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with well-formed cmsg headers;
    // CMSG_FIRSTHDR/NXTHDR stay within them, and each SCM_RIGHTS payload holds
    // `(cmsg_len - CMSG_LEN(0)) / 4` descriptors just installed in our table, which we take ownership
    // of exactly once here.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(HandoffError::ControlTruncated);
    }
    Ok(Some(n as usize))
}

fn peer_cred(stream: &UnixStream) -> Option<PeerCred> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes (one ucred) into `cred`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
}

fn peer_pidfd(stream: &UnixStream) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_PEERPIDFD writes one int (a new descriptor) into `fd`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel installed a new pidfd for us alone.
    (rc == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}
