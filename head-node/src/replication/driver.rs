//! The task that drives one group on one node: ticks, peer messages, proposals, reads, log
//! writes, leadership (claims) and the write-back of committed data to the sleds.
//!
//! One task owns the [`GroupCore`]; everything reaches it through a bounded channel and it
//! answers through oneshots and a status watch. While a `Ready`'s log write is in flight nothing
//! else is fed to the core — inputs wait in the channel and ride the next `Ready` together
//! (proposal batching) while the log merges the writes of many groups into one fsync (group
//! commit).
//!
//! **Leadership.** When the core reports [`Event::LeaderReady`] (an entry of the new term is
//! applied), the driver creates the volume if it has no description yet, claims every sled of
//! the volume with `epoch = term`, then re-flushes every committed entry above the flushed
//! index, and only then serves. A sled's `Fenced` answer to any flush steps the node down at
//! once.
//!
//! **Write-back.** The flusher takes committed data entries in log order, locks their block
//! range first-come-first-served (so overlapping entries land in log order on every replica),
//! and writes them to every replica, many at a time. The driver reports the contiguous flushed
//! prefix as a `FlushedUpTo` entry now and then; applying it drops the overlay and compacts the
//! log on every node. Committed-but-unflushed data is bounded: above the limit, proposals wait.

use super::GroupId;
use super::entry::EntryHeader;
use super::group::{Event, GroupConfig, GroupCore, GroupError, LogWrite, ReadyWork};
use super::memlog::RaftLog;
use super::overlay::Piece;
use super::transport::Transport;
use crate::control::state::ClusterState;
use crate::metrics::{HeadMetrics, VolumeMetrics};
use crate::sleds::SledPool;
use crate::volume::rangelock::RangeLock;
use crate::volume::session::ClientSession;
use crate::volume::store::{FlushFailure, SledStore, StoreError};
use crate::volume::{BLOCK, VolumeSpec};
use bytes::Bytes;
use common::ClusterKey;
use common::ids::{Epoch, NodeId, SledId};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use raft::prelude::{ConfChangeV2, Message};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use writeback::{FlushLimits, flusher};

mod create;
mod error;
mod place;
mod stale;
mod writeback;

pub use error::ReplError;
use error::group_error;

/// Timing and limits of a group driver.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Raft tick.
    pub tick: Duration,
    /// Raft timing and limits.
    pub group: GroupConfig,
    /// Committed data not yet on the sleds above which proposals wait.
    pub max_unflushed_bytes: u64,
    /// Flushes in flight at once.
    pub flush_window: usize,
    /// How often the flushed prefix is reported (as a `FlushedUpTo` entry).
    pub flush_report_interval: Duration,
    /// Input queue length.
    pub queue: usize,
    /// How long a write-back may keep failing on one sled before the leader records the sled
    /// stale for the volume (and writes go on without it).
    pub stale_after: Duration,
    /// Pause between two attempts to resynchronise a stale sled.
    pub resync_retry: Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(50),
            group: GroupConfig::default(),
            max_unflushed_bytes: 256 << 20,
            flush_window: 64,
            flush_report_interval: Duration::from_millis(50),
            queue: 4096,
            stale_after: Duration::from_secs(1),
            resync_retry: Duration::from_secs(1),
        }
    }
}

/// Completes once a log write is durable.
pub type Durable = BoxFuture<'static, Result<(), String>>;

/// Makes log writes durable (the node's write-ahead log, or nothing in tests).
pub trait Persist: Send + Sync + 'static {
    /// Queues `write` of `group`, returning once it is queued, with what completes once it is
    /// durable. Writes queued one after another become durable in that order.
    fn persist<'a>(
        &'a self,
        group: GroupId,
        write: &'a LogWrite,
    ) -> BoxFuture<'a, Result<Durable, String>>;
}

/// Persists nothing (the log is in memory): for tests.
#[derive(Debug, Default)]
pub struct NoPersist;

impl Persist for NoPersist {
    fn persist<'a>(
        &'a self,
        _: GroupId,
        _: &'a LogWrite,
    ) -> BoxFuture<'a, Result<Durable, String>> {
        Box::pin(async { Ok(Box::pin(async { Ok(()) }) as Durable) })
    }
}

/// `Ready`s a group keeps in flight at once, each waiting for its log write (if any) to be
/// durable. One at a time, every write waits for the one before it *and* the group's next
/// `Ready`; with several, entries proposed while a write is being made durable are queued
/// behind it at once (the log merges them into its next `fdatasync`), which takes the driver's
/// own turn out of each commit. `Ready`s with nothing to write count too (they must finish in
/// order), so the bound leaves room for heartbeats and ReadIndex rounds to go on during a slow
/// sync; it bounds raft-rs's record of unpersisted `Ready`s, not memory for entries (proposals
/// are bounded by `max_unflushed_bytes`).
pub(crate) const READIES_IN_FLIGHT: usize = 16;

/// A `Ready`'s log write on its way to disk.
type Persisting = BoxFuture<'static, (ReadyWork, Result<(), String>)>;

/// How to create the volume when the group has no description yet (until the control plane
/// assigns volumes).
#[derive(Debug, Clone)]
pub struct VolumeTemplate {
    /// Name.
    pub name: String,
    /// Size.
    pub size: u64,
    /// Replicas per chunk.
    pub replicas: usize,
}

/// What a group is for.
#[derive(Debug, Clone)]
pub enum GroupKind {
    /// The metadata group: serves as soon as it leads (no sleds), snapshots exactly.
    Meta,
    /// A volume's group (or a pool group waiting for its volume); `template` creates the
    /// volume when the group leads without one (volumes named in configuration, tests).
    Volume {
        /// How to create the volume.
        template: Option<VolumeTemplate>,
    },
}

/// What the group looks like from outside.
#[derive(Debug, Clone, Default)]
pub struct GroupStatus {
    /// Raft role (`Leader`, `Follower`, …) as text.
    pub role: &'static str,
    /// Term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<NodeId>,
    /// This node is the leader and serves I/O.
    pub serving: bool,
    /// Applied index.
    pub applied: u64,
    /// Committed index.
    pub committed: u64,
    /// Flushed index (replicated).
    pub flushed: u64,
    /// Committed data bytes not known to be on the sleds.
    pub unflushed_bytes: u64,
    /// The volume, once created (shared: the status is rebuilt after every batch of inputs).
    pub spec: Option<Arc<VolumeSpec>>,
    /// The sleds of the volume, as this node writes them.
    pub store: Option<Arc<SledStore>>,
    /// Set when the group failed.
    pub failed: Option<String>,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// On the leader: each member's matched log index.
    pub progress: Vec<(u64, u64)>,
    /// Last log index here.
    pub last_index: u64,
    /// The cluster state (metadata group).
    pub cluster: Option<Arc<ClusterState>>,
    /// The volume's QoS limits (replicated).
    pub qos: common::throttle::QosConfig,
    /// The volume's burst-credit balance as last replicated (`None`: never recorded).
    pub qos_state: Option<common::throttle::QosState>,
    /// This node rejoins the group after losing its Raft state and does not vote yet.
    pub rejoining: bool,
}

type ProposeReply = oneshot::Sender<Result<u64, ReplError>>;
type ReadReply = oneshot::Sender<Result<Vec<(u64, Piece)>, ReplError>>;
/// A read waiting for its ReadIndex round: offset, length, reply.
type PendingRead = (u64, u64, ReadReply);

enum Input {
    Raft(Message),
    Unreachable(u64),
    Propose {
        header: EntryHeader,
        data: Bytes,
        session: Option<ClientSession>,
        reply: ProposeReply,
    },
    Read {
        offset: u64,
        len: u64,
        reply: ReadReply,
    },
    FlushDone {
        term: u64,
        index: u64,
        /// The rewrite generation the job was queued in.
        generation: u64,
        result: Result<(), StoreError>,
    },
    /// Claims made; the sleds that could not be reached.
    Claimed {
        term: u64,
        result: Result<Vec<SledId>, StoreError>,
    },
    /// A write-back has kept failing on a sled for `stale_after`.
    SledDown {
        term: u64,
        sled: SledId,
    },
    /// A flush of the sleds' cached write-back, started to record `upto` flushed, ended; the
    /// sleds that failed it.
    SledsFlushed {
        term: u64,
        upto: u64,
        failed: Vec<(SledId, FlushFailure)>,
    },
    /// The store of this leadership was deposed by a sled (another node's newer claim), on
    /// any path: write-back, a claim, or an allocation on the NBD write path, which reports to
    /// nobody else.
    Deposed {
        term: u64,
        epoch: u64,
    },
    /// A resynchronisation of a stale sled ended.
    Resynced {
        term: u64,
        sled: SledId,
        result: Result<u64, StoreError>,
    },
    SpecReady {
        term: u64,
        spec: Result<VolumeSpec, String>,
    },
    Campaign,
    /// A metadata proposal on the leader, serving or not (binding a volume to a pool group).
    ProposeAsLeader {
        header: EntryHeader,
        reply: ProposeReply,
    },
    ConfChange {
        cc: ConfChangeV2,
        reply: ProposeReply,
    },
    /// A new placement of the volume's chunks (see `place`).
    Place {
        spec: VolumeSpec,
        reply: ProposeReply,
    },
}

/// A handle on a running group driver.
#[derive(Debug, Clone)]
pub struct GroupHandle {
    group: GroupId,
    tx: mpsc::Sender<Input>,
    status: watch::Receiver<GroupStatus>,
    /// KiB of proposal data queued at the driver or proposed and not yet applied. The driver
    /// takes proposals off its channel even while it holds them back (above the unflushed
    /// bound it must still read flush completions from the same channel), so this is what
    /// bounds the queue it holds them in: a proposer waits here for room.
    proposing: Arc<Semaphore>,
    proposing_kib: u32,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Input::Raft(_) => "Raft",
            Input::Unreachable(_) => "Unreachable",
            Input::Propose { .. } => "Propose",
            Input::Read { .. } => "Read",
            Input::FlushDone { .. } => "FlushDone",
            Input::Claimed { .. } => "Claimed",
            Input::SledDown { .. } => "SledDown",
            Input::Resynced { .. } => "Resynced",
            Input::Deposed { .. } => "Deposed",
            Input::SledsFlushed { .. } => "SledsFlushed",
            Input::SpecReady { .. } => "SpecReady",
            Input::Campaign => "Campaign",
            Input::ProposeAsLeader { .. } => "ProposeAsLeader",
            Input::Place { .. } => "Place",
            Input::ConfChange { .. } => "ConfChange",
        })
    }
}

impl GroupHandle {
    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The latest status.
    pub fn status(&self) -> GroupStatus {
        self.status.borrow().clone()
    }

    /// Looks at the latest status without copying it.
    pub fn peek<R>(&self, f: impl FnOnce(&GroupStatus) -> R) -> R {
        f(&self.status.borrow())
    }

    /// A receiver of the status, for a task that follows every change.
    pub fn watch(&self) -> watch::Receiver<GroupStatus> {
        self.status.clone()
    }

    /// Waits until the status changes after this call (or the group stops).
    pub async fn changed(&self) {
        let mut rx = self.status.clone();
        // A clone starts at the version this handle's own receiver last saw, and that one is
        // never updated (`status()` only borrows): without marking the current value seen,
        // `changed()` returns at once forever after the first change, and every caller's wait
        // becomes a busy loop (the reconcile loop spun a core on every head node).
        rx.borrow_and_update();
        let _ = rx.changed().await;
    }

    /// Hands a peer's Raft message to the group (dropped when the queue is full: Raft
    /// retransmits).
    pub fn deliver(&self, msg: Message) {
        let _ = self.tx.try_send(Input::Raft(msg));
    }

    /// Starts an election on this node.
    pub async fn campaign(&self) {
        let _ = self.tx.send(Input::Campaign).await;
    }

    /// Proposes an entry and waits until it is committed and applied here.
    pub async fn propose(&self, header: EntryHeader, data: Bytes) -> Result<u64, ReplError> {
        self.propose_for(header, data, None).await
    }

    /// Proposes an entry on behalf of a client `session` (refused once the client connected
    /// again: [`ReplError::SessionEnded`]) and waits until it is committed and applied here.
    pub async fn propose_for(
        &self,
        header: EntryHeader,
        data: Bytes,
        session: Option<ClientSession>,
    ) -> Result<u64, ReplError> {
        let kib = u32::try_from(data.len() / 1024 + 1)
            .unwrap_or(u32::MAX)
            .min(self.proposing_kib);
        let _room = self
            .proposing
            .acquire_many(kib)
            .await
            .map_err(|_| ReplError::Stopped)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Propose {
                header,
                data,
                session,
                reply,
            })
            .await
            .map_err(|_| ReplError::Stopped)?;
        rx.await.unwrap_or(Err(ReplError::Stopped))
    }

    /// Proposes a metadata entry on the leader even before it serves (giving a pool group its
    /// volume) and waits until it is applied here.
    pub async fn propose_as_leader(&self, header: EntryHeader) -> Result<u64, ReplError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::ProposeAsLeader { header, reply })
            .await
            .map_err(|_| ReplError::Stopped)?;
        rx.await.unwrap_or(Err(ReplError::Stopped))
    }

    /// Proposes a new placement of the volume's chunks (leader, serving): the same volume with
    /// chunks gaining or losing replicas. Sleds it adds are recorded stale first and
    /// resynchronised. Waits until it is applied here.
    pub async fn place(&self, spec: VolumeSpec) -> Result<u64, ReplError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Place { spec, reply })
            .await
            .map_err(|_| ReplError::Stopped)?;
        rx.await.unwrap_or(Err(ReplError::Stopped))
    }

    /// Proposes a membership change on the leader and waits until it is applied here. (The
    /// change may have been refused as an empty entry: check the membership.)
    pub async fn change_membership(&self, cc: ConfChangeV2) -> Result<u64, ReplError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::ConfChange { cc, reply })
            .await
            .map_err(|_| ReplError::Stopped)?;
        rx.await.unwrap_or(Err(ReplError::Stopped))
    }

    /// A linearizable read of the committed-unflushed data over `[offset, offset+len)`: pieces
    /// from the overlay, and `Piece::Sled` where the caller must read the sleds.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<(u64, Piece)>, ReplError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Read { offset, len, reply })
            .await
            .map_err(|_| ReplError::Stopped)?;
        rx.await.unwrap_or(Err(ReplError::Stopped))
    }
}

/// Sends Raft messages through the transport, telling raft about unreachable peers.
fn send_all<T: Transport>(
    transport: &T,
    group: GroupId,
    tx: &mpsc::Sender<Input>,
    msgs: Vec<Message>,
) {
    for m in msgs {
        let to = m.to;
        if let Err(e) = transport.send_raft(NodeId(to), group, m)
            && e.is_unreachable()
        {
            let _ = tx.try_send(Input::Unreachable(to));
        }
    }
}

/// What the driver needs to reach the sleds.
#[derive(Debug, Clone)]
pub struct SledAccess {
    /// The sleds.
    pub pool: Arc<SledPool>,
    /// The cluster key.
    pub key: ClusterKey,
    /// Metric families (each group labels them with its volume's name).
    pub metrics: HeadMetrics,
}

/// The write-back of one leadership. Dropping it stops the write-back: no new entries, and
/// each write in progress makes at most one more attempt (whose outcome is harmless either
/// way: committed data landing before a newer claim, or refused by one) before giving up.
struct Flusher {
    jobs: mpsc::UnboundedSender<FlushJob>,
    stopping: watch::Sender<bool>,
    /// The latest rewrite of the unflushed tail (shared with the write-back task).
    rewrite: Arc<std::sync::Mutex<Rewrite>>,
}

/// One committed entry to write back, queued in rewrite generation `generation`.
type FlushJob = (u64, EntryHeader, Bytes, u64);

/// The latest rewrite of the unflushed tail (a sled may have lost cached writes): every entry
/// above `from` was queued again in generation `generation`, so copies of an older generation
/// above `from` are stale — not written if still queued, and not counted if already written.
#[derive(Debug, Clone, Copy, Default)]
struct Rewrite {
    generation: u64,
    from: u64,
}

impl Rewrite {
    /// Whether a job of generation `generation` for entry `index` was superseded.
    fn superseded(&self, generation: u64, index: u64) -> bool {
        generation < self.generation && index > self.from
    }
}

impl Flusher {
    fn rewrite_state(&self) -> Rewrite {
        *self.rewrite.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn generation(&self) -> u64 {
        self.rewrite_state().generation
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stopping.send_replace(true);
    }
}

struct Driver<L: RaftLog, T: Transport> {
    core: GroupCore<L>,
    group: GroupId,
    node: NodeId,
    cfg: DriverConfig,
    rx: mpsc::Receiver<Input>,
    tx: mpsc::Sender<Input>,
    status: watch::Sender<GroupStatus>,
    /// The applied description as last published (see [`Driver::shared_spec`]).
    spec_shared: Option<Arc<VolumeSpec>>,
    transport: Arc<T>,
    persist: Arc<dyn Persist>,
    /// `Ready`s whose log writes are in flight, in order (at most [`READIES_IN_FLIGHT`]).
    persisting: FuturesOrdered<Persisting>,
    sleds: SledAccess,
    kind: GroupKind,
    vm: VolumeMetrics,
    vm_label: String,
    store: Option<Arc<SledStore>>,
    serving: Option<u64>,
    claiming: Option<u64>,
    /// The term whose [`Event::LeaderReady`] this node saw (an entry of it applied): nothing
    /// claims the sleds in a term before that, so the unflushed tail a claim queues for
    /// write-back holds every entry committed before the term.
    ready: Option<u64>,
    proposals: HashMap<u64, ProposeReply>,
    /// Data bytes of client writes proposed and not yet applied (or dropped), by tag: with the
    /// overlay, what counts against the unflushed-data bound.
    proposed: HashMap<u64, u64>,
    proposed_bytes: u64,
    /// Proposals held back above the unflushed bound; bounded by [`GroupHandle`]'s
    /// `proposing` budget.
    deferred: VecDeque<(EntryHeader, Bytes, Option<ClientSession>, ProposeReply)>,
    /// Reads waiting for the next ReadIndex round: they wait at most one round (write-back
    /// never holds them back), so this holds what arrives during one round trip.
    read_next: Vec<PendingRead>,
    read_inflight: Option<(u64, Option<u64>, Vec<PendingRead>)>,
    flusher: Option<Flusher>,
    flush_done: BTreeSet<u64>,
    flush_reported: u64,
    flush_due: bool,
    /// Highest index such that every data entry at or below it was written back (cached on the
    /// sleds, maybe not durable yet).
    flush_written: u64,
    /// The index a flush of the sleds in flight will let the group record as flushed.
    sleds_flushing: Option<u64>,
    /// Sleds failing those flushes, since when.
    flush_failing: HashMap<SledId, tokio::time::Instant>,
    /// Highest data entry known to be on the sleds in this leadership.
    flush_data_max: u64,
    next_tag: u64,
    failed: Option<String>,
    cluster: Option<Arc<ClusterState>>,
    /// Stale marks proposed in this leadership and not yet applied: sled → log index.
    stale_pending: BTreeMap<SledId, u64>,
    /// Current-again marks proposed and not yet applied: sled → log index.
    fresh_pending: BTreeMap<SledId, u64>,
    /// The stale sled being resynchronised.
    resyncing: Option<SledId>,
    /// The task resynchronising it, aborted when this leadership ends: the next leadership of
    /// this node must not find a pass of the old one still copying beside its own.
    resync_task: Option<tokio::task::AbortHandle>,
    /// The stale sled whose resynchronisation was started last: the next start takes the
    /// one after it, so a sled that stays away cannot keep the others from being resynced.
    resync_last: Option<SledId>,
    /// The placement proposed last and its log index (see `place`).
    placing: Option<(u64, Arc<VolumeSpec>)>,
    /// The task watching the serving store for a deposition, aborted when serving ends.
    deposed_watch: Option<tokio::task::AbortHandle>,
    /// No resynchronisation starts before this.
    resync_after: tokio::time::Instant,
}

/// The metrics label of a group: its volume's name, `_meta`, or a placeholder while in the
/// pool.
fn metrics_label(group: GroupId, kind: &GroupKind, spec: Option<&VolumeSpec>) -> String {
    match (kind, spec) {
        (GroupKind::Meta, _) => "_meta".to_string(),
        (_, Some(s)) => s.name.clone(),
        (GroupKind::Volume { template: Some(t) }, None) => t.name.clone(),
        (GroupKind::Volume { template: None }, None) => {
            format!("_pool-{}", &group.to_string()[..8])
        }
    }
}

/// Starts the driver of one group.
#[allow(clippy::too_many_arguments)]
pub fn spawn<L: RaftLog, T: Transport>(
    group: GroupId,
    node: NodeId,
    log: L,
    cfg: DriverConfig,
    transport: Arc<T>,
    persist: Arc<dyn Persist>,
    sleds: SledAccess,
    kind: GroupKind,
) -> Result<(GroupHandle, tokio::task::JoinHandle<()>), GroupError> {
    let seed = rand::random();
    let mut gcfg = cfg.group.clone();
    if matches!(kind, GroupKind::Meta) {
        gcfg.exact_snapshots = true;
    }
    let core = GroupCore::new(group, node, log, gcfg, seed)?;
    let vm_label = metrics_label(group, &kind, core.state.spec.as_ref());
    let vm = sleds.metrics.volume(&vm_label);
    let (tx, rx) = mpsc::channel(cfg.queue);
    let (status, status_rx) = watch::channel(GroupStatus::default());
    let mut d = Driver {
        core,
        group,
        node,
        cfg,
        rx,
        tx: tx.clone(),
        status,
        spec_shared: None,
        transport,
        persist,
        persisting: FuturesOrdered::new(),
        sleds,
        kind,
        vm,
        vm_label,
        store: None,
        serving: None,
        claiming: None,
        ready: None,
        proposals: HashMap::new(),
        proposed: HashMap::new(),
        proposed_bytes: 0,
        deferred: VecDeque::new(),
        read_next: Vec::new(),
        read_inflight: None,
        flusher: None,
        flush_done: BTreeSet::new(),
        flush_reported: 0,
        flush_due: false,
        flush_written: 0,
        sleds_flushing: None,
        flush_failing: HashMap::new(),
        flush_data_max: 0,
        next_tag: 1,
        failed: None,
        cluster: None,
        stale_pending: BTreeMap::new(),
        fresh_pending: BTreeMap::new(),
        resyncing: None,
        resync_last: None,
        placing: None,
        resync_task: None,
        deposed_watch: None,
        resync_after: tokio::time::Instant::now(),
    };
    d.sync_cluster();
    d.sync_store();
    d.publish();
    // Twice the unflushed bound: enough to keep the pipeline full while write-back drains.
    let proposing_kib =
        (2 * d.cfg.max_unflushed_bytes / 1024).clamp(1, u64::from(u32::MAX >> 4)) as u32;
    let task = tokio::spawn(async move { d.run().await });
    Ok((
        GroupHandle {
            group,
            tx,
            status: status_rx,
            proposing: Arc::new(Semaphore::new(proposing_kib as usize)),
            proposing_kib,
        },
        task,
    ))
}

impl<L: RaftLog, T: Transport> Driver<L, T> {
    async fn run(&mut self) {
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut report = tokio::time::interval(self.cfg.flush_report_interval);
        report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                input = self.rx.recv() => {
                    let Some(input) = input else { break };
                    self.handle(input);
                    // Drain what else is queued: it all rides the next Ready.
                    for _ in 0..1024 {
                        match self.rx.try_recv() {
                            Ok(i) => self.handle(i),
                            Err(_) => break,
                        }
                    }
                }
                Some((work, result)) = self.persisting.next(), if !self.persisting.is_empty() => {
                    self.write_durable(work, result);
                }
                _ = tick.tick() => self.core.tick(),
                _ = report.tick() => self.flush_due = true,
            }
            self.after_inputs();
            self.process_ready().await;
            self.after_ready();
            self.publish();
            if self.failed.is_some() {
                // A group that cannot apply its log stops; its status says why.
                break;
            }
        }
        self.flusher = None;
    }

    fn next_tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Raft(m) => {
                let _ = self.core.step(m);
            }
            Input::Unreachable(p) => self.core.report_unreachable(p),
            Input::Campaign => {
                let _ = self.core.campaign();
            }
            Input::ProposeAsLeader { header, reply } => {
                let tag = self.next_tag();
                match self.core.propose(tag, &header, Bytes::new()) {
                    Ok(_) => {
                        self.proposals.insert(tag, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(group_error(e)));
                    }
                }
            }
            Input::Place { spec, reply } => self.place(spec, reply),
            Input::ConfChange { cc, reply } => {
                let tag = self.next_tag();
                match self.core.propose_conf_change(tag, cc) {
                    Ok(_) => {
                        self.proposals.insert(tag, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(group_error(e)));
                    }
                }
            }
            Input::Propose {
                header,
                data,
                session,
                reply,
            } => {
                if self.serving.is_none() {
                    let _ = reply.send(Err(self.not_leader()));
                } else if let EntryHeader::ClientSession(_) = header {
                    // No data: it does not wait behind the unflushed bound (a client could not
                    // connect while the sleds are away). Overtaking the queue is safe: what
                    // waits there is checked against the session when it is proposed.
                    let tag = self.next_tag();
                    match self.core.propose(tag, &header, data) {
                        Ok(_) => drop(self.proposals.insert(tag, reply)),
                        Err(e) => drop(reply.send(Err(group_error(e)))),
                    }
                } else {
                    self.deferred.push_back((header, data, session, reply));
                }
            }
            Input::Read { offset, len, reply } => {
                if self.serving.is_none() {
                    let _ = reply.send(Err(self.not_leader()));
                } else {
                    self.read_next.push((offset, len, reply));
                }
            }
            Input::FlushDone {
                term,
                index,
                generation,
                result,
            } => {
                if self.serving != Some(term) {
                    return;
                }
                // A copy written before the latest rewrite of the tail: it may have landed on
                // a sled that lost it since; only the rewritten copy counts.
                if self
                    .flusher
                    .as_ref()
                    .is_some_and(|f| f.rewrite_state().superseded(generation, index))
                {
                    return;
                }
                match result {
                    Ok(()) => {
                        self.flush_done.insert(index);
                        self.flush_data_max = self.flush_data_max.max(index);
                    }
                    Err(StoreError::Deposed { epoch, .. }) => self.core.fenced(epoch.0),
                    Err(e) => {
                        // The flusher retries I/O errors itself; anything else is fatal here.
                        tracing::error!(group = %self.group, index, error = %e, "flush failed");
                    }
                }
            }
            Input::Claimed { term, result } => {
                if self.claiming != Some(term) {
                    return;
                }
                self.claiming = None;
                match result {
                    Ok(unreachable) if self.core.is_leader() && self.core.term() == term => {
                        self.start_serving(term);
                        for sled in unreachable {
                            self.mark_stale(sled, "unreachable when claiming");
                        }
                    }
                    Ok(_) => {}
                    Err(StoreError::Deposed { epoch, .. }) => self.core.fenced(epoch.0),
                    Err(e) => {
                        tracing::warn!(group = %self.group, term, error = %e,
                            "claiming the volume's sleds failed; retrying");
                        self.start_claim(term);
                    }
                }
            }
            Input::SledsFlushed { term, upto, failed } => self.sleds_flushed(term, upto, failed),
            Input::SledDown { term, sled } => {
                if self.serving == Some(term) {
                    self.mark_stale(sled, "write-back keeps failing");
                }
            }
            Input::Deposed { term, epoch } => {
                if self.serving == Some(term) {
                    self.core.fenced(epoch);
                }
            }
            Input::Resynced { term, sled, result } => {
                // A pass of an earlier leadership of this node ending now must not let a second
                // pass start beside the current one.
                if self.serving != Some(term) {
                    return;
                }
                if self.resyncing == Some(sled) {
                    self.resyncing = None;
                    self.resync_task = None;
                }
                let store = self.store.clone();
                match result {
                    // Not while a new placement is on its way: the pass was checked against
                    // the placement applied now, which may not give the sled what it will.
                    Ok(bytes)
                        if self.core.state.stale.contains(&sled)
                            && !self.placing_pending()
                            && store.as_ref().is_some_and(|s| s.resync_complete(sled)) =>
                    {
                        match self.propose_stale(sled, false) {
                            Ok(index) => {
                                tracing::info!(group = %self.group, sled_id = %sled, bytes,
                                    "stale sled resynchronised; recording it current");
                                self.fresh_pending.insert(sled, index);
                            }
                            Err(e) => {
                                tracing::warn!(group = %self.group, sled_id = %sled, error = %e,
                                    "cannot record a resynchronised sled current");
                                self.resync_after =
                                    tokio::time::Instant::now() + self.cfg.resync_retry;
                            }
                        }
                    }
                    Ok(_) => {
                        self.resync_after = tokio::time::Instant::now() + self.cfg.resync_retry;
                    }
                    Err(StoreError::Deposed { epoch, .. }) => self.core.fenced(epoch.0),
                    Err(e) => {
                        tracing::debug!(group = %self.group, sled_id = %sled, error = %e,
                            "stale sled not resynchronised yet; trying again later");
                        self.resync_after = tokio::time::Instant::now() + self.cfg.resync_retry;
                    }
                }
            }
            Input::SpecReady { term, spec } => {
                if !(self.core.is_leader() && self.core.term() == term) {
                    return;
                }
                match spec {
                    Ok(spec) => {
                        let tag = self.next_tag();
                        if let Err(e) =
                            self.core
                                .propose(tag, &EntryHeader::Spec(spec), Bytes::new())
                        {
                            tracing::warn!(group = %self.group, error = %e, "proposing the volume description");
                        }
                    }
                    Err(e) => {
                        tracing::error!(group = %self.group, error = %e, "cannot create the volume; retrying");
                        self.start_spec(term);
                    }
                }
            }
        }
    }

    fn not_leader(&self) -> ReplError {
        let leader = self.core.leader().filter(|l| *l != self.node);
        ReplError::NotLeader { leader }
    }

    /// Work that calls into the core, done only between readies.
    fn after_inputs(&mut self) {
        // Sleds the store found lacking chunks (a replaced device): record them stale, so their
        // resynchronisation copies what they lost.
        if self.serving.is_some()
            && let Some(store) = self.store.clone()
        {
            for (sled, chunks) in store.take_lacking() {
                tracing::debug!(group = %self.group, sled_id = %sled, chunks, "sled lacks chunks");
                self.mark_stale(sled, "it lacks chunks its fellow replicas hold");
            }
        }
        // Proposals, within the unflushed-data bound: what the overlay holds plus what is
        // proposed and not applied yet (it lands in the overlay when applied).
        while self.serving.is_some()
            && self
                .core
                .overlay
                .bytes()
                .saturating_add(self.proposed_bytes)
                < self.cfg.max_unflushed_bytes
            && let Some((header, data, session, reply)) = self.deferred.pop_front()
        {
            let tag = self.next_tag();
            // Charged as the overlay will charge it once applied (trims and write-zeroes too).
            let len = super::overlay::charge(data.len() as u64);
            match self.core.propose_for(tag, &header, data, session) {
                Ok(_) => {
                    self.proposals.insert(tag, reply);
                    self.proposed.insert(tag, len);
                    self.proposed_bytes += len;
                }
                Err(e) => {
                    if let GroupError::SessionEnded(s) = &e {
                        self.vm.session_ended_refusals.inc();
                        tracing::info!(group = %self.group, session = %s,
                            "refused a request its client gave up on");
                    }
                    let _ = reply.send(Err(group_error(e)));
                }
            }
        }
        // One ReadIndex round for every read that arrived since the last one.
        if self.read_inflight.is_none() && !self.read_next.is_empty() {
            let tag = self.next_tag();
            let batch = std::mem::take(&mut self.read_next);
            match self.core.read_index(tag) {
                Ok(()) => self.read_inflight = Some((tag, None, batch)),
                Err(_) => {
                    let e = self.not_leader();
                    for (_, _, r) in batch {
                        let _ = r.send(Err(e.clone()));
                    }
                }
            }
        }
        // Report the flushed prefix now and then (only when data reached the sleds: an idle
        // group proposes nothing).
        // Write-back is cached on the sleds: flush them first, then record it (`SledsFlushed`).
        if self.flush_due
            && self.sleds_flushing.is_none()
            && let (Some(term), Some(store)) = (self.serving, self.store.clone())
            && self.flush_data_max > self.flush_reported
        {
            self.flush_due = false;
            let f = self.flushed_prefix();
            if f > self.flush_reported {
                self.sleds_flushing = Some(f);
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let failed = store.flush().await;
                    let _ = tx
                        .send(Input::SledsFlushed {
                            term,
                            upto: f,
                            failed,
                        })
                        .await;
                });
            }
        }
    }

    /// Takes the core's `Ready`s, sends what may go at once and queues their log writes (up
    /// to [`READIES_IN_FLIGHT`]); [`Driver::write_durable`] finishes each.
    async fn process_ready(&mut self) {
        while self.failed.is_none()
            && self.persisting.len() < READIES_IN_FLIGHT
            && self.core.has_ready()
        {
            let Some(mut work) = self.core.ready() else {
                break;
            };
            send_all(
                &*self.transport,
                self.group,
                &self.tx,
                std::mem::take(&mut work.messages),
            );
            if !work.write.entries.is_empty() {
                self.vm
                    .ready_entries
                    .observe(work.write.entries.len() as f64);
            }
            self.handle_events();
            if self.failed.is_some() {
                // The core failed applying this `Ready` (its write may not be sound).
                return;
            }
            // Even a `Ready` with nothing to write waits its turn: raft-rs takes the
            // persistence of one as that of every earlier one.
            let durable = if work.write.is_empty() {
                Ok(Box::pin(async { Ok(()) }) as Durable)
            } else {
                self.persist.persist(self.group, &work.write).await
            };
            match durable {
                Ok(durable) => self
                    .persisting
                    .push_back(Box::pin(async move { (work, durable.await) })),
                Err(e) => self.log_write_failed(&e),
            }
        }
    }

    /// A `Ready`'s log write is durable (or failed).
    fn write_durable(&mut self, work: ReadyWork, result: Result<(), String>) {
        if self.failed.is_some() {
            return;
        }
        if let Err(e) = result {
            self.log_write_failed(&e);
            return;
        }
        match self.core.persisted(work) {
            Ok(msgs) => send_all(&*self.transport, self.group, &self.tx, msgs),
            Err(e) => {
                tracing::error!(group = %self.group, error = %e, "advancing raft failed");
                self.failed = Some(e.to_string());
                return;
            }
        }
        self.handle_events();
    }

    fn log_write_failed(&mut self, e: &str) {
        // A node that cannot write its log must not take part any more.
        tracing::error!(group = %self.group, error = %e, "log write failed; stopping the group");
        self.failed = Some(format!("log write failed: {e}"));
    }

    /// Reacts to the core's events (no calls into the core that feed it input).
    fn handle_events(&mut self) {
        let events = self.core.take_events();
        if events.is_empty() {
            return;
        }
        self.publish_progress();
        for ev in events {
            match ev {
                Event::Applied { tag, index } => {
                    self.unpropose(tag);
                    if let Some(r) = self.proposals.remove(&tag) {
                        let _ = r.send(Ok(index));
                    }
                }
                Event::Dropped { tag } => {
                    self.unpropose(tag);
                    if let Some(r) = self.proposals.remove(&tag) {
                        let _ = r.send(Err(self.not_leader()));
                    }
                    if self
                        .read_inflight
                        .as_ref()
                        .is_some_and(|(t, _, _)| *t == tag)
                    {
                        let (_, _, batch) = self.read_inflight.take().expect("checked");
                        let e = self.not_leader();
                        for (_, _, r) in batch {
                            let _ = r.send(Err(e.clone()));
                        }
                    }
                }
                Event::ReadReady { tag, index } => {
                    if let Some((t, idx, _)) = self.read_inflight.as_mut()
                        && *t == tag
                    {
                        *idx = Some(index);
                    }
                }
                Event::LeaderReady { term } if matches!(self.kind, GroupKind::Meta) => {
                    tracing::info!(group = %self.group, node_id = self.node.0, term, "metadata leader");
                    self.serving = Some(term);
                }
                Event::LeaderReady { term } => {
                    tracing::info!(group = %self.group, node_id = self.node.0, term, "leader; claiming the volume's sleds");
                    self.ready = Some(term);
                    if self.core.state.spec.is_none() {
                        self.start_spec(term);
                    } else {
                        self.start_claim(term);
                    }
                }
                Event::SteppedDown { term, leader } => {
                    if self.serving.is_some() || self.claiming.is_some() {
                        tracing::info!(group = %self.group, node_id = self.node.0, term,
                            leader = leader.map(|l| l.0), "stopped leading");
                    }
                    self.stop_serving();
                }
                Event::Committed { index } => {
                    if let Some(f) = &self.flusher
                        && let Some((_, e)) = self
                            .core
                            .overlay
                            .entries_after(index - 1)
                            .find(|(k, _)| *k == index)
                    {
                        let generation = f.generation();
                        let _ = f
                            .jobs
                            .send((index, e.header.clone(), e.data.clone(), generation));
                    }
                }
                Event::StateChanged | Event::SnapshotApplied { .. } => {
                    if matches!(ev, Event::SnapshotApplied { .. }) {
                        self.vm.snapshots.inc();
                    }
                    self.sync_cluster();
                    self.sync_store();
                    // A volume just created by this leader: claim it now (state applied before
                    // the leadership is ready is the previous terms' and waits for it).
                    if self.core.is_leader()
                        && self.ready == Some(self.core.term())
                        && self.serving.is_none()
                        && self.claiming.is_none()
                        && self.store.is_some()
                    {
                        let term = self.core.term();
                        self.start_claim(term);
                    }
                }
                Event::Flushed { index } => {
                    self.flush_done.retain(|k| *k > index);
                }
                Event::Fatal(e) => self.failed = Some(e),
            }
        }
    }

    /// After a ready: serve the reads whose index is applied.
    fn after_ready(&mut self) {
        let applied = self.core.applied();
        self.stale_pending.retain(|_, i| *i > applied);
        self.fresh_pending.retain(|_, i| *i > applied);
        self.maybe_resync();
        if let Some((_, Some(idx), _)) = &self.read_inflight
            && self.core.applied() >= *idx
        {
            let (_, _, batch) = self.read_inflight.take().expect("checked");
            for (offset, len, r) in batch {
                let _ = r.send(Ok(self.core.overlay.lookup(offset, len)));
            }
        }
        if self.failed.is_some() {
            let e = ReplError::Failed(self.failed.clone().unwrap_or_default());
            for (_, r) in self.proposals.drain() {
                let _ = r.send(Err(e.clone()));
            }
        }
        // Every proposal ends applied or dropped; with none left, nothing waits outside the
        // overlay (should one ever be lost, its bytes must not hold the bound shut for good).
        if self.proposals.is_empty() {
            self.proposed.clear();
            self.proposed_bytes = 0;
        }
    }

    fn sync_cluster(&mut self) {
        if let Some(c) = &self.core.state.cluster
            && self.cluster.as_deref() != Some(c)
        {
            self.cluster = Some(Arc::new(c.clone()));
        }
    }

    fn sync_store(&mut self) {
        let Some(spec) = self.core.state.spec.clone() else {
            return;
        };
        let label = metrics_label(self.group, &self.kind, Some(&spec));
        if label != self.vm_label {
            // A pool group bound to its volume: its series move to the volume's name.
            self.sleds.metrics.forget(&self.vm_label);
            self.vm = self.sleds.metrics.volume(&label);
            self.vm_label = label;
        }
        match &self.store {
            Some(s) => {
                if *s.spec() != spec {
                    s.set_spec(spec);
                }
            }
            None => {
                self.store = Some(Arc::new(SledStore::new(
                    spec,
                    self.sleds.pool.clone(),
                    self.sleds.key.clone(),
                    self.node,
                    Epoch(self.core.term()),
                    self.vm.clone(),
                )));
            }
        }
        if let Some(s) = &self.store {
            s.set_stale(&self.core.state.stale);
        }
    }

    fn start_spec(&mut self, term: u64) {
        let GroupKind::Volume { template: Some(t) } = self.kind.clone() else {
            tracing::debug!(group = %self.group, "leader of a group without a volume (a pool group); waiting for one");
            return;
        };
        let pool = self.sleds.pool.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let spec = create::create_spec(&pool, &t).await;
            let _ = tx.send(Input::SpecReady { term, spec }).await;
        });
    }

    fn start_claim(&mut self, term: u64) {
        let Some(store) = self.store.clone() else {
            return;
        };
        self.claiming = Some(term);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            store.set_epoch(Epoch(term));
            let result = store.open().await;
            let _ = tx.send(Input::Claimed { term, result }).await;
        });
    }

    fn start_serving(&mut self, term: u64) {
        let Some(store) = self.store.clone() else {
            return;
        };
        tracing::info!(group = %self.group, node_id = self.node.0, term,
            flushed = self.core.state.flushed, applied = self.core.applied(),
            unflushed_bytes = self.core.overlay.bytes(), "serving the volume");
        self.serving = Some(term);
        self.flush_done.clear();
        self.flush_reported = self.core.state.flushed;
        self.flush_written = self.core.state.flushed;
        self.sleds_flushing = None;
        self.flush_failing.clear();
        self.flush_data_max = 0;
        // Unbounded in type only: every job is an entry of the overlay, sharing its bytes, and
        // the overlay is bounded by the unflushed-bytes limit (proposals wait above it). A
        // rewrite after a sled restart queues the overlay's entries once more; the copies it
        // supersedes are skipped when they come up, not written again.
        let (jobs, rx) = mpsc::unbounded_channel();
        // Re-flush the whole unflushed tail: the previous leader may not have finished it.
        for (index, e) in self.core.overlay.entries_after(self.core.state.flushed) {
            let _ = jobs.send((index, e.header.clone(), e.data.clone(), 0));
        }
        let (stopping, stop_rx) = watch::channel(false);
        let rewrite = Arc::new(std::sync::Mutex::new(Rewrite::default()));
        // Whatever path meets the newer claim first, the leadership ends: a request that only
        // retries (an allocation on the NBD write path) must not leave this node serving.
        let watch_task = {
            let (store, tx) = (store.clone(), self.tx.clone());
            tokio::spawn(async move {
                store.deposed().await;
                if let Some((epoch, _)) = store.deposed_by() {
                    let _ = tx
                        .send(Input::Deposed {
                            term,
                            epoch: epoch.0,
                        })
                        .await;
                }
            })
        };
        if let Some(old) = self.deposed_watch.replace(watch_task.abort_handle()) {
            old.abort();
        }
        tokio::spawn(flusher(
            term,
            store,
            rx,
            self.tx.clone(),
            FlushLimits {
                window: self.cfg.flush_window,
                stale_after: self.cfg.stale_after,
            },
            stop_rx,
            rewrite.clone(),
        ));
        self.flusher = Some(Flusher {
            jobs,
            stopping,
            rewrite,
        });
    }

    /// A proposal was applied or dropped: its bytes no longer wait outside the overlay.
    fn unpropose(&mut self, tag: u64) {
        if let Some(n) = self.proposed.remove(&tag) {
            self.proposed_bytes = self.proposed_bytes.saturating_sub(n);
        }
    }

    fn stop_serving(&mut self) {
        self.serving = None;
        self.stale_pending.clear();
        self.fresh_pending.clear();
        self.resyncing = None;
        for task in [self.resync_task.take(), self.deposed_watch.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        self.claiming = None;
        self.flusher = None;
        self.flush_done.clear();
        let e = self.not_leader();
        for (_, _, _, r) in self.deferred.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
        for (_, _, r) in self.read_next.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
        if let Some((_, _, batch)) = self.read_inflight.take() {
            for (_, _, r) in batch {
                let _ = r.send(Err(e.clone()));
            }
        }
    }

    /// The log-progress gauges (cheap stores). Also set before any proposal is acknowledged
    /// ([`Self::handle_events`]): a client that has its write acknowledged must find it counted
    /// in `unflushed_bytes`, not see a gauge that lags until the end of the loop iteration.
    fn publish_progress(&self) {
        let m = &self.vm;
        m.commit_index.set(self.core.committed() as i64);
        m.applied_index.set(self.core.applied() as i64);
        m.flushed_index.set(self.core.state.flushed as i64);
        m.unflushed_bytes.set(self.core.overlay.bytes() as i64);
        m.stale_replicas.set(self.core.state.stale.len() as i64);
    }

    /// The applied description, shared: copied into a new `Arc` only when it changed.
    fn shared_spec(&mut self) -> Option<Arc<VolumeSpec>> {
        if self.spec_shared.as_deref() != self.core.state.spec.as_ref() {
            self.spec_shared = self.core.state.spec.clone().map(Arc::new);
        }
        self.spec_shared.clone()
    }

    fn publish(&mut self) {
        let role = match self.core.role() {
            raft::StateRole::Leader => "leader",
            raft::StateRole::Follower => "follower",
            raft::StateRole::Candidate => "candidate",
            raft::StateRole::PreCandidate => "pre-candidate",
        };
        let m = &self.vm;
        m.term.set(self.core.term() as i64);
        m.rejoining.set(i64::from(self.core.rejoining()));
        m.role.set(match self.core.role() {
            raft::StateRole::Follower => 0,
            raft::StateRole::PreCandidate => 1,
            raft::StateRole::Candidate => 2,
            raft::StateRole::Leader if self.serving.is_some() => 3,
            raft::StateRole::Leader => 4,
        });
        self.publish_progress();
        let spec = self.shared_spec();
        let m = &self.vm;
        let st = GroupStatus {
            role,
            term: self.core.term(),
            leader: self.core.leader(),
            serving: self.serving.is_some(),
            applied: self.core.applied(),
            committed: self.core.committed(),
            flushed: self.core.state.flushed,
            unflushed_bytes: self.core.overlay.bytes(),
            spec,
            store: self.store.clone(),
            failed: self.failed.clone(),
            voters: self.core.voters(),
            learners: self.core.learners(),
            progress: self.core.progress(),
            last_index: self.core.last_index(),
            cluster: self.cluster.clone(),
            qos: self.core.state.qos,
            qos_state: self.core.state.qos_state,
            rejoining: self.core.rejoining(),
        };
        {
            let prev = self.status.borrow();
            if prev.leader != st.leader && st.leader.is_some() {
                m.leader_changes.inc();
            }
            if prev.role != st.role && matches!(st.role, "candidate" | "pre-candidate") {
                m.elections.inc();
            }
        }
        self.status.send_if_modified(|old| {
            let changed = old.role != st.role
                || old.term != st.term
                || old.leader != st.leader
                || old.serving != st.serving
                || old.applied != st.applied
                || old.flushed != st.flushed
                || !opt_arc_eq(&old.spec, &st.spec)
                || old.failed != st.failed
                || old.store.is_some() != st.store.is_some()
                || old.voters != st.voters
                || old.learners != st.learners
                || old.progress != st.progress
                || old.qos != st.qos
                || old.qos_state != st.qos_state
                || old.rejoining != st.rejoining
                || !opt_arc_eq(&old.cluster, &st.cluster);
            *old = st;
            changed
        });
    }
}

fn opt_arc_eq<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}
