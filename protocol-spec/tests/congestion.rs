//! Congestion control (PROTOCOL.md section 11.1) in the simulator, where links have delay and
//! bounded queues: one of four hosts sits behind a 100 Mbit/s link with a 50 ms router queue (as a
//! netlab `tbf` port), which its window cannot be sized to, while the server's own link is
//! 1 Gbit/s. Uncontrolled, the push overruns that queue and repairs what it dropped; with
//! congestion control on, the server finds the slow path's rate, at round trips of 1, 10 and 40 ms.

use std::time::Duration;

mod common;

use spindrift_protocol::sim::{ContentMix, Push, SimConfig, SimReport, Workload};

/// Pages pushed: 32 MiB of random pages, about 2.8 s at 100 Mbit/s.
const PAGES: u32 = 8192;
const SLOW_BPS: u64 = 100_000_000;

fn scenario(one_way: Duration, congestion_control: bool, loss: f64) -> SimConfig {
    SimConfig {
        receivers: 4,
        pages: PAGES,
        working_set: 1.0,
        push: Push::HintsThenAll,
        workload: Workload::Passive,
        zstd_level: None,
        // Random pages only: bytes on the wire compare with the image.
        content: ContentMix { zero: 0.0, text: 0.0 },
        server_rate_bps: 1_000_000_000,
        host_rate_bps: 1_000_000_000,
        pacing: 0.0,
        slow_receivers: 1,
        slow_rate_bps: SLOW_BPS,
        slow_queue_bytes: 610 << 10,
        slow_in_network: true,
        congestion_control,
        delay: one_way,
        loss,
        seed: 7,
        time_limit: Duration::from_secs(60),
        ..SimConfig::default()
    }
}

fn check(name: &str, c: &SimConfig) -> SimReport {
    common::run_exact(name, c)
}

/// Of what reached the slow path's queue, the fraction it dropped.
fn drop_fraction(r: &SimReport) -> f64 {
    let s = &r.network.slow_sockets;
    s.dropped as f64 / (s.packets + s.dropped).max(1) as f64
}

/// The image over the run's time, as a fraction of the slow path's rate.
fn goodput(r: &SimReport) -> f64 {
    f64::from(PAGES) * 4096.0 * 8.0 / (r.virtual_time_ms / 1e3) / SLOW_BPS as f64
}

#[test]
fn the_server_finds_the_slow_paths_rate_without_overrunning_its_queue() {
    for one_way in [Duration::from_micros(500), Duration::from_millis(5), Duration::from_millis(20)] {
        let name = format!("{} ms round trip", one_way.as_secs_f64() * 2e3);
        let off = check(&format!("{name}, uncontrolled"), &scenario(one_way, false, 0.0));
        let on = check(&format!("{name}, congestion control"), &scenario(one_way, true, 0.0));
        eprintln!(
            "{name}: uncontrolled {:.1}% dropped, {:.2}x the image, {:.0}% of the path; \
             controlled {:.2}% dropped, {:.2}x the image, {:.0}% of the path, {} Clocks, rate {:.1} MB/s",
            drop_fraction(&off) * 100.0,
            off.tx_per_image,
            goodput(&off) * 100.0,
            drop_fraction(&on) * 100.0,
            on.tx_per_image,
            goodput(&on) * 100.0,
            on.sender.clocks,
            on.sender.congestion_rate as f64 / 1e6,
        );
        assert!(drop_fraction(&off) > 0.3, "{name}: the uncontrolled push should overrun the queue");
        assert!(
            drop_fraction(&on) < 0.03,
            "{name}: {:.2}% dropped with congestion control",
            drop_fraction(&on) * 100.0
        );
        assert!(on.tx_per_image < 1.15, "{name}: {:.3}x the image with congestion control", on.tx_per_image);
        assert!(on.tx_per_image < off.tx_per_image, "{name}: congestion control sent more than no control");
        assert!(goodput(&on) > 0.5, "{name}: {:.0}% of the slow path", goodput(&on) * 100.0);
        assert!(on.sender.clocks > 0 && on.sender.congestion_updates > 0);
        // The rate it settled at is within a factor of two of the path's (bytes on the wire).
        let rate_bps = on.sender.congestion_rate as f64 * 8.0;
        assert!(
            (0.3..2.0).contains(&(rate_bps / SLOW_BPS as f64)),
            "{name}: settled at {:.1} Mbit/s on a 100 Mbit/s path",
            rate_bps / 1e6
        );
    }
}

#[test]
fn random_loss_keeps_the_rate_of_the_tcp_equation() {
    // 1% loss on every link at a 1 ms round trip: CUBIC alone would halve the rate every few
    // round trips; the equation's floor (about 16 MB/s here) keeps it near the slow path's rate.
    let r = check("1% loss", &scenario(Duration::from_micros(500), true, 0.01));
    eprintln!(
        "1% loss: {:.0}% of the slow path, {:.2}x the image, least rate {:.1} MB/s",
        goodput(&r) * 100.0,
        r.tx_per_image,
        r.sender.congestion_min_rate as f64 / 1e6
    );
    assert!(goodput(&r) > 0.4, "{:.0}% of the slow path at 1% loss", goodput(&r) * 100.0);
}

#[test]
fn a_configured_rate_caps_congestion_control() {
    let mut c = scenario(Duration::from_micros(500), true, 0.0);
    c.slow_receivers = 0;
    c.pacing = 0.05; // 50 Mbit/s of the server's 1 Gbit/s
    let r = check("capped", &c);
    let sent_bps = r.server_tx_bytes as f64 * 8.0 / (r.virtual_time_ms / 1e3);
    assert!(sent_bps < 55e6, "sent at {:.1} Mbit/s under a 50 Mbit/s cap", sent_bps / 1e6);
    assert!(r.sender.congestion_rate <= 50_000_000 / 8);
}
