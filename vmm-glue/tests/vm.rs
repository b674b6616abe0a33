//! A single VM: long mode, console, hypercalls.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use vmm_glue::guest::Hello;
use vmm_glue::{NoCloneHost, Vm, VmConfig};

#[test]
fn long_mode_guest_prints_reports_and_exits() {
    if !common::can_run("long_mode_guest_prints_reports_and_exits") {
        return;
    }
    let out = common::bounded(Duration::from_secs(30), "hello guest", || {
        let mut vm = Vm::new(VmConfig { mem_bytes: 4 << 20, ..VmConfig::default() }).unwrap();
        let hello = Hello { n: 1000 };
        hello.install(&mut vm).unwrap();
        (vm.run(&mut NoCloneHost).unwrap(), hello.expected_sum())
    });
    let (outcome, sum) = out;
    let console = String::from_utf8_lossy(&outcome.console);
    assert_eq!(console, format!("hello from long mode\nsum = {sum}\n"));
    assert_eq!(outcome.exit_code, vmm_glue::guest::HELLO_EXIT);
    let report = outcome.own_report.unwrap();
    assert_eq!(report.status, vmm_glue::guest::HELLO_STATUS);
    assert_eq!(report.result, sum.to_le_bytes());
}

#[test]
fn hypercalls_refuse_bad_arguments_with_errno_codes() {
    if !common::can_run("hypercalls_refuse_bad_arguments_with_errno_codes") {
        return;
    }
    use iced_x86::code_asm::*;
    use vmm_glue::abi::{self, layout};
    use vmm_glue::GuestAddress;

    const OUT: u64 = 0x9000;
    // Each call's RAX is stored at OUT + 8 * i.
    let calls: [(u32, u64, u64, u64); 8] = [
        (abi::HC_JOIN, OUT + 0x100, 64, 0),            // no fork yet
        (abi::HC_REPORT, 0, OUT, 2000),                // result too long
        (99, 0, 0, 0),                                 // unknown call
        (abi::HC_CONSOLE_WRITE, (4 << 20) - 2, 16, 0), // past the end of memory
        (abi::HC_HINT_DISCARD, 0x100800, 0x3000, 0),   // fine (whole pages inside)
        (abi::HC_FORK, 0, 0, 0),                       // zero clones
        (abi::HC_FORK, 2, 0, 0),                       // this host cannot fork
        (abi::HC_CONSOLE_WRITE, layout::PARAMS, 0, 0), // empty write is fine
    ];
    let mut a = CodeAssembler::new(64).unwrap();
    for (i, &(nr, x, y, z)) in calls.iter().enumerate() {
        a.mov(rdi, x).unwrap();
        a.mov(rsi, y).unwrap();
        a.mov(rdx, z).unwrap();
        a.mov(eax, nr).unwrap();
        a.out(u32::from(abi::HYPERCALL_PORT), eax).unwrap();
        a.mov(rbx, OUT + 8 * i as u64).unwrap();
        a.mov(qword_ptr(rbx), rax).unwrap();
    }
    a.mov(edi, 7u32).unwrap();
    a.mov(eax, abi::HC_EXIT).unwrap();
    a.out(u32::from(abi::HYPERCALL_PORT), eax).unwrap();
    let code = a.assemble(layout::CODE).unwrap();

    let (outcome, got) = common::bounded(Duration::from_secs(30), "errno guest", move || {
        let mut vm = Vm::new(VmConfig { mem_bytes: 4 << 20, ..VmConfig::default() }).unwrap();
        vm.load(GuestAddress(layout::CODE), &code).unwrap();
        vm.boot_long_mode(layout::CODE).unwrap();
        let outcome = vm.run(&mut NoCloneHost).unwrap();
        let got: Vec<u64> = (0..8).map(|i| vm.memory().read_u64(GuestAddress(OUT + 8 * i)).unwrap()).collect();
        (outcome, got)
    });
    assert_eq!(outcome.exit_code, 7);
    assert_eq!(got, vec![abi::EPERM, abi::EINVAL, abi::ENOSYS, abi::EINVAL, 0, abi::EINVAL, abi::EPERM, 0]);
    assert!(outcome.host_errors.iter().any(|e| e.contains("does not support FORK")), "{:?}", outcome.host_errors);
    assert!(outcome.forks.iter().any(|f| f.error.is_some()));
}
