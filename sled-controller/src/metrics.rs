//! The sled controller's metrics. Every name here is listed in `docs/metrics.md`.

use common::logging::RateLimit;
use common::metrics::{MetricsError, counter_vec, gauge_vec, latency_vec};
use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use std::time::Duration;

/// Metric families of a sled controller, registered once.
#[derive(Debug, Clone)]
pub struct SledMetrics {
    /// Requests by op and result.
    pub requests: IntCounterVec,
    /// Request latency by op, frame received to reply written.
    pub request_seconds: HistogramVec,
    /// Operations by volume and op.
    pub volume_ops: IntCounterVec,
    /// Bytes by volume and op.
    pub volume_bytes: IntCounterVec,
    /// Open connections.
    pub connections: IntGauge,
    /// Failed handshakes.
    pub auth_failures: IntCounter,
    /// Credentials refused for a bad MAC or volume mismatch.
    pub credential_refusals: IntCounter,
    /// Frames refused as malformed, oversized or failing their checksum, by reason.
    pub protocol_errors: IntCounterVec,
    dev_ops: IntCounterVec,
    dev_bytes: IntCounterVec,
    dev_errors: IntCounterVec,
    dev_seconds: HistogramVec,
    dev_queue: IntGaugeVec,
    dev_backpressure: IntCounterVec,
    dev_capacity: IntGaugeVec,
    dev_chunks_total: IntGaugeVec,
    dev_chunks_used: IntGaugeVec,
    dev_dirty: IntGaugeVec,
    checksum_errors: IntCounterVec,
    fenced: IntCounterVec,
    claims: IntCounterVec,
    io_errors: IntCounterVec,
}

fn int_gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    common::metrics::register(r, IntGaugeVec::new(Opts::new(name, help), labels)?)
}

impl SledMetrics {
    /// Registers the families.
    pub fn new(r: &Registry) -> Result<Self, MetricsError> {
        let _ = gauge_vec;
        Ok(Self {
            requests: counter_vec(
                r,
                "stockade_sled_requests_total",
                "Requests handled, by operation and result.",
                &["op", "result"],
            )?,
            request_seconds: latency_vec(
                r,
                "stockade_sled_request_duration_seconds",
                "Time from a request frame received to its reply written, by operation.",
                &["op"],
            )?,
            volume_ops: counter_vec(
                r,
                "stockade_sled_volume_ops_total",
                "Successful reads and writes, by volume and operation.",
                &["volume", "op"],
            )?,
            volume_bytes: counter_vec(
                r,
                "stockade_sled_volume_bytes_total",
                "Bytes read and written, by volume and operation.",
                &["volume", "op"],
            )?,
            connections: common::metrics::int_gauge(
                r,
                "stockade_sled_connections",
                "Open head-node connections.",
            )?,
            auth_failures: common::metrics::counter(
                r,
                "stockade_sled_auth_failures_total",
                "Connections that failed to prove knowledge of the cluster key.",
            )?,
            credential_refusals: common::metrics::counter(
                r,
                "stockade_sled_credential_refusals_total",
                "Mutations refused because their credential's MAC did not verify.",
            )?,
            protocol_errors: counter_vec(
                r,
                "stockade_sled_protocol_errors_total",
                "Frames refused (connection closed), by reason.",
                &["reason"],
            )?,
            dev_ops: counter_vec(
                r,
                "stockade_sled_device_ops_total",
                "Device requests completed, by device and operation.",
                &["device", "op"],
            )?,
            dev_bytes: counter_vec(
                r,
                "stockade_sled_device_bytes_total",
                "Bytes moved by device requests, by device and operation.",
                &["device", "op"],
            )?,
            dev_errors: counter_vec(
                r,
                "stockade_sled_device_request_errors_total",
                "Device requests that failed (fenced, out of range, I/O...), by device and operation.",
                &["device", "op"],
            )?,
            dev_seconds: latency_vec(
                r,
                "stockade_sled_device_request_duration_seconds",
                "Time a request spends in the device thread (queueing, metadata, io_uring), by device and operation.",
                &["device", "op"],
            )?,
            dev_queue: int_gauge_vec(
                r,
                "stockade_sled_device_queue_depth",
                "Requests accepted by the device thread and not yet answered.",
                &["device"],
            )?,
            dev_backpressure: counter_vec(
                r,
                "stockade_sled_device_backpressure_total",
                "Operations held back because the io_uring submission queue was full.",
                &["device"],
            )?,
            dev_capacity: int_gauge_vec(
                r,
                "stockade_sled_device_capacity_bytes",
                "Bytes of chunk space on the device.",
                &["device"],
            )?,
            dev_chunks_total: int_gauge_vec(
                r,
                "stockade_sled_device_chunks",
                "Chunks the device can hold.",
                &["device"],
            )?,
            dev_chunks_used: int_gauge_vec(
                r,
                "stockade_sled_device_chunks_used",
                "Chunks allocated on the device.",
                &["device"],
            )?,
            dev_dirty: int_gauge_vec(
                r,
                "stockade_sled_device_dirty_regions",
                "2 MiB regions whose block checksums are not yet written back.",
                &["device"],
            )?,
            checksum_errors: counter_vec(
                r,
                "stockade_sled_checksum_errors_total",
                "Stored blocks that failed their checksum on read.",
                &["device"],
            )?,
            fenced: counter_vec(
                r,
                "stockade_sled_fenced_writes_total",
                "Mutations refused because the volume is claimed by a higher epoch or another holder.",
                &["device"],
            )?,
            claims: counter_vec(
                r,
                "stockade_sled_claims_total",
                "Claims by result (accepted = made durable, refused = stale).",
                &["device", "result"],
            )?,
            io_errors: counter_vec(
                r,
                "stockade_sled_device_io_errors_total",
                "I/O errors returned by the device.",
                &["device"],
            )?,
        })
    }

    /// Handles bound to one device.
    pub fn device(&self, device: &str) -> DeviceMetrics {
        DeviceMetrics {
            device: device.to_string(),
            ops: self.dev_ops.clone(),
            bytes: self.dev_bytes.clone(),
            errors: self.dev_errors.clone(),
            seconds: self.dev_seconds.clone(),
            queue_depth: self.dev_queue.with_label_values(&[device]),
            backpressure: self.dev_backpressure.with_label_values(&[device]),
            capacity_bytes: self.dev_capacity.with_label_values(&[device]),
            chunks_total: self.dev_chunks_total.with_label_values(&[device]),
            chunks_used: self.dev_chunks_used.with_label_values(&[device]),
            dirty_regions: self.dev_dirty.with_label_values(&[device]),
            checksum_errors: self.checksum_errors.with_label_values(&[device]),
            fenced: self.fenced.with_label_values(&[device]),
            claims: ClaimCounters {
                vec: self.claims.clone(),
                device: device.to_string(),
            },
            io_errors: self.io_errors.with_label_values(&[device]),
            fence_log: std::sync::Arc::new(RateLimit::new(Duration::from_secs(1))),
        }
    }
}

/// Claim counters of one device, by result.
#[derive(Debug, Clone)]
pub struct ClaimCounters {
    vec: IntCounterVec,
    device: String,
}

impl ClaimCounters {
    /// The counter for `result`.
    pub fn with_label_values(&self, result: &[&str]) -> IntCounter {
        self.vec
            .with_label_values(&[self.device.as_str(), result[0]])
    }
}

/// Metrics of one device (label values bound).
#[derive(Debug, Clone)]
pub struct DeviceMetrics {
    device: String,
    ops: IntCounterVec,
    bytes: IntCounterVec,
    errors: IntCounterVec,
    seconds: HistogramVec,
    /// Requests in the device thread.
    pub queue_depth: IntGauge,
    /// Submissions pushed back by a full ring.
    pub backpressure: IntCounter,
    /// Chunk space.
    pub capacity_bytes: IntGauge,
    /// Chunks in total.
    pub chunks_total: IntGauge,
    /// Chunks allocated.
    pub chunks_used: IntGauge,
    /// Dirty regions.
    pub dirty_regions: IntGauge,
    /// Checksum failures.
    pub checksum_errors: IntCounter,
    /// Fenced refusals.
    pub fenced: IntCounter,
    /// Claims.
    pub claims: ClaimCounters,
    /// Device I/O errors.
    pub io_errors: IntCounter,
    /// Rate limit for fencing warnings.
    pub fence_log: std::sync::Arc<RateLimit>,
}

impl DeviceMetrics {
    /// Metrics bound to a private registry (tests).
    pub fn unregistered(device: &str) -> Self {
        SledMetrics::new(&Registry::new())
            .expect("fresh registry")
            .device(device)
    }

    /// Records a finished request.
    pub fn observe(&self, op: &str, bytes: u64, seconds: f64, ok: bool) {
        let labels = [self.device.as_str(), op];
        if ok {
            self.ops.with_label_values(&labels).inc();
            self.bytes.with_label_values(&labels).inc_by(bytes);
        } else {
            self.errors.with_label_values(&labels).inc();
        }
        let h: Histogram = self.seconds.with_label_values(&labels);
        h.observe(seconds);
    }
}
