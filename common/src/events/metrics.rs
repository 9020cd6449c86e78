//! The metrics of the correlated-events engine, registered in a registry the caller passes in.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `stockade_events_scrapes_total` | counter | result | Sources polled (a `/metrics` target or one PromQL expression), `ok` or `error`. |
//! | `stockade_events_series_tracked` | gauge | | Series held in sliding windows. |
//! | `stockade_events_series_refused_total` | counter | | Values of new series refused because the series bound was reached. |
//! | `stockade_events_candidates` | gauge | | Series paired at the last evaluation (watched or flagged). |
//! | `stockade_events_candidates_dropped_total` | counter | | Candidate series left out of evaluations by the `max_candidates` bound. |
//! | `stockade_events_anomalies_total` | counter | | Series newly flagged by the z-score rule. |
//! | `stockade_events_raised_total` | counter | | Correlated events raised. |
//! | `stockade_events_webhook_deliveries_total` | counter | result | Webhook deliveries: `ok`, `failed` (after every retry) or `dropped` (queue full). |

use crate::metrics::{MetricsError, counter, counter_vec, int_gauge};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};

/// The engine's metrics.
#[derive(Debug, Clone)]
pub struct EventsMetrics {
    pub(crate) scrapes: IntCounterVec,
    pub(crate) series: IntGauge,
    pub(crate) refused: IntCounter,
    pub(crate) candidates: IntGauge,
    pub(crate) candidates_dropped: IntCounter,
    pub(crate) anomalies: IntCounter,
    pub(crate) raised: IntCounter,
    pub(crate) webhook: IntCounterVec,
}

impl EventsMetrics {
    /// Registers the metrics listed in the [module docs](self).
    pub fn new(registry: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            scrapes: counter_vec(
                registry,
                "stockade_events_scrapes_total",
                "Sources polled by the correlated-events engine, by result.",
                &["result"],
            )?,
            series: int_gauge(
                registry,
                "stockade_events_series_tracked",
                "Series held in sliding windows by the correlated-events engine.",
            )?,
            refused: counter(
                registry,
                "stockade_events_series_refused_total",
                "Values of new series refused because the series bound was reached.",
            )?,
            candidates: int_gauge(
                registry,
                "stockade_events_candidates",
                "Series paired at the last evaluation (watched or flagged).",
            )?,
            candidates_dropped: counter(
                registry,
                "stockade_events_candidates_dropped_total",
                "Candidate series left out of evaluations by the max_candidates bound.",
            )?,
            anomalies: counter(
                registry,
                "stockade_events_anomalies_total",
                "Series newly flagged by the z-score anomaly rule.",
            )?,
            raised: counter(
                registry,
                "stockade_events_raised_total",
                "Correlated events raised.",
            )?,
            webhook: counter_vec(
                registry,
                "stockade_events_webhook_deliveries_total",
                "Webhook deliveries of events, by result (ok, failed, dropped).",
                &["result"],
            )?,
        })
    }
}
