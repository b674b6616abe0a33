//! Configuration parsing: flags, the TOML file, and the clear errors (exit code 2) for bad values.
//! Needs no privileges.

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use spindrift_server::{Args, ConfigError, Push, ServerConfig};

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A scratch directory unique to this test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spindrift-server-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn image(dir: &std::path::Path, len: usize) -> PathBuf {
    let path = dir.join(format!("image-{len}.bin"));
    std::fs::write(&path, vec![7u8; len]).expect("write image");
    path
}

fn parse(args: &[&str]) -> Result<ServerConfig, ConfigError> {
    let args = Args::try_parse_from(std::iter::once("spindrift-server").chain(args.iter().copied())).expect("clap");
    ServerConfig::from_args(&args)
}

fn err(args: &[&str]) -> String {
    match parse(args) {
        Ok(c) => panic!("{args:?} was accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn good_flags_give_the_expected_config() {
    let dir = scratch("good");
    let img = image(&dir, 3 * 4096);
    let img = img.to_str().expect("utf-8 path");
    let c = parse(&[
        "--image",
        img,
        "--iface",
        "198.18.0.1",
        "--group",
        "239.1.2.3",
        "--key-hex",
        KEY,
        "--rate",
        "1gbit",
        "--mtu",
        "9000",
        "--zstd-level",
        "0",
        "--encrypt",
        "--session",
        "42",
        "--epoch",
        "7",
        "--gso",
        "on",
    ])
    .expect("valid flags");
    assert!(c.gso);
    assert_eq!(c.image_pages(), Some(3));
    assert_eq!(c.port, 7700);
    assert_eq!(c.session, 42);
    assert_eq!(c.epoch, 7);
    assert_eq!(c.key[1], 1);
    assert_eq!(c.key[31], 0x1f);
    assert_eq!(c.rate_bytes_per_sec, Some(125_000_000));
    assert_eq!(c.max_datagram, 8972);
    assert_eq!(c.zstd_level, None);
    assert!(c.encrypt);
    assert_eq!(c.push, Push::All);

    // Defaults: port 7700, session 1, epoch from the clock (a restart gets a larger one), mtu 1500,
    // zstd 1, flow control on.
    let before = spindrift_server::epoch_now();
    let c = parse(&["--image", img, "--iface", "198.18.0.1", "--group", "239.1.2.3", "--key-hex", KEY])
        .expect("valid flags");
    assert_eq!((c.port, c.session, c.max_datagram, c.zstd_level), (7700, 1, 1472, Some(1)));
    assert!(c.flow_control);
    assert_eq!(c.io, netio::IoKind::Udp, "UDP unless AF_XDP is asked for");
    // Quarter-seconds since 2024: over 2^27 by now, and strictly after any server started before.
    assert!(c.epoch > 1 << 27, "default epoch {} is not from the clock", c.epoch);
    assert!(c.epoch > before, "default epoch {} is not past the epoch {before} of a server started before", c.epoch);
    let again = parse(&["--image", img, "--iface", "198.18.0.1", "--group", "239.1.2.3", "--key-hex", KEY])
        .expect("valid flags");
    assert!(again.epoch > c.epoch, "a restart got epoch {} after {}", again.epoch, c.epoch);
    assert_eq!(c.rate_bytes_per_sec, None);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn rates_parse_into_bytes_per_second() {
    use spindrift_server::config::parse_rate;
    assert_eq!(parse_rate("1gbit").expect("1gbit"), 125_000_000);
    assert_eq!(parse_rate("800mbit").expect("800mbit"), 100_000_000);
    assert_eq!(parse_rate("500kbit").expect("500kbit"), 62_500);
    assert_eq!(parse_rate("2.5Gbit").expect("2.5Gbit"), 312_500_000);
    assert_eq!(parse_rate("8000bit").expect("8000bit"), 1000);
    for bad in ["1gb", "fast", "-1mbit", "0mbit", "gbit"] {
        let e = parse_rate(bad).expect_err(bad).to_string();
        assert!(e.starts_with(&format!("--rate {bad} ")), "{e}");
    }
}

#[test]
fn bad_values_are_refused_with_clear_messages() {
    let dir = scratch("bad");
    let img = image(&dir, 4096);
    let img = img.to_str().expect("utf-8 path");
    // The image and, unless the check gives its own, a good interface and group.
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["--image".into(), img.into()];
        for (flag, value) in [("--iface", "198.18.0.1"), ("--group", "239.1.2.3")] {
            if !extra.contains(&flag) {
                v.extend([flag.to_string(), value.to_string()]);
            }
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let check = |extra: &[&str], expected: &str| {
        let args = base(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = err(&refs);
        assert!(e.contains(expected), "{extra:?}: got {e:?}, expected it to contain {expected:?}");
    };
    check(&["--key-hex", KEY, "--group", "10.0.0.1"], "--group 10.0.0.1 is not a multicast address in 239.0.0.0/8");
    check(
        &["--key-hex", KEY, "--group", "224.0.0.251"],
        "--group 224.0.0.251 is not a multicast address in 239.0.0.0/8",
    );
    check(&["--key-hex", KEY, "--group", "nonsense"], "--group nonsense is not an IPv4 address");
    check(&["--key-hex", KEY, "--iface", "239.1.1.1"], "--iface 239.1.1.1 is not a unicast interface address");
    check(&["--key-hex", "abcd"], "--key-hex must be 64 hex digits");
    check(&["--key-hex", &*KEY.replace('0', "g")], "--key-hex must be 64 hex digits");
    check(&[], "exactly one of --key-file and --key-hex is required (neither was given)");
    check(&["--key-hex", KEY, "--key-file", "/nonexistent"], "(both were given)");
    check(&["--key-hex", KEY, "--mtu", "100"], "--mtu 100 is outside 1260..=9000");
    check(&["--key-hex", KEY, "--zstd-level", "23"], "--zstd-level 23 is outside 0..=22");
    check(&["--key-hex", KEY, "--epoch", "0"], "--epoch 0 is reserved");
    check(&["--key-hex", KEY, "--push", "some"], "--push some is not one of all, none");
    check(&["--key-hex", KEY, "--flow-control", "maybe"], "--flow-control maybe is not one of on, off");
    check(&["--key-hex", KEY, "--io", "dpdk"], "--io dpdk is not one of udp, xdp, auto");
    check(&["--key-hex", KEY, "--gso", "yes"], "--gso yes is not one of on, off");
    check(&["--key-hex", KEY, "--congestion-control", "auto"], "--congestion-control auto is not one of on, off");
    let both = Args::try_parse_from(["spindrift-server", "--image", img, "--image-socket", "/tmp/x.sock"]);
    assert!(both.expect_err("both images").to_string().contains("cannot be used with"));
    check(&["--key-hex", KEY, "--rate", "fast"], "--rate fast is not a rate");

    let short_key = dir.join("short.key");
    std::fs::write(&short_key, [1u8; 16]).expect("write key");
    check(&["--key-file", short_key.to_str().expect("utf-8")], "holds 16 bytes, not 32 raw key bytes");

    // The image: its length must be a non-zero multiple of the page size.
    let odd = image(&dir, 5000);
    let odd = odd.display().to_string();
    let e = err(&["--image", &odd, "--iface", "198.18.0.1", "--group", "239.1.2.3", "--key-hex", KEY]);
    assert_eq!(e, format!("--image {odd}: length 5000 is not a multiple of the 4096-byte page size"));
    let empty = image(&dir, 0);
    let e = err(&[
        "--image",
        empty.to_str().expect("utf-8"),
        "--iface",
        "198.18.0.1",
        "--group",
        "239.1.2.3",
        "--key-hex",
        KEY,
    ]);
    assert!(e.contains("length 0 is empty"), "{e}");
    let e = err(&["--image", "/nonexistent/image", "--iface", "198.18.0.1", "--group", "239.1.2.3", "--key-hex", KEY]);
    assert!(e.starts_with("--image /nonexistent/image: "), "{e}");
    let e = err(&["--iface", "198.18.0.1", "--group", "239.1.2.3", "--key-hex", KEY]);
    assert!(e.contains("--image (or --image-socket) is required"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn toml_file_sets_the_same_keys_and_flags_override_it() {
    let dir = scratch("toml");
    let _img = image(&dir, 8 * 4096);
    std::fs::write(dir.join("k.key"), [9u8; 32]).expect("write key");
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        "image = \"image-32768.bin\"\niface = \"198.18.0.1\"\ngroup = \"239.9.9.9\"\nport = 7800\n\
         key-file = \"k.key\"\nzstd-level = 3\nrate = \"100mbit\"\nencrypt = true\nduration-s = 5\nio = \"xdp\"\n",
    )
    .expect("write config");
    let cfg_s = cfg.to_str().expect("utf-8");
    let c = parse(&["--config", cfg_s]).expect("config file");
    assert_eq!(c.image_pages(), Some(8));
    assert_eq!(c.group.to_string(), "239.9.9.9");
    assert_eq!(c.port, 7800);
    assert_eq!(c.key, [9u8; 32]);
    assert_eq!(c.zstd_level, Some(3));
    assert_eq!(c.rate_bytes_per_sec, Some(12_500_000));
    assert!(c.encrypt);
    assert_eq!(c.duration, Some(std::time::Duration::from_secs(5)));
    assert_eq!(c.io, netio::IoKind::Xdp);

    // Flags override; a key flag replaces the file's key setting.
    let c = parse(&["--config", cfg_s, "--port", "7900", "--group", "239.1.1.1", "--key-hex", KEY]).expect("override");
    assert_eq!((c.port, c.group.to_string()), (7900, "239.1.1.1".to_string()));
    assert_eq!(c.key[31], 0x1f);

    std::fs::write(&cfg, "image = \"image-32768.bin\"\nbogus = 1\n").expect("write config");
    let e = err(&["--config", cfg_s]);
    assert!(e.starts_with(&format!("--config {cfg_s}: unknown field `bogus`")), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn binary_exits_2_with_the_message_on_a_bad_group() {
    let dir = scratch("bin");
    let img = image(&dir, 4096);
    let out = Command::new(env!("CARGO_BIN_EXE_spindrift-server"))
        .args(["--image", img.to_str().expect("utf-8"), "--iface", "198.18.0.1", "--group", "10.0.0.1"])
        .args(["--key-hex", KEY])
        .output()
        .expect("run spindrift-server");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--group 10.0.0.1 is not a multicast address in 239.0.0.0/8"), "{stderr}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn binary_stops_after_duration_and_writes_stats_json() {
    let dir = scratch("duration");
    let img = image(&dir, 4 * 4096);
    let stats = dir.join("stats.json");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let out = Command::new(env!("CARGO_BIN_EXE_spindrift-server"))
        .args(["--image", img.to_str().expect("utf-8"), "--iface", "127.0.0.1", "--group", "239.200.0.1"])
        .args(["--port", &port.to_string(), "--key-hex", KEY, "--duration-s", "1"])
        .args(["--stats-json", stats.to_str().expect("utf-8")])
        .output()
        .expect("run spindrift-server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).expect("stats file")).expect("json");
    // Announcements and End go out; no page does, since no receiver joined (nothing is pushed to
    // an empty group: it would have to be sent again when hosts ask).
    assert!(json["tx_packets"].as_u64().is_some_and(|n| n > 0), "{json}");
    assert!(json["control_packets"].as_u64().is_some_and(|n| n > 0), "{json}");
    assert_eq!(json["pages_sent"].as_u64(), Some(0), "{json}");
    std::fs::remove_dir_all(dir).ok();
}
