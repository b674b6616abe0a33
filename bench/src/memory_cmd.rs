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
//! Several `--bin-dir`s run side by side, seed by seed (the old build and the new one in one run).
//! Not measured yet: the second-fork and lazy-versus-eager figures of the issue (no incremental fork
//! exists to measure).

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::lab_run::{read_json, Proc, Scratch};

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
    for &seed in &args.seeds {
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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(if rows.iter().all(|r| r.results_ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
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
