//! [`Driver`]: the one event loop of every spindrift daemon (the memory server, `fetch`, the host
//! daemon), over any [`PacketIo`] backend.
//!
//! A daemon puts its protocol state (a sender, a host endpoint) behind [`Machine`]; the driver owns
//! everything about waiting and batching, so the daemons differ only in what their machine does:
//!
//! ```text
//!  turn:  recv_batch (up to RX_ROUNDS batches, fewer once the waker fires) ─> Machine::on_datagram
//!         Machine::on_turn(now): commands, timers due, events; Flow::Stop ends the loop
//!         send what is still pending, then Machine::poll_transmit into free slots ─> send_batch
//!           (at once after a datagram Machine::urgent says answers a fault; between batches, a
//!           new turn first if datagrams or the waker are ready, so arrivals never wait behind
//!           everything the machine has queued)
//!         wait_with(readable [+ writable if the socket was full], the waker fd, until poll_timeout);
//!           or, while Machine::busy (a fault waits) and for up to busy_poll, a yield and a new turn
//! ```
//!
//! * **One wait.** [`PacketIo::wait_with`] polls every descriptor the backend has (each AF_XDP
//!   queue) and the daemon's waker (an eventfd other threads signal with commands) in one call, with
//!   the time to the machine's next timer as its timeout. Nothing sleeps blind and nothing sleeps past
//!   a timer: the wait is never longer than [`Machine::poll_timeout`] says, capped at
//!   [`DriverConfig::max_wait`] so a stop flag is seen.
//! * **Short timers.** A timer already due turns the loop again at once (after a yield). Below
//!   [`DriverConfig::spin_below`] the loop yields instead of sleeping, and below
//!   [`DriverConfig::nap_below`] it sleeps without watching the backend. A paced memory server
//!   uses both (200 µs and 1 ms: its pacer keeps no credit for late sends, and requests that arrive
//!   during a nap are answered together); an unpaced one (the default) neither, because a nap after
//!   each answer held the next fault's request back: `bench page-path` (one host, read-ahead 0)
//!   measured a one-page fault at p50 491 µs with the nap and 190 µs without, and `bench
//!   xdp-daemons` (faults, UDP, MTU 1500, 4 hosts, two runs each) p50 580-616 µs with it and
//!   322-328 µs without, but p99 2.1-3.1 ms with it and 7.1-10.8 ms without (on 2 cores shared by 4
//!   touchers, 4 daemons and the server, a server that wakes per request is preempted more). The
//!   host daemons neither spin nor nap: they share the cores with their clones, and a fault wakes
//!   them at once.
//! * **A full socket** keeps the unsent datagrams in the batch; the next turn sends them first and
//!   the wait includes writability. Nothing is dropped for lack of room; one datagram the kernel
//!   refuses is dropped (counted, the protocol repairs it like a loss).
//! * **Time** is a [`Duration`] since the driver started, from the monotonic clock, for the
//!   machine to hand to its sans-IO core.

use std::net::SocketAddrV4;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{BatchError, Interest, IoError, PacketIo, RxBatch, TxBatch};

/// Receive batches taken per turn at most, so a flood cannot keep timers and sends from running.
const RX_ROUNDS: usize = 8;

/// Whether the loop goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep turning.
    Continue,
    /// Stop after this turn's sends.
    Stop,
}

/// What a daemon's protocol state offers the driver. Times are since the driver started.
pub trait Machine {
    /// One datagram from `source` (its payload may be changed in place, e.g. decrypted).
    fn on_datagram(&mut self, now: Duration, source: SocketAddrV4, datagram: &mut [u8]);

    /// The rest of a turn, after the datagrams that arrived: commands, timers that are due, events.
    fn on_turn(&mut self, now: Duration) -> Flow;

    /// Writes the next datagram to send into `buf` and says where it goes; `None` when nothing is due.
    fn poll_transmit(&mut self, now: Duration, buf: &mut [u8]) -> Option<(SocketAddrV4, usize)>;

    /// When the next turn is due even if nothing arrives (`None`: only on I/O or a wake-up).
    fn poll_timeout(&self) -> Option<Duration>;

    /// Whether the datagram [`Machine::poll_transmit`] just wrote should go out at once, with what
    /// is queued before it, instead of waiting for the batch to fill (it answers a fault: the
    /// datagrams that would fill the batch must not hold it back).
    fn urgent(&self) -> bool {
        false
    }

    /// Whether someone waits on what arrives next (a clone's fault): the driver then polls instead
    /// of sleeping, for up to [`DriverConfig::busy_poll`] since the last arrival.
    fn busy(&self) -> bool {
        false
    }
}

/// How a driver is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverConfig {
    /// Datagrams per receive and per send batch.
    pub batch: usize,
    /// Largest datagram received (longer ones arrive truncated and are dropped, counted).
    pub rx_datagram: usize,
    /// Largest datagram the machine writes.
    pub tx_datagram: usize,
    /// The longest wait, whatever the timers say (so stop flags and clocks are looked at).
    pub max_wait: Duration,
    /// Waits shorter than this yield the CPU instead of sleeping.
    pub spin_below: Duration,
    /// While [`Machine::busy`], poll instead of sleeping for up to this long since the wait began
    /// or the last datagram arrived (zero: never). Spares the wake-up of the thread when the answer
    /// comes, at the cost of a CPU while someone waits anyway.
    pub busy_poll: Duration,
    /// Waits shorter than this (and not shorter than `spin_below`) sleep without watching the
    /// backend: what arrives meanwhile waits for the timer, and is taken in one batch with what
    /// follows it. Longer waits then end half a nap early, so the timer is met by a nap. Zero: every
    /// wait watches the backend until the timer.
    pub nap_below: Duration,
    /// After a turn that received datagrams, while the machine is not [`Machine::busy`], sleep
    /// this long (or until its next timer, if sooner) before looking again, so that what arrives
    /// meanwhile is taken in one batch: userspace interrupt moderation for bulk receivers, which
    /// otherwise pay a wake-up, a poll and a receive call per datagram of a paced stream. Zero:
    /// never.
    pub coalesce: Duration,
}

impl DriverConfig {
    /// 64-datagram batches of `rx_datagram` and `tx_datagram` bytes, waits of at most 100 ms, no
    /// spinning (the backends' waits are exact to the microsecond).
    pub fn new(rx_datagram: usize, tx_datagram: usize) -> DriverConfig {
        DriverConfig {
            batch: 64,
            rx_datagram,
            tx_datagram,
            max_wait: Duration::from_millis(100),
            spin_below: Duration::ZERO,
            nap_below: Duration::ZERO,
            busy_poll: Duration::ZERO,
            coalesce: Duration::ZERO,
        }
    }

    /// Batches a bulk receiver's arrivals (see [`DriverConfig::coalesce`]).
    pub fn coalesce(mut self, coalesce: Duration) -> DriverConfig {
        self.coalesce = coalesce;
        self
    }

    /// Polls instead of sleeping while the machine is busy, for up to `busy_poll` at a time (see
    /// [`DriverConfig::busy_poll`]).
    pub fn busy_poll(mut self, busy_poll: Duration) -> DriverConfig {
        self.busy_poll = busy_poll;
        self
    }

    /// Sleeps blindly (see [`DriverConfig::nap_below`]) for waits shorter than `nap_below`.
    pub fn nap_below(mut self, nap_below: Duration) -> DriverConfig {
        self.nap_below = nap_below;
        self
    }

    /// Yields the CPU instead of sleeping for waits shorter than `spin_below` (a pacer that keeps no
    /// credit for late sends wants this; on a machine shared by many daemons it costs their CPU).
    pub fn spin_below(mut self, spin_below: Duration) -> DriverConfig {
        self.spin_below = spin_below;
        self
    }
}

/// What the driver counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Turns of the loop.
    pub turns: u64,
    /// Waits in the backend (sleeps).
    pub waits: u64,
    /// Waits ended by the waker.
    pub woken: u64,
    /// Turns that yielded instead of sleeping (a timer was too close).
    pub spins: u64,
    /// Datagrams received.
    pub rx_datagrams: u64,
    /// Datagrams received truncated (longer than the receive slots), dropped.
    pub rx_truncated: u64,
    /// Datagrams sent.
    pub tx_datagrams: u64,
    /// Datagrams the backend refused, dropped.
    pub tx_errors: u64,
    /// Turns that found the backend full and kept datagrams for the next.
    pub tx_blocked: u64,
    /// Batches sent before they were full because the machine said a datagram was urgent.
    pub urgent_sends: u64,
    /// Turns whose sending stopped, with more due, because datagrams or a command had arrived.
    pub tx_yields: u64,
    /// Turns that polled again instead of sleeping because the machine was busy.
    pub busy_polls: u64,
    /// Sleeps that let arrivals gather into one batch ([`DriverConfig::coalesce`]).
    pub coalesced: u64,
}

/// The event loop. See the module docs.
pub struct Driver {
    io: Box<dyn PacketIo + Send>,
    rx: RxBatch,
    tx: TxBatch,
    start: Instant,
    waker: Option<Arc<dyn AsFd + Send + Sync>>,
    config: DriverConfig,
    stats: DriverStats,
    /// The backend took fewer datagrams than were pending: wait for writability too.
    blocked: bool,
    /// Since when the loop has polled for a busy machine with nothing arriving (None: not polling).
    polling_since: Option<Instant>,
    /// The last receive took datagrams.
    received: bool,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("io", &self.io.capabilities().summary())
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Driver {
    /// A driver over `io`, its clock starting now.
    pub fn new(io: Box<dyn PacketIo + Send>, config: DriverConfig) -> Result<Driver, BatchError> {
        Ok(Driver {
            rx: RxBatch::new(config.batch, config.rx_datagram)?,
            tx: TxBatch::new(config.batch, config.tx_datagram)?,
            io,
            start: Instant::now(),
            waker: None,
            config,
            stats: DriverStats::default(),
            blocked: false,
            polling_since: None,
            received: false,
        })
    }

    /// Also wakes when `waker` is readable (an eventfd that other threads signal after queueing a
    /// command); the machine drains it in [`Machine::on_turn`].
    pub fn with_waker(mut self, waker: Arc<dyn AsFd + Send + Sync>) -> Driver {
        self.waker = Some(waker);
        self
    }

    /// The backend.
    pub fn io(&self) -> &dyn PacketIo {
        &*self.io
    }

    /// The time since the driver started.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// The counters.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Datagrams queued and not yet taken by the backend.
    pub fn pending(&self) -> usize {
        self.tx.pending()
    }

    /// Turns until the machine says stop, then sends what it has left (waiting up to `flush_limit`
    /// for room).
    pub fn run(&mut self, machine: &mut dyn Machine, flush_limit: Duration) -> Result<(), IoError> {
        while self.turn(machine)? == Flow::Continue {}
        self.flush(machine, flush_limit)
    }

    /// One turn: receive, [`Machine::on_turn`], send, wait (unless stopping).
    pub fn turn(&mut self, machine: &mut dyn Machine) -> Result<Flow, IoError> {
        self.stats.turns += 1;
        self.receive(machine)?;
        let flow = machine.on_turn(self.now());
        self.transmit(machine)?;
        if flow == Flow::Continue {
            self.sleep(machine)?;
        }
        Ok(flow)
    }

    /// Sends everything the machine has to send, waiting for room up to `limit` in all.
    pub fn flush(&mut self, machine: &mut dyn Machine, limit: Duration) -> Result<(), IoError> {
        let deadline = Instant::now() + limit;
        loop {
            self.transmit(machine)?;
            if !self.blocked || Instant::now() >= deadline {
                if self.blocked {
                    tracing::warn!("backend full: {} datagrams not sent at the end", self.tx.pending());
                }
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.io.wait(Interest::WRITABLE, Some(left.min(Duration::from_millis(10))))?;
        }
    }

    fn receive(&mut self, machine: &mut dyn Machine) -> Result<(), IoError> {
        self.received = false;
        for _ in 0..RX_ROUNDS {
            let n = self.io.recv_batch(&mut self.rx)?;
            self.received |= n > 0;
            let now = self.now();
            self.stats.rx_datagrams += n as u64;
            for i in 0..n {
                let Some((source, truncated)) = self.rx.get(i).map(|d| (d.source, d.truncated)) else { continue };
                if truncated {
                    self.stats.rx_truncated += 1;
                    continue;
                }
                if let Some(payload) = self.rx.payload_mut(i) {
                    machine.on_datagram(now, source, payload);
                }
            }
            if n < self.rx.capacity() || self.woken() {
                // Drained; or a command (a clone's fault) waits: it goes before more datagrams.
                break;
            }
        }
        Ok(())
    }

    /// Whether the waker fired (without taking it: the machine does, in its turn).
    fn woken(&self) -> bool {
        self.waker
            .as_ref()
            .is_some_and(|w| crate::udp::poll_readable(w.as_fd(), Some(Duration::ZERO), None).is_ok_and(|r| r.readable))
    }

    /// Sends what is pending, then what the machine has, batch by batch, until the machine has
    /// nothing more or the backend is full.
    fn transmit(&mut self, machine: &mut dyn Machine) -> Result<(), IoError> {
        // The batch went out before it was full because the machine said so: it has more.
        let mut urgent = false;
        loop {
            if self.tx.is_sent() {
                self.tx.clear();
                let now = self.now();
                urgent = false;
                while !self.tx.is_full() {
                    let queued = self.tx.push_addressed(|buf| machine.poll_transmit(now, buf));
                    match queued {
                        Ok(Some(_)) if machine.urgent() => {
                            self.stats.urgent_sends += 1;
                            urgent = true;
                            break;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => {
                            // A machine that claims more than the slot: a bug, not input. Drop it.
                            tracing::error!("datagram not queued: {e}");
                            self.stats.tx_errors += 1;
                        }
                    }
                }
                if self.tx.is_empty() {
                    self.blocked = false;
                    return Ok(());
                }
            }
            let before = self.tx.sent();
            match self.io.send_batch(&mut self.tx) {
                Ok(_) => {}
                Err(e @ IoError::Send { .. }) => {
                    // One datagram was dropped (counted as sent); the protocol repairs it like a loss.
                    tracing::warn!("{e}");
                    self.stats.tx_errors += 1;
                }
                Err(e) => return Err(e),
            }
            self.stats.tx_datagrams += (self.tx.sent() - before) as u64;
            if !self.tx.is_sent() {
                if self.tx.sent() == before {
                    self.stats.tx_blocked += 1;
                    self.blocked = true;
                    return Ok(());
                }
                // Partial progress: try the rest at once.
                continue;
            }
            if !self.tx.is_full() && !urgent {
                // The machine had nothing more due.
                self.blocked = false;
                return Ok(());
            }
            // More is due: but datagrams that arrived meanwhile (a fault's request) or a command
            // go first, in a new turn, rather than after everything the machine has queued.
            let waker = self.waker.as_ref().map(|w| w.as_fd());
            let ready = self.io.wait_with(Interest::READABLE, Some(Duration::ZERO), waker)?;
            if ready.readable || ready.woken {
                self.stats.tx_yields += 1;
                self.blocked = false;
                return Ok(());
            }
        }
    }

    /// Waits for a datagram, room to send (when blocked), the waker, or the machine's next timer.
    fn sleep(&mut self, machine: &mut dyn Machine) -> Result<(), IoError> {
        let now = self.now();
        let mut wait = self.config.max_wait;
        if let Some(t) = machine.poll_timeout() {
            wait = wait.min(t.saturating_sub(now));
        }
        if self.received && !self.config.coalesce.is_zero() && !wait.is_zero() && !self.blocked && !machine.busy() {
            self.stats.coalesced += 1;
            std::thread::sleep(wait.min(self.config.coalesce));
            return Ok(());
        }
        if (wait.is_zero() || wait < self.config.spin_below) && !self.blocked {
            self.stats.spins += 1;
            std::thread::yield_now();
            return Ok(());
        }
        if !self.config.busy_poll.is_zero() && !self.blocked && machine.busy() {
            let since = match self.polling_since {
                Some(since) if !self.received => since,
                _ => *self.polling_since.insert(Instant::now()),
            };
            if since.elapsed() < self.config.busy_poll {
                self.stats.busy_polls += 1;
                std::thread::yield_now();
                return Ok(());
            }
        } else {
            self.polling_since = None;
        }
        if wait < self.config.nap_below && !self.blocked {
            self.stats.waits += 1;
            std::thread::sleep(wait);
            return Ok(());
        }
        if !self.config.nap_below.is_zero() {
            // Wake half a nap early and nap the rest: the timer fires on time.
            wait = wait.saturating_sub(self.config.nap_below / 2);
        }
        let interest = if self.blocked { Interest::BOTH } else { Interest::READABLE };
        self.stats.waits += 1;
        let ready = self.io.wait_with(interest, Some(wait), self.waker.as_ref().map(|w| w.as_fd()))?;
        if ready.woken {
            self.stats.woken += 1;
        }
        Ok(())
    }
}
