//! The sled controller's metrics. Every name here is listed in `docs/metrics.md`.

use common::aligned::BufPool;
use common::ids::VolumeId;
use common::logging::RateLimit;
use common::metrics::{MetricsError, counter_vec, gauge_vec, latency_vec};
use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use std::collections::HashMap;
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

    /// Handles for one connection (label-bound handles cached as they are first used).
    pub fn connection(&self) -> ConnMetrics {
        ConnMetrics {
            requests: self.requests.clone(),
            request_seconds: self.request_seconds.clone(),
            volume_ops: self.volume_ops.clone(),
            volume_bytes: self.volume_bytes.clone(),
            ops: Vec::new(),
            volumes: HashMap::new(),
        }
    }

    /// Handles bound to one device.
    pub fn device(&self, device: &str) -> DeviceMetrics {
        DeviceMetrics {
            device: device.to_string(),
            ops: self.dev_ops.clone(),
            bytes: self.dev_bytes.clone(),
            errors: self.dev_errors.clone(),
            seconds: self.dev_seconds.clone(),
            bound: Vec::new(),
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

/// Handles of one operation, bound on first use (so a series appears only once it has a value,
/// as with `with_label_values` at the point of use).
#[derive(Debug, Clone, Default)]
struct OpHandles {
    ok: Option<(IntCounter, IntCounter)>,
    errors: Option<IntCounter>,
    seconds: Option<Histogram>,
}

/// Returns the cached handles of `op`, adding an empty entry on first use. Operations are a small
/// fixed set of names, so a linear scan beats hashing.
fn op_entry<'a, T: Default>(cache: &'a mut Vec<(&'static str, T)>, op: &'static str) -> &'a mut T {
    let i = match cache.iter().position(|(o, _)| *o == op) {
        Some(i) => i,
        None => {
            cache.push((op, T::default()));
            cache.len() - 1
        }
    };
    &mut cache[i].1
}

/// Most volumes whose handles one connection keeps; beyond, the cache starts over.
const CONN_VOLUMES: usize = 256;

#[derive(Debug, Clone, Default)]
struct VolumeHandles {
    read: Option<(IntCounter, IntCounter)>,
    write: Option<(IntCounter, IntCounter)>,
}

/// Request metrics of one connection: the families, with the label-bound handles cached as they
/// are first used (per operation, and per volume in a small bounded map), so a request costs no
/// label hashing or formatting.
#[derive(Debug)]
pub struct ConnMetrics {
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    volume_ops: IntCounterVec,
    volume_bytes: IntCounterVec,
    ops: Vec<(&'static str, ConnOp)>,
    volumes: HashMap<VolumeId, VolumeHandles>,
}

#[derive(Debug, Default)]
struct ConnOp {
    ok: Option<IntCounter>,
    error: Option<IntCounter>,
    seconds: Option<Histogram>,
}

impl ConnMetrics {
    /// Records an answered request: `stockade_sled_requests_total` and
    /// `stockade_sled_request_duration_seconds`.
    pub fn request(&mut self, op: &'static str, ok: bool, seconds: f64) {
        let (requests, request_seconds) = (&self.requests, &self.request_seconds);
        let e = op_entry(&mut self.ops, op);
        let counter = if ok { &mut e.ok } else { &mut e.error };
        counter
            .get_or_insert_with(|| {
                requests.with_label_values(&[op, if ok { "ok" } else { "error" }])
            })
            .inc();
        e.seconds
            .get_or_insert_with(|| request_seconds.with_label_values(&[op]))
            .observe(seconds);
    }

    /// Records a successful read or write of `bytes` on `volume` (other operations are not
    /// counted per volume).
    pub fn volume(&mut self, volume: VolumeId, op: &'static str, bytes: u64) {
        let read = match op {
            "read" => true,
            "write" => false,
            _ => return,
        };
        if self.volumes.len() >= CONN_VOLUMES && !self.volumes.contains_key(&volume) {
            self.volumes.clear();
        }
        let v = self.volumes.entry(volume).or_default();
        let slot = if read { &mut v.read } else { &mut v.write };
        let (ops, bytes_total) = slot.get_or_insert_with(|| {
            let label = volume.to_string();
            (
                self.volume_ops.with_label_values(&[&label, op]),
                self.volume_bytes.with_label_values(&[&label, op]),
            )
        });
        ops.inc();
        bytes_total.inc_by(bytes);
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
    bound: Vec<(&'static str, OpHandles)>,
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
    pub fn observe(&mut self, op: &'static str, bytes: u64, seconds: f64, ok: bool) {
        let device = self.device.as_str();
        let (ops, bytes_vec, errors, seconds_vec) =
            (&self.ops, &self.bytes, &self.errors, &self.seconds);
        let h = op_entry(&mut self.bound, op);
        if ok {
            let (n, b) = h.ok.get_or_insert_with(|| {
                (
                    ops.with_label_values(&[device, op]),
                    bytes_vec.with_label_values(&[device, op]),
                )
            });
            n.inc();
            b.inc_by(bytes);
        } else {
            h.errors
                .get_or_insert_with(|| errors.with_label_values(&[device, op]))
                .inc();
        }
        h.seconds
            .get_or_insert_with(|| seconds_vec.with_label_values(&[device, op]))
            .observe(seconds);
    }
}

/// Exports a [`BufPool`]'s counters, read at every scrape.
#[derive(Debug, Clone)]
struct PoolCollector {
    pool: BufPool,
    region: IntGauge,
    carved: IntGauge,
    allocations: IntCounterVec,
}

impl prometheus::core::Collector for PoolCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.region.desc();
        d.extend(self.carved.desc());
        d.extend(self.allocations.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let s = self.pool.stats();
        self.region.set(s.region_bytes as i64);
        self.carved.set(s.carved_bytes as i64);
        for (source, now) in [("pool", s.hits), ("heap", s.misses)] {
            let c = self.allocations.with_label_values(&[source]);
            c.inc_by(now.saturating_sub(c.get()));
        }
        let mut f = self.region.collect();
        f.extend(self.carved.collect());
        f.extend(self.allocations.collect());
        f
    }
}

/// Registers the metrics of the sled's I/O buffer pool (see [`BufPool`]).
pub fn register_pool(r: &Registry, pool: &BufPool) -> Result<(), MetricsError> {
    let allocations = IntCounterVec::new(
        Opts::new(
            "stockade_sled_buffer_allocations_total",
            "I/O buffers allocated, by source: the registered pool, or the heap when the pool was \
             used up or the buffer is larger than its largest class.",
        ),
        &["source"],
    )?;
    for source in ["pool", "heap"] {
        allocations.with_label_values(&[source]);
    }
    common::metrics::register(
        r,
        PoolCollector {
            pool: pool.clone(),
            region: IntGauge::new(
                "stockade_sled_buffer_pool_bytes",
                "Size of the I/O buffer region registered with every device's io_uring.",
            )?,
            carved: IntGauge::new(
                "stockade_sled_buffer_pool_carved_bytes",
                "Bytes of the buffer region handed to size classes so far (at most the region).",
            )?,
            allocations,
        },
    )?;
    Ok(())
}
