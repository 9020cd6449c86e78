//! `attach --local` end to end: the local NBD endpoint, in this process, in front of three real
//! head nodes (Raft over three sleds). Real NBD clients (fio, nbdinfo) use it while the head
//! node it goes through is killed with SIGKILL and restarted; they must see no error, and the
//! data must verify afterwards.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tests::head::Cluster3;
use tools::attach_local::{LocalConfig, LocalEndpoint};

const SIZE: u64 = 64 << 20;
/// The region fio writes and verifies in each pass.
const FIO_SIZE: &str = "32M";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One fio pass: random 64 KiB writes, 16 in flight, each block carrying a crc32c header, then
/// every block read back and verified (or only the verification, with `verify_only`). The seed
/// makes each pass write a different order and different data; the same seed regenerates the
/// same data for `verify_only`.
fn fio(uri: &str, seed: u64, verify_only: bool) -> Output {
    let mut c = Command::new("fio");
    c.args([
        "--name=attach-local",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=16",
        &format!("--size={FIO_SIZE}"),
        "--offset=0",
        &format!("--randseed={seed}"),
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--do_verify=1",
    ]);
    if verify_only {
        c.arg("--verify_only");
    }
    c.output().expect("fio runs")
}

/// Runs fio passes back to back until `stop`; records every pass and the first failure.
struct Writer {
    stop: Arc<AtomicBool>,
    passes: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    thread: JoinHandle<u64>,
}

impl Writer {
    fn start(uri: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let passes = Arc::new(AtomicU64::new(0));
        let failure = Arc::new(Mutex::new(None));
        let thread = {
            let (stop, passes, failure) = (stop.clone(), passes.clone(), failure.clone());
            std::thread::spawn(move || {
                let mut seed = 1;
                while !stop.load(Ordering::Acquire) {
                    seed += 1;
                    let t0 = Instant::now();
                    let out = fio(&uri, seed, false);
                    if !out.status.success() {
                        let msg = format!("fio pass {seed} failed:\n{}", text(&out));
                        *failure.lock().unwrap() = Some(msg);
                        break;
                    }
                    eprintln!("fio pass {seed} ok in {:?}", t0.elapsed());
                    passes.fetch_add(1, Ordering::AcqRel);
                }
                seed
            })
        };
        Self {
            stop,
            passes,
            failure,
            thread,
        }
    }

    /// Fails the test with fio's output once a pass failed (the client saw an error).
    fn check(&self) {
        if let Some(msg) = self.failure.lock().unwrap().as_ref() {
            panic!("the NBD client saw an error: {msg}");
        }
    }

    fn passes(&self) -> u64 {
        self.passes.load(Ordering::Acquire)
    }

    /// Waits until `n` more passes completed.
    fn progress(&self, n: u64, what: &str) {
        let target = self.passes() + n;
        tests::eventually(Duration::from_secs(180), what, || {
            self.check();
            (self.passes() >= target).then_some(())
        });
    }

    /// Stops after the current pass; the seed of the last pass.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        let failure = self.failure.clone();
        let last = self.thread.join().expect("writer thread");
        if let Some(msg) = failure.lock().unwrap().as_ref() {
            panic!("the NBD client saw an error: {msg}");
        }
        last
    }
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    tests::metric_sum(addr, name)
}

/// The index of the head node the endpoint goes through, once it has one.
fn current(ep: &LocalEndpoint, c: &Cluster3) -> usize {
    tests::eventually(
        Duration::from_secs(60),
        "the endpoint on a head node",
        || {
            let h = ep.current_head()?;
            c.heads.iter().position(|x| x.ready.nbd == h)
        },
    )
}

/// Kills the head node the endpoint uses while fio writes, waits for writes to go on through
/// another head node, restarts it.
fn kill_current(ep: &LocalEndpoint, c: &mut Cluster3, w: &Writer, round: u32, metrics: SocketAddr) {
    // Kill while requests are on their way to the cluster, not between two fio passes.
    tests::eventually(Duration::from_secs(60), "requests in flight", || {
        w.check();
        (metric(metrics, "stockade_attach_remote_requests_in_flight") > 0.0).then_some(())
    });
    let i = current(ep, c);
    let killed = c.heads[i].ready.nbd;
    eprintln!("round {round}: killing head{} ({killed}) under load", i + 1);
    c.heads[i].proc.kill9();
    // The endpoint moves to another head node by itself…
    tests::eventually(Duration::from_secs(60), "failover to another head", || {
        w.check();
        ep.current_head().filter(|h| *h != killed)
    });
    // …and the writer completes a whole pass (write and verify) after the kill.
    w.progress(1, "a fio pass after the kill");
    c.heads[i].restart();
    c.heads[i].wait_export("vol0", Duration::from_secs(120));
    eprintln!("round {round}: head{} is back", i + 1);
}

#[test]
fn a_writer_through_attach_local_never_sees_a_head_node_die() {
    let mut c = Cluster3::start(
        "attach-local",
        3,
        "2GiB",
        "8MiB",
        &[&format!("vol0:{SIZE}")],
        &[],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let heads: Vec<SocketAddr> = c.heads.iter().map(|h| h.ready.nbd).collect();
    let ready = c.dir.path().join("attach-local.ready.json");
    let cfg = LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ready_file: Some(ready.clone()),
        ..LocalConfig::new("vol0", heads)
    };
    let ep = rt
        .block_on(LocalEndpoint::start(cfg))
        .expect("endpoint starts");
    let uri = ep.uri();
    let metrics = ep.metrics_addr().expect("metrics address");

    // The ready file names the endpoint; nbdinfo sees the volume through it.
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert_eq!(r["uri"], uri.as_str());
    let out = Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .expect("nbdinfo runs");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).trim(), SIZE.to_string());
    let out = Command::new("nbdinfo").arg(&uri).output().unwrap();
    assert!(
        text(&out).contains("can_multi_conn: true"),
        "{}",
        text(&out)
    );

    // Kill -9 the head node in use twice (each time the one the endpoint moved to), with fio
    // writing and verifying throughout.
    let w = Writer::start(uri.clone());
    w.progress(1, "a first fio pass");
    for round in 1..=2 {
        kill_current(&ep, &mut c, &w, round, metrics);
    }
    w.progress(1, "a fio pass with every head node back");
    let last = w.finish();

    // The last pass's data, read back through a new connection after all of it.
    let out = fio(&uri, last, true);
    assert!(out.status.success(), "final verify:\n{}", text(&out));

    // The endpoint really went through other head nodes, re-sending requests, and failed none.
    assert!(metric(metrics, "stockade_attach_reconnects_total") >= 2.0);
    assert!(metric(metrics, "stockade_attach_connects_total") >= 3.0);
    assert_eq!(
        metric(metrics, "stockade_attach_failed_requests_total"),
        0.0
    );
    assert!(metric(metrics, "stockade_nbd_written_bytes_total") > 0.0);
    let retried = metric(metrics, "stockade_attach_retried_requests_total");
    eprintln!("requests re-sent after a head node died: {retried}");
    assert!(retried >= 1.0);

    // Its metrics are valid Prometheus text and documented.
    let (status, body) = tests::http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    let problems = tests::check_metrics(&body);
    assert!(problems.is_empty(), "{problems:#?}");

    rt.block_on(ep.stop()).expect("endpoint stops");
    assert!(!ready.exists(), "ready file removed");
    let out = Command::new("nbdinfo")
        .args(["--size", &uri])
        .output()
        .unwrap();
    assert!(!out.status.success(), "endpoint still serving");
}

/// The shared real-client acceptance recipe (nbdinfo, qemu-io, qemu-img, nbdcopy, fio verify,
/// nbdsh multi-conn, ext4 on nbdfuse + loop) through the local endpoint instead of a head node:
/// every command, flag and 64-bit request the clients send must survive the extra hop.
#[test]
fn acceptance_with_real_clients_through_attach_local() {
    let c = tests::head::Cluster::start("attach-accept", 3, "4GiB", "64MiB", &["vol0:5GiB"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cfg = LocalConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..LocalConfig::new("vol0", vec![c.head.ready.nbd])
    };
    let ep = rt
        .block_on(LocalEndpoint::start(cfg))
        .expect("endpoint starts");
    tests::run_acceptance(
        "acceptance_with_real_clients_through_attach_local",
        ep.nbd_addr(),
        "vol0",
    );
    rt.block_on(ep.stop()).expect("endpoint stops");
}
