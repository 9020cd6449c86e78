//! Head-node metrics beyond the NBD front end (which has its own, in `nbd::metrics`). Every name
//! is listed in `docs/metrics.md`.

use common::metrics::{MetricsError, counter_vec, latency_vec};
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::time::Instant;

/// Metric families of the head node's volumes, registered once.
#[derive(Debug, Clone)]
pub struct HeadMetrics {
    stage: HistogramVec,
    fenced: IntCounterVec,
    claims: IntCounterVec,
    chunks: IntGaugeVec,
    fallbacks: IntCounterVec,
    epoch: IntGaugeVec,
}

impl HeadMetrics {
    /// Registers the families.
    pub fn new(r: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            stage: latency_vec(
                r,
                "stockade_volume_stage_duration_seconds",
                "Time a request spends in one stage of the volume's I/O path (sled_read, sled_write, sled_zero), by volume.",
                &["volume", "stage"],
            )?,
            fenced: counter_vec(
                r,
                "stockade_volume_fenced_total",
                "Times a sled refused this head node's mutation because another holder claimed the volume.",
                &["volume"],
            )?,
            claims: counter_vec(
                r,
                "stockade_volume_claims_total",
                "Claims this head node made on sleds for the volume.",
                &["volume"],
            )?,
            chunks: common::metrics::register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "stockade_volume_chunks_allocated",
                        "Chunks of the volume that may hold data (not known to be empty on every replica).",
                    ),
                    &["volume"],
                )?,
            )?,
            fallbacks: counter_vec(
                r,
                "stockade_volume_read_fallbacks_total",
                "Replica reads that failed (sled down, checksum mismatch) and were retried on another replica.",
                &["volume"],
            )?,
            epoch: common::metrics::register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "stockade_volume_epoch",
                        "The fencing epoch under which this head node writes the volume.",
                    ),
                    &["volume"],
                )?,
            )?,
        })
    }

    /// Handles bound to one volume.
    pub fn volume(&self, name: &str) -> VolumeMetrics {
        VolumeMetrics {
            name: name.to_string(),
            stage: self.stage.clone(),
            fenced: self.fenced.with_label_values(&[name]),
            claims: self.claims.with_label_values(&[name]),
            chunks_allocated: self.chunks.with_label_values(&[name]),
            read_fallbacks: self.fallbacks.with_label_values(&[name]),
            epoch: self.epoch.with_label_values(&[name]),
        }
    }
}

/// Metrics of one volume.
#[derive(Debug, Clone)]
pub struct VolumeMetrics {
    name: String,
    stage: HistogramVec,
    /// Fenced refusals received.
    pub fenced: IntCounter,
    /// Claims issued.
    pub claims: IntCounter,
    /// Chunks that may hold data.
    pub chunks_allocated: IntGauge,
    /// Reads retried on another replica.
    pub read_fallbacks: IntCounter,
    /// Current epoch.
    pub epoch: IntGauge,
}

impl VolumeMetrics {
    /// Handles on a private registry (tests).
    pub fn unregistered(name: &str) -> Self {
        HeadMetrics::new(&Registry::new())
            .expect("fresh registry")
            .volume(name)
    }

    /// Records the time since `started` in `stage`.
    pub fn observe_stage(&self, stage: &str, started: Instant) {
        self.stage
            .with_label_values(&[self.name.as_str(), stage])
            .observe(started.elapsed().as_secs_f64());
    }
}
