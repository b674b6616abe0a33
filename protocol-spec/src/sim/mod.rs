//! The deterministic simulator: one [`Sender`](crate::sender::Sender) and N
//! [`Receiver`](crate::receiver::Receiver)s over seeded, faulty links, in virtual time.
//!
//! A run is a pure function of its [`SimConfig`]: every random choice draws from a stream derived from
//! the seed (one per link, per receiver, for the image and the working set), and events due at the same
//! virtual time run in the order they were scheduled. [`run`] returns a [`SimReport`]; the same config
//! always gives the same report, apart from `real_time_ms`.
//!
//! The one exception to the crate's no-clock rule: [`run`] reads the monotonic wall clock (not the
//! system time) to report `real_time_ms` and to enforce [`SimConfig::real_time_limit`], the safety
//! bound that keeps a livelocked run from hanging a test. Neither changes what happens in virtual time;
//! a run stopped by that bound says so in `stopped_by`.
//!
//! The pieces, each small and tested on its own:
//! - [`events`]: the event queue;
//! - [`link`]: fault injection (loss, bursts, duplication, reordering, corruption) and rate-limited pipes;
//! - [`content`]: the memory image the server serves;
//! - [`workload`]: the working set and each receiver's touch order;
//! - [`sink`]: the receivers' page caches, which check every stored page against the image;
//! - `world` (private): the topology and the loop that drives the state machines;
//! - [`report`]: what a run measured.
//!
//! ```no_run
//! use spindrift_protocol::sim::{run, SimConfig};
//! let report = run(&SimConfig { receivers: 16, pages: 4096, loss: 0.01, ..SimConfig::default() })
//!     .expect("valid config");
//! assert!(report.all_bit_exact);
//! ```

pub mod content;
pub mod events;
pub mod link;
pub mod report;
pub mod rng;
pub mod sink;
pub mod workload;
mod world;

use std::time::Duration;

pub use content::ContentMix;
pub use report::SimReport;

/// What the server pushes without being asked (see [`crate::sender::PushPolicy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Push {
    /// Nothing: pages travel only when a receiver asks.
    #[default]
    None,
    /// The working set (as a recorded hint), in page order.
    Hints,
    /// The working set first, then the rest of the image.
    HintsThenAll,
}

/// What each receiver's vCPU does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Touches the working set in its own shuffled order, blocking on each missing page (one vCPU).
    #[default]
    Shuffled,
    /// Touches the working set in page order (like `spindrift-client fetch`, with one fault at a time).
    Sequential,
    /// Touches nothing: waits until the push has brought every working-set page (like a udpcast
    /// receiver). Only meaningful with a push policy.
    Passive,
}

/// One simulated scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Number of receivers (host daemons), node ids `1..=receivers`.
    pub receivers: u32,
    /// Pages (4 KiB) in the image.
    pub pages: u32,
    /// Fraction of the image every receiver touches, in `(0, 1]`.
    pub working_set: f64,
    /// Loss rate of every link, both directions, in `[0, 1)`.
    pub loss: f64,
    /// Bursty (Gilbert-Elliott) loss instead of independent loss, same average rate.
    pub burst: bool,
    /// Mean burst length in packets when `burst` is set.
    pub burst_length: f64,
    /// Probability a packet is duplicated, per link.
    pub duplicate: f64,
    /// Probability a packet is delayed by up to `reorder_jitter` (and so overtaken), per link.
    pub reorder: f64,
    /// The largest extra delay of a reordered packet.
    pub reorder_jitter: Duration,
    /// Probability a packet is corrupted (1-3 bits or bytes changed), per link.
    pub corrupt: f64,
    /// One-way propagation delay of every link.
    pub delay: Duration,
    /// The server's line rate, bits per second (its egress and ingress).
    pub server_rate_bps: u64,
    /// Each host's line rate, bits per second (downlinks and uplinks).
    pub host_rate_bps: u64,
    /// Bytes each queue holds before it drops at the tail.
    pub queue_bytes: u64,
    /// The sender paces at this fraction of the server's line rate (0: unpaced).
    pub pacing: f64,
    /// The first `slow_receivers` receivers take datagrams off their socket at only `slow_rate_bps`
    /// and hold at most `slow_queue_bytes` waiting (a small socket buffer behind a busy daemon):
    /// what arrives while it is full is dropped, as an overrun socket drops it.
    pub slow_receivers: u32,
    /// The rate of a slow receiver, bits per second.
    pub slow_rate_bps: u64,
    /// The socket buffer of a slow receiver, bytes.
    pub slow_queue_bytes: u64,
    /// The slow receivers' bottleneck is in the network (a router's queue, as netlab's `tbf`),
    /// not their socket: they cannot size their window to it, so it keeps its size.
    pub slow_in_network: bool,
    /// Congestion control (PROTOCOL.md 11.1): the sender finds its rate from the receivers'
    /// feedback; `pacing`, when set, caps it.
    pub congestion_control: bool,
    /// Push flow control (the window of PROTOCOL.md section 11); off only to measure what it saves.
    pub flow_control: bool,
    /// Each receiver's window, stream positions (None: the receiver's default).
    pub window: Option<u32>,
    /// What each receiver's vCPU does.
    pub workload: Workload,
    /// The last `silent_receivers` receivers fall silent `silent_after` into the run: everything
    /// they send from then on is lost (a host that hung or lost its uplink). They need not finish.
    pub silent_receivers: u32,
    /// When the silent receivers fall silent.
    pub silent_after: Duration,
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Largest datagram (UDP payload) the server sends.
    pub max_datagram: usize,
    /// Receivers' read-ahead in pages (None: the receiver's default).
    pub read_ahead: Option<u16>,
    /// Encrypt payloads rather than only authenticate them.
    pub encrypt: bool,
    /// zstd level for pages (None: raw).
    pub zstd_level: Option<i32>,
    /// Background push policy.
    pub push: Push,
    /// How long a receiver computes between touches of present pages.
    pub think_time: Duration,
    /// Receivers start at uniformly random times in `0..=stagger` (zero: all at time 0).
    pub stagger: Duration,
    /// The image's mix of page kinds.
    pub content: ContentMix,
    /// Virtual time after which the run stops, finished or not.
    pub time_limit: Duration,
    /// Safety bound: stop after this many events.
    pub max_events: u64,
    /// Safety bound: stop after this much real time (None: no bound).
    pub real_time_limit: Option<Duration>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            receivers: 16,
            pages: 65536,
            working_set: 0.1,
            loss: 0.0,
            burst: false,
            burst_length: 4.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_jitter: Duration::from_micros(100),
            corrupt: 0.0,
            delay: Duration::from_micros(50),
            server_rate_bps: 10_000_000_000,
            host_rate_bps: 10_000_000_000,
            queue_bytes: 4 << 20,
            pacing: 0.9,
            slow_receivers: 0,
            slow_rate_bps: 1_000_000_000,
            slow_queue_bytes: 256 << 10,
            slow_in_network: false,
            congestion_control: false,
            flow_control: true,
            window: None,
            workload: Workload::Shuffled,
            silent_receivers: 0,
            silent_after: Duration::ZERO,
            seed: 1,
            max_datagram: 1472,
            read_ahead: None,
            encrypt: false,
            zstd_level: Some(1),
            push: Push::None,
            think_time: Duration::from_micros(1),
            stagger: Duration::ZERO,
            content: ContentMix::default(),
            time_limit: Duration::from_secs(60),
            max_events: 2_000_000_000,
            real_time_limit: Some(Duration::from_secs(600)),
        }
    }
}

/// Why a simulation could not start.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// A configuration value is out of range.
    #[error("invalid simulation config: {field} = {value}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Its value, printed.
        value: String,
        /// The accepted range.
        why: &'static str,
    },
    /// The sender refused its configuration.
    #[error("sender rejected its configuration")]
    Sender(#[source] crate::sender::ConfigError),
    /// A receiver refused its configuration.
    #[error("receiver {node} rejected its configuration")]
    Receiver {
        /// Its node id.
        node: u32,
        /// Why.
        #[source]
        source: crate::receiver::ConfigError,
    },
}

/// Most receivers a run may have.
pub const MAX_RECEIVERS: u32 = 4096;
/// Most pages an image may have (2^24 pages = 64 GiB).
pub const MAX_PAGES: u32 = 1 << 24;

impl SimConfig {
    /// Checks every value is in range.
    pub fn validate(&self) -> Result<(), SimError> {
        fn bad(field: &'static str, value: impl std::fmt::Display, why: &'static str) -> Result<(), SimError> {
            Err(SimError::Invalid { field, value: value.to_string(), why })
        }
        let prob = |p: f64| (0.0..1.0).contains(&p);
        if !(1..=MAX_RECEIVERS).contains(&self.receivers) {
            return bad("receivers", self.receivers, "must be in 1..=4096");
        }
        if !(1..=MAX_PAGES).contains(&self.pages) {
            return bad("pages", self.pages, "must be in 1..=16777216");
        }
        if !(self.working_set > 0.0 && self.working_set <= 1.0) {
            return bad("working_set", self.working_set, "must be in (0, 1]");
        }
        for (field, p) in
            [("loss", self.loss), ("duplicate", self.duplicate), ("reorder", self.reorder), ("corrupt", self.corrupt)]
        {
            if !prob(p) {
                return bad(field, p, "must be in [0, 1)");
            }
        }
        if !(self.burst_length >= 1.0 && self.burst_length <= 1e6) {
            return bad("burst_length", self.burst_length, "must be in [1, 1e6]");
        }
        if !(0.0..=1.0).contains(&self.pacing) {
            return bad("pacing", self.pacing, "must be in [0, 1]");
        }
        if self.server_rate_bps < 1_000_000 || self.host_rate_bps < 1_000_000 {
            return bad("rate", self.server_rate_bps.min(self.host_rate_bps), "must be at least 1 Mbit/s");
        }
        if self.slow_receivers > self.receivers {
            return bad("slow_receivers", self.slow_receivers, "must be at most the number of receivers");
        }
        if self.slow_receivers > 0 && self.slow_rate_bps < 1_000_000 {
            return bad("slow_rate_bps", self.slow_rate_bps, "must be at least 1 Mbit/s");
        }
        if self.slow_receivers > 0 && self.slow_queue_bytes < self.max_datagram as u64 + link::WIRE_OVERHEAD as u64 {
            return bad("slow_queue_bytes", self.slow_queue_bytes, "must hold at least one datagram");
        }
        if self.silent_receivers >= self.receivers {
            return bad("silent_receivers", self.silent_receivers, "must leave at least one receiver that speaks");
        }
        if self.window == Some(0) {
            return bad("window", 0, "must be positive");
        }
        if self.workload == Workload::Passive && self.push == Push::None {
            return bad("workload", "passive", "needs a push policy (passive receivers ask for nothing)");
        }
        if !(crate::wire::MIN_DATAGRAM..=crate::wire::MAX_DATAGRAM).contains(&self.max_datagram) {
            return bad("max_datagram", self.max_datagram, "must be in 1232..=8972");
        }
        if self.queue_bytes < self.max_datagram as u64 + link::WIRE_OVERHEAD as u64 {
            return bad("queue_bytes", self.queue_bytes, "must hold at least one datagram");
        }
        if self.content.zero < 0.0 || self.content.text < 0.0 || self.content.zero + self.content.text > 1.0 {
            return bad("content", format!("{:?}", self.content), "fractions must be >= 0 and sum to <= 1");
        }
        if self.time_limit.is_zero() {
            return bad("time_limit", format!("{:?}", self.time_limit), "must be positive");
        }
        Ok(())
    }
}

/// Runs one scenario to completion (every receiver touched its whole working set) or to a limit.
pub fn run(config: &SimConfig) -> Result<SimReport, SimError> {
    config.validate()?;
    let started = std::time::Instant::now();
    world::World::new(config)?.run(started)
}
