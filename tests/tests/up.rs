//! `stockade up`: the one-command cluster.

use std::time::Duration;
use tests::{Proc, bin, eventually, http_get, scratch};

#[derive(Debug, serde::Deserialize)]
struct ProcessInfo {
    role: String,
    id: String,
    pid: u32,
    listen: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
}

#[derive(Debug, serde::Deserialize)]
struct ClusterInfo {
    processes: Vec<ProcessInfo>,
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

fn up(dir: &std::path::Path, name: &str) -> (Proc, ClusterInfo) {
    let data = dir.join("data");
    let args: Vec<String> = vec![
        "up".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--sled-size".into(),
        "1GiB".into(),
        "--chunk-size".into(),
        "8MiB".into(),
    ];
    let mut p = Proc::spawn(name, &bin("stockade"), &args, dir);
    let cluster_json = data.join("cluster.json");
    let info: ClusterInfo = eventually(Duration::from_secs(120), "cluster.json", || {
        assert!(p.is_running(), "stockade up exited:\n{}", p.log_tail(30));
        std::fs::read_to_string(&cluster_json)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
    });
    (p, info)
}

#[test]
fn up_starts_the_cluster_stops_it_and_restarts_on_the_same_data() {
    let dir = scratch("up");
    let (mut p, info) = up(dir.path(), "up1");
    let sleds: Vec<&ProcessInfo> = info.processes.iter().filter(|p| p.role == "sled").collect();
    assert_eq!(sleds.len(), 3);
    for s in &sleds {
        assert!(alive(s.pid), "{} not running", s.id);
        let (status, body) = http_get(s.metrics, "/metrics").unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("stockade_sled_device_chunks"));
        std::net::TcpStream::connect(s.listen).expect("sled listening");
    }
    let out = p.log_text();
    assert!(out.contains("Stockade is up"), "{out}");
    for s in &sleds {
        assert!(
            out.contains(&s.listen.to_string()),
            "address of {} not printed",
            s.id
        );
    }
    let first: Vec<_> = sleds.iter().map(|s| (s.listen, s.metrics)).collect();
    let pids: Vec<u32> = sleds.iter().map(|s| s.pid).collect();

    // A second `stockade up` on the same data directory is refused.
    let second = std::process::Command::new(bin("stockade"))
        .args(["up", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));

    // Ctrl-C (SIGINT) stops every child cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    eventually(Duration::from_secs(60), "stockade up to exit", || {
        (!p.is_running()).then_some(())
    });
    for pid in pids {
        assert!(!alive(pid), "child {pid} still running after Ctrl-C");
    }
    for s in 1..=3 {
        let log = std::fs::read_to_string(dir.path().join(format!("data/sled-{s}/log"))).unwrap();
        assert!(
            log.contains("stopped"),
            "sled-{s} did not stop cleanly:\n{log}"
        );
    }

    // Again: same addresses, same devices (not reformatted).
    let (mut p, info) = up(dir.path(), "up2");
    let again: Vec<_> = info
        .processes
        .iter()
        .filter(|p| p.role == "sled")
        .map(|s| (s.listen, s.metrics))
        .collect();
    assert_eq!(again, first, "ports must be reused");
    for s in 1..=3 {
        let log = std::fs::read_to_string(dir.path().join(format!("data/sled-{s}/log"))).unwrap();
        assert_eq!(
            log.matches("formatted device").count(),
            1,
            "sled-{s} was formatted twice"
        );
    }
    assert!(p.stop(Duration::from_secs(60)));
}
