//! The sled controller: owns storage devices through io_uring and refuses any mutation that does
//! not carry a valid fencing credential.
//!
//! * [`engine`] — the I/O seam (`IoEngine`) and its io_uring, sync and in-memory engines.
//! * [`layout`] — the on-device format.
//! * [`device`] — one device's state machine and the thread that owns it.
//! * [`metrics`] — the controller's Prometheus metrics.

pub mod device;
pub mod engine;
pub mod layout;
pub mod metrics;
