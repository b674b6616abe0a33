//! VM descriptors: everything a clone needs to start except the memory contents, in a compact,
//! versioned, checksummed binary format.
//!
//! A [`Descriptor`] is captured at `FORK` while the parent's vCPUs are paused: per vCPU the registers,
//! special registers, FPU and XSAVE state, XCRs, the MSRs the guest can touch, pending events and MP
//! state; the memory layout; and the *avoidance data*: the zero map (pages never written since the VM
//! was created, so they are zero) and the guest's discard hints. A clone installs zero pages for both
//! before its first instruction and never fetches them.
//!
//! # Format (version 1)
//!
//! ```text
//! offset  size  field
//!      0     8  magic "SPDRDESC"
//!      8     2  version (u16 LE) = 1
//!     10     2  flags (u16 LE) = 0
//!     12     4  body length B (u32 LE), at most MAX_BODY_BYTES
//!     16     B  body: sections, each  tag (u8) | length (LEB128) | bytes
//!   16+B    32  BLAKE3 of bytes [0, 16+B)
//! ```
//!
//! Sections (integers little-endian, counts and page numbers LEB128):
//!
//! | tag | section | contents |
//! |---|---|---|
//! | 1 | meta | fork id u32, clone count u32, capture time (unix µs) u64, zero-map method u8 |
//! | 2 | memory | region count, then per region guest address and size (bytes, page aligned) |
//! | 3 | vcpu (once per vCPU, in id order) | see [`VcpuState`]; the XSAVE area is zero-run compressed |
//! | 4 | zero map | run count, then per run: gap from the previous run's end, length (pages) |
//! | 5 | discard hints | same as the zero map |
//! | 6 | image hash | 32 bytes: [`crate::GuestMemory::image_hash`] at the fork |
//!
//! Tags with the high bit set are optional and skipped by readers that do not know them; any other
//! unknown tag is refused. [`Descriptor::decode`] never panics: it refuses truncated, corrupt,
//! wrong-version and inconsistent input with a [`DescriptorError`] naming what was wrong.

mod wire;

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};

use crate::abi::PAGE_SIZE;
use crate::ranges::PageRanges;
use wire::{Reader, Writer};

/// The magic bytes that open every descriptor.
pub const MAGIC: [u8; 8] = *b"SPDRDESC";
/// The format version this code writes and reads.
pub const VERSION: u16 = 1;
/// Bytes before the body.
pub const HEADER_BYTES: usize = 16;
/// Bytes of the trailing checksum.
pub const CHECKSUM_BYTES: usize = 32;
/// Largest body accepted (a hostile length must not make us allocate).
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// Most vCPUs in a descriptor.
pub const MAX_VCPUS: u64 = 512;
/// Most MSRs per vCPU.
pub const MAX_MSRS: u64 = 1024;

const TAG_META: u8 = 1;
const TAG_MEMORY: u8 = 2;
const TAG_VCPU: u8 = 3;
const TAG_ZERO: u8 = 4;
const TAG_DISCARD: u8 = 5;
const TAG_IMAGE_HASH: u8 = 6;
const TAG_OPTIONAL: u8 = 0x80;

/// What [`Descriptor::decode`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// Shorter than the fixed header and checksum, or than the header says.
    #[error("descriptor truncated: {len} bytes, needs at least {needed}")]
    Truncated {
        /// Bytes given.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// Not a descriptor.
    #[error("not a spindrift VM descriptor: magic is {found:02x?}, expected \"SPDRDESC\"")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// Written by another version of the format.
    #[error("descriptor format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version in the header.
        found: u16,
        /// Version this code reads.
        supported: u16,
    },
    /// Flags this code does not know.
    #[error("descriptor header has unknown flags {flags:#06x}")]
    UnknownFlags {
        /// The flags.
        flags: u16,
    },
    /// The header's body length is over the limit.
    #[error("descriptor body length {declared} exceeds the limit {limit}")]
    TooLarge {
        /// Length in the header.
        declared: usize,
        /// The limit.
        limit: usize,
    },
    /// Bytes after the checksum.
    #[error("descriptor has {extra} bytes after its checksum (header says {expected} bytes in all)")]
    TrailingBytes {
        /// Extra bytes.
        extra: usize,
        /// Total length the header implies.
        expected: usize,
    },
    /// The checksum does not match: corrupted in transit or storage.
    #[error("descriptor checksum mismatch: the bytes were corrupted")]
    ChecksumMismatch,
    /// A section could not be parsed.
    #[error("descriptor section {section} is malformed: {reason}")]
    Malformed {
        /// Which section.
        section: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A required section is absent.
    #[error("descriptor lacks the {0} section")]
    MissingSection(&'static str),
    /// A section that may appear once appeared again.
    #[error("descriptor has the {0} section twice")]
    DuplicateSection(&'static str),
    /// A required section this code does not know.
    #[error("descriptor has unknown required section tag {tag}")]
    UnknownSection {
        /// The tag.
        tag: u8,
    },
    /// Well-formed but inconsistent.
    #[error("descriptor is inconsistent: {0}")]
    Inconsistent(String),
}

/// How the zero map was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ZeroMapMethod {
    /// KVM dirty logging since VM creation plus the pages the VMM loaded: no memory is read.
    DirtyLog,
    /// Every page read and compared with zero.
    Scan,
    /// No zero map (every page is fetched).
    None,
}

impl ZeroMapMethod {
    fn code(self) -> u8 {
        match self {
            ZeroMapMethod::DirtyLog => 1,
            ZeroMapMethod::Scan => 2,
            ZeroMapMethod::None => 0,
        }
    }
    fn from_code(code: u8) -> Option<ZeroMapMethod> {
        match code {
            1 => Some(ZeroMapMethod::DirtyLog),
            2 => Some(ZeroMapMethod::Scan),
            0 => Some(ZeroMapMethod::None),
            _ => None,
        }
    }
}

/// One range of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Guest-physical start (page aligned).
    pub guest_addr: u64,
    /// Size in bytes (page aligned, not 0).
    pub size: u64,
}

/// The architectural state of one vCPU (x86-64). There is no LAPIC state: the VM has no in-kernel
/// irqchip (the guests run without interrupts); a VMM that adds one captures `KVM_GET_LAPIC` here.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuState {
    /// General registers (`KVM_GET_REGS`).
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers (`KVM_GET_SREGS`).
    pub sregs: kvm_sregs,
    /// x87/SSE state (`KVM_GET_FPU`); restored only when there is no XSAVE area.
    pub fpu: kvm_fpu,
    /// The 4 KiB XSAVE area (`KVM_GET_XSAVE`), as 1024 u32 words, if the host has XSAVE.
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers (`KVM_GET_XCRS`): (index, value).
    pub xcrs: Vec<(u32, u64)>,
    /// MSRs: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts and NMIs (`KVM_GET_VCPU_EVENTS`).
    pub events: Option<kvm_vcpu_events>,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: u32,
}

/// A VM descriptor. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Descriptor {
    /// Which fork of the parent this is (1 for the first).
    pub fork_id: u32,
    /// How many clones the guest asked for.
    pub clone_count: u32,
    /// When it was captured, unix µs.
    pub captured_unix_us: u64,
    /// How the zero map was computed.
    pub zero_map_method: ZeroMapMethod,
    /// The guest-physical memory layout.
    pub memory: Vec<MemoryLayout>,
    /// The vCPUs, in id order. `regs.rax` is 0 (the parent's return value): a clone sets its id.
    pub vcpus: Vec<VcpuState>,
    /// Pages known to be zero (never written).
    pub zero_pages: PageRanges,
    /// Pages the guest hinted it does not need (clones start them as zero pages).
    pub discard_pages: PageRanges,
    /// [`crate::GuestMemory::image_hash`] at the fork, when asked for (`--verify-image`).
    pub image_hash: Option<[u8; 32]>,
}

impl Descriptor {
    /// Total guest memory, bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.iter().map(|m| m.size).sum()
    }

    /// Total guest pages.
    pub fn memory_pages(&self) -> u64 {
        self.memory_bytes() / PAGE_SIZE
    }

    /// The pages a clone must not fetch: the zero map and the discard hints.
    pub fn avoided_pages(&self) -> PageRanges {
        let mut all = self.zero_pages.clone();
        all.extend(&self.discard_pages);
        all
    }

    /// Encodes the descriptor (see the module docs for the format).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Writer::default();
        let mut s = Writer::default();
        s.u32(self.fork_id);
        s.u32(self.clone_count);
        s.u64(self.captured_unix_us);
        s.u8(self.zero_map_method.code());
        body.section(TAG_META, &s.buf);

        let mut s = Writer::default();
        s.varint(self.memory.len() as u64);
        for m in &self.memory {
            s.varint(m.guest_addr);
            s.varint(m.size);
        }
        body.section(TAG_MEMORY, &s.buf);

        for v in &self.vcpus {
            let mut s = Writer::default();
            encode_vcpu(&mut s, v);
            body.section(TAG_VCPU, &s.buf);
        }
        for (tag, ranges) in [(TAG_ZERO, &self.zero_pages), (TAG_DISCARD, &self.discard_pages)] {
            let mut s = Writer::default();
            encode_ranges(&mut s, ranges);
            body.section(tag, &s.buf);
        }
        if let Some(h) = &self.image_hash {
            body.section(TAG_IMAGE_HASH, h);
        }

        let mut out = Writer::default();
        out.bytes(&MAGIC);
        out.u16(VERSION);
        out.u16(0);
        out.u32(body.buf.len() as u32);
        out.bytes(&body.buf);
        let sum = blake3::hash(&out.buf);
        out.bytes(sum.as_bytes());
        out.buf
    }

    /// Decodes and validates a descriptor. Never panics; see [`DescriptorError`].
    pub fn decode(bytes: &[u8]) -> Result<Descriptor, DescriptorError> {
        let min = HEADER_BYTES + CHECKSUM_BYTES;
        if bytes.len() < 8 {
            return Err(DescriptorError::Truncated { len: bytes.len(), needed: min });
        }
        let mut head = Reader::new(bytes, "header");
        let magic: [u8; 8] = head.bytes()?;
        if magic != MAGIC {
            return Err(DescriptorError::BadMagic { found: magic });
        }
        if bytes.len() < min {
            return Err(DescriptorError::Truncated { len: bytes.len(), needed: min });
        }
        let version = head.u16()?;
        if version != VERSION {
            return Err(DescriptorError::UnsupportedVersion { found: version, supported: VERSION });
        }
        let flags = head.u16()?;
        if flags != 0 {
            return Err(DescriptorError::UnknownFlags { flags });
        }
        let body_len = head.u32()? as usize;
        if body_len > MAX_BODY_BYTES {
            return Err(DescriptorError::TooLarge { declared: body_len, limit: MAX_BODY_BYTES });
        }
        let total = HEADER_BYTES + body_len + CHECKSUM_BYTES;
        if bytes.len() < total {
            return Err(DescriptorError::Truncated { len: bytes.len(), needed: total });
        }
        if bytes.len() > total {
            return Err(DescriptorError::TrailingBytes { extra: bytes.len() - total, expected: total });
        }
        let (signed, sum) = bytes.split_at(HEADER_BYTES + body_len);
        if blake3::hash(signed).as_bytes() != sum {
            return Err(DescriptorError::ChecksumMismatch);
        }
        decode_body(&signed[HEADER_BYTES..])
    }
}

fn decode_body(body: &[u8]) -> Result<Descriptor, DescriptorError> {
    let mut r = Reader::new(body, "body");
    let mut meta = None;
    let mut memory = None;
    let mut vcpus = Vec::new();
    let mut zero = None;
    let mut discard = None;
    let mut image_hash = None;
    while !r.is_empty() {
        let tag = r.u8()?;
        let len = r.count("section length", body.len() as u64)?;
        let bytes = r.take(len)?;
        match tag {
            TAG_META => {
                let mut s = Reader::new(bytes, "meta");
                let fork_id = s.u32()?;
                let clone_count = s.u32()?;
                let captured = s.u64()?;
                let code = s.u8()?;
                let method = ZeroMapMethod::from_code(code)
                    .ok_or_else(|| s.malformed(format!("unknown zero-map method {code}")))?;
                s.finish()?;
                set_once(&mut meta, (fork_id, clone_count, captured, method), "meta")?;
            }
            TAG_MEMORY => {
                let mut s = Reader::new(bytes, "memory");
                let n = s.count("region count", 64)?;
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    regions.push(MemoryLayout { guest_addr: s.varint()?, size: s.varint()? });
                }
                s.finish()?;
                set_once(&mut memory, regions, "memory")?;
            }
            TAG_VCPU => {
                if vcpus.len() as u64 >= MAX_VCPUS {
                    return Err(DescriptorError::Inconsistent(format!("more than {MAX_VCPUS} vCPUs")));
                }
                let mut s = Reader::new(bytes, "vcpu");
                vcpus.push(decode_vcpu(&mut s)?);
                s.finish()?;
            }
            TAG_ZERO => {
                let mut s = Reader::new(bytes, "zero map");
                set_once(&mut zero, decode_ranges(&mut s)?, "zero map")?;
                s.finish()?;
            }
            TAG_DISCARD => {
                let mut s = Reader::new(bytes, "discard hints");
                set_once(&mut discard, decode_ranges(&mut s)?, "discard hints")?;
                s.finish()?;
            }
            TAG_IMAGE_HASH => {
                let mut s = Reader::new(bytes, "image hash");
                set_once(&mut image_hash, s.bytes::<32>()?, "image hash")?;
                s.finish()?;
            }
            t if t & TAG_OPTIONAL != 0 => {}
            t => return Err(DescriptorError::UnknownSection { tag: t }),
        }
    }
    let (fork_id, clone_count, captured_unix_us, zero_map_method) =
        meta.ok_or(DescriptorError::MissingSection("meta"))?;
    let memory = memory.ok_or(DescriptorError::MissingSection("memory"))?;
    if vcpus.is_empty() {
        return Err(DescriptorError::MissingSection("vcpu"));
    }
    let d = Descriptor {
        fork_id,
        clone_count,
        captured_unix_us,
        zero_map_method,
        memory,
        vcpus,
        zero_pages: zero.ok_or(DescriptorError::MissingSection("zero map"))?,
        discard_pages: discard.ok_or(DescriptorError::MissingSection("discard hints"))?,
        image_hash,
    };
    validate(&d)?;
    Ok(d)
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), DescriptorError> {
    if slot.is_some() {
        return Err(DescriptorError::DuplicateSection(name));
    }
    *slot = Some(value);
    Ok(())
}

fn validate(d: &Descriptor) -> Result<(), DescriptorError> {
    let bad = |m: String| Err(DescriptorError::Inconsistent(m));
    if d.memory.is_empty() {
        return bad("no memory regions".into());
    }
    let mut sorted = d.memory.clone();
    sorted.sort_by_key(|m| m.guest_addr);
    let mut end = 0u64;
    for m in &sorted {
        if m.size == 0 || !m.guest_addr.is_multiple_of(PAGE_SIZE) || !m.size.is_multiple_of(PAGE_SIZE) {
            return bad(format!("memory region {:#x}+{:#x} is empty or not page aligned", m.guest_addr, m.size));
        }
        let Some(e) = m.guest_addr.checked_add(m.size) else {
            return bad(format!("memory region {:#x}+{:#x} overflows", m.guest_addr, m.size));
        };
        if m.guest_addr < end {
            return bad(format!("memory region {:#x}+{:#x} overlaps another", m.guest_addr, m.size));
        }
        end = e;
    }
    let pages = end / PAGE_SIZE;
    for (name, r) in [("zero map", &d.zero_pages), ("discard hints", &d.discard_pages)] {
        if r.end() > pages {
            return bad(format!("{name} reaches page {}, past the end of memory ({pages} pages)", r.end()));
        }
    }
    if u64::from(d.clone_count) > crate::abi::MAX_CLONES || d.clone_count == 0 {
        return bad(format!("clone count {} is not in 1..={}", d.clone_count, crate::abi::MAX_CLONES));
    }
    Ok(())
}

fn encode_ranges(w: &mut Writer, r: &PageRanges) {
    w.varint(r.run_count() as u64);
    let mut at = 0;
    for run in r.iter() {
        w.varint(run.start - at);
        w.varint(run.count);
        at = run.end();
    }
}

fn decode_ranges(r: &mut Reader<'_>) -> Result<PageRanges, DescriptorError> {
    // Each run takes at least two bytes.
    let n = r.count("run count", (r.remaining() / 2) as u64)?;
    let mut out = PageRanges::new();
    let mut at: u64 = 0;
    for _ in 0..n {
        let gap = r.varint()?;
        let count = r.varint()?;
        let start = at.checked_add(gap).ok_or_else(|| r.malformed("page number overflows"))?;
        let end = start.checked_add(count).ok_or_else(|| r.malformed("page number overflows"))?;
        if count == 0 || (gap == 0 && at != 0) {
            return Err(r.malformed("runs must be non-empty and separated"));
        }
        out.insert(start, count);
        at = end;
    }
    Ok(out)
}

fn encode_segment(w: &mut Writer, s: &kvm_segment) {
    w.u64(s.base);
    w.u32(s.limit);
    w.u16(s.selector);
    for b in [s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable] {
        w.u8(b);
    }
}

fn decode_segment(r: &mut Reader<'_>) -> Result<kvm_segment, DescriptorError> {
    let base = r.u64()?;
    let limit = r.u32()?;
    let selector = r.u16()?;
    let b: [u8; 9] = r.bytes()?;
    Ok(kvm_segment {
        base,
        limit,
        selector,
        type_: b[0],
        present: b[1],
        dpl: b[2],
        db: b[3],
        s: b[4],
        l: b[5],
        g: b[6],
        avl: b[7],
        unusable: b[8],
        padding: 0,
    })
}

fn encode_vcpu(w: &mut Writer, v: &VcpuState) {
    let r = &v.regs;
    for x in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        r.rip, r.rflags,
    ] {
        w.u64(x);
    }
    let s = &v.sregs;
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        encode_segment(w, seg);
    }
    for t in [&s.gdt, &s.idt] {
        w.u64(t.base);
        w.u16(t.limit);
    }
    for x in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        w.u64(x);
    }
    for x in s.interrupt_bitmap {
        w.u64(x);
    }
    let f = &v.fpu;
    for reg in &f.fpr {
        w.bytes(reg);
    }
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for reg in &f.xmm {
        w.bytes(reg);
    }
    w.u32(f.mxcsr);
    match &v.xsave {
        Some(words) => {
            w.u8(1);
            encode_words(w, words);
        }
        None => w.u8(0),
    }
    w.varint(v.xcrs.len() as u64);
    for &(i, x) in &v.xcrs {
        w.u32(i);
        w.u64(x);
    }
    w.varint(v.msrs.len() as u64);
    for &(i, x) in &v.msrs {
        w.u32(i);
        w.u64(x);
    }
    match &v.events {
        Some(e) => {
            w.u8(1);
            let x = &e.exception;
            for b in [x.injected, x.nr, x.has_error_code, x.pending] {
                w.u8(b);
            }
            w.u32(x.error_code);
            let i = &e.interrupt;
            for b in [i.injected, i.nr, i.soft, i.shadow] {
                w.u8(b);
            }
            let n = &e.nmi;
            for b in [n.injected, n.pending, n.masked] {
                w.u8(b);
            }
            w.u32(e.sipi_vector);
            w.u32(e.flags);
            let m = &e.smi;
            for b in [m.smm, m.pending, m.smm_inside_nmi, m.latched_init] {
                w.u8(b);
            }
            w.u8(e.triple_fault.pending);
            w.u8(e.exception_has_payload);
            w.u64(e.exception_payload);
        }
        None => w.u8(0),
    }
    w.u32(v.mp_state);
}

fn decode_vcpu(r: &mut Reader<'_>) -> Result<VcpuState, DescriptorError> {
    let mut g = [0u64; 18];
    for x in &mut g {
        *x = r.u64()?;
    }
    let regs = kvm_regs {
        rax: g[0],
        rbx: g[1],
        rcx: g[2],
        rdx: g[3],
        rsi: g[4],
        rdi: g[5],
        rsp: g[6],
        rbp: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: g[16],
        rflags: g[17],
    };
    let mut segs = [kvm_segment::default(); 8];
    for s in &mut segs {
        *s = decode_segment(r)?;
    }
    let mut tables = [kvm_dtable::default(); 2];
    for t in &mut tables {
        t.base = r.u64()?;
        t.limit = r.u16()?;
    }
    let mut cr = [0u64; 7];
    for x in &mut cr {
        *x = r.u64()?;
    }
    let mut interrupt_bitmap = [0u64; 4];
    for x in &mut interrupt_bitmap {
        *x = r.u64()?;
    }
    let sregs = kvm_sregs {
        cs: segs[0],
        ds: segs[1],
        es: segs[2],
        fs: segs[3],
        gs: segs[4],
        ss: segs[5],
        tr: segs[6],
        ldt: segs[7],
        gdt: tables[0],
        idt: tables[1],
        cr0: cr[0],
        cr2: cr[1],
        cr3: cr[2],
        cr4: cr[3],
        cr8: cr[4],
        efer: cr[5],
        apic_base: cr[6],
        interrupt_bitmap,
    };
    let mut fpu = kvm_fpu::default();
    for reg in &mut fpu.fpr {
        *reg = r.bytes()?;
    }
    fpu.fcw = r.u16()?;
    fpu.fsw = r.u16()?;
    fpu.ftwx = r.u8()?;
    fpu.last_opcode = r.u16()?;
    fpu.last_ip = r.u64()?;
    fpu.last_dp = r.u64()?;
    for reg in &mut fpu.xmm {
        *reg = r.bytes()?;
    }
    fpu.mxcsr = r.u32()?;
    let xsave = match r.u8()? {
        0 => None,
        1 => Some(decode_words(r, 1024)?),
        x => return Err(r.malformed(format!("XSAVE presence flag {x}"))),
    };
    let n = r.count("XCR count", 16)?;
    let mut xcrs = Vec::with_capacity(n);
    for _ in 0..n {
        xcrs.push((r.u32()?, r.u64()?));
    }
    let n = r.count("MSR count", MAX_MSRS)?;
    let mut msrs = Vec::with_capacity(n);
    for _ in 0..n {
        msrs.push((r.u32()?, r.u64()?));
    }
    let events = match r.u8()? {
        0 => None,
        1 => {
            let mut e = kvm_vcpu_events::default();
            let b: [u8; 4] = r.bytes()?;
            (e.exception.injected, e.exception.nr, e.exception.has_error_code, e.exception.pending) =
                (b[0], b[1], b[2], b[3]);
            e.exception.error_code = r.u32()?;
            let b: [u8; 4] = r.bytes()?;
            (e.interrupt.injected, e.interrupt.nr, e.interrupt.soft, e.interrupt.shadow) = (b[0], b[1], b[2], b[3]);
            let b: [u8; 3] = r.bytes()?;
            (e.nmi.injected, e.nmi.pending, e.nmi.masked) = (b[0], b[1], b[2]);
            e.sipi_vector = r.u32()?;
            e.flags = r.u32()?;
            let b: [u8; 4] = r.bytes()?;
            (e.smi.smm, e.smi.pending, e.smi.smm_inside_nmi, e.smi.latched_init) = (b[0], b[1], b[2], b[3]);
            e.triple_fault.pending = r.u8()?;
            e.exception_has_payload = r.u8()?;
            e.exception_payload = r.u64()?;
            Some(e)
        }
        x => return Err(r.malformed(format!("events presence flag {x}"))),
    };
    let mp_state = r.u32()?;
    Ok(VcpuState { regs, sregs, fpu, xsave, xcrs, msrs, events, mp_state })
}

/// Zero-run compression of u32 words: groups of (zero words to skip, literal count, literals).
fn encode_words(w: &mut Writer, words: &[u32]) {
    w.varint(words.len() as u64);
    let mut i = 0;
    while i < words.len() {
        let zeros = words[i..].iter().take_while(|&&x| x == 0).count();
        i += zeros;
        let lits = words[i..].iter().take_while(|&&x| x != 0).count();
        w.varint(zeros as u64);
        w.varint(lits as u64);
        for &x in &words[i..i + lits] {
            w.u32(x);
        }
        i += lits;
    }
}

fn decode_words(r: &mut Reader<'_>, expected: usize) -> Result<Vec<u32>, DescriptorError> {
    let n = r.count("word count", expected as u64)?;
    if n != expected {
        return Err(r.malformed(format!("XSAVE area has {n} words, expected {expected}")));
    }
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let zeros = r.count("zero run", (n - out.len()) as u64)?;
        out.resize(out.len() + zeros, 0);
        let lits = r.count("literal run", (n - out.len()) as u64)?;
        if zeros == 0 && lits == 0 {
            return Err(r.malformed("empty XSAVE group"));
        }
        for _ in 0..lits {
            out.push(r.u32()?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
