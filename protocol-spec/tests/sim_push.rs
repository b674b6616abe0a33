//! The background push and its flow control (PROTOCOL.md sections 10 and 11), in the simulator:
//! receivers that ask for nothing and wait for the push (like udpcast receivers) or fetch in page
//! order, with loss, many receivers, slow receivers behind small sockets, and a receiver that falls
//! silent. `bench push` runs larger versions side by side with flow control off.

use std::time::Duration;

mod common;

use spindrift_protocol::sim::{run, Push, SimConfig, SimReport, Workload};

/// A whole-image push of raw pages (so bytes compare with the image's size) to passive receivers.
fn push(receivers: u32, pages: u32, loss: f64) -> SimConfig {
    SimConfig {
        receivers,
        pages,
        working_set: 1.0,
        loss,
        push: Push::HintsThenAll,
        workload: Workload::Passive,
        zstd_level: None,
        seed: 3,
        time_limit: Duration::from_secs(10),
        ..SimConfig::default()
    }
}

fn check(name: &str, c: &SimConfig) -> SimReport {
    common::run_exact(name, c)
}

/// Bytes sent relative to the same run without loss (one clean transmission).
fn overhead(name: &str, c: &SimConfig) -> (f64, SimReport) {
    let clean = check(&format!("{name}, no loss"), &SimConfig { loss: 0.0, ..c.clone() });
    let lossy = check(name, c);
    (lossy.server_tx_bytes as f64 / clean.server_tx_bytes as f64, lossy)
}

#[test]
fn pushed_bytes_stay_near_one_clean_transmission_at_five_percent_loss() {
    for receivers in [4, 16] {
        let name = format!("{receivers} receivers, 5% loss");
        let (ratio, r) = overhead(&name, &push(receivers, 1024, 0.05));
        eprintln!("{name}: {ratio:.3} x clean, {:.3} x image, {} repairs", r.tx_per_image, r.repairs_sent);
        assert!(ratio < 1.15, "{name}: the push sent {ratio:.3} x what a clean transmission costs");
        assert!(r.tx_per_image < 1.25, "{name}: {:.3} x the image", r.tx_per_image);
    }
}

#[test]
fn the_window_keeps_the_push_within_slow_receivers_sockets() {
    // One of four hosts takes datagrams at 1 Gbit/s into a 256 KiB socket while the server pushes
    // at 9 Gbit/s: without flow control the socket overruns, its losses are repaired at full rate
    // and overrun it again.
    let c = SimConfig { slow_receivers: 1, ..push(4, 1024, 0.05) };
    let (ratio, on) = overhead("flow control on", &c);
    assert_eq!(on.network.slow_sockets.dropped, 0, "the slow receiver's socket overran under flow control");
    assert!(on.sender.push_window_stalls > 0, "the window never held the push back");
    assert!(ratio < 1.2, "flow control on: {ratio:.3} x clean");
    // Without it, a few milliseconds already cost more than the whole flow-controlled push.
    let off = run(&SimConfig { flow_control: false, time_limit: Duration::from_millis(8), ..c }).expect("config");
    eprintln!(
        "slow receiver: flow control on {} bytes in all ({ratio:.3} x clean); off {} bytes in 8 ms, {} overruns",
        on.server_tx_bytes, off.server_tx_bytes, off.network.slow_sockets.dropped
    );
    assert!(off.network.slow_sockets.dropped > 1000, "no overrun without flow control: {:?}", off.network);
    assert!(
        off.server_tx_bytes > on.server_tx_bytes * 3 / 2,
        "without flow control {} bytes in 8 ms, with it {} in all",
        off.server_tx_bytes,
        on.server_tx_bytes
    );
}

#[test]
fn a_silent_receiver_stops_holding_the_push_back_after_the_flow_timeout() {
    // At 1 Gbit/s the push takes about 10 ms; one receiver falls silent after 2 ms. It stays in the
    // group (receiver timeout 5 s) but its last Status stops counting after the flow timeout (1 s).
    let c = SimConfig {
        server_rate_bps: 1_000_000_000,
        host_rate_bps: 1_000_000_000,
        silent_receivers: 1,
        silent_after: Duration::from_millis(2),
        ..push(6, 1024, 0.02)
    };
    let r = check("one silent receiver", &c);
    assert!(r.sender.push_window_stalls > 0, "the silent receiver never held the push");
    assert!(
        (1000.0..1500.0).contains(&r.virtual_time_ms),
        "the push resumed at {:.1} ms, not about 1 s after the receiver fell silent",
        r.virtual_time_ms
    );
    assert_eq!(r.receiver_lost_events, 0, "the receiver was dropped from the group, not just from the window");
}

#[test]
fn many_receivers_and_bursty_loss() {
    let r = check("64 receivers, 2% loss", &push(64, 512, 0.02));
    assert!(r.tx_per_image < 1.3, "64 receivers: {:.3} x image", r.tx_per_image);
    check("8 receivers, bursty 5% loss", &SimConfig { burst: true, ..push(8, 1024, 0.05) });
}

#[test]
fn fetching_in_page_order_during_the_push_is_bit_exact() {
    // Like `spindrift-client fetch`: every receiver faults on pages in order while the push runs.
    let c = SimConfig { workload: Workload::Sequential, ..push(16, 1024, 0.05) };
    let (ratio, r) = overhead("16 receivers fetching in order", &c);
    assert!(ratio < 1.3, "fetch during the push: {ratio:.3} x clean ({:?})", r.sender);
}
