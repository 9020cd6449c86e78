//! Scenario tests of the pure limiter, on explicit nanosecond times (a fake clock).

use super::bucket::NANO;
use super::*;
use std::time::Duration;

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const MIB: u64 = 1 << 20;

fn ops(n: i128) -> Tokens {
    Tokens::from_nanos(n * NANO)
}

fn qos(iops: u64, burst_iops: Option<u64>, burst_credits: u64) -> QosConfig {
    QosConfig {
        iops: Some(iops),
        burst_iops,
        burst_credits,
        bandwidth: None,
    }
}

fn limiter(cfg: QosConfig) -> VolumeLimiter {
    VolumeLimiter::new(cfg, 0).expect("valid test configuration")
}

fn node(capacity: u64, discount: Option<f64>) -> GlobalBucket {
    GlobalBucket::new(
        GlobalConfig {
            capacity_iops: Some(capacity),
            spare_capacity_discount: discount.map(|f| Discount::new(f).expect("valid discount")),
        },
        0,
    )
    .expect("valid node configuration")
}

fn admit(v: &mut VolumeLimiter, g: &mut GlobalBucket, now: u64, req: Request) -> Grant {
    match v.try_admit(g, now, &req) {
        Decision::Admitted(grant) => grant,
        Decision::Delayed(d) => panic!("{req:?} delayed by {d:?} at {now}"),
    }
}

fn delay(v: &mut VolumeLimiter, g: &mut GlobalBucket, now: u64, req: Request) -> u64 {
    match v.try_admit(g, now, &req) {
        Decision::Admitted(grant) => panic!("{req:?} admitted at {now}: {grant:?}"),
        Decision::Delayed(d) => d.as_nanos() as u64,
    }
}

/// A saturating client: issues `req` back to back, each at the exact time the limiter allows,
/// from `from` until `until` inclusive; returns the admission times.
fn saturate(
    v: &mut VolumeLimiter,
    g: &mut GlobalBucket,
    from: u64,
    until: u64,
    req: Request,
) -> Vec<u64> {
    let mut now = from;
    let mut times = Vec::new();
    loop {
        match v.try_admit(g, now, &req) {
            Decision::Admitted(_) => times.push(now),
            Decision::Delayed(d) => {
                assert!(!d.is_zero());
                now = now.saturating_add(d.as_nanos() as u64);
                if now > until {
                    return times;
                }
            }
        }
    }
}

fn count_in(times: &[u64], from: u64, until: u64) -> u64 {
    times.iter().filter(|&&t| t >= from && t <= until).count() as u64
}

#[test]
fn baseline_only_admits_exactly_b_per_second() {
    for (b, secs) in [(100u64, 60u64), (3, 60), (1_000, 10), (7, 13)] {
        let mut v = limiter(qos(b, None, 0));
        let mut g = GlobalBucket::unlimited();
        let times = saturate(&mut v, &mut g, 0, secs * SEC, Request::io(4096));
        // One second of baseline at once (the full work bucket), then exactly B per second.
        assert_eq!(times.len() as u64, b + b * secs, "B={b}");
        assert!(times[..b as usize].iter().all(|&t| t == 0));
        for (k, &t) in times[b as usize..].iter().enumerate() {
            assert_eq!(t, ((k as u64 + 1) * SEC).div_ceil(b), "B={b}, op {k}");
        }
        // Any one-second window after the start holds B admissions, give or take the phase.
        for start in [SEC / 3, 2 * SEC, (secs - 2) * SEC + 1] {
            let n = count_in(&times, start, start + SEC - 1);
            assert!(n.abs_diff(b) <= 1, "B={b}: {n} in a second");
        }
        assert_eq!(v.burst_credits(), Tokens::ZERO);
        assert_eq!(v.admitted_ops(), times.len() as u64);
    }
}

#[test]
fn idle_volume_earns_min_of_max_and_credits_plus_b_t() {
    let b = 100;
    let max = 10_000;
    for start in [0i128, 2_500, 10_000] {
        let mut v = limiter(qos(b, Some(1_000), max));
        v.import_state(&QosState {
            burst_credits: ops(start),
        });
        for t in [
            0,
            1,
            SEC,
            12_345_678_901,
            30 * SEC,
            75 * SEC,
            100 * SEC,
            1_000 * SEC,
        ] {
            let mut idle = v.clone();
            idle.advance(t);
            // B ops per second is B billionths of an op per nanosecond.
            let earned = i128::from(b) * i128::from(t);
            let expect = (start * NANO + earned).min(i128::from(max) * NANO);
            assert_eq!(
                idle.burst_credits().as_nanos(),
                expect,
                "start {start}, t {t}"
            );
            assert_eq!(idle.work_tokens(), Some(ops(b.into())));
        }
    }
    // With a partly used work bucket, the refill tops the bucket up first: unused baseline only
    // becomes credit once the work bucket is full.
    let mut v = limiter(qos(b, Some(1_000), max));
    v.import_state(&QosState::default());
    let mut g = GlobalBucket::unlimited();
    admit(&mut v, &mut g, 0, Request::new(40, 0));
    v.advance(10 * SEC);
    assert_eq!(v.burst_credits(), ops(1_000 - 40));
}

#[test]
fn saturating_load_runs_at_p_for_c_over_p_minus_b_seconds_then_at_b() {
    for (b, p, c) in [
        (100u64, 400u64, 30_000u64),
        (7, 29, 1_000),
        (300, 3_000, 54_000),
    ] {
        let mut v = limiter(qos(b, Some(p), c));
        let mut g = GlobalBucket::unlimited();
        // The burst ends when the credits are gone: C / (P − B) seconds.
        let t_star = (c * SEC).div_ceil(p - b);
        let end = t_star + 30 * SEC;
        let times = saturate(&mut v, &mut g, 0, end, Request::io(4096));

        let fast_gap = SEC.div_ceil(p);
        let transition = times
            .windows(2)
            .rev()
            .find(|w| w[1] - w[0] <= fast_gap)
            .map(|w| w[1])
            .expect("a burst");
        assert!(
            transition.abs_diff(t_star) <= fast_gap,
            "B={b} P={p} C={c}: transition at {transition} ns, expected {t_star} ns ± {fast_gap}"
        );
        // At P during the burst (after the initial full bucket), at B after it.
        let burst = count_in(&times, SEC, transition - SEC);
        let expect = p * (transition - 2 * SEC) / SEC;
        assert!(burst.abs_diff(expect) <= 1, "{burst} vs {expect}");
        let after = count_in(&times, transition + SEC, end);
        let expect = b * (end - transition - SEC) / SEC;
        assert!(after.abs_diff(expect) <= 1, "{after} vs {expect}");
        // Every credit was spent, and only credits paid above the baseline.
        assert!(v.burst_credits() < ops(1));
        let total = times.len() as u64;
        let baseline = b + b * end / SEC;
        assert!(
            (total - baseline).abs_diff(c) <= 2,
            "{total} vs {baseline} + {c}"
        );
    }
}

#[test]
fn the_global_bucket_is_always_charged_the_full_cost() {
    let cfg = QosConfig {
        bandwidth: Some(100 * MIB),
        ..qos(100, Some(1_000), 1_000)
    };
    for discount in [None, Some(0.5)] {
        let mut v = limiter(cfg);
        let mut g = node(10_000, discount);
        // Baseline path.
        let grant = admit(&mut v, &mut g, 0, Request::io(MIB));
        assert_eq!((grant.from_work, grant.above_baseline), (ops(4), ops(0)));
        assert_eq!(g.level(), Some(ops(10_000 - 4)));
        admit(&mut v, &mut g, 0, Request::new(96, 0));
        assert_eq!(g.level(), Some(ops(10_000 - 100)));
        // Burst path, 4 ms later (4 ops at the 1000 IOPS ceiling): the work bucket has 0.4 op,
        // the credits pay the rest (or half of it with the discount); the node is charged all 4
        // ops all the same.
        let grant = admit(&mut v, &mut g, 4 * MS, Request::io(MIB));
        let rest = 4 * NANO - 4 * NANO / 10;
        assert_eq!(grant.from_work, Tokens::from_nanos(4 * NANO / 10));
        assert_eq!(grant.above_baseline, Tokens::from_nanos(rest));
        let factor = if discount.is_some() { 2 } else { 1 };
        assert_eq!(grant.from_credits, Tokens::from_nanos(rest / factor));
        assert_eq!(g.level(), Some(ops(10_000 - 100 + 40 - 4)));
        // Oversized, on a full work bucket.
        let grant = admit(&mut v, &mut g, 2 * SEC, Request::io(64 * MIB));
        assert_eq!(grant.ops, 256);
        assert_eq!(g.charged_total(), ops(4 + 96 + 4 + 256));
    }
    // An unlimited volume is free for itself, not for its node.
    let mut v = limiter(QosConfig::UNLIMITED);
    let mut g = node(1_000, None);
    admit(&mut v, &mut g, 0, Request::io(8 * MIB));
    assert_eq!(g.level(), Some(ops(1_000 - 32)));
    assert_eq!(v.work_tokens(), None);
}

#[test]
fn a_1_mib_io_costs_4_ops_and_a_flush_1() {
    assert_eq!(cost_ops(MIB), 4);
    assert_eq!(cost_ops(MIB + 1), 5);
    assert_eq!(cost_ops(4096), 1);
    assert_eq!(cost_ops(0), 1);
    assert_eq!(cost_ops(u64::MAX), u64::MAX.div_ceil(OP_SIZE));
    let cfg = QosConfig {
        bandwidth: Some(10 * MIB),
        ..qos(100, None, 0)
    };
    let mut v = limiter(cfg);
    let mut g = GlobalBucket::unlimited();
    let grant = admit(&mut v, &mut g, 0, Request::io(MIB));
    assert_eq!((grant.ops, grant.bytes), (4, MIB));
    assert_eq!(v.work_tokens(), Some(ops(96)));
    assert_eq!(v.bytes_tokens(), Some(ops(9 * i128::from(MIB))));
    admit(&mut v, &mut g, 0, Request::flush());
    assert_eq!(v.work_tokens(), Some(ops(95)));
    assert_eq!(v.bytes_tokens(), Some(ops(9 * i128::from(MIB))));
}

#[test]
fn a_bytes_refusal_refunds_the_op_tokens() {
    let cfg = QosConfig {
        bandwidth: Some(MIB),
        ..qos(100, Some(400), 1_000)
    };
    let mut v = limiter(cfg);
    let mut g = node(1_000, Some(0.5));
    admit(&mut v, &mut g, 0, Request::io(MIB));
    assert_eq!(v.bytes_tokens(), Some(ops(0)));

    // Baseline path: the ops are there, the bytes are not.
    let before = (v.clone(), g.clone());
    let d = delay(&mut v, &mut g, 0, Request::io(4096));
    assert_eq!(
        d,
        4096 * SEC / MIB,
        "exactly the time for 4096 bytes at 1 MiB/s"
    );
    assert_eq!((v.clone(), g.clone()), before, "nothing taken");
    assert_eq!(v.work_tokens(), Some(ops(96)));
    assert_eq!(g.charged_total(), ops(4));
    admit(&mut v, &mut g, d, Request::io(4096));

    // Burst path: the work bucket is empty, credits would pay; the bytes refuse.
    let mut v = limiter(cfg);
    let mut g = node(1_000, Some(0.5));
    admit(&mut v, &mut g, 0, Request::io(MIB));
    admit(&mut v, &mut g, 0, Request::new(96, 0));
    let t = 2_500_000; // one op at 400 IOPS; 2621.44 bytes at 1 MiB/s
    let mut before = (v.clone(), g.clone());
    before.0.advance(t);
    before.1.advance(t);
    let d = delay(&mut v, &mut g, t, Request::io(4096));
    assert_eq!(d, 1_406_250);
    assert_eq!(
        (v.clone(), g.clone()),
        before,
        "work, credits, peak, node unchanged"
    );
    assert_eq!(v.work_tokens(), Some(Tokens::from_nanos(NANO / 4)));
    assert_eq!(v.burst_credits(), ops(1_000));
    let grant = admit(&mut v, &mut g, t + d, Request::io(4096));
    assert!(grant.from_credits > Tokens::ZERO);
}

/// Two volumes saturating one node whose capacity is the sum of their baselines: a simulation in
/// time order, each volume retrying at its exact ready time.
pub(super) fn run_node(
    vols: &mut [VolumeLimiter],
    g: &mut GlobalBucket,
    until: u64,
) -> Vec<Vec<u64>> {
    let mut next = vec![0u64; vols.len()];
    let mut times = vec![Vec::new(); vols.len()];
    loop {
        let (i, &now) = next
            .iter()
            .enumerate()
            .min_by_key(|&(i, t)| (*t, i))
            .expect("volumes");
        if now > until {
            return times;
        }
        match vols[i].try_admit(g, now, &Request::io(4096)) {
            Decision::Admitted(_) => times[i].push(now),
            Decision::Delayed(d) => next[i] = now + d.as_nanos() as u64,
        }
    }
}

#[test]
fn a_saturated_host_still_gives_every_volume_its_baseline() {
    let secs = 60;
    for discount in [None, Some(0.5)] {
        let bursty = qos(100, Some(1_000), 100_000);
        let steady = qos(200, None, 0);
        assert_eq!(check_capacity(Some(300), &[bursty, steady]), Ok(Some(0)));
        let mut g = node(300, discount);
        let mut vols = [limiter(bursty), limiter(steady)];
        let times = run_node(&mut vols, &mut g, secs * SEC);
        // The steady volume gets exactly its baseline, the bursting one at least its own...
        assert_eq!(times[1].len() as u64, 200 + 200 * secs);
        assert!(times[0].len() as u64 >= 100 + 100 * secs);
        // ... and its burst is limited to the node's spare capacity: next to nothing.
        assert!(
            times[0].len() as u64 <= 100 + 100 * secs + 10,
            "{}",
            times[0].len()
        );
        assert!(vols[0].burst_credits() > ops(99_900));
    }
    // With an idle neighbour the same volume bursts into the spare capacity: the node's 300 IOPS,
    // not its 1000 IOPS ceiling.
    let mut g = node(300, None);
    let mut vols = [limiter(qos(100, Some(1_000), 100_000))];
    let times = run_node(&mut vols, &mut g, 10 * SEC);
    let n = count_in(&times[0], 2 * SEC, 10 * SEC - 1);
    assert!(n.abs_diff(300 * 8) <= 3, "{n}");
}

#[test]
fn with_the_discount_an_idle_host_lets_a_volume_exceed_its_allowance() {
    let (b, p, c) = (100u64, 1_000u64, 900u64);
    let secs = 20;
    let mut above = Vec::new();
    for (discount, factor) in [(None, 1u64), (Some(0.5), 2), (Some(0.25), 4)] {
        let mut v = limiter(qos(b, Some(p), c));
        let mut g = node(100_000, discount);
        let times = saturate(&mut v, &mut g, 0, secs * SEC, Request::io(4096));
        let extra = times.len() as u64 - (b + b * secs);
        // Every credit buys 1/f ops above the baseline...
        assert!(extra.abs_diff(c * factor) <= 1, "f=1/{factor}: {extra}");
        // ... at the same ceiling P, for 1/f as long: C / ((P − B) × f) seconds.
        let t_star = c * factor * SEC / (p - b);
        let gap = SEC.div_ceil(p);
        let last_fast = times
            .windows(2)
            .rev()
            .find(|w| w[1] - w[0] <= gap)
            .map(|w| w[1])
            .expect("a burst");
        assert!(last_fast.abs_diff(t_star) <= gap, "{last_fast} vs {t_star}");
        above.push(extra);
    }
    assert!(above[1] > above[0] && above[2] > above[1]);
}

#[test]
fn an_oversized_io_goes_into_debt_repaid_before_the_next_admission() {
    let mut v = limiter(qos(10, None, 0));
    let mut g = GlobalBucket::unlimited();
    // 64 MiB = 256 ops on a 10-op work bucket: admitted because the bucket is full.
    admit(&mut v, &mut g, 0, Request::io(64 * MIB));
    assert_eq!(v.work_tokens(), Some(ops(10 - 256)));
    // Anything next waits for the debt plus its own cost: (246 + 1) / 10 s.
    assert_eq!(delay(&mut v, &mut g, 0, Request::flush()), 24_700 * MS);
    // Oversized requests back to back never deadlock: each waits for a full bucket.
    let times = saturate(&mut v, &mut g, 0, 200 * SEC, Request::io(64 * MIB));
    let expect: Vec<u64> = (1..=7).map(|k| k * 25_600 * MS).collect();
    assert_eq!(times, expect);

    // The same for bandwidth: 8 MiB at 1 MiB/s.
    let cfg = QosConfig {
        bandwidth: Some(MIB),
        ..QosConfig::UNLIMITED
    };
    let mut v = limiter(cfg);
    admit(&mut v, &mut g, 0, Request::io(8 * MIB));
    assert_eq!(v.bytes_tokens(), Some(ops(-7 * i128::from(MIB))));
    assert_eq!(
        delay(&mut v, &mut g, 0, Request::io(4096)),
        (7 * MIB + 4096) * SEC / MIB
    );
    // A flush carries no bytes but still waits for the debt to be repaid.
    assert_eq!(delay(&mut v, &mut g, 0, Request::flush()), 7 * SEC);

    // And for the peak bucket: credits pay an oversized burst, the ceiling's debt comes first.
    let mut v = limiter(qos(10, Some(20), 1_000));
    let grant = admit(&mut v, &mut g, 0, Request::io(64 * MIB));
    assert_eq!((grant.from_work, grant.from_credits), (ops(10), ops(246)));
    assert_eq!(v.peak_tokens(), Some(ops(10 - 256)));
    assert_eq!(delay(&mut v, &mut g, 0, Request::flush()), 12_350 * MS);
}

#[test]
fn reconfiguration_keeps_the_credit_balance() {
    let mut v = limiter(qos(100, Some(1_000), 5_000));
    let mut g = GlobalBucket::unlimited();
    let grant = admit(&mut v, &mut g, 0, Request::new(1_100, 0));
    assert_eq!(grant.from_credits, ops(1_000));
    assert_eq!(v.burst_credits(), ops(4_000));

    v.set_config(0, qos(200, Some(2_000), 8_000)).unwrap();
    assert_eq!(v.burst_credits(), ops(4_000), "kept");
    assert_eq!(v.work_tokens(), Some(ops(0)));
    assert_eq!(v.peak_tokens(), Some(ops(100 - 1_100)), "debt kept");
    assert_eq!(v.work_capacity(), Some(ops(200)));

    v.set_config(0, qos(200, Some(2_000), 2_000)).unwrap();
    assert_eq!(v.burst_credits(), ops(2_000), "clamped to the new maximum");

    let before = v.clone();
    assert_eq!(
        v.set_config(SEC, qos(200, Some(100), 2_000)),
        Err(QosError::BurstBelowBaseline {
            iops: 200,
            burst_iops: 100
        })
    );
    assert_eq!(v, before, "an invalid change changes nothing");

    // Refill up to the change happens at the old rates.
    v.set_config(SEC / 2, qos(1_000, None, 2_000)).unwrap();
    assert_eq!(v.work_tokens(), Some(ops(100)));
    assert_eq!(v.peak_tokens(), None);
    v.advance(SEC);
    assert_eq!(v.work_tokens(), Some(ops(600)));

    // Shrinking clamps the work bucket; adding bandwidth starts full.
    v.set_config(
        SEC,
        QosConfig {
            bandwidth: Some(MIB),
            ..qos(10, None, 2_000)
        },
    )
    .unwrap();
    assert_eq!(v.work_tokens(), Some(ops(10)));
    assert_eq!(v.bytes_tokens(), Some(ops(i128::from(MIB))));
    assert_eq!(v.burst_credits(), ops(2_000));

    // Without burst credits the balance is gone; without a baseline, everything is free.
    v.set_config(SEC, qos(10, None, 0)).unwrap();
    assert_eq!(v.burst_credits(), ops(0));
    v.set_config(SEC, QosConfig::UNLIMITED).unwrap();
    assert_eq!((v.work_tokens(), v.bytes_tokens()), (None, None));
    admit(&mut v, &mut g, SEC, Request::io(1 << 40));
}

#[test]
fn the_credit_balance_exports_and_imports() {
    let cfg = qos(100, Some(1_000), 5_000);
    let mut v = limiter(cfg);
    let mut g = GlobalBucket::unlimited();
    admit(&mut v, &mut g, 0, Request::new(1_100, 0));
    let state = v.export_state();
    assert_eq!(state.burst_credits, ops(4_000));

    let json = serde_json::to_string(&state).unwrap();
    assert_eq!(json, r#"{"burst_credits":4000000000000}"#);
    assert_eq!(serde_json::from_str::<QosState>(&json).unwrap(), state);
    let bin = postcard::to_allocvec(&state).unwrap();
    assert_eq!(postcard::from_bytes::<QosState>(&bin).unwrap(), state);

    // A new leader restores the balance.
    let restored = VolumeLimiter::with_state(cfg, &state, 77 * SEC).unwrap();
    assert_eq!(restored.burst_credits(), ops(4_000));
    // Out-of-range balances are clamped, never trusted.
    let mut w = limiter(cfg);
    w.import_state(&QosState {
        burst_credits: ops(1_000_000),
    });
    assert_eq!(w.burst_credits(), ops(5_000));
    w.import_state(&QosState {
        burst_credits: ops(-5),
    });
    assert_eq!(w.burst_credits(), ops(0));
}

#[test]
fn unlimited_dimensions_cost_nothing() {
    let mut v = limiter(QosConfig::UNLIMITED);
    let mut g = GlobalBucket::unlimited();
    for _ in 0..10_000 {
        admit(&mut v, &mut g, 0, Request::io(1 << 30));
    }
    assert_eq!(v.admitted_bytes(), 10_000 << 30);
    // A limited node still counts and floors its level at minus one capacity, and baseline
    // I/O never waits for it.
    let mut g = node(100, None);
    for _ in 0..100 {
        admit(&mut v, &mut g, 0, Request::io(MIB));
    }
    assert_eq!(g.charged_total(), ops(400));
    assert_eq!(g.level(), Some(ops(-100)));
    assert_eq!(g.saturation(), Some(2.0));
}

#[test]
fn delays_are_measured_from_arrival() {
    let mut v = limiter(qos(10, None, 0));
    let mut g = GlobalBucket::unlimited();
    admit(&mut v, &mut g, 0, Request::new(10, 0).arrived_at(0));
    assert_eq!(v.delayed_count(), 0);
    let req = Request::flush().arrived_at(0);
    assert_eq!(delay(&mut v, &mut g, 0, req), 100 * MS);
    admit(&mut v, &mut g, 100 * MS, req);
    admit(
        &mut v,
        &mut g,
        300 * MS,
        Request::flush().arrived_at(150 * MS),
    );
    assert_eq!(v.delayed_count(), 2);
    assert_eq!(v.total_delay(), Duration::from_millis(250));
}

#[test]
fn time_going_backwards_is_harmless() {
    let mut v = limiter(qos(10, None, 0));
    let mut g = node(100, None);
    admit(&mut v, &mut g, SEC, Request::new(10, 0));
    // A caller with a stale clock reading is told the delay from its own reading.
    assert_eq!(delay(&mut v, &mut g, SEC / 2, Request::flush()), 600 * MS);
    assert_eq!(v.last_update_ns(), SEC);
    assert_eq!(v.work_tokens(), Some(ops(0)));
}

#[test]
fn invalid_configurations_are_clear_errors() {
    let cases = [
        (
            QosConfig {
                iops: Some(0),
                ..QosConfig::UNLIMITED
            },
            "iops must be at least 1; leave it unset for unlimited",
        ),
        (
            QosConfig {
                bandwidth: Some(0),
                ..QosConfig::UNLIMITED
            },
            "bandwidth must be at least 1; leave it unset for unlimited",
        ),
        (
            QosConfig {
                burst_credits: 5,
                ..QosConfig::UNLIMITED
            },
            "burst_iops and burst_credits need a baseline: set iops too (without it the volume is unlimited)",
        ),
        (
            qos(10, Some(9), 0),
            "burst_iops (9) is below iops (10): the burst ceiling must be at least the baseline",
        ),
        (
            qos(10, Some(0), 0),
            "burst_iops must be at least 1; leave it unset for unlimited",
        ),
    ];
    for (cfg, msg) in cases {
        let err = VolumeLimiter::new(cfg, 0).unwrap_err();
        assert_eq!(err.to_string(), msg);
    }
    let err = GlobalBucket::new(
        GlobalConfig {
            capacity_iops: None,
            spare_capacity_discount: Some(Discount::NONE),
        },
        0,
    )
    .unwrap_err();
    assert_eq!(err, QosError::DiscountWithoutCapacity);
    assert!(
        GlobalBucket::new(
            GlobalConfig {
                capacity_iops: Some(0),
                ..GlobalConfig::UNLIMITED
            },
            0
        )
        .is_err()
    );
    assert_eq!(
        Discount::new(2.0).unwrap_err().to_string(),
        "spare_capacity_discount 2 must be a factor in (0, 1], at least 0.000001"
    );
    assert!(Discount::new(1e-9).is_err());
    assert!(serde_json::from_str::<GlobalConfig>(r#"{"spare_capacity_discount": -1}"#).is_err());
    let cfg: GlobalConfig =
        serde_json::from_str(r#"{"capacity_iops": 5000, "spare_capacity_discount": 0.5}"#).unwrap();
    assert_eq!(
        cfg.spare_capacity_discount.map(Discount::ppm),
        Some(500_000)
    );
    assert!(serde_json::from_str::<QosConfig>(r#"{"iops": 5, "burst": 1}"#).is_err());
}

#[test]
fn the_capacity_check_guards_the_sum_of_baselines() {
    let v = |iops| qos(iops, None, 0);
    assert_eq!(check_capacity(Some(1_000), []), Ok(Some(1_000)));
    assert_eq!(check_capacity(Some(1_000), &[v(400), v(600)]), Ok(Some(0)));
    assert_eq!(
        check_capacity(Some(1_000), &[v(400), v(601)]),
        Err(CapacityError::Exceeded {
            demand: 1_001,
            capacity: 1_000
        })
    );
    assert_eq!(
        check_capacity(Some(u64::MAX), &[v(u64::MAX), v(u64::MAX)]),
        Err(CapacityError::Exceeded {
            demand: 2 * u128::from(u64::MAX),
            capacity: u64::MAX
        })
    );
    assert_eq!(
        check_capacity(Some(1_000), &[v(1), QosConfig::UNLIMITED]),
        Err(CapacityError::UnlimitedVolume { capacity: 1_000 })
    );
    assert_eq!(check_capacity(None, &[QosConfig::UNLIMITED]), Ok(None));
}

#[test]
fn extreme_configurations_never_panic() {
    let huge = QosConfig {
        iops: Some(u64::MAX),
        burst_iops: Some(u64::MAX),
        burst_credits: u64::MAX,
        bandwidth: Some(u64::MAX),
    };
    let tiny = QosConfig {
        iops: Some(1),
        burst_iops: Some(1),
        burst_credits: u64::MAX,
        bandwidth: Some(1),
    };
    for cfg in [huge, tiny] {
        for global in [
            GlobalBucket::unlimited(),
            node(1, Some(0.000_001)),
            node(u64::MAX, Some(1.0)),
        ] {
            let mut v = limiter(cfg);
            let mut g = global;
            for (now, req) in [
                (0, Request::new(u64::MAX, u64::MAX)),
                (u64::MAX / 2, Request::new(u64::MAX, u64::MAX)),
                (u64::MAX, Request::io(u64::MAX)),
                (u64::MAX, Request::new(0, 0)),
                (u64::MAX, Request::flush()),
            ] {
                let _ = v.try_admit(&mut g, now, &req);
                v.set_config(now, tiny).unwrap();
                v.set_config(now, huge).unwrap();
                g.set_config(now, GlobalConfig::UNLIMITED).unwrap();
            }
        }
    }
}
