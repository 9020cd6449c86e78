use super::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const S: u64 = 1000;

fn pats(p: &[&str]) -> Vec<Pattern> {
    p.iter().map(|p| Pattern::new(p).unwrap()).collect()
}

fn k(name: &str) -> SeriesKey {
    SeriesKey::named(name)
}

/// Watch everything, anomaly rule off, 60 s window at 1 s, 5 min cooldown, 10 samples.
fn cfg() -> EngineConfig {
    EngineConfig {
        watch: pats(&["*"]),
        anomaly_z: None,
        ..EngineConfig::default()
    }
}

/// Feeds `f(second)` as gauges every second from `from` to `to` (inclusive) and evaluates;
/// returns the events with the second they came at.
fn drive(
    e: &mut Engine,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64) -> Vec<(&'static str, f64)>,
) -> Vec<(u64, Event)> {
    let mut out = Vec::new();
    for sec in from..=to {
        for (name, v) in f(sec) {
            e.ingest(sec * S, &k(name), ValueKind::Gauge, v);
        }
        out.extend(e.evaluate(sec * S).into_iter().map(|ev| (sec, ev)));
    }
    out
}

fn noise(rng: &mut StdRng) -> f64 {
    rng.gen_range(-1.0..1.0)
}

#[test]
fn correlated_pair_raises_one_event_per_cooldown() {
    let mut e = Engine::new(cfg()).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut series = |_sec| {
        let x = 10.0 * noise(&mut rng);
        let y = 3.0 * x + 100.0 + 0.5 * noise(&mut rng);
        vec![("load", x), ("latency", y)]
    };
    // Within the first cooldown: exactly one event, as soon as 10 samples align.
    let first = drive(&mut e, 0, 299, &mut series);
    assert_eq!(first.len(), 1, "{first:?}");
    let (sec, ev) = &first[0];
    assert_eq!(*sec, 9);
    assert_eq!((ev.a.key.as_str(), ev.b.key.as_str()), ("latency", "load"));
    assert!(ev.coefficient > 0.99, "{}", ev.coefficient);
    assert_eq!(ev.threshold, 0.9);
    assert_eq!(
        ev.window,
        EventWindow {
            start_ms: 0,
            end_ms: 9 * S,
            samples: 10
        }
    );
    assert_eq!(ev.raised_at_ms, 9 * S);
    assert_eq!(ev.a.selected, SelectedBy::Watch);
    // Still correlated after the cooldown: exactly one more, 300 s after the first, over a
    // full window.
    let second = drive(&mut e, 300, 600, &mut series);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0].0, 309);
    assert_eq!(
        second[0].1.window,
        EventWindow {
            start_ms: 250 * S,
            end_ms: 309 * S,
            samples: 60
        }
    );
    assert_eq!(e.stats().events, 2);
}

#[test]
fn zero_cooldown_raises_every_round() {
    let mut e = Engine::new(EngineConfig {
        cooldown: Duration::ZERO,
        ..cfg()
    })
    .unwrap();
    let ev = drive(&mut e, 0, 19, |s| {
        let x = (s % 5) as f64;
        vec![("a", x), ("b", x * 2.0)]
    });
    assert_eq!(ev.len(), 11);
}

#[test]
fn independent_noise_raises_nothing() {
    let mut e = Engine::new(cfg()).unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let names = ["n1", "n2", "n3", "n4", "n5", "n6"];
    // 50 windows' worth of rounds, 15 pairs.
    let events = drive(&mut e, 0, 3000, |_| {
        names.iter().map(|n| (*n, noise(&mut rng))).collect()
    });
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(e.stats().candidates, 6);
}

#[test]
fn anti_correlation_needs_either_sign() {
    let feed = |s: u64| {
        let x = ((s * 7919) % 13) as f64;
        vec![("up", x), ("down", 50.0 - 2.0 * x)]
    };
    let mut e = Engine::new(EngineConfig {
        sign: Sign::Positive,
        ..cfg()
    })
    .unwrap();
    assert!(drive(&mut e, 0, 120, feed).is_empty());
    let mut e = Engine::new(EngineConfig {
        sign: Sign::Either,
        ..cfg()
    })
    .unwrap();
    let ev = drive(&mut e, 0, 120, feed);
    assert_eq!(ev.len(), 1);
    assert!((ev[0].1.coefficient + 1.0).abs() < 1e-9);
}

/// Two series whose correlation over any full window of 60 one-second samples is exactly
/// `c` (up to rounding): x and w are orthogonal, zero-mean, equal-norm square waves.
fn known_r(c: f64) -> impl FnMut(u64) -> Vec<(&'static str, f64)> {
    let s = (1.0 - c * c).sqrt();
    move |sec| {
        let i = (sec % 4) as usize;
        let x = [1.0, -1.0, 1.0, -1.0][i];
        let w = [1.0, 1.0, -1.0, -1.0][i];
        vec![("x", x), ("y", 5.0 + c * x + s * w)]
    }
}

#[test]
fn threshold_is_honoured() {
    let at = |threshold: f64| {
        let mut e = Engine::new(EngineConfig {
            threshold,
            min_samples: 60,
            ..cfg()
        })
        .unwrap();
        drive(&mut e, 0, 400, known_r(0.9))
    };
    assert!(at(0.9 + 1e-6).is_empty());
    let ev = at(0.9 - 1e-6);
    assert_eq!(ev.len(), 2, "one per cooldown: {ev:?}");
    assert!((ev[0].1.coefficient - 0.9).abs() < 1e-9);
    assert_eq!(ev[0].0, 59);
}

#[test]
fn watch_and_ignore_lists_are_honoured() {
    let mut e = Engine::new(EngineConfig {
        watch: pats(&["x_*"]),
        ignore: pats(&["x_skip*"]),
        ..cfg()
    })
    .unwrap();
    let ev = drive(&mut e, 0, 100, |s| {
        let v = ((s * 31) % 17) as f64;
        vec![
            ("x_a", v),
            ("x_b", v + 1.0),
            ("x_skipped", v),
            ("y_c", v * 3.0),
        ]
    });
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].1.a.key.as_str(), ev[0].1.b.key.as_str()),
        ("x_a", "x_b")
    );
    let keys: Vec<&str> = e.series_keys().map(SeriesKey::as_str).collect();
    assert_eq!(keys, vec!["x_a", "x_b"]);
    // With the anomaly rule on, unwatched series are stored but an ignored one never is.
    let mut e = Engine::new(EngineConfig {
        watch: pats(&["x_*"]),
        ignore: pats(&["x_skip*"]),
        anomaly_z: Some(3.0),
        ..cfg()
    })
    .unwrap();
    assert_eq!(
        e.ingest(0, &k("x_skipped"), ValueKind::Gauge, 1.0),
        Ingested::NotSelected
    );
    assert_eq!(
        e.ingest(0, &k("y_c"), ValueKind::Gauge, 1.0),
        Ingested::Stored
    );
}

#[test]
fn label_patterns_select_by_label() {
    let mut e = Engine::new(EngineConfig {
        watch: pats(&[r#"*{volume="v1"}"#]),
        ..cfg()
    })
    .unwrap();
    let key = |name: &str, vol: &str| SeriesKey::new(name, &[("volume".into(), vol.into())]);
    for sec in 0..30u64 {
        let v = ((sec * 31) % 17) as f64;
        e.ingest(sec * S, &key("ops", "v1"), ValueKind::Gauge, v);
        e.ingest(sec * S, &key("lat", "v1"), ValueKind::Gauge, v * 2.0);
        e.ingest(sec * S, &key("ops", "v2"), ValueKind::Gauge, v);
        e.evaluate(sec * S);
    }
    assert_eq!(e.stats().events, 1);
    assert_eq!(e.stats().series, 2);
}

#[test]
fn anomaly_rule_flags_a_jump_and_not_a_stable_series() {
    let mut e = Engine::new(EngineConfig {
        watch: Vec::new(),
        anomaly_z: Some(4.0),
        ..cfg()
    })
    .unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut flagged_at = None;
    for sec in 0..=70u64 {
        let jump = if sec >= 40 { 50.0 } else { 0.0 };
        let t = sec * S;
        e.ingest(t, &k("stable"), ValueKind::Gauge, noise(&mut rng));
        let r = e.ingest(t, &k("jumpy"), ValueKind::Gauge, jump + noise(&mut rng));
        if let Ingested::Flagged { z } = r {
            assert!(flagged_at.is_none(), "flagged twice");
            assert!(z > 4.0);
            flagged_at = Some(sec);
        }
        e.evaluate(t);
        let flagged: Vec<String> = e.flagged().iter().map(|(k, _)| k.to_string()).collect();
        if (40..100).contains(&sec) {
            assert_eq!(flagged, vec!["jumpy"], "at {sec}");
        } else {
            assert!(flagged.is_empty(), "at {sec}: {flagged:?}");
        }
    }
    assert_eq!(flagged_at, Some(40));
    assert_eq!(e.stats().flagged, 1);
    // The flag lapses one window after the value stops looking anomalous.
    for sec in 71..=200u64 {
        e.ingest(
            sec * S,
            &k("jumpy"),
            ValueKind::Gauge,
            50.0 + noise(&mut rng),
        );
        e.evaluate(sec * S);
    }
    assert!(e.flagged().is_empty());
}

#[test]
fn anomalies_that_move_together_raise_an_event_and_calm_pairs_do_not() {
    let mut e = Engine::new(EngineConfig {
        watch: Vec::new(),
        anomaly_z: Some(4.0),
        ..cfg()
    })
    .unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let ev = drive(&mut e, 0, 120, |sec| {
        let jump = if sec >= 50 { 40.0 } else { 0.0 };
        let wave = (sec as f64 / 5.0).sin();
        vec![
            ("disk_latency", jump + noise(&mut rng)),
            ("queue_depth", jump / 4.0 + 0.2 * noise(&mut rng)),
            // Perfectly correlated with each other, but never anomalous: not candidates.
            ("calm_a", wave),
            ("calm_b", 2.0 * wave),
        ]
    });
    assert_eq!(ev.len(), 1, "{ev:?}");
    let (sec, ev) = &ev[0];
    assert!(*sec >= 50);
    assert_eq!(
        (ev.a.key.as_str(), ev.b.key.as_str()),
        ("disk_latency", "queue_depth")
    );
    assert!(
        matches!(ev.a.selected, SelectedBy::Anomaly { z: Some(z), at_ms } if z > 4.0 && at_ms == 50 * S)
    );
}

#[test]
fn constant_series_never_correlate() {
    let mut e = Engine::new(EngineConfig {
        anomaly_z: Some(3.0),
        ..cfg()
    })
    .unwrap();
    let ev = drive(&mut e, 0, 200, |s| {
        vec![
            ("five", 5.0),
            ("also_five", 5.0),
            ("tenth", 0.1),
            ("zero", 0.0),
            ("moving", (s % 7) as f64),
        ]
    });
    assert!(ev.is_empty(), "{ev:?}");
    assert!(e.flagged().is_empty());
}

#[test]
fn counters_become_rates_and_resets_are_handled() {
    let mut e = Engine::new(cfg()).unwrap();
    let c = k("ops_total");
    let raw = [0.0, 10.0, 20.0, 30.0, 5.0, 15.0, 25.0];
    let mut outcomes = Vec::new();
    for (i, v) in raw.iter().enumerate() {
        outcomes.push(e.ingest(i as u64 * S, &c, ValueKind::Counter, *v));
    }
    assert_eq!(outcomes[0], Ingested::FirstCounterValue);
    assert!(outcomes[1..].iter().all(|o| *o == Ingested::Stored));
    let rates: Vec<f64> = e.values(&c).iter().map(|(_, v)| *v).collect();
    // The reset to 5 counts as an increase of 5 (the counter restarted from zero).
    assert_eq!(rates, vec![10.0, 10.0, 10.0, 5.0, 10.0, 10.0]);
    // Rates are per second, whatever the spacing.
    e.ingest(9 * S, &c, ValueKind::Counter, 55.0);
    assert_eq!(e.values(&c).last(), Some(&(9 * S, 10.0)));
    // A NaN is a gap: the next rate spans it.
    assert_eq!(
        e.ingest(10 * S, &c, ValueKind::Counter, f64::NAN),
        Ingested::NotFinite
    );
    e.ingest(11 * S, &c, ValueKind::Counter, 75.0);
    assert_eq!(e.values(&c).last(), Some(&(11 * S, 10.0)));
}

#[test]
fn a_counter_reset_does_not_break_a_correlation() {
    let mut e = Engine::new(cfg()).unwrap();
    let (mut ops, mut bytes) = (0.0, 0.0);
    let mut events = Vec::new();
    for sec in 0..60u64 {
        let load = ((sec * 7) % 11) as f64 + 1.0;
        if sec == 30 {
            // The exporter restarted.
            ops = 0.0;
            bytes = 0.0;
        }
        ops += load;
        bytes += load * 4096.0;
        e.ingest(sec * S, &k("ops_total"), ValueKind::Counter, ops);
        e.ingest(sec * S, &k("bytes_total"), ValueKind::Counter, bytes);
        events.extend(e.evaluate(sec * S));
    }
    assert_eq!(events.len(), 1);
    assert!(e.values(&k("ops_total")).iter().all(|(_, v)| *v > 0.0));
}

#[test]
fn only_identical_timestamps_align() {
    let mut e = Engine::new(cfg()).unwrap();
    for sec in 0..100u64 {
        let v = ((sec * 31) % 17) as f64;
        if sec % 2 == 0 {
            e.ingest(sec * S, &k("even"), ValueKind::Gauge, v);
        } else {
            e.ingest(sec * S, &k("odd"), ValueKind::Gauge, v);
        }
        assert!(e.evaluate(sec * S).is_empty());
    }
}

#[test]
fn too_few_samples_never_correlate() {
    let mut e = Engine::new(EngineConfig {
        min_samples: 20,
        ..cfg()
    })
    .unwrap();
    let ev = drive(&mut e, 0, 18, |s| vec![("a", s as f64), ("b", s as f64)]);
    assert!(ev.is_empty());
    let ev = drive(&mut e, 19, 19, |s| vec![("a", s as f64), ("b", s as f64)]);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].1.window.samples, 20);
}

#[test]
fn out_of_order_and_non_finite_values() {
    let mut e = Engine::new(cfg()).unwrap();
    assert_eq!(
        e.ingest(5 * S, &k("a"), ValueKind::Gauge, 1.0),
        Ingested::Stored
    );
    assert_eq!(
        e.ingest(5 * S, &k("a"), ValueKind::Gauge, 2.0),
        Ingested::OutOfOrder
    );
    assert_eq!(
        e.ingest(4 * S, &k("a"), ValueKind::Gauge, 2.0),
        Ingested::OutOfOrder
    );
    assert_eq!(
        e.ingest(6 * S, &k("a"), ValueKind::Gauge, f64::INFINITY),
        Ingested::NotFinite
    );
    assert_eq!(
        e.ingest(7 * S, &k("a"), ValueKind::Gauge, 3.0),
        Ingested::Stored
    );
    assert_eq!(e.values(&k("a")), vec![(5 * S, 1.0), (7 * S, 3.0)]);
    assert_eq!(e.stats().out_of_order, 2);
}

#[test]
fn series_bound_refuses_new_series_until_old_ones_go_stale() {
    let mut e = Engine::new(EngineConfig {
        max_series: 2,
        ..cfg()
    })
    .unwrap();
    assert_eq!(
        e.ingest(0, &k("a"), ValueKind::Gauge, 1.0),
        Ingested::Stored
    );
    assert_eq!(
        e.ingest(0, &k("b"), ValueKind::Gauge, 1.0),
        Ingested::Stored
    );
    assert_eq!(
        e.ingest(0, &k("c"), ValueKind::Gauge, 1.0),
        Ingested::Refused
    );
    assert_eq!(e.stats().series_refused, 1);
    // "a" keeps reporting, "b" stops; after a window "b" is dropped and "c" gets in.
    for sec in 1..=60u64 {
        e.ingest(sec * S, &k("a"), ValueKind::Gauge, 1.0);
        e.evaluate(sec * S);
    }
    assert_eq!(e.stats().series, 1);
    assert_eq!(e.stats().series_expired, 1);
    assert_eq!(
        e.ingest(61 * S, &k("c"), ValueKind::Gauge, 1.0),
        Ingested::Stored
    );
}

#[test]
fn windows_are_bounded() {
    let mut e = Engine::new(cfg()).unwrap();
    // Samples far denser than the interval: the window keeps at most window/interval + 2.
    for ms in 0..10_000u64 {
        e.ingest(ms, &k("dense"), ValueKind::Gauge, ms as f64);
    }
    assert_eq!(e.values(&k("dense")).len(), 62);
    assert_eq!(e.values(&k("dense")).last(), Some(&(9_999, 9_999.0)));
    // And drop what falls out of the window.
    e.ingest(100_000, &k("dense"), ValueKind::Gauge, 1.0);
    assert_eq!(e.values(&k("dense")), vec![(100_000, 1.0)]);
}

#[test]
fn candidate_bound_limits_the_pairs() {
    let mut e = Engine::new(EngineConfig {
        max_candidates: 3,
        ..cfg()
    })
    .unwrap();
    let ev = drive(&mut e, 0, 20, |s| {
        let v = ((s * 31) % 17) as f64;
        vec![("a", v), ("b", v), ("c", v), ("d", v), ("e", v)]
    });
    let pairs: Vec<(String, String)> = ev
        .iter()
        .map(|(_, e)| (e.a.key.clone(), e.b.key.clone()))
        .collect();
    assert_eq!(
        pairs,
        vec![
            ("a".into(), "b".into()),
            ("a".into(), "c".into()),
            ("b".into(), "c".into())
        ]
    );
    assert_eq!(e.stats().candidates, 3);
    assert!(e.stats().candidates_dropped >= 2);
}

#[test]
fn configurations_are_validated() {
    let bad = |c: EngineConfig| Engine::new(c).unwrap_err().to_string();
    assert!(
        bad(EngineConfig {
            threshold: 0.0,
            ..cfg()
        })
        .contains("threshold 0")
    );
    assert!(
        bad(EngineConfig {
            threshold: 1.5,
            ..cfg()
        })
        .contains("threshold 1.5")
    );
    assert!(
        bad(EngineConfig {
            threshold: f64::NAN,
            ..cfg()
        })
        .contains("threshold")
    );
    assert!(
        bad(EngineConfig {
            anomaly_z: Some(-1.0),
            ..cfg()
        })
        .contains("z-score")
    );
    assert!(
        bad(EngineConfig {
            min_samples: 2,
            ..cfg()
        })
        .contains("at least 3")
    );
    assert!(
        bad(EngineConfig {
            window: Duration::ZERO,
            ..cfg()
        })
        .contains("window must be longer than zero")
    );
    assert!(
        bad(EngineConfig {
            interval: Duration::from_secs(120),
            ..cfg()
        })
        .contains("must not be longer than the window")
    );
    assert!(
        bad(EngineConfig {
            window: Duration::from_secs(5),
            ..cfg()
        })
        .contains("fewer than min-samples")
    );
    assert!(
        bad(EngineConfig {
            window: Duration::from_secs(86_400),
            ..cfg()
        })
        .contains("exceeds the limit")
    );
    assert!(
        bad(EngineConfig {
            max_series: 0,
            ..cfg()
        })
        .contains("max-series")
    );
    assert!(
        bad(EngineConfig {
            watch: Vec::new(),
            anomaly_z: None,
            ..cfg()
        })
        .contains("nothing to correlate")
    );
    assert!(Engine::new(EngineConfig::default()).is_ok());
}

#[test]
fn events_serialize_and_print() {
    let mut e = Engine::new(cfg()).unwrap();
    let base = 1_700_000_000_000;
    let mut ev = Vec::new();
    for sec in 0..10u64 {
        let v = ((sec * 31) % 17) as f64;
        e.ingest(base + sec * S, &k("a"), ValueKind::Gauge, v);
        e.ingest(base + sec * S, &k("b"), ValueKind::Gauge, -v);
        ev.extend(e.evaluate(base + sec * S));
    }
    let ev = &ev[0];
    let json = serde_json::to_value(ev).unwrap();
    assert_eq!(json["kind"], "correlated");
    assert_eq!(json["a"]["key"], "a");
    assert_eq!(json["a"]["selected"]["by"], "watch");
    assert_eq!(json["window"]["samples"], 10);
    assert_eq!(json["window"]["start_ms"], base);
    let back: Event = serde_json::from_value(json).unwrap();
    assert_eq!(&back, ev);
    assert_eq!(
        ev.to_string(),
        "2023-11-14T22:13:29.000Z correlated r=-1.000 n=10 window=2023-11-14T22:13:20.000Z..2023-11-14T22:13:29.000Z a ~ b"
    );
    let flagged = EventSeries {
        key: "x".into(),
        selected: SelectedBy::Anomaly { z: None, at_ms: 5 },
    };
    assert_eq!(
        serde_json::to_string(&flagged).unwrap(),
        r#"{"key":"x","selected":{"by":"anomaly","z":null,"at_ms":5}}"#
    );
}

#[derive(Debug, Clone)]
enum Op {
    Ingest {
        series: u8,
        dt_ms: u16,
        value: f64,
        counter: bool,
    },
    Evaluate {
        dt_ms: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, 0u16..3000, prop_oneof![any::<f64>(), -1e3f64..1e3], any::<bool>())
            .prop_map(|(series, dt_ms, value, counter)| Op::Ingest { series, dt_ms, value, counter }),
        1 => (0u16..5000).prop_map(|dt_ms| Op::Evaluate { dt_ms }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn arbitrary_feeds_never_panic_and_events_obey_the_rules(
        ops in proptest::collection::vec(op(), 0..400),
        anomaly in any::<bool>(),
        either in any::<bool>(),
    ) {
        let mut e = Engine::new(EngineConfig {
            window: Duration::from_secs(20),
            cooldown: Duration::from_secs(30),
            min_samples: 4,
            anomaly_z: anomaly.then_some(2.0),
            sign: if either { Sign::Either } else { Sign::Positive },
            max_series: 4,
            max_candidates: 3,
            ..cfg()
        }).unwrap();
        let mut now = 0u64;
        let mut last: BTreeMap<(String, String), u64> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Ingest { series, dt_ms, value, counter } => {
                    now += dt_ms as u64;
                    let kind = if counter { ValueKind::Counter } else { ValueKind::Gauge };
                    e.ingest(now, &k(&format!("s{series}")), kind, value);
                }
                Op::Evaluate { dt_ms } => {
                    now += dt_ms as u64;
                    for ev in e.evaluate(now) {
                        prop_assert!(ev.a.key < ev.b.key);
                        prop_assert!(ev.window.samples >= 4);
                        prop_assert!(ev.coefficient.is_finite());
                        if either {
                            prop_assert!(ev.coefficient.abs() >= 0.9);
                        } else {
                            prop_assert!(ev.coefficient >= 0.9);
                        }
                        prop_assert!(ev.window.end_ms <= now && ev.window.start_ms + 20_000 > now);
                        let pair = (ev.a.key.clone(), ev.b.key.clone());
                        if let Some(prev) = last.insert(pair, now) {
                            prop_assert!(now >= prev + 30_000, "cooldown broken");
                        }
                    }
                    prop_assert!(e.stats().series <= 4);
                    prop_assert!(e.stats().candidates <= 3);
                }
            }
        }
    }
}

#[test]
fn parts_of_one_histogram_are_never_paired_with_each_other() {
    let mut e = Engine::new(EngineConfig {
        cooldown: Duration::ZERO,
        ..cfg()
    })
    .unwrap();
    let lbl = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let inf = SeriesKey::new("h_bucket", &lbl(&[("le", "+Inf"), ("op", "read")]));
    let small = SeriesKey::new("h_bucket", &lbl(&[("le", "0.1"), ("op", "read")]));
    let count = SeriesKey::new("h_count", &lbl(&[("op", "read")]));
    let sum = SeriesKey::new("h_sum", &lbl(&[("op", "read")]));
    // Another label value is another series of the family's metric: it may be paired.
    let other = SeriesKey::new("h_count", &lbl(&[("op", "write")]));
    assert_eq!(inf.family(), count.family());
    assert_eq!(sum.family(), small.family());
    assert_ne!(count.family(), other.family());
    let mut events = Vec::new();
    for sec in 0..30u64 {
        let x = (sec % 7) as f64;
        for (key, v) in [
            (&inf, x),
            (&small, x / 2.0),
            (&count, x),
            (&sum, x * 3.0),
            (&other, x),
        ] {
            e.ingest(sec * S, key, ValueKind::Gauge, v);
        }
        events.extend(e.evaluate(sec * S));
    }
    // Only pairs with the other op's count: four of them per round once enough samples align.
    assert!(!events.is_empty());
    for ev in &events {
        assert!(
            ev.a.key == other.to_string() || ev.b.key == other.to_string(),
            "a pair within one histogram: {} ~ {}",
            ev.a.key,
            ev.b.key
        );
    }
}
