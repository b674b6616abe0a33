//! `bench sim`: one simulated scenario.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use spindrift_protocol::sim::{self, Push, SimConfig, SimReport, Workload};

use crate::args;

/// Background push policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PushArg {
    /// Pages travel only when asked for.
    None,
    /// Push the working set as a hint.
    Hints,
    /// Push the working set, then the whole image.
    All,
}

/// What each receiver's vCPU does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    /// Touch the working set in a shuffled order, one fault at a time.
    Shuffled,
    /// Touch the working set in page order (like `spindrift-client fetch`).
    Sequential,
    /// Touch nothing: wait for the push to bring the working set (needs --push).
    Passive,
}

/// One simulated scenario: one server, N receivers, seeded faulty links.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Number of receivers (host daemons), 1..=4096.
    #[arg(long, default_value = "16", value_parser = args::receivers)]
    pub receivers: u32,
    /// Pages (4 KiB) in the image, 1..=2^24.
    #[arg(long, default_value = "65536", value_parser = args::pages)]
    pub pages: u32,
    /// Fraction of the image each receiver touches, in (0, 1].
    #[arg(long, default_value = "0.1", value_parser = args::fraction)]
    pub working_set: f64,
    /// Loss rate of every link (both directions), in [0, 1).
    #[arg(long, default_value = "0", value_parser = args::probability)]
    pub loss: f64,
    /// Bursty (Gilbert-Elliott) loss with the same average rate.
    #[arg(long)]
    pub burst: bool,
    /// Mean loss burst length, packets (with --burst).
    #[arg(long, default_value = "4", value_parser = args::positive)]
    pub burst_length: f64,
    /// Duplication probability per link, in [0, 1).
    #[arg(long, default_value = "0", value_parser = args::probability)]
    pub duplicate: f64,
    /// Reordering probability per link (extra random delay), in [0, 1).
    #[arg(long, default_value = "0", value_parser = args::probability)]
    pub reorder: f64,
    /// Largest extra delay of a reordered packet, µs.
    #[arg(long, default_value = "100", value_parser = args::non_negative)]
    pub reorder_jitter_us: f64,
    /// Corruption probability per link (1-3 bits or bytes changed), in [0, 1).
    #[arg(long, default_value = "0", value_parser = args::probability)]
    pub corrupt: f64,
    /// One-way delay of every link, µs.
    #[arg(long, default_value = "50", value_parser = args::non_negative)]
    pub delay_us: f64,
    /// The server's line rate, Gbit/s.
    #[arg(long, default_value = "10", value_parser = args::positive)]
    pub rate: f64,
    /// Each host's line rate, Gbit/s (default: the server's).
    #[arg(long, value_parser = args::positive)]
    pub host_rate: Option<f64>,
    /// Sender pacing as a fraction of the server's rate, in [0, 1] (0: unpaced).
    #[arg(long, default_value = "0.9", value_parser = args::unit)]
    pub pacing: f64,
    /// Receivers whose daemon takes datagrams off its socket slowly (the first N).
    #[arg(long, default_value = "0")]
    pub slow_receivers: u32,
    /// The rate a slow receiver takes datagrams at, Gbit/s.
    #[arg(long, default_value = "1", value_parser = args::positive)]
    pub slow_rate: f64,
    /// A slow receiver's socket buffer, KiB (a datagram arriving when it is full is dropped).
    #[arg(long, default_value = "256", value_parser = args::positive)]
    pub slow_queue_kib: f64,
    /// The slow receivers' bottleneck is a router queue in the network (their window is not
    /// sized to it), not their socket.
    #[arg(long)]
    pub slow_in_network: bool,
    /// Congestion control: the server finds its rate (--pacing, when not 0, caps it).
    #[arg(long)]
    pub congestion_control: bool,
    /// Turn push flow control off (to measure what it saves).
    #[arg(long)]
    pub no_flow_control: bool,
    /// The receivers' window, stream positions (default: the receiver's own).
    #[arg(long)]
    pub window: Option<u32>,
    /// What each receiver's vCPU does.
    #[arg(long, value_enum, default_value = "shuffled")]
    pub workload: WorkloadArg,
    /// The last N receivers fall silent (everything they send is lost) after --silent-after-ms.
    #[arg(long, default_value = "0")]
    pub silent_receivers: u32,
    /// When the silent receivers fall silent, ms into the run.
    #[arg(long, default_value = "0", value_parser = args::non_negative)]
    pub silent_after_ms: f64,
    /// Queue size of every link, KiB.
    #[arg(long, default_value = "4096", value_parser = args::positive)]
    pub queue_kib: f64,
    /// Link MTU (1500 or 9000): sets the largest datagram to MTU - 28.
    #[arg(long, value_parser = args::mtu, conflicts_with = "max_datagram")]
    pub mtu: Option<usize>,
    /// Largest datagram (UDP payload), 1232..=8972.
    #[arg(long, value_parser = args::datagram)]
    pub max_datagram: Option<usize>,
    /// Receivers' read-ahead, pages (default: the receiver's own).
    #[arg(long)]
    pub read_ahead: Option<u16>,
    /// Encrypt payloads (ChaCha20-Poly1305) instead of only authenticating them.
    #[arg(long)]
    pub encrypt: bool,
    /// zstd level for pages; 0 sends pages raw.
    #[arg(long, default_value = "1", allow_negative_numbers = true)]
    pub zstd_level: i32,
    /// What the server pushes unasked.
    #[arg(long, value_enum, default_value = "none")]
    pub push: PushArg,
    /// Think time between touches of present pages, µs.
    #[arg(long, default_value = "1", value_parser = args::non_negative)]
    pub think_us: f64,
    /// Receivers start at random times within this many µs (0: all at once).
    #[arg(long, default_value = "0", value_parser = args::non_negative)]
    pub stagger_us: f64,
    /// Virtual time limit, seconds.
    #[arg(long, default_value = "60", value_parser = args::positive)]
    pub time_limit_s: f64,
    /// Real time limit, seconds (a livelock cannot hang the run).
    #[arg(long, default_value = "600", value_parser = args::positive)]
    pub real_time_limit_s: f64,
    /// The seed.
    #[arg(long, default_value = "1")]
    pub seed: u64,
    /// Print exactly one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn micros(us: f64) -> Duration {
    Duration::from_nanos((us * 1e3).round() as u64)
}

impl SimArgs {
    /// The simulator configuration these flags describe.
    pub fn config(&self) -> SimConfig {
        let defaults = SimConfig::default();
        let max_datagram = match (self.mtu, self.max_datagram) {
            (Some(mtu), _) => mtu - 28,
            (None, Some(d)) => d,
            (None, None) => defaults.max_datagram,
        };
        let gbps = |g: f64| (g * 1e9).round() as u64;
        SimConfig {
            receivers: self.receivers,
            pages: self.pages,
            working_set: self.working_set,
            loss: self.loss,
            burst: self.burst,
            burst_length: self.burst_length,
            duplicate: self.duplicate,
            reorder: self.reorder,
            reorder_jitter: micros(self.reorder_jitter_us),
            corrupt: self.corrupt,
            delay: micros(self.delay_us),
            server_rate_bps: gbps(self.rate),
            host_rate_bps: gbps(self.host_rate.unwrap_or(self.rate)),
            queue_bytes: (self.queue_kib * 1024.0) as u64,
            pacing: self.pacing,
            seed: self.seed,
            max_datagram,
            read_ahead: self.read_ahead,
            encrypt: self.encrypt,
            zstd_level: (self.zstd_level != 0).then_some(self.zstd_level),
            push: match self.push {
                PushArg::None => Push::None,
                PushArg::Hints => Push::Hints,
                PushArg::All => Push::HintsThenAll,
            },
            slow_receivers: self.slow_receivers,
            slow_rate_bps: gbps(self.slow_rate),
            slow_queue_bytes: (self.slow_queue_kib * 1024.0) as u64,
            slow_in_network: self.slow_in_network,
            congestion_control: self.congestion_control,
            flow_control: !self.no_flow_control,
            window: self.window,
            workload: match self.workload {
                WorkloadArg::Shuffled => Workload::Shuffled,
                WorkloadArg::Sequential => Workload::Sequential,
                WorkloadArg::Passive => Workload::Passive,
            },
            silent_receivers: self.silent_receivers,
            silent_after: micros(self.silent_after_ms * 1e3),
            think_time: micros(self.think_us),
            stagger: micros(self.stagger_us),
            time_limit: Duration::from_secs_f64(self.time_limit_s),
            real_time_limit: Some(Duration::from_secs_f64(self.real_time_limit_s)),
            ..defaults
        }
    }
}

/// Runs `bench sim`.
pub fn run(args: &SimArgs) -> anyhow::Result<ExitCode> {
    let config = args.config();
    let report = sim::run(&config).context("simulation could not start")?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", summary(&report));
    }
    Ok(if report.all_bit_exact { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

/// A readable summary of one report.
pub fn summary(r: &SimReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let loss = if r.burst {
        format!("{} bursty (mean burst {})", pct(r.loss), r.settings.burst_length)
    } else {
        format!("{} independent", pct(r.loss))
    };
    let _ = writeln!(
        s,
        "spindrift simulation: {} receivers, {} pages ({} in working set, {}), loss {loss}, seed {}",
        r.receivers,
        r.pages,
        r.working_set_pages,
        pct(r.working_set),
        r.seed
    );
    let status = match &r.stopped_by {
        None if r.completed => "completed".to_string(),
        None => "incomplete".to_string(),
        Some(why) => format!("STOPPED: {why}"),
    };
    let rows: Vec<(&str, String)> = vec![
        ("result", format!("{status}; all bit-exact: {}", if r.all_bit_exact { "yes" } else { "NO" })),
        (
            "unfinished",
            r.unfinished
                .iter()
                .map(|u| match (u.blocked_on, u.blocked_since_ms) {
                    (Some(p), Some(t)) => {
                        format!("node {} ({}/{}) blocked on page {p} since {t:.3} ms", u.node, u.touched, u.of)
                    }
                    _ => format!("node {} ({}/{})", u.node, u.touched, u.of),
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        ("virtual time", format!("{:.3} ms (real {:.0} ms, {} events)", r.virtual_time_ms, r.real_time_ms, r.events)),
        (
            "events",
            format!(
                "{} multicast, {} late copies, {} to server, {} sender timers, {} receiver timers ({} stale), {} steps",
                r.event_counts.multicast,
                r.event_counts.late_copies,
                r.event_counts.to_server,
                r.event_counts.sender_timers,
                r.event_counts.receiver_timers,
                r.event_counts.stale_timers,
                r.event_counts.steps
            ),
        ),
        (
            "completion",
            format!(
                "{} of {} receivers; p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                r.receivers_finished, r.receivers, r.completion_ms.p50, r.completion_ms.p99, r.completion_ms.max
            ),
        ),
        (
            "fault wait",
            format!(
                "{} misses; p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
                r.misses, r.fault_wait_us.p50, r.fault_wait_us.p99, r.fault_wait_us.max
            ),
        ),
        (
            "server tx",
            format!(
                "{} packets, {} bytes ({:.3} x image): data {}, repair {} ({} proactive), control {}",
                r.server_tx_packets,
                r.server_tx_bytes,
                r.tx_per_image,
                r.data_packets,
                r.repairs_sent,
                r.proactive_repairs,
                r.sender.control_packets
            ),
        ),
        (
            "server rx",
            format!(
                "{} packets ({:.3} per tx): requests {}, NAKs {}, statuses {}",
                r.server_rx_packets,
                r.server_rx_packets as f64 / r.server_tx_packets.max(1) as f64,
                r.sender.requests,
                r.sender.naks,
                r.sender.statuses
            ),
        ),
        (
            "pages sent",
            format!(
                "{} ({} zero, {} compressed, {} pushed); {} requested, {} deduplicated; push held by the window {} times",
                r.sender.pages_sent,
                r.sender.zero_pages_sent,
                r.sender.compressed_pages_sent,
                r.sender.pages_pushed,
                r.sender.pages_requested,
                r.pages_deduplicated,
                r.sender.push_window_stalls
            ),
        ),
        (
            "receivers",
            format!(
                "sent {} requests, {} NAKs; recovered {} packets from parity; {} duplicates",
                r.requests_sent, r.naks_sent, r.receiver.recovered_packets, r.receiver.duplicates
            ),
        ),
        (
            "delivered",
            format!(
                "{} pages stored ({} distinct); mismatches {}, phantom hits {}, missing {}",
                r.pages_delivered, r.unique_pages_delivered, r.mismatched_pages, r.phantom_hits, r.missing_pages
            ),
        ),
        (
            "dropped",
            format!(
                "receivers: {} corrupt/malformed, {} stale; server: {} unauthenticated, {} malformed",
                r.corrupted_dropped, r.receiver.rx_stale, r.sender.rx_unauthenticated, r.sender.rx_malformed
            ),
        ),
        (
            "network",
            format!(
                "downlinks lost {} / corrupted {} / duplicated {} / reordered {}; uplinks lost {}; queue drops {}; \
                 slow-socket overruns {}",
                r.network.downlink_faults.lost,
                r.network.downlink_faults.corrupted,
                r.network.downlink_faults.duplicated,
                r.network.downlink_faults.reordered,
                r.network.uplink_faults.lost,
                r.network.server_egress.dropped
                    + r.network.downlink_queue.dropped
                    + r.network.server_ingress.dropped
                    + r.network.uplink_queues.dropped,
                r.network.slow_sockets.dropped
            ),
        ),
    ];
    for (k, v) in rows {
        if v.is_empty() {
            continue;
        }
        let _ = writeln!(s, "  {k:<13} {v}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn defaults_match_the_simulator() {
        let t = T::try_parse_from(["t"]).expect("defaults parse");
        let c = t.sim.config();
        let d = SimConfig::default();
        assert_eq!(c.receivers, 16);
        assert_eq!(c.pages, 65536);
        assert_eq!(c.working_set, 0.1);
        assert_eq!(c.seed, 1);
        assert_eq!(c.max_datagram, d.max_datagram);
        assert_eq!(c.delay, d.delay);
        assert_eq!(c.server_rate_bps, d.server_rate_bps);
        assert_eq!(c.zstd_level, d.zstd_level);
        assert_eq!(c.think_time, d.think_time);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn flags_map_to_config() {
        let t = T::try_parse_from([
            "t",
            "--receivers",
            "3",
            "--mtu",
            "9000",
            "--loss",
            "0.05",
            "--burst",
            "--corrupt",
            "0.01",
            "--encrypt",
            "--zstd-level",
            "0",
            "--push",
            "all",
            "--delay-us",
            "20",
            "--rate",
            "1",
        ])
        .expect("parse");
        let c = t.sim.config();
        assert_eq!(c.receivers, 3);
        assert_eq!(c.max_datagram, 8972);
        assert!(c.burst && c.encrypt);
        assert_eq!(c.zstd_level, None);
        assert_eq!(c.push, Push::HintsThenAll);
        assert_eq!(c.delay, Duration::from_micros(20));
        assert_eq!(c.server_rate_bps, 1_000_000_000);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_flags_are_rejected() {
        for bad in [
            vec!["t", "--loss", "1.5"],
            vec!["t", "--working-set", "0"],
            vec!["t", "--receivers", "0"],
            vec!["t", "--pages", "0"],
            vec!["t", "--mtu", "1400"],
            vec!["t", "--mtu", "1500", "--max-datagram", "1400"],
        ] {
            assert!(T::try_parse_from(&bad).is_err(), "{bad:?} accepted");
        }
    }
}
