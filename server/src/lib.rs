//! spindrift memory server: serves a frozen VM memory image to host daemons over reliable multicast.
//!
//! The daemon only moves bytes: every protocol decision is made by
//! [`spindrift_protocol::sender::Sender`]; this crate reads the configuration ([`config`]), gets the
//! image ([`image`]: a mapped file or memory of this process; [`handover`]: a sealed memfd a local
//! VMM passes over a Unix socket) and runs the event loop between a UDP socket and the sender
//! ([`server`]).
//!
//! A VMM embeds the server with [`serve_source`]: after `fork()`, the child serves its
//! copy-on-write view of guest memory.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use spindrift_protocol::wire::BlobKind;
//! use spindrift_server::{serve_source, MemoryImage, ServeOptions, ServerConfig};
//!
//! # fn guest_memory() -> &'static [u8] { &[] }
//! let config = ServerConfig::new("198.18.0.1".parse()?, "239.77.1.1".parse()?, 7700, 42, [7u8; 32])?
//!     .with_rate(Some(125_000_000))?;
//! let options = ServeOptions {
//!     blobs: vec![(BlobKind::Descriptor, 1, b"descriptor".to_vec()), (BlobKind::Fork, 2, b"plan".to_vec())],
//!     ..ServeOptions::default()
//! };
//! let stop = AtomicBool::new(false);
//! let stats = serve_source(&config, MemoryImage::new(guest_memory())?, options, &stop)?;
//! println!("sent {} bytes", stats.tx_bytes);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The binary `spindrift-server` is a thin wrapper around [`serve`].

pub mod config;
pub mod handover;
pub mod image;
pub mod server;
pub mod sys;

pub use config::{epoch_now, restart_safe_epoch, Args, ConfigError, ImageInput, Push, ServerConfig};
pub use image::{MemoryImage, MmapImage, PAGE_SIZE};
pub use server::{
    serve, serve_source, serve_source_on, summary, write_stats, EventHook, ServeCommand, ServeOptions, ServerError,
    StatsHook,
};
pub use spindrift_protocol::sender::{PageSource, PushPolicy, SenderEvent, SenderStats};
