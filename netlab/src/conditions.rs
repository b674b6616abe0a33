//! Per-link conditions: rate limit, random loss, cut-off, and how they are
//! put into the kernel.
//!
//! Each host's link to the switch has two directions:
//!
//! * **tx** (host to switch): rate limited by a `tbf` qdisc on the host's `eth0`;
//!   loss and cut by the chain `from_host` (nftables `ingress` hook) on the
//!   switch's port towards the host.
//! * **rx** (switch to host): rate limited by a `tbf` qdisc on the switch's port
//!   towards the host (so a 100 Mbit/s host also *receives* at most 100 Mbit/s,
//!   multicast floods included); loss and cut by the chain `to_host` (nftables
//!   `egress` hook) on that same switch port.
//!
//! # Where the loss and cut rules live, and why
//!
//! Both chains are in the table `netdev netlab_<port>` (e.g. `netlab_h3` for
//! the port `h3` towards host `h3`) inside the lab's **switch** namespace
//! (`sdlab-<lab>-sw`), one table per port that has loss or cut set; a port
//! without either has no table at all. Inspect one with
//! `ip netns exec sdlab-<lab>-sw nft list table netdev netlab_h3` (each rule
//! has a counter of what it dropped).
//!
//! They are on the switch side, not on the host's `eth0`, because a host may
//! bypass its own hooks: an XDP program on `eth0` (the AF_XDP backend) runs
//! before the host's `netdev` ingress hook, and AF_XDP transmissions
//! (`dev_direct_xmit`) skip the host's egress hook and qdiscs. Whatever a host
//! sends, it arrives on its switch port through the normal receive path
//! (ingress hook, then the bridge); whatever the bridge forwards or floods to a
//! host leaves through `dev_queue_xmit` on that host's port (egress hook, then
//! the port's qdisc), one copy per port. So loss, cut and the rx rate apply to
//! every backend, UDP sockets and AF_XDP alike. The tx rate does not: it is a
//! qdisc on the host's `eth0`, and **AF_XDP transmissions bypass the host's tx
//! `tbf`** (there is no qdisc on that path); limit such a sender with the
//! receivers' rx rates instead.
//!
//! Order of the effects: on tx, the host's `tbf` comes first and the loss
//! after it (a dropped packet has used up its share of the rate, as on a wire);
//! on rx, the loss comes first (the egress hook runs before the port's qdisc),
//! so a dropped packet does not use up the receiver's rate.
//!
//! # Semantics
//!
//! Loss is independent per packet (Bernoulli, `numgen random mod 1000000 < ppm`,
//! resolution one part per million) and applies to IPv4/IPv6 packets only
//! (`meta protocol { ip, ip6 }`), never to ARP, so a configured 5 % loss is what
//! UDP sees instead of being compounded by failed address resolution. Loss on a
//! multicast *sender's* tx drops the packet before the bridge floods it, so for
//! every receiver alike; loss on each receiver's rx is independent per
//! receiver (each flooded copy meets its own port's rule). A cut drops
//! everything, ARP included, in both directions, while the link stays up (like
//! a switch port that black-holes traffic): senders see no error. After a
//! restore, multicast flows at once; unicast resumes when the kernel retries the
//! address resolution that failed during the cut (it retries every second; the
//! tests measured about 0.6 s), as after re-plugging a cable. Every rule counts
//! what it dropped (`counter`).
//!
//! The rate counts layer-2 bytes (IP packet plus the 14-byte Ethernet header,
//! no preamble or FCS): TCP over a 1500-byte MTU gets about 95.6 % of it as
//! goodput.
//!
//! Not modelled here (the kernel has no `netem`): delay, jitter, reordering,
//! duplication, corruption, and bursty (Gilbert-Elliott) loss. The protocol
//! simulator in `protocol-spec` models those.

use std::fmt;
use std::str::FromStr;

/// Parts per million in one.
const PPM: u32 = 1_000_000;

/// Highest rate accepted: 1 tbit/s (far above what veth links carry).
pub const MAX_RATE_BPS: u64 = 1_000_000_000_000;

/// Lowest rate accepted: 8 bit/s (tc counts whole bytes per second).
pub const MIN_RATE_BPS: u64 = 8;

/// Largest token bucket used (tc's limit is 4 GiB; more than this only adds burstiness).
const MAX_BURST: u64 = 32 << 20;

/// Tag at the start of the stored conditions (the switch port's alias). Version
/// 2: loss and cut rules on the switch port; labs made by a netlab that stored
/// `netlab1` had them in the hosts' namespaces and are refused.
const STORED_TAG: &str = "netlab2";

/// The chain (netdev `egress` hook on the switch port) with the loss and cut
/// rules of what the host receives.
pub const CHAIN_TO_HOST: &str = "to_host";

/// The chain (netdev `ingress` hook on the switch port) with the loss and cut
/// rules of what the host sends.
pub const CHAIN_FROM_HOST: &str = "from_host";

/// The nftables table (family `netdev`, in the switch namespace) that holds the
/// loss and cut rules of the link behind switch port `port`: `netlab_<port>`.
pub fn nft_table(port: &str) -> String {
    format!("netlab_{port}")
}

/// Errors parsing or applying conditions.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConditionsError {
    /// A rate string that does not parse.
    #[error("bad rate {text:?}: {why} (examples: 100mbit, 1.5gbit, 800kbit, 1000000bit, 'none')")]
    BadRate {
        /// What was given.
        text: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A loss string or value that does not parse or is out of range.
    #[error("bad loss {text:?}: {why} (give a probability from 0 to 1 such as 0.05, or a percentage such as 5%)")]
    BadLoss {
        /// What was given.
        text: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A stored condition description that does not parse (system state written by another version).
    #[error("cannot read the stored link conditions {text:?}: {why}")]
    BadStored {
        /// The stored text.
        text: String,
        /// What is wrong with it.
        why: String,
    },
}

/// A rate limit in bits per second (always positive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u64);

impl Rate {
    /// A rate of `bps` bits per second; `None` outside
    /// [`MIN_RATE_BPS`]..=[`MAX_RATE_BPS`].
    pub fn from_bits_per_sec(bps: u64) -> Option<Rate> {
        (MIN_RATE_BPS..=MAX_RATE_BPS).contains(&bps).then_some(Rate(bps))
    }

    /// A rate of `n` megabits (10^6 bits) per second; `None` for zero or overflow.
    pub fn mbit(n: u64) -> Option<Rate> {
        n.checked_mul(1_000_000).and_then(Rate::from_bits_per_sec)
    }

    /// Bits per second.
    pub fn bits_per_sec(self) -> u64 {
        self.0
    }

    /// Bytes per second (rounded down).
    pub fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }

    /// The token bucket size used for this rate on a link with `mtu`: 5 ms worth
    /// of traffic, but at least two full frames and 4 KiB, and at most 32 MiB.
    pub fn burst_bytes(self, mtu: u32) -> u64 {
        let frames = 2 * (u64::from(mtu) + 14);
        (self.bytes_per_sec() / 200).min(MAX_BURST).max(frames).max(4096)
    }

    /// Parses an optional rate: `none`, `off`, `0` and `unlimited` mean no limit.
    pub fn parse_optional(text: &str) -> Result<Option<Rate>, ConditionsError> {
        match text.trim().to_ascii_lowercase().as_str() {
            "none" | "off" | "0" | "unlimited" => Ok(None),
            _ => text.parse().map(Some),
        }
    }
}

impl FromStr for Rate {
    type Err = ConditionsError;

    /// Parses tc-style rates: a number (decimals allowed) followed by `bit`,
    /// `kbit`, `mbit`, `gbit`, `tbit` (powers of 1000; `k`, `m`, `g`, `t` and
    /// `bps`-free spellings like `100M` are also accepted, case-insensitively).
    /// A bare number is bits per second.
    fn from_str(text: &str) -> Result<Rate, ConditionsError> {
        let bad = |why| ConditionsError::BadRate { text: text.to_owned(), why };
        let t = text.trim().to_ascii_lowercase();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        if num.is_empty() {
            return Err(bad("it does not start with a number"));
        }
        let value: f64 = num.parse().map_err(|_| bad("the number does not parse"))?;
        let scale: f64 = match unit.trim() {
            "" | "bit" | "b" => 1.0,
            "k" | "kbit" => 1e3,
            "m" | "mbit" => 1e6,
            "g" | "gbit" => 1e9,
            "t" | "tbit" => 1e12,
            _ => return Err(bad("unknown unit; use bit, kbit, mbit, gbit or tbit")),
        };
        let bps = (value * scale).round();
        if !bps.is_finite() || bps < MIN_RATE_BPS as f64 {
            return Err(bad("the rate must be at least 8 bit per second"));
        }
        if bps > MAX_RATE_BPS as f64 {
            return Err(bad("the rate is above the maximum of 1tbit"));
        }
        // In range 1..=1e12, so the conversion is exact and cannot overflow.
        Ok(Rate(bps as u64))
    }
}

impl fmt::Display for Rate {
    /// Shows the rate in the largest unit that divides it exactly (`100mbit`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, scale) in
            [("tbit", 1_000_000_000_000u64), ("gbit", 1_000_000_000), ("mbit", 1_000_000), ("kbit", 1_000)]
        {
            if self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}bit", self.0)
    }
}

/// A probability of dropping a packet, with a resolution of one part per million.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Loss {
    ppm: u32,
}

impl Loss {
    /// No loss.
    pub const NONE: Loss = Loss { ppm: 0 };
    /// Every IP packet dropped.
    pub const ALL: Loss = Loss { ppm: PPM };

    /// A loss probability from 0.0 to 1.0 (rounded to the nearest millionth).
    pub fn from_probability(p: f64) -> Result<Loss, ConditionsError> {
        if !p.is_finite() || !(0.0..=1.0).contains(&p) {
            return Err(ConditionsError::BadLoss { text: p.to_string(), why: "it must be between 0 and 1" });
        }
        // In 0..=1e6 after the range check, so the cast is exact.
        Ok(Loss { ppm: (p * f64::from(PPM)).round() as u32 })
    }

    /// The loss in parts per million (0 to 1 000 000).
    pub fn ppm(self) -> u32 {
        self.ppm
    }

    /// The loss as a probability.
    pub fn probability(self) -> f64 {
        f64::from(self.ppm) / f64::from(PPM)
    }

    /// True if nothing is dropped.
    pub fn is_none(self) -> bool {
        self.ppm == 0
    }
}

impl FromStr for Loss {
    type Err = ConditionsError;

    /// Parses `0.05` or `5%`.
    fn from_str(text: &str) -> Result<Loss, ConditionsError> {
        let bad = |why| ConditionsError::BadLoss { text: text.to_owned(), why };
        let t = text.trim();
        let (num, scale) = match t.strip_suffix('%') {
            Some(n) => (n.trim(), 100.0),
            None => (t, 1.0),
        };
        let value: f64 = num.parse().map_err(|_| bad("not a number"))?;
        let p = value / scale;
        if !p.is_finite() || !(0.0..=1.0).contains(&p) {
            return Err(bad("it must be between 0 and 1 (0% and 100%)"));
        }
        Loss::from_probability(p)
    }
}

impl fmt::Display for Loss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.probability())
    }
}

/// The conditions of one host's link to the switch.
///
/// `Default` is a perfect link: no rate limit, no loss, not cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkConditions {
    /// Rate limit of what the host sends (its egress), if any.
    pub rate_tx: Option<Rate>,
    /// Rate limit of what the host receives (the switch port's egress towards it), if any.
    pub rate_rx: Option<Rate>,
    /// Random loss of IP packets the host sends.
    pub loss_tx: Loss,
    /// Random loss of IP packets the host receives.
    pub loss_rx: Loss,
    /// Cut off: nothing goes in or out (ARP included); the link stays up.
    pub cut: bool,
}

impl LinkConditions {
    /// A perfect link.
    pub fn new() -> LinkConditions {
        LinkConditions::default()
    }

    /// Sets the same rate limit on both directions, like a full-duplex link speed.
    pub fn with_rate(mut self, rate: Option<Rate>) -> LinkConditions {
        self.rate_tx = rate;
        self.rate_rx = rate;
        self
    }

    /// Sets the rate limit of what the host sends.
    pub fn with_rate_tx(mut self, rate: Option<Rate>) -> LinkConditions {
        self.rate_tx = rate;
        self
    }

    /// Sets the rate limit of what the host receives.
    pub fn with_rate_rx(mut self, rate: Option<Rate>) -> LinkConditions {
        self.rate_rx = rate;
        self
    }

    /// Sets the random loss of what the host receives.
    pub fn with_loss_rx(mut self, loss: Loss) -> LinkConditions {
        self.loss_rx = loss;
        self
    }

    /// Sets the random loss of what the host sends.
    pub fn with_loss_tx(mut self, loss: Loss) -> LinkConditions {
        self.loss_tx = loss;
        self
    }

    /// Cuts the host off (`true`) or restores it (`false`).
    pub fn with_cut(mut self, cut: bool) -> LinkConditions {
        self.cut = cut;
        self
    }

    /// True if these conditions need nftables rules (loss or cut).
    pub fn needs_nft(&self) -> bool {
        self.cut || !self.loss_rx.is_none() || !self.loss_tx.is_none()
    }

    /// The nftables script, run with `nft -f -` in the lab's switch namespace,
    /// that makes the rules of the link behind switch port `port` match these
    /// conditions in one atomic transaction. With loss or cut it (re)declares
    /// the table [`nft_table`]`(port)` with its chains [`CHAIN_TO_HOST`] (egress
    /// hook: host rx) and [`CHAIN_FROM_HOST`] (ingress hook: host tx), empties
    /// them and adds the rules; without, it removes the table. Either way it
    /// may be run again and again, whatever was there before.
    pub fn nft_script(&self, port: &str) -> String {
        let table = nft_table(port);
        if !self.needs_nft() {
            // Declaring the table first makes the delete succeed when it is absent.
            return format!("table netdev {table}\ndelete table netdev {table}\n");
        }
        let mut s = format!(
            "table netdev {table} {{\n\
             \tchain {CHAIN_TO_HOST} {{ type filter hook egress device \"{port}\" priority -500; policy accept; }}\n\
             \tchain {CHAIN_FROM_HOST} {{ type filter hook ingress device \"{port}\" priority -500; policy accept; }}\n\
             }}\n\
             flush chain netdev {table} {CHAIN_TO_HOST}\n\
             flush chain netdev {table} {CHAIN_FROM_HOST}\n"
        );
        for (chain, loss) in [(CHAIN_TO_HOST, self.loss_rx), (CHAIN_FROM_HOST, self.loss_tx)] {
            if self.cut {
                s.push_str(&format!("add rule netdev {table} {chain} counter drop comment \"cut\"\n"));
            }
            if !loss.is_none() {
                s.push_str(&format!(
                    "add rule netdev {table} {chain} meta protocol {{ ip, ip6 }} numgen random mod {PPM} < {} counter drop comment \"loss\"\n",
                    loss.ppm()
                ));
            }
        }
        s
    }

    /// The `tc -batch` lines that set (or remove) a rate limit on `dev`, and
    /// whether a missing qdisc error may be ignored (when removing).
    pub(crate) fn tc_line(rate: Option<Rate>, dev: &str, mtu: u32) -> (String, bool) {
        match rate {
            Some(r) => (
                format!(
                    "qdisc replace dev {dev} root tbf rate {}bit burst {} latency 50ms",
                    r.bits_per_sec(),
                    r.burst_bytes(mtu)
                ),
                false,
            ),
            None => (format!("qdisc del dev {dev} root"), true),
        }
    }

    /// Encodes the conditions for storage in the switch port's interface alias.
    pub fn encode(&self) -> String {
        let rate = |r: Option<Rate>| r.map_or_else(|| "-".to_owned(), |r| r.0.to_string());
        format!(
            "{STORED_TAG} rate_tx={} rate_rx={} loss_tx={} loss_rx={} cut={}",
            rate(self.rate_tx),
            rate(self.rate_rx),
            self.loss_tx.ppm,
            self.loss_rx.ppm,
            u8::from(self.cut)
        )
    }

    /// Decodes what [`LinkConditions::encode`] wrote.
    pub fn decode(text: &str) -> Result<LinkConditions, ConditionsError> {
        let bad = |why: String| ConditionsError::BadStored { text: text.to_owned(), why };
        let mut words = text.split_whitespace();
        match words.next() {
            Some(STORED_TAG) => {}
            Some("netlab1") => {
                return Err(bad(
                    "it was written by an older netlab that kept the loss and cut rules in the hosts' namespaces"
                        .into(),
                ))
            }
            _ => return Err(bad(format!("it does not start with the tag {STORED_TAG}"))),
        }
        let mut c = LinkConditions::default();
        for word in words {
            let (key, value) = word.split_once('=').ok_or_else(|| bad(format!("{word:?} is not key=value")))?;
            let rate = |v: &str| -> Result<Option<Rate>, ConditionsError> {
                if v == "-" {
                    return Ok(None);
                }
                v.parse::<u64>()
                    .ok()
                    .and_then(Rate::from_bits_per_sec)
                    .map(Some)
                    .ok_or_else(|| bad(format!("bad rate {v:?}")))
            };
            let ppm = |v: &str| -> Result<Loss, ConditionsError> {
                v.parse::<u32>()
                    .ok()
                    .filter(|p| *p <= PPM)
                    .map(|ppm| Loss { ppm })
                    .ok_or_else(|| bad(format!("bad loss {v:?}")))
            };
            match key {
                "rate_tx" => c.rate_tx = rate(value)?,
                "rate_rx" => c.rate_rx = rate(value)?,
                "loss_tx" => c.loss_tx = ppm(value)?,
                "loss_rx" => c.loss_rx = ppm(value)?,
                "cut" => c.cut = value == "1",
                _ => return Err(bad(format!("unknown key {key:?}"))),
            }
        }
        Ok(c)
    }
}

impl fmt::Display for LinkConditions {
    /// A one-line human summary, e.g. `rate 50mbit/50mbit loss 0/0.05`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = |r: Option<Rate>| r.map_or_else(|| "none".to_owned(), |r| r.to_string());
        write!(
            f,
            "rate tx {} rx {}, loss tx {} rx {}{}",
            rate(self.rate_tx),
            rate(self.rate_rx),
            self.loss_tx,
            self.loss_rx,
            if self.cut { ", CUT" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!("100mbit".parse(), Ok(Rate(100_000_000)));
        assert_eq!("1.5gbit".parse(), Ok(Rate(1_500_000_000)));
        assert_eq!("800kbit".parse(), Ok(Rate(800_000)));
        assert_eq!("100M".parse(), Ok(Rate(100_000_000)));
        assert_eq!("12345".parse(), Ok(Rate(12345)));
        assert!("7bit".parse::<Rate>().is_err());
        assert_eq!(Rate::from_bits_per_sec(1), None);
        assert_eq!(" 50 mbit ".parse(), Ok(Rate(50_000_000)));
        for bad in ["100mbitz", "", "mbit", "2tbit", "-5mbit", "0", "0.1bit", "1.2.3mbit", "1e9", "100mbps"] {
            let r: Result<Rate, _> = bad.parse();
            assert!(matches!(r, Err(ConditionsError::BadRate { .. })), "{bad:?} gave {r:?}");
        }
        assert_eq!(Rate::parse_optional("none"), Ok(None));
        assert_eq!(Rate::parse_optional("1gbit"), Ok(Rate::mbit(1000)));
    }

    #[test]
    fn rates_display() {
        assert_eq!(Rate(100_000_000).to_string(), "100mbit");
        assert_eq!(Rate(1_500_000_000).to_string(), "1500mbit");
        assert_eq!(Rate(12345).to_string(), "12345bit");
    }

    #[test]
    fn burst() {
        // 50 mbit: 6.25 MB/s, 5 ms is 31250 bytes.
        assert_eq!(Rate(50_000_000).burst_bytes(1500), 31250);
        assert_eq!(Rate(1_000_000).burst_bytes(1500), 4096);
        assert_eq!(Rate(1_000_000).burst_bytes(9000), 18028);
    }

    #[test]
    fn losses() {
        assert_eq!("0.05".parse::<Loss>().map(Loss::ppm), Ok(50_000));
        assert_eq!("5%".parse::<Loss>().map(Loss::ppm), Ok(50_000));
        assert_eq!("1".parse::<Loss>(), Ok(Loss::ALL));
        assert_eq!("0".parse::<Loss>(), Ok(Loss::NONE));
        for bad in ["1.5", "-0.1", "x", "", "NaN", "inf", "150%"] {
            assert!(bad.parse::<Loss>().is_err(), "{bad:?}");
        }
        assert!(Loss::from_probability(f64::NAN).is_err());
    }

    #[test]
    fn encode_round_trip() {
        let c = LinkConditions::new()
            .with_rate_tx(Rate::mbit(50))
            .with_loss_rx(Loss::from_probability(0.05).unwrap_or(Loss::NONE))
            .with_cut(true);
        assert_eq!(LinkConditions::decode(&c.encode()), Ok(c));
        let d = LinkConditions::default();
        assert_eq!(LinkConditions::decode(&d.encode()), Ok(d));
        assert!(LinkConditions::decode("garbage").is_err());
        assert!(LinkConditions::decode("netlab2 rate_tx=x").is_err());
        assert!(LinkConditions::decode("netlab2 loss_rx=2000000").is_err());
    }

    #[test]
    fn nft_rules() {
        let c = LinkConditions::new().with_loss_rx(Loss { ppm: 50_000 });
        let s = c.nft_script("h3");
        assert!(s.starts_with("table netdev netlab_h3 {\n"), "{s}");
        assert!(s.contains("chain to_host { type filter hook egress device \"h3\" priority -500; policy accept; }"));
        assert!(s.contains("chain from_host { type filter hook ingress device \"h3\" priority -500; policy accept; }"));
        // Both chains are emptied first, so the script can be run again.
        assert!(s.contains("flush chain netdev netlab_h3 to_host\nflush chain netdev netlab_h3 from_host\n"));
        assert!(s.contains(
            "add rule netdev netlab_h3 to_host meta protocol { ip, ip6 } numgen random mod 1000000 < 50000 counter drop comment \"loss\""
        ));
        assert!(!s.contains("add rule netdev netlab_h3 from_host"));
        assert!(!s.contains("eth0"), "the rules belong on the switch port, not the host's eth0");

        let tx = LinkConditions::new().with_loss_tx(Loss { ppm: 1 }).nft_script("h0");
        assert!(tx.contains(
            "add rule netdev netlab_h0 from_host meta protocol { ip, ip6 } numgen random mod 1000000 < 1 counter drop"
        ));
        assert!(!tx.contains("add rule netdev netlab_h0 to_host"));

        let cut = LinkConditions::new().with_cut(true).with_loss_rx(Loss { ppm: 7 }).nft_script("h12");
        assert!(cut.contains("add rule netdev netlab_h12 to_host counter drop comment \"cut\""));
        assert!(cut.contains("add rule netdev netlab_h12 from_host counter drop comment \"cut\""));
        // A cut drops ARP too: its rule has no protocol match.
        assert!(!cut.contains("from_host meta protocol { ip, ip6 } numgen"));
        assert_eq!(cut.matches("add rule").count(), 3);
    }

    #[test]
    fn nft_without_loss_or_cut_removes_the_table() {
        let c = LinkConditions::new().with_rate(Rate::mbit(10));
        assert!(!c.needs_nft());
        assert_eq!(c.nft_script("h1"), "table netdev netlab_h1\ndelete table netdev netlab_h1\n");
        assert_eq!(nft_table("h1"), "netlab_h1");
    }

    #[test]
    fn stored_by_an_older_version_is_refused_clearly() {
        let err = LinkConditions::decode("netlab1 rate_tx=- rate_rx=- loss_tx=0 loss_rx=0 cut=0").expect_err("old");
        assert!(err.to_string().contains("older netlab"), "{err}");
        assert!(LinkConditions::new().encode().starts_with("netlab2 "));
    }
}
