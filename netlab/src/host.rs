//! One host of a lab: a network namespace with a loopback and one interface,
//! `eth0`, linked to the lab's switch.
//!
//! Code runs inside a host in two ways:
//!
//! * [`Host::run`] / [`Host::spawn`]: a closure on a new thread that joined the
//!   host's network namespace with `setns(CLONE_NEWNET)`. Sockets it creates
//!   stay in the host for their whole life and can be returned and used from any
//!   thread, which is usually the most convenient way to write a test:
//!   `let sock = host.run(|| UdpSocket::bind((addr, 0)))??;`.
//! * [`Host::command`]: a [`std::process::Command`] running
//!   `ip netns exec <netns> <program>`, for tools such as iperf3. `ip netns exec`
//!   `exec`s the program, so the child's pid is the program's.
//!
//! A namespace lives as long as something uses it: a socket created inside a
//! host, or a thread still inside it, keeps the host's namespace (with its `lo`
//! and, if the switch is still there, its link) alive after the lab is removed,
//! invisible to `ip netns list`, until the socket is closed or the thread ends.
//! Close sockets and join threads before dropping the lab. Processes are
//! different: removing a lab kills every process still inside it.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::addressing::PREFIX_LEN;
use crate::cmd::{self, CmdError, Tool};
use crate::conditions::LinkConditions;
use crate::names;
use crate::netns::{self, NetnsError, NsThread};
use crate::preflight::{self, PreflightError};

/// Errors about one host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Entering the host's namespace failed.
    #[error("host {host} of lab {lab}: {error}")]
    Netns {
        /// Host name.
        host: String,
        /// Lab name.
        lab: String,
        /// What failed.
        error: NetnsError,
    },
    /// A tool failed while configuring the host.
    #[error("host {host} of lab {lab}: {error}")]
    Cmd {
        /// Host name.
        host: String,
        /// Lab name.
        lab: String,
        /// What failed.
        error: CmdError,
    },
    /// A needed tool is missing.
    #[error("host {host} of lab {lab}: {error}")]
    Preflight {
        /// Host name.
        host: String,
        /// Lab name.
        lab: String,
        /// What is missing.
        error: PreflightError,
    },
    /// A command run inside the host could not be started or waited for.
    #[error("host {host} of lab {lab}: running {program:?}: {error}")]
    Exec {
        /// Host name.
        host: String,
        /// Lab name.
        lab: String,
        /// The program.
        program: String,
        /// The operating system's error.
        error: std::io::Error,
    },
}

/// One host of a lab. Cheap to clone; all methods take `&self`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    lab: String,
    index: usize,
    name: String,
    netns: String,
    switch_netns: String,
    addr: Ipv4Addr,
    mtu: u32,
}

impl Host {
    pub(crate) fn new(lab: &str, index: usize, addr: Ipv4Addr, mtu: u32) -> Host {
        Host {
            lab: lab.to_owned(),
            index,
            name: names::host_name(index),
            netns: names::host_netns(lab, index),
            switch_netns: names::switch_netns(lab),
            addr,
            mtu,
        }
    }

    /// Position in the lab, 0-based.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Host name, `h<index>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Name of the lab the host belongs to.
    pub fn lab(&self) -> &str {
        &self.lab
    }

    /// The host's network namespace name (`sdlab-<lab>-h<index>`), usable with `ip netns exec`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The namespace file (`/run/netns/<netns>`), for your own `setns`.
    pub fn netns_path(&self) -> PathBuf {
        netns::netns_path(&self.netns)
    }

    /// The host's IPv4 address (in 198.18.0.0/15).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Prefix length of the host's subnet (the lab's /24).
    pub fn prefix_len(&self) -> u8 {
        PREFIX_LEN
    }

    /// The host's interface towards the switch: `eth0` (inside the host's namespace).
    pub fn ifname(&self) -> &'static str {
        names::HOST_IFNAME
    }

    /// The switch port towards this host, inside the lab's switch namespace.
    pub fn switch_port(&self) -> String {
        names::switch_port(self.index)
    }

    /// MTU of the host's link.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    fn netns_err(&self, error: NetnsError) -> HostError {
        HostError::Netns { host: self.name.clone(), lab: self.lab.clone(), error }
    }

    fn cmd_err(&self, error: CmdError) -> HostError {
        HostError::Cmd { host: self.name.clone(), lab: self.lab.clone(), error }
    }

    /// Runs `f` inside the host (on a new thread that joined the host's network
    /// namespace) and returns its result. A panic in `f` is passed on.
    pub fn run<T, F>(&self, f: F) -> Result<T, HostError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        netns::run_in(&self.netns, f).map_err(|e| self.netns_err(e))
    }

    /// Starts `f` on a new thread inside the host and returns at once; join the
    /// returned handle for `f`'s result.
    pub fn spawn<T, F>(&self, f: F) -> Result<NsThread<T>, HostError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        netns::spawn_in(&self.netns, f).map_err(|e| self.netns_err(e))
    }

    /// A command that runs `program` inside the host (`ip netns exec <netns> <program>`);
    /// add arguments and spawn it as usual. Kill what you spawn; tearing the lab
    /// down also kills every process left inside it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command, HostError> {
        let ip = Tool::Ip.locate().map_err(|e| self.cmd_err(e))?;
        let mut c = Command::new(ip);
        c.args(["netns", "exec", &self.netns]).arg(program);
        Ok(c)
    }

    /// Runs `program args...` inside the host to completion and returns its output
    /// (whatever its exit status; check `status`).
    pub fn output<I, S>(&self, program: &str, args: I) -> Result<Output, HostError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(program)?.args(args).stdin(Stdio::null()).output().map_err(|error| HostError::Exec {
            host: self.name.clone(),
            lab: self.lab.clone(),
            program: program.to_owned(),
            error,
        })
    }

    /// First-time setup inside the host's namespace: IPv6 off, loopback and
    /// `eth0` up, address, multicast route, then the host's side of the initial
    /// conditions (only the tx rate: everything else is on the switch port, set
    /// up with the switch).
    pub(crate) fn setup(&self, conditions: &LinkConditions) -> Result<(), HostError> {
        let ifname = names::HOST_IFNAME;
        let script = format!(
            "link set lo up\n\
             link set {ifname} up\n\
             addr add {addr}/{PREFIX_LEN} dev {ifname}\n\
             route add 224.0.0.0/4 dev {ifname}\n",
            addr = self.addr
        );
        let rate_line = conditions.rate_tx.map(|r| LinkConditions::tc_line(Some(r), ifname, self.mtu).0);
        self.run(|| -> Result<(), CmdError> {
            disable_ipv6();
            cmd::run(Tool::Ip, &["-batch", "-"], Some(&script))?;
            if let Some(line) = &rate_line {
                cmd::run(Tool::Tc, &["-batch", "-"], Some(line))?;
            }
            Ok(())
        })?
        .map_err(|e| self.cmd_err(e))
    }

    /// Changes the host's link from `old` to `new` conditions: tc qdiscs on both
    /// ends of the link where the rate changed, the nftables table of the
    /// host's switch port (in the switch namespace) where loss or cut is
    /// involved, and the stored state (the switch port's alias).
    pub(crate) fn apply(&self, old: &LinkConditions, new: &LinkConditions) -> Result<(), HostError> {
        let ifname = names::HOST_IFNAME;
        if new.needs_nft() || old.needs_nft() {
            preflight::check_nft().map_err(|error| HostError::Preflight {
                host: self.name.clone(),
                lab: self.lab.clone(),
                error,
            })?;
            let script = new.nft_script(&self.switch_port());
            netns::run_in(&self.switch_netns, || cmd::run(Tool::Nft, &["-f", "-"], Some(&script)))
                .map_err(|e| self.netns_err(e))?
                .map_err(|e| self.cmd_err(e))?;
        }
        if old.rate_tx != new.rate_tx {
            self.set_qdisc(&self.netns, ifname, new.rate_tx)?;
        }
        if old.rate_rx != new.rate_rx {
            self.set_qdisc(&self.switch_netns, &self.switch_port(), new.rate_rx)?;
        }
        cmd::run(
            Tool::Ip,
            &["-n", &self.switch_netns, "link", "set", &self.switch_port(), "alias", &new.encode()],
            None,
        )
        .map_err(|e| self.cmd_err(e))?;
        Ok(())
    }

    fn set_qdisc(&self, netns: &str, dev: &str, rate: Option<crate::conditions::Rate>) -> Result<(), HostError> {
        let (line, removing) = LinkConditions::tc_line(rate, dev, self.mtu);
        let mut args = vec!["-n", netns];
        args.extend(line.split(' '));
        match cmd::run(Tool::Tc, &args, None) {
            Ok(_) => Ok(()),
            // Removing a limit that is not there (the qdisc is the default one).
            Err(e)
                if removing
                    && e.stderr().is_some_and(|s| s.contains("handle of zero") || s.contains("No such file")) =>
            {
                Ok(())
            }
            Err(e) => Err(self.cmd_err(e)),
        }
    }
}

/// Turns IPv6 off in the calling thread's network namespace, so that a lab
/// carries only the IPv4 traffic its users send (no router solicitations, MLD
/// reports or duplicate address detection). Missing files (a kernel without
/// IPv6) are fine.
pub(crate) fn disable_ipv6() {
    for path in ["/proc/sys/net/ipv6/conf/all/disable_ipv6", "/proc/sys/net/ipv6/conf/default/disable_ipv6"] {
        // /proc/sys/net resolves to the network namespace of the thread that opens it.
        if let Err(e) = std::fs::write(path, "1") {
            tracing::debug!(path, %e, "could not disable IPv6");
        }
    }
}
