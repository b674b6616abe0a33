//! `bench memory`: what hosts fetch against what clones touch (issue 13's working-set figures).
//!
//! Each run is one `spindrift-vmm demo` (its own netlab lab of a parent host and one clone host, 0%
//! loss) with the trace guest: the clone reads one qword of each of `--pages` data-set pages, in the
//! order of a pattern, and the host daemon's statistics say how many pages it stored from the wire
//! and how many of the clone's faults waited for the network. Patterns:
//!
//! * `runs`: runs of 1 to 4 contiguous pages at random places, in random order (REAP measured faults
//!   in runs of 2-3 pages): read-ahead that does not fit shows as `over_fetch` above 1;
//! * `sequential`: the data set's first pages in order: read-ahead that does not grow shows as
//!   `seq_network_faults` near the pages touched.
//!
//! `touched_pages` is the trace plus the pages of the trace list the guest reads (8 bytes a touch);
//! the guest's few code, stack and parameter pages are not counted, which errs against spindrift.
//!
//! These runs turn background completion off (`--background-rate 0`): it would add the pages it
//! pushes to what the host stored.
//!
//! `lazy_vs_eager`: a job that touches 10% of memory (the `runs` pattern) in one clone on each of
//! `--eager-hosts` hosts. Lazy: the demo's time from the fork until the last clone exited. Eager:
//! `spindrift-client fetch` of the whole image on every host at once from `spindrift-server` (the
//! longest fetch), plus the same job's run with all its memory present (the demo's local
//! baseline). The eager image is the guest memory's make-up: as many random pages as the data set
//! (its pages are as incompressible) and zero pages for the rest, which zero runs carry almost for
//! free; the guest's few code pages are left out, and so is starting the eager clones, which both
//! err against spindrift.
//!
//! Several `--bin-dir`s run side by side, seed by seed (the old build and the new one in one run).
//! Not measured yet: the second-fork figures of the issue (no incremental fork exists to measure).

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::lab_run::{random_image, read_json, Binaries, Proc, Push, Scratch};

/// `bench memory`.
#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// Pages each clone touches.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(64..=16384))]
    pub pages: u64,
    /// Seeds (one run per seed, pattern and build).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    /// Directories holding the release `spindrift-vmm` (and the daemons beside it) to compare;
    /// repeat it. Default: the one beside this program.
    #[arg(long)]
    pub bin_dir: Vec<PathBuf>,
    /// Hosts of the lazy-versus-eager runs (one clone on each); 0 skips them.
    #[arg(long, default_value_t = 4)]
    pub eager_hosts: usize,
    /// Guest memory of the lazy-versus-eager runs, MiB.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(16..=1024))]
    pub eager_mem_mib: u64,
    /// Bound of each demo run, seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_s: u64,
    /// Keep the scratch directory (each run's report).
    #[arg(long)]
    pub keep: bool,
    /// Print the rows as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One build, one seed, one pattern.
#[derive(Debug, Clone, Serialize)]
struct Row {
    build: String,
    seed: u64,
    pattern: &'static str,
    touched_pages: u64,
    fetched_pages: u64,
    over_fetch: f64,
    network_faults: u64,
    /// Network faults per page touched.
    faults_per_page: f64,
    requests: u64,
    network_run_ms: f64,
    results_ok: bool,
}

/// One build, one seed: lazy memory against copying it all first.
#[derive(Debug, Clone, Serialize)]
struct EagerRow {
    build: String,
    seed: u64,
    hosts: usize,
    memory_mib: u64,
    touched_pages: u64,
    /// Fork to the last clone's exit, lazy memory.
    lazy_done_ms: f64,
    /// The longest `fetch` of the whole image, every host at once.
    fetch_ms: f64,
    /// The job with all its memory present (longest clone, first instruction to exit).
    local_run_ms: f64,
    /// `fetch_ms + local_run_ms`.
    eager_ms: f64,
    lazy_vs_eager: f64,
    results_ok: bool,
}

/// Every row of a run.
#[derive(Debug, Clone, Serialize)]
struct Rows {
    patterns: Vec<Row>,
    lazy_vs_eager: Vec<EagerRow>,
}

/// Runs `bench memory`.
pub fn run(args: &MemoryArgs) -> anyhow::Result<ExitCode> {
    netlab::check_prerequisites().context("bench memory needs root and iproute2")?;
    let dirs = if args.bin_dir.is_empty() {
        vec![std::env::current_exe()?
            .parent()
            .map(std::path::Path::to_path_buf)
            .context("no directory beside bench")?]
    } else {
        args.bin_dir.clone()
    };
    for d in &dirs {
        if !d.join("spindrift-vmm").exists() {
            bail!("{}/spindrift-vmm not found: build it (cargo build --release --bins) or fix --bin-dir", d.display());
        }
    }
    let scratch = Scratch::new("memory", args.keep)?;
    let mut rows = Vec::new();
    let mut eager = Vec::new();
    for &seed in &args.seeds {
        for (i, dir) in dirs.iter().enumerate().filter(|_| args.eager_hosts > 0) {
            let row = lazy_vs_eager(args, dir, i, seed, &scratch)?;
            eprintln!(
                "bench memory: {} seed {seed} lazy_vs_eager {:.3} (lazy {:.0} ms, eager {:.0} + {:.0} ms)",
                row.build, row.lazy_vs_eager, row.lazy_done_ms, row.fetch_ms, row.local_run_ms
            );
            eager.push(row);
        }
        for pattern in ["runs", "sequential"] {
            for (i, dir) in dirs.iter().enumerate() {
                let row = one_run(args, dir, i, seed, pattern, &scratch)?;
                eprintln!(
                    "bench memory: {} seed {seed} {pattern}: over_fetch {:.3}, {} network faults",
                    row.build, row.over_fetch, row.network_faults
                );
                rows.push(row);
            }
        }
    }
    let ok = rows.iter().all(|r| r.results_ok) && eager.iter().all(|r| r.results_ok);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&Rows { patterns: rows, lazy_vs_eager: eager })?);
    } else {
        print_table(&rows);
        print_eager(&eager);
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn one_run(
    args: &MemoryArgs,
    dir: &std::path::Path,
    index: usize,
    seed: u64,
    pattern: &'static str,
    scratch: &Scratch,
) -> anyhow::Result<Row> {
    let out = scratch.path(&format!("b{index}-s{seed}-{pattern}.json"));
    let log = scratch.path(&format!("b{index}-s{seed}-{pattern}.log"));
    let mut cmd = Command::new(dir.join("spindrift-vmm"));
    cmd.args(["demo", "--hosts", "1", "--clones", "1", "--loss", "0", "--guest", "trace"])
        .args(["--trace-pattern", pattern, "--trace-pages", &args.pages.to_string(), "--seed", &seed.to_string()])
        .args(["--timeout-s", &args.timeout_s.to_string(), "--json"]);
    no_background(&mut cmd, dir)?;
    let mut proc = Proc::spawn_split(format!("demo ({pattern}, seed {seed})"), &mut cmd, &out, &log)?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s + 30);
    if proc.wait_until(deadline).is_none() {
        proc.stop(Duration::from_secs(3));
        bail!("the demo ({pattern}, seed {seed}) did not finish in {} s: {}", args.timeout_s + 30, proc.log_tail(5));
    }
    let v = read_json(&out).with_context(|| format!("the demo wrote no report: {}", proc.log_tail(5)))?;
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64);
    let touched = args.pages + (args.pages * 8).div_ceil(4096);
    let fetched = n("/pages_stored").context("the demo's report has no pages_stored (an old build?)")?;
    let faults = n("/clone_figures/0/network_faults").unwrap_or(0);
    Ok(Row {
        build: dir.display().to_string(),
        seed,
        pattern,
        touched_pages: touched,
        fetched_pages: fetched,
        over_fetch: fetched as f64 / touched as f64,
        network_faults: faults,
        faults_per_page: faults as f64 / touched as f64,
        requests: n("/server_requests").unwrap_or(0),
        network_run_ms: v.pointer("/network_run_ms").and_then(Value::as_f64).unwrap_or(f64::NAN),
        results_ok: n("/results_ok") == Some(1),
    })
}

/// Turns background completion off in a demo command, if the build has it (older builds do not).
fn no_background(cmd: &mut Command, dir: &std::path::Path) -> anyhow::Result<()> {
    let help = Command::new(dir.join("spindrift-vmm")).args(["demo", "--help"]).output()?;
    if String::from_utf8_lossy(&help.stdout).contains("--background-rate") {
        cmd.args(["--background-rate", "0"]);
    }
    Ok(())
}

/// One lazy run (the demo) and one eager run (fetch everything, then the local run) of a job that
/// touches 10% of memory.
fn lazy_vs_eager(
    args: &MemoryArgs,
    dir: &std::path::Path,
    index: usize,
    seed: u64,
    scratch: &Scratch,
) -> anyhow::Result<EagerRow> {
    let hosts = args.eager_hosts;
    let pages = (args.eager_mem_mib << 20) / 4096;
    let touched = pages / 10;
    let out = scratch.path(&format!("b{index}-s{seed}-lazy.json"));
    let log = scratch.path(&format!("b{index}-s{seed}-lazy.log"));
    let mut cmd = Command::new(dir.join("spindrift-vmm"));
    cmd.args(["demo", "--hosts", &hosts.to_string(), "--clones", &hosts.to_string(), "--loss", "0"])
        .args(["--mem-mib", &args.eager_mem_mib.to_string(), "--guest", "trace", "--trace-pattern", "runs"])
        .args(["--trace-pages", &touched.to_string(), "--seed", &seed.to_string(), "--local-baseline"])
        .args(["--timeout-s", &args.timeout_s.to_string(), "--json"]);
    no_background(&mut cmd, dir)?;
    let mut proc = Proc::spawn_split(format!("demo (lazy, seed {seed})"), &mut cmd, &out, &log)?;
    if proc.wait_until(Instant::now() + Duration::from_secs(args.timeout_s + 60)).is_none() {
        proc.stop(Duration::from_secs(3));
        bail!("the lazy demo (seed {seed}) did not finish: {}", proc.log_tail(5));
    }
    let v = read_json(&out).with_context(|| format!("the lazy demo wrote no report: {}", proc.log_tail(5)))?;
    let lazy_done_ms = v
        .pointer("/clone_figures")
        .and_then(Value::as_array)
        .map(|c| c.iter().filter_map(|c| c["done_ms"].as_f64()).fold(0.0, f64::max))
        .unwrap_or(f64::NAN);
    let local_run_ms = v.pointer("/local_run_ms").and_then(Value::as_f64).unwrap_or(f64::NAN);
    let lazy_ok = v.pointer("/results_ok").and_then(Value::as_u64) == Some(hosts as u64)
        && v.pointer("/local_results_ok").and_then(Value::as_bool) == Some(true);

    // Eager: the image's make-up (see the module docs), fetched by every host at once.
    let data_pages = pages / 2;
    let mut image = random_image(data_pages, seed);
    image.resize((pages * 4096) as usize, 0);
    let image_path = scratch.path(&format!("b{index}-s{seed}-image.bin"));
    std::fs::write(&image_path, &image).with_context(|| format!("writing {}", image_path.display()))?;
    drop(image);
    let bins = Binaries::find(Some(dir))?;
    let lab = netlab::Lab::create(&netlab::LabConfig::new(netlab::unique_lab_name("bmem"), hosts + 1))
        .context("creating the eager lab")?;
    let push = Push {
        bins: &bins,
        scratch,
        tag: &format!("b{index}-s{seed}-eager"),
        image: &image_path,
        image_bytes: pages * 4096,
        group: std::net::Ipv4Addr::new(239, 78, (lab.index() >> 8) as u8, lab.index() as u8),
        port: 7790,
        hosts,
        io: None,
        mtu: None,
        min_receivers: true,
        verify: false,
        remove_outputs: true,
        server_flags: Vec::new(),
        server_cpus: None,
        fetch_flags: Vec::new(),
        timeout: Duration::from_secs(args.timeout_s),
    };
    let fetched = push.run(&lab);
    drop(lab);
    std::fs::remove_file(&image_path).ok();
    let fetched = fetched?;
    let fetch_ms = fetched.transfer_s() * 1e3;
    let eager_ms = fetch_ms + local_run_ms;
    Ok(EagerRow {
        build: dir.display().to_string(),
        seed,
        hosts,
        memory_mib: args.eager_mem_mib,
        touched_pages: touched,
        lazy_done_ms,
        fetch_ms,
        local_run_ms,
        eager_ms,
        lazy_vs_eager: lazy_done_ms / eager_ms,
        results_ok: lazy_ok && fetched.all_ok(),
    })
}

fn print_eager(rows: &[EagerRow]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<28} {:>4} {:>5} {:>7} {:>7} {:>12} {:>9} {:>9} {:>9} {:>13} ok",
        "build",
        "seed",
        "hosts",
        "mem_mib",
        "touched",
        "lazy_done_ms",
        "fetch_ms",
        "local_ms",
        "eager_ms",
        "lazy_vs_eager"
    );
    for r in rows {
        println!(
            "{:<28} {:>4} {:>5} {:>7} {:>7} {:>12.1} {:>9.1} {:>9.1} {:>9.1} {:>13.3} {}",
            r.build,
            r.seed,
            r.hosts,
            r.memory_mib,
            r.touched_pages,
            r.lazy_done_ms,
            r.fetch_ms,
            r.local_run_ms,
            r.eager_ms,
            r.lazy_vs_eager,
            r.results_ok
        );
    }
    println!("target: lazy_vs_eager <= 0.3 (a job touching 10% of memory)");
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<28} {:>4} {:<10} {:>7} {:>7} {:>10} {:>7} {:>11} {:>8} {:>8} ok",
        "build", "seed", "pattern", "touched", "fetched", "over_fetch", "faults", "faults/page", "requests", "run_ms"
    );
    for r in rows {
        println!(
            "{:<28} {:>4} {:<10} {:>7} {:>7} {:>10.3} {:>7} {:>11.3} {:>8} {:>8.1} {}",
            r.build,
            r.seed,
            r.pattern,
            r.touched_pages,
            r.fetched_pages,
            r.over_fetch,
            r.network_faults,
            r.faults_per_page,
            r.requests,
            r.network_run_ms,
            r.results_ok
        );
    }
    println!("targets: over_fetch <= 1.1 on runs; sequential network faults <= 1/8 (0.125) of the pages touched");
}
