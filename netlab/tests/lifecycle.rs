//! Lifecycle: nothing is left behind after drop, down, a panic, a creation
//! error or `clean`; persisted labs can be reopened; bad input gives clear
//! errors; the command-line tool works end to end.

mod common;

use std::net::SocketAddrV4;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use common::{assert_gone, namespaces_of, Collector, KillOnDrop};
use netlab::require::lossy_lab;
use netlab::{unique_lab_name, Lab, LabConfig, LabError, LinkConditions, Loss, Rate};

fn busy_conditions() -> LinkConditions {
    LinkConditions::new()
        .with_rate(Rate::mbit(100))
        .with_loss_rx(Loss::from_probability(0.01).expect("loss"))
        .with_loss_tx(Loss::from_probability(0.01).expect("loss"))
}

/// Starts `sleep 60` inside host `index`, to check that teardown kills it,
/// and waits until it is inside (`ip netns exec` enters the namespace after
/// it starts, so a teardown right after spawn could miss it).
fn sleeper(lab: &Lab, index: usize) -> KillOnDrop {
    use std::os::unix::fs::MetadataExt;
    let host = lab.host(index).expect("host");
    let child = host.command("sleep").expect("command").arg("60").spawn().expect("spawn sleep");
    let child = KillOnDrop(child);
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let want = id(&host.netns_path());
    let proc_ns = std::path::PathBuf::from(format!("/proc/{}/ns/net", child.0.id()));
    for _ in 0..250 {
        if id(&proc_ns) == want {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("sleep did not enter {} within 5 s", host.netns());
}

/// True once `child` has exited, waiting up to 2 s.
fn exited(child: &mut KillOnDrop) -> bool {
    for _ in 0..100 {
        if let Ok(Some(_)) = child.0.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn drop_removes_everything_and_kills_processes_inside() {
    if !lossy_lab("drop_removes_everything_and_kills_processes_inside") {
        return;
    }
    let name = unique_lab_name("drop");
    let lab = Lab::create(
        &LabConfig::new(&name, 3).conditions(busy_conditions()).host_conditions(2, busy_conditions().with_cut(true)),
    )
    .expect("lab");
    assert_eq!(namespaces_of(&name).len(), 4, "3 hosts + switch");
    let mut child = sleeper(&lab, 1);
    drop(lab);
    assert_gone(&name);
    assert!(exited(&mut child), "a process inside the lab survived teardown");
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    if !lossy_lab("a_panicking_test_leaves_nothing_behind") {
        return;
    }
    let name = unique_lab_name("panic");
    let inner = name.clone();
    let result = std::panic::catch_unwind(move || {
        let lab = Lab::create(&LabConfig::new(&inner, 2).conditions(busy_conditions())).expect("lab");
        assert_eq!(namespaces_of(&inner).len(), 3);
        let _keep = lab.host(0).expect("h0").addr();
        panic!("deliberate panic while the lab is up");
    });
    assert!(result.is_err(), "the closure should have panicked");
    assert_gone(&name);
}

#[test]
fn a_failed_creation_leaves_nothing_behind_and_spares_an_existing_lab() {
    if !lossy_lab("a_failed_creation_leaves_nothing_behind_and_spares_an_existing_lab") {
        return;
    }
    // An existing lab of the same name must survive a second, failing creation.
    let name = unique_lab_name("dup");
    let first = Lab::create(&LabConfig::new(&name, 2)).expect("lab");
    let err = Lab::create(&LabConfig::new(&name, 2)).expect_err("duplicate name");
    println!("duplicate: {err}");
    assert!(matches!(err, LabError::Exists(_)), "{err}");
    assert_eq!(namespaces_of(&name).len(), 3, "the first lab must be intact");
    drop(first);
    assert_gone(&name);

    // A failure half-way (namespaces, links and switch exist; host h2 fails)
    // removes what was already built.
    let name = unique_lab_name("halfway");
    let err = Lab::create(&LabConfig::new(&name, 3).conditions(busy_conditions()).fail_at_host(2))
        .expect_err("injected failure");
    println!("half-way failure: {err}");
    assert!(err.to_string().contains("injected"), "{err}");
    assert_gone(&name);
}

#[test]
fn persisted_lab_can_be_reopened_listed_changed_and_removed() {
    if !lossy_lab("persisted_lab_can_be_reopened_listed_changed_and_removed") {
        return;
    }
    let name = unique_lab_name("persist");
    let lab = Lab::create(&LabConfig::new(&name, 3).mtu(9000)).expect("lab");
    let addrs: Vec<_> = lab.hosts().iter().map(|h| h.addr()).collect();
    let subnet = lab.subnet();
    assert_eq!(lab.persist(), name);
    assert_eq!(namespaces_of(&name).len(), 4, "persist must leave the lab running");

    let listed = netlab::list_labs().expect("list");
    let entry = listed.iter().find(|l| l.name == name).expect("listed");
    assert_eq!(entry.meta.map(|m| (m.hosts, m.mtu)), Some((3, 9000)));

    let again = Lab::open(&name).expect("open");
    assert!(!again.is_owned());
    assert_eq!(again.subnet(), subnet);
    assert_eq!(again.hosts().iter().map(|h| h.addr()).collect::<Vec<_>>(), addrs);
    again.cut(2).expect("cut");
    drop(again);
    assert_eq!(namespaces_of(&name).len(), 4, "dropping an opened lab keeps it");
    let third = Lab::open(&name).expect("open again");
    assert!(third.conditions(2).expect("conditions").cut, "state is kept in the system");
    assert!(matches!(third.host(3), Err(LabError::NoSuchHost { .. })));
    third.down().expect("down");
    assert_gone(&name);
    assert!(Lab::open(&name).is_err(), "a removed lab cannot be opened");
}

#[test]
fn clean_removes_leftover_labs_by_prefix() {
    if !lossy_lab("clean_removes_leftover_labs_by_prefix") {
        return;
    }
    // Only this test's labs: other tests run in parallel and must not be hit.
    let prefix = format!("{}-", unique_lab_name("clean"));
    let names = [format!("{prefix}a"), format!("{prefix}b")];
    let mut children = Vec::new();
    for n in &names {
        let lab = Lab::create(&LabConfig::new(n, 2).conditions(busy_conditions())).expect("lab");
        children.push(sleeper(&lab, 0));
        lab.persist();
    }
    let report = netlab::clean(Some(&prefix)).expect("clean");
    println!("clean: {report:?}");
    assert_eq!(report.labs.len(), 2);
    assert_eq!(report.namespaces.len(), 6);
    for n in &names {
        assert_gone(n);
    }
    for c in &mut children {
        assert!(exited(c), "a process inside a cleaned lab survived");
    }
}

#[test]
fn two_labs_at_once_have_separate_names_and_subnets() {
    if !lossy_lab("two_labs_at_once_have_separate_names_and_subnets") {
        return;
    }
    let a = Lab::create(&LabConfig::new(unique_lab_name("twin"), 2)).expect("lab a");
    let b = Lab::create(&LabConfig::new(unique_lab_name("twin"), 2)).expect("lab b");
    assert_ne!(a.subnet(), b.subnet());
    for lab in [&a, &b] {
        let (h0, h1) = (lab.host(0).expect("h0"), lab.host(1).expect("h1"));
        let port = common::port();
        let done = Arc::new(AtomicBool::new(false));
        let rx = Collector::start(common::udp_in(h1, h1.addr(), port), 10, done.clone());
        common::send_numbered(&common::sender(h0), SocketAddrV4::new(h1.addr(), port), 10, 1000);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(rx.finish().len(), 10, "lab {} does not carry traffic", lab.name());
    }
    // The labs are separate networks: a's host cannot reach b's subnet.
    let a0 = a.host(0).expect("h0");
    let sock = common::sender(a0);
    let err = sock.send_to(b"x", (b.host(1).expect("h1").addr(), 9));
    assert!(err.is_err(), "lab a routed a packet to lab b's subnet");
}

#[test]
fn bad_input_gives_clear_errors() {
    // No root needed: everything here fails before touching the system.
    let cases: Vec<(LabConfig, &str)> = vec![
        (LabConfig::new("bad name", 2), "invalid"),
        (LabConfig::new("", 2), "empty"),
        (LabConfig::new("ok", 0), "at least one host"),
        (LabConfig::new("ok", 251), "at most 250"),
        (LabConfig::new("ok", 2).mtu(20), "MTU 20"),
        (LabConfig::new("ok", 2).host_conditions(5, LinkConditions::new()), "h5"),
    ];
    for (cfg, expected) in cases {
        let err = Lab::create(&cfg).expect_err("must fail");
        let msg = err.to_string();
        println!("{msg}");
        assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
    }
    let err = "100mbitz".parse::<Rate>().expect_err("bad rate");
    assert!(err.to_string().contains("unknown unit"), "{err}");
    assert!("1.5".parse::<Loss>().is_err());
    assert!(netlab::names::parse_host("x7").is_err());
}

fn netlab_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_netlab")).args(args).output().expect("run netlab")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn command_line_round_trip() {
    if !lossy_lab("command_line_round_trip") {
        return;
    }
    let name = unique_lab_name("cli");
    // If anything below fails, this removes the lab anyway.
    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = netlab::clean::teardown(&self.0);
        }
    }
    let _cleanup = Cleanup(name.clone());

    let up =
        netlab_cli(&["up", "--name", &name, "--hosts", "3", "--rate", "100mbit", "--loss", "0.05", "--mtu", "9000"]);
    assert!(up.status.success(), "up failed: {}", stderr(&up));
    println!("{}", stdout(&up));
    assert_eq!(namespaces_of(&name).len(), 4, "up must return with the lab running");

    let list = netlab_cli(&["list"]);
    assert!(stdout(&list).contains(&name), "{}", stdout(&list));

    let lab = Lab::open(&name).expect("open");
    let addr = netlab_cli(&["addr", &name, "h2"]);
    assert_eq!(stdout(&addr).trim(), lab.host(2).expect("h2").addr().to_string());

    // A tool that nobody here wrote sees the lab's interface and address.
    let ip = netlab_cli(&["exec", &name, "h1", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(ip.status.success(), "{}", stderr(&ip));
    let h1 = lab.host(1).expect("h1");
    assert!(stdout(&ip).contains(&format!("{}/24", h1.addr())), "{}", stdout(&ip));
    let mtu = netlab_cli(&["exec", &name, "h1", "--", "cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(stdout(&mtu).trim(), "9000");

    // exec passes the exit status through.
    let f = netlab_cli(&["exec", &name, "h0", "--", "sh", "-c", "exit 7"]);
    assert_eq!(f.status.code(), Some(7));

    let set = netlab_cli(&["set", &name, "h1", "--cut", "--loss", "10%"]);
    assert!(set.status.success(), "{}", stderr(&set));
    let c = Lab::open(&name).expect("open").conditions(1).expect("conditions");
    assert!(c.cut);
    assert_eq!(c.loss_rx.ppm(), 100_000);
    assert_eq!(c.rate_tx, Rate::mbit(100), "set must keep what it was not told to change");
    let restore = netlab_cli(&["set", &name, "all", "--restore", "--rate", "none"]);
    assert!(restore.status.success(), "{}", stderr(&restore));
    let c = Lab::open(&name).expect("open").conditions(1).expect("conditions");
    assert!(!c.cut && c.rate_tx.is_none() && c.rate_rx.is_none());

    // Errors are clear and do not create anything.
    for (args, expected) in [
        (vec!["exec", name.as_str(), "h9", "--", "true"], "no host h9"),
        (vec!["addr", "no-such-lab-xyz", "h0"], "no lab named"),
        (vec!["set", name.as_str(), "h0", "--rate", "100mbitz"], "unknown unit"),
        (vec!["up", "--name", "x y", "--hosts", "2"], "invalid"),
        (vec!["up", "--name", "toomany", "--hosts", "251"], "at most 250"),
        (vec!["up", "--name", name.as_str(), "--hosts", "2"], "already exists"),
    ] {
        let o = netlab_cli(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
    }
    assert!(namespaces_of("toomany").is_empty());

    let down = netlab_cli(&["down", &name]);
    assert!(down.status.success(), "{}", stderr(&down));
    assert_gone(&name);
    let again = netlab_cli(&["down", &name]);
    assert!(!again.status.success(), "down of a removed lab should fail");
}

#[test]
fn command_line_up_in_foreground_removes_the_lab_on_sigterm() {
    if !lossy_lab("command_line_up_in_foreground_removes_the_lab_on_sigterm") {
        return;
    }
    let name = unique_lab_name("fg");
    let child = Command::new(env!("CARGO_BIN_EXE_netlab"))
        .args(["up", "--name", &name, "--hosts", "2", "--foreground"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut child = KillOnDrop(child);
    let mut up = false;
    for _ in 0..100 {
        if netlab::list_labs().expect("list").iter().any(|l| l.name == name && l.meta.is_some()) {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up, "foreground up did not create the lab");
    // Give `up` a moment to finish printing and enter its wait loop.
    std::thread::sleep(Duration::from_millis(200));
    let pid = libc::pid_t::try_from(child.0.id()).expect("pid");
    // SAFETY: kill takes plain integers; `pid` is our own child, not yet reaped
    // (KillOnDrop reaps it only later), so it cannot name another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let status = child.wait_for(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "up --foreground: {status:?}");
    assert_gone(&name);
}
