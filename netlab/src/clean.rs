//! Removing labs: one by name (`down`, and a [`crate::Lab`] dropped), or every
//! leftover by prefix (`clean`).
//!
//! A lab consists only of network namespaces named `sdlab-<lab>-…`; its bridge,
//! veth links, qdiscs and nftables tables all live inside them (the loss and
//! cut tables `netdev netlab_hI` in the switch namespace, one per switch port;
//! see [`crate::conditions`]). Removing a lab is therefore: kill the processes
//! still running inside its namespaces (a server started with `netlab exec`
//! would otherwise keep a namespace, and with it the links, alive after its
//! name is gone), then `ip netns del` each namespace. The kernel destroys the
//! links, bridge, qdiscs and tables with the namespace, so no rule is removed
//! one by one. Nothing is ever created in the machine's own namespace.

use crate::cmd::{self, CmdError, Tool};
use crate::lock::{LabLock, LockError};
use crate::names::{self, NetnsRole};
use crate::netns::{self, NetnsError};

/// Errors removing labs.
#[derive(Debug, thiserror::Error)]
pub enum CleanError {
    /// Listing namespaces failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// `ip netns del` failed.
    #[error("removing namespaces failed: {0}")]
    Cmd(CmdError),
    /// Namespaces are still there after removal.
    #[error("these namespaces are still there after removing them: {0:?}")]
    Leftover(Vec<String>),
    /// The machine-wide lock could not be taken.
    #[error(transparent)]
    Lock(#[from] LockError),
}

/// Namespaces that belong to lab `lab` (exact name match, so lab `a` never
/// matches the namespaces of lab `a-b`).
pub fn lab_namespaces(lab: &str) -> Result<Vec<String>, NetnsError> {
    Ok(netns::list_netns()?
        .into_iter()
        .filter(|ns| names::classify_netns(ns).is_some_and(|r| r.lab() == Some(lab)))
        .collect())
}

/// Kills the processes inside `namespaces` and deletes the namespaces.
pub fn remove_namespaces(namespaces: &[String]) -> Result<(), CleanError> {
    if namespaces.is_empty() {
        return Ok(());
    }
    for pid in netns::pids_in(namespaces) {
        tracing::info!(pid, "killing a process left inside a lab namespace");
        netns::kill(pid);
    }
    let script: String = namespaces.iter().map(|ns| format!("netns del {ns}\n")).collect();
    // -force: keep going past a namespace that vanished meanwhile; the check
    // below is what decides success.
    let result = cmd::run(Tool::Ip, &["-force", "-batch", "-"], Some(&script));
    let left: Vec<String> = namespaces.iter().filter(|ns| netns::netns_exists(ns)).cloned().collect();
    if !left.is_empty() {
        return match result {
            Err(e) => Err(CleanError::Cmd(e)),
            Ok(_) => Err(CleanError::Leftover(left)),
        };
    }
    Ok(())
}

/// Removes lab `lab` (all of its namespaces and whatever they hold). A lab that
/// does not exist is not an error.
pub fn teardown(lab: &str) -> Result<(), CleanError> {
    let namespaces = lab_namespaces(lab)?;
    tracing::debug!(lab, ?namespaces, "tearing down");
    remove_namespaces(&namespaces)?;
    remove_lock_if_unused();
    Ok(())
}

/// Deletes `/run/netlab/` when no netlab namespace is left and nobody holds
/// the lock (a creator at work holds it, so this never blocks).
fn remove_lock_if_unused() {
    if let Some(lock) = LabLock::try_acquire_existing() {
        let anything_left =
            netns::list_netns().map(|all| all.iter().any(|ns| names::classify_netns(ns).is_some())).unwrap_or(true);
        if !anything_left {
            lock.remove_files();
        }
    }
}

/// What [`clean`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanReport {
    /// Names of the labs removed.
    pub labs: Vec<String>,
    /// Every namespace removed.
    pub namespaces: Vec<String>,
}

/// Removes every lab whose name starts with `name_prefix`, or, with `None`,
/// every namespace starting with `sdlab-` (broken leftovers included) and the
/// lock file under `/run/netlab/`.
pub fn clean(name_prefix: Option<&str>) -> Result<CleanReport, CleanError> {
    let lock = LabLock::acquire()?;
    let mut report = CleanReport::default();
    for ns in netns::list_netns()? {
        let Some(role) = names::classify_netns(&ns) else {
            continue;
        };
        let selected = match (name_prefix, &role) {
            (None, _) => true,
            (Some(p), NetnsRole::Switch { lab } | NetnsRole::Host { lab, .. }) => lab.starts_with(p),
            (Some(_), NetnsRole::Stray) => false,
        };
        if !selected {
            continue;
        }
        if let Some(lab) = role.lab() {
            if !report.labs.iter().any(|l| l == lab) {
                report.labs.push(lab.to_owned());
            }
        }
        report.namespaces.push(ns);
    }
    remove_namespaces(&report.namespaces)?;
    let anything_left = netns::list_netns()?.iter().any(|ns| names::classify_netns(ns).is_some());
    if name_prefix.is_none() && !anything_left {
        lock.remove_files();
    }
    Ok(report)
}
