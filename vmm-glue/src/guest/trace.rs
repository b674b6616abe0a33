//! `trace`: touches pages in the order of a trace list, for benchmarks.
//!
//! The VMM loads a data set (as [`super::data_page`]) at [`layout::DATA`] and, after it, the trace: a
//! list of u64 guest addresses (one per touch, pages of the data set). The guest `FORK`s N clones
//! (N = 0: no fork, the VM itself touches); each clone `MARK`s tag 1, reads one qword at every traced
//! address in order (adding them up), `MARK`s tag 2, `REPORT`s the sum (status 0, 8 bytes) and exits 0.
//! The parent `JOIN`s and exits 0 if all N reported, 255 otherwise.
//!
//! Parameters (u64 at `PARAMS +`): 0 trace address, 8 trace entries, 16 clones, 24 scratch address
//! (8 bytes, hinted as discard), 32 join buffer, 40 join buffer bytes, 48 spin: iterations of an
//! empty loop after each touch (a job that computes between touches; each iteration is two
//! instructions).

use iced_x86::code_asm::*;

use super::asm::Prog;
use super::{asm_err, data_page_words, install_code, load_data, GuestError};
use crate::abi::{self, layout, PAGE_SIZE};
use crate::vm::Vm;

const PROGRAM: &str = "trace";
const JOIN_BUF: u64 = layout::WORK + 0x20000;
const JOIN_BUF_END: u64 = layout::WORK + layout::WORK_SIZE;
const SCRATCH: u64 = layout::WORK + 0x1000;
/// `MARK` tag before the first touch.
pub const MARK_START: u64 = 1;
/// `MARK` tag after the last touch.
pub const MARK_END: u64 = 2;

/// The trace job.
#[derive(Debug, Clone)]
pub struct TraceJob {
    /// Clones (0: the VM touches the pages itself, without forking).
    pub clones: u32,
    /// Data set pages.
    pub data_pages: u64,
    /// Data set seed.
    pub seed: u64,
    /// Data set pages to touch, in order.
    pub trace: Vec<u64>,
    /// Iterations of an empty loop after each touch (0: none).
    pub spin: u64,
}

impl TraceJob {
    /// `count` distinct pages of `[0, data_pages)` in a random order derived from `seed`.
    pub fn shuffled_trace(data_pages: u64, count: u64, seed: u64) -> Vec<u64> {
        let mut pages: Vec<u64> = (0..data_pages).collect();
        let n = count.min(data_pages) as usize;
        let mut state = seed;
        for i in 0..n {
            state = super::splitmix64(state);
            let j = i + (state % (pages.len() - i) as u64) as usize;
            pages.swap(i, j);
        }
        pages.truncate(n);
        pages
    }

    /// The sum each clone reports: qword 0 of every traced page, added up.
    pub fn expected_sum(&self) -> u64 {
        self.trace.iter().fold(0u64, |acc, &p| acc.wrapping_add(data_page_words(self.seed, p).0))
    }

    /// Loads data, trace, parameters and code into `vm` and boots it.
    pub fn install(&self, vm: &mut Vm) -> Result<(), GuestError> {
        let bad = |reason: String| Err(GuestError::BadParams { program: PROGRAM, reason });
        if self.trace.is_empty() {
            return bad("the trace is empty".into());
        }
        if let Some(p) = self.trace.iter().find(|&&p| p >= self.data_pages) {
            return bad(format!("trace page {p} is outside the data set ({} pages)", self.data_pages));
        }
        if abi::join_entry_size(8) * u64::from(self.clones) > JOIN_BUF_END - JOIN_BUF {
            return bad(format!("{} clones overflow the join buffer", self.clones));
        }
        let trace_addr = layout::DATA + self.data_pages * PAGE_SIZE;
        let trace_bytes = self.trace.len() as u64 * 8;
        if trace_addr + trace_bytes > vm.memory().size() {
            return bad(format!(
                "{} data pages and {} trace entries do not fit in {} bytes",
                self.data_pages,
                self.trace.len(),
                vm.memory().size()
            ));
        }
        load_data(vm, PROGRAM, layout::DATA, self.data_pages, self.seed)?;
        let list: Vec<u8> = self.trace.iter().flat_map(|&p| (layout::DATA + p * PAGE_SIZE).to_le_bytes()).collect();
        vm.load(crate::memory::GuestAddress(trace_addr), &list)
            .map_err(|source| GuestError::Load { program: PROGRAM, source: Box::new(source) })?;
        let code = assemble().map_err(asm_err(PROGRAM))?;
        let params = [
            trace_addr,
            self.trace.len() as u64,
            u64::from(self.clones),
            SCRATCH,
            JOIN_BUF,
            JOIN_BUF_END - JOIN_BUF,
            self.spin,
        ];
        install_code(vm, PROGRAM, &code, &params)
    }
}

pub(crate) fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut p = Prog::new()?;
    let mut touch = p.a.create_label();
    let mut parent = p.a.create_label();
    let mut failed = p.a.create_label();
    let mut worker = p.a.create_label();

    p.a.mov(rbp, layout::PARAMS)?;
    p.a.mov(rdi, qword_ptr(rbp + 16))?;
    p.a.test(rdi, rdi)?;
    p.a.jz(worker)?;
    p.a.mov(rdi, qword_ptr(rbp + 24))?;
    p.a.mov(esi, PAGE_SIZE as u32)?;
    p.hypercall(abi::HC_HINT_DISCARD)?;
    p.a.mov(rdi, qword_ptr(rbp + 16))?;
    p.hypercall(abi::HC_FORK)?;
    p.a.test(rax, rax)?;
    p.a.jz(parent)?;
    p.a.cmp(rax, qword_ptr(rbp + 16))?;
    p.a.ja(failed)?;
    // worker (clone, or the VM itself without clones)
    p.a.set_label(&mut worker)?;
    p.a.mov(edi, MARK_START as u32)?;
    p.hypercall(abi::HC_MARK)?;
    p.a.call(touch)?;
    p.a.mov(rbx, qword_ptr(rbp + 24))?;
    p.a.mov(qword_ptr(rbx), rax)?;
    p.a.mov(edi, MARK_END as u32)?;
    p.hypercall(abi::HC_MARK)?;
    p.report_qword_and_exit(rbx)?;

    p.a.set_label(&mut parent)?;
    p.a.mov(rdi, qword_ptr(rbp + 32))?;
    p.a.mov(rsi, qword_ptr(rbp + 40))?;
    p.hypercall(abi::HC_JOIN)?;
    p.a.cmp(rax, qword_ptr(rbp + 16))?;
    p.a.jne(failed)?;
    p.exit(0)?;
    p.a.set_label(&mut failed)?;
    p.print("trace: FORK or JOIN failed\n")?;
    p.exit(255)?;

    // touch() -> rax = sum of the first qword of every traced page
    let mut touch_loop = p.a.create_label();
    let mut spin = p.a.create_label();
    let mut next = p.a.create_label();
    p.a.set_label(&mut touch)?;
    p.a.mov(rsi, qword_ptr(rbp))?;
    p.a.mov(rcx, qword_ptr(rbp + 8))?;
    p.a.xor(eax, eax)?;
    p.a.set_label(&mut touch_loop)?;
    p.a.mov(rdx, qword_ptr(rsi))?;
    p.a.add(rax, qword_ptr(rdx))?;
    p.a.mov(r8, qword_ptr(rbp + 48))?;
    p.a.test(r8, r8)?;
    p.a.jz(next)?;
    p.a.set_label(&mut spin)?;
    p.a.dec(r8)?;
    p.a.jnz(spin)?;
    p.a.set_label(&mut next)?;
    p.a.add(rsi, 8)?;
    p.a.dec(rcx)?;
    p.a.jnz(touch_loop)?;
    p.a.ret()?;
    p.finish(layout::CODE)
}
