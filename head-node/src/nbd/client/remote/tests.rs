//! Failover tests of [`RemoteVolume`]: two or three in-process NBD servers ("head nodes") over
//! one shared [`MemVolume`], so every server sees the same data, and one of them killed,
//! frozen or failing while requests are in flight.

use super::*;
use crate::nbd::client::tests::{head, mem_server, relay};
use crate::nbd::{Exports, MemVolume, NbdServer, ServerConfig};
use std::sync::atomic::AtomicU64;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

/// Waits until `f` holds, polling; bounded by [`LIMIT`].
async fn until(mut f: impl FnMut() -> bool) {
    within(async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

fn quick(heads: Vec<SocketAddr>) -> RemoteConfig {
    RemoteConfig {
        retry_deadline: Duration::from_secs(10),
        // Longer than LIMIT: a test passes only if failover did not wait for it.
        request_timeout: Duration::from_secs(60),
        backoff_initial: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        ..RemoteConfig::new("vol", heads)
    }
}

fn block(seed: u64, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (seed as u8).wrapping_mul(31).wrapping_add((i % 253) as u8);
    }
    b[..8].copy_from_slice(&seed.to_le_bytes());
    b
}

fn metric(registry: &Registry, name: &str, label: Option<(&str, &str)>) -> f64 {
    let mut total = 0.0;
    for fam in registry.gather() {
        if fam.name() != name {
            continue;
        }
        for m in fam.get_metric() {
            let ok = label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            });
            if ok {
                total += m.get_counter().get_value() + m.get_gauge().get_value();
            }
        }
    }
    total
}

/// How a [`Gate`] treats requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Pass,
    /// Never answers.
    Hang,
    /// Answers `ESHUTDOWN`.
    Shutdown,
    /// Answers `EIO`.
    Eio,
}

/// One head node's view of the shared volume, with a switch to make it misbehave.
#[derive(Debug)]
struct Gate {
    inner: Arc<MemVolume>,
    mode: Mutex<Mode>,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
    requests: AtomicU64,
}

impl Gate {
    fn new(inner: Arc<MemVolume>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            mode: Mutex::new(Mode::Pass),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        })
    }

    fn set(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }

    async fn gate(&self) -> Result<(), VolumeError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Pass => Ok(()),
            Mode::Hang => std::future::pending().await,
            Mode::Shutdown => Err(VolumeError::ShuttingDown),
            Mode::Eio => Err(VolumeError::io(std::io::Error::other("gate"))),
        }
    }
}

impl Volume for Gate {
    fn info(&self) -> ExportInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, VolumeError> {
        self.gate().await?;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), VolumeError> {
        self.gate().await?;
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> Result<(), VolumeError> {
        self.gate().await?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.inner.flush().await
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        self.gate().await?;
        self.inner.trim(offset, len, fua).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        self.gate().await?;
        self.inner
            .write_zeroes(offset, len, no_hole, fast_only, fua)
            .await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        self.gate().await?;
        self.inner.block_status(offset, len).await
    }
    async fn cache(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.gate().await?;
        self.inner.cache(offset, len).await
    }
    async fn closed(&self) {
        self.inner.closed().await
    }
}

/// A single export.
#[derive(Debug)]
struct One<V>(Arc<V>);

impl<V: Volume> Exports for One<V> {
    type V = V;
    fn get(&self, name: &str) -> Option<Arc<V>> {
        (name.is_empty() || name == self.0.info().name).then(|| self.0.clone())
    }
    fn list(&self) -> Vec<ExportInfo> {
        vec![self.0.info()]
    }
}

async fn serve<V: Volume>(v: Arc<V>) -> (SocketAddr, JoinHandle<()>) {
    let server =
        NbdServer::new(Arc::new(One(v)), ServerConfig::default(), &Registry::new()).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = server.serve(l, std::future::pending()).await;
    });
    // Behind a relay, so that aborting the handle closes the connections.
    relay(addr).await
}

/// An address nobody listens on.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn failover_resends_every_request_in_flight() {
    let vol = Arc::new(MemVolume::new("vol", 64 * MIB));
    let (a, server_a) = head(vol.clone()).await;
    let (b, _server_b) = head(vol.clone()).await;
    let registry = Registry::new();
    let rv = within(RemoteVolume::connect(quick(vec![a, b]), &registry))
        .await
        .unwrap();
    assert_eq!(rv.info().size, 64 * MIB);
    assert_eq!(rv.current_head(), Some(a));
    for i in 0..16u64 {
        rv.write(i * 65536, block(i, 65536), false).await.unwrap();
    }

    vol.pause();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let rv = rv.clone();
        tasks.push(tokio::spawn(async move {
            rv.write(8 * MIB + i * 65536, block(100 + i, 65536), i % 4 == 0)
                .await
                .map(|_| None)
        }));
    }
    for i in 0..16u64 {
        let rv = rv.clone();
        tasks.push(tokio::spawn(async move {
            rv.read(i * 65536, 65536).await.map(|b| Some((i, b)))
        }));
    }
    let flush = {
        let rv = rv.clone();
        tokio::spawn(async move { rv.flush().await })
    };
    until(|| vol.pending() >= 81).await;

    // Kill head node A with everything in flight; B gets every request again.
    server_a.abort();
    until(|| vol.pending() >= 2 * 81).await;
    assert_eq!(rv.current_head(), Some(b));
    // Moved because the connection died, not because requests timed out.
    let eof = metric(
        &registry,
        "stockade_attach_reconnects_total",
        Some(("reason", "eof")),
    ) + metric(
        &registry,
        "stockade_attach_reconnects_total",
        Some(("reason", "io_error")),
    );
    assert_eq!(eof, 1.0);
    vol.resume();
    for t in tasks {
        if let Some((i, data)) = within(t).await.unwrap().unwrap() {
            assert_eq!(&data[..], &block(i, 65536)[..]);
        }
    }
    within(flush).await.unwrap().unwrap();
    for i in 0..64u64 {
        let got = rv.read(8 * MIB + i * 65536, 65536).await.unwrap();
        assert_eq!(&got[..], &block(100 + i, 65536)[..], "block {i}");
    }
    assert!(metric(&registry, "stockade_attach_retried_requests_total", None) >= 81.0);
    assert_eq!(
        metric(&registry, "stockade_attach_reconnects_total", None),
        1.0
    );
    assert_eq!(metric(&registry, "stockade_attach_head_index", None), 1.0);
    assert_eq!(
        metric(&registry, "stockade_attach_failed_requests_total", None),
        0.0
    );
    rv.shutdown().await;
    assert_eq!(rv.current_head(), None);
}

#[tokio::test]
async fn a_flush_in_flight_is_sent_again_to_the_next_head() {
    let vol = Arc::new(MemVolume::new("vol", 16 * MIB));
    let (ga, gb) = (Gate::new(vol.clone()), Gate::new(vol.clone()));
    let (a, server_a) = serve(ga.clone()).await;
    let (b, _server_b) = serve(gb.clone()).await;
    let rv = within(RemoteVolume::connect(quick(vec![a, b]), &Registry::new()))
        .await
        .unwrap();
    rv.write(0, block(1, 4096), false).await.unwrap();
    ga.set(Mode::Hang);
    let flush = {
        let rv = rv.clone();
        tokio::spawn(async move { rv.flush().await })
    };
    until(|| ga.requests.load(Ordering::Relaxed) >= 2).await;
    server_a.abort();
    within(flush).await.unwrap().unwrap();
    assert_eq!(ga.flushes.load(Ordering::Relaxed), 0);
    assert_eq!(gb.flushes.load(Ordering::Relaxed), 1);
    assert_eq!(&rv.read(0, 4096).await.unwrap()[..], &block(1, 4096)[..]);
}

#[tokio::test]
async fn a_hung_head_is_left_after_the_request_timeout() {
    let vol = Arc::new(MemVolume::new("vol", 16 * MIB));
    let (ga, gb) = (Gate::new(vol.clone()), Gate::new(vol.clone()));
    let (a, _sa) = serve(ga.clone()).await;
    let (b, _sb) = serve(gb.clone()).await;
    let registry = Registry::new();
    let cfg = RemoteConfig {
        request_timeout: Duration::from_millis(200),
        ..quick(vec![a, b])
    };
    let rv = within(RemoteVolume::connect(cfg, &registry)).await.unwrap();
    ga.set(Mode::Hang);
    within(rv.write(4096, block(2, 4096), false)).await.unwrap();
    assert_eq!(rv.current_head(), Some(b));
    assert_eq!(
        metric(
            &registry,
            "stockade_attach_reconnects_total",
            Some(("reason", "timeout"))
        ),
        1.0
    );
    assert_eq!(&rv.read(4096, 4096).await.unwrap()[..], &block(2, 4096)[..]);
}

/// Heads that take requests and never answer: after the first timeout, the retries end at the
/// retry deadline, not a whole request timeout later.
#[tokio::test]
async fn hung_heads_fail_a_request_at_the_retry_deadline() {
    let vol = Arc::new(MemVolume::new("vol", 16 * MIB));
    let (ga, gb) = (Gate::new(vol.clone()), Gate::new(vol.clone()));
    let (a, _sa) = serve(ga.clone()).await;
    let (b, _sb) = serve(gb.clone()).await;
    let cfg = RemoteConfig {
        request_timeout: Duration::from_millis(1000),
        retry_deadline: Duration::from_millis(300),
        ..quick(vec![a, b])
    };
    let rv = within(RemoteVolume::connect(cfg, &Registry::new()))
        .await
        .unwrap();
    ga.set(Mode::Hang);
    gb.set(Mode::Hang);
    let t0 = Instant::now();
    match within(rv.write(0, block(3, 4096), false)).await {
        Err(e @ VolumeError::Io { .. }) => assert!(e.to_string().contains("retry deadline"), "{e}"),
        other => panic!("{other:?}"),
    }
    // The first attempt times out at 1 s, the retries end 300 ms later; without the cap the
    // second attempt ran its whole second (2 s in all).
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1250), "{took:?}");
    assert!(took < Duration::from_millis(1800), "{took:?}");
}

#[tokio::test]
async fn eshutdown_moves_on_and_eio_is_retried_once_per_head() {
    let vol = Arc::new(MemVolume::new("vol", 16 * MIB));
    let gates: Vec<_> = (0..3).map(|_| Gate::new(vol.clone())).collect();
    let mut addrs = Vec::new();
    let mut servers = Vec::new();
    for g in &gates {
        let (a, s) = serve(g.clone()).await;
        addrs.push(a);
        servers.push(s);
    }
    let registry = Registry::new();
    let rv = within(RemoteVolume::connect(quick(addrs.clone()), &registry))
        .await
        .unwrap();

    // A head node that is stopping: the request goes to the next one.
    gates[0].set(Mode::Shutdown);
    within(rv.write(0, block(3, 4096), false)).await.unwrap();
    assert_eq!(rv.current_head(), Some(addrs[1]));
    let eshutdown = Some(("reason", "eshutdown"));
    assert_eq!(
        metric(&registry, "stockade_attach_reconnects_total", eshutdown),
        1.0
    );

    // EIO from one head node: tried elsewhere, succeeds.
    gates[1].set(Mode::Eio);
    within(rv.write(4096, block(4, 4096), false)).await.unwrap();
    assert_eq!(rv.current_head(), Some(addrs[2]));

    // EIO everywhere (a real error): returned after one try per head node, long before the
    // retry deadline.
    for g in &gates {
        g.set(Mode::Eio);
    }
    let t0 = Instant::now();
    let before = metric(&registry, "stockade_attach_retried_requests_total", None);
    match within(rv.read(0, 4096)).await {
        Err(VolumeError::Io { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(
        metric(&registry, "stockade_attach_retried_requests_total", None) - before,
        2.0
    );
    assert_eq!(
        metric(
            &registry,
            "stockade_attach_failed_requests_total",
            Some(("reason", "remote"))
        ),
        1.0
    );
}

#[tokio::test]
async fn answers_that_are_not_path_failures_are_returned_at_once() {
    let vol = Arc::new(MemVolume::new("vol", 4 * MIB).with_fast_zero(false));
    vol.poison(MIB..MIB + 512);
    let (a, _sa) = mem_server(vol.clone()).await;
    let registry = Registry::new();
    let rv = within(RemoteVolume::connect(quick(vec![a]), &registry))
        .await
        .unwrap();
    // One head node: its EIO is final, with the offset kept.
    match within(rv.read(MIB - 4096, 8192)).await {
        Err(VolumeError::Io {
            offset: Some(o), ..
        }) => assert_eq!(o, MIB),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        within(rv.write_zeroes(0, 4096, false, true, false)).await,
        Err(VolumeError::NotSupported { .. })
    ));
    // The local server checks ranges; called directly, the remote's answer comes back.
    let e = within(rv.write(4 * MIB, block(0, 4096), false))
        .await
        .unwrap_err();
    assert_eq!(e.nbd_errno(Cmd::Write), proto::ENOSPC);
    let e = within(rv.read(4 * MIB, 4096)).await.unwrap_err();
    assert_eq!(e.nbd_errno(Cmd::Read), proto::EINVAL);
    assert_eq!(
        metric(&registry, "stockade_attach_retried_requests_total", None),
        0.0
    );
    assert_eq!(
        metric(&registry, "stockade_attach_reconnects_total", None),
        0.0
    );
    // Every other command passes through.
    within(rv.trim(0, 4096, true)).await.unwrap();
    within(rv.cache(0, 4096)).await.unwrap();
    within(rv.write_zeroes(0, 4096, true, false, false))
        .await
        .unwrap();
    let ext = within(rv.block_status(0, 8192)).await.unwrap();
    assert_eq!(ext[0], Extent::zeroed(8192));
}

#[tokio::test]
async fn connecting_skips_dead_and_refusing_heads_and_gives_up_in_time() {
    let vol = Arc::new(MemVolume::new("vol", 4 * MIB));
    let other = Arc::new(MemVolume::new("other", MIB));
    let (wrong, _s1) = mem_server(other).await;
    let (good, _s2) = mem_server(vol).await;
    let dead = dead_addr().await;
    let registry = Registry::new();
    let rv = within(RemoteVolume::connect(
        quick(vec![dead, wrong, good]),
        &registry,
    ))
    .await
    .unwrap();
    assert_eq!(rv.current_head(), Some(good));
    assert_eq!(metric(&registry, "stockade_attach_head_index", None), 2.0);
    assert_eq!(
        metric(
            &registry,
            "stockade_attach_connects_total",
            Some(("result", "refused"))
        ),
        1.0
    );
    assert_eq!(
        metric(
            &registry,
            "stockade_attach_connects_total",
            Some(("result", "connect_error"))
        ),
        1.0
    );

    let cfg = RemoteConfig {
        retry_deadline: Duration::from_millis(300),
        ..quick(vec![dead, wrong])
    };
    let t0 = Instant::now();
    match within(RemoteVolume::connect(cfg, &Registry::new())).await {
        Err(RemoteError::Unreachable { last: Some(_), .. }) => {}
        other => panic!("{other:?}"),
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(matches!(
        RemoteConfig::new("vol", vec![]).validate(),
        Err(RemoteError::Config { .. })
    ));
}

#[tokio::test]
async fn requests_fail_with_eio_once_every_head_is_gone_past_the_deadline() {
    let vol = Arc::new(MemVolume::new("vol", 4 * MIB));
    let (a, sa) = head(vol.clone()).await;
    let (b, sb) = head(vol.clone()).await;
    let registry = Registry::new();
    let cfg = RemoteConfig {
        retry_deadline: Duration::from_millis(400),
        ..quick(vec![a, b])
    };
    let rv = within(RemoteVolume::connect(cfg, &registry)).await.unwrap();
    sa.abort();
    sb.abort();
    let t0 = Instant::now();
    match within(rv.write(0, block(5, 4096), false)).await {
        Err(e @ VolumeError::Io { .. }) => {
            assert_eq!(e.nbd_errno(Cmd::Write), proto::EIO);
            assert!(e.to_string().contains("retry deadline"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(350));
    assert_eq!(
        metric(
            &registry,
            "stockade_attach_failed_requests_total",
            Some(("reason", "deadline"))
        ),
        1.0
    );
    assert_eq!(rv.current_head(), None);
    assert_eq!(metric(&registry, "stockade_attach_head_index", None), -1.0);

    // A head node that comes back is found again.
    let (c, _sc) = mem_server(vol.clone()).await;
    let cfg = quick(vec![a, c]);
    let rv2 = within(RemoteVolume::connect(cfg, &Registry::new()))
        .await
        .unwrap();
    within(rv2.write(0, block(6, 4096), false)).await.unwrap();
}

#[tokio::test]
async fn a_remote_without_multi_conn_gets_every_write_with_fua() {
    let vol = Arc::new(MemVolume::new("vol", 4 * MIB).with_multi_conn(false));
    let g = Gate::new(vol.clone());
    let (a, _s) = serve(g.clone()).await;
    let rv = within(RemoteVolume::connect(quick(vec![a]), &Registry::new()))
        .await
        .unwrap();
    assert!(!rv.info().multi_conn);
    rv.write(0, block(7, 4096), false).await.unwrap();
    assert_eq!(g.fua_writes.load(Ordering::Relaxed), 1);

    let vol = Arc::new(MemVolume::new("vol", 4 * MIB));
    let g = Gate::new(vol.clone());
    let (a, _s) = serve(g.clone()).await;
    let rv = within(RemoteVolume::connect(quick(vec![a]), &Registry::new()))
        .await
        .unwrap();
    assert!(rv.info().multi_conn);
    rv.write(0, block(7, 4096), false).await.unwrap();
    assert_eq!(g.fua_writes.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_local_client_never_sees_the_remote_head_die() {
    use crate::nbd::client::NbdClient;
    let vol = Arc::new(MemVolume::new("vol", 32 * MIB));
    let (a, sa) = head(vol.clone()).await;
    let (b, _sb) = head(vol.clone()).await;
    let registry = Registry::new();
    let rv = within(RemoteVolume::connect(quick(vec![a, b]), &registry))
        .await
        .unwrap();
    let (local, _sl) = serve(rv.clone()).await;
    let client = Arc::new(
        NbdClient::connect(local, "vol", &ClientConfig::default())
            .await
            .unwrap(),
    );
    assert_eq!(client.details().size, 32 * MIB);
    vol.pause();
    let tasks: Vec<_> = (0..32u64)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                c.write(i * 65536, block(i + 50, 65536).into_bytes(), false)
                    .await
            })
        })
        .collect();
    until(|| vol.pending() >= 32).await;
    sa.abort();
    until(|| vol.pending() >= 64).await;
    vol.resume();
    for t in tasks {
        within(t).await.unwrap().unwrap();
    }
    within(client.flush()).await.unwrap();
    for i in 0..32u64 {
        let got = client.read(i * 65536, 65536).await.unwrap();
        assert_eq!(&got[..], &block(i + 50, 65536)[..]);
    }
    rv.close();
    // The local export is detached: the local connection ends.
    until(|| client.is_closed()).await;
}
