//! The system calls of the AF_XDP backend: the XDP socket and its UMEM and rings (`socket`,
//! `setsockopt`, `getsockopt`, `mmap`, `bind`, `sendto`/`recvfrom` wake-ups, `poll`), the four
//! `bpf(2)` commands that load and attach the filter program, and the interface queries
//! (`getifaddrs`, `ioctl`). With `ring.rs` and `umem.rs`, the only files of the backend with
//! `unsafe`; everything here returns `io::Error` and the caller adds what was being done.

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use super::program::Insn;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A memory mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a mapping is plain memory owned by this value; which parts the kernel may write is
// governed by the ring protocol, not by the thread that holds the value.
unsafe impl Send for Mmap {}

impl Mmap {
    fn map(len: usize, prot: libc::c_int, flags: libc::c_int, fd: RawFd, offset: u64) -> io::Result<Mmap> {
        let offset = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh mapping chosen by the kernel (null hint) overlaps no Rust object; `fd` is
        // -1 for anonymous memory or an open XDP socket borrowed for the call.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Mmap { ptr, len })
    }

    /// `len` bytes of zeroed private memory (a UMEM), populated up front.
    pub fn anonymous(len: usize) -> io::Result<Mmap> {
        Mmap::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    }

    /// A ring of the XDP socket `fd`: `len` bytes at the ring's page offset `offset`.
    pub fn ring(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Mmap> {
        Mmap::map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            offset,
        )
    }

    /// Start of the mapping.
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping made by `map` and not unmapped before; every
        // pointer derived from it (rings, frames) lives in structures that own this value and are
        // dropped with it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A new AF_XDP socket.
pub fn xsk_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain system call with constant arguments.
    let fd = check(unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just returned by `socket` and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: the option points to a live `T` of exactly the length passed; the kernel only reads it.
    check(unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t)
    })
    .map(drop)
}

/// Reads option `name` of `SOL_XDP` into a `T`; returns it and the length the kernel wrote.
fn getsockopt_xdp<T: Copy>(fd: BorrowedFd<'_>, name: libc::c_int, init: T) -> io::Result<(T, usize)> {
    let mut value = init;
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, a live `T` of that size, and
    // updates `len`; `T` is a plain C struct or integer for which any bytes are a valid value.
    check(unsafe { libc::getsockopt(fd.as_raw_fd(), libc::SOL_XDP, name, (&mut value as *mut T).cast(), &mut len) })?;
    Ok((value, len as usize))
}

/// Bytes of TX metadata before a packet that asks for it: `struct xsk_tx_metadata` (flags, then
/// the request: checksum start and offset, and since Linux 6.14 a launch time), rounded to 8.
pub const TX_METADATA_LEN: u32 = 24;

/// The request in a packet's TX metadata: complete the checksum at `csum_start + csum_offset`
/// over the bytes from `csum_start` on (`XDP_TXMD_FLAGS_CHECKSUM`), as the kernel lays it out.
pub fn tx_metadata_checksum(csum_start: u16, csum_offset: u16) -> [u8; TX_METADATA_LEN as usize] {
    let mut m = [0u8; TX_METADATA_LEN as usize];
    m[0..8].copy_from_slice(&u64::from(libc::XDP_TXMD_FLAGS_CHECKSUM).to_ne_bytes());
    m[8..10].copy_from_slice(&csum_start.to_ne_bytes());
    m[10..12].copy_from_slice(&csum_offset.to_ne_bytes());
    m
}

/// Registers `umem` as the socket's UMEM, cut into `frame_size`-byte frames. With `tx_metadata`,
/// packets may carry [`TX_METADATA_LEN`] bytes of TX metadata before them (Linux 6.11+;
/// `EINVAL` before); with `sw_checksum` too, the kernel completes requested checksums in software.
pub fn register_umem(
    fd: BorrowedFd<'_>,
    umem: &Mmap,
    frame_size: u32,
    tx_metadata: bool,
    sw_checksum: bool,
) -> io::Result<()> {
    let mut flags = 0;
    if tx_metadata {
        flags |= libc::XDP_UMEM_TX_METADATA_LEN;
        if sw_checksum {
            flags |= libc::XDP_UMEM_TX_SW_CSUM;
        }
    }
    let reg = libc::xdp_umem_reg {
        addr: umem.ptr().as_ptr() as u64,
        len: umem.len() as u64,
        chunk_size: frame_size,
        headroom: 0,
        flags,
        tx_metadata_len: if tx_metadata { TX_METADATA_LEN } else { 0 },
    };
    setsockopt(fd, libc::SOL_XDP, libc::XDP_UMEM_REG, &reg)
}

/// Sets the size of ring `which` (`XDP_RX_RING`, `XDP_UMEM_FILL_RING`, ...).
pub fn set_ring_size(fd: BorrowedFd<'_>, which: libc::c_int, size: u32) -> io::Result<()> {
    setsockopt(fd, libc::SOL_XDP, which, &size)
}

/// Where each ring's producer, consumer, flags and entries are in its mapping. Fails with
/// `EOPNOTSUPP` on kernels whose layout has no flags word (before 5.4).
pub fn mmap_offsets(fd: BorrowedFd<'_>) -> io::Result<libc::xdp_mmap_offsets> {
    let zero = libc::xdp_ring_offset { producer: 0, consumer: 0, desc: 0, flags: 0 };
    let init = libc::xdp_mmap_offsets { rx: zero, tx: zero, fr: zero, cr: zero };
    let (off, len) = getsockopt_xdp(fd, libc::XDP_MMAP_OFFSETS, init)?;
    if len != size_of::<libc::xdp_mmap_offsets>() {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    Ok(off)
}

/// Binds the socket to queue `queue` of interface `ifindex` with `flags` (`XDP_COPY`, ...).
pub fn bind_xsk(fd: BorrowedFd<'_>, ifindex: u32, queue: u32, flags: u16) -> io::Result<()> {
    let addr = libc::sockaddr_xdp {
        sxdp_family: libc::AF_XDP as u16,
        sxdp_flags: flags,
        sxdp_ifindex: ifindex,
        sxdp_queue_id: queue,
        sxdp_shared_umem_fd: 0,
    };
    // SAFETY: `addr` is a live `sockaddr_xdp` of the length passed; the kernel only reads it.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_xdp).cast(),
            size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// The bound socket's `XDP_OPTIONS` (bit 0: zero-copy).
pub fn xdp_options(fd: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(getsockopt_xdp(fd, libc::XDP_OPTIONS, 0u32)?.0)
}

/// The kernel's drop and ring counters for the socket.
pub fn xdp_statistics(fd: BorrowedFd<'_>) -> io::Result<libc::xdp_statistics> {
    let init = libc::xdp_statistics {
        rx_dropped: 0,
        rx_invalid_descs: 0,
        tx_invalid_descs: 0,
        rx_ring_full: 0,
        rx_fill_ring_empty_descs: 0,
        tx_ring_empty_descs: 0,
    };
    Ok(getsockopt_xdp(fd, libc::XDP_STATISTICS, init)?.0)
}

/// Tells the kernel to process the TX ring (`sendto` with no data). In copy mode it transmits up
/// to its budget of frames before returning; `EAGAIN` means more are left.
pub fn kick_tx(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a zero-length send from a null buffer to no address: the kernel reads nothing.
    let r = unsafe { libc::sendto(fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT, std::ptr::null(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Tells the kernel that the fill ring has frames again (`recvfrom` with no buffer).
pub fn kick_rx(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: a zero-length receive into a null buffer without an address: the kernel writes nothing.
    let r = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            std::ptr::null_mut(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `ppoll(2)` on `fds`, at most `timeout` (`None`: forever; exact to the microsecond, not rounded
/// up to milliseconds as `poll(2)` would). Returns the number with events.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<std::time::Duration>) -> io::Result<usize> {
    let ts = timeout.map(crate::udp::sys::timespec);
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` `pollfd`s; `ts_ptr` is null
    // or points at `ts`, which outlives the call; a null signal mask leaves the mask unchanged.
    let n = check(unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ts_ptr, std::ptr::null()) })?;
    Ok(n as usize)
}

// bpf(2): the commands and the parts of `union bpf_attr` they use (linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// Attach type `BPF_XDP`.
const BPF_XDP: u32 = 37;
/// `BPF_F_XDP_HAS_FRAGS`: the program handles multi-buffer frames.
const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;
/// Attach flag: generic (skb) mode.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// Attach flag: native (driver) mode.
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = name.len().min(15);
    out[..n].copy_from_slice(&name.as_bytes()[..n]);
    out
}

/// Runs `bpf(cmd, attr)`; returns its nonnegative result.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialised `#[repr(C)]` prefix of `union bpf_attr` for
    // `cmd` (no padding bytes: every field is explicit), passed with its exact size, so the
    // kernel reads only it (and zero-fills nothing beyond). Pointers inside it (instructions,
    // license, log buffer, key, value) point to memory the caller keeps alive for the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, (attr as *mut T).cast::<libc::c_void>(), size_of::<T>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `fd` is a new descriptor just returned by `bpf`, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A new XSKMAP with `entries` slots (one per queue).
pub fn create_xskmap(entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_XSKMAP,
        key_size: 4,
        value_size: 4,
        max_entries: entries,
        map_flags: 0,
        inner_map_fd: 0,
        numa_node: 0,
        map_name: name16("spindrift_xsks"),
    };
    owned(bpf(BPF_MAP_CREATE, &mut attr)?)
}

/// Puts the XDP socket `xsk` into slot `key` of the XSKMAP `map`.
pub fn xskmap_set(map: BorrowedFd<'_>, key: u32, xsk: BorrowedFd<'_>) -> io::Result<()> {
    let value: u32 = xsk.as_raw_fd() as u32;
    let mut attr = MapUpdateAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &value as *const u32 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Loads `insns` as an XDP program (multi-buffer aware if `frags`). If `log` is not empty, the
/// verifier writes its log there (NUL-terminated).
pub fn load_xdp_program(insns: &[Insn], frags: bool, log: &mut [u8]) -> io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: u32::try_from(insns.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: u32::from(!log.is_empty()),
        log_size: u32::try_from(log.len()).unwrap_or(u32::MAX),
        log_buf: if log.is_empty() { 0 } else { log.as_mut_ptr() as u64 },
        kern_version: 0,
        prog_flags: if frags { BPF_F_XDP_HAS_FRAGS } else { 0 },
        prog_name: name16("spindrift_xdp"),
        prog_ifindex: 0,
        expected_attach_type: BPF_XDP,
    };
    owned(bpf(BPF_PROG_LOAD, &mut attr)?)
}

/// Attaches `prog` to interface `ifindex` (in the calling thread's network namespace) through a
/// BPF link with `flags` (`XDP_FLAGS_DRV_MODE` or `XDP_FLAGS_SKB_MODE`). The program stays
/// attached exactly as long as the returned descriptor is open.
pub fn attach_xdp_link(prog: BorrowedFd<'_>, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut attr =
        LinkCreateAttr { prog_fd: prog.as_raw_fd() as u32, target_ifindex: ifindex, attach_type: BPF_XDP, flags };
    owned(bpf(BPF_LINK_CREATE, &mut attr)?)
}

/// One IPv4 address of a local interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// Interface name.
    pub name: String,
    /// The address.
    pub addr: Ipv4Addr,
    /// Its netmask.
    pub netmask: Ipv4Addr,
}

fn sockaddr_ipv4(sa: *const libc::sockaddr) -> Option<Ipv4Addr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: `sa` is non-null and, from getifaddrs, points to a sockaddr at least as long as its
    // family requires; the family is read first and the `sockaddr_in` only if it is AF_INET.
    unsafe {
        if i32::from((*sa).sa_family) != libc::AF_INET {
            return None;
        }
        let sin = std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>());
        Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
    }
}

/// The IPv4 addresses of the interfaces in the calling thread's network namespace.
pub fn ipv4_interfaces() -> io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid out-pointer; on success it receives a list we free below.
    check(unsafe { libc::getifaddrs(&mut head) })?;
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if let (Some(addr), false) = (sockaddr_ipv4(ifa.ifa_addr), ifa.ifa_name.is_null()) {
            // SAFETY: `ifa_name` is a non-null, NUL-terminated string inside the list.
            let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
            let netmask = sockaddr_ipv4(ifa.ifa_netmask).unwrap_or(Ipv4Addr::BROADCAST);
            out.push(IfAddr { name, addr, netmask });
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once; no reference into the
    // list outlives this point (names were copied).
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[repr(C)]
#[derive(Clone, Copy)]
union IfReqData {
    int: libc::c_int,
    hwaddr: libc::sockaddr,
    ptr: *mut libc::c_void,
    _pad: [u8; 24],
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: IfReqData,
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    if name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut r = IfReq { name: [0; libc::IFNAMSIZ], data: IfReqData { _pad: [0; 24] } };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(r)
}

fn ioctl(fd: BorrowedFd<'_>, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: `req` is a live `struct ifreq` layout (16-byte name, 24-byte union) for a request
    // that reads the name and writes at most the union; where the union holds a pointer
    // (SIOCETHTOOL), the caller points it at a live buffer of the size that command uses.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), request as _, req as *mut IfReq) }).map(drop)
}

/// Index of interface `name` (`SIOCGIFINDEX`), in the namespace of the socket `fd`.
pub fn if_index(fd: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    let mut r = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFINDEX, &mut r)?;
    // SAFETY: SIOCGIFINDEX wrote an int into the union.
    Ok(unsafe { r.data.int } as u32)
}

/// MTU of interface `name` (`SIOCGIFMTU`).
pub fn if_mtu(fd: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    let mut r = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFMTU, &mut r)?;
    // SAFETY: SIOCGIFMTU wrote an int into the union.
    Ok(unsafe { r.data.int } as u32)
}

/// Hardware type (`ARPHRD_*`) and first six address bytes of interface `name` (`SIOCGIFHWADDR`).
pub fn if_hwaddr(fd: BorrowedFd<'_>, name: &str) -> io::Result<(u16, [u8; 6])> {
    let mut r = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFHWADDR, &mut r)?;
    // SAFETY: SIOCGIFHWADDR wrote a sockaddr into the union.
    let sa = unsafe { r.data.hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok((sa.sa_family, mac))
}

/// Number of receive queues of interface `name` (`ETHTOOL_GCHANNELS`): the larger of its
/// receive-only and combined channel counts. Fails on drivers without channel reporting.
pub fn rx_queue_count(fd: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    // struct ethtool_channels: cmd, max_rx, max_tx, max_other, max_combined, rx_count, tx_count,
    // other_count, combined_count.
    let mut channels = [0u32; 9];
    channels[0] = ETHTOOL_GCHANNELS;
    let mut r = ifreq(name)?;
    r.data.ptr = channels.as_mut_ptr().cast();
    ioctl(fd, libc::SIOCETHTOOL, &mut r)?;
    Ok(channels[5].max(channels[8]).max(1))
}
