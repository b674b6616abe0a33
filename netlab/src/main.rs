//! `netlab`: build and drive labs of network-namespace hosts from the shell.
//!
//! ```text
//! netlab up --name NAME --hosts N [--rate 100mbit] [--loss 0.05] [--mtu 9000]
//! netlab exec NAME HOST -- COMMAND...
//! netlab addr NAME HOST
//! netlab set NAME HOST|all [--rate R] [--loss P] [--cut | --restore] ...
//! netlab show NAME
//! netlab list
//! netlab down NAME
//! netlab clean [--prefix P]
//! ```
//!
//! Loss and cut are nftables rules on the switch's port towards each host
//! (`ip netns exec sdlab-NAME-sw nft list table netdev netlab_hI` shows them
//! with their drop counters), so they hold for AF_XDP hosts too; see the
//! `conditions` module of the library.

use std::os::unix::process::CommandExt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use netlab::{Lab, LabConfig, LinkConditions, Loss, Rate};

/// Build N hosts on this machine from network namespaces joined by a bridge.
///
/// Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `apt-get install -y iproute2 nftables`.
/// Loss and cut act on the switch's port towards each host (nftables table
/// `netdev netlab_hI` in namespace sdlab-NAME-sw), so AF_XDP traffic meets them too;
/// AF_XDP senders bypass the host's tx rate limit (a qdisc), not the rx one.
/// Not modelled (no netem in this kernel): delay, reordering, duplication, bursty
/// loss; the protocol simulator in protocol-spec models those.
#[derive(Debug, Parser)]
#[command(name = "netlab", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a lab and leave it running (remove it with `netlab down NAME`).
    Up(UpArgs),
    /// Run a command inside a host (its exit status becomes netlab's).
    Exec {
        /// Lab name.
        name: String,
        /// Host: h0 .. h{N-1}.
        host: String,
        /// The command and its arguments (put them after `--`).
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            num_args = 1..
        )]
        command: Vec<String>,
    },
    /// Print a host's IPv4 address.
    Addr {
        /// Lab name.
        name: String,
        /// Host: h0 .. h{N-1}.
        host: String,
        /// Print it with its prefix length (198.18.0.1/24).
        #[arg(long)]
        cidr: bool,
    },
    /// Change the link conditions of a host (or of all hosts) on a running lab.
    Set(SetArgs),
    /// Show a lab's hosts, addresses and link conditions.
    Show {
        /// Lab name.
        name: String,
    },
    /// List the labs on this machine.
    List,
    /// Remove a lab: kill what runs inside it and delete its namespaces.
    Down {
        /// Lab name.
        name: String,
    },
    /// Remove every lab and leftover (namespaces named sdlab-*), or only labs whose name starts with --prefix.
    Clean {
        /// Only labs whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
    },
}

#[derive(Debug, Args)]
struct ConditionArgs {
    /// Rate limit of each link in both directions, e.g. 100mbit, 1gbit, 'none'.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<RateArg>,
    /// Rate limit of what the host sends (overrides --rate for that direction; AF_XDP senders bypass it).
    #[arg(long, value_parser = parse_rate)]
    rate_tx: Option<RateArg>,
    /// Rate limit of what the host receives (overrides --rate for that direction).
    #[arg(long, value_parser = parse_rate)]
    rate_rx: Option<RateArg>,
    /// Random loss of what each host receives: a probability (0.05) or percentage (5%).
    #[arg(long, value_parser = parse_loss)]
    loss: Option<Loss>,
    /// Random loss of what the host sends (a multicast sender's loss hits every receiver alike).
    #[arg(long, value_parser = parse_loss)]
    loss_tx: Option<Loss>,
    /// Same as --loss.
    #[arg(long, value_parser = parse_loss, conflicts_with = "loss")]
    loss_rx: Option<Loss>,
}

impl ConditionArgs {
    fn apply(&self, c: &mut LinkConditions) {
        if let Some(RateArg(r)) = self.rate {
            c.rate_tx = r;
            c.rate_rx = r;
        }
        if let Some(RateArg(r)) = self.rate_tx {
            c.rate_tx = r;
        }
        if let Some(RateArg(r)) = self.rate_rx {
            c.rate_rx = r;
        }
        if let Some(l) = self.loss.or(self.loss_rx) {
            c.loss_rx = l;
        }
        if let Some(l) = self.loss_tx {
            c.loss_tx = l;
        }
    }

    fn is_empty(&self) -> bool {
        self.rate.is_none()
            && self.rate_tx.is_none()
            && self.rate_rx.is_none()
            && self.loss.is_none()
            && self.loss_tx.is_none()
            && self.loss_rx.is_none()
    }
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Lab name: letters, digits, '_' and '-' (namespaces will be sdlab-NAME-*).
    #[arg(long)]
    name: String,
    /// Number of hosts (1..=250), named h0 .. h{N-1}.
    #[arg(long)]
    hosts: usize,
    /// MTU of every link (1500 default; 9000 for jumbo frames).
    #[arg(long, default_value_t = netlab::DEFAULT_MTU)]
    mtu: u32,
    /// Let the switch snoop IGMP (receivers must join; a querier runs) instead of flooding multicast.
    #[arg(long)]
    igmp_snooping: bool,
    /// Stay in the foreground and remove the lab on Ctrl-C / SIGTERM (or exit when
    /// another process removes it) instead of returning to the shell.
    #[arg(long)]
    foreground: bool,
    #[command(flatten)]
    conditions: ConditionArgs,
}

#[derive(Debug, Args)]
struct SetArgs {
    /// Lab name.
    name: String,
    /// Host (h0 .. h{N-1}) or `all`.
    host: String,
    #[command(flatten)]
    conditions: ConditionArgs,
    /// Cut the host off: nothing in or out.
    #[arg(long, conflicts_with = "restore")]
    cut: bool,
    /// Undo --cut.
    #[arg(long)]
    restore: bool,
}

#[derive(Debug, Clone, Copy)]
struct RateArg(Option<Rate>);

fn parse_rate(s: &str) -> Result<RateArg, String> {
    Rate::parse_optional(s).map(RateArg).map_err(|e| e.to_string())
}

fn parse_loss(s: &str) -> Result<Loss, String> {
    s.parse().map_err(|e: netlab::conditions::ConditionsError| e.to_string())
}

/// The last SIGINT/SIGTERM received (0 for none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM so that `up` can finish or undo its work.
fn catch_signals() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` is an `extern "C"` function that lives for the
        // whole program and only performs an atomic store, which is
        // async-signal-safe. Installing a handler has no other precondition.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("netlab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Up(args) => up(args),
        Cmd::Exec { name, host, command } => {
            let lab = Lab::open(&name)?;
            let host = lab.host_named(&host)?;
            let (program, rest) =
                command.split_first().context("no command given: netlab exec NAME HOST -- COMMAND...")?;
            let err = host.command(program)?.args(rest).exec();
            bail!("could not run {program:?} in {}: {err}", host.netns())
        }
        Cmd::Addr { name, host, cidr } => {
            let lab = Lab::open(&name)?;
            let host = lab.host_named(&host)?;
            if cidr {
                println!("{}/{}", host.addr(), host.prefix_len());
            } else {
                println!("{}", host.addr());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Set(args) => set(args),
        Cmd::Show { name } => {
            let lab = Lab::open(&name)?;
            print_lab(&lab)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List => {
            let labs = netlab::list_labs()?;
            if labs.is_empty() {
                println!("no labs");
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<28} {:<18} {:>5} {:>6} {:<9} STATUS", "NAME", "SUBNET", "HOSTS", "MTU", "SNOOPING");
            for l in labs {
                match l.meta {
                    Some(m) => {
                        let subnet = netlab::addressing::lab_subnet(m.index)
                            .map(|s| format!("{s}/24"))
                            .unwrap_or_else(|_| "?".into());
                        let status = if l.host_namespaces == m.hosts {
                            "ok".to_owned()
                        } else {
                            format!("broken: {} of {} hosts", l.host_namespaces, m.hosts)
                        };
                        println!(
                            "{:<28} {:<18} {:>5} {:>6} {:<9} {status}",
                            l.name,
                            subnet,
                            m.hosts,
                            m.mtu,
                            if m.igmp_snooping { "on" } else { "off" }
                        );
                    }
                    None => println!(
                        "{:<28} {:<18} {:>5} {:>6} {:<9} broken (switch {}); remove with `netlab down {}`",
                        l.name,
                        "?",
                        l.host_namespaces,
                        "?",
                        "?",
                        if l.has_switch { "damaged" } else { "missing" },
                        l.name
                    ),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down { name } => {
            netlab::names::validate_lab_name(&name)?;
            netlab::check_prerequisites()?;
            let namespaces = netlab::clean::lab_namespaces(&name)?;
            if namespaces.is_empty() {
                bail!("no lab named {name:?}; `netlab list` shows the labs");
            }
            // Works for damaged labs too, which Lab::open would refuse.
            netlab::clean::teardown(&name)?;
            println!("removed lab {name} ({} namespaces)", namespaces.len());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Clean { prefix } => {
            netlab::check_prerequisites()?;
            let report = netlab::clean(prefix.as_deref())?;
            if report.namespaces.is_empty() {
                println!("nothing to clean");
            } else {
                println!(
                    "removed {} namespaces of {} labs: {}",
                    report.namespaces.len(),
                    report.labs.len(),
                    report.labs.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn up(args: UpArgs) -> Result<ExitCode> {
    let mut conditions = LinkConditions::default();
    args.conditions.apply(&mut conditions);
    let config = LabConfig::new(args.name.clone(), args.hosts)
        .mtu(args.mtu)
        .igmp_snooping(args.igmp_snooping)
        .conditions(conditions);
    config.validate()?;
    catch_signals();
    let lab = Lab::create(&config)?;
    if SIGNAL.load(Ordering::SeqCst) != 0 {
        drop(lab);
        bail!("interrupted: the lab was removed again");
    }
    print_lab(&lab)?;
    if !args.foreground {
        let name = lab.persist();
        println!("lab {name} is up; run `netlab exec {name} h0 -- COMMAND`, remove it with `netlab down {name}`");
        return Ok(ExitCode::SUCCESS);
    }
    println!("lab {} is up; Ctrl-C or SIGTERM removes it (or `netlab down {}`)", lab.name(), lab.name());
    let switch = lab.switch_netns();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        if SIGNAL.load(Ordering::SeqCst) != 0 {
            let name = lab.name().to_owned();
            lab.down()?;
            println!("removed lab {name}");
            return Ok(ExitCode::SUCCESS);
        }
        if !netlab::netns::netns_exists(&switch) {
            let name = lab.persist();
            println!("lab {name} was removed by another process");
            return Ok(ExitCode::SUCCESS);
        }
    }
}

fn set(args: SetArgs) -> Result<ExitCode> {
    if args.conditions.is_empty() && !args.cut && !args.restore {
        bail!("nothing to set: give --rate, --rate-tx, --rate-rx, --loss, --loss-tx, --cut or --restore");
    }
    let lab = Lab::open(&args.name)?;
    let indices: Vec<usize> =
        if args.host == "all" { (0..lab.len()).collect() } else { vec![lab.host_named(&args.host)?.index()] };
    for i in indices {
        lab.update_conditions(i, |c| {
            args.conditions.apply(c);
            if args.cut {
                c.cut = true;
            }
            if args.restore {
                c.cut = false;
            }
        })?;
        println!("{}: {}", netlab::names::host_name(i), lab.conditions(i)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_lab(lab: &Lab) -> Result<()> {
    println!(
        "lab {}: {} hosts, subnet {}/{}, MTU {}, IGMP snooping {}, switch netns {}",
        lab.name(),
        lab.len(),
        lab.subnet(),
        lab.prefix_len(),
        lab.mtu(),
        if lab.igmp_snooping() { "on" } else { "off (multicast floods)" },
        lab.switch_netns()
    );
    for h in lab.hosts() {
        println!("  {:<5} {:<15} {:<26} {}", h.name(), h.addr(), h.netns(), lab.conditions(h.index())?);
    }
    Ok(())
}
