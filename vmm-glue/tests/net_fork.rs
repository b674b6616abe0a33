//! The whole system in a netlab lab: a parent VM forks clones onto hosts whose daemons start clone VMMs,
//! memory comes from the parent's fork-time image by multicast, and reports travel back to the parent's
//! `JOIN`. Runs `spindrift-vmm demo` (the README's main job) and checks its JSON report.
//!
//! Needs root (namespaces), /dev/kvm and userfaultfd: skips with a message otherwise, or fails with
//! `NETLAB_REQUIRE=1`. Needs the `spindrift-client` binary beside `spindrift-vmm` (a workspace build:
//! `cargo test --workspace` or `cargo build --bins`).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

/// KVM and userfaultfd, and a netlab lab with loss (root, nftables).
fn can_run_lab(test: &str) -> bool {
    common::can_run(test) && netlab::require::lossy_lab(test)
}

/// Runs the demo with `args` (bounded) and returns its JSON report.
fn demo(args: &[&str]) -> Value {
    let vmm = env!("CARGO_BIN_EXE_spindrift-vmm");
    let client = std::path::Path::new(vmm).with_file_name("spindrift-client");
    assert!(
        client.is_file(),
        "{} is missing: build every binary first (cargo build --bins, or run the workspace's tests)",
        client.display()
    );
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let out = common::bounded(Duration::from_secs(240), "spindrift-vmm demo", move || {
        Command::new(vmm).arg("demo").args(&args).args(["--json", "--timeout-s", "200"]).output().unwrap()
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("demo printed no JSON ({e}); status {}; stderr:\n{}", out.status, String::from_utf8_lossy(&out.stderr))
    });
    assert!(
        out.status.success(),
        "demo failed ({}): {report:#}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

#[test]
fn clones_on_three_hosts_compute_the_right_results_with_lossy_links() {
    if !can_run_lab("clones_on_three_hosts_compute_the_right_results_with_lossy_links") {
        return;
    }
    // Background completion off: it would fill the caches this test checks are lazy.
    let r = demo(&["--hosts", "3", "--clones", "6", "--mem-mib", "32", "--loss", "0.02", "--background-rate", "0"]);
    assert_eq!(r["parent_exit"], 0, "{r:#}");
    assert_eq!(r["results_ok"], 6, "{r:#}");
    let clones = r["clone_figures"].as_array().unwrap();
    let mut ids: Vec<u64> = clones.iter().map(|c| c["clone"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=6).collect::<Vec<u64>>(), "every clone id once: {r:#}");
    for c in clones {
        assert_eq!(c["status"], 0, "{c}");
        assert!(c["start_ms"].as_f64().is_some_and(|ms| ms > 0.0), "clone start time: {c}");
    }
    // The descriptor is small: well under 1 MiB per GiB of guest memory.
    let per_gib = r["descriptor_bytes"].as_f64().unwrap() / (r["memory_bytes"].as_f64().unwrap() / f64::from(1 << 30));
    assert!(per_gib < f64::from(1 << 20), "descriptor {per_gib} bytes per GiB");
    // Lazy: each clone reads a sixth of the data set (half of memory), so the hosts' caches hold well
    // under what copying memory to every host would. The server's transmissions can exceed the data
    // set: with out-of-stream answers (PROTOCOL.md 8.2), read-ahead that runs past the end of one
    // clone's share into the next clone's goes to one host and again to the other; but not by more
    // than the data set twice over.
    let sent = r["server_pages_sent"].as_u64().unwrap();
    let pages = r["memory_bytes"].as_u64().unwrap() / 4096;
    let (cached, eager) = (r["pages_fetched"].as_u64().unwrap(), r["pages_eager"].as_u64().unwrap());
    assert!(cached > 0 && cached * 2 < eager, "the hosts cached {cached} pages, copying memory everywhere is {eager}");
    assert!(sent > 0 && sent < 3 * (pages / 2), "server sent {sent} pages for a data set of {}", pages / 2);
}

#[test]
fn every_clone_starts_from_the_parents_memory_at_the_fork() {
    if !can_run_lab("every_clone_starts_from_the_parents_memory_at_the_fork") {
        return;
    }
    // The parent overwrites its data set right after the fork; each clone hashes all of its memory
    // (fetching every page over the network) before its first instruction and compares with the hash
    // the parent took at the fork.
    let r = demo(&["--hosts", "2", "--clones", "2", "--mem-mib", "16", "--loss", "0.02", "--verify-image"]);
    assert_eq!(r["results_ok"], 2, "{r:#}");
    assert_eq!(r["images_match"], 2, "{r:#}");
}

/// The same over AF_XDP: the forked memory server and both host daemons use `--io xdp`.
#[test]
fn every_clone_starts_from_the_parents_memory_at_the_fork_over_af_xdp() {
    if !can_run_lab("every_clone_starts_from_the_parents_memory_at_the_fork_over_af_xdp") {
        return;
    }
    let r =
        demo(&["--hosts", "2", "--clones", "2", "--mem-mib", "16", "--loss", "0.02", "--verify-image", "--io", "xdp"]);
    assert!(r["io"].as_str().is_some_and(|io| io.starts_with("af_xdp")), "daemons' backend: {}", r["io"]);
    assert_eq!(r["results_ok"], 2, "{r:#}");
    assert_eq!(r["images_match"], 2, "{r:#}");
}

/// Background completion (PROTOCOL.md 10.1): the memory server fills both hosts' caches while their
/// clones compute, the demo kills it (SIGKILL) once both hold every page, and the clones, which
/// still have most of their touches ahead of them, finish with the right results without it. The
/// parent's JOIN fails with its server (its exit is not 0): the clones' own result files are checked
/// against the results the parent expected.
#[test]
fn clones_outlive_their_memory_server_once_their_hosts_hold_the_whole_image() {
    if !can_run_lab("clones_outlive_their_memory_server_once_their_hosts_hold_the_whole_image") {
        return;
    }
    // 64 touches of random pages, each followed by ~50 ms of computing (40,000 loop iterations):
    // a run of about 4 s, long past the push of 16 MiB at 50 MB/s (0.4 s) and the kill after it.
    let r = demo(&[
        "--hosts",
        "2",
        "--clones",
        "2",
        "--mem-mib",
        "16",
        "--loss",
        "0.02",
        "--guest",
        "trace",
        "--trace-pattern",
        "random",
        "--trace-pages",
        "64",
        "--trace-spin",
        "40000",
        "--background-rate",
        "50000000",
        "--kill-server-when-complete",
    ]);
    assert!(r["server_killed_ms"].as_f64().is_some(), "the server was not killed: {r:#}");
    assert_ne!(r["parent_exit"], 0, "the parent's JOIN should have lost its server: {r:#}");
    assert_eq!(r["clone_results_ok"], 2, "{r:#}");
    assert_eq!(r["clones_done_after_kill"], 2, "a clone finished before the kill, which then proved nothing: {r:#}");
    assert_eq!(r["pages_fetched"], 2 * 16 * 256, "both hosts hold every page: {r:#}");
}
