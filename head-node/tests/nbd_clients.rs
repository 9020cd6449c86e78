//! Real, unmodified NBD clients (libnbd tools, QEMU 10, fio) against the server running in the
//! test process over the in-memory backend. A test skips, saying so, only when its client is
//! not installed.

mod support;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use head_node::nbd::{Extent, MemVolume, Volume};
use support::*;

fn installed(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// False when one of `bins` is missing and skipping is allowed (`STOCKADE_ALLOW_SKIP=1`, on a
/// developer machine); otherwise a missing tool fails the test: the test command installs them
/// all, so a silent skip would hide a failure.
fn have(test: &str, bins: &[&str]) -> bool {
    for b in bins {
        if !installed(b) {
            cannot_run(test, &format!("{b} is not installed"));
            return false;
        }
    }
    true
}

/// Fails the test, unless skipping is allowed (then prints why; the caller returns).
fn cannot_run(test: &str, why: &str) {
    assert!(
        std::env::var_os("STOCKADE_ALLOW_SKIP").is_some(),
        "{test} cannot run: {why} (tests/run.sh installs what the suite needs; set \
         STOCKADE_ALLOW_SKIP=1 to skip instead)"
    );
    eprintln!("SKIP {test}: {why}");
}

/// Runs a client; nbdsh needs Debian's python first on PATH.
async fn run(bin: &str, args: &[&str], timeout_s: u64) -> Output {
    let path = format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default());
    let child = tokio::process::Command::new(bin)
        .args(args)
        .env("PATH", path)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(timeout_s), child)
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{bin}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: &Output) -> String {
    let t = text(o);
    assert!(o.status.success(), "{t}");
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_block_sizes_and_multi_conn() {
    if !have("nbdinfo", &["nbdinfo"]) {
        return;
    }
    let srv = TestServer::start(vec![
        MemVolume::new("vol", 5 * GIB).with_description("five gigs"),
        MemVolume::new("single", 64 * MIB).with_multi_conn(false),
    ])
    .await;
    let o = run("nbdinfo", &["--json", &srv.uri("vol")], 60).await;
    ok(&o);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("nbdinfo JSON");
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "vol");
    assert_eq!(e["export-size"], 5 * GIB);
    assert_eq!(e["description"], "five gigs");
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["can_multi_conn"], true);
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
    ] {
        assert_eq!(e[cap], true, "{cap}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(j["structured"], true);
    assert!(
        e["contexts"]
            .as_array()
            .unwrap()
            .contains(&"base:allocation".into())
    );
    let o = run("nbdinfo", &["--json", &srv.uri("single")], 60).await;
    ok(&o);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["exports"][0]["can_multi_conn"], false);
    // --list enumerates both exports.
    let o = run(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://{}", srv.addr)],
        60,
    )
    .await;
    ok(&o);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut names: Vec<_> = j["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["single", "vol"]);
    // --map reads base:allocation.
    let o = run("nbdinfo", &["--map", &srv.uri("vol")], 60).await;
    assert!(ok(&o).contains("hole,zero"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_including_unaligned() {
    if !have("qemu-io", &["qemu-io"]) {
        return;
    }
    let srv = TestServer::start(vec![MemVolume::new("vol", GIB)]).await;
    let uri = srv.uri("vol");
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0x11 4097 3000",
            "-c",
            "read -P 0x11 4097 3000",
            "-c",
            "read -P 0xab 0 4097",
            "-c",
            "read -P 0xab 7097 1000",
            "-c",
            "write -f -P 0xcd 1M 64k",
            "-c",
            "aio_write -P 0x21 8M 64k",
            "-c",
            "aio_write -P 0x22 9M 64k",
            "-c",
            "aio_flush",
            "-c",
            "read -P 0x21 8M 64k",
            "-c",
            "read -P 0x22 9M 64k",
            "-c",
            "write -P 0x5a 1073741312 512",
            "-c",
            "read -P 0x5a 1073741312 512",
            &uri,
        ],
        120,
    )
    .await;
    let t = ok(&o);
    assert!(!t.contains("failed"), "{t}");
    // Check through the backend, not only through the client.
    let v = srv.vol("vol");
    let b = v.read(4096, 4096).await.unwrap();
    assert_eq!(b[0], 0xab);
    assert!(b[1..3001].iter().all(|&x| x == 0x11));
    assert!(b[3001..].iter().all(|&x| x == 0xab));
    assert!(v.read(MIB, 65536).await.unwrap().iter().all(|&x| x == 0xcd));
    // Past the end is an error.
    let o = run(
        "qemu-io",
        &["-f", "raw", "-c", "read 1073741312 1024", &uri],
        60,
    )
    .await;
    assert!(
        !o.status.success() || text(&o).contains("failed"),
        "{}",
        text(&o)
    );
}

/// QEMU 10 negotiates extended headers with this server (the acceptance script's check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_negotiates_extended_headers() {
    if !have("qemu-img", &["qemu-img"]) {
        return;
    }
    let srv = TestServer::start(vec![MemVolume::new("vol", GIB)]).await;
    let o = run(
        "qemu-img",
        &["--trace", "nbd_*", "info", "-f", "raw", &srv.uri("vol")],
        60,
    )
    .await;
    let t = ok(&o);
    assert!(
        t.lines()
            .any(|l| l.contains("nbd_receive_option_reply")
                && l.contains("extended headers), type 1 ")),
        "no acknowledged NBD_OPT_EXTENDED_HEADERS in the trace:\n{t}"
    );
    assert!(t.contains("virtual size: 1 GiB"), "{t}");
}

/// One BLOCK_STATUS request covering a 6 GiB export, answered with 64-bit extents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_map_on_a_thin_volume_over_4_gib() {
    if !have("qemu-img", &["qemu-img"]) {
        return;
    }
    let size = 6 * GIB;
    let srv = TestServer::start(vec![MemVolume::new("thin", size)]).await;
    let v = srv.vol("thin");
    v.write(
        5 * GIB,
        common::AlignedBuf::from_slice(&[7u8; 1 << 20]),
        false,
    )
    .await
    .unwrap();
    let o = run(
        "qemu-img",
        &[
            "--trace",
            "nbd_send_request",
            "map",
            "-f",
            "raw",
            "--output=json",
            &srv.uri("thin"),
        ],
        120,
    )
    .await;
    let t = ok(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    let json_start = stdout.find('[').expect("JSON map");
    let map: serde_json::Value = serde_json::from_str(&stdout[json_start..]).expect("map JSON");
    let got: Vec<(u64, u64, bool, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, 5 * GIB, false, true),
            (5 * GIB, MIB, true, false),
            (5 * GIB + MIB, GIB - MIB, false, true)
        ],
        "{t}"
    );
    let whole = format!(".len = {size},");
    assert!(
        t.lines()
            .any(|l| l.contains(&whole) && l.contains("type = 7")),
        "no single whole-export block status request:\n{t}"
    );
}

/// A 5 GiB WRITE_ZEROES with FAST_ZERO and NO_HOLE goes out as one 64-bit request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_zeroes_over_4_gib() {
    if !have("qemu-io", &["qemu-io"]) {
        return;
    }
    let srv = TestServer::start(vec![MemVolume::new("vol", 6 * GIB)]).await;
    let v = srv.vol("vol");
    v.write(GIB, common::AlignedBuf::from_slice(&[9u8; 4096]), false)
        .await
        .unwrap();
    let uri = srv.uri("vol");
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -z -n 0 5G",
            "-c",
            "read -P 0 1G 4096",
            &uri,
        ],
        120,
    )
    .await;
    let t = ok(&o);
    assert!(!t.contains("failed"), "{t}");
    assert_eq!(
        srv.metric("stockade_nbd_requests_total{op=\"write_zeroes\",volume=\"vol\"}"),
        1.0,
        "one 64-bit request, not split"
    );
    assert_eq!(v.data_bytes(), 0, "zeroed without data buffers");
    assert_eq!(
        v.block_status(0, 6 * GIB).await.unwrap(),
        [Extent::zeroed(5 * GIB), Extent::hole(GIB)],
        "NO_HOLE: allocated zeroes, not holes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_multi_conn_flush_visibility() {
    if !have("nbdsh", &["nbdsh"]) {
        return;
    }
    let srv = TestServer::start(vec![MemVolume::new("vol", GIB)]).await;
    let script = format!(
        r#"
import os
uri = "{uri}"
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
assert a.can_multi_conn() and a.can_fua()
for i in range(20):
    off = (512 + i) * 65536
    b.pread(65536, off)
    buf = os.urandom(65536)
    a.pwrite(buf, off); a.flush()
    assert b.pread(65536, off) == buf, i
    buf = os.urandom(4096)
    a.pwrite(buf, off, nbd.CMD_FLAG_FUA)
    assert b.pread(4096, off) == buf, ('fua', i)
a.shutdown(); b.shutdown()
print("multi-conn ok")
"#,
        uri = srv.uri("vol")
    );
    let o = run("nbdsh", &["-c", &script], 120).await;
    assert!(ok(&o).contains("multi-conn ok"), "{}", text(&o));
    assert!(srv.vol("vol").flush_count() >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randwrite_with_crc32c_verify() {
    if !have("fio", &["fio"]) {
        return;
    }
    let srv = TestServer::start(vec![MemVolume::new("vol", GIB)]).await;
    let uri = format!("--uri={}", srv.uri("vol"));
    let o = run(
        "fio",
        &[
            "--ioengine=nbd",
            &uri,
            "--name=verify",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32M",
            "--randrepeat=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ],
        180,
    )
    .await;
    let t = ok(&o);
    assert!(!t.contains("verify: bad"), "{t}");
    assert!(srv.metric("stockade_nbd_written_bytes_total{volume=\"vol\"}") >= (32 * MIB) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trip_over_four_connections() {
    if !have("nbdcopy", &["nbdcopy"]) {
        return;
    }
    let srv = TestServer::start(vec![MemVolume::new("vol", 64 * MIB)]).await;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    // Data islands and zero runs (the zero runs exercise write-zeroes/trim).
    let mut img = vec![0u8; (64 * MIB) as usize];
    for (i, chunk) in img.chunks_mut((4 * MIB) as usize).enumerate() {
        if i % 3 == 0 {
            chunk.copy_from_slice(&pattern(chunk.len(), i as u8));
        }
    }
    std::fs::write(&src, &img).unwrap();
    let uri = srv.uri("vol");
    let p = |x: &Path| x.to_str().unwrap().to_string();
    ok(&run("nbdcopy", &["-C", "4", "-T", "4", &p(&src), &uri], 120).await);
    ok(&run("nbdcopy", &["-C", "4", "-T", "4", &uri, &p(&dst)], 120).await);
    assert!(std::fs::read(&dst).unwrap() == img, "round trip differs");
    assert!(
        srv.metric("stockade_nbd_connections_closed_total{reason=\"disc\"}") >= 8.0,
        "four connections each way"
    );
}

/// The shared acceptance script (nbdinfo, qemu-io, qemu-img, nbdcopy, fio, nbdsh, nbdfuse +
/// ext4) against a 5 GiB thin export, requiring extended headers. Needs root for the mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_script_passes() {
    // The shared script when it is next to the repository, else the copy kept in it.
    let shared =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/acceptance/nbd-clients.sh");
    let script = if shared.is_file() {
        shared
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/acceptance/nbd-clients.sh")
    };
    let bins = [
        "nbdinfo",
        "nbdcopy",
        "nbdfuse",
        "nbdsh",
        "qemu-img",
        "qemu-io",
        "fio",
        "mkfs.ext4",
        "e2fsck",
        "fusermount3",
    ];
    if !have("acceptance_script_passes", &bins) {
        return;
    }
    // /proc/self belongs to the process's effective user.
    let euid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    if euid != 0 {
        cannot_run("acceptance_script_passes", "needs root for the loop mount");
        return;
    }
    let srv = TestServer::start(vec![MemVolume::new("vol", 5 * GIB)]).await;
    let port = srv.addr.port().to_string();
    let child = tokio::process::Command::new("bash")
        .arg(&script)
        .args(["127.0.0.1", &port, "vol"])
        .env("REQUIRE_EXTENDED_HEADERS", "1")
        .env(
            "PATH",
            format!(
                "/usr/bin:/usr/sbin:/sbin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .kill_on_drop(true)
        .output();
    let o = tokio::time::timeout(Duration::from_secs(900), child)
        .await
        .expect("acceptance script timed out")
        .expect("bash");
    let t = text(&o);
    let summary = t
        .lines()
        .filter(|l| l.starts_with("FAIL") || l.contains(" passed, "))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("acceptance: {summary}");
    assert!(o.status.success(), "{t}");
    assert!(t.contains(" passed, 0 failed"), "{t}");
    if t.contains("skipping") {
        cannot_run(
            "acceptance_script_passes",
            "the script skipped part of its run (no multi-conn?)",
        );
    }
}
