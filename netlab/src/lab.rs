//! A lab: N hosts on one switch. Creating, opening, changing and removing it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use crate::addressing::{self, AddressError, MAX_HOSTS, MAX_LABS, PREFIX_LEN};
use crate::clean::{self, CleanError};
use crate::cmd::{self, CmdError, Tool};
use crate::conditions::LinkConditions;
use crate::host::{self, Host, HostError};
use crate::lock::{LabLock, LockError};
use crate::names::{self, NameError, NetnsRole};
use crate::netns::{self, NetnsError};
use crate::preflight::{self, PreflightError};
use crate::state::{self, LabMeta, StateError};

/// Smallest MTU accepted (the IPv4 minimum).
pub const MIN_MTU: u32 = 68;
/// Largest MTU accepted (veth's maximum).
pub const MAX_MTU: u32 = 65535;
/// MTU when none is given.
pub const DEFAULT_MTU: u32 = 1500;

/// IGMP query response interval of a snooping switch, in centiseconds (1 s).
/// For this long after a lab is created, a snooping switch still floods.
const SNOOPING_RESPONSE_CS: u32 = 100;

/// Errors creating, opening, changing or removing a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Bad lab or host name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Zero hosts.
    #[error("a lab needs at least one host")]
    NoHosts,
    /// Too many hosts.
    #[error("{requested} hosts requested; a lab has at most {MAX_HOSTS} (one /24 of 198.18.0.0/15 per lab)")]
    TooManyHosts {
        /// Hosts asked for.
        requested: usize,
    },
    /// MTU out of range.
    #[error("MTU {0} is out of range: use {MIN_MTU}..={MAX_MTU} (1500 is the default, 9000 for jumbo frames)")]
    BadMtu(u32),
    /// Per-host conditions given for a host the lab will not have.
    #[error("conditions given for host h{host}, but the lab has only {hosts} hosts (h0..h{last})", last = hosts.saturating_sub(1))]
    ConditionsForMissingHost {
        /// The host index.
        host: usize,
        /// Hosts in the lab.
        hosts: usize,
    },
    /// A host index past the end.
    #[error("lab {lab} has no host h{host}: its hosts are h0..h{last}", last = hosts.saturating_sub(1))]
    NoSuchHost {
        /// Lab name.
        lab: String,
        /// The host index asked for.
        host: usize,
        /// Hosts in the lab.
        hosts: usize,
    },
    /// Privileges or tools missing.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// A lab of that name exists.
    #[error("a lab named {0:?} already exists (remove it with `netlab down {0}` or pick another name)")]
    Exists(String),
    /// All 512 address blocks are taken.
    #[error(
        "all {MAX_LABS} address blocks of 198.18.0.0/15 are in use by other labs; remove some with `netlab clean`"
    )]
    NoFreeBlock,
    /// Address plan error.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The machine-wide lock.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// A tool failed while building the lab.
    #[error("creating lab {lab}: {error}")]
    Cmd {
        /// Lab name.
        lab: String,
        /// The failed command.
        error: CmdError,
    },
    /// Entering or listing namespaces failed.
    #[error("lab {lab}: {error}")]
    Netns {
        /// Lab name.
        lab: String,
        /// What failed.
        error: NetnsError,
    },
    /// A host operation failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Reading an existing lab failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Removing the lab failed.
    #[error("removing lab {lab}: {error}")]
    Teardown {
        /// Lab name.
        lab: String,
        /// What failed.
        error: CleanError,
    },
}

/// How to build a lab. Start with [`LabConfig::new`] and chain the setters.
#[derive(Debug, Clone, PartialEq)]
pub struct LabConfig {
    name: String,
    hosts: usize,
    mtu: u32,
    igmp_snooping: bool,
    conditions: LinkConditions,
    per_host: BTreeMap<usize, LinkConditions>,
    fail_at_host: Option<usize>,
}

impl LabConfig {
    /// A lab called `name` with `hosts` hosts, MTU 1500, perfect links, and a
    /// switch that floods multicast (IGMP snooping off).
    pub fn new(name: impl Into<String>, hosts: usize) -> LabConfig {
        LabConfig {
            name: name.into(),
            hosts,
            mtu: DEFAULT_MTU,
            igmp_snooping: false,
            conditions: LinkConditions::default(),
            per_host: BTreeMap::new(),
            fail_at_host: None,
        }
    }

    /// For tests of the cleanup path only: creation fails, as if a command had
    /// failed, just before host `index` is set up (namespaces, links and the
    /// switch already exist then).
    #[doc(hidden)]
    pub fn fail_at_host(mut self, index: usize) -> LabConfig {
        self.fail_at_host = Some(index);
        self
    }

    /// The MTU of every link (68..=65535; 1500 default, 9000 for jumbo frames).
    pub fn mtu(mut self, mtu: u32) -> LabConfig {
        self.mtu = mtu;
        self
    }

    /// Turns IGMP snooping on the switch on (receivers must join groups, and the
    /// switch runs an IGMP querier) or off (the default: multicast floods to
    /// every port).
    pub fn igmp_snooping(mut self, on: bool) -> LabConfig {
        self.igmp_snooping = on;
        self
    }

    /// Conditions for every host's link (unless overridden by [`LabConfig::host_conditions`]).
    pub fn conditions(mut self, conditions: LinkConditions) -> LabConfig {
        self.conditions = conditions;
        self
    }

    /// Conditions for host `index`'s link only.
    pub fn host_conditions(mut self, index: usize, conditions: LinkConditions) -> LabConfig {
        self.per_host.insert(index, conditions);
        self
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of hosts.
    pub fn host_count(&self) -> usize {
        self.hosts
    }

    fn conditions_of(&self, index: usize) -> LinkConditions {
        self.per_host.get(&index).copied().unwrap_or(self.conditions)
    }

    /// Checks the configuration without touching the system.
    pub fn validate(&self) -> Result<(), LabError> {
        names::validate_lab_name(&self.name)?;
        if self.hosts == 0 {
            return Err(LabError::NoHosts);
        }
        if self.hosts > MAX_HOSTS {
            return Err(LabError::TooManyHosts { requested: self.hosts });
        }
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(LabError::BadMtu(self.mtu));
        }
        if let Some((&host, _)) = self.per_host.range(self.hosts..).next() {
            return Err(LabError::ConditionsForMissingHost { host, hosts: self.hosts });
        }
        Ok(())
    }
}

/// A running lab: N hosts, each in its own network namespace, linked by veth
/// pairs to one bridge in a switch namespace.
///
/// A `Lab` made by [`Lab::create`] owns the lab: dropping it removes the lab
/// (during a panic's unwinding too). [`Lab::persist`] gives that up and leaves
/// the lab running; [`Lab::open`] gives a handle to an existing lab that does
/// not remove it on drop; [`Lab::down`] removes it explicitly.
///
/// All methods take `&self`, so a lab can be shared between threads.
#[derive(Debug)]
pub struct Lab {
    name: String,
    meta: LabMeta,
    hosts: Vec<Host>,
    /// Current conditions of each host's link; the lock also serialises changes.
    conditions: Mutex<Vec<LinkConditions>>,
    owned: bool,
}

impl Lab {
    /// Builds a lab as configured, or fails with nothing left behind.
    pub fn create(config: &LabConfig) -> Result<Lab, LabError> {
        config.validate()?;
        preflight::check()?;
        let all_conditions: Vec<LinkConditions> = (0..config.hosts).map(|i| config.conditions_of(i)).collect();
        if all_conditions.iter().any(LinkConditions::needs_nft) {
            preflight::check_nft()?;
        }
        let started = Instant::now();
        let name = config.name.clone();
        let lock = LabLock::acquire()?;
        let netns_err = |error| LabError::Netns { lab: name.clone(), error };
        if !clean::lab_namespaces(&name).map_err(netns_err)?.is_empty() {
            return Err(LabError::Exists(name));
        }
        let index = free_index(&name)?;
        let meta = LabMeta { index, hosts: config.hosts, mtu: config.mtu, igmp_snooping: config.igmp_snooping };
        let hosts = (0..config.hosts)
            .map(|i| Ok(Host::new(&name, i, addressing::host_addr(index, i)?, config.mtu)))
            .collect::<Result<Vec<Host>, AddressError>>()?;
        // From here on the value owns whatever exists: an early return drops it,
        // and the drop removes every namespace of this lab.
        let lab = Lab { name, meta, hosts, conditions: Mutex::new(all_conditions.clone()), owned: true };
        lab.build(&all_conditions, config.fail_at_host)?;
        drop(lock);
        tracing::info!(
            lab = %lab.name,
            hosts = config.hosts,
            subnet = %lab.subnet(),
            elapsed_ms = started.elapsed().as_millis(),
            "lab is up"
        );
        Ok(lab)
    }

    fn cmd_err(&self) -> impl Fn(CmdError) -> LabError + '_ {
        move |error| LabError::Cmd { lab: self.name.clone(), error }
    }

    /// Runs the commands that make the namespaces, links, bridge and conditions.
    fn build(&self, conditions: &[LinkConditions], fail_at_host: Option<usize>) -> Result<(), LabError> {
        let sw = names::switch_netns(&self.name);
        let mtu = self.meta.mtu;
        // 1. Namespaces and veth pairs, created directly inside their namespaces.
        let mut root = format!("netns add {sw}\n");
        for h in &self.hosts {
            root.push_str(&format!("netns add {}\n", h.netns()));
        }
        for h in &self.hosts {
            root.push_str(&format!(
                "link add {eth} netns {ns} mtu {mtu} type veth peer name {port} netns {sw} mtu {mtu}\n",
                eth = h.ifname(),
                ns = h.netns(),
                port = h.switch_port(),
            ));
        }
        cmd::run(Tool::Ip, &["-batch", "-"], Some(&root)).map_err(self.cmd_err())?;

        // 2. The switch: a bridge with every port, settings and conditions in
        //    aliases, the rx rates, and the loss and cut rules of both directions
        //    (on the ports, where AF_XDP traffic cannot bypass them; see
        //    `conditions`).
        let br = names::BRIDGE_IFNAME;
        let mut switch = if self.meta.igmp_snooping {
            // The querier goes on in a second step: enabling it starts a wait of
            // one query response interval before snooping takes effect, and the
            // kernel applies the querier option before the interval option.
            format!(
                "link add {br} mtu {mtu} type bridge stp_state 0 mcast_snooping 1 \
                 mcast_query_response_interval {SNOOPING_RESPONSE_CS}\n\
                 link set {br} type bridge mcast_querier 1\n"
            )
        } else {
            format!("link add {br} mtu {mtu} type bridge stp_state 0 mcast_snooping 0\n")
        };
        switch.push_str(&format!("link set {br} alias \"{}\"\n", self.meta.encode()));
        let mut switch_tc = String::new();
        let mut switch_nft = String::new();
        for (h, c) in self.hosts.iter().zip(conditions) {
            let port = h.switch_port();
            switch.push_str(&format!(
                "link set {port} master {br}\nlink set {port} alias \"{}\"\nlink set {port} up\n",
                c.encode()
            ));
            if c.rate_rx.is_some() {
                switch_tc.push_str(&LinkConditions::tc_line(c.rate_rx, &port, mtu).0);
                switch_tc.push('\n');
            }
            if c.needs_nft() {
                switch_nft.push_str(&c.nft_script(&port));
            }
        }
        switch.push_str(&format!("link set {br} up\n"));
        netns::run_in(&sw, || -> Result<(), CmdError> {
            host::disable_ipv6();
            cmd::run(Tool::Ip, &["-batch", "-"], Some(&switch))?;
            if !switch_tc.is_empty() {
                cmd::run(Tool::Tc, &["-batch", "-"], Some(&switch_tc))?;
            }
            if !switch_nft.is_empty() {
                // One transaction for every port.
                cmd::run(Tool::Nft, &["-f", "-"], Some(&switch_nft))?;
            }
            Ok(())
        })
        .map_err(|error| LabError::Netns { lab: self.name.clone(), error })?
        .map_err(self.cmd_err())?;

        // 3. Each host: addresses, routes, its side of the conditions (the tx rate).
        for (h, c) in self.hosts.iter().zip(conditions) {
            if fail_at_host == Some(h.index()) {
                return Err(LabError::Cmd {
                    lab: self.name.clone(),
                    error: CmdError::Failed(Box::new(crate::cmd::Failure {
                        cmdline: format!("(injected failure before setting up {})", h.name()),
                        status: "injected".into(),
                        stderr: "failure injected by LabConfig::fail_at_host".into(),
                        script: None,
                    })),
                });
            }
            h.setup(c)?;
        }
        Ok(())
    }

    /// A handle to an existing lab (made by another process, or persisted).
    /// Dropping it leaves the lab running; call [`Lab::down`] to remove it.
    pub fn open(name: &str) -> Result<Lab, LabError> {
        names::validate_lab_name(name)?;
        preflight::check()?;
        let (meta, conditions) = state::read(name)?;
        let hosts = (0..meta.hosts)
            .map(|i| Ok(Host::new(name, i, addressing::host_addr(meta.index, i)?, meta.mtu)))
            .collect::<Result<Vec<Host>, AddressError>>()?;
        Ok(Lab { name: name.to_owned(), meta, hosts, conditions: Mutex::new(conditions), owned: false })
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lab's /24 network address (inside 198.18.0.0/15).
    pub fn subnet(&self) -> Ipv4Addr {
        // The index was validated when the lab was made or read.
        addressing::lab_subnet(self.meta.index).unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// Prefix length of the lab's subnet (24).
    pub fn prefix_len(&self) -> u8 {
        PREFIX_LEN
    }

    /// Index of the lab's /24 inside 198.18.0.0/15 (0..512).
    pub fn index(&self) -> u16 {
        self.meta.index
    }

    /// MTU of every link.
    pub fn mtu(&self) -> u32 {
        self.meta.mtu
    }

    /// Whether the switch does IGMP snooping.
    pub fn igmp_snooping(&self) -> bool {
        self.meta.igmp_snooping
    }

    /// The switch's namespace (`sdlab-<lab>-sw`), holding the bridge `br0`.
    pub fn switch_netns(&self) -> String {
        names::switch_netns(&self.name)
    }

    /// All hosts, in order h0, h1, ...
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Always false: a lab has at least one host.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host `index`, or an error naming the valid range.
    pub fn host(&self, index: usize) -> Result<&Host, LabError> {
        self.hosts.get(index).ok_or_else(|| LabError::NoSuchHost {
            lab: self.name.clone(),
            host: index,
            hosts: self.hosts.len(),
        })
    }

    /// Host by name (`h3`).
    pub fn host_named(&self, name: &str) -> Result<&Host, LabError> {
        self.host(names::parse_host(name)?)
    }

    /// Current conditions of host `index`'s link.
    pub fn conditions(&self, index: usize) -> Result<LinkConditions, LabError> {
        self.host(index)?;
        let all = self.conditions.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(all.get(index).copied().unwrap_or_default())
    }

    /// Sets host `index`'s link conditions on the running lab.
    pub fn set_conditions(&self, index: usize, new: &LinkConditions) -> Result<(), LabError> {
        self.update_conditions(index, |c| *c = *new)
    }

    /// Changes host `index`'s link conditions with `change` and applies the
    /// result: the tc qdiscs whose rate changed, the nftables table of the
    /// host's switch port when loss or cut is or was set, and the stored state.
    pub fn update_conditions(&self, index: usize, change: impl FnOnce(&mut LinkConditions)) -> Result<(), LabError> {
        let host = self.host(index)?;
        let mut all = self.conditions.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(slot) = all.get_mut(index) else {
            return Err(LabError::NoSuchHost { lab: self.name.clone(), host: index, hosts: self.hosts.len() });
        };
        let old = *slot;
        let mut new = old;
        change(&mut new);
        host.apply(&old, &new)?;
        *slot = new;
        tracing::debug!(lab = %self.name, host = host.name(), conditions = %new, "conditions set");
        Ok(())
    }

    /// Cuts host `index` off: it receives nothing and nothing it sends leaves
    /// (drop rules on its switch port, so whatever way the host sends).
    pub fn cut(&self, index: usize) -> Result<(), LabError> {
        self.update_conditions(index, |c| c.cut = true)
    }

    /// Undoes [`Lab::cut`]; rate and loss settings are kept throughout.
    pub fn restore(&self, index: usize) -> Result<(), LabError> {
        self.update_conditions(index, |c| c.cut = false)
    }

    /// Leaves the lab running after this value is dropped (for the CLI `up`, or
    /// to inspect a lab after a test) and returns its name. Remove it later with
    /// `netlab down NAME`, [`Lab::open`] + [`Lab::down`], or `netlab clean`.
    pub fn persist(mut self) -> String {
        self.owned = false;
        std::mem::take(&mut self.name)
    }

    /// Whether dropping this value removes the lab.
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    /// Removes the lab now: kills processes left inside it and deletes its
    /// namespaces (with the links, bridge, qdiscs and the switch's nftables
    /// tables in them).
    pub fn down(mut self) -> Result<(), LabError> {
        self.owned = false;
        clean::teardown(&self.name).map_err(|error| LabError::Teardown { lab: self.name.clone(), error })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = clean::teardown(&self.name) {
            tracing::error!(lab = %self.name, error = %e, "could not remove the lab");
            eprintln!("netlab: could not remove lab {}: {e}; run `netlab clean` to remove leftovers", self.name);
        }
    }
}

/// Lowest address-block index not used by an existing lab. Runs under the lock.
fn free_index(lab: &str) -> Result<u16, LabError> {
    let mut used = vec![false; usize::from(MAX_LABS)];
    let namespaces = netns::list_netns().map_err(|error| LabError::Netns { lab: lab.to_owned(), error })?;
    for ns in namespaces {
        if let Some(NetnsRole::Switch { lab: other }) = names::classify_netns(&ns) {
            // A damaged lab has no readable index: its block may be reused,
            // which is harmless because labs are separate layer-2 networks.
            if let Ok(meta) = state::read_meta(&other) {
                if let Some(slot) = used.get_mut(usize::from(meta.index)) {
                    *slot = true;
                }
            }
        }
    }
    used.iter().position(|u| !u).and_then(|i| u16::try_from(i).ok()).ok_or(LabError::NoFreeBlock)
}
