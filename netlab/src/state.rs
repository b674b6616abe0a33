//! Where a lab's state lives: in the system itself, not in files.
//!
//! * The lab exists if its switch namespace `sdlab-<lab>-sw` exists.
//! * The switch's bridge `br0` carries the lab's settings in its interface alias
//!   (`ip -n sdlab-<lab>-sw link show br0`), e.g.
//!   `netlab1 index=3 hosts=4 mtu=1500 snooping=0`.
//! * Each switch port `hI` carries host `hI`'s link conditions in its alias,
//!   e.g. `netlab2 rate_tx=50000000 rate_rx=- loss_tx=0 loss_rx=50000 cut=0`.
//!   The tag's version says where the rules are: `netlab2` puts loss and cut
//!   in the switch namespace (table `netdev netlab_hI` on the same port, see
//!   [`crate::conditions`]); a lab whose ports say `netlab1` (rules in the
//!   hosts' namespaces, made by an older netlab) is reported as damaged, to be
//!   removed with `netlab down`, rather than changed half-way.
//!
//! The alias is what the conditions are; the kernel objects (qdiscs, nftables
//! tables) are derived from it and are never read back. So `netlab list`,
//! `down`, `set` and `exec` from another process find everything with `ip`,
//! nothing can go stale, and removing the namespaces removes the state with
//! them.

use std::collections::BTreeMap;

use crate::cmd::{self, CmdError, Tool};
use crate::conditions::{ConditionsError, LinkConditions};
use crate::names::{self, NetnsRole};
use crate::netns::{self, NetnsError};

/// Errors reading a lab's state from the system.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No switch namespace for this lab.
    #[error("no lab named {lab:?} (namespace {netns} does not exist); `netlab list` shows the labs")]
    NoSuchLab {
        /// Lab name.
        lab: String,
        /// The switch namespace that was looked for.
        netns: String,
    },
    /// `ip` failed.
    #[error("reading the state of lab {lab:?}: {error}")]
    Cmd {
        /// Lab name.
        lab: String,
        /// The failed command.
        error: CmdError,
    },
    /// The stored settings do not parse.
    #[error(
        "lab {lab:?} is damaged or was made by another netlab version: {why} (remove it with `netlab down {lab}`)"
    )]
    Damaged {
        /// Lab name.
        lab: String,
        /// What is wrong.
        why: String,
    },
    /// Listing namespaces failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// A lab's settings, stored in the bridge's alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabMeta {
    /// Index of the lab's /24 inside 198.18.0.0/15.
    pub index: u16,
    /// Number of hosts.
    pub hosts: usize,
    /// MTU of every link.
    pub mtu: u32,
    /// Whether the bridge does IGMP snooping.
    pub igmp_snooping: bool,
}

impl LabMeta {
    /// Encodes for the bridge alias.
    pub fn encode(&self) -> String {
        format!(
            "netlab1 index={} hosts={} mtu={} snooping={}",
            self.index,
            self.hosts,
            self.mtu,
            u8::from(self.igmp_snooping)
        )
    }

    /// Decodes what [`LabMeta::encode`] wrote.
    pub fn decode(text: &str) -> Result<LabMeta, String> {
        let mut words = text.split_whitespace();
        if words.next() != Some("netlab1") {
            return Err(format!("bridge alias {text:?} does not start with netlab1"));
        }
        let (mut index, mut hosts, mut mtu, mut snooping) = (None, None, None, None);
        for word in words {
            let (k, v) = word.split_once('=').ok_or_else(|| format!("{word:?} is not key=value"))?;
            let bad = || format!("bad value in {word:?}");
            match k {
                "index" => index = Some(v.parse::<u16>().map_err(|_| bad())?),
                "hosts" => hosts = Some(v.parse::<usize>().map_err(|_| bad())?),
                "mtu" => mtu = Some(v.parse::<u32>().map_err(|_| bad())?),
                "snooping" => snooping = Some(v == "1"),
                _ => return Err(format!("unknown key {k:?}")),
            }
        }
        match (index, hosts, mtu, snooping) {
            (Some(index), Some(hosts), Some(mtu), Some(igmp_snooping)) => {
                Ok(LabMeta { index, hosts, mtu, igmp_snooping })
            }
            _ => Err(format!("bridge alias {text:?} lacks a key")),
        }
    }
}

/// Interface name to alias, from the output of `ip link show`.
pub fn parse_aliases(ip_link_output: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in ip_link_output.lines() {
        if line.starts_with(|c: char| c.is_ascii_digit()) {
            // "4: h0@if2: <BROADCAST,...> ..." -> "h0"
            current = line
                .split_once(": ")
                .map(|(_, rest)| rest)
                .and_then(|rest| rest.split([':', '@']).next())
                .map(str::to_owned);
        } else if let Some(alias) = line.trim_start().strip_prefix("alias ") {
            if let Some(name) = &current {
                out.insert(name.clone(), alias.trim().to_owned());
            }
        }
    }
    out
}

fn switch_links(lab: &str) -> Result<BTreeMap<String, String>, StateError> {
    let sw = names::switch_netns(lab);
    if !netns::netns_exists(&sw) {
        return Err(StateError::NoSuchLab { lab: lab.to_owned(), netns: sw });
    }
    let out = cmd::run(Tool::Ip, &["-n", &sw, "link", "show"], None)
        .map_err(|error| StateError::Cmd { lab: lab.to_owned(), error })?;
    Ok(parse_aliases(&out))
}

/// Reads a lab's settings and each host's link conditions.
pub fn read(lab: &str) -> Result<(LabMeta, Vec<LinkConditions>), StateError> {
    let aliases = switch_links(lab)?;
    let damaged = |why: String| StateError::Damaged { lab: lab.to_owned(), why };
    let meta_text =
        aliases.get(names::BRIDGE_IFNAME).ok_or_else(|| damaged("the bridge br0 or its alias is missing".into()))?;
    let meta = LabMeta::decode(meta_text).map_err(damaged)?;
    let mut conditions = Vec::with_capacity(meta.hosts);
    for i in 0..meta.hosts {
        let c = match aliases.get(&names::switch_port(i)) {
            Some(text) => LinkConditions::decode(text).map_err(|e: ConditionsError| damaged(e.to_string()))?,
            None => return Err(damaged(format!("switch port h{i} or its alias is missing"))),
        };
        conditions.push(c);
    }
    Ok((meta, conditions))
}

/// Reads only a lab's settings.
pub fn read_meta(lab: &str) -> Result<LabMeta, StateError> {
    let aliases = switch_links(lab)?;
    let text = aliases.get(names::BRIDGE_IFNAME).ok_or_else(|| StateError::Damaged {
        lab: lab.to_owned(),
        why: "the bridge br0 or its alias is missing".into(),
    })?;
    LabMeta::decode(text).map_err(|why| StateError::Damaged { lab: lab.to_owned(), why })
}

/// One lab found on the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSummary {
    /// Lab name.
    pub name: String,
    /// Its settings, if the switch and its alias are intact.
    pub meta: Option<LabMeta>,
    /// Host namespaces found (`sdlab-<lab>-hI`).
    pub host_namespaces: usize,
    /// True if the switch namespace exists.
    pub has_switch: bool,
}

/// Lists every lab on the system, including broken leftovers (host namespaces
/// without a switch), sorted by name.
pub fn list() -> Result<Vec<LabSummary>, StateError> {
    let mut labs: BTreeMap<String, LabSummary> = BTreeMap::new();
    for ns in netns::list_netns()? {
        let Some(role) = names::classify_netns(&ns) else {
            continue;
        };
        let Some(lab) = role.lab() else { continue };
        let entry = labs.entry(lab.to_owned()).or_insert_with(|| LabSummary {
            name: lab.to_owned(),
            meta: None,
            host_namespaces: 0,
            has_switch: false,
        });
        match role {
            NetnsRole::Switch { .. } => entry.has_switch = true,
            NetnsRole::Host { .. } => entry.host_namespaces += 1,
            NetnsRole::Stray => {}
        }
    }
    for summary in labs.values_mut() {
        if summary.has_switch {
            summary.meta = read_meta(&summary.name).ok();
        }
    }
    Ok(labs.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trip() {
        let m = LabMeta { index: 7, hosts: 32, mtu: 9000, igmp_snooping: true };
        assert_eq!(LabMeta::decode(&m.encode()), Ok(m));
        assert!(LabMeta::decode("netlab1 index=1").is_err());
        assert!(LabMeta::decode("other").is_err());
    }

    #[test]
    fn aliases_from_ip_output() {
        let out = "1: lo: <LOOPBACK> mtu 65536 qdisc noop state DOWN mode DEFAULT group default qlen 1000\n    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n\
2: h0@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue master br0 state UP\n    link/ether 42:7b:da:37:64:44 brd ff:ff:ff:ff:ff:ff link-netns th0\n    alias netlab2 rate_tx=- cut=0\n\
4: br0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP\n    link/ether 42:7b:da:37:64:44 brd ff:ff:ff:ff:ff:ff\n    alias netlab1 index=3 hosts=2\n";
        let a = parse_aliases(out);
        assert_eq!(a.get("br0").map(String::as_str), Some("netlab1 index=3 hosts=2"));
        assert_eq!(a.get("h0").map(String::as_str), Some("netlab2 rate_tx=- cut=0"));
        assert!(!a.contains_key("lo"));
    }
}
