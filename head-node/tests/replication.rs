//! Replicated volumes in one process: three in-process sled controllers, three head-node
//! replication nodes on loopback TCP, volumes driven through the NBD `Volume` trait.

use common::AlignedBuf;
use common::ids::NodeId;
use head_node::metrics::HeadMetrics;
use head_node::nbd::Volume;
use head_node::replication::GroupId;
use head_node::replication::driver::{
    DriverConfig, GroupKind, NoPersist, SledAccess, VolumeTemplate,
};
use head_node::replication::memlog::MemLog;
use head_node::replication::node::ReplNode;
use head_node::replication::rvolume::ReplicatedVolume;
use head_node::replication::transport::TcpTransport;
use head_node::sleds::SledPool;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn scratch() -> tempfile::TempDir {
    let base = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-scratch");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new()
        .prefix("repl-")
        .tempdir_in(base)
        .unwrap()
}

/// A node's replication layer, its transport, and its view of the volume.
type TestNode = (
    Arc<ReplNode<TcpTransport>>,
    Arc<TcpTransport>,
    Arc<ReplicatedVolume<TcpTransport>>,
);

struct Cluster {
    _dir: tempfile::TempDir,
    key: common::ClusterKey,
    sleds: Vec<sled_controller::app::Running>,
    nodes: HashMap<u64, TestNode>,
    /// Every volume by (node, group), the first group's included.
    volumes: HashMap<(u64, u64), Arc<ReplicatedVolume<TcpTransport>>>,
}

async fn cluster(volume_size: u64) -> Cluster {
    cluster_with(
        volume_size,
        DriverConfig {
            tick: Duration::from_millis(20),
            ..DriverConfig::default()
        },
    )
    .await
}

async fn cluster_with(volume_size: u64, cfg: DriverConfig) -> Cluster {
    cluster_of(volume_size, cfg, &[42], false, Duration::from_secs(20)).await
}

/// Three nodes hosting a volume of each of `groups` (the first is the one `nodes` holds). With
/// `first_leads`, node 1 leads every group (the others wait ten times as long before they
/// campaign) and every node's throttling is on (unlimited until a volume's QoS says otherwise).
/// `failover` is how long a request rides through elections.
async fn cluster_of(
    volume_size: u64,
    cfg: DriverConfig,
    groups: &[u64],
    first_leads: bool,
    failover: Duration,
) -> Cluster {
    let dir = scratch();
    let key_path = dir.path().join("cluster.key");
    let key = common::ClusterKey::load_or_create(&key_path).unwrap();
    let mut sleds = Vec::new();
    for i in 0..3 {
        let mut cfg = sled_controller::config::SledConfig::new(key_path.clone());
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        cfg.metrics_listen = "127.0.0.1:0".parse().unwrap();
        cfg.chunk_size = common::ByteSize(8 << 20);
        cfg.device = vec![
            format!("{}:512M", dir.path().join(format!("s{i}.img")).display())
                .parse()
                .unwrap(),
        ];
        sleds.push(
            sled_controller::app::start(cfg, prometheus::Registry::new())
                .await
                .unwrap(),
        );
    }
    let sled_addrs: Vec<SocketAddr> = sleds.iter().map(|s| s.listen).collect();
    // Three nodes on loopback: bind first so every node knows every address.
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut nodes = HashMap::new();
    let mut volumes = HashMap::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let peers = (0..3)
            .filter(|j| *j != i)
            .map(|j| (NodeId(j as u64 + 1), addrs[j]))
            .collect();
        let t = Arc::new(
            TcpTransport::new(NodeId(id), key.clone(), peers, &prometheus::Registry::new())
                .unwrap(),
        );
        tokio::spawn(t.serve(listener));
        let mut cfg = cfg.clone();
        if first_leads && id != 1 {
            cfg.group.election_tick *= 10;
        }
        let node = ReplNode::new(NodeId(id), t.clone(), Arc::new(NoPersist), cfg, failover);
        if first_leads {
            node.set_throttle(
                head_node::replication::throttle::NodeThrottle::new(
                    common::throttle::GlobalConfig::UNLIMITED,
                    Arc::new(common::SystemClock::new()),
                )
                .unwrap(),
            );
        }
        let pool = Arc::new(SledPool::new(&sled_addrs, key.clone(), NodeId(id)));
        let metrics = HeadMetrics::new(&prometheus::Registry::new()).unwrap();
        for (k, g) in groups.iter().enumerate() {
            let name = if k == 0 {
                "vol0".to_string()
            } else {
                format!("vol{g}")
            };
            let vol = node
                .add_group(
                    GroupId(u128::from(*g)),
                    &name,
                    MemLog::new(&[1, 2, 3]),
                    SledAccess {
                        pool: pool.clone(),
                        key: key.clone(),
                        metrics: metrics.clone(),
                    },
                    GroupKind::Volume {
                        template: Some(VolumeTemplate {
                            name: name.clone(),
                            size: volume_size,
                            replicas: 3,
                        }),
                    },
                )
                .unwrap();
            volumes.insert((id, *g), vol);
        }
        let vol = volumes[&(id, groups[0])].clone();
        nodes.insert(id, (node, t, vol));
    }
    Cluster {
        _dir: dir,
        key,
        sleds,
        nodes,
        volumes,
    }
}

impl Cluster {
    async fn leader(&self, timeout: Duration) -> u64 {
        let start = Instant::now();
        loop {
            for (id, (_, _, v)) in &self.nodes {
                if v.handle().status().serving {
                    return *id;
                }
            }
            assert!(
                start.elapsed() < timeout,
                "no serving leader within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn buf(len: usize, b: u8) -> AlignedBuf {
    let mut x = AlignedBuf::zeroed(len);
    x.fill(b);
    x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_node_read_back_through_every_node() {
    let c = cluster(64 << 20).await;
    let leader = c.leader(Duration::from_secs(20)).await;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let (_, _, lv) = &c.nodes[&leader];
    let (_, _, fv) = &c.nodes[&follower];
    assert_eq!(lv.info().size, 64 << 20);
    lv.write(0, buf(65536, 0x11), false).await.unwrap();
    // Through a follower: forwarded to the leader.
    fv.write(1 << 20, buf(8192, 0x22), false).await.unwrap();
    // Unaligned, through the follower: the leader does the read-modify-write.
    fv.write(100, buf(50, 0x33), false).await.unwrap();
    for id in 1..=3u64 {
        let v = &c.nodes[&id].2;
        let b = v.read(0, 65536).await.unwrap();
        assert!(b[..100].iter().all(|&x| x == 0x11), "node {id}");
        assert!(b[100..150].iter().all(|&x| x == 0x33), "node {id}");
        assert!(b[150..].iter().all(|&x| x == 0x11), "node {id}");
        assert!(
            v.read(1 << 20, 8192)
                .await
                .unwrap()
                .iter()
                .all(|&x| x == 0x22)
        );
        assert!(v.read(2 << 20, 4096).await.unwrap().iter().all(|&x| x == 0));
    }
    fv.write_zeroes(0, 4096, false, false, false).await.unwrap();
    assert!(lv.read(0, 4096).await.unwrap().iter().all(|&x| x == 0));
    // Write-back reaches the sleds: eventually nothing is left unflushed.
    let start = Instant::now();
    loop {
        let st = lv.handle().status();
        if st.unflushed_bytes == 0 && st.flushed >= st.applied.saturating_sub(2) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "write-back stuck: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = &c.key;
    let _ = &c.sleds;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_serves_every_acknowledged_write_after_the_old_one_dies() {
    let mut c = cluster(64 << 20).await;
    let mut acked: Vec<(u64, u8)> = Vec::new();
    let leader = c.leader(Duration::from_secs(20)).await;
    let old_term = c.nodes[&leader].2.handle().status().term;
    let survivor = (1..=3).find(|n| *n != leader).unwrap();
    let v = c.nodes[&survivor].2.clone();
    let write = |i: u64| (i * 65536, i as u8 + 1);
    for i in 0..20u64 {
        let (off, byte) = write(i);
        v.write(off, buf(65536, byte), false).await.unwrap();
        acked.push((off, byte));
    }
    // Kill the leader: drop its node and transport.
    let (node, t, _) = c.nodes.remove(&leader).unwrap();
    t.shutdown();
    drop(node);
    let started = Instant::now();
    // The survivor keeps serving through the election (a pause, not an error).
    for (off, byte) in &acked {
        let b = v.read(*off, 65536).await.unwrap();
        assert!(
            b.iter().all(|x| x == byte),
            "write at {off} lost after failover"
        );
    }
    eprintln!(
        "reads resumed {:?} after the leader died",
        started.elapsed()
    );
    // The new leader takes writes too, and serves them with the old ones, through both nodes.
    // (The old leader is gone from `c.nodes`, so the new one is another node; an election
    // happened if its term is newer.)
    let new_leader = c.leader(Duration::from_secs(20)).await;
    let new_term = c.nodes[&new_leader].2.handle().status().term;
    assert!(
        new_term > old_term,
        "node {new_leader} serves at term {new_term}, not after an election (term {old_term})"
    );
    for i in 20..40u64 {
        let (off, byte) = write(i);
        v.write(off, buf(65536, byte), false).await.unwrap();
        acked.push((off, byte));
    }
    for (id, (_, _, nv)) in &c.nodes {
        for (off, byte) in &acked {
            let b = nv.read(*off, 65536).await.unwrap();
            assert!(
                b.iter().all(|x| x == byte),
                "node {id}: write at {off} lost"
            );
        }
    }
}

/// Trims carry no data, but each one held unflushed costs memory (overlay, log): while the
/// sleds cannot take write-back, trims alone must also wait at the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trims_alone_also_wait_at_the_unflushed_bound() {
    const MAX: u64 = 1 << 20;
    let mut c = cluster_with(
        64 << 20,
        DriverConfig {
            tick: Duration::from_millis(20),
            max_unflushed_bytes: MAX,
            stale_after: Duration::from_secs(600),
            ..DriverConfig::default()
        },
    )
    .await;
    let leader = c.leader(Duration::from_secs(20)).await;
    let v = c.nodes[&leader].2.clone();
    v.write(0, buf(65536, 1), false).await.unwrap();
    for s in std::mem::take(&mut c.sleds) {
        s.stop().await;
    }
    // Four times the bound's worth of 4 KiB trims (at their minimum charge), all at once.
    let n = 4 * MAX / 4096;
    let mut trims = Vec::new();
    for i in 0..n {
        let v = v.clone();
        trims.push(tokio::spawn(async move {
            let _ = v.trim((i % 1024) * 8192, 4096, false).await;
        }));
    }
    let mut peak = 0;
    for _ in 0..100 {
        peak = peak.max(v.handle().status().unflushed_bytes);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(peak > 0, "nothing was accepted");
    assert!(
        peak <= MAX + 4096,
        "{peak} bytes of unflushed trims held against a bound of {MAX}"
    );
    assert!(trims.iter().any(|t| !t.is_finished()), "no trim waited");
    for t in trims {
        t.abort();
    }
}

/// While the sleds cannot take write-back, writes wait once the leader holds `max_unflushed`
/// bytes it has not written back: proposed-but-not-applied writes count too (they used to be let
/// through until applied, so three times the bound could pile up), and everything lands once the
/// sleds are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unflushed_data_stays_within_its_bound_while_the_sleds_are_away() {
    const MAX: u64 = 2 << 20;
    let mut c = cluster_with(
        64 << 20,
        DriverConfig {
            tick: Duration::from_millis(20),
            max_unflushed_bytes: MAX,
            stale_after: Duration::from_secs(600),
            ..DriverConfig::default()
        },
    )
    .await;
    let leader = c.leader(Duration::from_secs(20)).await;
    let v = c.nodes[&leader].2.clone();
    v.write(0, buf(65536, 1), false).await.unwrap();
    // The sleds go away: write-back fails and retries, nothing gets flushed.
    let mut cfgs = Vec::new();
    for s in std::mem::take(&mut c.sleds) {
        cfgs.push(s.listen);
        s.stop().await;
    }
    // Four times the bound in 64 KiB writes, all at once.
    let mut writers = Vec::new();
    for i in 0..128u64 {
        let v = v.clone();
        writers.push(tokio::spawn(async move {
            v.write(i * 65536, buf(65536, (i % 250) as u8 + 2), false)
                .await
                .unwrap();
        }));
    }
    let mut peak = 0;
    for _ in 0..100 {
        peak = peak.max(v.handle().status().unflushed_bytes);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(peak > 0, "nothing was accepted");
    // One entry may cross the bound (it is checked before each proposal).
    assert!(
        peak <= MAX + 65536,
        "{peak} unflushed bytes held against a bound of {MAX}"
    );
    assert!(writers.iter().any(|w| !w.is_finished()), "no write waited");
    // Back: every write lands.
    for (i, listen) in cfgs.into_iter().enumerate() {
        let mut cfg = sled_controller::config::SledConfig::new(c._dir.path().join("cluster.key"));
        cfg.listen = listen;
        cfg.metrics_listen = "127.0.0.1:0".parse().unwrap();
        cfg.chunk_size = common::ByteSize(8 << 20);
        cfg.device = vec![
            format!("{}:512M", c._dir.path().join(format!("s{i}.img")).display())
                .parse()
                .unwrap(),
        ];
        c.sleds.push(
            sled_controller::app::start(cfg, prometheus::Registry::new())
                .await
                .unwrap(),
        );
    }
    for w in writers {
        tokio::time::timeout(Duration::from_secs(60), w)
            .await
            .expect("a write never finished")
            .unwrap();
    }
    for i in 0..128u64 {
        let b = v.read(i * 65536, 65536).await.unwrap();
        assert!(b.iter().all(|&x| x == (i % 250) as u8 + 2), "write {i}");
    }
}

/// A block-status answer too fragmented for one peer frame used to be refused `TooLarge` by the
/// leader, retried by the follower for its whole failover timeout and then failed with `EIO`.
/// Now every answer stops at `MAX_ALLOCATION_RUNS` runs (NBD lets an answer cover less than was
/// asked), on the leader and through a follower alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_block_status_is_answered_in_part_through_a_follower() {
    use head_node::replication::rvolume::MAX_ALLOCATION_RUNS;
    const ZEROES: u64 = 12_000;
    let mut c = cluster_with(
        128 << 20,
        DriverConfig {
            tick: Duration::from_millis(20),
            stale_after: Duration::from_secs(600),
            ..DriverConfig::default()
        },
    )
    .await;
    let leader = c.leader(Duration::from_secs(20)).await;
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let lv = c.nodes[&leader].2.clone();
    let fv = c.nodes[&follower].2.clone();
    // Without sleds nothing is written back: every zero stays a run of its own in the overlay.
    for s in std::mem::take(&mut c.sleds) {
        s.stop().await;
    }
    let mut next = 0u64;
    while next < ZEROES {
        let batch: Vec<_> = (next..(next + 256).min(ZEROES))
            .map(|i| {
                let v = lv.clone();
                tokio::spawn(
                    async move { v.write_zeroes(i * 8192, 4096, true, false, false).await },
                )
            })
            .collect();
        for b in batch {
            b.await.unwrap().unwrap();
        }
        next += 256;
    }
    for (who, v) in [("leader", &lv), ("follower", &fv)] {
        let ext = tokio::time::timeout(Duration::from_secs(10), v.block_status(0, 128 << 20))
            .await
            .unwrap_or_else(|_| panic!("{who}: block status hung"))
            .unwrap_or_else(|e| panic!("{who}: block status failed: {e}"));
        assert_eq!(ext.len(), MAX_ALLOCATION_RUNS, "{who}");
        for (i, e) in ext.iter().enumerate() {
            assert_eq!(e.length, 4096, "{who}: extent {i}");
            assert_eq!(e.hole, i % 2 == 1, "{who}: extent {i}");
        }
    }
}

/// Another node's newer claim met first on the NBD write path (allocating a chunk nobody wrote,
/// before anything is proposed) deposes the leader's store; nothing else reports it there, yet
/// the leader must stop serving at once instead of staying leader and retrying every write
/// until it times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_fenced_while_allocating_stops_serving() {
    use common::ids::Epoch;
    let c = cluster(64 << 20).await;
    let leader = c.leader(Duration::from_secs(20)).await;
    let lv = c.nodes[&leader].2.clone();
    let term = lv.handle().status().term;
    let spec = lv
        .spec()
        .expect("a serving leader has the volume's description");
    // Node 9, outside the group, claims every sled of the volume with a far newer epoch.
    let cred = c.key.mint(spec.id, Epoch(1_000_000), NodeId(9));
    for s in &c.sleds {
        let sc = common::sled_client::SledClient::connect(
            s.listen,
            &c.key,
            NodeId(9),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        sc.claim(&cred).await.unwrap();
    }
    // A write to a chunk never written: its allocation on the sleds is refused as fenced.
    let w = tokio::spawn({
        let lv = lv.clone();
        async move { lv.write(8 << 20, buf(4096, 1), false).await }
    });
    let start = Instant::now();
    loop {
        let st = lv.handle().status();
        if !(st.serving && st.term == term) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "node {leader} still serves term {term} after a sled deposed it: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The write was never acknowledged; it fails or is still waiting for a leader the sleds
    // accept (none can be: node 9's claim is newer than any term here).
    if w.is_finished() {
        assert!(
            w.await.unwrap().is_err(),
            "a write acknowledged past the fence"
        );
    } else {
        w.abort();
    }
}

/// Three nodes hosting `groups` (see [`cluster_of`]), once node 1 leads them all, with the first
/// group's volume limited to two IOPS; `failover` is how long a request rides through elections.
async fn led_by_node_1_first_at_2_iops(groups: &[u64], failover: Duration) -> Cluster {
    use head_node::replication::entry::EntryHeader;
    let cfg = DriverConfig {
        tick: Duration::from_millis(20),
        ..DriverConfig::default()
    };
    let c = cluster_of(64 << 20, cfg, groups, true, failover).await;
    let start = Instant::now();
    while !groups
        .iter()
        .all(|g| c.volumes[&(1, *g)].handle().status().serving)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node 1 never led every group"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let qos = common::throttle::QosConfig {
        iops: Some(2),
        ..common::throttle::QosConfig::UNLIMITED
    };
    c.volumes[&(1, groups[0])]
        .handle()
        .propose_as_leader(EntryHeader::Qos(qos))
        .await
        .unwrap();
    // Every node applies the limit before the test goes on: a follower sizes its forwarded
    // calls' timeouts by the volume's QoS as it knows it.
    let start = Instant::now();
    while !(1..=3).all(|n| c.volumes[&(n, groups[0])].handle().status().qos == qos) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the limit never reached every node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c
}

/// A volume held back by its throttle, with far more requests waiting than it may run (more
/// than the calls one node may have open to another), must not hold what the other volumes
/// forwarded between the same two nodes need: a write to another volume through the same
/// follower and leader goes through at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_volume_does_not_starve_the_others_forwarded_through_the_same_nodes() {
    const SLOW: u64 = 42;
    const OTHER: u64 = 43;
    const WAITING: u64 = 1100;
    // One node leads both volumes, so their forwarded calls share its connection to a follower.
    let c = led_by_node_1_first_at_2_iops(&[SLOW, OTHER], Duration::from_secs(20)).await;
    let follower = 2u64;
    let slow = c.volumes[&(follower, SLOW)].clone();
    let mut waiting = Vec::new();
    for i in 0..WAITING {
        let v = slow.clone();
        waiting.push(tokio::spawn(async move {
            v.write(i * 4096, buf(4096, 1), false).await
        }));
    }
    // Wait until the follower's whole share of forwarded calls for the slow volume is held in
    // the leader's throttle: that is the case this test is about.
    let held = c.volumes[&(1, SLOW)]
        .throttle()
        .expect("the leader throttles the slow volume")
        .queue()
        .clone();
    let share = head_node::replication::rvolume::FORWARD_CALLS as u64;
    let start = Instant::now();
    while held.waiting() < share {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "only {} of the slow volume's forwarded calls wait in the leader's throttle",
            held.waiting()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let other = c.volumes[&(follower, OTHER)].clone();
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(3), other.write(0, buf(4096, 7), false))
        .await
        .expect("a write to an unthrottled volume waited for another volume's throttle")
        .expect("write");
    let back = tokio::time::timeout(Duration::from_secs(3), other.read(0, 4096))
        .await
        .expect("a read of an unthrottled volume waited for another volume's throttle")
        .expect("read");
    assert!(back.iter().all(|b| *b == 7));
    tracing::info!(elapsed = ?t0.elapsed(), "other volume served");
    assert!(
        waiting.iter().any(|w| !w.is_finished()),
        "the throttled volume was not held back: the test proves nothing"
    );
    for w in waiting {
        w.abort();
    }
}

/// Throttling delays a request and never fails it, also through a follower: a forwarded request
/// may wait in its leader's throttle far longer than a request rides through an election.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_waits_out_its_throttle_however_long() {
    // Two writes a second: the last of twelve waits about five seconds, more than twice the
    // two seconds a request rides through an election.
    let c = led_by_node_1_first_at_2_iops(&[42], Duration::from_secs(2)).await;
    let follower = c.volumes[&(2, 42)].clone();
    let t0 = Instant::now();
    let writes: Vec<_> = (0..12u64)
        .map(|i| {
            let v = follower.clone();
            tokio::spawn(async move { v.write(i * 4096, buf(4096, i as u8 + 1), false).await })
        })
        .collect();
    for (i, w) in writes.into_iter().enumerate() {
        w.await
            .unwrap()
            .unwrap_or_else(|e| panic!("throttled write {i} failed: {e}"));
    }
    assert!(
        t0.elapsed() >= Duration::from_secs(4),
        "the throttle did not hold the writes back: the test proves nothing"
    );
    for i in 0..12u64 {
        let back = follower.read(i * 4096, 4096).await.unwrap();
        assert!(back.iter().all(|b| *b == i as u8 + 1), "block {i}");
    }
}

/// A detach ends the throttle waits of the requests it disconnects: on the leader and through
/// a follower, a volume held back by a low limit drains at once instead of keeping the detach
/// waiting until its queue has been admitted (which failed a volume close after 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detach_does_not_wait_for_the_throttle() {
    let c = led_by_node_1_first_at_2_iops(&[42], Duration::from_secs(20)).await;
    // Twenty writes on each node: at two a second, ten seconds' worth each.
    let mut writes = Vec::new();
    for node in [1u64, 2] {
        for i in 0..20u64 {
            let v = c.volumes[&(node, 42)].clone();
            writes.push(tokio::spawn(async move {
                v.write(i * 4096, buf(4096, 3), false).await
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for node in [1u64, 2] {
        c.volumes[&(node, 42)].detach();
    }
    for node in [1u64, 2] {
        tokio::time::timeout(Duration::from_secs(3), c.volumes[&(node, 42)].drained())
            .await
            .unwrap_or_else(|_| panic!("node {node}: the detach waited for the throttle"));
    }
    let mut failed = 0;
    for w in writes {
        if w.await.unwrap().is_err() {
            failed += 1;
        }
    }
    assert!(
        failed >= 30,
        "only {failed} of 40 held-back writes were ended by the detach"
    );
}
