//! Assembler helpers shared by the guest programs (iced-x86's `code_asm`, at run time: no toolchain).

use iced_x86::code_asm::*;

use crate::abi;

/// A guest program being assembled.
pub(crate) struct Prog {
    pub(crate) a: CodeAssembler,
    /// Strings to place after the code: (label, bytes).
    strings: Vec<(CodeLabel, Vec<u8>)>,
}

pub(crate) type R = Result<(), IcedError>;

impl Prog {
    pub(crate) fn new() -> Result<Prog, IcedError> {
        Ok(Prog { a: CodeAssembler::new(64)?, strings: Vec::new() })
    }

    /// `mov eax, nr; out HYPERCALL_PORT, eax` (arguments already in rdi, rsi, rdx).
    pub(crate) fn hypercall(&mut self, nr: u32) -> R {
        self.a.mov(eax, nr)?;
        self.a.out(u32::from(abi::HYPERCALL_PORT), eax)
    }

    /// A string constant; returns its label and length.
    pub(crate) fn string(&mut self, s: &str) -> (CodeLabel, u32) {
        let label = self.a.create_label();
        self.strings.push((label, s.as_bytes().to_vec()));
        (label, s.len() as u32)
    }

    /// `CONSOLE_WRITE` of a string constant.
    pub(crate) fn print(&mut self, s: &str) -> R {
        let (label, len) = self.string(s);
        self.a.lea(rdi, ptr(label))?;
        self.a.mov(esi, len)?;
        self.hypercall(abi::HC_CONSOLE_WRITE)
    }

    /// Emits the `print_dec` routine at `label`: prints rdi in decimal. Clobbers rax, rcx, rdx, rsi,
    /// rdi, r8. Uses the 32 bytes below `buf_end` as its buffer.
    pub(crate) fn print_dec_routine(&mut self, label: &mut CodeLabel, buf_end: u64) -> R {
        let mut digit = self.a.create_label();
        self.a.set_label(label)?;
        self.a.mov(rax, rdi)?;
        self.a.mov(r8, buf_end)?;
        self.a.mov(ecx, 10u32)?;
        self.a.set_label(&mut digit)?;
        self.a.xor(edx, edx)?;
        self.a.div(rcx)?;
        self.a.add(dl, b'0' as u32)?;
        self.a.dec(r8)?;
        self.a.mov(byte_ptr(r8), dl)?;
        self.a.test(rax, rax)?;
        self.a.jnz(digit)?;
        self.a.mov(rdi, r8)?;
        self.a.mov(rsi, buf_end)?;
        self.a.sub(rsi, r8)?;
        self.hypercall(abi::HC_CONSOLE_WRITE)?;
        self.a.ret()
    }

    /// `EXIT(code)` with an immediate code.
    pub(crate) fn exit(&mut self, code: u32) -> R {
        self.a.mov(edi, code)?;
        self.hypercall(abi::HC_EXIT)
    }

    /// `REPORT(0, at, 8)`, then `EXIT(0)`: a clone reports the 8-byte result at address `at` and ends.
    pub(crate) fn report_qword_and_exit(&mut self, at: AsmRegister64) -> R {
        self.a.xor(edi, edi)?;
        self.a.mov(rsi, at)?;
        self.a.mov(edx, 8u32)?;
        self.hypercall(abi::HC_REPORT)?;
        self.exit(0)
    }

    /// Places the strings and assembles for `ip`.
    pub(crate) fn finish(mut self, ip: u64) -> Result<Vec<u8>, IcedError> {
        for (mut label, bytes) in std::mem::take(&mut self.strings) {
            self.a.set_label(&mut label)?;
            self.a.db(&bytes)?;
        }
        self.a.assemble(ip)
    }
}
