//! The NBD front end of the head node.
//!
//! A server for the Network Block Device protocol (the `proto.md` of the NetworkBlockDevice/nbd
//! project): fixed-newstyle handshake, structured replies, extended headers (64-bit lengths),
//! `base:allocation` block status, FLUSH/FUA, TRIM, WRITE_ZEROES (with `NO_HOLE` and
//! `FAST_ZERO`), CACHE, multi-conn, block-size advertisement, many requests in flight per
//! connection with bounded memory.
//!
//! The server is generic over the storage behind it: [`Exports`] names the volumes and
//! [`Volume`] stores bytes. [`MemVolume`]/[`MemExports`] keep them in memory; the real volume
//! (sleds, then Raft) implements the same traits.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use head_node::nbd::{MemExports, MemVolume, NbdServer, ServerConfig};
//!
//! let exports = Arc::new(MemExports::new());
//! exports.add(Arc::new(MemVolume::new("vol", 5 << 30)));
//! let registry = common::metrics::new_registry();
//! let server = NbdServer::new(exports, ServerConfig::default(), &registry)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! server.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```

pub mod backend;
pub mod client;
pub mod mem;
pub mod metrics;
pub mod proto;
pub mod server;
mod stall;
mod transmission;

pub use backend::{ExportInfo, Exports, Extent, Volume, VolumeError};
pub use mem::{MemExports, MemVolume};
pub use metrics::NbdMetrics;
pub use server::{BASE_ALLOCATION_ID, ConfigError, NbdServer, ServerConfig, ServerError};
