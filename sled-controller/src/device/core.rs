//! The device state machine: requests in, I/O operations out, completions in, replies out.
//!
//! A request becomes a *job* that advances through steps — find or allocate its chunk, take a
//! range lock, load checksum pages, make its regions' dirty bits durable, check its fence one last
//! time, submit its I/O — parking wherever it must wait and resuming when what it waited for
//! completes. The fence check right before submission is the point of no return: a claim raises
//! the volume's record in memory at once (so nothing older passes that check any more), waits for
//! the mutations already submitted, and only then writes the record and acknowledges.
//!
//! Nothing here blocks or reads the clock directly; the owning thread feeds it requests and
//! completions, and time comes from the injected clock.

use super::meta::{Batch, MetaLane, PageState, TableKey, Tables, Waiter};
use super::open::Opened;
use super::{DevError, DevRequest, DeviceStatus, Holder, Once, Reply};
use crate::engine::{Completion, Doorbell, IoEngine, Op, OpKind};
use crate::layout::{
    BLOCK, CRC_ENTRY, ChunkEntry, CrcEntry, FenceEntry, Geometry, PAGE, REGION_BLOCKS,
    REGION_BYTES, Superblock, Table,
};
use crate::metrics::DeviceMetrics;
use crate::reply::Wakes;
use common::AlignedBuf;
use common::aligned::BufPool;
use common::clock::SharedClock;
use common::ids::{ChunkIndex, VolumeId};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

mod cleaning;
mod metadata;

/// When a data write is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Each write carries `RWF_DSYNC`.
    Dsync,
    /// Writes complete into the device cache; one `fdatasync` covers a batch of them before they
    /// are acknowledged.
    BatchFsync,
}

/// Tunables of a device.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Write durability mode.
    pub durability: Durability,
    /// A dirty region idle this long has its checksums written back.
    pub clean_after: Duration,
    /// Above this many dirty regions, idle ones are written back regardless of age.
    pub max_dirty_regions: usize,
    /// Checksum pages of clean regions kept in memory.
    pub crc_cache_pages: usize,
    /// Requests accepted at once (beyond: back-pressure on the queue).
    pub max_jobs: usize,
    /// Where read buffers come from (the region registered with the ring), if anywhere.
    pub pool: Option<BufPool>,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Dsync,
            clean_after: Duration::from_secs(2),
            max_dirty_regions: 4096,
            crc_cache_pages: 16384,
            max_jobs: 1024,
            pool: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Read,
    Write,
    Zero,
    Alloc,
    Free,
}

impl JobKind {
    fn mutates(self) -> bool {
        !matches!(self, JobKind::Read)
    }
}

#[derive(Debug)]
enum JobReply {
    Buf(Reply<AlignedBuf>),
    Unit(Reply<()>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Finding (or allocating) the chunk.
    Locate,
    /// Taking the range lock.
    Lock,
    /// Loading checksum pages.
    Pages,
    /// Making dirty bits durable.
    Dirty,
    /// Ready to submit.
    Submit,
    /// I/O in flight.
    InFlight,
    /// Zeroed; fsync in flight.
    ZeroSync,
    /// Free: waiting for the table commit.
    FreeCommit,
    /// Waiting for a group fsync before replying.
    GroupSync,
}

#[derive(Debug)]
struct Job {
    id: u64,
    kind: JobKind,
    volume: VolumeId,
    chunk: ChunkIndex,
    offset: u64,
    len: u64,
    fence: Option<Holder>,
    data: Option<AlignedBuf>,
    reply: Option<JobReply>,
    slot: Option<u64>,
    stage: Stage,
    locked: bool,
    pinned: bool,
    counted: bool,
    regions_held: bool,
    entries: Vec<CrcEntry>,
    started_ns: u64,
    /// A write acknowledged before it is durable (see [`DevRequest::Write`]).
    cached: bool,
    /// A free's chunk-table entry before it: put back if the free cannot be made durable.
    undo: Option<ChunkEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Ready(u64),
    Allocating(u64),
}

#[derive(Debug)]
struct Alloc {
    volume: VolumeId,
    chunk: ChunkIndex,
    ops_left: u32,
    failed: Option<String>,
    waiters: Vec<u64>,
    committing: bool,
}

#[derive(Debug)]
struct CrcPage {
    entries: Vec<CrcEntry>,
    loaded: bool,
    pins: u32,
    last_use: u64,
    waiters: Vec<u64>,
}

/// Whether a region's checksums can be written back (see `DeviceCore::clean_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cleanable {
    Now,
    AfterSync,
    No,
}

#[derive(Debug, Default)]
struct Region {
    flushing: bool,
    changed: bool,
    writes_in_flight: u32,
    last_write_ns: u64,
    /// The fsync sequence number that makes its cached writes durable: its checksums may not be
    /// written back before (they would describe data a power cut can still take away).
    needs_sync: u64,
    /// A write or zero in it failed: some of its blocks hold what nobody knows. Its checksums
    /// are never written back (reads of those blocks fail their checksum, and a head node
    /// reads another replica), so it stays durably dirty and a restart recomputes it.
    failed: bool,
}

#[derive(Debug)]
struct PendingClaim {
    holder: Holder,
    waiters: Vec<Once<Holder>>,
    writing: bool,
}

#[derive(Debug, Default)]
struct FenceRecord {
    slot: Option<u64>,
    durable: Option<Holder>,
    pending: Option<PendingClaim>,
}

#[derive(Debug)]
struct RangeLock {
    job: u64,
    first: u64,
    last: u64,
    write: bool,
}

#[derive(Debug, Clone, Copy)]
struct RangeWait {
    slot: u64,
    first: u64,
    last: u64,
    write: bool,
}

#[derive(Debug, Clone, Copy)]
enum OpCtx {
    Data(u64),
    ZeroData(u64),
    ZeroFsync(u64),
    AllocZero(u64),
    AllocFsync(u64),
    PageLoad(u64, u64),
    Meta,
    CrcFlush(u64, u64),
    GroupFsync,
    FreeDiscard(u64),
}

/// A device's state machine over an engine.
#[derive(Debug)]
pub struct DeviceCore<E: IoEngine> {
    engine: E,
    sb: Superblock,
    geo: Geometry,
    path: String,
    clock: SharedClock,
    cfg: CoreConfig,
    metrics: DeviceMetrics,

    tables: Tables,
    durable_bits: Vec<[u8; 64]>,
    owners: HashMap<(VolumeId, ChunkIndex), SlotState>,
    free: BTreeSet<u64>,
    allocs: HashMap<u64, Alloc>,
    fences: HashMap<VolumeId, FenceRecord>,
    free_fence_slots: BTreeSet<u64>,
    mutations: HashMap<VolumeId, u32>,
    slot_flushing: HashMap<u64, u32>,
    /// Slots whose free is being committed: no checksum write-back starts for them (the free
    /// may still fail and be undone, so their regions and pages are kept until it commits).
    freeing: BTreeSet<u64>,

    pages: HashMap<(u64, u64), CrcPage>,
    regions: BTreeMap<(u64, u64), Region>,

    lane: MetaLane,
    jobs: HashMap<u64, Job>,
    next_job: u64,
    locks: HashMap<u64, Vec<RangeLock>>,
    range_waiters: BTreeMap<u64, RangeWait>,
    ops: HashMap<u64, OpCtx>,
    next_tag: u64,
    backlog: VecDeque<Op>,
    group_waiting: Vec<u64>,
    group_inflight: Option<Vec<u64>>,
    /// Flushes waiting for the next group fsync, and those the one in flight answers.
    flushes_waiting: Vec<Reply<()>>,
    flushes_inflight: Vec<Reply<()>>,
    /// A cached write completed after the last fsync was submitted.
    cached_unsynced: bool,
    /// Why an fsync failed, if one did. Sticky until the device is opened again: what that
    /// fsync covered may be lost, and a later fsync that succeeds does not bring it back (the
    /// kernel reports such an error once), so no flush may be answered as durable any more.
    fsync_failed: Option<String>,
    /// Group fsyncs submitted so far (the sequence number of the latest), and the latest that
    /// succeeded (they run one at a time, so in order).
    sync_submitted: u64,
    sync_done: u64,
    /// A group fsync is wanted even with nobody waiting on it (regions to clean).
    sync_wanted: bool,
    ready: VecDeque<u64>,
    completions: Vec<Completion>,
    /// Completions collected from the engine and not processed yet ([`DeviceCore::poll_some`]).
    pending: VecDeque<Completion>,
    use_counter: u64,
    last_tick_ns: u64,
    /// Connections with replies pushed since the last [`DeviceCore::deliver`].
    wakes: Wakes,
}

fn blocks(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / BLOCK,
        (offset + len).div_ceil(BLOCK).saturating_sub(1),
    )
}

fn regions_of(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    (offset / REGION_BYTES)..=((offset + len - 1) / REGION_BYTES)
}

impl<E: IoEngine> DeviceCore<E> {
    /// Opens a formatted device (recovering checksums of regions left dirty by a crash) and
    /// builds its state machine. Returns it with the number of regions recovered.
    pub fn open(
        mut engine: E,
        path: &str,
        expect_sled: Option<common::ids::SledId>,
        clock: SharedClock,
        cfg: CoreConfig,
        metrics: DeviceMetrics,
    ) -> Result<(Self, u64), super::open::OpenError> {
        let opened = super::open::open(&mut engine, path, expect_sled)?;
        let recovered = opened.recovered_regions;
        for &copy in &opened.repaired_superblock {
            tracing::warn!(
                device = path,
                copy = if copy == 0 { "A" } else { "B" },
                "a superblock copy was damaged; rewrote it from the valid copy"
            );
        }
        if opened.repaired_pages > 0 {
            tracing::warn!(
                device = path,
                pages = opened.repaired_pages,
                "table pages had one copy damaged (a torn write or a bad sector); rewrote them from the valid copy"
            );
        }
        if recovered > 0 {
            tracing::warn!(
                device = path,
                regions = recovered,
                "recomputed block checksums of regions left dirty by an unclean shutdown"
            );
        }
        Ok((
            Self::new(engine, opened, path.to_string(), clock, cfg, metrics),
            recovered,
        ))
    }

    fn new(
        engine: E,
        opened: Opened,
        path: String,
        clock: SharedClock,
        cfg: CoreConfig,
        metrics: DeviceMetrics,
    ) -> Self {
        let Opened { sb, tables, .. } = opened;
        let geo = sb.geometry;
        let mut owners = HashMap::new();
        let mut free = BTreeSet::new();
        for (slot, e) in tables.chunks.iter().enumerate() {
            if e.allocated {
                owners.insert((e.volume, e.chunk), SlotState::Ready(slot as u64));
            } else {
                free.insert(slot as u64);
            }
        }
        let mut fences = HashMap::new();
        let mut free_fence_slots = BTreeSet::new();
        for (slot, f) in tables.fences.iter().enumerate() {
            match f {
                Some(f) => {
                    fences.insert(
                        f.volume,
                        FenceRecord {
                            slot: Some(slot as u64),
                            durable: Some(Holder {
                                epoch: f.epoch,
                                node: f.holder,
                            }),
                            pending: None,
                        },
                    );
                }
                None => {
                    free_fence_slots.insert(slot as u64);
                }
            }
        }
        let durable_bits = tables.chunks.iter().map(|e| e.dirty).collect();
        let core = Self {
            engine,
            sb,
            geo,
            path,
            clock,
            cfg,
            metrics,
            tables,
            durable_bits,
            owners,
            free,
            allocs: HashMap::new(),
            fences,
            free_fence_slots,
            mutations: HashMap::new(),
            slot_flushing: HashMap::new(),
            freeing: BTreeSet::new(),
            pages: HashMap::new(),
            regions: BTreeMap::new(),
            lane: MetaLane::default(),
            jobs: HashMap::new(),
            next_job: 1,
            locks: HashMap::new(),
            range_waiters: BTreeMap::new(),
            ops: HashMap::new(),
            next_tag: 1,
            backlog: VecDeque::new(),
            group_waiting: Vec::new(),
            group_inflight: None,
            flushes_waiting: Vec::new(),
            flushes_inflight: Vec::new(),
            cached_unsynced: false,
            fsync_failed: None,
            sync_submitted: 0,
            sync_done: 0,
            sync_wanted: false,
            ready: VecDeque::new(),
            completions: Vec::new(),
            pending: VecDeque::new(),
            use_counter: 0,
            last_tick_ns: 0,
            wakes: Wakes::default(),
        };
        core.update_gauges();
        core
    }

    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// True when another request may be accepted.
    pub fn can_accept(&self) -> bool {
        self.jobs.len() < self.cfg.max_jobs
    }

    /// True when nothing is in flight or waiting.
    pub fn idle(&self) -> bool {
        self.jobs.is_empty()
            && self.ops.is_empty()
            && self.lane.idle()
            && self.allocs.is_empty()
            && self.fences.values().all(|f| f.pending.is_none())
    }

    fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    // ----------------------------------------------------------------------------- requests

    /// Accepts a request.
    pub fn accept(&mut self, req: DevRequest) {
        let now = self.now();
        let mut cached = false;
        let (kind, volume, chunk, offset, len, fence, data, reply) = match req {
            DevRequest::Read {
                volume,
                chunk,
                offset,
                len,
                reply,
            } => (
                JobKind::Read,
                volume,
                chunk,
                offset,
                u64::from(len),
                None,
                None,
                JobReply::Buf(reply),
            ),
            DevRequest::Write {
                fence,
                volume,
                chunk,
                offset,
                data,
                cached: c,
                reply,
            } => {
                cached = c;
                let len = data.len() as u64;
                (
                    JobKind::Write,
                    volume,
                    chunk,
                    offset,
                    len,
                    Some(fence),
                    Some(data),
                    JobReply::Unit(reply),
                )
            }
            DevRequest::Zero {
                fence,
                volume,
                chunk,
                offset,
                len,
                reply,
            } => (
                JobKind::Zero,
                volume,
                chunk,
                offset,
                len,
                Some(fence),
                None,
                JobReply::Unit(reply),
            ),
            DevRequest::Allocate {
                fence,
                volume,
                chunk,
                reply,
            } => (
                JobKind::Alloc,
                volume,
                chunk,
                0,
                0,
                Some(fence),
                None,
                JobReply::Unit(reply),
            ),
            DevRequest::Free {
                fence,
                volume,
                chunk,
                reply,
            } => (
                JobKind::Free,
                volume,
                chunk,
                0,
                self.geo.chunk_size,
                Some(fence),
                None,
                JobReply::Unit(reply),
            ),
            DevRequest::Claim {
                volume,
                fence,
                reply,
            } => {
                self.claim(volume, fence, reply);
                return;
            }
            DevRequest::Retire {
                volume,
                fence,
                reply,
            } => {
                self.retire(volume, fence, reply);
                return;
            }
            DevRequest::Status { reply } => {
                let _ = reply.send(self.status());
                return;
            }
            DevRequest::Flush { reply } => {
                self.flush(reply);
                return;
            }
        };
        let id = self.next_job;
        self.next_job += 1;
        let job = Job {
            id,
            kind,
            volume,
            chunk,
            offset,
            len,
            fence,
            data,
            reply: Some(reply),
            slot: None,
            stage: Stage::Locate,
            locked: false,
            pinned: false,
            counted: false,
            regions_held: false,
            entries: Vec::new(),
            started_ns: now,
            cached,
            undo: None,
        };
        if let Err(e) = self.validate(&job) {
            self.finish(job, Err(e));
            return;
        }
        self.jobs.insert(id, job);
        self.metrics.queue_depth.set(self.jobs.len() as i64);
        self.step(id);
        self.run_ready();
    }

    fn validate(&self, job: &Job) -> Result<(), DevError> {
        if matches!(job.kind, JobKind::Alloc | JobKind::Free) {
            return Ok(());
        }
        if job.len == 0 || !job.offset.is_multiple_of(BLOCK) || !job.len.is_multiple_of(BLOCK) {
            return Err(DevError::Unaligned {
                offset: job.offset,
                len: job.len,
            });
        }
        if job
            .offset
            .checked_add(job.len)
            .is_none_or(|end| end > self.geo.chunk_size)
        {
            return Err(DevError::OutOfRange {
                offset: job.offset,
                len: job.len,
                chunk_size: self.geo.chunk_size,
            });
        }
        Ok(())
    }

    /// The fence decision for a mutation by `h`.
    fn check_fence(&self, volume: VolumeId, h: Holder) -> Result<(), DevError> {
        let rec = self.fences.get(&volume);
        let durable = rec.and_then(|r| r.durable);
        let pending = rec.and_then(|r| r.pending.as_ref().map(|p| p.holder));
        let effective = match (durable, pending) {
            (_, Some(p)) => Some(p),
            (d, None) => d,
        };
        match effective {
            None => Err(DevError::NotClaimed {
                wanted: h,
                current: None,
            }),
            Some(e) if h.epoch < e.epoch || (h.epoch == e.epoch && h.node != e.node) => {
                Err(DevError::Fenced { current: e })
            }
            Some(e) if h.epoch > e.epoch || Some(e) != durable => Err(DevError::NotClaimed {
                wanted: h,
                current: durable,
            }),
            Some(_) => Ok(()),
        }
    }

    fn fence_refused(&self, volume: VolumeId, h: Holder, e: &DevError) {
        if let DevError::Fenced { current } = e {
            self.metrics.fenced.inc();
            if let Some(n) = self.metrics.fence_log.check(self.now()) {
                tracing::warn!(
                    volume_id = %volume,
                    epoch = h.epoch.0,
                    node_id = h.node.0,
                    stored_epoch = current.epoch.0,
                    stored_holder = current.node.0,
                    suppressed = n,
                    device = %self.path,
                    "refused a fenced mutation"
                );
            }
        }
    }

    // ----------------------------------------------------------------------------- job steps

    fn run_ready(&mut self) {
        loop {
            while let Some(id) = self.ready.pop_front() {
                self.step(id);
            }
            self.pump_lane();
            if self.ready.is_empty() {
                break;
            }
        }
        self.drain_backlog();
    }

    /// Advances a job as far as it can go.
    fn step(&mut self, id: u64) {
        let Some(mut job) = self.jobs.remove(&id) else {
            return;
        };
        loop {
            let next = match job.stage {
                Stage::Locate => self.step_locate(id, &mut job),
                Stage::Lock => self.step_lock(id, &mut job),
                Stage::Pages => self.step_pages(id, &mut job),
                Stage::Dirty => self.step_dirty(id, &mut job),
                Stage::Submit => self.step_submit(id, &mut job),
                Stage::FreeCommit => self.step_free_committed(&mut job),
                Stage::InFlight | Stage::ZeroSync | Stage::GroupSync => Park::Wait,
            };
            match next {
                Park::Continue(stage) => job.stage = stage,
                Park::Wait => {
                    self.jobs.insert(id, job);
                    return;
                }
                Park::WaitAt(stage) => {
                    job.stage = stage;
                    self.jobs.insert(id, job);
                    return;
                }
                Park::Done(result) => {
                    self.finish(job, result);
                    return;
                }
            }
        }
    }

    fn step_locate(&mut self, id: u64, job: &mut Job) -> Park {
        match self.owners.get(&(job.volume, job.chunk)).copied() {
            Some(SlotState::Ready(slot)) => {
                job.slot = Some(slot);
                if job.kind == JobKind::Alloc {
                    // Held already: nothing to do, but a deposed holder is told so, as for
                    // every other mutation.
                    let fence = job.fence.expect("mutations carry a fence");
                    if let Err(e) = self.check_fence(job.volume, fence) {
                        self.fence_refused(job.volume, fence, &e);
                        return Park::Done(Err(e));
                    }
                    return Park::Done(Ok(None));
                }
                Park::Continue(Stage::Lock)
            }
            Some(SlotState::Allocating(slot)) => {
                if let Some(a) = self.allocs.get_mut(&slot) {
                    a.waiters.push(id);
                }
                Park::Wait
            }
            None => match job.kind {
                JobKind::Read => Park::Done(Ok(Some(AlignedBuf::zeroed(job.len as usize)))),
                JobKind::Zero | JobKind::Free => {
                    // Nothing allocated reads as zeros already; still fenced.
                    let fence = job.fence.expect("mutations carry a fence");
                    match self.check_fence(job.volume, fence) {
                        Ok(()) => Park::Done(Ok(None)),
                        Err(e) => {
                            self.fence_refused(job.volume, fence, &e);
                            Park::Done(Err(e))
                        }
                    }
                }
                JobKind::Write | JobKind::Alloc => {
                    let fence = job.fence.expect("mutations carry a fence");
                    if let Err(e) = self.check_fence(job.volume, fence) {
                        self.fence_refused(job.volume, fence, &e);
                        return Park::Done(Err(e));
                    }
                    match self.start_alloc(job.volume, job.chunk) {
                        Ok(slot) => {
                            if let Some(a) = self.allocs.get_mut(&slot) {
                                a.waiters.push(id);
                            }
                            // The allocation is a mutation of the volume: a higher claim waits
                            // for it, so no chunk of an older epoch appears after the claim
                            // was acknowledged. Counted once per job: a job that lost its chunk
                            // to a free and allocates again is still one mutation.
                            if !job.counted {
                                *self.mutations.entry(job.volume).or_default() += 1;
                                job.counted = true;
                            }
                            Park::Wait
                        }
                        Err(e) => Park::Done(Err(e)),
                    }
                }
            },
        }
    }

    fn step_lock(&mut self, id: u64, job: &mut Job) -> Park {
        let slot = job.slot.expect("located");
        // The slot was looked up before the job queued for its range: a free that went first
        // may have given it up (and it may be someone else's by now). Look it up again.
        if self.owners.get(&(job.volume, job.chunk)).copied() != Some(SlotState::Ready(slot)) {
            self.range_waiters.remove(&id);
            job.slot = None;
            return Park::Continue(Stage::Locate);
        }
        let (first, last) = if job.kind == JobKind::Free {
            (0, self.geo.chunk_size / BLOCK - 1)
        } else {
            blocks(job.offset, job.len)
        };
        let write = job.kind.mutates();
        let overlaps = |f: u64, l: u64, w: bool| f <= last && first <= l && (w || write);
        let locks = self.locks.entry(slot).or_default();
        let held = locks.iter().any(|l| overlaps(l.first, l.last, l.write));
        // First come, first served: an earlier request waiting for an overlapping range goes
        // first, so overlapping mutations reach the device in the order they arrived.
        let queued = self
            .range_waiters
            .range(..id)
            .any(|(_, w)| w.slot == slot && overlaps(w.first, w.last, w.write));
        let flushing =
            job.kind == JobKind::Free && self.slot_flushing.get(&slot).copied() > Some(0);
        if held || queued || flushing {
            self.range_waiters.insert(
                id,
                RangeWait {
                    slot,
                    first,
                    last,
                    write,
                },
            );
            return Park::Wait;
        }
        self.range_waiters.remove(&id);
        let locks = self.locks.entry(slot).or_default();
        locks.push(RangeLock {
            job: id,
            first,
            last,
            write,
        });
        job.locked = true;
        if job.kind == JobKind::Free {
            return self.start_free(id, job);
        }
        Park::Continue(Stage::Pages)
    }

    fn step_pages(&mut self, id: u64, job: &mut Job) -> Park {
        let slot = job.slot.expect("located");
        let mut waiting = false;
        for r in regions_of(job.offset, job.len) {
            self.use_counter += 1;
            let stamp = self.use_counter;
            match self.pages.get_mut(&(slot, r)) {
                Some(p) if p.loaded => p.last_use = stamp,
                Some(p) => {
                    if !p.waiters.contains(&id) {
                        p.waiters.push(id);
                    }
                    waiting = true;
                }
                None => {
                    self.pages.insert(
                        (slot, r),
                        CrcPage {
                            entries: Vec::new(),
                            loaded: false,
                            pins: 0,
                            last_use: stamp,
                            waiters: vec![id],
                        },
                    );
                    let pos = self.geo.crc_page_pos(slot, r);
                    self.submit(
                        OpCtx::PageLoad(slot, r),
                        OpKind::Read {
                            buf: AlignedBuf::zeroed(PAGE as usize),
                            offset: pos,
                        },
                    );
                    waiting = true;
                }
            }
        }
        if waiting {
            return Park::Wait;
        }
        if !job.pinned {
            for r in regions_of(job.offset, job.len) {
                if let Some(p) = self.pages.get_mut(&(slot, r)) {
                    p.pins += 1;
                }
            }
            job.pinned = true;
        }
        if job.kind.mutates() {
            Park::Continue(Stage::Dirty)
        } else {
            Park::Continue(Stage::Submit)
        }
    }

    fn step_dirty(&mut self, id: u64, job: &mut Job) -> Park {
        let slot = job.slot.expect("located");
        let mut all_durable = true;
        for r in regions_of(job.offset, job.len) {
            let entry = &mut self.tables.chunks[slot as usize];
            if !entry.is_dirty(r) {
                entry.set_dirty(r, true);
                self.lane.touch_chunk(slot);
                let now = self.clock.now_ns();
                self.regions.entry((slot, r)).or_default().last_write_ns = now;
            }
            if !self.bit_durable(slot, r) {
                all_durable = false;
            }
        }
        if all_durable {
            return Park::Continue(Stage::Submit);
        }
        self.lane.wait(Waiter::Job(id));
        Park::Wait
    }

    fn step_submit(&mut self, id: u64, job: &mut Job) -> Park {
        let slot = job.slot.expect("located");
        if let Some(fence) = job.fence {
            // The point of no return: checked in the same step that submits.
            if let Err(e) = self.check_fence(job.volume, fence) {
                self.fence_refused(job.volume, fence, &e);
                return Park::Done(Err(e));
            }
            if !job.counted {
                *self.mutations.entry(job.volume).or_default() += 1;
                job.counted = true;
            }
            for r in regions_of(job.offset, job.len) {
                self.regions.entry((slot, r)).or_default().writes_in_flight += 1;
            }
            job.regions_held = true;
        }
        let pos = self.geo.data_pos(slot, job.offset);
        match job.kind {
            JobKind::Read => {
                let (first, last) = blocks(job.offset, job.len);
                let any_written = (first..=last).any(|b| self.entry(slot, b).written);
                if !any_written {
                    return Park::Done(Ok(Some(AlignedBuf::zeroed(job.len as usize))));
                }
                let buf = BufPool::alloc_in(self.cfg.pool.as_ref(), job.len as usize);
                self.submit(OpCtx::Data(id), OpKind::Read { buf, offset: pos });
            }
            JobKind::Write => {
                let data = job.data.take().expect("write data");
                job.entries = data.chunks(BLOCK as usize).map(CrcEntry::of).collect();
                self.submit(
                    OpCtx::Data(id),
                    OpKind::Write {
                        buf: data,
                        offset: pos,
                        dsync: self.cfg.durability == Durability::Dsync && !job.cached,
                    },
                );
            }
            JobKind::Zero => {
                self.submit(
                    OpCtx::ZeroData(id),
                    OpKind::ZeroRange {
                        offset: pos,
                        len: job.len,
                    },
                );
            }
            JobKind::Alloc | JobKind::Free => unreachable!("never submitted as data"),
        }
        Park::Continue(Stage::InFlight)
    }

    /// Retries every job waiting for a range, oldest first (they stay registered until they get
    /// their lock, so younger ones still see them queued).
    fn wake_range_waiters(&mut self) {
        self.ready.extend(self.range_waiters.keys().copied());
    }

    fn entry(&self, slot: u64, block: u64) -> CrcEntry {
        let r = block / REGION_BLOCKS;
        self.pages
            .get(&(slot, r))
            .and_then(|p| p.entries.get((block % REGION_BLOCKS) as usize).copied())
            .unwrap_or_default()
    }

    fn set_entry(&mut self, slot: u64, block: u64, e: CrcEntry) {
        let r = block / REGION_BLOCKS;
        if let Some(p) = self.pages.get_mut(&(slot, r))
            && let Some(x) = p.entries.get_mut((block % REGION_BLOCKS) as usize)
        {
            *x = e;
        }
    }

    /// Ends a job: releases what it holds and replies.
    fn finish(&mut self, mut job: Job, result: Result<Option<AlignedBuf>, DevError>) {
        if let Some(slot) = job.slot {
            if job.locked {
                if let Some(l) = self.locks.get_mut(&slot) {
                    l.retain(|x| x.job != job.id);
                    if l.is_empty() {
                        self.locks.remove(&slot);
                    }
                }
                job.locked = false;
                self.wake_range_waiters();
            }
            if job.regions_held {
                self.regions_write_done(slot, job.offset, job.len);
                job.regions_held = false;
            }
            if job.pinned {
                for r in regions_of(job.offset, job.len.max(1)) {
                    if let Some(p) = self.pages.get_mut(&(slot, r)) {
                        p.pins = p.pins.saturating_sub(1);
                    }
                }
            }
        }
        if job.counted {
            if let Some(n) = self.mutations.get_mut(&job.volume) {
                *n -= 1;
                if *n == 0 {
                    self.mutations.remove(&job.volume);
                }
            }
            self.try_finish_claim(job.volume);
        }
        let elapsed = self.now().saturating_sub(job.started_ns) as f64 / 1e9;
        let op = match job.kind {
            JobKind::Read => "read",
            JobKind::Write => "write",
            JobKind::Zero => "zero",
            JobKind::Alloc => "allocate",
            JobKind::Free => "free",
        };
        self.metrics.observe(op, job.len, elapsed, result.is_ok());
        match job.reply.take() {
            Some(JobReply::Buf(r)) => r.send_batched(
                result.map(|b| b.unwrap_or_else(AlignedBuf::empty)),
                &mut self.wakes,
            ),
            Some(JobReply::Unit(r)) => r.send_batched(result.map(|_| ()), &mut self.wakes),
            None => {}
        }
        self.metrics.queue_depth.set(self.jobs.len() as i64);
    }

    // ----------------------------------------------------------------------------- I/O

    fn submit(&mut self, ctx: OpCtx, kind: OpKind) {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.ops.insert(tag, ctx);
        let op = Op { tag, kind };
        if !self.backlog.is_empty() {
            self.backlog.push_back(op);
            return;
        }
        if let Err(op) = self.engine.submit(op) {
            self.metrics.backpressure.inc();
            self.backlog.push_back(op);
        }
    }

    fn drain_backlog(&mut self) {
        while let Some(op) = self.backlog.pop_front() {
            if let Err(op) = self.engine.submit(op) {
                self.backlog.push_front(op);
                break;
            }
        }
    }

    /// Wakes every connection that replies were pushed to since the last call: once each, however
    /// many replies it got. The owning thread calls this before it sleeps.
    pub fn deliver(&mut self) {
        self.wakes.wake_all();
    }

    /// Pushes I/O to the device and processes what completed. With `wait`, blocks up to that
    /// long for a completion or the doorbell.
    /// Replies made since the last poll are delivered first (before it may block), and those made
    /// by the completions it processes right after them.
    pub fn poll(&mut self, wait: Option<Duration>, doorbell: &Doorbell) -> std::io::Result<()> {
        self.deliver();
        self.drain_backlog();
        let mut done = std::mem::take(&mut self.completions);
        let wait = wait.filter(|_| self.ready.is_empty());
        let polled = self.engine.poll(wait, doorbell, &mut done);
        for c in done.drain(..) {
            self.complete(c);
        }
        self.completions = done;
        self.run_ready();
        self.deliver();
        polled
    }

    /// Pushes I/O to the device, collects what completed without waiting, and processes at most
    /// `limit` completions, delivering their replies; the rest wait for the next call. Returns
    /// whether completions are left over. A driver that lets connections run between calls gets
    /// the first replies of a burst onto the wire while the device thread works through the rest.
    pub fn poll_some(&mut self, limit: usize, doorbell: &Doorbell) -> std::io::Result<bool> {
        self.deliver();
        self.drain_backlog();
        let mut done = std::mem::take(&mut self.completions);
        let polled = self.engine.poll(None, doorbell, &mut done);
        self.pending.extend(done.drain(..));
        self.completions = done;
        for _ in 0..limit.max(1) {
            let Some(c) = self.pending.pop_front() else {
                break;
            };
            self.complete(c);
        }
        self.run_ready();
        self.deliver();
        polled.map(|()| !self.pending.is_empty())
    }

    fn complete(&mut self, c: Completion) {
        let Some(ctx) = self.ops.remove(&c.tag) else {
            tracing::error!(tag = c.tag, "completion for an unknown operation");
            return;
        };
        match ctx {
            OpCtx::Data(id) => self.data_done(id, c),
            OpCtx::ZeroData(id) => match c.result {
                Ok(_) => {
                    if let Some(job) = self.jobs.get_mut(&id) {
                        job.stage = Stage::ZeroSync;
                    }
                    self.submit(OpCtx::ZeroFsync(id), OpKind::Fsync);
                }
                Err(e) => self.io_failed(id, e),
            },
            OpCtx::ZeroFsync(id) => match c.result {
                Ok(_) => self.zero_done(id),
                Err(e) => self.io_failed(id, e),
            },
            OpCtx::AllocZero(slot) => {
                let mut next = false;
                if let Some(a) = self.allocs.get_mut(&slot) {
                    if let Err(e) = &c.result {
                        a.failed.get_or_insert(e.to_string());
                    }
                    a.ops_left -= 1;
                    next = a.ops_left == 0;
                }
                if next {
                    match self.allocs.get(&slot).and_then(|a| a.failed.clone()) {
                        Some(why) => self.alloc_failed(slot, why),
                        None => self.submit(OpCtx::AllocFsync(slot), OpKind::Fsync),
                    }
                }
            }
            OpCtx::AllocFsync(slot) => match c.result {
                Ok(_) => {
                    if let Some(a) = self.allocs.get_mut(&slot) {
                        a.committing = true;
                        let e = &mut self.tables.chunks[slot as usize];
                        *e = ChunkEntry {
                            allocated: true,
                            volume: a.volume,
                            chunk: a.chunk,
                            alloc_gen: e.alloc_gen + 1,
                            dirty: [0; 64],
                        };
                        self.lane.touch_chunk(slot);
                    }
                }
                Err(e) => self.alloc_failed(slot, e.to_string()),
            },
            OpCtx::PageLoad(slot, r) => self.page_loaded(slot, r, c),
            OpCtx::Meta => self.meta_done(c.result),
            OpCtx::CrcFlush(slot, r) => self.flush_done(slot, r, c.result),
            OpCtx::GroupFsync => {
                let ids = self.group_inflight.take().unwrap_or_default();
                match &c.result {
                    // The one in flight was the latest submitted.
                    Ok(_) => self.sync_done = self.sync_submitted,
                    Err(e) if self.fsync_failed.is_none() => {
                        tracing::error!(device = %self.path, error = %e,
                            "fsync failed: writes it covered may be lost; flushes fail until the \
                             device is opened again (restart the sled)");
                        self.fsync_failed = Some(e.to_string());
                    }
                    Err(_) => {}
                }
                for r in std::mem::take(&mut self.flushes_inflight) {
                    let res = match &c.result {
                        Ok(_) => Ok(()),
                        Err(e) => Err(DevError::Io(e.to_string())),
                    };
                    r.send_batched(res, &mut self.wakes);
                }
                for id in ids {
                    if let Some(job) = self.jobs.remove(&id) {
                        let res = match &c.result {
                            Ok(_) => Ok(None),
                            Err(e) => {
                                // Whether its data reached the disk is unknown: its region's
                                // checksums must not be written back as if it had.
                                self.mark_failed(&job);
                                Err(DevError::Io(e.to_string()))
                            }
                        };
                        self.finish(job, res);
                    }
                }
                self.start_group_fsync();
            }
            OpCtx::FreeDiscard(slot) => {
                if let Err(e) = c.result {
                    tracing::warn!(device = %self.path, slot, error = %e, "discarding a freed chunk");
                }
                self.free.insert(slot);
                self.update_gauges();
            }
        }
    }

    fn io_failed(&mut self, id: u64, e: std::io::Error) {
        // A failed write or zero leaves its blocks' contents unknown; the region stays dirty, so
        // a restart recomputes their checksums from whatever is there.
        self.metrics.io_errors.inc();
        tracing::error!(device = %self.path, error = %e, "device I/O failed");
        if let Some(job) = self.jobs.remove(&id) {
            self.mark_failed(&job);
            self.finish(job, Err(DevError::Io(e.to_string())));
        }
    }

    /// Keeps the regions of a failed mutation dirty until the device is opened again.
    fn mark_failed(&mut self, job: &Job) {
        if let (true, Some(slot)) = (job.kind.mutates() && job.kind != JobKind::Free, job.slot) {
            for r in regions_of(job.offset, job.len.max(1)) {
                self.regions.entry((slot, r)).or_default().failed = true;
            }
        }
    }

    fn data_done(&mut self, id: u64, c: Completion) {
        let Some(mut job) = self.jobs.remove(&id) else {
            return;
        };
        let slot = job.slot.expect("located");
        if let Err(e) = c.result {
            self.metrics.io_errors.inc();
            tracing::error!(device = %self.path, error = %e, "device I/O failed");
            self.mark_failed(&job);
            self.finish(job, Err(DevError::Io(e.to_string())));
            return;
        }
        match job.kind {
            JobKind::Read => {
                let Some(mut buf) = c.buf else {
                    self.finish(job, Err(DevError::Io("engine lost a buffer".into())));
                    return;
                };
                let first = job.offset / BLOCK;
                for (i, block) in buf.chunks_mut(BLOCK as usize).enumerate() {
                    let e = self.entry(slot, first + i as u64);
                    if !e.written {
                        block.fill(0);
                    } else if !e.matches(block) {
                        self.metrics.checksum_errors.inc();
                        let offset = (first + i as u64) * BLOCK;
                        tracing::error!(volume_id = %job.volume, chunk = job.chunk.0, offset,
                            device = %self.path, "stored block fails its checksum");
                        self.finish(job, Err(DevError::Checksum { offset }));
                        return;
                    }
                }
                self.finish(job, Ok(Some(buf)));
            }
            JobKind::Write => {
                let first = job.offset / BLOCK;
                for (i, e) in std::mem::take(&mut job.entries).into_iter().enumerate() {
                    self.set_entry(slot, first + i as u64, e);
                }
                if job.cached {
                    // Durable at the next fsync: one that starts from now on covers it.
                    self.cached_unsynced = true;
                    let needs = self.sync_submitted + 1;
                    for r in regions_of(job.offset, job.len) {
                        let reg = self.regions.entry((slot, r)).or_default();
                        reg.needs_sync = reg.needs_sync.max(needs);
                    }
                    self.finish(job, Ok(None));
                } else if self.cfg.durability == Durability::BatchFsync {
                    job.stage = Stage::GroupSync;
                    self.jobs.insert(id, job);
                    self.group_waiting.push(id);
                    self.start_group_fsync();
                } else {
                    self.finish(job, Ok(None));
                }
            }
            _ => self.finish(job, Err(DevError::Io("unexpected data completion".into()))),
        }
    }

    fn zero_done(&mut self, id: u64) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        let slot = job.slot.expect("located");
        let (first, last) = blocks(job.offset, job.len);
        for b in first..=last {
            self.set_entry(slot, b, CrcEntry::default());
        }
        self.finish(job, Ok(None));
    }

    /// A mutation's I/O finished: its regions changed and are no longer being written.
    fn regions_write_done(&mut self, slot: u64, offset: u64, len: u64) {
        let now = self.now();
        for r in regions_of(offset, len) {
            let reg = self.regions.entry((slot, r)).or_default();
            reg.writes_in_flight = reg.writes_in_flight.saturating_sub(1);
            reg.changed = true;
            reg.last_write_ns = now;
        }
    }

    fn start_group_fsync(&mut self) {
        if let Some(why) = self.fsync_failed.clone() {
            if self.group_inflight.is_none() {
                let err = || {
                    DevError::Io(format!(
                        "an earlier fsync of this device failed ({why}); nothing is durable until the sled is restarted"
                    ))
                };
                for r in std::mem::take(&mut self.flushes_waiting) {
                    r.send_batched(Err(err()), &mut self.wakes);
                }
                for id in std::mem::take(&mut self.group_waiting) {
                    if let Some(job) = self.jobs.remove(&id) {
                        self.mark_failed(&job);
                        self.finish(job, Err(err()));
                    }
                }
                self.sync_wanted = false;
            }
            return;
        }
        if self.group_inflight.is_some()
            || (self.group_waiting.is_empty()
                && self.flushes_waiting.is_empty()
                && !self.sync_wanted)
        {
            return;
        }
        self.group_inflight = Some(std::mem::take(&mut self.group_waiting));
        self.flushes_inflight = std::mem::take(&mut self.flushes_waiting);
        // This fsync covers every cached write completed so far.
        self.cached_unsynced = false;
        self.sync_wanted = false;
        self.sync_submitted += 1;
        self.submit(OpCtx::GroupFsync, OpKind::Fsync);
    }

    /// A flush: answered when every cached write completed before it is durable. With none
    /// since the last fsync (and none in flight that might still be covering one), at once;
    /// otherwise by the next group fsync, which starts after the one in flight, so it covers
    /// everything completed before now.
    fn flush(&mut self, reply: Reply<()>) {
        if !self.cached_unsynced && self.group_inflight.is_none() && self.fsync_failed.is_none() {
            reply.send_batched(Ok(()), &mut self.wakes);
            return;
        }
        self.flushes_waiting.push(reply);
        self.start_group_fsync();
    }

    fn page_loaded(&mut self, slot: u64, r: u64, c: Completion) {
        let Some(p) = self.pages.get_mut(&(slot, r)) else {
            return;
        };
        let waiters = std::mem::take(&mut p.waiters);
        match (c.result, c.buf) {
            (Ok(_), Some(buf)) => {
                p.entries = buf
                    .chunks(CRC_ENTRY as usize)
                    .map(CrcEntry::decode)
                    .collect();
                p.loaded = true;
                self.ready.extend(waiters);
            }
            (res, _) => {
                self.pages.remove(&(slot, r));
                let why = match res {
                    Err(e) => e.to_string(),
                    Ok(_) => "engine lost a buffer".into(),
                };
                for id in waiters {
                    if let Some(job) = self.jobs.remove(&id) {
                        self.finish(job, Err(DevError::Io(why.clone())));
                    }
                }
            }
        }
    }

    // ----------------------------------------------------------------------------- status

    fn status(&self) -> DeviceStatus {
        DeviceStatus {
            device: self.sb.device,
            path: self.path.clone(),
            chunk_size: self.geo.chunk_size,
            chunks_total: self.geo.chunk_count,
            chunks: self
                .owners
                .iter()
                .filter_map(|(k, s)| matches!(s, SlotState::Ready(_)).then_some(*k))
                .collect(),
            fences: self
                .fences
                .iter()
                .filter_map(|(v, r)| r.durable.map(|h| (*v, h)))
                .collect(),
            dirty_regions: self.regions.len() as u64,
        }
    }

    fn update_gauges(&self) {
        let used = self.geo.chunk_count - self.free.len() as u64;
        self.metrics.chunks_used.set(used as i64);
        self.metrics.chunks_total.set(self.geo.chunk_count as i64);
        self.metrics
            .capacity_bytes
            .set((self.geo.chunk_count * self.geo.chunk_size) as i64);
        self.metrics.dirty_regions.set(self.regions.len() as i64);
    }

    /// Device offset of a volume's chunk, if allocated (tests inspect the raw image).
    #[cfg(test)]
    pub(crate) fn physical(&self, volume: VolumeId, chunk: ChunkIndex) -> Option<u64> {
        match self.owners.get(&(volume, chunk)) {
            Some(SlotState::Ready(slot)) => Some(self.geo.data_pos(*slot, 0)),
            _ => None,
        }
    }

    /// Whether I/O was queued in the engine after the last poll pushed it to the device.
    pub fn unsubmitted(&self) -> bool {
        self.engine.unsubmitted()
    }

    /// The engine's completion descriptor (see [`IoEngine::completion_fd`]).
    pub fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        self.engine.completion_fd()
    }

    /// How many operations the engine holds at once.
    pub fn engine_capacity(&self) -> usize {
        self.engine.capacity()
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.geo.chunk_size
    }
}

/// What a step decided.
enum Park {
    /// Go on with this stage now.
    Continue(Stage),
    /// Park at the current stage until something wakes the job.
    Wait,
    /// Park at this stage until something wakes the job.
    WaitAt(Stage),
    /// Finished.
    Done(Result<Option<AlignedBuf>, DevError>),
}
