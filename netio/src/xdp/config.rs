//! Settings of the AF_XDP backend: [`XdpConfig`] and its choices.

use std::net::Ipv4Addr;
use std::time::Duration;

use super::XdpError;
use crate::udp::{Bind, UdpConfig};

/// UMEM bytes per queue when [`XdpConfig::frames`] is left to the backend: 32 MiB, half for
/// receiving. At MTU 1500 (2 KiB frames) that is 8192 frames of receive buffer; at MTU 9000 (4 KiB
/// frames, three per jumbo frame) about 1365 jumbo frames. A receiver that falls behind by more
/// (a busy host) drops at the ring and pays in repairs: 16 MiB halved the MTU-1500 receive buffer
/// and cost 8,500 repairs per 64 MiB push to 4 hosts in `bench xdp-daemons`.
pub const DEFAULT_UMEM_BYTES: u32 = 32 << 20;
/// [`XdpConfig::frame_size`] and [`XdpConfig::frames`] value that lets the backend choose: 2 KiB
/// frames when a full-MTU frame fits one, else 4 KiB; frames for [`DEFAULT_UMEM_BYTES`].
pub const AUTO: u32 = 0;
/// The fewest frames an automatic UMEM has (of 4 KiB).
const MIN_AUTO_FRAMES: u32 = DEFAULT_UMEM_BYTES / 4096;
/// Default datagrams per ring operation, as reported in [`Capabilities::max_batch`](crate::Capabilities::max_batch).
pub const DEFAULT_MAX_BATCH: usize = 64;
/// Default wait for a neighbour's ARP reply on first contact.
pub const DEFAULT_NEIGHBOUR_TIMEOUT: Duration = Duration::from_secs(1);

/// Who completes the UDP checksum of a sent datagram (with [`XdpConfig::udp_checksum`] on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChecksumOffload {
    /// This process computes every checksum: one more pass over each payload.
    Off,
    /// The device: each packet carries AF_XDP TX metadata asking for the checksum
    /// (`XDP_TXMD_FLAGS_CHECKSUM`, Linux 6.11+ in copy mode). A NIC computes it in hardware; in
    /// copy mode the kernel marks the packet `CHECKSUM_PARTIAL`, exactly as it does for its own UDP
    /// sockets, so a virtual link (veth) never computes it and local receivers trust it. Where the
    /// kernel refuses TX metadata, falls back to [`Off`](Self::Off) with a log line.
    #[default]
    Device,
    /// As [`Device`](Self::Device), but the kernel completes the checksum in software before the
    /// packet leaves (`XDP_UMEM_TX_SW_CSUM`): for checking the offload requests on virtual links.
    /// Multi-buffer packets (jumbo frames) get theirs from this process instead: the kernel sums
    /// only their first buffer in this mode.
    KernelSoftware,
}

/// Whether the kernel may move frames without copying them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// Zero-copy if the driver supports it, else copy mode (the kernel decides at bind time).
    #[default]
    Auto,
    /// Copy mode only (works on every driver, veth included).
    Copy,
    /// Zero-copy only: opening fails on drivers without it.
    ZeroCopy,
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// Native (in the driver) if it works, else generic.
    #[default]
    Auto,
    /// In the driver only.
    Native,
    /// Generic (on the kernel's skb path): every driver, slower.
    Generic,
}

/// Which receive queues get a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Queues {
    /// One socket per receive queue of the interface (`ETHTOOL_GCHANNELS`; 1 if not reported).
    #[default]
    All,
    /// Only this queue (traffic the NIC steers elsewhere goes to the kernel).
    Only(u32),
}

/// Settings for [`XdpIo::open`](super::XdpIo::open). The first fields mirror [`UdpConfig`]; build from one with
/// [`XdpConfig::from_udp`], or with [`XdpConfig::new`] and the builder methods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdpConfig {
    /// Address of the local interface to use.
    pub interface: Ipv4Addr,
    /// UDP port (0: the helper socket picks a free one).
    pub port: u16,
    /// Which destinations are received, as for the UDP backend: `Interface` unicast only,
    /// `Wildcard` unicast and joined groups, `Group` that group only, `Auto` as `Wildcard` if a
    /// group is joined, else `Interface`.
    pub bind: Bind,
    /// Multicast group to join when opening.
    pub group: Option<Ipv4Addr>,
    /// TTL of outgoing multicast (1 default).
    pub multicast_ttl: u32,
    /// Bytes per UMEM frame: 2048, 4096 or [`AUTO`] (the default).
    pub frame_size: u32,
    /// UMEM frames per queue, a power of two from 64 to 2^18 (half receive, half send), or
    /// [`AUTO`] (the default: [`DEFAULT_UMEM_BYTES`] worth).
    pub frames: u32,
    /// Datagrams per ring operation (reported as `max_batch`), 1 to `frames / 2`.
    pub max_batch: usize,
    /// Zero-copy or copy mode.
    pub mode: XdpMode,
    /// Native or generic attachment.
    pub attach: AttachMode,
    /// Queues to bind.
    pub queues: Queues,
    /// Fill in the UDP checksum of sent datagrams (default on; off sends 0, "no checksum").
    pub udp_checksum: bool,
    /// Who computes those checksums (default: the device, see [`ChecksumOffload`]).
    pub checksum_offload: ChecksumOffload,
    /// Drop received datagrams whose nonzero UDP checksum is wrong (default off: see the module docs).
    pub verify_udp_checksum: bool,
    /// How long a send waits for a neighbour's ARP reply on first contact.
    pub neighbour_timeout: Duration,
}

impl XdpConfig {
    /// Defaults for the interface with address `interface`, port `port`.
    pub fn new(interface: Ipv4Addr, port: u16) -> XdpConfig {
        XdpConfig {
            interface,
            port,
            bind: Bind::Auto,
            group: None,
            multicast_ttl: 1,
            frame_size: AUTO,
            frames: AUTO,
            max_batch: DEFAULT_MAX_BATCH,
            mode: XdpMode::Auto,
            attach: AttachMode::Auto,
            queues: Queues::All,
            udp_checksum: true,
            checksum_offload: ChecksumOffload::Device,
            verify_udp_checksum: false,
            neighbour_timeout: DEFAULT_NEIGHBOUR_TIMEOUT,
        }
    }

    /// The AF_XDP equivalent of a UDP backend configuration: same interface, port, bind, group,
    /// multicast TTL and batch size; the rest default. `multicast_loop`, buffer sizes, GSO and
    /// `reuse_address` have no equivalent (see the module docs).
    pub fn from_udp(udp: &UdpConfig) -> XdpConfig {
        let mut c = XdpConfig::new(udp.interface, udp.port);
        c.bind = udp.bind;
        c.group = udp.group;
        c.multicast_ttl = udp.multicast_ttl;
        c.max_batch = udp.max_batch.min(MIN_AUTO_FRAMES as usize / 2);
        c
    }

    /// Joins `group` when opened.
    pub fn join(mut self, group: Ipv4Addr) -> XdpConfig {
        self.group = Some(group);
        self
    }

    /// Receives as `bind` says.
    pub fn bind(mut self, bind: Bind) -> XdpConfig {
        self.bind = bind;
        self
    }

    /// Sets the UMEM frame size (2048, 4096 or [`AUTO`]).
    pub fn frame_size(mut self, bytes: u32) -> XdpConfig {
        self.frame_size = bytes;
        self
    }

    /// Sets the UMEM frames per queue (or [`AUTO`]).
    pub fn frames(mut self, n: u32) -> XdpConfig {
        self.frames = n;
        self
    }

    /// Sets zero-copy or copy mode.
    pub fn mode(mut self, mode: XdpMode) -> XdpConfig {
        self.mode = mode;
        self
    }

    /// Sets native or generic attachment.
    pub fn attach(mut self, attach: AttachMode) -> XdpConfig {
        self.attach = attach;
        self
    }

    /// Sets the queues to bind.
    pub fn queues(mut self, queues: Queues) -> XdpConfig {
        self.queues = queues;
        self
    }

    /// Turns the UDP checksum of sent datagrams on or off.
    pub fn udp_checksum(mut self, on: bool) -> XdpConfig {
        self.udp_checksum = on;
        self
    }

    /// Chooses who computes the UDP checksums of sent datagrams.
    pub fn checksum_offload(mut self, offload: ChecksumOffload) -> XdpConfig {
        self.checksum_offload = offload;
        self
    }

    /// Turns verification of received UDP checksums on or off.
    pub fn verify_udp_checksum(mut self, on: bool) -> XdpConfig {
        self.verify_udp_checksum = on;
        self
    }

    /// Checks the settings that can be checked without the system.
    pub fn validate(&self) -> Result<(), XdpError> {
        let bad = |reason: String| Err(XdpError::InvalidConfig(reason));
        if self.interface.is_unspecified() || self.interface.is_multicast() || self.interface.is_broadcast() {
            return bad(format!(
                "{} names no interface; give the address of a local Ethernet interface",
                self.interface
            ));
        }
        if let Some(group) = self.group {
            if !group.is_multicast() {
                return bad(format!("{group} is not an IPv4 multicast group address (224.0.0.0/4, e.g. 239.x.y.z)"));
            }
        }
        if self.bind == Bind::Group && self.group.is_none() {
            return bad("Bind::Group needs a group to join".into());
        }
        if ![AUTO, 2048, 4096].contains(&self.frame_size) {
            return bad(format!("frame_size {} is not 2048 or 4096", self.frame_size));
        }
        if self.frames != AUTO && (!self.frames.is_power_of_two() || !(64..=1 << 18).contains(&self.frames)) {
            return bad(format!("frames {} is not a power of two from 64 to 262144", self.frames));
        }
        let frames = if self.frames == AUTO { MIN_AUTO_FRAMES } else { self.frames };
        if !(1..=frames as usize / 2).contains(&self.max_batch) {
            return bad(format!("max_batch {} is out of range 1..={}", self.max_batch, frames / 2));
        }
        if self.multicast_ttl > 255 {
            return bad(format!("multicast_ttl {} is above 255", self.multicast_ttl));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IF: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const G: Ipv4Addr = Ipv4Addr::new(239, 1, 1, 1);

    #[test]
    fn config_from_udp_keeps_the_shared_fields() {
        let udp = UdpConfig::new(IF, 7000).join(G).bind(Bind::Wildcard).multicast_ttl(3).max_batch(32);
        let x = XdpConfig::from_udp(&udp);
        assert_eq!(
            (x.interface, x.port, x.group, x.bind, x.multicast_ttl, x.max_batch),
            (IF, 7000, Some(G), Bind::Wildcard, 3, 32)
        );
        assert!(x.validate().is_ok());
        let big = XdpConfig::from_udp(&UdpConfig::new(IF, 1).max_batch(1024));
        assert_eq!(big.max_batch, 1024);
        assert!(big.validate().is_ok());
    }

    #[test]
    fn validation_messages() {
        let msg = |c: XdpConfig| c.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(
            msg(XdpConfig::new(Ipv4Addr::UNSPECIFIED, 1)),
            "invalid AF_XDP configuration: 0.0.0.0 names no interface; give the address of a local Ethernet interface"
        );
        assert!(msg(XdpConfig::new(IF, 1).join(IF)).contains("198.18.0.2 is not an IPv4 multicast group address"));
        assert!(msg(XdpConfig::new(IF, 1).frame_size(3000)).contains("frame_size 3000 is not 2048 or 4096"));
        assert!(msg(XdpConfig::new(IF, 1).frames(100)).contains("frames 100 is not a power of two"));
        assert!(msg(XdpConfig::new(IF, 1).bind(Bind::Group)).contains("Bind::Group needs a group"));
        let mut c = XdpConfig::new(IF, 1);
        c.max_batch = 0;
        assert!(msg(c).contains("max_batch 0 is out of range 1..=4096"));
    }
}
