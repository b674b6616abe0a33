//! The AF_XDP backend: [`XdpIo`], datagrams moved through XDP sockets that bypass the kernel's
//! UDP/IP stack, behind the same [`PacketIo`] trait as the UDP backend.
//!
//! # How it is put together
//!
//! Opening an [`XdpIo`] (as root, or with `CAP_NET_ADMIN` + `CAP_BPF`; in the network namespace
//! of the interface, e.g. inside `netlab::Host::run`):
//!
//! 1. finds the interface that has the configured address (`getifaddrs`), its index, MAC and MTU;
//! 2. opens an ordinary UDP socket on that address and port (the *helper*): it reserves the port,
//!    joins the multicast groups (so IGMP reports go out and switches that snoop keep forwarding
//!    the groups to this port), and makes the kernel resolve unicast neighbours (see [`neigh`]);
//! 3. per receive queue of the interface (veth has one), creates an AF_XDP socket with a UMEM of
//!    `frames` frames and fill, completion, RX and TX rings, and binds it with
//!    `XDP_USE_NEED_WAKEUP`, letting the kernel pick zero-copy where the driver supports it and
//!    copy mode otherwise ([`XdpMode`]); with `XDP_USE_SG` when a frame of the link MTU does not
//!    fit one UMEM frame (MTU 9000);
//! 4. creates an XSKMAP holding the sockets, loads the filter program (see [`program`]; emitted
//!    from Rust, no compiler or object file involved) with `BPF_F_XDP_HAS_FRAGS`, and attaches it
//!    through a **BPF link** (`BPF_LINK_CREATE`), in native mode if the driver has it, else in
//!    generic mode ([`AttachMode`]).
//!
//! The link is a file descriptor owned by the [`XdpIo`]: the program is detached when the value
//! is dropped, and also when the process dies in any way (even SIGKILL), because the kernel
//! closes its descriptors. Nothing is pinned in a BPF filesystem, so nothing can be left behind.
//!
//! # The data path
//!
//! * [`recv_batch`](PacketIo::recv_batch) takes descriptors off each queue's RX ring, reassembles
//!   multi-buffer frames, checks the Ethernet/IPv4/UDP headers ([`frame::parse`]), copies each
//!   payload into the caller's [`RxBatch`] and returns the frames to the fill ring at once.
//!   Malformed frames, and datagrams for groups not joined (or, per [`Bind`], not wanted), are
//!   counted in [`XdpStats`] and dropped.
//! * [`send_batch`](PacketIo::send_batch) reclaims sent frames from the completion ring, writes
//!   headers and payload into free frames (several, flagged `XDP_PKT_CONTD`, for a datagram longer
//!   than a frame), posts them on the TX ring and kicks the kernel (`sendto`) when the ring asks
//!   for a wake-up. Out of frames means "sent fewer", as a full socket buffer does.
//! * Multicast goes to `01:00:5e` plus the group's low 23 bits; unicast to the neighbour's MAC from
//!   the kernel's ARP table. Only on-link destinations (in the interface's subnet) can be sent to:
//!   there is no routing.
//!
//! # Differences from the UDP backend
//!
//! * Datagrams longer than the link MTU allows (MTU - 28) are refused ([`IoError::Send`]): the
//!   backend does not fragment. Fragmented datagrams from others are left to the kernel.
//! * Multicast is never looped back to sockets on the same host (`multicast_loop` is ignored).
//! * One [`XdpIo`] per interface: the XDP program filters one UDP port, and an interface has one
//!   XDP program. A second one on the same interface fails to attach (`Auto` then falls back).
//! * Received UDP checksums are not verified by default ([`XdpConfig::verify_udp_checksum`]): on
//!   veth, packets from the local stack reach XDP with the checksum not yet filled in
//!   (`CHECKSUM_PARTIAL`), and every spindrift datagram carries its own authentication tag. Sent
//!   datagrams carry a UDP checksum ([`XdpConfig::udp_checksum`]), so kernel receivers accept
//!   them. By default the device completes it ([`ChecksumOffload::Device`]): each packet carries
//!   AF_XDP TX metadata (Linux 6.11+) asking for the checksum, as the kernel's own UDP sockets
//!   ask their NIC; on veth the kernel passes the packet on as `CHECKSUM_PARTIAL`, never computed,
//!   just like a UDP socket's. Older kernels refuse the metadata and the backend sums each payload
//!   itself.
//!
//! # Measured
//!
//! `bench xdp` (see `bench/src/xdp_cmd.rs`): multicast from h0 of a netlab lab (MTU 9000, bridge
//! netfilter off) as fast as the backend takes it, on the project's 2-core development machine
//! while other builds ran (load 5-7), so figures move by ±30 % between runs. Datagrams per second
//! of the sender thread's CPU time, 1400-byte datagrams:
//!
//! | receivers                          | UDP (`sendmmsg`) | AF_XDP (copy mode, native XDP) | ratio |
//! |------------------------------------|------------------|--------------------------------|-------|
//! | 4 hosts, UDP sockets               | 87k              | 97k                            | 1.1x  |
//! | 4 hosts, same backend as sender    | 74k              | 88k                            | 1.2x  |
//! | 4 hosts, no members (IP drops)     | 121k             | 159k                           | 1.3x  |
//! | 1 host, no members                 | 179k             | 222k                           | 1.2x  |
//!
//! In a lab everything after the sender's system call runs in the sender's softirqs: veth, the
//! bridge's flooding to every port, and each receiving host's input path. That shared part costs
//! several microseconds per datagram here and is the same for both backends; what AF_XDP saves is
//! the UDP/IP send path (about 1.5-2 µs per datagram), and only about a tenth of the AF_XDP
//! sender's time is its own user-space work (headers, copy). The 2.7x between XSK-to-XSK
//! and `sendmmsg` measured on a bare veth pair does not survive a bridge with four ports. On a NIC
//! the delivery happens on other machines, and zero-copy drivers skip the copy into an skb.
//!
//! `bench xdp --sink switch-drop` models that NIC: frames are dropped as they enter the switch, so
//! the sender pays its own transmit path and one veth hop. There, with the checksum left to the
//! device, AF_XDP sent 2.24x UDP's datagrams per CPU-second at 1400 bytes (596k against 266k) and
//! 1.27x at 8000 bytes. `bench xdp-daemons` runs the real server: 1.21x UDP's packets per server
//! CPU-second at MTU 1500, 0.96x at 9000, since the backend is a small part of the server's work
//! per packet (parity, tags, building datagrams from pages).
//!
//! # Selecting it
//!
//! Daemons do not name this type: [`crate::open`] with [`crate::IoKind`] `Xdp` or `Auto` takes the
//! same [`UdpConfig`](crate::udp::UdpConfig) as the UDP backend and converts it with
//! [`XdpConfig::from_udp`].

mod config;
mod error;
pub mod frame;
pub mod neigh;
pub mod program;
pub mod queue;
pub mod ring;
mod sys;
pub mod umem;

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::udp::Bind;
use crate::{Capabilities, Interest, IoError, PacketIo, Readiness, RxBatch, TxBatch};
use frame::{FrameHeaders, MacAddr, HEADERS_LEN, IP_UDP_OVERHEAD};
use neigh::Neighbours;
use queue::{QueueSetup, SetupStep, XskQueue, RX_HEADROOM};

pub use config::{
    AttachMode, ChecksumOffload, Queues, XdpConfig, XdpMode, AUTO, DEFAULT_MAX_BATCH, DEFAULT_NEIGHBOUR_TIMEOUT,
    DEFAULT_UMEM_BYTES,
};
use error::hint_for;
pub use error::XdpError;

/// IPv4 TTL of unicast datagrams.
const UNICAST_TTL: u8 = 64;

/// How long opening a queue retries a bind refused as busy (see [`open_queue`]).
const BIND_BUSY_RETRY: Duration = Duration::from_secs(1);

/// [`XskQueue::open`], retrying a bind refused with `EBUSY` for up to [`BIND_BUSY_RETRY`]: the
/// kernel releases a closed socket's hold on its queue in deferred work, so a daemon restarted at
/// once (or a test that reopens the interface) can find the queue still taken for a moment. A
/// queue held by a live socket stays busy, and the error is returned after the retries.
fn open_queue(setup: &QueueSetup) -> Result<XskQueue, (SetupStep, io::Error)> {
    let until = Instant::now() + BIND_BUSY_RETRY;
    loop {
        match XskQueue::open(setup) {
            Err((SetupStep::Bind, e)) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// How soon `wait` comes back to kick frames still on a TX ring.
const TX_RETRY: Duration = Duration::from_micros(100);
/// Receive buffer of the helper socket: it only gets what the program passes on our port.
const HELPER_RECV_BUFFER: usize = 64 << 10;

/// Counters of the backend, besides the kernel's ([`XdpIo::kernel_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct XdpStats {
    /// Datagrams handed to the caller.
    pub rx_datagrams: u64,
    /// RX descriptors taken off the rings.
    pub rx_descriptors: u64,
    /// Frames dropped because their headers were malformed (see [`frame::FrameError`]), or their
    /// descriptor pointed outside the UMEM, or they were longer than any IPv4 packet.
    pub rx_malformed: u64,
    /// Well-formed datagrams dropped because this endpoint does not receive their destination
    /// (a group not joined, multicast with [`Bind::Interface`], unicast with [`Bind::Group`]).
    pub rx_filtered: u64,
    /// Datagrams cut to the batch's slot size.
    pub rx_truncated: u64,
    /// Datagrams posted for sending.
    pub tx_datagrams: u64,
    /// Datagrams dropped on send (no neighbour, too long); each was reported as [`IoError::Send`].
    pub tx_dropped: u64,
    /// Kicks of the kernel (`sendto`) that failed for a reason other than "busy".
    pub tx_kick_errors: u64,
}

/// The kernel's counters for the sockets (`XDP_STATISTICS`), summed over queues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KernelStats {
    /// Frames dropped for reasons other than a full RX ring or empty fill ring.
    pub rx_dropped: u64,
    /// Invalid descriptors on the fill ring.
    pub rx_invalid_descs: u64,
    /// Invalid descriptors on the TX ring.
    pub tx_invalid_descs: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the fill ring was empty when a frame arrived.
    pub rx_fill_ring_empty: u64,
    /// Times the TX ring was found empty.
    pub tx_ring_empty: u64,
}

/// Which destinations this endpoint receives (the UDP backend's binding, applied in user space).
#[derive(Debug, Clone)]
struct RxFilter {
    local: SocketAddrV4,
    interface: Ipv4Addr,
    unicast: bool,
    /// `None`: every joined group; `Some(g)`: only `g` (Bind::Group); empty `groups`: none.
    only_group: Option<Ipv4Addr>,
    multicast: bool,
    groups: Vec<Ipv4Addr>,
    verify_udp_checksum: bool,
}

impl RxFilter {
    fn accepts(&self, destination: SocketAddrV4) -> bool {
        if destination.port() != self.local.port() {
            return false;
        }
        let ip = *destination.ip();
        if ip.is_multicast() {
            self.multicast && self.only_group.is_none_or(|g| g == ip) && self.groups.contains(&ip)
        } else {
            self.unicast && ip == self.interface
        }
    }
}

/// AF_XDP sockets behind [`PacketIo`]. See the [module docs](self).
pub struct XdpIo {
    // Dropped first: detaches the program before the sockets go.
    _link: OwnedFd,
    queues: Vec<XskQueue>,
    _map: OwnedFd,
    _prog: OwnedFd,
    helper: Socket,
    neighbours: Neighbours,
    filter: RxFilter,
    ifname: String,
    ifindex: u32,
    mac: MacAddr,
    netmask: Ipv4Addr,
    mtu: u32,
    native: bool,
    multicast_ttl: u8,
    udp_checksum: bool,
    /// The device completes sent checksums (the UMEM takes TX metadata): `Some(true)` when the
    /// kernel does it in software (`ChecksumOffload::KernelSoftware`).
    checksum_offload: Option<bool>,
    neighbour_timeout: Duration,
    caps: Capabilities,
    stats: XdpStats,
    next_rx_queue: usize,
}

impl std::fmt::Debug for XdpIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdpIo")
            .field("local", &self.filter.local)
            .field("ifname", &self.ifname)
            .field("queues", &self.queues.len())
            .field("native", &self.native)
            .field("zero_copy", &self.caps.zero_copy)
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

/// The interface with address `addr` in this namespace: name and netmask.
fn find_interface(addr: Ipv4Addr) -> Result<sys::IfAddr, XdpError> {
    sys::ipv4_interfaces()
        .map_err(XdpError::Interfaces)?
        .into_iter()
        .find(|i| i.addr == addr)
        .ok_or(XdpError::NoInterface { addr })
}

fn open_helper(config: &XdpConfig) -> Result<(Socket, SocketAddrV4), XdpError> {
    let addr = SocketAddrV4::new(config.interface, config.port);
    let err = |step| move |source| XdpError::Helper { step, addr, source };
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(err("creating"))?;
    s.set_nonblocking(true).map_err(err("setting O_NONBLOCK"))?;
    s.set_reuse_address(true).map_err(err("setting SO_REUSEADDR"))?;
    s.set_recv_buffer_size(HELPER_RECV_BUFFER).map_err(err("setting SO_RCVBUF"))?;
    s.bind(&SockAddr::from(addr)).map_err(err("binding"))?;
    s.set_multicast_if_v4(&config.interface).map_err(err("setting IP_MULTICAST_IF"))?;
    let local = s.local_addr().map_err(err("reading the local address"))?.as_socket_ipv4().ok_or_else(|| {
        XdpError::Helper { step: "reading the local address", addr, source: io::Error::other("not IPv4") }
    })?;
    Ok((s, local))
}

impl XdpIo {
    /// Opens the backend as `config` says (see the [module docs](self) for the steps). Must run in
    /// the network namespace of the interface; the value may be used from any thread afterwards.
    pub fn open(config: &XdpConfig) -> Result<XdpIo, XdpError> {
        config.validate()?;
        let iface = find_interface(config.interface)?;
        let ifname = iface.name.clone();
        let (helper, helper_addr) = open_helper(config)?;
        let local_port = helper_addr.port();
        let query = |what| {
            let ifname = ifname.clone();
            move |source| XdpError::Interface { what, ifname, source }
        };
        let ifindex = sys::if_index(helper.as_fd(), &ifname).map_err(query("index"))?;
        let mtu = sys::if_mtu(helper.as_fd(), &ifname).map_err(query("MTU"))?;
        let (hw_type, mac) = sys::if_hwaddr(helper.as_fd(), &ifname).map_err(query("hardware address"))?;
        if hw_type != libc::ARPHRD_ETHER {
            return Err(XdpError::NotEthernet { ifname, addr: config.interface, hw_type });
        }
        let queue_ids: Vec<u32> = match config.queues {
            Queues::Only(q) => vec![q],
            Queues::All => {
                let n = sys::rx_queue_count(helper.as_fd(), &ifname).unwrap_or_else(|e| {
                    tracing::debug!(%ifname, %e, "queue count not reported; using queue 0 only");
                    1
                });
                (0..n).collect()
            }
        };

        // A frame of the full MTU must fit one receive frame, else scatter-gather is needed.
        let frame_bytes = mtu as usize + frame::ETH_HEADER_LEN;
        let frame_size = match config.frame_size {
            AUTO if frame_bytes <= (2048 - RX_HEADROOM) as usize => 2048,
            AUTO => 4096,
            n => n,
        };
        let frames = if config.frames == AUTO { DEFAULT_UMEM_BYTES / frame_size } else { config.frames };
        let sg = frame_bytes > (frame_size - RX_HEADROOM) as usize;
        let mode_flag = match config.mode {
            XdpMode::Auto => 0,
            XdpMode::Copy => libc::XDP_COPY,
            XdpMode::ZeroCopy => libc::XDP_ZEROCOPY,
        };
        let mut queues = Vec::with_capacity(queue_ids.len());
        let mut sg_used = sg;
        let mut tx_checksum = match (config.udp_checksum, config.checksum_offload) {
            (false, _) | (_, ChecksumOffload::Off) => None,
            (true, ChecksumOffload::Device) => Some(false),
            (true, ChecksumOffload::KernelSoftware) => Some(true),
        };
        for &queue in &queue_ids {
            let mut setup = QueueSetup {
                ifindex,
                queue,
                frames,
                frame_size,
                bind_flags: libc::XDP_USE_NEED_WAKEUP | mode_flag | if sg_used { libc::XDP_USE_SG } else { 0 },
                tx_checksum,
            };
            let q = match open_queue(&setup) {
                // Kernels before 6.11 take no TX metadata flag: compute checksums here instead.
                Err((SetupStep::RegisterUmem, e))
                    if tx_checksum.is_some() && e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    tracing::warn!(%ifname, "AF_XDP TX metadata refused (kernel before 6.11?): UDP checksums computed in software");
                    tx_checksum = None;
                    setup.tx_checksum = None;
                    open_queue(&setup)
                }
                other => other,
            };
            let q = match q {
                // Kernels before 6.6 know no XDP_USE_SG: go on without, with a smaller datagram limit.
                Err((SetupStep::Bind, e)) if sg_used && e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(%ifname, "XDP_USE_SG refused (kernel before 6.6?): datagrams limited to one frame");
                    sg_used = false;
                    setup.bind_flags &= !libc::XDP_USE_SG;
                    open_queue(&setup)
                }
                other => other,
            };
            let q = q.map_err(|(step, source)| XdpError::Socket {
                step,
                queue,
                ifname: ifname.clone(),
                hint: hint_for(source.raw_os_error()),
                source,
            })?;
            queues.push(q);
        }

        let map_entries = queue_ids.iter().max().map_or(1, |m| m + 1);
        let map = sys::create_xskmap(map_entries).map_err(|source| XdpError::Map {
            step: "creating the XSKMAP",
            hint: hint_for(source.raw_os_error()),
            source,
        })?;
        for q in &queues {
            sys::xskmap_set(map.as_fd(), q.queue(), q.fd()).map_err(|source| XdpError::Map {
                step: "putting the socket into the XSKMAP",
                hint: hint_for(source.raw_os_error()),
                source,
            })?;
        }
        let spec = program::FilterSpec { port: local_port, host: config.interface };
        let insns = program::filter_program(spec, std::os::fd::AsRawFd::as_raw_fd(&map))?;
        let prog = load_program(&insns)?;
        let (link, native) = attach(prog.as_fd(), ifindex, &ifname, config.attach)?;

        let only_group = (config.bind == Bind::Group).then_some(config.group).flatten();
        let (unicast, multicast) = match (config.bind, config.group) {
            (Bind::Interface, _) | (Bind::Auto, None) => (true, false),
            (Bind::Wildcard, _) | (Bind::Auto, Some(_)) => (true, true),
            (Bind::Group, _) => (false, true),
        };
        let local_ip = match (config.bind, config.group) {
            (Bind::Interface, _) | (Bind::Auto, None) => config.interface,
            (Bind::Wildcard, _) | (Bind::Auto, Some(_)) => Ipv4Addr::UNSPECIFIED,
            (Bind::Group, g) => g.unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        let frame_limit = if sg_used { usize::MAX } else { (frame_size - RX_HEADROOM) as usize - HEADERS_LEN };
        let max_datagram = (mtu as usize).saturating_sub(IP_UDP_OVERHEAD).min(frame_limit);
        let zero_copy = queues.iter().all(XskQueue::zero_copy);
        let mut caps = Capabilities::new("af_xdp", max_datagram, config.max_batch);
        caps.zero_copy = zero_copy;
        caps.rx_destination = true;
        let neighbours = Neighbours::open(&ifname).map_err(XdpError::Neighbours)?;
        let mut io = XdpIo {
            _link: link,
            queues,
            _map: map,
            _prog: prog,
            helper,
            neighbours,
            filter: RxFilter {
                local: SocketAddrV4::new(local_ip, local_port),
                interface: config.interface,
                unicast,
                only_group,
                multicast,
                groups: Vec::new(),
                verify_udp_checksum: config.verify_udp_checksum,
            },
            ifname,
            ifindex,
            mac: MacAddr(mac),
            netmask: iface.netmask,
            mtu,
            native,
            multicast_ttl: config.multicast_ttl as u8,
            udp_checksum: config.udp_checksum,
            checksum_offload: tx_checksum,
            neighbour_timeout: config.neighbour_timeout,
            caps,
            stats: XdpStats::default(),
            next_rx_queue: 0,
        };
        if let Some(group) = config.group {
            io.join(group)?;
        }
        tracing::info!(
            ifname = %io.ifname,
            local = %io.filter.local,
            queues = io.queues.len(),
            attach = if native { "native" } else { "generic" },
            zero_copy,
            scatter_gather = sg_used,
            checksum_offload = tx_checksum.is_some(),
            mtu,
            max_datagram,
            "AF_XDP backend open"
        );
        Ok(io)
    }

    /// Joins `group`: announced through the helper socket (IGMP) so switches keep forwarding it,
    /// and accepted by the receive filter.
    pub fn join(&mut self, group: Ipv4Addr) -> Result<(), XdpError> {
        let interface = self.filter.interface;
        if !group.is_multicast() {
            return Err(XdpError::InvalidConfig(format!("{group} is not an IPv4 multicast group address")));
        }
        self.helper.join_multicast_v4(&group, &interface).map_err(|source| XdpError::Group {
            action: "joining",
            group,
            interface,
            source,
        })?;
        self.filter.groups.push(group);
        Ok(())
    }

    /// Leaves `group`.
    pub fn leave(&mut self, group: Ipv4Addr) -> Result<(), XdpError> {
        let interface = self.filter.interface;
        self.helper.leave_multicast_v4(&group, &interface).map_err(|source| XdpError::Group {
            action: "leaving",
            group,
            interface,
            source,
        })?;
        self.filter.groups.retain(|g| *g != group);
        Ok(())
    }

    /// The groups joined.
    pub fn groups(&self) -> &[Ipv4Addr] {
        &self.filter.groups
    }

    /// The interface's name.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The interface's index.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The link MTU found when opening.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// True if the program runs in the driver (native XDP), false for generic XDP.
    pub fn native(&self) -> bool {
        self.native
    }

    /// Number of queues with a socket.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The backend's own counters.
    pub fn stats(&self) -> XdpStats {
        self.stats
    }

    /// The kernel's counters, summed over the queues.
    pub fn kernel_stats(&self) -> io::Result<KernelStats> {
        let mut k = KernelStats::default();
        for q in &self.queues {
            let s = sys::xdp_statistics(q.fd())?;
            k.rx_dropped += s.rx_dropped;
            k.rx_invalid_descs += s.rx_invalid_descs;
            k.tx_invalid_descs += s.tx_invalid_descs;
            k.rx_ring_full += s.rx_ring_full;
            k.rx_fill_ring_empty += s.rx_fill_ring_empty_descs;
            k.tx_ring_empty += s.tx_ring_empty_descs;
        }
        Ok(k)
    }

    /// One line for a daemon's start-up log: mode, attachment, queues.
    pub fn describe(&self) -> String {
        format!(
            "AF_XDP on {} ({} mode, {} XDP, {} queue{}, MTU {}, datagrams up to {} bytes)",
            self.ifname,
            if self.caps.zero_copy { "zero-copy" } else { "copy" },
            if self.native { "native" } else { "generic" },
            self.queues.len(),
            if self.queues.len() == 1 { "" } else { "s" },
            self.mtu,
            self.caps.max_datagram
        )
    }

    /// The destination MAC for `ip`: a group's mapped address, or the on-link neighbour's.
    fn next_hop(&mut self, ip: Ipv4Addr) -> io::Result<MacAddr> {
        if ip.is_multicast() {
            return Ok(MacAddr::for_group(ip));
        }
        let mask = u32::from(self.netmask);
        if ip.is_broadcast() || u32::from(ip) & mask != u32::from(self.filter.interface) & mask {
            return Err(io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!(
                    "{ip} is not on the subnet of {} ({}/{}); the AF_XDP backend sends only to on-link hosts",
                    self.ifname, self.filter.interface, self.netmask
                ),
            ));
        }
        if ip == self.filter.interface {
            return Err(io::Error::new(
                io::ErrorKind::HostUnreachable,
                format!("{ip} is this host; AF_XDP frames leave the interface and cannot reach it"),
            ));
        }
        let helper = &self.helper;
        self.neighbours
            .resolve(ip, self.neighbour_timeout, || {
                helper.send_to(&[], &SockAddr::from(SocketAddrV4::new(ip, 9))).map(drop)
            })
            .map_err(|e| io::Error::new(io::ErrorKind::HostUnreachable, e))
    }
}

fn load_program(insns: &[program::Insn]) -> Result<OwnedFd, XdpError> {
    let first = match sys::load_xdp_program(insns, true, &mut []) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    // Kernels before 5.18 refuse BPF_F_XDP_HAS_FRAGS: such a program then works up to one page.
    if first.raw_os_error() == Some(libc::EINVAL) {
        if let Ok(fd) = sys::load_xdp_program(insns, false, &mut []) {
            tracing::warn!("the kernel refused a multi-buffer XDP program; loaded without BPF_F_XDP_HAS_FRAGS");
            return Ok(fd);
        }
    }
    // Once more with the verifier's log, for the error message.
    let mut log = vec![0u8; 64 << 10];
    let source = sys::load_xdp_program(insns, true, &mut log).err().unwrap_or(first);
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).trim().to_string();
    Err(XdpError::Load {
        hint: hint_for(source.raw_os_error()),
        log: if text.is_empty() { String::new() } else { format!("\nverifier log:\n{text}") },
        source,
    })
}

fn attach(prog: BorrowedFd<'_>, ifindex: u32, ifname: &str, mode: AttachMode) -> Result<(OwnedFd, bool), XdpError> {
    let try_mode = |native: bool| {
        let flags = if native { sys::XDP_FLAGS_DRV_MODE } else { sys::XDP_FLAGS_SKB_MODE };
        sys::attach_xdp_link(prog, ifindex, flags).map_err(|source| XdpError::Attach {
            ifname: ifname.to_owned(),
            mode: if native { "native" } else { "generic" },
            hint: hint_for(source.raw_os_error()),
            source,
        })
    };
    match mode {
        AttachMode::Native => try_mode(true).map(|l| (l, true)),
        AttachMode::Generic => try_mode(false).map(|l| (l, false)),
        AttachMode::Auto => match try_mode(true) {
            Ok(l) => Ok((l, true)),
            // Busy is busy in both modes; anything else may be the driver's lack of native XDP.
            Err(e) if matches!(e.errno(), Some(libc::EBUSY | libc::EEXIST | libc::EPERM)) => Err(e),
            Err(e) => {
                tracing::info!(%ifname, error = %e, "native XDP unavailable; attaching in generic mode");
                try_mode(false).map(|l| (l, false))
            }
        },
    }
}

impl AsFd for XdpIo {
    /// The first queue's AF_XDP socket.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queues[0].fd()
    }
}

impl PacketIo for XdpIo {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn local_addr(&self) -> SocketAddrV4 {
        self.filter.local
    }

    fn recv_batch(&mut self, batch: &mut RxBatch) -> Result<usize, IoError> {
        batch.clear();
        let XdpIo { queues, filter, stats, next_rx_queue, .. } = self;
        let n = queues.len();
        for k in 0..n {
            let budget = batch.capacity() - batch.len();
            if budget == 0 {
                break;
            }
            let q = &mut queues[(*next_rx_queue + k) % n];
            let counts = q.receive(budget, |bytes| match frame::parse(bytes, filter.verify_udp_checksum) {
                Ok(p) if filter.accepts(p.destination) => {
                    if p.payload.len() > batch.slot_size() {
                        stats.rx_truncated += 1;
                    }
                    if batch.push(p.payload, p.source, p.destination).is_ok() {
                        stats.rx_datagrams += 1;
                    }
                }
                Ok(_) => stats.rx_filtered += 1,
                Err(e) => {
                    stats.rx_malformed += 1;
                    tracing::trace!(error = %e, "dropped a malformed frame");
                }
            });
            stats.rx_descriptors += counts.descriptors;
            stats.rx_malformed += counts.bad_descriptors + counts.oversize;
        }
        *next_rx_queue = (*next_rx_queue + 1) % n;
        Ok(batch.len())
    }

    fn send_batch(&mut self, batch: &mut TxBatch) -> Result<usize, IoError> {
        self.queues[0].reclaim();
        let source = SocketAddrV4::new(self.filter.interface, self.filter.local.port());
        let mut posted = 0;
        let mut failure = None;
        while let Some(d) = batch.get(batch.sent() + posted) {
            let dst_ip = *d.destination.ip();
            let checked = if d.payload.len() > self.caps.max_datagram {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "a {}-byte datagram is longer than {} bytes, the most MTU {} carries unfragmented \
                         (the AF_XDP backend does not fragment)",
                        d.payload.len(),
                        self.caps.max_datagram,
                        self.mtu
                    ),
                ))
            } else {
                self.next_hop(dst_ip)
            };
            let dst_mac = match checked {
                Ok(mac) => mac,
                Err(e) => {
                    failure = Some((batch.sent() + posted, d.destination, e));
                    break;
                }
            };
            let q = &mut self.queues[0];
            if !q.can_post(HEADERS_LEN + d.payload.len()) {
                q.reclaim();
                if !q.can_post(HEADERS_LEN + d.payload.len()) {
                    // Push what is posted, then see whether frames came back.
                    if let Err(e) = q.flush() {
                        self.stats.tx_kick_errors += 1;
                        tracing::warn!(ifname = %self.ifname, error = %e, "kicking AF_XDP transmission failed");
                    }
                    q.reclaim();
                    if !q.can_post(HEADERS_LEN + d.payload.len()) {
                        break;
                    }
                }
            }
            let ttl = if dst_ip.is_multicast() { self.multicast_ttl } else { UNICAST_TTL };
            let h = FrameHeaders { src_mac: self.mac, dst_mac, source, destination: d.destination, ttl };
            // The kernel's software completion (`KernelSoftware`) sums only a packet's first
            // buffer (Linux 6.18 computes it before adding the others), so multi-buffer packets
            // get their checksum here in that mode.
            let offload = match self.checksum_offload {
                Some(true) => q.frames_for(HEADERS_LEN + d.payload.len()) == 1,
                Some(false) => true,
                None => false,
            };
            let (csum, offload) = match (self.udp_checksum, offload) {
                (false, _) => (0, None),
                (true, false) => (frame::udp_checksum(source, d.destination, d.payload), None),
                (true, true) => (
                    frame::udp_pseudo_header_sum(*source.ip(), *d.destination.ip(), d.payload.len()),
                    Some((frame::UDP_CSUM_START, frame::UDP_CSUM_OFFSET)),
                ),
            };
            let mut head = [0u8; HEADERS_LEN];
            frame::write_headers(&mut head, &h, d.payload.len(), csum);
            if !q.post(&head, d.payload, offload) {
                break;
            }
            posted += 1;
            if posted % self.caps.max_batch == 0 {
                if let Err(e) = q.flush() {
                    self.stats.tx_kick_errors += 1;
                    tracing::warn!(ifname = %self.ifname, error = %e, "kicking AF_XDP transmission failed");
                }
            }
        }
        if let Err(e) = self.queues[0].flush() {
            self.stats.tx_kick_errors += 1;
            tracing::warn!(ifname = %self.ifname, error = %e, "kicking AF_XDP transmission failed");
        }
        batch.mark_sent(posted);
        self.stats.tx_datagrams += posted as u64;
        if let Some((index, destination, source)) = failure {
            // As the trait says: the datagrams before it are sent (the batch's cursor shows how
            // many), this one is dropped and counted as sent, and the error is reported for it.
            batch.mark_sent(1);
            self.stats.tx_dropped += 1;
            return Err(IoError::Send { local: self.filter.local, destination, index, source });
        }
        Ok(posted)
    }

    fn wait_with(
        &mut self,
        interest: Interest,
        timeout: Option<Duration>,
        also: Option<BorrowedFd<'_>>,
    ) -> Result<Readiness, IoError> {
        let local = self.filter.local;
        let mut ready = Readiness::default();
        if interest.readable {
            ready.readable = self.queues.iter_mut().any(XskQueue::rx_ready);
        }
        if interest.writable {
            let q = &mut self.queues[0];
            q.reclaim();
            if q.tx_in_flight() > 0 {
                let _ = q.flush();
                q.reclaim();
            }
            ready.writable = q.can_post(HEADERS_LEN + self.caps.max_datagram);
        }
        if !ready.is_timeout() {
            return Ok(ready);
        }
        // Frames posted earlier but still on a TX ring (the kernel's per-kick budget, or memory
        // ran short) go out only with another kick: kick now, and if some remain, come back soon
        // rather than leave them waiting for the next send.
        let mut timeout = timeout;
        for q in &mut self.queues {
            if q.tx_in_flight() > 0 {
                let _ = q.flush();
                if q.tx_in_flight() > 0 {
                    timeout = Some(timeout.map_or(TX_RETRY, |t| t.min(TX_RETRY)));
                }
            }
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut fds: Vec<libc::pollfd> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut events = 0;
                if interest.readable {
                    events |= libc::POLLIN;
                }
                if interest.writable && i == 0 {
                    events |= libc::POLLOUT;
                }
                libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&q.fd()), events, revents: 0 }
            })
            .collect();
        // Every queue's socket and the caller's own descriptor, in one poll: a wake-up of any of
        // them ends the wait, so no queue and no command waits for another's traffic.
        let queues = fds.len();
        if let Some(fd) = also {
            fds.push(libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&fd), events: libc::POLLIN, revents: 0 });
        }
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match sys::poll(&mut fds, left) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(IoError::Wait { local, source }),
            }
        }
        if let Some(p) = fds.get(queues) {
            ready.woken = p.revents != 0;
        }
        for p in &fds[..queues] {
            let failed = p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
            ready.readable |= interest.readable && (failed || p.revents & libc::POLLIN != 0);
            ready.writable |= interest.writable && (failed || p.revents & libc::POLLOUT != 0);
        }
        Ok(ready)
    }

    fn counters(&self) -> Option<String> {
        let s = self.stats;
        let k = self.kernel_stats().unwrap_or_default();
        Some(format!(
            "rx {} datagrams ({} malformed, {} filtered, {} truncated), kernel rx drops: {} ring full, {} fill ring \
             empty, {} other; tx {} datagrams ({} dropped, {} dropped by the device, {} kick errors)",
            s.rx_datagrams,
            s.rx_malformed,
            s.rx_filtered,
            s.rx_truncated,
            k.rx_ring_full,
            k.rx_fill_ring_empty,
            k.rx_dropped,
            s.tx_datagrams,
            s.tx_dropped,
            self.queues.iter().map(XskQueue::tx_device_drops).sum::<u64>(),
            s.tx_kick_errors
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IF: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const G: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);

    #[test]
    fn receive_filter_follows_the_binding() {
        let f = |unicast, multicast, only_group, groups: Vec<Ipv4Addr>| RxFilter {
            local: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7000),
            interface: IF,
            unicast,
            multicast,
            only_group,
            groups,
            verify_udp_checksum: false,
        };
        let to = |ip, port| SocketAddrV4::new(ip, port);
        let wildcard = f(true, true, None, vec![G]);
        assert!(wildcard.accepts(to(IF, 7000)));
        assert!(wildcard.accepts(to(G, 7000)));
        assert!(!wildcard.accepts(to(G, 7001)), "other port");
        assert!(!wildcard.accepts(to(Ipv4Addr::new(239, 9, 9, 9), 7000)), "group not joined");
        assert!(!wildcard.accepts(to(Ipv4Addr::new(198, 18, 0, 3), 7000)), "another host's unicast");
        let interface = f(true, false, None, vec![G]);
        assert!(interface.accepts(to(IF, 7000)) && !interface.accepts(to(G, 7000)));
        let group = f(false, true, Some(G), vec![G, Ipv4Addr::new(239, 2, 2, 2)]);
        assert!(group.accepts(to(G, 7000)));
        assert!(!group.accepts(to(IF, 7000)));
        assert!(!group.accepts(to(Ipv4Addr::new(239, 2, 2, 2), 7000)));
    }
}
