//! Tests of the raft log on real files (under `target/test-scratch`, not tmpfs).

use super::format::{Body, Kind, RecordHeader, SEGMENT_HEADER_LEN, SegmentHeader, parse_record};
use super::*;
use crate::replication::log::{GroupLog, LogOp};
use proptest::prelude::*;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicU64, Ordering};

fn scratch_dir() -> tempfile::TempDir {
    let base = std::env::var_os("STOCKADE_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-scratch")
        });
    fs::create_dir_all(&base).expect("create scratch base");
    tempfile::Builder::new()
        .prefix("raftlog-")
        .tempdir_in(base)
        .expect("scratch dir")
}

fn small() -> WalConfig {
    WalConfig {
        segment_size: ByteSize(4096),
        max_segments: 8,
        ..WalConfig::default()
    }
}

fn open(dir: &Path, cfg: &WalConfig) -> (Wal, Recovered, Registry) {
    let reg = Registry::new();
    let (wal, rec) = Wal::open(dir, cfg, &reg).expect("open");
    (wal, rec, reg)
}

fn reopen(dir: &Path) -> Result<Recovered, WalError> {
    Wal::open(dir, &WalConfig::default(), &Registry::new()).map(|(_, r)| r)
}

/// Deterministic payload of an entry, so a recovered entry can be checked byte for byte.
fn payload(group: GroupId, index: u64, term: u64, len: usize) -> Vec<u8> {
    let mut x = (group.0 as u64) ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ term;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            (x >> 56) as u8
        })
        .collect()
}

fn entry(group: GroupId, index: u64, term: u64, len: usize) -> Entry {
    Entry {
        index,
        term,
        data: payload(group, index, term, len).into(),
        ..Default::default()
    }
}

fn segments(dir: &Path) -> Vec<u64> {
    recover::list_segments(dir)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(recover::segment_name(seq))
}

/// Offsets, lengths and headers of the records of a segment that ends at a record boundary.
fn records_of(path: &Path) -> Vec<(usize, usize, RecordHeader)> {
    let (recs, tail) = records_and_zero_tail(path);
    assert_eq!(
        tail,
        0,
        "{} does not end at a record boundary",
        path.display()
    );
    recs
}

fn copy_dir(from: &Path) -> tempfile::TempDir {
    let to = scratch_dir();
    for (seq, p) in recover::list_segments(from).unwrap() {
        fs::copy(&p, to.path().join(recover::segment_name(seq))).unwrap();
    }
    to
}

fn hist_count(reg: &Registry, name: &str) -> u64 {
    reg.gather()
        .iter()
        .find(|f| f.name() == name)
        .map_or(0, |f| f.get_metric()[0].get_histogram().get_sample_count())
}

fn counter(reg: &Registry, name: &str) -> f64 {
    reg.gather()
        .iter()
        .find(|f| f.name() == name)
        .map_or(0.0, |f| f.get_metric()[0].get_counter().get_value())
}

/// The expected state: each group's log, updated only after the WAL acknowledged a write.
#[derive(Debug, Default)]
struct Model {
    groups: BTreeMap<GroupId, GroupStorage>,
}

impl Model {
    fn copy_of(&self, g: GroupId) -> GroupStorage {
        self.groups
            .get(&g)
            .map(|s| GroupStorage::from_log(s.to_log()))
            .unwrap_or_default()
    }

    /// Would the model accept these writes (in order, all or nothing)?
    fn accepts(&self, writes: &[GroupWrite]) -> bool {
        let mut scratch: BTreeMap<GroupId, GroupStorage> = BTreeMap::new();
        writes.iter().all(|w| {
            scratch
                .entry(w.group)
                .or_insert_with(|| self.copy_of(w.group))
                .apply(w)
                .is_ok()
        })
    }

    /// Writes through the WAL; the WAL must accept exactly what the model accepts.
    fn write(&mut self, wal: &Wal, writes: Vec<GroupWrite>) {
        let expect = self.accepts(&writes);
        match wal.write_blocking(&writes) {
            Ok(()) => {
                assert!(expect, "the WAL accepted what the log refuses: {writes:?}");
                for w in &writes {
                    self.groups.entry(w.group).or_default().apply(w).unwrap();
                }
            }
            Err(WalError::Rejected { .. }) => {
                assert!(!expect, "the WAL refused what the log accepts: {writes:?}")
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }

    fn logs(&self) -> BTreeMap<GroupId, GroupLog> {
        logs(&self.groups)
    }
}

/// Non-empty logs (a group that only ever got no-op writes has no records).
fn logs(groups: &BTreeMap<GroupId, GroupStorage>) -> BTreeMap<GroupId, GroupLog> {
    groups
        .iter()
        .map(|(g, s)| (*g, s.to_log()))
        .filter(|(_, l)| *l != GroupLog::default())
        .collect()
}

fn append(group: GroupId, entries: Vec<Entry>) -> GroupWrite {
    let mut w = GroupWrite::new(group);
    w.append(entries);
    w
}

/// A random write for `g` given its current log: mostly valid, sometimes not.
fn random_write(rng: &mut ChaCha8Rng, g: GroupId, s: &GroupStorage) -> GroupWrite {
    let mut w = GroupWrite::new(g);
    let (first, last) = (s.first_index(), s.last_index());
    let term_at = |i: u64| raft::Storage::term(s, i).unwrap_or(0);
    let term = s.hard_state().term.max(term_at(last)).max(1);
    match rng.gen_range(0..100) {
        0..=49 => {
            let start = match rng.gen_range(0..20) {
                0 => first.saturating_sub(1),
                1 => last + 2,
                _ => (last + 1).saturating_sub(rng.gen_range(0..3)).max(first),
            };
            let t = term_at(start.saturating_sub(1)).max(term) + rng.gen_range(0..2);
            let n = rng.gen_range(1..4);
            let len = rng.gen_range(0..300);
            w.append((start..start + n).map(|i| entry(g, i, t, len)).collect());
        }
        50..=59 => {
            w.hard_state(HardState {
                term,
                vote: rng.gen_range(1..4),
                commit: rng.gen_range(0..=last),
                ..Default::default()
            });
        }
        60..=64 => {
            w.conf_state(ConfState::from((vec![1, rng.gen_range(2..9)], vec![])));
        }
        65..=79 => {
            let idx = if rng.gen_range(0..20) == 0 {
                last + 2
            } else {
                rng.gen_range(first..=last + 1)
            };
            // Keep a snapshot the log can continue from, as the application does.
            if let Ok(snap) = s.snapshot_at(idx.saturating_sub(1).max(1), b"app".to_vec())
                && snap.get_metadata().index >= s.stored_snapshot().get_metadata().index
            {
                w.set_snapshot(snap);
            }
            w.compact(idx);
        }
        80..=89 => {
            let idx = rng.gen_range(first.saturating_sub(2)..=last + 1);
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = idx;
            snap.mut_metadata().term = if rng.gen_range(0..10) == 0 {
                99
            } else {
                term_at(idx)
            };
            snap.data = vec![7; rng.gen_range(0..40)].into();
            w.set_snapshot(snap);
        }
        90..=96 => {
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = last + rng.gen_range(0..3);
            snap.mut_metadata().term = term + rng.gen_range(0..2);
            snap.mut_metadata()
                .set_conf_state(ConfState::from((vec![1, 2, 3], vec![4])));
            snap.data = b"installed".to_vec().into();
            w.apply_snapshot(snap);
        }
        _ => {
            w.ops.push(LogOp::Remove);
        }
    }
    w
}

/// Random writes over several groups with reopens in between: what the log replays is exactly
/// what the in-memory logs hold, the WAL refuses exactly what they refuse, and small segments
/// keep being rotated, cleaned and deleted.
fn run_model(seed: u64, steps: usize, cfg: &WalConfig) {
    let dir = scratch_dir();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let groups: Vec<GroupId> = (1..=5)
        .map(|i| GroupId(i * 1000 + u128::from(seed % 7)))
        .collect();
    let mut model = Model::default();
    let (mut wal, _, _) = open(dir.path(), cfg);
    for step in 0..steps {
        let n = rng.gen_range(1..=3);
        let mut writes = Vec::new();
        let mut scratch = BTreeMap::new();
        for _ in 0..n {
            let g = groups[rng.gen_range(0..groups.len())];
            let s = scratch.entry(g).or_insert_with(|| model.copy_of(g));
            let w = random_write(&mut rng, g, s);
            let _ = s.apply(&w);
            writes.push(w);
        }
        model.write(&wal, writes);
        if step % 97 == 96 {
            drop(wal);
            let (w, rec, _) = open(dir.path(), cfg);
            assert_eq!(logs(&rec.groups), model.logs(), "seed {seed} step {step}");
            assert_eq!(rec.torn_tail, None);
            wal = w;
        }
    }
    drop(wal);
    let rec = reopen(dir.path()).unwrap();
    assert_eq!(logs(&rec.groups), model.logs(), "seed {seed}");
    let n = segments(dir.path()).len();
    assert!(n <= cfg.max_segments + 2, "seed {seed}: {n} segments left");
}

#[test]
fn replay_equals_model_with_rotation_and_clean_up() {
    for seed in 0..4 {
        run_model(seed, 600, &small());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn replay_equals_model(seed in any::<u64>(), segment_kib in 4u64..12, live in 0u8..=100) {
        let cfg = WalConfig {
            segment_size: ByteSize(segment_kib << 10),
            gc_live_percent: live,
            max_segments: 6,
            ..WalConfig::default()
        };
        run_model(seed, 300, &cfg);
    }
}

#[test]
fn group_commit_batches_concurrent_writers() {
    let dir = scratch_dir();
    let (wal, _, reg) = open(dir.path(), &WalConfig::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    const GROUPS: u64 = 32;
    const WRITES: u64 = 20;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for g in 1..=GROUPS {
            let wal = wal.clone();
            tasks.push(tokio::spawn(async move {
                let g = GroupId(u128::from(g));
                for i in 1..=WRITES {
                    let mut w = GroupWrite::new(g);
                    w.append(vec![entry(g, i, 1, 100)]).hard_state(HardState {
                        term: 1,
                        commit: i,
                        ..Default::default()
                    });
                    wal.write(&[w]).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let writes = GROUPS * WRITES;
    let fsyncs = hist_count(&reg, "stockade_raft_log_fsync_duration_seconds");
    let batches = hist_count(&reg, "stockade_raft_log_batch_records");
    assert_eq!(fsyncs, batches);
    assert!(
        fsyncs < writes / 2,
        "{fsyncs} fsyncs for {writes} concurrent writes: group commit is not batching"
    );
    let records = reg
        .gather()
        .iter()
        .find(|f| f.name() == "stockade_raft_log_batch_records")
        .map(|f| f.get_metric()[0].get_histogram().get_sample_sum())
        .unwrap();
    assert_eq!(records as u64, writes * 2);
    let written = counter(&reg, "stockade_raft_log_written_bytes_total") as u64;
    let size: u64 = segments(dir.path())
        .iter()
        .map(|s| fs::metadata(seg_path(dir.path(), *s)).unwrap().len() - SEGMENT_HEADER_LEN as u64)
        .sum();
    assert_eq!(written, size);
    drop(wal);
    let rec = reopen(dir.path()).unwrap();
    assert_eq!(rec.groups.len() as u64, GROUPS);
    for (g, s) in &rec.groups {
        assert_eq!(s.last_index(), WRITES);
        assert_eq!(s.hard_state().commit, WRITES);
        let ents = raft::Storage::entries(
            s,
            1,
            WRITES + 1,
            None,
            raft::GetEntriesContext::empty(false),
        )
        .unwrap();
        for e in ents {
            assert_eq!(e.data.to_vec(), payload(*g, e.index, 1, 100));
        }
    }
}

#[test]
fn a_burst_of_writes_shares_few_fsyncs() {
    let dir = scratch_dir();
    let (wal, _, reg) = open(dir.path(), &WalConfig::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let n = 200u64;
    rt.block_on(async {
        let futs = (1..=n).map(|g| {
            let wal = wal.clone();
            async move {
                let g = GroupId(u128::from(g));
                wal.write(&[append(g, vec![entry(g, 1, 1, 64)])]).await
            }
        });
        for r in futures_util::future::join_all(futs).await {
            r.unwrap();
        }
    });
    let fsyncs = hist_count(&reg, "stockade_raft_log_fsync_duration_seconds");
    assert!(fsyncs <= n / 4, "{fsyncs} fsyncs for a burst of {n} writes");
}

/// Writes `n` single-record batches to one group; returns the model after each.
fn single_record_batches(dir: &Path, g: GroupId, n: u64) -> Vec<BTreeMap<GroupId, GroupLog>> {
    let (wal, _, _) = open(dir, &WalConfig::default());
    let mut model = Model::default();
    let mut states = vec![model.logs()];
    for i in 1..=n {
        model.write(&wal, vec![append(g, vec![entry(g, i, 1, 50 + i as usize)])]);
        states.push(model.logs());
    }
    states
}

#[test]
fn torn_tail_cut_at_every_offset_of_the_last_record() {
    let dir = scratch_dir();
    let g = GroupId(5);
    let states = single_record_batches(dir.path(), g, 4);
    let seg = seg_path(dir.path(), 1);
    let recs = records_of(&seg);
    let (start, len, _) = *recs.last().unwrap();
    for cut in start..start + len {
        let copy = copy_dir(dir.path());
        let f = fs::OpenOptions::new()
            .write(true)
            .open(seg_path(copy.path(), 1))
            .unwrap();
        f.set_len(cut as u64).unwrap();
        let rec = reopen(copy.path()).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(logs(&rec.groups), states[3], "cut at {cut}");
        if cut == start {
            assert_eq!(rec.torn_tail, None);
        } else {
            let torn = rec.torn_tail.unwrap();
            assert_eq!(
                (torn.offset, torn.dropped_bytes),
                (start as u64, (cut - start) as u64)
            );
        }
        // The file was cut: opening again finds nothing torn, and writing continues after it.
        let (wal, rec, _) = open(copy.path(), &WalConfig::default());
        assert_eq!(rec.torn_tail, None);
        wal.write_blocking(&[append(g, vec![entry(g, 4, 2, 10)])])
            .unwrap();
        drop(wal);
        let rec = reopen(copy.path()).unwrap();
        assert_eq!(rec.groups[&g].last_index(), 4);
        assert_eq!(raft::Storage::term(&rec.groups[&g], 4), Ok(2));
    }
}

/// The bytes after a torn record are a client's payload, which may be full of record-shaped
/// headers with large lengths. Recovery must not checksum each of them (about 170,000
/// candidates of 4 MiB each here: tens of terabytes of hashing, an endless restart); it cuts
/// the tail as usual.
#[test]
fn a_torn_tail_full_of_record_shaped_payload_is_cut_without_hashing_it_all() {
    let dir = scratch_dir();
    let g = GroupId(6);
    let states = single_record_batches(dir.path(), g, 2);
    let seg = seg_path(dir.path(), 1);
    let end = fs::metadata(&seg).unwrap().len();
    // A torn record (its magic, then garbage), then 8 MiB of fake headers every 48 bytes, each
    // claiming a body of 4 MiB.
    let mut tail = b"SRR1".to_vec();
    tail.extend([0xee; 44]);
    let fake_len = 4u32 << 20;
    while tail.len() < (8 << 20) {
        let mut h = [0u8; 48];
        h[0..4].copy_from_slice(b"SRR1");
        h[4..8].copy_from_slice(&fake_len.to_le_bytes());
        h[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // a batch that could be later
        h[16..20].copy_from_slice(&0u32.to_le_bytes());
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        tail.extend_from_slice(&h);
    }
    let f = fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(&mut &f, &tail).unwrap();
    drop(f);
    let rec = reopen(dir.path()).expect("a torn tail is cut");
    assert_eq!(logs(&rec.groups), states[2]);
    assert_eq!(rec.torn_tail.map(|t| t.offset), Some(end));
}

#[test]
fn bit_flips_in_the_last_record_are_a_torn_tail() {
    let dir = scratch_dir();
    let g = GroupId(6);
    let states = single_record_batches(dir.path(), g, 3);
    let seg = seg_path(dir.path(), 1);
    let (start, len, _) = *records_of(&seg).last().unwrap();
    let original = fs::read(&seg).unwrap();
    for i in start..start + len {
        let copy = copy_dir(dir.path());
        let mut b = original.clone();
        b[i] ^= 1 << (i % 8);
        fs::write(seg_path(copy.path(), 1), &b).unwrap();
        let rec = reopen(copy.path()).unwrap_or_else(|e| panic!("flip at {i}: {e}"));
        assert_eq!(logs(&rec.groups), states[2], "flip at {i}");
        assert_eq!(rec.torn_tail.map(|t| t.offset), Some(start as u64));
    }
    // Zeros after the last record (the unused part of a zero-filled segment): a clean end.
    let copy = copy_dir(dir.path());
    let mut b = original.clone();
    b.extend_from_slice(&[0; 300]);
    fs::write(seg_path(copy.path(), 1), &b).unwrap();
    let rec = reopen(copy.path()).unwrap();
    assert_eq!(logs(&rec.groups), states[3]);
    assert_eq!(rec.torn_tail, None);
    assert_eq!(
        fs::read(seg_path(copy.path(), 1)).unwrap(),
        b,
        "a clean end was rewritten"
    );
}

/// The records of a segment up to its zero tail, and that tail's length.
fn records_and_zero_tail(path: &Path) -> (Vec<(usize, usize, RecordHeader)>, usize) {
    let b = fs::read(path).unwrap();
    let salt = SegmentHeader::decode(&b).unwrap().salt;
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_LEN;
    while let Ok((h, _, len)) = parse_record(&b[off..], salt) {
        out.push((off, len, h));
        off += len;
    }
    assert!(
        b[off..].iter().all(|&x| x == 0),
        "{} has bytes after its records that are not zeros",
        path.display()
    );
    (out, b.len() - off)
}

#[test]
fn zero_filled_segments_are_written_in_place_and_replay_exactly() {
    let dir = scratch_dir();
    let cfg = WalConfig {
        segment_size: ByteSize(64 << 10),
        max_segments: 1 << 20,
        gc_live_percent: 0,
        ..WalConfig::default()
    };
    let (wal, _, reg) = open(dir.path(), &cfg);
    let g = GroupId(9);
    let mut model = Model::default();
    let mut i = 0u64;
    // The first segment grows as written; the spare for the next one is filled once it is half
    // full, in the background. Write until two segments started from a spare.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while counter(&reg, "stockade_raft_log_preallocated_segments_total") < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no spare segment was used"
        );
        i += 1;
        model.write(&wal, vec![append(g, vec![entry(g, i, 1, 900)])]);
        if i.is_multiple_of(16) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    // A few more into the current (zero-filled) segment, then look at the files.
    for _ in 0..5 {
        i += 1;
        model.write(&wal, vec![append(g, vec![entry(g, i, 1, 900)])]);
    }
    drop(wal);
    let segs = segments(dir.path());
    let last = *segs.last().unwrap();
    let (recs, tail) = records_and_zero_tail(&seg_path(dir.path(), last));
    assert!(
        !recs.is_empty() && tail > 0,
        "the last segment was not zero-filled ahead"
    );
    assert_eq!(
        fs::metadata(seg_path(dir.path(), last)).unwrap().len(),
        cfg.segment_size.bytes(),
        "a zero-filled segment keeps its length"
    );
    // Replay stops at the zeros without cutting anything, and writing goes on where it stopped.
    let (wal, rec, reg) = open(dir.path(), &cfg);
    assert_eq!(rec.torn_tail, None);
    assert_eq!(logs(&rec.groups), model.logs());
    assert_eq!(counter(&reg, "stockade_raft_log_torn_tails_total"), 0.0);
    for _ in 0..3 {
        i += 1;
        model.write(&wal, vec![append(g, vec![entry(g, i, 1, 900)])]);
    }
    drop(wal);
    let (recs2, tail2) = records_and_zero_tail(&seg_path(dir.path(), last));
    assert_eq!(
        recs2.len(),
        recs.len() + 3,
        "writing did not continue in place"
    );
    assert!(tail2 < tail);
    let rec = reopen(dir.path()).unwrap();
    assert_eq!(rec.torn_tail, None);
    assert_eq!(logs(&rec.groups), model.logs());
}

#[test]
fn a_torn_batch_inside_a_zero_filled_segment_is_cut() {
    let dir = scratch_dir();
    let g = GroupId(7);
    let states = single_record_batches(dir.path(), g, 4);
    let seg = seg_path(dir.path(), 1);
    let recs = records_of(&seg);
    let (start, len, _) = *recs.last().unwrap();
    let original = fs::read(&seg).unwrap();
    // The last record written only in part over zeros, as a crash mid-write would leave it.
    for keep in [1, super::format::RECORD_HEADER_LEN, len - 1] {
        let copy = copy_dir(dir.path());
        let mut b = original[..start + keep].to_vec();
        b.resize(original.len() + 4096, 0);
        fs::write(seg_path(copy.path(), 1), &b).unwrap();
        let rec = reopen(copy.path()).unwrap_or_else(|e| panic!("keep {keep}: {e}"));
        assert_eq!(logs(&rec.groups), states[3], "keep {keep}");
        let torn = rec.torn_tail.expect("a torn tail");
        assert_eq!(torn.offset, start as u64, "keep {keep}");
    }
}

#[test]
fn leftover_spares_are_removed_and_never_replayed() {
    let dir = scratch_dir();
    let g = GroupId(3);
    let states = single_record_batches(dir.path(), g, 2);
    // A spare holding what looks like a segment (a copy of segment 1), as if a run stopped
    // while one was being filled.
    let spare = dir.path().join(format!("{:020}.spare", 7));
    fs::copy(seg_path(dir.path(), 1), &spare).unwrap();
    let rec = reopen(dir.path()).unwrap();
    assert_eq!(logs(&rec.groups), states[2]);
    assert!(!spare.exists(), "the leftover spare was not removed");
    assert_eq!(segments(dir.path()), vec![1]);
}

#[test]
fn a_torn_batch_is_dropped_whole() {
    let dir = scratch_dir();
    let (wal, _, _) = open(dir.path(), &WalConfig::default());
    let mut model = Model::default();
    let gs = [GroupId(1), GroupId(2), GroupId(3)];
    model.write(&wal, vec![append(gs[0], vec![entry(gs[0], 1, 1, 20)])]);
    let before = model.logs();
    // One request, three groups: one batch of three records.
    model.write(
        &wal,
        gs.iter()
            .map(|g| append(*g, vec![entry(*g, 2 - u64::from(g.0 != 1), 1, 30)]))
            .collect(),
    );
    drop(wal);
    let seg = seg_path(dir.path(), 1);
    let recs = records_of(&seg);
    assert_eq!(recs.len(), 4);
    assert!(
        recs[1..]
            .iter()
            .all(|r| r.2.batch == recs[1].2.batch && r.2.count == 3)
    );
    let batch_start = recs[1].0 as u64;
    let original = fs::read(&seg).unwrap();
    // The file ends cleanly after the first and after the second record of the batch.
    for end in [recs[2].0, recs[3].0] {
        let copy = copy_dir(dir.path());
        fs::write(seg_path(copy.path(), 1), &original[..end]).unwrap();
        let rec = reopen(copy.path()).unwrap();
        assert_eq!(logs(&rec.groups), before);
        assert_eq!(rec.torn_tail.map(|t| t.offset), Some(batch_start));
    }
    // A damaged record in the middle of the last batch: the whole batch goes.
    let copy = copy_dir(dir.path());
    let mut b = original.clone();
    b[recs[2].0 + 50] ^= 0x40;
    fs::write(seg_path(copy.path(), 1), &b).unwrap();
    let rec = reopen(copy.path()).unwrap();
    assert_eq!(logs(&rec.groups), before);
    assert_eq!(rec.torn_tail.map(|t| t.offset), Some(batch_start));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Whatever happens to the bytes of a segment, opening never panics, and when it succeeds
    /// the log is one of the states it went through (a prefix of the writes).
    #[test]
    fn damaged_segments_never_panic_and_never_invent_state(
        flips in proptest::collection::vec((any::<proptest::sample::Index>(), 1u8..=255), 0..4),
        keep in any::<proptest::sample::Index>(),
        garbage in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let dir = scratch_dir();
        let states = single_record_batches(dir.path(), GroupId(2), 6);
        let seg = seg_path(dir.path(), 1);
        let mut b = fs::read(&seg).unwrap();
        for (at, x) in flips {
            let i = at.index(b.len());
            b[i] ^= x;
        }
        b.truncate(keep.index(b.len() + 1));
        b.extend_from_slice(&garbage);
        fs::write(&seg, &b).unwrap();
        if let Ok(rec) = reopen(dir.path()) {
            let got = logs(&rec.groups);
            prop_assert!(states.contains(&got), "{got:?}");
        }
    }
}

#[test]
fn corruption_before_the_last_batch_is_an_error() {
    let dir = scratch_dir();
    single_record_batches(dir.path(), GroupId(9), 5);
    let seg = seg_path(dir.path(), 1);
    let recs = records_of(&seg);
    let original = fs::read(&seg).unwrap();
    for (k, &(off, len, _)) in recs[..recs.len() - 1].iter().enumerate() {
        for at in [off, off + 4, off + 30, off + len - 1] {
            let copy = copy_dir(dir.path());
            let mut b = original.clone();
            b[at] ^= 0x10;
            fs::write(seg_path(copy.path(), 1), &b).unwrap();
            let err = reopen(copy.path()).unwrap_err();
            match &err {
                WalError::Corrupt { file, offset, .. } => {
                    assert_eq!(*offset, off as u64, "record {k}, flip at {at}: {err}");
                    assert_eq!(file, &seg_path(copy.path(), 1));
                }
                e => panic!("record {k}, flip at {at}: {e}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains("00000000000000000001.wal") && msg.contains(&format!("offset {off}")),
                "{msg}"
            );
        }
    }
}

/// Bit rot in a record whose payload is full of record-shaped headers claiming bodies that run
/// past the end of the file: checking those costs nothing, so they must not use up the search
/// that finds the valid records after the damage (which makes it an error, not a torn tail).
#[test]
fn record_shaped_payload_before_bit_rot_does_not_hide_the_records_after_it() {
    let dir = scratch_dir();
    let g = GroupId(10);
    let (wal, _, _) = open(dir.path(), &WalConfig::default());
    let mut model = Model::default();
    model.write(&wal, vec![append(g, vec![entry(g, 1, 1, 64)])]);
    let mut payload = Vec::new();
    for k in (0..32).rev() {
        let mut h = [0u8; 48];
        h[0..4].copy_from_slice(b"SRR1");
        h[4..8].copy_from_slice(&(1u32 << k).to_le_bytes());
        h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        h[20..24].copy_from_slice(&1u32.to_le_bytes());
        payload.extend_from_slice(&h);
    }
    let crafted = Entry {
        index: 2,
        term: 1,
        data: payload.into(),
        ..Default::default()
    };
    model.write(&wal, vec![append(g, vec![crafted])]);
    for i in 3..=5 {
        model.write(&wal, vec![append(g, vec![entry(g, i, 1, 64)])]);
    }
    drop(wal);
    let seg = seg_path(dir.path(), 1);
    let (off, _, _) = records_of(&seg)[1];
    let mut b = fs::read(&seg).unwrap();
    b[off + 30] ^= 0x10;
    fs::write(&seg, &b).unwrap();
    match reopen(dir.path()) {
        Err(WalError::Corrupt { offset, .. }) => assert_eq!(offset, off as u64),
        Err(e) => panic!("{e}"),
        Ok(rec) => panic!(
            "acknowledged batches after the damage were cut as a torn tail (left: {:?})",
            logs(&rec.groups)
        ),
    }
}

#[test]
fn damage_in_an_earlier_segment_and_missing_segments_are_errors() {
    let dir = scratch_dir();
    let g = GroupId(3);
    let (wal, _, _) = open(dir.path(), &small());
    let mut model = Model::default();
    for i in 1..=60 {
        model.write(&wal, vec![append(g, vec![entry(g, i, 1, 200)])]);
    }
    drop(wal);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    assert_eq!(logs(&reopen(dir.path()).unwrap().groups), model.logs());
    // The last record of a sealed segment is not a torn tail.
    let sealed = seg_path(dir.path(), segs[0]);
    let (off, len, _) = *records_of(&sealed).last().unwrap();
    let copy = copy_dir(dir.path());
    let p = copy.path().join(sealed.file_name().unwrap());
    let mut b = fs::read(&p).unwrap();
    b[off + len - 1] ^= 1;
    fs::write(&p, &b).unwrap();
    assert!(
        matches!(reopen(copy.path()), Err(WalError::Corrupt { offset, .. }) if offset == off as u64)
    );
    // Nor is a sealed segment cut short.
    let copy = copy_dir(dir.path());
    let p = copy.path().join(sealed.file_name().unwrap());
    fs::write(&p, &b[..off + 10]).unwrap();
    assert!(matches!(reopen(copy.path()), Err(WalError::Corrupt { .. })));
    // A segment missing between others.
    let copy = copy_dir(dir.path());
    fs::remove_file(seg_path(copy.path(), segs[1])).unwrap();
    assert!(
        matches!(reopen(copy.path()), Err(WalError::MissingSegment { missing, .. }) if missing == segs[1])
    );
}

#[test]
fn unreadable_versions_and_kinds_are_refused_clearly() {
    let dir = scratch_dir();
    single_record_batches(dir.path(), GroupId(1), 2);
    let seg = seg_path(dir.path(), 1);
    let original = fs::read(&seg).unwrap();

    let copy = copy_dir(dir.path());
    let mut b = original.clone();
    b[8] = 2;
    fs::write(seg_path(copy.path(), 1), &b).unwrap();
    let err = reopen(copy.path()).unwrap_err();
    assert!(
        matches!(
            err,
            WalError::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("format version 2"), "{err}");

    // A well-formed record of a kind this build does not know, as a complete batch.
    let copy = copy_dir(dir.path());
    let salt = SegmentHeader::decode(&original).unwrap().salt;
    let last = records_of(&seg).last().unwrap().2;
    let body = Body::new(vec![1, 2, 3]);
    let h = RecordHeader {
        body_len: 3,
        batch: last.batch + 1,
        index: 0,
        count: 1,
        group: GroupId(1),
        kind: 99,
        flags: 0,
    };
    let mut b = original.clone();
    b.extend_from_slice(&h.encode(salt, &body.crc));
    b.extend_from_slice(&body.bytes);
    fs::write(seg_path(copy.path(), 1), &b).unwrap();
    let err = reopen(copy.path()).unwrap_err();
    assert!(
        matches!(err, WalError::Corrupt { reason: Corruption::Body(BodyError::UnknownKind(99)), offset, .. } if offset == original.len() as u64),
        "{err}"
    );
    // A record whose batch number skips ahead is out of sequence, not a torn tail.
    let copy = copy_dir(dir.path());
    let h = RecordHeader {
        batch: last.batch + 5,
        kind: Kind::RemoveGroup as u8,
        body_len: 0,
        ..h
    };
    let mut b = original.clone();
    b.extend_from_slice(&h.encode(salt, &Body::new(Vec::new()).crc));
    fs::write(seg_path(copy.path(), 1), &b).unwrap();
    assert!(matches!(
        reopen(copy.path()),
        Err(WalError::Corrupt {
            reason: Corruption::OutOfSequence { .. },
            ..
        })
    ));
}

#[test]
fn an_interrupted_segment_creation_is_removed() {
    let dir = scratch_dir();
    let states = single_record_batches(dir.path(), GroupId(4), 2);
    for garbage in [&b""[..], &[0u8; 40][..], &[0xffu8; 64][..]] {
        let copy = copy_dir(dir.path());
        fs::write(seg_path(copy.path(), 2), garbage).unwrap();
        let (wal, rec, _) = open(copy.path(), &WalConfig::default());
        assert_eq!(logs(&rec.groups), states[2]);
        assert!(rec.torn_tail.is_some());
        assert_eq!(segments(copy.path()), vec![1]);
        wal.write_blocking(&[append(GroupId(4), vec![entry(GroupId(4), 3, 1, 5)])])
            .unwrap();
    }
    // More than a header's worth of bytes after a bad header is damage, not a torn creation.
    let copy = copy_dir(dir.path());
    fs::write(seg_path(copy.path(), 2), [0xffu8; 100]).unwrap();
    assert!(matches!(
        reopen(copy.path()),
        Err(WalError::Corrupt {
            reason: Corruption::Header(_),
            ..
        })
    ));
}

#[test]
fn compacted_segments_are_deleted() {
    let dir = scratch_dir();
    let (wal, _, reg) = open(dir.path(), &small());
    let g = GroupId(11);
    let mut model = Model::default();
    for i in 1..=300u64 {
        let mut w = append(g, vec![entry(g, i, 1, 300)]);
        if i > 2 {
            let s = model.copy_of(g);
            w.set_snapshot(s.snapshot_at(i - 2, b"flushed".to_vec()).unwrap())
                .compact(i - 1);
        }
        model.write(&wal, vec![w]);
        let n = segments(dir.path()).len();
        assert!(n <= 3, "after write {i}: {n} segments");
    }
    assert!(segments(dir.path())[0] > 20, "old segments are gone");
    drop(wal);
    assert_eq!(
        counter(&reg, "stockade_raft_log_gc_rewritten_bytes_total"),
        0.0,
        "nothing needed copying"
    );
    let rec = reopen(dir.path()).unwrap();
    assert_eq!(logs(&rec.groups), model.logs());
    let s = &rec.groups[&g];
    assert_eq!((s.first_index(), s.last_index()), (299, 300));
    assert_eq!(
        raft::Storage::snapshot(s, 0, 2)
            .unwrap()
            .get_metadata()
            .index,
        298
    );
}

#[test]
fn an_idle_group_is_copied_forward() {
    let dir = scratch_dir();
    let (wal, _, reg) = open(dir.path(), &small());
    let (idle, busy) = (GroupId(1), GroupId(2));
    let mut model = Model::default();
    let mut w = append(idle, (1..=3).map(|i| entry(idle, i, 1, 100)).collect());
    w.conf_state(ConfState::from((vec![1, 2, 3], vec![])))
        .hard_state(HardState {
            term: 1,
            vote: 1,
            commit: 2,
            ..Default::default()
        });
    model.write(&wal, vec![w]);
    for i in 1..=200u64 {
        let mut w = append(busy, vec![entry(busy, i, 1, 400)]);
        if i > 1 {
            w.compact(i);
        }
        model.write(&wal, vec![w]);
    }
    let segs = segments(dir.path());
    assert!(
        !segs.contains(&1),
        "the idle group still pins segment 1: {segs:?}"
    );
    assert!(segs.len() <= 3, "{segs:?}");
    assert!(counter(&reg, "stockade_raft_log_gc_rewritten_bytes_total") > 0.0);
    drop(wal);
    let rec = reopen(dir.path()).unwrap();
    assert_eq!(logs(&rec.groups), model.logs());
    assert_eq!(rec.groups[&idle].conf_state().voters, vec![1, 2, 3]);
    assert_eq!(rec.groups[&idle].last_index(), 3);
}

/// With the live-share rule off and `max-segments` 4: the entries `pinned` of group 1 stay live
/// for good while group 2 writes and compacts 150 entries; the log must never hold more than
/// `slack` segments beyond the bound, must clean, and must reopen to what was written.
fn crowded_log_stays_bounded(pinned: Vec<Entry>, slack: usize) {
    let dir = scratch_dir();
    let cfg = WalConfig {
        gc_live_percent: 0,
        max_segments: 4,
        ..small()
    };
    let (wal, _, reg) = open(dir.path(), &cfg);
    let mut model = Model::default();
    let (idle, busy) = (GroupId(1), GroupId(2));
    model.write(&wal, vec![append(idle, pinned)]);
    for i in 1..=150u64 {
        let mut w = append(busy, vec![entry(busy, i, 1, 300)]);
        w.compact(i);
        model.write(&wal, vec![w]);
        let n = segments(dir.path()).len();
        assert!(
            n <= cfg.max_segments + slack,
            "after write {i}: {n} segments"
        );
    }
    assert!(counter(&reg, "stockade_raft_log_gc_rewritten_bytes_total") > 0.0);
    drop(wal);
    assert_eq!(logs(&reopen(dir.path()).unwrap().groups), model.logs());
}

#[test]
fn max_segments_cleans_when_the_live_share_rule_is_off() {
    crowded_log_stays_bounded(vec![entry(GroupId(1), 1, 1, 100)], 1);
}

/// A stalled group keeps the oldest segment mostly live (its entries are never compacted:
/// about three quarters of it here); the other group's compacted segments behind it must still
/// go once the log is crowded, or the disk fills.
#[test]
fn a_mostly_live_oldest_segment_does_not_keep_the_dead_ones_behind_it() {
    let g = GroupId(1);
    crowded_log_stays_bounded((1..=10).map(|i| entry(g, i, 1, 250)).collect(), 2);
}

#[test]
fn a_removed_group_stays_removed() {
    let dir = scratch_dir();
    let (wal, _, _) = open(dir.path(), &small());
    let mut model = Model::default();
    let (a, b) = (GroupId(1), GroupId(2));
    for i in 1..=30 {
        model.write(
            &wal,
            vec![
                append(a, vec![entry(a, i, 1, 200)]),
                append(b, vec![entry(b, i, 1, 200)]),
            ],
        );
    }
    model.write(&wal, vec![GroupWrite::remove(a)]);
    model.groups.remove(&a);
    drop(wal);
    let (wal, rec, _) = open(dir.path(), &small());
    assert!(!rec.groups.contains_key(&a));
    assert_eq!(logs(&rec.groups), model.logs());
    // Keep writing past the removal so its segment is deleted: the group must not come back.
    for i in 31..=120 {
        let mut w = append(b, vec![entry(b, i, 1, 200)]);
        w.compact(i);
        model.write(&wal, vec![w]);
    }
    drop(wal);
    let rec = reopen(dir.path()).unwrap();
    assert!(!rec.groups.contains_key(&a));
    assert_eq!(logs(&rec.groups), model.logs());
}

#[test]
fn refused_writes_leave_nothing_behind() {
    let dir = scratch_dir();
    let (wal, _, reg) = open(dir.path(), &WalConfig::default());
    let (a, b) = (GroupId(1), GroupId(2));
    wal.write_blocking(&[append(a, vec![entry(a, 1, 1, 10)])])
        .unwrap();
    let before = counter(&reg, "stockade_raft_log_written_bytes_total");
    let gap = append(a, vec![entry(a, 5, 1, 10)]);
    let fine = append(b, vec![entry(b, 1, 1, 10)]);
    let err = wal.write_blocking(&[fine.clone(), gap]).unwrap_err();
    assert!(
        matches!(err, WalError::Rejected { group, source: LogError::Gap { index: 5, last_index: 1 } } if group == a),
        "{err}"
    );
    assert_eq!(
        counter(&reg, "stockade_raft_log_written_bytes_total"),
        before
    );
    let mut bad = GroupWrite::new(a);
    bad.append(vec![entry(a, 2, 1, 1), entry(a, 4, 1, 1)]);
    assert!(matches!(
        wal.write_blocking(&[bad]),
        Err(WalError::Rejected { .. })
    ));
    wal.write_blocking(&[fine]).unwrap();
    drop(wal);
    let rec = reopen(dir.path()).unwrap();
    assert_eq!(rec.groups[&a].last_index(), 1);
    assert_eq!(rec.groups[&b].last_index(), 1);
}

#[test]
fn a_log_is_opened_once() {
    let dir = scratch_dir();
    let (_wal, _, _) = open(dir.path(), &WalConfig::default());
    assert!(matches!(reopen(dir.path()), Err(WalError::Locked { .. })));
}

/// A crash mid-write, simulated by copying the files while a writer runs: every copy opens,
/// holds every write acknowledged before the copy began, and only whole writes.
#[test]
fn copies_taken_mid_write_recover_a_prefix() {
    let dir = scratch_dir();
    let (wal, _, _) = open(dir.path(), &WalConfig::default());
    let g = GroupId(77);
    let acked = Arc::new(AtomicU64::new(0));
    const N: u64 = 3000;
    let writer = {
        let (wal, acked) = (wal.clone(), acked.clone());
        std::thread::spawn(move || {
            for i in 1..=N {
                let mut w = append(g, vec![entry(g, i, 1, 700)]);
                w.hard_state(HardState {
                    term: 1,
                    commit: i,
                    ..Default::default()
                });
                wal.write_blocking(&[w]).unwrap();
                acked.store(i, Ordering::SeqCst);
            }
        })
    };
    let mut copies = 0;
    let mut torn = 0;
    while acked.load(Ordering::SeqCst) < N {
        let floor = acked.load(Ordering::SeqCst);
        let copy = copy_dir(dir.path());
        let rec = reopen(copy.path()).unwrap_or_else(|e| panic!("copy {copies}: {e}"));
        torn += u64::from(rec.torn_tail.is_some());
        let s = rec.groups.get(&g).cloned().unwrap_or_default();
        let last = s.last_index();
        assert!(
            last >= floor,
            "copy {copies}: {last} < acknowledged {floor}"
        );
        assert_eq!(
            s.hard_state().commit,
            last,
            "hard state and entries of one write go together"
        );
        if last > 0 {
            let ents = raft::Storage::entries(
                &s,
                1,
                last + 1,
                None,
                raft::GetEntriesContext::empty(false),
            )
            .unwrap();
            assert!(
                ents.iter()
                    .all(|e| e.data.to_vec() == payload(g, e.index, 1, 700))
            );
        }
        copies += 1;
    }
    writer.join().unwrap();
    assert!(copies > 0);
    tracing::info!(copies, torn, "mid-write copies");
}

#[test]
fn config_reads_kebab_case_and_validates() {
    let cfg: WalConfig = toml::from_str(
        "segment-size = \"8MiB\"\nqueue-depth = 64\nmax-batch-bytes = \"1MiB\"\ngc-live-percent = 10\nmax-segments = 16\n",
    )
    .unwrap();
    assert_eq!(cfg.segment_size, ByteSize(8 << 20));
    assert_eq!(cfg.max_batch_bytes, ByteSize(1 << 20));
    cfg.validate().unwrap();
    assert_eq!(
        toml::from_str::<WalConfig>("").unwrap(),
        WalConfig::default()
    );
    assert!(toml::from_str::<WalConfig>("segment_size = 1").is_err());
    for bad in [
        WalConfig {
            segment_size: ByteSize(100),
            ..WalConfig::default()
        },
        WalConfig {
            queue_depth: 0,
            ..WalConfig::default()
        },
        WalConfig {
            gc_live_percent: 101,
            ..WalConfig::default()
        },
        WalConfig {
            max_segments: 1,
            ..WalConfig::default()
        },
    ] {
        let e = bad.validate().unwrap_err();
        assert!(matches!(e, WalError::InvalidConfig { .. }), "{e}");
    }
    let round = toml::to_string(&WalConfig::default()).unwrap();
    assert!(round.contains("segment-size = \"64MiB\""), "{round}");
}
