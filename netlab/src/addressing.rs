//! Address plan: every lab gets its own /24 inside 198.18.0.0/15.
//!
//! 198.18.0.0/15 (RFC 2544, set aside for benchmarking networks) holds 512 /24
//! blocks. Lab index `k` (0..=511, the lowest one free when the lab is created)
//! owns `198.(18 + k / 256).(k % 256).0/24`, and host `hI` of that lab has
//! address `.I+1` in it, so a lab has at most [`MAX_HOSTS`] hosts. The switch
//! has no address: it only forwards.

use std::net::Ipv4Addr;

/// Most hosts in one lab (addresses .1 to .250 of the lab's /24).
pub const MAX_HOSTS: usize = 250;

/// Number of /24 blocks in 198.18.0.0/15, hence most labs at once.
pub const MAX_LABS: u16 = 512;

/// Prefix length of a lab's subnet.
pub const PREFIX_LEN: u8 = 24;

/// Errors of the address plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddressError {
    /// Lab index past the 512 blocks of 198.18.0.0/15.
    #[error("lab index {0} is out of range: 198.18.0.0/15 holds {MAX_LABS} /24 blocks (0..={max})", max = MAX_LABS - 1)]
    LabIndex(u16),
    /// Host index past [`MAX_HOSTS`].
    #[error("host index {0} is out of range: a lab has at most {MAX_HOSTS} hosts (h0..h{max})", max = MAX_HOSTS - 1)]
    HostIndex(usize),
}

/// Network address of lab `index`'s /24.
pub fn lab_subnet(index: u16) -> Result<Ipv4Addr, AddressError> {
    if index >= MAX_LABS {
        return Err(AddressError::LabIndex(index));
    }
    let third = u8::try_from(index % 256).map_err(|_| AddressError::LabIndex(index))?;
    let second = u8::try_from(18 + index / 256).map_err(|_| AddressError::LabIndex(index))?;
    Ok(Ipv4Addr::new(198, second, third, 0))
}

/// Address of host `host` in lab `index`.
pub fn host_addr(index: u16, host: usize) -> Result<Ipv4Addr, AddressError> {
    let net = lab_subnet(index)?.octets();
    if host >= MAX_HOSTS {
        return Err(AddressError::HostIndex(host));
    }
    let last = u8::try_from(host + 1).map_err(|_| AddressError::HostIndex(host))?;
    Ok(Ipv4Addr::new(net[0], net[1], net[2], last))
}

/// True if `addr` is inside 198.18.0.0/15, the only unicast range netlab uses.
pub fn is_lab_addr(addr: Ipv4Addr) -> bool {
    let o = addr.octets();
    o[0] == 198 && (o[1] == 18 || o[1] == 19)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan() {
        assert_eq!(lab_subnet(0), Ok(Ipv4Addr::new(198, 18, 0, 0)));
        assert_eq!(lab_subnet(255), Ok(Ipv4Addr::new(198, 18, 255, 0)));
        assert_eq!(lab_subnet(256), Ok(Ipv4Addr::new(198, 19, 0, 0)));
        assert_eq!(lab_subnet(511), Ok(Ipv4Addr::new(198, 19, 255, 0)));
        assert_eq!(lab_subnet(512), Err(AddressError::LabIndex(512)));
        assert_eq!(host_addr(3, 0), Ok(Ipv4Addr::new(198, 18, 3, 1)));
        assert_eq!(host_addr(3, 249), Ok(Ipv4Addr::new(198, 18, 3, 250)));
        assert_eq!(host_addr(3, 250), Err(AddressError::HostIndex(250)));
        for k in 0..MAX_LABS {
            for h in [0, MAX_HOSTS - 1] {
                assert!(host_addr(k, h).is_ok_and(is_lab_addr));
            }
        }
    }
}
