//! Correlated events (US10270668B1): find metric series that move together and raise one
//! event per pair.
//!
//! The pieces, from pure to I/O:
//!
//! * [`expo`] parses the Prometheus text exposition format 0.0.4 into samples;
//!   [`SeriesKey`] names a series `name{label="value",…}`; [`Pattern`] globs choose series.
//! * [`Engine`] keeps a sliding window per series (counters turned into per-second rates),
//!   flags anomalies (z-score of the newest value against its window), correlates pairs of
//!   candidates ([`stats::pearson`] over samples with identical timestamps) and raises an
//!   [`Event`] when `|r|` crosses the threshold, once per pair per cooldown. It takes every
//!   timestamp as an argument, so it is exact under test.
//! * [`runner::Runner`] reads the sources each round — `/metrics` targets through the small
//!   [`http`] client, or a Prometheus server's range-query API through [`prom`] — feeds the
//!   engine and responds: a structured log line per event, the [`webhook`], and the events it
//!   returns to the caller (the `stockade events` command prints them).
//!
//! ```
//! use common::events::{Engine, EngineConfig, Pattern, Sign, expo};
//!
//! let mut engine = Engine::new(EngineConfig {
//!     watch: vec![Pattern::new("stockade_*").unwrap()],
//!     anomaly_z: None,
//!     sign: Sign::Positive,
//!     min_samples: 5,
//!     ..EngineConfig::default()
//! })
//! .unwrap();
//! let mut events = Vec::new();
//! let mut ops = 0;
//! for i in 0..10u64 {
//!     let depth = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3][i as usize];
//!     ops += depth * 10; // each queued request makes ten operations
//!     let text = format!(
//!         "# TYPE stockade_ops_total counter\nstockade_ops_total {ops}\nstockade_queue_depth {depth}\n"
//!     );
//!     let t = i * 1000;
//!     let e = expo::parse(&text);
//!     for s in &e.samples {
//!         engine.ingest(t, &s.key(), e.value_kind(&s.name), s.value);
//!     }
//!     events.extend(engine.evaluate(t));
//! }
//! // The counter's rate (from the second scrape on) rises and falls with the queue depth.
//! assert_eq!(events.len(), 1);
//! assert_eq!(
//!     (events[0].a.key.as_str(), events[0].b.key.as_str()),
//!     ("stockade_ops_total", "stockade_queue_depth")
//! );
//! println!("{}", events[0]);
//! ```

pub mod engine;
pub mod expo;
pub mod http;
pub mod metrics;
pub mod pattern;
pub mod prom;
pub mod runner;
pub mod series;
pub mod stats;
pub mod webhook;

#[cfg(test)]
pub(crate) mod test_server;

pub use engine::{
    ConfigError, Engine, EngineConfig, EngineStats, Event, EventSeries, EventWindow, Ingested,
    SelectedBy, Sign, TimestampMs,
};
pub use metrics::EventsMetrics;
pub use pattern::{Pattern, PatternError};
pub use runner::{Round, Runner, RunnerConfig, RunnerError};
pub use series::{SeriesKey, ValueKind};

use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

/// Formats milliseconds since the Unix epoch as RFC 3339 with milliseconds (UTC).
pub fn format_time_ms(ms: TimestampMs) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl fmt::Display for Event {
    /// One human line: `<raised at> correlated r=+0.982 n=60 window=<start>..<end> A ~ B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} r={:+.3} n={} window={}..{} {} ~ {}",
            format_time_ms(self.raised_at_ms),
            self.kind,
            self.coefficient,
            self.window.samples,
            format_time_ms(self.window.start_ms),
            format_time_ms(self.window.end_ms),
            self.a.key,
            self.b.key,
        )
    }
}
