//! The per-volume limiter and the per-node global bucket: pure, clock-free state machines.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::bucket::{Bucket, NANO, Tokens, horizon_capacity};
use super::config::{Discount, GlobalConfig, QosConfig, QosError};
use super::cost_ops;

/// One, in parts per million.
const PPM: i128 = Discount::ONE_PPM as i128;

/// What a request costs: ops (for the work, peak and global buckets and the credits) and bytes
/// (for the bytes bucket), and optionally when it arrived, for the delay metrics.
///
/// ```
/// use common::throttle::Request;
/// assert_eq!(Request::io(1 << 20).ops(), 4);
/// assert_eq!(Request::io(1 << 20).bytes(), 1 << 20);
/// assert_eq!((Request::flush().ops(), Request::flush().bytes()), (1, 0));
/// assert_eq!(Request::new(7, 0).arrived_at(42).arrived_ns(), Some(42));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    ops: u64,
    bytes: u64,
    arrived_ns: Option<u64>,
}

impl Request {
    /// A read or write of `len` bytes: [`cost_ops`]`(len)` ops and `len` bytes.
    pub const fn io(len: u64) -> Self {
        Request {
            ops: cost_ops(len),
            bytes: len,
            arrived_ns: None,
        }
    }

    /// A flush: one op, no bytes.
    pub const fn flush() -> Self {
        Self::io(0)
    }

    /// An explicit cost, for requests whose length does not reflect their work (a trim, say).
    pub const fn new(ops: u64, bytes: u64) -> Self {
        Request {
            ops,
            bytes,
            arrived_ns: None,
        }
    }

    /// Records when the request arrived: on admission, a request admitted later than its arrival
    /// counts as delayed, by the difference.
    pub const fn arrived_at(self, now_ns: u64) -> Self {
        Request {
            arrived_ns: Some(now_ns),
            ..self
        }
    }

    /// The cost in ops.
    pub const fn ops(&self) -> u64 {
        self.ops
    }

    /// The cost in bytes.
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }

    /// When it arrived, if recorded.
    pub const fn arrived_ns(&self) -> Option<u64> {
        self.arrived_ns
    }
}

/// The answer to an admission attempt: never an error.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted now; the tokens are taken.
    Admitted(Grant),
    /// Not now: retry after exactly this long (at least 1 ns). Nothing was taken.
    Delayed(Duration),
}

impl Decision {
    /// Whether the request was admitted.
    pub fn is_admitted(&self) -> bool {
        matches!(self, Decision::Admitted(_))
    }

    /// The delay, if not admitted.
    pub fn delay(&self) -> Option<Duration> {
        match self {
            Decision::Admitted(_) => None,
            Decision::Delayed(d) => Some(*d),
        }
    }

    /// The grant, if admitted.
    pub fn grant(&self) -> Option<Grant> {
        match self {
            Decision::Admitted(g) => Some(*g),
            Decision::Delayed(_) => None,
        }
    }
}

/// How an admitted request was paid for. The global bucket is always charged `ops` in full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Grant {
    /// Cost in ops.
    pub ops: u64,
    /// Cost in bytes.
    pub bytes: u64,
    /// The part of the cost the baseline paid (from the work bucket, possibly into debt; all of
    /// it when the baseline is unlimited).
    pub from_work: Tokens,
    /// The rest of the cost, above the baseline.
    pub above_baseline: Tokens,
    /// What the burst credits paid for it: `above_baseline`, discounted when the node has a
    /// spare-capacity discount (rounded up).
    pub from_credits: Tokens,
}

/// The replicated part of a volume's throttling state: its burst credit balance. It survives a
/// leader failover by travelling in the volume's replicated state; the buckets, which hold at
/// most one second, start full on the new leader.
///
/// ```
/// use common::throttle::{QosConfig, QosState, Tokens, VolumeLimiter};
/// let cfg = QosConfig { iops: Some(100), burst_iops: Some(1_000), burst_credits: 5_000, ..QosConfig::UNLIMITED };
/// let state = QosState { burst_credits: Tokens::from_units(1_234) };
/// let bytes = postcard::to_allocvec(&state).unwrap();
/// let restored: QosState = postcard::from_bytes(&bytes).unwrap();
/// let vol = VolumeLimiter::with_state(cfg, &restored, 0).unwrap();
/// assert_eq!(vol.burst_credits(), Tokens::from_units(1_234));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct QosState {
    /// The burst credit balance (billionths of an op).
    pub burst_credits: Tokens,
}

/// The global bucket of one head node: its capacity, shared by every volume it leads, charged
/// the full cost of every admitted request. Bursts are admitted only while it shows spare
/// capacity; baseline I/O is charged but never waits for it.
///
/// ```
/// use common::throttle::{GlobalBucket, GlobalConfig, Tokens};
/// let mut node = GlobalBucket::new(GlobalConfig { capacity_iops: Some(1_000), ..GlobalConfig::UNLIMITED }, 0).unwrap();
/// assert_eq!(node.level(), Some(Tokens::from_units(1_000)));
/// assert_eq!(node.saturation(), Some(0.0));
/// assert!(GlobalBucket::unlimited().level().is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalBucket {
    config: GlobalConfig,
    bucket: Option<Bucket>,
    last_ns: u64,
    charged: u128,
}

impl GlobalBucket {
    /// A full bucket at `now_ns`.
    pub fn new(config: GlobalConfig, now_ns: u64) -> Result<Self, QosError> {
        config.validate()?;
        Ok(GlobalBucket {
            config,
            bucket: config.capacity_iops.map(Bucket::full),
            last_ns: now_ns,
            charged: 0,
        })
    }

    /// A node without a capacity limit (and without discount).
    pub fn unlimited() -> Self {
        GlobalBucket {
            config: GlobalConfig::UNLIMITED,
            bucket: None,
            last_ns: 0,
            charged: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> GlobalConfig {
        self.config
    }

    /// Changes the configuration at `now_ns`, keeping the level (clamped to the new capacity);
    /// a newly limited node starts full. On error nothing changes.
    pub fn set_config(&mut self, now_ns: u64, config: GlobalConfig) -> Result<(), QosError> {
        config.validate()?;
        self.advance(now_ns);
        self.bucket = match (self.bucket.take(), config.capacity_iops) {
            (Some(mut b), Some(rate)) => {
                b.reconfigure(rate, horizon_capacity(rate));
                let floor = -b.capacity();
                if b.level() < floor {
                    b.set_level(floor);
                }
                Some(b)
            }
            (None, Some(rate)) => Some(Bucket::full(rate)),
            (_, None) => None,
        };
        self.config = config;
        Ok(())
    }

    /// Refills up to `now_ns` (an earlier time than a previous one changes nothing).
    pub fn advance(&mut self, now_ns: u64) {
        if now_ns <= self.last_ns {
            return;
        }
        let dt = now_ns - self.last_ns;
        self.last_ns = now_ns;
        if let Some(b) = &mut self.bucket {
            b.refill(dt);
        }
    }

    /// The level as of the last update (`None`: unlimited). Negative when baseline I/O has used
    /// more than the capacity recently; never below minus the capacity.
    pub fn level(&self) -> Option<Tokens> {
        self.bucket.as_ref().map(|b| Tokens::from_nanos(b.level()))
    }

    /// The capacity (`None`: unlimited).
    pub fn capacity(&self) -> Option<Tokens> {
        self.bucket
            .as_ref()
            .map(|b| Tokens::from_nanos(b.capacity()))
    }

    /// How saturated the node is, for metrics: 0 with a full bucket (idle), 1 with an empty one,
    /// up to 2 in debt. `None`: unlimited.
    pub fn saturation(&self) -> Option<f64> {
        self.bucket
            .as_ref()
            .map(|b| 1.0 - b.level() as f64 / b.capacity() as f64)
    }

    /// Everything charged since creation: the full cost of every admitted request.
    pub fn charged_total(&self) -> Tokens {
        Tokens::from_nanos(i128::try_from(self.charged).unwrap_or(i128::MAX))
    }

    /// The time of the last update.
    pub fn last_update_ns(&self) -> u64 {
        self.last_ns
    }

    /// The discount in parts per million (one million: none).
    fn discount_ppm(&self) -> i128 {
        self.config
            .spare_capacity_discount
            .map_or(PPM, |d| i128::from(d.ppm()))
    }

    /// Nanoseconds until the bucket shows spare capacity for a request costing `c`: it holds
    /// `min(c, capacity)` (is full, for a request larger than it).
    fn spare_in(&self, c: i128) -> u64 {
        self.bucket.as_ref().map_or(0, |b| b.admits_in(c))
    }

    /// Charges `c` and returns what was actually taken off the level (less than `c` only at the
    /// floor of minus one capacity).
    fn charge(&mut self, c: i128) -> i128 {
        self.charged = self.charged.saturating_add(c.max(0) as u128);
        let Some(b) = &mut self.bucket else {
            return 0;
        };
        let before = b.level();
        let floor = (-b.capacity()).min(before);
        let after = before.saturating_sub(c).max(floor);
        b.set_level(after);
        before - after
    }

    /// Undoes [`GlobalBucket::charge`].
    fn refund(&mut self, c: i128, taken: i128) {
        self.charged = self.charged.saturating_sub(c.max(0) as u128);
        if let Some(b) = &mut self.bucket {
            b.give(taken);
        }
    }
}

/// How the op tokens of an admissible request are paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// The work bucket pays all of it (into debt for an oversized request on a full bucket).
    Baseline,
    /// The work bucket pays what it holds, the credits `charge` for the rest.
    Burst { from_work: i128, charge: i128 },
}

/// What was taken, to refund exactly.
#[derive(Debug, Clone, Copy)]
struct Taken {
    from_work: i128,
    from_credits: i128,
    global: i128,
}

/// The throttle of one volume: work, peak and bytes buckets and the burst credit balance (see
/// the [module documentation](super) for the model).
///
/// ```
/// use common::throttle::{Decision, GlobalBucket, QosConfig, Request, Tokens, VolumeLimiter};
/// use std::time::Duration;
///
/// let mut node = GlobalBucket::unlimited();
/// let mut vol = VolumeLimiter::new(QosConfig { iops: Some(10), ..QosConfig::UNLIMITED }, 0).unwrap();
/// // A 4 MiB write (16 ops) is larger than the work bucket (10 ops): admitted on a full bucket,
/// // leaving 6 ops of debt, repaid at 10 IOPS before anything else passes.
/// assert!(vol.try_admit(&mut node, 0, &Request::io(4 << 20)).is_admitted());
/// assert_eq!(vol.work_tokens(), Some(Tokens::from_nanos(-6_000_000_000)));
/// assert_eq!(vol.try_admit(&mut node, 0, &Request::flush()), Decision::Delayed(Duration::from_millis(700)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLimiter {
    config: QosConfig,
    work: Option<Bucket>,
    peak: Option<Bucket>,
    bytes: Option<Bucket>,
    credits: i128,
    last_ns: u64,
    delayed: u64,
    total_delay_ns: u64,
    admitted_ops: u64,
    admitted_bytes: u64,
}

impl VolumeLimiter {
    /// A limiter at `now_ns` with full buckets and a full credit balance.
    pub fn new(config: QosConfig, now_ns: u64) -> Result<Self, QosError> {
        config.validate()?;
        let work_capacity = config.iops.map(horizon_capacity);
        Ok(VolumeLimiter {
            config,
            work: config.iops.map(Bucket::full),
            peak: peak_bucket(config, work_capacity),
            bytes: config.bandwidth.map(Bucket::full),
            credits: max_credits(&config),
            last_ns: now_ns,
            delayed: 0,
            total_delay_ns: 0,
            admitted_ops: 0,
            admitted_bytes: 0,
        })
    }

    /// A limiter whose credit balance comes from replicated state (clamped to the maximum).
    pub fn with_state(config: QosConfig, state: &QosState, now_ns: u64) -> Result<Self, QosError> {
        let mut l = Self::new(config, now_ns)?;
        l.import_state(state);
        Ok(l)
    }

    /// The configuration.
    pub fn config(&self) -> QosConfig {
        self.config
    }

    /// Changes rates and capacities at `now_ns` (after refilling at the old rates), keeping every
    /// balance: levels and the credit balance are clamped to the new capacities, debt is kept, a
    /// newly limited dimension starts full. On error nothing changes.
    pub fn set_config(&mut self, now_ns: u64, config: QosConfig) -> Result<(), QosError> {
        config.validate()?;
        self.advance(now_ns);
        let work_capacity = config.iops.map(horizon_capacity);
        self.work = reconfigured(self.work.take(), config.iops, work_capacity);
        self.peak = match (config.iops, config.burst_iops) {
            (Some(_), Some(rate)) => reconfigured(self.peak.take(), Some(rate), work_capacity),
            _ => None,
        };
        self.bytes = reconfigured(
            self.bytes.take(),
            config.bandwidth,
            config.bandwidth.map(horizon_capacity),
        );
        self.config = config;
        self.credits = self.credits.clamp(0, max_credits(&config));
        Ok(())
    }

    /// The state to replicate (the credit balance as of the last update).
    pub fn export_state(&self) -> QosState {
        QosState {
            burst_credits: Tokens::from_nanos(self.credits),
        }
    }

    /// Replaces the credit balance with a replicated one, clamped to `[0, burst_credits]`.
    pub fn import_state(&mut self, state: &QosState) {
        self.credits = state
            .burst_credits
            .as_nanos()
            .clamp(0, max_credits(&self.config));
    }

    /// Refills every bucket up to `now_ns`; refill that does not fit in the work bucket becomes
    /// burst credit. An earlier time than a previous one changes nothing.
    pub fn advance(&mut self, now_ns: u64) {
        if now_ns <= self.last_ns {
            return;
        }
        let dt = now_ns - self.last_ns;
        self.last_ns = now_ns;
        if let Some(w) = &mut self.work {
            let unused = w.refill(dt);
            self.credits = self
                .credits
                .saturating_add(unused)
                .min(max_credits(&self.config));
        }
        if let Some(p) = &mut self.peak {
            p.refill(dt);
        }
        if let Some(b) = &mut self.bytes {
            b.refill(dt);
        }
    }

    /// Tries to admit `req` at `now_ns` against this volume and its node's `global` bucket.
    ///
    /// Admitted: every bucket is charged (see the [module documentation](super) for the rules)
    /// and the [`Grant`] says how. Otherwise nothing is charged (op tokens taken before a bytes
    /// refusal are refunded exactly) and [`Decision::Delayed`] gives the exact time, from
    /// `now_ns`, until the request can be admitted, provided no other volume takes global tokens
    /// meanwhile (then the retry gets a new delay). `now_ns` earlier than a previous call counts
    /// as that previous time.
    pub fn try_admit(&mut self, global: &mut GlobalBucket, now_ns: u64, req: &Request) -> Decision {
        self.advance(now_ns);
        global.advance(now_ns);
        let now = self.last_ns.max(now_ns);
        let behind = now - now_ns;
        let c = i128::from(req.ops) * NANO;
        let n = i128::from(req.bytes) * NANO;
        let bytes_wait = self.bytes.as_ref().map_or(0, |b| b.admits_in(n));
        let plan = match self.plan(global, c) {
            Ok(plan) => plan,
            Err(ops_wait) => return delayed(ops_wait.max(bytes_wait), behind),
        };
        // The op tokens are taken first; the bytes bucket is asked next and, if it refuses, the
        // op tokens just taken go back.
        let taken = self.take_ops(global, c, plan);
        if bytes_wait > 0 {
            self.refund_ops(global, c, taken);
            return delayed(bytes_wait, behind);
        }
        if let Some(b) = &mut self.bytes {
            b.take(n);
        }
        if let Some(arrived) = req.arrived_ns
            && now > arrived
        {
            self.delayed = self.delayed.saturating_add(1);
            self.total_delay_ns = self.total_delay_ns.saturating_add(now - arrived);
        }
        self.admitted_ops = self.admitted_ops.saturating_add(req.ops);
        self.admitted_bytes = self.admitted_bytes.saturating_add(req.bytes);
        Decision::Admitted(Grant {
            ops: req.ops,
            bytes: req.bytes,
            from_work: Tokens::from_nanos(taken.from_work),
            above_baseline: Tokens::from_nanos(c - taken.from_work),
            from_credits: Tokens::from_nanos(taken.from_credits),
        })
    }

    /// How the op tokens of a request costing `c` can be paid now, or the nanoseconds until they
    /// can: the peak bucket must allow it, then either the baseline path or the burst path.
    fn plan(&self, global: &GlobalBucket, c: i128) -> Result<Plan, u64> {
        let peak_wait = self.peak.as_ref().map_or(0, |p| p.admits_in(c));
        let Some(work) = &self.work else {
            // Unlimited baseline (and therefore no peak bucket): free.
            return Ok(Plan::Baseline);
        };
        let baseline_wait = work.admits_in(c);
        let burst_wait = self.burst_wait(work, global, c);
        let wait = baseline_wait.min(burst_wait).max(peak_wait);
        if wait > 0 {
            return Err(wait);
        }
        let w = work.level();
        if w >= c || burst_wait > 0 {
            // The bucket pays all of it, or it is full and the request is larger than it.
            Ok(Plan::Baseline)
        } else {
            let rest = c - w;
            let charge = rest
                .saturating_mul(global.discount_ppm())
                .saturating_add(PPM - 1)
                / PPM;
            Ok(Plan::Burst {
                from_work: w,
                charge,
            })
        }
    }

    /// Nanoseconds until the burst path opens for a request costing `c`, `u64::MAX` if it is
    /// never better than the baseline path.
    ///
    /// The path needs the work bucket out of debt, credits paying the rest in full, and spare
    /// capacity on the node. Credits k pay a rest r when `ceil(r × ppm / 1e6) ≤ k`, that is
    /// when `r ≤ floor(k × 1e6 / ppm)`: the work bucket must reach `c − that`. While it is below
    /// its capacity the credits do not change (they only earn the work bucket's overflow), so the
    /// answer is exact.
    fn burst_wait(&self, work: &Bucket, global: &GlobalBucket, c: i128) -> u64 {
        if self.credits <= 0 || c <= 0 {
            return u64::MAX;
        }
        let cover = self.credits.saturating_mul(PPM) / global.discount_ppm();
        let threshold = c.saturating_sub(cover).max(0);
        if threshold >= c.min(work.capacity()) {
            return u64::MAX;
        }
        work.ready_in(threshold).max(global.spare_in(c))
    }

    fn take_ops(&mut self, global: &mut GlobalBucket, c: i128, plan: Plan) -> Taken {
        let (from_work, from_credits) = match plan {
            Plan::Baseline => (c, 0),
            Plan::Burst { from_work, charge } => (from_work, charge),
        };
        if let Some(w) = &mut self.work {
            w.take(from_work);
        }
        self.credits -= from_credits;
        if let Some(p) = &mut self.peak {
            p.take(c);
        }
        let global = global.charge(c);
        Taken {
            from_work,
            from_credits,
            global,
        }
    }

    fn refund_ops(&mut self, global: &mut GlobalBucket, c: i128, taken: Taken) {
        if let Some(w) = &mut self.work {
            w.give(taken.from_work);
        }
        self.credits += taken.from_credits;
        if let Some(p) = &mut self.peak {
            p.give(c);
        }
        global.refund(c, taken.global);
    }

    /// Work tokens (ops) as of the last update; `None`: unlimited baseline.
    pub fn work_tokens(&self) -> Option<Tokens> {
        self.work.as_ref().map(|b| Tokens::from_nanos(b.level()))
    }

    /// The work bucket's capacity: one second of baseline.
    pub fn work_capacity(&self) -> Option<Tokens> {
        self.work.as_ref().map(|b| Tokens::from_nanos(b.capacity()))
    }

    /// The burst credit balance (ops) as of the last update.
    pub fn burst_credits(&self) -> Tokens {
        Tokens::from_nanos(self.credits)
    }

    /// The maximum credit balance.
    pub fn max_burst_credits(&self) -> Tokens {
        Tokens::from_nanos(max_credits(&self.config))
    }

    /// Peak tokens (ops) as of the last update; `None`: no burst ceiling.
    pub fn peak_tokens(&self) -> Option<Tokens> {
        self.peak.as_ref().map(|b| Tokens::from_nanos(b.level()))
    }

    /// The peak bucket's capacity (the work bucket's).
    pub fn peak_capacity(&self) -> Option<Tokens> {
        self.peak.as_ref().map(|b| Tokens::from_nanos(b.capacity()))
    }

    /// Bytes tokens as of the last update; `None`: unlimited bandwidth.
    pub fn bytes_tokens(&self) -> Option<Tokens> {
        self.bytes.as_ref().map(|b| Tokens::from_nanos(b.level()))
    }

    /// The bytes bucket's capacity: one second of bandwidth.
    pub fn bytes_capacity(&self) -> Option<Tokens> {
        self.bytes
            .as_ref()
            .map(|b| Tokens::from_nanos(b.capacity()))
    }

    /// Requests admitted later than their recorded arrival.
    pub fn delayed_count(&self) -> u64 {
        self.delayed
    }

    /// Total time those requests waited.
    pub fn total_delay(&self) -> Duration {
        Duration::from_nanos(self.total_delay_ns)
    }

    /// Ops admitted since creation.
    pub fn admitted_ops(&self) -> u64 {
        self.admitted_ops
    }

    /// Bytes admitted since creation.
    pub fn admitted_bytes(&self) -> u64 {
        self.admitted_bytes
    }

    /// The time of the last update.
    pub fn last_update_ns(&self) -> u64 {
        self.last_ns
    }
}

fn max_credits(config: &QosConfig) -> i128 {
    i128::from(config.burst_credits) * NANO
}

fn peak_bucket(config: QosConfig, work_capacity: Option<i128>) -> Option<Bucket> {
    match (config.burst_iops, work_capacity) {
        (Some(rate), Some(capacity)) => Some(Bucket::full_with_capacity(rate, capacity)),
        _ => None,
    }
}

fn reconfigured(old: Option<Bucket>, rate: Option<u64>, capacity: Option<i128>) -> Option<Bucket> {
    match (old, rate, capacity) {
        (Some(mut b), Some(rate), Some(capacity)) => {
            b.reconfigure(rate, capacity);
            Some(b)
        }
        (None, Some(rate), Some(capacity)) => Some(Bucket::full_with_capacity(rate, capacity)),
        _ => None,
    }
}

fn delayed(wait_ns: u64, behind_ns: u64) -> Decision {
    Decision::Delayed(Duration::from_nanos(
        wait_ns.max(1).saturating_add(behind_ns),
    ))
}
