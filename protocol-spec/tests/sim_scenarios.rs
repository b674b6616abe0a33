//! Scenarios beyond the acceptance matrix: late joiners, congestion, jumbo frames, encryption,
//! duplication and reordering. Each must still deliver every touched page bit-exact.

use std::time::Duration;

use spindrift_protocol::sim::{run, Push, SimConfig, SimReport};

fn base(seed: u64) -> SimConfig {
    SimConfig { receivers: 16, pages: 4096, working_set: 0.1, seed, ..SimConfig::default() }
}

fn check(name: &str, c: &SimConfig) -> SimReport {
    let r = run(c).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        r.all_bit_exact,
        "{name} (seed {}): completed={} stopped_by={:?} mismatched={} missing={} unfinished={:?}",
        c.seed, r.completed, r.stopped_by, r.mismatched_pages, r.missing_pages, r.unfinished
    );
    r
}

#[test]
fn staggered_receivers_join_late_and_still_get_everything() {
    for seed in 1..=2 {
        let c = SimConfig { stagger: Duration::from_millis(5), loss: 0.02, ..base(seed) };
        check("stagger 5 ms, loss 0.02", &c);
    }
}

#[test]
fn unpaced_push_overflows_the_egress_queue_without_flow_control_and_recovers() {
    let c = SimConfig { push: Push::HintsThenAll, pacing: 0.0, loss: 0.01, flow_control: false, ..base(1) };
    let r = check("push all, unpaced, no flow control", &c);
    assert!(r.network.server_egress.dropped > 0, "an unpaced push of the whole image should congest the egress");
    // The window bounds what is in flight, so the same push fits the queue.
    let r = check("push all, unpaced", &SimConfig { flow_control: true, ..c });
    assert_eq!(r.network.server_egress.dropped, 0, "the push window let the egress queue overflow");
}

#[test]
fn jumbo_frames_and_encryption() {
    check("mtu 9000, loss 0.05", &SimConfig { max_datagram: 8972, loss: 0.05, ..base(1) });
    check("encrypt, loss 0.05", &SimConfig { encrypt: true, loss: 0.05, ..base(2) });
    check("raw pages, loss 0.05", &SimConfig { zstd_level: None, loss: 0.05, ..base(3) });
}

#[test]
fn duplication_and_reordering_without_loss() {
    let c = SimConfig { duplicate: 0.1, reorder: 0.1, ..base(1) };
    let r = check("duplicate 0.1, reorder 0.1", &c);
    assert!(r.network.downlink_faults.duplicated > 0 && r.network.downlink_faults.reordered > 0);
}

#[test]
fn reordering_with_loss() {
    // Reordered packets that overtake lost ones: every receiver must still NAK or request what it
    // misses. (`bench sim --receivers 1 --pages 4096 --loss 0.01 --reorder 0.05 --seed 4` reproduces
    // a stall found here.)
    let mut failures = Vec::new();
    for seed in 1..=6 {
        for receivers in [1, 16] {
            let c =
                SimConfig { receivers, loss: 0.01, reorder: 0.05, time_limit: Duration::from_secs(5), ..base(seed) };
            let r = run(&c).expect("valid config");
            if !r.all_bit_exact {
                failures.push(format!(
                    "bench sim --receivers {receivers} --pages 4096 --loss 0.01 --reorder 0.05 --seed {seed}: \
                     stopped_by={:?} unfinished={:?}",
                    r.stopped_by, r.unfinished
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} runs stalled:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn slow_links() {
    let c = SimConfig { server_rate_bps: 1_000_000_000, host_rate_bps: 1_000_000_000, loss: 0.01, ..base(1) };
    check("1 Gbit/s, loss 0.01", &c);
}
