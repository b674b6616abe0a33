//! `bench matrix`: the acceptance criteria, run as simulations, printed as a Markdown table.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use spindrift_protocol::sim::{self, SimConfig, SimReport};

use crate::args;

/// Which acceptance checks to run, and how.
#[derive(Debug, Clone, Args)]
pub struct MatrixArgs {
    /// Seeds per bit-exactness case (seeds 1..=N).
    #[arg(long, default_value = "3")]
    pub seeds: u64,
    /// Pages in the bit-exactness matrix.
    #[arg(long, default_value = "4096", value_parser = args::pages)]
    pub pages: u32,
    /// Simulations to run at once.
    #[arg(long, default_value = "2")]
    pub jobs: usize,
    /// Skip the large cases (65,536-page efficiency runs and 1,024 receivers).
    #[arg(long)]
    pub skip_large: bool,
    /// Print one JSON object per run (and one per check) instead of tables.
    #[arg(long)]
    pub json: bool,
}

struct Case {
    group: &'static str,
    config: SimConfig,
}

fn base(receivers: u32, pages: u32, loss: f64, burst: bool, seed: u64) -> SimConfig {
    SimConfig {
        receivers,
        pages,
        working_set: 0.1,
        loss,
        burst,
        seed,
        real_time_limit: Some(Duration::from_secs(600)),
        ..SimConfig::default()
    }
}

fn cases(a: &MatrixArgs) -> Vec<Case> {
    let mut out = Vec::new();
    for &receivers in &[1u32, 16, 256] {
        for &loss in &[0.0, 0.01, 0.05, 0.2] {
            for burst in [false, true] {
                for seed in 1..=a.seeds {
                    out.push(Case { group: "bit-exact", config: base(receivers, a.pages, loss, burst, seed) });
                }
            }
        }
    }
    for seed in 1..=a.seeds.min(2) {
        let c = SimConfig { corrupt: 0.05, ..base(16, a.pages, 0.01, false, seed) };
        out.push(Case { group: "corruption", config: c });
        let c = SimConfig { corrupt: 0.05, duplicate: 0.02, ..base(16, a.pages, 0.05, true, seed) };
        out.push(Case { group: "corruption", config: c });
        let c = SimConfig { corrupt: 0.05, encrypt: true, ..base(16, a.pages, 0.05, false, seed) };
        out.push(Case { group: "corruption", config: c });
    }
    for seed in 1..=a.seeds.max(6) {
        for receivers in [1, 16] {
            let c = SimConfig { reorder: 0.05, ..base(receivers, a.pages, 0.01, false, seed) };
            out.push(Case { group: "reorder", config: c });
        }
    }
    for seed in 1..=a.seeds {
        let c = SimConfig { reorder: 0.05, duplicate: 0.02, ..base(16, a.pages, 0.05, true, seed) };
        out.push(Case { group: "reorder", config: c });
    }
    out.push(Case { group: "determinism", config: base(16, a.pages, 0.05, true, 7) });
    out.push(Case { group: "determinism", config: base(16, a.pages, 0.05, true, 7) });
    out.push(Case { group: "determinism", config: base(16, a.pages, 0.05, true, 8) });
    if !a.skip_large {
        for seed in 1..=a.seeds.min(3) {
            out.push(Case { group: "efficiency-1", config: base(1, 65536, 0.02, false, seed) });
            out.push(Case { group: "efficiency-16", config: base(16, 65536, 0.02, false, seed) });
        }
        out.push(Case { group: "nak-economy", config: base(1024, 65536, 0.01, false, 1) });
    }
    out
}

fn run_all(cases: &[Case], jobs: usize) -> Vec<Result<SimReport, String>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<SimReport, String>>>> = Mutex::new(vec![None; cases.len()]);
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                let r = sim::run(&case.config).map_err(|e| e.to_string());
                if let Ok(rep) = &r {
                    eprintln!(
                        "[{}/{}] {} r={} loss={} burst={} seed={}: {} in {:.0} ms",
                        i + 1,
                        cases.len(),
                        case.group,
                        rep.receivers,
                        rep.loss,
                        rep.burst,
                        rep.seed,
                        if rep.all_bit_exact { "ok" } else { "FAIL" },
                        rep.real_time_ms
                    );
                }
                if let Ok(mut v) = results.lock() {
                    v[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err("not run".to_string())))
        .collect()
}

/// One acceptance check's verdict.
#[derive(Debug, serde::Serialize)]
struct Check {
    check: String,
    pass: bool,
    detail: String,
}

/// Runs `bench matrix`.
pub fn run(a: &MatrixArgs) -> anyhow::Result<ExitCode> {
    let cases = cases(a);
    let results = run_all(&cases, a.jobs);
    let mut checks = Vec::new();
    let mut rows = Vec::new();
    for (case, r) in cases.iter().zip(&results) {
        match r {
            Ok(rep) => {
                if a.json {
                    let mut v = serde_json::to_value(rep)?;
                    if let Some(o) = v.as_object_mut() {
                        o.insert("group".into(), case.group.into());
                    }
                    println!("{v}");
                }
                rows.push(row(case.group, &case.config, rep));
            }
            Err(e) => checks.push(Check { check: format!("{} run", case.group), pass: false, detail: e.clone() }),
        }
    }
    let ok = |g: &'static str| {
        cases.iter().zip(&results).filter(move |(c, _)| c.group == g).filter_map(|(_, r)| r.as_ref().ok())
    };

    for group in ["bit-exact", "corruption", "reorder"] {
        let runs: Vec<&SimReport> = ok(group).collect();
        let failed: Vec<String> = runs
            .iter()
            .filter(|r| !r.all_bit_exact)
            .map(|r| {
                format!(
                    "r={} loss={} burst={} corrupt={} dup={} reorder={} seed={}",
                    r.receivers, r.loss, r.burst, r.settings.corrupt, r.settings.duplicate, r.settings.reorder, r.seed
                )
            })
            .collect();
        checks.push(Check {
            check: format!("{group}: all_bit_exact"),
            pass: failed.is_empty() && !runs.is_empty(),
            detail: if failed.is_empty() {
                format!("{} runs", runs.len())
            } else {
                format!("failed: {}", failed.join("; "))
            },
        });
    }
    let corr: Vec<&SimReport> = ok("corruption").collect();
    checks.push(Check {
        check: "corruption: corrupted datagrams dropped".into(),
        pass: !corr.is_empty() && corr.iter().all(|r| r.corrupted_dropped > 0 && r.mismatched_pages == 0),
        detail: corr.iter().map(|r| format!("{} dropped", r.corrupted_dropped)).collect::<Vec<_>>().join(", "),
    });
    let det: Vec<&SimReport> = ok("determinism").collect();
    if det.len() == 3 {
        let same = det[0].deterministic() == det[1].deterministic();
        let differ = det[0].deterministic() != det[2].deterministic();
        checks.push(Check {
            check: "determinism: same seed same report, other seed differs".into(),
            pass: same && differ,
            detail: format!("same seed identical: {same}; different seed differs: {differ}"),
        });
    }
    if !a.skip_large {
        let one: Vec<&SimReport> = ok("efficiency-1").collect();
        let many: Vec<&SimReport> = ok("efficiency-16").collect();
        for (o, m) in one.iter().zip(&many) {
            let ratio = m.server_tx_bytes as f64 / o.server_tx_bytes.max(1) as f64;
            checks.push(Check {
                check: format!("efficiency seed {}: tx_bytes(16) <= 1.15 x tx_bytes(1)", o.seed),
                pass: ratio <= 1.15 && o.all_bit_exact && m.all_bit_exact,
                detail: format!("{} / {} = {ratio:.4}", m.server_tx_bytes, o.server_tx_bytes),
            });
        }
        for r in ok("nak-economy") {
            let ratio = r.server_rx_packets as f64 / r.server_tx_packets.max(1) as f64;
            checks.push(Check {
                check: "nak economy: 1024 receivers, rx <= 0.5 x tx".into(),
                pass: ratio <= 0.5 && r.all_bit_exact,
                detail: format!("{} / {} = {ratio:.4}", r.server_rx_packets, r.server_tx_packets),
            });
        }
    }

    let pass = checks.iter().all(|c| c.pass);
    if a.json {
        for c in &checks {
            println!("{}", serde_json::to_string(c)?);
        }
    } else {
        println!("| case | receivers | pages | loss | burst | extra | seed | completed | bit-exact | virtual ms | tx pkts | tx bytes | rx pkts | rx/tx | NAKs | repairs (proactive) | corrupt dropped | fault wait p50/p99 µs | real ms |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &rows {
            println!("{r}");
        }
        println!();
        println!("| check | pass | detail |");
        println!("|---|---|---|");
        for c in &checks {
            println!("| {} | {} | {} |", c.check, if c.pass { "yes" } else { "**NO**" }, c.detail);
        }
    }
    Ok(if pass { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn row(group: &str, c: &SimConfig, r: &SimReport) -> String {
    let mut extra = Vec::new();
    if c.corrupt > 0.0 {
        extra.push(format!("corrupt {}", c.corrupt));
    }
    if c.duplicate > 0.0 {
        extra.push(format!("dup {}", c.duplicate));
    }
    if c.reorder > 0.0 {
        extra.push(format!("reorder {}", c.reorder));
    }
    if c.encrypt {
        extra.push("encrypt".into());
    }
    let stopped = match &r.stopped_by {
        Some(why) => format!("NO ({why})"),
        None => "yes".into(),
    };
    format!(
        "| {group} | {} | {} | {} | {} | {} | {} | {stopped} | {} | {:.3} | {} | {} | {} | {:.4} | {} | {} ({}) | {} | {:.0}/{:.0} | {:.0} |",
        r.receivers,
        r.pages,
        r.loss,
        if r.burst { "yes" } else { "no" },
        extra.join(", "),
        r.seed,
        if r.all_bit_exact { "yes" } else { "**NO**" },
        r.virtual_time_ms,
        r.server_tx_packets,
        r.server_tx_bytes,
        r.server_rx_packets,
        r.server_rx_packets as f64 / r.server_tx_packets.max(1) as f64,
        r.naks_sent,
        r.repairs_sent,
        r.proactive_repairs,
        r.corrupted_dropped,
        r.fault_wait_us.p50,
        r.fault_wait_us.p99,
        r.real_time_ms,
    )
}
