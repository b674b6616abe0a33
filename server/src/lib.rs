//! spindrift memory server: serves a frozen VM memory image (a Firecracker memory snapshot file) to
//! host daemons over reliable multicast.
//!
//! The daemon only moves bytes: every protocol decision is made by
//! [`spindrift_protocol::sender::Sender`]; this crate maps the image ([`image`]), reads the
//! configuration ([`config`]) and runs the event loop between a UDP socket and the sender
//! ([`server`]). The binary `spindrift-server` is a thin wrapper; tests run [`serve`] in-process.

pub mod config;
pub mod image;
pub mod server;

pub use config::{Args, ConfigError, Push, ServerConfig};
pub use image::{MmapImage, PAGE_SIZE};
pub use server::{serve, summary, ServerError};
