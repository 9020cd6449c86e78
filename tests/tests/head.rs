//! The head node on real sleds, driven by real NBD clients.

use std::process::Command;
use std::time::Duration;
use tests::head::Cluster;
use tests::{check_metrics, http_get, workspace};

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(uri).output().expect("qemu-io runs")
}

fn ok(out: &std::process::Output) -> bool {
    // qemu-io exits 0 even when a command fails; failures print to stderr/stdout.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success() && !text.contains("failed") && !text.contains("Pattern verification")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        // Internal groups (the metadata group, pool groups) are not the test's volume.
        .filter(|l| !l.contains("volume=\"_"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The shared acceptance recipe (nbdinfo, qemu-io, qemu-img, nbdcopy, fio verify, nbdsh
/// multi-conn, ext4 on nbdfuse + loop) against a head node with three sleds and a thin 5 GiB
/// volume, with QEMU required to negotiate extended headers.
#[test]
fn acceptance_with_real_clients_on_three_sleds() {
    let c = Cluster::start("head-accept", 3, "4GiB", "64MiB", &["vol0:5GiB"]);
    tests::run_acceptance(
        "acceptance_with_real_clients_on_three_sleds",
        c.head.ready.nbd,
        "vol0",
    );
    // Every replica was written: each sled holds chunks of the volume.
    for s in &c.sleds {
        assert!(metric(s.ready.metrics, "stockade_sled_device_chunks_used") > 0.0);
    }
}

#[test]
fn data_survives_a_head_restart_and_the_epoch_rises() {
    let mut c = Cluster::start("head-restart", 3, "1GiB", "8MiB", &["vol0:256MiB"]);
    let uri = c.head.uri("vol0");
    let w = qemu_io(&uri, &["write -P 0x5a 0 1M", "write -P 0x6b 100M 64k"]);
    assert!(ok(&w), "{}", text(&w));
    let e1 = metric(c.head.ready.admin, "stockade_volume_epoch");
    assert!(e1 >= 1.0);
    assert!(c.head.proc.stop(Duration::from_secs(30)), "clean stop");
    c.head.restart();
    c.head.wait_export("vol0", Duration::from_secs(60));
    // Every leadership claims the sleds with a new epoch (its term).
    let admin = c.head.ready.admin;
    tests::eventually(
        Duration::from_secs(30),
        "a higher epoch after restart",
        || (metric(admin, "stockade_volume_epoch") > e1).then_some(()),
    );
    let r = qemu_io(
        &c.head.uri("vol0"),
        &[
            "read -P 0x5a 0 1M",
            "read -P 0x6b 100M 64k",
            "read -P 0 2M 1M",
        ],
    );
    assert!(ok(&r), "{}", text(&r));
    // kill -9 loses nothing acknowledged either.
    let w = qemu_io(&c.head.uri("vol0"), &["write -P 0x7c 4M 256k"]);
    assert!(ok(&w), "{}", text(&w));
    c.head.proc.kill9();
    c.head.restart();
    c.head.wait_export("vol0", Duration::from_secs(60));
    let r = qemu_io(
        &c.head.uri("vol0"),
        &["read -P 0x7c 4M 256k", "read -P 0x5a 0 1M"],
    );
    assert!(ok(&r), "{}", text(&r));
}

/// A ledger writer (`tests::writer`) over the whole of `vol0` (64 MiB) on a thread of its own:
/// its ledger, its stop flag and its thread.
fn ledger_writer(
    nbd: std::net::SocketAddr,
    seed: u64,
) -> (
    std::sync::Arc<std::sync::Mutex<tests::writer::Ledger>>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};
    let ledger = Arc::new(Mutex::new(tests::writer::Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let (ledger, stop) = (ledger.clone(), stop.clone());
        let target = Arc::new(Mutex::new(nbd));
        let pause = Arc::new(AtomicBool::new(false));
        std::thread::spawn(move || {
            tests::writer::writer("vol0", seed, 64 << 20, target, ledger, stop, pause)
        })
    };
    (ledger, stop, t)
}

/// How a sled is taken away and brought back.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outage {
    /// kill -9, then restart on the same device.
    Kill,
    /// SIGSTOP (hung: connections open, nothing answered), then SIGCONT.
    Freeze,
}

/// A sled goes away under a writer: reads fall back to the other replicas, the leader records
/// the sled stale and writes go on with the other two (no stall, nothing lost); when the sled
/// is back it is resynchronised and recorded current; then, with the two other sleds killed,
/// every acknowledged write reads back from it alone.
fn stale_and_resync(name: &str, outage: Outage) {
    use std::sync::atomic::Ordering;
    use tests::writer::verify;

    let mut c = Cluster::start_with(
        name,
        3,
        "1GiB",
        "8MiB",
        &["vol0:64MiB"],
        &["--sled-timeout", "2s"],
    );
    let (admin, nbd) = (c.head.ready.admin, c.head.ready.nbd);
    let uri = c.head.uri("vol0");
    let w = qemu_io(&uri, &["write -P 0x33 0 8M"]);
    assert!(ok(&w), "{}", text(&w));
    tests::eventually(Duration::from_secs(30), "write-back", || {
        (metric(admin, "stockade_volume_unflushed_bytes") == 0.0).then_some(())
    });
    match outage {
        Outage::Kill => c.sleds[0].proc.kill9(),
        Outage::Freeze => c.sleds[0].proc.sigstop(),
    }
    // Whether the head node had found the sled away on its own before the reads (see below).
    let known_away = c.head.proc.log_text().contains("cannot reach sled");
    // Several reads: they start on different replicas, so one meets the missing sled (or
    // skips it, once the head node has found it unreachable: then it is tried last).
    let r = qemu_io(
        &uri,
        &[
            "read -P 0x33 0 2M",
            "read -P 0x33 2M 2M",
            "read -P 0x33 4M 2M",
            "read -P 0x33 6M 2M",
        ],
    );
    assert!(ok(&r), "{}", text(&r));
    // A hung sled is not known to be away until a request to it times out: one of the reads
    // waited for it and fell back — unless, before the reads began, a request of the head node's
    // own (its periodic sled report, or a slow request on a busy machine) had already timed out
    // and its reconnect failed, which it logs; then the reads tried it last. (A killed one may
    // be skipped without a fallback.)
    if outage == Outage::Freeze {
        let fell_back = metric(admin, "stockade_volume_read_fallbacks_total") > 0.0;
        assert!(
            fell_back || known_away,
            "no read met the hung sled, nor was it found away"
        );
    }
    assert_eq!(metric(admin, "stockade_volume_stale_replicas"), 0.0);

    // A writer over the whole volume: most chunks are not allocated yet, so it also allocates
    // chunks while a replica is away.
    let (ledger, stop, t) = ledger_writer(nbd, 7);
    let writes = || ledger.lock().unwrap().writes;
    tests::eventually(Duration::from_secs(60), "the sled recorded stale", || {
        (metric(admin, "stockade_volume_stale_replicas") == 1.0).then_some(())
    });
    // Write-back goes on without it: writes keep being acknowledged.
    let w1 = writes();
    tests::eventually(Duration::from_secs(30), "writes go on", || {
        (writes() > w1 + 200).then_some(())
    });
    match outage {
        Outage::Kill => c.sleds[0].restart(),
        Outage::Freeze => c.sleds[0].proc.sigcont(),
    }
    tests::eventually(Duration::from_secs(60), "the sled resynchronised", || {
        (metric(admin, "stockade_volume_stale_replicas") == 0.0).then_some(())
    });
    assert!(metric(admin, "stockade_volume_resync_bytes_total") > 0.0);
    // Writes after the resynchronisation reach all three sleds.
    let w2 = writes();
    tests::eventually(Duration::from_secs(30), "writes after the resync", || {
        (writes() > w2 + 100).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    tests::eventually(Duration::from_secs(30), "write-back", || {
        (metric(admin, "stockade_volume_unflushed_bytes") == 0.0).then_some(())
    });
    let ledger = ledger.lock().unwrap();
    eprintln!(
        "{outage:?}: {} writes, longest pause between two acknowledged writes {:?}",
        ledger.writes, ledger.longest_gap
    );
    // The resynchronised sled alone holds everything.
    c.sleds[1].proc.kill9();
    c.sleds[2].proc.kill9();
    verify(nbd, "vol0", &ledger, "from the resynchronised sled alone");
}

#[test]
fn a_dead_sled_goes_stale_and_is_resynced_when_it_returns() {
    stale_and_resync("head-stale", Outage::Kill);
}

/// A sled back from an outage is sent only the chunks it missed: those written after the
/// flushed index at which it was recorded stale (one write-back had not reached it yet, one came
/// while it was stale), not the whole volume; the chunks it kept are intact, as the reads from
/// it alone show.
#[test]
fn a_returning_sled_is_sent_only_the_chunks_it_missed() {
    const MIB: f64 = 1048576.0;
    let mut c = Cluster::start_with(
        "head-missed",
        3,
        "1GiB",
        "8MiB",
        &["vol0:64MiB"],
        &["--sled-timeout", "2s"],
    );
    let admin = c.head.ready.admin;
    let uri = c.head.uri("vol0");
    // Every one of the 8 chunks written and flushed.
    let w = qemu_io(&uri, &["write -P 0x11 0 64M"]);
    assert!(ok(&w), "{}", text(&w));
    tests::eventually(Duration::from_secs(30), "write-back", || {
        (metric(admin, "stockade_volume_unflushed_bytes") == 0.0).then_some(())
    });
    let used =
        |s: &tests::sled::SledProc| metric(s.ready.metrics, "stockade_sled_device_chunks_used");
    let used_before = used(&c.sleds[0]);
    c.sleds[0].proc.kill9();
    // Chunks 0 and 2: their write-back fails on the dead sled until it is recorded stale.
    let w = qemu_io(&uri, &["write -P 0x22 0 1M", "write -P 0x22 20M 1M"]);
    assert!(ok(&w), "{}", text(&w));
    tests::eventually(Duration::from_secs(60), "the sled recorded stale", || {
        (metric(admin, "stockade_volume_stale_replicas") == 1.0).then_some(())
    });
    // Chunk 5 written and chunk 7 trimmed whole (freed on the other sleds), while it is stale.
    let w = qemu_io(&uri, &["write -P 0x33 40M 1M", "discard 56M 8M"]);
    assert!(ok(&w), "{}", text(&w));
    tests::eventually(Duration::from_secs(30), "write-back", || {
        (metric(admin, "stockade_volume_unflushed_bytes") == 0.0).then_some(())
    });
    assert_eq!(metric(admin, "stockade_volume_resync_bytes_total"), 0.0);
    c.sleds[0].restart();
    tests::eventually(Duration::from_secs(60), "the sled resynchronised", || {
        (metric(admin, "stockade_volume_stale_replicas") == 0.0).then_some(())
    });
    // Three 8 MiB chunks (a retried pass may count some twice), never the whole 64 MiB; chunk 7
    // freed there too, as every current replica agrees it holds nothing.
    let copied = metric(admin, "stockade_volume_resync_bytes_total") / MIB;
    assert!(
        (24.0..64.0).contains(&copied),
        "{copied} MiB copied; the sled missed 3 chunks of 8 MiB"
    );
    assert_eq!(
        used(&c.sleds[0]),
        used_before - 1.0,
        "the trimmed chunk was not freed on the returning sled"
    );
    // The resynchronised sled alone serves every byte.
    c.sleds[1].proc.kill9();
    c.sleds[2].proc.kill9();
    let r = qemu_io(
        &uri,
        &[
            "read -P 0x22 0 1M",
            "read -P 0x11 1M 19M",
            "read -P 0x22 20M 1M",
            "read -P 0x11 21M 19M",
            "read -P 0x33 40M 1M",
            "read -P 0x11 41M 15M",
            "read -P 0 56M 8M",
        ],
    );
    assert!(ok(&r), "{}", text(&r));
}

/// A sled whose device is replaced (a blank one forced into it) comes back before anything
/// records it stale: it still counts as current, but it lost the chunks of that device. The
/// head node must notice on reconnecting, read those chunks from the other replicas (never as
/// the zeros the sled would return), record the sled stale and copy them back.
#[test]
fn a_sled_that_lost_a_device_is_never_read_for_its_chunks_and_gets_them_back() {
    use tests::head::HeadProc;
    use tests::sled::SledProc;
    let dir = tests::scratch("head-lost-device");
    let (key_path, _) = tests::key_file(dir.path());
    let conf = |i: usize, force: bool| {
        let path = dir.path().join(format!("sled{i}.toml"));
        let dev = |d: &str| {
            dir.path()
                .join(format!("sled{i}{d}.img"))
                .display()
                .to_string()
        };
        let force = if force { "format = \"force\"\n" } else { "" };
        std::fs::write(
            &path,
            format!(
                "listen = \"127.0.0.1:0\"\nmetrics-listen = \"127.0.0.1:0\"\ncluster-key-file = \"{}\"\n\n[[device]]\npath = \"{}\"\nsize = \"128MiB\"\n\n[[device]]\npath = \"{}\"\nsize = \"128MiB\"\n{force}",
                key_path.display(),
                dev("a"),
                dev("b")
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let mut sleds: Vec<SledProc> = (1..=3)
        .map(|i| {
            SledProc::start(
                &format!("sled{i}"),
                dir.path(),
                &key_path,
                &[],
                None,
                &["--config", &conf(i, false), "--chunk-size", "8MiB"],
            )
        })
        .collect();
    let addrs: Vec<_> = sleds.iter().map(|s| s.ready.listen).collect();
    let head = HeadProc::start(
        "head1",
        dir.path(),
        &key_path,
        1,
        &addrs,
        &["vol0:64MiB"],
        &["--stale-after", "60s"],
    );
    head.wait_export("vol0", tests::sled::START_TIMEOUT);
    let admin = head.ready.admin;
    let uri = head.uri("vol0");
    let w = qemu_io(&uri, &["write -P 0x5c 0 64M"]);
    assert!(ok(&w), "{}", text(&w));
    tests::eventually(Duration::from_secs(30), "write-back", || {
        (metric(admin, "stockade_volume_unflushed_bytes") == 0.0).then_some(())
    });
    // Sled 1's device b dies; a blank one is forced in; the sled is back within a second.
    assert!(sleds[0].proc.stop(Duration::from_secs(30)));
    std::fs::remove_file(dir.path().join("sled1b.img")).unwrap();
    conf(1, true);
    sleds[0].restart();
    // Reads rotate over the replicas: six passes read every chunk from sled 1 at least once.
    for pass in 0..6 {
        let r = qemu_io(&uri, &["read -P 0x5c 0 64M"]);
        assert!(ok(&r), "pass {pass}: {}", text(&r));
    }
    assert!(
        head.proc.log_text().contains("a sled lacks chunks"),
        "the lost chunks were not noticed"
    );
    assert!(metric(admin, "stockade_volume_lacking_chunks_total") >= 1.0);
    tests::eventually(Duration::from_secs(60), "the sled resynchronised", || {
        (metric(admin, "stockade_volume_resync_bytes_total") > 0.0
            && metric(admin, "stockade_volume_stale_replicas") == 0.0)
            .then_some(())
    });
    // Sled 1 alone serves every byte.
    sleds[1].proc.kill9();
    sleds[2].proc.kill9();
    let r = qemu_io(&uri, &["read -P 0x5c 0 64M"]);
    assert!(ok(&r), "{}", text(&r));
}

/// A sled that restarts quickly (before it would be recorded stale) may have lost the cached
/// write-back it had acknowledged, had the restart been a power loss: the leader notices that
/// its flush came on a new connection and writes the unflushed tail back again before it records
/// anything flushed. (A kill -9 keeps the device cache, so the data check below cannot tell a
/// missing rewrite; the counter shows it happened, and the data must still all be there.)
#[test]
fn a_sled_restarted_under_write_back_gets_the_unflushed_tail_again() {
    use std::sync::atomic::Ordering;
    use tests::writer::verify;

    let mut c = Cluster::start_with(
        "head-rewrite",
        3,
        "1GiB",
        "8MiB",
        &["vol0:64MiB"],
        &["--stale-after", "60s"],
    );
    let (admin, nbd) = (c.head.ready.admin, c.head.ready.nbd);
    let (ledger, stop, t) = ledger_writer(nbd, 11);
    let writes = || ledger.lock().unwrap().writes;
    tests::eventually(Duration::from_secs(30), "writes", || {
        (writes() > 200).then_some(())
    });
    assert_eq!(
        metric(admin, "stockade_volume_writeback_rewrites_total"),
        0.0
    );
    c.sleds[0].proc.kill9();
    c.sleds[0].restart();
    tests::eventually(
        Duration::from_secs(60),
        "the unflushed tail written again",
        || (metric(admin, "stockade_volume_writeback_rewrites_total") > 0.0).then_some(()),
    );
    let w = writes();
    tests::eventually(Duration::from_secs(30), "writes go on", || {
        (writes() > w + 200).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    t.join().unwrap();
    tests::eventually(Duration::from_secs(30), "write-back", || {
        (metric(admin, "stockade_volume_unflushed_bytes") == 0.0).then_some(())
    });
    assert_eq!(metric(admin, "stockade_volume_stale_replicas"), 0.0);
    let ledger = ledger.lock().unwrap();
    c.sleds[1].proc.kill9();
    c.sleds[2].proc.kill9();
    verify(nbd, "vol0", &ledger, "from the restarted sled alone");
}

/// A hung sled (SIGSTOP: its sockets accept bytes, nothing answers) is timed out like a dead
/// one; when it resumes, the requests it had buffered from the closed connection run before
/// anything of the resynchronisation (the new connection superseded the old one), so they
/// cannot overwrite newer data.
#[test]
fn a_hung_sled_times_out_goes_stale_and_is_resynced_when_it_resumes() {
    stale_and_resync("head-hung", Outage::Freeze);
}

#[test]
fn a_full_sled_gives_enospc_and_the_volume_stays_readable() {
    // 64 MiB devices with 8 MiB chunks hold a handful of chunks each: a 1 GiB volume cannot fit.
    // Thin provisioning far beyond the sleds (the overcommit check would refuse it).
    let c = Cluster::start_with(
        "head-enospc",
        3,
        "64MiB",
        "8MiB",
        &["vol0:1GiB"],
        &["--overcommit-ratio", "100"],
    );
    let uri = c.head.uri("vol0");
    let w = qemu_io(&uri, &["write -P 0x10 0 1M"]);
    assert!(ok(&w), "{}", text(&w));
    let mut failed = None;
    for chunk in 1..64u64 {
        let w = qemu_io(&uri, &[&format!("write -P 0x20 {}M 4k", chunk * 8)]);
        if !ok(&w) {
            failed = Some(text(&w));
            break;
        }
    }
    let msg = failed.expect("sleds never ran out of space");
    assert!(msg.contains("No space left"), "{msg}");
    let r = qemu_io(&uri, &["read -P 0x10 0 1M"]);
    assert!(ok(&r), "{}", text(&r));
}

#[test]
fn block_status_reports_unwritten_chunks_as_holes() {
    let c = Cluster::start("head-map", 3, "1GiB", "8MiB", &["vol0:64MiB"]);
    let uri = c.head.uri("vol0");
    let map = |uri: &str| {
        let out = Command::new("nbdinfo")
            .args(["--map", "--json", uri])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    };
    let m = map(&uri);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["type"], 3, "a fresh volume is one hole: {m:?}");
    let w = qemu_io(&uri, &["write -P 1 9M 4k"]);
    assert!(ok(&w), "{}", text(&w));
    let m = map(&uri);
    // Chunk 1 (8-16 MiB) is data now; the rest is still a hole.
    let data: Vec<_> = m.iter().filter(|e| e["type"] == 0).collect();
    assert_eq!(data.len(), 1, "{m:?}");
    assert_eq!(data[0]["offset"], 8 << 20);
    assert_eq!(data[0]["length"], 8 << 20);
    // Trimming the whole chunk frees it: a hole again, reading zeros.
    let t = qemu_io(&uri, &["discard 8M 8M", "read -P 0 8M 8M"]);
    assert!(ok(&t), "{}", text(&t));
    let m = map(&uri);
    assert_eq!(m.len(), 1, "the whole volume is one extent again: {m:?}");
    assert_eq!(m[0]["type"], 3, "a hole again: {m:?}");
    // Write-zeroes without may-unmap (NBD_CMD_FLAG_NO_HOLE) keeps the space: chunk 2 (16-24
    // MiB), written and then zeroed, stays allocated (not a hole) and reads zeros, at once
    // (the committed zero) and after write-back.
    let z = qemu_io(
        &uri,
        &["write -P 7 20M 4k", "write -z 16M 8M", "read -P 0 16M 8M"],
    );
    assert!(ok(&z), "{}", text(&z));
    let m = map(&uri);
    let at = |off: u64| {
        m.iter()
            .find(|e| {
                let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                o <= off && off < o + l
            })
            .unwrap_or_else(|| panic!("no extent at {off}: {m:?}"))
    };
    assert_eq!(
        at(16 << 20)["type"].as_u64().unwrap() & 1,
        0,
        "zeroed with NO_HOLE, yet a hole: {m:?}"
    );
    assert_eq!(at(8 << 20)["type"], 3, "{m:?}");
    // FAST_ZERO: whole blocks are zeroed; a partial block (a read-modify-write) is refused
    // with ENOTSUP, as the spec asks of a zero that is no faster than a write.
    // nbdsh must run on Debian's python3 (python3-libnbd), whatever else is on PATH.
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new("nbdsh")
        .env("PATH", path)
        .args(["-u", &uri, "-c"])
        .arg(
            "import errno\n\
             h.zero(4096, 4096, nbd.CMD_FLAG_FAST_ZERO)\n\
             try:\n    h.zero(512, 512, nbd.CMD_FLAG_FAST_ZERO)\n    print('accepted')\n\
             except nbd.Error as e:\n    print('errno', e.errno in ('ENOTSUP', 'EOPNOTSUPP', errno.ENOTSUP))\n",
        )
        .output()
        .unwrap();
    assert_eq!(text(&out).trim(), "errno True", "{}", text(&out));
}

#[test]
fn head_node_metrics_pass_promtool_and_are_documented() {
    let c = Cluster::start("head-metrics", 3, "1GiB", "8MiB", &["vol0:64MiB"]);
    let w = qemu_io(
        &c.head.uri("vol0"),
        &["write -P 1 0 64k", "read -P 1 0 64k"],
    );
    assert!(ok(&w), "{}", text(&w));
    let (status, body) = http_get(c.head.ready.admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "stockade_nbd_requests_total",
        "stockade_nbd_request_duration_seconds_bucket",
        "stockade_volume_stage_duration_seconds_bucket",
        "stockade_volume_epoch",
        "process_resident_memory_bytes",
    ] {
        assert!(body.contains(name), "{name} missing");
    }
    let problems = check_metrics(&body);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Write-back reaches the sleds as cached writes, and they are flushed before the group
    // records the data flushed (and may compact its log below it).
    let admin = c.head.ready.admin;
    tests::eventually(
        Duration::from_secs(20),
        "the write recorded flushed",
        || (metric(admin, "stockade_volume_flushed_index") > 0.0).then_some(()),
    );
    for s in &c.sleds {
        let m = s.ready.metrics;
        let cached = metric(
            m,
            "stockade_sled_requests_total{op=\"write_cached\",result=\"ok\"}",
        );
        let flushes = metric(
            m,
            "stockade_sled_requests_total{op=\"flush\",result=\"ok\"}",
        );
        let durable = metric(
            m,
            "stockade_sled_requests_total{op=\"write\",result=\"ok\"}",
        );
        assert!(
            cached >= 1.0 && flushes >= 1.0,
            "sled {m}: {cached} cached writes, {flushes} flushes"
        );
        assert_eq!(
            durable, 0.0,
            "sled {m}: write-back must not pay for durable writes"
        );
    }
}

/// The copy of the acceptance script kept in the repository (for clones without the shared
/// directory) is the shared one, when both are there.
#[test]
fn the_kept_acceptance_script_is_the_shared_one() {
    let shared = workspace().join("../shared/acceptance/nbd-clients.sh");
    let kept = workspace().join("tests/acceptance/nbd-clients.sh");
    let kept_text = std::fs::read_to_string(&kept).expect("tests/acceptance/nbd-clients.sh");
    assert!(kept_text.contains("REQUIRE_EXTENDED_HEADERS"));
    if let Ok(shared_text) = std::fs::read_to_string(&shared) {
        assert!(
            shared_text == kept_text,
            "{} differs from {}: copy the shared one over",
            kept.display(),
            shared.display()
        );
    }
}
