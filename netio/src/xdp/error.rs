//! What can go wrong opening the AF_XDP backend: [`XdpError`].

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use super::program;
use super::queue::SetupStep;

/// What went wrong opening the AF_XDP backend. [`XdpError::fallback_reason`] sums it up for the
/// log line of an automatic fallback to UDP.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// A setting is out of range or inconsistent.
    #[error("invalid AF_XDP configuration: {0}")]
    InvalidConfig(String),
    /// Listing the interfaces failed.
    #[error("listing the network interfaces failed: {0}")]
    Interfaces(#[source] io::Error),
    /// No interface has the configured address.
    #[error("{addr} is not the address of any interface in this network namespace")]
    NoInterface {
        /// The address given.
        addr: Ipv4Addr,
    },
    /// The interface is not Ethernet (loopback, a tunnel, ...).
    #[error("interface {ifname} ({addr}) is not an Ethernet interface (hardware type {hw_type}); AF_XDP here needs Ethernet")]
    NotEthernet {
        /// Interface name.
        ifname: String,
        /// Its address.
        addr: Ipv4Addr,
        /// `ARPHRD_*` type found.
        hw_type: u16,
    },
    /// A query about the interface failed.
    #[error("reading the {what} of interface {ifname} failed: {source}")]
    Interface {
        /// What was asked.
        what: &'static str,
        /// Interface name.
        ifname: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The helper UDP socket (port reservation, IGMP, ARP) failed.
    #[error("{step} for the AF_XDP backend's helper UDP socket on {addr} failed: {source}")]
    Helper {
        /// What was being done.
        step: &'static str,
        /// Address involved.
        addr: SocketAddrV4,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// Setting up an AF_XDP socket failed.
    #[error("{step} for queue {queue} of {ifname} failed: {source}{hint}")]
    Socket {
        /// The step.
        step: SetupStep,
        /// Queue id.
        queue: u32,
        /// Interface name.
        ifname: String,
        /// The system's error.
        #[source]
        source: io::Error,
        /// A likely cause, or empty.
        hint: &'static str,
    },
    /// Creating or filling the XSKMAP failed.
    #[error("{step} failed: {source}{hint}")]
    Map {
        /// The step.
        step: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
        /// A likely cause, or empty.
        hint: &'static str,
    },
    /// The kernel refused the XDP program.
    #[error("loading the XDP filter program failed: {source}{hint}{log}")]
    Load {
        /// The system's error.
        #[source]
        source: io::Error,
        /// A likely cause, or empty.
        hint: &'static str,
        /// The verifier's log (with a leading newline), or empty.
        log: String,
    },
    /// The program could not be built (a bug).
    #[error("building the XDP filter program failed: {0}")]
    Program(#[from] program::ProgramError),
    /// Attaching the program failed.
    #[error("attaching the XDP program to {ifname} ({mode}) failed: {source}{hint}")]
    Attach {
        /// Interface name.
        ifname: String,
        /// `native` or `generic`.
        mode: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
        /// A likely cause, or empty.
        hint: &'static str,
    },
    /// Opening the ARP table failed.
    #[error("opening the kernel's ARP table failed: {0}")]
    Neighbours(#[source] io::Error),
    /// Joining or leaving a group failed.
    #[error("{action} multicast group {group} on {interface} failed: {source}")]
    Group {
        /// `joining` or `leaving`.
        action: &'static str,
        /// The group.
        group: Ipv4Addr,
        /// The interface address.
        interface: Ipv4Addr,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

impl XdpError {
    /// The errno of the underlying system error, if any.
    pub(crate) fn errno(&self) -> Option<i32> {
        match self {
            XdpError::Socket { source, .. }
            | XdpError::Map { source, .. }
            | XdpError::Load { source, .. }
            | XdpError::Attach { source, .. }
            | XdpError::Helper { source, .. }
            | XdpError::Interface { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// A short reason for falling back to UDP: "no privileges", "no driver support", "old
    /// kernel", or the error itself.
    pub fn fallback_reason(&self) -> String {
        let step_is_socket = matches!(self, XdpError::Socket { step: SetupStep::Socket, .. });
        match self.errno() {
            Some(libc::EPERM | libc::EACCES) => {
                format!("no privileges (AF_XDP needs root or CAP_NET_ADMIN + CAP_BPF): {self}")
            }
            Some(libc::EAFNOSUPPORT) if step_is_socket => format!("old kernel (no AF_XDP sockets): {self}"),
            Some(libc::EOPNOTSUPP) => format!("no driver support: {self}"),
            Some(libc::EINVAL | libc::ENOSYS) if !matches!(self, XdpError::InvalidConfig(_)) => {
                format!("old kernel or no driver support: {self}")
            }
            Some(libc::EBUSY | libc::EEXIST) => format!("interface busy: {self}"),
            _ => self.to_string(),
        }
    }
}

pub(crate) fn hint_for(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::EPERM | libc::EACCES) => " (AF_XDP and BPF need root or CAP_NET_ADMIN + CAP_BPF)",
        Some(libc::EBUSY | libc::EEXIST) => {
            " (the interface already has an XDP program or socket: one AF_XDP backend per interface; see `ip link`)"
        }
        Some(libc::EAFNOSUPPORT) => " (this kernel has no AF_XDP: CONFIG_XDP_SOCKETS)",
        Some(libc::EOPNOTSUPP) => " (the driver does not support this mode)",
        Some(libc::ENOMEM) => " (locked memory limit too low? raise RLIMIT_MEMLOCK or use fewer frames)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IF: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    #[test]
    fn fallback_reasons_name_the_cause() {
        let socket = |errno| XdpError::Socket {
            step: SetupStep::Socket,
            queue: 0,
            ifname: "eth0".into(),
            source: io::Error::from_raw_os_error(errno),
            hint: hint_for(Some(errno)),
        };
        assert!(socket(libc::EPERM).fallback_reason().starts_with("no privileges"));
        assert!(socket(libc::EAFNOSUPPORT).fallback_reason().starts_with("old kernel (no AF_XDP sockets)"));
        let attach = XdpError::Attach {
            ifname: "eth0".into(),
            mode: "native",
            source: io::Error::from_raw_os_error(libc::EBUSY),
            hint: hint_for(Some(libc::EBUSY)),
        };
        let r = attach.fallback_reason();
        assert!(r.starts_with("interface busy: attaching the XDP program to eth0 (native) failed"), "{r}");
        assert!(r.contains("one AF_XDP backend per interface"), "{r}");
        assert_eq!(
            XdpError::NoInterface { addr: IF }.fallback_reason(),
            "198.18.0.2 is not the address of any interface in this network namespace"
        );
    }
}
