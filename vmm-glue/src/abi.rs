//! The guest's view of the VMM: the hypercall ABI (the cloning API) and the fixed guest-physical
//! layout every built-in guest program uses.
//!
//! # Hypercalls
//!
//! A hypercall is one port write: the guest loads the call number into `EAX`, its arguments into
//! `RDI`, `RSI`, `RDX` (in that order, like the first arguments of a System V call) and executes
//! `out HYPERCALL_PORT, eax` (`E7 F5`). The VMM handles the exit, writes the result into `RAX` and
//! resumes the guest after the `out`. Results at or above [`ERR_BASE`] (`-4095..=-1` as `i64`) are
//! errors: the negated Linux errno values below.
//!
//! | nr | name | `RDI` | `RSI` | `RDX` | `RAX` on return |
//! |---|---|---|---|---|---|
//! | 0 | `CONSOLE_WRITE` | guest address | length (≤ [`MAX_CONSOLE_WRITE`]) | | bytes written |
//! | 1 | `FORK` | clone count (1..=[`MAX_CLONES`]) | | | 0 in the parent; in clone *i* (1-based) *i* |
//! | 2 | `REPORT` | status (u32) | result address | result length (≤ [`MAX_REPORT_BYTES`]) | 0 |
//! | 3 | `JOIN` | buffer address | buffer length | | reports written (see below) |
//! | 4 | `HINT_DISCARD` | guest address | length | | 0 |
//! | 5 | `EXIT` | exit code (u32) | | | does not return |
//! | 6 | `MARK` | tag (u64) | | | 0; the VMM records (tag, host time) |
//!
//! * `FORK`: the VMM pauses the VM, captures a [`crate::Descriptor`] and asks its
//!   [`crate::CloneHost`] for `count` clones. Each clone starts from that descriptor with `RAX` set to
//!   its clone id, i.e. it returns from the same `out` instruction. The fork id stays internal: `JOIN`
//!   refers to the most recent fork.
//! * `REPORT`: in a clone, its result for the parent's `JOIN`. In a VM that is not a clone, the result
//!   is kept as the VM's own result (the command line prints it).
//! * `JOIN`: in the parent, blocks until every clone of the most recent fork has reported (bounded by
//!   the VMM's join time-out: then `-ETIMEDOUT`). The reports are written to the buffer ordered by clone
//!   id, each as a 16-byte header `{clone_id: u32, status: u32, len: u32, reserved: u32}` followed by
//!   `len` result bytes padded to a multiple of 8 ([`join_entry_size`]). Returns how many entries
//!   were written: as many whole entries as fit.
//! * `HINT_DISCARD`: the whole pages inside `[addr, addr + len)` hold nothing the guest needs at the
//!   next fork (it will overwrite them, or has freed them). Clones of that fork never fetch them: they
//!   start as zero pages. Hints apply to the next fork only.
//! * `EXIT`: the VM stops; the code is the VM's exit code.
//!
//! Console: every byte written with `out CONSOLE_PORT, al` (port `0xE9`, Bochs' debug port) is console
//! output, as is `CONSOLE_WRITE`.
//!
//! Errors: `-EINVAL` (bad argument or address), `-ENOSYS` (unknown call), `-EPERM` (call not allowed
//! here: `JOIN` without a fork, `FORK` in a clone of a host that cannot nest), `-ETIMEDOUT` (`JOIN`
//! waited too long), `-EIO` (the clone host failed: a clone died, a transport broke).

/// Port of the console: one byte per `out`.
pub const CONSOLE_PORT: u16 = 0xE9;
/// Port of the hypercalls: `out HYPERCALL_PORT, eax` with the call number in `EAX`.
pub const HYPERCALL_PORT: u16 = 0xF5;

/// `CONSOLE_WRITE(addr, len)`.
pub const HC_CONSOLE_WRITE: u32 = 0;
/// `FORK(count)`.
pub const HC_FORK: u32 = 1;
/// `REPORT(status, addr, len)`.
pub const HC_REPORT: u32 = 2;
/// `JOIN(buf, buf_len)`.
pub const HC_JOIN: u32 = 3;
/// `HINT_DISCARD(addr, len)`.
pub const HC_HINT_DISCARD: u32 = 4;
/// `EXIT(code)`.
pub const HC_EXIT: u32 = 5;
/// `MARK(tag)`.
pub const HC_MARK: u32 = 6;

/// Most clones one `FORK` may ask for.
pub const MAX_CLONES: u64 = 4096;
/// Largest `REPORT` result.
pub const MAX_REPORT_BYTES: u64 = 1024;
/// Largest single `CONSOLE_WRITE`.
pub const MAX_CONSOLE_WRITE: u64 = 4096;
/// Size of a `JOIN` entry header.
pub const JOIN_HEADER_BYTES: u64 = 16;

/// Results at or above this are errors (`-4095..=-1`).
pub const ERR_BASE: u64 = (-4095i64) as u64;
/// Bad argument or address.
pub const EINVAL: u64 = (-22i64) as u64;
/// Unknown call.
pub const ENOSYS: u64 = (-38i64) as u64;
/// Not allowed here.
pub const EPERM: u64 = (-1i64) as u64;
/// `JOIN` timed out.
pub const ETIMEDOUT: u64 = (-110i64) as u64;
/// The clone host failed.
pub const EIO: u64 = (-5i64) as u64;

/// Bytes a `JOIN` entry with `len` result bytes takes in the buffer.
pub fn join_entry_size(len: u64) -> u64 {
    JOIN_HEADER_BYTES + len.div_ceil(8) * 8
}

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;

/// Fixed guest-physical layout of the built-in guests (identity mapped, so guest-virtual is the same).
pub mod layout {
    /// The GDT (null, 64-bit code, data).
    pub const GDT: u64 = 0x1000;
    /// PML4.
    pub const PML4: u64 = 0x2000;
    /// The one PDPT.
    pub const PDPT: u64 = 0x3000;
    /// Four page directories (2 MiB pages), mapping up to 4 GiB.
    pub const PD: u64 = 0x4000;
    /// Most guest memory the page tables map.
    pub const MAX_MAPPED: u64 = 4 << 30;
    /// The parameter block the VMM fills for the guest program (see [`crate::guest`]).
    pub const PARAMS: u64 = 0x8000;
    /// Guest code.
    pub const CODE: u64 = 0x10000;
    /// Largest guest program.
    pub const CODE_MAX: u64 = 0x10000;
    /// Top of the stack (it grows down to 0x20000).
    pub const STACK_TOP: u64 = 0x80000;
    /// Guest work area (tables, join buffer): `[WORK, WORK + WORK_SIZE)`.
    pub const WORK: u64 = 0x80000;
    /// Size of the work area.
    pub const WORK_SIZE: u64 = 0x180000;
    /// Where data sets start (2 MiB).
    pub const DATA: u64 = 0x200000;
    /// 64-bit code selector.
    pub const CODE_SELECTOR: u16 = 0x8;
    /// Data selector.
    pub const DATA_SELECTOR: u16 = 0x10;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_in_the_error_range() {
        for e in [EINVAL, ENOSYS, EPERM, ETIMEDOUT, EIO] {
            assert!(e >= ERR_BASE);
        }
        const { assert!(MAX_CLONES < ERR_BASE) };
    }

    #[test]
    fn join_entries_are_8_byte_aligned() {
        assert_eq!(join_entry_size(0), 16);
        assert_eq!(join_entry_size(1), 24);
        assert_eq!(join_entry_size(8), 24);
        assert_eq!(join_entry_size(9), 32);
    }

    #[test]
    fn layout_regions_do_not_overlap() {
        use layout::*;
        const {
            assert!(PD + 4 * 0x1000 <= PARAMS);
            assert!(CODE + CODE_MAX <= STACK_TOP - 0x10000);
            assert!(WORK + WORK_SIZE <= DATA);
        };
    }
}
