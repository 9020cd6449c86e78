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
    admin_endpoints: Vec<String>,
    nbd_uri: Option<String>,
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = std::process::Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri).output().expect("qemu-io")
}

fn ok(o: &std::process::Output) -> bool {
    let text = String::from_utf8_lossy(&o.stdout);
    o.status.success() && !text.contains("failed") && !text.contains("Pattern verification")
}

fn alive(pid: u32) -> bool {
    // A zombie nobody has reaped yet (an orphan, waiting for init) has exited.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            let state = st
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_string();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Whether the log holds what a sled controller or head node says once its clean stop is over
/// (its `main`, after everything was shut down; not "stopped leading" or "device thread stopped").
fn stopped_cleanly(log: &str) -> bool {
    log.lines().any(|l| {
        l.contains("\"message\":\"stopped\",\"target\":\"sled_controller\"}")
            || l.contains("\"message\":\"stopped\",\"target\":\"head_node\"}")
    })
}

fn up(dir: &std::path::Path, name: &str) -> (Proc, ClusterInfo) {
    up_with(dir, name, "data", &[])
}

fn up_with(dir: &std::path::Path, name: &str, data: &str, extra: &[&str]) -> (Proc, ClusterInfo) {
    let data = dir.join(data);
    let mut args: Vec<String> = vec![
        "up".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--sled-size".into(),
        "4GiB".into(),
        "--chunk-size".into(),
        "8MiB".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
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
    let heads: Vec<&ProcessInfo> = info.processes.iter().filter(|p| p.role == "head").collect();
    assert_eq!(heads.len(), 3);
    assert_eq!(info.admin_endpoints.len(), 3);
    let out = p.log_text();
    assert!(out.contains("Stockade is up"), "{out}");
    // vol0 exists, is attached, and its URI is printed; data written through it survives.
    let uri = info.nbd_uri.clone().expect("NBD URI in cluster.json");
    assert!(out.contains(&uri), "URI not printed: {out}");
    for e in &info.admin_endpoints {
        assert!(out.contains(e.as_str()), "admin endpoint {e} not printed");
    }
    for h in &heads {
        assert!(
            out.contains(&format!("http://{}/metrics", h.metrics)),
            "metrics URL of {} not printed",
            h.id
        );
    }
    let size = std::process::Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&size.stdout).trim(), "1073741824");
    let w = qemu_io(&uri, &["write -P 0x6b 0 2M", "write -P 0x6c 1020M 1M"]);
    assert!(ok(&w), "{}", String::from_utf8_lossy(&w.stdout));
    // The admin CLI finds the cluster through the data directory.
    let list = std::process::Command::new(bin("stockade"))
        .args(["--data-dir"])
        .arg(dir.path().join("data"))
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(String::from_utf8_lossy(&list.stdout).contains("vol0"));
    for s in &sleds {
        assert!(
            out.contains(&s.listen.to_string()),
            "address of {} not printed",
            s.id
        );
    }
    let first: Vec<_> = info
        .processes
        .iter()
        .map(|s| (s.listen, s.metrics))
        .collect();
    let pids: Vec<u32> = info.processes.iter().map(|s| s.pid).collect();

    // A second `stockade up` on the same data directory is refused.
    let second = std::process::Command::new(bin("stockade"))
        .args(["up", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));
    // vol0 is attached shared, so the README's second attachment of it works.
    let again = std::process::Command::new(bin("stockade"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["volume", "attach", "vol0", "--shared"])
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("nbd://"));

    // A child that dies is reported, once (not at every check of the children).
    let sled3 = info
        .processes
        .iter()
        .find(|p| p.id == "sled-3")
        .unwrap()
        .pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sled3 as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(
        Duration::from_secs(30),
        "the death of sled-3 reported",
        || {
            p.log_text()
                .contains("sled-3 exited unexpectedly")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let said = p.log_text().matches("exited unexpectedly").count();
    assert_eq!(said, 1, "{}", p.log_text());

    // Ctrl-C (SIGINT) stops every other child cleanly.
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
    for name in ["sled-1", "sled-2", "head-1", "head-2", "head-3"] {
        let log = std::fs::read_to_string(dir.path().join(format!("data/{name}/log"))).unwrap();
        assert!(stopped_cleanly(&log), "{name} did not stop cleanly:\n{log}");
    }
    // In order: every head node had stopped before any sled was asked to.
    let stamp = |name: &str, message: &str| -> String {
        let log = std::fs::read_to_string(dir.path().join(format!("data/{name}/log"))).unwrap();
        let line = log
            .lines()
            .rfind(|l| l.contains(&format!("\"message\":\"{message}\"")))
            .unwrap_or_else(|| panic!("{name} never logged {message:?}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["timestamp"].as_str().unwrap().to_string()
    };
    let heads_done = ["head-1", "head-2", "head-3"]
        .iter()
        .map(|h| stamp(h, "stopped"))
        .max()
        .unwrap();
    let sleds_asked = ["sled-1", "sled-2"]
        .iter()
        .map(|s| stamp(s, "shutting down"))
        .min()
        .unwrap();
    assert!(
        heads_done <= sleds_asked,
        "a sled was stopped ({sleds_asked}) before the head nodes were ({heads_done})"
    );

    // Again: same addresses, same devices (not reformatted), same data.
    let (mut p, info) = up(dir.path(), "up2");
    let again: Vec<_> = info
        .processes
        .iter()
        .map(|s| (s.listen, s.metrics))
        .collect();
    assert_eq!(again, first, "ports must be reused");
    let uri = info.nbd_uri.clone().expect("NBD URI");
    let r = qemu_io(
        &uri,
        &[
            "read -P 0x6b 0 2M",
            "read -P 0x6c 1020M 1M",
            "read -P 0 4M 1M",
        ],
    );
    assert!(
        ok(&r),
        "data lost across a restart: {}",
        String::from_utf8_lossy(&r.stdout)
    );

    // A second cluster of another shape runs side by side on other ports.
    let (mut small, other) = up_with(
        dir.path(),
        "up-small",
        "data2",
        &["--sleds", "1", "--heads", "1"],
    );
    assert_eq!(other.processes.len(), 2);
    for o in &other.processes {
        assert!(
            !info
                .processes
                .iter()
                .any(|p| p.listen == o.listen || p.metrics == o.metrics),
            "{} reuses a port of the first cluster",
            o.id
        );
    }
    let uri2 = other.nbd_uri.clone().expect("NBD URI");
    let w = qemu_io(&uri2, &["write -P 0x11 0 1M", "read -P 0x11 0 1M"]);
    assert!(ok(&w), "{}", String::from_utf8_lossy(&w.stdout));
    // kill -9 of `stockade up` itself does not leave its cluster running without it.
    let small_pids: Vec<u32> = other.processes.iter().map(|p| p.pid).collect();
    small.kill9();
    eventually(
        Duration::from_secs(60),
        "the killed supervisor's children to stop",
        || small_pids.iter().all(|p| !alive(*p)).then_some(()),
    );
    let sled_log = std::fs::read_to_string(dir.path().join("data2/sled-1/log")).unwrap();
    assert!(
        stopped_cleanly(&sled_log),
        "sled-1 did not stop cleanly:\n{sled_log}"
    );
    // Restarting it with another number of head nodes is refused at once, saying why.
    let reshaped = std::process::Command::new(bin("stockade"))
        .args(["up", "--heads", "3", "--data-dir"])
        .arg(dir.path().join("data2"))
        .output()
        .unwrap();
    assert!(!reshaped.status.success());
    let err = String::from_utf8_lossy(&reshaped.stderr);
    assert!(err.contains("holds a cluster of 1 head node"), "{err}");
    // Shapes that cannot work are refused before anything starts, saying why.
    for (args, why) in [
        (
            &["--sleds", "1", "--replicas", "3"][..],
            "needs at least as many sleds",
        ),
        (&["--pool-size", "65"][..], "65"),
        (&["--sleds", "0"][..], "--sleds"),
        (&["--heads", "8"][..], "--heads"),
    ] {
        let o = std::process::Command::new(bin("stockade"))
            .arg("up")
            .args(args)
            .arg("--data-dir")
            .arg(dir.path().join("data3"))
            .output()
            .unwrap();
        // Usage errors, like every other command's: exit status 2.
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(
            !dir.path().join("data3/sled-1").exists(),
            "{args:?} started a sled"
        );
    }
    // Detached: `stockade up --detach` leaves once the cluster is ready, and its children keep
    // the data directory locked, so a second `stockade up` cannot start sleds on their devices.
    let run_up = |extra: &[&str]| {
        std::process::Command::new(bin("stockade"))
            .args(["up", "--heads", "1", "--sleds", "1", "--data-dir"])
            .arg(dir.path().join("data2"))
            .args(extra)
            .output()
            .unwrap()
    };
    let detached = run_up(&["--detach"]);
    assert!(
        detached.status.success(),
        "{}",
        String::from_utf8_lossy(&detached.stderr)
    );
    let info2: ClusterInfo = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("data2/cluster.json")).unwrap(),
    )
    .unwrap();
    let detached_pids: Vec<u32> = info2.processes.iter().map(|p| p.pid).collect();
    assert!(detached_pids.iter().all(|p| alive(*p)));
    let twice = run_up(&[]);
    assert!(!twice.status.success());
    let err = String::from_utf8_lossy(&twice.stderr);
    assert!(err.contains("--detach` is still running"), "{err}");
    for pid in &detached_pids {
        assert!(err.contains(&pid.to_string()), "{err} does not name {pid}");
    }
    let sled_log = std::fs::read_to_string(dir.path().join("data2/sled-1/log")).unwrap();
    assert_eq!(
        sled_log.matches("in use by another process").count(),
        0,
        "a second sled was started on the device"
    );
    for pid in &detached_pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }
    eventually(
        Duration::from_secs(60),
        "the detached cluster to stop",
        || detached_pids.iter().all(|p| !alive(*p)).then_some(()),
    );
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

/// Pids of live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Ctrl-C while `stockade up --detach` is still starting: it stops what it started (detached
/// children included) and says so, instead of dying and leaving them running with the lock.
#[test]
fn a_signal_during_the_start_stops_what_had_started() {
    let dir = scratch("up-interrupted");
    let data = dir.path().join("data");
    let args: Vec<String> = [
        "up",
        "--detach",
        "--data-dir",
        &data.display().to_string(),
        "--sled-size",
        "4GiB",
        "--chunk-size",
        "8MiB",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut p = Proc::spawn("up-int", &bin("stockade"), &args, dir.path());
    // The first sled is ready: the head nodes and the default volume are still to come.
    let sled_ready = data.join("sled-1/ready.json");
    eventually(Duration::from_secs(60), "the first sled ready", || {
        assert!(p.is_running(), "stockade up exited:\n{}", p.log_tail(30));
        sled_ready.exists().then_some(())
    });
    let needle = data.display().to_string();
    assert!(!processes_mentioning(&needle).is_empty(), "no child found");
    let pid = p.pid().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    eventually(Duration::from_secs(60), "stockade up to exit", || {
        (!p.is_running()).then_some(())
    });
    let log = p.log_text();
    assert!(
        !log.contains("Stockade is up"),
        "the signal came too late:\n{log}"
    );
    assert!(
        log.contains("interrupted before the cluster was up; stopped what had started"),
        "{log}"
    );
    let left = processes_mentioning(&needle);
    assert!(left.is_empty(), "children left running: {left:?}");
    assert!(!data.join("cluster.json").exists());
    // Nothing holds the directory: it starts again at once.
    let (mut p2, info) = up(dir.path(), "up-int2");
    assert_eq!(info.processes.len(), 6);
    assert!(p2.stop(Duration::from_secs(60)), "{}", p2.log_tail(30));
}

#[test]
fn a_head_node_that_lost_its_state_rebuilds_it_on_the_next_up() {
    let dir = scratch("up-rejoin");
    let (mut p, info) = up(dir.path(), "first");
    let uri = info.nbd_uri.clone().expect("NBD URI");
    let w = qemu_io(&uri, &["write -P 0x5e 0 1M"]);
    assert!(ok(&w), "{}", String::from_utf8_lossy(&w.stdout));
    // vol0 starts with one member and grows to three (partial provisioning): its state is
    // replicated, and so can be rebuilt, once all three hold it.
    eventually(
        Duration::from_secs(60),
        "vol0 to have its three members",
        || {
            let o = std::process::Command::new(bin("stockade"))
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .args(["volume", "show", "vol0"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            (o.status.success()
                && text.lines().any(|l| {
                    l.starts_with("members:")
                        && l.matches(',').count() == 2
                        && !l.contains("growing")
                }))
            .then_some(())
        },
    );
    assert!(p.stop(Duration::from_secs(60)));
    // head-2's disk dies: its state directory is gone.
    let state = dir.path().join("data/head-2/state");
    std::fs::rename(&state, dir.path().join("head-2-state.lost")).unwrap();
    // (cluster.json of the first run is still there: wait for this run to say it is up.)
    let (mut p, _) = up(dir.path(), "second");
    eventually(Duration::from_secs(120), "the second run to be up", || {
        assert!(p.is_running(), "stockade up exited:\n{}", p.log_tail(30));
        p.log_text().contains("Stockade is up").then_some(())
    });
    let out = p.log_text();
    assert!(out.contains("head-2 has lost its state"), "{out}");
    assert!(
        !out.contains("head-1 has lost") && !out.contains("head-3 has lost"),
        "{out}"
    );
    let log = dir.path().join("data/head-2/log");
    eventually(
        Duration::from_secs(60),
        "head-2 to rebuild its state",
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            (!state.join("REJOIN").exists()
                && text.contains("rejoined: this node holds everything committed in its groups"))
            .then_some(())
        },
    );
    let r = qemu_io(&uri, &["read -P 0x5e 0 1M"]);
    assert!(ok(&r), "{}", String::from_utf8_lossy(&r.stdout));
    assert!(p.stop(Duration::from_secs(60)));
}
