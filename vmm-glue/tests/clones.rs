//! The parallel job forked into in-process clones: results, isolation, image equality, zero-page
//! avoidance, a captured descriptor, and a clone whose memory handler vanishes.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use vmm_glue::guest::{ParallelJob, ParallelLayout, PARALLEL_FAILED};
use vmm_glue::local::VanishAfter;
use vmm_glue::{Descriptor, LocalHost, LocalHostConfig, RunOutcome, Vm, VmConfig, ZeroMapMethod};

const MEM: u64 = 32 << 20;
const DATA: u64 = 16 << 20;

fn parallel_vm(clones: u32, seed: u64, verify_image: bool) -> (Vm, ParallelJob, ParallelLayout) {
    let config =
        VmConfig { mem_bytes: MEM, verify_image, join_timeout: Duration::from_secs(30), ..VmConfig::default() };
    let mut vm = Vm::new(config).unwrap();
    let job = ParallelJob { clones, data_bytes: DATA, seed };
    let layout = job.install(&mut vm).unwrap();
    (vm, job, layout)
}

struct Run {
    outcome: RunOutcome,
    host: LocalHost,
    job: ParallelJob,
    layout: ParallelLayout,
}

fn run_parallel(clones: u32, seed: u64, verify_image: bool, config: LocalHostConfig) -> Run {
    common::bounded(Duration::from_secs(60), "parallel job", move || {
        let (mut vm, job, layout) = parallel_vm(clones, seed, verify_image);
        let mut host = LocalHost::new(config);
        let outcome = vm.run(&mut host).unwrap();
        let fork = outcome.forks[0].fork_id;
        let done = host.wait_clones(fork, Duration::from_secs(30)).unwrap().len();
        assert_eq!(done, clones as usize, "not every clone finished");
        Run { outcome, host, job, layout }
    })
}

#[test]
fn parallel_job_with_four_local_clones() {
    if !common::can_run("parallel_job_with_four_local_clones") {
        return;
    }
    let Run { outcome, mut host, job, layout } =
        run_parallel(4, 11, true, LocalHostConfig { verify_image: true, ..LocalHostConfig::default() });
    let console = String::from_utf8_lossy(&outcome.console);
    assert!(console.contains("parallel: 4 of 4 clone results correct"), "console: {console}");
    assert_eq!(outcome.exit_code, 0, "console: {console}");
    assert_eq!(outcome.own_report.as_ref().map(|r| r.status), Some(4));

    let fork = &outcome.forks[0];
    assert!(fork.error.is_none());
    eprintln!(
        "fork: pause {} µs (capture {} µs, host {} µs), descriptor {} bytes, zero map {} pages / {} runs ({:?}), \
         {} discard pages",
        fork.pause_us,
        fork.capture_us,
        fork.host_us,
        fork.descriptor_bytes,
        fork.zero_pages,
        fork.zero_runs,
        fork.zero_map_method,
        fork.discard_pages
    );
    // Reports as the parent's JOIN saw them: one per clone, ids 1..=4, each the checksum the host
    // computes from the data set as loaded (the parent overwrote it after the fork).
    let join = &outcome.joins[0];
    let ids: BTreeSet<u32> = join.reports.iter().map(|r| r.clone_id).collect();
    assert_eq!(ids, (1..=4).collect());
    for r in &join.reports {
        assert_eq!(r.status, 0);
        assert_eq!(r.result, job.expected(&layout, r.clone_id).to_le_bytes(), "clone {}", r.clone_id);
    }
    // The parent's overwrite changed every data page, so a clone that saw it would have a different sum.
    let overwritten = {
        let mut acc = 0u64;
        let (first, count) = layout.share(4, 1);
        for p in first..first + count {
            let (q0, q511) = vmm_glue::guest::data_page_words(11, p);
            acc = (acc ^ (q0 ^ vmm_glue::guest::OVERWRITE_MASK)).rotate_left(5).wrapping_add(q511);
        }
        acc
    };
    assert_ne!(overwritten.to_le_bytes().to_vec(), join.reports[0].result);

    let fork_id = fork.fork_id;
    let outs = host.wait_clones(fork_id, Duration::from_secs(30)).unwrap();
    for (id, o) in outs {
        let r = o.result.as_ref().unwrap_or_else(|e| panic!("clone {id}: {e}"));
        assert_eq!(r.exit_code, 0);
        let start = o.start.as_ref().unwrap();
        assert_eq!(start.image_matches, Some(true), "clone {id}'s memory differs from the parent's at the fork");
        // The zero map and the discard hints (which may overlap) were installed as zero pages.
        assert!(start.prezeroed_pages >= fork.zero_pages.max(fork.discard_pages));
        assert!(start.prezeroed_pages <= fork.zero_pages + fork.discard_pages);
    }
    let state = host.fork_state(fork_id).unwrap();
    assert_eq!(fork.zero_map_method, ZeroMapMethod::DirtyLog);
    assert_eq!(state.zero_map_violations(), 0, "the zero map holds pages that are not zero");
}

#[test]
fn zero_and_discarded_pages_are_never_fetched_and_clones_fetch_little() {
    if !common::can_run("zero_and_discarded_pages_are_never_fetched_and_clones_fetch_little") {
        return;
    }
    let Run { outcome, mut host, .. } =
        run_parallel(4, 5, false, LocalHostConfig { read_ahead_pages: 0, ..LocalHostConfig::default() });
    assert_eq!(outcome.exit_code, 0);
    let fork = outcome.forks[0].fork_id;
    let outs = host.wait_clones(fork, Duration::from_secs(30)).unwrap();
    let pages = MEM / 4096;
    for (id, o) in outs {
        let stats = o.server.as_ref().unwrap();
        // A quarter of the data set plus code, stack and tables: far less than memory.
        assert!(stats.pages_copied + stats.pages_zeroed < pages / 3, "clone {id} installed {stats:?}");
        assert!(stats.faults > 0);
    }
    let state = host.fork_state(fork).unwrap();
    let faulted = state.source.faults().faulted_pages();
    let avoided = state.source.avoided().clone();
    assert!(avoided.page_count() > 1000, "expected a large zero map, got {} pages", avoided.page_count());
    for run in avoided.iter() {
        for p in run.start..run.end() {
            assert_eq!(state.source.faults().count(p), 0, "avoided page {p} was fetched");
        }
    }
    assert!(faulted.page_count() > 0);
    eprintln!("clones faulted {} distinct pages of {pages}", faulted.page_count());
}

#[test]
fn captured_descriptor_roundtrips_and_describes_the_fork() {
    if !common::can_run("captured_descriptor_roundtrips_and_describes_the_fork") {
        return;
    }
    let (outcome, rec, layout) = common::bounded(Duration::from_secs(60), "recording run", || {
        let (mut vm, _, layout) = parallel_vm(3, 2, true);
        let mut rec = common::Recorder::default();
        (vm.run(&mut rec).unwrap(), rec, layout)
    });
    // The join failed, so the guest says so.
    assert_eq!(outcome.exit_code, PARALLEL_FAILED);
    assert!(outcome.host_errors.iter().any(|e| e.contains("fork 1 is unknown")), "{:?}", outcome.host_errors);
    let d = rec.descriptor.unwrap();
    let bytes = d.encode();
    assert_eq!(Descriptor::decode(&bytes).unwrap(), d);
    assert_eq!(bytes.len() as u64, outcome.forks[0].descriptor_bytes);
    eprintln!("descriptor for {} MiB: {} bytes", MEM >> 20, bytes.len());
    assert!(bytes.len() < 4096, "descriptor is {} bytes", bytes.len());
    assert_eq!((d.fork_id, d.clone_count), (1, 3));
    assert_eq!(d.vcpus[0].regs.rax, 0, "the parent's FORK return value");
    assert_eq!(d.vcpus[0].sregs.efer & 0x500, 0x500, "long mode");
    // The data set is loaded, so none of it is in the zero map; the pages above it are.
    let data_pages = layout.data / 4096..layout.data / 4096 + layout.data_pages;
    assert!(!d.zero_pages.intersects(data_pages.start, data_pages.end - data_pages.start));
    assert!(d.zero_pages.contains(MEM / 4096 - 1));
    assert!(d.discard_pages.contains(layout.scratch / 4096));
    for run in d.zero_pages.iter() {
        for p in run.start..run.end() {
            let page = &rec.image[(p * 4096) as usize..((p + 1) * 4096) as usize];
            assert!(page.iter().all(|&b| b == 0), "zero-map page {p} is not zero");
        }
    }
    // The guest's own writes (the expected-checksum table, the stack) are not in the zero map.
    assert!(!d.zero_pages.contains(vmm_glue::abi::layout::WORK / 4096));
    assert!(!d.zero_pages.contains(vmm_glue::abi::layout::STACK_TOP / 4096 - 1));
}

#[test]
fn a_clone_whose_handler_vanishes_fails_visibly() {
    if !common::can_run("a_clone_whose_handler_vanishes_fails_visibly") {
        return;
    }
    let config = LocalHostConfig { vanish: Some((2, VanishAfter(3))), ..LocalHostConfig::default() };
    let Run { outcome, mut host, .. } = run_parallel(3, 9, false, config);
    assert_eq!(outcome.exit_code, PARALLEL_FAILED, "console: {}", String::from_utf8_lossy(&outcome.console));
    assert!(outcome.host_errors.iter().any(|e| e.contains("clone 2")), "{:?}", outcome.host_errors);
    let outs = host.wait_clones(outcome.forks[0].fork_id, Duration::from_secs(30)).unwrap();
    let err = outs[&2].result.as_ref().unwrap_err();
    assert!(err.contains("memory handler is gone"), "clone 2 ended with: {err}");
    for id in [1, 3] {
        assert!(outs[&id].result.is_ok(), "clone {id}: {:?}", outs[&id].result);
    }
}

#[test]
fn trace_guest_touches_exactly_its_trace_in_clones() {
    if !common::can_run("trace_guest_touches_exactly_its_trace_in_clones") {
        return;
    }
    use vmm_glue::guest::{TraceJob, MARK_END, MARK_START};
    let data_pages = 2048;
    let trace = TraceJob::shuffled_trace(data_pages, 300, 4);
    let job = TraceJob { clones: 2, data_pages, seed: 4, trace: trace.clone(), spin: 0 };
    let expected = job.expected_sum();
    let (outcome, mut host) = common::bounded(Duration::from_secs(60), "trace job", move || {
        let mut vm = Vm::new(VmConfig { mem_bytes: 16 << 20, ..VmConfig::default() }).unwrap();
        job.install(&mut vm).unwrap();
        let mut host = LocalHost::new(LocalHostConfig { read_ahead_pages: 0, ..LocalHostConfig::default() });
        (vm.run(&mut host).unwrap(), host)
    });
    assert_eq!(outcome.exit_code, 0, "console: {}", String::from_utf8_lossy(&outcome.console));
    for r in &outcome.joins[0].reports {
        assert_eq!(r.result, expected.to_le_bytes(), "clone {}", r.clone_id);
    }
    let fork = outcome.forks[0].fork_id;
    for (id, o) in host.wait_clones(fork, Duration::from_secs(30)).unwrap() {
        let r = o.result.as_ref().unwrap();
        let tags: Vec<u64> = r.marks.iter().map(|m| m.0).collect();
        assert_eq!(tags, vec![MARK_START, MARK_END], "clone {id}");
        assert!(r.marks[1].1 >= r.marks[0].1);
    }
    // Without read-ahead, the data pages fetched are exactly the traced ones.
    let state = host.fork_state(fork).unwrap();
    let first = vmm_glue::abi::layout::DATA / 4096;
    let traced: BTreeSet<u64> = trace.iter().copied().collect();
    for p in 0..data_pages {
        let fetched = state.source.faults().count(first + p) > 0;
        assert_eq!(fetched, traced.contains(&p), "data page {p}");
    }
}

#[test]
fn zero_map_by_scanning_also_gives_identical_clones() {
    if !common::can_run("zero_map_by_scanning_also_gives_identical_clones") {
        return;
    }
    let (outcome, mut host) = common::bounded(Duration::from_secs(60), "scan run", || {
        let config = VmConfig {
            mem_bytes: 16 << 20,
            verify_image: true,
            zero_map: vmm_glue::ZeroMapChoice::Scan,
            ..VmConfig::default()
        };
        let mut vm = Vm::new(config).unwrap();
        ParallelJob { clones: 2, data_bytes: 4 << 20, seed: 8 }.install(&mut vm).unwrap();
        let mut host = LocalHost::new(LocalHostConfig { verify_image: true, ..LocalHostConfig::default() });
        (vm.run(&mut host).unwrap(), host)
    });
    assert_eq!(outcome.exit_code, 0);
    let fork = &outcome.forks[0];
    assert_eq!(fork.zero_map_method, ZeroMapMethod::Scan);
    assert!(fork.zero_pages > 1000);
    for (id, o) in host.wait_clones(fork.fork_id, Duration::from_secs(30)).unwrap() {
        assert_eq!(o.start.as_ref().unwrap().image_matches, Some(true), "clone {id}");
    }
    assert_eq!(host.fork_state(fork.fork_id).unwrap().zero_map_violations(), 0);
}
