//! Naming: lab names, namespace names, host names and interface names.
//!
//! Everything a lab creates lives in network namespaces whose names start with
//! [`PREFIX`] (`sdlab-`): the switch is `sdlab-<lab>-sw`, host `hI` is
//! `sdlab-<lab>-hI`. Interfaces are created directly inside those namespaces, so
//! their names only need to be unique per namespace and stay far below the
//! kernel's 15-character limit: `eth0` in every host, `br0` and one port `hI` per
//! host in the switch. Nothing is created in the machine's own namespace.

use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace netlab creates; `netlab clean` removes all of them.
pub const PREFIX: &str = "sdlab-";

/// Suffix of a lab's switch namespace.
const SWITCH_SUFFIX: &str = "-sw";

/// Longest accepted lab name.
pub const MAX_NAME_LEN: usize = 40;

/// A host's interface (its end of the veth link to the switch), in every host.
pub const HOST_IFNAME: &str = "eth0";

/// The bridge (the switch) inside the switch namespace.
pub const BRIDGE_IFNAME: &str = "br0";

/// Errors about names given by the user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    /// The lab name is empty.
    #[error("lab name is empty")]
    Empty,
    /// The lab name is too long.
    #[error("lab name {name:?} is {len} characters long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        /// The name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// The lab name has a character outside `[A-Za-z0-9_-]` or does not start with a letter or digit.
    #[error("lab name {name:?} is invalid: use letters, digits, '_' and '-', starting with a letter or digit")]
    BadChars {
        /// The name.
        name: String,
    },
    /// A host name is not `h<number>`.
    #[error("host {name:?} is not a host name: hosts are named h0, h1, ...")]
    BadHost {
        /// The text given.
        name: String,
    },
}

/// Checks a lab name: 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9_-]`,
/// starting with a letter or digit.
pub fn validate_lab_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { name: name.to_owned(), len: name.len() });
    }
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let ok_start = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok_chars || !ok_start {
        return Err(NameError::BadChars { name: name.to_owned() });
    }
    Ok(())
}

/// A lab name that is unique on this machine for this process run: `tag`,
/// the process id and a per-process counter (e.g. `t-4711-3`). Meant for tests
/// running in parallel.
pub fn unique_lab_name(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tag: String =
        tag.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-').take(MAX_NAME_LEN - 20).collect();
    if !tag.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        tag.insert(0, 'l');
    }
    format!("{tag}-{}-{n}", std::process::id())
}

/// Namespace holding the lab's bridge.
pub fn switch_netns(lab: &str) -> String {
    format!("{PREFIX}{lab}{SWITCH_SUFFIX}")
}

/// Namespace of host `index`.
pub fn host_netns(lab: &str, index: usize) -> String {
    format!("{PREFIX}{lab}-h{index}")
}

/// Host name `h<index>`.
pub fn host_name(index: usize) -> String {
    format!("h{index}")
}

/// The switch port (bridge member) that links to host `index`, inside the switch namespace.
pub fn switch_port(index: usize) -> String {
    format!("h{index}")
}

/// Parses `h<number>` into the number.
pub fn parse_host(name: &str) -> Result<usize, NameError> {
    name.strip_prefix('h')
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()) && d.len() <= 6)
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| NameError::BadHost { name: name.to_owned() })
}

/// What a namespace name means to netlab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsRole {
    /// `sdlab-<lab>-sw`: the lab's switch.
    Switch {
        /// Lab name.
        lab: String,
    },
    /// `sdlab-<lab>-h<index>`: one host.
    Host {
        /// Lab name.
        lab: String,
        /// Host index.
        index: usize,
    },
    /// Starts with the prefix but fits neither pattern (still removed by `clean`).
    Stray,
}

impl NetnsRole {
    /// The lab this namespace belongs to, if it fits a pattern.
    pub fn lab(&self) -> Option<&str> {
        match self {
            NetnsRole::Switch { lab } | NetnsRole::Host { lab, .. } => Some(lab),
            NetnsRole::Stray => None,
        }
    }
}

/// Classifies a namespace name; `None` when it is not netlab's at all.
///
/// The patterns are unambiguous even when lab names contain `-`: a switch
/// namespace ends in `-sw` and a host namespace in `-h<digits>`, and a lab name
/// can end in neither form's suffix and still parse back to itself.
pub fn classify_netns(ns: &str) -> Option<NetnsRole> {
    let rest = ns.strip_prefix(PREFIX)?;
    if let Some(lab) = rest.strip_suffix(SWITCH_SUFFIX) {
        if validate_lab_name(lab).is_ok() {
            return Some(NetnsRole::Switch { lab: lab.to_owned() });
        }
    }
    if let Some(pos) = rest.rfind("-h") {
        let (lab, host) = (&rest[..pos], &rest[pos + 1..]);
        if let (Ok(()), Ok(index)) = (validate_lab_name(lab), parse_host(host)) {
            if host_netns(lab, index) == ns {
                return Some(NetnsRole::Host { lab: lab.to_owned(), index });
            }
        }
    }
    Some(NetnsRole::Stray)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names() {
        assert!(validate_lab_name("a").is_ok());
        assert!(validate_lab_name("test-12_x").is_ok());
        assert_eq!(validate_lab_name(""), Err(NameError::Empty));
        assert!(matches!(validate_lab_name("bad name"), Err(NameError::BadChars { .. })));
        assert!(matches!(validate_lab_name("-x"), Err(NameError::BadChars { .. })));
        assert!(matches!(validate_lab_name("a/b"), Err(NameError::BadChars { .. })));
        assert!(matches!(validate_lab_name(&"x".repeat(41)), Err(NameError::TooLong { .. })));
    }

    #[test]
    fn unique_names_are_valid_and_distinct() {
        let a = unique_lab_name("loss");
        let b = unique_lab_name("loss");
        assert_ne!(a, b);
        assert!(validate_lab_name(&a).is_ok());
        assert!(validate_lab_name(&unique_lab_name("-weird tag!")).is_ok());
    }

    #[test]
    fn hosts() {
        assert_eq!(parse_host("h0"), Ok(0));
        assert_eq!(parse_host("h249"), Ok(249));
        assert!(parse_host("h").is_err());
        assert!(parse_host("x1").is_err());
        assert!(parse_host("h-1").is_err());
        assert!(parse_host("h99999999999999999999").is_err());
    }

    #[test]
    fn classify() {
        assert_eq!(classify_netns("sdlab-a-sw"), Some(NetnsRole::Switch { lab: "a".into() }));
        assert_eq!(classify_netns("sdlab-a-h1-h3"), Some(NetnsRole::Host { lab: "a-h1".into(), index: 3 }));
        assert_eq!(classify_netns("sdlab-a-h1"), Some(NetnsRole::Host { lab: "a".into(), index: 1 }));
        assert_eq!(classify_netns("sdlab-a-h1-sw"), Some(NetnsRole::Switch { lab: "a-h1".into() }));
        assert_eq!(classify_netns("sdlab-"), Some(NetnsRole::Stray));
        assert_eq!(classify_netns("sdlab-a-h01"), Some(NetnsRole::Stray));
        assert_eq!(classify_netns("other"), None);
    }
}
