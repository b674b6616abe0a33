//! Guest memory handed over by a local VMM on `--image-socket`: a sealed memfd and a JSON header
//! over SCM_RIGHTS. Needs no network and no privileges.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use spindrift_server::handover::{self, HandoverError, Header};
use spindrift_server::{serve, ImageInput, PageSource, ServerConfig};

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("spindrift-handover-{}-{name}.sock", std::process::id()))
}

fn image(pages: usize) -> Vec<u8> {
    (0..pages * 4096).map(|i| (i / 4096 * 31 + i % 251) as u8).collect()
}

fn header(bytes: u64) -> Header {
    Header { bytes, offset: 0, session: Some(77), epoch: Some(5), hints: vec![2, 1], end_on_close: false }
}

fn config() -> ServerConfig {
    ServerConfig::new("127.0.0.1".parse().expect("ip"), "239.201.0.1".parse().expect("group"), 7790, 1, [3; 32])
        .expect("config")
}

/// Runs `handover::receive` in a thread, lets `vmm` talk to it, and returns what it received.
fn with_server<T>(name: &str, vmm: impl FnOnce(&std::path::Path) -> T) -> (T, Result<handover::Handed, HandoverError>) {
    let path = socket_path(name);
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (path, stop) = (path.clone(), Arc::clone(&stop));
        std::thread::spawn(move || handover::receive(&path, &config(), &stop))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the server never created {}", path.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = vmm(&path);
    stop.store(true, Ordering::Relaxed);
    let received = server.join().expect("server thread");
    (out, received)
}

#[test]
fn a_sealed_memfd_is_mapped_and_served_byte_for_byte() {
    let bytes = image(5);
    let memfd = handover::sealed_memfd("guest", &bytes).expect("memfd");
    let ((answer, _conn), received) = with_server("sealed", |path| {
        handover::hand_over(path, &memfd, &header(bytes.len() as u64)).expect("hand over")
    });
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["pages"], 5);
    assert_eq!(answer["session"], 77);
    assert_eq!(answer["epoch"], 5);
    let handed = received.expect("handed over");
    assert_eq!(handed.image.page_count(), 5);
    assert_eq!(handed.image.bytes(), &bytes[..]);
    assert_eq!(handed.image.page(3), &bytes[3 * 4096..4 * 4096]);
    // The header's session, epoch and hints shape the session.
    let (c, options) = handed.session(&config()).expect("session");
    assert_eq!((c.session, c.epoch), (77, 5));
    assert_eq!(options.push, Some(spindrift_server::PushPolicy::HintsThenAll(vec![2, 1])));
    assert!(!socket_path("sealed").exists(), "the socket file is removed once memory is handed over");
}

#[test]
fn unsealed_and_bad_handovers_are_refused_with_the_reason_and_the_server_keeps_waiting() {
    let bytes = image(2);
    let unsealed = spindrift_server::sys::memfd_with("unsealed", &bytes, false).expect("memfd");
    let sealed = handover::sealed_memfd("ok", &bytes).expect("memfd");
    let file_path = std::env::temp_dir().join(format!("spindrift-handover-{}.img", std::process::id()));
    std::fs::write(&file_path, &bytes).expect("write file");
    let file = std::fs::File::open(&file_path).expect("open file");
    let file_fd = std::os::fd::OwnedFd::from(file);
    let (answers, received) = with_server("refused", |path| {
        let mut answers = Vec::new();
        let mut ask = |fd: &std::os::fd::OwnedFd, h: Header| {
            let (a, _conn) = handover::hand_over(path, fd, &h).expect("hand over");
            answers.push(a);
        };
        ask(&unsealed, header(8192));
        ask(&file_fd, header(8192));
        ask(&sealed, header(3 * 4096));
        ask(&sealed, header(5000));
        ask(&sealed, Header { offset: 100, ..header(4096) });
        ask(&sealed, Header { epoch: Some(0), ..header(4096) });
        // The last one is good: the server took it after all the refusals.
        ask(&sealed, header(8192));
        answers
    });
    let errors: Vec<String> = answers.iter().map(|a| a["error"].as_str().unwrap_or("").to_string()).collect();
    assert!(errors[0].contains("not sealed against writing and shrinking"), "{}", errors[0]);
    assert!(errors[1].contains("not a sealable memfd"), "{}", errors[1]);
    assert!(errors[2].contains("past the memfd's 8192 bytes"), "{}", errors[2]);
    assert!(errors[3].contains("bytes 5000 is not a multiple of the 4096-byte page size"), "{}", errors[3]);
    assert!(errors[4].contains("offset 100 is not a multiple"), "{}", errors[4]);
    assert!(errors[5].contains("epoch 0 is reserved"), "{}", errors[5]);
    assert_eq!(answers[6]["ok"], true, "{}", answers[6]);
    assert_eq!(received.expect("the good handover").image.bytes(), &bytes[..]);
    std::fs::remove_file(file_path).ok();
}

#[test]
fn a_header_without_a_descriptor_or_with_unknown_keys_is_refused() {
    use std::io::{BufRead, BufReader, Write};
    let sealed = handover::sealed_memfd("ok", &image(1)).expect("memfd");
    let (answers, received) = with_server("nofd", |path| {
        let mut answers = Vec::new();
        for line in ["{\"bytes\": 4096}\n", "{\"bytes\": 4096, \"colour\": 1}\n", "not json\n"] {
            let mut conn = std::os::unix::net::UnixStream::connect(path).expect("connect");
            conn.write_all(line.as_bytes()).expect("write");
            let mut answer = String::new();
            BufReader::new(&conn).read_line(&mut answer).expect("answer");
            answers.push(answer);
        }
        let (ok, _conn) = handover::hand_over(path, &sealed, &header(4096)).expect("hand over");
        answers.push(ok.to_string());
        answers
    });
    assert!(answers[0].contains("expected exactly one file descriptor (the memfd), got 0"), "{}", answers[0]);
    assert!(answers[1].contains("unknown field `colour`"), "{}", answers[1]);
    assert!(answers[2].contains("not valid JSON"), "{}", answers[2]);
    assert!(answers[3].contains("\"ok\":true"), "{}", answers[3]);
    assert!(received.is_ok());
    let _ = sealed.as_fd();
}

#[test]
fn serve_takes_memory_from_the_socket_and_ends_when_the_vmm_hangs_up() {
    let path = socket_path("serve");
    let mut c = config();
    c.image = Some(ImageInput::Socket(path.clone()));
    c.duration = Some(Duration::from_secs(30));
    let stats = std::env::temp_dir().join(format!("spindrift-handover-{}-stats.json", std::process::id()));
    c.stats_json = Some(stats.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || serve(&c, &stop))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the server never listened");
        std::thread::sleep(Duration::from_millis(5));
    }
    let bytes = image(4);
    let memfd = handover::sealed_memfd("guest", &bytes).expect("memfd");
    let h = Header { end_on_close: true, ..header(bytes.len() as u64) };
    let (answer, conn) = handover::hand_over(&path, &memfd, &h).expect("hand over");
    assert_eq!(answer["ok"], true, "{answer}");
    // The server is serving; the stats file appears about once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stats.exists() {
        assert!(Instant::now() < deadline, "no stats file while serving");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!server.is_finished(), "the server stopped before the VMM hung up");
    let hung_up = Instant::now();
    drop(conn);
    let result = server.join().expect("server thread");
    assert!(hung_up.elapsed() < Duration::from_secs(10), "the session did not end when the VMM hung up");
    let s = result.expect("served");
    assert!(s.control_packets > 0, "{s:?}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).expect("stats")).expect("json");
    assert!(json["tx_packets"].as_u64().is_some_and(|n| n > 0), "{json}");
    std::fs::remove_file(stats).ok();
    stop.store(true, Ordering::Relaxed);
}
