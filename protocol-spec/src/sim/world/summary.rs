//! Turning the world's final state into a [`SimReport`].

use std::time::Duration;

use super::{ms, us, World};
use crate::receiver::ReceiverStats;
use crate::sim::content::PAGE_SIZE;
use crate::sim::link::{FaultStats, PipeStats};
use crate::sim::report::{self, EventCounts, NetworkReport, Percentiles, Settings, SimReport, Stuck};
use crate::sim::sink::SinkStats;
use crate::sim::Workload;

impl World {
    pub(super) fn report(&self, real: Duration) -> SimReport {
        let cfg = &self.cfg;
        let sender = self.sender.stats().clone();
        let mut receiver = ReceiverStats::default();
        let mut sinks = SinkStats::default();
        let mut down = FaultStats::default();
        let mut up = FaultStats::default();
        let mut uplink_queues = PipeStats::default();
        let mut sockets = PipeStats::default();
        let mut completion = Vec::new();
        let mut missing = 0u64;
        let mut stuck = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.done.is_none() && stuck.len() < 16 {
                stuck.push(Stuck {
                    node: i as u32 + 1,
                    touched: node.next as u32,
                    of: node.order.len() as u32,
                    blocked_on: node.blocked.map(|(p, _)| p),
                    blocked_since_ms: node.blocked.map(|(_, t)| ms(t)),
                });
            }
            if let Some(r) = node.receiver_stats(self.session) {
                report::add_receiver_stats(&mut receiver, &r);
            }
            if let Some(sink) = node.sink(self.session) {
                sinks.add(sink.stats());
            }
            down.add(node.downlink.stats());
            up.add(node.uplink.stats());
            report::add_pipe_stats(&mut uplink_queues, node.uplink_pipe.stats());
            if let Some(socket) = &node.socket {
                report::add_pipe_stats(&mut sockets, socket.stats());
            }
            if let Some(t) = node.done {
                completion.push(t.as_nanos());
            }
            if cfg.workload != Workload::Passive {
                missing += node.order[..node.next].iter().filter(|&&p| !node.has(self.session, p)).count() as u64;
            }
        }
        let completed = self.finished == cfg.receivers - cfg.silent_receivers && self.stop.is_none();
        let all_bit_exact = completed && sinks.mismatches == 0 && self.phantom_hits == 0 && missing == 0;
        let end = if completed { self.last_finish } else { self.now };
        SimReport {
            receivers: cfg.receivers,
            pages: cfg.pages,
            working_set: cfg.working_set,
            working_set_pages: self.ws.len() as u32,
            loss: cfg.loss,
            burst: cfg.burst,
            seed: cfg.seed,
            completed,
            stopped_by: self.stop.clone(),
            all_bit_exact,
            pages_delivered: sinks.pages_stored,
            unique_pages_delivered: sinks.unique_pages,
            mismatched_pages: sinks.mismatches,
            phantom_hits: self.phantom_hits,
            missing_pages: missing,
            unfinished: stuck,
            server_tx_bytes: sender.tx_bytes,
            tx_per_image: sender.tx_bytes as f64 / (f64::from(cfg.pages) * PAGE_SIZE as f64),
            server_tx_packets: sender.tx_packets,
            server_rx_packets: sender.rx_packets,
            naks_sent: receiver.naks,
            repairs_sent: sender.repair_packets,
            proactive_repairs: sender.proactive_repairs,
            requests_sent: receiver.requests,
            data_packets: sender.data_packets,
            pages_deduplicated: sender.pages_deduplicated,
            corrupted_dropped: receiver.rx_unauthenticated + receiver.rx_malformed,
            misses: self.misses,
            stale_misses: self.stale_misses,
            fault_wait_us: Percentiles::from_histogram(&self.waits, 1e-3),
            completion_ms: Percentiles::exact(&mut completion, 1e-6),
            receivers_finished: self.finished,
            virtual_time_ms: ms(end),
            real_time_ms: real.as_secs_f64() * 1e3,
            events: self.events,
            event_counts: EventCounts {
                multicast: self.kind_counts[0],
                late_copies: self.kind_counts[1],
                at_ingress: self.kind_counts[2],
                to_server: self.kind_counts[3],
                sender_timers: self.kind_counts[4],
                receiver_timers: self.kind_counts[5],
                stale_timers: self.stale_timers,
                steps: self.kind_counts[6],
                starts: self.kind_counts[7],
            },
            server_lost_events: self.server_lost,
            receiver_lost_events: self.receiver_lost,
            sender,
            receiver,
            sinks,
            network: NetworkReport {
                server_egress: *self.egress.stats(),
                downlink_queue: *self.downlink.stats(),
                server_ingress: *self.ingress.stats(),
                uplink_queues,
                slow_sockets: sockets,
                downlink_faults: down,
                uplink_faults: up,
            },
            settings: Settings {
                burst_length: cfg.burst_length,
                duplicate: cfg.duplicate,
                reorder: cfg.reorder,
                reorder_jitter_us: us(cfg.reorder_jitter),
                corrupt: cfg.corrupt,
                delay_us: us(cfg.delay),
                server_rate_bps: cfg.server_rate_bps,
                host_rate_bps: cfg.host_rate_bps,
                pacing: cfg.pacing,
                slow_receivers: cfg.slow_receivers,
                slow_rate_bps: cfg.slow_rate_bps,
                slow_queue_bytes: cfg.slow_queue_bytes,
                slow_in_network: cfg.slow_in_network,
                congestion_control: cfg.congestion_control,
                flow_control: cfg.flow_control,
                window: cfg.window,
                workload: cfg.workload,
                silent_receivers: cfg.silent_receivers,
                silent_after_ms: cfg.silent_after.as_secs_f64() * 1e3,
                max_datagram: cfg.max_datagram,
                read_ahead: cfg.read_ahead,
                encrypt: cfg.encrypt,
                zstd_level: cfg.zstd_level,
                push: cfg.push,
                think_time_us: us(cfg.think_time),
                stagger_us: us(cfg.stagger),
                time_limit_ms: cfg.time_limit.as_secs_f64() * 1e3,
            },
        }
    }
}
