#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;

pub(crate) fn sample(zero: &[(u64, u64)], discard: &[(u64, u64)]) -> Descriptor {
    let mut regs = kvm_regs { rip: 0x10042, rsp: 0x7fff8, rflags: 0x2, rdi: 4, ..Default::default() };
    regs.r15 = u64::MAX;
    let mut sregs = kvm_sregs { cr0: 0x8005_0033, cr3: 0x2000, cr4: 0x20, efer: 0x501, ..Default::default() };
    sregs.cs =
        kvm_segment { selector: 8, l: 1, present: 1, s: 1, type_: 11, g: 1, limit: 0xffff_ffff, ..Default::default() };
    sregs.gdt = kvm_dtable { base: 0x1000, limit: 23, padding: [0; 3] };
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    let mut xsave = vec![0u32; 1024];
    xsave[0] = 0x37f;
    xsave[6] = 0x1f80;
    xsave[128] = 7;
    xsave[1023] = 9;
    let mut events = kvm_vcpu_events { flags: 0x5, ..Default::default() };
    events.interrupt.shadow = 1;
    let vcpu = VcpuState {
        regs,
        sregs,
        fpu,
        xsave: Some(xsave),
        xcrs: vec![(0, 7)],
        msrs: vec![(0x10, 123_456_789), (0xc000_0080, 0x501)],
        events: Some(events),
        mp_state: 0,
    };
    let mut z = PageRanges::new();
    for &(s, c) in zero {
        z.insert(s, c);
    }
    let mut d = PageRanges::new();
    for &(s, c) in discard {
        d.insert(s, c);
    }
    Descriptor {
        fork_id: 3,
        clone_count: 4,
        captured_unix_us: 1_700_000_000_000_000,
        zero_map_method: ZeroMapMethod::DirtyLog,
        memory: vec![MemoryLayout { guest_addr: 0, size: 32 << 20 }],
        vcpus: vec![vcpu],
        zero_pages: z,
        discard_pages: d,
        image_hash: Some([0xab; 32]),
    }
}

/// Re-signs a descriptor after its bytes were edited, so the body parser is what refuses it.
fn resign(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len() - CHECKSUM_BYTES;
    let sum = blake3::hash(&bytes[..n]);
    bytes[n..].copy_from_slice(sum.as_bytes());
    bytes
}

/// Builds a descriptor from raw sections (valid header and checksum).
fn with_sections(sections: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut body = Writer::default();
    for (tag, s) in sections {
        body.section(*tag, s);
    }
    with_body(&body.buf)
}

/// Wraps a raw body in a valid header and checksum.
fn with_body(body: &[u8]) -> Vec<u8> {
    let mut out = Writer::default();
    out.bytes(&MAGIC);
    out.u16(VERSION);
    out.u16(0);
    out.u32(body.len() as u32);
    out.bytes(body);
    out.bytes(&[0; 32]);
    resign(out.buf)
}

#[test]
fn roundtrips() {
    let d = sample(&[(0, 1), (5, 3000), (7000, 1192)], &[(4000, 16)]);
    let bytes = d.encode();
    assert_eq!(Descriptor::decode(&bytes).unwrap(), d);
    // The sparse XSAVE area compresses: the whole thing stays far below its 4 KiB.
    assert!(bytes.len() < 1200, "descriptor is {} bytes", bytes.len());
}

#[test]
fn refuses_every_truncation() {
    let bytes = sample(&[(1, 2)], &[]).encode();
    for len in 0..bytes.len() {
        let e = Descriptor::decode(&bytes[..len]).unwrap_err();
        assert!(matches!(e, DescriptorError::Truncated { .. }), "length {len}: {e}");
    }
    let e = Descriptor::decode(&bytes[..bytes.len() - 1]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("descriptor truncated: {} bytes, needs at least {}", bytes.len() - 1, bytes.len())
    );
}

#[test]
fn refuses_every_single_byte_corruption() {
    let bytes = sample(&[(1, 2)], &[(9, 1)]).encode();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x40;
        let e = Descriptor::decode(&b).unwrap_err();
        let expected = match i {
            0..=7 => matches!(e, DescriptorError::BadMagic { .. }),
            8..=9 => matches!(e, DescriptorError::UnsupportedVersion { .. }),
            10..=11 => matches!(e, DescriptorError::UnknownFlags { .. }),
            12..=15 => matches!(
                e,
                DescriptorError::Truncated { .. }
                    | DescriptorError::TrailingBytes { .. }
                    | DescriptorError::TooLarge { .. }
            ),
            _ => e == DescriptorError::ChecksumMismatch,
        };
        assert!(expected, "byte {i}: {e}");
    }
}

#[test]
fn refuses_wrong_version_and_magic_with_clear_messages() {
    let mut bytes = sample(&[], &[]).encode();
    bytes[8] = 2;
    let e = Descriptor::decode(&resign(bytes.clone())).unwrap_err();
    assert_eq!(e.to_string(), "descriptor format version 2 is not supported (this build reads version 1)");
    bytes[0] = b'X';
    let e = Descriptor::decode(&bytes).unwrap_err();
    assert!(e.to_string().starts_with("not a spindrift VM descriptor: magic is"), "{e}");
    let mut long = sample(&[], &[]).encode();
    long.push(0);
    assert!(matches!(Descriptor::decode(&long), Err(DescriptorError::TrailingBytes { extra: 1, .. })));
}

#[test]
fn refuses_bad_bodies_under_a_valid_checksum() {
    let good = sample(&[(3, 4)], &[]);
    let meta = {
        let mut w = Writer::default();
        w.u32(1);
        w.u32(2);
        w.u64(3);
        w.u8(1);
        w.buf
    };
    let memory = {
        let mut w = Writer::default();
        w.varint(1);
        w.varint(0);
        w.varint(32 << 20);
        w.buf
    };
    let vcpu = {
        let mut w = Writer::default();
        encode_vcpu(&mut w, &good.vcpus[0]);
        w.buf
    };
    let ranges = |runs: &[(u64, u64)]| {
        let mut w = Writer::default();
        w.varint(runs.len() as u64);
        for &(gap, count) in runs {
            w.varint(gap);
            w.varint(count);
        }
        w.buf
    };
    let ok = with_sections(&[
        (TAG_META, meta.clone()),
        (TAG_MEMORY, memory.clone()),
        (TAG_VCPU, vcpu.clone()),
        (TAG_ZERO, ranges(&[(2, 3)])),
        (TAG_DISCARD, ranges(&[])),
        (0x99, vec![1, 2, 3]), // optional, unknown: skipped
    ]);
    let d = Descriptor::decode(&ok).unwrap();
    assert_eq!(d.zero_pages.iter().next().map(|r| (r.start, r.count)), Some((2, 3)));

    let e = Descriptor::decode(&with_sections(&[(TAG_META, meta.clone()), (TAG_MEMORY, memory.clone())])).unwrap_err();
    assert_eq!(e.to_string(), "descriptor lacks the vcpu section");
    let e = Descriptor::decode(&with_sections(&[(TAG_META, meta.clone()), (TAG_META, meta.clone())])).unwrap_err();
    assert_eq!(e, DescriptorError::DuplicateSection("meta"));
    let e = Descriptor::decode(&with_sections(&[(0x17, vec![])])).unwrap_err();
    assert_eq!(e.to_string(), "descriptor has unknown required section tag 23");
    let e = Descriptor::decode(&with_sections(&[(TAG_VCPU, vcpu[..100].to_vec())])).unwrap_err();
    assert!(e.to_string().starts_with("descriptor section vcpu is malformed: needs 8 more bytes"), "{e}");
    // A zero map past the end of memory.
    let e = Descriptor::decode(&with_sections(&[
        (TAG_META, meta.clone()),
        (TAG_MEMORY, memory.clone()),
        (TAG_VCPU, vcpu.clone()),
        (TAG_ZERO, ranges(&[(8190, 3)])),
        (TAG_DISCARD, ranges(&[])),
    ]))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "descriptor is inconsistent: zero map reaches page 8193, past the end of memory (8192 pages)"
    );
    // Adjacent runs are not canonical.
    let e = Descriptor::decode(&with_sections(&[(TAG_ZERO, ranges(&[(2, 3), (0, 1)]))])).unwrap_err();
    assert!(matches!(e, DescriptorError::Malformed { section: "zero map", .. }), "{e}");
    // A section length past the body.
    let e = Descriptor::decode(&with_body(&[TAG_META, 0xe8, 0x07, 0])).unwrap_err();
    assert_eq!(e.to_string(), "descriptor section body is malformed: section length 1000 exceeds the limit 4");
}

#[test]
fn a_gib_of_sparse_memory_costs_little() {
    // 1 GiB, data in scattered runs: 4,096 runs of zeros between written stretches.
    let runs: Vec<(u64, u64)> = (0..4096u64).map(|i| (i * 64 + 20, 30)).collect();
    let mut d = sample(&runs, &[(262_000, 100)]);
    d.memory = vec![MemoryLayout { guest_addr: 0, size: 1 << 30 }];
    let bytes = d.encode();
    assert!(bytes.len() < 64 * 1024, "{} bytes", bytes.len());
    assert_eq!(Descriptor::decode(&bytes).unwrap(), d);
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Descriptor::decode(&bytes);
    }

    #[test]
    fn random_bodies_under_a_valid_checksum_never_panic(body in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Descriptor::decode(&with_body(&body));
    }

    #[test]
    fn mutated_bodies_never_panic(pos in 16usize..1200, byte in any::<u8>()) {
        let mut bytes = sample(&[(1, 2), (10, 5)], &[(30, 1)]).encode();
        let body_end = bytes.len() - CHECKSUM_BYTES;
        let pos = 16 + pos % (body_end - 16);
        bytes[pos] = byte;
        let _ = Descriptor::decode(&resign(bytes));
    }

    #[test]
    fn range_sets_roundtrip(runs in proptest::collection::vec((0u64..8000, 1u64..50), 0..60)) {
        let d = sample(&runs, &runs[..runs.len() / 2]);
        prop_assert_eq!(Descriptor::decode(&d.encode()).unwrap(), d);
    }
}
