//! Head-node metrics beyond the NBD front end (which has its own, in `nbd::metrics`). Every name
//! is listed in `docs/metrics.md`.

use common::metrics::{MetricsError, counter_vec, latency_vec};
#[allow(unused_imports)]
use prometheus::Histogram;
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
    term: IntGaugeVec,
    role: IntGaugeVec,
    rejoining: IntGaugeVec,
    commit: IntGaugeVec,
    applied: IntGaugeVec,
    flushed: IntGaugeVec,
    unflushed: IntGaugeVec,
    batch: HistogramVec,
    elections: IntCounterVec,
    leader_changes: IntCounterVec,
    stale: IntGaugeVec,
    resync: IntCounterVec,
    rewrites: IntCounterVec,
    snapshots: IntCounterVec,
    lacking: IntCounterVec,
    sessions_ended: IntCounterVec,
}

fn int_gauge_vec(r: &Registry, name: &str, help: &str) -> Result<IntGaugeVec, MetricsError> {
    common::metrics::register(r, IntGaugeVec::new(Opts::new(name, help), &["volume"])?)
}

impl HeadMetrics {
    /// Registers the families.
    pub fn new(r: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            stage: latency_vec(
                r,
                "stockade_volume_stage_duration_seconds",
                "Time a request spends in one stage of the volume's I/O path (throttle, raft_commit, read_index, sled_read, sled_write, sled_zero), by volume.",
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
            term: int_gauge_vec(
                r,
                "stockade_raft_term",
                "Current Raft term of the volume's group on this node.",
            )?,
            role: int_gauge_vec(
                r,
                "stockade_raft_role",
                "Raft role of this node in the volume's group: 0 follower, 1 pre-candidate, 2 candidate, 3 leader serving, 4 leader not yet serving.",
            )?,
            rejoining: int_gauge_vec(
                r,
                "stockade_raft_rejoining",
                "1 while this node rejoins the volume's group after losing its Raft state (it does not vote until it holds everything committed).",
            )?,
            commit: int_gauge_vec(
                r,
                "stockade_raft_commit_index",
                "Highest committed log index known here.",
            )?,
            applied: int_gauge_vec(
                r,
                "stockade_raft_applied_index",
                "Highest log index applied here.",
            )?,
            flushed: int_gauge_vec(
                r,
                "stockade_volume_flushed_index",
                "Every write at or below this log index is on the sleds (replicated FlushedUpTo).",
            )?,
            unflushed: int_gauge_vec(
                r,
                "stockade_volume_unflushed_bytes",
                "Committed write data held here and not yet known to be on the sleds.",
            )?,
            batch: common::metrics::histogram_vec(
                r,
                "stockade_raft_ready_entries",
                "Log entries made durable per Raft ready (proposals riding one log write).",
                &["volume"],
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            )?,
            elections: counter_vec(
                r,
                "stockade_raft_elections_total",
                "Elections this node started (became candidate or pre-candidate).",
                &["volume"],
            )?,
            leader_changes: counter_vec(
                r,
                "stockade_raft_leader_changes_total",
                "Times the leader known to this node changed.",
                &["volume"],
            )?,
            stale: int_gauge_vec(
                r,
                "stockade_volume_stale_replicas",
                "Sleds recorded stale for the volume (missed writes while unreachable; not read until resynchronised).",
            )?,
            resync: counter_vec(
                r,
                "stockade_volume_resync_bytes_total",
                "Bytes this head node copied from current replicas to stale sleds of the volume to resynchronise them.",
                &["volume"],
            )?,
            lacking: counter_vec(
                r,
                "stockade_volume_lacking_chunks_total",
                "Chunks found missing on a sled that should hold them while a fellow replica does (a replaced or wiped device); each is then read elsewhere and copied back.",
                &["volume"],
            )?,
            rewrites: counter_vec(
                r,
                "stockade_volume_writeback_rewrites_total",
                "Times the leader wrote the unflushed tail back again because a sled may have lost cached writes (it was flushed on another connection than the one that acknowledged them).",
                &["volume"],
            )?,
            snapshots: counter_vec(
                r,
                "stockade_volume_snapshots_installed_total",
                "Raft snapshots this node installed for the volume (it had fallen behind the leader's compacted log).",
                &["volume"],
            )?,
            sessions_ended: counter_vec(
                r,
                "stockade_volume_session_ended_refusals_total",
                "Proposals this leader refused because they were made for a client connection the client has replaced (what it left on a head node it gave up on).",
                &["volume"],
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
            term: self.term.with_label_values(&[name]),
            role: self.role.with_label_values(&[name]),
            rejoining: self.rejoining.with_label_values(&[name]),
            commit_index: self.commit.with_label_values(&[name]),
            applied_index: self.applied.with_label_values(&[name]),
            flushed_index: self.flushed.with_label_values(&[name]),
            unflushed_bytes: self.unflushed.with_label_values(&[name]),
            ready_entries: self.batch.with_label_values(&[name]),
            elections: self.elections.with_label_values(&[name]),
            leader_changes: self.leader_changes.with_label_values(&[name]),
            stale_replicas: self.stale.with_label_values(&[name]),
            resync_bytes: self.resync.with_label_values(&[name]),
            rewrites: self.rewrites.with_label_values(&[name]),
            snapshots: self.snapshots.with_label_values(&[name]),
            lacking_chunks: self.lacking.with_label_values(&[name]),
            session_ended_refusals: self.sessions_ended.with_label_values(&[name]),
        }
    }
}

impl HeadMetrics {
    /// Drops every series of `name` (a deleted volume, or a pool group's placeholder label
    /// once the group serves a volume), so gone volumes do not linger on dashboards.
    pub fn forget(&self, name: &str) {
        let one = [name];
        let _ = self.fenced.remove_label_values(&one);
        let _ = self.claims.remove_label_values(&one);
        let _ = self.chunks.remove_label_values(&one);
        let _ = self.fallbacks.remove_label_values(&one);
        let _ = self.epoch.remove_label_values(&one);
        let _ = self.term.remove_label_values(&one);
        let _ = self.role.remove_label_values(&one);
        let _ = self.rejoining.remove_label_values(&one);
        let _ = self.commit.remove_label_values(&one);
        let _ = self.applied.remove_label_values(&one);
        let _ = self.flushed.remove_label_values(&one);
        let _ = self.unflushed.remove_label_values(&one);
        let _ = self.batch.remove_label_values(&one);
        let _ = self.elections.remove_label_values(&one);
        let _ = self.leader_changes.remove_label_values(&one);
        let _ = self.stale.remove_label_values(&one);
        let _ = self.resync.remove_label_values(&one);
        let _ = self.rewrites.remove_label_values(&one);
        let _ = self.snapshots.remove_label_values(&one);
        let _ = self.sessions_ended.remove_label_values(&one);
        let _ = self.lacking.remove_label_values(&one);
        for stage in [
            "throttle",
            "sled_read",
            "sled_write",
            "sled_zero",
            "sled_flush",
            "read_index",
            "raft_commit",
        ] {
            let _ = self.stage.remove_label_values(&[name, stage]);
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
    /// Raft term.
    pub term: IntGauge,
    /// Raft role code.
    pub role: IntGauge,
    /// 1 while rejoining after a lost Raft state.
    pub rejoining: IntGauge,
    /// Commit index.
    pub commit_index: IntGauge,
    /// Applied index.
    pub applied_index: IntGauge,
    /// Flushed index.
    pub flushed_index: IntGauge,
    /// Unflushed bytes.
    pub unflushed_bytes: IntGauge,
    /// Entries per ready.
    pub ready_entries: prometheus::Histogram,
    /// Elections started.
    pub elections: IntCounter,
    /// Leader changes seen.
    pub leader_changes: IntCounter,
    /// Sleds recorded stale.
    pub stale_replicas: IntGauge,
    /// Bytes copied to resynchronise stale sleds.
    pub resync_bytes: IntCounter,
    /// Unflushed tails written back again (a sled may have lost cached writes).
    pub rewrites: IntCounter,
    /// Raft snapshots installed.
    pub snapshots: IntCounter,
    /// Chunks found missing on a sled that should hold them.
    pub lacking_chunks: IntCounter,
    /// Proposals refused for a client connection the client has replaced.
    pub session_ended_refusals: IntCounter,
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
