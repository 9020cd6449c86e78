//! Structured logging setup and rate limiting for hot-path warnings.
//!
//! Field names are fixed across the code base: `volume_id`, `sled_id`, `node_id`, `epoch`,
//! `device`, `chunk`. Logs go to stderr, as JSON lines when stderr is not a terminal (a service
//! manager or a test harness collecting them) and human-readable otherwise. `RUST_LOG` sets the
//! filter (default `info`).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

/// Installs the global tracing subscriber. Safe to call once per process; later calls are
/// ignored.
pub fn init(process: &'static str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = if std::io::stderr().is_terminal() {
        builder.with_target(false).try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    };
    if res.is_ok() {
        tracing::debug!(process, "logging initialised");
    }
}

/// Lets one event through per interval and counts the ones it suppressed, so a hot-path warning
/// cannot flood the log. Time is passed in by the caller (nanoseconds from any monotonic clock).
#[derive(Debug)]
pub struct RateLimit {
    interval_ns: u64,
    next_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// At most one event per `interval`.
    pub const fn new(interval: std::time::Duration) -> Self {
        Self {
            interval_ns: interval.as_nanos() as u64,
            next_ns: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed_since_last)` when an event may be logged now, `None` otherwise.
    pub fn check(&self, now_ns: u64) -> Option<u64> {
        let next = self.next_ns.load(Ordering::Relaxed);
        if now_ns >= next
            && self
                .next_ns
                .compare_exchange(
                    next,
                    now_ns + self.interval_ns,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_limit_lets_one_through_per_interval() {
        let r = RateLimit::new(Duration::from_secs(1));
        assert_eq!(r.check(0), Some(0));
        assert_eq!(r.check(10), None);
        assert_eq!(r.check(20), None);
        assert_eq!(r.check(1_000_000_000), Some(2));
    }
}
