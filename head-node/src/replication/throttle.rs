//! Throttling on a head node: the node's global bucket, one admission queue per volume, the
//! replication of the burst-credit balance and the throttling metrics.
//!
//! The model and the queue are the pure code of [`common::throttle`]; this module puts them on
//! the I/O path:
//!
//! - [`NodeThrottle`] holds the node's [`SharedGlobal`] bucket (from the `[throttle]` section
//!   of the configuration) and the clock every queue of the node reads, so the global bucket
//!   sees one time line. The clock must agree with `tokio::time` (the queue sleeps with it):
//!   [`common::SystemClock`] in production.
//! - [`VolumeThrottle`] is the [`ThrottleQueue`] of one volume on this node. The volume admits
//!   requests through it **on the leader only** (see `rvolume.rs`), so a request forwarded by a
//!   follower is throttled once, where it is served.
//! - Its task ([`VolumeThrottle::run`]) follows the group's status: a change of the replicated
//!   QoS is applied to the queue at once (no reconnect); while this node serves the volume, it
//!   proposes the credit balance ([`EntryHeader::QosState`]) every [`STATE_INTERVAL`] when it
//!   changed, so a new leader resumes from it. A node that becomes the leader imports the
//!   replicated balance before it admits anything (the admission path checks too, so no
//!   request can slip in between the election and the task's wake-up).
//! - The metrics are read from [`ThrottleQueue::snapshot`] at scrape time, for the volumes this
//!   node serves (a follower's queue is idle and says nothing about the volume).

use super::GroupId;
use super::driver::{GroupHandle, GroupStatus};
use super::entry::EntryHeader;
use common::clock::SharedClock;
use common::throttle::{
    Admitted, GlobalBucket, GlobalConfig, QosConfig, QosError, QosState, Request, SharedGlobal,
    ThrottleQueue, ThrottleSnapshot, Tokens, VolumeLimiter,
};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, Gauge, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

/// How many requests of one volume wait in its queue at most; later ones wait for a slot (in
/// order too): back-pressure, never an error.
pub const QUEUE_BOUND: usize = 1024;

/// How often the leader records a changed credit balance in the replicated state.
pub const STATE_INTERVAL: Duration = Duration::from_secs(1);

/// How long one proposal of the balance may take before the task gives up on it (it tries
/// again at the next interval).
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors setting up throttling.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// The node's `[throttle]` configuration.
    #[error("throttle configuration: {0}")]
    Config(#[from] QosError),
    /// Registering the metrics.
    #[error("throttling metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The throttling of one head node: its global bucket, its clock and its volumes' queues.
#[derive(Debug)]
pub struct NodeThrottle {
    global: SharedGlobal,
    clock: SharedClock,
    bound: NonZeroUsize,
    volumes: Mutex<HashMap<GroupId, (GroupHandle, Arc<VolumeThrottle>)>>,
}

impl NodeThrottle {
    /// The node's throttling from its configuration; `clock` must agree with `tokio::time`.
    pub fn new(config: GlobalConfig, clock: SharedClock) -> Result<Arc<Self>, ThrottleError> {
        let global = GlobalBucket::new(config, clock.now_ns())?;
        Ok(Arc::new(Self {
            global: Arc::new(Mutex::new(global)),
            clock,
            bound: NonZeroUsize::new(QUEUE_BOUND).unwrap_or(NonZeroUsize::MIN),
            volumes: Mutex::new(HashMap::new()),
        }))
    }

    /// Registers the throttling metrics in `registry` (read at scrape time).
    pub fn register(self: &Arc<Self>, registry: &Registry) -> Result<(), ThrottleError> {
        let collector = ThrottleCollector {
            node: Arc::downgrade(self),
            template: Families::new()?,
        };
        registry.register(Box::new(collector))?;
        Ok(())
    }

    /// The node's global bucket.
    pub fn global(&self) -> &SharedGlobal {
        &self.global
    }

    /// The throttle of `group`'s volume on this node, starting with the group's replicated QoS
    /// (unlimited if that is somehow invalid: a volume is never refused I/O for it).
    pub fn volume(&self, group: GroupId, handle: &GroupHandle) -> Arc<VolumeThrottle> {
        let qos = handle.peek(|s| s.qos);
        let now = self.clock.now_ns();
        let limiter = VolumeLimiter::new(qos, now).unwrap_or_else(|e| {
            tracing::warn!(%group, error = %e, "invalid replicated QoS; the volume starts unlimited");
            VolumeLimiter::new(QosConfig::UNLIMITED, now)
                .unwrap_or_else(|_| unreachable!("the unlimited configuration is valid"))
        });
        let queue =
            ThrottleQueue::new(limiter, self.global.clone(), self.clock.clone(), self.bound);
        let vt = Arc::new(VolumeThrottle {
            group,
            queue,
            led_term: Mutex::new(None),
        });
        lock(&self.volumes).insert(group, (handle.clone(), vt.clone()));
        vt
    }

    /// Forgets `group`'s volume (stopped on this node).
    pub fn forget(&self, group: GroupId) {
        lock(&self.volumes).remove(&group);
    }

    /// The snapshots of the volumes this node serves, by volume name.
    fn serving(&self) -> Vec<(String, ThrottleSnapshot)> {
        let vols: Vec<_> = lock(&self.volumes).values().cloned().collect();
        vols.into_iter()
            .filter_map(|(h, vt)| {
                let name = h.peek(|s| {
                    s.serving
                        .then(|| s.spec.as_ref().map(|sp| sp.name.clone()))
                        .flatten()
                })?;
                Some((name, vt.queue.snapshot()))
            })
            .collect()
    }

    /// The global bucket's level (ops; `None`: unlimited) and saturation (0 when unlimited).
    fn global_view(&self) -> (Option<f64>, f64) {
        let mut g = lock(&self.global);
        g.advance(self.clock.now_ns());
        (g.level().map(|l| l.as_f64()), g.saturation().unwrap_or(0.0))
    }
}

/// What the throttle needs of a group's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct View {
    serving: bool,
    term: u64,
    qos: QosConfig,
    qos_state: Option<QosState>,
}

impl View {
    fn of(s: &GroupStatus) -> Self {
        View {
            serving: s.serving,
            term: s.term,
            qos: s.qos,
            qos_state: s.qos_state,
        }
    }
}

/// The admission queue of one volume on this node.
#[derive(Debug)]
pub struct VolumeThrottle {
    group: GroupId,
    queue: ThrottleQueue,
    /// The term in which this node serves the volume and imported the replicated balance;
    /// `None` while it does not serve.
    led_term: Mutex<Option<u64>>,
}

impl VolumeThrottle {
    /// The queue.
    pub fn queue(&self) -> &ThrottleQueue {
        &self.queue
    }

    /// Brings the queue in line with the replicated state: its QoS, and on a node that has just
    /// become the serving leader, the replicated credit balance.
    fn sync(&self, v: &View) {
        let old = self.queue.config();
        if v.qos != old {
            match self.queue.set_config(v.qos) {
                Ok(()) => {
                    // A volume given burst credits (at creation, or later) starts with a full
                    // balance; a change of an existing maximum keeps the balance (clamped).
                    if old.burst_credits == 0 && v.qos.burst_credits > 0 {
                        self.queue.import_state(&QosState {
                            burst_credits: Tokens::from_units(v.qos.burst_credits),
                        });
                    }
                    tracing::info!(group = %self.group, qos = ?v.qos, "throttle reconfigured");
                }
                Err(e) => {
                    tracing::warn!(group = %self.group, qos = ?v.qos, error = %e, "invalid replicated QoS ignored");
                }
            }
        }
        let mut led = lock(&self.led_term);
        if !v.serving {
            *led = None;
        } else if *led != Some(v.term) {
            if let Some(s) = &v.qos_state {
                self.queue.import_state(s);
                tracing::info!(group = %self.group, term = v.term,
                    burst_credits = %s.burst_credits, "leader: resuming the replicated credit balance");
            }
            *led = Some(v.term);
        }
    }

    /// Admits `req` on the serving leader, waiting as long as the volume's limits require.
    pub async fn admit(&self, group: &GroupHandle, req: Request) -> Admitted {
        self.sync(&group.peek(View::of));
        let a = self.queue.admit_request(req).await;
        if !a.waited.is_zero() {
            tracing::trace!(group = %self.group, ops = a.grant.ops, waited = ?a.waited, "request delayed");
        }
        a
    }

    /// Follows `handle`'s status until the group stops: applies QoS changes at once and, while
    /// serving, records a changed credit balance every `interval`.
    pub async fn run(self: Arc<Self>, handle: GroupHandle, interval: Duration) {
        let mut rx = handle.watch();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let view = View::of(&rx.borrow_and_update());
            self.sync(&view);
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tick.tick() => self.record(&handle).await,
            }
        }
    }

    /// On the serving leader: proposes the credit balance when it differs from the replicated
    /// one.
    async fn record(&self, handle: &GroupHandle) {
        let (view, created) = handle.peek(|s| (View::of(s), s.spec.is_some()));
        if !view.serving || !created {
            return;
        }
        self.sync(&view);
        let state = self.queue.export_state();
        if view.qos_state == Some(state) {
            return;
        }
        let propose = handle.propose(EntryHeader::QosState(state), bytes::Bytes::new());
        match tokio::time::timeout(PROPOSE_TIMEOUT, propose).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(group = %self.group, error = %e, "recording the credit balance failed");
            }
            Err(_) => {
                tracing::debug!(group = %self.group, "recording the credit balance timed out");
            }
        }
    }
}

/// The throttling metric families, filled afresh at every scrape.
#[derive(Clone)]
struct Families {
    work: GaugeVec,
    credits: GaugeVec,
    delayed: IntCounterVec,
    delay: CounterVec,
    ops: IntCounterVec,
    bytes: IntCounterVec,
    waiting: IntGaugeVec,
    global_level: Gauge,
    global_saturation: Gauge,
}

impl Families {
    fn new() -> Result<Self, prometheus::Error> {
        let v = ["volume"];
        Ok(Self {
            work: GaugeVec::new(
                Opts::new(
                    "stockade_throttle_work_tokens",
                    "Ops in the volume's work bucket (refills at its baseline --iops); only for volumes with a baseline.",
                ),
                &v,
            )?,
            credits: GaugeVec::new(
                Opts::new(
                    "stockade_throttle_burst_credits",
                    "The volume's burst credit balance in ops.",
                ),
                &v,
            )?,
            delayed: IntCounterVec::new(
                Opts::new(
                    "stockade_throttle_delayed_requests_total",
                    "Requests of the volume admitted later than they arrived.",
                ),
                &v,
            )?,
            delay: CounterVec::new(
                Opts::new(
                    "stockade_throttle_delay_seconds_total",
                    "Total time requests of the volume waited for admission.",
                ),
                &v,
            )?,
            ops: IntCounterVec::new(
                Opts::new(
                    "stockade_throttle_admitted_ops_total",
                    "Ops admitted for the volume (one per started 256 KiB).",
                ),
                &v,
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "stockade_throttle_admitted_bytes_total",
                    "Bytes admitted for the volume.",
                ),
                &v,
            )?,
            waiting: IntGaugeVec::new(
                Opts::new(
                    "stockade_throttle_waiting_requests",
                    "Requests of the volume waiting for admission now.",
                ),
                &v,
            )?,
            global_level: Gauge::new(
                "stockade_throttle_global_level",
                "Ops in the node's global bucket (refills at its capacity-iops); only on a node with a capacity.",
            )?,
            global_saturation: Gauge::new(
                "stockade_throttle_global_saturation",
                "Share of the node's global bucket in use: 0 idle (or no capacity set), 1 empty, up to 2 in debt.",
            )?,
        })
    }

    fn descs(&self) -> Vec<&Desc> {
        let mut d = Vec::new();
        d.extend(self.work.desc());
        d.extend(self.credits.desc());
        d.extend(self.delayed.desc());
        d.extend(self.delay.desc());
        d.extend(self.ops.desc());
        d.extend(self.bytes.desc());
        d.extend(self.waiting.desc());
        d.extend(self.global_level.desc());
        d.extend(self.global_saturation.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut out = Vec::new();
        out.extend(self.work.collect());
        out.extend(self.credits.collect());
        out.extend(self.delayed.collect());
        out.extend(self.delay.collect());
        out.extend(self.ops.collect());
        out.extend(self.bytes.collect());
        out.extend(self.waiting.collect());
        out.extend(self.global_level.collect());
        out.extend(self.global_saturation.collect());
        out
    }
}

/// Reads the node's throttles at scrape time.
struct ThrottleCollector {
    node: Weak<NodeThrottle>,
    template: Families,
}

impl Collector for ThrottleCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.template.descs()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(node) = self.node.upgrade() else {
            return Vec::new();
        };
        let Ok(f) = Families::new() else {
            return Vec::new();
        };
        for (name, s) in node.serving() {
            let l = [name.as_str()];
            if let Some(w) = s.work_tokens {
                f.work.with_label_values(&l).set(w.as_f64());
            }
            f.credits
                .with_label_values(&l)
                .set(s.burst_credits.as_f64());
            f.delayed.with_label_values(&l).inc_by(s.delayed_count);
            f.delay
                .with_label_values(&l)
                .inc_by(s.total_delay.as_secs_f64());
            f.ops.with_label_values(&l).inc_by(s.admitted_ops);
            f.bytes.with_label_values(&l).inc_by(s.admitted_bytes);
            f.waiting
                .with_label_values(&l)
                .set(i64::try_from(s.waiting).unwrap_or(i64::MAX));
        }
        let (level, saturation) = node.global_view();
        f.global_level.set(level.unwrap_or(0.0));
        f.global_saturation.set(saturation);
        let mut out = f.collect();
        if level.is_none() {
            // No capacity: no level to show.
            out.retain(|m| m.name() != "stockade_throttle_global_level");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::clock::ManualClock;

    fn limited(iops: u64, burst_credits: u64) -> QosConfig {
        QosConfig {
            iops: Some(iops),
            burst_iops: Some(iops * 10),
            burst_credits,
            bandwidth: None,
        }
    }

    /// A volume's throttle on a stopped clock (nothing refills), starting unlimited like a
    /// pool group before its volume is bound.
    fn throttle() -> VolumeThrottle {
        let clock = Arc::new(ManualClock::new());
        let node = NodeThrottle::new(GlobalConfig::UNLIMITED, clock.clone()).expect("valid");
        let limiter = VolumeLimiter::new(QosConfig::UNLIMITED, 0).expect("valid");
        VolumeThrottle {
            group: GroupId::random(),
            queue: ThrottleQueue::new(limiter, node.global.clone(), clock, node.bound),
            led_term: Mutex::new(None),
        }
    }

    fn view(serving: bool, term: u64, qos: QosConfig, credits: Option<u64>) -> View {
        View {
            serving,
            term,
            qos,
            qos_state: credits.map(|c| QosState {
                burst_credits: Tokens::from_units(c),
            }),
        }
    }

    fn credits(t: &VolumeThrottle) -> Tokens {
        t.queue.snapshot().burst_credits
    }

    #[test]
    fn a_qos_change_applies_at_once_and_new_credits_start_full() {
        let t = throttle();
        t.sync(&view(false, 1, limited(100, 500), None));
        assert_eq!(t.queue.config(), limited(100, 500));
        assert_eq!(
            credits(&t),
            Tokens::from_units(500),
            "new credits start full"
        );
        // A lower maximum clamps the balance; a higher one keeps it.
        t.sync(&view(false, 1, limited(100, 300), None));
        assert_eq!(credits(&t), Tokens::from_units(300));
        t.sync(&view(false, 1, limited(200, 900), None));
        assert_eq!(t.queue.config(), limited(200, 900));
        assert_eq!(credits(&t), Tokens::from_units(300));
        // An invalid configuration is ignored, never applied.
        let bad = QosConfig {
            burst_iops: Some(1),
            ..limited(200, 900)
        };
        t.sync(&view(false, 1, bad, None));
        assert_eq!(t.queue.config(), limited(200, 900));
    }

    #[test]
    fn a_new_leader_resumes_the_replicated_balance_once_per_term() {
        let t = throttle();
        t.sync(&view(false, 1, limited(100, 1_000), Some(400)));
        assert_eq!(
            credits(&t),
            Tokens::from_units(1_000),
            "a follower keeps its own"
        );
        t.sync(&view(true, 2, limited(100, 1_000), Some(400)));
        assert_eq!(credits(&t), Tokens::from_units(400), "imported on election");
        // Its own records come back through the log: not imported again in the same term.
        t.queue.import_state(&QosState {
            burst_credits: Tokens::from_units(350),
        });
        t.sync(&view(true, 2, limited(100, 1_000), Some(400)));
        assert_eq!(credits(&t), Tokens::from_units(350));
        // Deposed, then elected again: the replicated balance wins again.
        t.sync(&view(false, 3, limited(100, 1_000), Some(600)));
        assert_eq!(credits(&t), Tokens::from_units(350));
        t.sync(&view(true, 4, limited(100, 1_000), Some(600)));
        assert_eq!(credits(&t), Tokens::from_units(600));
        // Never recorded: the balance stays as it is.
        t.sync(&view(true, 5, limited(100, 1_000), None));
        assert_eq!(credits(&t), Tokens::from_units(600));
    }

    fn gathered(r: &Registry) -> HashMap<String, f64> {
        r.gather()
            .iter()
            .filter(|f| f.name().starts_with("stockade_throttle_"))
            .map(|f| {
                let m = &f.get_metric()[0];
                let v = match f.get_field_type() {
                    prometheus::proto::MetricType::GAUGE => m.get_gauge().get_value(),
                    _ => m.get_counter().get_value(),
                };
                (f.name().to_string(), v)
            })
            .collect()
    }

    #[test]
    fn the_node_exports_its_global_bucket_at_scrape_time() {
        let clock = Arc::new(ManualClock::new());
        let cfg = GlobalConfig {
            capacity_iops: Some(1_000),
            ..GlobalConfig::UNLIMITED
        };
        let node = NodeThrottle::new(cfg, clock.clone()).expect("valid");
        let r = Registry::new();
        node.register(&r).expect("registered");
        let m = gathered(&r);
        assert_eq!(m.get("stockade_throttle_global_level"), Some(&1_000.0));
        assert_eq!(m.get("stockade_throttle_global_saturation"), Some(&0.0));
        // No volume served here: no volume series.
        assert_eq!(m.len(), 2, "{m:?}");
        // Charged 250 ops: a quarter saturated, read at the next scrape.
        {
            let mut g = lock(node.global());
            let mut v = VolumeLimiter::new(QosConfig::UNLIMITED, 0).expect("valid");
            let d = v.try_admit(&mut g, 0, &Request::io(250 * common::throttle::OP_SIZE));
            assert!(d.is_admitted());
        }
        let m = gathered(&r);
        assert_eq!(m.get("stockade_throttle_global_level"), Some(&750.0));
        assert_eq!(m.get("stockade_throttle_global_saturation"), Some(&0.25));

        // An unlimited node shows no level and is never saturated.
        let node = NodeThrottle::new(GlobalConfig::UNLIMITED, clock).expect("valid");
        let r = Registry::new();
        node.register(&r).expect("registered");
        let m = gathered(&r);
        assert_eq!(m.get("stockade_throttle_global_level"), None);
        assert_eq!(m.get("stockade_throttle_global_saturation"), Some(&0.0));
    }
}
