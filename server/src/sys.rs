//! Every `unsafe` system call of the server, behind safe wrappers: file descriptors passed over a
//! Unix socket (SCM_RIGHTS), memfd creation and seals, and the read-only mapping of a memfd.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// Most file descriptors accepted with one message (extras are closed).
const MAX_FDS: usize = 4;

/// Receives one message from `sock` into `buf`, with the file descriptors it carries
/// (close-on-exec). Returns the bytes received and the descriptors.
pub fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32) } as usize;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value that is filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `iov` (which covers `buf`) and at `control` (`space` bytes), all live
    // and writable for the duration of the call; the kernel writes at most those lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled in by a successful recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR walk the
    // control buffer within `msg_controllen`, and CMSG_DATA points inside each header's payload.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                for i in 0..payload / std::mem::size_of::<libc::c_int>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    // The kernel installed `fd` in this process for us: we own it from here.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "more file descriptors than accepted"));
    }
    Ok((n as usize, fds))
}

/// Sends `data` on `sock` with `fd` attached (SCM_RIGHTS). Returns the bytes sent.
pub fn send_with_fd(sock: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    let fd_len = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid value that is filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds `space` bytes, enough for one header with one descriptor;
    // CMSG_FIRSTHDR returns its start (non-null, as msg_controllen >= sizeof(cmsghdr)).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd.as_raw_fd());
    }
    // SAFETY: `msg` points at `iov` (covering `data`, which the kernel only reads) and at the
    // initialised control buffer; both outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// The seals of a memfd (`F_SEAL_*` bits); an error (EINVAL) for a descriptor that is not a memfd
/// or otherwise cannot be sealed.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS reads the seals of a descriptor we borrow; it touches no memory of ours.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A memfd holding `bytes`, named `name` (for /proc), sealed against writing, shrinking and
/// growing (and against further sealing) when `seal` is set: the form a local VMM hands guest
/// memory to `spindrift-server --image-socket` in.
pub fn memfd_with(name: &str, bytes: &[u8], seal: bool) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    let fd = OwnedFd::from(file);
    if seal {
        let all = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a descriptor we own; it touches no memory of ours.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, all) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// A read-only private mapping of part of a file, unmapped on drop.
#[derive(Debug)]
pub struct ReadOnlyMap {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; shared references to immutable memory
// may cross threads.
unsafe impl Send for ReadOnlyMap {}
// SAFETY: as above: nothing can write through a ReadOnlyMap.
unsafe impl Sync for ReadOnlyMap {}

impl ReadOnlyMap {
    /// Maps `len` bytes of `fd` from `offset` (a multiple of the system page size) with PROT_READ
    /// and MAP_PRIVATE.
    ///
    /// # Safety
    ///
    /// The bytes of the file in that range must not change and the file must not shrink below
    /// `offset + len` while the mapping lives (e.g. a memfd sealed with `F_SEAL_WRITE` and
    /// `F_SEAL_SHRINK`): the returned slice is assumed immutable, and a truncated file would turn
    /// reads into SIGBUS.
    pub unsafe fn new(fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<ReadOnlyMap> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) overlaps no Rust object; the
        // descriptor is borrowed for the call only (the mapping keeps its own reference).
        let p =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, fd.as_raw_fd(), off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(ReadOnlyMap { ptr: p.cast_const().cast(), len })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes that nothing writes (the
        // constructor's contract) and that stays mapped until `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for ReadOnlyMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, and no borrow of it outlives
        // `self` (`bytes` borrows `self`).
        unsafe { libc::munmap(self.ptr.cast_mut().cast(), self.len) };
    }
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(r).unwrap_or(4096)
}

/// Sends `data` on `sock` without blocking, whatever the socket's mode (MSG_DONTWAIT): the bytes
/// the kernel took, or `WouldBlock` when its buffer is full.
pub fn send_nonblocking(sock: &UnixStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of its length for the duration of the call.
    let n = unsafe {
        libc::send(sock.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
