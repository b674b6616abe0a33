//! `bench push`: what push flow control saves, measured in the simulator.
//!
//! Each scenario pushes a whole image (raw pages by default, so "× image" means what it says) to
//! receivers that ask for nothing (they wait for the push, like udpcast receivers) or that fetch in
//! page order, with flow control on and off, and next to the same scenario without loss (the bytes
//! one clean transmission costs). Prints a Markdown table, or one JSON object per run.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use spindrift_protocol::sim::{self, Push, SimConfig, SimReport, Workload};

use crate::args;

/// The push comparison's knobs.
#[derive(Debug, Clone, Args)]
pub struct PushArgs {
    /// Pages (4 KiB) in the image.
    #[arg(long, default_value = "4096", value_parser = args::pages)]
    pub pages: u32,
    /// Loss rate of every link in the lossy scenarios, in [0, 1).
    #[arg(long, default_value = "0.05", value_parser = args::probability)]
    pub loss: f64,
    /// zstd level for pages; 0 (the default here) sends pages raw.
    #[arg(long, default_value = "0")]
    pub zstd_level: i32,
    /// The seed.
    #[arg(long, default_value = "1")]
    pub seed: u64,
    /// Simulations to run at once.
    #[arg(long, default_value = "2")]
    pub jobs: usize,
    /// Virtual time limit of a run, seconds (runs without flow control can take long).
    #[arg(long, default_value = "30", value_parser = args::positive)]
    pub time_limit_s: f64,
    /// Print one JSON object per run instead of the table.
    #[arg(long)]
    pub json: bool,
}

struct Scenario {
    name: &'static str,
    config: SimConfig,
}

fn scenarios(a: &PushArgs) -> Vec<Scenario> {
    let base = |receivers: u32| SimConfig {
        receivers,
        pages: a.pages,
        working_set: 1.0,
        loss: a.loss,
        push: Push::HintsThenAll,
        workload: Workload::Passive,
        zstd_level: (a.zstd_level != 0).then_some(a.zstd_level),
        seed: a.seed,
        time_limit: Duration::from_secs_f64(a.time_limit_s),
        real_time_limit: Some(Duration::from_secs(600)),
        ..SimConfig::default()
    };
    vec![
        Scenario { name: "4 receivers", config: base(4) },
        Scenario { name: "16 receivers", config: base(16) },
        Scenario { name: "64 receivers", config: base(64) },
        Scenario {
            name: "8 receivers, 2 behind 1 Gbit/s and 256 KiB sockets",
            config: SimConfig { slow_receivers: 2, ..base(8) },
        },
        Scenario {
            name: "16 receivers fetching in page order",
            config: SimConfig { workload: Workload::Sequential, ..base(16) },
        },
        Scenario { name: "8 receivers, bursty loss", config: SimConfig { burst: true, ..base(8) } },
    ]
}

/// One run of the comparison.
#[derive(Debug, serde::Serialize)]
struct Row {
    scenario: &'static str,
    flow_control: bool,
    lossless: bool,
    report: SimReport,
}

/// Runs `bench push`.
pub fn run(a: &PushArgs) -> anyhow::Result<ExitCode> {
    let mut runs: Vec<(&'static str, bool, bool, SimConfig)> = Vec::new();
    for s in scenarios(a) {
        runs.push((s.name, true, true, SimConfig { loss: 0.0, ..s.config.clone() }));
        runs.push((s.name, true, false, s.config.clone()));
        runs.push((s.name, false, false, SimConfig { flow_control: false, ..s.config }));
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<SimReport, String>>>> = Mutex::new(vec![None; runs.len()]);
    std::thread::scope(|scope| {
        for _ in 0..a.jobs.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((name, fc, lossless, config)) = runs.get(i) else { break };
                let r = sim::run(config).map_err(|e| e.to_string());
                if let Ok(rep) = &r {
                    eprintln!(
                        "[{}/{}] {name}, flow control {}, {}: {:.3} x image in {:.0} ms real",
                        i + 1,
                        runs.len(),
                        if *fc { "on" } else { "off" },
                        if *lossless { "no loss" } else { "lossy" },
                        rep.tx_per_image,
                        rep.real_time_ms
                    );
                }
                if let Ok(mut v) = results.lock() {
                    v[i] = Some(r);
                }
            });
        }
    });
    let results = results.into_inner().unwrap_or_default();
    let mut rows = Vec::new();
    for ((name, fc, lossless, _), r) in runs.iter().zip(results) {
        match r {
            Some(Ok(report)) => rows.push(Row { scenario: name, flow_control: *fc, lossless: *lossless, report }),
            Some(Err(e)) => anyhow::bail!("{name}: {e}"),
            None => anyhow::bail!("{name}: not run"),
        }
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        print!("{}", table(a, &rows));
    }
    let all_exact = rows.iter().filter(|r| r.flow_control).all(|r| r.report.all_bit_exact);
    Ok(if all_exact { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn table(a: &PushArgs, rows: &[Row]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Push of a {}-page image ({} MiB, {}), loss {} per link, seed {}. tx = server bytes sent; \
         clean = the same run without loss.\n",
        a.pages,
        f64::from(a.pages) * 4096.0 / (1 << 20) as f64,
        if a.zstd_level == 0 { "raw pages".to_string() } else { format!("zstd {}", a.zstd_level) },
        a.loss,
        a.seed
    );
    let _ = writeln!(
        s,
        "| scenario | flow control | bit-exact | tx / image | tx / clean | repairs / data | NAKs | statuses | \
         overruns | window holds | done (virtual ms) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows.iter().filter(|r| !r.lossless) {
        let clean = rows
            .iter()
            .find(|c| c.lossless && c.scenario == r.scenario)
            .map_or(f64::NAN, |c| r.report.server_tx_bytes as f64 / c.report.server_tx_bytes as f64);
        let rep = &r.report;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {:.3} | {:.1}% | {} | {} | {} | {} | {:.1}{} |",
            r.scenario,
            if r.flow_control { "on" } else { "off" },
            if rep.all_bit_exact { "yes" } else { "NO" },
            rep.tx_per_image,
            clean,
            rep.repairs_sent as f64 * 100.0 / rep.data_packets.max(1) as f64,
            rep.naks_sent,
            rep.sender.statuses,
            rep.network.slow_sockets.dropped,
            rep.sender.push_window_stalls,
            rep.virtual_time_ms,
            if rep.completed { "" } else { " (stopped)" }
        );
    }
    s
}
