//! The Unix-socket handoff: both message shapes, and the errors a user sees for bad input.

// `is_multiple_of` is newer than the workspace MSRV (1.85).
#![allow(clippy::unwrap_used, clippy::manual_is_multiple_of, missing_docs)]

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::uffd_or_skip;
use spindrift_client::handoff::{recv_uffd_timeout, send_with_fd, HandoffError};
use spindrift_client::{recv_uffd, send_handoff, send_uffd, HandoffFormat, HandoffMessage, Region, PAGE_2M, PAGE_4K};

fn pair() -> (UnixStream, UnixStream) {
    UnixStream::pair().unwrap()
}

/// Sends `json` with `/dev/null` attached (any descriptor: content errors come before fd checks).
fn recv_json_with_devnull(json: &str) -> HandoffError {
    let (vmm, daemon) = pair();
    let devnull = File::open("/dev/null").unwrap();
    send_with_fd(&vmm, Some(devnull.as_fd()), json.as_bytes()).unwrap();
    recv_uffd(&daemon).expect_err("a bad handoff was accepted")
}

#[test]
fn firecracker_bare_array_is_accepted_with_page_size_or_page_size_kib() {
    let Some(uffd) = uffd_or_skip("firecracker_bare_array_is_accepted_with_page_size_or_page_size_kib", 0) else {
        return;
    };
    for json in [
        r#"[{"base_host_virt_addr":1048576,"size":8192,"offset":0,"page_size":4096},
            {"base_host_virt_addr":4194304,"size":2097152,"offset":8192,"page_size":4096}]"#,
        r#"[{"base_host_virt_addr":1048576,"size":8192,"offset":0,"page_size_kib":4},
            {"base_host_virt_addr":4194304,"size":2097152,"offset":8192,"page_size_kib":4}]"#,
    ] {
        let (vmm, daemon) = pair();
        send_with_fd(&vmm, Some(uffd.as_fd()), json.as_bytes()).unwrap();
        let (_fd, handoff) = recv_uffd(&daemon).unwrap();
        assert_eq!(handoff.format, HandoffFormat::Firecracker);
        assert_eq!(
            handoff.message.regions,
            vec![
                Region { base_host_virt_addr: 0x10_0000, size: 8192, offset: 0, page_size: PAGE_4K },
                Region { base_host_virt_addr: 0x40_0000, size: 0x20_0000, offset: 8192, page_size: PAGE_4K },
            ]
        );
        assert_eq!(handoff.message.clone_id, None);
        assert_eq!(handoff.peer.map(|p| p.pid), Some(std::process::id() as i32));
    }
}

#[test]
fn send_uffd_speaks_firecracker_and_send_handoff_speaks_spindrift() {
    let Some(uffd) = uffd_or_skip("send_uffd_speaks_firecracker_and_send_handoff_speaks_spindrift", 0) else { return };
    let regions = vec![Region { base_host_virt_addr: 0x4000_0000, size: 2 * PAGE_2M, offset: 0, page_size: PAGE_2M }];

    let (vmm, daemon) = pair();
    send_uffd(&vmm, uffd.as_fd(), &regions).unwrap();
    let (_fd, handoff) = recv_uffd(&daemon).unwrap();
    assert_eq!((handoff.format, handoff.message.regions.clone()), (HandoffFormat::Firecracker, regions.clone()));

    let message = HandoffMessage {
        regions,
        clone_id: Some(42),
        session: Some("s-1".into()),
        snapshot: Some("img".into()),
        fork: None,
        shared_cache: false,
    };
    let (vmm, daemon) = pair();
    send_handoff(&vmm, uffd.as_fd(), &message).unwrap();
    let (_fd, handoff) = recv_uffd(&daemon).unwrap();
    assert_eq!(handoff.format, HandoffFormat::Spindrift);
    assert_eq!(handoff.message, message);
    assert!(handoff.peer_pidfd.is_some(), "this kernel offers SO_PEERPIDFD");
}

#[test]
fn spindrift_object_ignores_unknown_fields_and_may_arrive_in_pieces() {
    let Some(uffd) = uffd_or_skip("spindrift_object_ignores_unknown_fields_and_may_arrive_in_pieces", 0) else {
        return;
    };
    let json = r#"{"regions":[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}],
                   "clone_id":3,"future_field":{"x":1}}"#;
    let (vmm, daemon) = pair();
    let (head, tail) = json.as_bytes().split_at(20);
    send_with_fd(&vmm, Some(uffd.as_fd()), head).unwrap();
    (&vmm).write_all(tail).unwrap();
    let (_fd, handoff) = recv_uffd(&daemon).unwrap();
    assert_eq!(handoff.message.clone_id, Some(3));
    assert_eq!(handoff.message.regions.len(), 1);
}

#[test]
fn malformed_json_is_reported_as_such() {
    let e = recv_json_with_devnull(r#"[{"base_host_virt_addr": 4096, "size": }]"#);
    assert!(matches!(e, HandoffError::BadJson(_)), "{e:?}");
    assert!(e.to_string().starts_with("handoff message is not valid: expected value at line 1"), "{e}");

    let e = recv_json_with_devnull(r#""just a string""#);
    assert_eq!(
        e.to_string(),
        "handoff message must be a JSON array of regions (Firecracker) or an object with \"regions\" (spindrift), but \
         starts with '\"'"
    );

    let e = recv_json_with_devnull(r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#);
    assert!(e.to_string().contains("region has neither page_size nor page_size_kib"), "{e}");

    let e = recv_json_with_devnull(
        r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":8}]"#,
    );
    assert!(e.to_string().contains("page_size 4096 disagrees with page_size_kib 8"), "{e}");
}

#[test]
fn invalid_regions_are_reported_with_their_index() {
    let e = recv_json_with_devnull(
        r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096},
            {"base_host_virt_addr":12289,"size":4096,"offset":4096,"page_size":4096}]"#,
    );
    assert_eq!(
        e.to_string(),
        "invalid memory regions in the handoff: region 1: base_host_virt_addr 0x3001 is not a multiple of the page \
         size 0x1000"
    );
    let e = recv_json_with_devnull(r#"[{"base_host_virt_addr":4096,"size":0,"offset":0,"page_size":4096}]"#);
    assert_eq!(e.to_string(), "invalid memory regions in the handoff: region 0: size is 0");
    let e = recv_json_with_devnull(r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":8192}]"#);
    assert_eq!(e.to_string(), "invalid memory regions in the handoff: region 0: page size 8192 is not 4096 or 2097152");
    let e = recv_json_with_devnull(
        r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},
            {"base_host_virt_addr":8192,"size":4096,"offset":65536,"page_size":4096}]"#,
    );
    assert_eq!(
        e.to_string(),
        "invalid memory regions in the handoff: regions 0 and 1 overlap in the clone's address space"
    );
    let e = recv_json_with_devnull("[]");
    assert_eq!(e.to_string(), "invalid memory regions in the handoff: the handoff lists no memory regions");
}

#[test]
fn a_message_without_a_descriptor_is_refused() {
    let (vmm, daemon) = pair();
    send_with_fd(&vmm, None, br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#).unwrap();
    let e = recv_uffd(&daemon).unwrap_err();
    assert!(matches!(e, HandoffError::NoFd), "{e:?}");
    assert!(e.to_string().contains("carried no file descriptor"), "{e}");
}

#[test]
fn a_descriptor_that_is_not_a_userfaultfd_is_refused() {
    let e = recv_json_with_devnull(r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]"#);
    assert!(matches!(e, HandoffError::NotUffd(_)), "{e:?}");
    let cause = std::error::Error::source(&e).unwrap().to_string();
    assert!(cause.ends_with("is not a userfaultfd (it is /dev/null)"), "{cause}");
}

#[test]
fn two_descriptors_are_refused() {
    let (vmm, daemon) = pair();
    let (a, b) = (File::open("/dev/null").unwrap(), File::open("/dev/null").unwrap());
    send_with_fd(&vmm, Some(a.as_fd()), br#"[{"base_host_virt_addr":4096,"#).unwrap();
    send_with_fd(&vmm, Some(b.as_fd()), br#""size":4096,"offset":0,"page_size":4096}]"#).unwrap();
    let e = recv_uffd(&daemon).unwrap_err();
    assert_eq!(e.to_string(), "the handoff carried 2 file descriptors, expected exactly one (the userfaultfd)");
}

#[test]
fn early_close_and_silence_end_in_bounded_errors() {
    let (vmm, daemon) = pair();
    (&vmm).write_all(br#"[{"base_host_"#).unwrap();
    drop(vmm);
    let e = recv_uffd(&daemon).unwrap_err();
    assert_eq!(e.to_string(), "the VMM closed the connection after 13 bytes, before a complete handoff message");

    let (vmm, daemon) = pair();
    (&vmm).write_all(b"  [ ").unwrap();
    let e = recv_uffd_timeout(&daemon, Duration::from_millis(50)).unwrap_err();
    assert_eq!(e.to_string(), "no complete handoff message within 50ms (4 bytes received)");
    drop(vmm);
}

#[test]
fn a_userfaultfd_without_uffdio_api_is_refused_by_the_server() {
    if uffd_or_skip("a_userfaultfd_without_uffdio_api_is_refused_by_the_server", 0).is_none() {
        return;
    }
    // SAFETY: userfaultfd(2) takes flags and returns a new descriptor (checked below) that we own.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) } as i32;
    assert!(raw >= 0);
    // SAFETY: `raw` is the fresh descriptor created above; nothing else owns it.
    let raw = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let (vmm, daemon) = pair();
    let regions = [Region { base_host_virt_addr: 0x10_0000, size: 4096, offset: 0, page_size: PAGE_4K }];
    send_uffd(&vmm, raw.as_fd(), &regions).unwrap();
    let (fd, handoff) = recv_uffd(&daemon).unwrap();
    let cache = std::sync::Arc::new(spindrift_client::PageCache::new(4096).unwrap());
    let e = spindrift_client::FaultServer::from_handoff(fd, handoff, cache, Default::default()).unwrap_err();
    assert!(e.to_string().ends_with("is not initialised: the VMM must do UFFDIO_API before handing it over"), "{e}");
}

#[test]
fn a_shared_cache_clone_gets_the_memfd_before_its_handoff() {
    use spindrift_client::handoff::{recv_map_reply, recv_opening, send_map_reply, send_map_request, Opening};
    let (vmm, daemon) = pair();
    send_map_request(&vmm, Some("9")).unwrap();
    match recv_opening(&daemon, Duration::from_secs(2)).unwrap() {
        Opening::Map { session } => assert_eq!(session.as_deref(), Some("9")),
        Opening::Handoff(..) => panic!("a map request read as a handoff"),
    }
    let cache = spindrift_client::PageCache::new(8192).unwrap();
    send_map_reply(&daemon, cache.clone_fd().unwrap().as_fd(), cache.image_bytes()).unwrap();
    let (fd, bytes) = recv_map_reply(&vmm, Duration::from_secs(2)).unwrap();
    assert_eq!(bytes, 8192);
    assert_eq!(std::fs::File::from(fd).metadata().unwrap().len(), 8192);
    // A refusal comes back as the daemon's message.
    let (vmm, daemon) = pair();
    std::io::Write::write_all(&mut &daemon, b"{\"type\":\"error\",\"message\":\"session 9 was not announced\"}\n")
        .unwrap();
    let e = recv_map_reply(&vmm, Duration::from_secs(2)).unwrap_err();
    assert_eq!(e.to_string(), "the daemon refused: session 9 was not announced");
}
