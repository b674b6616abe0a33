//! What a run measured.

use serde::Serialize;

use super::link::{FaultStats, PipeStats};
use super::sink::SinkStats;
use crate::receiver::ReceiverStats;
use crate::sender::SenderStats;

/// A few points of a distribution.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Exact percentiles (nearest rank) of `samples`, scaled by `scale`.
    pub fn exact(samples: &mut [u64], scale: f64) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let at = |q: f64| samples[((q * n as f64).ceil() as usize).clamp(1, n) - 1] as f64 * scale;
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Percentiles {
            count: n as u64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: samples[n - 1] as f64 * scale,
            mean: sum as f64 / n as f64 * scale,
        }
    }

    /// Percentiles of an HDR histogram, scaled by `scale`.
    pub fn from_histogram(h: &hdrhistogram::Histogram<u64>, scale: f64) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5) as f64 * scale,
            p90: h.value_at_quantile(0.9) as f64 * scale,
            p99: h.value_at_quantile(0.99) as f64 * scale,
            max: h.max() as f64 * scale,
            mean: h.mean() * scale,
        }
    }
}

/// Traffic and faults on the simulated network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct NetworkReport {
    /// The server's egress queue (all multicast).
    pub server_egress: PipeStats,
    /// The switch's downlink queue (the same multicast stream to every host).
    pub downlink_queue: PipeStats,
    /// The server's ingress queue (all receivers' uplinks).
    pub server_ingress: PipeStats,
    /// The receivers' uplink queues, summed.
    pub uplink_queues: PipeStats,
    /// The slow receivers' sockets, summed (`dropped`: datagrams lost to overrun).
    pub slow_sockets: PipeStats,
    /// Faults injected on downlinks, summed over receivers.
    pub downlink_faults: FaultStats,
    /// Faults injected on uplinks, summed over receivers.
    pub uplink_faults: FaultStats,
}

/// Events processed, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventCounts {
    /// Multicast datagrams reaching the downlinks (each fans out to every receiver).
    pub multicast: u64,
    /// Reordered or duplicated copies delivered on their own.
    pub late_copies: u64,
    /// Receivers' datagrams reaching the server's ingress queue.
    pub at_ingress: u64,
    /// Receivers' datagrams reaching the server.
    pub to_server: u64,
    /// Sender wakeups (stale ones included).
    pub sender_timers: u64,
    /// Receiver wakeups (stale ones included).
    pub receiver_timers: u64,
    /// Wakeups ignored because a newer one replaced them.
    pub stale_timers: u64,
    /// vCPU steps.
    pub steps: u64,
    /// Receiver starts.
    pub starts: u64,
}

/// A receiver that had not finished when the run stopped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stuck {
    /// Its node id.
    pub node: u32,
    /// Pages it had touched.
    pub touched: u32,
    /// Pages in its working set.
    pub of: u32,
    /// The page its vCPU waits for, if blocked.
    pub blocked_on: Option<u32>,
    /// Since when, virtual ms.
    pub blocked_since_ms: Option<f64>,
}

/// The knobs of the run, echoed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// Mean burst length (when bursty).
    pub burst_length: f64,
    /// Duplication probability.
    pub duplicate: f64,
    /// Reordering probability.
    pub reorder: f64,
    /// Largest reordering delay, µs.
    pub reorder_jitter_us: f64,
    /// Corruption probability.
    pub corrupt: f64,
    /// One-way delay, µs.
    pub delay_us: f64,
    /// Server line rate, bit/s.
    pub server_rate_bps: u64,
    /// Host line rate, bit/s.
    pub host_rate_bps: u64,
    /// Sender pacing, fraction of the server rate (0: unpaced).
    pub pacing: f64,
    /// Receivers with a slow socket.
    pub slow_receivers: u32,
    /// Their rate, bit/s.
    pub slow_rate_bps: u64,
    /// Their socket buffer, bytes.
    pub slow_queue_bytes: u64,
    /// The slow receivers' bottleneck is in the network, not their socket.
    pub slow_in_network: bool,
    /// Congestion control on.
    pub congestion_control: bool,
    /// Push flow control on.
    pub flow_control: bool,
    /// Receivers' window (None: default).
    pub window: Option<u32>,
    /// What the receivers' vCPUs do.
    pub workload: super::Workload,
    /// Receivers that fall silent.
    pub silent_receivers: u32,
    /// When, ms.
    pub silent_after_ms: f64,
    /// Largest datagram.
    pub max_datagram: usize,
    /// Receivers' read-ahead (None: default).
    pub read_ahead: Option<u16>,
    /// Encrypted payloads.
    pub encrypt: bool,
    /// zstd level.
    pub zstd_level: Option<i32>,
    /// Push policy.
    pub push: super::Push,
    /// Think time between touches, µs.
    pub think_time_us: f64,
    /// Start stagger, µs.
    pub stagger_us: f64,
    /// Virtual time limit, ms.
    pub time_limit_ms: f64,
}

/// The outcome of one simulated run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    /// Receivers simulated.
    pub receivers: u32,
    /// Pages in the image.
    pub pages: u32,
    /// Working-set fraction.
    pub working_set: f64,
    /// Pages in the working set.
    pub working_set_pages: u32,
    /// Loss rate per link.
    pub loss: f64,
    /// Bursty loss.
    pub burst: bool,
    /// The seed.
    pub seed: u64,
    /// Every receiver touched its whole working set before the limits.
    pub completed: bool,
    /// Why the run stopped early, if it did (time limit, event bound, livelock, real-time bound).
    pub stopped_by: Option<String>,
    /// Completed, every touched page delivered with the server's exact bytes, and no receiver ever
    /// stored a page that differs from the image.
    pub all_bit_exact: bool,
    /// Pages stored in all sinks (re-stores counted).
    pub pages_delivered: u64,
    /// Distinct pages stored, summed over sinks.
    pub unique_pages_delivered: u64,
    /// Pages stored with wrong contents (must be 0).
    pub mismatched_pages: u64,
    /// Touches where the receiver said a page was present that its sink never got (must be 0).
    pub phantom_hits: u64,
    /// Working-set pages that never reached a receiver that touched them, summed.
    pub missing_pages: u64,
    /// The first (up to 16) receivers that had not finished, and what they waited for.
    pub unfinished: Vec<Stuck>,
    /// Bytes the server sent (datagram payloads).
    pub server_tx_bytes: u64,
    /// `server_tx_bytes` over the image's size (pages × 4096): 1.0 is one raw copy of the image.
    pub tx_per_image: f64,
    /// Datagrams the server sent.
    pub server_tx_packets: u64,
    /// Datagrams the server received.
    pub server_rx_packets: u64,
    /// NAKs the receivers sent.
    pub naks_sent: u64,
    /// Parity packets the server sent (proactive and on NAK).
    pub repairs_sent: u64,
    /// Of which proactive.
    pub proactive_repairs: u64,
    /// Requests the receivers sent.
    pub requests_sent: u64,
    /// Data packets the server sent.
    pub data_packets: u64,
    /// Requested pages the server did not send again.
    pub pages_deduplicated: u64,
    /// Datagrams the receivers dropped as unauthenticated or malformed.
    pub corrupted_dropped: u64,
    /// Touches that blocked waiting for a page.
    pub misses: u64,
    /// Touches the receiver called missing although its sink already held the page.
    pub stale_misses: u64,
    /// How long a blocked touch waited, µs.
    pub fault_wait_us: Percentiles,
    /// When each receiver finished its working set, ms (finished receivers only).
    pub completion_ms: Percentiles,
    /// Receivers that finished.
    pub receivers_finished: u32,
    /// When the last receiver finished (or the run stopped), virtual ms.
    pub virtual_time_ms: f64,
    /// Real time the run took, ms (the one field that varies between identical runs).
    pub real_time_ms: f64,
    /// Events processed.
    pub events: u64,
    /// Events processed, by kind.
    pub event_counts: EventCounts,
    /// `ServerLost` events the receivers raised.
    pub server_lost_events: u64,
    /// `ReceiverLost` events the sender raised.
    pub receiver_lost_events: u64,
    /// The sender's counters.
    pub sender: SenderStats,
    /// The receivers' counters, summed.
    pub receiver: ReceiverStats,
    /// The sinks' counters, summed.
    pub sinks: SinkStats,
    /// The network.
    pub network: NetworkReport,
    /// The other knobs.
    pub settings: Settings,
}

impl SimReport {
    /// The report with its only nondeterministic field (`real_time_ms`) zeroed, for comparisons.
    pub fn deterministic(&self) -> SimReport {
        SimReport { real_time_ms: 0.0, ..self.clone() }
    }
}

/// Adds `b` into `a`, field by field.
pub fn add_receiver_stats(a: &mut ReceiverStats, b: &ReceiverStats) {
    a.rx_packets += b.rx_packets;
    a.loss_events += b.loss_events;
    a.data_packets += b.data_packets;
    a.repair_packets += b.repair_packets;
    a.recovered_packets += b.recovered_packets;
    a.duplicates += b.duplicates;
    a.pages_stored += b.pages_stored;
    a.tx_packets += b.tx_packets;
    a.requests += b.requests;
    a.pages_requested += b.pages_requested;
    a.naks += b.naks;
    a.insisted_requests += b.insisted_requests;
    a.statuses += b.statuses;
    a.rx_malformed += b.rx_malformed;
    a.rx_unauthenticated += b.rx_unauthenticated;
    a.rx_stale += b.rx_stale;
    a.rx_mismatched += b.rx_mismatched;
}

/// Adds `b` into `a`, field by field.
pub fn add_pipe_stats(a: &mut PipeStats, b: &PipeStats) {
    a.packets += b.packets;
    a.wire_bytes += b.wire_bytes;
    a.dropped += b.dropped;
    a.max_backlog = a.max_backlog.max(b.max_backlog);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_percentiles() {
        let mut s: Vec<u64> = (1..=100).collect();
        let p = Percentiles::exact(&mut s, 1.0);
        assert_eq!((p.p50, p.p90, p.p99, p.max, p.count), (50.0, 90.0, 99.0, 100.0, 100));
        assert!((p.mean - 50.5).abs() < 1e-9);
        assert_eq!(Percentiles::exact(&mut [], 1.0), Percentiles::default());
        assert_eq!(Percentiles::exact(&mut [7], 2.0).p99, 14.0);
    }

    #[test]
    fn histogram_percentiles() {
        let mut h = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
        for v in 1..=1000u64 {
            h.record(v * 1000).expect("record");
        }
        let p = Percentiles::from_histogram(&h, 1e-3);
        assert!((p.p50 - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() < 2.0, "{p:?}");
    }
}
