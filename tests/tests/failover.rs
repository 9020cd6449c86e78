//! Three head nodes replicating a volume with Raft over three sleds: leader kills under load,
//! a frozen (SIGSTOP) leader fenced out at the sleds, followers catching up from the log and
//! from a snapshot, a torn log tail, a node that lost its state rejoining.

use rand::{Rng, SeedableRng};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::head::{Cluster3, HeadProc};
use tests::http_get;
use tests::nbd::NbdClient;
use tests::writer::{BS, Ledger, block, verify, writer};

fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            // Internal groups (the metadata group, pool groups) are not the test's volume.
            .filter(|l| !l.contains("volume=\"_"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// The index of the head node serving the volume (role 3), once there is one.
fn serving(heads: &[HeadProc], timeout: Duration) -> usize {
    tests::eventually(timeout, "a serving leader", || {
        heads
            .iter()
            .position(|h| metric(h.ready.admin, "stockade_raft_role") == Some(3.0))
    })
}

#[test]
fn killing_the_leader_under_load_loses_no_acknowledged_write() {
    let rounds: usize = std::env::var("STOCKADE_FAILOVER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    assert!(
        rounds >= 1,
        "STOCKADE_FAILOVER_ROUNDS must be at least 1 (zero rounds would test nothing)"
    );
    let seed: u64 = std::env::var("STOCKADE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    eprintln!("seed {seed}, {rounds} rounds");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let size = 128u64 << 20;
    let mut c = Cluster3::start("failover-kill", 3, "2GiB", "8MiB", &["vol0:128MiB"], &[]);
    let leader = serving(&c.heads, Duration::from_secs(60));
    let first_target = (leader + 1) % 3;
    let target = Arc::new(Mutex::new(c.heads[first_target].ready.nbd));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let w = {
        let (t, l, s, p) = (target.clone(), ledger.clone(), stop.clone(), pause.clone());
        std::thread::spawn(move || writer("vol0", seed, size, t, l, s, p))
    };
    let mut resumes = Vec::new();
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..1200)));
        let leader = serving(&c.heads, Duration::from_secs(60));
        // The writer goes through a node that survives.
        let survivor = (leader + 1 + rng.gen_range(0..2)) % 3;
        *target.lock().unwrap() = c.heads[survivor].ready.nbd;
        let before = ledger.lock().unwrap().writes;
        c.heads[leader].proc.kill9();
        let killed = Instant::now();
        // I/O resumes through the survivor.
        tests::eventually(
            Duration::from_secs(60),
            "writes to resume after the leader died",
            || (ledger.lock().unwrap().writes > before + 3).then_some(()),
        );
        let resumed = killed.elapsed();
        resumes.push(resumed);
        eprintln!(
            "round {round}: killed head{} ; writes resumed after {resumed:?}",
            leader + 1
        );
        // Check everything acknowledged so far, with the writer paused.
        pause.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        let snapshot = {
            let l = ledger.lock().unwrap();
            Ledger {
                acked: l.acked.clone(),
                maybe: l.maybe.clone(),
                history: l.history.clone(),
                in_flight: l.in_flight,
                ..Ledger::default()
            }
        };
        verify(
            c.heads[survivor].ready.nbd,
            "vol0",
            &snapshot,
            &format!("round {round}"),
        );
        c.heads[leader].restart();
        pause.store(false, Ordering::SeqCst);
    }
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let l = ledger.lock().unwrap();
    eprintln!(
        "{} writes acknowledged; resume times {resumes:?}; longest pause {:?}",
        l.writes, l.longest_gap
    );
    assert!(l.writes > 50, "too few writes went through");
    // After everything, every node serves every acknowledged write.
    let leader = serving(&c.heads, Duration::from_secs(60));
    for h in &c.heads {
        verify(h.ready.nbd, "vol0", &l, "final");
    }
    let _ = leader;
}

#[test]
fn a_frozen_leader_is_fenced_at_the_sleds_and_steps_down() {
    // Sled 3 is killed below to hold write-back pending; a long stale-after keeps the leader
    // from recording it stale (and finishing the write-back without it) before the freeze.
    let mut c = Cluster3::start(
        "failover-freeze",
        3,
        "2GiB",
        "8MiB",
        &["vol0:64MiB"],
        &["--stale-after", "60s"],
    );
    let l1 = serving(&c.heads, Duration::from_secs(60));
    let mut cl =
        NbdClient::connect(c.heads[l1].ready.nbd, "vol0", Duration::from_secs(30)).unwrap();
    // Allocate the chunks, then take sled 3 away: write-back to it fails and retries.
    cl.write(0, &block(1)).unwrap();
    tests::eventually(Duration::from_secs(30), "write-back", || {
        (metric(c.heads[l1].ready.admin, "stockade_volume_unflushed_bytes") == Some(0.0))
            .then_some(())
    });
    c.sleds[2].proc.kill9();
    // X: acknowledged (in the Raft log of a majority), not yet on every sled.
    cl.write(0, &block(2)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        metric(c.heads[l1].ready.admin, "stockade_volume_unflushed_bytes").unwrap_or(0.0) > 0.0
    );
    drop(cl);
    // Freeze the leader with its write-back pending.
    c.heads[l1].proc.sigstop();
    let others: Vec<usize> = (0..3).filter(|i| *i != l1).collect();
    let l2 = tests::eventually(Duration::from_secs(60), "a new leader", || {
        others
            .iter()
            .copied()
            .find(|i| metric(c.heads[*i].ready.admin, "stockade_raft_role") == Some(3.0))
    });
    c.sleds[2].restart();
    // Y: new data on the same block through the new leader, written back everywhere.
    let mut c2 =
        NbdClient::connect(c.heads[l2].ready.nbd, "vol0", Duration::from_secs(30)).unwrap();
    c2.write(0, &block(3)).unwrap();
    tests::eventually(
        Duration::from_secs(30),
        "write-back by the new leader",
        || {
            (metric(c.heads[l2].ready.admin, "stockade_volume_unflushed_bytes") == Some(0.0))
                .then_some(())
        },
    );
    let fenced_before: f64 = c
        .sleds
        .iter()
        .filter_map(|s| metric(s.ready.metrics, "stockade_sled_fenced_writes_total"))
        .sum();
    // Resume the old leader with the other head nodes frozen in turn: its pending write-back
    // of X goes to the sleds, which refuse it. What the new leader sent it while it was frozen
    // is still in its sockets, so it may learn of the new term from that first and step down
    // through Raft; either way the sleds refuse the old write-back (counted below on both
    // sides). That a refusal alone deposes a leader, with no word from its peers, is checked
    // deterministically in the replication simulation (`head-node/src/replication/sim.rs`).
    for i in &others {
        c.heads[*i].proc.sigstop();
    }
    c.heads[l1].proc.sigcont();
    tests::eventually(Duration::from_secs(30), "the old leader fenced", || {
        let fenced: f64 = c
            .sleds
            .iter()
            .filter_map(|s| metric(s.ready.metrics, "stockade_sled_fenced_writes_total"))
            .sum();
        (fenced > fenced_before).then_some(())
    });
    tests::eventually(
        Duration::from_secs(30),
        "the old leader to step down",
        || (metric(c.heads[l1].ready.admin, "stockade_raft_role") == Some(0.0)).then_some(()),
    );
    assert!(metric(c.heads[l1].ready.admin, "stockade_volume_fenced_total").unwrap_or(0.0) >= 1.0);
    for i in &others {
        c.heads[*i].proc.sigcont();
    }
    let leader = serving(&c.heads, Duration::from_secs(60));
    tests::eventually(Duration::from_secs(60), "no stale replica", || {
        (metric(
            c.heads[leader].ready.admin,
            "stockade_volume_stale_replicas",
        ) == Some(0.0))
        .then_some(())
    });
    // The sleds hold Y, on every replica: read straight from each sled.
    let list: Vec<common::admin::VolumeInfo> =
        tests::admin::Admin::of(&c).json(&["volume", "list"]);
    let id: common::ids::VolumeId = list
        .iter()
        .find(|v| v.name == "vol0")
        .expect("vol0 listed")
        .id
        .parse()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (i, s) in c.sleds.iter().enumerate() {
        let got = rt.block_on(async {
            let cl = common::sled_client::SledClient::connect(
                s.ready.listen,
                &c.key,
                common::ids::NodeId(99),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
            cl.read(id, common::ids::ChunkIndex(0), 0, BS as u32)
                .await
                .unwrap()
        });
        assert!(got[..] == block(3)[..], "sled {} holds stale data", i + 1);
    }
    for h in &c.heads {
        let mut r = NbdClient::connect(h.ready.nbd, "vol0", Duration::from_secs(30)).unwrap();
        assert_eq!(
            r.read(0, BS as u32).unwrap(),
            block(3),
            "head{} reads stale data",
            h.ready.node_id
        );
    }
    let log = c.heads[l1].proc.log_text();
    assert!(
        log.contains("stopped leading"),
        "old leader did not log stepping down"
    );
}

/// A sled dies and is recorded stale; the leader dies too; the next leader (which learnt the
/// stale set from the log) resynchronises the sled when it returns, after which the sled alone
/// holds every write.
#[test]
fn the_next_leader_resyncs_a_sled_the_last_one_recorded_stale() {
    let mut c = Cluster3::start("failover-stale", 3, "2GiB", "8MiB", &["vol0:64MiB"], &[]);
    let l1 = serving(&c.heads, Duration::from_secs(60));
    let mut cl =
        NbdClient::connect(c.heads[l1].ready.nbd, "vol0", Duration::from_secs(30)).unwrap();
    let mut expect = std::collections::BTreeMap::new();
    let mut put = |cl: &mut NbdClient, i: u64, id: u64| {
        // Spread over every chunk of the volume (8 MiB chunks, 64 KiB blocks).
        let off = (i * 37 % 1024) * BS as u64;
        cl.write(off, &block(id)).unwrap();
        expect.insert(off, id);
    };
    for i in 0..64 {
        put(&mut cl, i, 1 + i);
    }
    c.sleds[0].proc.kill9();
    // Writes go on with a replica down: acknowledged at once, written back to the other two
    // once the leader has recorded the dead sled stale (in the replicated volume state, so
    // every node reports it).
    for i in 64..192 {
        put(&mut cl, i, 1 + i);
    }
    for h in &c.heads {
        tests::eventually(Duration::from_secs(30), "the sled recorded stale", || {
            (metric(h.ready.admin, "stockade_volume_stale_replicas") == Some(1.0)).then_some(())
        });
    }
    tests::eventually(Duration::from_secs(30), "write-back without it", || {
        (metric(c.heads[l1].ready.admin, "stockade_volume_unflushed_bytes") == Some(0.0))
            .then_some(())
    });
    drop(cl);
    c.heads[l1].proc.kill9();
    let l2 = serving(&c.heads, Duration::from_secs(60));
    c.sleds[0].restart();
    let a2 = c.heads[l2].ready.admin;
    tests::eventually(
        Duration::from_secs(60),
        "resynchronised by the new leader",
        || (metric(a2, "stockade_volume_stale_replicas") == Some(0.0)).then_some(()),
    );
    assert!(metric(a2, "stockade_volume_resync_bytes_total").unwrap_or(0.0) > 0.0);
    let mut cl =
        NbdClient::connect(c.heads[l2].ready.nbd, "vol0", Duration::from_secs(30)).unwrap();
    for i in 192..256 {
        put(&mut cl, i, 1 + i);
    }
    tests::eventually(Duration::from_secs(30), "write-back", || {
        (metric(a2, "stockade_volume_unflushed_bytes") == Some(0.0)).then_some(())
    });
    c.sleds[1].proc.kill9();
    c.sleds[2].proc.kill9();
    for (off, id) in &expect {
        assert_eq!(
            cl.read(*off, BS as u32).unwrap(),
            block(*id),
            "block at {off} read from the resynchronised sled alone"
        );
    }
}

#[test]
fn followers_catch_up_from_the_log_and_from_a_snapshot() {
    let mut c = Cluster3::start("failover-catchup", 3, "2GiB", "8MiB", &["vol0:64MiB"], &[]);
    let leader = serving(&c.heads, Duration::from_secs(60));
    let f = (leader + 1) % 3;
    c.heads[f].proc.kill9();
    let mut cl =
        NbdClient::connect(c.heads[leader].ready.nbd, "vol0", Duration::from_secs(30)).unwrap();
    // Enough writes for write-back to advance the flushed index and compact the log past
    // what the dead follower has.
    for i in 0..400u64 {
        cl.write((i % 512) * BS as u64, &block(1000 + i)).unwrap();
    }
    tests::eventually(Duration::from_secs(30), "write-back and compaction", || {
        let a = c.heads[leader].ready.admin;
        (metric(a, "stockade_volume_unflushed_bytes") == Some(0.0)
            && metric(a, "stockade_volume_flushed_index").unwrap_or(0.0) > 300.0)
            .then_some(())
    });
    c.heads[f].restart();
    let committed = metric(c.heads[leader].ready.admin, "stockade_raft_commit_index").unwrap();
    tests::eventually(Duration::from_secs(60), "the follower to catch up", || {
        (metric(c.heads[f].ready.admin, "stockade_raft_applied_index").unwrap_or(0.0) >= committed)
            .then_some(())
    });
    // It replayed its own log, then needed a snapshot for what the leader had compacted.
    assert!(
        metric(
            c.heads[f].ready.admin,
            "stockade_volume_snapshots_installed_total"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the follower caught up without a snapshot: the test did not reach that path"
    );
    // Now make it matter: kill the old leader; the caught-up nodes serve everything.
    c.heads[leader].proc.kill9();
    let _ = serving(&c.heads, Duration::from_secs(60));
    // No wait for the export: a restarted node serves NBD only once its exports are open.
    let mut r = NbdClient::connect(c.heads[f].ready.nbd, "vol0", Duration::from_secs(60)).unwrap();
    for i in 0..400u64 {
        assert_eq!(
            r.read((i % 512) * BS as u64, BS as u32).unwrap(),
            block(1000 + i),
            "write {i}"
        );
    }
}

/// Three head nodes serving vol0 with blocks 0..20 written (block `i` holds `block(i + 1)`);
/// the index of the leader.
fn three_heads_with_20_blocks(name: &str) -> (Cluster3, usize) {
    let c = Cluster3::start(name, 3, "2GiB", "8MiB", &["vol0:64MiB"], &[]);
    let leader = serving(&c.heads, Duration::from_secs(60));
    let mut cl =
        NbdClient::connect(c.heads[leader].ready.nbd, "vol0", Duration::from_secs(30)).unwrap();
    for i in 0..20u64 {
        cl.write(i * BS as u64, &block(i + 1)).unwrap();
    }
    (c, leader)
}

/// Starts `head` expecting it to refuse (exit non-zero by itself); its whole log.
fn refused_start(head: &mut HeadProc, what: &str) -> String {
    head.proc.start();
    let status = (head.proc.wait_exit(Duration::from_secs(30)))
        .unwrap_or_else(|| panic!("head-node started over {what} and kept running"));
    assert!(
        !status.success(),
        "head-node over {what} exited with success"
    );
    head.proc.log_text()
}

/// The segments of a head node's Raft log, oldest first.
fn wal_segments(wal: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut segs: Vec<_> = std::fs::read_dir(wal)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    segs
}

#[test]
fn a_torn_log_tail_is_cut_on_restart() {
    let (mut c, leader) = three_heads_with_20_blocks("failover-torn");
    let victim = (leader + 1) % 3;
    c.heads[victim].proc.kill9();
    // Append half a record's worth of garbage to its newest log segment.
    let wal = c.dir.path().join(format!("head{}-state/wal", victim + 1));
    let segs = wal_segments(&wal);
    let last = segs.last().expect("a segment");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
        f.write_all(&[0x5a; 37]).unwrap();
    }
    c.heads[victim].restart();
    let log = c.heads[victim].proc.log_text();
    assert!(log.contains("torn tail"), "the torn tail was not reported");
    // It rejoins and serves (forwarding) everything.
    let mut r =
        NbdClient::connect(c.heads[victim].ready.nbd, "vol0", Duration::from_secs(60)).unwrap();
    for i in 0..20u64 {
        assert_eq!(r.read(i * BS as u64, BS as u32).unwrap(), block(i + 1));
    }
}

/// True when some head node serves the volume (role 3) at some moment within `window`.
fn any_serving_within(heads: &[HeadProc], window: Duration) -> bool {
    let end = Instant::now() + window;
    while Instant::now() < end {
        if heads
            .iter()
            .any(|h| metric(h.ready.admin, "stockade_raft_role") == Some(3.0))
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn a_head_that_lost_its_state_rejoins_and_votes_only_once_caught_up() {
    let (mut c, leader) = three_heads_with_20_blocks("failover-rejoin");
    let victim = (leader + 1) % 3;
    let state = c.dir.path().join(format!("head{}-state", victim + 1));
    let marker = state.join("REJOIN");
    c.heads[victim].proc.kill9();

    // --rejoin on a node that still has its log is refused: it would give up its votes'
    // protection for nothing.
    c.heads[victim].proc.add_flag("--rejoin");
    let log = refused_start(&mut c.heads[victim], "--rejoin over an existing log");
    assert!(
        log.contains("holds a Raft log"),
        "no clear refusal:\n{}",
        c.heads[victim].proc.log_tail(20)
    );
    assert!(!marker.exists(), "the refused start left a rejoin marker");

    // Its log is damaged (a flipped byte in its first record, not a torn tail): it refuses to
    // start and says how to rebuild it.
    let segs = wal_segments(&state.join("wal"));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&segs[0])
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 100).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], 100).unwrap();
    }
    c.heads[victim].proc.remove_flag("--rejoin");
    let log = refused_start(&mut c.heads[victim], "a damaged log");
    let error = (log.lines())
        .find(|l| l.contains("the log is damaged"))
        .unwrap_or_else(|| panic!("no clear error:\n{}", c.heads[victim].proc.log_tail(60)));
    assert!(error.contains("--rejoin"), "no way out named: {error}");
    c.heads[victim].proc.add_flag("--rejoin");

    // Its state is lost. With the old leader down too, the survivor alone must not be elected
    // with the empty node's vote: it might lack entries only the lost log had helped commit.
    std::fs::remove_dir_all(&state).unwrap();
    c.heads[leader].proc.kill9();
    c.heads[victim].restart();
    assert!(marker.exists(), "the rejoining node keeps no marker");
    assert!(
        !any_serving_within(&c.heads, Duration::from_secs(4)),
        "a leader was elected with the vote of a node that lost its state"
    );
    // (Its metadata group may have caught up, from a metadata leader that outlived the
    // volume's; the node as a whole rejoins only once every group it runs has.)
    assert!(
        marker.exists(),
        "the node finished rejoining while its volume had no leader to catch up from"
    );

    // The old leader returns: the node catches up, leaves the marker behind and votes again.
    c.heads[leader].restart();
    tests::eventually(Duration::from_secs(60), "the rejoin to finish", || {
        (!marker.exists()).then_some(())
    });
    tests::eventually(Duration::from_secs(10), "the rejoin to be logged", || {
        (c.heads[victim].proc.log_text())
            .contains("rejoined: this node holds everything committed in its groups")
            .then_some(())
    });
    // Its groups say so on /metrics too (the alert on a stuck rejoin watches this).
    let (_, body) = http_get(c.heads[victim].ready.admin, "/metrics").unwrap();
    let rejoining: Vec<&str> = (body.lines())
        .filter(|l| l.starts_with("stockade_raft_rejoining{"))
        .collect();
    assert!(
        !rejoining.is_empty() && rejoining.iter().all(|l| l.ends_with(" 0")),
        "{rejoining:?}"
    );
    // Now an election needs its vote: stop whoever leads the volume, unless it leads itself
    // (then it already won one); the other two must elect, and every write is there.
    let now = serving(&c.heads, Duration::from_secs(60));
    if now != victim {
        c.heads[now].proc.kill9();
        let next = serving(&c.heads, Duration::from_secs(60));
        assert_ne!(next, now);
    }
    let mut r =
        NbdClient::connect(c.heads[victim].ready.nbd, "vol0", Duration::from_secs(60)).unwrap();
    for i in 0..20u64 {
        assert_eq!(
            r.read(i * BS as u64, BS as u32).unwrap(),
            block(i + 1),
            "block {i}"
        );
    }
}
