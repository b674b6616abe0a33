//! `spindrift-client`: the host daemon (`daemon`), a whole-image multicast download (`fetch`), and a
//! test process that stands in for a clone (`touch`).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use netio::IoKind;
use spindrift_client::daemon::{DaemonConfig, DaemonError};
use spindrift_client::session::{
    default_node, pages_for_bytes, parse_key_hex, read_key_file, FetchReport, Session, SessionConfig, SessionError,
    DEFAULT_PORT,
};
use spindrift_client::touch::{self, Order, Pattern, TouchConfig, TouchError};
use spindrift_client::{PageCache, CACHE_PAGE_SIZE};
use spindrift_protocol::wire::SessionKey;

/// spindrift host daemon.
#[derive(Parser, Debug)]
#[command(name = "spindrift-client", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pull a whole image from a memory server's multicast session into a file.
    Fetch(FetchArgs),
    /// Run the host daemon: follow the group's sessions and serve clones' page faults.
    Daemon(DaemonArgs),
    /// Test process: map a snapshot lazily through the daemon, touch pages in order, verify them.
    Touch(TouchArgs),
}

#[derive(Args, Debug)]
struct DaemonArgs {
    /// This host's interface IPv4 address (the group is joined there).
    #[arg(long)]
    iface: Ipv4Addr,
    /// The multicast group (239.0.0.0/8).
    #[arg(long)]
    group: Ipv4Addr,
    /// The UDP port of the group and the servers.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// The group key: 64 hex digits (session keys are derived from it and the session id).
    #[arg(long, conflicts_with = "key_file", required_unless_present = "key_file")]
    key_hex: Option<String>,
    /// The group key: a file of 32 raw bytes.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// The Unix socket clones hand their userfaultfd to.
    #[arg(long)]
    socket: PathBuf,
    /// This host's node id (non-zero; default: the interface address as a number).
    #[arg(long)]
    node: Option<u32>,
    /// Where descriptors, clone outputs and logs go [default: <tmp>/spindrift-client-<iface>].
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// The program fork plans start clones with [default: spindrift-vmm next to this program, else on PATH].
    #[arg(long)]
    clone_exe: Option<PathBuf>,
    /// Rewrite this JSON file with the daemon's stats about once a second (and at exit).
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Declare a server lost after this many silent seconds while pages are wanted.
    #[arg(long, default_value_t = 10.0)]
    server_timeout_s: f64,
    /// The first read-ahead window, pages, once a clone's faults follow a sequential or strided
    /// pattern (a fault that follows none reads nothing ahead); with --read-ahead-max at most this,
    /// a fixed window read ahead after every fault.
    #[arg(long, default_value_t = 4)]
    read_ahead: u16,
    /// The read-ahead window a pattern grows to, pages (doubling each time the clone's next fault
    /// shows it read pages that read-ahead brought); at most --read-ahead keeps it fixed.
    #[arg(long, default_value_t = 256)]
    read_ahead_max: u16,
    /// While a clone's fault waits for the network, poll for the answer instead of sleeping, for up
    /// to this many microseconds since the last arrival (0: always sleep). Spares a thread wake-up
    /// per fault at the cost of a CPU while a clone waits anyway (bench page-path: one-page fault
    /// p50 170-241 us with 300, 207-285 without; demo 4 hosts x 8 clones 0.86-0.95 s, 0.98-1.08 s).
    #[arg(long, default_value_t = 300)]
    busy_poll_us: u64,
    /// Most sessions live at once: sessions whose server ended them (or was lost) and that no clone
    /// uses do not count, and make room for new ones.
    #[arg(long, default_value_t = 8)]
    max_sessions: usize,
    /// How long an ended session that no clone uses keeps its cache, seconds (its server may start
    /// it again; a new session may take its place sooner).
    #[arg(long, default_value_t = 30.0)]
    session_linger_s: f64,
    /// Packet I/O backend: udp (kernel sockets), xdp (AF_XDP kernel bypass; fails if it cannot be
    /// used) or auto (AF_XDP if possible, else UDP with the reason logged). AF_XDP takes the
    /// interface's XDP hook and every datagram to --port: one AF_XDP process per interface and port.
    #[arg(long, default_value_t = IoKind::Udp)]
    io: IoKind,
    /// How long a handoff waits for its session to be announced, seconds.
    #[arg(long, default_value_t = 10.0)]
    session_wait_s: f64,
}

#[derive(Args, Debug)]
struct TouchArgs {
    /// The daemon's clone socket.
    #[arg(long)]
    daemon_socket: PathBuf,
    /// The session id (decimal).
    #[arg(long)]
    session: String,
    /// Image size in bytes (a multiple of 4096).
    #[arg(long)]
    image_bytes: u64,
    /// Touch the pages listed in this file (one page number per line), in order.
    #[arg(long, conflicts_with = "pattern", required_unless_present = "pattern")]
    trace: Option<PathBuf>,
    /// Touch a generated pattern: random, sequential or runs.
    #[arg(long)]
    pattern: Option<Pattern>,
    /// Fraction of the image's pages the pattern touches.
    #[arg(long, default_value_t = 0.1)]
    fraction: f64,
    /// Seed of the pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The image file each touched page is compared with.
    #[arg(long)]
    verify: PathBuf,
    /// The clone id to hand over (default: the process id).
    #[arg(long)]
    clone_id: Option<u64>,
    /// Hand over in Firecracker's format (bare region array, no session): the daemon serves it from
    /// the only session it knows.
    #[arg(long)]
    firecracker: bool,
    /// Private anonymous memory that the daemon copies each page into, instead of mapping the host's
    /// cache `MAP_PRIVATE` (the spindrift format's default).
    #[arg(long)]
    private_copy: bool,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct FetchArgs {
    /// The server's unicast IPv4 address.
    #[arg(long)]
    server: Ipv4Addr,
    /// This host's interface IPv4 address (the group is joined there).
    #[arg(long)]
    iface: Ipv4Addr,
    /// The session's multicast group (239.0.0.0/8).
    #[arg(long)]
    group: Ipv4Addr,
    /// The session's UDP port (the server's and the group's).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u16,
    /// The session id.
    #[arg(long, default_value_t = 1)]
    session: u64,
    /// The session key: 64 hex digits.
    #[arg(long, conflicts_with = "key_file", required_unless_present = "key_file")]
    key_hex: Option<String>,
    /// The session key: a file of 32 raw bytes.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Pages (4096 bytes) in the image.
    #[arg(long, conflicts_with = "image_bytes", required_unless_present = "image_bytes")]
    pages: Option<u64>,
    /// Image size in bytes (a multiple of 4096).
    #[arg(long)]
    image_bytes: Option<u64>,
    /// Where to write the image.
    #[arg(long)]
    out: PathBuf,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// This host's node id (non-zero; default: the interface address as a number).
    #[arg(long)]
    node: Option<u32>,
    /// Pages read ahead after each fault (see `SessionConfig::read_ahead`: the window already asks
    /// ahead).
    #[arg(long, default_value_t = 0)]
    read_ahead: u16,
    /// Pages outstanding at once (the oldest asked for as a fault, the rest as prefetch).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Also ask for every page up front at prefetch priority.
    #[arg(long)]
    prefetch_all: bool,
    /// Let arrivals gather this long before taking them in one batch, microseconds, at most
    /// 100000 (0: take each as it comes; default 500).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    coalesce_us: Option<u64>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Packet I/O backend: udp (kernel sockets), xdp (AF_XDP kernel bypass; fails if it cannot be
    /// used) or auto (AF_XDP if possible, else UDP with the reason logged). AF_XDP takes the
    /// interface's XDP hook and every datagram to --port: one AF_XDP process per interface and port.
    #[arg(long, default_value_t = IoKind::Udp)]
    io: IoKind,
    /// Compare the fetched image with this reference file.
    #[arg(long)]
    verify: Option<PathBuf>,
    /// Flush the image to stable storage (fsync) before exiting; without it the image is in the
    /// page cache when the fetch exits, as after `cp`. The image is fetched into `OUT.partial`
    /// (pages land there as they arrive) and renamed to `--out` once whole.
    #[arg(long)]
    sync: bool,
}

/// Errors of the command line tool.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The session failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A page is missing after the fetch (a bug: the fetch only returns when all are present).
    #[error("page {0} is missing after the fetch")]
    Missing(u64),
    /// Writing the output failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading the reference failed.
    #[error("reading the reference {path}: {source}")]
    ReadReference {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The image differs from the reference.
    #[error("the fetched image differs from {path}: {detail}")]
    Mismatch {
        /// The reference.
        path: PathBuf,
        /// Where.
        detail: String,
    },
    /// The JSON summary could not be written.
    #[error("writing the JSON summary: {0}")]
    Json(#[from] serde_json::Error),
    /// The daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The touch run failed.
    #[error(transparent)]
    Touch(#[from] TouchError),
    /// Pages differed from the image.
    #[error("{0} touched pages differ from the image")]
    TouchMismatch(u64),
    /// The signal handler could not be installed.
    #[error("installing the SIGINT/SIGTERM handler: {0}")]
    Signal(#[from] ctrlc::Error),
    /// A duration flag out of range.
    #[error("{flag} {value} is not a usable number of seconds")]
    BadSeconds {
        /// The flag.
        flag: &'static str,
        /// Its value.
        value: f64,
    },
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Fetch(args) => fetch(args),
        Command::Daemon(args) => daemon(args),
        Command::Touch(args) => touch_run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spindrift-client: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn key_from(key_hex: &Option<String>, key_file: &Option<PathBuf>) -> Result<SessionKey, CliError> {
    Ok(match (key_hex, key_file) {
        (Some(hex), _) => parse_key_hex(hex)?,
        (None, Some(path)) => read_key_file(path)?,
        (None, None) => return Err(SessionError::BadKeyHex("give --key-hex or --key-file".into()).into()),
    })
}

fn seconds(flag: &'static str, value: f64) -> Result<Duration, CliError> {
    Duration::try_from_secs_f64(value).ok().filter(|d| !d.is_zero()).ok_or(CliError::BadSeconds { flag, value })
}

fn daemon(args: DaemonArgs) -> Result<(), CliError> {
    let key = key_from(&args.key_hex, &args.key_file)?;
    let mut config = DaemonConfig::new(args.iface, args.group, key, args.socket);
    config.port = args.port;
    config.node = args.node.unwrap_or_else(|| default_node(args.iface));
    if let Some(dir) = args.run_dir {
        config.run_dir = dir;
    }
    if let Some(exe) = args.clone_exe {
        config.clone_exe = exe;
    }
    config.stats_json = args.stats_json;
    config.server_timeout = seconds("--server-timeout-s", args.server_timeout_s)?;
    config.session_wait = seconds("--session-wait-s", args.session_wait_s)?;
    config.session_linger = seconds("--session-linger-s", args.session_linger_s)?;
    config.read_ahead = args.read_ahead;
    config.read_ahead_max = args.read_ahead_max;
    config.busy_poll = Duration::from_micros(args.busy_poll_us);
    config.io = args.io;
    config.max_sessions = args.max_sessions;
    config.validate()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    spindrift_client::daemon::run(&config, &stop)?;
    Ok(())
}

fn touch_run(args: TouchArgs) -> Result<(), CliError> {
    touch::report_sigbus();
    let order = match (args.trace, args.pattern) {
        (Some(path), _) => Order::Trace(path),
        (None, Some(pattern)) => Order::Pattern { pattern, fraction: args.fraction, seed: args.seed },
        (None, None) => return Err(TouchError::Invalid("give --trace or --pattern".into()).into()),
    };
    let config = TouchConfig {
        daemon_socket: args.daemon_socket,
        session: args.session,
        image_bytes: args.image_bytes,
        order,
        verify: args.verify,
        clone_id: args.clone_id,
        fork: None,
        report: None,
        firecracker_format: args.firecracker,
        private_copy: args.private_copy,
    };
    let report = touch::run(&config)?;
    eprintln!("{}", touch::summary(&report));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    if report.mismatches > 0 {
        return Err(CliError::TouchMismatch(report.mismatches));
    }
    Ok(())
}

fn fetch(args: FetchArgs) -> Result<(), CliError> {
    let key = key_from(&args.key_hex, &args.key_file)?;
    let pages = match (args.pages, args.image_bytes) {
        (Some(0), _) => return Err(SessionError::NoPages.into()),
        (Some(p), _) => u32::try_from(p).map_err(|_| SessionError::TooManyPages(p))?,
        (None, Some(bytes)) => pages_for_bytes(bytes)?,
        (None, None) => return Err(SessionError::NoPages.into()),
    };
    let mut config = SessionConfig::new(args.server, args.iface, args.group, args.session, key, pages).port(args.port);
    config.node = args.node.unwrap_or_else(|| default_node(args.iface));
    config.read_ahead = args.read_ahead;
    config.io = args.io;
    config.window = args.window;
    config.prefetch_all = args.prefetch_all;
    if let Some(us) = args.coalesce_us {
        config.coalesce = Duration::from_micros(us);
    }
    config.timeout = Duration::from_secs(args.timeout_s);
    // The image is fetched straight into a file beside `--out`, renamed over it once whole.
    let partial = partial_path(&args.out);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(|source| CliError::Write { path: partial.clone(), source })?;
    let cache = PageCache::over_file(file.into(), u64::from(pages) * CACHE_PAGE_SIZE);
    let opened = cache.map_err(SessionError::from).and_then(|c| Session::open(config, Arc::new(c)));
    let finished =
        opened.map_err(CliError::from).and_then(|mut session| fetch_into(&mut session, pages, &partial, &args));
    let report = match finished {
        Ok(report) => report,
        Err(e) => {
            std::fs::remove_file(&partial).ok();
            return Err(e);
        }
    };
    std::fs::rename(&partial, &args.out).map_err(|source| CliError::Write { path: args.out.clone(), source })?;
    eprintln!(
        "fetched {} pages ({} bytes) in {:.2}s: {:.1} MB/s, {} requests, {} NAKs{}",
        report.pages,
        report.bytes,
        report.seconds,
        report.mb_per_s,
        report.requests,
        report.naks,
        if args.verify.is_some() { ", verified" } else { "" }
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

/// Runs the fetch into the session's cache (over `partial`), checks that every page is there
/// (and equals `--verify`), and flushes the file with `--sync`.
fn fetch_into(session: &mut Session, pages: u32, partial: &Path, args: &FetchArgs) -> Result<FetchReport, CliError> {
    let report = session.fetch(|p| {
        eprintln!(
            "{:6.1}s  {:>9}/{} pages  {:5.1}%  {:9.0} pages/s",
            p.elapsed.as_secs_f64(),
            p.present,
            p.pages,
            p.present as f64 * 100.0 / f64::from(p.pages.max(1)),
            p.pages_per_sec
        );
    })?;
    let cache = session.cache();
    let total = u64::from(pages);
    if let Some(missing) = (0..total).find(|&p| !cache.is_present(p)) {
        return Err(CliError::Missing(missing));
    }
    if let Some(reference) = &args.verify {
        verify(reference, cache.get_run(0, total).ok_or(CliError::Missing(0))?)?;
    }
    if args.sync {
        let write = |source| CliError::Write { path: partial.to_path_buf(), source };
        std::fs::File::open(partial).and_then(|f| f.sync_all()).map_err(write)?;
    }
    Ok(report)
}

/// `--out` with `.partial` appended: where a fetch writes until the image is whole.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

fn verify(path: &Path, image: &[u8]) -> Result<(), CliError> {
    let reference =
        std::fs::read(path).map_err(|source| CliError::ReadReference { path: path.to_path_buf(), source })?;
    let mismatch = |detail: String| CliError::Mismatch { path: path.to_path_buf(), detail };
    if reference.len() != image.len() {
        return Err(mismatch(format!("{} bytes there, {} fetched", reference.len(), image.len())));
    }
    let page = CACHE_PAGE_SIZE as usize;
    if let Some(i) = reference.chunks(page).zip(image.chunks(page)).position(|(a, b)| a != b) {
        return Err(mismatch(format!("first difference in page {i}")));
    }
    Ok(())
}
