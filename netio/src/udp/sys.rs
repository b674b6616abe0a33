//! The system calls of the UDP backend that `socket2` does not wrap: `recvmmsg`, `sendmmsg`
//! (optionally with UDP GSO), `poll` and integer `setsockopt`s. Every `unsafe` block of the crate
//! is in this file.
//!
//! [`Mmsg`] keeps the per-call descriptor arrays (`mmsghdr`, `iovec`, `sockaddr_in`, control
//! buffers), sized once for the backend's largest batch, so a call never allocates. The pointers in
//! them are rewritten at the start of every call to point into the batch borrowed for that call,
//! and are never read by Rust code after the call returns.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::batch::{RxBatch, TxBatch};
use crate::{Interest, Readiness};

/// Bytes of control buffer per received datagram: room for one `IP_PKTINFO` message
/// (`CMSG_SPACE(12)` = 32 on 64-bit Linux) with margin.
const CONTROL_LEN: usize = 64;

/// Most datagrams in one GSO send. The kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels and 128
/// on newer ones; 64 works on both.
const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO send: it travels as one IPv4 datagram until segmented.
const GSO_MAX_BYTES: usize = 65_507;

// SAFETY: CMSG_SPACE and CMSG_LEN are pure arithmetic on their argument (alignment rounding).
const GSO_CMSG_SPACE: usize = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
// SAFETY: as above.
const GSO_CMSG_LEN: usize = unsafe { libc::CMSG_LEN(size_of::<u16>() as u32) } as usize;
// SAFETY: as above.
const PKTINFO_CMSG_LEN: usize = unsafe { libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) } as usize;
const _: () = assert!(GSO_CMSG_SPACE <= CONTROL_LEN);

/// A send that failed on the first message of a `sendmmsg`.
#[derive(Debug)]
pub(crate) struct SendFailure {
    /// The system's error.
    pub(crate) error: io::Error,
    /// The segment size if that message was a GSO run of several datagrams (the error may then
    /// be GSO's own, e.g. segments longer than the path MTU allows).
    pub(crate) gso_segment: Option<usize>,
}

/// A control buffer aligned for `cmsghdr` (whose first field is a `size_t`).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// Reusable descriptor arrays for `recvmmsg`/`sendmmsg`.
pub(crate) struct Mmsg {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_in>,
    control: Vec<Control>,
    /// Per message of a send: index of its first `iovec` and number of datagrams.
    runs: Vec<(usize, usize)>,
}

// SAFETY: the raw pointers inside `hdrs` and `iovs` are only meaningful during one `recv`/`send`
// call, which takes `&mut self` and rewrites every pointer before the system call; outside a call
// they are stale values that nothing dereferences. Moving the arrays to another thread therefore
// cannot let two threads reach the memory they once pointed to.
unsafe impl Send for Mmsg {}

fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: `mmsghdr` is a plain C struct of integers and raw pointers (plus padding on some
    // libcs); the all-zero bit pattern is a valid value of it (null pointers, zero lengths).
    unsafe { std::mem::zeroed() }
}

fn zeroed_sockaddr_in() -> libc::sockaddr_in {
    // SAFETY: `sockaddr_in` is a plain C struct of integers; all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

fn to_sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    let mut sa = zeroed_sockaddr_in();
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = addr.port().to_be();
    sa.sin_addr.s_addr = u32::from(*addr.ip()).to_be();
    sa
}

fn from_sockaddr(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)), u16::from_be(sa.sin_port))
}

/// The header destination address from an `IP_PKTINFO` control message in `hdr`, if present.
fn pktinfo_destination(hdr: &libc::msghdr) -> Option<Ipv4Addr> {
    // SAFETY: `hdr` was filled by a successful `recvmmsg`: `msg_control` points to a live
    // `Control` buffer of `CONTROL_LEN` bytes (owned by `Mmsg`, not moved since the call) and
    // `msg_controllen` is the length the kernel wrote, at most `CONTROL_LEN`. CMSG_FIRSTHDR and
    // CMSG_NXTHDR only return headers lying entirely inside that range (or null).
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and inside the control buffer (see above), and aligned, as
        // CMSG_* guarantee for a buffer aligned for `cmsghdr`.
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::IPPROTO_IP
            && c.cmsg_type == libc::IP_PKTINFO
            && c.cmsg_len as usize >= PKTINFO_CMSG_LEN
        {
            // SAFETY: the kernel wrote an `in_pktinfo` as this message's data (checked: level,
            // type and length); CMSG_DATA points at it inside the buffer; it may be unaligned
            // for `in_pktinfo`, hence `read_unaligned`.
            let info = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>()) };
            return Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
        }
        // SAFETY: as for CMSG_FIRSTHDR; `cmsg` is a header inside `hdr`'s control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(hdr, cmsg) };
    }
    None
}

impl Mmsg {
    /// Descriptor arrays for batches of up to `max_batch` datagrams per system call.
    pub(crate) fn new(max_batch: usize) -> Mmsg {
        Mmsg {
            hdrs: vec![zeroed_mmsghdr(); max_batch],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; max_batch],
            names: vec![zeroed_sockaddr_in(); max_batch],
            control: vec![Control([0; CONTROL_LEN]); max_batch],
            runs: vec![(0, 0); max_batch],
        }
    }

    /// One `recvmmsg` into the free slots of `batch` (from `batch.len()` on, at most `max_batch`),
    /// committing each datagram received. Returns `(received, asked)`; "nothing waiting" is an
    /// error of kind `WouldBlock`. `local` supplies the destination port, and the destination
    /// address when a datagram came without `IP_PKTINFO`.
    pub(crate) fn recv(
        &mut self,
        fd: BorrowedFd<'_>,
        batch: &mut RxBatch,
        local: SocketAddrV4,
    ) -> io::Result<(usize, usize)> {
        let start = batch.len();
        let asked = (batch.capacity() - start).min(self.hdrs.len());
        if asked == 0 {
            return Ok((0, 0));
        }
        let slot = batch.slot_size();
        let base = batch.storage_mut().as_mut_ptr();
        for (i, iov) in self.iovs.iter_mut().take(asked).enumerate() {
            // In bounds: slot `start + i` < capacity, so it lies inside the storage.
            iov.iov_base = base.wrapping_add((start + i) * slot).cast();
            iov.iov_len = slot;
        }
        let (iovs, names, control) = (self.iovs.as_mut_ptr(), self.names.as_mut_ptr(), self.control.as_mut_ptr());
        for (i, h) in self.hdrs.iter_mut().take(asked).enumerate() {
            h.msg_len = 0;
            let m = &mut h.msg_hdr;
            m.msg_name = names.wrapping_add(i).cast();
            m.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_iov = iovs.wrapping_add(i);
            m.msg_iovlen = 1;
            m.msg_control = control.wrapping_add(i).cast();
            m.msg_controllen = CONTROL_LEN as _;
            m.msg_flags = 0;
        }
        // SAFETY: `hdrs[..asked]` are initialised `mmsghdr`s whose pointers all point into memory
        // that stays valid and unaliased for the whole call: `names[i]`, `iovs[i]` and
        // `control[i]` (elements of our own arrays, not touched by Rust code until the call
        // returns), and each `iovs[i]` into a distinct `slot`-byte slot of `batch`'s storage, which
        // is mutably borrowed by this function. Lengths match the buffers. `asked` <= hdrs.len().
        // A null timeout means "no timeout"; MSG_DONTWAIT makes the call non-blocking.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                asked as _,
                libc::MSG_DONTWAIT as _,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (h, name) in self.hdrs.iter().zip(&self.names).take(n) {
            let source = if h.msg_hdr.msg_namelen as usize >= size_of::<libc::sockaddr_in>() {
                from_sockaddr(name)
            } else {
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
            };
            let destination = pktinfo_destination(&h.msg_hdr).unwrap_or(*local.ip());
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let len = (h.msg_len as usize).min(slot);
            batch.commit(len, source, SocketAddrV4::new(destination, local.port()), truncated);
        }
        Ok((n, asked))
    }

    /// One `sendmmsg` of the pending datagrams of `batch` (from `batch.sent()` on, at most
    /// `max_batch`). With `gso_max_segment` > 0, each run of datagrams to one destination whose
    /// lengths are equal (the last may be shorter) and at most `gso_max_segment` goes as one
    /// message with a `UDP_SEGMENT` control message, and the kernel cuts it into those datagrams.
    /// Returns how many datagrams the kernel took (at least one), or the error of the first
    /// message. Does not advance the batch's cursor.
    pub(crate) fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        batch: &TxBatch,
        gso_max_segment: usize,
    ) -> Result<usize, SendFailure> {
        let limit = batch.pending().min(self.hdrs.len());
        if limit == 0 {
            return Ok(0);
        }
        let iovec = |p: &[u8]| libc::iovec { iov_base: p.as_ptr().cast_mut().cast(), iov_len: p.len() };
        let (mut msgs, mut used) = (0, 0);
        let mut pending = batch.pending_iter().take(limit).peekable();
        while let Some(first) = pending.next() {
            let segment = first.payload.len();
            self.iovs[used] = iovec(first.payload);
            let (mut run, mut total) = (1, segment);
            while segment > 0 && segment <= gso_max_segment && run < GSO_MAX_SEGMENTS {
                let Some(next) = pending.next_if(|d| {
                    let len = d.payload.len();
                    d.destination == first.destination && len > 0 && len <= segment && total + len <= GSO_MAX_BYTES
                }) else {
                    break;
                };
                // In bounds: at most `limit` datagrams are taken, and iovs.len() >= limit.
                self.iovs[used + run] = iovec(next.payload);
                run += 1;
                total += next.payload.len();
                if next.payload.len() < segment {
                    break; // only the last segment may be shorter
                }
            }
            self.names[msgs] = to_sockaddr(first.destination);
            self.runs[msgs] = (used, run);
            if run > 1 {
                write_gso_cmsg(&mut self.control[msgs], segment);
            }
            msgs += 1;
            used += run;
        }
        let (iovs, names, control) = (self.iovs.as_mut_ptr(), self.names.as_mut_ptr(), self.control.as_mut_ptr());
        for (i, (h, &(start, run))) in self.hdrs.iter_mut().zip(&self.runs).take(msgs).enumerate() {
            h.msg_len = 0;
            let m = &mut h.msg_hdr;
            m.msg_name = names.wrapping_add(i).cast();
            m.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_iov = iovs.wrapping_add(start);
            m.msg_iovlen = run as _;
            (m.msg_control, m.msg_controllen) =
                if run > 1 { (control.wrapping_add(i).cast(), GSO_CMSG_SPACE as _) } else { (std::ptr::null_mut(), 0) };
            m.msg_flags = 0;
        }
        // SAFETY: `hdrs[..msgs]` are initialised `mmsghdr`s whose pointers point into memory
        // valid for the whole call: `names[i]`, `control[i]` and the `iovs[start..start + run]`
        // ranges (our own arrays, untouched until the call returns, ranges within `iovs`), and each
        // `iovec` into the payload of a pending datagram of `batch`, which is borrowed for this
        // function; lengths are the payload lengths, and `msg_controllen` covers one initialised
        // UDP_SEGMENT message inside its `Control`. The kernel only reads all of it, so the `*mut`
        // casts of shared data are never written through. `msgs` <= hdrs.len(). MSG_DONTWAIT makes
        // the call non-blocking.
        let n = unsafe { libc::sendmmsg(fd.as_raw_fd(), self.hdrs.as_mut_ptr(), msgs as _, libc::MSG_DONTWAIT as _) };
        if n < 0 {
            let gso_segment = (self.runs[0].1 > 1).then(|| self.iovs[0].iov_len);
            return Err(SendFailure { error: io::Error::last_os_error(), gso_segment });
        }
        Ok(self.runs[..n as usize].iter().map(|&(_, run)| run).sum())
    }
}

/// Writes a `UDP_SEGMENT` control message for `segment`-byte segments at the start of `control`.
fn write_gso_cmsg(control: &mut Control, segment: usize) {
    control.0 = [0; CONTROL_LEN];
    // A msghdr that describes only the control buffer, for CMSG_FIRSTHDR.
    let mut hdr = zeroed_mmsghdr().msg_hdr;
    hdr.msg_control = control.0.as_mut_ptr().cast();
    hdr.msg_controllen = GSO_CMSG_SPACE as _;
    // SAFETY: `hdr` describes `control`, a live, `cmsghdr`-aligned buffer of CONTROL_LEN >=
    // GSO_CMSG_SPACE bytes (checked at compile time), so CMSG_FIRSTHDR returns a non-null,
    // aligned pointer to its start, with room for the header and CMSG_DATA's two bytes; we write
    // only there, through the pointer derived from the exclusive borrow of `control`. The segment
    // size fits u16: the caller only passes sizes of at most GSO_MAX_BYTES < 65536.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&hdr);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = GSO_CMSG_LEN as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment as u16);
    }
}

/// True if the kernel knows UDP GSO (`UDP_SEGMENT`, Linux 4.18+): setting its socket-wide default
/// to 0 (off) succeeds.
pub(crate) fn gso_supported(fd: BorrowedFd<'_>) -> bool {
    set_int_option(fd, libc::SOL_UDP, libc::UDP_SEGMENT, 0).is_ok()
}

/// Sets an integer socket option (`SO_RCVBUFFORCE`, `IP_PKTINFO`, ...).
pub(crate) fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value points to `value`, a live `c_int`, and the length passed is exactly
    // its size; the kernel only reads it. `fd` is an open descriptor for the borrow's lifetime.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `timespec` of `d` (seconds saturate).
pub(crate) fn timespec(d: std::time::Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    }
}

/// `ppoll(2)` on one descriptor for `interest`, and on `also` for reading, waiting at most `timeout`
/// (`None`: forever; exact to the microsecond rather than rounded up to milliseconds). An error or
/// hang-up condition counts as ready for whatever was asked, so the next call reports it.
pub(crate) fn poll(
    fd: BorrowedFd<'_>,
    interest: Interest,
    timeout: Option<std::time::Duration>,
    also: Option<BorrowedFd<'_>>,
) -> io::Result<Readiness> {
    poll_sockets(fd, None, interest, timeout, also)
}

/// As [`poll`], over a socket that sends (`fd`: readable or writable as `interest` says) and an
/// optional second socket that is only read (`read_too`): readable when either is.
pub(crate) fn poll_sockets(
    fd: BorrowedFd<'_>,
    read_too: Option<BorrowedFd<'_>>,
    interest: Interest,
    timeout: Option<std::time::Duration>,
    also: Option<BorrowedFd<'_>>,
) -> io::Result<Readiness> {
    let mut events = 0;
    if interest.readable {
        events |= libc::POLLIN;
    }
    if interest.writable {
        events |= libc::POLLOUT;
    }
    let read_events = if interest.readable { libc::POLLIN } else { 0 };
    let mut pfds = [
        libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 },
        // A negative descriptor is ignored by ppoll(2).
        libc::pollfd { fd: also.map_or(-1, |a| a.as_raw_fd()), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: read_too.map_or(-1, |r| r.as_raw_fd()), events: read_events, revents: 0 },
    ];
    let nfds: libc::nfds_t = if read_too.is_some() {
        3
    } else if also.is_some() {
        2
    } else {
        1
    };
    let ts = timeout.map(timespec);
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `pfds` holds `nfds` valid `pollfd`s and outlives the call; `ts_ptr` is null or points
    // at `ts`, which outlives the call; a null signal mask leaves the mask unchanged.
    let r = unsafe { libc::ppoll(pfds.as_mut_ptr(), nfds, ts_ptr, std::ptr::null()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
    let (first, second) = (pfds[0].revents, pfds[2].revents);
    let failed = first & bad != 0;
    let second_ready = read_too.is_some() && second & (libc::POLLIN | bad) != 0;
    Ok(Readiness {
        readable: interest.readable && (failed || first & libc::POLLIN != 0 || second_ready),
        writable: interest.writable && (failed || first & libc::POLLOUT != 0),
        woken: also.is_some() && pfds[1].revents != 0,
    })
}
