//! Device state-machine tests, driven directly (no thread) over the mem engine and its crash
//! model.

use super::core::{CoreConfig, DeviceCore, Durability};
use super::open::{format, looks_empty};
use super::{DevError, DevRequest, Holder, Once};
use crate::engine::Doorbell;
use crate::engine::mem::{MemEngine, MemImage, filled};
use crate::metrics::DeviceMetrics;
use common::AlignedBuf;
use common::clock::{ManualClock, SharedClock};
use common::ids::{ChunkIndex, Epoch, NodeId, Uuid128, VolumeId};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

const SIZE: u64 = 256 << 20;
const CHUNK: u64 = 8 << 20;
const V: VolumeId = VolumeId(0xa);
const W: VolumeId = VolumeId(0xb);

fn h(epoch: u64, node: u64) -> Holder {
    Holder {
        epoch: Epoch(epoch),
        node: NodeId(node),
    }
}

struct H {
    core: DeviceCore<MemEngine>,
    bell: Doorbell,
    image: MemImage,
    clock: ManualClock,
}

fn cfg(durability: Durability) -> CoreConfig {
    CoreConfig {
        durability,
        clean_after: Duration::from_millis(100),
        ..CoreConfig::default()
    }
}

impl H {
    fn new(crash_seed: Option<u64>) -> Self {
        let image = MemImage::new(SIZE);
        let mut e = MemEngine::new(image.clone());
        format(&mut e, "mem", Uuid128(1), CHUNK).unwrap();
        Self::open(image, crash_seed, Durability::Dsync)
    }

    fn open(image: MemImage, crash_seed: Option<u64>, durability: Durability) -> Self {
        Self::open_with(image, crash_seed, cfg(durability))
    }

    fn open_with(image: MemImage, crash_seed: Option<u64>, cfg: CoreConfig) -> Self {
        let engine = match crash_seed {
            Some(s) => MemEngine::crash_model(image.clone(), s),
            None => MemEngine::new(image.clone()),
        };
        let clock = ManualClock::new();
        let shared: SharedClock = Arc::new(clock.clone());
        let (core, _) = DeviceCore::open(
            engine,
            "mem",
            Some(Uuid128(1)),
            shared,
            cfg,
            DeviceMetrics::unregistered("mem"),
        )
        .unwrap();
        Self {
            core,
            bell: Doorbell::new().unwrap(),
            image,
            clock,
        }
    }

    /// Accepts a request whose reply (a `Reply` or, for claims, a bare oneshot) is a oneshot.
    fn send<T, R: From<Once<T>>>(
        &mut self,
        f: impl FnOnce(R) -> DevRequest,
    ) -> oneshot::Receiver<Result<T, DevError>> {
        let (tx, rx) = oneshot::channel();
        self.core.accept(f(tx.into()));
        rx
    }

    fn pump(&mut self) {
        self.core.poll(None, &self.bell).unwrap();
    }

    fn wait<T>(&mut self, mut rx: oneshot::Receiver<Result<T, DevError>>) -> Result<T, DevError> {
        for _ in 0..100_000 {
            match rx.try_recv() {
                Ok(r) => return r,
                Err(oneshot::error::TryRecvError::Empty) => self.pump(),
                Err(e) => panic!("reply dropped: {e}"),
            }
        }
        panic!("request never completed");
    }

    fn write(
        &mut self,
        v: VolumeId,
        f: Holder,
        chunk: u64,
        off: u64,
        data: AlignedBuf,
    ) -> Result<(), DevError> {
        let rx = self.send(|reply| DevRequest::Write {
            fence: f,
            volume: v,
            chunk: ChunkIndex(chunk),
            offset: off,
            data,
            cached: false,
            reply,
        });
        self.wait(rx)
    }

    fn read(
        &mut self,
        v: VolumeId,
        chunk: u64,
        off: u64,
        len: u32,
    ) -> Result<AlignedBuf, DevError> {
        let rx = self.send(|reply| DevRequest::Read {
            volume: v,
            chunk: ChunkIndex(chunk),
            offset: off,
            len,
            reply,
        });
        self.wait(rx)
    }

    fn claim(&mut self, v: VolumeId, f: Holder) -> Result<Holder, DevError> {
        let rx = self.send(|reply| DevRequest::Claim {
            volume: v,
            fence: f,
            reply,
        });
        self.wait(rx)
    }

    fn zero(
        &mut self,
        v: VolumeId,
        f: Holder,
        chunk: u64,
        off: u64,
        len: u64,
    ) -> Result<(), DevError> {
        let rx = self.send(|reply| DevRequest::Zero {
            fence: f,
            volume: v,
            chunk: ChunkIndex(chunk),
            offset: off,
            len,
            reply,
        });
        self.wait(rx)
    }

    fn free(&mut self, v: VolumeId, f: Holder, chunk: u64) -> Result<(), DevError> {
        let rx = self.send(|reply| DevRequest::Free {
            fence: f,
            volume: v,
            chunk: ChunkIndex(chunk),
            reply,
        });
        self.wait(rx)
    }

    /// A cached write of one block of `byte` at the start of `chunk` (under `h(1, 1)`).
    fn cached_write(&mut self, chunk: u64, byte: u8) -> Result<(), DevError> {
        let rx = self.send(|reply| DevRequest::Write {
            fence: h(1, 1),
            volume: V,
            chunk: ChunkIndex(chunk),
            offset: 0,
            data: filled(4096, byte),
            cached: true,
            reply,
        });
        self.wait(rx)
    }

    fn flush(&mut self) -> Result<(), DevError> {
        let rx = self.send(|reply| DevRequest::Flush { reply });
        self.wait(rx)
    }

    /// Lets the cleaner write back checksums of idle regions.
    fn clean(&mut self) {
        self.clock.advance(Duration::from_secs(1));
        self.core.tick();
        for _ in 0..1000 {
            self.pump();
            if self.core.idle() {
                break;
            }
        }
    }

    fn raw(&self, v: VolumeId, chunk: u64, off: u64, len: usize) -> Vec<u8> {
        let base = self.core.physical(v, ChunkIndex(chunk)).expect("allocated");
        self.image.read(base + off, len)
    }
}

fn all(b: &[u8], x: u8) -> bool {
    b.iter().all(|&y| y == x)
}

#[test]
fn write_read_zero_round_trip() {
    let mut t = H::new(None);
    t.claim(V, h(1, 1)).unwrap();
    // Unallocated reads as zeros without allocating.
    assert!(all(&t.read(V, 3, 0, 8192).unwrap(), 0));
    t.write(V, h(1, 1), 3, 4096, filled(8192, 7)).unwrap();
    let b = t.read(V, 3, 0, 16384).unwrap();
    assert!(all(&b[..4096], 0) && all(&b[4096..12288], 7) && all(&b[12288..], 0));
    t.zero(V, h(1, 1), 3, 8192, 4096).unwrap();
    let b = t.read(V, 3, 4096, 8192).unwrap();
    assert!(all(&b[..4096], 7) && all(&b[4096..], 0));
    // Data survives a clean reopen (checksums written back) and an unclean one.
    t.clean();
    let img = t.image.clone();
    drop(t);
    let mut t = H::open(img, None, Durability::Dsync);
    let b = t.read(V, 3, 4096, 8192).unwrap();
    assert!(all(&b[..4096], 7) && all(&b[4096..], 0));
}

#[test]
fn bad_ranges_are_refused_cleanly() {
    let mut t = H::new(None);
    t.claim(V, h(1, 1)).unwrap();
    assert!(matches!(
        t.read(V, 0, 100, 4096),
        Err(DevError::Unaligned { .. })
    ));
    assert!(matches!(
        t.read(V, 0, 0, 0),
        Err(DevError::Unaligned { .. })
    ));
    assert!(matches!(
        t.read(V, 0, CHUNK - 4096, 8192),
        Err(DevError::OutOfRange { .. })
    ));
    assert!(matches!(
        t.write(V, h(1, 1), 0, u64::MAX - 4095, filled(4096, 1)),
        Err(DevError::OutOfRange { .. })
    ));
    assert!(matches!(
        t.zero(V, h(1, 1), 0, CHUNK, 4096),
        Err(DevError::OutOfRange { .. })
    ));
}

#[test]
fn fencing_rules() {
    let mut t = H::new(None);
    // No claim yet: refused.
    assert!(matches!(
        t.write(V, h(1, 1), 0, 0, filled(4096, 1)),
        Err(DevError::NotClaimed { .. })
    ));
    assert_eq!(t.claim(V, h(2, 1)).unwrap(), h(2, 1));
    t.write(V, h(2, 1), 0, 0, filled(4096, 2)).unwrap();
    let before = t.raw(V, 0, 0, 4096);
    // Lower epoch: fenced, and the device bytes are unchanged.
    assert_eq!(
        t.write(V, h(1, 1), 0, 0, filled(4096, 9)),
        Err(DevError::Fenced { current: h(2, 1) })
    );
    // Same epoch, another holder: fenced.
    assert_eq!(
        t.write(V, h(2, 7), 0, 0, filled(4096, 9)),
        Err(DevError::Fenced { current: h(2, 1) })
    );
    assert_eq!(
        t.zero(V, h(1, 1), 0, 0, 4096),
        Err(DevError::Fenced { current: h(2, 1) })
    );
    assert_eq!(
        t.free(V, h(1, 1), 0),
        Err(DevError::Fenced { current: h(2, 1) })
    );
    // Higher epoch than claimed: must claim first.
    assert!(matches!(
        t.write(V, h(3, 1), 0, 0, filled(4096, 9)),
        Err(DevError::NotClaimed { .. })
    ));
    assert_eq!(t.raw(V, 0, 0, 4096), before);
    assert!(all(&t.read(V, 0, 0, 4096).unwrap(), 2));
    // Claims never go backwards; the same claim again is idempotent.
    assert_eq!(
        t.claim(V, h(1, 5)),
        Err(DevError::Fenced { current: h(2, 1) })
    );
    assert_eq!(
        t.claim(V, h(2, 5)),
        Err(DevError::Fenced { current: h(2, 1) })
    );
    assert_eq!(t.claim(V, h(2, 1)).unwrap(), h(2, 1));
    // Volume W is independent.
    assert!(matches!(
        t.write(W, h(1, 3), 0, 0, filled(4096, 4)),
        Err(DevError::NotClaimed { .. })
    ));
    t.claim(W, h(1, 3)).unwrap();
    t.write(W, h(1, 3), 0, 0, filled(4096, 4)).unwrap();
    t.write(V, h(2, 1), 0, 0, filled(4096, 5)).unwrap();
    // A new holder claims V: the old one is out, the new one writes.
    t.claim(V, h(3, 2)).unwrap();
    assert_eq!(
        t.write(V, h(2, 1), 0, 0, filled(4096, 6)),
        Err(DevError::Fenced { current: h(3, 2) })
    );
    t.write(V, h(3, 2), 0, 0, filled(4096, 7)).unwrap();
    assert!(all(&t.read(V, 0, 0, 4096).unwrap(), 7));
    assert!(all(&t.read(W, 0, 0, 4096).unwrap(), 4));
}

#[test]
fn claim_is_durable_when_acknowledged() {
    for seed in 0..20 {
        let mut t = H::new(Some(seed));
        t.claim(V, h(4, 2)).unwrap();
        // Power cut right after the acknowledgement: the claim is there after reopen.
        t.image.power_cut(seed);
        let img = t.image.clone();
        drop(t);
        let mut t = H::open(img, Some(seed), Durability::Dsync);
        assert_eq!(
            t.claim(V, h(3, 9)),
            Err(DevError::Fenced { current: h(4, 2) }),
            "seed {seed}"
        );
        assert_eq!(
            t.write(V, h(4, 1), 0, 0, filled(4096, 1)),
            Err(DevError::Fenced { current: h(4, 2) })
        );
    }
}

#[test]
fn claim_waits_for_older_writes_and_nothing_older_lands_after() {
    for seed in 0..30 {
        let mut t = H::new(Some(seed));
        t.claim(V, h(1, 1)).unwrap();
        // Allocate first so the writes below are all in flight at once.
        t.write(V, h(1, 1), 0, 0, filled(4096, 1)).unwrap();
        let writes: Vec<_> = (0..8u64)
            .map(|i| {
                t.send(|reply| DevRequest::Write {
                    fence: h(1, 1),
                    volume: V,
                    chunk: ChunkIndex(0),
                    offset: i * 4096,
                    data: filled(4096, 0x10 + i as u8),
                    cached: false,
                    reply,
                })
            })
            .collect();
        let claim = t.send(|reply| DevRequest::Claim {
            volume: V,
            fence: h(2, 2),
            reply,
        });
        // Writes sent after the claim are refused at once, whatever the claim's progress.
        let late = t.write(V, h(1, 1), 0, 0, filled(4096, 0xee));
        assert_eq!(late, Err(DevError::Fenced { current: h(2, 2) }));
        let claimed = t.wait(claim).unwrap();
        assert_eq!(claimed, h(2, 2));
        // At the acknowledgement every older write has already answered.
        let mut outcomes = Vec::new();
        for mut w in writes {
            match w.try_recv() {
                Ok(r) => outcomes.push(r),
                Err(e) => panic!(
                    "seed {seed}: a write under the old epoch is still pending after the claim: {e:?}"
                ),
            }
        }
        let snapshot = t.raw(V, 0, 0, 8 * 4096);
        // Nothing older lands after: pump a while, the bytes do not change.
        for _ in 0..50 {
            t.pump();
        }
        assert_eq!(t.raw(V, 0, 0, 8 * 4096), snapshot, "seed {seed}");
        for (i, o) in outcomes.iter().enumerate() {
            let b = &snapshot[i * 4096..(i + 1) * 4096];
            match o {
                Ok(()) => assert!(
                    all(b, 0x10 + i as u8),
                    "seed {seed}: acked write {i} missing"
                ),
                Err(DevError::Fenced { .. }) => {}
                Err(e) => panic!("seed {seed}: {e}"),
            }
        }
    }
}

#[test]
fn checksum_mismatch_fails_loudly() {
    let mut t = H::new(None);
    t.claim(V, h(1, 1)).unwrap();
    t.write(V, h(1, 1), 1, 0, filled(16384, 3)).unwrap();
    t.clean();
    let base = t.core.physical(V, ChunkIndex(1)).unwrap();
    t.image.write_durable(base + 4096 + 100, &[0xff]);
    // Reopen so nothing is cached: the stored checksum catches the flipped byte.
    let img = t.image.clone();
    drop(t);
    let mut t = H::open(img, None, Durability::Dsync);
    assert_eq!(
        t.read(V, 1, 0, 16384),
        Err(DevError::Checksum { offset: 4096 })
    );
    assert!(all(&t.read(V, 1, 0, 4096).unwrap(), 3));
    assert!(all(&t.read(V, 1, 8192, 8192).unwrap(), 3));
}

#[test]
fn freed_chunks_read_as_zeros_and_reuse_leaks_nothing() {
    let mut t = H::new(None);
    t.claim(V, h(1, 1)).unwrap();
    t.claim(W, h(1, 1)).unwrap();
    t.write(V, h(1, 1), 0, 0, filled(1 << 20, 0x77)).unwrap();
    t.free(V, h(1, 1), 0).unwrap();
    assert!(all(&t.read(V, 0, 0, 1 << 20).unwrap(), 0));
    // Fill the device so the freed slot is reused by another volume.
    let mut chunk = 0;
    loop {
        match t.write(W, h(1, 1), chunk, 0, filled(4096, 1)) {
            Ok(()) => chunk += 1,
            Err(DevError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(chunk > 10);
    for c in 0..chunk {
        let b = t.read(W, c, 0, 1 << 20).unwrap();
        assert!(
            all(&b[..4096], 1) && all(&b[4096..], 0),
            "chunk {c} leaks old data"
        );
    }
    // A full device refuses new chunks but still serves allocated ones.
    assert_eq!(
        t.write(W, h(1, 1), chunk + 1, 0, filled(4096, 1)),
        Err(DevError::NoSpace)
    );
    t.write(W, h(1, 1), 0, 4096, filled(4096, 2)).unwrap();
}

/// What a test remembers about acknowledged state.
#[derive(Default, Clone)]
struct Model {
    /// (chunk, block) → (arrival order, byte) of the latest-arrived acknowledged mutation (0 for
    /// zeroed). The device applies overlapping mutations in arrival order.
    blocks: std::collections::HashMap<(u64, u64), (u64, u8)>,
    claim: Option<Holder>,
}

/// Random operations on a crash-model device, a power cut at a random point, reopen, and check
/// that every acknowledged write and claim survived and no block reads as corrupt.
/// A mutation sent and not yet answered: reply, blocks, byte, arrival order.
/// A mutation in flight: its answer, its blocks, its byte, its arrival, and whether it is a
/// cached write (durable only after a later flush).
type InFlight = (
    oneshot::Receiver<Result<(), DevError>>,
    Vec<(u64, u64)>,
    u8,
    u64,
    bool,
);

/// A cached write acknowledged and not yet covered by a flush: blocks, byte, arrival, and the
/// step at which its acknowledgement was seen.
type CachedAck = (Vec<(u64, u64)>, u8, u64, u64);

fn model_apply(m: &mut Model, blocks: &[(u64, u64)], byte: u8, arrival: u64) {
    for b in blocks {
        let e = m.blocks.entry(*b).or_insert((0, 0));
        if arrival >= e.0 {
            *e = (arrival, byte);
        }
    }
}

/// Random writes, zeroes, claims, clock steps and (with `cached`) cached writes and flushes,
/// then a simulated power cut: every acknowledged durable mutation and every cached write
/// acknowledged before an acknowledged flush must be intact; other cached writes and those in
/// flight may or may not be there.
fn crash_run(seed: u64, durability: Durability, cached: bool) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let image = MemImage::new(SIZE);
    format(&mut MemEngine::new(image.clone()), "mem", Uuid128(1), CHUNK).unwrap();
    let mut t = H::open(image.clone(), Some(seed), durability);
    let mut m = Model::default();
    let mut epoch = 1;
    t.claim(V, h(epoch, 1)).unwrap();
    m.claim = Some(h(epoch, 1));
    let steps = rng.gen_range(5..60);
    let mut pending: Vec<InFlight> = Vec::new();
    let mut cached_acks: Vec<CachedAck> = Vec::new();
    let mut flushes: Vec<(oneshot::Receiver<Result<(), DevError>>, u64)> = Vec::new();
    for arrival in 0..steps {
        match rng.gen_range(0..10) {
            0..=5 => {
                let chunk = rng.gen_range(0..3u64);
                let block = rng.gen_range(0..16u64) * 8;
                let n = rng.gen_range(1..=8u64);
                let byte = rng.gen_range(1..=255u8);
                let is_cached = cached && rng.gen_bool(0.5);
                let rx = t.send(|reply| DevRequest::Write {
                    fence: h(epoch, 1),
                    volume: V,
                    chunk: ChunkIndex(chunk),
                    offset: block * 4096,
                    data: filled((n * 4096) as usize, byte),
                    cached: is_cached,
                    reply,
                });
                pending.push((
                    rx,
                    (block..block + n).map(|b| (chunk, b)).collect(),
                    byte,
                    arrival,
                    is_cached,
                ));
            }
            9 if cached && rng.gen_bool(0.5) => {
                let rx = t.send(|reply| DevRequest::Flush { reply });
                flushes.push((rx, arrival));
            }
            6 => {
                let chunk = rng.gen_range(0..3u64);
                let block = rng.gen_range(0..16u64) * 8;
                let rx = t.send(|reply| DevRequest::Zero {
                    fence: h(epoch, 1),
                    volume: V,
                    chunk: ChunkIndex(chunk),
                    offset: block * 4096,
                    len: 8 * 4096,
                    reply,
                });
                pending.push((
                    rx,
                    (block..block + 8).map(|b| (chunk, b)).collect(),
                    0,
                    arrival,
                    false,
                ));
            }
            7 => {
                // Claims are acknowledged (or not) synchronously here, then writes go on.
                epoch += 1;
                let rx = t.send(|reply| DevRequest::Claim {
                    volume: V,
                    fence: h(epoch, 1),
                    reply,
                });
                let r = t.wait(rx);
                assert_eq!(r, Ok(h(epoch, 1)));
                m.claim = Some(h(epoch, 1));
            }
            8 => {
                t.clock
                    .advance(Duration::from_millis(rng.gen_range(0..300)));
                t.core.tick();
            }
            _ => {
                for _ in 0..rng.gen_range(1..5) {
                    t.pump();
                }
            }
        }
        let now = arrival;
        // Collect answers: flushes first, so a write acknowledged in this same round is not
        // taken as covered by a flush sent before its acknowledgement was seen.
        flushes.retain_mut(|(rx, sent)| match rx.try_recv() {
            Ok(Ok(())) => {
                cached_acks.retain(|(blocks, byte, arrival, seen)| {
                    if seen < sent {
                        model_apply(&mut m, blocks, *byte, *arrival);
                        false
                    } else {
                        true
                    }
                });
                false
            }
            Ok(Err(e)) => panic!("seed {seed}: flush failed: {e}"),
            Err(oneshot::error::TryRecvError::Empty) => true,
            Err(e) => panic!("seed {seed}: {e}"),
        });
        pending.retain_mut(
            |(rx, blocks, byte, arrival, is_cached)| match rx.try_recv() {
                Ok(Ok(())) if *is_cached => {
                    cached_acks.push((std::mem::take(blocks), *byte, *arrival, now));
                    false
                }
                Ok(Ok(())) => {
                    model_apply(&mut m, blocks, *byte, *arrival);
                    false
                }
                Ok(Err(DevError::Fenced { .. })) => false,
                Ok(Err(e)) => panic!("seed {seed}: unexpected {e}"),
                Err(oneshot::error::TryRecvError::Empty) => true,
                Err(e) => panic!("seed {seed}: {e}"),
            },
        );
    }
    // Whatever is still in flight, or cached and not flushed, and arrived after the latest
    // durable mutation of a block, may or may not be there.
    let mut uncertain: std::collections::HashMap<(u64, u64), Vec<u8>> = Default::default();
    let maybe = pending
        .iter()
        .map(|(_, blocks, byte, arrival, _)| (blocks, byte, arrival))
        .chain(
            cached_acks
                .iter()
                .map(|(blocks, byte, arrival, _)| (blocks, byte, arrival)),
        );
    for (blocks, byte, arrival) in maybe {
        for b in blocks {
            if m.blocks.get(b).is_none_or(|(acked, _)| arrival > acked) {
                uncertain.entry(*b).or_default().push(*byte);
            }
        }
    }
    image.power_cut(seed ^ 0x5eed);
    drop(t);
    let mut t = H::open(image, Some(seed + 1), durability);
    if let Some(c) = m.claim {
        assert_eq!(
            t.claim(
                V,
                Holder {
                    epoch: Epoch(c.epoch.0 - 1),
                    node: NodeId(1)
                }
            ),
            Err(DevError::Fenced { current: c }),
            "seed {seed}: claim lost"
        );
    }
    for chunk in 0..3u64 {
        let data = t
            .read(V, chunk, 0, 128 * 4096)
            .unwrap_or_else(|e| panic!("seed {seed}: chunk {chunk} unreadable after crash: {e}"));
        for block in 0..128u64 {
            let got = &data[(block * 4096) as usize..((block + 1) * 4096) as usize];
            let want = m.blocks.get(&(chunk, block)).map_or(0, |(_, b)| *b);
            // A block with a write in flight at the cut may hold the old value, any of the
            // in-flight values, or a mix of them torn at 512-byte sectors; nothing else.
            let alts = uncertain.get(&(chunk, block)).cloned().unwrap_or_default();
            let ok = got
                .chunks(512)
                .all(|sector| all(sector, want) || alts.iter().any(|&a| all(sector, a)));
            assert!(
                ok,
                "seed {seed}: chunk {chunk} block {block}: want {want:#x}, got {:#x}..",
                got[0]
            );
        }
    }
}

/// Seeds per crash-model test: `STOCKADE_CRASH_SEEDS`, or 200.
fn crash_seeds() -> u64 {
    std::env::var("STOCKADE_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

#[test]
fn crash_model_keeps_every_acknowledged_write_dsync() {
    for seed in 0..crash_seeds() {
        crash_run(seed, Durability::Dsync, false);
    }
}

#[test]
fn crash_model_keeps_every_flushed_cached_write() {
    for seed in 0..crash_seeds() {
        crash_run(seed, Durability::Dsync, true);
        crash_run(seed, Durability::BatchFsync, true);
    }
}

#[test]
fn crash_model_keeps_every_acknowledged_write_batch_fsync() {
    for seed in 0..crash_seeds() {
        crash_run(seed, Durability::BatchFsync, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Random interleavings of claims (any epoch, any holder) and writes, with reopens: the
    /// stored epoch never decreases, and a write is accepted only under the stored claim.
    #[test]
    fn stored_epoch_never_decreases(ops in proptest::collection::vec((0u8..4, 1u64..6, 1u64..3), 1..40)) {
        let mut t = H::new(None);
        let mut stored: Option<Holder> = None;
        for (kind, epoch, node) in ops {
            let f = h(epoch, node);
            match kind {
                0 | 1 => {
                    let r = t.claim(V, f);
                    match stored {
                        Some(s) if f.epoch < s.epoch || (f.epoch == s.epoch && f.node != s.node) => {
                            prop_assert_eq!(r, Err(DevError::Fenced { current: s }));
                        }
                        _ => {
                            prop_assert_eq!(r, Ok(f));
                            stored = Some(f);
                        }
                    }
                }
                2 => {
                    let r = t.write(V, f, 0, 0, filled(4096, epoch as u8));
                    prop_assert_eq!(r.is_ok(), stored == Some(f), "{:?} under {:?}", r, stored);
                }
                _ => {
                    let img = t.image.clone();
                    drop(t);
                    t = H::open(img, None, Durability::Dsync);
                }
            }
        }
    }
}

#[test]
fn engine_back_pressure_does_not_lose_requests() {
    // More writes in flight than the engine holds: all complete, in a consistent state.
    let mut t = H::new(None);
    t.claim(V, h(1, 1)).unwrap();
    let rxs: Vec<_> = (0..200u64)
        .map(|i| {
            t.send(|reply| DevRequest::Write {
                fence: h(1, 1),
                volume: V,
                chunk: ChunkIndex(i % 4),
                offset: (i / 4) * 4096,
                data: filled(4096, i as u8 + 1),
                cached: false,
                reply,
            })
        })
        .collect();
    for rx in rxs {
        t.wait(rx).unwrap();
    }
    assert!(t.core.engine_capacity() < 200);
    for i in 0..200u64 {
        let b = t.read(V, i % 4, (i / 4) * 4096, 4096).unwrap();
        assert!(all(&b, i as u8 + 1), "write {i}");
    }
}

#[test]
fn a_failed_fsync_fails_every_later_flush_until_the_device_is_reopened() {
    // A formatted device, opened again with batched fsyncs.
    let image = H::new(None).image.clone();
    let mut t2 = H::open(image.clone(), None, Durability::BatchFsync);
    t2.claim(V, h(1, 1)).unwrap();
    t2.cached_write(0, 1).unwrap();
    image.fail_fsyncs(1);
    assert!(t2.flush().is_err(), "the failing fsync's flush");
    // The retry must not be answered durable: the first write was never made durable.
    let again = t2.flush().unwrap_err();
    assert!(again.to_string().contains("earlier fsync"), "{again}");
    // Nor after new writes, nor for writes waiting on a group fsync.
    t2.cached_write(0, 2).unwrap();
    assert!(t2.flush().is_err());
    assert!(t2.write(V, h(1, 1), 0, 4096, filled(4096, 3)).is_err());
    // Opened again (the sled restarted), the device answers flushes again.
    drop(t2);
    let mut t3 = H::open(image, None, Durability::BatchFsync);
    t3.cached_write(0, 4).unwrap();
    t3.flush().unwrap();
}

#[test]
fn requests_queued_behind_a_free_find_the_chunk_again() {
    let mut t = H::new(None);
    let v2 = VolumeId(0xbeef);
    t.claim(V, h(1, 1)).unwrap();
    t.claim(v2, h(1, 1)).unwrap();
    t.write(V, h(1, 1), 0, 0, filled(8192, 0x11)).unwrap();
    // A free, then (without waiting) a write, a second free and a write, all of chunk 0.
    let free = t.send(|reply| DevRequest::Free {
        fence: h(1, 1),
        volume: V,
        chunk: ChunkIndex(0),
        reply,
    });
    let write = t.send(|reply| DevRequest::Write {
        fence: h(1, 1),
        volume: V,
        chunk: ChunkIndex(0),
        offset: 0,
        data: filled(4096, 0x55),
        cached: false,
        reply,
    });
    t.wait(free).unwrap();
    t.wait(write).unwrap();
    // The write landed on a chunk the volume owns, not on the freed slot.
    let b = t.read(V, 0, 0, 8192).unwrap();
    assert!(all(&b[..4096], 0x55), "the write after the free was lost");
    assert!(
        all(&b[4096..], 0),
        "the rest of the freed chunk reads as zeros"
    );

    // Two frees in a row, then another volume allocates: the second free must not take the
    // slot away from it (it finds nothing left to free).
    let f1 = t.send(|reply| DevRequest::Free {
        fence: h(1, 1),
        volume: V,
        chunk: ChunkIndex(0),
        reply,
    });
    let f2 = t.send(|reply| DevRequest::Free {
        fence: h(1, 1),
        volume: V,
        chunk: ChunkIndex(0),
        reply,
    });
    t.wait(f1).unwrap();
    t.wait(f2).unwrap();
    t.write(v2, h(1, 1), 3, 0, filled(4096, 0x77)).unwrap();
    t.clean();
    assert!(all(&t.read(v2, 3, 0, 4096).unwrap(), 0x77));
    assert!(all(&t.read(V, 0, 0, 4096).unwrap(), 0));
    // Every slot is accounted for once: a fresh volume's chunks all land on distinct slots.
    let a = t.core.physical(v2, ChunkIndex(3)).expect("allocated");
    t.write(V, h(1, 1), 1, 0, filled(4096, 0x99)).unwrap();
    assert_ne!(t.core.physical(V, ChunkIndex(1)), Some(a));
    assert!(all(&t.read(v2, 3, 0, 4096).unwrap(), 0x77));
}

#[test]
fn a_retired_volume_is_fenced_for_good_and_its_fence_slot_is_reused_when_the_table_is_full() {
    let mut t = H::new(None);
    let retire = |t: &mut H, v: VolumeId, f: Holder| {
        let rx = t.send(|reply| DevRequest::Retire {
            volume: v,
            fence: f,
            reply,
        });
        t.wait(rx)
    };
    t.claim(V, h(3, 1)).unwrap();
    t.write(V, h(3, 1), 0, 0, filled(4096, 1)).unwrap();
    // Only the current holder, and only once no chunk is left.
    assert!(matches!(
        retire(&mut t, V, h(2, 1)),
        Err(DevError::Fenced { .. })
    ));
    assert_eq!(
        retire(&mut t, V, h(3, 1)),
        Err(DevError::NotEmpty { chunks: 1 })
    );
    t.free(V, h(3, 1), 0).unwrap();
    retire(&mut t, V, h(3, 1)).unwrap();
    // A retry is fine; nothing passes the tombstone any more.
    retire(&mut t, V, h(3, 1)).unwrap();
    assert!(matches!(
        t.write(V, h(3, 1), 0, 0, filled(4096, 2)),
        Err(DevError::Fenced { .. })
    ));
    assert!(matches!(t.claim(V, h(9, 2)), Err(DevError::Fenced { .. })));
    // A volume never claimed here retires at once.
    retire(&mut t, VolumeId(0x1234), h(1, 1)).unwrap();

    // Fill the fence table (the retired volume holds one slot).
    let mut n = 0u128;
    let full = loop {
        match t.claim(VolumeId(0x10_000 + n), h(1, 1)) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 100_000, "the fence table never filled");
    };
    assert_eq!(full, DevError::FenceTableFull);
    // On the way, the retired volume's slot went to a new volume: its tombstone is gone (a
    // claim of it now needs a slot like any new volume).
    assert_eq!(t.claim(V, h(9, 2)), Err(DevError::FenceTableFull));
    // Retiring another gives its slot to the next new volume, and only to one.
    retire(&mut t, VolumeId(0x10_000), h(1, 1)).unwrap();
    t.claim(VolumeId(0x99_999), h(1, 1)).unwrap();
    assert_eq!(
        t.claim(VolumeId(0x99_998), h(1, 1)),
        Err(DevError::FenceTableFull)
    );
    retire(&mut t, VolumeId(0x10_001), h(1, 1)).unwrap();
    t.claim(VolumeId(0x99_998), h(1, 1)).unwrap();
    // All of it durable: reopened, the new claims hold and the retired volume stays fenced.
    let image = t.image.clone();
    drop(t);
    let mut t = H::open(image, None, Durability::Dsync);
    for v in [0x99_999u128, 0x99_998] {
        assert!(matches!(
            t.claim(VolumeId(v), h(0, 1)),
            Err(DevError::Fenced { .. })
        ));
        t.claim(VolumeId(v), h(1, 1)).unwrap();
    }
    // The still-claimed ones are as they were; the retired ones lost their place.
    assert!(matches!(
        t.claim(VolumeId(0x10_002), h(0, 1)),
        Err(DevError::Fenced { .. })
    ));
    assert_eq!(
        t.claim(VolumeId(0x10_000), h(2, 1)),
        Err(DevError::FenceTableFull)
    );
}

#[test]
fn a_free_that_cannot_be_made_durable_is_undone() {
    let image = H::new(None).image.clone();
    let mut t = H::open(image.clone(), None, Durability::BatchFsync);
    t.claim(V, h(1, 1)).unwrap();
    t.cached_write(0, 0x11).unwrap();
    t.flush().unwrap();
    // The free's table write fails: the free is refused...
    image.fail_dsync_writes(1);
    assert!(t.free(V, h(1, 1), 0).is_err());
    // ...and undone: the chunk is still the volume's, through later table writes (a new chunk's
    // allocation rewrites the same table page) and a restart.
    t.cached_write(0, 0x55).unwrap();
    t.cached_write(1, 0x66).unwrap();
    t.flush().unwrap();
    t.clean();
    drop(t);
    let mut t = H::open(image, None, Durability::BatchFsync);
    assert!(
        all(&t.read(V, 0, 0, 4096).unwrap(), 0x55),
        "the chunk was lost"
    );
    assert!(all(&t.read(V, 1, 0, 4096).unwrap(), 0x66));
}

#[test]
fn an_allocation_of_a_held_chunk_by_a_deposed_holder_is_refused() {
    let mut t = H::new(None);
    t.claim(V, h(1, 1)).unwrap();
    t.write(V, h(1, 1), 3, 0, filled(4096, 1)).unwrap();
    t.claim(V, h(2, 2)).unwrap();
    let alloc = |t: &mut H, f: Holder| {
        let rx = t.send(|reply| DevRequest::Allocate {
            fence: f,
            volume: V,
            chunk: ChunkIndex(3),
            reply,
        });
        t.wait(rx)
    };
    assert_eq!(
        alloc(&mut t, h(1, 1)),
        Err(DevError::Fenced { current: h(2, 2) })
    );
    assert_eq!(alloc(&mut t, h(2, 2)), Ok(()));
}

#[test]
fn a_free_that_fails_keeps_the_checksums_of_its_chunk() {
    let image = H::new(None).image.clone();
    // A checksum cache that keeps nothing it may drop.
    let tiny = CoreConfig {
        crc_cache_pages: 0,
        ..cfg(Durability::Dsync)
    };
    let mut t = H::open_with(image.clone(), None, tiny.clone());
    t.claim(V, h(1, 1)).unwrap();
    // Written, its checksum so far only in memory (the region is dirty, not idle yet).
    t.write(V, h(1, 1), 0, 0, filled(4096, 0x11)).unwrap();
    image.fail_dsync_writes(1);
    assert!(t.free(V, h(1, 1), 0).is_err());
    // A tick drops cached checksum pages of clean regions: this one is still dirty, so its
    // page (the only copy of the new checksum) stays.
    t.core.tick();
    assert!(
        all(&t.read(V, 0, 0, 4096).unwrap(), 0x11),
        "the block's checksum was lost with the failed free"
    );
    // Cleaned and reopened: still there.
    t.clean();
    drop(t);
    let mut t = H::open_with(image, None, tiny);
    assert!(all(&t.read(V, 0, 0, 4096).unwrap(), 0x11));
}

#[test]
fn a_write_whose_group_fsync_failed_leaves_its_checksums_to_recovery() {
    for seed in 0..8 {
        let image = H::new(None).image.clone();
        let mut t = H::open(image.clone(), Some(seed), Durability::BatchFsync);
        t.claim(V, h(1, 1)).unwrap();
        t.write(V, h(1, 1), 0, 0, filled(4096, 0x11)).unwrap();
        t.clean();
        // The fsync that would make the next write durable fails: the write fails, and
        // whether its data is on the disk is unknown.
        image.fail_fsyncs(1);
        assert!(t.write(V, h(1, 1), 0, 0, filled(4096, 0x22)).is_err());
        // The cleaner must not write back the checksum of data a power cut can take away.
        t.clean();
        image.power_cut(seed);
        drop(t);
        let mut t = H::open(image, None, Durability::BatchFsync);
        let b = t
            .read(V, 0, 0, 4096)
            .unwrap_or_else(|e| panic!("seed {seed}: the block no longer reads: {e}"));
        assert!(all(&b, 0x11) || all(&b, 0x22), "seed {seed}");
    }
}

#[test]
fn a_dirty_region_with_a_bad_sector_does_not_keep_the_device_from_opening() {
    let image = H::new(None).image.clone();
    let mut t = H::open(image.clone(), None, Durability::Dsync);
    t.claim(V, h(1, 1)).unwrap();
    t.write(V, h(1, 1), 0, 0, filled(4096, 0x11)).unwrap();
    t.write(V, h(1, 1), 0, 4096, filled(4096, 0x22)).unwrap();
    let base = t.core.physical(V, ChunkIndex(0)).expect("allocated");
    // Stopped without cleaning (as by a crash): the region is dirty on the device, and its
    // first block has gone bad.
    drop(t);
    image.make_unreadable(base, 4096);
    let mut t = H::open(image, None, Durability::Dsync);
    // The readable block was recovered; the bad one fails (a head node reads another replica).
    assert!(all(&t.read(V, 0, 4096, 4096).unwrap(), 0x22));
    assert!(t.read(V, 0, 0, 4096).is_err());
    // Written again, it reads back.
    t.write(V, h(1, 1), 0, 0, filled(4096, 0x33)).unwrap();
    assert!(all(&t.read(V, 0, 0, 4096).unwrap(), 0x33));
}

#[test]
fn an_interrupted_format_is_formatted_again_and_data_is_not() {
    let image = MemImage::new(SIZE);
    let mut e = MemEngine::new(image.clone());
    assert!(looks_empty(&mut e, "mem", CHUNK).unwrap(), "a new device");
    format(&mut e, "mem", Uuid128(1), CHUNK).unwrap();
    assert!(
        !looks_empty(&mut e, "mem", CHUNK).unwrap(),
        "a formatted device"
    );
    // The superblock is written last: without it, the tables alone are an interrupted format.
    let mut zero = MemEngine::new(image.clone());
    crate::engine::write_sync(&mut zero, 0, AlignedBuf::zeroed(8192)).unwrap();
    assert!(looks_empty(&mut e, "mem", CHUNK).unwrap());
    // Anything else is data.
    crate::engine::write_sync(&mut zero, 1 << 19, filled(4096, 1)).unwrap();
    assert!(!looks_empty(&mut e, "mem", CHUNK).unwrap());
}

#[test]
fn a_claim_waits_for_an_older_epochs_allocation_and_no_chunk_of_it_appears_after() {
    for seed in 0..30 {
        let mut t = H::new(Some(seed));
        t.claim(V, h(1, 1)).unwrap();
        // A write to a chunk not allocated yet: it allocates (zeroes a slot, commits the table).
        let write = t.send(|reply| DevRequest::Write {
            fence: h(1, 1),
            volume: V,
            chunk: ChunkIndex(5),
            offset: 0,
            data: filled(4096, 0x42),
            cached: false,
            reply,
        });
        let claim = t.send(|reply| DevRequest::Claim {
            volume: V,
            fence: h(2, 2),
            reply,
        });
        t.wait(claim).unwrap();
        // At the claim's acknowledgement the older write has answered, and what the device
        // holds for the volume no longer changes under the old epoch.
        let mut write = write;
        let outcome = write
            .try_recv()
            .unwrap_or_else(|e| panic!("seed {seed}: the write is still pending: {e:?}"));
        let held = t.core.physical(V, ChunkIndex(5)).is_some();
        for _ in 0..50 {
            t.pump();
        }
        assert_eq!(
            t.core.physical(V, ChunkIndex(5)).is_some(),
            held,
            "seed {seed}: a chunk of the old epoch appeared after the claim"
        );
        match outcome {
            Ok(()) => assert!(all(&t.read(V, 5, 0, 4096).unwrap(), 0x42)),
            Err(DevError::Fenced { .. } | DevError::NotClaimed { .. }) => {}
            Err(e) => panic!("seed {seed}: {e}"),
        }
    }
}

#[test]
fn a_torn_failed_write_leaves_its_region_to_be_recomputed_not_corrupt() {
    let mut t = H::new(None);
    t.claim(V, h(1, 1)).unwrap();
    t.write(V, h(1, 1), 0, 0, filled(8192, 0x11)).unwrap();
    // The next write lands its first block, then the device fails it.
    t.image.tear_dsync_writes(1);
    assert!(t.write(V, h(1, 1), 0, 0, filled(8192, 0x22)).is_err());
    // What the torn block holds is unknown here: a read of it fails (another replica serves it)
    // rather than returning it as good; the untouched block reads as before.
    assert!(matches!(
        t.read(V, 0, 0, 4096),
        Err(DevError::Checksum { .. })
    ));
    assert!(all(&t.read(V, 0, 4096, 4096).unwrap(), 0x11));
    // The cleaner must not write the old checksums back as if they were right: opened again,
    // the region is recomputed from what the device holds, and nothing reads as corrupt.
    t.clean();
    let image = t.image.clone();
    drop(t);
    let mut t = H::open(image, None, Durability::Dsync);
    let b = t.read(V, 0, 0, 8192).unwrap();
    assert!(all(&b[..4096], 0x22) && all(&b[4096..], 0x11));
}

#[test]
fn a_damaged_superblock_copy_is_rewritten_from_the_other_at_open() {
    use crate::engine::{read_sync, write_sync};
    let mut t = H::new(None);
    t.claim(V, h(1, 1)).unwrap();
    t.write(V, h(1, 1), 0, 0, filled(4096, 0x5a)).unwrap();
    let image = t.image.clone();
    drop(t);
    for copy in [0u64, 1] {
        let mut e = MemEngine::new(image.clone());
        // Damage one copy: a flipped byte keeps the magic but breaks the checksum.
        let mut page = read_sync(&mut e, copy * 4096, 4096).unwrap();
        page[100] ^= 0xff;
        write_sync(&mut e, copy * 4096, page).unwrap();
        let mut t = H::open(image.clone(), None, Durability::Dsync);
        // It opened from the other copy, with its data...
        assert!(all(&t.read(V, 0, 0, 4096).unwrap(), 0x5a), "copy {copy}");
        drop(t);
        // ...and the damaged copy is whole again, so losing the other one later is survivable.
        let both = read_sync(&mut e, 0, 8192).unwrap();
        assert_eq!(both[..4096], both[4096..], "copy {copy} was not rewritten");
    }
}

#[test]
fn a_fresh_device_opens_with_nothing_to_repair() {
    let image = MemImage::new(SIZE);
    let mut e = MemEngine::new(image.clone());
    format(&mut e, "mem", Uuid128(1), CHUNK).unwrap();
    // Copy B of every table page is still unwritten (zeros): that is not damage.
    let opened = super::open::open(&mut e, "mem", None).unwrap();
    assert_eq!(opened.repaired_pages, 0);
    assert!(opened.repaired_superblock.is_empty());
}

#[test]
fn a_damaged_older_copy_of_a_table_page_is_rewritten_at_open() {
    use crate::engine::{read_sync, write_sync};
    use crate::layout::{Table, decode_page};
    let mut t = H::new(None);
    t.claim(V, h(1, 1)).unwrap();
    // Allocates chunk 0: chunk table page 0 gets a new version.
    t.write(V, h(1, 1), 0, 0, filled(4096, 0x5a)).unwrap();
    // Its checksums written back, so that opening has no dirty region to recover (recovery
    // rewrites the page too, which would hide whether the repair works).
    t.clean();
    let image = t.image.clone();
    drop(t);
    let mut e = MemEngine::new(image.clone());
    let g = super::open::read_superblock(&mut e, "mem")
        .unwrap()
        .geometry;
    let copies = |e: &mut MemEngine| {
        [0u8, 1].map(|c| {
            let page = read_sync(e, g.ct_page_pos(0, c), 4096).unwrap();
            decode_page(Table::Chunks, 0, &page).map(|(seq, _)| seq)
        })
    };
    let [a, b] = copies(&mut e);
    // Damage the older copy (the newer one holds the allocation).
    let older = u8::from(b.unwrap() < a.unwrap());
    let at = g.ct_page_pos(0, older);
    let mut page = read_sync(&mut e, at, 4096).unwrap();
    page[200] ^= 0xff;
    write_sync(&mut e, at, page).unwrap();
    assert_eq!(copies(&mut e)[older as usize], None);
    let mut t = H::open(image.clone(), None, Durability::Dsync);
    assert!(all(&t.read(V, 0, 0, 4096).unwrap(), 0x5a));
    drop(t);
    // Both copies valid again: the page has a fallback should the newer one go bad.
    let [a, b] = copies(&mut e);
    assert!(a.is_some() && b.is_some(), "{a:?} {b:?}");
}
