//! Ethernet II / IPv4 / UDP headers, built and parsed as pure code: the AF_XDP backend sees whole
//! frames, so it writes and checks what the kernel's socket path would.
//!
//! * [`write_headers`] writes the 42 bytes in front of a payload (no VLAN tag, no IP options, DF
//!   set, identification 0 as RFC 6864 allows for atomic datagrams), with the IPv4 header checksum
//!   and, if given, the UDP checksum from [`udp_checksum`].
//! * [`parse`] checks a received frame and returns its addresses and payload, or a [`FrameError`]
//!   saying what is wrong. It never panics, whatever the bytes (property-tested below).
//! * [`MacAddr::for_group`] maps an IPv4 group to its Ethernet address (`01:00:5e` plus the low 23
//!   bits, RFC 1112).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::str::FromStr;

/// Bytes of the Ethernet II header (no VLAN tag).
pub const ETH_HEADER_LEN: usize = 14;
/// Bytes of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// Bytes of the UDP header.
pub const UDP_HEADER_LEN: usize = 8;
/// Bytes in front of the payload of a frame built by [`write_headers`].
pub const HEADERS_LEN: usize = ETH_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN;
/// IP and UDP header bytes, counted in the link MTU: payload = MTU - 28.
pub const IP_UDP_OVERHEAD: usize = IPV4_HEADER_LEN + UDP_HEADER_LEN;

const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTO_UDP: u8 = 17;
/// Don't Fragment, in the flags/fragment-offset field.
const FLAG_DF: u16 = 0x4000;
/// More Fragments plus the fragment offset: nonzero means the packet is a fragment.
const FRAGMENT_MASK: u16 = 0x3fff;

/// An Ethernet (MAC) address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The all-ones broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// The Ethernet address IPv4 multicast to `group` is sent to: `01:00:5e` followed by the low
    /// 23 bits of the group address (RFC 1112, section 6.4).
    pub fn for_group(group: Ipv4Addr) -> MacAddr {
        let o = group.octets();
        MacAddr([0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]])
    }

    /// True for group addresses (the low bit of the first octet set), broadcast included.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// True for `00:00:00:00:00:00` (what the kernel lists for an unresolved neighbour).
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

/// A MAC address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a MAC address (expected six hex octets separated by colons, e.g. 02:00:5e:10:00:01)")]
pub struct MacParseError {
    /// The text given.
    pub text: String,
}

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<MacAddr, MacParseError> {
        let err = || MacParseError { text: s.to_owned() };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.is_empty() || part.len() > 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// The addresses and settings of one outgoing frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeaders {
    /// This interface's Ethernet address.
    pub src_mac: MacAddr,
    /// The next hop's Ethernet address (the neighbour, or the group's mapped address).
    pub dst_mac: MacAddr,
    /// Source address and port.
    pub source: SocketAddrV4,
    /// Destination address and port.
    pub destination: SocketAddrV4,
    /// IPv4 time to live.
    pub ttl: u8,
}

/// What is wrong with a received frame. Each is counted and the frame dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than the headers it claims to have.
    #[error("the frame is {len} bytes, too short for {what} (needs {need})")]
    TooShort {
        /// Bytes available.
        len: usize,
        /// Bytes needed.
        need: usize,
        /// The part that did not fit.
        what: &'static str,
    },
    /// Not an IPv4 frame (ARP, IPv6, VLAN-tagged, ...).
    #[error("the frame carries ethertype {0:#06x}, not IPv4 (0x0800)")]
    NotIpv4(u16),
    /// The IP version field is not 4.
    #[error("the IP header says version {0}, not 4")]
    BadVersion(u8),
    /// The IP header length field is below 5 words or past the packet.
    #[error("the IPv4 header length {0} bytes is invalid")]
    BadHeaderLength(usize),
    /// The IP total length is shorter than the headers or longer than the frame.
    #[error("the IPv4 total length {total} does not fit the {available} bytes after the Ethernet header")]
    BadTotalLength {
        /// The total length field.
        total: usize,
        /// Bytes the frame has for it.
        available: usize,
    },
    /// An IP fragment (these go to the kernel, which reassembles them).
    #[error("the packet is an IP fragment")]
    Fragment,
    /// Not UDP.
    #[error("the IP protocol is {0}, not UDP (17)")]
    NotUdp(u8),
    /// The IPv4 header checksum is wrong.
    #[error("the IPv4 header checksum is wrong")]
    BadIpChecksum,
    /// The UDP length field disagrees with the IP packet.
    #[error("the UDP length {udp} does not fit the {available} bytes of IP payload")]
    BadUdpLength {
        /// The UDP length field.
        udp: usize,
        /// IP payload bytes.
        available: usize,
    },
    /// The UDP checksum is wrong (checked only when asked for).
    #[error("the UDP checksum is wrong")]
    BadUdpChecksum,
}

/// A received UDP datagram inside a frame, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedFrame<'a> {
    /// Sender's Ethernet address.
    pub src_mac: MacAddr,
    /// Ethernet destination (this host, a group address, or broadcast).
    pub dst_mac: MacAddr,
    /// Sender's address and port.
    pub source: SocketAddrV4,
    /// Destination address and port.
    pub destination: SocketAddrV4,
    /// The UDP payload.
    pub payload: &'a [u8],
    /// The UDP checksum field (0: none sent).
    pub udp_checksum: u16,
}

impl ParsedFrame<'_> {
    /// True if the UDP checksum is absent (0) or correct.
    pub fn udp_checksum_ok(&self) -> bool {
        self.udp_checksum == 0 || udp_checksum(self.source, self.destination, self.payload) == self.udp_checksum
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Checks `frame` (Ethernet II, IPv4, UDP) and returns what it carries. Frames may be longer than
/// the IP packet (Ethernet padding); the payload ends where the UDP length says. With
/// `verify_udp_checksum`, a nonzero UDP checksum must be right.
pub fn parse(frame: &[u8], verify_udp_checksum: bool) -> Result<ParsedFrame<'_>, FrameError> {
    let len = frame.len();
    if len < ETH_HEADER_LEN {
        return Err(FrameError::TooShort { len, need: ETH_HEADER_LEN, what: "an Ethernet header" });
    }
    let ethertype = be16(frame, 12);
    if ethertype != ETHERTYPE_IPV4 {
        return Err(FrameError::NotIpv4(ethertype));
    }
    let ip = &frame[ETH_HEADER_LEN..];
    if ip.len() < IPV4_HEADER_LEN {
        return Err(FrameError::TooShort { len, need: ETH_HEADER_LEN + IPV4_HEADER_LEN, what: "an IPv4 header" });
    }
    let version = ip[0] >> 4;
    if version != 4 {
        return Err(FrameError::BadVersion(version));
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < IPV4_HEADER_LEN || ihl > ip.len() {
        return Err(FrameError::BadHeaderLength(ihl));
    }
    let total = usize::from(be16(ip, 2));
    if total < ihl || total > ip.len() {
        return Err(FrameError::BadTotalLength { total, available: ip.len() });
    }
    if be16(ip, 6) & FRAGMENT_MASK != 0 {
        return Err(FrameError::Fragment);
    }
    if ip[9] != PROTO_UDP {
        return Err(FrameError::NotUdp(ip[9]));
    }
    if fold(sum_be_words(&ip[..ihl], 0)) != 0xffff {
        return Err(FrameError::BadIpChecksum);
    }
    let l4 = &ip[ihl..total];
    if l4.len() < UDP_HEADER_LEN {
        return Err(FrameError::TooShort { len, need: ETH_HEADER_LEN + ihl + UDP_HEADER_LEN, what: "a UDP header" });
    }
    let udp_len = usize::from(be16(l4, 4));
    if udp_len < UDP_HEADER_LEN || udp_len > l4.len() {
        return Err(FrameError::BadUdpLength { udp: udp_len, available: l4.len() });
    }
    let mac = |at: usize| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&frame[at..at + 6]);
        MacAddr(m)
    };
    let parsed = ParsedFrame {
        dst_mac: mac(0),
        src_mac: mac(6),
        source: SocketAddrV4::new(ip_at(ip, 12), be16(l4, 0)),
        destination: SocketAddrV4::new(ip_at(ip, 16), be16(l4, 2)),
        payload: &l4[UDP_HEADER_LEN..udp_len],
        udp_checksum: be16(l4, 6),
    };
    if verify_udp_checksum && !parsed.udp_checksum_ok() {
        return Err(FrameError::BadUdpChecksum);
    }
    Ok(parsed)
}

/// Writes the Ethernet, IPv4 and UDP headers for a `payload_len`-byte datagram into `out`, with the
/// IPv4 header checksum and `udp_checksum` (0 for none; see [`udp_checksum`]). The payload itself
/// goes right after, at `HEADERS_LEN`. The caller keeps `payload_len` within the link MTU less
/// [`IP_UDP_OVERHEAD`]; lengths that do not fit the 16-bit fields are cut (never panics).
pub fn write_headers(out: &mut [u8; HEADERS_LEN], h: &FrameHeaders, payload_len: usize, udp_checksum: u16) {
    let total = u16::try_from(IP_UDP_OVERHEAD + payload_len).unwrap_or(u16::MAX);
    let udp_len = total.saturating_sub(IPV4_HEADER_LEN as u16);
    out[0..6].copy_from_slice(&h.dst_mac.0);
    out[6..12].copy_from_slice(&h.src_mac.0);
    out[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let ip = &mut out[ETH_HEADER_LEN..ETH_HEADER_LEN + IPV4_HEADER_LEN];
    ip[0] = 0x45;
    ip[1] = 0; // DSCP/ECN
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]); // identification
    ip[6..8].copy_from_slice(&FLAG_DF.to_be_bytes());
    ip[8] = h.ttl;
    ip[9] = PROTO_UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&h.source.ip().octets());
    ip[16..20].copy_from_slice(&h.destination.ip().octets());
    let csum = !fold(sum_be_words(ip, 0));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp = &mut out[ETH_HEADER_LEN + IPV4_HEADER_LEN..];
    udp[0..2].copy_from_slice(&h.source.port().to_be_bytes());
    udp[2..4].copy_from_slice(&h.destination.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&udp_checksum.to_be_bytes());
}

/// The UDP checksum of `payload` sent from `source` to `destination` (RFC 768: over the pseudo
/// header, the UDP header and the payload), never 0: a computed 0 is sent as `0xffff`, since 0
/// means "no checksum".
pub fn udp_checksum(source: SocketAddrV4, destination: SocketAddrV4, payload: &[u8]) -> u16 {
    let udp_len = (UDP_HEADER_LEN + payload.len()) as u64;
    let words = |ip: &Ipv4Addr| {
        let v = u32::from(*ip);
        u64::from(v >> 16) + u64::from(v & 0xffff)
    };
    // Pseudo header (addresses, protocol, UDP length) plus the UDP header without its checksum.
    let header = words(source.ip())
        + words(destination.ip())
        + u64::from(PROTO_UDP)
        + udp_len
        + u64::from(source.port())
        + u64::from(destination.port())
        + udp_len;
    match !fold(sum_be_words(payload, header)) {
        0 => 0xffff,
        c => c,
    }
}

/// What a sender that leaves the UDP checksum to the device (`CHECKSUM_PARTIAL`) puts in the
/// checksum field: the folded one's-complement sum of the pseudo header (addresses, protocol, UDP
/// length), not inverted. The device then adds the UDP header and payload, from [`UDP_CSUM_START`],
/// and stores the complement at [`UDP_CSUM_OFFSET`] past it, as Linux does for its own sockets.
pub fn udp_pseudo_header_sum(source: Ipv4Addr, destination: Ipv4Addr, payload_len: usize) -> u16 {
    let words = |ip: Ipv4Addr| {
        let v = u32::from(ip);
        u64::from(v >> 16) + u64::from(v & 0xffff)
    };
    fold(words(source) + words(destination) + u64::from(PROTO_UDP) + (UDP_HEADER_LEN + payload_len) as u64)
}

/// Where the UDP checksum's coverage starts in a frame: the UDP header.
pub const UDP_CSUM_START: u16 = (ETH_HEADER_LEN + IPV4_HEADER_LEN) as u16;

/// Where the checksum field is, from [`UDP_CSUM_START`].
pub const UDP_CSUM_OFFSET: u16 = 6;

/// Adds the big-endian 16-bit words of `data` (an odd last byte padded with zero) to `initial`.
/// Four bytes at a time: a 32-bit word folds to the same one's-complement sum as its two halves,
/// since 2^16 = 1 modulo 0xffff.
pub fn sum_be_words(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        acc += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Folds a sum of words to 16 bits with end-around carry.
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(dst: SocketAddrV4) -> FrameHeaders {
        FrameHeaders {
            src_mac: MacAddr([0x02, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([0x02, 0, 0, 0, 0, 2]),
            source: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 7000),
            destination: dst,
            ttl: 64,
        }
    }

    fn frame(h: &FrameHeaders, payload: &[u8], with_udp_checksum: bool) -> Vec<u8> {
        let mut hdr = [0u8; HEADERS_LEN];
        let csum = if with_udp_checksum { udp_checksum(h.source, h.destination, payload) } else { 0 };
        write_headers(&mut hdr, h, payload.len(), csum);
        let mut f = hdr.to_vec();
        f.extend_from_slice(payload);
        f
    }

    /// The textbook checksum: 16 bits at a time.
    fn reference_sum(data: &[u8], initial: u64) -> u16 {
        let mut s = initial;
        for pair in data.chunks(2) {
            s += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        fold(s)
    }

    #[test]
    fn multicast_mac_mapping() {
        assert_eq!(MacAddr::for_group(Ipv4Addr::new(239, 1, 2, 3)).to_string(), "01:00:5e:01:02:03");
        // The high bit of the second octet is dropped: 239.129.2.3 and 239.1.2.3 share a MAC.
        assert_eq!(MacAddr::for_group(Ipv4Addr::new(239, 129, 2, 3)), MacAddr::for_group(Ipv4Addr::new(239, 1, 2, 3)));
        assert_eq!(MacAddr::for_group(Ipv4Addr::new(224, 0, 0, 251)).to_string(), "01:00:5e:00:00:fb");
        assert!(MacAddr::for_group(Ipv4Addr::new(239, 255, 255, 255)).is_multicast());
        assert!(!MacAddr([0x02, 0, 0, 0, 0, 1]).is_multicast());
    }

    #[test]
    fn mac_parse_and_display() {
        let m: MacAddr = "aa:bb:cc:0d:0e:0f".parse().expect("parses");
        assert_eq!(m, MacAddr([0xaa, 0xbb, 0xcc, 0x0d, 0x0e, 0x0f]));
        assert_eq!(m.to_string(), "aa:bb:cc:0d:0e:0f");
        for bad in ["", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:ff:00", "aa:bb:cc:dd:ee:fg", "aaa:bb:cc:dd:ee:ff"] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(
            "x".parse::<MacAddr>().expect_err("bad").to_string(),
            "\"x\" is not a MAC address (expected six hex octets separated by colons, e.g. 02:00:5e:10:00:01)"
        );
    }

    #[test]
    fn known_ip_header_checksum() {
        // The classic example header (Wikipedia, "IPv4 header checksum"): checksum 0xb861.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(!fold(sum_be_words(&hdr, 0)), 0xb861);
    }

    #[test]
    fn built_frame_has_the_expected_bytes() {
        let h = headers(SocketAddrV4::new(Ipv4Addr::new(239, 1, 2, 3), 7001));
        let f = frame(&h, b"hi", false);
        assert_eq!(f.len(), HEADERS_LEN + 2);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(&f[14..18], &[0x45, 0x00, 0x00, 30]); // total length 20 + 8 + 2
        assert_eq!(&f[20..22], &[0x40, 0x00]); // DF
        assert_eq!((f[22], f[23]), (64, 17));
        assert_eq!(&f[34..42], &[0x1b, 0x58, 0x1b, 0x59, 0, 10, 0, 0]);
        let p = parse(&f, true).expect("parses");
        assert_eq!(p.payload, b"hi");
        assert_eq!(p.udp_checksum, 0);
    }

    #[test]
    fn parse_reports_what_is_wrong() {
        let h = headers(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 7000));
        let good = frame(&h, b"payload", true);
        assert!(parse(&good, true).is_ok());
        let bad = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut f = good.clone();
            edit(&mut f);
            parse(&f, true).expect_err("must be refused")
        };
        assert_eq!(bad(&|f| f.truncate(10)), FrameError::TooShort { len: 10, need: 14, what: "an Ethernet header" });
        assert_eq!(bad(&|f| f[12] = 0x86), FrameError::NotIpv4(0x8600));
        assert_eq!(bad(&|f| f[14] = 0x65), FrameError::BadVersion(6));
        assert_eq!(bad(&|f| f[14] = 0x44), FrameError::BadHeaderLength(16));
        assert_eq!(bad(&|f| f[17] = 200), FrameError::BadTotalLength { total: 200, available: good.len() - 14 });
        assert_eq!(bad(&|f| f[20] = 0x20), FrameError::Fragment);
        assert_eq!(bad(&|f| f[23] = 6), FrameError::NotUdp(6));
        assert_eq!(bad(&|f| f[26] ^= 1), FrameError::BadIpChecksum);
        assert_eq!(bad(&|f| f[39] = 100), FrameError::BadUdpLength { udp: 100, available: 15 });
        assert_eq!(bad(&|f| f[45] ^= 1), FrameError::BadUdpChecksum);
        let mut flipped = good.clone();
        flipped[45] ^= 1;
        assert!(parse(&flipped, false).is_ok(), "UDP checksums are checked only when asked");
        assert_eq!(FrameError::NotIpv4(0x0806).to_string(), "the frame carries ethertype 0x0806, not IPv4 (0x0800)");
    }

    #[test]
    fn ethernet_padding_is_ignored() {
        let h = headers(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 7000));
        let mut f = frame(&h, b"x", true);
        f.resize(60, 0xee); // minimum Ethernet frame
        assert_eq!(parse(&f, true).expect("parses").payload, b"x");
    }

    #[test]
    fn udp_checksum_zero_becomes_ffff() {
        // Find a payload whose checksum computes to zero, by fixing the last two bytes.
        let (s, d) =
            (SocketAddrV4::new(Ipv4Addr::new(1, 2, 3, 4), 5), SocketAddrV4::new(Ipv4Addr::new(6, 7, 8, 9), 10));
        let mut p = vec![0u8, 0];
        let c = udp_checksum(s, d, &p);
        // Adding the checksum into the data makes the one's-complement sum all ones.
        p.copy_from_slice(&c.to_be_bytes());
        assert_eq!(udp_checksum(s, d, &p), 0xffff);
    }

    /// What a device does with a `CHECKSUM_PARTIAL` frame: sum from the UDP header to the end,
    /// starting from the pseudo-header sum in the checksum field, and store the complement.
    fn device_completes(frame: &mut [u8]) {
        let start = usize::from(UDP_CSUM_START);
        let at = start + usize::from(UDP_CSUM_OFFSET);
        let c = !fold(sum_be_words(&frame[start..], 0));
        frame[at..at + 2].copy_from_slice(&if c == 0 { 0xffff } else { c }.to_be_bytes());
    }

    proptest! {
        #[test]
        fn pseudo_header_sum_completed_by_a_device_is_the_udp_checksum(
            s in addr(), d in addr(), payload in proptest::collection::vec(any::<u8>(), 0..3000)
        ) {
            let h = FrameHeaders { src_mac: MacAddr([2, 0, 0, 0, 0, 1]), dst_mac: MacAddr::for_group(Ipv4Addr::new(239, 1, 1, 1)), source: s, destination: d, ttl: 1 };
            let mut head = [0u8; HEADERS_LEN];
            write_headers(&mut head, &h, payload.len(), udp_pseudo_header_sum(*s.ip(), *d.ip(), payload.len()));
            let mut f = [&head[..], &payload].concat();
            device_completes(&mut f);
            let parsed = parse(&f, true).expect("a device-completed checksum verifies");
            prop_assert_eq!(parsed.udp_checksum, udp_checksum(s, d, &payload));
        }
    }

    fn addr() -> impl Strategy<Value = SocketAddrV4> {
        (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| SocketAddrV4::new(Ipv4Addr::from(ip), port))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn sum_matches_the_textbook(data in proptest::collection::vec(any::<u8>(), 0..3000), init in 0u64..1 << 20) {
            prop_assert_eq!(fold(sum_be_words(&data, init)), reference_sum(&data, init));
        }

        #[test]
        fn build_then_parse_round_trips(
            src in addr(), dst in addr(), ttl in any::<u8>(),
            smac in any::<[u8; 6]>(), dmac in any::<[u8; 6]>(),
            payload in proptest::collection::vec(any::<u8>(), 0..2000),
            with_csum in any::<bool>(),
        ) {
            let h = FrameHeaders { src_mac: MacAddr(smac), dst_mac: MacAddr(dmac), source: src, destination: dst, ttl };
            let f = frame(&h, &payload, with_csum);
            let p = parse(&f, true).expect("a built frame parses");
            prop_assert_eq!(p.payload, &payload[..]);
            prop_assert_eq!((p.source, p.destination), (src, dst));
            prop_assert_eq!((p.src_mac, p.dst_mac), (MacAddr(smac), MacAddr(dmac)));
            prop_assert!(p.udp_checksum_ok());
            prop_assert_eq!(p.udp_checksum == 0, !with_csum);
        }

        /// Fuzz-style: arbitrary bytes never make the parser panic.
        #[test]
        fn parsing_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..128), verify in any::<bool>()) {
            let _ = parse(&data, verify);
        }

        /// Fuzz-style, closer to real traffic: a valid frame with a few bytes changed or cut short
        /// either parses to a payload inside the frame or is refused, never panics.
        #[test]
        fn mutated_frames_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            edits in proptest::collection::vec((0usize..256, any::<u8>()), 1..6),
            cut in 0usize..300,
        ) {
            let h = headers(SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 7000));
            let mut f = frame(&h, &payload, true);
            for (at, byte) in edits {
                let n = f.len();
                f[at % n] = byte;
            }
            f.truncate(cut.max(1));
            if let Ok(p) = parse(&f, false) {
                prop_assert!(p.payload.len() + HEADERS_LEN <= f.len());
            }
        }
    }
}
