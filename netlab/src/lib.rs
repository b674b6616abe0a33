//! netlab: N hosts on one machine, built from Linux network namespaces joined by
//! a bridge, the way a rack of hosts hangs off one switch. Used by the tests,
//! benchmarks and demo of the other spindrift crates, and as the `netlab`
//! command-line tool.
//!
//! # Topology
//!
//! ```text
//!   netns sdlab-<lab>-h0      netns sdlab-<lab>-h1            netns sdlab-<lab>-hN-1
//!   lo 127.0.0.1              lo 127.0.0.1                    lo 127.0.0.1
//!   eth0 198.18.K.1/24        eth0 198.18.K.2/24              eth0 198.18.K.N/24
//!   [tbf: rate tx]            [tbf: rate tx]                  ...
//!      |  veth                  |  veth                          |  veth
//!   +--h0-----------------------h1----------- ... ---------------hN-1--+
//!   |  on each port hI:                                                |
//!   |   [nft table netdev netlab_hI: loss/cut                          |
//!   |      ingress hook = host tx, egress hook = host rx]              |
//!   |   [tbf: rate rx]                                                 |
//!   |                 br0 (bridge, no address)                         |
//!   |                 netns sdlab-<lab>-sw                             |
//!   +------------------------------------------------------------------+
//! ```
//!
//! * Every lab is its own set of namespaces: nothing is created in the
//!   machine's own namespace, interface names are short and fixed (`eth0`,
//!   `br0`, `hI`) because they only need to be unique inside their namespace,
//!   and `netlab clean` finds everything by the namespace prefix `sdlab-`.
//! * Addresses: lab number K (the lowest free at creation) owns the /24
//!   `198.(18 + K/256).(K%256).0/24` of 198.18.0.0/15; host `hI` is `.I+1`.
//!   Up to 250 hosts per lab and 512 labs at once. Hosts have a connected route
//!   for the lab's /24 and a route for 224.0.0.0/4 via `eth0`, and no default
//!   route: sending anywhere else fails with "network unreachable" instead of
//!   leaving the lab. IPv6 is turned off in every namespace.
//! * MTU is chosen per lab (1500 by default, 9000 for jumbo frames, up to 65535).
//!
//! # Multicast and IGMP snooping
//!
//! By default the bridge runs with `mcast_snooping 0`: it floods every
//! multicast frame to every port, like a switch without snooping. Hosts still
//! have to join a group for their sockets to receive it (the host kernel filters),
//! but the switch does not depend on seeing those joins. With
//! [`LabConfig::igmp_snooping`]`(true)` the bridge snoops IGMP and runs a querier
//! (`mcast_snooping 1 mcast_querier 1`), so a group's traffic goes only to ports
//! whose host joined it, as on a managed switch. Its query response interval
//! is 1 s, and for up to that long after the lab is created the switch may still
//! flood (the kernel waits one interval before trusting its own querier).
//!
//! # What is modelled
//!
//! Per host link, set at creation ([`LabConfig::conditions`],
//! [`LabConfig::host_conditions`]) and changeable on a running lab
//! ([`Lab::set_conditions`], [`Lab::update_conditions`], [`Lab::cut`],
//! [`Lab::restore`]); see [`conditions`] for the details:
//!
//! * rate limit per direction (token bucket `tbf`, counting layer-2 bytes);
//! * independent random loss per direction (nftables `numgen random`, IP
//!   packets only);
//! * cutting a host off entirely and restoring it.
//!
//! Loss and cut are rules in a `netdev` table per switch port, in the switch
//! namespace: the port's `ingress` hook sees what the host sends and its
//! `egress` hook each copy the bridge forwards or floods to the host. They sit
//! on the switch side because a host can bypass its own `eth0` hooks: an XDP
//! program runs before the host's ingress hook, and AF_XDP transmissions skip
//! its egress hook and qdiscs. So loss, cut and the rx rate hold for every
//! packet I/O backend; only the tx rate (a qdisc on the host's `eth0`) does not
//! hold for AF_XDP senders.
//!
//! # What is not modelled
//!
//! This kernel has no `netem`, so there is no delay, jitter, reordering,
//! duplication or corruption, and bursty (Gilbert-Elliott) loss is not offered
//! either: stateless nftables rules can only drop packets independently. Those
//! effects are modelled by the deterministic protocol simulator in
//! `protocol-spec` instead. Round-trip times in a lab are those of the kernel
//! (tens of microseconds), and hosts share the machine's CPUs.
//!
//! # Running code inside a host
//!
//! * [`Host::run`] / [`Host::spawn`]: a closure on a new thread that joined the
//!   host's network namespace with `setns(CLONE_NEWNET)` (only that thread
//!   moves). Sockets created there stay in the host and may be used from any
//!   thread afterwards.
//! * [`Host::command`]: `ip netns exec <netns> PROGRAM` as a
//!   [`std::process::Command`], for tools nobody here wrote (iperf3, ...).
//!
//! # Tests that cannot run everywhere
//!
//! [`require`] holds the workspace's one rule for a test whose prerequisites (root, nftables,
//! `/dev/kvm`, userfaultfd, huge pages, a tool) are missing here: print `SKIPPED <test>: <why>` and
//! return, or fail the test when `NETLAB_REQUIRE=1` (as `.ci/run` sets it).
//!
//! # Lifetime and state
//!
//! [`Lab::create`] returns a value that owns the lab: dropping it (also while
//! a panic unwinds, or after a creation error) kills the processes left inside
//! the lab and deletes its namespaces, which takes the links, bridge, qdiscs
//! and the switch's nftables tables with them. [`Lab::persist`] leaves the lab running (the
//! CLI `up` does that); [`Lab::open`] attaches to a running lab without owning
//! it. A process killed outright (SIGKILL, or Ctrl-C on a test binary) cannot
//! clean up: `netlab clean` removes every leftover.
//!
//! The state needed by `down`, `list`, `set` and `exec` is kept in the system
//! itself (see [`state`]): namespace names, and interface aliases on the
//! bridge (lab settings) and its ports (link conditions). The only file is the
//! lock `/run/netlab/lock` that serialises lab creation; it is deleted again
//! when the last lab goes away.
//!
//! # Example
//!
//! ```no_run
//! use netlab::{Lab, LabConfig, LinkConditions, Loss, Rate};
//! use std::net::UdpSocket;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = LabConfig::new(netlab::unique_lab_name("demo"), 4)
//!     .conditions(LinkConditions::new().with_rate(Rate::mbit(100)))
//!     .host_conditions(3, LinkConditions::new().with_loss_rx(Loss::from_probability(0.05)?));
//! let lab = Lab::create(&cfg)?; // removed again when `lab` is dropped
//! let (h0, h1) = (lab.host(0)?, lab.host(1)?);
//! let rx = h1.run(|| UdpSocket::bind((h1.addr(), 5000)))??;
//! let tx = h0.run(|| UdpSocket::bind((h0.addr(), 0)))??;
//! tx.send_to(b"hello", (h1.addr(), 5000))?;
//! let mut buf = [0u8; 16];
//! let (n, _) = rx.recv_from(&mut buf)?;
//! assert_eq!(&buf[..n], b"hello");
//! lab.cut(1)?;
//! lab.restore(1)?;
//! # Ok(())
//! # }
//! ```

pub mod addressing;
pub mod clean;
pub mod cmd;
pub mod conditions;
pub mod host;
pub mod lab;
pub mod lock;
pub mod names;
pub mod netns;
pub mod preflight;
pub mod require;
pub mod state;

pub use addressing::{MAX_HOSTS, MAX_LABS};
pub use clean::{clean, CleanReport};
pub use conditions::{LinkConditions, Loss, Rate};
pub use host::{Host, HostError};
pub use lab::{Lab, LabConfig, LabError, DEFAULT_MTU};
pub use names::{unique_lab_name, PREFIX};
pub use netns::NsThread;
pub use preflight::{check as check_prerequisites, PreflightError};
pub use state::{list as list_labs, LabSummary};
