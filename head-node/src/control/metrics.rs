//! Control-plane metrics (listed in `docs/metrics.md`).

use common::metrics::{MetricsError, counter_vec, latency_vec};
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use std::time::Instant;

/// Control-plane metrics of one head node.
#[derive(Debug, Clone)]
pub struct ControlMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    /// Create latency by source of the group (`pool`, `partial`).
    pub create_seconds: HistogramVec,
    /// 1 while this node leads the metadata group.
    pub is_leader: IntGauge,
    /// Pool groups by state (`ready`, `pending`), as the leader sees them.
    pub pool_groups: IntGaugeVec,
    /// Pool groups discarded because they failed validation.
    pub pool_validation_failures: IntCounter,
    /// Membership changes made while growing partially provisioned groups.
    pub growth_steps: IntCounter,
    /// Volumes, as the leader sees them.
    pub volumes: IntGauge,
    /// Head nodes and sleds up, as the leader sees them (`kind` = `node` or `sled`).
    pub up: IntGaugeVec,
    /// Chunk replicas still on draining sleds, as the leader sees them.
    pub draining_replicas: IntGauge,
    /// Placement changes made to drain sleds, by kind (`add`, `drop`).
    pub drain_steps: IntCounterVec,
}

impl ControlMetrics {
    /// Registers the metrics.
    pub fn new(r: &Registry) -> Result<Self, MetricsError> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            common::metrics::register(r, IntGauge::new(name, help)?)
        };
        let gauge_vec = |name: &str, help: &str, l: &[&str]| -> Result<IntGaugeVec, MetricsError> {
            common::metrics::register(r, IntGaugeVec::new(Opts::new(name, help), l)?)
        };
        Ok(Self {
            requests: counter_vec(
                r,
                "stockade_admin_requests_total",
                "Admin API requests answered by this head node (or by the metadata leader on its behalf), by operation and HTTP status.",
                &["op", "status"],
            )?,
            duration: latency_vec(
                r,
                "stockade_admin_request_duration_seconds",
                "Time to answer an admin API request, by operation.",
                &["op"],
            )?,
            create_seconds: latency_vec(
                r,
                "stockade_control_create_duration_seconds",
                "Time from a create request to the volume serving, on the metadata leader, by where its group came from (pool: a ready group; partial: a new one-member group that grows while serving).",
                &["source"],
            )?,
            is_leader: gauge(
                "stockade_control_is_leader",
                "1 while this head node leads the metadata group.",
            )?,
            pool_groups: gauge_vec(
                "stockade_control_pool_groups",
                "Raft groups in the pool of the metadata leader, by state (ready: validated; pending: starting or being validated).",
                &["state"],
            )?,
            pool_validation_failures: common::metrics::counter(
                r,
                "stockade_control_pool_validation_failures_total",
                "Pool groups discarded because they did not pass validation in time.",
            )?,
            growth_steps: common::metrics::counter(
                r,
                "stockade_control_growth_steps_total",
                "Membership changes made to grow partially provisioned volume groups.",
            )?,
            volumes: gauge(
                "stockade_control_volumes",
                "Volumes in the cluster (metadata leader).",
            )?,
            up: gauge_vec(
                "stockade_control_up",
                "Head nodes (kind=node) and sleds (kind=sled) that reported lately, as the metadata leader sees them.",
                &["kind"],
            )?,
            draining_replicas: gauge(
                "stockade_control_draining_replicas",
                "Chunk replicas still placed on sleds being drained (metadata leader); 0 once every drain is done.",
            )?,
            drain_steps: counter_vec(
                r,
                "stockade_control_drain_steps_total",
                "Placement changes made to drain sleds (metadata leader), by kind (add: replacement replicas placed on one sled; drop: replicas taken off the draining sled).",
                &["kind"],
            )?,
        })
    }

    /// Records one answered request.
    pub fn observe(&self, op: &str, status: u16, started: Instant) {
        self.requests
            .with_label_values(&[op, &status.to_string()])
            .inc();
        self.duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
    }
}
