//! The Stockade head node: serves volumes over NBD; their data lives on sled controllers.
//!
//! * [`nbd`] — the NBD server, generic over the [`nbd::Volume`] trait.
//! * [`volume`] — volumes on sleds: placement, replicated I/O with fencing credentials, and the
//!   NBD volume over them.
//! * [`sleds`] — connections to the sled controllers.
//! * [`state`] — the state directory (epoch counter, volume descriptions).
//! * [`config`], [`app`] — configuration, start and stop.
//! * [`metrics`] — volume metrics.
//! * [`events`] — the correlated-events engine behind `GET /v1/events`.

pub mod app;
pub mod config;
pub mod control;
pub mod events;
pub mod metrics;
pub mod nbd;
pub mod replication;
pub mod sleds;
pub mod state;
pub mod volume;
