//! The `bench` binary as a user runs it.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bench")).args(args).output().expect("run the bench binary")
}

#[test]
fn sim_json_is_one_object_with_the_report_fields() {
    let out = bench(&["sim", "--receivers", "2", "--pages", "512", "--loss", "0.01", "--seed", "3", "--json"]);
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(stdout.lines().count(), 1, "stdout: {stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    for field in [
        "receivers",
        "pages",
        "working_set",
        "loss",
        "burst",
        "seed",
        "pages_delivered",
        "all_bit_exact",
        "server_tx_bytes",
        "server_tx_packets",
        "server_rx_packets",
        "naks_sent",
        "repairs_sent",
        "virtual_time_ms",
        "real_time_ms",
        "completed",
        "fault_wait_us",
        "completion_ms",
        "sender",
        "receiver",
    ] {
        assert!(v.get(field).is_some(), "missing {field} in {v}");
    }
    assert_eq!(v["receivers"], 2);
    assert_eq!(v["pages"], 512);
    assert_eq!(v["seed"], 3);
    assert_eq!(v["burst"], false);
    assert_eq!(v["all_bit_exact"], true, "{v}");
    assert!(out.status.success());
}

#[test]
fn sim_table_is_readable() {
    let out = bench(&["sim", "--receivers", "1", "--pages", "256"]);
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert!(stdout.contains("all bit-exact: yes"), "{stdout}");
    assert!(stdout.contains("server tx"), "{stdout}");
}

/// `bench args` fails with an error that contains `needle` and names the flag (`args[1]`), and
/// prints nothing on stdout.
fn assert_refused(args: &[&str], needle: &str) {
    let out = bench(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    let stderr = String::from_utf8(out.stderr).expect("utf-8");
    assert!(stderr.contains(needle), "{args:?}: stderr lacks `{needle}`: {stderr}");
    assert!(stderr.contains(args[1]), "{args:?}: stderr does not name the flag: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
}

#[test]
fn bad_flags_give_a_clear_error() {
    for (args, needle) in [
        (vec!["sim", "--loss", "1.5"], "must be in [0, 1)"),
        (vec!["sim", "--working-set", "0"], "must be in (0, 1]"),
        (vec!["sim", "--receivers", "0"], "must be in 1..=4096"),
        (vec!["sim", "--pages", "99999999"], "2^24"),
        (vec!["sim", "--mtu", "1400"], "use 1500 or 9000"),
        (vec!["sim", "--loss", "lots"], "not a number"),
    ] {
        assert_refused(&args, needle);
    }
}

#[test]
fn push_compares_flow_control_on_and_off() {
    let out = bench(&["push", "--pages", "256", "--jobs", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.len(), 18, "6 scenarios x (clean, flow control on, off)");
    for r in rows.iter().filter(|r| r["flow_control"] == true) {
        assert_eq!(r["report"]["all_bit_exact"], true, "{}", r["scenario"]);
        assert_eq!(r["report"]["network"]["slow_sockets"]["dropped"], 0, "{}: overrun", r["scenario"]);
    }
}

#[test]
fn vs_udpcast_checks_its_arguments_first() {
    let out = bench(&["vs-udpcast", "--hosts", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--hosts 0 is out of range"));
}

#[test]
fn lab_benchmarks_refuse_bad_flags_before_making_a_lab() {
    for (args, needle) in [
        (vec!["xdp-daemons", "--mtu", "1400"], "use 1500 or 9000"),
        (vec!["xdp-daemons", "--loss", "1"], "must be in [0, 1)"),
        (vec!["xdp-daemons", "--fraction", "0"], "must be in (0, 1]"),
        (vec!["xdp-daemons", "--io", "dpdk"], "invalid value"),
        (vec!["xdp-daemons", "--repeat", "0"], "not in 1..=20"),
        (vec!["xdp", "--sink", "void"], "invalid value"),
    ] {
        assert_refused(&args, needle);
    }
}
