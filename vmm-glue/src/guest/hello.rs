//! `hello`: the smallest useful guest. Prints "hello from long mode" byte by byte on the console port,
//! then (with `CONSOLE_WRITE`) the sum 1 + 2 + ... + n for n from the parameter block, reports the sum
//! as its own result (status 7) and exits with code 42.
//!
//! Parameters: `+0` n.

use iced_x86::code_asm::*;

use super::asm::Prog;
use super::{asm_err, install_code, GuestError};
use crate::abi::{self, layout};
use crate::vm::Vm;

/// The `hello` guest.
#[derive(Debug, Clone, Copy)]
pub struct Hello {
    /// Sum 1..=n.
    pub n: u64,
}

impl Default for Hello {
    fn default() -> Self {
        Hello { n: 100 }
    }
}

/// Exit code of `hello`.
pub const HELLO_EXIT: u32 = 42;
/// Report status of `hello`.
pub const HELLO_STATUS: u32 = 7;

pub(crate) fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut p = Prog::new()?;
    let mut print_dec = p.a.create_label();
    let mut char_loop = p.a.create_label();
    let mut sum_loop = p.a.create_label();
    let (greeting, len) = p.string("hello from long mode\n");
    // Byte by byte on the console port.
    p.a.lea(rsi, ptr(greeting))?;
    p.a.mov(ecx, len)?;
    p.a.set_label(&mut char_loop)?;
    p.a.mov(al, byte_ptr(rsi))?;
    p.a.out(u32::from(abi::CONSOLE_PORT), al)?;
    p.a.inc(rsi)?;
    p.a.dec(ecx)?;
    p.a.jnz(char_loop)?;
    // sum = 1 + ... + n
    p.a.mov(rbp, layout::PARAMS)?;
    p.a.mov(rcx, qword_ptr(rbp))?;
    p.a.xor(ebx, ebx)?;
    p.a.set_label(&mut sum_loop)?;
    p.a.add(rbx, rcx)?;
    p.a.dec(rcx)?;
    p.a.jnz(sum_loop)?;
    p.a.mov(qword_ptr(rbp + 8), rbx)?;
    p.print("sum = ")?;
    p.a.mov(rdi, rbx)?;
    p.a.call(print_dec)?;
    p.print("\n")?;
    // REPORT(7, &sum, 8)
    p.a.mov(edi, HELLO_STATUS)?;
    p.a.lea(rsi, qword_ptr(rbp + 8))?;
    p.a.mov(edx, 8u32)?;
    p.hypercall(abi::HC_REPORT)?;
    p.exit(HELLO_EXIT)?;
    p.print_dec_routine(&mut print_dec, layout::WORK + 0x100)?;
    p.finish(layout::CODE)
}

impl Hello {
    /// Loads the program into `vm` and points the vCPU at it.
    pub fn install(&self, vm: &mut Vm) -> Result<(), GuestError> {
        if self.n == 0 {
            return Err(GuestError::BadParams { program: "hello", reason: "n must be at least 1".into() });
        }
        let code = assemble().map_err(asm_err("hello"))?;
        install_code(vm, "hello", &code, &[self.n])
    }

    /// The sum the guest reports.
    pub fn expected_sum(&self) -> u64 {
        self.n * (self.n + 1) / 2
    }
}
