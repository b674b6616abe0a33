//! The UDP backend: [`UdpIo`], a non-blocking UDP socket batched with `recvmmsg`/`sendmmsg`.
//!
//! Open it with a [`UdpConfig`]: the address of the interface to use, a port, and optionally a
//! multicast group to join. The socket
//!
//! * binds to the interface address, or to `0.0.0.0` when it joins a group (Linux delivers
//!   multicast only to sockets bound to the wildcard or to the group itself; see [`Bind`]);
//! * sends multicast out of that interface (`IP_MULTICAST_IF`) with TTL 1 and without looping it
//!   back to local sockets (`IP_MULTICAST_LOOP` off), both configurable;
//! * joins the group on that interface (`IP_ADD_MEMBERSHIP`) and receives only the groups it joined
//!   (`IP_MULTICAST_ALL` off);
//! * gets large kernel buffers (8 MiB receive, 4 MiB send by default), past the sysctl limits
//!   with `SO_RCVBUFFORCE`/`SO_SNDBUFFORCE` when running as root;
//! * reports each datagram's destination address (`IP_PKTINFO`), so group traffic and unicast
//!   replies on the same socket can be told apart;
//! * optionally ([`UdpConfig::reply_socket`]) sends from a second socket, bound to the interface
//!   address on a port of the kernel's choosing, and reads that socket first: the unicast answers
//!   to what this host sent come back on it, ahead of the group's traffic queued on the first
//!   (a host daemon's fault answers must not wait behind a push: `bench page-path`);
//! * optionally ([`UdpConfig::gso`]) sends runs of equal-size datagrams to one destination as one
//!   UDP GSO message (`UDP_SEGMENT`): the kernel's per-packet path then runs once per run, not
//!   once per datagram, up to the point where the run is cut into datagrams.
//!
//! # GSO and the lab
//!
//! A GSO run stays one packet through veth links and the bridge of a netlab lab, and is cut into
//! datagrams only in the receiving host. Whatever drops packets on the way (netlab's nftables loss
//! rules, a tbf queue overflowing) therefore drops whole runs of up to 64 datagrams at a time,
//! not independent datagrams. Leave GSO off for loss experiments unless that burst loss is what
//! you want; on a real NIC the segmentation happens in the driver or the hardware.
//!
//! # Measured
//!
//! `examples/lab_rate.rs`: 1400-byte datagrams multicast from one netlab host to two others, on
//! the project's 2-core development machine while it was busy (load ~5), so rates are rough:
//!
//! | sender            | datagrams/s to each receiver | sender CPU per datagram |
//! |-------------------|------------------------------|-------------------------|
//! | batch 1, no GSO   | ~26-41k                      | ~11-14 µs               |
//! | batch 64, no GSO  | ~36-44k                      | ~11 µs                  |
//! | batch 32-64, GSO  | ~156-169k                    | ~2 µs                   |
//!
//! Batching system calls barely matters: the cost is the kernel's per-packet path (veth, bridge,
//! both receivers' input) run in the sender's system call. GSO runs that path once per run.

pub(crate) mod sys;

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{Capabilities, Interest, IoError, PacketIo, Readiness, RxBatch, TxBatch};

/// Longest UDP payload over IPv4: 65535 - 20 (IP header) - 8 (UDP header).
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// Most messages one `recvmmsg`/`sendmmsg` call takes on Linux (`UIO_MAXIOV`).
pub const MAX_MMSG_BATCH: usize = 1024;
/// Default datagrams per system call.
pub const DEFAULT_MAX_BATCH: usize = 64;
/// Default receive buffer: about 6,000 datagrams of 1400 bytes, 20 ms at the rates measured here.
pub const DEFAULT_RECV_BUFFER: usize = 8 << 20;
/// Default send buffer.
pub const DEFAULT_SEND_BUFFER: usize = 4 << 20;

/// What went wrong opening or configuring a UDP backend. Each message names the step, the
/// addresses involved and the system's reason, with a hint where the cause is a common mistake.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    /// The configured interface address cannot name an interface.
    #[error("interface address {addr} is unusable: {reason}")]
    InvalidInterface {
        /// The address given.
        addr: Ipv4Addr,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The address given as a group is not an IPv4 multicast address.
    #[error("{group} is not an IPv4 multicast group address (224.0.0.0/4, e.g. 239.x.y.z)")]
    InvalidGroup {
        /// The address given.
        group: Ipv4Addr,
    },
    /// Some other setting is out of range or inconsistent.
    #[error("invalid UDP configuration: {0}")]
    InvalidConfig(String),
    /// The socket could not be created.
    #[error("creating a UDP socket failed: {0}")]
    Socket(#[source] io::Error),
    /// A socket option could not be set.
    #[error("setting {option} to {value} on the UDP socket failed: {source}")]
    SetOption {
        /// Option name, e.g. `IP_MULTICAST_TTL`.
        option: &'static str,
        /// The value tried.
        value: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// A socket option could not be read back.
    #[error("reading {option} from the UDP socket failed: {source}")]
    GetOption {
        /// Option name, e.g. `SO_RCVBUF`.
        option: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The socket's descriptor could not be duplicated.
    #[error("duplicating the UDP socket's descriptor failed: {0}")]
    Clone(#[source] io::Error),
    /// Binding failed.
    #[error("binding the UDP socket to {addr} failed: {source}{hint}")]
    Bind {
        /// The address and port tried.
        addr: SocketAddrV4,
        /// The system's error.
        #[source]
        source: io::Error,
        /// A likely cause, or empty.
        hint: String,
    },
    /// `IP_MULTICAST_IF` refused the interface address.
    #[error("selecting {interface} as the interface for outgoing multicast (IP_MULTICAST_IF) failed: {source}{hint}")]
    MulticastInterface {
        /// The interface address.
        interface: Ipv4Addr,
        /// The system's error.
        #[source]
        source: io::Error,
        /// A likely cause, or empty.
        hint: String,
    },
    /// Joining a group failed.
    #[error("joining multicast group {group} on {interface} failed: {source}{hint}")]
    Join {
        /// The group.
        group: Ipv4Addr,
        /// The interface address.
        interface: Ipv4Addr,
        /// The system's error.
        #[source]
        source: io::Error,
        /// A likely cause, or empty.
        hint: String,
    },
    /// Leaving a group failed.
    #[error("leaving multicast group {group} on {interface} failed: {source}")]
    Leave {
        /// The group.
        group: Ipv4Addr,
        /// The interface address.
        interface: Ipv4Addr,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The socket's own address could not be read back.
    #[error("reading the UDP socket's local address failed: {0}")]
    LocalAddr(#[source] io::Error),
}

/// The step an error hint is for: the same errno means different things in each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Bind,
    MulticastInterface,
    Join,
}

/// A likely cause of `e` in `step` when `addr` was the address given, as " (…)", or "".
fn hint(step: Step, e: &io::Error, addr: Ipv4Addr) -> String {
    let not_local = || format!(" ({addr} is not the address of any interface in this network namespace)");
    match (step, e.raw_os_error()) {
        (_, Some(libc::EADDRNOTAVAIL)) | (Step::MulticastInterface | Step::Join, Some(libc::ENODEV)) => not_local(),
        (Step::Bind, Some(libc::EADDRINUSE)) => {
            " (another socket has this port; pick another port, or set reuse_address on every socket sharing it)"
                .to_string()
        }
        (Step::Bind, Some(libc::EACCES)) => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)".to_string(),
        (Step::Join, Some(libc::EADDRINUSE)) => " (this socket has already joined that group)".to_string(),
        (Step::Join, Some(libc::ENOBUFS)) => " (too many groups joined: see net.ipv4.igmp_max_memberships)".to_string(),
        _ => String::new(),
    }
}

/// Which local address the socket binds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Bind {
    /// [`Wildcard`](Bind::Wildcard) if the configuration joins a group, else
    /// [`Interface`](Bind::Interface).
    #[default]
    Auto,
    /// The interface address: receives unicast to that address only, never multicast. Sends carry
    /// it as their source. Right for a socket that only sends (the server's multicast sender).
    Interface,
    /// `0.0.0.0`: receives unicast to any local address and the groups this socket joined. Needed
    /// to receive both group traffic and unicast replies on one socket.
    Wildcard,
    /// The group address: receives only that group's traffic on the port.
    Group,
}

/// Settings for [`UdpIo::open`]. Build with [`UdpConfig::new`] and the builder methods; every
/// field is public too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// Address of the local interface to use: bound to (see [`Bind`]), used for outgoing multicast
    /// and for joining groups.
    pub interface: Ipv4Addr,
    /// UDP port to bind; 0 lets the kernel choose.
    pub port: u16,
    /// Which address to bind.
    pub bind: Bind,
    /// Multicast group to join on the interface, if any.
    pub group: Option<Ipv4Addr>,
    /// TTL of outgoing multicast (default 1: the local network only; 0: this host only).
    pub multicast_ttl: u32,
    /// Loop outgoing multicast back to sockets on this host that joined the group (default off).
    pub multicast_loop: bool,
    /// Receive buffer to ask for, in bytes (0: leave the system default).
    pub recv_buffer: usize,
    /// Send buffer to ask for, in bytes (0: leave the system default).
    pub send_buffer: usize,
    /// Datagrams per `recvmmsg`/`sendmmsg` call, 1 to [`MAX_MMSG_BATCH`].
    pub max_batch: usize,
    /// `SO_REUSEADDR`, so several sockets on a host can bind the same port (several receivers of
    /// one group each get a copy). Default on.
    pub reuse_address: bool,
    /// Send runs of equal-size datagrams to one destination as UDP GSO messages when the kernel
    /// supports it (see the [module docs](self) for what that means for loss in a lab). Default off.
    pub gso: bool,
    /// Send from a second socket (bound to the interface address, a port of the kernel's choosing)
    /// and read it before the first, so that unicast answers to what this side sent do not queue
    /// behind the group's traffic. Default off.
    pub reply_socket: bool,
}

impl UdpConfig {
    /// Defaults for a socket on the interface with address `interface`, port `port`.
    pub fn new(interface: Ipv4Addr, port: u16) -> UdpConfig {
        UdpConfig {
            interface,
            port,
            bind: Bind::Auto,
            group: None,
            multicast_ttl: 1,
            multicast_loop: false,
            recv_buffer: DEFAULT_RECV_BUFFER,
            send_buffer: DEFAULT_SEND_BUFFER,
            max_batch: DEFAULT_MAX_BATCH,
            reuse_address: true,
            gso: false,
            reply_socket: false,
        }
    }

    /// Joins `group` on the interface when opened.
    pub fn join(mut self, group: Ipv4Addr) -> UdpConfig {
        self.group = Some(group);
        self
    }

    /// Binds as `bind` says.
    pub fn bind(mut self, bind: Bind) -> UdpConfig {
        self.bind = bind;
        self
    }

    /// Sets the TTL of outgoing multicast.
    pub fn multicast_ttl(mut self, ttl: u32) -> UdpConfig {
        self.multicast_ttl = ttl;
        self
    }

    /// Turns looping of outgoing multicast to local members on or off.
    pub fn multicast_loop(mut self, on: bool) -> UdpConfig {
        self.multicast_loop = on;
        self
    }

    /// Sets the receive buffer size to ask for (0: system default).
    pub fn recv_buffer(mut self, bytes: usize) -> UdpConfig {
        self.recv_buffer = bytes;
        self
    }

    /// Sets the send buffer size to ask for (0: system default).
    pub fn send_buffer(mut self, bytes: usize) -> UdpConfig {
        self.send_buffer = bytes;
        self
    }

    /// Sets the number of datagrams per system call.
    pub fn max_batch(mut self, n: usize) -> UdpConfig {
        self.max_batch = n;
        self
    }

    /// Turns `SO_REUSEADDR` on or off.
    pub fn reuse_address(mut self, on: bool) -> UdpConfig {
        self.reuse_address = on;
        self
    }

    /// Turns UDP GSO on sends on or off.
    pub fn gso(mut self, on: bool) -> UdpConfig {
        self.gso = on;
        self
    }

    /// Sends from, and reads first, a second socket for the answers to what is sent (see
    /// [`UdpConfig::reply_socket`](UdpConfig#structfield.reply_socket)).
    pub fn reply_socket(mut self, on: bool) -> UdpConfig {
        self.reply_socket = on;
        self
    }

    /// Checks the settings that can be checked without the system.
    pub fn validate(&self) -> Result<(), UdpError> {
        let bad = |reason| Err(UdpError::InvalidInterface { addr: self.interface, reason });
        if self.interface.is_unspecified() {
            return bad(
                "0.0.0.0 names no interface; give the address of the interface to use (127.0.0.1 for loopback)",
            );
        }
        if self.interface.is_multicast() {
            return bad("it is a multicast address; give the address of a local interface, and the group separately");
        }
        if self.interface.is_broadcast() {
            return bad("it is the broadcast address; give the address of a local interface");
        }
        if let Some(group) = self.group {
            if !group.is_multicast() {
                return Err(UdpError::InvalidGroup { group });
            }
        }
        if self.bind == Bind::Group && self.group.is_none() {
            return Err(UdpError::InvalidConfig("Bind::Group needs a group to join".into()));
        }
        if !(1..=MAX_MMSG_BATCH).contains(&self.max_batch) {
            return Err(UdpError::InvalidConfig(format!(
                "max_batch {} is out of range 1..={MAX_MMSG_BATCH}",
                self.max_batch
            )));
        }
        if self.multicast_ttl > 255 {
            return Err(UdpError::InvalidConfig(format!("multicast_ttl {} is above 255", self.multicast_ttl)));
        }
        Ok(())
    }

    /// The address the socket binds to.
    pub fn bind_addr(&self) -> SocketAddrV4 {
        let ip = match (self.bind, self.group) {
            (Bind::Interface, _) | (Bind::Auto, None) => self.interface,
            (Bind::Wildcard, _) | (Bind::Auto, Some(_)) => Ipv4Addr::UNSPECIFIED,
            (Bind::Group, group) => group.unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        SocketAddrV4::new(ip, self.port)
    }
}

/// A UDP socket behind [`PacketIo`]. See the [module docs](self).
pub struct UdpIo {
    socket: Socket,
    local: SocketAddrV4,
    interface: Ipv4Addr,
    groups: Vec<Ipv4Addr>,
    mmsg: sys::Mmsg,
    caps: Capabilities,
    recv_buffer: usize,
    send_buffer: usize,
    /// Longest datagram sent in GSO runs (0: GSO off). Lowered when the kernel refuses a run.
    gso_max_segment: usize,
    /// The reply socket and its address ([`UdpConfig::reply_socket`]): every send goes from it,
    /// and it is read first.
    reply: Option<(Socket, SocketAddrV4)>,
}

impl std::fmt::Debug for UdpIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpIo")
            .field("local", &self.local)
            .field("interface", &self.interface)
            .field("groups", &self.groups)
            .field("max_batch", &self.caps.max_batch)
            .field("gso_max_segment", &self.gso_max_segment)
            .field("reply", &self.reply.as_ref().map(|(_, a)| *a))
            .finish_non_exhaustive()
    }
}

/// Which buffer [`set_buffer`] sizes.
#[derive(Clone, Copy)]
enum Buffer {
    Recv,
    Send,
}

/// Asks for a `bytes`-byte buffer: with the `*BUFFORCE` option first (root only, ignores the
/// sysctl maximum), else the ordinary option (capped by `net.core.{r,w}mem_max`).
fn set_buffer(socket: &Socket, which: Buffer, bytes: usize) -> Result<(), UdpError> {
    if bytes == 0 {
        return Ok(());
    }
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let (force, name) = match which {
        Buffer::Recv => (libc::SO_RCVBUFFORCE, "SO_RCVBUF"),
        Buffer::Send => (libc::SO_SNDBUFFORCE, "SO_SNDBUF"),
    };
    if sys::set_int_option(socket.as_fd(), libc::SOL_SOCKET, force, value).is_ok() {
        return Ok(());
    }
    let plain = match which {
        Buffer::Recv => socket.set_recv_buffer_size(bytes),
        Buffer::Send => socket.set_send_buffer_size(bytes),
    };
    plain.map_err(|source| UdpError::SetOption { option: name, value: bytes.to_string(), source })
}

impl UdpIo {
    /// Opens a socket as `config` says: validate, create, set options, bind, join.
    pub fn open(config: &UdpConfig) -> Result<UdpIo, UdpError> {
        config.validate()?;
        let (socket, local) = open_socket(config, config.bind_addr(), |socket| {
            let set = |option: &'static str| move |source| UdpError::SetOption { option, value: "on".into(), source };
            if config.reuse_address {
                socket.set_reuse_address(true).map_err(set("SO_REUSEADDR"))?;
            }
            sys::set_int_option(socket.as_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, 1).map_err(set("IP_PKTINFO"))
        })?;
        socket.set_multicast_all_v4(false).map_err(|source| UdpError::SetOption {
            option: "IP_MULTICAST_ALL",
            value: "off".into(),
            source,
        })?;
        let get = |option| move |source| UdpError::GetOption { option, source };
        let recv_buffer = socket.recv_buffer_size().map_err(get("SO_RCVBUF"))?;
        let send_buffer = socket.send_buffer_size().map_err(get("SO_SNDBUF"))?;

        let gso = config.gso && sys::gso_supported(socket.as_fd());
        let mut caps = Capabilities::new("udp", MAX_UDP_PAYLOAD, config.max_batch);
        caps.rx_destination = true;
        caps.gso = gso;
        let mut io = UdpIo {
            socket,
            local,
            interface: config.interface,
            groups: Vec::new(),
            mmsg: sys::Mmsg::new(config.max_batch),
            caps,
            recv_buffer,
            send_buffer,
            gso_max_segment: if gso { MAX_UDP_PAYLOAD } else { 0 },
            reply: None,
        };
        if let Some(group) = config.group {
            io.join(group)?;
        }
        if config.reply_socket {
            io.reply = Some(open_reply(config)?);
        }
        Ok(io)
    }

    /// The reply socket's address, if there is one ([`UdpConfig::reply_socket`]).
    pub fn reply_addr(&self) -> Option<SocketAddrV4> {
        self.reply.as_ref().map(|(_, a)| *a)
    }

    /// The socket sends go from: the reply socket if there is one.
    fn send_socket(&self) -> (&Socket, SocketAddrV4) {
        self.reply.as_ref().map_or((&self.socket, self.local), |(s, a)| (s, *a))
    }

    /// Joins `group` on the configured interface (also after opening, e.g. when a session's group
    /// becomes known). To receive it the socket must be bound to the wildcard or the group.
    pub fn join(&mut self, group: Ipv4Addr) -> Result<(), UdpError> {
        if !group.is_multicast() {
            return Err(UdpError::InvalidGroup { group });
        }
        self.socket.join_multicast_v4(&group, &self.interface).map_err(|source| UdpError::Join {
            group,
            interface: self.interface,
            hint: hint(Step::Join, &source, self.interface),
            source,
        })?;
        self.groups.push(group);
        Ok(())
    }

    /// Another handle on the same socket (a duplicated descriptor) with its own descriptor
    /// arrays, so that one thread can receive while another sends. Group membership belongs to
    /// the socket: a join or leave through either handle applies to both, though each lists only
    /// the groups known when it was cloned plus its own joins.
    pub fn try_clone(&self) -> Result<UdpIo, UdpError> {
        let socket = self.socket.try_clone().map_err(UdpError::Clone)?;
        Ok(UdpIo {
            socket,
            local: self.local,
            interface: self.interface,
            groups: self.groups.clone(),
            mmsg: sys::Mmsg::new(self.caps.max_batch),
            caps: self.caps,
            recv_buffer: self.recv_buffer,
            send_buffer: self.send_buffer,
            gso_max_segment: self.gso_max_segment,
            reply: match &self.reply {
                Some((r, a)) => Some((r.try_clone().map_err(UdpError::Clone)?, *a)),
                None => None,
            },
        })
    }

    /// Leaves `group`.
    pub fn leave(&mut self, group: Ipv4Addr) -> Result<(), UdpError> {
        self.socket.leave_multicast_v4(&group, &self.interface).map_err(|source| UdpError::Leave {
            group,
            interface: self.interface,
            source,
        })?;
        self.groups.retain(|g| *g != group);
        Ok(())
    }

    /// The groups joined.
    pub fn groups(&self) -> &[Ipv4Addr] {
        &self.groups
    }

    /// The interface address from the configuration.
    pub fn interface(&self) -> Ipv4Addr {
        self.interface
    }

    /// The receive buffer the kernel granted, in bytes (as `getsockopt` reports it: Linux doubles
    /// the requested size to account for its bookkeeping).
    pub fn recv_buffer_size(&self) -> usize {
        self.recv_buffer
    }

    /// The send buffer the kernel granted, in bytes (doubled as for the receive buffer).
    pub fn send_buffer_size(&self) -> usize {
        self.send_buffer
    }

    /// The longest datagram that still goes out in GSO runs: 0 if GSO is off or unsupported,
    /// lowered below a segment size the kernel refused (typically longer than the path MTU allows
    /// without fragmenting, which GSO cannot do).
    pub fn gso_max_segment(&self) -> usize {
        self.gso_max_segment
    }

    /// The underlying socket, for options this type does not cover.
    pub fn socket(&self) -> &Socket {
        &self.socket
    }
}

/// A non-blocking UDP socket with the configured buffers, `before_bind`'s options, bound to `bind`,
/// sending multicast out of the interface with the configured TTL and loop setting; with the
/// address it got.
fn open_socket(
    config: &UdpConfig,
    bind: SocketAddrV4,
    before_bind: impl FnOnce(&Socket) -> Result<(), UdpError>,
) -> Result<(Socket, SocketAddrV4), UdpError> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(UdpError::Socket)?;
    let set = |option: &'static str, value: String| move |source| UdpError::SetOption { option, value, source };
    socket.set_nonblocking(true).map_err(set("O_NONBLOCK", "on".into()))?;
    set_buffer(&socket, Buffer::Recv, config.recv_buffer)?;
    set_buffer(&socket, Buffer::Send, config.send_buffer)?;
    before_bind(&socket)?;
    socket.bind(&SockAddr::from(bind)).map_err(|source| UdpError::Bind {
        addr: bind,
        hint: hint(Step::Bind, &source, *bind.ip()),
        source,
    })?;
    socket.set_multicast_if_v4(&config.interface).map_err(|source| UdpError::MulticastInterface {
        interface: config.interface,
        hint: hint(Step::MulticastInterface, &source, config.interface),
        source,
    })?;
    socket
        .set_multicast_ttl_v4(config.multicast_ttl)
        .map_err(set("IP_MULTICAST_TTL", config.multicast_ttl.to_string()))?;
    socket
        .set_multicast_loop_v4(config.multicast_loop)
        .map_err(set("IP_MULTICAST_LOOP", config.multicast_loop.to_string()))?;
    let local = socket
        .local_addr()
        .map_err(UdpError::LocalAddr)?
        .as_socket_ipv4()
        .ok_or_else(|| UdpError::LocalAddr(io::Error::other("the socket has no IPv4 address")))?;
    Ok((socket, local))
}

/// The reply socket ([`UdpConfig::reply_socket`]): bound to the interface address on a port the
/// kernel picks, otherwise set up as the main socket.
fn open_reply(config: &UdpConfig) -> Result<(Socket, SocketAddrV4), UdpError> {
    open_socket(config, SocketAddrV4::new(config.interface, 0), |_| Ok(()))
}

/// Receives into `batch` from `fd` until it is drained or the batch is full; false on an error
/// that left datagrams in the batch (the error comes back on the next call).
fn recv_into(
    mmsg: &mut sys::Mmsg,
    fd: BorrowedFd<'_>,
    local: SocketAddrV4,
    batch: &mut RxBatch,
) -> Result<(), IoError> {
    while !batch.is_full() {
        match mmsg.recv(fd, batch, local) {
            // Fewer than asked: the socket is drained.
            Ok((n, asked)) if n < asked => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Hand over what arrived; the error comes back on the next call.
            Err(_) if !batch.is_empty() => break,
            Err(source) => return Err(IoError::Recv { local, source }),
        }
    }
    Ok(())
}

impl AsFd for UdpIo {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl PacketIo for UdpIo {
    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    fn recv_batch(&mut self, batch: &mut RxBatch) -> Result<usize, IoError> {
        batch.clear();
        if let Some((reply, local)) = &self.reply {
            // Answers first: whatever the group has queued on the other socket waits.
            recv_into(&mut self.mmsg, reply.as_fd(), *local, batch)?;
        }
        recv_into(&mut self.mmsg, self.socket.as_fd(), self.local, batch)?;
        Ok(batch.len())
    }

    fn send_batch(&mut self, batch: &mut TxBatch) -> Result<usize, IoError> {
        let mut sent = 0;
        // Field by field (not `send_socket`), so that `mmsg` and the GSO size stay mutable.
        let (socket, local) = match &self.reply {
            Some((reply, addr)) => (reply, *addr),
            None => (&self.socket, self.local),
        };
        let fd = socket.as_fd();
        while !batch.is_sent() {
            match self.mmsg.send(fd, batch, self.gso_max_segment) {
                Ok(n) => {
                    batch.mark_sent(n);
                    sent += n;
                }
                Err(f) if f.error.kind() == io::ErrorKind::WouldBlock => break,
                Err(f) if f.error.kind() == io::ErrorKind::Interrupted => {}
                // The kernel refused a GSO run (segments too long for the path, no checksum
                // offload, ...): send runs of that size one by one from now on, starting with this.
                Err(sys::SendFailure { error, gso_segment: Some(segment) })
                    if matches!(error.raw_os_error(), Some(libc::EINVAL | libc::EIO | libc::EMSGSIZE)) =>
                {
                    self.gso_max_segment = self.gso_max_segment.min(segment - 1);
                }
                // Report what went out; the failing datagram comes first on the next call.
                Err(_) if sent > 0 => break,
                Err(sys::SendFailure { error: source, .. }) => {
                    let index = batch.sent();
                    let destination = batch.get(index).map_or(local, |d| d.destination);
                    batch.mark_sent(1);
                    return Err(IoError::Send { local, destination, index, source });
                }
            }
        }
        Ok(sent)
    }

    fn wait_with(
        &mut self,
        interest: Interest,
        timeout: Option<Duration>,
        also: Option<BorrowedFd<'_>>,
    ) -> Result<Readiness, IoError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let (send, _) = self.send_socket();
            // With a reply socket, it sends (writability is its) and both are read.
            let read_too = self.reply.as_ref().map(|_| self.socket.as_fd());
            match sys::poll_sockets(send.as_fd(), read_too, interest, left, also) {
                Ok(r) => return Ok(r),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(IoError::Wait { local: self.local, source }),
            }
        }
    }
}

/// `ppoll(2)` for reading on `fd` and on `also`, for backends built on a readiness descriptor (the
/// in-memory one).
pub(crate) fn poll_readable(
    fd: BorrowedFd<'_>,
    timeout: Option<Duration>,
    also: Option<BorrowedFd<'_>>,
) -> std::io::Result<Readiness> {
    sys::poll(fd, Interest::READABLE, timeout, also)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;
    const GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 0, 1);

    #[test]
    fn defaults() {
        let c = UdpConfig::new(LO, 7000);
        assert_eq!((c.multicast_ttl, c.multicast_loop, c.reuse_address), (1, false, true));
        assert_eq!((c.max_batch, c.bind, c.group), (DEFAULT_MAX_BATCH, Bind::Auto, None));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bind_address_follows_the_mode() {
        let c = UdpConfig::new(LO, 7000);
        assert_eq!(c.bind_addr(), SocketAddrV4::new(LO, 7000));
        let j = c.clone().join(GROUP);
        assert_eq!(j.bind_addr(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7000));
        assert_eq!(j.clone().bind(Bind::Interface).bind_addr(), SocketAddrV4::new(LO, 7000));
        assert_eq!(j.clone().bind(Bind::Group).bind_addr(), SocketAddrV4::new(GROUP, 7000));
        assert_eq!(c.bind(Bind::Wildcard).bind_addr(), SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7000));
    }

    #[test]
    fn validation_messages() {
        let msg = |c: UdpConfig| c.validate().map_err(|e| e.to_string()).err().unwrap_or_default();
        assert_eq!(
            msg(UdpConfig::new(Ipv4Addr::UNSPECIFIED, 1)),
            "interface address 0.0.0.0 is unusable: 0.0.0.0 names no interface; give the address of the \
             interface to use (127.0.0.1 for loopback)"
        );
        assert!(
            msg(UdpConfig::new(GROUP, 1)).starts_with("interface address 239.255.0.1 is unusable: it is a multicast")
        );
        assert!(msg(UdpConfig::new(Ipv4Addr::BROADCAST, 1)).contains("broadcast"));
        assert_eq!(
            msg(UdpConfig::new(LO, 1).join(LO)),
            "127.0.0.1 is not an IPv4 multicast group address (224.0.0.0/4, e.g. 239.x.y.z)"
        );
        assert_eq!(
            msg(UdpConfig::new(LO, 1).max_batch(0)),
            "invalid UDP configuration: max_batch 0 is out of range 1..=1024"
        );
        assert!(msg(UdpConfig::new(LO, 1).max_batch(MAX_MMSG_BATCH + 1)).contains("max_batch 1025"));
        assert!(msg(UdpConfig::new(LO, 1).bind(Bind::Group)).contains("Bind::Group needs a group"));
        assert!(msg(UdpConfig::new(LO, 1).multicast_ttl(256)).contains("multicast_ttl 256"));
    }

    #[test]
    fn hints_name_the_likely_cause() {
        let h = |step, errno| hint(step, &io::Error::from_raw_os_error(errno), Ipv4Addr::new(127, 0, 0, 1));
        for step in [Step::Bind, Step::MulticastInterface, Step::Join] {
            assert!(h(step, libc::EADDRNOTAVAIL).contains("127.0.0.1 is not the address of any interface"));
            assert_eq!(h(step, libc::EINVAL), "");
        }
        assert!(h(Step::Bind, libc::EADDRINUSE).contains("reuse_address"));
        assert!(h(Step::Join, libc::EADDRINUSE).contains("already joined"));
        assert!(h(Step::Join, libc::ENODEV).contains("not the address of any interface"));
        assert_eq!(h(Step::MulticastInterface, libc::EADDRINUSE), "");
    }
}
