//! What the lab benchmarks that run the real daemons share: the release binaries found beside
//! `bench`, a scratch directory, child processes that are killed on every exit path, process CPU
//! time, and one whole-image push (`spindrift-server --push all` on h0, `spindrift-client fetch` on
//! h1..hN) that `bench vs-udpcast` and `bench xdp-daemons` both run.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netlab::{Host, Lab};

/// The session key every lab benchmark uses (the lab is private to the run).
pub const KEY_HEX: &str = "7e5d7e5d7e5d7e5d7e5d7e5d7e5d7e5d7e5d7e5d7e5d7e5d7e5d7e5d7e5d7e5d";

/// A scratch directory, removed on every exit path unless kept.
pub struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Scratch {
    /// Creates `<tmp>/spindrift-<tag>-<pid>`.
    pub fn new(tag: &str, keep: bool) -> anyhow::Result<Scratch> {
        Scratch::in_dir(&std::env::temp_dir(), tag, keep)
    }

    /// Creates `<base>/spindrift-<tag>-<pid>`.
    pub fn in_dir(base: &Path, tag: &str, keep: bool) -> anyhow::Result<Scratch> {
        let dir = base.join(format!("spindrift-{tag}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch { dir, keep })
    }

    /// Keeps the directory when dropped (and says where it is).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {}", self.dir.display());
        } else {
            std::fs::remove_dir_all(&self.dir).ok();
        }
    }
}

/// Checks what a lab benchmark with link loss needs (root, iproute2, nftables) and finds the
/// release binaries (in `bin_dir`, else beside this one).
pub fn lossy_lab_preflight(bin_dir: Option<&Path>) -> anyhow::Result<Binaries> {
    netlab::check_prerequisites().context("netlab needs root and iproute2")?;
    netlab::preflight::check_nft().context("netlab's loss needs nftables")?;
    Binaries::find(bin_dir)
}

/// The release `spindrift-server` and `spindrift-client`.
pub struct Binaries {
    /// `spindrift-server`.
    pub server: PathBuf,
    /// `spindrift-client`.
    pub client: PathBuf,
}

impl Binaries {
    /// Finds both in `bin_dir`, or beside this program.
    pub fn find(bin_dir: Option<&Path>) -> anyhow::Result<Binaries> {
        let dir = match bin_dir {
            Some(d) => d.to_path_buf(),
            None => std::env::current_exe()?.parent().map(Path::to_path_buf).context("no directory beside bench")?,
        };
        let bins = Binaries { server: dir.join("spindrift-server"), client: dir.join("spindrift-client") };
        for b in [&bins.server, &bins.client] {
            if !b.exists() {
                bail!(
                    "{} not found: build it (cargo build --release -p spindrift-server -p spindrift-client) or pass \
                     --bin-dir",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

/// A child process, killed (and reaped) when dropped if still running.
pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout and stderr into `log`.
    pub fn spawn_logged(name: impl Into<String>, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let g = f.try_clone()?;
        Self::spawn(name, cmd.stdout(f).stderr(g), log)
    }

    /// Spawns `cmd` with stdin closed, stdout into `out` and stderr into `log`.
    pub fn spawn_split(name: impl Into<String>, cmd: &mut Command, out: &Path, log: &Path) -> anyhow::Result<Proc> {
        let f = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let g = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        Self::spawn(name, cmd.stdout(f).stderr(g), log)
    }

    fn spawn(name: impl Into<String>, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let name = name.into();
        let child = cmd.stdin(Stdio::null()).spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc { name, child, status: None, log: log.to_path_buf() })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits until it exits or `deadline` passes.
    pub fn wait_until(&mut self, deadline: Instant) -> Option<ExitStatus> {
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (the daemons end their sessions and write their statistics), then SIGKILL after
    /// `grace`; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.try_status().is_none() {
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().ok();
        }
        if let Some(s) = self.wait_until(Instant::now() + grace) {
            return Some(s);
        }
        self.child.kill().ok();
        self.status = self.child.wait().ok();
        self.status
    }

    /// CPU seconds (user + system, every thread, softirqs that ran in its context included) it has
    /// used so far; None once it has exited.
    pub fn cpu_seconds(&self) -> Option<f64> {
        process_cpu_seconds(self.child.id())
    }

    /// Whether its log holds `text` yet.
    pub fn log_contains(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|l| l.contains(text))
    }

    /// The last `n` lines of its log, joined with ` | `.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut lines: Vec<&str> = log.lines().rev().take(n).collect();
        lines.reverse();
        lines.join(" | ")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// Waits for every process, up to `deadline`; returns each one's exit: `Some("ok")`,
/// `Some("exit status: N")`, or None if it was still running at the deadline.
pub fn wait_all(procs: &mut [Proc], deadline: Instant) -> Vec<Option<String>> {
    let describe = |s: ExitStatus| if s.success() { "ok".to_string() } else { format!("exit {s}") };
    loop {
        let done: Vec<Option<String>> = procs.iter_mut().map(|p| p.try_status().map(describe)).collect();
        if done.iter().all(Option::is_some) || Instant::now() >= deadline {
            return done;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// User + system CPU seconds of this process's children that have exited and been reaped
/// (`getrusage(RUSAGE_CHILDREN)`), so far.
pub fn children_cpu_seconds() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a writable rusage the call fills; RUSAGE_CHILDREN is a valid selector.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on every Linux architecture
/// this runs on).
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds of process `pid` (all its threads, living and exited), from
/// `/proc/<pid>/stat`; None if it is gone.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are
    // state (3), ..., utime (14), stime (15).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// h0's eth0 transmit counters: (bytes, packets).
pub fn tx_counters(h0: &Host) -> anyhow::Result<(u64, u64)> {
    let out = h0.output("ip", ["-s", "-j", "link", "show", "dev", h0.ifname()])?;
    if !out.status.success() {
        bail!("ip -s link in h0 failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -s -j link output")?;
    let tx = &v[0]["stats64"]["tx"];
    match (tx["bytes"].as_u64(), tx["packets"].as_u64()) {
        (Some(b), Some(p)) => Ok((b, p)),
        _ => bail!("no tx counters in {v}"),
    }
}

/// A command that runs `server` on `h0`, pinned to `cpus` (`taskset -c`, which execs it: the
/// child's pid is the server's) if given.
pub fn server_command(h0: &Host, server: &Path, cpus: Option<&str>) -> anyhow::Result<Command> {
    Ok(match cpus {
        Some(cpus) => {
            let mut c = h0.command("taskset")?;
            c.args(["-c", cpus]).arg(server);
            c
        }
        None => h0.command(server)?,
    })
}

/// Steers the receive processing of what host `index` sends to `cpus` (a hexadecimal CPU mask):
/// RPS on its switch port, so the bridge, the flooding to every port and the receiving hosts'
/// input paths run there instead of in the sender's softirqs on its own CPU.
pub fn steer_switch_port(lab: &Lab, index: usize, cpus: &str) -> anyhow::Result<()> {
    let port = lab.host(index)?.switch_port();
    let file = format!("/sys/class/net/{port}/queues/rx-0/rps_cpus");
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.switch_netns(), "sh", "-c", &format!("echo {cpus} > {file}")])
        .output()
        .context("running sh in the switch namespace")?;
    if !out.status.success() {
        bail!(
            "setting {file} to {cpus} in {} failed: {}",
            lab.switch_netns(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// CPUs this process may run on.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

/// The 1-minute load average (other work on the machine disturbs every figure).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

/// Reads a JSON file, None if it is missing or not JSON.
pub fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Where `tool` is in `PATH`.
pub fn which(tool: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.exists()).context("not in PATH")
}

/// `path` holds exactly `image`.
pub fn same_file(path: &Path, image: &[u8]) -> bool {
    std::fs::read(path).is_ok_and(|b| b == image)
}

/// Exit descriptions and file checks of the receivers, with the tail of a failed one's log.
pub fn check_receivers(
    tool: &str,
    done: &[(Option<String>, PathBuf)],
    image: &[u8],
    log_of: impl Fn(usize) -> PathBuf,
) -> (bool, Vec<String>) {
    let mut receivers = Vec::new();
    let mut all_correct = true;
    for (i, (status, out)) in done.iter().enumerate() {
        let ok = same_file(out, image);
        all_correct &= ok && status.as_deref() == Some("ok");
        receivers.push(format!(
            "h{}: {}, {}",
            i + 1,
            status.as_deref().unwrap_or("timed out"),
            if ok { "file matches" } else { "FILE DIFFERS" }
        ));
        if !ok || status.as_deref() != Some("ok") {
            let log = std::fs::read_to_string(log_of(i + 1)).unwrap_or_default();
            eprintln!("{tool} h{}: {}", i + 1, log.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
        }
    }
    (all_correct, receivers)
}

/// A random image of `pages` 4 KiB pages, from `seed`.
pub fn random_image(pages: u64, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut image = vec![0u8; (pages * 4096) as usize];
    rng.fill(image.as_mut_slice());
    image
}

/// One whole-image push: `spindrift-server --image IMG --push all` on h0 and
/// `spindrift-client fetch` on h1..=`hosts`.
pub struct Push<'a> {
    /// The binaries.
    pub bins: &'a Binaries,
    /// Logs, statistics and received files go here, their names prefixed with `tag`.
    pub scratch: &'a Scratch,
    /// File-name prefix of this run.
    pub tag: &'a str,
    /// The image.
    pub image: &'a Path,
    /// Its length.
    pub image_bytes: u64,
    /// The session's group.
    pub group: Ipv4Addr,
    /// The session's port.
    pub port: u16,
    /// Receiving hosts: h1..=hosts.
    pub hosts: usize,
    /// `--io` for the server and every fetch (None: their default).
    pub io: Option<&'a str>,
    /// `--mtu` for the server (None: its default).
    pub mtu: Option<u32>,
    /// Pass `--min-receivers hosts` to the server.
    pub min_receivers: bool,
    /// Have each fetch compare its image with the original (`--verify`).
    pub verify: bool,
    /// Delete the fetched images once the run is over (a 64 MiB image to 4 hosts is 256 MiB
    /// of scratch per run); otherwise they stay for the caller to check.
    pub remove_outputs: bool,
    /// More server flags.
    pub server_flags: Vec<String>,
    /// Pin the server to these CPUs (`taskset -c`), e.g. "0".
    pub server_cpus: Option<String>,
    /// More flags for every fetch.
    pub fetch_flags: Vec<String>,
    /// Longest the fetches may take.
    pub timeout: Duration,
}

/// What one fetch did.
pub struct Fetched {
    /// Exit (`ok`, `exit ...`), None if it timed out.
    pub status: Option<String>,
    /// Where it wrote the image.
    pub out: PathBuf,
    /// Its `--json` report.
    pub report: Option<serde_json::Value>,
}

/// What a push did.
pub struct PushOutcome {
    /// Seconds from starting the fetches to the last one's exit.
    pub wall_s: f64,
    /// The server's CPU seconds from starting the fetches to the last one's exit (None if it
    /// exited early).
    pub server_cpu_s: Option<f64>,
    /// The server's final statistics (`--stats-json`).
    pub server_stats: Option<serde_json::Value>,
    /// CPU seconds of the fetches (user + system, from `getrusage(RUSAGE_CHILDREN)` around their
    /// wait: every thread, counted once each has exited and been reaped).
    pub clients_cpu_s: f64,
    /// Per receiving host, h1 first.
    pub fetched: Vec<Fetched>,
}

impl PushOutcome {
    /// Every fetch exited successfully (with `--verify`: its image equals the original).
    pub fn all_ok(&self) -> bool {
        self.fetched.iter().all(|f| f.status.as_deref() == Some("ok"))
    }

    /// The longest fetch's own transfer time (its report's `seconds`), else the wall time.
    pub fn transfer_s(&self) -> f64 {
        let s = self.fetched.iter().filter_map(|f| f.report.as_ref()?["seconds"].as_f64()).fold(0.0, f64::max);
        if s > 0.0 {
            s
        } else {
            self.wall_s
        }
    }

    /// A counter of the server's final statistics (0 if absent).
    pub fn server_stat(&self, key: &str) -> u64 {
        self.server_stats.as_ref().and_then(|v| v[key].as_u64()).unwrap_or(0)
    }
}

impl Push<'_> {
    /// Runs it in `lab`: starts the server, then the fetches; waits for them (up to the timeout);
    /// stops the server. Every process is killed on every exit path.
    pub fn run(&self, lab: &Lab) -> anyhow::Result<PushOutcome> {
        let h0 = lab.host(0)?;
        let (group, port) = (self.group.to_string(), self.port.to_string());
        let stats_path = self.scratch.path(&format!("{}-server-stats.json", self.tag));
        let mut cmd = server_command(h0, &self.bins.server, self.server_cpus.as_deref())?;
        cmd.args(["--image", &self.image.display().to_string(), "--iface", &h0.addr().to_string()])
            .args(["--group", &group, "--port", &port, "--key-hex", KEY_HEX, "--push", "all"])
            .args(["--duration-s", &(self.timeout.as_secs() + 10).to_string()])
            .args(["--stats-json", &stats_path.display().to_string()]);
        if self.min_receivers {
            cmd.args(["--min-receivers", &self.hosts.to_string()]);
        }
        if let Some(io) = self.io {
            cmd.args(["--io", io]);
        }
        if let Some(mtu) = self.mtu {
            cmd.args(["--mtu", &mtu.to_string()]);
        }
        cmd.args(&self.server_flags);
        let mut server =
            Proc::spawn_logged("spindrift-server", &mut cmd, &self.scratch.path(&format!("{}-server.log", self.tag)))?;
        // Start the fetches once the server serves (its start-up waits for a restart-safe epoch and
        // reads the image): a fetch started before that spends its first round trips on a server
        // that is not there yet, which would count as transfer time.
        // (A log filtered below `info` never says so: then the fetches start after 3 s.)
        let ready_by = Instant::now() + Duration::from_secs(3);
        std::thread::sleep(Duration::from_millis(100));
        while !server.log_contains("serving ") && Instant::now() < ready_by {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(s) = server.try_status() {
            bail!("spindrift-server exited at once ({s}): {}", server.log_tail(5));
        }
        let cpu0 = server.cpu_seconds();
        let started = Instant::now();
        let mut clients = Vec::new();
        let mut outs = Vec::new();
        for i in 1..=self.hosts {
            let h = lab.host(i)?;
            let out = self.scratch.path(&format!("{}-h{i}.img", self.tag));
            let mut c = h.command(&self.bins.client)?;
            c.args(["fetch", "--server", &h0.addr().to_string(), "--iface", &h.addr().to_string()])
                .args(["--group", &group, "--port", &port, "--key-hex", KEY_HEX])
                .args(["--image-bytes", &self.image_bytes.to_string(), "--out", &out.display().to_string()])
                .args(["--timeout-s", &self.timeout.as_secs().to_string(), "--json"]);
            if let Some(io) = self.io {
                c.args(["--io", io]);
            }
            if self.verify {
                c.arg("--verify").arg(self.image);
            }
            c.args(&self.fetch_flags);
            let (json, log) = (
                self.scratch.path(&format!("{}-h{i}-fetch.json", self.tag)),
                self.scratch.path(&format!("{}-h{i}-fetch.log", self.tag)),
            );
            clients.push(Proc::spawn_split(format!("fetch h{i}"), &mut c, &json, &log)?);
            outs.push((out, json));
        }
        let children0 = children_cpu_seconds();
        let done = wait_all(&mut clients, started + self.timeout);
        let clients_cpu_s = children_cpu_seconds() - children0;
        let wall_s = started.elapsed().as_secs_f64();
        let server_cpu_s = match (cpu0, server.cpu_seconds()) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        drop(clients); // kills the fetches that timed out
        server.stop(Duration::from_secs(5));
        let mut fetched = Vec::new();
        for (i, (status, (out, json))) in done.into_iter().zip(outs).enumerate() {
            if status.as_deref() != Some("ok") {
                let log = std::fs::read_to_string(self.scratch.path(&format!("{}-h{}-fetch.log", self.tag, i + 1)))
                    .unwrap_or_default();
                eprintln!(
                    "{} fetch h{}: {}: {}",
                    self.tag,
                    i + 1,
                    status.as_deref().unwrap_or("timed out"),
                    log.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                );
            }
            if self.remove_outputs {
                std::fs::remove_file(&out).ok();
            }
            fetched.push(Fetched { status, out, report: read_json(&json) });
        }
        Ok(PushOutcome { wall_s, server_cpu_s, server_stats: read_json(&stats_path), clients_cpu_s, fetched })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_are_read_after_the_command_name() {
        // pid (comm with ") spaces") state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime ...
        let line = "42 (a ) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0";
        assert_eq!(stat_cpu_seconds(line), Some(3.0));
        assert_eq!(stat_cpu_seconds("42 (x) S 1"), None);
        let own = process_cpu_seconds(std::process::id()).expect("this process has a stat file");
        assert!(own >= 0.0);
    }
}
