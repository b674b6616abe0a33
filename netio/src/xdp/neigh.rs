//! Neighbour resolution for unicast sends: the Ethernet address of an on-link IPv4 destination,
//! taken from the kernel's ARP table.
//!
//! The backend builds whole frames, so it needs the next hop's MAC, which the kernel's socket path
//! would have looked up itself. It reads the kernel's table (`/proc/net/arp` of the host's network
//! namespace, opened once when the backend opens, so later reads from any thread see that
//! namespace), and when the destination is missing or unresolved it makes the kernel resolve it
//! by sending one empty datagram through an ordinary UDP socket to the discard port (9) of the
//! destination, then reads the table again until the entry is complete or a deadline passes.
//! Results are cached for [`Neighbours::REFRESH`] and read again after that.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::frame::MacAddr;

/// `ATF_COM`: the entry is complete (resolved).
const ATF_COM: u32 = 0x2;

/// Why a neighbour could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    /// The ARP table could not be read.
    #[error("reading the kernel's ARP table failed: {0}")]
    Read(#[source] io::Error),
    /// Sending the datagram that makes the kernel resolve the address failed.
    #[error("asking the kernel to resolve {addr} (one datagram to its port 9) failed: {source}")]
    Trigger {
        /// The address.
        addr: Ipv4Addr,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// No ARP reply came in time.
    #[error("{addr} did not answer ARP on {ifname} within {waited:?} (is the host up and on this link?)")]
    Timeout {
        /// The address.
        addr: Ipv4Addr,
        /// The interface.
        ifname: String,
        /// How long the backend waited.
        waited: Duration,
    },
}

/// One complete entry of `/proc/net/arp` text for `ifname`: the MAC of `addr`, if listed.
pub fn lookup_in(table: &str, addr: Ipv4Addr, ifname: &str) -> Option<MacAddr> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[5] != ifname || f[0].parse::<Ipv4Addr>().ok()? != addr {
            return None;
        }
        let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).ok()?;
        let mac: MacAddr = f[3].parse().ok()?;
        (flags & ATF_COM != 0 && !mac.is_zero()).then_some(mac)
    })
}

/// The neighbour table of one interface, with a cache.
#[derive(Debug)]
pub struct Neighbours {
    table: File,
    ifname: String,
    cache: HashMap<Ipv4Addr, (MacAddr, Instant)>,
    /// Addresses that did not answer, and when: sends to them fail at once for a while.
    failed: HashMap<Ipv4Addr, Instant>,
    text: String,
}

impl Neighbours {
    /// How long a resolved address is used before the table is read again.
    pub const REFRESH: Duration = Duration::from_secs(30);
    /// How long after a failed resolution sends to that address fail at once (unless the table
    /// lists it meanwhile), so a dead destination does not stall every send for the timeout.
    pub const HOLD_DOWN: Duration = Duration::from_secs(1);

    /// Opens the ARP table of the calling thread's network namespace for `ifname`.
    pub fn open(ifname: &str) -> io::Result<Neighbours> {
        // /proc/net is the *process's* namespace; thread-self follows this thread's setns.
        let table = File::open("/proc/thread-self/net/arp").or_else(|_| File::open("/proc/net/arp"))?;
        Ok(Neighbours {
            table,
            ifname: ifname.to_owned(),
            cache: HashMap::new(),
            failed: HashMap::new(),
            text: String::new(),
        })
    }

    fn read_table(&mut self, addr: Ipv4Addr) -> Result<Option<MacAddr>, NeighError> {
        self.text.clear();
        self.table.seek(SeekFrom::Start(0)).map_err(NeighError::Read)?;
        self.table.read_to_string(&mut self.text).map_err(NeighError::Read)?;
        Ok(lookup_in(&self.text, addr, &self.ifname))
    }

    /// The cached MAC of `addr`, if resolved less than [`REFRESH`](Self::REFRESH) ago.
    pub fn cached(&self, addr: Ipv4Addr, now: Instant) -> Option<MacAddr> {
        self.cache.get(&addr).filter(|(_, at)| now.duration_since(*at) < Self::REFRESH).map(|(m, _)| *m)
    }

    /// The MAC of `addr`: from the cache, else the table, else after `trigger` (which makes the
    /// kernel resolve it) once the table lists it, waiting at most `timeout`.
    pub fn resolve(
        &mut self,
        addr: Ipv4Addr,
        timeout: Duration,
        trigger: impl FnOnce() -> io::Result<()>,
    ) -> Result<MacAddr, NeighError> {
        let now = Instant::now();
        if let Some(mac) = self.cached(addr, now) {
            return Ok(mac);
        }
        if let Some(mac) = self.read_table(addr)? {
            self.cache.insert(addr, (mac, now));
            return Ok(mac);
        }
        if self.failed.get(&addr).is_some_and(|at| now.duration_since(*at) < Self::HOLD_DOWN) {
            return Err(NeighError::Timeout { addr, ifname: self.ifname.clone(), waited: Duration::ZERO });
        }
        trigger().map_err(|source| NeighError::Trigger { addr, source })?;
        let deadline = now + timeout;
        let mut pause = Duration::from_micros(50);
        loop {
            if let Some(mac) = self.read_table(addr)? {
                tracing::debug!(%addr, %mac, ifname = %self.ifname, "resolved neighbour");
                self.cache.insert(addr, (mac, Instant::now()));
                self.failed.remove(&addr);
                return Ok(mac);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.failed.insert(addr, Instant::now());
                return Err(NeighError::Timeout { addr, ifname: self.ifname.clone(), waited: timeout });
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "IP address       HW type     Flags       HW address            Mask     Device\n\
                         198.18.0.2       0x1         0x2         aa:bb:cc:dd:ee:01     *        eth0\n\
                         198.18.0.3       0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                         198.18.0.4       0x1         0x2         aa:bb:cc:dd:ee:04     *        eth1\n\
                         198.18.0.5       0x1         0x6         aa:bb:cc:dd:ee:05     *        eth0\n\
                         garbage line\n\
                         198.18.0.6       0x1         zz          aa:bb:cc:dd:ee:06     *        eth0\n";

    #[test]
    fn reads_complete_entries_of_the_interface() {
        let ip = |d| Ipv4Addr::new(198, 18, 0, d);
        assert_eq!(lookup_in(TABLE, ip(2), "eth0"), Some(MacAddr([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 1])));
        assert_eq!(lookup_in(TABLE, ip(3), "eth0"), None, "incomplete");
        assert_eq!(lookup_in(TABLE, ip(4), "eth0"), None, "another interface");
        assert_eq!(lookup_in(TABLE, ip(5), "eth0").map(|m| m.0[5]), Some(5), "complete + permanent");
        assert_eq!(lookup_in(TABLE, ip(6), "eth0"), None, "bad flags");
        assert_eq!(lookup_in(TABLE, ip(9), "eth0"), None, "absent");
        assert_eq!(lookup_in("", ip(2), "eth0"), None);
    }

    #[test]
    fn timeout_message_names_the_cause() {
        let e = NeighError::Timeout {
            addr: Ipv4Addr::new(198, 18, 0, 9),
            ifname: "eth0".into(),
            waited: Duration::from_millis(500),
        };
        assert_eq!(
            e.to_string(),
            "198.18.0.9 did not answer ARP on eth0 within 500ms (is the host up and on this link?)"
        );
    }
}
