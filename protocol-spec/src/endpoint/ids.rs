//! Identities and counters that must never repeat, derived from numbers the daemon reads from its
//! clocks and interfaces (this crate reads none itself).
//!
//! * a host's node id, from its interface address (unique within the subnet a session spans);
//! * a host's first packet number, from the wall clock in microseconds: packet numbers are the AEAD
//!   nonce and must never repeat under one (session, epoch, node), including across daemon restarts;
//! * a server's epoch, from the wall clock in quarter-seconds: a restarted server must use a larger
//!   epoch than any before it (PROTOCOL.md section 13.2).

use std::net::Ipv4Addr;
use std::time::Duration;

use crate::wire::NodeId;

/// Unix time of 2024-01-01T00:00:00Z, the origin of clock-derived epochs.
pub const EPOCH_ORIGIN_UNIX_SECS: u64 = 1_704_067_200;
/// Clock-derived epochs count this many ticks per second (u32 quarter-seconds last until 2058).
pub const EPOCH_TICKS_PER_SEC: u64 = 4;

/// The default node id of a host: its interface address as a number (unique in the subnet; never 0,
/// the server's id, for a usable unicast address).
pub fn node_id_for(interface: Ipv4Addr) -> NodeId {
    NodeId(u32::from(interface))
}

/// A first packet number that no earlier run of a host used, given the time since the Unix epoch:
/// the time in microseconds (at least 1). Two runs started more than a microsecond apart, each
/// sending fewer than a million packets a second, never overlap.
pub fn packet_number_base(since_unix: Duration) -> u64 {
    u64::try_from(since_unix.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// The epoch the clock gives at `since_unix`: quarter-seconds since 2024-01-01 UTC (at least 1). A
/// server restarted in a later quarter-second gets a larger epoch, which is what receivers require
/// (an equal epoch from a restarted server would mix two streams under one key).
pub fn epoch_at(since_unix: Duration) -> u32 {
    let ticks = since_unix.as_millis().saturating_sub(u128::from(EPOCH_ORIGIN_UNIX_SECS) * 1000)
        * u128::from(EPOCH_TICKS_PER_SEC)
        / 1000;
    u32::try_from(ticks).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_grow_with_the_clock_and_are_never_zero() {
        let origin = Duration::from_secs(EPOCH_ORIGIN_UNIX_SECS);
        assert_eq!(epoch_at(Duration::ZERO), 1);
        assert_eq!(epoch_at(origin), 1);
        assert_eq!(epoch_at(origin + Duration::from_millis(250)), 1);
        assert_eq!(epoch_at(origin + Duration::from_millis(500)), 2);
        assert_eq!(epoch_at(origin + Duration::from_secs(10)), 40);
        assert_eq!(epoch_at(Duration::from_secs(u64::MAX / 2)), u32::MAX);
    }

    #[test]
    fn node_ids_and_packet_numbers() {
        assert_eq!(node_id_for(Ipv4Addr::new(198, 18, 0, 2)), NodeId(0xc612_0002));
        assert_eq!(packet_number_base(Duration::ZERO), 1);
        assert_eq!(packet_number_base(Duration::from_secs(2)), 2_000_000);
    }
}
