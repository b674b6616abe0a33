//! The driver loop: it never waits past the machine's next timer, wakes for a datagram on any queue
//! of a multi-queue backend and for the caller's waker, and keeps datagrams a full backend refused.
//! Unprivileged (the in-memory network and a fake backend).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netio::driver::{Driver, DriverConfig, Flow, Machine};
use netio::mem::MemNet;
use netio::{Capabilities, Interest, IoError, PacketIo, Readiness, RxBatch, TxBatch};

/// A backend with several receive queues, each a socket pair's read end (as AF_XDP has one socket per
/// queue), that records every timeout it is asked to wait for and takes at most `room` datagrams per
/// send.
struct MultiQueue {
    queues: Vec<(UnixStream, UnixStream)>,
    waits: Arc<Mutex<Vec<Option<Duration>>>>,
    room: Arc<AtomicUsize>,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Datagrams taken by each send_batch call that took any.
    batches: Arc<Mutex<Vec<usize>>>,
    /// Set: the next send_batch also makes a datagram arrive on the first queue (once).
    arrive_on_send: Arc<AtomicUsize>,
}

impl MultiQueue {
    fn new(queues: usize) -> MultiQueue {
        MultiQueue {
            queues: (0..queues).map(|_| UnixStream::pair().expect("pair")).collect(),
            waits: Arc::default(),
            room: Arc::new(AtomicUsize::new(usize::MAX)),
            sent: Arc::default(),
            batches: Arc::default(),
            arrive_on_send: Arc::default(),
        }
    }
}

impl PacketIo for MultiQueue {
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("fake", 1472, 64)
    }
    fn local_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 7000)
    }
    fn recv_batch(&mut self, batch: &mut RxBatch) -> Result<usize, IoError> {
        batch.clear();
        for (rx, _) in &mut self.queues {
            rx.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = rx.read(&mut buf) {
                let from = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 7000);
                batch.push(&buf[..n], from, from).expect("room");
            }
        }
        Ok(batch.len())
    }
    fn send_batch(&mut self, batch: &mut TxBatch) -> Result<usize, IoError> {
        let n = batch.pending().min(self.room.load(Ordering::Relaxed));
        let taken: Vec<Vec<u8>> = batch.pending_iter().take(n).map(|d| d.payload.to_vec()).collect();
        self.sent.lock().expect("lock").extend(taken);
        if n > 0 {
            self.batches.lock().expect("lock").push(n);
        }
        if self.arrive_on_send.swap(0, Ordering::Relaxed) > 0 {
            self.queues[0].1.write_all(b"arrived").expect("write");
        }
        batch.mark_sent(n);
        Ok(n)
    }
    fn wait_with(
        &mut self,
        _interest: Interest,
        timeout: Option<Duration>,
        also: Option<BorrowedFd<'_>>,
    ) -> Result<Readiness, IoError> {
        self.waits.lock().expect("lock").push(timeout);
        let mut fds: Vec<libc::pollfd> = self
            .queues
            .iter()
            .map(|(rx, _)| libc::pollfd { fd: rx.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        if let Some(fd) = also {
            fds.push(libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let ms = timeout.map_or(-1, |t| t.as_millis().max(1) as i32);
        // SAFETY: `fds` is a valid array of pollfd that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        assert!(n >= 0, "poll failed");
        let woken = also.is_some() && fds.last().is_some_and(|p| p.revents != 0);
        let readable = fds[..self.queues.len()].iter().any(|p| p.revents != 0);
        Ok(Readiness { readable, writable: true, woken })
    }
}

/// A machine with one timer, counting what it sees.
struct Timed {
    due: Option<Duration>,
    fired: u32,
    datagrams: u32,
    turns: u32,
    to_send: u32,
}

impl Machine for Timed {
    fn on_datagram(&mut self, _now: Duration, _source: SocketAddrV4, _datagram: &mut [u8]) {
        self.datagrams += 1;
    }
    fn on_turn(&mut self, now: Duration) -> Flow {
        self.turns += 1;
        if self.due.is_some_and(|d| d <= now) {
            self.fired += 1;
            self.due = None;
        }
        Flow::Continue
    }
    fn poll_transmit(&mut self, _now: Duration, buf: &mut [u8]) -> Option<(SocketAddrV4, usize)> {
        if self.to_send == 0 {
            return None;
        }
        self.to_send -= 1;
        buf[..4].copy_from_slice(&self.to_send.to_be_bytes());
        Some((SocketAddrV4::new(Ipv4Addr::new(239, 1, 1, 1), 7000), 4))
    }
    fn poll_timeout(&self) -> Option<Duration> {
        self.due
    }
}

/// A machine with `to_send` datagrams due at once, the `urgent`-th of them (counting from 1) urgent.
struct Burst {
    to_send: u32,
    written: u32,
    urgent: Option<u32>,
    datagrams: u32,
}

impl Machine for Burst {
    fn on_datagram(&mut self, _now: Duration, _source: SocketAddrV4, _datagram: &mut [u8]) {
        self.datagrams += 1;
    }
    fn on_turn(&mut self, _now: Duration) -> Flow {
        Flow::Continue
    }
    fn poll_transmit(&mut self, _now: Duration, buf: &mut [u8]) -> Option<(SocketAddrV4, usize)> {
        if self.written == self.to_send {
            return None;
        }
        buf[..4].copy_from_slice(&self.written.to_be_bytes());
        self.written += 1;
        Some((SocketAddrV4::new(Ipv4Addr::new(239, 1, 1, 1), 7000), 4))
    }
    fn poll_timeout(&self) -> Option<Duration> {
        (self.written < self.to_send).then_some(Duration::ZERO)
    }
    fn urgent(&self) -> bool {
        self.urgent == Some(self.written)
    }
}

fn config() -> DriverConfig {
    DriverConfig::new(1472, 1472)
}

#[test]
fn a_multi_queue_backend_never_waits_past_the_next_timer() {
    let io = MultiQueue::new(4);
    let waits = io.waits.clone();
    let mut driver = Driver::new(Box::new(io), config()).expect("driver");
    let mut m =
        Timed { due: Some(driver.now() + Duration::from_millis(30)), fired: 0, datagrams: 0, turns: 0, to_send: 0 };
    let start = Instant::now();
    while m.fired == 0 {
        let before = driver.now();
        driver.turn(&mut m).expect("turn");
        assert!(start.elapsed() < Duration::from_secs(2), "the timer never fired");
        let last = waits.lock().expect("lock").last().copied();
        if let (0, Some(Some(w))) = (m.fired, last) {
            let due = Duration::from_millis(30).saturating_sub(before);
            assert!(w <= due + Duration::from_micros(1), "waited {w:?} for a timer due in {due:?}");
        }
    }
    // Without a timer the wait is capped (a stop flag is seen), never unbounded.
    m.due = None;
    driver.turn(&mut m).expect("turn");
    assert_eq!(waits.lock().expect("lock").last().copied(), Some(Some(config().max_wait)));
}

#[test]
fn a_datagram_on_any_queue_or_the_waker_ends_the_wait() {
    let io = MultiQueue::new(4);
    let writer = io.queues[3].1.try_clone().expect("clone");
    let (waker, mut wake) = UnixStream::pair().expect("pair");
    let waker: Arc<dyn AsFd + Send + Sync> = Arc::new(waker);
    let mut driver = Driver::new(Box::new(io), config()).expect("driver").with_waker(waker.clone());
    let mut m = Timed { due: None, fired: 0, datagrams: 0, turns: 0, to_send: 0 };
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        (&writer).write_all(b"data").expect("write");
    });
    let start = Instant::now();
    while m.datagrams == 0 {
        driver.turn(&mut m).expect("turn");
        assert!(start.elapsed() < Duration::from_secs(5), "the datagram on queue 3 was never seen");
    }
    t.join().expect("writer");
    wake.write_all(b"w").expect("wake");
    let before = driver.stats().woken;
    driver.turn(&mut m).expect("turn");
    assert_eq!(driver.stats().woken, before + 1, "the waker did not end the wait");
}

#[test]
fn datagrams_a_full_backend_refuses_are_sent_later_in_order() {
    let io = MultiQueue::new(1);
    io.room.store(0, Ordering::Relaxed);
    let (room, sent) = (io.room.clone(), io.sent.clone());
    let mut driver = Driver::new(Box::new(io), config()).expect("driver");
    let mut m = Timed { due: None, fired: 0, datagrams: 0, turns: 0, to_send: 10 };
    // Room for nothing: all ten wait in the batch, and the next wait includes writability.
    driver.turn(&mut m).expect("turn");
    assert_eq!((driver.pending(), driver.stats().tx_blocked), (10, 1));
    room.store(3, Ordering::Relaxed);
    driver.turn(&mut m).expect("turn");
    room.store(usize::MAX, Ordering::Relaxed);
    driver.turn(&mut m).expect("turn");
    assert_eq!(driver.pending(), 0);
    let got: Vec<u32> =
        sent.lock().expect("lock").iter().map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]])).collect();
    assert_eq!(got, (0..10).rev().collect::<Vec<u32>>(), "lost or reordered");
}

#[test]
fn the_in_memory_network_carries_a_driven_exchange() {
    let net = MemNet::new(3);
    let group = Ipv4Addr::new(239, 2, 2, 2);
    let a = net.open(Ipv4Addr::new(198, 18, 0, 1), 7000, &[]).expect("open");
    let b = net.open(Ipv4Addr::new(198, 18, 0, 2), 7000, &[group]).expect("open");
    let mut sender = Driver::new(Box::new(a), config()).expect("driver");
    let mut receiver = Driver::new(Box::new(b), config()).expect("driver");
    struct Send(u32);
    impl Machine for Send {
        fn on_datagram(&mut self, _: Duration, _: SocketAddrV4, _: &mut [u8]) {}
        fn on_turn(&mut self, _: Duration) -> Flow {
            Flow::Stop
        }
        fn poll_transmit(&mut self, _: Duration, buf: &mut [u8]) -> Option<(SocketAddrV4, usize)> {
            (self.0 > 0).then(|| {
                self.0 -= 1;
                buf[0] = self.0 as u8;
                (SocketAddrV4::new(Ipv4Addr::new(239, 2, 2, 2), 7000), 1)
            })
        }
        fn poll_timeout(&self) -> Option<Duration> {
            None
        }
    }
    sender.run(&mut Send(100), Duration::from_secs(1)).expect("run");
    let mut m = Timed { due: None, fired: 0, datagrams: 0, turns: 0, to_send: 0 };
    let start = Instant::now();
    while m.datagrams < 100 {
        receiver.turn(&mut m).expect("turn");
        assert!(start.elapsed() < Duration::from_secs(5), "{} of 100 arrived", m.datagrams);
    }
    assert_eq!(net.stats().delivered, 100);
}

#[test]
fn an_urgent_datagram_goes_out_without_waiting_for_the_batch_to_fill() {
    let io = MultiQueue::new(1);
    let batches = io.batches.clone();
    let mut driver = Driver::new(Box::new(io), config()).expect("driver");
    let mut m = Burst { to_send: 10, written: 0, urgent: Some(3), datagrams: 0 };
    driver.turn(&mut m).expect("turn");
    assert_eq!(*batches.lock().expect("lock"), vec![3, 7], "sent after the urgent third, then the rest");
    assert_eq!(driver.stats().urgent_sends, 1);
}

#[test]
fn arrivals_go_before_the_rest_of_a_long_send() {
    let io = MultiQueue::new(1);
    let (batches, arrive) = (io.batches.clone(), io.arrive_on_send.clone());
    let mut driver = Driver::new(Box::new(io), config()).expect("driver");
    let mut m = Burst { to_send: 1000, written: 0, urgent: None, datagrams: 0 };
    // Nothing arrives: the whole burst goes in one turn, batch after batch.
    driver.turn(&mut m).expect("turn");
    assert_eq!(batches.lock().expect("lock").iter().sum::<usize>(), 1000);
    assert_eq!(driver.stats().tx_yields, 0);
    // A datagram arrives while the first batch goes: the send stops there, and the next turn reads
    // it before sending the rest.
    let mut m = Burst { to_send: 1000, written: 0, urgent: None, datagrams: 0 };
    batches.lock().expect("lock").clear();
    arrive.store(1, Ordering::Relaxed);
    driver.turn(&mut m).expect("turn");
    assert_eq!((m.written, m.datagrams, driver.stats().tx_yields), (64, 0, 1));
    driver.turn(&mut m).expect("turn");
    assert_eq!((m.written, m.datagrams), (1000, 1), "read first, then the rest sent");
}

/// A machine that is busy (a fault waits) or not, with nothing to do.
struct Waiting {
    busy: bool,
}

impl Machine for Waiting {
    fn on_datagram(&mut self, _now: Duration, _source: SocketAddrV4, _datagram: &mut [u8]) {}
    fn on_turn(&mut self, _now: Duration) -> Flow {
        Flow::Continue
    }
    fn poll_transmit(&mut self, _now: Duration, _buf: &mut [u8]) -> Option<(SocketAddrV4, usize)> {
        None
    }
    fn poll_timeout(&self) -> Option<Duration> {
        None
    }
    fn busy(&self) -> bool {
        self.busy
    }
}

#[test]
fn a_busy_machine_is_polled_for_a_while_then_the_loop_sleeps() {
    let io = MultiQueue::new(1);
    let waits = io.waits.clone();
    let mut cfg = config().busy_poll(Duration::from_millis(30));
    cfg.max_wait = Duration::from_millis(5);
    let mut driver = Driver::new(Box::new(io), cfg).expect("driver");
    // Not busy: every turn waits in the backend.
    let mut m = Waiting { busy: false };
    driver.turn(&mut m).expect("turn");
    assert_eq!((waits.lock().expect("lock").len(), driver.stats().busy_polls), (1, 0));
    // Busy: turns poll without waiting, until the budget since the last arrival is spent.
    m.busy = true;
    let started = Instant::now();
    while waits.lock().expect("lock").len() == 1 {
        driver.turn(&mut m).expect("turn");
        assert!(started.elapsed() < Duration::from_secs(5), "the busy poll never ended");
    }
    assert!(started.elapsed() >= Duration::from_millis(30), "slept before the budget: {:?}", started.elapsed());
    assert!(driver.stats().busy_polls > 1);
}
