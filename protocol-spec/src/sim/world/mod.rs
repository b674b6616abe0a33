//! The simulated world: topology, state machines, workload, and the loop that drives them.
//!
//! Every state machine is driven as the crate docs prescribe: after each input (a datagram, a timer, a
//! fault), drain `poll_transmit` into the links, drain `poll_event`, then (re)schedule a wakeup at
//! `poll_timeout()`. Each node keeps the wakeup it scheduled last; a timer event for any other time is
//! stale and ignored. Each host is a [`HostEndpoint`], as in the host daemon: the same routing, the
//! same session lifecycle, with the session followed from the host's start.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::rc::Rc;
use std::time::{Duration, Instant};

use rand::RngCore;

use super::content::{Image, PAGE_SHIFT};
use super::events::EventQueue;
use super::link::{Corruption, Fate, FaultConfig, Faults, Pipe};
use super::report::SimReport;
use super::rng::{self, Domain};
use super::sink::VerifyingSink;
use super::workload::{self, WorkingSet};
use super::{Push, SimConfig, SimError, Workload};
use crate::endpoint::{HostConfig, HostEndpoint, HostEvent};
use crate::receiver::{ReceiverConfig, ReceiverStats, MIN_WINDOW};
use crate::sender::{PushPolicy, Sender, SenderConfig, SenderEvent};
use crate::wire::{Keys, NodeId, SessionId, SessionKey, MAX_DATAGRAM};
use crate::Time;

mod summary;
mod trace;

use trace::{describe, msg_type};

/// Most datagrams one drain of `poll_transmit` may yield before the run is declared a livelock.
const MAX_DRAIN: u64 = 10_000_000;
/// Most events at one instant of virtual time before the run is declared a livelock.
const MAX_SAME_INSTANT: u64 = 5_000_000;
/// The server's address as the hosts see it (the simulated links do not route by address).
const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 7700);

enum Ev {
    /// A multicast datagram reaches the downlinks' fault stage (all receivers at once).
    Multicast(Rc<[u8]>),
    /// One copy of a multicast datagram reaches receiver `rx` late (reordered or duplicated).
    ToReceiver { rx: u32, pkt: Rc<[u8]>, corruption: Corruption },
    /// A receiver's datagram reaches the server's ingress queue.
    AtIngress { pkt: Rc<[u8]>, corruption: Corruption },
    /// A receiver's datagram reaches the server.
    ToServer { pkt: Rc<[u8]>, corruption: Corruption },
    /// The sender's wakeup.
    SenderTimer,
    /// Receiver `rx`'s wakeup.
    ReceiverTimer(u32),
    /// Receiver `rx`'s vCPU touches its next page.
    Step(u32),
    /// Receiver `rx` joins.
    Start(u32),
}

impl Ev {
    const KINDS: [&'static str; 8] =
        ["multicast", "late copy", "at ingress", "to server", "sender timer", "receiver timer", "step", "start"];

    fn kind(&self) -> usize {
        match self {
            Ev::Multicast(_) => 0,
            Ev::ToReceiver { .. } => 1,
            Ev::AtIngress { .. } => 2,
            Ev::ToServer { .. } => 3,
            Ev::SenderTimer => 4,
            Ev::ReceiverTimer(_) => 5,
            Ev::Step(_) => 6,
            Ev::Start(_) => 7,
        }
    }
}

struct Node {
    config: Option<ReceiverConfig>,
    /// The host's endpoint: it follows the session from the host's start.
    host: HostEndpoint<VerifyingSink>,
    /// The host's sink until it starts (then the endpoint holds it).
    idle_sink: Option<VerifyingSink>,
    started: bool,
    downlink: Faults,
    uplink: Faults,
    uplink_pipe: Pipe,
    /// A slow receiver's socket: datagrams wait here until its daemon takes them.
    socket: Option<Pipe>,
    timer: Option<Time>,
    /// From this time on, everything it sends is lost.
    silent_from: Option<Time>,
    order: Vec<u32>,
    next: usize,
    blocked: Option<(u32, Time)>,
    done: Option<Time>,
}

impl Node {
    /// The host's page sink (its cache): the endpoint holds it once the host started.
    fn sink(&self, session: SessionId) -> Option<&VerifyingSink> {
        self.host.session(session).map(|s| s.sink()).or(self.idle_sink.as_ref())
    }

    /// True when the host's cache holds `page`.
    fn has(&self, session: SessionId, page: u32) -> bool {
        self.sink(session).is_some_and(|s| s.has(page))
    }

    /// The receiver's counters, with what the endpoint dropped before routing (malformed headers,
    /// other sessions) counted as the receiver did when it was fed every datagram.
    fn receiver_stats(&self, session: SessionId) -> Option<ReceiverStats> {
        let mut r = self.host.session(session)?.stats().clone();
        let h = self.host.stats();
        r.rx_packets += h.malformed + h.from_hosts + h.unknown_session;
        r.rx_malformed += h.malformed;
        r.rx_stale += h.from_hosts + h.unknown_session;
        Some(r)
    }
}

pub(super) struct World {
    cfg: SimConfig,
    session: SessionId,
    ws: WorkingSet,
    /// The session's keys, to decode datagrams for traces.
    keys: Keys,
    sender: Sender<Rc<Image>>,
    sender_timer: Option<Time>,
    nodes: Vec<Node>,
    queue: EventQueue<Ev>,
    egress: Pipe,
    downlink: Pipe,
    ingress: Pipe,
    txbuf: Vec<u8>,
    scratch: Vec<u8>,
    now: Time,
    delay: Duration,
    think: Duration,
    waits: hdrhistogram::Histogram<u64>,
    misses: u64,
    stale_misses: u64,
    phantom_hits: u64,
    finished: u32,
    last_finish: Time,
    server_lost: u64,
    receiver_lost: u64,
    events: u64,
    kind_counts: [u64; 8],
    stale_timers: u64,
    stop: Option<String>,
}

impl World {
    pub(super) fn new(cfg: &SimConfig) -> Result<World, SimError> {
        let seed = cfg.seed;
        let image = Rc::new(Image::generate_with(seed, cfg.pages, cfg.content));
        let ws = WorkingSet::generate(seed, cfg.pages, cfg.working_set);

        let session = SessionId(rng::value(seed, Domain::Session, 0));
        let mut key = [0u8; 32];
        rng::stream(seed, Domain::Session, 1).fill_bytes(&mut key);
        let key = SessionKey(key);
        let rtt = cfg.delay * 2 + Duration::from_micros(10);

        let mut sc = SenderConfig::new(session, 1, key.clone(), PAGE_SHIFT);
        sc.max_datagram = cfg.max_datagram;
        sc.encrypt = cfg.encrypt;
        sc.zstd_level = cfg.zstd_level;
        sc.rate_bytes_per_sec =
            (cfg.pacing > 0.0).then(|| ((cfg.server_rate_bps as f64 * cfg.pacing) / 8.0).max(1.0) as u64);
        sc.rtt_hint = rtt;
        sc.congestion_control = cfg.congestion_control;
        sc.seed = rng::value(seed, Domain::Protocol, 0);
        sc.flow_control = cfg.flow_control;
        // Receivers that start together are the hosts of one fork plan: the push waits for them all.
        if cfg.stagger.is_zero() {
            sc.min_receivers = cfg.receivers;
        }
        sc.push = match cfg.push {
            Push::None => PushPolicy::None,
            Push::Hints => PushPolicy::Hints(ws.pages().to_vec()),
            Push::HintsThenAll => PushPolicy::HintsThenAll(ws.pages().to_vec()),
        };
        let sender = Sender::new(sc, image.clone(), Time::ZERO).map_err(SimError::Sender)?;

        let faults = FaultConfig {
            loss: cfg.loss,
            burst: cfg.burst.then_some(cfg.burst_length),
            duplicate: cfg.duplicate,
            reorder: cfg.reorder,
            reorder_jitter: cfg.reorder_jitter,
            corrupt: cfg.corrupt,
        };
        // The burst channel steps once per full-size packet time at the host's rate.
        let slot = Duration::from_nanos(
            ((cfg.max_datagram + super::link::WIRE_OVERHEAD) as u64 * 8_000_000_000 / cfg.host_rate_bps).max(1),
        );
        let stagger_ns = u64::try_from(cfg.stagger.as_nanos()).unwrap_or(u64::MAX);
        let mut queue = EventQueue::new();
        let mut nodes = Vec::with_capacity(cfg.receivers as usize);
        for i in 0..cfg.receivers {
            let node = NodeId(i + 1);
            let start = Time::from_nanos(workload::start_time_ns(seed, i, stagger_ns));
            let mut rc = ReceiverConfig::new(session, node, key.clone(), PAGE_SHIFT, cfg.pages);
            if let Some(ra) = cfg.read_ahead {
                rc.read_ahead = ra;
            }
            rc.rtt_hint = rtt;
            rc.stream_start = (start == Time::ZERO).then_some(0);
            rc.seed = rng::value(seed, Domain::Protocol, u64::from(node.0));
            if let Some(w) = cfg.window {
                rc.window = w;
            }
            if i < cfg.slow_receivers && !cfg.slow_in_network {
                // A host sizes its window to its socket buffer, as a daemon does (three quarters of
                // it: repairs and control share the buffer).
                let fit = cfg.slow_queue_bytes * 3 / 4 / (cfg.max_datagram + super::link::WIRE_OVERHEAD) as u64;
                rc.window = rc.window.min(u32::try_from(fit).unwrap_or(u32::MAX)).max(MIN_WINDOW);
            }
            let order = match cfg.workload {
                Workload::Shuffled => ws.order_for(seed, i),
                Workload::Sequential | Workload::Passive => ws.pages().to_vec(),
            };
            let mut hc = HostConfig::new(node, key.clone(), PAGE_SHIFT);
            hc.max_sessions = 1;
            hc.linger = Duration::MAX;
            hc.idle_limit = Duration::MAX;
            let host = HostEndpoint::new(hc).map_err(|source| SimError::Receiver { node: node.0, source })?;
            nodes.push(Node {
                config: Some(rc),
                host,
                idle_sink: Some(VerifyingSink::new(image.clone())),
                started: false,
                downlink: Faults::new(faults, rng::stream(seed, Domain::Downlink, u64::from(i)), slot),
                uplink: Faults::new(faults, rng::stream(seed, Domain::Uplink, u64::from(i)), slot),
                uplink_pipe: Pipe::new(Some(cfg.host_rate_bps), cfg.queue_bytes),
                socket: (i < cfg.slow_receivers).then(|| Pipe::new(Some(cfg.slow_rate_bps), cfg.slow_queue_bytes)),
                timer: None,
                silent_from: (i >= cfg.receivers - cfg.silent_receivers).then(|| Time::ZERO + cfg.silent_after),
                order,
                next: 0,
                blocked: None,
                done: None,
            });
            queue.push(start, Ev::Start(i));
        }

        let mut world = World {
            session,
            ws,
            keys: Keys::derive(&key, session, 1),
            sender,
            sender_timer: None,
            nodes,
            queue,
            egress: Pipe::new(Some(cfg.server_rate_bps), cfg.queue_bytes),
            downlink: Pipe::new(
                (cfg.host_rate_bps < cfg.server_rate_bps).then_some(cfg.host_rate_bps),
                cfg.queue_bytes,
            ),
            ingress: Pipe::new(Some(cfg.server_rate_bps), cfg.queue_bytes),
            txbuf: vec![0; MAX_DATAGRAM],
            scratch: vec![0; MAX_DATAGRAM],
            now: Time::ZERO,
            delay: cfg.delay,
            think: cfg.think_time,
            waits: hdrhistogram::Histogram::new_with_bounds(1, 1 << 42, 3).map_err(|_| SimError::Invalid {
                field: "histogram",
                value: String::new(),
                why: "bounds",
            })?,
            misses: 0,
            stale_misses: 0,
            phantom_hits: 0,
            finished: 0,
            last_finish: Time::ZERO,
            server_lost: 0,
            receiver_lost: 0,
            events: 0,
            kind_counts: [0; 8],
            stale_timers: 0,
            stop: None,
            cfg: cfg.clone(),
        };
        world.drive_sender();
        Ok(world)
    }

    /// Runs until every receiver is done or a limit is hit; `started` is when the run was set up.
    pub(super) fn run(mut self, started: Instant) -> Result<SimReport, SimError> {
        let limit = Time::ZERO + self.cfg.time_limit;
        let total = self.cfg.receivers - self.cfg.silent_receivers;
        let mut same_instant = 0u64;
        let mut instant_kinds = [0u64; 8];
        while self.finished < total && self.stop.is_none() {
            let Some((t, ev)) = self.queue.pop() else {
                self.stop = Some(format!(
                    "deadlock at {:.3} ms: no event pending while {} receivers are unfinished",
                    ms(self.now),
                    total - self.finished
                ));
                break;
            };
            if t > limit {
                self.stop = Some(format!("virtual time limit of {:?} reached", self.cfg.time_limit));
                self.now = limit;
                break;
            }
            if t == self.now {
                same_instant += 1;
            } else {
                same_instant = 0;
                instant_kinds = [0; 8];
            }
            instant_kinds[ev.kind()] += 1;
            self.kind_counts[ev.kind()] += 1;
            self.now = t;
            self.events += 1;
            if same_instant > MAX_SAME_INSTANT {
                let kinds: Vec<String> = Ev::KINDS
                    .iter()
                    .zip(instant_kinds)
                    .filter(|(_, n)| *n > 0)
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect();
                self.stop =
                    Some(format!("livelock: over {MAX_SAME_INSTANT} events at {:.6} ms ({})", ms(t), kinds.join(", ")));
                break;
            }
            if self.events >= self.cfg.max_events {
                self.stop = Some(format!("event bound of {} reached at {:.3} ms", self.cfg.max_events, ms(t)));
                break;
            }
            if self.events & 4095 == 0 {
                if let Some(max) = self.cfg.real_time_limit {
                    if started.elapsed() > max {
                        self.stop = Some(format!("real-time bound of {max:?} reached at virtual {:.3} ms", ms(t)));
                        break;
                    }
                }
            }
            self.handle(ev)?;
        }
        Ok(self.report(started.elapsed()))
    }

    fn handle(&mut self, ev: Ev) -> Result<(), SimError> {
        match ev {
            Ev::Multicast(pkt) => self.multicast(&pkt),
            Ev::ToReceiver { rx, pkt, corruption } => {
                tracing::trace!(target: "spindrift_sim", t_us = us_t(self.now), node = rx + 1, msg = %msg_type(&pkt), corrupted = !corruption.is_none(), "late copy arrives");
                self.deliver(rx as usize, &pkt, corruption)
            }
            Ev::AtIngress { pkt, corruption } => {
                if let Some(at) = self.ingress.send(self.now, pkt.len()) {
                    self.queue.push(at, Ev::ToServer { pkt, corruption });
                }
            }
            Ev::ToServer { pkt, corruption } => {
                let len = pkt.len();
                self.scratch[..len].copy_from_slice(&pkt);
                corruption.apply(&mut self.scratch[..len]);
                tracing::trace!(target: "spindrift_sim", t_us = us_t(self.now), msg = %msg_type(&self.scratch[..len]), corrupted = !corruption.is_none(), "server receives");
                self.sender.handle_datagram(self.now, &mut self.scratch[..len]);
                self.drive_sender();
            }
            Ev::SenderTimer => {
                if self.sender_timer == Some(self.now) {
                    tracing::trace!(target: "spindrift_sim", t_us = us_t(self.now), "sender timeout");
                    self.sender_timer = None;
                    self.sender.handle_timeout(self.now);
                    self.drive_sender();
                } else {
                    self.stale_timers += 1;
                }
            }
            Ev::ReceiverTimer(rx) => {
                let i = rx as usize;
                if self.nodes[i].timer == Some(self.now) {
                    tracing::trace!(target: "spindrift_sim", t_us = us_t(self.now), node = i + 1, "receiver timeout");
                    self.nodes[i].timer = None;
                    if self.nodes[i].started {
                        self.nodes[i].host.handle_timeout(self.now);
                    }
                    self.drive_receiver(i);
                    self.check_unblock(i);
                } else {
                    self.stale_timers += 1;
                }
            }
            Ev::Step(rx) => self.step(rx as usize),
            Ev::Start(rx) => {
                let i = rx as usize;
                let n = &mut self.nodes[i];
                if let (Some(rc), Some(sink)) = (n.config.take(), n.idle_sink.take()) {
                    let node = rc.node.0;
                    n.host
                        .follow_with(self.now, rc, SERVER, sink)
                        .map_err(|source| SimError::Receiver { node, source })?;
                    n.started = true;
                    self.drive_receiver(i);
                    self.step(i);
                }
            }
        }
        Ok(())
    }

    /// A multicast datagram reaches every downlink: each draws its own fate.
    fn multicast(&mut self, pkt: &Rc<[u8]>) {
        let len = pkt.len();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].started {
                continue; // not in the group yet
            }
            match self.nodes[i].downlink.fate(self.now, len) {
                Fate::Lost => {
                    tracing::trace!(target: "spindrift_sim", t_us = us_t(self.now), node = i + 1, msg = %msg_type(pkt), "downlink lost");
                }
                Fate::Deliver { extra, corruption, duplicate } => {
                    let copies = std::iter::once((extra, corruption)).chain(duplicate);
                    for (extra, corruption) in copies {
                        let mut at = self.now + Duration::from_nanos(extra);
                        if let Some(socket) = self.nodes[i].socket.as_mut() {
                            match socket.send(at, len) {
                                Some(t) => at = t,
                                None => {
                                    tracing::trace!(target: "spindrift_sim", t_us = us_t(self.now), node = i + 1, msg = %msg_type(pkt), "socket overrun");
                                    continue;
                                }
                            }
                        }
                        if at == self.now {
                            self.deliver(i, pkt, corruption);
                        } else {
                            tracing::trace!(target: "spindrift_sim", t_us = us_t(self.now), node = i + 1, msg = %msg_type(pkt), at_us = us_t(at), "downlink delays");
                            self.queue.push(at, Ev::ToReceiver { rx: i as u32, pkt: pkt.clone(), corruption });
                        }
                    }
                }
            }
        }
    }

    /// Hands one (possibly damaged) copy of a datagram to receiver `i`.
    fn deliver(&mut self, i: usize, pkt: &[u8], corruption: Corruption) {
        let len = pkt.len();
        self.scratch[..len].copy_from_slice(pkt);
        corruption.apply(&mut self.scratch[..len]);
        let node = &mut self.nodes[i];
        if !node.started {
            return;
        }
        let mut no_other_sessions = |_: &crate::endpoint::SessionInfo| Err("one session is simulated".to_string());
        node.host.handle_datagram(self.now, SERVER, &mut self.scratch[..len], &mut no_other_sessions);
        self.drive_receiver(i);
        self.check_unblock(i);
    }

    /// Drains the sender's output into the server's egress, its events, and schedules its wakeup.
    fn drive_sender(&mut self) {
        let now = self.now;
        let mut n = 0u64;
        while let Some(tx) = self.sender.poll_transmit(now, &mut self.txbuf) {
            n += 1;
            if n > MAX_DRAIN {
                self.stop = Some(format!("livelock: sender yielded over {MAX_DRAIN} datagrams at {:.6} ms", ms(now)));
                break;
            }
            let len = tx.len;
            // One serialization at the server, one at the switch's downlinks, then per-host faults.
            let Some(out) = self.egress.send(now, len) else { continue };
            let Some(out) = self.downlink.send(out, len) else { continue };
            let pkt: Rc<[u8]> = Rc::from(&self.txbuf[..len]);
            tracing::trace!(target: "spindrift_sim", t_us = us_t(now), len, msg = %describe(&pkt, &self.keys), "server sends");
            self.queue.push(out + self.delay, Ev::Multicast(pkt));
        }
        while let Some(ev) = self.sender.poll_event() {
            if let SenderEvent::ReceiverLost(node) = ev {
                self.receiver_lost += 1;
                tracing::debug!(node = node.0, at_ms = ms(now), "sender lost a receiver");
            }
        }
        match self.sender.poll_timeout() {
            Some(t) => {
                let t = t.max(now);
                if self.sender_timer != Some(t) {
                    self.sender_timer = Some(t);
                    self.queue.push(t, Ev::SenderTimer);
                }
            }
            None => self.sender_timer = None,
        }
    }

    /// Drains receiver `i`'s output into its uplink, its events, and schedules its wakeup.
    fn drive_receiver(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        if !node.started {
            return;
        }
        let mut n = 0u64;
        while let Some(len) = node.host.poll_transmit(now, &mut self.txbuf).map(|t| t.len) {
            n += 1;
            if n > MAX_DRAIN {
                self.stop = Some(format!(
                    "livelock: receiver {} yielded over {MAX_DRAIN} datagrams at {:.6} ms",
                    i + 1,
                    ms(now)
                ));
                break;
            }
            tracing::trace!(target: "spindrift_sim", t_us = us_t(now), node = i + 1, len, msg = %msg_type(&self.txbuf[..len]), "receiver sends");
            if node.silent_from.is_some_and(|t| now >= t) {
                continue;
            }
            let Some(out) = node.uplink_pipe.send(now, len) else { continue };
            let Fate::Deliver { extra, corruption, duplicate } = node.uplink.fate(out, len) else {
                tracing::trace!(target: "spindrift_sim", node = i + 1, "uplink lost it");
                continue;
            };
            let pkt: Rc<[u8]> = Rc::from(&self.txbuf[..len]);
            if let Some((extra, corruption)) = duplicate {
                let at = out + self.delay + Duration::from_nanos(extra);
                self.queue.push(at, Ev::AtIngress { pkt: pkt.clone(), corruption });
            }
            let at = out + self.delay + Duration::from_nanos(extra);
            self.queue.push(at, Ev::AtIngress { pkt, corruption });
        }
        while let Some(ev) = node.host.poll_event() {
            if matches!(ev, HostEvent::ServerLost(_)) {
                self.server_lost += 1;
                tracing::debug!(node = i + 1, at_ms = ms(now), "receiver lost the server");
            }
        }
        match node.host.poll_timeout() {
            Some(t) => {
                let t = t.max(now);
                if node.timer != Some(t) {
                    node.timer = Some(t);
                    self.queue.push(t, Ev::ReceiverTimer(i as u32));
                }
            }
            None => node.timer = None,
        }
    }

    /// If receiver `i`'s vCPU waits for a page that has now arrived, it resumes; a passive receiver
    /// is done once every page of its working set arrived.
    fn check_unblock(&mut self, i: usize) {
        let session = self.session;
        let node = &mut self.nodes[i];
        if self.cfg.workload == Workload::Passive {
            if node.done.is_none() && node.started {
                while node.order.get(node.next).is_some_and(|&p| node.has(session, p)) {
                    node.next += 1;
                }
                if node.next == node.order.len() {
                    node.done = Some(self.now);
                    self.finished += u32::from(node.silent_from.is_none());
                    self.last_finish = self.last_finish.max(self.now);
                }
            }
            return;
        }
        if let Some((page, since)) = node.blocked {
            if node.has(session, page) {
                let waited = self.now.saturating_since(since);
                tracing::trace!(target: "spindrift_sim", t_us = us_t(self.now), node = i + 1, page, waited_us = us(waited), "fault resolved");
                self.waits.saturating_record(u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX).max(1));
                node.blocked = None;
                node.next += 1;
                self.queue.push(self.now + self.think, Ev::Step(i as u32));
            }
        }
    }

    /// Receiver `i`'s vCPU touches pages until one is missing, it must think, or it is done.
    fn step(&mut self, i: usize) {
        let now = self.now;
        let session = self.session;
        if self.cfg.workload == Workload::Passive {
            self.drive_receiver(i);
            self.check_unblock(i);
            return;
        }
        loop {
            let node = &mut self.nodes[i];
            if node.blocked.is_some() || node.done.is_some() {
                break;
            }
            let Some(&page) = node.order.get(node.next) else {
                node.done = Some(now);
                self.finished += u32::from(node.silent_from.is_none());
                self.last_finish = self.last_finish.max(now);
                break;
            };
            if !node.started {
                break;
            }
            if node.host.fault(now, session, page) {
                if !node.has(session, page) {
                    self.phantom_hits += 1;
                    tracing::warn!(node = i + 1, page, "receiver says a page is present that was never stored");
                }
                node.next += 1;
                if !self.think.is_zero() {
                    self.queue.push(now + self.think, Ev::Step(i as u32));
                    break;
                }
            } else {
                tracing::trace!(target: "spindrift_sim", t_us = us_t(now), node = i + 1, page, "fault blocks");
                self.misses += 1;
                if node.has(session, page) {
                    self.stale_misses += 1;
                }
                node.blocked = Some((page, now));
                break;
            }
        }
        // A fault may have queued requests (and a hit, prefetches): drain them.
        self.drive_receiver(i);
        self.check_unblock(i);
    }
}

pub(super) fn ms(t: Time) -> f64 {
    t.as_nanos() as f64 / 1e6
}

pub(super) fn us_t(t: Time) -> f64 {
    t.as_nanos() as f64 / 1e3
}

pub(super) fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e3
}
