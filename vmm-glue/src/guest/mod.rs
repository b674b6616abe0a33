//! Guest programs built into the VMM, assembled at run time with iced-x86 (no toolchain download).
//!
//! Every guest instruction is emulated on the development machine (~0.65 µs each), so the programs
//! touch pages rather than fill them: the VMM loads their data set into guest memory before the start
//! (as a disk read would) and the guest does a few instructions per page.
//!
//! * [`hello`]: prints on the console in long mode, computes a sum, reports it and exits with 42.
//! * [`parallel`]: the SnowFlock-style parallel job (see [`ParallelJob`]).
//! * [`trace`]: touches pages in the order of a trace list (for benchmarks), in clones after a fork.
//!
//! Each program reads its parameters from the block at [`crate::abi::layout::PARAMS`] (u64 fields,
//! documented per program), so the code does not depend on sizes.

mod asm;
pub mod hello;
pub mod parallel;
pub mod trace;

pub use hello::{Hello, HELLO_EXIT, HELLO_STATUS};
pub use parallel::{checksum, ParallelJob, ParallelLayout, OVERWRITE_MASK, PARALLEL_FAILED};
pub use trace::{TraceJob, MARK_END, MARK_START};

use crate::abi::{layout, PAGE_SIZE};
use crate::memory::GuestAddress;
use crate::vm::{Vm, VmError};

/// What went wrong building or installing a guest program.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The assembler refused the program (a bug in the program text).
    #[error("assembling the {program} guest failed: {source}")]
    Assemble {
        /// Which program.
        program: &'static str,
        /// The assembler's error.
        #[source]
        source: iced_x86::IcedError,
    },
    /// Parameters that do not fit the VM.
    #[error("bad {program} guest parameters: {reason}")]
    BadParams {
        /// Which program.
        program: &'static str,
        /// Why.
        reason: String,
    },
    /// Loading into the VM failed.
    #[error("loading the {program} guest into the VM failed")]
    Load {
        /// Which program.
        program: &'static str,
        /// The VM's error.
        #[source]
        source: Box<VmError>,
    },
}

fn asm_err(program: &'static str) -> impl FnOnce(iced_x86::IcedError) -> GuestError {
    move |source| GuestError::Assemble { program, source }
}

fn load_err(program: &'static str) -> impl FnOnce(VmError) -> GuestError {
    move |source| GuestError::Load { program, source: Box::new(source) }
}

/// Installs assembled code and a parameter block, and boots the vCPU at the code.
fn install_code(vm: &mut Vm, program: &'static str, code: &[u8], params: &[u64]) -> Result<(), GuestError> {
    if code.len() as u64 > layout::CODE_MAX {
        return Err(GuestError::BadParams { program, reason: format!("code is {} bytes", code.len()) });
    }
    let p: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
    vm.load(GuestAddress(layout::PARAMS), &p).map_err(load_err(program))?;
    vm.load(GuestAddress(layout::CODE), code).map_err(load_err(program))?;
    vm.boot_long_mode(layout::CODE).map_err(load_err(program))
}

/// splitmix64: the deterministic generator behind the data sets.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The bytes of page `page` of the data set with `seed`: every qword is derived from the seed and the
/// page, never all zero. The guests read qword 0 and qword 511.
pub fn data_page(seed: u64, page: u64, out: &mut [u8]) {
    let base = splitmix64(seed ^ page.wrapping_mul(0x1000_0000_01b3));
    for (i, q) in out.chunks_exact_mut(8).enumerate() {
        let v = base.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
        q.copy_from_slice(&v.to_le_bytes());
    }
}

/// Loads `pages` pages of the data set at `addr` (1 MiB at a time).
fn load_data(vm: &mut Vm, program: &'static str, addr: u64, pages: u64, seed: u64) -> Result<(), GuestError> {
    let chunk_pages = 256u64;
    let mut buf = vec![0u8; (chunk_pages * PAGE_SIZE) as usize];
    let mut p = 0;
    while p < pages {
        let n = chunk_pages.min(pages - p);
        for i in 0..n {
            let s = (i * PAGE_SIZE) as usize;
            data_page(seed, p + i, &mut buf[s..s + PAGE_SIZE as usize]);
        }
        vm.load(GuestAddress(addr + p * PAGE_SIZE), &buf[..(n * PAGE_SIZE) as usize]).map_err(load_err(program))?;
        p += n;
    }
    Ok(())
}

/// The first and last qwords of data page `page`.
pub fn data_page_words(seed: u64, page: u64) -> (u64, u64) {
    let mut buf = [0u8; PAGE_SIZE as usize];
    data_page(seed, page, &mut buf);
    let first = u64::from_le_bytes(buf[..8].try_into().unwrap_or([0; 8]));
    let last = u64::from_le_bytes(buf[4088..].try_into().unwrap_or([0; 8]));
    (first, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_pages_are_deterministic_distinct_and_never_zero() {
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        data_page(7, 3, &mut a);
        data_page(7, 3, &mut b);
        assert_eq!(a, b);
        data_page(7, 4, &mut b);
        assert_ne!(a, b);
        assert!(a.chunks_exact(8).all(|q| q != [0; 8]));
    }

    #[test]
    fn programs_assemble() {
        assert!(hello::assemble().is_ok());
        assert!(parallel::assemble().is_ok());
        assert!(trace::assemble().is_ok());
    }
}
