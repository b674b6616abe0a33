//! Shared test helpers: skip (or, with NETLAB_REQUIRE=1, fail; see `netlab::require`) when KVM or
//! userfaultfd is unavailable, bounded runs, and a recording clone host.

#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use vmm_glue::{CloneHost, CloneReport, Descriptor, GuestMemory, HostError};

/// Whether this machine can run the VMM tests (`/dev/kvm` and userfaultfd); prints why not and
/// returns false (or panics when `NETLAB_REQUIRE=1`).
pub fn can_run(test: &str) -> bool {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let check = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Err(e) => Err(format!("/dev/kvm is not usable ({e}): run as root on a machine with KVM")),
        Ok(_) => spindrift_client::uffd::Uffd::create(0).map(drop).map_err(|e| {
            let cause = std::error::Error::source(&e).map(|c| format!(" ({c})")).unwrap_or_default();
            format!("userfaultfd unavailable: {e}{cause}")
        }),
    };
    netlab::require::available(test, check)
}

/// Runs `f` on a thread and fails the test if it takes longer than `limit` (the thread is left behind).
pub fn bounded<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what}: did not finish within {limit:?}"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// A host that keeps the descriptor and the memory image, forks nothing, and fails the join.
#[derive(Default)]
pub struct Recorder {
    pub descriptor: Option<Descriptor>,
    pub image: Vec<u8>,
}

impl CloneHost for Recorder {
    fn fork(&mut self, _: u32, d: &Descriptor, memory: &GuestMemory) -> Result<u32, HostError> {
        self.image = vec![0; memory.size() as usize];
        memory.copy_to(&mut self.image).unwrap();
        self.descriptor = Some(d.clone());
        Ok(d.fork_id)
    }
    fn join(&mut self, fork: u32, _: Duration) -> Result<Vec<CloneReport>, HostError> {
        Err(HostError::UnknownFork(fork))
    }
    fn report(&mut self, _: &CloneReport) -> Result<(), HostError> {
        Ok(())
    }
}
