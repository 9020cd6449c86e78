//! The sled controller: owns storage devices through io_uring and refuses any mutation that does
//! not carry a valid fencing credential.
//!
//! * [`engine`] — the I/O seam (`IoEngine`) and its io_uring, sync and in-memory engines.
//! * [`layout`] — the on-device format.
//! * [`device`] — one device's state machine and the thread that owns it.
//! * [`sled`] — the devices of a sled together: chunk placement, credential checks, claims.
//! * [`server`] — the authenticated network protocol.
//! * [`reply`] — the way back from the device threads to a connection (one wake-up per batch).
//! * [`config`], [`app`] — configuration, start and stop.
//! * [`metrics`] — the controller's Prometheus metrics.

pub mod app;
pub mod config;
pub mod device;
pub mod engine;
pub mod layout;
pub mod metrics;
pub mod reply;
pub mod server;
pub mod sled;
