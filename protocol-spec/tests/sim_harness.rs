//! The simulator's own behaviour: configuration checks, limits, and the infrastructure it is built
//! from (links, image, working set), through the public API.

use std::rc::Rc;
use std::time::Duration;

use spindrift_protocol::receiver::PageSink;
use spindrift_protocol::sender::PageSource;
use spindrift_protocol::sim::content::{Image, PageKind, PAGE_SIZE};
use spindrift_protocol::sim::link::{Fate, FaultConfig, Faults, Pipe};
use spindrift_protocol::sim::rng::{self, Domain};
use spindrift_protocol::sim::sink::VerifyingSink;
use spindrift_protocol::sim::workload::WorkingSet;
use spindrift_protocol::sim::{run, SimConfig, SimError};
use spindrift_protocol::Time;

#[test]
fn out_of_range_configs_are_rejected_with_the_field_named() {
    let cases: Vec<(SimConfig, &str)> = vec![
        (SimConfig { loss: 1.5, ..SimConfig::default() }, "loss"),
        (SimConfig { loss: 1.0, ..SimConfig::default() }, "loss"),
        (SimConfig { working_set: 0.0, ..SimConfig::default() }, "working_set"),
        (SimConfig { receivers: 0, ..SimConfig::default() }, "receivers"),
        (SimConfig { receivers: 5000, ..SimConfig::default() }, "receivers"),
        (SimConfig { pages: 0, ..SimConfig::default() }, "pages"),
        (SimConfig { max_datagram: 100, ..SimConfig::default() }, "max_datagram"),
        (SimConfig { corrupt: -0.1, ..SimConfig::default() }, "corrupt"),
    ];
    for (c, field) in cases {
        match run(&c) {
            Err(e @ SimError::Invalid { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(field), "message `{msg}` does not name {field}");
            }
            other => panic!("{field}: expected a config error, got {other:?}"),
        }
    }
}

#[test]
fn a_run_cut_short_by_the_time_limit_is_not_bit_exact() {
    let c = SimConfig { receivers: 2, pages: 512, time_limit: Duration::from_micros(20), ..SimConfig::default() };
    let r = run(&c).expect("valid config");
    assert!(!r.completed);
    assert!(!r.all_bit_exact);
    assert!(r.stopped_by.as_deref().is_some_and(|s| s.contains("time limit")), "{:?}", r.stopped_by);
    assert_eq!(r.unfinished.len(), 2);
    assert!(r.virtual_time_ms <= 0.020 + 1e-9);
}

#[test]
fn image_serves_as_page_source_and_sink_catches_bad_bytes() {
    let img = Rc::new(Image::generate(21, 300));
    assert_eq!(PageSource::page_count(&img), 300);
    let mut sink = VerifyingSink::new(img.clone());
    for p in 0..300 {
        match img.kind(p) {
            PageKind::Zero => sink.store_zero(p, 1),
            _ => sink.store(p, PageSource::page(&img, p)),
        }
    }
    assert_eq!(sink.stats().mismatches, 0);
    assert_eq!(sink.stats().unique_pages, 300);
    let p = (0..300).find(|&p| img.kind(p) == PageKind::Random).expect("a random page");
    let mut bad = img.page(p).to_vec();
    bad[PAGE_SIZE - 1] ^= 0x80;
    sink.store(p, &bad);
    sink.store_zero(p, 1);
    assert_eq!(sink.stats().mismatches, 2);
}

#[test]
fn working_set_is_shared_and_orders_are_private() {
    let ws = WorkingSet::generate(5, 65536, 0.1);
    assert_eq!(ws.len(), 6554);
    assert_eq!(ws, WorkingSet::generate(5, 65536, 0.1));
    let orders: Vec<Vec<u32>> = (0..4).map(|i| ws.order_for(5, i)).collect();
    for (i, a) in orders.iter().enumerate() {
        for b in &orders[i + 1..] {
            assert_ne!(a, b);
        }
    }
}

#[test]
fn each_link_draws_from_its_own_stream() {
    // Link 3's fates do not depend on how much link 2 drew.
    let cfg = FaultConfig { loss: 0.3, ..FaultConfig::default() };
    let slot = Duration::from_nanos(1200);
    let fates = |warmup: usize| {
        let mut two = Faults::new(cfg, rng::stream(9, Domain::Downlink, 2), slot);
        for _ in 0..warmup {
            two.fate(Time::ZERO, 100);
        }
        let mut three = Faults::new(cfg, rng::stream(9, Domain::Downlink, 3), slot);
        (0..64).map(|_| three.fate(Time::ZERO, 100) == Fate::Lost).collect::<Vec<_>>()
    };
    assert_eq!(fates(0), fates(1000));
}

#[test]
fn egress_pipe_models_congestion() {
    // 1 Gbit/s with room for ten 1472-byte datagrams: a burst of 50 loses 40 at the tail.
    let mut p = Pipe::new(Some(1_000_000_000), 10 * (1472 + 66));
    let sent = (0..50).filter(|_| p.send(Time::ZERO, 1472).is_some()).count();
    assert_eq!(sent, 10);
    assert_eq!(p.stats().dropped, 40);
}
