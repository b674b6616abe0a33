//! The host endpoint: sessions discovered from Announces, served, ended, retired, renewed by a
//! restarted server, limited to the live ones, and never created by a forged Announce.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use spindrift_protocol::endpoint::{HostConfig, HostEndpoint, HostEvent, RetireReason, ServerEndpoint, SessionInfo};
use spindrift_protocol::receiver::PageSink;
use spindrift_protocol::sender::{PageSource, Sender, SenderConfig};
use spindrift_protocol::wire::{
    self, EndReason, Header, Message, MsgType, NodeId, SessionId, SessionKey, MAX_DATAGRAM,
};
use spindrift_protocol::Time;

const PAGES: u32 = 24;
const KEY: SessionKey = SessionKey([5; 32]);
const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 7700);
const HOST_ADDR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 7700);

/// An image whose page `p` of session `s` is filled with a byte made of both.
struct Image {
    pages: Vec<Vec<u8>>,
}

impl Image {
    fn new(session: u64) -> Image {
        let pages = (0..PAGES)
            .map(|p| {
                let mut page = vec![0u8; 4096];
                for (i, b) in page.iter_mut().enumerate() {
                    *b = (session as usize * 31 + p as usize * 7 + i % 251) as u8;
                }
                page
            })
            .collect();
        Image { pages }
    }
}

impl PageSource for Image {
    fn page_count(&self) -> u32 {
        PAGES
    }
    fn page(&self, page: u32) -> &[u8] {
        &self.pages[page as usize]
    }
}

/// A host cache: what the endpoint stored for one session.
#[derive(Debug)]
struct Cache {
    pages: Vec<Option<Vec<u8>>>,
}

impl PageSink for Cache {
    fn store(&mut self, page: u32, data: &[u8]) {
        self.pages[page as usize] = Some(data.to_vec());
    }
    fn store_zero(&mut self, first_page: u32, count: u32) {
        for p in first_page..first_page + count {
            self.pages[p as usize] = Some(vec![0; 4096]);
        }
    }
}

fn open_cache(info: &SessionInfo) -> Result<Cache, String> {
    Ok(Cache { pages: vec![None; info.page_count as usize] })
}

fn server(session: u64, epoch: u32) -> Sender<Image> {
    let mut c = SenderConfig::new(SessionId(session), epoch, KEY, 12);
    c.seed = session;
    Sender::new(c, Image::new(session), Time::ZERO).expect("sender")
}

fn host(max_sessions: usize) -> HostEndpoint<Cache> {
    host_with(max_sessions, Duration::from_secs(3600))
}

fn host_with(max_sessions: usize, linger: Duration) -> HostEndpoint<Cache> {
    let mut c = HostConfig::new(NodeId(9), KEY, 12);
    c.max_sessions = max_sessions;
    c.linger = linger;
    c.read_ahead = 2;
    HostEndpoint::new(c).expect("endpoint")
}

/// A server and a host exchanging datagrams on a lossless link, 20 µs a step.
struct World {
    now: Time,
    buf: Vec<u8>,
    events: Vec<HostEvent>,
}

impl World {
    fn new() -> World {
        World { now: Time::ZERO, buf: vec![0; MAX_DATAGRAM], events: Vec::new() }
    }

    fn step(&mut self, sender: Option<&mut Sender<Image>>, host: &mut HostEndpoint<Cache>) {
        self.now += Duration::from_micros(20);
        let now = self.now;
        if let Some(sender) = sender {
            if sender.poll_timeout().is_some_and(|t| t <= now) {
                sender.handle_timeout(now);
            }
            while let Some(t) = sender.poll_transmit(now, &mut self.buf) {
                host.handle_datagram(now, SERVER, &mut self.buf[..t.len], &mut open_cache);
            }
            while let Some(t) = host.poll_transmit(now, &mut self.buf) {
                assert_eq!(t.destination, SERVER);
                sender.handle_datagram(now, &mut self.buf[..t.len]);
            }
            while sender.poll_event().is_some() {}
        }
        if host.poll_timeout().is_some_and(|t| t <= now) {
            host.handle_timeout(now);
        }
        while let Some(e) = host.poll_event() {
            self.events.push(e);
        }
    }

    /// Steps until `done` holds, at most `limit` of virtual time.
    fn until(
        &mut self,
        mut sender: Option<&mut Sender<Image>>,
        host: &mut HostEndpoint<Cache>,
        limit: Duration,
        mut done: impl FnMut(&mut HostEndpoint<Cache>, &[HostEvent]) -> bool,
    ) -> bool {
        let end = self.now + limit;
        while self.now < end {
            self.step(sender.as_deref_mut(), host);
            if done(host, &self.events) {
                return true;
            }
        }
        false
    }
}

/// Faults every page of `session` and checks each against the server's image.
fn fetch_all(world: &mut World, sender: &mut Sender<Image>, host: &mut HostEndpoint<Cache>, session: u64) {
    let id = SessionId(session);
    let found = world.until(Some(sender), host, Duration::from_secs(2), |h, _| h.session(id).is_some());
    assert!(found, "session {session} was never discovered");
    let end = world.now + Duration::from_secs(5);
    loop {
        let now = world.now;
        if (0..PAGES).filter(|&p| !host.fault(now, id, p)).count() == 0 {
            break;
        }
        assert!(world.now < end, "session {session}: not every page arrived");
        world.step(Some(sender), host);
    }
    let image = Image::new(session);
    let view = host.session(id).expect("followed");
    for p in 0..PAGES {
        assert_eq!(view.sink().pages[p as usize].as_deref(), Some(image.page(p)), "session {session} page {p}");
    }
}

#[test]
fn fifty_successive_sessions_are_each_served_and_retired() {
    // Ended sessions linger for an hour, so room for the ninth and later ones can only come from
    // retiring ended, unused sessions (not from the linger running out).
    let mut host = host(8);
    let mut world = World::new();
    for session in 1..=50u64 {
        let mut sender = server(session, 1);
        fetch_all(&mut world, &mut sender, &mut host, session);
        let now = world.now;
        sender.end(now, EndReason::Shutdown);
        let id = SessionId(session);
        let ended = world.until(Some(&mut sender), &mut host, Duration::from_secs(1), |h, _| {
            h.session(id).is_some_and(|s| s.is_ended())
        });
        assert!(ended, "session {session} never saw End");
        assert!(host.session_count() <= 8, "{} sessions held", host.session_count());
    }
    assert_eq!(host.session_count(), 8);
    let s = host.stats();
    assert_eq!((s.sessions_started, s.sessions_retired, s.sessions_refused), (50, 42, 0));
    let evicted =
        world.events.iter().filter(|e| matches!(e, HostEvent::Retired { reason: RetireReason::Evicted, .. })).count();
    assert_eq!(evicted, 42);
    // The oldest went first: the last eight remain.
    assert!((43..=50).all(|id| host.session(SessionId(id)).is_some()));
}

#[test]
fn ended_sessions_linger_then_go() {
    let mut host = host_with(8, Duration::from_millis(50));
    let mut world = World::new();
    let mut sender = server(1, 1);
    fetch_all(&mut world, &mut sender, &mut host, 1);
    let now = world.now;
    sender.end(now, EndReason::Shutdown);
    let ended_at = world.now;
    let gone = world.until(Some(&mut sender), &mut host, Duration::from_secs(1), |h, _| h.session_count() == 0);
    assert!(gone, "an ended session was never retired");
    assert!(world.now.saturating_since(ended_at) >= Duration::from_millis(50), "retired before its linger");
    assert!(world.events.iter().any(|e| matches!(e, HostEvent::Retired { reason: RetireReason::Ended, .. })));
}

#[test]
fn sessions_in_use_count_against_the_limit_until_released() {
    let mut host = host(2);
    let mut world = World::new();
    for session in [1u64, 2] {
        let mut sender = server(session, 1);
        fetch_all(&mut world, &mut sender, &mut host, session);
        host.set_in_use(SessionId(session), true);
        let now = world.now;
        sender.end(now, EndReason::Shutdown);
        world.until(Some(&mut sender), &mut host, Duration::from_secs(1), |h, _| {
            h.session(SessionId(session)).is_some_and(|s| s.is_ended())
        });
    }
    // Both ended but used by clones: a third is refused, and nothing is retired.
    let mut third = server(3, 1);
    let found =
        world.until(Some(&mut third), &mut host, Duration::from_secs(2), |h, _| h.session(SessionId(3)).is_some());
    assert!(!found, "a third session was let in past the limit");
    assert!(host.stats().sessions_refused >= 1);
    assert_eq!(host.session_count(), 2);
    let refused = world.events.iter().filter(|e| matches!(e, HostEvent::Refused { .. })).count();
    assert_eq!(refused, 1, "a refusal is reported once");
    // The clones of session 1 exit: it goes, and the third session comes in at its next Announce.
    host.set_in_use(SessionId(1), false);
    fetch_all(&mut world, &mut third, &mut host, 3);
    assert!(host.session(SessionId(1)).is_none());
    assert!(host.session(SessionId(2)).is_some(), "a session in use must stay");
}

#[test]
fn a_restarted_server_renews_an_ended_session_and_keeps_its_cache() {
    let mut host = host(4);
    let mut world = World::new();
    let id = SessionId(7);
    let mut first = server(7, 10);
    fetch_all(&mut world, &mut first, &mut host, 7);
    host.set_in_use(id, true);
    let now = world.now;
    first.end(now, EndReason::Shutdown);
    world
        .until(Some(&mut first), &mut host, Duration::from_secs(1), |h, _| h.session(id).is_some_and(|s| s.is_ended()));
    let requests_before = host.session(id).expect("kept").stats().requests;
    // The same session from a restarted server (a larger epoch).
    let mut second = server(7, 11);
    let renewed = world.until(Some(&mut second), &mut host, Duration::from_secs(2), |_, ev| {
        ev.iter().any(|e| matches!(e, HostEvent::Restarted { epoch: 11, .. }))
    });
    assert!(renewed, "the session was not renewed");
    let view = host.session(id).expect("still followed");
    assert!(!view.is_ended());
    assert_eq!(view.epoch(), Some(11));
    assert_eq!(view.restarts(), 1);
    assert!((0..PAGES).all(|p| view.has_page(p)), "the cache was dropped");
    assert_eq!(view.stats().requests, requests_before, "pages were fetched again");
    assert_eq!(world.events.iter().filter(|e| matches!(e, HostEvent::Started(_))).count(), 1);
}

#[test]
fn forged_and_stray_announces_create_nothing() {
    let mut host = host_with(8, Duration::from_millis(50));
    let mut world = World::new();
    // An Announce under another key.
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let header = Header {
        msg_type: MsgType::Announce,
        flags: 0,
        session: SessionId(3),
        epoch: 1,
        node: NodeId::SERVER,
        packet_number: 1,
    };
    let msg = Message::Announce(wire::Announce {
        page_shift: 12,
        max_block: 64,
        max_datagram: 1472,
        page_count: PAGES,
        next_seq: 0,
        descriptor: 0,
    });
    let forged = wire::Keys::derive(&SessionKey([6; 32]), SessionId(3), 1);
    let len = wire::encode(&header, &msg, &forged, &mut buf).expect("encode");
    let mut copy = buf[..len].to_vec();
    host.handle_datagram(Time::ZERO, SERVER, &mut copy, &mut open_cache);
    assert_eq!(host.session_count(), 0);
    assert_eq!(host.stats().announces_unauthenticated, 1);
    // Garbage and a host's datagram.
    host.handle_datagram(Time::ZERO, SERVER, &mut [1, 2, 3], &mut open_cache);
    assert_eq!(host.stats().malformed, 1);
    // A retired session's Announce at its old epoch does not bring it back.
    let mut sender = server(4, 1);
    fetch_all(&mut world, &mut sender, &mut host, 4);
    let now = world.now;
    sender.end(now, EndReason::Shutdown);
    world.until(Some(&mut sender), &mut host, Duration::from_secs(1), |h, _| h.session_count() == 0);
    assert_eq!(host.session_count(), 0, "the ended session was not retired after its linger");
    let good = wire::Keys::derive(&KEY, SessionId(4), 1);
    let stray = Header { session: SessionId(4), packet_number: 1 << 40, ..header };
    let len = wire::encode(&stray, &msg, &good, &mut buf).expect("encode");
    host.handle_datagram(world.now, SERVER, &mut buf[..len], &mut open_cache);
    assert_eq!(host.session_count(), 0);
    assert_eq!(host.stats().announces_of_retired, 1);
    // A refused sink (say, no memory for the cache) refuses the session, with the reason.
    let mut refuse = |_: &SessionInfo| -> Result<Cache, String> { Err("no memory".into()) };
    let mut other = server(5, 1);
    for _ in 0..2000 {
        world.now += Duration::from_micros(20);
        let now = world.now;
        if other.poll_timeout().is_some_and(|t| t <= now) {
            other.handle_timeout(now);
        }
        while let Some(t) = other.poll_transmit(now, &mut buf) {
            host.handle_datagram(now, SERVER, &mut buf[..t.len], &mut refuse);
        }
    }
    assert_eq!(host.session_count(), 0);
    let mut refusals = Vec::new();
    while let Some(e) = host.poll_event() {
        if let HostEvent::Refused { session, reason } = e {
            refusals.push((session, reason));
        }
    }
    assert_eq!(refusals, vec![(SessionId(5), "no memory".to_string())]);
}

#[test]
fn an_idle_session_without_clones_is_retired() {
    let mut c = HostConfig::new(NodeId(9), KEY, 12);
    c.idle_limit = Duration::from_millis(300);
    let mut host: HostEndpoint<Cache> = HostEndpoint::new(c).expect("endpoint");
    let mut world = World::new();
    let mut sender = server(8, 1);
    fetch_all(&mut world, &mut sender, &mut host, 8);
    // The server vanishes without End; no fault waits, so it is never declared lost.
    host.set_in_use(SessionId(8), true);
    world.until(None, &mut host, Duration::from_secs(1), |_, _| false);
    assert_eq!(host.session_count(), 1, "a session in use must not be retired");
    host.set_in_use(SessionId(8), false);
    let gone = world.until(None, &mut host, Duration::from_secs(1), |h, _| h.session_count() == 0);
    assert!(gone);
    assert!(world.events.iter().any(|e| matches!(e, HostEvent::Retired { reason: RetireReason::Idle, .. })));
}

#[test]
fn each_session_sends_to_its_own_server_in_turn() {
    let mut host = host(4);
    let other = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 99), 7700);
    let cache = || Cache { pages: vec![None; PAGES as usize] };
    host.follow(Time::ZERO, SessionId(1), PAGES, SERVER, cache()).expect("follow");
    host.follow(Time::ZERO, SessionId(2), PAGES, other, cache()).expect("follow");
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let now = Time::ZERO + Duration::from_millis(1);
    for page in [0, 8, 16] {
        assert!(!host.fault(now, SessionId(1), page));
        assert!(!host.fault(now, SessionId(2), page));
    }
    let mut sent = Vec::new();
    while let Some(t) = host.poll_transmit(now, &mut buf) {
        let header = wire::peek_header(&buf[..t.len]).expect("header");
        assert_eq!(header.session, t.session);
        sent.push((t.session.0, t.destination));
    }
    assert!(sent.contains(&(1, SERVER)) && sent.contains(&(2, other)), "{sent:?}");
    assert!(sent.iter().all(|&(s, d)| (s == 1) == (d == SERVER)), "a datagram went to the other session's server");
    assert_eq!(host.poll_transmit(now, &mut buf), None);
}

#[test]
fn one_server_endpoint_serves_two_sessions_to_their_groups() {
    let groups =
        [SocketAddrV4::new(Ipv4Addr::new(239, 1, 0, 1), 7700), SocketAddrV4::new(Ipv4Addr::new(239, 1, 0, 2), 7700)];
    let mut servers: ServerEndpoint<Image> = ServerEndpoint::new();
    assert_eq!(servers.serve(server(1, 1), groups[0]), SessionId(1));
    assert_eq!(servers.serve(server(2, 1), groups[1]), SessionId(2));
    let mut host = host(4);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut now = Time::ZERO;
    let mut seen = [0u64; 2];
    let done = |host: &mut HostEndpoint<Cache>, now: Time| {
        [1u64, 2]
            .iter()
            .all(|&s| host.session(SessionId(s)).is_some() && (0..PAGES).all(|p| host.fault(now, SessionId(s), p)))
    };
    for _ in 0..100_000 {
        now += Duration::from_micros(20);
        if done(&mut host, now) {
            break;
        }
        if servers.poll_timeout().is_some_and(|t| t <= now) {
            servers.handle_timeout(now);
        }
        while let Some(t) = servers.poll_transmit(now, &mut buf) {
            let i = usize::from(t.session == SessionId(2));
            assert_eq!(t.destination, groups[i], "session {} sent to the wrong group", t.session.0);
            seen[i] += 1;
            host.handle_datagram(now, SERVER, &mut buf[..t.len], &mut open_cache);
        }
        while let Some(t) = host.poll_transmit(now, &mut buf) {
            servers.handle_datagram(now, HOST_ADDR, &mut buf[..t.len]);
        }
        if host.poll_timeout().is_some_and(|t| t <= now) {
            host.handle_timeout(now);
        }
        while host.poll_event().is_some() {}
        while servers.poll_event().is_some() {}
    }
    assert!(done(&mut host, now), "not every page of both sessions arrived");
    for s in [1u64, 2] {
        let image = Image::new(s);
        let view = host.session(SessionId(s)).expect("followed");
        assert!((0..PAGES).all(|p| view.sink().pages[p as usize].as_deref() == Some(image.page(p))), "session {s}");
    }
    assert!(seen[0] > 0 && seen[1] > 0);
    // A datagram of a session not served here is counted, not routed.
    let keys = wire::Keys::derive(&KEY, SessionId(3), 1);
    let header = Header {
        msg_type: MsgType::Status,
        flags: 0,
        session: SessionId(3),
        epoch: 1,
        node: NodeId(9),
        packet_number: 1,
    };
    let status = Message::Status(wire::Status {
        stream_start: 0,
        received_through: 0,
        highest_seen: 0,
        loss_ppm: 0,
        window: 1024,
        pages_cached: 0,
        flags: 0,
        echo: 0,
        echo_delay_us: 0,
        loss_events: 0,
        receive_rate_kib: 0,
    });
    let len = wire::encode(&header, &status, &keys, &mut buf).expect("encode");
    servers.handle_datagram(now, HOST_ADDR, &mut buf[..len]);
    assert_eq!(servers.stats().unknown_session, 1);
}
