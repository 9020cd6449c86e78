//! A replicated volume as NBD sees it, on every node of its group.
//!
//! On the leader, a write is ordered by a first-come-first-served range lock (which also makes
//! read-modify-write of unaligned requests atomic), proposed, and acknowledged once committed
//! (durable in a majority of logs): FLUSH and FUA are satisfied by commit. A read gets a
//! ReadIndex barrier and the overlay of committed-unflushed data from the group, and reads the
//! rest from the sleds. On any other node the same calls are forwarded to the leader over the
//! peer transport; when there is no leader (an election) or it changes, the call waits and
//! tries again until `failover_timeout`, so a client connected to a surviving node sees a pause,
//! not an error.
//!
//! **Throttling.** Reads, writes, trims and write-zeroes are admitted by the volume's
//! [`VolumeThrottle`] on the serving leader, before any work, and never fail for it: they
//! wait. A request forwarded by a follower is throttled where it is served, once. A request
//! that `with_leader` retries after an election is charged at most once on each node (a flag
//! per request), so a retry never pays twice on the same node. (A forwarded call the follower
//! sends again to the same leader — its connection broke, or the call outlived its timeout —
//! is a new call there and pays again.)
//! A request waiting in the leader's throttle keeps its forwarded call open, so a volume may
//! have at most [`FORWARD_CALLS`] calls (and [`FORWARD_BYTES`] of payload) forwarded from one
//! node at a time: the connection between two nodes is shared by all their volumes, and one
//! held-back volume must not take it from the others. Its call times out only after the
//! failover timeout plus what the throttle may make it wait (`throttle_allowance`): a
//! throttle delays a forwarded request as it delays a local one, and never fails it.
//! A trim or write-zeroes costs one op and no bytes (one log entry, whatever its range). Flush
//! is not throttled: the head node answers it without work (every acknowledged write is
//! already committed), so charging it would only slow clients that flush often. Block status
//! is a metadata query answered from memory and is not throttled either.

use super::GroupId;
use super::driver::{GroupHandle, ReplError};
use super::entry::EntryHeader;
use super::overlay::Piece;
use super::peer_proto::RefuseCode;
use super::throttle::VolumeThrottle;
use super::transport::{Transport, TransportError};
use crate::nbd::{ExportInfo, Extent, Volume, VolumeError};
use crate::volume::rangelock::RangeLock;
use crate::volume::session::{self, ClientSession};
use crate::volume::store::StoreError;
use crate::volume::{BLOCK, VolumeSpec};
use common::AlignedBuf;
use common::ids::NodeId;
use common::throttle::Request;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The most allocation runs one block-status answer carries: a forwarded answer must fit in one
/// peer frame's control data (a run encodes in at most 11 bytes; 64 KiB holds 5,900), and an
/// NBD reply of thousands of extents already serves a client that asks again from where it
/// ends.
pub const MAX_ALLOCATION_RUNS: usize = 4096;

/// The most calls one volume has forwarded to its leader at a time from one node; later ones
/// wait on this node, in order. The connection between two head nodes is shared by every
/// volume they both host and runs a bounded number of calls
/// ([`TransportConfig::max_calls_in_flight`](super::transport::TransportConfig), 1,024): without
/// a share per volume, a volume whose leader holds its requests back (its throttle, a slow
/// sled) would fill it and stall every other volume between the two nodes. 128 keeps a
/// queue deep enough for any one client and takes eight such volumes to fill the connection.
pub const FORWARD_CALLS: usize = 128;

/// The most payload bytes (written, or read back) one volume has in flight in forwarded calls
/// from one node, for the same reason: the leader bounds the bytes of the calls it runs per
/// connection (256 MiB). One largest request always fits.
pub const FORWARD_BYTES: u64 = crate::volume::MAX_PAYLOAD as u64;

/// The payload bytes the leader's own NBD clients may have waiting in one volume's throttle when
/// no other value is given: the NBD server's default `max-volume-inflight-bytes`.
pub const DEFAULT_CLIENT_BYTES: u64 = 256 << 20;

/// The payload bytes that may wait in a volume's throttle on its leader: what the leader's own
/// NBD connections may have in flight on the volume (`client_bytes`, its
/// `max-volume-inflight-bytes`; head nodes of one cluster share their configuration) and the
/// forwarded calls of the two other members ([`FORWARD_BYTES`] each).
const fn bytes_ahead(client_bytes: u64) -> u64 {
    client_bytes.saturating_add(2 * FORWARD_BYTES)
}

/// How long a forwarded request may wait in its leader's throttle: what may be queued ahead of
/// it — the queue's places and [`bytes_ahead`] — paid at the volume's baseline rates (bursts
/// only go faster). A forwarded call gets this on top of the failover timeout, so a throttle
/// delays a request through a follower as it does on the leader and never fails it, while a
/// leader that took a call and never answers is still given up on (capped at an hour).
fn throttle_allowance(qos: &common::throttle::QosConfig, client_bytes: u64) -> Duration {
    let ahead = bytes_ahead(client_bytes);
    let ops_ahead = super::throttle::QUEUE_BOUND as u64 + ahead / common::throttle::OP_SIZE;
    let mut secs = 0.0;
    if let Some(iops) = qos.iops {
        secs += ops_ahead as f64 / iops.max(1) as f64;
    }
    if let Some(bandwidth) = qos.bandwidth {
        secs += ahead as f64 / bandwidth.max(1) as f64;
    }
    Duration::from_secs_f64(secs.min(3600.0))
}

/// A volume operation forwarded to the leader. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeRpc {
    /// Read (block-aligned).
    Read {
        /// Group.
        group: GroupId,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write the call's data (any alignment: the leader does the read-modify-write).
    Write {
        /// Group.
        group: GroupId,
        /// Offset.
        offset: u64,
    },
    /// Write zeroes over a range (any alignment).
    WriteZeroes {
        /// Group.
        group: GroupId,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Keep the range allocated.
        no_hole: bool,
    },
    /// Trim a range (whole blocks inside it).
    Trim {
        /// Group.
        group: GroupId,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Allocation of a range.
    BlockStatus {
        /// Group.
        group: GroupId,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A control-plane operation on a group (see `control::rpc`); the call's data is the
    /// postcard-encoded `GroupOp`. Not the control part: a volume's description carries the
    /// placement of every chunk (~58 bytes each with three replicas), which passes the control
    /// part's 64 KiB bound from about 1,100 chunks on.
    Group {
        /// Group.
        group: GroupId,
    },
    /// An admin API request forwarded to the metadata leader; the call's data is the JSON
    /// request.
    Admin,
    /// `rpc`, made for a client session: refused if the client has connected again since
    /// (see [`crate::volume::session`]).
    InSession {
        /// The session.
        session: ClientSession,
        /// The call (not itself `InSession`).
        rpc: Box<VolumeRpc>,
    },
    /// Record a client's new connection in the log: its older connections end.
    OpenSession {
        /// Group.
        group: GroupId,
        /// The new connection.
        session: ClientSession,
    },
}

impl VolumeRpc {
    /// The group a volume call is for (`None` for an admin call).
    pub fn group(&self) -> Option<GroupId> {
        match self {
            VolumeRpc::Read { group, .. }
            | VolumeRpc::Write { group, .. }
            | VolumeRpc::WriteZeroes { group, .. }
            | VolumeRpc::Trim { group, .. }
            | VolumeRpc::BlockStatus { group, .. }
            | VolumeRpc::Group { group }
            | VolumeRpc::OpenSession { group, .. } => Some(*group),
            VolumeRpc::InSession { rpc, .. } => rpc.group(),
            VolumeRpc::Admin => None,
        }
    }
}

/// The answer to a [`VolumeRpc`]. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeRpcReply {
    /// Done.
    Ok,
    /// Read data follows.
    Data,
    /// `(length, allocated)` runs.
    Extents(Vec<(u64, bool)>),
    /// Not the leader (retry there).
    NotLeader(Option<NodeId>),
    /// No such group on that node.
    NoGroup,
    /// Out of space.
    NoSpace,
    /// Failed.
    Failed(String),
    /// The answer to a `Group` call.
    Group(crate::control::rpc::GroupReply),
    /// The answer to an `Admin` call: the HTTP status; the data is the JSON body.
    Admin(u16),
    /// Refused without being done: the volume is detaching here, or the call's client session
    /// has ended (ESHUTDOWN; a client that is still there connects again).
    ShutDown,
}

/// Errors of one attempt.
#[derive(Debug)]
enum Attempt {
    Retry,
    Fatal(VolumeError),
}

fn repl_error(e: ReplError) -> Attempt {
    match e {
        ReplError::NotLeader { .. } | ReplError::NoVolume | ReplError::Stopped => Attempt::Retry,
        ReplError::NoSpace => Attempt::Fatal(VolumeError::NoSpace),
        // The client gave this connection up: what it left here must not reach the log. (A
        // live client seeing this connects again.)
        ReplError::SessionEnded(_) => Attempt::Fatal(VolumeError::ShuttingDown),
        other => Attempt::Fatal(VolumeError::io(std::io::Error::other(other.to_string()))),
    }
}

fn store_error(e: StoreError) -> Attempt {
    match e {
        StoreError::NoSpace(_) => Attempt::Fatal(VolumeError::NoSpace),
        StoreError::OutOfRange { offset, len } => Attempt::Fatal(VolumeError::OutOfRange {
            offset,
            length: len,
        }),
        // A deposed store: the group steps down; the request goes to the new leader. (An ended
        // term only concerns write-back, but it means the same: leadership moved.)
        StoreError::Deposed { .. } | StoreError::EpochEnded { .. } => Attempt::Retry,
        e @ StoreError::Replica { .. } => {
            Attempt::Fatal(VolumeError::io(std::io::Error::other(e.to_string())))
        }
        StoreError::Io(m) => Attempt::Fatal(VolumeError::io(std::io::Error::other(m))),
    }
}

const fn floor(v: u64) -> u64 {
    v / BLOCK * BLOCK
}

const fn ceil(v: u64) -> u64 {
    v.div_ceil(BLOCK) * BLOCK
}

/// A replicated volume on one node.
pub struct ReplicatedVolume<T: Transport> {
    group: GroupHandle,
    node: NodeId,
    name: String,
    transport: Arc<T>,
    locks: RangeLock,
    failover_timeout: Duration,
    detached: tokio::sync::watch::Sender<bool>,
    inflight: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
    throttle: Option<Arc<VolumeThrottle>>,
    /// This volume's share of the calls to its leader ([`FORWARD_CALLS`]).
    forward_calls: tokio::sync::Semaphore,
    /// This volume's share of the payload in forwarded calls, in KiB ([`FORWARD_BYTES`]).
    forward_kib: tokio::sync::Semaphore,
    /// What the NBD clients of one node may have in flight on the volume (see
    /// [`throttle_allowance`]).
    client_bytes: u64,
}

/// A request's place in its volume's share of the forwarded calls, held across its attempts.
struct ForwardSlot<'a> {
    _call: Option<tokio::sync::SemaphorePermit<'a>>,
    _kib: Option<tokio::sync::SemaphorePermit<'a>>,
}

/// Counts one NBD request in flight on a volume (for draining at detach).
struct InFlight<'a> {
    n: &'a std::sync::atomic::AtomicUsize,
    idle: &'a tokio::sync::Notify,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }
}

impl<T: Transport> std::fmt::Debug for ReplicatedVolume<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedVolume")
            .field("group", &self.group.group())
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> ReplicatedVolume<T> {
    /// The volume of `group` on this node.
    pub fn new(
        group: GroupHandle,
        node: NodeId,
        name: String,
        transport: Arc<T>,
        failover_timeout: Duration,
    ) -> Self {
        let (detached, _) = tokio::sync::watch::channel(false);
        Self {
            group,
            node,
            name,
            transport,
            locks: RangeLock::new(),
            failover_timeout,
            detached,
            inflight: std::sync::atomic::AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            throttle: None,
            forward_calls: tokio::sync::Semaphore::new(FORWARD_CALLS),
            forward_kib: tokio::sync::Semaphore::new(FORWARD_BYTES.div_ceil(1024) as usize),
            client_bytes: DEFAULT_CLIENT_BYTES,
        }
    }

    /// Sizes the wait a forwarded call allows for the throttle by what one node's NBD clients
    /// may have in flight on a volume (the NBD server's `max-volume-inflight-bytes`).
    pub fn with_client_bytes(mut self, bytes: u64) -> Self {
        self.client_bytes = bytes;
        self
    }

    /// Waits for a place in this volume's share of the forwarded calls for a request of
    /// `bytes` of payload. (The semaphores are never closed; a request larger than the share
    /// takes all of it.)
    async fn forward_slot(&self, bytes: u64) -> ForwardSlot<'_> {
        let call = self.forward_calls.acquire().await.ok();
        let kib = bytes.div_ceil(1024).min(FORWARD_BYTES.div_ceil(1024)) as u32;
        let kib = if kib == 0 {
            None
        } else {
            self.forward_kib.acquire_many(kib).await.ok()
        };
        ForwardSlot {
            _call: call,
            _kib: kib,
        }
    }

    /// Throttles the volume's I/O through `t` (on the leader).
    pub fn with_throttle(mut self, t: Arc<VolumeThrottle>) -> Self {
        self.throttle = Some(t);
        self
    }

    /// The volume's throttle on this node, if throttled.
    pub fn throttle(&self) -> Option<&Arc<VolumeThrottle>> {
        self.throttle.as_ref()
    }

    /// Admits `req` through the throttle, as the serving leader, unless this request was
    /// already charged on this node (`charged`: the request's flag, kept across retries). A
    /// detach ends the wait: the request never started, and its client is being disconnected,
    /// so it fails with `ShuttingDown` instead of keeping the detach waiting for the throttle.
    async fn admit(&self, req: Request, charged: &AtomicBool) -> Result<(), Attempt> {
        let Some(t) = &self.throttle else {
            return Ok(());
        };
        if charged.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let started = Instant::now();
        let mut detached = self.detached.subscribe();
        tokio::select! {
            _ = t.admit(&self.group, req) => {}
            _ = detached.wait_for(|d| *d) => {
                return Err(Attempt::Fatal(VolumeError::ShuttingDown));
            }
        }
        if let Some(store) = self.store() {
            store.metrics().observe_stage("throttle", started);
        }
        Ok(())
    }

    /// The group's sled store, once the volume exists (without copying the whole status).
    fn store(&self) -> Option<Arc<crate::volume::store::SledStore>> {
        self.group.peek(|s| s.store.clone())
    }

    fn track(&self) -> InFlight<'_> {
        self.inflight
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight {
            n: &self.inflight,
            idle: &self.idle,
        }
    }

    /// Requests of NBD clients being served now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once no NBD request is in flight.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.inflight() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// The group's handle.
    pub fn handle(&self) -> &GroupHandle {
        &self.group
    }

    /// The volume's description, once created.
    pub fn spec(&self) -> Option<Arc<VolumeSpec>> {
        self.group.peek(|s| s.spec.clone())
    }

    /// Detaches: connections finish what they have in flight and disconnect.
    pub fn detach(&self) {
        self.detached.send_replace(true);
    }

    /// Attaches again after a detach.
    pub fn attach(&self) {
        self.detached.send_replace(false);
    }

    /// True once detached.
    pub fn is_detached(&self) -> bool {
        *self.detached.borrow()
    }

    /// The volume's name (its description's, once bound).
    pub fn name(&self) -> String {
        self.spec()
            .map_or_else(|| self.name.clone(), |s| s.name.clone())
    }

    /// Runs `op` on the leader — here when this node serves, forwarded otherwise — retrying
    /// through elections until `failover_timeout`. A forwarded request first waits for its
    /// place in the volume's share of the forwarded calls ([`FORWARD_CALLS`], `bytes` of
    /// [`FORWARD_BYTES`]); that wait is back-pressure, so the failover timeout counts from its
    /// end.
    async fn with_leader<R, L, F, LF, FF>(
        &self,
        bytes: u64,
        mut local: L,
        mut forward: F,
    ) -> Result<R, VolumeError>
    where
        L: FnMut() -> LF,
        LF: std::future::Future<Output = Result<R, Attempt>>,
        F: FnMut(NodeId) -> FF,
        FF: std::future::Future<Output = Result<R, Attempt>>,
    {
        let mut deadline = tokio::time::Instant::now() + self.failover_timeout;
        let mut slot = None;
        loop {
            if *self.detached.borrow() {
                return Err(VolumeError::ShuttingDown);
            }
            // Only the fields needed: a whole status copy (placement, progress…) per request
            // would be an allocation on the I/O path.
            let (failed, serving, leader) =
                self.group.peek(|s| (s.failed.clone(), s.serving, s.leader));
            if let Some(e) = failed {
                return Err(VolumeError::io(std::io::Error::other(e)));
            }
            let attempt = if serving {
                Some(local().await)
            } else if let Some(l) = leader.filter(|l| *l != self.node) {
                if slot.is_none() {
                    let waited = tokio::time::Instant::now();
                    let mut detached = self.detached.subscribe();
                    tokio::select! {
                        s = self.forward_slot(bytes) => slot = Some(s),
                        _ = detached.wait_for(|d| *d) => return Err(VolumeError::ShuttingDown),
                    }
                    deadline += waited.elapsed();
                    // The leader may have changed while this request waited: look again.
                    continue;
                }
                Some(forward(l).await)
            } else {
                None
            };
            match attempt {
                Some(Ok(r)) => return Ok(r),
                Some(Err(Attempt::Fatal(e))) => return Err(e),
                Some(Err(Attempt::Retry)) | None => {}
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(VolumeError::io(std::io::Error::other(format!(
                    "volume {}: no leader could serve the request within {:?}",
                    self.name, self.failover_timeout
                ))));
            }
            let wait = (deadline - now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(wait, self.group.changed()).await;
        }
    }

    /// The timeout of a forwarded call: the failover timeout, plus what the volume's throttle
    /// may hold it back on the leader (the calls go to the throttled leader, whichever it is).
    fn call_timeout(&self) -> Duration {
        let qos = self.group.peek(|s| s.qos);
        self.failover_timeout + throttle_allowance(&qos, self.client_bytes)
    }

    async fn forward(
        &self,
        to: NodeId,
        rpc: VolumeRpc,
        data: Option<Arc<AlignedBuf>>,
    ) -> Result<(VolumeRpcReply, AlignedBuf), Attempt> {
        let rpc = match session::current() {
            Some(session) => VolumeRpc::InSession {
                session,
                rpc: Box::new(rpc),
            },
            None => rpc,
        };
        let ctl = postcard::to_stdvec(&rpc)
            .map_err(|e| Attempt::Fatal(VolumeError::io(std::io::Error::other(e))))?;
        match self
            .transport
            .call(to, ctl, data, self.call_timeout())
            .await
        {
            Ok((ctl, data)) => match postcard::from_bytes::<VolumeRpcReply>(&ctl) {
                Ok(VolumeRpcReply::NotLeader(_)) | Ok(VolumeRpcReply::NoGroup) => {
                    Err(Attempt::Retry)
                }
                Ok(VolumeRpcReply::NoSpace) => Err(Attempt::Fatal(VolumeError::NoSpace)),
                Ok(VolumeRpcReply::ShutDown) => Err(Attempt::Fatal(VolumeError::ShuttingDown)),
                Ok(VolumeRpcReply::Failed(m)) => {
                    Err(Attempt::Fatal(VolumeError::io(std::io::Error::other(m))))
                }
                Ok(r) => Ok((r, data)),
                Err(e) => Err(Attempt::Fatal(VolumeError::io(std::io::Error::other(e)))),
            },
            Err(TransportError::UnknownPeer(_)) => Err(Attempt::Fatal(VolumeError::io(
                std::io::Error::other("leader is not a known peer"),
            ))),
            // A call the protocol cannot carry fails the same way on every leader.
            Err(e @ TransportError::TooLarge { .. })
            | Err(
                e @ TransportError::Refused {
                    code: RefuseCode::TooLarge,
                    ..
                },
            ) => Err(Attempt::Fatal(VolumeError::io(std::io::Error::other(e)))),
            // Connection trouble: the leader may be dying; ask again.
            Err(_) => Err(Attempt::Retry),
        }
    }

    // ---- leader-side operations (also what forwarded calls run) ----

    /// Reads block-aligned `[offset, offset+len)` as the serving leader.
    async fn local_read(&self, offset: u64, len: u64) -> Result<AlignedBuf, Attempt> {
        let started = Instant::now();
        let pieces = self.group.read(offset, len).await.map_err(repl_error)?;
        let store = self.store().ok_or(Attempt::Retry)?;
        store.metrics().observe_stage("read_index", started);
        if let [(l, Piece::Sled)] = pieces.as_slice()
            && *l == len
        {
            return store.read(offset, len).await.map_err(store_error);
        }
        let mut out = AlignedBuf::zeroed(len as usize);
        let mut pos = 0u64;
        for (l, p) in pieces {
            let at = pos as usize;
            match p {
                Piece::Data(d) => out[at..at + l as usize].copy_from_slice(&d),
                Piece::Zero { .. } => {}
                Piece::Sled => {
                    let b = store.read(offset + pos, l).await.map_err(store_error)?;
                    out[at..at + l as usize].copy_from_slice(&b);
                }
            }
            pos += l;
        }
        Ok(out)
    }

    async fn local_write(&self, offset: u64, data: bytes::Bytes) -> Result<(), Attempt> {
        let len = data.len() as u32;
        // Space first: a write the sleds cannot hold is refused now, not after it commits.
        let store = self.store().ok_or(Attempt::Retry)?;
        store
            .ensure_allocated(offset, u64::from(len))
            .await
            .map_err(store_error)?;
        let started = Instant::now();
        let r = self
            .group
            .propose_for(EntryHeader::Write { offset, len }, data, session::current())
            .await
            .map(|_| ())
            .map_err(repl_error);
        store.metrics().observe_stage("raft_commit", started);
        r
    }

    async fn local_zero(&self, offset: u64, len: u64, free: bool) -> Result<(), Attempt> {
        self.group
            .propose_for(
                EntryHeader::Zero { offset, len, free },
                bytes::Bytes::new(),
                session::current(),
            )
            .await
            .map(|_| ())
            .map_err(repl_error)
    }

    async fn local_allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, Attempt> {
        let store = self.store().ok_or(Attempt::Retry)?;
        let size = store.spec().size;
        let end = offset.saturating_add(len);
        if len == 0 || end > size {
            return Ok(Vec::new());
        }
        // Committed data not yet on the sleds decides where it lies: a committed trim is a
        // hole now, a committed write is data (the sleds' allocation covers the rest).
        let (start, stop) = (floor(offset), ceil(end).min(size));
        let pieces = self
            .group
            .read(start, stop - start)
            .await
            .map_err(repl_error)?;
        let mut runs: Vec<(u64, bool)> = Vec::new();
        fn push(runs: &mut Vec<(u64, bool)>, l: u64, a: bool) {
            match runs.last_mut() {
                Some((n, b)) if *b == a => *n += l,
                _ => runs.push((l, a)),
            }
        }
        let mut pos = start;
        for (l, p) in pieces {
            match p {
                Piece::Data(_) => push(&mut runs, l, true),
                Piece::Zero { provisioned } => push(&mut runs, l, provisioned),
                Piece::Sled => {
                    for (n, a) in store.allocation(pos, l) {
                        push(&mut runs, n, a);
                    }
                }
            }
            pos += l;
            if runs.len() > MAX_ALLOCATION_RUNS {
                // A run followed by another is complete: keep the first ones, the client
                // asks again for the rest (NBD lets a reply cover less than was asked).
                runs.truncate(MAX_ALLOCATION_RUNS);
                break;
            }
        }
        // Cut the block-aligned runs back to the request.
        let mut cut = offset - start;
        while cut > 0 && !runs.is_empty() {
            let take = cut.min(runs[0].0);
            runs[0].0 -= take;
            cut -= take;
            if runs[0].0 == 0 {
                runs.remove(0);
            }
        }
        let covered = offset + runs.iter().map(|(n, _)| n).sum::<u64>();
        let mut cut = covered.saturating_sub(end);
        while cut > 0
            && let Some(last) = runs.last_mut()
        {
            let take = cut.min(last.0);
            last.0 -= take;
            cut -= take;
            if last.0 == 0 {
                runs.pop();
            }
        }
        Ok(runs)
    }

    /// Checks a forwarded call's range as the NBD layer checks a client's request: inside the
    /// volume, without overflow, and reads and writes no larger than the maximum payload. The
    /// forwarding node checked it already against the size it exported; this guards the leader
    /// against a peer that did not (another version, a bug).
    fn check_rpc(&self, rpc: &VolumeRpc, data_len: usize) -> Result<(), String> {
        let (offset, len, payload) = match rpc {
            VolumeRpc::Read { offset, len, .. } => (*offset, *len, true),
            VolumeRpc::Write { offset, .. } => (*offset, data_len as u64, true),
            VolumeRpc::WriteZeroes { offset, len, .. } | VolumeRpc::Trim { offset, len, .. } => {
                (*offset, *len, false)
            }
            VolumeRpc::BlockStatus { .. }
            | VolumeRpc::Group { .. }
            | VolumeRpc::Admin
            | VolumeRpc::OpenSession { .. } => {
                return Ok(());
            }
            VolumeRpc::InSession { .. } => return Err("a session inside a session".into()),
        };
        // A forwarded read is the client's read rounded out to whole blocks (see `read`):
        // up to a block less one more at either end than the largest payload a client may ask.
        let max = u64::from(crate::volume::MAX_PAYLOAD)
            + if matches!(rpc, VolumeRpc::Read { .. }) {
                2 * crate::volume::BLOCK
            } else {
                0
            };
        if payload && len > max {
            return Err(format!("{len} bytes exceed the maximum payload of {max}"));
        }
        let size = self
            .group
            .peek(|s| s.spec.as_ref().map(|s| s.size))
            .ok_or("the volume is not created yet")?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(format!(
                "range {offset}+{len} is outside the volume's {size} bytes"
            )),
        }
    }

    /// Serves a forwarded call (this node is, or was, the leader); a call made for a client
    /// session runs on its behalf.
    pub async fn serve_rpc(
        &self,
        rpc: VolumeRpc,
        data: AlignedBuf,
    ) -> (VolumeRpcReply, Option<AlignedBuf>) {
        match rpc {
            VolumeRpc::InSession { session, rpc } => {
                session::scope(Some(session), self.serve_call(*rpc, data)).await
            }
            rpc => self.serve_call(rpc, data).await,
        }
    }

    async fn serve_call(
        &self,
        rpc: VolumeRpc,
        data: AlignedBuf,
    ) -> (VolumeRpcReply, Option<AlignedBuf>) {
        if !self.group.peek(|s| s.serving) {
            return (
                VolumeRpcReply::NotLeader(self.group.peek(|s| s.leader)),
                None,
            );
        }
        if let Err(why) = self.check_rpc(&rpc, data.len()) {
            tracing::warn!(volume = %self.name, error = %why, "refusing a forwarded call");
            return (VolumeRpcReply::Failed(why), None);
        }
        let req = match &rpc {
            VolumeRpc::Read { len, .. } => Some(Request::io(*len)),
            VolumeRpc::Write { .. } => Some(Request::io(data.len() as u64)),
            VolumeRpc::WriteZeroes { .. } | VolumeRpc::Trim { .. } => Some(Request::new(1, 0)),
            VolumeRpc::BlockStatus { .. }
            | VolumeRpc::Group { .. }
            | VolumeRpc::Admin
            | VolumeRpc::InSession { .. }
            | VolumeRpc::OpenSession { .. } => None,
        };
        if let Some(req) = req
            && self.admit(req, &AtomicBool::new(false)).await.is_err()
        {
            return (
                VolumeRpcReply::Failed("the volume is being detached".into()),
                None,
            );
        }
        let reply = |r: Result<VolumeRpcReply, Attempt>| match r {
            Ok(r) => r,
            Err(Attempt::Retry) => VolumeRpcReply::NotLeader(self.group.peek(|s| s.leader)),
            Err(Attempt::Fatal(VolumeError::NoSpace)) => VolumeRpcReply::NoSpace,
            Err(Attempt::Fatal(VolumeError::ShuttingDown)) => VolumeRpcReply::ShutDown,
            Err(Attempt::Fatal(e)) => VolumeRpcReply::Failed(e.to_string()),
        };
        match rpc {
            VolumeRpc::Read { offset, len, .. } => match self.local_read(offset, len).await {
                Ok(buf) => (VolumeRpcReply::Data, Some(buf)),
                Err(e) => (reply(Err(e)), None),
            },
            VolumeRpc::Write { offset, .. } => (
                reply(
                    self.leader_write(offset, data.into_bytes())
                        .await
                        .map(|_| VolumeRpcReply::Ok),
                ),
                None,
            ),
            VolumeRpc::WriteZeroes {
                offset,
                len,
                no_hole,
                ..
            } => (
                reply(
                    self.leader_write_zeroes(offset, len, no_hole)
                        .await
                        .map(|_| VolumeRpcReply::Ok),
                ),
                None,
            ),
            VolumeRpc::Trim { offset, len, .. } => (
                reply(
                    self.leader_trim(offset, len)
                        .await
                        .map(|_| VolumeRpcReply::Ok),
                ),
                None,
            ),
            VolumeRpc::Group { .. } | VolumeRpc::Admin | VolumeRpc::InSession { .. } => {
                (VolumeRpcReply::Failed("not a volume call".into()), None)
            }
            VolumeRpc::OpenSession { session, .. } => (
                reply(
                    self.leader_open_session(session)
                        .await
                        .map(|_| VolumeRpcReply::Ok),
                ),
                None,
            ),
            VolumeRpc::BlockStatus { offset, len, .. } => (
                reply(
                    self.local_allocation(offset, len)
                        .await
                        .map(VolumeRpcReply::Extents),
                ),
                None,
            ),
        }
    }

    async fn lock(&self, offset: u64, len: u64) -> crate::volume::rangelock::RangeGuard {
        self.locks
            .lock(offset / BLOCK, (offset + len.max(1) - 1) / BLOCK)
            .await
    }

    /// Read-modify-write of `bytes` at `offset` over whole blocks, as the serving leader (the
    /// caller holds the lock).
    async fn leader_rmw(&self, offset: u64, bytes: &[u8]) -> Result<(), Attempt> {
        let end = offset + bytes.len() as u64;
        let (start, stop) = (floor(offset), ceil(end));
        let mut buf = self.local_read(start, stop - start).await?;
        let at = (offset - start) as usize;
        buf[at..at + bytes.len()].copy_from_slice(bytes);
        self.local_write(start, buf.into_bytes()).await
    }

    /// A write of any alignment, as the serving leader.
    async fn leader_write(&self, offset: u64, data: bytes::Bytes) -> Result<(), Attempt> {
        let len = data.len() as u64;
        let _g = self.lock(offset, len).await;
        if offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK) {
            self.local_write(offset, data).await
        } else {
            self.leader_rmw(offset, &data).await
        }
    }

    /// Write-zeroes of any alignment, as the serving leader.
    async fn leader_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
    ) -> Result<(), Attempt> {
        let end = offset + len;
        let _g = self.lock(offset, len).await;
        let (start, stop) = (ceil(offset), floor(end));
        if start >= stop {
            return self.leader_rmw(offset, &vec![0u8; len as usize]).await;
        }
        if offset < start {
            self.leader_rmw(offset, &vec![0u8; (start - offset) as usize])
                .await?;
        }
        if stop < end {
            self.leader_rmw(stop, &vec![0u8; (end - stop) as usize])
                .await?;
        }
        // NO_HOLE keeps what is allocated (the zero does not free chunks) but does not
        // allocate thin chunks: QEMU sets NO_HOLE on every write-zeroes without unmap, so
        // provisioning them would turn thin volumes thick (see docs/ARCHITECTURE.md).
        self.local_zero(start, stop - start, !no_hole).await
    }

    /// Trim, as the serving leader: the whole blocks inside the range.
    async fn leader_trim(&self, offset: u64, len: u64) -> Result<(), Attempt> {
        let (start, stop) = (ceil(offset), floor(offset + len));
        if start >= stop {
            return Ok(());
        }
        let _g = self.lock(start, stop - start).await;
        self.local_zero(start, stop - start, true).await
    }

    /// Records a client's new connection, as the serving leader.
    async fn leader_open_session(&self, session: ClientSession) -> Result<(), Attempt> {
        self.group
            .propose(EntryHeader::ClientSession(session), bytes::Bytes::new())
            .await
            .map(|_| ())
            .map_err(repl_error)
    }

    fn rpc_ok(r: (VolumeRpcReply, AlignedBuf)) -> Result<(), Attempt> {
        match r.0 {
            VolumeRpcReply::Ok => Ok(()),
            _ => Err(Attempt::Retry),
        }
    }
}

impl<T: Transport> Volume for ReplicatedVolume<T> {
    fn info(&self) -> ExportInfo {
        let spec = self.spec();
        ExportInfo {
            name: spec
                .as_ref()
                .map_or_else(|| self.name.clone(), |s| s.name.clone()),
            description: spec
                .as_ref()
                .map(|s| format!("stockade volume {}", s.id))
                .unwrap_or_default(),
            size: spec.map_or(0, |s| s.size),
            read_only: false,
            multi_conn: true,
            min_block: 512,
            preferred_block: BLOCK as u32,
            max_block: crate::volume::MAX_PAYLOAD,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, VolumeError> {
        let _t = self.track();
        let end = offset + u64::from(len);
        let (start, stop) = (floor(offset), ceil(end));
        let gid = self.group.group();
        let charged = &AtomicBool::new(false);
        let buf = self
            .with_leader(
                stop - start,
                || async move {
                    self.admit(Request::io(stop - start), charged).await?;
                    self.local_read(start, stop - start).await
                },
                |l| async move {
                    let rpc = VolumeRpc::Read {
                        group: gid,
                        offset: start,
                        len: stop - start,
                    };
                    let (_, data) = self.forward(l, rpc, None).await?;
                    if data.len() as u64 == stop - start {
                        Ok(data)
                    } else {
                        Err(Attempt::Fatal(VolumeError::io(std::io::Error::other(
                            "short forwarded read",
                        ))))
                    }
                },
            )
            .await?;
        if start == offset && stop == end {
            return Ok(buf);
        }
        let at = (offset - start) as usize;
        Ok(AlignedBuf::from_slice(&buf[at..at + len as usize]))
    }

    async fn write(&self, offset: u64, data: AlignedBuf, _fua: bool) -> Result<(), VolumeError> {
        let _t = self.track();
        let gid = self.group.group();
        let shared = Arc::new(data);
        let bytes = AlignedBuf::shared_bytes(shared.clone());
        let charged = &AtomicBool::new(false);
        let len = bytes.len() as u64;
        self.with_leader(
            len,
            || {
                let bytes = bytes.clone();
                async move {
                    self.admit(Request::io(len), charged).await?;
                    self.leader_write(offset, bytes).await
                }
            },
            |l| {
                let payload = shared.clone();
                async move {
                    let r = self
                        .forward(l, VolumeRpc::Write { group: gid, offset }, Some(payload))
                        .await?;
                    Self::rpc_ok(r)
                }
            },
        )
        .await
    }

    /// Not throttled (see the module documentation): answered without work.
    async fn flush(&self) -> Result<(), VolumeError> {
        // Every acknowledged write is committed: durable in a majority of the group's logs.
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), VolumeError> {
        let _t = self.track();
        let gid = self.group.group();
        let charged = &AtomicBool::new(false);
        self.with_leader(
            0,
            || async move {
                self.admit(Request::new(1, 0), charged).await?;
                self.leader_trim(offset, len).await
            },
            |l| async move {
                let r = self
                    .forward(
                        l,
                        VolumeRpc::Trim {
                            group: gid,
                            offset,
                            len,
                        },
                        None,
                    )
                    .await?;
                Self::rpc_ok(r)
            },
        )
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
        _fua: bool,
    ) -> Result<(), VolumeError> {
        // Whole blocks are zeroed on the sleds without moving data; a partial block at either
        // end is a read-modify-write, as slow as a WRITE. FAST_ZERO asks to be refused then.
        if fast_only && !(offset.is_multiple_of(BLOCK) && (offset + len).is_multiple_of(BLOCK)) {
            return Err(VolumeError::NotSupported {
                reason: "a partial block is zeroed by read-modify-write, no faster than a write",
            });
        }
        let _t = self.track();
        let gid = self.group.group();
        let charged = &AtomicBool::new(false);
        self.with_leader(
            0,
            || async move {
                self.admit(Request::new(1, 0), charged).await?;
                self.leader_write_zeroes(offset, len, no_hole).await
            },
            |l| async move {
                let rpc = VolumeRpc::WriteZeroes {
                    group: gid,
                    offset,
                    len,
                    no_hole,
                };
                let r = self.forward(l, rpc, None).await?;
                Self::rpc_ok(r)
            },
        )
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        let _t = self.track();
        let gid = self.group.group();
        let runs = self
            .with_leader(
                0,
                || self.local_allocation(offset, len),
                |l| async move {
                    match self
                        .forward(
                            l,
                            VolumeRpc::BlockStatus {
                                group: gid,
                                offset,
                                len,
                            },
                            None,
                        )
                        .await?
                    {
                        (VolumeRpcReply::Extents(e), _) => Ok(e),
                        _ => Err(Attempt::Retry),
                    }
                },
            )
            .await?;
        if runs.is_empty() {
            return Err(VolumeError::OutOfRange {
                offset,
                length: len,
            });
        }
        Ok(runs
            .into_iter()
            .map(|(l, a)| if a { Extent::data(l) } else { Extent::hole(l) })
            .collect())
    }

    /// Commits the session to the log through the leader. It moves no data: the throttle and
    /// the unflushed-data bound do not hold it back (on a follower it does take a place in the
    /// volume's share of forwarded calls). A failure — no leader within the failover timeout —
    /// refuses the connection, and the client tries another head node.
    async fn open_session(&self, session: ClientSession) -> Result<(), VolumeError> {
        let gid = self.group.group();
        self.with_leader(
            0,
            || self.leader_open_session(session),
            |l| async move {
                let r = self
                    .forward(
                        l,
                        VolumeRpc::OpenSession {
                            group: gid,
                            session,
                        },
                        None,
                    )
                    .await?;
                Self::rpc_ok(r)
            },
        )
        .await
    }

    async fn cache(&self, _offset: u64, _len: u64) -> Result<(), VolumeError> {
        Ok(())
    }

    async fn closed(&self) {
        let mut rx = self.detached.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::throttle::QosConfig;

    #[test]
    fn a_forwarded_call_allows_for_what_the_configured_clients_may_queue_ahead() {
        assert_eq!(
            throttle_allowance(&QosConfig::UNLIMITED, DEFAULT_CLIENT_BYTES),
            Duration::ZERO
        );
        let mib = 1u64 << 20;
        let bandwidth = QosConfig {
            bandwidth: Some(16 * mib),
            ..QosConfig::UNLIMITED
        };
        // 256 MiB of the leader's clients and 32 MiB from each of two followers, at 16 MiB/s.
        assert_eq!(
            throttle_allowance(&bandwidth, DEFAULT_CLIENT_BYTES),
            Duration::from_secs(20)
        );
        // A node whose clients may have 1 GiB in flight on a volume waits for all of it.
        assert_eq!(
            throttle_allowance(&bandwidth, 1024 * mib),
            Duration::from_secs(68)
        );
        // Operations: the queue's places and the bytes ahead counted in 256 KiB operations.
        let iops = QosConfig {
            iops: Some(64),
            ..QosConfig::UNLIMITED
        };
        let ops = super::super::throttle::QUEUE_BOUND as u64
            + (1024 + 64) * mib / common::throttle::OP_SIZE;
        assert_eq!(
            throttle_allowance(&iops, 1024 * mib),
            Duration::from_secs_f64(ops as f64 / 64.0)
        );
        // Never more than an hour.
        let slow = QosConfig {
            bandwidth: Some(64 << 10),
            ..QosConfig::UNLIMITED
        };
        assert_eq!(
            throttle_allowance(&slow, DEFAULT_CLIENT_BYTES),
            Duration::from_secs(3600)
        );
    }
}
