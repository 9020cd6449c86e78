//! The sled store against real in-process sled controllers: what it concludes about chunks
//! when sleds come and go.

use common::ids::{ChunkIndex, Epoch, NodeId, VolumeId};
use head_node::metrics::VolumeMetrics;
use head_node::sleds::SledPool;
use head_node::volume::VolumeSpec;
use head_node::volume::store::SledStore;
use sled_controller::config::SledConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const CHUNK: u64 = 8 << 20;

fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-scratch");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("store-")
        .tempdir_in(base)
        .unwrap()
}

fn sled_config(key: &Path, dev: &Path, listen: SocketAddr) -> SledConfig {
    let mut cfg = SledConfig::new(key.to_path_buf());
    cfg.listen = listen;
    cfg.metrics_listen = "127.0.0.1:0".parse().unwrap();
    cfg.chunk_size = common::ByteSize(CHUNK);
    cfg.device = vec![format!("{}:256M", dev.display()).parse().unwrap()];
    cfg
}

async fn start(cfg: SledConfig) -> sled_controller::app::Running {
    sled_controller::app::start(cfg, prometheus::Registry::new())
        .await
        .unwrap()
}

fn filled(len: usize, b: u8) -> bytes::Bytes {
    bytes::Bytes::from(vec![b; len])
}

/// A failover while one sled is away leaves the chunks nobody has written yet unknown (neither
/// known empty nor known held). When the other sleds then restart (new connections, whose first
/// use asks each sled what it holds), such a chunk must not be taken as lost from them: a write
/// to it has to land on them. It used to be skipped on every replica and reported done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_an_unknown_chunk_lands_after_the_sleds_reconnect() {
    let dir = scratch();
    let key_path = dir.path().join("cluster.key");
    let key = common::ClusterKey::load_or_create(&key_path).unwrap();
    let mut cfgs = Vec::new();
    let mut sleds = Vec::new();
    for i in 0..3 {
        let cfg = sled_config(
            &key_path,
            &dir.path().join(format!("s{i}.img")),
            "127.0.0.1:0".parse().unwrap(),
        );
        let running = start(cfg.clone()).await;
        cfgs.push(sled_config(
            &key_path,
            &dir.path().join(format!("s{i}.img")),
            running.listen,
        ));
        sleds.push(Some(running));
    }
    let addrs: Vec<SocketAddr> = sleds.iter().flatten().map(|s| s.listen).collect();
    let ids: Vec<_> = sleds.iter().flatten().map(|s| s.sled_id).collect();
    let spec = VolumeSpec::place(VolumeId(77), "v", 4 * CHUNK, CHUNK, &ids, 3).unwrap();
    let pool = Arc::new(
        SledPool::new(&addrs, key.clone(), NodeId(1)).with_request_timeout(Duration::from_secs(2)),
    );
    pool.discover().await;

    // The third sled is away when the store opens.
    sleds[2].take().unwrap().stop().await;
    let store = SledStore::new(
        spec.clone(),
        pool.clone(),
        key.clone(),
        NodeId(1),
        Epoch(1),
        VolumeMetrics::unregistered("v"),
    );
    let unreachable = store.open().await.unwrap();
    assert_eq!(unreachable, vec![ids[2]]);
    store.set_stale(&[ids[2]].into_iter().collect());

    // The other two restart: the store's next use of each is a new connection.
    for i in 0..2 {
        sleds[i].take().unwrap().stop().await;
        sleds[i] = Some(start(cfgs[i].clone()).await);
    }

    let offset = CHUNK + 4096;
    store
        .write(Epoch(1), offset, filled(8192, 0x5a))
        .await
        .expect("write to a chunk nobody wrote yet");
    assert!(
        store.flush().await.is_empty(),
        "flush of both current sleds"
    );
    // On both current replicas, not merely reported done.
    for (i, addr) in addrs.iter().enumerate().take(2) {
        let c = common::sled_client::SledClient::connect(
            *addr,
            &key,
            NodeId(9),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let st = c.volume_stat(spec.id).await.unwrap();
        assert!(
            st.chunks.contains(&ChunkIndex(1)),
            "sled {i} does not hold chunk 1: {st:?}"
        );
        let b = c.read(spec.id, ChunkIndex(1), 4096, 8192).await.unwrap();
        assert!(b.iter().all(|&x| x == 0x5a), "sled {i} holds other data");
    }
    let b = store.read(offset, 8192).await.unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));

    // This node leads again under a newer term: a write-back of the old term still running
    // must not go out with the new credential.
    store.set_epoch(Epoch(3));
    let e = store
        .write(Epoch(1), offset, filled(8192, 0x77))
        .await
        .expect_err("a write of an ended term");
    assert!(
        matches!(e, head_node::volume::store::StoreError::EpochEnded { .. }),
        "{e}"
    );
    for addr in addrs.iter().take(2) {
        let c = common::sled_client::SledClient::connect(
            *addr,
            &key,
            NodeId(9),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let b = c.read(spec.id, ChunkIndex(1), 4096, 8192).await.unwrap();
        assert!(
            b.iter().all(|&x| x == 0x5a),
            "the ended term's write landed"
        );
    }
    for s in sleds.into_iter().flatten() {
        s.stop().await;
    }
}

/// A request of this node's earlier term, refused because this node has since claimed the
/// volume again under a newer term, is the end of that term — not a deposition. It used to
/// depose the store, and with it the node's current leadership (a failover for nothing).
/// Another node's newer claim still deposes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_fenced_by_this_nodes_own_newer_claim_does_not_depose_it() {
    use head_node::volume::store::StoreError;
    let dir = scratch();
    let key_path = dir.path().join("cluster.key");
    let key = common::ClusterKey::load_or_create(&key_path).unwrap();
    let sled = start(sled_config(
        &key_path,
        &dir.path().join("s0.img"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await;
    let spec = VolumeSpec::place(VolumeId(78), "v", 4 * CHUNK, CHUNK, &[sled.sled_id], 1).unwrap();
    // One pool per node, as in a head node: two pools of one node would supersede each other's
    // connections at the sled (each new connection ends the node's older ones), and a request
    // could meet a connection the other pool's reconnect had just closed.
    let pools: std::collections::HashMap<u64, Arc<SledPool>> = [1, 2]
        .into_iter()
        .map(|n| {
            let pool = Arc::new(SledPool::new(&[sled.listen], key.clone(), NodeId(n)));
            (n, pool)
        })
        .collect();
    let store_of = |node: u64, epoch: u64| {
        SledStore::new(
            spec.clone(),
            pools[&node].clone(),
            key.clone(),
            NodeId(node),
            Epoch(epoch),
            VolumeMetrics::unregistered("v"),
        )
    };
    // Node 1 under term 1, then (the same node, a later leadership) under term 2.
    let old = store_of(1, 1);
    assert!(old.open().await.unwrap().is_empty());
    old.write(Epoch(1), 0, filled(4096, 1)).await.unwrap();
    let new = store_of(1, 2);
    assert!(new.open().await.unwrap().is_empty());
    let e = old
        .write(Epoch(1), 0, filled(4096, 2))
        .await
        .expect_err("a write of the ended term");
    assert!(matches!(e, StoreError::EpochEnded { .. }), "{e}");
    assert_eq!(old.deposed_by(), None, "fenced by its own node's claim");
    // The current term writes on.
    new.write(Epoch(2), 0, filled(4096, 3)).await.unwrap();
    assert!(new.read(0, 4096).await.unwrap().iter().all(|&x| x == 3));
    // Another node's newer claim deposes.
    let other = store_of(2, 3);
    assert!(other.open().await.unwrap().is_empty());
    let e = new
        .write(Epoch(2), 0, filled(4096, 4))
        .await
        .expect_err("a write of a deposed node");
    assert!(matches!(e, StoreError::Deposed { .. }), "{e}");
    assert_eq!(new.deposed_by(), Some((Epoch(3), NodeId(2))));
    sled.stop().await;
}
