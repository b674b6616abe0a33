//! The XDP program, emitted as eBPF bytecode from Rust: a small instruction builder and the
//! filter that sends the protocol's traffic to the AF_XDP socket and everything else to the kernel.
//!
//! # Why bytecode from Rust
//!
//! The program is 30 instructions. Writing it in C would need clang, LLVM and libbpf on every
//! machine that builds spindrift, an ELF loader (libbpf or aya) at run time, and either a
//! committed object file or a build step that compiles C. Emitting the instructions here needs
//! nothing: the port and the host's address are written into the program as constants when it is
//! loaded, so there are no global variables and no relocations except the one map reference, the
//! loader is five `bpf(2)` calls (see `sys.rs`), and the program's logic is unit-tested without a
//! kernel by the small interpreter at the end of this file.
//!
//! # What it does
//!
//! For each frame arriving on the interface, in order:
//!
//! 1. Fewer than 42 bytes in the first buffer: pass.
//! 2. Ethertype not IPv4 (ARP, IPv6, VLAN, ...): pass.
//! 3. IP version/header length byte not `0x45` (options): pass.
//! 4. Protocol not UDP (ICMP, IGMP, TCP, ...): pass.
//! 5. A fragment (MF set or offset nonzero): pass; the kernel reassembles.
//! 6. UDP destination port not ours: pass.
//! 7. Destination address neither the host's nor in 239.0.0.0/8: pass.
//! 8. Otherwise `bpf_redirect_map(xskmap, rx_queue_index, XDP_PASS)`: to the socket bound to the
//!    frame's queue, or to the kernel if no socket is bound there.
//!
//! The program is loaded with `BPF_F_XDP_HAS_FRAGS` (declared multi-buffer aware, `SEC("xdp.frags")`
//! in C terms), which veth requires in native mode when the link MTU exceeds one page's worth of
//! frame; it reads only the first 42 bytes, which are always in the first buffer.

use std::net::Ipv4Addr;

/// One eBPF instruction, as the kernel reads it (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// Destination register in the low 4 bits, source register in the high 4.
    pub regs: u8,
    /// Signed offset (memory access, jump distance).
    pub off: i16,
    /// Signed immediate.
    pub imm: i32,
}

/// An eBPF register, r0..r10.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg(pub u8);

/// r0: return value and helper result.
pub const R0: Reg = Reg(0);
/// r1: first argument (the `xdp_md` context on entry).
pub const R1: Reg = Reg(1);
/// r2: second argument.
pub const R2: Reg = Reg(2);
/// r3: third argument.
pub const R3: Reg = Reg(3);
/// r4: scratch.
pub const R4: Reg = Reg(4);
/// r5: scratch.
pub const R5: Reg = Reg(5);
/// r6: callee-saved.
pub const R6: Reg = Reg(6);

/// Memory access width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// 1 byte.
    B,
    /// 2 bytes.
    H,
    /// 4 bytes.
    W,
}

/// A jump condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// Equal.
    Eq,
    /// Not equal.
    Ne,
    /// Unsigned greater than.
    Gt,
}

// Opcode parts (linux/bpf_common.h, linux/bpf.h).
const CLASS_LD: u8 = 0x00;
const CLASS_LDX: u8 = 0x01;
const CLASS_JMP: u8 = 0x05;
const CLASS_ALU: u8 = 0x04;
const CLASS_ALU64: u8 = 0x07;
const MODE_IMM: u8 = 0x00;
const MODE_MEM: u8 = 0x60;
const SIZE_DW: u8 = 0x18;
const SRC_K: u8 = 0x00;
const SRC_X: u8 = 0x08;
const OP_ADD: u8 = 0x00;
const OP_AND: u8 = 0x50;
const OP_MOV: u8 = 0xb0;
const JMP_JA: u8 = 0x00;
const JMP_JEQ: u8 = 0x10;
const JMP_JGT: u8 = 0x20;
const JMP_JNE: u8 = 0x50;
const JMP_CALL: u8 = 0x80;
const JMP_EXIT: u8 = 0x90;
/// `src_reg` of a 64-bit immediate load that names a map by file descriptor.
const PSEUDO_MAP_FD: u8 = 1;

/// XDP verdict: let the kernel have the frame.
pub const XDP_PASS: i32 = 2;
/// Helper number of `bpf_redirect_map`.
pub const FUNC_REDIRECT_MAP: i32 = 51;

fn size_bits(s: Size) -> u8 {
    match s {
        Size::B => 0x10,
        Size::H => 0x08,
        Size::W => 0x00,
    }
}

fn cond_bits(c: Cond) -> u8 {
    match c {
        Cond::Eq => JMP_JEQ,
        Cond::Ne => JMP_JNE,
        Cond::Gt => JMP_JGT,
    }
}

/// Builds a program instruction by instruction, with forward jumps to named labels resolved at the
/// end.
#[derive(Debug, Default)]
pub struct Builder {
    insns: Vec<Insn>,
    /// (instruction index, label) of each jump still to resolve.
    fixups: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

/// A label used by a jump but never placed, or placed twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// A jump names a label that was never placed.
    #[error("the eBPF program jumps to label {0:?}, which is never placed")]
    MissingLabel(&'static str),
    /// A label was placed twice.
    #[error("the eBPF program places label {0:?} twice")]
    DuplicateLabel(&'static str),
    /// A jump goes backwards or too far.
    #[error("the eBPF program's jump to {0:?} is out of range")]
    BadJump(&'static str),
}

impl Builder {
    fn push(&mut self, code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> &mut Self {
        self.insns.push(Insn { code, regs: (dst.0 & 0x0f) | (src.0 << 4), off, imm });
        self
    }

    /// `dst = *(size *)(src + off)`.
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(CLASS_LDX | MODE_MEM | size_bits(size), dst, src, off, 0)
    }

    /// `dst = src` (64 bits).
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.push(CLASS_ALU64 | OP_MOV | SRC_X, dst, src, 0, 0)
    }

    /// `dst = imm` (64 bits, sign-extended).
    pub fn mov_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(CLASS_ALU64 | OP_MOV | SRC_K, dst, Reg(0), 0, imm)
    }

    /// `dst = imm as u32` (32-bit move: the upper half is zeroed, no sign extension).
    pub fn mov32_imm(&mut self, dst: Reg, imm: u32) -> &mut Self {
        self.push(CLASS_ALU | OP_MOV | SRC_K, dst, Reg(0), 0, imm as i32)
    }

    /// `dst += imm`.
    pub fn add_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(CLASS_ALU64 | OP_ADD | SRC_K, dst, Reg(0), 0, imm)
    }

    /// `dst &= imm`.
    pub fn and_imm(&mut self, dst: Reg, imm: i32) -> &mut Self {
        self.push(CLASS_ALU64 | OP_AND | SRC_K, dst, Reg(0), 0, imm)
    }

    /// `if dst <cond> imm goto label`.
    pub fn jump_imm(&mut self, cond: Cond, dst: Reg, imm: i32, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(CLASS_JMP | cond_bits(cond) | SRC_K, dst, Reg(0), 0, imm)
    }

    /// `if dst <cond> src goto label`.
    pub fn jump_reg(&mut self, cond: Cond, dst: Reg, src: Reg, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(CLASS_JMP | cond_bits(cond) | SRC_X, dst, src, 0, 0)
    }

    /// `goto label`.
    pub fn jump(&mut self, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(CLASS_JMP | JMP_JA, Reg(0), Reg(0), 0, 0)
    }

    /// `dst = map` (the two-slot 64-bit load naming a map by its file descriptor).
    pub fn load_map_fd(&mut self, dst: Reg, map_fd: i32) -> &mut Self {
        self.push(CLASS_LD | MODE_IMM | SIZE_DW, dst, Reg(PSEUDO_MAP_FD), 0, map_fd);
        self.push(0, Reg(0), Reg(0), 0, 0)
    }

    /// Calls helper number `func`.
    pub fn call(&mut self, func: i32) -> &mut Self {
        self.push(CLASS_JMP | JMP_CALL, Reg(0), Reg(0), 0, func)
    }

    /// `return r0`.
    pub fn exit(&mut self) -> &mut Self {
        self.push(CLASS_JMP | JMP_EXIT, Reg(0), Reg(0), 0, 0)
    }

    /// Places `label` at the next instruction.
    pub fn label(&mut self, label: &'static str) -> &mut Self {
        self.labels.push((label, self.insns.len()));
        self
    }

    /// The finished program, with every jump resolved.
    pub fn finish(mut self) -> Result<Vec<Insn>, ProgramError> {
        for (i, (name, _)) in self.labels.iter().enumerate() {
            if self.labels[..i].iter().any(|(n, _)| n == name) {
                return Err(ProgramError::DuplicateLabel(name));
            }
        }
        for &(at, name) in &self.fixups {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| *n == name)
                .map(|&(_, t)| t)
                .ok_or(ProgramError::MissingLabel(name))?;
            let off = i16::try_from(target as i64 - at as i64 - 1).map_err(|_| ProgramError::BadJump(name))?;
            if off < 0 {
                return Err(ProgramError::BadJump(name));
            }
            self.insns[at].off = off;
        }
        Ok(self.insns)
    }
}

/// What the filter matches: UDP to `port`, addressed to `host` or to a group in 239.0.0.0/8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterSpec {
    /// UDP destination port of the protocol.
    pub port: u16,
    /// This host's address on the interface.
    pub host: Ipv4Addr,
}

/// Offsets in `struct xdp_md`.
const MD_DATA: i16 = 0;
const MD_DATA_END: i16 = 4;
const MD_RX_QUEUE_INDEX: i16 = 16;

/// The filter program for `spec`, redirecting matches into the XSKMAP `map_fd`.
///
/// Packet fields are loaded as little-endian integers (the only byte order eBPF loads in on the
/// machines this runs on), so each network-order constant is compared byte-swapped.
pub fn filter_program(spec: FilterSpec, map_fd: i32) -> Result<Vec<Insn>, ProgramError> {
    let le16 = |v: u16| i32::from(u16::from_le_bytes(v.to_be_bytes()));
    let host_le = u32::from_le_bytes(spec.host.octets());
    let mut b = Builder::default();
    b.mov(R6, R1)
        .load(Size::W, R2, R1, MD_DATA)
        .load(Size::W, R3, R1, MD_DATA_END)
        .mov(R4, R2)
        .add_imm(R4, 42)
        .jump_reg(Cond::Gt, R4, R3, "pass")
        .load(Size::H, R5, R2, 12) // ethertype
        .jump_imm(Cond::Ne, R5, le16(0x0800), "pass")
        .load(Size::B, R5, R2, 14) // version and header length
        .jump_imm(Cond::Ne, R5, 0x45, "pass")
        .load(Size::B, R5, R2, 23) // protocol
        .jump_imm(Cond::Ne, R5, 17, "pass")
        .load(Size::H, R5, R2, 20) // flags and fragment offset
        .and_imm(R5, le16(0x3fff))
        .jump_imm(Cond::Ne, R5, 0, "pass")
        .load(Size::H, R5, R2, 36) // UDP destination port
        .jump_imm(Cond::Ne, R5, le16(spec.port), "pass")
        .load(Size::W, R5, R2, 30) // destination address
        .mov32_imm(R4, host_le)
        .jump_reg(Cond::Eq, R5, R4, "redirect")
        .and_imm(R5, 0xff) // its first octet
        .jump_imm(Cond::Ne, R5, 239, "pass")
        .label("redirect")
        .load(Size::W, R2, R6, MD_RX_QUEUE_INDEX)
        .load_map_fd(R1, map_fd)
        .mov_imm(R3, XDP_PASS) // the verdict if no socket is bound to that queue
        .call(FUNC_REDIRECT_MAP)
        .exit()
        .label("pass")
        .mov_imm(R0, XDP_PASS)
        .exit();
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xdp::frame::{self, FrameHeaders, MacAddr, HEADERS_LEN};
    use std::net::SocketAddrV4;

    /// Result of running the program on one frame.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Verdict {
        Pass,
        /// `bpf_redirect_map(map, key, flags)` was called and its result returned.
        Redirect {
            key: u64,
        },
    }

    const MAP_FD: i32 = 7;
    const QUEUE: u32 = 3;
    /// Where the fake packet pointers start, so they are never mistaken for small integers.
    const DATA_BASE: u64 = 0x1000_0000;

    /// Interprets the subset of eBPF the builder emits. Packet loads outside [data, data_end)
    /// fail the test: the kernel's verifier would refuse such a program.
    fn run(prog: &[Insn], packet: &[u8]) -> Verdict {
        let mut r = [0u64; 11];
        let ctx = 0x10u64; // a fake context pointer
        r[1] = ctx;
        let mut pc = 0usize;
        let mut redirect = None;
        for _ in 0..1000 {
            let i = prog[pc];
            let (dst, src) = (usize::from(i.regs & 0x0f), usize::from(i.regs >> 4));
            pc += 1;
            let class = i.code & 0x07;
            match class {
                CLASS_LDX => {
                    let base = r[src];
                    let width = match i.code & 0x18 {
                        0x10 => 1,
                        0x08 => 2,
                        0x00 => 4,
                        other => panic!("unsupported load size {other:#x}"),
                    };
                    let addr = base.wrapping_add(i.off as i64 as u64);
                    r[dst] = if base == ctx {
                        match i.off {
                            MD_DATA => DATA_BASE,
                            MD_DATA_END => DATA_BASE + packet.len() as u64,
                            MD_RX_QUEUE_INDEX => u64::from(QUEUE),
                            other => panic!("unexpected context field {other}"),
                        }
                    } else {
                        let at = addr.checked_sub(DATA_BASE).expect("load below the packet") as usize;
                        assert!(at + width <= packet.len(), "load past data_end at {at} (+{width})");
                        let mut v = 0u64;
                        for k in (0..width).rev() {
                            v = (v << 8) | u64::from(packet[at + k]);
                        }
                        v
                    };
                }
                CLASS_ALU64 | CLASS_ALU => {
                    let operand = if i.code & SRC_X != 0 { r[src] } else { i.imm as i64 as u64 };
                    let v = match i.code & 0xf0 {
                        OP_MOV => operand,
                        OP_ADD => r[dst].wrapping_add(operand),
                        OP_AND => r[dst] & operand,
                        other => panic!("unsupported ALU op {other:#x}"),
                    };
                    r[dst] = if class == CLASS_ALU { v & 0xffff_ffff } else { v };
                }
                CLASS_LD => {
                    assert_eq!(i.code, CLASS_LD | MODE_IMM | SIZE_DW);
                    assert_eq!(i.regs >> 4, PSEUDO_MAP_FD);
                    r[dst] = 0xfd00 + i.imm as u64; // a fake map pointer
                    pc += 1;
                }
                CLASS_JMP => match i.code & 0xf0 {
                    JMP_EXIT => {
                        return match redirect {
                            Some(key) if r[0] == 0x4242 => Verdict::Redirect { key },
                            _ => {
                                assert_eq!(r[0], XDP_PASS as u64);
                                Verdict::Pass
                            }
                        };
                    }
                    JMP_CALL => {
                        assert_eq!(i.imm, FUNC_REDIRECT_MAP);
                        assert_eq!(r[1], 0xfd00 + MAP_FD as u64, "r1 must be the map");
                        assert_eq!(r[3], XDP_PASS as u64, "the fallback verdict must be XDP_PASS");
                        redirect = Some(r[2]);
                        r[0] = 0x4242;
                    }
                    op => {
                        let operand = if i.code & SRC_X != 0 { r[src] } else { i.imm as i64 as u64 };
                        let taken = match op {
                            JMP_JA => true,
                            JMP_JEQ => r[dst] == operand,
                            JMP_JNE => r[dst] != operand,
                            JMP_JGT => r[dst] > operand,
                            other => panic!("unsupported jump {other:#x}"),
                        };
                        if taken {
                            pc += i.off as usize;
                        }
                    }
                },
                other => panic!("unsupported class {other}"),
            }
        }
        panic!("the program did not finish in 1000 steps");
    }

    const HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 200);
    const PORT: u16 = 7000;

    fn prog() -> Vec<Insn> {
        filter_program(FilterSpec { port: PORT, host: HOST }, MAP_FD).expect("builds")
    }

    fn udp_frame(dst: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
        let h = FrameHeaders {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: if dst.is_multicast() { MacAddr::for_group(dst) } else { MacAddr([2, 0, 0, 0, 0, 2]) },
            source: SocketAddrV4::new(Ipv4Addr::new(198, 18, 3, 1), 40000),
            destination: SocketAddrV4::new(dst, port),
            ttl: 1,
        };
        let mut hdr = [0u8; HEADERS_LEN];
        frame::write_headers(&mut hdr, &h, payload.len(), 0);
        let mut f = hdr.to_vec();
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn program_is_small_and_resolves() {
        let p = prog();
        assert!(p.len() <= 40, "{} instructions", p.len());
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    #[test]
    fn redirects_our_unicast_and_239_multicast() {
        let p = prog();
        let to_queue = Verdict::Redirect { key: u64::from(QUEUE) };
        assert_eq!(run(&p, &udp_frame(HOST, PORT, b"page")), to_queue);
        assert_eq!(run(&p, &udp_frame(HOST, PORT, b"")), to_queue);
        assert_eq!(run(&p, &udp_frame(Ipv4Addr::new(239, 1, 2, 3), PORT, b"page")), to_queue);
        assert_eq!(run(&p, &udp_frame(Ipv4Addr::new(239, 255, 255, 255), PORT, &[0; 1400])), to_queue);
    }

    #[test]
    fn passes_everything_else() {
        let p = prog();
        // Other port, other host, other multicast ranges, broadcast.
        assert_eq!(run(&p, &udp_frame(HOST, PORT + 1, b"x")), Verdict::Pass);
        assert_eq!(run(&p, &udp_frame(Ipv4Addr::new(198, 18, 3, 201), PORT, b"x")), Verdict::Pass);
        assert_eq!(run(&p, &udp_frame(Ipv4Addr::new(224, 0, 0, 22), PORT, b"x")), Verdict::Pass);
        assert_eq!(run(&p, &udp_frame(Ipv4Addr::new(198, 18, 3, 255), PORT, b"x")), Verdict::Pass);
        // A port with the bytes of ours swapped (catches byte-order mistakes).
        assert_eq!(run(&p, &udp_frame(HOST, PORT.swap_bytes(), b"x")), Verdict::Pass);
        let edit = |at: usize, v: u8| {
            let mut f = udp_frame(HOST, PORT, b"xyz");
            f[at] = v;
            run(&p, &f)
        };
        assert_eq!(edit(12, 0x86), Verdict::Pass, "ARP-like ethertype 0x0806");
        assert_eq!(edit(13, 0x06), Verdict::Pass, "ARP ethertype");
        assert_eq!(edit(14, 0x46), Verdict::Pass, "IP options");
        assert_eq!(edit(23, 2), Verdict::Pass, "IGMP");
        assert_eq!(edit(23, 6), Verdict::Pass, "TCP");
        assert_eq!(edit(23, 1), Verdict::Pass, "ICMP");
        assert_eq!(edit(20, 0x60), Verdict::Pass, "DF + MF: a first fragment");
        assert_eq!(edit(21, 0x01), Verdict::Pass, "a later fragment");
        assert_eq!(edit(20, 0x40), Verdict::Redirect { key: u64::from(QUEUE) }, "DF alone is fine");
    }

    #[test]
    fn short_frames_pass_without_reading_past_the_end() {
        let p = prog();
        let f = udp_frame(HOST, PORT, b"");
        for len in 0..HEADERS_LEN {
            assert_eq!(run(&p, &f[..len]), Verdict::Pass, "{len}-byte frame");
        }
    }

    #[test]
    fn host_addresses_with_high_octets_compare_unsigned() {
        // 255.255.255.254 as a little-endian word has the sign bit set; the 32-bit move keeps it
        // from being sign-extended.
        let host = Ipv4Addr::new(10, 1, 2, 254);
        let p = filter_program(FilterSpec { port: 1, host }, MAP_FD).expect("builds");
        assert_eq!(run(&p, &udp_frame(host, 1, b"a")), Verdict::Redirect { key: u64::from(QUEUE) });
    }

    #[test]
    fn builder_reports_label_mistakes() {
        let mut b = Builder::default();
        b.jump("nowhere").exit();
        assert_eq!(b.finish(), Err(ProgramError::MissingLabel("nowhere")));
        let mut b = Builder::default();
        b.label("a").label("a").exit();
        assert_eq!(b.finish().map_err(|e| e.to_string()), Err("the eBPF program places label \"a\" twice".into()));
        let mut b = Builder::default();
        b.label("back").jump("back");
        assert_eq!(b.finish(), Err(ProgramError::BadJump("back")));
    }
}
