use super::*;
use crate::clock::ManualClock;
use crate::events::engine::EngineConfig;
use crate::events::pattern::Pattern;
use crate::events::test_server::{TestServer, ok, status};
use crate::events::webhook::deliver;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

const BASE_MS: u64 = 1_700_000_000_000;

fn engine(watch: &[&str]) -> Engine {
    Engine::new(EngineConfig {
        watch: watch.iter().map(|p| Pattern::new(p).unwrap()).collect(),
        anomaly_z: None,
        ..EngineConfig::default()
    })
    .unwrap()
}

fn clocks() -> (ManualClock, SharedClock) {
    let c = ManualClock::new();
    (c.clone(), Arc::new(c))
}

/// A webhook receiver that answers `code` and keeps the bodies.
struct Receiver {
    srv: TestServer,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
    calls: Arc<AtomicUsize>,
    notify: Arc<Notify>,
}

impl Receiver {
    async fn start(code: u16) -> Self {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let notify = Arc::new(Notify::new());
        let (b, c, n) = (bodies.clone(), calls.clone(), notify.clone());
        let srv = TestServer::start(move |r| {
            c.fetch_add(1, Ordering::SeqCst);
            if code < 300 {
                b.lock().unwrap().push(r.body);
            }
            n.notify_one();
            status(code, "text/plain", "")
        })
        .await;
        Self {
            srv,
            bodies,
            calls,
            notify,
        }
    }

    async fn wait_calls(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.calls.load(Ordering::SeqCst) < n {
                self.notify.notified().await;
            }
        })
        .await
        .expect("webhook receiver not called in time");
    }

    fn config(&self) -> WebhookConfig {
        WebhookConfig {
            retries: 2,
            backoff: Duration::from_millis(5),
            ..WebhookConfig::new(self.srv.url("/hook"))
        }
    }
}

/// The `/metrics` text of round `i`: a counter whose rate follows the queue depth, the depth,
/// an unrelated gauge, a histogram and a malformed line.
fn exposition(i: u64, ops: &mut u64) -> String {
    let depth = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9][(i % 15) as usize];
    *ops += depth * 10;
    let unrelated = (i * 7919) % 5;
    format!(
        "# HELP stockade_ops_total Ops.\n# TYPE stockade_ops_total counter\nstockade_ops_total{{volume=\"v1\"}} {ops}\n\
         # TYPE stockade_queue_depth gauge\nstockade_queue_depth{{volume=\"v1\"}} {depth}\n\
         other_gauge{{instance=\"inner\"}} {unrelated}\n\
         # TYPE stockade_lat_seconds histogram\nstockade_lat_seconds_bucket{{le=\"+Inf\"}} {i}\nstockade_lat_seconds_count {i}\n\
         this line {{ is broken\n"
    )
}

#[tokio::test]
async fn scrapes_a_changing_target_and_raises_one_event_with_a_webhook() {
    let text = Arc::new(Mutex::new(String::new()));
    let t2 = text.clone();
    let target = TestServer::start(move |r| {
        if r.path == "/metrics" {
            ok("text/plain; version=0.0.4", &t2.lock().unwrap())
        } else {
            status(404, "text/plain", "")
        }
    })
    .await;
    let hook = Receiver::start(200).await;
    let registry = crate::metrics::new_registry();
    let metrics = EventsMetrics::new(&registry).unwrap();
    let (clock, shared) = clocks();
    let mut runner = Runner::new(
        engine(&["stockade_*"]),
        RunnerConfig {
            targets: vec![target.url("/metrics")],
            webhook: Some(hook.config()),
            ..RunnerConfig::default()
        },
        shared,
        BASE_MS,
        Some(metrics),
    )
    .unwrap();
    let mut ops = 0;
    let mut events = Vec::new();
    for i in 0..40u64 {
        *text.lock().unwrap() = exposition(i, &mut ops);
        clock.advance(Duration::from_secs(1));
        let round = runner.tick().await;
        assert!(!round.skipped);
        assert_eq!(round.t_ms, BASE_MS + (i + 1) * 1000);
        assert_eq!((round.sources_ok, round.sources_failed), (1, 0));
        assert_eq!(round.values, 5);
        events.extend(round.events);
    }
    assert_eq!(events.len(), 1, "{events:#?}");
    let ev = &events[0];
    let instance = target.addr.to_string();
    assert_eq!(
        ev.a.key,
        format!("stockade_ops_total{{instance=\"{instance}\",volume=\"v1\"}}")
    );
    assert_eq!(
        ev.b.key,
        format!("stockade_queue_depth{{instance=\"{instance}\",volume=\"v1\"}}")
    );
    assert!(ev.coefficient > 0.999);
    // The counter's first scrape only primes the rate: ten aligned samples from the second on.
    assert_eq!(ev.window.samples, 10);
    assert_eq!(ev.window.start_ms, BASE_MS + 2000);
    assert_eq!(runner.recent_events().count(), 1);
    // The unrelated gauge kept its own instance label as exported_instance.
    assert!(runner.engine().series_keys().count() >= 4);

    hook.wait_calls(1).await;
    let got: Event = serde_json::from_slice(&hook.bodies.lock().unwrap()[0]).unwrap();
    assert_eq!(&got, ev);
    // Shutting down waits for the delivery to be counted.
    runner.shutdown(Duration::from_secs(5)).await;

    let text = crate::metrics::render(&registry);
    for line in [
        "stockade_events_raised_total 1",
        "stockade_events_scrapes_total{result=\"ok\"} 40",
        "stockade_events_webhook_deliveries_total{result=\"ok\"} 1",
        "stockade_events_candidates 4",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[tokio::test]
async fn candidates_beyond_the_bound_are_reported_per_round_and_counted() {
    let text = Arc::new(Mutex::new(String::new()));
    let t2 = text.clone();
    let target = TestServer::start(move |_| ok("text/plain", &t2.lock().unwrap())).await;
    let registry = crate::metrics::new_registry();
    let (clock, shared) = clocks();
    let mut runner = Runner::new(
        Engine::new(EngineConfig {
            watch: vec![Pattern::new("stockade_*").unwrap()],
            anomaly_z: None,
            max_candidates: 2,
            ..EngineConfig::default()
        })
        .unwrap(),
        RunnerConfig {
            targets: vec![target.url("/metrics")],
            ..RunnerConfig::default()
        },
        shared,
        BASE_MS,
        Some(EventsMetrics::new(&registry).unwrap()),
    )
    .unwrap();
    let mut ops = 0;
    let mut dropped = Vec::new();
    for i in 0..5u64 {
        *text.lock().unwrap() = exposition(i, &mut ops);
        clock.advance(Duration::from_secs(1));
        dropped.push(runner.tick().await.candidates_dropped);
    }
    // Four watched series, two paired: two left out of every round once the counter has a rate.
    assert_eq!(dropped[1..], [2, 2, 2, 2], "{dropped:?}");
    assert_eq!(runner.engine().stats().candidates, 2);
    let total: u64 = dropped.iter().sum();
    let text = crate::metrics::render(&registry);
    let line = format!("stockade_events_candidates_dropped_total {total}");
    assert!(text.contains(&line), "{line} missing from\n{text}");
}

#[tokio::test]
async fn instance_labels_are_kept_apart() {
    let target = TestServer::start(|_| ok("text/plain", "up{instance=\"inner\"} 1\n")).await;
    let (clock, shared) = clocks();
    let mut runner = Runner::new(
        engine(&["*"]),
        RunnerConfig {
            targets: vec![target.url("/metrics")],
            ..RunnerConfig::default()
        },
        shared,
        BASE_MS,
        None,
    )
    .unwrap();
    clock.advance(Duration::from_secs(1));
    runner.tick().await;
    let keys: Vec<String> = runner
        .engine()
        .series_keys()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(
        keys,
        vec![format!(
            "up{{exported_instance=\"inner\",instance=\"{}\"}}",
            target.addr
        )]
    );
}

/// Answers `query_range` like Prometheus for two correlated expressions, at the requested
/// timestamps.
fn fake_prometheus(r: crate::events::test_server::Req) -> Vec<u8> {
    let Some(q) = r.path.strip_prefix("/prom/api/v1/query_range?") else {
        return status(404, "text/plain", "not found");
    };
    let param = |name: &str| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_string()
    };
    let secs = |s: String| s.parse::<f64>().unwrap_or(-1.0);
    let (start, end, step) = (
        secs(param("start")),
        secs(param("end")),
        secs(param("step")),
    );
    let query = param("query");
    let (name, scale) = match query.as_str() {
        "rate%28stockade_ops_total%5B1m%5D%29" => (None, 10.0),
        "stockade_queue_depth" => (Some("stockade_queue_depth"), 1.0),
        _ => {
            return status(
                400,
                "application/json",
                r#"{"status":"error","errorType":"bad_data","error":"unknown query"}"#,
            );
        }
    };
    let mut values = Vec::new();
    let mut t = start;
    while t <= end + 1e-9 && step > 0.0 {
        let i = t as u64;
        let v = ((i * 7) % 11) as f64 * scale;
        values.push(format!("[{t:.3},\"{v}\"]"));
        t += step;
    }
    let metric = match name {
        Some(n) => format!(r#"{{"__name__":"{n}","job":"head"}}"#),
        None => r#"{"job":"head"}"#.to_string(),
    };
    ok(
        "application/json",
        &format!(
            r#"{{"status":"success","data":{{"resultType":"matrix","result":[{{"metric":{metric},"values":[{}]}}]}}}}"#,
            values.join(",")
        ),
    )
}

#[tokio::test]
async fn one_prometheus_round_covers_the_whole_window() {
    let prom = TestServer::start(fake_prometheus).await;
    let src = PromSource::new(
        prom.url("/prom"),
        vec![
            "rate(stockade_ops_total[1m])".into(),
            "stockade_queue_depth".into(),
        ],
        Limits::default(),
    )
    .unwrap();
    let (clock, shared) = clocks();
    let mut runner = Runner::new(
        engine(&["*"]),
        RunnerConfig {
            prometheus: Some(src),
            ..RunnerConfig::default()
        },
        shared,
        BASE_MS,
        None,
    )
    .unwrap();
    clock.advance(Duration::from_millis(1400));
    let round = runner.tick().await;
    // 1.4 s rounds to the 1 s grid point.
    assert_eq!(round.t_ms, BASE_MS + 1000);
    assert_eq!((round.sources_ok, round.sources_failed), (2, 0));
    assert_eq!(round.values, 120);
    assert_eq!(round.events.len(), 1, "{:?}", round.events);
    let ev = &round.events[0];
    assert_eq!(ev.a.key, "rate(stockade_ops_total[1m]){job=\"head\"}");
    assert_eq!(ev.b.key, "stockade_queue_depth{job=\"head\"}");
    assert_eq!(ev.window.samples, 60);
    assert_eq!(ev.window.start_ms, BASE_MS + 1000 - 59_000);
    assert_eq!(ev.window.end_ms, BASE_MS + 1000);
    // The next round only adds the new point; the pair is in cooldown.
    clock.advance(Duration::from_secs(1));
    let round = runner.tick().await;
    assert!(round.events.is_empty());
    assert_eq!(round.values, 2);
    assert_eq!(runner.engine().stats().out_of_order, 0);
    assert_eq!(
        runner
            .engine()
            .values(&SeriesKey::new(
                "stockade_queue_depth",
                &[("job".into(), "head".into())]
            ))
            .len(),
        60
    );
}

#[tokio::test]
async fn failing_sources_are_counted_not_fatal() {
    let bad = TestServer::start(|_| status(500, "text/plain", "boom")).await;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = format!("http://{}/metrics", l.local_addr().unwrap());
    drop(l);
    let prom = TestServer::start(fake_prometheus).await;
    let src = PromSource::new(
        prom.url("/prom"),
        vec!["nonsense(".into()],
        Limits::default(),
    )
    .unwrap();
    let registry = crate::metrics::new_registry();
    let (clock, shared) = clocks();
    let mut runner = Runner::new(
        engine(&["*"]),
        RunnerConfig {
            targets: vec![bad.url("/metrics"), HttpUrl::parse(&closed).unwrap()],
            prometheus: Some(src),
            scrape_timeout: Duration::from_secs(2),
            ..RunnerConfig::default()
        },
        shared,
        BASE_MS,
        Some(EventsMetrics::new(&registry).unwrap()),
    )
    .unwrap();
    clock.advance(Duration::from_secs(1));
    let round = runner.tick().await;
    assert_eq!((round.sources_ok, round.sources_failed), (0, 3));
    assert!(
        crate::metrics::render(&registry)
            .contains("stockade_events_scrapes_total{result=\"error\"} 3")
    );
    // The same grid slot again: skipped.
    let again = runner.tick().await;
    assert!(again.skipped);
}

#[tokio::test]
async fn a_failing_webhook_is_retried_then_dropped() {
    let hook = Receiver::start(503).await;
    let ev = Event {
        kind: "correlated".into(),
        raised_at_ms: 1,
        a: crate::events::EventSeries {
            key: "a".into(),
            selected: crate::events::SelectedBy::Watch,
        },
        b: crate::events::EventSeries {
            key: "b".into(),
            selected: crate::events::SelectedBy::Watch,
        },
        coefficient: 0.95,
        threshold: 0.9,
        window: crate::events::EventWindow {
            start_ms: 0,
            end_ms: 1,
            samples: 10,
        },
    };
    let e = deliver(&hook.config(), &ev).await.unwrap_err();
    assert!(
        matches!(
            e,
            WebhookError::Status {
                attempts: 3,
                status: 503,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(hook.calls.load(Ordering::SeqCst), 3);

    // Through the notifier: logged and counted, nothing else.
    let registry = crate::metrics::new_registry();
    let m = EventsMetrics::new(&registry).unwrap();
    let n = Notifier::spawn(hook.config(), Some(m)).unwrap();
    assert!(n.notify(&ev));
    hook.wait_calls(6).await;
    n.close(Duration::from_secs(5)).await;
    assert!(
        crate::metrics::render(&registry)
            .contains("stockade_events_webhook_deliveries_total{result=\"failed\"} 1")
    );
}

#[tokio::test]
async fn a_full_webhook_queue_drops_and_counts() {
    // A receiver that never answers keeps the first delivery busy.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = HttpUrl::parse(&format!("http://{}/", l.local_addr().unwrap())).unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            conns.push(s);
        }
    });
    let registry = crate::metrics::new_registry();
    let m = EventsMetrics::new(&registry).unwrap();
    let cfg = WebhookConfig {
        queue: 1,
        retries: 0,
        timeout: Duration::from_secs(30),
        ..WebhookConfig::new(url)
    };
    let n = Notifier::spawn(cfg, Some(m)).unwrap();
    let mut ev_engine = engine(&["*"]);
    let mut evs = Vec::new();
    for sec in 0..10u64 {
        let v = ((sec * 31) % 17) as f64;
        ev_engine.ingest(sec * 1000, &SeriesKey::named("a"), ValueKind::Gauge, v);
        ev_engine.ingest(sec * 1000, &SeriesKey::named("b"), ValueKind::Gauge, v);
        evs.extend(ev_engine.evaluate(sec * 1000));
    }
    let ev = &evs[0];
    // One taken by the task, one queued, then the queue is full.
    let mut accepted = 0;
    for _ in 0..10 {
        if n.notify(ev) {
            accepted += 1;
        }
        tokio::task::yield_now().await;
    }
    assert!((1..=2).contains(&accepted), "{accepted}");
    let dropped = format!(
        "stockade_events_webhook_deliveries_total{{result=\"dropped\"}} {}",
        10 - accepted
    );
    assert!(crate::metrics::render(&registry).contains(&dropped));
    n.close(Duration::from_millis(50)).await;
    hold.abort();
}

#[tokio::test]
async fn runner_needs_a_source() {
    let (_, shared) = clocks();
    let e = Runner::new(engine(&["*"]), RunnerConfig::default(), shared, 0, None).unwrap_err();
    assert!(matches!(e, RunnerError::NoSources));
}

#[test]
fn a_webhook_needs_a_runtime() {
    let url = HttpUrl::parse("http://127.0.0.1:9/").unwrap();
    let e = Notifier::spawn(WebhookConfig::new(url), None).unwrap_err();
    assert!(matches!(e, WebhookError::NoRuntime));
}

#[tokio::test]
async fn the_real_loop_runs_on_a_short_interval_and_stops_on_break() {
    // Each scrape serves the next value of two correlated series.
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let target = TestServer::start(move |_| {
        let i = n2.fetch_add(1, Ordering::SeqCst) as u64;
        let v = (i * 7) % 11;
        ok("text/plain", &format!("a {v}\nb {}\n", v * 3))
    })
    .await;
    let engine = Engine::new(EngineConfig {
        watch: vec![Pattern::new("*").unwrap()],
        anomaly_z: None,
        window: Duration::from_millis(1000),
        interval: Duration::from_millis(20),
        min_samples: 5,
        ..EngineConfig::default()
    })
    .unwrap();
    let clock: SharedClock = Arc::new(crate::clock::SystemClock::new());
    let base = wall_base_ms(&clock);
    let mut runner = Runner::new(
        engine,
        RunnerConfig {
            targets: vec![target.url("/metrics")],
            ..RunnerConfig::default()
        },
        clock,
        base,
        None,
    )
    .unwrap();
    let mut events = Vec::new();
    let mut rounds = 0;
    let stop = tokio::time::sleep(Duration::from_secs(20));
    runner
        .run(stop, |r| {
            rounds += 1;
            events.extend(r.events.iter().cloned());
            if events.is_empty() {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })
        .await;
    assert_eq!(events.len(), 1, "no event after {rounds} rounds");
    assert!(rounds >= 5);
    assert_eq!(events[0].window.samples, 5);
}

#[test]
fn a_runner_can_live_in_a_spawned_task() {
    fn assert_send<T: Send>(_: &T) {}
    let (_, shared) = clocks();
    let url = HttpUrl::parse("http://127.0.0.1:9/metrics").unwrap();
    let mut runner = Runner::new(
        engine(&["*"]),
        RunnerConfig {
            targets: vec![url],
            ..RunnerConfig::default()
        },
        shared,
        0,
        None,
    )
    .unwrap();
    assert_send(&runner);
    assert_send(&runner.tick());
}
