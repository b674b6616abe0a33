//! `bench xdp`: the UDP backend against the AF_XDP backend, side by side, in one netlab run.
//!
//! ```text
//! bench xdp [--hosts 4] [--size 1400,8000] [--seconds 5] [--batch 64] [--backends udp,udp-gso,xdp]
//!           [--receivers udp|same|none] [--sink hosts|switch-drop] [--bridge-netfilter] [--json]
//! ```
//!
//! One lab (MTU 9000, so 8000-byte datagrams go unfragmented) with a sender on h0 and `--hosts`
//! receivers h1..hN that joined one group. For each datagram size and backend, the sender
//! multicasts as fast as its backend takes datagrams for `--seconds`, and each receiver counts
//! what it gets, draining its backend once a millisecond. Reported per row: datagrams/s sent, the
//! sender thread's on-CPU time (`/proc/thread-self/schedstat`), datagrams and goodput per sender
//! CPU-second, and what the receivers got. Needs root.
//!
//! The backends alone, without the daemons' protocol work; `bench xdp-daemons` runs the real
//! server and host daemons over either backend.
//!
//! # Reading the figures
//!
//! On one machine, everything after the sender's system call (the veth pair, the bridge flooding
//! to every port, each receiving host's input path) runs in the sender's softirqs and counts as
//! sender CPU, and the receivers share the same cores. So:
//!
//! * receivers are kernel UDP sockets by default for every row (`--receivers udp`), so that only
//!   the sender's backend differs; `same` makes AF_XDP rows use AF_XDP receivers (on veth their
//!   native XDP path copies every flooded frame once more), `none` leaves the hosts without
//!   members (the kernel drops the frames at the IP layer) to isolate the transmit path;
//! * the lab bridge's `br_netfilter` hooks are turned off in the switch namespace unless
//!   `--bridge-netfilter` is given: a switch runs no firewall, and those hooks cost more per
//!   frame than either backend's own transmit path;
//! * `udp-gso` rows send runs of datagrams that stay one packet through veth and the bridge and
//!   are cut up only at each receiver, outside the sender's accounting: compare them with care;
//! * the AF_XDP sender fills in UDP checksums (`--udp-checksum false` sends none); every receiving
//!   kernel then verifies them in software, whereas the UDP backend's checksums are never computed
//!   on veth (left to an offload a virtual link never performs).
//!
//! # The NIC model: `--sink switch-drop`
//!
//! A server with a real NIC pays for its backend's transmit path up to the driver's ring; the
//! NIC, the wire, the switch and the receivers cost it nothing. In a lab they are all the sender's
//! softirqs, which is why the default rows show AF_XDP only slightly ahead of UDP. With
//! `--sink switch-drop` the frames are dropped as they enter the switch: a netdev `ingress` rule
//! (nftables, in the switch namespace, on h0's switch port, ahead of the bridge) drops every IPv4
//! frame and counts it. The sender's CPU is then its backend's own transmit path plus one veth
//! hop (the peer's receive up to that rule), which is what a NIC that takes frames off the CPU
//! leaves; no receiver runs (`--receivers` is ignored) and the table shows the frames dropped at
//! the switch instead. The drop is an nftables rule rather than `tc ... matchall action drop`
//! because this kernel has neither `cls_matchall` nor `act_gact` (and loads no modules); it sits
//! at the same point of the receive path, just after tc's ingress hook.
//!
//! Caveat: a `udp-gso` super-packet (a run of up to 64 datagrams in one skb) reaches the switch
//! port whole and is dropped whole, so no one ever segments it: those rows are flattered (their
//! "frames dropped" count is the super-packets). A real NIC would segment them in hardware (or
//! the kernel in software, before the driver, when the NIC cannot), at no or some cost to the
//! sender. The `udp` and `af_xdp` rows have one frame per datagram and compare fairly.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use netio::udp::UdpConfig;
use netio::xdp::{XdpConfig, XdpIo};
use netio::{Interest, PacketIo, RxBatch, TxBatch};
use serde::Serialize;

/// The backends compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// UDP socket, `sendmmsg`/`recvmmsg`.
    Udp,
    /// UDP socket with GSO on the sender (runs of datagrams per system call).
    UdpGso,
    /// AF_XDP sockets and the XDP program.
    Xdp,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Udp => "udp",
            Backend::UdpGso => "udp-gso",
            Backend::Xdp => "af_xdp",
        }
    }
}

/// What the receiving hosts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Receivers {
    /// Kernel UDP sockets for every row, so that only the sender's backend changes.
    Udp,
    /// The same backend as the sender (UDP rows: UDP; AF_XDP rows: AF_XDP).
    Same,
    /// No receiving sockets: the hosts' kernels drop the flooded multicast at the IP layer, so
    /// the sender's CPU is mostly its own backend's transmit path (plus the bridge).
    None,
}

/// Where the sender's frames end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sink {
    /// The bridge floods them to every host (what `--receivers` says runs there).
    Hosts,
    /// Dropped as they enter the switch, before the bridge (the NIC model: see the module docs).
    SwitchDrop,
}

/// Sender throughput of the UDP and AF_XDP backends in a netlab lab.
#[derive(Debug, Clone, Args)]
pub struct XdpArgs {
    /// Receiving hosts (the sender is one more), 1..=16.
    #[arg(long, default_value = "4", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub hosts: u16,
    /// Datagram sizes in bytes, comma-separated, each 64..=8972.
    #[arg(long = "size", value_delimiter = ',', default_values_t = [1400usize, 8000])]
    pub sizes: Vec<usize>,
    /// Seconds per row.
    #[arg(long, default_value = "5", value_parser = crate::args::positive)]
    pub seconds: f64,
    /// Datagrams per `send_batch` call.
    #[arg(long, default_value = "64", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,
    /// Backends to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Backend::Udp, Backend::UdpGso, Backend::Xdp])]
    pub backends: Vec<Backend>,
    /// What the receivers run. On one machine the kernel's delivery to every receiver runs in
    /// the sender's softirqs and counts as sender CPU, so `udp` (the default) keeps that part
    /// equal across rows.
    #[arg(long, value_enum, default_value = "udp")]
    pub receivers: Receivers,
    /// Where the frames end: `hosts` (flooded to every host), or `switch-drop` (dropped as they
    /// enter the switch, so the sender's CPU is its backend's transmit path plus one veth hop, as
    /// with a NIC; GSO super-packets are dropped whole, which flatters `udp-gso`).
    #[arg(long, value_enum, default_value = "hosts")]
    pub sink: Sink,
    /// Leave the lab bridge's netfilter hooks (`br_netfilter`) on; by default they are turned off
    /// in the switch namespace, since a switch runs no firewall.
    #[arg(long)]
    pub bridge_netfilter: bool,
    /// Have the AF_XDP sender fill in UDP checksums (its default; `false` sends 0, "none"). The
    /// UDP backend's checksums are never computed on veth (the kernel leaves them to an offload
    /// that a virtual link never performs), while a filled-in checksum is verified by every
    /// receiving kernel: a pass over each datagram per receiver, in the sender's softirqs here.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub udp_checksum: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One measured row.
#[derive(Debug, Clone, Serialize)]
struct Row {
    backend: Backend,
    /// Backend description (AF_XDP: mode and attachment).
    detail: String,
    size: usize,
    seconds: f64,
    sent: u64,
    sent_pps: f64,
    /// Sender thread's on-CPU time / wall time.
    sender_cpu: f64,
    /// Datagrams per sender CPU-second.
    pps_per_core: f64,
    /// Payload bits per sender CPU-second, Gbit/s.
    goodput_per_core_gbps: f64,
    /// Payload Gbit/s sent (wall clock).
    sent_gbps: f64,
    /// Mean datagrams/s received per receiver.
    recv_pps_mean: f64,
    /// Fewest datagrams one receiver got, as a fraction of those sent.
    recv_fraction_min: f64,
    /// Frames dropped at the switch (`--sink switch-drop`; GSO super-packets count once).
    #[serde(skip_serializing_if = "Option::is_none")]
    switch_dropped: Option<u64>,
}

/// This thread's on-CPU time so far, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|t| t.parse().ok()))
        .unwrap_or(0)
}

const PORT: u16 = 7500;
const GROUP: Ipv4Addr = Ipv4Addr::new(239, 77, 200, 1);

fn open(backend: Backend, host: &netlab::Host, join: bool, args: &XdpArgs) -> anyhow::Result<Box<dyn PacketIo + Send>> {
    let batch = usize::from(args.batch);
    let mut udp = UdpConfig::new(host.addr(), PORT).max_batch(batch).gso(backend == Backend::UdpGso);
    if join {
        udp = udp.join(GROUP);
    }
    let io: Box<dyn PacketIo + Send> = match backend {
        Backend::Udp | Backend::UdpGso => {
            Box::new(host.run(|| netio::udp::UdpIo::open(&udp))?.with_context(|| format!("UDP on {}", host.name()))?)
        }
        Backend::Xdp => {
            let cfg = XdpConfig::from_udp(&udp).udp_checksum(args.udp_checksum);
            Box::new(host.run(|| XdpIo::open(&cfg))?.with_context(|| format!("AF_XDP on {}", host.name()))?)
        }
    };
    Ok(io)
}

fn describe(backend: Backend, io: &dyn PacketIo) -> String {
    let c = io.capabilities();
    match backend {
        Backend::Xdp => if c.zero_copy { "zero-copy" } else { "copy-mode" }.to_string(),
        _ => if c.gso { "sendmmsg+GSO" } else { "sendmmsg" }.to_string(),
    }
}

/// Counts what arrives, draining the backend every millisecond rather than waking per datagram,
/// so four receivers leave the sender (which shares the machine's cores with them) some CPU.
fn receive(mut io: Box<dyn PacketIo + Send>, stop: Arc<AtomicBool>) -> anyhow::Result<u64> {
    let mut batch = RxBatch::new(256, 9000)?;
    let mut got = 0u64;
    loop {
        let done = stop.load(Ordering::Relaxed);
        loop {
            let n = io.recv_batch(&mut batch)?;
            got += n as u64;
            if n < batch.capacity() {
                break;
            }
        }
        if done {
            return Ok(got);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn run_row(lab: &netlab::Lab, backend: Backend, size: usize, args: &XdpArgs) -> anyhow::Result<Row> {
    let batch = usize::from(args.batch);
    let mut sender = open(backend, lab.host(0)?, false, args)?;
    let detail = describe(backend, sender.as_ref());
    let stop = Arc::new(AtomicBool::new(false));
    let mut receivers = Vec::new();
    let rx_backend = match (args.receivers, backend) {
        (Receivers::Same, Backend::Xdp) => Backend::Xdp,
        _ => Backend::Udp,
    };
    let dropped0 = if args.sink == Sink::SwitchDrop { Some(switch_drop_count(lab)?) } else { None };
    for h in 1..=usize::from(args.hosts) {
        if args.receivers == Receivers::None || args.sink == Sink::SwitchDrop {
            break;
        }
        let rx = open(rx_backend, lab.host(h)?, true, args)?;
        let stop = stop.clone();
        receivers.push(std::thread::spawn(move || receive(rx, stop)));
    }
    let mut tx = TxBatch::new(batch, size)?;
    let payload = vec![0x5au8; size];
    for _ in 0..batch {
        tx.push(SocketAddrV4::new(GROUP, PORT), &payload)?;
    }
    let limit = Duration::from_secs_f64(args.seconds);
    let (cpu0, start) = (thread_cpu_ns(), Instant::now());
    let mut sent = 0u64;
    while start.elapsed() < limit {
        sent += sender.send_batch(&mut tx)? as u64;
        if tx.is_sent() {
            tx.rewind();
        } else {
            sender.wait(Interest::WRITABLE, Some(Duration::from_millis(20)))?;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (thread_cpu_ns() - cpu0) as f64 / 1e9;
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let mut got = Vec::new();
    for r in receivers {
        got.push(r.join().map_err(|_| anyhow::anyhow!("a receiver thread panicked"))??);
    }
    drop(sender);
    let switch_dropped = match dropped0 {
        Some(d0) => Some(switch_drop_count(lab)?.saturating_sub(d0)),
        None => None,
    };
    let bits = (sent * size as u64 * 8) as f64;
    let per_core = |x: f64| if cpu > 0.0 { x / cpu } else { 0.0 };
    Ok(Row {
        backend,
        detail,
        size,
        seconds: elapsed,
        sent,
        sent_pps: sent as f64 / elapsed,
        sender_cpu: cpu / elapsed,
        pps_per_core: per_core(sent as f64),
        goodput_per_core_gbps: per_core(bits) / 1e9,
        sent_gbps: bits / elapsed / 1e9,
        recv_pps_mean: got.iter().sum::<u64>() as f64 / got.len().max(1) as f64 / elapsed,
        recv_fraction_min: got.iter().min().copied().unwrap_or(0) as f64 / sent.max(1) as f64,
        switch_dropped,
    })
}

fn print_table(rows: &[Row], args: &XdpArgs) {
    let sink = args.sink == Sink::SwitchDrop;
    println!(
        "multicast from h0 to {} hosts over a netlab bridge (MTU 9000{}), {} s per row, batches of {}, {}",
        args.hosts,
        if args.bridge_netfilter { ", bridge netfilter on" } else { "" },
        args.seconds,
        args.batch,
        if sink {
            "frames dropped as they enter the switch (NIC model: the sender pays its transmit path and one veth hop)"
        } else {
            match args.receivers {
                Receivers::Udp => "receivers: UDP sockets",
                Receivers::Same => "receivers: same backend as the sender",
                Receivers::None => "receivers: none (hosts drop the multicast)",
            }
        }
    );
    let (c1, c2) = if sink { ("dropped/s", "at switch") } else { ("recv/s mean", "recv min") };
    println!(
        "{:<8} {:<12} {:>6} {:>11} {:>9} {:>8} {:>12} {:>14} {:>13} {:>9}",
        "backend", "mode", "size", "sent/s", "Gbit/s", "tx CPU", "sent/CPU-s", "Gbit/s/CPU", c1, c2
    );
    for r in rows {
        let (v1, v2) = match r.switch_dropped {
            Some(d) => (
                format!("{:.0}", d as f64 / r.seconds),
                if r.backend == Backend::UdpGso {
                    "GSO skbs".to_string()
                } else {
                    format!("{:.1}%", d as f64 * 100.0 / r.sent.max(1) as f64)
                },
            ),
            None => (format!("{:.0}", r.recv_pps_mean), format!("{:.1}%", r.recv_fraction_min * 100.0)),
        };
        println!(
            "{:<8} {:<12} {:>6} {:>11.0} {:>9.2} {:>7.0}% {:>12.0} {:>14.2} {:>13} {:>9}",
            r.backend.name(),
            r.detail,
            r.size,
            r.sent_pps,
            r.sent_gbps,
            r.sender_cpu * 100.0,
            r.pps_per_core,
            r.goodput_per_core_gbps,
            v1,
            v2
        );
    }
    for &size in &args.sizes {
        let find = |b| rows.iter().find(|r| r.size == size && r.backend == b);
        if let (Some(u), Some(x)) = (find(Backend::Udp), find(Backend::Xdp)) {
            println!(
                "{size} B: AF_XDP / UDP = {:.2}x datagrams/s, {:.2}x per sender CPU-second",
                x.sent_pps / u.sent_pps.max(1.0),
                x.pps_per_core / u.pps_per_core.max(1.0)
            );
        }
        if let (Some(g), Some(x)) = (find(Backend::UdpGso), find(Backend::Xdp)) {
            println!(
                "{size} B: AF_XDP / UDP-GSO = {:.2}x datagrams/s, {:.2}x per sender CPU-second{}",
                x.sent_pps / g.sent_pps.max(1.0),
                x.pps_per_core / g.pps_per_core.max(1.0),
                if sink { " (GSO flattered: its super-packets are dropped unsegmented)" } else { "" }
            );
        }
    }
}

/// The nftables table (family netdev, switch namespace) of `--sink switch-drop`.
const SINK_TABLE: &str = "bench_sink";

/// Drops every IPv4 frame h0 sends as it enters the switch: a netdev ingress chain on h0's switch
/// port, ahead of the bridge (and of netlab's own per-port tables), with a counter.
fn install_switch_drop(lab: &netlab::Lab) -> anyhow::Result<()> {
    let port = lab.host(0)?.switch_port();
    let script = format!(
        "table netdev {SINK_TABLE} {{\n  chain sink {{\n    type filter hook ingress device \"{port}\" priority -500; \
         policy accept;\n    meta protocol ip counter drop\n  }}\n}}\n"
    );
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.switch_netns(), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running nft in the switch namespace")?;
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("installing the switch drop rule failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Frames the `--sink switch-drop` rule has dropped so far.
fn switch_drop_count(lab: &netlab::Lab) -> anyhow::Result<u64> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.switch_netns(), "nft", "-j", "list", "table", "netdev", SINK_TABLE])
        .output()
        .context("running nft in the switch namespace")?;
    if !out.status.success() {
        bail!("reading the switch drop counter failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("nft -j output")?;
    fn find_counter(v: &serde_json::Value) -> Option<u64> {
        match v {
            serde_json::Value::Object(m) => {
                m.get("counter").and_then(|c| c["packets"].as_u64()).or_else(|| m.values().find_map(find_counter))
            }
            serde_json::Value::Array(a) => a.iter().find_map(find_counter),
            _ => None,
        }
    }
    find_counter(&v).with_context(|| format!("no counter in the switch drop rule: {v}"))
}

/// Stops the lab's bridge from passing bridged frames through iptables (`br_netfilter`, on by
/// default in every namespace of this kernel): a switch does not run a firewall, and those hooks
/// cost the sender's softirqs more per datagram than either backend's own transmit path.
pub(crate) fn switch_netfilter_off(lab: &netlab::Lab) -> anyhow::Result<()> {
    let sw = lab.switch_netns();
    for key in ["net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-arptables"] {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        if !std::path::Path::new(&path).exists() {
            continue; // no br_netfilter in this kernel: nothing to turn off
        }
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &sw, "sysctl", "-qw", &format!("{key}=0")])
            .output()
            .context("running sysctl in the switch namespace")?;
        if !out.status.success() {
            bail!("setting {key}=0 in {sw} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(())
}

/// Runs the comparison.
pub fn run(args: &XdpArgs) -> anyhow::Result<ExitCode> {
    if let Some(&bad) = args.sizes.iter().find(|&&s| !(64..=8972).contains(&s)) {
        bail!("--size {bad} is out of range: each size must be in 64..=8972");
    }
    netlab::check_prerequisites().context("bench xdp needs a netlab lab (root)")?;
    let lab = netlab::Lab::create(
        &netlab::LabConfig::new(netlab::unique_lab_name("bxdp"), usize::from(args.hosts) + 1).mtu(9000),
    )
    .context("creating the lab")?;
    if !args.bridge_netfilter {
        switch_netfilter_off(&lab)?;
    }
    if args.sink == Sink::SwitchDrop {
        install_switch_drop(&lab)?;
    }
    let mut rows = Vec::new();
    for &size in &args.sizes {
        for &backend in &args.backends {
            tracing::info!(backend = backend.name(), size, "measuring");
            rows.push(run_row(&lab, backend, size, args).with_context(|| format!("{} at {size} B", backend.name()))?);
        }
    }
    drop(lab);
    if args.json {
        let v = serde_json::json!({
            "hosts": args.hosts,
            "seconds": args.seconds,
            "batch": args.batch,
            "receivers": if args.sink == Sink::SwitchDrop { serde_json::json!("none") } else { serde_json::json!(args.receivers) },
            "sink": args.sink,
            "bridge_netfilter": args.bridge_netfilter,
            "xdp_udp_checksum": args.udp_checksum,
            "mtu": 9000,
            "rows": rows,
        });
        println!("{v}");
    } else {
        print_table(&rows, args);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_sizes_are_refused_before_any_lab_is_made() {
        let args = XdpArgs {
            hosts: 1,
            sizes: vec![1400, 10],
            seconds: 0.1,
            batch: 8,
            backends: vec![Backend::Xdp],
            receivers: Receivers::Udp,
            sink: Sink::Hosts,
            bridge_netfilter: false,
            udp_checksum: true,
            json: false,
        };
        let e = run(&args).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(e, "--size 10 is out of range: each size must be in 64..=8972");
    }
}
