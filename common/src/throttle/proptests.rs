//! Property tests: invariants of the limiter over random sequences of time, requests and
//! reconfigurations.

use super::bucket::NANO;
use super::tests::run_node;
use super::*;
use proptest::prelude::*;
use std::time::Duration;

const SEC: u64 = 1_000_000_000;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Step {
    /// Time passes.
    Advance(u64),
    /// A client that waits: tries, sleeps exactly the delay, must then be admitted.
    Admit(Request),
    /// One attempt, no waiting.
    Attempt(Request),
    /// Live change of the volume's QoS.
    Reconfigure(QosConfig),
    /// Live change of the node's configuration.
    ReconfigureNode(GlobalConfig),
    /// A replicated credit balance arrives (in ops; possibly out of range).
    Import(i128),
}

fn qos_config() -> impl Strategy<Value = QosConfig> {
    (
        prop::option::weighted(0.85, 1u64..2_000),
        prop::option::of(0u64..5_000),
        0u64..5_000,
        prop::option::of(4_096u64..64 * MIB),
    )
        .prop_map(|(iops, burst_extra, credits, bandwidth)| match iops {
            None => QosConfig {
                bandwidth,
                ..QosConfig::UNLIMITED
            },
            Some(b) => QosConfig {
                iops: Some(b),
                burst_iops: burst_extra.map(|e| b + e),
                burst_credits: credits,
                bandwidth,
            },
        })
}

fn global_config() -> impl Strategy<Value = GlobalConfig> {
    (
        prop::option::weighted(0.7, 1u64..5_000),
        prop::option::of(1u32..=Discount::ONE_PPM),
    )
        .prop_map(|(capacity_iops, ppm)| GlobalConfig {
            capacity_iops,
            spare_capacity_discount: capacity_iops
                .and(ppm)
                .and_then(|p| Discount::from_ppm(p).ok()),
        })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        4 => (0u64..MIB).prop_map(Request::io),
        2 => (MIB..64 * MIB).prop_map(Request::io),
        1 => Just(Request::flush()),
        1 => (0u64..3_000, 0u64..8 * MIB).prop_map(|(o, b)| Request::new(o, b)),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => prop_oneof![0u64..1_000, 0u64..SEC, 0u64..20 * SEC].prop_map(Step::Advance),
        6 => request().prop_map(Step::Admit),
        2 => request().prop_map(Step::Attempt),
        1 => qos_config().prop_map(Step::Reconfigure),
        1 => global_config().prop_map(Step::ReconfigureNode),
        1 => (-10i128..6_000).prop_map(Step::Import),
    ]
}

/// One admission, for the rate checks.
#[derive(Debug, Clone, Copy)]
struct Record {
    t: u64,
    segment: usize,
    ops: i128,
    bytes: i128,
    from_work: i128,
}

#[derive(Debug)]
struct Sim {
    v: VolumeLimiter,
    g: GlobalBucket,
    now: u64,
    /// Configuration segments: a new one at each reconfiguration.
    segments: Vec<QosConfig>,
    log: Vec<Record>,
    max_ops: i128,
    max_bytes: i128,
}

impl Sim {
    fn record(&mut self, grant: Grant) -> Result<(), TestCaseError> {
        if let Some(last) = self.log.last() {
            prop_assert!(last.t <= self.now, "admission times are monotone");
        }
        let ops = i128::from(grant.ops) * NANO;
        prop_assert_eq!(
            grant.from_work.as_nanos() + grant.above_baseline.as_nanos(),
            ops
        );
        prop_assert!(grant.from_credits.as_nanos() <= grant.above_baseline.as_nanos());
        self.log.push(Record {
            t: self.now,
            segment: self.segments.len() - 1,
            ops,
            bytes: i128::from(grant.bytes) * NANO,
            from_work: grant.from_work.as_nanos(),
        });
        Ok(())
    }

    /// A refused attempt must have taken nothing: the state is what refilling alone gives.
    fn check_untouched(
        &self,
        before: &(VolumeLimiter, GlobalBucket),
        now: u64,
    ) -> Result<(), TestCaseError> {
        let (mut v, mut g) = before.clone();
        v.advance(now);
        g.advance(now);
        prop_assert_eq!(&self.v, &v, "a refusal takes nothing from the volume");
        prop_assert_eq!(&self.g, &g, "a refusal takes nothing from the node");
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match *step {
            Step::Advance(dt) => {
                self.now += dt;
                self.v.advance(self.now);
                self.g.advance(self.now);
            }
            Step::Attempt(req) | Step::Admit(req) => {
                self.max_ops = self.max_ops.max(i128::from(req.ops()) * NANO);
                self.max_bytes = self.max_bytes.max(i128::from(req.bytes()) * NANO);
                let before = (self.v.clone(), self.g.clone());
                match self.v.try_admit(&mut self.g, self.now, &req) {
                    Decision::Admitted(grant) => self.record(grant)?,
                    Decision::Delayed(d) => {
                        self.check_untouched(&before, self.now)?;
                        let d = d.as_nanos() as u64;
                        prop_assert!(d >= 1);
                        // Exact: one nanosecond before the announced time it is 1 ns away...
                        let (mut v, mut g) = (self.v.clone(), self.g.clone());
                        let early = self.now + d - 1;
                        prop_assert_eq!(
                            v.try_admit(&mut g, early, &req),
                            Decision::Delayed(Duration::from_nanos(1))
                        );
                        if matches!(step, Step::Admit(_)) {
                            // ... and at that time it is admitted.
                            self.now += d;
                            match self.v.try_admit(&mut self.g, self.now, &req) {
                                Decision::Admitted(grant) => self.record(grant)?,
                                Decision::Delayed(e) => {
                                    prop_assert!(false, "still delayed by {e:?} after {d} ns")
                                }
                            }
                        }
                    }
                }
            }
            Step::Reconfigure(cfg) => {
                prop_assert!(self.v.set_config(self.now, cfg).is_ok());
                self.segments.push(cfg);
            }
            Step::ReconfigureNode(cfg) => {
                prop_assert!(self.g.set_config(self.now, cfg).is_ok());
                self.segments.push(self.v.config());
            }
            Step::Import(credits) => {
                self.v.import_state(&QosState {
                    burst_credits: Tokens::from_nanos(credits * NANO),
                });
                let max = self.v.max_burst_credits().as_nanos();
                prop_assert_eq!(
                    self.v.burst_credits().as_nanos(),
                    (credits * NANO).clamp(0, max)
                );
            }
        }
        self.check_balances()
    }

    /// Balances never above capacity, debt never beyond one maximal request, credits within
    /// `[0, max]`, the node's level within `[-capacity, capacity]`.
    fn check_balances(&self) -> Result<(), TestCaseError> {
        let v = &self.v;
        let pairs = [
            (v.work_tokens(), v.work_capacity(), self.max_ops),
            (v.peak_tokens(), v.peak_capacity(), self.max_ops),
            (v.bytes_tokens(), v.bytes_capacity(), self.max_bytes),
        ];
        for (level, cap, max) in pairs {
            if let (Some(level), Some(cap)) = (level, cap) {
                prop_assert!(level <= cap, "{level} above capacity {cap}");
                prop_assert!(level.as_nanos() >= -max, "debt {level} beyond one request");
            }
        }
        let credits = v.burst_credits();
        prop_assert!(credits >= Tokens::ZERO, "negative credits {credits}");
        prop_assert!(credits <= v.max_burst_credits());
        if let (Some(level), Some(cap)) = (self.g.level(), self.g.capacity()) {
            prop_assert!(level <= cap);
            prop_assert!(level.as_nanos() >= -cap.as_nanos());
        }
        Ok(())
    }

    /// Over every window [t_i, t_j] inside one configuration, what was admitted fits in what the
    /// buckets can give: rate × length + capacity + one request's debt.
    fn check_rates(&self) -> Result<(), TestCaseError> {
        for (i, first) in self.log.iter().enumerate() {
            let cfg = self.segments[first.segment];
            let (mut ops, mut bytes, mut work) = (0i128, 0i128, 0i128);
            for r in self.log[i..]
                .iter()
                .take_while(|r| r.segment == first.segment)
            {
                ops += r.ops;
                bytes += r.bytes;
                work += r.from_work;
                let t = i128::from(r.t - first.t);
                if let Some(b) = cfg.iops {
                    let cap = i128::from(b) * NANO;
                    let allowance = i128::from(b) * t + cap + self.max_ops;
                    prop_assert!(work <= allowance, "baseline exceeded over {t} ns");
                    if cfg.burst_credits == 0 {
                        prop_assert!(ops <= allowance, "rate B exceeded over {t} ns");
                    }
                    if let Some(p) = cfg.burst_iops {
                        let ceiling = i128::from(p) * t + cap + self.max_ops;
                        prop_assert!(ops <= ceiling, "ceiling P exceeded over {t} ns");
                    }
                }
                if let Some(r) = cfg.bandwidth {
                    let cap = i128::from(r) * NANO;
                    let allowance = i128::from(r) * t + cap + self.max_bytes;
                    prop_assert!(bytes <= allowance, "bandwidth exceeded over {t} ns");
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_over_random_sequences(
        cfg in qos_config(),
        node in global_config(),
        steps in prop::collection::vec(step(), 1..80),
    ) {
        let mut sim = Sim {
            v: VolumeLimiter::new(cfg, 0).expect("generated configurations are valid"),
            g: GlobalBucket::new(node, 0).expect("generated configurations are valid"),
            now: 0,
            segments: vec![cfg],
            log: Vec::new(),
            max_ops: 0,
            max_bytes: 0,
        };
        for s in &steps {
            sim.step(s)?;
        }
        sim.check_rates()?;
    }

    #[test]
    fn every_volume_keeps_its_baseline_on_a_saturated_node(
        b in prop::collection::vec(1u64..300, 2..4),
        extra in prop::collection::vec(0u64..2_000, 4),
        credits in prop::collection::vec(0u64..20_000, 4),
        ppm in prop::option::of(1u32..=Discount::ONE_PPM),
        secs in 1u64..6,
    ) {
        let capacity: u64 = b.iter().sum();
        let cfgs: Vec<QosConfig> = b
            .iter()
            .enumerate()
            .map(|(i, &b)| QosConfig {
                iops: Some(b),
                burst_iops: Some(b + extra[i]),
                burst_credits: credits[i],
                bandwidth: None,
            })
            .collect();
        prop_assert_eq!(check_capacity(Some(capacity), &cfgs), Ok(Some(0)));
        let node = GlobalConfig {
            capacity_iops: Some(capacity),
            spare_capacity_discount: ppm.and_then(|p| Discount::from_ppm(p).ok()),
        };
        let mut g = GlobalBucket::new(node, 0).expect("valid");
        let mut vols: Vec<VolumeLimiter> =
            cfgs.iter().map(|&c| VolumeLimiter::new(c, 0).expect("valid")).collect();
        let times = run_node(&mut vols, &mut g, secs * SEC);
        for (i, t) in times.iter().enumerate() {
            prop_assert!(
                t.len() as u64 >= b[i] + b[i] * secs,
                "volume {} with baseline {} got {} in {} s", i, b[i], t.len(), secs
            );
        }
        // Bursts only use spare capacity: the node admits at most its capacity, plus one second
        // of it at the start (every bucket starts full) and one op per volume in flight.
        let total: u64 = times.iter().map(|t| t.len() as u64).sum();
        prop_assert!(total <= 2 * capacity + capacity * secs + b.len() as u64, "{total}");
    }
}
