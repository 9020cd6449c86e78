//! Replicated, block-aligned I/O on the sleds of one volume.
//!
//! Every mutation carries this head node's credential for the volume and goes to every replica
//! of its chunk; it succeeds when all replicas have it durable. A read goes to one replica and
//! falls back to the others on any error (a sled down, a checksum mismatch). The first `Fenced`
//! answer means another head node has claimed the volume with a higher epoch: the store becomes
//! *deposed*, refuses everything from then on, and [`SledStore::deposed`] resolves so the NBD
//! connections are closed. Nothing is retried under an old epoch.
//!
//! **Stale replicas.** A sled recorded as stale in the volume's replicated state (it could not be
//! reached when a write had to land) is skipped: no read goes to it and mutations count on the
//! other replicas only. [`SledStore::resync`] brings one back: it claims it under the current
//! epoch, then copies the chunks it missed from a current replica, one chunk at a time with
//! mutations held back (the *gate*), and from then on mutations of a copied chunk reach it too,
//! so when the group records it current again it misses nothing. What it missed is the union
//! of the replicated record (chunks written after the flushed index at which it went stale;
//! unknown means every chunk), the chunks whose mutations skipped it under this leader, and the
//! chunks a current replica holds and it does not (a replaced device). The rest count as
//! copied from the start, under the gate, so their mutations reach it at once. A mutation that
//! fails on a sled being resynchronised fails (and is retried by the write-back), so the
//! sled cannot be recorded current while missing a write.
//!
//! **Lost chunks on a current sled.** A sled whose device was replaced (or wiped) while it was
//! away for less than it takes to be recorded stale comes back current but without some chunks;
//! it would read them as zeros and let a write allocate a fresh, partial chunk. So every time
//! this store reaches a sled on a new connection (and when it opens), it first asks what the
//! sled holds of the volume: a chunk placed on the sled, known to be held by a replica, and not
//! held by the sled is *lacking* there. Lacking chunks are treated as if the sled were stale for
//! them — no read goes there and their mutations skip the sled (noted as missed) — and the group
//! is told ([`SledStore::take_lacking`]) so it records the sled stale; its resynchronisation
//! then copies them. A false alarm (a chunk allocated ahead while the sled was unreachable)
//! costs a copy, never data.

use super::{BLOCK, Segment, VolumeSpec};
use crate::metrics::VolumeMetrics;
use crate::sleds::{SledConn, SledPool};
use common::AlignedBuf;
use common::cred::{ClusterKey, Credential};
use common::ids::{ChunkIndex, Epoch, NodeId, SledId};
use common::sled_client::ClientError;
use common::sled_proto::ErrorCode;
use futures_util::future::join_all;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Errors of replicated I/O.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Another head node holds a higher claim.
    #[error("deposed: volume claimed by epoch {epoch} holder {holder}")]
    Deposed {
        /// The winning epoch.
        epoch: Epoch,
        /// The winning holder.
        holder: NodeId,
    },
    /// A sled has no room for a new chunk.
    #[error("no space left on sled {0}")]
    NoSpace(SledId),
    /// A replica could not be written or no replica could be read.
    #[error("{0}")]
    Io(String),
    /// One replica failed a mutation (unreachable, or an I/O error there): the write-back
    /// retries, and the group may record the sled as stale.
    #[error("sled {sled}: {msg}")]
    Replica {
        /// The sled.
        sled: SledId,
        /// What went wrong.
        msg: String,
    },
    /// A mutation made for one leadership term found the store writing under another (this
    /// node leads again, under a newer term): it must not go out with the newer credential,
    /// unordered with that term's own write-back.
    #[error("the write-back of epoch {expected} ended: the store writes under epoch {current} now")]
    EpochEnded {
        /// The epoch the mutation was made for.
        expected: Epoch,
        /// The epoch the store writes under now.
        current: Epoch,
    },
    /// The range is outside the volume.
    #[error("range {offset}+{len} is outside the volume")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// What is known about a chunk's allocation. A chunk in neither set is unknown (a replica did
/// not answer when the store opened, or the volume grew since): it is allocated ahead like an
/// empty one, read from the sleds like a held one, and never taken as lost from a sled.
#[derive(Debug, Default)]
struct Allocation {
    /// Chunks known to hold nothing on any replica.
    empty: BTreeSet<u64>,
    /// Chunks known to be allocated on the replicas (some replica said so, or this store
    /// allocated or wrote them): only these can be found lacking on a sled.
    held: BTreeSet<u64>,
}

/// Which replicas may be used.
#[derive(Debug, Default)]
struct Health {
    /// Stale sleds (the replicated set): never read; mutations skip them unless resyncing.
    stale: BTreeSet<SledId>,
    /// Stale sleds being resynchronised: a generation and the chunks copied so far (mutations of
    /// those chunks reach the sled too).
    resync: HashMap<SledId, (u64, BTreeSet<u64>)>,
    next_gen: u64,
    /// Per stale sled: the chunks whose mutations skipped it here (this store, so this
    /// leadership). With the replicated record, what its resynchronisation must copy. Also
    /// kept for a sled with lacking chunks, until it is recorded stale.
    missed: HashMap<SledId, BTreeSet<u64>>,
    /// Per current sled: chunks it was found not to hold although a replica does (see the
    /// module's notes). Dropped when the sled is recorded stale.
    lacking: HashMap<SledId, BTreeSet<u64>>,
    /// Sleds found lacking chunks that the group has not been told about yet.
    lacking_new: BTreeSet<SledId>,
}

/// The sleds of one volume, seen through this head node's credential.
#[derive(Debug)]
pub struct SledStore {
    /// Shared, not copied per request: a placement holds one `Vec` per chunk.
    spec: RwLock<Arc<VolumeSpec>>,
    pool: Arc<SledPool>,
    key: ClusterKey,
    node: NodeId,
    cred: RwLock<Credential>,
    claimed: Mutex<HashSet<SledId>>,
    alloc: Mutex<Allocation>,
    health: Mutex<Health>,
    /// Held shared by every mutation, exclusively while a chunk is copied to a resyncing sled.
    gate: tokio::sync::RwLock<()>,
    deposed: tokio::sync::watch::Sender<Option<(Epoch, NodeId)>>,
    reads: AtomicU64,
    /// Cached writes acknowledged and not yet covered by a flush: connection id → (sled, how
    /// many). See [`SledStore::flush`].
    unflushed: Mutex<HashMap<u64, (SledId, u64)>>,
    /// Per sled: the connection whose holdings were checked against the volume's (see the
    /// module's notes on lost chunks).
    verified: Mutex<HashMap<SledId, u64>>,
    /// Serialises those checks.
    verify_lock: tokio::sync::Mutex<()>,
    metrics: VolumeMetrics,
}

/// Why a sled's flush did not make the write-back durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlushFailure {
    /// The flush failed (unreachable, timed out, device error); retry.
    Failed(String),
    /// The flush succeeded, but cached writes were acknowledged on an earlier connection: the
    /// sled may have restarted (power loss) since and lost them. What is above the recorded
    /// flushed index must be written back again before it is recorded.
    MayHaveLost,
}

impl std::fmt::Display for FlushFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlushFailure::Failed(m) => f.write_str(m),
            FlushFailure::MayHaveLost => f.write_str(
                "cached writes were acknowledged on an earlier connection; the sled may have \
                 restarted and lost them",
            ),
        }
    }
}

fn block_aligned(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK)
}

impl SledStore {
    /// A store for `spec` at `epoch`. Nothing is claimed until [`SledStore::open`].
    pub fn new(
        spec: VolumeSpec,
        pool: Arc<SledPool>,
        key: ClusterKey,
        node: NodeId,
        epoch: Epoch,
        metrics: VolumeMetrics,
    ) -> Self {
        let cred = key.mint(spec.id, epoch, node);
        let (deposed, _) = tokio::sync::watch::channel(None);
        Self {
            spec: RwLock::new(Arc::new(spec)),
            pool,
            key,
            node,
            cred: RwLock::new(cred),
            claimed: Mutex::default(),
            alloc: Mutex::default(),
            health: Mutex::default(),
            gate: tokio::sync::RwLock::new(()),
            deposed,
            reads: AtomicU64::new(0),
            unflushed: Mutex::default(),
            verified: Mutex::default(),
            verify_lock: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    /// The volume's description.
    pub fn spec(&self) -> Arc<VolumeSpec> {
        self.spec.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the description (growing the volume).
    pub fn set_spec(&self, spec: VolumeSpec) {
        *self.spec.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(spec);
    }

    fn credential(&self) -> Credential {
        *self.cred.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The epoch this store writes under.
    pub fn epoch(&self) -> Epoch {
        self.credential().epoch
    }

    fn check_term(&self, expected: Option<Epoch>) -> Result<(), StoreError> {
        match expected {
            Some(expected) if self.epoch() != expected => Err(StoreError::EpochEnded {
                expected,
                current: self.epoch(),
            }),
            _ => Ok(()),
        }
    }

    /// Resolves once the store has been deposed.
    pub async fn deposed(&self) {
        let mut rx = self.deposed.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Switches to a new, higher epoch (a new Raft term of this node's leadership): a new
    /// credential, no sled claimed yet, not deposed. Call [`SledStore::open`] next.
    pub fn set_epoch(&self, epoch: Epoch) {
        let cred = self.key.mint(self.spec().id, epoch, self.node);
        *self.cred.write().unwrap_or_else(|p| p.into_inner()) = cred;
        self.claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.deposed.send_replace(None);
        self.metrics.epoch.set(epoch.0 as i64);
    }

    /// The claim that deposed this store, if any.
    pub fn deposed_by(&self) -> Option<(Epoch, NodeId)> {
        *self.deposed.borrow()
    }

    fn depose(&self, epoch: Epoch, holder: NodeId) -> StoreError {
        if self.deposed.borrow().is_none() {
            let vol = self.spec().id;
            tracing::error!(volume_id = %vol, epoch = self.epoch().0, node_id = self.node.0,
                stored_epoch = epoch.0, stored_holder = holder.0,
                "fenced by a sled: another head node claimed the volume; stop serving it");
            self.metrics.fenced.inc();
            self.deposed.send_replace(Some((epoch, holder)));
        }
        StoreError::Deposed { epoch, holder }
    }

    fn check_deposed(&self) -> Result<(), StoreError> {
        match *self.deposed.borrow() {
            Some((epoch, holder)) => Err(StoreError::Deposed { epoch, holder }),
            None => Ok(()),
        }
    }

    async fn conn(&self, sled: SledId) -> Result<Arc<SledConn>, StoreError> {
        self.pool
            .find(sled)
            .await
            .ok_or_else(|| StoreError::Replica {
                sled,
                msg: "not reachable (never connected)".into(),
            })
    }

    /// Maps a client error of a mutation sent with a credential of epoch `used` to a store error
    /// (deposing on `Fenced` by another node's claim).
    fn mutation_error(&self, sled: SledId, used: Epoch, e: ClientError) -> StoreError {
        match (&e, e.code()) {
            // Fenced by this node's own newer claim: it claimed again (a new term) while a
            // request of its earlier term was on its way. That term ended; nobody deposed
            // this node, and deposing the store would stop its current leadership.
            (ClientError::Remote(w), Some(ErrorCode::Fenced))
                if let Some((current, holder)) = w.current
                    && holder == self.node
                    && current > used =>
            {
                StoreError::EpochEnded {
                    expected: used,
                    current,
                }
            }
            (ClientError::Remote(w), Some(ErrorCode::Fenced)) => {
                let (epoch, holder) = w.current.unwrap_or((Epoch(u64::MAX), NodeId(0)));
                self.depose(epoch, holder)
            }
            (_, Some(ErrorCode::NoSpace)) => StoreError::NoSpace(sled),
            _ => StoreError::Replica {
                sled,
                msg: e.to_string(),
            },
        }
    }

    /// Claims the volume on one sled under the current epoch.
    async fn claim_one(&self, sled: SledId) -> Result<(), StoreError> {
        let conn = self.conn(sled).await?;
        let client = conn.client().await.map_err(|e| StoreError::Replica {
            sled,
            msg: e.to_string(),
        })?;
        let cred = self.credential();
        match client.claim(&cred).await {
            Ok(_) => {
                self.claimed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sled);
                self.metrics.claims.inc();
                tracing::info!(volume_id = %cred.volume, epoch = cred.epoch.0, sled_id = %sled,
                    node_id = self.node.0, "claimed volume on sled");
                Ok(())
            }
            Err(e) => Err(self.mutation_error(sled, cred.epoch, e)),
        }
    }

    /// Claims every sled of the volume and learns which chunks are empty. Sleds that cannot be
    /// reached now are claimed before their first mutation; they are returned (those not
    /// already stale), for the group to record as stale.
    pub async fn open(&self) -> Result<Vec<SledId>, StoreError> {
        let spec = self.spec();
        let sleds = spec.sleds();
        let results = join_all(sleds.iter().map(|s| self.claim_one(*s))).await;
        for r in &results {
            if let Err(e @ StoreError::Deposed { .. }) = r {
                return Err(e.clone());
            }
        }
        let stale = self.stale();
        let unreachable: Vec<SledId> = sleds
            .iter()
            .zip(&results)
            .filter(|(s, r)| r.is_err() && !stale.contains(s))
            .map(|(s, _)| *s)
            .collect();
        // A chunk is empty when every current replica answered and none holds it.
        let mut reachable = HashSet::new();
        let mut held = BTreeSet::new();
        let mut by_sled: Vec<(SledId, u64, BTreeSet<u64>)> = Vec::new();
        for s in sleds.iter().filter(|s| !stale.contains(s)) {
            let Ok(conn) = self.conn(*s).await else {
                continue;
            };
            let Ok(client) = conn.client().await else {
                continue;
            };
            if let Ok(st) = client.volume_stat(spec.id).await {
                reachable.insert(*s);
                let mine: BTreeSet<u64> = st.chunks.iter().map(|c| c.0).collect();
                held.extend(mine.iter().copied());
                by_sled.push((*s, client.id(), mine));
            }
        }
        for (sled, conn_id, mine) in by_sled {
            let lacking = lacking_of(&spec, sled, &mine, |c| held.contains(&c));
            self.note_lacking(sled, conn_id, lacking);
        }
        let mut alloc = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        alloc.held.clone_from(&held);
        alloc.empty = (0..spec.chunks())
            .filter(|c| !held.contains(c))
            .filter(|c| {
                spec.placement[*c as usize]
                    .iter()
                    .all(|s| reachable.contains(s) || stale.contains(s))
            })
            .collect();
        self.metrics
            .chunks_allocated
            .set((spec.chunks() - alloc.empty.len() as u64) as i64);
        Ok(unreachable)
    }

    /// The sleds recorded stale.
    pub fn stale(&self) -> BTreeSet<SledId> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stale
            .clone()
    }

    /// Takes the replicated set of stale sleds. A sled no longer in it is current again (its
    /// resynchronisation, if any, is complete).
    pub fn set_stale(&self, stale: &BTreeSet<SledId>) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.stale != *stale {
            h.stale = stale.clone();
            h.resync.retain(|s, _| stale.contains(s));
            h.lacking.retain(|s, _| !stale.contains(s));
            h.lacking_new.retain(|s| !stale.contains(s));
            let Health {
                missed, lacking, ..
            } = &mut *h;
            missed.retain(|s, _| stale.contains(s) || lacking.contains_key(s));
        }
    }

    /// Sleds found lacking chunks since the last call (the group records them stale), with
    /// how many chunks each lacks.
    pub fn take_lacking(&self) -> Vec<(SledId, usize)> {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let new = std::mem::take(&mut h.lacking_new);
        new.into_iter()
            .map(|s| (s, h.lacking.get(&s).map_or(0, BTreeSet::len)))
            .collect()
    }

    /// Records what a check of `sled`'s holdings on connection `conn_id` found lacking.
    fn note_lacking(&self, sled: SledId, conn_id: u64, lacking: BTreeSet<u64>) {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sled, conn_id);
        if lacking.is_empty() {
            return;
        }
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.stale.contains(&sled) {
            return;
        }
        tracing::warn!(volume_id = %self.spec().id, sled_id = %sled, chunks = lacking.len(),
            first = lacking.first().copied().unwrap_or_default(),
            "a sled lacks chunks its fellow replicas hold (a replaced or wiped device?); it is \
             not read for them and will be resynchronised");
        let known = h.lacking.entry(sled).or_default();
        let before = known.len();
        known.extend(lacking);
        self.metrics
            .lacking_chunks
            .inc_by((known.len() - before) as u64);
        h.lacking_new.insert(sled);
    }

    fn is_lacking(&self, sled: SledId, chunk: ChunkIndex) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lacking
            .get(&sled)
            .is_some_and(|l| l.contains(&chunk.0))
    }

    /// A connection to `sled` whose holdings have been checked (see the module's notes on lost
    /// chunks): the first use of every new connection asks the sled what it holds.
    async fn checked_client(
        &self,
        sled: SledId,
    ) -> Result<Arc<common::sled_client::SledClient>, StoreError> {
        let conn = self.conn(sled).await.map_err(|e| match e {
            StoreError::Replica { msg, .. } => StoreError::Io(msg),
            other => other,
        })?;
        let client = conn
            .client()
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let checked = |id| {
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&sled)
                == Some(&id)
        };
        if checked(client.id()) || self.stale().contains(&sled) {
            return Ok(client);
        }
        let _one = self.verify_lock.lock().await;
        if checked(client.id()) {
            return Ok(client);
        }
        let spec = self.spec();
        let st = client
            .volume_stat(spec.id)
            .await
            .map_err(|e| StoreError::Io(format!("asking what it holds: {e}")))?;
        let mine: BTreeSet<u64> = st.chunks.iter().map(|c| c.0).collect();
        // Lacking means: known to be held, and this sled does not hold it. A chunk merely not
        // known to be empty is no evidence (taking it as such skipped every replica of a
        // never-written chunk once their connections were new, and lost the write).
        let lacking = {
            let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
            a.held.extend(mine.iter().copied());
            lacking_of(&spec, sled, &mine, |c| a.held.contains(&c))
        };
        self.note_lacking(sled, client.id(), lacking);
        Ok(client)
    }

    /// Forgets the progress of a resynchronisation (its sled failed a mutation): mutations skip
    /// the sled again and a new resynchronisation starts from scratch.
    pub fn abort_resync(&self, sled: SledId) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if h.resync.remove(&sled).is_some() {
            tracing::warn!(volume_id = %self.spec().id, sled_id = %sled,
                "resynchronisation of a stale sled abandoned");
        }
    }

    /// True when `sled` is stale and every chunk it holds for the volume has been copied to
    /// it by a resynchronisation that is still in force.
    pub fn resync_complete(&self, sled: SledId) -> bool {
        let spec = self.spec();
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, done)) = h.resync.get(&sled) else {
            return false;
        };
        h.stale.contains(&sled)
            && (0..spec.chunks())
                .filter(|c| spec.placement[*c as usize].contains(&sled))
                .all(|c| done.contains(&c))
    }

    /// The replicas a mutation of `chunk` must reach: the current ones and the resyncing ones
    /// that already have the chunk. Empty when no replica is current.
    /// A stale sled skipped is noted as missing the chunk (see [`SledStore::resync`]).
    fn targets(&self, chunk: ChunkIndex, replicas: &[SledId]) -> Vec<SledId> {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let h = &mut *h;
        if replicas.iter().all(|s| h.stale.contains(s)) {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(replicas.len());
        for s in replicas {
            let lacks = h.lacking.get(s).is_some_and(|l| l.contains(&chunk.0));
            let reaches = !lacks
                && (!h.stale.contains(s)
                    || h.resync
                        .get(s)
                        .is_some_and(|(_, done)| done.contains(&chunk.0)));
            if reaches {
                out.push(*s);
            } else {
                h.missed.entry(*s).or_default().insert(chunk.0);
            }
        }
        out
    }

    async fn ensure_claimed(&self, sled: SledId) -> Result<(), StoreError> {
        let done = self
            .claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&sled);
        if done {
            return Ok(());
        }
        self.claim_one(sled).await
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<Arc<VolumeSpec>, StoreError> {
        let spec = self.spec();
        if offset.checked_add(len).is_none_or(|end| end > spec.size) {
            return Err(StoreError::OutOfRange { offset, len });
        }
        Ok(spec)
    }

    fn is_empty(&self, chunk: ChunkIndex) -> bool {
        self.alloc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .empty
            .contains(&chunk.0)
    }

    fn is_held(&self, chunk: ChunkIndex) -> bool {
        self.alloc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held
            .contains(&chunk.0)
    }

    fn set_empty(&self, chunk: ChunkIndex, empty: bool, total: u64) {
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        let changed = if empty {
            a.held.remove(&chunk.0);
            a.empty.insert(chunk.0)
        } else {
            a.held.insert(chunk.0);
            a.empty.remove(&chunk.0)
        };
        if changed {
            self.metrics
                .chunks_allocated
                .set(total.saturating_sub(a.empty.len() as u64) as i64);
        }
    }

    /// One mutation on every replica of a segment's chunk. With `epoch`, the mutation belongs
    /// to that term's write-back: it is sent only with that epoch's credential (checked where
    /// the credential is taken, after every wait), else it fails with
    /// [`StoreError::EpochEnded`].
    async fn on_replicas<F, Fut>(
        &self,
        spec: &VolumeSpec,
        seg: Segment,
        epoch: Option<Epoch>,
        op: F,
    ) -> Result<(), StoreError>
    where
        F: Fn(Arc<common::sled_client::SledClient>, Credential) -> Fut,
        Fut: std::future::Future<Output = Result<(), ClientError>>,
    {
        let _gate = self.gate.read().await;
        // The placement as it is now, not as the caller saw it: a chunk given a new replica
        // meanwhile (a drain) and copied to it while this mutation waited for the gate must
        // get the mutation there too. (Volumes only grow: the chunk is still there.)
        let now = self.spec();
        let replicas = now
            .placement
            .get(seg.chunk.0 as usize)
            .unwrap_or(&spec.placement[seg.chunk.0 as usize]);
        let targets = self.targets(seg.chunk, replicas);
        if targets.is_empty() {
            return Err(StoreError::Io(format!(
                "chunk {} has no current replica (every replica is stale)",
                seg.chunk.0
            )));
        }
        // Replicas that took the mutation (not skipped as lacking the chunk).
        let took = std::sync::atomic::AtomicUsize::new(0);
        let results = join_all(targets.iter().map(|sled| {
            let op = &op;
            let took = &took;
            async move {
                let r = async {
                    self.check_term(epoch)?;
                    self.ensure_claimed(*sled).await?;
                    let client = self.checked_client(*sled).await?;
                    if self.is_lacking(*sled, seg.chunk) {
                        // Found lacking just now: skipped like a stale sled, and noted.
                        self.health
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .missed
                            .entry(*sled)
                            .or_default()
                            .insert(seg.chunk.0);
                        return Ok(());
                    }
                    let cred = self.credential();
                    if let Some(expected) = epoch
                        && cred.epoch != expected
                    {
                        return Err(StoreError::EpochEnded {
                            expected,
                            current: cred.epoch,
                        });
                    }
                    let used = cred.epoch;
                    let mut res = op(client.clone(), cred).await;
                    // Not for a sled being resynchronised: it was claimed when its pass began,
                    // so it lost the claim since (a wiped device) and with it chunks the pass
                    // counts as held; failing ends the pass and the next one copies them.
                    let resyncing = || {
                        self.health
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .stale
                            .contains(sled)
                    };
                    if res.as_ref().err().and_then(ClientError::code) == Some(ErrorCode::NotClaimed)
                        && !resyncing()
                    {
                        // The sled lost its record (a replaced device): claim again, once.
                        self.claimed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(sled);
                        self.ensure_claimed(*sled).await?;
                        res = op(client, cred).await;
                    }
                    if res.is_ok() {
                        took.fetch_add(1, Ordering::Relaxed);
                    }
                    res.map_err(|e| self.mutation_error(*sled, used, e))
                }
                .await;
                r.map_err(|e| match e {
                    StoreError::Io(msg) => StoreError::Replica { sled: *sled, msg },
                    other => other,
                })
            }
        }))
        .await;
        // A deposition or an ended term wins over any other error; then no-space; then the
        // first error.
        let mut first = None;
        for r in results {
            match r {
                Ok(()) => {}
                Err(e @ (StoreError::Deposed { .. } | StoreError::EpochEnded { .. })) => {
                    return Err(e);
                }
                Err(e @ StoreError::NoSpace(_)) => first = Some(e),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        if first.is_none() && took.load(Ordering::Relaxed) == 0 {
            // Every replica was skipped: succeeding would store the mutation nowhere.
            return Err(StoreError::Io(format!(
                "chunk {} is lacking on every current replica (lost devices?); nothing took the \
                 mutation",
                seg.chunk.0
            )));
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes block-aligned `data` at `offset` to every replica, as cached writes: done once
    /// every replica's device holds it, durable only after a later [`SledStore::flush`]. This is
    /// write-back of committed log entries, which the Raft log keeps durable until the group
    /// records them flushed, and it records that only after a flush of every replica.
    ///
    /// `epoch` is the term whose write-back this is: see [`StoreError::EpochEnded`].
    pub async fn write(
        &self,
        epoch: Epoch,
        offset: u64,
        data: bytes::Bytes,
    ) -> Result<(), StoreError> {
        self.check_deposed()?;
        let len = data.len() as u64;
        debug_assert!(block_aligned(offset, len));
        let spec = self.check_range(offset, len)?;
        let started = Instant::now();
        let segs = spec.segments(offset, len);
        // Pieces of one buffer, without copying.
        let parts: Vec<(Segment, bytes::Bytes)> = segs
            .iter()
            .map(|s| (*s, data.slice(s.at as usize..(s.at + s.len) as usize)))
            .collect();
        let results = join_all(parts.into_iter().map(|(seg, buf)| {
            let spec = &spec;
            async move {
                let r = self
                    .on_replicas(spec, seg, Some(epoch), |c, cred| {
                        let buf = buf.clone();
                        async move {
                            c.write_cached(&cred, seg.chunk, seg.offset, buf).await?;
                            self.note_cached(&c);
                            Ok(())
                        }
                    })
                    .await;
                if r.is_ok() {
                    self.set_empty(seg.chunk, false, spec.chunks());
                }
                r
            }
        }))
        .await;
        self.metrics.observe_stage("sled_write", started);
        results.into_iter().collect()
    }

    /// Counts a cached write acknowledged on connection `c`.
    fn note_cached(&self, c: &common::sled_client::SledClient) {
        let mut u = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
        u.entry(c.id()).or_insert((c.sled_id(), 0)).1 += 1;
    }

    /// True when every sled of the placement holds the volume retired (a tombstone, no chunk):
    /// a delete that already got that far and is being retried is done.
    pub async fn retired_everywhere(&self) -> bool {
        let spec = self.spec();
        for sled in spec.sleds() {
            let r = async {
                let conn = self.conn(sled).await.ok()?;
                let client = conn.client().await.ok()?;
                client.volume_stat(spec.id).await.ok()
            }
            .await;
            let retired = r.is_some_and(|st| {
                st.chunks.is_empty() && st.fence == Some((Epoch(u64::MAX), NodeId(0)))
            });
            if !retired {
                return false;
            }
        }
        true
    }

    /// Retires the volume on every sled of its placement once it is deleted (its chunks all
    /// freed): each sled's fence records become tombstones whose fence-table places new volumes
    /// may take. Best effort: returns the sleds that did not (a sled too old to know how, one
    /// that is away); their records stay as they were, which is safe, only not reclaimable.
    pub async fn retire(&self) -> Vec<(SledId, String)> {
        let cred = self.credential();
        let mut failed = Vec::new();
        for sled in self.spec().sleds() {
            let r = async {
                let conn = self.conn(sled).await.map_err(|e| e.to_string())?;
                let client = conn.client().await.map_err(|e| e.to_string())?;
                client.retire(&cred).await.map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = r {
                failed.push((sled, e));
            }
        }
        failed
    }

    /// Makes every write done so far durable on every sled that may have received it: the
    /// current ones and those being resynchronised (stale sleds get no writes). Returns the
    /// sleds that failed, with why; empty when every one is flushed.
    ///
    /// A sled flushes what it acknowledged before, unless it restarted in between (a power loss
    /// takes its device cache): then the flush succeeds on a new connection while the writes
    /// were acknowledged on an old one. Any cached write acknowledged on another connection than
    /// the flush's gives [`FlushFailure::MayHaveLost`] (a reconnect without a restart does too:
    /// writing the tail again is cheap, losing it is not).
    pub async fn flush(&self) -> Vec<(SledId, FlushFailure)> {
        let started = Instant::now();
        let sleds: Vec<SledId> = {
            let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            self.spec()
                .sleds()
                .into_iter()
                .filter(|s| !h.stale.contains(s) || h.resync.contains_key(s))
                .collect()
        };
        let results = join_all(sleds.iter().map(|sled| async move {
            let r = async {
                let conn = self.conn(*sled).await.map_err(|e| e.to_string())?;
                let client = conn.client().await.map_err(|e| e.to_string())?;
                // What this flush will cover: acknowledged before it is sent.
                let before: Vec<(u64, u64)> = self
                    .unflushed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .filter(|(_, (s, _))| s == sled)
                    .map(|(id, (_, n))| (*id, *n))
                    .collect();
                client.flush().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((client.id(), before))
            }
            .await;
            (*sled, r)
        }))
        .await;
        self.metrics.observe_stage("sled_flush", started);
        let mut failed = Vec::new();
        let mut u = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
        for (sled, r) in results {
            match r {
                Err(e) => failed.push((sled, FlushFailure::Failed(e))),
                Ok((conn, before)) => {
                    let lost = before.iter().any(|(id, n)| *id != conn && *n > 0);
                    // Covered (or to be written again): forget them.
                    for (id, n) in before {
                        if let Some(e) = u.get_mut(&id) {
                            e.1 = e.1.saturating_sub(n);
                            if e.1 == 0 {
                                u.remove(&id);
                            }
                        }
                    }
                    if lost {
                        failed.push((sled, FlushFailure::MayHaveLost));
                    }
                }
            }
        }
        failed
    }

    /// Reads block-aligned `[offset, offset+len)`, each chunk from one replica with fall-back.
    pub async fn read(&self, offset: u64, len: u64) -> Result<AlignedBuf, StoreError> {
        self.check_deposed()?;
        debug_assert!(block_aligned(offset, len));
        let spec = self.check_range(offset, len)?;
        let started = Instant::now();
        let segs = spec.segments(offset, len);
        let pieces = join_all(segs.iter().map(|seg| self.read_segment(&spec, *seg))).await;
        let out = if pieces.len() == 1 {
            pieces.into_iter().next().expect("one piece")?
        } else {
            let mut out = AlignedBuf::zeroed(len as usize);
            for (seg, piece) in segs.iter().zip(pieces) {
                let piece = piece?;
                out[seg.at as usize..(seg.at + seg.len) as usize].copy_from_slice(&piece);
            }
            out
        };
        self.metrics.observe_stage("sled_read", started);
        Ok(out)
    }

    async fn read_segment(
        &self,
        spec: &VolumeSpec,
        seg: Segment,
    ) -> Result<AlignedBuf, StoreError> {
        if self.is_empty(seg.chunk) {
            return Ok(AlignedBuf::zeroed(seg.len as usize));
        }
        // Stale replicas are never read: they may miss writes.
        let stale = self.stale();
        let mut replicas: Vec<SledId> = spec.placement[seg.chunk.0 as usize]
            .iter()
            .copied()
            .filter(|s| !stale.contains(s) && !self.is_lacking(*s, seg.chunk))
            .collect();
        // Spread reads over the replicas; fall back to the others in turn.
        let start = self.reads.fetch_add(1, Ordering::Relaxed) as usize;
        let n = replicas.len();
        if n > 0 {
            replicas.rotate_left(start % n);
        }
        // A sled that just failed to connect is tried last, not waited for first.
        let suspect: HashSet<SledId> = replicas
            .iter()
            .copied()
            .filter(|s| self.pool.by_id(*s).is_some_and(|c| c.is_suspect()))
            .collect();
        replicas.sort_by_key(|s| suspect.contains(s));
        let mut errors = Vec::new();
        for sled in replicas {
            let attempt = async {
                let client = self.checked_client(sled).await?;
                if self.is_lacking(sled, seg.chunk) {
                    return Err(StoreError::Io(
                        "the sled lacks this chunk (found on reconnecting)".into(),
                    ));
                }
                client
                    .read(spec.id, seg.chunk, seg.offset, seg.len as u32)
                    .await
                    .map_err(|e| StoreError::Io(e.to_string()))
            };
            match attempt.await {
                // Checked after the answer: a sled dropped from the chunk meanwhile (a drain)
                // frees it only once the new placement is applied, so an answer that may come
                // from the freed chunk (zeros) is one this check sees as dropped.
                Ok(buf)
                    if self
                        .spec()
                        .placement
                        .get(seg.chunk.0 as usize)
                        .is_some_and(|r| r.contains(&sled)) =>
                {
                    return Ok(buf);
                }
                Ok(_) => errors.push(format!("sled {sled}: no longer a replica of the chunk")),
                Err(e) => {
                    self.metrics.read_fallbacks.inc();
                    tracing::warn!(volume_id = %spec.id, chunk = seg.chunk.0, sled_id = %sled,
                        error = %e, "replica read failed; trying another");
                    errors.push(format!("sled {sled}: {e}"));
                }
            }
        }
        if errors.is_empty() {
            errors.push("every replica is stale or lacks it".into());
        }
        Err(StoreError::Io(format!(
            "no replica of chunk {} could be read: {}",
            seg.chunk.0,
            errors.join("; ")
        )))
    }

    /// Makes block-aligned `[offset, offset+len)` read as zeros on every replica. With
    /// `may_free`, chunks covered entirely are freed (they become holes). `epoch` as for
    /// [`SledStore::write`].
    pub async fn zero(
        &self,
        epoch: Epoch,
        offset: u64,
        len: u64,
        may_free: bool,
    ) -> Result<(), StoreError> {
        self.check_deposed()?;
        debug_assert!(block_aligned(offset, len));
        let spec = self.check_range(offset, len)?;
        let started = Instant::now();
        let segs = spec.segments(offset, len);
        // Bound the fan-out of huge requests (a 5 GiB write-zeroes touches 80 chunks).
        for batch in segs.chunks(16) {
            let results = join_all(batch.iter().map(|seg| {
                let spec = &spec;
                let seg = *seg;
                async move {
                    if self.is_empty(seg.chunk) {
                        return Ok(());
                    }
                    if may_free && seg.offset == 0 && seg.len == spec.chunk_size {
                        let r = self
                            .on_replicas(spec, seg, Some(epoch), |c, cred| async move {
                                c.free(&cred, seg.chunk).await
                            })
                            .await;
                        if r.is_ok() {
                            self.set_empty(seg.chunk, true, spec.chunks());
                        }
                        return r;
                    }
                    self.on_replicas(spec, seg, Some(epoch), |c, cred| async move {
                        c.write_zeroes(&cred, seg.chunk, seg.offset, seg.len).await
                    })
                    .await
                }
            }))
            .await;
            for r in results {
                r?;
            }
        }
        self.metrics.observe_stage("sled_zero", started);
        Ok(())
    }

    /// Allocates, on every replica, the chunks of `[offset, offset+len)` not known to be
    /// allocated (empty or unknown ones; allocating a held chunk again changes nothing). A
    /// write-back log calls this before accepting a write, so a sled that is out of space
    /// refuses the write with `NoSpace` instead of failing its write-back later.
    pub async fn ensure_allocated(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check_deposed()?;
        let spec = self.check_range(offset, len)?;
        for seg in spec.segments(offset, len) {
            if self.is_held(seg.chunk) {
                continue;
            }
            match self
                .on_replicas(&spec, seg, None, |c, cred| async move {
                    c.allocate(&cred, seg.chunk).await
                })
                .await
            {
                Ok(()) => self.set_empty(seg.chunk, false, spec.chunks()),
                // A replica that cannot be reached does not refuse the write: its write-back
                // waits for it or records it stale, and allocates the chunk there.
                Err(StoreError::Replica { sled, msg }) => {
                    tracing::debug!(volume_id = %spec.id, sled_id = %sled, error = %msg,
                        "cannot allocate ahead on a replica; the write-back will");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Brings a stale sled back: claims the volume on it under the current epoch (fencing any
    /// older holder there), then copies each chunk it missed from a current replica (or frees
    /// it there when no current replica holds the chunk), one chunk at a time with mutations
    /// held back. `missed` is what the replicated record says it missed (`None`: unknown, so
    /// every chunk it is a replica of); see the module's notes for what is added to it. Returns
    /// the bytes copied. When it returns `Ok`, the sled has every chunk and receives every
    /// mutation; the group then records it current. The sled stays stale (and unread)
    /// throughout.
    ///
    /// `epoch` is the one the resynchronisation was started under: once the store writes under
    /// another (this node lost the leadership and won it again), a late pass of the earlier one
    /// fails instead of replacing the newer pass's progress.
    pub async fn resync(
        &self,
        sled: SledId,
        missed: Option<BTreeSet<u64>>,
        epoch: Epoch,
    ) -> Result<u64, StoreError> {
        self.check_deposed()?;
        self.check_epoch(sled, epoch)?;
        let volume = self.spec().id;
        // A fresh claim, not a remembered one: the sled may have lost or missed it.
        self.claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&sled);
        self.claim_one(sled).await?;
        let Some((generation, copy)) = self.plan_resync(sled, missed, epoch).await? else {
            return Ok(0);
        };
        tracing::info!(volume_id = %volume, sled_id = %sled, chunks = copy.len(),
            "resynchronising a stale sled");
        let result = self.resync_chunks(sled, generation, copy, epoch).await;
        if result.is_err() {
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            if h.resync.get(&sled).is_some_and(|(g, _)| *g == generation) {
                h.resync.remove(&sled);
            }
        }
        result
    }

    /// Fails once the store writes under another epoch than `epoch`.
    fn check_epoch(&self, sled: SledId, epoch: Epoch) -> Result<(), StoreError> {
        if self.epoch() == epoch {
            Ok(())
        } else {
            Err(StoreError::Replica {
                sled,
                msg: format!("resynchronisation of epoch {} superseded", epoch.0),
            })
        }
    }

    /// Decides, with mutations held back, which chunks `sled` must be sent and which it holds
    /// already, and starts a resynchronisation generation in which the latter count as copied.
    /// `None` when the sled is no longer stale.
    async fn plan_resync(
        &self,
        sled: SledId,
        missed: Option<BTreeSet<u64>>,
        epoch: Epoch,
    ) -> Result<Option<(u64, BTreeSet<u64>)>, StoreError> {
        // A sled that lost chunks (a replaced or wiped device) misses more than any record
        // says: what a current replica holds and it does not is copied too. Asked before the
        // gate is taken (mutations are not held back by sled round trips): a mutation between
        // these answers and the gate either skipped the sled (and is noted in `missed`, read
        // under the gate) or reached it, which no mutation does before a pass has begun.
        let lost = match &missed {
            Some(_) => self.held_elsewhere(sled).await?,
            None => None,
        };
        let _gate = self.gate.write().await;
        self.check_deposed()?;
        self.check_epoch(sled, epoch)?;
        let spec = self.spec();
        let mine: BTreeSet<u64> = (0..spec.chunks())
            .filter(|c| spec.placement[*c as usize].contains(&sled))
            .collect();
        let copy = match (missed, lost) {
            (Some(mut copy), Some(lost)) => {
                let skipped = self
                    .health
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .missed
                    .get(&sled)
                    .cloned()
                    .unwrap_or_default();
                copy.extend(skipped);
                copy.extend(lost);
                copy.retain(|c| mine.contains(c));
                copy
            }
            // Not known what it missed, or not known what it lost: everything.
            _ => mine.clone(),
        };
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if !h.stale.contains(&sled) {
            return Ok(None);
        }
        h.next_gen += 1;
        let g = h.next_gen;
        let done: BTreeSet<u64> = mine.difference(&copy).copied().collect();
        h.resync.insert(sled, (g, done));
        Ok(Some((g, copy)))
    }

    /// The chunks of `sled` that a current replica sharing them holds and the sled does not
    /// (asked of all of them at once); `None` when a current replica cannot tell (then
    /// everything is copied).
    async fn held_elsewhere(&self, sled: SledId) -> Result<Option<BTreeSet<u64>>, StoreError> {
        let spec = self.spec();
        let mine = |c: u64| {
            spec.placement
                .get(c as usize)
                .is_some_and(|r| r.contains(&sled))
        };
        let stale = self.stale();
        let sources: BTreeSet<SledId> = spec
            .placement
            .iter()
            .filter(|r| r.contains(&sled))
            .flatten()
            .copied()
            .filter(|s| *s != sled && !stale.contains(s))
            .collect();
        let volume = spec.id;
        let stat = |s: SledId| async move {
            let client = self
                .conn(s)
                .await
                .map_err(|e| e.to_string())?
                .client()
                .await
                .map_err(|e| e.to_string())?;
            client
                .volume_stat(volume)
                .await
                .map(|v| v.chunks.iter().map(|c| c.0).collect::<BTreeSet<u64>>())
                .map_err(|e| e.to_string())
        };
        let (on_target, held) =
            futures_util::join!(stat(sled), join_all(sources.iter().map(|s| stat(*s))));
        let on_target = on_target.map_err(|msg| StoreError::Replica { sled, msg })?;
        let mut lost = BTreeSet::new();
        for h in held {
            let Ok(h) = h else {
                return Ok(None);
            };
            lost.extend(h.into_iter().filter(|c| mine(*c) && !on_target.contains(c)));
        }
        Ok(Some(lost))
    }

    async fn resync_chunks(
        &self,
        sled: SledId,
        generation: u64,
        copy: BTreeSet<u64>,
        epoch: Epoch,
    ) -> Result<u64, StoreError> {
        let replica_err = |msg: String| StoreError::Replica { sled, msg };
        let mut copied = 0u64;
        // A volume grown meanwhile has chunks this pass does not know: they are not counted
        // copied, so the sled is not complete and the next pass takes them.
        for chunk in copy {
            let spec = self.spec();
            let Some(replicas) = spec.placement.get(chunk as usize).cloned() else {
                continue;
            };
            // Connected before the gate is taken: mutations are not held back by a reconnect.
            let target = self
                .conn(sled)
                .await?
                .client()
                .await
                .map_err(|e| replica_err(e.to_string()))?;
            let _gate = self.gate.write().await;
            self.check_deposed()?;
            self.check_epoch(sled, epoch)?;
            {
                let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
                if h.resync.get(&sled).is_none_or(|(g, _)| *g != generation) {
                    return Err(replica_err("resynchronisation abandoned".into()));
                }
            }
            let cred = self.credential();
            let stale = self.stale();
            let sources: Vec<SledId> = replicas
                .iter()
                .copied()
                .filter(|s| {
                    *s != sled && !stale.contains(s) && !self.is_lacking(*s, ChunkIndex(chunk))
                })
                .collect();
            copied += self
                .copy_chunk(&spec, ChunkIndex(chunk), &sources, sled, &target, &cred)
                .await?;
            let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
            match h.resync.get_mut(&sled) {
                Some((g, done)) if *g == generation => {
                    done.insert(chunk);
                }
                _ => return Err(replica_err("resynchronisation abandoned".into())),
            }
        }
        Ok(copied)
    }

    /// Makes `chunk` on `target` what it is on a current replica: a copy from the first source
    /// that holds it, or, when every source answers that it holds nothing, a free (a source that
    /// cannot answer leaves the question open: an error, never a free). Called with the gate
    /// held.
    async fn copy_chunk(
        &self,
        spec: &VolumeSpec,
        chunk: ChunkIndex,
        sources: &[SledId],
        sled: SledId,
        target: &common::sled_client::SledClient,
        cred: &Credential,
    ) -> Result<u64, StoreError> {
        const PIECE: u64 = 4 << 20;
        let replica_err = |msg: String| StoreError::Replica { sled, msg };
        let target_holds = target
            .volume_stat(spec.id)
            .await
            .map_err(|e| replica_err(e.to_string()))?
            .chunks
            .contains(&chunk);
        let mut errors = Vec::new();
        let mut not_held = 0;
        for source in sources {
            let attempt = async {
                let client = self
                    .conn(*source)
                    .await
                    .map_err(|e| StoreError::Io(e.to_string()))?
                    .client()
                    .await
                    .map_err(|e| StoreError::Io(e.to_string()))?;
                let holds = client
                    .volume_stat(spec.id)
                    .await
                    .map_err(|e| StoreError::Io(e.to_string()))?
                    .chunks
                    .contains(&chunk);
                if !holds {
                    return Ok(None);
                }
                let mut at = 0;
                while at < spec.chunk_size {
                    let len = PIECE.min(spec.chunk_size - at);
                    let buf = client
                        .read(spec.id, chunk, at, len as u32)
                        .await
                        .map_err(|e| StoreError::Io(e.to_string()))?;
                    target
                        .write(cred, chunk, at, buf)
                        .await
                        .map_err(|e| self.mutation_error(sled, cred.epoch, e))?;
                    self.metrics.resync_bytes.inc_by(len);
                    at += len;
                }
                Ok(Some(spec.chunk_size))
            };
            match attempt.await {
                Ok(Some(n)) => return Ok(n),
                Ok(None) => not_held += 1,
                // The target's failure ends this resynchronisation; a source's tries the next.
                Err(
                    e @ (StoreError::Deposed { .. }
                    | StoreError::EpochEnded { .. }
                    | StoreError::Replica { .. }),
                ) => {
                    return Err(e);
                }
                Err(e) => errors.push(format!("sled {source}: {e}")),
            }
        }
        if !sources.is_empty() && errors.is_empty() && not_held == sources.len() {
            if target_holds {
                target
                    .free(cred, chunk)
                    .await
                    .map_err(|e| self.mutation_error(sled, cred.epoch, e))?;
            }
            return Ok(0);
        }
        Err(replica_err(format!(
            "no current replica of chunk {} could be read: {}",
            chunk.0,
            errors.join("; ")
        )))
    }

    /// Frees `chunks` on `sled`, which the placement no longer names as one of their
    /// replicas (a drained sled): what it holds of them is not read or written any more.
    /// Refuses a chunk the sled is still a replica of. The frees wait for the mutations in
    /// flight (one that looked at the placement before the change may still be writing to the
    /// sled), so nothing reallocates them afterwards.
    pub async fn release(&self, sled: SledId, chunks: &[u64]) -> Result<u64, StoreError> {
        let spec = self.spec();
        if let Some(c) = chunks.iter().find(|c| {
            spec.placement
                .get(**c as usize)
                .is_none_or(|r| r.contains(&sled))
        }) {
            return Err(StoreError::Replica {
                sled,
                msg: format!("chunk {c} still has a replica on the sled (or no such chunk)"),
            });
        }
        // Reached and claimed before the gate is taken: mutations are not held back by a
        // sled that does not answer.
        self.ensure_claimed(sled).await?;
        let client = self
            .conn(sled)
            .await?
            .client()
            .await
            .map_err(|e| StoreError::Replica {
                sled,
                msg: e.to_string(),
            })?;
        let _gate = self.gate.write().await;
        self.check_deposed()?;
        let cred = self.credential();
        let held = client
            .volume_stat(spec.id)
            .await
            .map_err(|e| StoreError::Replica {
                sled,
                msg: e.to_string(),
            })?
            .chunks;
        let mut freed = 0;
        for c in chunks {
            if held.contains(&ChunkIndex(*c)) {
                client
                    .free(&cred, ChunkIndex(*c))
                    .await
                    .map_err(|e| self.mutation_error(sled, cred.epoch, e))?;
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// Allocation of `[offset, offset+len)` by chunk: `(length, allocated)` runs.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let spec = self.spec();
        let end = (offset + len).min(spec.size);
        let mut out: Vec<(u64, bool)> = Vec::new();
        if offset >= end {
            return out;
        }
        for seg in spec.segments(offset, end - offset) {
            let allocated = !self.is_empty(seg.chunk);
            match out.last_mut() {
                Some((l, a)) if *a == allocated => *l += seg.len,
                _ => out.push((seg.len, allocated)),
            }
        }
        out
    }

    /// The volume's metrics.
    pub fn metrics(&self) -> &VolumeMetrics {
        &self.metrics
    }

    /// The cluster key (for re-minting after an epoch change).
    pub fn key(&self) -> &ClusterKey {
        &self.key
    }
}

/// The chunks placed on `sled` that a replica holds (`held`) and `sled` does not (`mine`).
fn lacking_of(
    spec: &VolumeSpec,
    sled: SledId,
    mine: &BTreeSet<u64>,
    held: impl Fn(u64) -> bool,
) -> BTreeSet<u64> {
    (0..spec.chunks())
        .filter(|c| spec.placement[*c as usize].contains(&sled))
        .filter(|c| !mine.contains(c) && held(*c))
        .collect()
}
