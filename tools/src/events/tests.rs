use super::*;
use clap::Parser;
use std::io::Read;
use std::net::TcpListener;
use std::sync::Mutex;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: EventsArgs,
}

fn parse(argv: &[&str]) -> Result<EventsArgs, clap::Error> {
    let mut v = vec!["events"];
    v.extend_from_slice(argv);
    Cli::try_parse_from(v).map(|c| c.args)
}

fn plan_err(argv: &[&str]) -> String {
    format!("{:#}", plan(&parse(argv).unwrap()).unwrap_err())
}

#[test]
fn defaults_and_durations() {
    let a = parse(&["--target", "127.0.0.1:9100"]).unwrap();
    assert_eq!(a.window, Duration::from_secs(60));
    assert_eq!(a.interval, Duration::from_secs(1));
    assert_eq!(a.cooldown, Duration::from_secs(300));
    assert_eq!(
        (a.threshold, a.min_samples, a.sign),
        (0.9, 10, SignArg::Either)
    );
    let (e, r) = plan(&a).unwrap();
    assert_eq!(e.anomaly_z, Some(3.0));
    assert_eq!(r.targets[0].to_string(), "http://127.0.0.1:9100/metrics");
    assert_eq!(r.scrape_timeout, Duration::from_secs(1));

    let a = parse(&[
        "--target",
        "http://h:1/m",
        "--watch",
        "stockade_*",
        "--window",
        "2m",
        "--interval",
        "250ms",
        "--cooldown",
        "1h",
        "--sign",
        "positive",
    ])
    .unwrap();
    let (e, _) = plan(&a).unwrap();
    assert_eq!(
        e.anomaly_z, None,
        "--watch without --anomaly-z turns the rule off"
    );
    assert_eq!(e.window, Duration::from_secs(120));
    assert_eq!(e.interval, Duration::from_millis(250));
    assert_eq!(e.cooldown, Duration::from_secs(3600));
    assert_eq!(e.sign, Sign::Positive);
    // The default series bound shrinks so the windows fit in 4 Mi samples.
    assert_eq!(e.max_series, (4 << 20) / 482);
    let (e, _) = plan(&parse(&["--target", "h:1"]).unwrap()).unwrap();
    assert_eq!(e.max_series, 10_000);
    assert!(
        plan_err(&[
            "--target",
            "h:1",
            "--window",
            "2m",
            "--interval",
            "250ms",
            "--max-series",
            "10000"
        ])
        .contains("exceeds the limit")
    );
    let (e, _) =
        plan(&parse(&["--target", "h:1", "--watch", "x", "--anomaly-z", "4"]).unwrap()).unwrap();
    assert_eq!(e.anomaly_z, Some(4.0));
}

#[test]
fn targets_are_normalised() {
    for (given, want) in [
        ("127.0.0.1:9100", "http://127.0.0.1:9100/metrics"),
        ("localhost:9100/custom", "http://localhost:9100/custom"),
        ("http://h:1/metrics", "http://h:1/metrics"),
        ("[::1]:9100", "http://[::1]:9100/metrics"),
    ] {
        assert_eq!(target_url(given).unwrap().to_string(), want);
    }
    let e = format!("{:#}", target_url("https://h/metrics").unwrap_err());
    assert!(
        e.contains("--target https://h/metrics") && e.contains("only http://"),
        "{e}"
    );
}

#[test]
fn bad_options_are_clear_errors() {
    assert!(plan_err(&[]).contains("nothing to watch"));
    assert!(plan_err(&["--target", "h:99999"]).contains("invalid port"));
    assert!(plan_err(&["--target", "h:1", "--threshold", "1.5"]).contains("threshold 1.5"));
    assert!(plan_err(&["--target", "h:1", "--min-samples", "2"]).contains("at least 3"));
    assert!(plan_err(&["--target", "h:1", "--window", "5s"]).contains("fewer than min-samples"));
    assert!(plan_err(&["--target", "h:1", "--anomaly-z", "0"]).contains("z-score"));
    assert!(plan_err(&["--target", "h:1", "--webhook", "https://x/"]).contains("--webhook"));
    assert!(
        plan_err(&["--prometheus", "ftp://p", "--query", "up"]).contains("--prometheus ftp://p")
    );
    assert!(plan_err(&["--cluster", "/nonexistent/dir"]).contains("stockade up"));
    for argv in [
        &["--target", "h:1", "--window", "soon"][..],
        &["--query", "up"],
        &["--prometheus", "http://p:9090"],
        &["--target", "h:1", "--once", "--for", "1m"],
        &["--target", "h:1", "--sign", "negative"],
        &["--target", "h:1", "--watch", ""],
    ] {
        assert!(parse(argv).is_err(), "{argv:?} parsed");
    }
}

#[test]
fn cluster_json_gives_targets() {
    let dir = tempfile::tempdir().unwrap();
    let info = crate::up::ClusterInfo {
        supervisor_pid: 1,
        cluster_key_file: dir.path().join("cluster.key"),
        processes: vec![crate::up::ProcessInfo {
            role: "sled".into(),
            id: "sled-1".into(),
            pid: 2,
            listen: "127.0.0.1:20001".parse().unwrap(),
            metrics: "127.0.0.1:20002".parse().unwrap(),
            peer: None,
            log: dir.path().join("log"),
            config: None,
        }],
        admin_endpoints: Vec::new(),
        admin_token_file: None,
        nbd_uri: None,
    };
    std::fs::write(
        dir.path().join("cluster.json"),
        serde_json::to_string(&info).unwrap(),
    )
    .unwrap();
    let t = cluster_targets(dir.path()).unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].to_string(), "http://127.0.0.1:20002/metrics");
    std::fs::write(dir.path().join("bad.json"), "{").unwrap();
    let e = format!(
        "{:#}",
        cluster_targets(&dir.path().join("bad.json")).unwrap_err()
    );
    assert!(e.contains("parsing"), "{e}");
}

/// A thread serving a fake Prometheus `query_range` and a webhook; keeps webhook bodies.
fn fake_server(hooks: Arc<Mutex<Vec<String>>>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let head_end = loop {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
                match s.read(&mut tmp) {
                    Ok(0) | Err(_) => break 0,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            };
            if head_end == 0 {
                continue;
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let path = head
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_string();
            let body = if head.starts_with("POST") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match s.read(&mut tmp) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let end = buf.len().min(head_end + len);
                hooks
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[head_end..end]).to_string());
                String::new()
            } else {
                let param = |name: &str| {
                    path.split(['?', '&'])
                        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                let (start, end, step) = (param("start"), param("end"), param("step"));
                let series = |name: &str, scale: f64| {
                    let mut pts = Vec::new();
                    let mut t = start;
                    while t <= end + 1e-9 && step > 0.0 {
                        let v = ((t as u64 * 7) % 11) as f64 * scale;
                        pts.push(format!("[{t:.3},\"{v}\"]"));
                        t += step;
                    }
                    format!(
                        r#"{{"metric":{{"__name__":"{name}"}},"values":[{}]}}"#,
                        pts.join(",")
                    )
                };
                let which = if path.contains("query=lat") {
                    series("lat", 2.0)
                } else {
                    series("ops", 1.0)
                };
                format!(
                    r#"{{"status":"success","data":{{"resultType":"matrix","result":[{which}]}}}}"#
                )
            };
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[tokio::test]
async fn once_against_prometheus_prints_one_json_event_and_posts_it() {
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let addr = fake_server(hooks.clone());
    let prom = format!("http://{addr}");
    let hook = format!("http://{addr}/hook");
    let args = parse(&[
        "--prometheus",
        &prom,
        "--query",
        "ops",
        "--query",
        "lat",
        "--watch",
        "*",
        "--once",
        "--json",
        "--webhook",
        &hook,
    ])
    .unwrap();
    let mut out = Vec::new();
    run_with(args, &mut out, std::future::pending())
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let ev: common::events::Event = serde_json::from_str(lines[0]).unwrap();
    assert_eq!((ev.a.key.as_str(), ev.b.key.as_str()), ("lat", "ops"));
    assert_eq!(ev.window.samples, 60);
    // run_with waits for the webhook delivery before returning.
    let got = hooks.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let posted: common::events::Event = serde_json::from_str(&got[0]).unwrap();
    assert_eq!(posted, ev);
}

#[tokio::test]
async fn human_output_and_unreachable_sources() {
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let addr = fake_server(hooks);
    let prom = format!("http://{addr}");
    let args = parse(&[
        "--prometheus",
        &prom,
        "--query",
        "ops",
        "--query",
        "lat",
        "--once",
    ])
    .unwrap();
    let mut out = Vec::new();
    run_with(args, &mut out, std::future::pending())
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    // Anomaly rule on by default: these steady series are not anomalous, so no event.
    assert_eq!(text, "");

    let args = parse(&[
        "--prometheus",
        &prom,
        "--query",
        "ops",
        "--query",
        "lat",
        "--once",
        "--watch",
        "*",
    ])
    .unwrap();
    let mut out = Vec::new();
    run_with(args, &mut out, std::future::pending())
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(" correlated r=+1.000 n=60 window="), "{text}");
    assert!(text.trim_end().ends_with("lat ~ ops"), "{text}");

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = l.local_addr().unwrap().to_string();
    drop(l);
    let args = parse(&["--target", &closed, "--once"]).unwrap();
    let e = run_with(args, Vec::new(), std::future::pending())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no source could be read"), "{e}");
}

#[tokio::test]
async fn for_bounds_the_run() {
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let addr = fake_server(hooks);
    let args = parse(&[
        "--prometheus",
        &format!("http://{addr}"),
        "--query",
        "ops",
        "--interval",
        "100ms",
        "--window",
        "2s",
        "--for",
        "350ms",
    ])
    .unwrap();
    let start = std::time::Instant::now();
    run_with(args, Vec::new(), std::future::pending())
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
}
