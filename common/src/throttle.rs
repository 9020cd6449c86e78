//! Dual token-bucket throttling with burst credits (US9703602B1 family, EBS gp2 semantics).
//!
//! This module is the pure core of per-volume QoS plus an async admission queue around it. It
//! never reads the time itself: every method that depends on time takes `now_ns` from the
//! injected [`Clock`](crate::clock::Clock) (the [`ThrottleQueue`] reads it from its
//! [`SharedClock`](crate::clock::SharedClock)), so tests are exact.
//!
//! # The model
//!
//! Per volume ([`VolumeLimiter`], configured by [`QosConfig`]):
//!
//! - a **work** bucket refilling at the baseline `iops` B, holding at most one second of B
//!   ([`HORIZON`]); it starts full;
//! - a **burst credit** balance (gp2): it starts full at `burst_credits`; refill of the work
//!   bucket that does not fit in it (the volume used less than B) becomes credit, so a volume
//!   whose work bucket is full earns exactly B credits per second of idleness, never above the
//!   maximum; credits pay for I/O above the baseline;
//! - a **peak** bucket refilling at the burst ceiling `burst_iops` P, with the work bucket's
//!   capacity (one second of B), charged the full cost of every request: the volume never runs
//!   faster than P, and bursting adds rate, not a bigger instantaneous burst;
//! - a **bytes** bucket refilling at `bandwidth` bytes/s, holding one second of it.
//!
//! Per head node ([`GlobalBucket`], configured by [`GlobalConfig`]): a **global** bucket
//! refilling at the node's `capacity_iops`, holding one second of it, charged the full cost of
//! every admitted request of every volume (its level is floored at minus one capacity, so an
//! over-committed node remembers at most one second of overload).
//!
//! Every dimension is optional: `None` is unlimited and costs nothing.
//!
//! # Admission of one request
//!
//! A request costs c = [`cost_ops`]`(len)` ops (one per started 256 KiB; a flush or any
//! zero-length request costs one op, because a flush is a full commit round on every replica)
//! and `len` bytes. [`VolumeLimiter::try_admit`] admits it at `now` when
//!
//! 1. the **peak** bucket holds `min(c, capacity)` (no debt), and either
//! 2. **baseline path**: the work bucket holds `min(c, capacity)`; it pays c (so a request
//!    larger than the bucket is admitted when the bucket is full and leaves it in debt), or
//! 3. **burst path**: the work bucket holds w ≥ 0 (no debt) and pays all of it, the burst
//!    credits pay the rest r = c − w, charged at `ceil(r × discount)`, and the global bucket
//!    shows spare capacity: it holds `min(c, capacity)`. Credits never go negative: if they
//!    cannot pay all of r, the burst path is closed.
//!
//! and then the **bytes** bucket holds `min(len, capacity)` (no debt). The op tokens are taken
//! first; if the bytes bucket then refuses, they are all refunded exactly. The global bucket is
//! charged c on both paths. The baseline path never looks at the global bucket: with the sum of
//! baselines within the node's capacity ([`check_capacity`]), bursts only use capacity that no
//! volume's baseline needs, so one volume's burst never pushes another below its baseline.
//!
//! The `spare_capacity_discount` f of the node (off by default, so configured limits are exact)
//! makes the burst path charge `ceil(r × f)` credits instead of r: on a host with spare capacity
//! a volume gets 1/f above-baseline ops per credit. The peak ceiling and the global charge stay
//! exact.
//!
//! A request that cannot be admitted is never an error: [`Decision::Delayed`] carries the exact
//! time until it can be (to the nanosecond, assuming no other volume takes global tokens
//! meanwhile), so a caller can sleep precisely and retry.
//!
//! # Exact arithmetic
//!
//! Balances are integers in billionths of an op (or of a byte), [`Tokens`]. A rate of R per
//! second is then exactly R billionths per nanosecond, so the refill over `dt` nanoseconds is
//! the integer `R × dt`: no rounding, no drift however the time is sliced, and the refill is
//! path-independent (refilling to t1 then to t2 equals refilling to t2). The time until a
//! balance reaches a threshold is the integer ceiling of `deficit / R`, which makes delays exact.
//! Products are computed in 128 bits and saturate instead of overflowing; floats appear only in
//! getters meant for metrics. (Micro-ops would need a remainder carried between refills, as
//! `R × dt / 1000` is not an integer; nano-units match the clock's resolution and need none.)
//!
//! # Example
//!
//! ```
//! use common::throttle::{Decision, GlobalBucket, QosConfig, Request, VolumeLimiter};
//! use std::time::Duration;
//!
//! // 100 IOPS baseline, bursts to 400 IOPS on 1000 credits, no bandwidth limit.
//! let cfg = QosConfig { iops: Some(100), burst_iops: Some(400), burst_credits: 1_000, bandwidth: None };
//! let mut node = GlobalBucket::unlimited();
//! let mut vol = VolumeLimiter::new(cfg, 0).expect("valid configuration");
//!
//! // The work bucket starts full with one second of baseline: 100 small I/Os pass at once.
//! for _ in 0..100 {
//!     assert!(vol.try_admit(&mut node, 0, &Request::io(4096)).is_admitted());
//! }
//! // The next one is paid by burst credits as soon as the 400 IOPS ceiling allows: 2.5 ms.
//! let next = vol.try_admit(&mut node, 0, &Request::io(4096));
//! assert_eq!(next, Decision::Delayed(Duration::from_micros(2_500)));
//! assert!(vol.try_admit(&mut node, 2_500_000, &Request::io(4096)).is_admitted());
//! // A 1 MiB write costs 4 ops.
//! assert_eq!(Request::io(1 << 20).ops(), 4);
//! ```

mod bucket;
mod config;
mod limiter;
mod queue;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use bucket::Tokens;
pub use config::{CapacityError, Discount, GlobalConfig, QosConfig, QosError, check_capacity};
pub use limiter::{Decision, GlobalBucket, Grant, QosState, Request, VolumeLimiter};
pub use queue::{Admitted, SharedGlobal, Slot, ThrottleQueue, ThrottleSnapshot, TokioClock};

/// Bytes per op: a request costs one op per started `OP_SIZE` bytes.
pub const OP_SIZE: u64 = 256 * 1024;

/// How much every bucket holds: one horizon of its rate (a bucket refilling at R per second holds
/// R). The burst credit balance is separate and holds `burst_credits`.
pub const HORIZON: Duration = Duration::from_secs(1);

/// The cost in ops of an I/O of `len` bytes: one per started 256 KiB, and one for a zero-length
/// request (a flush is a commit round on every replica, not free).
///
/// ```
/// use common::throttle::cost_ops;
/// assert_eq!(cost_ops(0), 1);
/// assert_eq!(cost_ops(4096), 1);
/// assert_eq!(cost_ops(256 * 1024), 1);
/// assert_eq!(cost_ops(256 * 1024 + 1), 2);
/// assert_eq!(cost_ops(1 << 20), 4);
/// ```
pub const fn cost_ops(len: u64) -> u64 {
    if len == 0 { 1 } else { len.div_ceil(OP_SIZE) }
}
