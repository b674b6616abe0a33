//! [`ServerEndpoint`]: a memory server's sessions behind one datagram entry point.
//!
//! Each session is one [`Sender`]; the endpoint routes every datagram the server receives to the
//! sender of its session (a datagram of no session served here is counted and dropped), and hands
//! out what the senders send with its destination, the session's multicast group. A server process
//! serves one session today (one fork); the endpoint is what lets one process serve several on one
//! port.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddrV4;
use std::ops::Bound;

use crate::sender::{Destination, PageSource, Sender, SenderEvent, Transmit};
use crate::wire::{self, EndReason, NodeId, SessionId};
use crate::Time;

/// A datagram [`ServerEndpoint::poll_transmit`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerTransmit {
    /// Its length in the caller's buffer.
    pub len: usize,
    /// Where it goes: the session's group, or the one host an out-of-stream answer is for.
    pub destination: SocketAddrV4,
    /// The session it belongs to.
    pub session: SessionId,
    /// Send it now, before more is written ([`Transmit::urgent`]).
    pub urgent: bool,
}

/// What the endpoint dropped before any sender saw it (each sender keeps its own counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    /// Datagrams handed to the endpoint.
    pub datagrams: u64,
    /// Dropped: no valid header.
    pub malformed: u64,
    /// Dropped: sent by a server, not a host.
    pub from_servers: u64,
    /// Dropped: of a session not served here.
    pub unknown_session: u64,
}

/// A server's sessions. See the module docs.
pub struct ServerEndpoint<S: PageSource> {
    sessions: BTreeMap<SessionId, (Sender<S>, SocketAddrV4)>,
    /// Where each host's authentic datagrams came from: the address of its unicast answers.
    hosts: HashMap<(SessionId, NodeId), SocketAddrV4>,
    events: VecDeque<(SessionId, SenderEvent)>,
    stats: ServerStats,
    last_tx: Option<SessionId>,
}

impl<S: PageSource> Default for ServerEndpoint<S> {
    fn default() -> Self {
        ServerEndpoint {
            sessions: BTreeMap::new(),
            hosts: HashMap::new(),
            events: VecDeque::new(),
            stats: ServerStats::default(),
            last_tx: None,
        }
    }
}

impl<S: PageSource> ServerEndpoint<S> {
    /// An endpoint serving no session yet.
    pub fn new() -> ServerEndpoint<S> {
        ServerEndpoint::default()
    }

    /// Serves `sender`'s session to `group` (replacing a sender of the same session).
    pub fn serve(&mut self, sender: Sender<S>, group: SocketAddrV4) -> SessionId {
        let id = sender.session();
        self.sessions.insert(id, (sender, group));
        id
    }

    /// The sender of `session`.
    pub fn sender(&self, session: SessionId) -> Option<&Sender<S>> {
        self.sessions.get(&session).map(|(s, _)| s)
    }

    /// The sender of `session`, for commands (blobs, hints).
    pub fn sender_mut(&mut self, session: SessionId) -> Option<&mut Sender<S>> {
        self.sessions.get_mut(&session).map(|(s, _)| s)
    }

    /// The endpoint's own counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Ends every session (End goes out to each group).
    pub fn end(&mut self, now: Time, reason: EndReason) {
        for (sender, _) in self.sessions.values_mut() {
            sender.end(now, reason);
        }
    }

    /// Takes one datagram a host sent from `source`.
    pub fn handle_datagram(&mut self, now: Time, source: SocketAddrV4, datagram: &mut [u8]) {
        self.stats.datagrams += 1;
        let header = match wire::peek_header(datagram) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("dropping malformed datagram: {e}");
                self.stats.malformed += 1;
                return;
            }
        };
        if header.node == NodeId::SERVER {
            self.stats.from_servers += 1;
            return;
        }
        let Some((sender, _)) = self.sessions.get_mut(&header.session) else {
            self.stats.unknown_session += 1;
            return;
        };
        if sender.handle_datagram(now, datagram) {
            // Learned only from datagrams the session's keys authenticated: a forger cannot have
            // another host's answers sent to itself.
            self.hosts.insert((header.session, header.node), source);
        }
        Self::absorb(&mut self.events, header.session, sender);
    }

    fn absorb(events: &mut VecDeque<(SessionId, SenderEvent)>, id: SessionId, sender: &mut Sender<S>) {
        while let Some(e) = sender.poll_event() {
            events.push_back((id, e));
        }
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        for (&id, (sender, _)) in self.sessions.iter_mut() {
            if sender.poll_timeout().is_some_and(|t| t <= now) {
                sender.handle_timeout(now);
                Self::absorb(&mut self.events, id, sender);
            }
        }
    }

    /// When [`ServerEndpoint::handle_timeout`] must next be called; `None` once every session has
    /// ended and its End messages are out.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.sessions.values().filter_map(|(s, _)| s.poll_timeout()).min()
    }

    /// Writes the next datagram any session has due into `buf`, taking the sessions in turn.
    pub fn poll_transmit(&mut self, now: Time, buf: &mut [u8]) -> Option<ServerTransmit> {
        // Round robin: from the session after the one that sent last, wrapping once.
        let last = self.last_tx;
        let first = match last {
            Some(l) => self.sessions.range_mut((Bound::Excluded(l), Bound::Unbounded)),
            None => self.sessions.range_mut(..),
        };
        let mut found = None;
        let hosts = &self.hosts;
        let outgoing = |id: SessionId, group: SocketAddrV4, t: Transmit| ServerTransmit {
            len: t.len,
            destination: match t.destination {
                Destination::Group => group,
                // A host heard from (it asked): its address; else the group, which reaches it too.
                Destination::Node(node) => hosts.get(&(id, node)).copied().unwrap_or(group),
            },
            session: id,
            urgent: t.urgent,
        };
        for (&id, (sender, group)) in first {
            if let Some(t) = sender.poll_transmit(now, buf) {
                found = Some(outgoing(id, *group, t));
                break;
            }
        }
        if let (None, Some(l)) = (found, last) {
            for (&id, (sender, group)) in self.sessions.range_mut(..=l) {
                if let Some(t) = sender.poll_transmit(now, buf) {
                    found = Some(outgoing(id, *group, t));
                    break;
                }
            }
        }
        self.last_tx = found.map(|t| t.session);
        found
    }

    /// The next event of any session.
    pub fn poll_event(&mut self) -> Option<(SessionId, SenderEvent)> {
        self.events.pop_front()
    }
}
