//! The sled controller as a process: protocol, fencing, restarts, crashes, bad input, metrics.

use common::AlignedBuf;
use common::cred::ClusterKey;
use common::ids::{ChunkIndex, Epoch, NodeId, VolumeId};
use common::sled_client::{ClientError, SledClient};
use common::sled_proto::{
    ErrorCode, FrameHeader, KIND_REQUEST, MAX_DATA_LEN, Request, Response, frame_crc,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tests::sled::SledProc;
use tests::{check_metrics, http_get, key_file, scratch};

const V: VolumeId = VolumeId(0x5101);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    key_path: PathBuf,
    key: ClusterKey,
    sled: SledProc,
}

fn fixture(name: &str) -> Fixture {
    fixture_sized(name, "256M", "8MiB")
}

/// A sled on one device file of `size` with chunks of `chunk`.
fn fixture_sized(name: &str, size: &str, chunk: &str) -> Fixture {
    fixture_with(name, size, &["--chunk-size", chunk])
}

/// A sled on one device file of `size`, started with `args`.
fn fixture_with(name: &str, size: &str, args: &[&str]) -> Fixture {
    let dir = scratch(name);
    let path = dir.path().to_path_buf();
    let (key_path, key) = key_file(&path);
    let dev = format!("{}:{size}", path.join("dev0.img").display());
    let sled = SledProc::start(name, &path, &key_path, &[dev], None, args);
    Fixture {
        dir: path,
        _dir: dir,
        key_path,
        key,
        sled,
    }
}

async fn client(addr: SocketAddr, key: &ClusterKey, node: u64) -> SledClient {
    SledClient::connect(addr, key, NodeId(node), Duration::from_secs(10))
        .await
        .unwrap()
}

fn filled(len: usize, b: u8) -> Arc<AlignedBuf> {
    let mut buf = AlignedBuf::zeroed(len);
    buf.fill(b);
    Arc::new(buf)
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn write_read_trim_and_stat_over_the_network() {
    write_read_trim_and_stat(fixture("sled-basic"));
}

/// The same with the sled's other threading: a thread per device, a pool of network threads.
#[test]
fn write_read_trim_and_stat_over_the_network_with_device_threads() {
    write_read_trim_and_stat(fixture_with(
        "sled-basic-threads",
        "256M",
        &["--chunk-size", "8MiB", "--threading", "threads"],
    ));
}

fn write_read_trim_and_stat(f: Fixture) {
    rt().block_on(async {
        let c = client(f.sled.ready.listen, &f.key, 1).await;
        let cred = f.key.mint(V, Epoch(1), NodeId(1));
        c.claim(&cred).await.unwrap();
        // Many requests in flight on one connection; each reply matches its request.
        let mut tasks = Vec::new();
        let c = Arc::new(c);
        for i in 0..64u64 {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.write(
                    &cred,
                    ChunkIndex(i % 3),
                    i * 65536,
                    filled(65536, i as u8 + 1),
                )
                .await
                .unwrap();
                let back = c
                    .read(V, ChunkIndex(i % 3), i * 65536, 65536)
                    .await
                    .unwrap();
                assert!(back.iter().all(|&b| b == i as u8 + 1), "request {i}");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        c.trim(&cred, ChunkIndex(0), 0, 65536).await.unwrap();
        assert!(
            c.read(V, ChunkIndex(0), 0, 65536)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
        c.write_zeroes(&cred, ChunkIndex(1), 65536, 65536)
            .await
            .unwrap();
        assert!(
            c.read(V, ChunkIndex(1), 65536, 65536)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
        // A chunk never written reads as zeros and is not allocated.
        assert!(
            c.read(V, ChunkIndex(9), 0, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
        let vs = c.volume_stat(V).await.unwrap();
        assert_eq!(vs.chunks, vec![ChunkIndex(0), ChunkIndex(1), ChunkIndex(2)]);
        assert_eq!(vs.fence, Some((Epoch(1), NodeId(1))));
        let st = c.stat().await.unwrap();
        assert_eq!(st.devices.len(), 1);
        assert_eq!(st.devices[0].chunks_used, 3);
        assert_eq!(st.devices[0].chunk_size, 8 << 20);
        // Free a chunk: it reads as zeros again and is no longer listed.
        c.free(&cred, ChunkIndex(2)).await.unwrap();
        assert!(
            c.read(V, ChunkIndex(2), 0, 65536)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(c.volume_stat(V).await.unwrap().chunks.len(), 2);
    });
}

/// A head node's new connection supersedes its older ones: what they already sent runs and is
/// answered before `Supersede` is, then they are closed; another node's connection is untouched.
#[test]
fn a_new_connection_supersedes_the_same_nodes_older_ones() {
    let f = fixture("sled-supersede");
    rt().block_on(async {
        let old = Arc::new(client(f.sled.ready.listen, &f.key, 1).await);
        let other = client(f.sled.ready.listen, &f.key, 2).await;
        let cred = f.key.mint(V, Epoch(1), NodeId(1));
        old.claim(&cred).await.unwrap();
        // Writes in flight on the old connection when the new one supersedes it.
        let writes: Vec<_> = (0..16u64)
            .map(|i| {
                let old = old.clone();
                tokio::spawn(async move {
                    old.write(&cred, ChunkIndex(0), i * 4096, filled(4096, 0x40 + i as u8))
                        .await
                })
            })
            .collect();
        tokio::task::yield_now().await;
        let new = client(f.sled.ready.listen, &f.key, 1).await;
        new.supersede().await.unwrap();
        // Each old write either ran (and was answered) before the barrier, or never runs.
        let mut landed = Vec::new();
        for (i, w) in writes.into_iter().enumerate() {
            if w.await.unwrap().is_ok() {
                landed.push(i as u64);
            }
        }
        let got = new.read(V, ChunkIndex(0), 0, 16 * 4096).await.unwrap();
        for i in 0..16u64 {
            let block = &got[(i * 4096) as usize..((i + 1) * 4096) as usize];
            if landed.contains(&i) {
                assert!(
                    block.iter().all(|&b| b == 0x40 + i as u8),
                    "write {i} acknowledged but missing"
                );
            } else {
                assert!(block.iter().all(|&b| b == 0), "write {i} failed but landed");
            }
        }
        // The old connection is closed by the sled; the other node's is not.
        let e = old.stat().await.unwrap_err();
        assert!(
            matches!(e, ClientError::Disconnected(_)),
            "old connection still served: {e}"
        );
        other.stat().await.unwrap();
        new.write(&cred, ChunkIndex(0), 0, filled(4096, 0x77))
            .await
            .unwrap();
        // Superseding with no older connection is a no-op.
        new.supersede().await.unwrap();
        other.supersede().await.unwrap();
        new.stat().await.unwrap();
    });
}

#[test]
fn fencing_over_the_network() {
    let f = fixture("sled-fence");
    let metrics = f.sled.ready.metrics;
    rt().block_on(async {
        let old = client(f.sled.ready.listen, &f.key, 1).await;
        let new = client(f.sled.ready.listen, &f.key, 2).await;
        let e1 = f.key.mint(V, Epoch(1), NodeId(1));
        let e2 = f.key.mint(V, Epoch(2), NodeId(2));
        old.claim(&e1).await.unwrap();
        old.write(&e1, ChunkIndex(0), 0, filled(4096, 0x11))
            .await
            .unwrap();
        assert_eq!(new.claim(&e2).await.unwrap(), (Epoch(2), NodeId(2)));
        new.write(&e2, ChunkIndex(0), 0, filled(4096, 0x22))
            .await
            .unwrap();
        let before = metric(metrics, "stockade_sled_fenced_writes_total");
        // The deposed holder's write is refused with the stored epoch, and nothing lands.
        let err = old
            .write(&e1, ChunkIndex(0), 0, filled(4096, 0x33))
            .await
            .unwrap_err();
        match &err {
            ClientError::Remote(w) => {
                assert_eq!(w.code, ErrorCode::Fenced);
                assert_eq!(w.current, Some((Epoch(2), NodeId(2))));
            }
            other => panic!("{other}"),
        }
        for r in [
            old.trim(&e1, ChunkIndex(0), 0, 4096).await,
            old.write_zeroes(&e1, ChunkIndex(0), 0, 4096).await,
            old.free(&e1, ChunkIndex(0)).await,
            old.allocate(&e1, ChunkIndex(5)).await,
        ] {
            assert_eq!(r.unwrap_err().code(), Some(ErrorCode::Fenced));
        }
        assert!(
            new.read(V, ChunkIndex(0), 0, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0x22)
        );
        assert!(metric(metrics, "stockade_sled_fenced_writes_total") >= before + 5.0);
        // Same epoch, another holder.
        let e2x = f.key.mint(V, Epoch(2), NodeId(7));
        assert_eq!(
            old.write(&e2x, ChunkIndex(0), 0, filled(4096, 0x44))
                .await
                .unwrap_err()
                .code(),
            Some(ErrorCode::Fenced)
        );
        // A forged credential (right fields, MAC from another key) is refused.
        let forged = ClusterKey::generate().mint(V, Epoch(9), NodeId(9));
        assert_eq!(
            old.claim(&forged).await.unwrap_err().code(),
            Some(ErrorCode::BadCredential)
        );
        assert_eq!(
            old.write(&forged, ChunkIndex(0), 0, filled(4096, 0x55))
                .await
                .unwrap_err()
                .code(),
            Some(ErrorCode::BadCredential)
        );
        assert!(metric(metrics, "stockade_sled_credential_refusals_total") >= 2.0);
        assert!(
            new.read(V, ChunkIndex(0), 0, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0x22)
        );
        // A write under an epoch never claimed.
        let e5 = f.key.mint(V, Epoch(5), NodeId(2));
        assert_eq!(
            new.write(&e5, ChunkIndex(0), 0, filled(4096, 0x66))
                .await
                .unwrap_err()
                .code(),
            Some(ErrorCode::NotClaimed)
        );
        // Volume B is untouched by A's claims.
        let b = VolumeId(0xb0b);
        let b1 = f.key.mint(b, Epoch(1), NodeId(1));
        old.claim(&b1).await.unwrap();
        old.write(&b1, ChunkIndex(0), 0, filled(4096, 0x77))
            .await
            .unwrap();
    });
}

#[test]
fn connections_must_prove_the_cluster_key() {
    let f = fixture("sled-auth");
    let metrics = f.sled.ready.metrics;
    rt().block_on(async {
        let wrong = ClusterKey::generate();
        let e = SledClient::connect(
            f.sled.ready.listen,
            &wrong,
            NodeId(1),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, ClientError::Handshake { .. }), "{e}");
    });
    assert!(metric(metrics, "stockade_sled_auth_failures_total") >= 1.0);
    // A request before authenticating is refused and the connection closed.
    let mut s = TcpStream::connect(f.sled.ready.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let read = Request::Read {
        volume: V,
        chunk: ChunkIndex(0),
        offset: 0,
        len: 4096,
    };
    send_raw(&mut s, 1, &postcard::to_stdvec(&read).unwrap(), &[]);
    let resp = recv_response(&mut s).expect("an error reply");
    assert!(
        matches!(resp, Response::Error(ref w) if w.code == ErrorCode::NotAuthenticated),
        "{resp:?}"
    );
    assert!(closed_by_sled(&mut s), "connection should be closed");
    // A handshake frame announcing data (here 32 MiB) is refused on its header, before the
    // sled reserves anything for it: the connection is closed at once, not read on.
    let mut s = TcpStream::connect(f.sled.ready.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = Request::Hello {
        min_version: 1,
        max_version: 1,
        node: NodeId(1),
        nonce: common::cred::nonce(),
    };
    let ctl = postcard::to_stdvec(&hello).unwrap();
    let h = FrameHeader {
        version: 1,
        kind: KIND_REQUEST,
        tag: 0,
        ctl_len: ctl.len() as u32,
        data_len: 32 << 20,
        crc: 0,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(&ctl).unwrap();
    assert!(
        closed_by_sled(&mut s),
        "an unauthenticated frame with data must close the connection"
    );
}

/// True when the sled closed the connection: end of stream or a reset, with nothing more sent
/// first. A read that times out (the sled kept the connection open) is false.
fn closed_by_sled(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        ),
    }
}

fn send_raw(s: &mut TcpStream, tag: u64, ctl: &[u8], data: &[u8]) {
    let mut h = FrameHeader {
        version: 1,
        kind: KIND_REQUEST,
        tag,
        ctl_len: ctl.len() as u32,
        data_len: data.len() as u32,
        crc: 0,
    };
    h.crc = frame_crc(&h, ctl, data);
    s.write_all(&h.encode()).unwrap();
    s.write_all(ctl).unwrap();
    s.write_all(data).unwrap();
}

/// Reads one response frame; `None` when the connection is closed.
fn recv_response(s: &mut TcpStream) -> Option<Response> {
    let mut hb = [0u8; 32];
    s.read_exact(&mut hb).ok()?;
    let h = FrameHeader::decode(&hb).ok()?;
    let mut ctl = vec![0u8; h.ctl_len as usize];
    s.read_exact(&mut ctl).ok()?;
    let mut data = vec![0u8; h.data_len as usize];
    s.read_exact(&mut data).ok()?;
    postcard::from_bytes(&ctl).ok()
}

/// Authenticates a raw socket (to send hand-made frames afterwards).
fn raw_authenticated(addr: SocketAddr, key: &ClusterKey) -> TcpStream {
    use common::cred::{HandshakeRole, nonce};
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mine = nonce();
    let hello = Request::Hello {
        min_version: 1,
        max_version: 1,
        node: NodeId(1),
        nonce: mine,
    };
    send_raw(&mut s, 0, &postcard::to_stdvec(&hello).unwrap(), &[]);
    let Some(Response::Challenge { nonce: theirs, .. }) = recv_response(&mut s) else {
        panic!("no challenge")
    };
    let auth = Request::Auth {
        proof: key.handshake_proof(HandshakeRole::Client, &mine, &theirs),
    };
    send_raw(&mut s, 1, &postcard::to_stdvec(&auth).unwrap(), &[]);
    assert!(matches!(recv_response(&mut s), Some(Response::AuthOk)));
    s
}

/// A head node that stops in the middle of a frame (it crashed, or its network went away) must
/// not keep its own next connection from superseding the stuck one.
#[test]
fn a_connection_stuck_in_the_middle_of_a_frame_is_superseded() {
    let f = fixture("sled-midframe");
    let mut raw = raw_authenticated(f.sled.ready.listen, &f.key);
    let cred = f.key.mint(V, Epoch(1), NodeId(1));
    let write = Request::Write {
        cred,
        chunk: ChunkIndex(0),
        offset: 0,
    };
    let ctl = postcard::to_stdvec(&write).unwrap();
    let data = vec![0x5a; 8192];
    let mut h = FrameHeader {
        version: 1,
        kind: KIND_REQUEST,
        tag: 7,
        ctl_len: ctl.len() as u32,
        data_len: data.len() as u32,
        crc: 0,
    };
    h.crc = frame_crc(&h, &ctl, &data);
    raw.write_all(&h.encode()).unwrap();
    raw.write_all(&ctl).unwrap();
    raw.write_all(&data[..4096]).unwrap();
    rt().block_on(async {
        let new = client(f.sled.ready.listen, &f.key, 1).await;
        new.supersede()
            .await
            .expect("the stuck connection was superseded");
        new.claim(&cred).await.unwrap();
        let got = new.read(V, ChunkIndex(0), 0, 8192).await.unwrap();
        assert!(got.iter().all(|&b| b == 0), "the half-sent write ran");
    });
    assert!(
        closed_by_sled(&mut raw),
        "the stuck connection is still open"
    );
}

#[test]
fn bad_frames_get_an_error_and_the_sled_carries_on() {
    let f = fixture("sled-badframes");
    let addr = f.sled.ready.listen;
    // Garbage instead of a header.
    let mut s = raw_authenticated(addr, &f.key);
    s.write_all(&[0xde; 64]).unwrap();
    let r = recv_response(&mut s).expect("error reply");
    assert!(
        matches!(r, Response::Error(ref w) if w.code == ErrorCode::Malformed),
        "{r:?}"
    );
    assert!(closed_by_sled(&mut s));
    // A header announcing more data than allowed: refused before anything is read.
    let mut s = raw_authenticated(addr, &f.key);
    let h = FrameHeader {
        version: 1,
        kind: KIND_REQUEST,
        tag: 5,
        ctl_len: 4,
        data_len: u32::MAX,
        crc: 0,
    };
    s.write_all(&h.encode()).unwrap();
    let r = recv_response(&mut s).expect("error reply");
    assert!(
        matches!(r, Response::Error(ref w) if w.code == ErrorCode::TooLarge),
        "{r:?}"
    );
    // A frame whose checksum does not match its payload.
    let mut s = raw_authenticated(addr, &f.key);
    let cred = f.key.mint(V, Epoch(1), NodeId(1));
    let w = postcard::to_stdvec(&Request::Write {
        cred,
        chunk: ChunkIndex(0),
        offset: 0,
    })
    .unwrap();
    let mut h = FrameHeader {
        version: 1,
        kind: KIND_REQUEST,
        tag: 6,
        ctl_len: w.len() as u32,
        data_len: 4096,
        crc: 0,
    };
    h.crc = frame_crc(&h, &w, &[1u8; 4096]);
    s.write_all(&h.encode()).unwrap();
    s.write_all(&w).unwrap();
    s.write_all(&[2u8; 4096]).unwrap();
    let r = recv_response(&mut s).expect("error reply");
    assert!(
        matches!(r, Response::Error(ref e) if e.code == ErrorCode::Malformed),
        "{r:?}"
    );
    // A truncated frame, then the peer goes away: the sled does not hang or crash.
    let mut s = raw_authenticated(addr, &f.key);
    s.write_all(&h.encode()[..20]).unwrap();
    drop(s);
    // Control bytes that are not a message.
    let mut s = raw_authenticated(addr, &f.key);
    send_raw(&mut s, 7, &[0xff, 0xff, 0xff], &[]);
    let r = recv_response(&mut s).expect("error reply");
    assert!(
        matches!(r, Response::Error(ref e) if e.code == ErrorCode::Malformed),
        "{r:?}"
    );
    // The sled still serves well-behaved clients, and nothing was written.
    rt().block_on(async {
        let c = client(addr, &f.key, 1).await;
        let cred = f.key.mint(V, Epoch(1), NodeId(1));
        c.claim(&cred).await.unwrap();
        assert!(
            c.read(V, ChunkIndex(0), 0, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );
        assert!(c.volume_stat(V).await.unwrap().chunks.is_empty());
    });
}

#[test]
fn out_of_range_and_unaligned_requests_are_refused() {
    let f = fixture("sled-range");
    rt().block_on(async {
        let c = client(f.sled.ready.listen, &f.key, 1).await;
        let cred = f.key.mint(V, Epoch(1), NodeId(1));
        c.claim(&cred).await.unwrap();
        let chunk = 8u64 << 20;
        for (off, len, code) in [
            (100, 4096, ErrorCode::Unaligned),
            (0, 100, ErrorCode::Unaligned),
            (chunk - 4096, 8192, ErrorCode::OutOfRange),
            (u64::MAX - 4095, 4096, ErrorCode::OutOfRange),
        ] {
            assert_eq!(
                c.read(V, ChunkIndex(0), off, len).await.unwrap_err().code(),
                Some(code),
                "read {off}+{len}"
            );
            assert_eq!(
                c.write(&cred, ChunkIndex(0), off, filled(len as usize, 1))
                    .await
                    .unwrap_err()
                    .code(),
                Some(code),
                "write {off}+{len}"
            );
            assert_eq!(
                c.trim(&cred, ChunkIndex(0), off, u64::from(len))
                    .await
                    .unwrap_err()
                    .code(),
                Some(code),
                "trim {off}+{len}"
            );
        }
        // Nothing was allocated by the refused writes.
        assert!(c.volume_stat(V).await.unwrap().chunks.is_empty());
    });
}

/// A read whose reply could not fit in a frame (more than `MAX_DATA_LEN`, inside a large chunk)
/// is refused up front; the connection goes on serving.
#[test]
fn a_read_larger_than_a_frame_is_refused_and_the_connection_carries_on() {
    let f = fixture_sized("sled-bigread", "512M", "128MiB");
    let key = &f.key;
    rt().block_on(async {
        let c = client(f.sled.ready.listen, key, 1).await;
        let cred = key.mint(V, Epoch(1), NodeId(1));
        c.claim(&cred).await.unwrap();
        c.write(&cred, ChunkIndex(0), 0, filled(4096, 7))
            .await
            .unwrap();
        let too_big = MAX_DATA_LEN + 4096;
        let err = c.read(V, ChunkIndex(0), 0, too_big).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::TooLarge), "{err}");
        // The largest read that fits still works, on the same connection.
        let b = c.read(V, ChunkIndex(0), 0, MAX_DATA_LEN).await.unwrap();
        assert!(b[..4096].iter().all(|&x| x == 7));
        assert!(b[4096..].iter().all(|&x| x == 0));
    });
}

#[test]
fn claims_and_data_survive_restart_and_kill9() {
    let mut f = fixture("sled-restart");
    let r = rt();
    r.block_on(async {
        let c = client(f.sled.ready.listen, &f.key, 1).await;
        let e3 = f.key.mint(V, Epoch(3), NodeId(1));
        c.claim(&e3).await.unwrap();
        c.write(&e3, ChunkIndex(1), 8192, filled(65536, 0x3c))
            .await
            .unwrap();
    });
    // Clean restart.
    assert!(f.sled.proc.stop(Duration::from_secs(30)), "clean shutdown");
    f.sled.restart();
    r.block_on(async {
        let c = client(f.sled.ready.listen, &f.key, 2).await;
        assert!(
            c.read(V, ChunkIndex(1), 8192, 65536)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0x3c)
        );
        let stale = f.key.mint(V, Epoch(2), NodeId(2));
        assert_eq!(
            c.claim(&stale).await.unwrap_err().code(),
            Some(ErrorCode::Fenced)
        );
        // Claim right before a kill -9: it is there afterwards.
        let e4 = f.key.mint(V, Epoch(4), NodeId(2));
        c.claim(&e4).await.unwrap();
        c.write(&e4, ChunkIndex(1), 0, filled(4096, 0x4d))
            .await
            .unwrap();
    });
    f.sled.proc.kill9();
    f.sled.restart();
    r.block_on(async {
        let c = client(f.sled.ready.listen, &f.key, 3).await;
        let e3 = f.key.mint(V, Epoch(3), NodeId(1));
        let err = c
            .write(&e3, ChunkIndex(1), 0, filled(4096, 1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Fenced));
        let b = c.read(V, ChunkIndex(1), 0, 73728).await.unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0x4d));
        assert!(b[8192..].iter().all(|&x| x == 0x3c));
    });
    let _ = &f.dir;
    let _ = &f.key_path;
}

/// Cached writes (the head nodes' write-back): fenced like durable writes, readable at once,
/// answered by a flush, and still there after a kill -9 (a process crash loses no device cache;
/// power cuts are the crash-model engine's job, in the device tests).
#[test]
fn cached_writes_are_fenced_readable_and_flushed() {
    let mut f = fixture("sled-cached");
    let r = rt();
    r.block_on(async {
        let c = client(f.sled.ready.listen, &f.key, 1).await;
        assert!(c.version() >= common::sled_proto::CACHED_WRITES_VERSION);
        // Nothing cached yet: a flush is answered at once.
        c.flush().await.unwrap();
        let e2 = f.key.mint(V, Epoch(2), NodeId(1));
        c.claim(&e2).await.unwrap();
        for i in 0..16u64 {
            c.write_cached(&e2, ChunkIndex(i % 2), i * 8192, filled(8192, i as u8 + 1))
                .await
                .unwrap();
        }
        for i in 0..16u64 {
            let b = c.read(V, ChunkIndex(i % 2), i * 8192, 8192).await.unwrap();
            assert!(b.iter().all(|&x| x == i as u8 + 1), "cached write {i}");
        }
        c.flush().await.unwrap();
        // An older epoch is refused and nothing of it lands.
        let e1 = f.key.mint(V, Epoch(1), NodeId(1));
        let err = c
            .write_cached(&e1, ChunkIndex(0), 0, filled(8192, 0xee))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Fenced));
        // A cached write without its data is refused, not run.
        let err = c
            .call(
                &Request::WriteCached {
                    cred: e2,
                    chunk: ChunkIndex(0),
                    offset: 0,
                },
                None,
            )
            .await
            .unwrap_err();
        assert!(err.code().is_some(), "{err}");
        let b = c.read(V, ChunkIndex(0), 0, 8192).await.unwrap();
        assert!(b.iter().all(|&x| x == 1));
        // Cached, not flushed, then the process dies.
        c.write_cached(&e2, ChunkIndex(1), 1 << 20, filled(4096, 0x77))
            .await
            .unwrap();
    });
    f.sled.proc.kill9();
    f.sled.restart();
    r.block_on(async {
        let c = client(f.sled.ready.listen, &f.key, 2).await;
        for i in 0..16u64 {
            let b = c.read(V, ChunkIndex(i % 2), i * 8192, 8192).await.unwrap();
            assert!(
                b.iter().all(|&x| x == i as u8 + 1),
                "after restart: write {i}"
            );
        }
        let b = c.read(V, ChunkIndex(1), 1 << 20, 4096).await.unwrap();
        assert!(b.iter().all(|&x| x == 0x77));
    });
    let _ = &f.dir;
    let _ = &f.key_path;
}

/// kill -9 the sled while a client allocates, writes, frees and claims in a loop; every restart
/// must open the device with a consistent chunk table, every acknowledged claim in place and
/// every acknowledged write readable.
#[test]
fn kill9_during_metadata_updates_always_reopens() {
    use rand::{Rng, SeedableRng};
    let rounds: u64 = std::env::var("STOCKADE_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    assert!(
        rounds >= 1,
        "STOCKADE_KILL_ROUNDS must be at least 1 (zero rounds would test nothing)"
    );
    let seed: u64 = std::env::var("STOCKADE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    eprintln!("seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut f = fixture("sled-kill9");
    let r = rt();
    let mut epoch = 1u64;
    // chunk -> byte of its last acknowledged write at offset 0 (None when freed).
    let mut acked: std::collections::HashMap<u64, u8> = Default::default();
    for round in 0..rounds {
        let addr = f.sled.ready.listen;
        let key = f.key.clone();
        let kill_after = Duration::from_millis(rng.gen_range(20..300));
        let start_epoch = epoch;
        let state = Arc::new(std::sync::Mutex::new((
            start_epoch,
            acked.clone(),
            None::<(u64, u8)>,
        )));
        let st = state.clone();
        // The kill comes from another thread while the work is running (metadata updates in
        // flight); errors before it are failures, errors after it end the round's work.
        let killed = Arc::new(AtomicBool::new(false));
        let pid = f.sled.proc.pid().expect("sled running") as i32;
        let r_killed = killed.clone();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let killer = std::thread::spawn(move || {
            go_rx.recv().expect("work started");
            std::thread::sleep(kill_after);
            r_killed.store(true, std::sync::atomic::Ordering::SeqCst);
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        });
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ops = done.clone();
        let w_killed = killed.clone();
        r.block_on(async move {
            let c = client(addr, &key, 1).await;
            let first = key.mint(V, Epoch(start_epoch + 1), NodeId(1));
            c.claim(&first).await.unwrap();
            st.lock().unwrap().0 = start_epoch + 1;
            // The kill's delay counts from the first acknowledged write: on a loaded machine
            // (the whole suite on two cores) the first one, which allocates its chunk, can take
            // longer than the shortest delays, and a round with nothing acknowledged checks
            // nothing.
            let mut go = Some(go_tx);
            let dead = || w_killed.load(std::sync::atomic::Ordering::SeqCst);
            let work = async {
                for i in 0u64.. {
                    let chunk = i % 12;
                    let epoch = st.lock().unwrap().0;
                    let cred = key.mint(V, Epoch(epoch), NodeId(1));
                    // One operation at a time: at the kill, at most this one is in flight.
                    let value = if i % 5 == 4 { 0 } else { (i % 250) as u8 + 1 };
                    st.lock().unwrap().2 = Some((chunk, value));
                    let res = if value == 0 {
                        c.free(&cred, ChunkIndex(chunk)).await
                    } else {
                        c.write(&cred, ChunkIndex(chunk), 0, filled(4096, value))
                            .await
                    };
                    if let Err(e) = res {
                        assert!(dead(), "round {round}: {e} before the kill");
                        break;
                    }
                    {
                        let mut g = st.lock().unwrap();
                        g.1.insert(chunk, value);
                        g.2 = None;
                    }
                    ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(go) = go.take() {
                        go.send(()).expect("the killer waits");
                    }
                    if i % 7 == 6 {
                        let next = key.mint(V, Epoch(epoch + 1), NodeId(1));
                        if let Err(e) = c.claim(&next).await {
                            assert!(dead(), "round {round}: claim failed before the kill: {e}");
                            break;
                        }
                        st.lock().unwrap().0 = epoch + 1;
                    }
                }
            };
            tokio::time::timeout(kill_after + Duration::from_secs(30), work)
                .await
                .expect("the work ends at the kill");
        });
        killer.join().unwrap();
        assert!(
            done.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "round {round}: nothing was acknowledged before the kill"
        );
        // Reaps the killed process.
        f.sled.proc.kill9();
        let (new_epoch, new_acked, in_flight) = state.lock().unwrap().clone();
        epoch = new_epoch;
        acked = new_acked;
        f.sled.restart();
        r.block_on(async {
            let c = client(f.sled.ready.listen, &f.key, 1).await;
            let stale = f.key.mint(V, Epoch(epoch - 1), NodeId(1));
            assert_eq!(
                c.claim(&stale).await.unwrap_err().code(),
                Some(ErrorCode::Fenced),
                "round {round}: acknowledged claim {epoch} lost"
            );
            for chunk in 0..12u64 {
                let b = c.read(V, ChunkIndex(chunk), 0, 4096).await.unwrap();
                let want = acked.get(&chunk).copied().unwrap_or(0);
                let alt = in_flight.filter(|(c, _)| *c == chunk).map(|(_, v)| v);
                let ok = b.iter().all(|&x| x == want) || alt.is_some_and(|a| b.iter().all(|&x| x == a));
                assert!(ok, "round {round}: chunk {chunk} holds {:#x}.., acknowledged {want:#x}, in flight {alt:?}", b[0]);
            }
        });
        // The device state is consistent again: a new epoch for the next round.
        epoch += 1;
        r.block_on(async {
            let c = client(f.sled.ready.listen, &f.key, 1).await;
            c.claim(&f.key.mint(V, Epoch(epoch), NodeId(1)))
                .await
                .unwrap();
        });
    }
}

#[test]
fn device_files_that_are_truncated_or_corrupt_get_clear_errors() {
    let dir = scratch("sled-corrupt");
    let (key_path, _) = key_file(dir.path());
    let dev = dir.path().join("dev.img");
    // Format it by starting once.
    let mut s = SledProc::start(
        "fmt",
        dir.path(),
        &key_path,
        &[format!("{}:128M", dev.display())],
        None,
        &["--chunk-size", "8MiB"],
    );
    assert!(s.proc.stop(Duration::from_secs(30)));
    let run = |device: &str| {
        std::process::Command::new(tests::bin("sled-controller"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--cluster-key-file",
                &key_path.display().to_string(),
                "--chunk-size",
                "8MiB",
                "--device",
                device,
            ])
            .output()
            .unwrap()
    };
    // Truncated.
    let short = dir.path().join("short.img");
    std::fs::copy(&dev, &short).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&short)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let out = run(&short.display().to_string());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated"), "{err}");
    // The same with the size configured (as `stockade up` gives it): the file is not grown over
    // its lost tail, the truncation is still named, and the file is left as it was.
    let out = run(&format!("{}:128M", short.display()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated"), "{err}");
    assert_eq!(std::fs::metadata(&short).unwrap().len(), 64 << 20);
    // A device has one owner: a second sled controller on a device in use is refused before it
    // writes anything.
    let mut owner = SledProc::start(
        "owner",
        dir.path(),
        &key_path,
        &[format!("{}:128M", dev.display())],
        None,
        &["--chunk-size", "8MiB"],
    );
    // Frozen, so that the owner's own background writes cannot be taken for the intruder's.
    owner.proc.sigstop();
    let before = std::fs::read(&dev).unwrap();
    let out = run(&format!("{}:128M", dev.display()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert!(
        std::fs::read(&dev).unwrap() == before,
        "the refused sled wrote to the device"
    );
    owner.proc.sigcont();
    assert!(owner.proc.stop(Duration::from_secs(30)));
    // Both superblock copies damaged.
    let bad = dir.path().join("bad.img");
    std::fs::copy(&dev, &bad).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::options().write(true).open(&bad).unwrap();
        f.write_all_at(&[0xff; 16], 100).unwrap();
        f.write_all_at(&[0xff; 16], 4096 + 100).unwrap();
    }
    let out = run(&bad.display().to_string());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("superblock corrupted"), "{err}");
    // A file holding other data is not formatted over.
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![0x42u8; 32 << 20]).unwrap();
    let out = run(&format!("{}:64M", other.display()));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not empty") || err.contains("refusing"),
        "{err}"
    );
    // A missing device without a size.
    let out = run(&dir.path().join("missing.img").display().to_string());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
}

/// A blank device beside formatted ones may be the replacement of a lost one: the sled refuses
/// to format it (it would read that device's lost chunks as zeros) unless its configuration
/// names it with `format = "force"`.
#[test]
fn a_blank_device_joins_a_formatted_sled_only_when_forced() {
    let dir = scratch("sled-join");
    let (key_path, _) = key_file(dir.path());
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let devices = [
        format!("{}:128M", a.display()),
        format!("{}:128M", b.display()),
    ];
    let mut s = SledProc::start(
        "two",
        dir.path(),
        &key_path,
        &devices,
        None,
        &["--chunk-size", "8MiB"],
    );
    assert!(s.proc.stop(Duration::from_secs(30)));
    // Device b "fails" and a blank one takes its place.
    std::fs::remove_file(&b).unwrap();
    let run = |args: &[String]| {
        std::process::Command::new(tests::bin("sled-controller"))
            .args(args)
            .output()
            .unwrap()
    };
    let mut cli: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--cluster-key-file",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cli.push(key_path.display().to_string());
    let mut plain = cli.clone();
    for d in &devices {
        plain.extend(["--device".to_string(), d.clone()]);
    }
    let out = run(&plain);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is blank but the sled's other devices are formatted"),
        "{err}"
    );
    // Nothing was written to it.
    if b.exists() {
        let head = std::fs::read(&b).unwrap();
        assert!(
            head.iter().take(1 << 20).all(|x| *x == 0),
            "the refused device was written"
        );
    }
    // Named with format = "force" in the configuration, it is formatted into the sled.
    let conf = dir.path().join("sled.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = \"127.0.0.1:0\"\nmetrics-listen = \"127.0.0.1:0\"\ncluster-key-file = \"{}\"\n\n[[device]]\npath = \"{}\"\n\n[[device]]\npath = \"{}\"\nsize = \"128MiB\"\nformat = \"force\"\n",
            key_path.display(),
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    let ready = dir.path().join("forced.ready.json");
    let forced = [
        "--config".to_string(),
        conf.display().to_string(),
        "--ready-file".to_string(),
        ready.display().to_string(),
    ];
    let mut child = std::process::Command::new(tests::bin("sled-controller"))
        .args(&forced)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tests::eventually(Duration::from_secs(30), "the sled ready", || {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("sled-controller exited: {st}");
        }
        ready.exists().then_some(())
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(child.wait().unwrap().success());
    // It joined: b now carries a superblock.
    let head = std::fs::read(&b).unwrap();
    assert!(
        head.iter().take(1 << 20).any(|x| *x != 0),
        "the forced device was not formatted"
    );
}

#[test]
fn serves_a_block_device_through_a_loop_device() {
    let dir = scratch("sled-loop");
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", "--direct-io=on"])
        .arg(&backing)
        .output();
    let loopdev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        other => {
            tests::cannot_run(
                "serves_a_block_device_through_a_loop_device",
                &format!("losetup unavailable here ({other:?}); block devices not tested"),
            );
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(loopdev.clone());
    let (key_path, key) = key_file(dir.path());
    let mut s = SledProc::start(
        "loop",
        dir.path(),
        &key_path,
        std::slice::from_ref(&loopdev),
        None,
        &["--chunk-size", "8MiB"],
    );
    rt().block_on(async {
        let c = client(s.ready.listen, &key, 1).await;
        let cred = key.mint(V, Epoch(1), NodeId(1));
        c.claim(&cred).await.unwrap();
        c.write(&cred, ChunkIndex(2), 0, filled(1 << 20, 0xb1))
            .await
            .unwrap();
        assert!(
            c.read(V, ChunkIndex(2), 0, 1 << 20)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0xb1)
        );
        // Trim on a block device zeroes (BLKZEROOUT).
        c.trim(&cred, ChunkIndex(2), 4096, 8192).await.unwrap();
        let b = c.read(V, ChunkIndex(2), 0, 16384).await.unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0xb1) && b[4096..12288].iter().all(|&x| x == 0));
        let st = c.stat().await.unwrap();
        assert_eq!(st.devices[0].path, loopdev);
    });
    assert!(s.proc.stop(Duration::from_secs(30)));
    s.restart();
    rt().block_on(async {
        let c = client(s.ready.listen, &key, 1).await;
        let b = c.read(V, ChunkIndex(2), 0, 16384).await.unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0xb1) && b[4096..12288].iter().all(|&x| x == 0));
    });
    // The block device has one owner (O_EXCL): a second sled controller on it is refused.
    let second = std::process::Command::new(tests::bin("sled-controller"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--cluster-key-file")
        .arg(&key_path)
        .args(["--chunk-size", "8MiB", "--device", &loopdev])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn metrics_pass_promtool_and_are_documented() {
    let f = fixture("sled-metrics");
    rt().block_on(async {
        let c = client(f.sled.ready.listen, &f.key, 1).await;
        let cred = f.key.mint(V, Epoch(1), NodeId(1));
        c.claim(&cred).await.unwrap();
        c.write(&cred, ChunkIndex(0), 0, filled(4096, 1))
            .await
            .unwrap();
        c.read(V, ChunkIndex(0), 0, 4096).await.unwrap();
        let _ = c
            .write(
                &f.key.mint(V, Epoch(0), NodeId(1)),
                ChunkIndex(0),
                0,
                filled(4096, 1),
            )
            .await;
    });
    let (status, body) = http_get(f.sled.ready.metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    for name in [
        "stockade_sled_device_ops_total",
        "stockade_sled_fenced_writes_total",
        "stockade_sled_device_capacity_bytes",
        "stockade_sled_device_chunks_used",
        "stockade_sled_volume_bytes_total",
        "stockade_sled_request_duration_seconds_bucket",
        "process_open_fds",
        "stockade_sled_buffer_pool_bytes 33554432",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics");
    }
    // The write's payload and the read's destination came from the registered region.
    let pooled: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("stockade_sled_buffer_allocations_total{source=\"pool\"} "))
        .and_then(|v| v.trim().parse().ok())
        .expect("pool allocations exported");
    assert!(
        pooled >= 2,
        "{pooled} pooled buffers for a write and a read"
    );
    let problems = check_metrics(&body);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
