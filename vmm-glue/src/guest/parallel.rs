//! `parallel`: a SnowFlock-style parallel job.
//!
//! The VMM loads a deterministic data set (see [`super::data_page`]) at [`layout::DATA`]. The guest
//!
//! 1. computes the expected checksum of each of N shares (contiguous runs of pages; the last share takes
//!    the remainder) by reading two qwords per page, and stores them in a table;
//! 2. hints the scratch area (after the data) as discard, and `FORK`s N clones;
//! 3. in clone *i*: computes the checksum of share *i* (touching its pages: they are fetched lazily),
//!    writes it into the scratch area, `REPORT`s it (status 0, 8 bytes) and exits 0;
//! 4. in the parent meanwhile: overwrites qword 0 of every data page (XOR with a mask; clones must not
//!    see this), then `JOIN`s and checks that entry *k* comes from clone *k+1*, has status 0 and carries
//!    the expected checksum. It `REPORT`s its own result (status = results correct, bytes = one verdict
//!    byte per clone), prints a summary and exits with the number of wrong results (0 iff all match;
//!    255 if `FORK` or `JOIN` failed).
//!
//! Checksum of a share: `acc = 0; for page: acc ^= q0; acc = rol(acc, 5); acc += q511` ([`checksum`]).
//!
//! Parameters (u64 at `PARAMS +`): 0 data address, 8 data pages, 16 clones, 24 pages per share,
//! 32 scratch address, 40 scratch bytes, 48 expected table, 56 join buffer, 64 join buffer bytes,
//! 72 verdicts, 80 overwrite mask.

use iced_x86::code_asm::*;

use super::asm::Prog;
use super::{asm_err, data_page_words, install_code, load_data, GuestError};
use crate::abi::{self, layout, PAGE_SIZE};
use crate::vm::Vm;

const PROGRAM: &str = "parallel";
const EXPECTED: u64 = layout::WORK;
const VERDICTS: u64 = layout::WORK + 0x10000;
const PRINT_BUF_END: u64 = layout::WORK + 0x18000;
const JOIN_BUF: u64 = layout::WORK + 0x20000;
const JOIN_BUF_END: u64 = layout::WORK + layout::WORK_SIZE;
const SCRATCH_BYTES: u64 = 16 * PAGE_SIZE;
/// What the parent XORs into qword 0 of every data page after the fork.
pub const OVERWRITE_MASK: u64 = 0x5a5a_0f0f_f0f0_a5a5;
/// Exit code when `FORK` or `JOIN` failed.
pub const PARALLEL_FAILED: u32 = 255;

/// The parallel job's parameters.
#[derive(Debug, Clone, Copy)]
pub struct ParallelJob {
    /// Clones (shares).
    pub clones: u32,
    /// Data set size, bytes (a multiple of 4 KiB).
    pub data_bytes: u64,
    /// Data set seed.
    pub seed: u64,
}

/// Where the job puts things in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelLayout {
    /// Data set start.
    pub data: u64,
    /// Data set pages.
    pub data_pages: u64,
    /// Pages per share (the last share also takes the remainder).
    pub pages_per_share: u64,
    /// Scratch area start (hinted as discard before the fork).
    pub scratch: u64,
    /// Scratch area size.
    pub scratch_bytes: u64,
}

impl ParallelLayout {
    /// Pages of the share of clone `clone_id` (1-based): `[first, first + count)` of the data set.
    pub fn share(&self, clones: u32, clone_id: u32) -> (u64, u64) {
        let i = u64::from(clone_id.saturating_sub(1));
        let first = i * self.pages_per_share;
        let count = if clone_id == clones { self.data_pages - first } else { self.pages_per_share };
        (first, count)
    }
}

/// The checksum of data pages `[first, first + count)` as the guest computes it.
pub fn checksum(seed: u64, first: u64, count: u64) -> u64 {
    let mut acc = 0u64;
    for page in first..first + count {
        let (q0, q511) = data_page_words(seed, page);
        acc ^= q0;
        acc = acc.rotate_left(5);
        acc = acc.wrapping_add(q511);
    }
    acc
}

impl ParallelJob {
    /// The job for `mem_bytes` of guest memory with the default data set: 64 MiB, or as much as fits.
    pub fn for_memory(mem_bytes: u64, clones: u32, seed: u64) -> ParallelJob {
        let room = mem_bytes.saturating_sub(layout::DATA + SCRATCH_BYTES + (2 << 20));
        ParallelJob { clones, data_bytes: room.min(64 << 20) / PAGE_SIZE * PAGE_SIZE, seed }
    }

    /// Where things go in a VM of `mem_bytes`.
    pub fn layout(&self, mem_bytes: u64) -> Result<ParallelLayout, GuestError> {
        let bad = |reason: String| Err(GuestError::BadParams { program: PROGRAM, reason });
        let data_pages = self.data_bytes / PAGE_SIZE;
        if self.clones == 0 || u64::from(self.clones) > abi::MAX_CLONES {
            return bad(format!("clones must be in 1..={}, got {}", abi::MAX_CLONES, self.clones));
        }
        if !self.data_bytes.is_multiple_of(PAGE_SIZE) || data_pages < u64::from(self.clones) {
            return bad(format!(
                "the data set ({} bytes) must be whole pages, at least one per clone ({})",
                self.data_bytes, self.clones
            ));
        }
        let scratch = layout::DATA + self.data_bytes;
        if scratch + SCRATCH_BYTES > mem_bytes {
            return bad(format!(
                "{} bytes of data plus scratch do not fit in {mem_bytes} bytes of memory",
                self.data_bytes
            ));
        }
        if abi::join_entry_size(8) * u64::from(self.clones) > JOIN_BUF_END - JOIN_BUF {
            return bad(format!("{} clones overflow the join buffer", self.clones));
        }
        Ok(ParallelLayout {
            data: layout::DATA,
            data_pages,
            pages_per_share: data_pages / u64::from(self.clones),
            scratch,
            scratch_bytes: SCRATCH_BYTES,
        })
    }

    /// The checksum clone `clone_id` must report.
    pub fn expected(&self, l: &ParallelLayout, clone_id: u32) -> u64 {
        let (first, count) = l.share(self.clones, clone_id);
        checksum(self.seed, first, count)
    }

    /// Loads the data set, the parameters and the code into `vm` and boots it.
    pub fn install(&self, vm: &mut Vm) -> Result<ParallelLayout, GuestError> {
        let l = self.layout(vm.memory().size())?;
        load_data(vm, PROGRAM, l.data, l.data_pages, self.seed)?;
        let code = assemble().map_err(asm_err(PROGRAM))?;
        let params = [
            l.data,
            l.data_pages,
            u64::from(self.clones),
            l.pages_per_share,
            l.scratch,
            l.scratch_bytes,
            EXPECTED,
            JOIN_BUF,
            JOIN_BUF_END - JOIN_BUF,
            VERDICTS,
            OVERWRITE_MASK,
        ];
        install_code(vm, PROGRAM, &code, &params)?;
        Ok(l)
    }
}

pub(crate) fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut p = Prog::new()?;
    let mut share_bounds = p.a.create_label();
    let mut sum = p.a.create_label();
    let mut print_dec = p.a.create_label();
    let mut exp_loop = p.a.create_label();
    let mut parent = p.a.create_label();
    let mut failed = p.a.create_label();
    let mut overwrite = p.a.create_label();
    let mut check = p.a.create_label();
    let mut wrong = p.a.create_label();
    let mut sb_ret = p.a.create_label();

    p.a.mov(rbp, layout::PARAMS)?;
    p.print("parallel: computing expected checksums\n")?;
    // 1. expected[i] = checksum(share i)
    p.a.xor(r12d, r12d)?;
    p.a.set_label(&mut exp_loop)?;
    p.a.mov(rdi, r12)?;
    p.a.call(share_bounds)?;
    p.a.call(sum)?;
    p.a.mov(r8, qword_ptr(rbp + 48))?;
    p.a.mov(qword_ptr(r8 + r12 * 8), rax)?;
    p.a.inc(r12)?;
    p.a.cmp(r12, qword_ptr(rbp + 16))?;
    p.a.jb(exp_loop)?;
    // 2. HINT_DISCARD(scratch), FORK(N)
    p.a.mov(rdi, qword_ptr(rbp + 32))?;
    p.a.mov(rsi, qword_ptr(rbp + 40))?;
    p.hypercall(abi::HC_HINT_DISCARD)?;
    p.print("parallel: forking\n")?;
    p.a.mov(rdi, qword_ptr(rbp + 16))?;
    p.hypercall(abi::HC_FORK)?;
    p.a.test(rax, rax)?;
    p.a.jz(parent)?;
    p.a.cmp(rax, qword_ptr(rbp + 16))?;
    p.a.ja(failed)?;
    // 3. clone: checksum of share (id - 1), into scratch, REPORT, EXIT(0)
    p.a.mov(r12, rax)?;
    p.a.lea(rdi, ptr(rax - 1))?;
    p.a.call(share_bounds)?;
    p.a.call(sum)?;
    p.a.mov(r8, qword_ptr(rbp + 32))?;
    p.a.mov(qword_ptr(r8), rax)?;
    p.report_qword_and_exit(r8)?;

    // 4. parent: overwrite qword 0 of every data page
    p.a.set_label(&mut parent)?;
    p.a.mov(rbx, qword_ptr(rbp))?;
    p.a.mov(rcx, qword_ptr(rbp + 8))?;
    p.a.shl(rcx, 12u32)?;
    p.a.add(rcx, rbx)?;
    p.a.mov(r9, qword_ptr(rbp + 80))?;
    p.a.set_label(&mut overwrite)?;
    p.a.xor(qword_ptr(rbx), r9)?;
    p.a.add(rbx, PAGE_SIZE as i32)?;
    p.a.cmp(rbx, rcx)?;
    p.a.jb(overwrite)?;
    p.print("parallel: parent overwrote the data set, joining\n")?;
    // JOIN(buf, len) must return N
    p.a.mov(rdi, qword_ptr(rbp + 56))?;
    p.a.mov(rsi, qword_ptr(rbp + 64))?;
    p.hypercall(abi::HC_JOIN)?;
    p.a.cmp(rax, qword_ptr(rbp + 16))?;
    p.a.jne(failed)?;
    // check entries: rsi = entry, r14 = index, r13 = correct
    p.a.mov(rsi, qword_ptr(rbp + 56))?;
    p.a.xor(r13d, r13d)?;
    p.a.xor(r14d, r14d)?;
    p.a.mov(r15, qword_ptr(rbp + 72))?;
    p.a.set_label(&mut check)?;
    p.a.mov(byte_ptr(r15 + r14), 0u32)?;
    p.a.mov(eax, dword_ptr(rsi))?; // clone id
    p.a.lea(rdx, ptr(r14 + 1))?;
    p.a.cmp(rax, rdx)?;
    p.a.jne(wrong)?;
    p.a.cmp(dword_ptr(rsi + 4), 0u32)?; // status
    p.a.jne(wrong)?;
    p.a.cmp(dword_ptr(rsi + 8), 8u32)?; // length
    p.a.jne(wrong)?;
    p.a.mov(r8, qword_ptr(rbp + 48))?;
    p.a.mov(rax, qword_ptr(r8 + r14 * 8))?;
    p.a.cmp(rax, qword_ptr(rsi + 16))?;
    p.a.jne(wrong)?;
    p.a.inc(r13)?;
    p.a.mov(byte_ptr(r15 + r14), 1u32)?;
    p.a.set_label(&mut wrong)?;
    // next entry: rsi += 16 + align8(len)
    p.a.mov(edx, dword_ptr(rsi + 8))?;
    p.a.add(rdx, 7)?;
    p.a.and(rdx, -8)?;
    p.a.lea(rsi, ptr(rsi + rdx + 16))?;
    p.a.inc(r14)?;
    p.a.cmp(r14, qword_ptr(rbp + 16))?;
    p.a.jb(check)?;
    // REPORT(correct, verdicts, N)
    p.a.mov(rdi, r13)?;
    p.a.mov(rsi, r15)?;
    p.a.mov(rdx, qword_ptr(rbp + 16))?;
    p.a.mov(eax, abi::MAX_REPORT_BYTES as u32)?;
    p.a.cmp(rdx, rax)?;
    p.a.cmova(rdx, rax)?;
    p.hypercall(abi::HC_REPORT)?;
    p.print("parallel: ")?;
    p.a.mov(rdi, r13)?;
    p.a.call(print_dec)?;
    p.print(" of ")?;
    p.a.mov(rdi, qword_ptr(rbp + 16))?;
    p.a.call(print_dec)?;
    p.print(" clone results correct\n")?;
    // EXIT(N - correct)
    p.a.mov(rdi, qword_ptr(rbp + 16))?;
    p.a.sub(rdi, r13)?;
    p.hypercall(abi::HC_EXIT)?;

    p.a.set_label(&mut failed)?;
    p.print("parallel: FORK or JOIN failed\n")?;
    p.exit(PARALLEL_FAILED)?;

    // share_bounds(rdi = share index) -> rbx = first page address, rcx = end address
    p.a.set_label(&mut share_bounds)?;
    p.a.mov(rax, qword_ptr(rbp + 24))?;
    p.a.imul_2(rax, rdi)?;
    p.a.shl(rax, 12u32)?;
    p.a.mov(rbx, qword_ptr(rbp))?;
    p.a.add(rbx, rax)?;
    p.a.mov(rcx, qword_ptr(rbp + 24))?;
    p.a.shl(rcx, 12u32)?;
    p.a.add(rcx, rbx)?;
    p.a.lea(rax, ptr(rdi + 1))?;
    p.a.cmp(rax, qword_ptr(rbp + 16))?;
    p.a.jb(sb_ret)?;
    p.a.mov(rcx, qword_ptr(rbp + 8))?;
    p.a.shl(rcx, 12u32)?;
    p.a.add(rcx, qword_ptr(rbp))?;
    p.a.set_label(&mut sb_ret)?;
    p.a.ret()?;

    // sum(rbx = start, rcx = end) -> rax; two qwords per page
    let mut sum_loop = p.a.create_label();
    p.a.set_label(&mut sum)?;
    p.a.xor(eax, eax)?;
    p.a.set_label(&mut sum_loop)?;
    p.a.xor(rax, qword_ptr(rbx))?;
    p.a.rol(rax, 5u32)?;
    p.a.add(rax, qword_ptr(rbx + 4088))?;
    p.a.add(rbx, PAGE_SIZE as i32)?;
    p.a.cmp(rbx, rcx)?;
    p.a.jb(sum_loop)?;
    p.a.ret()?;

    p.print_dec_routine(&mut print_dec, PRINT_BUF_END)?;
    p.finish(layout::CODE)
}
