//! Command-line flags, the optional TOML file with the same keys, and their checked result.
//!
//! Flags override the file. Every check that can be made before opening a socket is made here, and
//! each error names the flag and the value that was refused.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use netio::IoKind;
use spindrift_protocol::sender::{PushPolicy, SenderConfig};
use spindrift_protocol::wire::{SessionId, SessionKey, MAX_DATAGRAM, MIN_DATAGRAM};

use crate::image::PAGE_SIZE;

/// Default UDP port.
pub const DEFAULT_PORT: u16 = 7700;
/// Default link MTU.
pub const DEFAULT_MTU: u32 = 1500;
/// Bytes of IPv4 and UDP headers: `max_datagram = mtu - IP_UDP_HEADERS`.
pub const IP_UDP_HEADERS: u32 = 28;
/// log2 of the page size the server serves (Firecracker snapshots use 4 KiB pages).
pub const PAGE_SHIFT: u8 = 12;

/// A configuration the server refuses. Each message names the flag and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required setting is missing.
    #[error("{0} is required (as a flag or in the --config file)")]
    Missing(&'static str),
    /// A setting's value is not acceptable.
    #[error("{flag} {value} {why}")]
    Invalid {
        /// The flag, e.g. `--group`.
        flag: &'static str,
        /// The value given.
        value: String,
        /// Why it was refused.
        why: String,
    },
    /// Both of two exclusive settings were given, or neither.
    #[error("exactly one of --key-file and --key-hex is required ({0})")]
    Key(&'static str),
    /// Both `--image` and `--image-socket` were given.
    #[error("give one of --image and --image-socket ({0})")]
    Image(&'static str),
    /// `--key-hex` is not 64 hex digits.
    #[error("--key-hex must be 64 hex digits (32 bytes), got {0} characters or a non-hex digit")]
    KeyHex(usize),
    /// A file could not be read.
    #[error("{flag} {path}: {source}")]
    Read {
        /// The flag naming the file.
        flag: &'static str,
        /// The path.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// The image file's length does not fit the page layout.
    #[error("--image {path}: length {len} {why}")]
    ImageLength {
        /// The path.
        path: String,
        /// Its length in bytes.
        len: u64,
        /// Why it was refused.
        why: String,
    },
    /// Guest memory given to the server in a program has a length it cannot serve.
    #[error("guest memory of {len} bytes {why}")]
    MemoryLength {
        /// Its length in bytes.
        len: u64,
        /// Why it was refused.
        why: String,
    },
    /// The `--config` file is not valid TOML or has an unknown key.
    #[error("--config {path}: {message}")]
    Toml {
        /// The path.
        path: String,
        /// The parser's message.
        message: String,
    },
}

/// The flags of `spindrift-server`. Every one may also be set in the `--config` TOML file under
/// the same name (e.g. `zstd-level = 3`); flags override the file.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "spindrift-server", version, about = "Multicasts a frozen VM memory image to spindrift host daemons")]
pub struct Args {
    /// The memory image: guest memory as one flat file (Firecracker snapshot layout), a multiple of 4096 bytes.
    #[arg(long, value_name = "PATH", conflicts_with = "image_socket")]
    pub image: Option<PathBuf>,
    /// Instead of --image: listen on this Unix socket for a local VMM that hands over guest memory
    /// as a sealed memfd (SCM_RIGHTS) with a JSON header; serve it, then exit.
    #[arg(long, value_name = "PATH")]
    pub image_socket: Option<PathBuf>,
    /// IPv4 address of the interface to serve on: requests arrive there, multicast leaves through it.
    #[arg(long, value_name = "IPV4")]
    pub iface: Option<String>,
    /// Multicast group (239.0.0.0/8).
    #[arg(long, value_name = "239.X.Y.Z")]
    pub group: Option<String>,
    /// UDP port of the group and of the server's unicast socket [default: 7700].
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// Session id, shared with the hosts [default: 1].
    #[arg(long, value_name = "ID")]
    pub session: Option<u64>,
    /// File holding the 32-byte session key (raw bytes).
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// The session key as 64 hex digits.
    #[arg(long, value_name = "64HEX")]
    pub key_hex: Option<String>,
    /// Server incarnation, must grow on every restart of a session [default: quarter-seconds since
    /// 2024-01-01 UTC, taken after waiting for the next quarter-second so that a restarted server
    /// always has a larger one].
    #[arg(long, value_name = "N")]
    pub epoch: Option<u32>,
    /// Pacing rate, e.g. 800mbit, 1gbit, 500kbit (default: unpaced).
    #[arg(long, value_name = "RATE")]
    pub rate: Option<String>,
    /// Congestion control (PROTOCOL.md section 11.1): `on` finds the rate the slowest receiver's
    /// path sustains from the receivers' loss events, receive rates and round trips (within
    /// `--rate`, when set); `off` sends at `--rate`, or unpaced. Off by default: at random link
    /// loss it costs most of the rate (`bench line-rate --modes cc` at 2% loss), as TCP's
    /// congestion control does [default: off].
    #[arg(long, value_name = "on|off")]
    pub congestion_control: Option<String>,
    /// How far behind its schedule the pacer may fall and still catch up, microseconds at the
    /// rate: the largest burst a late wake-up sends at once [default: 2000].
    #[arg(long, value_name = "US")]
    pub pace_burst_us: Option<u64>,
    /// Link MTU; datagrams are at most MTU - 28 bytes [default: 1500].
    #[arg(long, value_name = "1500|9000")]
    pub mtu: Option<u32>,
    /// zstd level for pages, 0 sends pages raw [default: 1].
    #[arg(long, value_name = "N")]
    pub zstd_level: Option<i32>,
    /// Encrypt page payloads (ChaCha20-Poly1305) instead of only authenticating them.
    #[arg(long)]
    pub encrypt: bool,
    /// Background push: `all` pushes every page after the answers to requests, `none` sends only
    /// requested pages [default: all].
    #[arg(long, value_name = "all|none")]
    pub push: Option<String>,
    /// A rate of the push's own, e.g. 100mbit: background completion (PROTOCOL.md section 10.1),
    /// which fills every host's copy slowly, after every answer, so that clones outlive the
    /// server [default: the push runs at the pacing rate].
    #[arg(long, value_name = "RATE")]
    pub push_rate: Option<String>,
    /// The push waits until no request has come for this long, microseconds (the hosts are not
    /// faulting) [default: 0, it does not wait].
    #[arg(long, value_name = "US")]
    pub push_quiet_us: Option<u64>,
    /// Start the push once this many hosts are live (e.g. the hosts of a fork plan), so none of
    /// them joins a push already under way [default: 1].
    #[arg(long, value_name = "N")]
    pub min_receivers: Option<u32>,
    /// Push flow control: `on` keeps the push within the slowest live receiver's window
    /// (PROTOCOL.md section 11); `off` only paces it, for measurements [default: on].
    #[arg(long, value_name = "on|off")]
    pub flow_control: Option<String>,
    /// Unicast answers: `on` sends a page that exactly one host asked for to that host alone,
    /// outside the multicast stream (PROTOCOL.md section 8.1), so the other hosts spend nothing on
    /// it; `off` multicasts every answer [default: on].
    #[arg(long, value_name = "on|off")]
    pub unicast_answers: Option<String>,
    /// UDP segmentation offload: `on` hands the kernel runs of equal-size datagrams to one
    /// destination as one send (`UDP_SEGMENT`), so its per-packet path runs once per run. In a
    /// netlab lab a run stays one packet up to the receiving host, so link loss drops whole runs
    /// [default: off].
    #[arg(long, value_name = "on|off")]
    pub gso: Option<String>,
    /// Packet I/O backend: `udp` (kernel sockets), `xdp` (AF_XDP; fails if it cannot be used) or
    /// `auto` (AF_XDP if it can be used here, else UDP with the reason logged). AF_XDP takes the
    /// interface's XDP hook and every datagram to the port: one AF_XDP process per interface and
    /// port [default: udp].
    #[arg(long, value_name = "udp|xdp|auto")]
    pub io: Option<String>,
    /// End the session and exit after this many seconds.
    #[arg(long, value_name = "N")]
    pub duration_s: Option<u64>,
    /// Write the sender statistics as JSON to this file, about once a second and on exit (each
    /// time atomically: a new file renamed over the old one).
    #[arg(long, value_name = "PATH")]
    pub stats_json: Option<PathBuf>,
    /// TOML file with the same keys as the flags (flags override it).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// The `--config` file: the flags' names as keys.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    image: Option<PathBuf>,
    image_socket: Option<PathBuf>,
    iface: Option<String>,
    group: Option<String>,
    port: Option<u16>,
    session: Option<u64>,
    key_file: Option<PathBuf>,
    key_hex: Option<String>,
    epoch: Option<u32>,
    rate: Option<String>,
    congestion_control: Option<String>,
    pace_burst_us: Option<u64>,
    mtu: Option<u32>,
    zstd_level: Option<i32>,
    encrypt: Option<bool>,
    push: Option<String>,
    push_rate: Option<String>,
    push_quiet_us: Option<u64>,
    min_receivers: Option<u32>,
    flow_control: Option<String>,
    unicast_answers: Option<String>,
    gso: Option<String>,
    io: Option<String>,
    duration_s: Option<u64>,
    stats_json: Option<PathBuf>,
}

/// What to push in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Every page, after the answers to requests.
    All,
    /// Only requested pages travel.
    None,
}

/// Where the image to serve comes from (the command line's choice; a program that embeds the
/// server passes its memory to [`crate::serve_source`] instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageInput {
    /// A flat image file (`--image`), checked at configuration time.
    File {
        /// The file.
        path: PathBuf,
        /// Its pages (from its length when the configuration was checked).
        pages: u32,
    },
    /// A Unix socket a local VMM hands a memfd over (`--image-socket`); see [`crate::handover`].
    Socket(PathBuf),
}

/// A checked server configuration. Build it from the command line with [`ServerConfig::from_args`]
/// or in a program with [`ServerConfig::new`] and the `with_*` methods.
#[derive(Clone)]
pub struct ServerConfig {
    /// The image to serve, for [`crate::serve`] (None when the program passes its own source).
    pub image: Option<ImageInput>,
    /// The interface address.
    pub iface: Ipv4Addr,
    /// The multicast group.
    pub group: Ipv4Addr,
    /// The UDP port.
    pub port: u16,
    /// The session id.
    pub session: u64,
    /// The session key.
    pub key: [u8; 32],
    /// The server's epoch (must grow on every restart of the session).
    pub epoch: u32,
    /// Pacing rate in bytes per second.
    pub rate_bytes_per_sec: Option<u64>,
    /// The pacer's credit ([`SenderConfig::pace_burst`]).
    pub pace_burst: Duration,
    /// Congestion control ([`SenderConfig::congestion_control`]).
    pub congestion_control: bool,
    /// Largest datagram (MTU - 28).
    pub max_datagram: usize,
    /// zstd level (None: raw pages).
    pub zstd_level: Option<i32>,
    /// Encrypt payloads.
    pub encrypt: bool,
    /// Background push.
    pub push: Push,
    /// The push's own rate, bytes per second ([`SenderConfig::push_rate_bytes_per_sec`]).
    pub push_rate_bytes_per_sec: Option<u64>,
    /// The push waits until no request has come for this long ([`SenderConfig::push_quiet`]).
    pub push_quiet: Duration,
    /// The push starts once this many hosts are live.
    pub min_receivers: u32,
    /// Keep the push within the slowest live receiver's window (off only for measurements).
    pub flow_control: bool,
    /// Answer single-host requests by unicast, outside the stream.
    pub unicast_answers: bool,
    /// UDP GSO on sends (the UDP backend only).
    pub gso: bool,
    /// The packet I/O backend.
    pub io: IoKind,
    /// Run time limit.
    pub duration: Option<Duration>,
    /// Where to write the stats (about once a second and at exit).
    pub stats_json: Option<PathBuf>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("image", &self.image)
            .field("iface", &self.iface)
            .field("group", &self.group)
            .field("port", &self.port)
            .field("session", &self.session)
            .field("key", &"..")
            .field("epoch", &self.epoch)
            .field("rate_bytes_per_sec", &self.rate_bytes_per_sec)
            .field("pace_burst", &self.pace_burst)
            .field("congestion_control", &self.congestion_control)
            .field("max_datagram", &self.max_datagram)
            .field("zstd_level", &self.zstd_level)
            .field("encrypt", &self.encrypt)
            .field("push", &self.push)
            .field("push_rate_bytes_per_sec", &self.push_rate_bytes_per_sec)
            .field("push_quiet", &self.push_quiet)
            .field("min_receivers", &self.min_receivers)
            .field("flow_control", &self.flow_control)
            .field("unicast_answers", &self.unicast_answers)
            .field("gso", &self.gso)
            .field("io", &self.io)
            .field("duration", &self.duration)
            .field("stats_json", &self.stats_json)
            .finish()
    }
}

impl ServerConfig {
    /// A configuration with the defaults (MTU 1500, zstd level 1, unpaced, push all, flow control on,
    /// no time limit, epoch [`epoch_now`]), after checking the addresses: `iface` a unicast address,
    /// `group` in 239.0.0.0/8, `port` non-zero.
    ///
    /// The epoch must be larger than any this session used before: [`epoch_now`] is, unless the
    /// session's previous server started within the same quarter-second; a program that may restart
    /// a session that fast sets [`ServerConfig::with_epoch`] (e.g. to [`restart_safe_epoch`]).
    pub fn new(
        iface: Ipv4Addr,
        group: Ipv4Addr,
        port: u16,
        session: u64,
        key: [u8; 32],
    ) -> Result<ServerConfig, ConfigError> {
        check_iface(iface, &iface.to_string())?;
        check_group(group, &group.to_string())?;
        if port == 0 {
            return Err(invalid("--port", "0", "is not a usable port (hosts must know it)"));
        }
        Ok(ServerConfig {
            image: None,
            iface,
            group,
            port,
            session,
            key,
            epoch: epoch_now(),
            rate_bytes_per_sec: None,
            pace_burst: spindrift_protocol::sender::DEFAULT_PACE_BURST,
            congestion_control: false,
            max_datagram: (DEFAULT_MTU - IP_UDP_HEADERS) as usize,
            zstd_level: Some(1),
            encrypt: false,
            push: Push::All,
            push_rate_bytes_per_sec: None,
            push_quiet: Duration::ZERO,
            min_receivers: 1,
            flow_control: true,
            unicast_answers: true,
            gso: false,
            io: IoKind::Udp,
            duration: None,
            stats_json: None,
        })
    }

    /// Sets the epoch (not 0: receivers use 0 before they learn the epoch).
    pub fn with_epoch(mut self, epoch: u32) -> Result<ServerConfig, ConfigError> {
        if epoch == 0 {
            return Err(invalid("--epoch", "0", "is reserved (receivers use 0 before they learn the epoch)"));
        }
        self.epoch = epoch;
        Ok(self)
    }

    /// Sets the pacing rate in bytes per second (None: unpaced).
    pub fn with_rate(mut self, bytes_per_sec: Option<u64>) -> Result<ServerConfig, ConfigError> {
        if bytes_per_sec == Some(0) {
            return Err(invalid("--rate", "0", "must be positive"));
        }
        self.rate_bytes_per_sec = bytes_per_sec;
        Ok(self)
    }

    /// Sets the link MTU (datagrams are at most `mtu - 28` bytes).
    pub fn with_mtu(mut self, mtu: u32) -> Result<ServerConfig, ConfigError> {
        self.max_datagram = mtu_to_datagram(mtu)?;
        Ok(self)
    }

    /// Sets the zstd level (None or Some(0): pages go raw).
    pub fn with_zstd_level(mut self, level: Option<i32>) -> Result<ServerConfig, ConfigError> {
        self.zstd_level = match level {
            None | Some(0) => None,
            Some(l @ 1..=22) => Some(l),
            Some(l) => {
                return Err(invalid("--zstd-level", &l.to_string(), "is outside 0..=22 (0 disables compression)"))
            }
        };
        Ok(self)
    }

    /// Encrypts payloads (ChaCha20-Poly1305) rather than only authenticating them.
    pub fn with_encrypt(mut self, encrypt: bool) -> ServerConfig {
        self.encrypt = encrypt;
        self
    }

    /// Sets what is pushed in the background ([`crate::ServeOptions::push`] can replace it with hints).
    pub fn with_push(mut self, push: Push) -> ServerConfig {
        self.push = push;
        self
    }

    /// Gives the push a rate of its own, bytes per second (None: the pacing rate): background
    /// completion.
    pub fn with_push_rate(mut self, bytes_per_sec: Option<u64>) -> Result<ServerConfig, ConfigError> {
        if bytes_per_sec == Some(0) {
            return Err(invalid("--push-rate", "0", "must be positive"));
        }
        self.push_rate_bytes_per_sec = bytes_per_sec;
        Ok(self)
    }

    /// Makes the push wait until no request has come for `quiet`.
    pub fn with_push_quiet(mut self, quiet: Duration) -> ServerConfig {
        self.push_quiet = quiet;
        self
    }

    /// Starts the push once `n` hosts are live (at least 1).
    pub fn with_min_receivers(mut self, n: u32) -> ServerConfig {
        self.min_receivers = n.max(1);
        self
    }

    /// Answers single-host requests out of the stream (the default) or always in it (PROTOCOL.md 8.2).
    pub fn with_unicast_answers(mut self, on: bool) -> ServerConfig {
        self.unicast_answers = on;
        self
    }

    /// Turns push flow control on (the default) or off (for measurements only).
    pub fn with_flow_control(mut self, on: bool) -> ServerConfig {
        self.flow_control = on;
        self
    }

    /// The packet I/O backend (default [`IoKind::Udp`]).
    pub fn with_io(mut self, io: IoKind) -> ServerConfig {
        self.io = io;
        self
    }

    /// Ends the session after `duration` (None: runs until stopped).
    pub fn with_duration(mut self, duration: Option<Duration>) -> ServerConfig {
        self.duration = duration;
        self
    }

    /// Writes the statistics to `path` about once a second and at exit (None: no file).
    pub fn with_stats_json(mut self, path: Option<PathBuf>) -> ServerConfig {
        self.stats_json = path;
        self
    }

    /// Pages of the `--image` file, when the image is a file.
    pub fn image_pages(&self) -> Option<u32> {
        match &self.image {
            Some(ImageInput::File { pages, .. }) => Some(*pages),
            _ => None,
        }
    }

    /// Checks `args` (merged over the `--config` file, if any) and reads the key and the image's length.
    pub fn from_args(args: &Args) -> Result<ServerConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        // Keys are one choice: a key flag on the command line replaces both key settings of the file.
        let (key_file, key_hex) = if args.key_file.is_some() || args.key_hex.is_some() {
            (args.key_file.clone(), args.key_hex.clone())
        } else {
            (file.key_file, file.key_hex)
        };
        // So is the image: a flag replaces the file's image setting.
        let (image, image_socket) = if args.image.is_some() || args.image_socket.is_some() {
            (args.image.clone(), args.image_socket.clone())
        } else {
            (file.image, file.image_socket)
        };
        let image = match (image, image_socket) {
            (Some(_), Some(_)) => return Err(ConfigError::Image("both were given")),
            (None, None) => return Err(ConfigError::Missing("--image (or --image-socket)")),
            (Some(path), None) => {
                let pages = image_page_count(&path)?;
                ImageInput::File { path, pages }
            }
            (None, Some(socket)) => ImageInput::Socket(socket),
        };
        let iface = args.iface.clone().or(file.iface).ok_or(ConfigError::Missing("--iface"))?;
        let group = args.group.clone().or(file.group).ok_or(ConfigError::Missing("--group"))?;
        let iface = parse_iface(&iface)?;
        let group = parse_group(&group)?;
        let port = args.port.or(file.port).unwrap_or(DEFAULT_PORT);
        let session = args.session.or(file.session).unwrap_or(1);
        let key = match (key_file, key_hex) {
            (Some(_), Some(_)) => return Err(ConfigError::Key("both were given")),
            (None, None) => return Err(ConfigError::Key("neither was given")),
            (Some(path), None) => read_key_file(&path)?,
            (None, Some(hex)) => parse_key_hex(&hex)?,
        };
        let mut c = ServerConfig::new(iface, group, port, session, key)?;
        c.image = Some(image);
        c = c.with_epoch(match args.epoch.or(file.epoch) {
            Some(e) => e,
            None => restart_safe_epoch(),
        })?;
        c = c.with_rate(match args.rate.clone().or(file.rate) {
            Some(r) => Some(parse_rate(&r)?),
            None => None,
        })?;
        c.congestion_control =
            on_off("--congestion-control", args.congestion_control.clone().or(file.congestion_control), false)?;
        if let Some(us) = args.pace_burst_us.or(file.pace_burst_us) {
            if us > 1_000_000 {
                return Err(invalid("--pace-burst-us", &us.to_string(), "must be at most 1000000 (one second)"));
            }
            c.pace_burst = Duration::from_micros(us);
        }
        c = c.with_mtu(args.mtu.or(file.mtu).unwrap_or(DEFAULT_MTU))?;
        c = c.with_zstd_level(Some(args.zstd_level.or(file.zstd_level).unwrap_or(1)))?;
        c.encrypt = args.encrypt || file.encrypt.unwrap_or(false);
        c.push = match args.push.clone().or(file.push).as_deref() {
            None | Some("all") => Push::All,
            Some("none") => Push::None,
            Some(other) => return Err(invalid("--push", other, "is not one of all, none")),
        };
        c = c.with_push_rate(match args.push_rate.clone().or(file.push_rate) {
            Some(r) => Some(parse_rate_of("--push-rate", &r)?),
            None => None,
        })?;
        if let Some(us) = args.push_quiet_us.or(file.push_quiet_us) {
            if us > 10_000_000 {
                return Err(invalid("--push-quiet-us", &us.to_string(), "must be at most 10000000 (ten seconds)"));
            }
            c.push_quiet = Duration::from_micros(us);
        }
        c.min_receivers = match args.min_receivers.or(file.min_receivers) {
            Some(0) => return Err(invalid("--min-receivers", "0", "must be at least 1")),
            n => n.unwrap_or(1),
        };
        c.flow_control = on_off("--flow-control", args.flow_control.clone().or(file.flow_control), true)?;
        c.unicast_answers = on_off("--unicast-answers", args.unicast_answers.clone().or(file.unicast_answers), true)?;
        c.gso = on_off("--gso", args.gso.clone().or(file.gso), false)?;
        c.io = match args.io.clone().or(file.io) {
            None => IoKind::Udp,
            Some(text) => text.parse().map_err(|_| invalid("--io", &text, "is not one of udp, xdp, auto"))?,
        };
        c.duration = match args.duration_s.or(file.duration_s) {
            Some(0) => return Err(invalid("--duration-s", "0", "must be positive")),
            d => d.map(Duration::from_secs),
        };
        c.stats_json = args.stats_json.clone().or(file.stats_json);
        Ok(c)
    }

    /// The protocol sender's configuration (`push` replaces the configured push when given).
    pub fn sender_config(&self, push: Option<PushPolicy>) -> SenderConfig {
        let mut sc = SenderConfig::new(SessionId(self.session), self.epoch, SessionKey(self.key), PAGE_SHIFT);
        sc.max_datagram = self.max_datagram;
        sc.encrypt = self.encrypt;
        sc.zstd_level = self.zstd_level;
        sc.rate_bytes_per_sec = self.rate_bytes_per_sec;
        sc.pace_burst = self.pace_burst;
        sc.congestion_control = self.congestion_control;
        sc.push = push.unwrap_or(match self.push {
            Push::All => PushPolicy::HintsThenAll(Vec::new()),
            Push::None => PushPolicy::None,
        });
        sc.push_rate_bytes_per_sec = self.push_rate_bytes_per_sec;
        sc.push_quiet = self.push_quiet;
        sc.flow_control = self.flow_control;
        sc.unicast_answers = self.unicast_answers;
        sc.min_receivers = self.min_receivers;
        sc.seed = u64::from(self.epoch) ^ self.session.rotate_left(32);
        sc
    }
}

/// An `on|off` setting: `default` when not given.
fn on_off(flag: &'static str, value: Option<String>, default: bool) -> Result<bool, ConfigError> {
    match value.as_deref() {
        None => Ok(default),
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(invalid(flag, other, "is not one of on, off")),
    }
}

fn invalid(flag: &'static str, value: &str, why: &str) -> ConfigError {
    ConfigError::Invalid { flag, value: value.to_string(), why: why.to_string() }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        flag: "--config",
        path: path.display().to_string(),
        source,
    })?;
    let mut file: FileConfig = toml::from_str(&text)
        .map_err(|e| ConfigError::Toml { path: path.display().to_string(), message: e.message().to_string() })?;
    // Paths in the file are relative to the file.
    let base = path.parent().unwrap_or(Path::new(""));
    for p in [&mut file.image, &mut file.image_socket, &mut file.key_file, &mut file.stats_json].into_iter().flatten() {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(file)
}

/// Parses the interface address: a unicast IPv4 address.
pub fn parse_iface(text: &str) -> Result<Ipv4Addr, ConfigError> {
    let ip: Ipv4Addr = text.trim().parse().map_err(|_| invalid("--iface", text, "is not an IPv4 address"))?;
    check_iface(ip, text)?;
    Ok(ip)
}

fn check_iface(ip: Ipv4Addr, text: &str) -> Result<(), ConfigError> {
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
        return Err(invalid("--iface", text, "is not a unicast interface address"));
    }
    Ok(())
}

/// Parses the group: an IPv4 multicast address in 239.0.0.0/8 (administratively scoped).
pub fn parse_group(text: &str) -> Result<Ipv4Addr, ConfigError> {
    let ip: Ipv4Addr = text.trim().parse().map_err(|_| invalid("--group", text, "is not an IPv4 address"))?;
    check_group(ip, text)?;
    Ok(ip)
}

fn check_group(ip: Ipv4Addr, text: &str) -> Result<(), ConfigError> {
    if ip.octets()[0] != 239 {
        return Err(invalid("--group", text, "is not a multicast address in 239.0.0.0/8"));
    }
    Ok(())
}

/// Parses a rate such as `1gbit`, `800mbit`, `500kbit` or `1000000bit` into bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, ConfigError> {
    parse_rate_of("--rate", text)
}

/// [`parse_rate`] for the setting `flag` (errors name it).
pub fn parse_rate_of(flag: &'static str, text: &str) -> Result<u64, ConfigError> {
    let bad = || invalid(flag, text, "is not a rate like 1gbit, 800mbit or 500kbit");
    let t = text.trim().to_ascii_lowercase();
    let number = t.strip_suffix("bit").ok_or_else(bad)?;
    let (number, scale) = match number.as_bytes().last() {
        Some(b'k') => (&number[..number.len() - 1], 1e3),
        Some(b'm') => (&number[..number.len() - 1], 1e6),
        Some(b'g') => (&number[..number.len() - 1], 1e9),
        _ => (number, 1.0),
    };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let bytes = value * scale / 8.0;
    if !(1.0..=1e13).contains(&bytes) {
        return Err(invalid(flag, text, "is out of range (1 byte/s to 80 tbit)"));
    }
    Ok(bytes as u64)
}

/// The 32-byte key from 64 hex digits.
pub fn parse_key_hex(text: &str) -> Result<[u8; 32], ConfigError> {
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ConfigError::KeyHex(t.len()));
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| ConfigError::KeyHex(t.len()))?;
    }
    Ok(key)
}

fn read_key_file(path: &Path) -> Result<[u8; 32], ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        flag: "--key-file",
        path: path.display().to_string(),
        source,
    })?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
        invalid(
            "--key-file",
            &path.display().to_string(),
            &format!("holds {} bytes, not 32 raw key bytes", bytes.len()),
        )
    })
}

/// `mtu - 28`, checked against the protocol's datagram limits.
pub fn mtu_to_datagram(mtu: u32) -> Result<usize, ConfigError> {
    let min = MIN_DATAGRAM as u32 + IP_UDP_HEADERS;
    let max = MAX_DATAGRAM as u32 + IP_UDP_HEADERS;
    if !(min..=max).contains(&mtu) {
        return Err(invalid("--mtu", &mtu.to_string(), &format!("is outside {min}..={max} (e.g. 1500 or 9000)")));
    }
    Ok((mtu - IP_UDP_HEADERS) as usize)
}

/// Pages in the image at `path`, from its length.
pub fn image_page_count(path: &Path) -> Result<u32, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        flag: "--image",
        path: path.display().to_string(),
        source,
    })?;
    check_image_len(path, meta.len())
}

/// Pages in an image of `len` bytes, or why that length is refused.
pub fn check_image_len(path: &Path, len: u64) -> Result<u32, ConfigError> {
    pages_for_len(len).map_err(|why| ConfigError::ImageLength { path: path.display().to_string(), len, why })
}

/// Pages in `len` bytes of image, or why that length cannot be served.
pub fn pages_for_len(len: u64) -> Result<u32, String> {
    if len == 0 {
        return Err("is empty: the image has no pages".into());
    }
    if !len.is_multiple_of(PAGE_SIZE as u64) {
        return Err(format!("is not a multiple of the {PAGE_SIZE}-byte page size"));
    }
    u32::try_from(len / PAGE_SIZE as u64).map_err(|_| "holds more than 2^32 - 1 pages".into())
}

/// Unix time of 2024-01-01T00:00:00Z, the origin of clock-derived epochs.
pub const EPOCH_ORIGIN_UNIX_SECS: u64 = 1_704_067_200;
/// Clock-derived epochs count this many ticks per second (u32 quarter-seconds last until 2058).
pub const EPOCH_TICKS_PER_SEC: u64 = 4;

/// The epoch the clock gives now: quarter-seconds since 2024-01-01 UTC (at least 1). A server
/// restarted in a later quarter-second gets a larger epoch, which is what receivers require
/// (PROTOCOL.md section 13.2: they follow a larger epoch and drop a smaller one as stale; an equal
/// epoch from a restarted server would mix two streams).
pub fn epoch_now() -> u32 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let ticks = since.as_millis().saturating_sub(u128::from(EPOCH_ORIGIN_UNIX_SECS) * 1000)
        * u128::from(EPOCH_TICKS_PER_SEC)
        / 1000;
    u32::try_from(ticks).unwrap_or(u32::MAX).max(1)
}

/// An epoch no earlier server of this host can have used (with a clock that does not step back):
/// waits for the next quarter-second tick (at most 250 ms) and returns it. A server that started
/// before this call started in an earlier tick, so its [`epoch_now`] or its `restart_safe_epoch`
/// was smaller.
pub fn restart_safe_epoch() -> u32 {
    let first = epoch_now();
    loop {
        let e = epoch_now();
        if e > first {
            return e;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
