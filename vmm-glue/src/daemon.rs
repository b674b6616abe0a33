//! [`DaemonLink`]: a clone VMM's connection to its host daemon.
//!
//! The host daemon spawns `spindrift-vmm clone ...` with the path of its Unix socket. The clone connects,
//! asks for the session's cache memfd and maps it `MAP_PRIVATE` as its guest memory (unless told to
//! take private copies), and once its memory is registered sends the userfaultfd with spindrift's handoff message
//! (`{"regions": [...], "clone_id": I, "session": "S", "fork": F}`, see
//! [`spindrift_client::handoff`]). The connection stays open for the clone's life: the daemon closing
//! it means the daemon is gone, and the clone stops (see [`crate::host::HandlerLink`]). The clone's
//! `REPORT` travels on the same stream as one newline-terminated JSON line:
//!
//! ```text
//! {"type":"report","status":<u32>,"result_hex":"<hex>"}
//! ```

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use spindrift_client::handoff::{recv_map_reply, send_map_request, DEFAULT_RECV_TIMEOUT};
use spindrift_client::uffd::Uffd;
use spindrift_client::{send_handoff, HandoffMessage, Region};

use crate::descriptor::Descriptor;
use crate::host::{to_hex, CloneHost, CloneIdentity, CloneReport, HandlerLink, HostError, MemoryHandler};
use crate::memory::GuestMemory;

/// The report line a clone writes to its daemon.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReportLine {
    /// Always `"report"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The guest's status.
    pub status: u32,
    /// The result bytes, hex.
    pub result_hex: String,
}

/// A clone's connection to its host daemon: memory handler (the handoff) and clone host (reports).
#[derive(Debug)]
pub struct DaemonLink {
    stream: UnixStream,
    session: Option<String>,
    /// Whether the clone asks for the host's cache memfd (see [`DaemonLink::private_copy`]).
    shared: bool,
    mapped: bool,
}

impl DaemonLink {
    /// Connects to the daemon's socket.
    pub fn connect(path: &Path, session: Option<String>) -> Result<DaemonLink, HostError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| HostError::Io { op: "connecting to the host daemon", source })?;
        Ok(DaemonLink { stream, session, shared: true, mapped: false })
    }

    /// Asks the daemon to copy every page into private memory instead of mapping the host's cache
    /// memfd (the fallback, as for Firecracker's anonymous memory).
    pub fn private_copy(mut self, private: bool) -> DaemonLink {
        self.shared = !private;
        self
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: UnixStream, session: Option<String>) -> DaemonLink {
        DaemonLink { stream, session, shared: true, mapped: false }
    }
}

impl MemoryHandler for DaemonLink {
    fn shared_memory(&mut self, clone: &CloneIdentity, bytes: u64) -> Result<Option<OwnedFd>, HostError> {
        if !self.shared {
            return Ok(None);
        }
        let session = clone.session.clone().or_else(|| self.session.clone());
        send_map_request(&self.stream, session.as_deref()).map_err(HostError::Handoff)?;
        let (fd, cache_bytes) = recv_map_reply(&self.stream, DEFAULT_RECV_TIMEOUT).map_err(HostError::Handoff)?;
        if cache_bytes < bytes {
            return Err(HostError::Other(format!(
                "the host's cache holds {cache_bytes} bytes, fewer than the clone's {bytes} bytes of memory"
            )));
        }
        self.mapped = true;
        Ok(Some(fd))
    }

    fn attach(&mut self, uffd: &Uffd, regions: &[Region], clone: &CloneIdentity) -> Result<HandlerLink, HostError> {
        let message = HandoffMessage {
            regions: regions.to_vec(),
            clone_id: Some(u64::from(clone.clone_id)),
            session: clone.session.clone().or_else(|| self.session.clone()),
            fork: Some(clone.fork_id),
            shared_cache: self.mapped,
            ..HandoffMessage::default()
        };
        send_handoff(&self.stream, uffd.as_fd(), &message).map_err(HostError::Handoff)?;
        let watch =
            self.stream.try_clone().map_err(|source| HostError::Io { op: "duplicating the daemon socket", source })?;
        Ok(HandlerLink { watch: Some(watch.into()) })
    }
}

impl CloneHost for DaemonLink {
    fn fork(&mut self, _: u32, _: &Descriptor, _: &GuestMemory) -> Result<u32, HostError> {
        Err(HostError::Unsupported("FORK inside a daemon-served clone"))
    }

    fn join(&mut self, _: u32, _: Duration) -> Result<Vec<CloneReport>, HostError> {
        Err(HostError::Unsupported("JOIN inside a daemon-served clone"))
    }

    fn report(&mut self, report: &CloneReport) -> Result<(), HostError> {
        let line = ReportLine { kind: "report".into(), status: report.status, result_hex: to_hex(&report.result) };
        let mut bytes = serde_json::to_vec(&line).map_err(|e| HostError::Other(format!("encoding the report: {e}")))?;
        bytes.push(b'\n');
        (&self.stream)
            .write_all(&bytes)
            .map_err(|source| HostError::Io { op: "sending the report to the daemon", source })
    }
}
