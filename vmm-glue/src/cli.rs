//! The `spindrift-vmm` subcommands. Each is an `Args` struct and a function returning the process exit
//! code, so `main.rs` stays a dispatch table and new subcommands (`demo`, a network `run`) slot in.
//!
//! * `run --guest parallel|trace|hello --mem-mib M --clones N --local [--json]`: runs a guest; its
//!   forks become in-process clones ([`crate::LocalHost`]). Exit code: the guest's (0: all good).
//! * `clone --descriptor FILE --session S --fork F --clone-id I --daemon-socket PATH [--out-json FILE]`:
//!   what a host daemon spawns: starts clone I from the descriptor, memory served by the daemon, runs to
//!   `EXIT`; `--out-json` gets the timings (unix µs), the report and counts.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde_json::json;

use crate::clone::CloneOptions;
use crate::daemon::DaemonLink;
use crate::descriptor::Descriptor;
use crate::guest::{Hello, ParallelJob, TraceJob};
use crate::host::to_hex;
use crate::local::{LocalHost, LocalHostConfig};
use crate::sys::unix_us;
use crate::vm::{RunOutcome, Vm, VmConfig, VmError, ZeroMapChoice};

/// What a subcommand failed at.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The VM could not be built or stopped abnormally.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest program could not be set up.
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
    /// The descriptor file is unusable.
    #[error("descriptor {path}: {reason}")]
    Descriptor {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Connecting to the daemon failed.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// Writing output failed.
    #[error("writing {path}: {source}")]
    Output {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Built-in guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestKind {
    /// The parallel job.
    Parallel,
    /// Pages touched in trace order.
    Trace,
    /// Console hello.
    Hello,
}

/// Zero-map choices on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ZeroMapArg {
    /// Dirty logging, falling back to a scan.
    Auto,
    /// Scan every page.
    Scan,
    /// None.
    Off,
}

/// `spindrift-vmm run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Guest program.
    #[arg(long, value_enum, default_value = "parallel")]
    pub guest: GuestKind,
    /// Guest memory, MiB (a multiple of 2).
    #[arg(long, default_value_t = 128)]
    pub mem_mib: u64,
    /// Data set, MiB (default: 64, or what fits).
    #[arg(long)]
    pub data_mib: Option<u64>,
    /// Clones per fork.
    #[arg(long, default_value_t = 4)]
    pub clones: u32,
    /// Fork into in-process clones (the only fork transport of this binary so far).
    #[arg(long)]
    pub local: bool,
    /// With --local: each clone starts with the whole image written into its memory (no
    /// userfaultfd, no faults): an ideal pre-provisioned cluster.
    #[arg(long, requires = "local")]
    pub preload: bool,
    /// Print one JSON object with the figures instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out_json: Option<PathBuf>,
    /// Data set seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Hash memory at the fork and in every clone before its first instruction; compare.
    #[arg(long)]
    pub verify_image: bool,
    /// Zero-map method.
    #[arg(long, value_enum, default_value = "auto")]
    pub zero_map: ZeroMapArg,
    /// Trace guest: pages to touch (in the order of `--trace-pattern`, from the seed).
    #[arg(long, default_value_t = 1024)]
    pub trace_pages: u64,
    /// Trace guest: the touch order: `random` (single pages), `runs` (runs of 1 to 4 contiguous
    /// pages at random places) or `sequential` (the data set's first pages in order).
    #[arg(long, default_value = "random")]
    pub trace_pattern: spindrift_client::touch::Pattern,
    /// Trace guest: iterations of an empty loop after each touch (a job that computes between its
    /// touches; about 1.3 µs each where guest instructions are emulated).
    #[arg(long, default_value_t = 0)]
    pub trace_spin: u64,
    /// Longest JOIN, seconds.
    #[arg(long, default_value_t = 120)]
    pub join_timeout_s: u64,
    /// Fork over the network to host daemons.
    #[command(flatten)]
    pub net: crate::netfork::NetArgs,
}

/// `spindrift-vmm clone`.
#[derive(Debug, Clone, Args)]
pub struct CloneArgs {
    /// The encoded descriptor.
    #[arg(long)]
    pub descriptor: PathBuf,
    /// Session id (passed to the daemon in the handoff).
    #[arg(long)]
    pub session: String,
    /// Fork id (must match the descriptor).
    #[arg(long)]
    pub fork: u32,
    /// Clone id (1..=clone count).
    #[arg(long)]
    pub clone_id: u32,
    /// The host daemon's Unix socket.
    #[arg(long)]
    pub daemon_socket: PathBuf,
    /// Write timings and results here.
    #[arg(long)]
    pub out_json: Option<PathBuf>,
    /// Hash memory before the first instruction and compare with the parent's hash.
    #[arg(long)]
    pub verify_image: bool,
    /// Copy the guest console to stdout.
    #[arg(long)]
    pub echo_console: bool,
}

pub(crate) fn write_json(path: &PathBuf, value: &serde_json::Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text).map_err(|source| CliError::Output { path: path.clone(), source })
}

/// Builds the VM `run` asks for, with its guest installed; returns it with each clone's expected result.
pub fn build_vm(args: &RunArgs) -> Result<(Vm, Vec<u64>), CliError> {
    let config = VmConfig {
        mem_bytes: args.mem_mib << 20,
        vcpus: 1,
        zero_map: match args.zero_map {
            ZeroMapArg::Auto => ZeroMapChoice::Auto,
            ZeroMapArg::Scan => ZeroMapChoice::Scan,
            ZeroMapArg::Off => ZeroMapChoice::Off,
        },
        verify_image: args.verify_image,
        join_timeout: Duration::from_secs(args.join_timeout_s),
        echo_console: !args.json,
    };
    let mut vm = Vm::new(config)?;
    let mem = vm.memory().size();
    let mut expected: Vec<u64> = Vec::new();
    match args.guest {
        GuestKind::Hello => Hello::default().install(&mut vm)?,
        GuestKind::Parallel => {
            let mut job = ParallelJob::for_memory(mem, args.clones, args.seed);
            if let Some(d) = args.data_mib {
                job.data_bytes = d << 20;
            }
            let l = job.install(&mut vm)?;
            expected = (1..=args.clones).map(|i| job.expected(&l, i)).collect();
        }
        GuestKind::Trace => {
            let data_pages = args
                .data_mib
                .map_or_else(|| ParallelJob::for_memory(mem, 1, args.seed).data_bytes / 4096, |d| (d << 20) / 4096);
            let trace = match args.trace_pattern {
                spindrift_client::touch::Pattern::Random => {
                    TraceJob::shuffled_trace(data_pages, args.trace_pages, args.seed)
                }
                pattern => {
                    let fraction = args.trace_pages.min(data_pages) as f64 / data_pages.max(1) as f64;
                    spindrift_client::touch::pattern_pages(pattern, data_pages, fraction, args.seed)
                        .map_err(|e| CliError::Usage(format!("--trace-pattern: {e}")))?
                }
            };
            let job = TraceJob { clones: args.clones, data_pages, seed: args.seed, trace, spin: args.trace_spin };
            job.install(&mut vm)?;
            expected = vec![job.expected_sum(); args.clones as usize];
        }
    }
    Ok((vm, expected))
}

/// Runs `spindrift-vmm run`. Returns the process exit code.
pub fn run_cmd(args: &RunArgs) -> Result<i32, CliError> {
    if args.net.wanted() {
        if args.local {
            return Err(CliError::Usage("--local and the network options (--net-iface ...) exclude each other".into()));
        }
        return crate::netfork::run_net(args);
    }
    if !args.local && args.guest != GuestKind::Hello {
        return Err(CliError::Usage(
            "forking guests need a clone transport: pass --local (in-process clones) or the network options \
             (--net-iface, --group, --key-hex, --hosts)"
                .into(),
        ));
    }
    let wall = Instant::now();
    let (mut vm, expected) = build_vm(args)?;
    let mem = vm.memory().size();
    let setup_ms = wall.elapsed().as_secs_f64() * 1e3;
    let mut host = LocalHost::new(LocalHostConfig {
        verify_image: args.verify_image,
        echo_console: false,
        preload: args.preload,
        ..LocalHostConfig::default()
    });
    let result = vm.run(&mut host);
    let outcome = match result {
        Ok(o) => o,
        Err(e) => {
            eprintln!("spindrift-vmm: the VM failed: {e}");
            if !vm.outcome().console.is_empty() && args.json {
                eprintln!("console: {}", String::from_utf8_lossy(&vm.outcome().console));
            }
            return Ok(2);
        }
    };
    let run_ms = wall.elapsed().as_secs_f64() * 1e3 - setup_ms;
    let summary = summarize(args, &mut host, &outcome, &expected, mem, setup_ms, run_ms);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
    } else {
        print_summary(&summary);
    }
    if let Some(path) = &args.out_json {
        write_json(path, &summary)?;
    }
    Ok(outcome.exit_code.min(255) as i32)
}

fn summarize(
    args: &RunArgs,
    host: &mut LocalHost,
    outcome: &RunOutcome,
    expected: &[u64],
    mem: u64,
    setup_ms: f64,
    run_ms: f64,
) -> serde_json::Value {
    let fork = outcome.forks.first();
    let mut clones = Vec::new();
    let mut pages_fetched = 0;
    let mut host_fork_us = None;
    let mut zero_map_violations = None;
    if let Some(f) = fork.filter(|f| f.error.is_none()) {
        if let Ok(outs) = host.wait_clones(f.fork_id, Duration::from_secs(60)) {
            for o in outs.values() {
                let report = o.result.as_ref().ok().and_then(|r| r.own_report.clone());
                let value = report.as_ref().and_then(|r| r.result.get(..8)).map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    u64::from_le_bytes(a)
                });
                clones.push(json!({
                    "clone_id": o.clone_id,
                    "error": o.result.as_ref().err(),
                    "exit_code": o.result.as_ref().ok().map(|r| r.exit_code),
                    "status": report.as_ref().map(|r| r.status),
                    "result_hex": report.as_ref().map(|r| to_hex(&r.result)),
                    "result_correct": value.map(|v| expected.get(o.clone_id as usize - 1) == Some(&v)),
                    "faults": o.server.as_ref().map(|s| s.faults),
                    "pages_installed": o.server.as_ref().map(|s| s.pages_copied + s.pages_zeroed),
                    "prezeroed_pages": o.start.as_ref().map(|s| s.prezeroed_pages),
                    "setup_us": o.start.as_ref().map(|s| s.setup_us),
                    "first_run_unix_us": o.result.as_ref().ok().map(|r| r.first_run_unix_us),
                    "exit_unix_us": o.result.as_ref().ok().map(|r| r.exit_unix_us),
                    "image_matches": o.start.as_ref().and_then(|s| s.image_matches),
                    "marks": o.result.as_ref().ok().map(|r| r.marks.clone()),
                }));
            }
        }
        if let Some(state) = host.fork_state(f.fork_id) {
            pages_fetched = state.source.faults().total();
            host_fork_us = Some(state.host_fork_us);
            zero_map_violations = Some(state.zero_map_violations());
        }
    }
    json!({
        "guest": format!("{:?}", args.guest).to_lowercase(),
        "memory_bytes": mem,
        "clones": args.clones,
        "exit_code": outcome.exit_code,
        "results_ok": outcome.own_report.as_ref().map(|r| r.status),
        "fork_unix_us": fork.map(|f| f.fork_unix_us),
        "fork_pause_us": fork.map(|f| f.pause_us),
        "fork_capture_us": fork.map(|f| f.capture_us),
        "fork_host_us": fork.map(|f| f.host_us),
        "host_fork_us": host_fork_us,
        "descriptor_bytes": fork.map(|f| f.descriptor_bytes),
        "zero_pages": fork.map(|f| f.zero_pages),
        "zero_runs": fork.map(|f| f.zero_runs),
        "discard_pages": fork.map(|f| f.discard_pages),
        "zero_map_method": fork.map(|f| f.zero_map_method),
        "zero_map_violations": zero_map_violations,
        "pages_total": mem / 4096,
        "pages_fetched": pages_fetched,
        "join_wait_us": outcome.joins.first().map(|j| j.wait_us),
        "setup_ms": setup_ms,
        "run_ms": run_ms,
        "exits": outcome.stats.exits,
        "hypercalls": outcome.stats.hypercalls,
        "marks": outcome.marks,
        "host_errors": outcome.host_errors,
        "clone_results": clones,
        "console": String::from_utf8_lossy(&outcome.console),
    })
}

fn print_summary(s: &serde_json::Value) {
    let g = |k: &str| s.get(k).cloned().unwrap_or(serde_json::Value::Null);
    println!("---");
    println!("exit code {}, {} of {} clone results correct", g("exit_code"), g("results_ok"), g("clones"));
    println!(
        "fork: pause {} µs (capture {} µs, host {} µs), descriptor {} bytes, zero map {} pages in {} runs ({}), {} discard pages",
        g("fork_pause_us"),
        g("fork_capture_us"),
        g("fork_host_us"),
        g("descriptor_bytes"),
        g("zero_pages"),
        g("zero_runs"),
        g("zero_map_method"),
        g("discard_pages"),
    );
    println!(
        "clones fetched {} of {} pages; setup {:.1} ms, run {:.1} ms",
        g("pages_fetched"),
        g("pages_total"),
        g("setup_ms").as_f64().unwrap_or(0.0),
        g("run_ms").as_f64().unwrap_or(0.0)
    );
}

/// `spindrift-vmm clone` maps the host's cache memfd as its memory unless this variable is `private`
/// (then the daemon copies every page in).
pub const CLONE_MEMORY_ENV: &str = "SPINDRIFT_CLONE_MEMORY";

/// Runs `spindrift-vmm clone`. `started_unix_us` is when the process started. Returns the exit code.
pub fn clone_cmd(args: &CloneArgs, started_unix_us: u64) -> Result<i32, CliError> {
    let bytes = std::fs::read(&args.descriptor)
        .map_err(|e| CliError::Descriptor { path: args.descriptor.clone(), reason: e.to_string() })?;
    let desc = Descriptor::decode(&bytes)
        .map_err(|e| CliError::Descriptor { path: args.descriptor.clone(), reason: e.to_string() })?;
    if desc.fork_id != args.fork {
        return Err(CliError::Usage(format!("--fork {} but the descriptor is of fork {}", args.fork, desc.fork_id)));
    }
    let descriptor_loaded_unix_us = unix_us();
    // The fallback (every page copied into private memory) is chosen through the environment, which
    // the host daemon passes on to the clones it spawns.
    let private = std::env::var(CLONE_MEMORY_ENV).is_ok_and(|v| v == "private");
    let mut link = DaemonLink::connect(&args.daemon_socket, Some(args.session.clone()))?.private_copy(private);
    let stuck_json = args.out_json.clone();
    let clone_id = args.clone_id;
    let last_resort: crate::clone::LastResort = std::sync::Arc::new(move || {
        let error = "the clone's memory handler is gone (daemon exited or hung up) and the clone is stuck on a \
                     page: exiting";
        eprintln!("spindrift-vmm clone {clone_id}: {error}");
        if let Some(path) = &stuck_json {
            let _ = write_json(path, &json!({"clone_id": clone_id, "exit_code": 3, "error": error}));
        }
        std::process::exit(3);
    });
    let options = CloneOptions {
        // A parent that hashed its memory at the fork asks every clone to check it.
        verify_image: args.verify_image || desc.image_hash.is_some(),
        echo_console: args.echo_console,
        session: Some(args.session.clone()),
        last_resort: Some(last_resort),
        ..CloneOptions::default()
    };
    let mut out = json!({
        "clone_id": args.clone_id,
        "fork": args.fork,
        "session": args.session,
        "descriptor_bytes": bytes.len(),
        "start_unix_us": started_unix_us,
        "descriptor_loaded_unix_us": descriptor_loaded_unix_us,
    });
    let started = Vm::start_clone(&desc, args.clone_id, &mut link, &options);
    let (code, error) = match started {
        Ok((mut vm, start)) => {
            out["handoff_unix_us"] = json!(start.handoff_unix_us);
            out["prezeroed_pages"] = json!(start.prezeroed_pages);
            out["zero_ioctls"] = json!(start.zero_ioctls);
            out["setup_us"] = json!(start.setup_us);
            out["shared_cache"] = json!(start.shared_cache);
            out["image_hash"] = json!(start.image_hash);
            out["image_matches"] = json!(start.image_matches);
            let result = vm.run(&mut link);
            let o = match &result {
                Ok(o) => o.clone(),
                Err(_) => vm.outcome().clone(),
            };
            out["first_run_unix_us"] = json!(o.first_run_unix_us);
            out["exit_unix_us"] = json!(if o.exit_unix_us > 0 { o.exit_unix_us } else { unix_us() });
            out["report"] = match &o.own_report {
                Some(r) => json!({"status": r.status, "result_hex": to_hex(&r.result)}),
                None => serde_json::Value::Null,
            };
            out["console"] = json!(String::from_utf8_lossy(&o.console));
            out["host_errors"] = json!(o.host_errors);
            match result {
                Ok(o) => (o.exit_code.min(255) as i32, None),
                Err(e) => (3, Some(e.to_string())),
            }
        }
        Err(e) => (3, Some(e.to_string())),
    };
    out["exit_code"] = json!(code);
    out["error"] = json!(error);
    if let Some(e) = &error {
        eprintln!("spindrift-vmm clone {}: {e}", args.clone_id);
    }
    if let Some(path) = &args.out_json {
        write_json(path, &out)?;
    }
    Ok(code)
}
