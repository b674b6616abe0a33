//! Choosing a backend at run time: [`IoKind`] and [`open`].
//!
//! A daemon keeps building the [`UdpConfig`] it already has and turns its `--io udp|xdp|auto`
//! flag into an [`IoKind`] (it implements `FromStr`, so clap parses it directly):
//!
//! ```no_run
//! use std::net::Ipv4Addr;
//! use netio::{udp::UdpConfig, IoKind, PacketIo};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let kind: IoKind = "auto".parse()?;
//! let config = UdpConfig::new(Ipv4Addr::new(198, 18, 0, 2), 7000).join(Ipv4Addr::new(239, 1, 2, 3));
//! let io = netio::open(kind, &config)?; // Box<dyn PacketIo + Send>
//! println!("using {}", io.capabilities().backend); // "udp" or "af_xdp"
//! # Ok(())
//! # }
//! ```
//!
//! `Auto` tries AF_XDP and, if that fails for any reason (no privileges, no driver or kernel
//! support, the interface already taken), logs the reason at `warn` level and opens UDP instead.

use std::fmt;
use std::str::FromStr;

use crate::udp::{UdpConfig, UdpError, UdpIo};
use crate::xdp::{XdpConfig, XdpError, XdpIo};
use crate::PacketIo;

/// Which backend [`open`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoKind {
    /// The UDP socket backend.
    Udp,
    /// The AF_XDP backend; opening fails if it cannot be used.
    Xdp,
    /// AF_XDP if it can be used here, else UDP (with the reason logged).
    #[default]
    Auto,
}

impl fmt::Display for IoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoKind::Udp => "udp",
            IoKind::Xdp => "xdp",
            IoKind::Auto => "auto",
        })
    }
}

/// An I/O kind that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown I/O backend {0:?}: use udp, xdp or auto")]
pub struct IoKindError(pub String);

impl FromStr for IoKind {
    type Err = IoKindError;
    fn from_str(s: &str) -> Result<IoKind, IoKindError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "udp" => Ok(IoKind::Udp),
            "xdp" | "af_xdp" | "af-xdp" => Ok(IoKind::Xdp),
            "auto" => Ok(IoKind::Auto),
            _ => Err(IoKindError(s.to_owned())),
        }
    }
}

/// Opening the selected backend failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The UDP backend failed (with `Udp`, or with `Auto` after AF_XDP was unavailable).
    #[error(transparent)]
    Udp(#[from] UdpError),
    /// The AF_XDP backend failed (with `Xdp`).
    #[error(transparent)]
    Xdp(#[from] XdpError),
}

/// Opens the backend `kind` with the settings of `config` (converted with
/// [`XdpConfig::from_udp`] for AF_XDP). See the [module docs](self).
pub fn open(kind: IoKind, config: &UdpConfig) -> Result<Box<dyn PacketIo + Send>, OpenError> {
    open_with(kind, config, &XdpConfig::from_udp(config))
}

/// As [`open`], with AF_XDP settings of its own (`xdp`) in place of those derived from `udp`.
pub fn open_with(kind: IoKind, udp: &UdpConfig, xdp: &XdpConfig) -> Result<Box<dyn PacketIo + Send>, OpenError> {
    match kind {
        IoKind::Udp => Ok(Box::new(UdpIo::open(udp)?)),
        IoKind::Xdp => Ok(Box::new(XdpIo::open(xdp)?)),
        IoKind::Auto => match XdpIo::open(xdp) {
            Ok(io) => {
                tracing::info!(backend = %io.describe(), "I/O backend selected");
                Ok(Box::new(io))
            }
            Err(e) => {
                tracing::warn!(reason = %e.fallback_reason(), "AF_XDP unavailable, falling back to UDP");
                Ok(Box::new(UdpIo::open(udp)?))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for (text, kind) in
            [("udp", IoKind::Udp), ("XDP", IoKind::Xdp), ("af_xdp", IoKind::Xdp), (" auto ", IoKind::Auto)]
        {
            assert_eq!(text.parse::<IoKind>(), Ok(kind));
        }
        assert_eq!(IoKind::Xdp.to_string(), "xdp");
        assert_eq!(
            "dpdk".parse::<IoKind>().expect_err("unknown").to_string(),
            "unknown I/O backend \"dpdk\": use udp, xdp or auto"
        );
    }
}
