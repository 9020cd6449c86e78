//! The TCP transport: one authenticated connection per pair of head nodes.
//!
//! **Who dials.** The node with the lower id dials (with jittered, bounded exponential backoff
//! while it cannot connect); the higher one accepts. Both directions share the connection. A new
//! authenticated connection from a peer supersedes the one it had (the old one is closed and its
//! calls fail at once), so a restarted peer is never shut out by a half-open old connection.
//!
//! **Authentication first.** Until the peer has proved knowledge of the cluster key
//! ([`peer_proto`](crate::replication::peer_proto) handshake, within
//! [`TransportConfig::handshake_timeout`]), only handshake frames are read — at most 512 control
//! bytes each, checked on the header before any allocation — and nothing reaches the protobuf
//! decoder or a handler. The accepting side refuses a peer that is not configured, claims to be
//! another node, or does not have the lower id. Unauthenticated connections in the handshake are
//! bounded ([`TransportConfig::max_pending_handshakes`]).
//!
//! **Tasks.** Each connection runs one reader and one writer (two futures of one task) plus a
//! task per incoming call. The writer takes Raft messages from the peer's bounded queue and
//! packs everything queued — many groups — into one frame; RPC frames come from a second
//! bounded queue. A malformed, oversized or corrupt frame closes the connection (other peers are
//! unaffected); a Raft message that does not decode is dropped and counted, never more.

use super::{
    Inbound, InboundRaft, PeerMetrics, RpcHandler, Transport, TransportConfig, TransportError,
};
use crate::replication::GroupId;
use crate::replication::peer_proto::{
    self as proto, Auth, Challenge, Frame, HEADER_LEN, Hello, Kind, MAX_CTL_LEN, MAX_DATA_LEN,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, PeerProtoError, Refusal, RefuseCode, Transcript,
};
use crate::replication::transport::sim::SimRng;
use common::AlignedBuf;
use common::cred::{ClusterKey, HandshakeRole, nonce};
use common::ids::NodeId;
use common::logging::RateLimit;
use futures_util::FutureExt;
use raft::prelude::Message;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::task::AbortHandle;

/// A connection that lasted this long resets the redial backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(1);

type CallResult = Result<(Vec<u8>, AlignedBuf), TransportError>;

/// Resolves once the transport is shutting down.
async fn shut_down(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error(transparent)]
    Proto(#[from] PeerProtoError),
    #[error("timed out")]
    Timeout,
    #[error("the peer refused: {0:?}: {1}")]
    Refused(RefuseCode, String),
    #[error("the peer could not prove the cluster key")]
    BadProof,
    #[error("expected node {expected}, reached node {got}")]
    WrongNode { expected: NodeId, got: NodeId },
    #[error("node {0} is not a configured peer")]
    UnknownNode(NodeId),
    #[error("node {0} may not dial this node (the lower id dials)")]
    NotDialer(NodeId),
    #[error("no common protocol version (peer speaks {min}..={max})")]
    Version { min: u16, max: u16 },
    #[error("unexpected {0:?} frame in the handshake")]
    Unexpected(Kind),
}

impl HandshakeError {
    fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Proto(PeerProtoError::Io(_) | PeerProtoError::Closed) => "io",
            HandshakeError::Proto(_) | HandshakeError::Unexpected(_) => "malformed",
            HandshakeError::Timeout => "timeout",
            HandshakeError::Refused(..) => "refused",
            HandshakeError::BadProof => "bad_proof",
            HandshakeError::WrongNode { .. } => "wrong_node",
            HandshakeError::UnknownNode(_) => "unknown_node",
            HandshakeError::NotDialer(_) => "not_dialer",
            HandshakeError::Version { .. } => "version",
        }
    }
}

/// Why an established connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Proto(#[from] PeerProtoError),
    #[error("nothing received for {0:?}")]
    Idle(Duration),
    #[error("a frame's body did not arrive within {0:?} of its header")]
    Stalled(Duration),
    #[error("superseded or removed")]
    Stopped,
    #[error("transport shut down")]
    Shutdown,
}

impl ConnError {
    /// The `protocol_errors` reason, for errors that blame the peer's frames.
    fn protocol_reason(&self) -> Option<&'static str> {
        match self {
            ConnError::Proto(e) => match e {
                PeerProtoError::Closed => None,
                PeerProtoError::Io(_) => Some("io"),
                PeerProtoError::Checksum { .. } => Some("checksum"),
                PeerProtoError::TooLarge { .. } => Some("too_large"),
                PeerProtoError::BatchMismatch { .. } => Some("batch"),
                PeerProtoError::Unexpected { .. } => Some("unexpected"),
                PeerProtoError::BadMagic(_)
                | PeerProtoError::Version { .. }
                | PeerProtoError::Kind(_)
                | PeerProtoError::Reserved(_)
                | PeerProtoError::Decode(_) => Some("malformed"),
            },
            ConnError::Idle(_) => Some("idle"),
            ConnError::Stalled(_) => Some("stalled"),
            ConnError::Stopped | ConnError::Shutdown => None,
        }
    }
}

/// A Raft message encoded and queued for the writer.
struct OutRaft {
    group: GroupId,
    bytes: Vec<u8>,
}

/// An RPC frame queued for the writer.
enum OutFrame {
    Request {
        tag: u64,
        ctl: Vec<u8>,
        data: Option<Arc<AlignedBuf>>,
    },
    Response {
        tag: u64,
        ctl: Vec<u8>,
        data: Option<AlignedBuf>,
    },
    RpcError {
        tag: u64,
        refusal: Refusal,
    },
}

/// One established connection, shared by senders and its tasks.
struct Conn {
    peer: NodeId,
    label: String,
    generation: u64,
    raft_tx: mpsc::Sender<OutRaft>,
    raft_queued: AtomicUsize,
    raft_queued_bytes: AtomicUsize,
    out_tx: mpsc::Sender<OutFrame>,
    pending: Mutex<HashMap<u64, oneshot::Sender<CallResult>>>,
    next_tag: AtomicU64,
    closed: AtomicBool,
    stop: Notify,
    calls: Semaphore,
    handlers: Arc<Semaphore>,
    handler_kib: Arc<Semaphore>,
    handler_kib_max: u32,
}

impl Conn {
    /// Asks the connection's task to end (superseded, removed).
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.stop.notify_one();
    }

    fn is_open(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
    }

    /// Refuses one incoming call without blocking the reader (dropped if the queue is full:
    /// the caller then times out).
    fn refuse(&self, tag: u64, code: RefuseCode, message: &str) {
        let _ = self.out_tx.try_send(OutFrame::RpcError {
            tag,
            refusal: Refusal::new(code, message),
        });
    }

    fn took_raft(&self, m: &OutRaft) {
        self.raft_queued.fetch_sub(1, Ordering::SeqCst);
        self.raft_queued_bytes
            .fetch_sub(m.bytes.len(), Ordering::SeqCst);
    }
}

struct PeerEntry {
    addr: SocketAddr,
    conn: Option<Arc<Conn>>,
    dialer: Option<AbortHandle>,
}

struct Inner {
    node: NodeId,
    key: ClusterKey,
    config: TransportConfig,
    metrics: PeerMetrics,
    runtime: tokio::runtime::Handle,
    peers: Mutex<BTreeMap<NodeId, PeerEntry>>,
    inbound: Mutex<Option<Inbound>>,
    shutdown: watch::Sender<bool>,
    generation: AtomicU64,
    handshakes: Arc<Semaphore>,
    started: Instant,
    warn: RateLimit,
}

/// The TCP [`Transport`]. Create it inside a Tokio runtime; accept peers with
/// [`TcpTransport::serve`]. Dropping it (or [`TcpTransport::shutdown`]) closes every connection,
/// stops dialing and ends `serve`.
pub struct TcpTransport {
    inner: Arc<Inner>,
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("node", &self.inner.node)
            .field("peers", &lock(&self.inner.peers).keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl TcpTransport {
    /// A transport for `node` with the default [`TransportConfig`]; dials the configured peers
    /// with a higher id at once. Registers its metrics in `registry`.
    pub fn new(
        node: NodeId,
        key: ClusterKey,
        peers: HashMap<NodeId, SocketAddr>,
        registry: &prometheus::Registry,
    ) -> Result<Self, TransportError> {
        Self::with_config(node, key, peers, registry, TransportConfig::default())
    }

    /// As [`TcpTransport::new`], with explicit limits and timings.
    pub fn with_config(
        node: NodeId,
        key: ClusterKey,
        peers: HashMap<NodeId, SocketAddr>,
        registry: &prometheus::Registry,
        config: TransportConfig,
    ) -> Result<Self, TransportError> {
        config.validate()?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TransportError::NoRuntime)?;
        let metrics =
            PeerMetrics::new(registry).map_err(|e| TransportError::Metrics(Arc::new(e)))?;
        let (shutdown, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            node,
            key,
            handshakes: Arc::new(Semaphore::new(config.max_pending_handshakes)),
            config,
            metrics,
            runtime,
            peers: Mutex::default(),
            inbound: Mutex::default(),
            shutdown,
            generation: AtomicU64::new(1),
            started: Instant::now(),
            warn: RateLimit::new(Duration::from_secs(5)),
        });
        let t = Self { inner };
        let mut peers: Vec<_> = peers.into_iter().collect();
        peers.sort();
        for (id, addr) in peers {
            t.add_peer(id, addr);
        }
        Ok(t)
    }

    /// Accepts peers on `listener` until the transport shuts down. The future owns what it
    /// needs (spawn it); it returns, dropping the listener, on shutdown.
    pub fn serve(&self, listener: TcpListener) -> impl Future<Output = ()> + Send + use<> {
        let inner = self.inner.clone();
        async move {
            let mut shutdown = inner.shutdown.subscribe();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, remote)) => inner.clone().accepted(stream, remote),
                        Err(e) => {
                            tracing::warn!(node_id = inner.node.0, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                    _ = shut_down(&mut shutdown) => return,
                }
            }
        }
    }

    /// Closes every connection, fails every call in flight, stops dialing and ends `serve`.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let mut peers = lock(&self.inner.peers);
        for e in peers.values_mut() {
            if let Some(d) = e.dialer.take() {
                d.abort();
            }
            if let Some(c) = &e.conn {
                c.close();
            }
        }
    }

    /// The metric families (for tests and dashboards).
    pub fn metrics(&self) -> &PeerMetrics {
        &self.inner.metrics
    }

    /// Peers with a connection up.
    pub fn connected_peers(&self) -> Vec<NodeId> {
        lock(&self.inner.peers)
            .iter()
            .filter(|(_, e)| e.conn.as_ref().is_some_and(|c| c.is_open()))
            .map(|(id, _)| *id)
            .collect()
    }
}

impl Transport for TcpTransport {
    fn node(&self) -> NodeId {
        self.inner.node
    }

    fn set_inbound(&self, inbound: Inbound) {
        *lock(&self.inner.inbound) = Some(inbound);
    }

    fn add_peer(&self, node: NodeId, addr: SocketAddr) {
        let inner = &self.inner;
        if node == inner.node || node.0 == 0 {
            tracing::warn!(
                node_id = inner.node.0,
                peer = node.0,
                "not adding self or node 0"
            );
            return;
        }
        let mut peers = lock(&inner.peers);
        let entry = peers.entry(node).or_insert(PeerEntry {
            addr,
            conn: None,
            dialer: None,
        });
        if entry.addr == addr && (entry.dialer.is_some() || node < inner.node) {
            return;
        }
        entry.addr = addr;
        if let Some(d) = entry.dialer.take() {
            d.abort();
        }
        if inner.node < node && !*inner.shutdown.borrow() {
            let task = inner.runtime.spawn(dial_loop(inner.clone(), node, addr));
            entry.dialer = Some(task.abort_handle());
        }
        tracing::debug!(node_id = inner.node.0, peer = node.0, %addr, "peer added");
    }

    fn remove_peer(&self, node: NodeId) {
        let inner = &self.inner;
        if let Some(e) = lock(&inner.peers).remove(&node) {
            if let Some(d) = e.dialer {
                d.abort();
            }
            if let Some(c) = e.conn {
                c.close();
            }
            inner.metrics.forget_peer(&node.0.to_string());
            tracing::info!(node_id = inner.node.0, peer = node.0, "peer removed");
        }
    }

    fn is_connected(&self, node: NodeId) -> bool {
        self.inner.conn_for(node).is_ok()
    }

    fn send_raft(&self, to: NodeId, group: GroupId, msg: Message) -> Result<(), TransportError> {
        let inner = &self.inner;
        let conn = match inner.conn_for(to) {
            Ok(c) => c,
            Err(e) => {
                let label = match e {
                    TransportError::UnknownPeer(_) => "unknown".to_string(),
                    _ => to.0.to_string(),
                };
                inner.metrics.drop_raft(&label, "unreachable", 1);
                return Err(e);
            }
        };
        let count_drop = |reason: &str| inner.metrics.drop_raft(&conn.label, reason, 1);
        let bytes = match proto::encode_raft_message(&msg) {
            Ok(b) => b,
            Err(e) => {
                count_drop("encode");
                return Err(TransportError::Encode(Arc::new(e)));
            }
        };
        let len = bytes.len();
        if len > MAX_DATA_LEN as usize {
            count_drop("too_large");
            return Err(TransportError::TooLarge {
                what: "raft message",
                len: len as u64,
                max: MAX_DATA_LEN as u64,
            });
        }
        let queued = conn.raft_queued_bytes.fetch_add(len, Ordering::SeqCst);
        conn.raft_queued.fetch_add(1, Ordering::SeqCst);
        let undo = || {
            conn.raft_queued_bytes.fetch_sub(len, Ordering::SeqCst);
            conn.raft_queued.fetch_sub(1, Ordering::SeqCst);
        };
        if queued + len > inner.config.raft_queue_bytes {
            undo();
            count_drop("queue_full");
            return Err(TransportError::QueueFull(to));
        }
        match conn.raft_tx.try_send(OutRaft { group, bytes }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                undo();
                count_drop("queue_full");
                Err(TransportError::QueueFull(to))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                undo();
                count_drop("unreachable");
                Err(TransportError::Unreachable(to))
            }
        }
    }

    fn call(
        &self,
        to: NodeId,
        ctl: Vec<u8>,
        data: Option<Arc<AlignedBuf>>,
        timeout: Duration,
    ) -> impl Future<Output = Result<(Vec<u8>, AlignedBuf), TransportError>> + Send {
        let inner = self.inner.clone();
        async move {
            let started = Instant::now();
            let r = inner.call(to, ctl, data, timeout).await;
            let label = to.0.to_string();
            match &r {
                Ok(_) => inner
                    .metrics
                    .rpc_duration
                    .with_label_values(&[&label])
                    .observe(started.elapsed().as_secs_f64()),
                Err(e) => {
                    let reason = match e {
                        TransportError::UnknownPeer(_) => "unreachable",
                        TransportError::Unreachable(_) | TransportError::ShutDown => "unreachable",
                        TransportError::Disconnected(_) => "disconnected",
                        TransportError::Timeout(_) => "timeout",
                        TransportError::TooLarge { .. } => "too_large",
                        _ => "refused",
                    };
                    if !matches!(e, TransportError::UnknownPeer(_)) {
                        inner
                            .metrics
                            .rpc_failures
                            .with_label_values(&[&label, reason])
                            .inc();
                    }
                }
            }
            r
        }
    }
}

/// Removes a call's waiter when the call ends for any reason (reply, timeout, cancellation).
struct PendingGuard<'a> {
    conn: &'a Conn,
    tag: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.conn.pending).remove(&self.tag);
    }
}

impl Inner {
    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn may_warn(&self) -> Option<u64> {
        self.warn.check(self.started.elapsed().as_nanos() as u64)
    }

    /// The open connection to `to`.
    fn conn_for(&self, to: NodeId) -> Result<Arc<Conn>, TransportError> {
        if self.shutting_down() {
            return Err(TransportError::ShutDown);
        }
        let peers = lock(&self.peers);
        let e = peers.get(&to).ok_or(TransportError::UnknownPeer(to))?;
        e.conn
            .as_ref()
            .filter(|c| c.is_open())
            .cloned()
            .ok_or(TransportError::Unreachable(to))
    }

    fn is_peer(&self, node: NodeId) -> bool {
        lock(&self.peers).contains_key(&node)
    }

    fn peer_label(&self, node: Option<NodeId>) -> String {
        match node {
            Some(n) if self.is_peer(n) => n.0.to_string(),
            _ => "unknown".to_string(),
        }
    }

    fn handshake_failed(&self, label: &str, peer: Option<NodeId>, e: &HandshakeError) {
        self.metrics
            .handshake_failures
            .with_label_values(&[label, e.reason()])
            .inc();
        if let Some(suppressed) = self.may_warn() {
            tracing::warn!(
                node_id = self.node.0,
                peer = peer.map(|p| p.0),
                error = %e,
                suppressed,
                "peer handshake failed"
            );
        }
    }

    async fn call(
        &self,
        to: NodeId,
        ctl: Vec<u8>,
        data: Option<Arc<AlignedBuf>>,
        timeout: Duration,
    ) -> CallResult {
        if ctl.len() > MAX_CTL_LEN as usize {
            return Err(TransportError::TooLarge {
                what: "rpc control part",
                len: ctl.len() as u64,
                max: MAX_CTL_LEN as u64,
            });
        }
        let data_len = data.as_ref().map_or(0, |d| d.len());
        if data_len > MAX_DATA_LEN as usize {
            return Err(TransportError::TooLarge {
                what: "rpc data part",
                len: data_len as u64,
                max: MAX_DATA_LEN as u64,
            });
        }
        let conn = self.conn_for(to)?;
        let now = tokio::time::Instant::now();
        // A timeout too large to represent means "no timeout": a deadline decades away.
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400));
        let _permit = match tokio::time::timeout_at(deadline, conn.calls.acquire()).await {
            Err(_) => return Err(TransportError::Timeout(to)),
            Ok(Err(_)) => return Err(TransportError::Disconnected(to)),
            Ok(Ok(p)) => p,
        };
        let tag = conn.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&conn.pending).insert(tag, tx);
        let _pending = PendingGuard { conn: &conn, tag };
        // The connection's teardown sets `closed` before failing the waiters it finds: either
        // it found this one, or this check sees `closed`.
        if !conn.is_open() {
            return Err(TransportError::Disconnected(to));
        }
        let send = conn.out_tx.send(OutFrame::Request { tag, ctl, data });
        match tokio::time::timeout_at(deadline, send).await {
            Err(_) => return Err(TransportError::Timeout(to)),
            Ok(Err(_)) => return Err(TransportError::Disconnected(to)),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(TransportError::Timeout(to)),
            Ok(Err(_)) => Err(TransportError::Disconnected(to)),
            Ok(Ok(r)) => r,
        }
    }

    /// A socket was accepted: authenticate it on its own task, then run it.
    fn accepted(self: Arc<Self>, stream: TcpStream, remote: SocketAddr) {
        let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
            self.metrics
                .handshake_failures
                .with_label_values(&["unknown", "overload"])
                .inc();
            if let Some(suppressed) = self.may_warn() {
                tracing::warn!(node_id = self.node.0, %remote, suppressed,
                    "too many handshakes in progress; closing a new connection");
            }
            return;
        };
        let _ = stream.set_nodelay(true);
        let rt = self.runtime.clone();
        rt.spawn(self.accept_conn(stream, remote, permit));
    }

    async fn accept_conn(
        self: Arc<Self>,
        mut stream: TcpStream,
        remote: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        let mut claimed = None;
        let hs = tokio::select! {
            r = tokio::time::timeout(
                self.config.handshake_timeout,
                server_handshake(&self, &mut stream, &mut claimed),
            ) => r.unwrap_or(Err(HandshakeError::Timeout)),
            _ = shut_down(&mut shutdown) => return,
        };
        drop(permit);
        match hs {
            Ok(peer) => {
                tracing::info!(node_id = self.node.0, peer = peer.0, %remote, "peer connected (accepted)");
                let end = run_connection(self.clone(), stream, peer).await;
                tracing::info!(node_id = self.node.0, peer = peer.0, reason = %end, "peer connection ended");
            }
            Err(e) => {
                let label = self.peer_label(claimed);
                self.handshake_failed(&label, claimed, &e);
            }
        }
    }

    /// Makes `conn` the peer's connection, superseding an older one. False when the peer was
    /// removed or the transport is shutting down.
    fn install(&self, conn: &Arc<Conn>) -> bool {
        if self.shutting_down() {
            return false;
        }
        let mut peers = lock(&self.peers);
        let Some(e) = peers.get_mut(&conn.peer) else {
            return false;
        };
        if let Some(old) = e.conn.replace(conn.clone()) {
            old.close();
            tracing::info!(
                node_id = self.node.0,
                peer = conn.peer.0,
                "a new connection supersedes the old one"
            );
        }
        self.metrics
            .connections
            .with_label_values(&[&conn.label])
            .set(1);
        self.metrics
            .connections_established
            .with_label_values(&[&conn.label])
            .inc();
        true
    }

    fn inbound(&self) -> Option<Inbound> {
        lock(&self.inbound).clone()
    }

    /// Hands the messages of a Raft batch to the owner. A message that does not decode, or
    /// claims another sender or recipient, is dropped; a batch whose index is inconsistent is a
    /// protocol error.
    fn deliver_raft(&self, conn: &Conn, frame: &Frame) -> Result<(), PeerProtoError> {
        let batch = frame.raft_batch()?;
        let inbound = self.inbound();
        // Counted before each message is handed on, so whoever sees a message sees its count.
        let m = &self.metrics;
        let received = m
            .messages_received
            .with_label_values(&[&conn.label, "raft"]);
        let dropped = |reason: &str| m.drop_raft(&conn.label, reason, 1);
        for (group, bytes) in batch {
            let msg = match proto::decode_raft_message(bytes) {
                Ok(msg) => msg,
                Err(e) => {
                    dropped("decode");
                    if let Some(suppressed) = self.may_warn() {
                        tracing::warn!(node_id = self.node.0, peer = conn.peer.0, group = %group,
                            error = %e, suppressed, "dropped a raft message that does not decode");
                    }
                    continue;
                }
            };
            if msg.from != conn.peer.0 || msg.to != self.node.0 {
                dropped("misaddressed");
                continue;
            }
            received.inc();
            let Some(inbound) = &inbound else {
                dropped("no_handler");
                continue;
            };
            let msg = InboundRaft {
                from: conn.peer,
                group,
                msg,
            };
            match inbound.raft.try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => dropped("inbound_full"),
                Err(mpsc::error::TrySendError::Closed(_)) => dropped("no_handler"),
            }
        }
        Ok(())
    }

    /// Starts the handler of an incoming call on its own task, or refuses it at once.
    fn dispatch_request(&self, conn: &Conn, frame: Frame) {
        let tag = frame.header.tag;
        self.metrics
            .messages_received
            .with_label_values(&[&conn.label, "request"])
            .inc();
        let Some(handler) = self.inbound().and_then(|i| i.rpc) else {
            conn.refuse(tag, RefuseCode::NoHandler, "no rpc handler registered");
            return;
        };
        let Ok(slot) = conn.handlers.clone().try_acquire_owned() else {
            conn.refuse(tag, RefuseCode::Busy, "too many calls in flight");
            return;
        };
        let kib = ((frame.data.len() / 1024) as u32 + 1).min(conn.handler_kib_max);
        let Ok(bytes) = conn.handler_kib.clone().try_acquire_many_owned(kib) else {
            conn.refuse(tag, RefuseCode::Busy, "too many payload bytes in flight");
            return;
        };
        let (out, from) = (conn.out_tx.clone(), conn.peer);
        let node = self.node;
        self.runtime.spawn(async move {
            let _permits = (slot, bytes);
            let reply = run_handler(handler, from, frame).await;
            let frame = match reply {
                Ok((ctl, data)) => {
                    let data_len = data.as_ref().map_or(0, |d| d.len());
                    if ctl.len() > MAX_CTL_LEN as usize || data_len > MAX_DATA_LEN as usize {
                        tracing::warn!(
                            node_id = node.0,
                            peer = from.0,
                            ctl_len = ctl.len(),
                            data_len,
                            "rpc handler reply exceeds the protocol bounds"
                        );
                        OutFrame::RpcError {
                            tag,
                            refusal: Refusal::new(RefuseCode::TooLarge, "reply too large"),
                        }
                    } else {
                        OutFrame::Response { tag, ctl, data }
                    }
                }
                Err(()) => {
                    tracing::error!(node_id = node.0, peer = from.0, "rpc handler panicked");
                    OutFrame::RpcError {
                        tag,
                        refusal: Refusal::new(RefuseCode::HandlerFailed, "handler panicked"),
                    }
                }
            };
            let _ = out.send(frame).await;
        });
    }
}

async fn run_handler(
    handler: Arc<dyn RpcHandler>,
    from: NodeId,
    frame: Frame,
) -> Result<super::RpcReply, ()> {
    std::panic::AssertUnwindSafe(handler.handle(from, frame.ctl, frame.data))
        .catch_unwind()
        .await
        .map_err(|_| ())
}

/// Reads one handshake frame: anything but a handshake kind is refused on its header, before
/// its body is read.
async fn read_handshake_frame(s: &mut TcpStream) -> Result<Frame, HandshakeError> {
    let h = proto::read_header(s).await?;
    if !h.kind.is_handshake() {
        return Err(HandshakeError::Unexpected(h.kind));
    }
    Ok(proto::read_body(s, h).await?)
}

async fn send(s: &mut TcpStream, bytes: Vec<u8>) -> Result<(), HandshakeError> {
    s.write_all(&bytes).await.map_err(PeerProtoError::Io)?;
    Ok(())
}

async fn refuse(s: &mut TcpStream, code: RefuseCode, message: &str) {
    if let Ok(b) = proto::encode_message(Kind::Refused, 0, &Refusal::new(code, message)) {
        let _ = s.write_all(&b).await;
    }
}

/// The accepting side of the handshake; returns the authenticated peer.
async fn server_handshake(
    inner: &Inner,
    s: &mut TcpStream,
    claimed: &mut Option<NodeId>,
) -> Result<NodeId, HandshakeError> {
    let f = read_handshake_frame(s).await?;
    let hello: Hello = match (f.header.kind, f.decode::<Hello>()) {
        (Kind::Hello, Ok(h)) => h,
        (kind, _) => {
            refuse(s, RefuseCode::Malformed, "expected hello").await;
            return Err(HandshakeError::Unexpected(kind));
        }
    };
    *claimed = Some(hello.from);
    let version = hello.max_version.min(PROTOCOL_VERSION);
    if version < hello.min_version.max(MIN_PROTOCOL_VERSION) {
        refuse(s, RefuseCode::Version, "no common protocol version").await;
        return Err(HandshakeError::Version {
            min: hello.min_version,
            max: hello.max_version,
        });
    }
    if hello.to != inner.node {
        refuse(
            s,
            RefuseCode::WrongNode,
            &format!("this is node {}", inner.node),
        )
        .await;
        return Err(HandshakeError::WrongNode {
            expected: hello.to,
            got: inner.node,
        });
    }
    if !inner.is_peer(hello.from) {
        refuse(s, RefuseCode::UnknownNode, "not a configured peer").await;
        return Err(HandshakeError::UnknownNode(hello.from));
    }
    if hello.from >= inner.node {
        refuse(s, RefuseCode::NotDialer, "the node with the lower id dials").await;
        return Err(HandshakeError::NotDialer(hello.from));
    }
    let t = Transcript {
        client: hello.from,
        server: inner.node,
        version,
    };
    let my_nonce = nonce();
    let challenge = Challenge {
        version,
        node: inner.node,
        nonce: my_nonce,
        proof: t.proof(&inner.key, HandshakeRole::Server, &my_nonce, &hello.nonce),
    };
    send(s, proto::encode_message(Kind::Challenge, 0, &challenge)?).await?;
    let f = read_handshake_frame(s).await?;
    let ok = f.header.kind == Kind::Auth
        && f.decode::<Auth>().is_ok_and(|a| {
            t.verify(
                &inner.key,
                HandshakeRole::Client,
                &hello.nonce,
                &my_nonce,
                &a.proof,
            )
        });
    if !ok {
        refuse(s, RefuseCode::AuthFailed, "authentication failed").await;
        return Err(HandshakeError::BadProof);
    }
    send(s, proto::encode_frame_head(Kind::AuthOk, 0, &[], &[])?).await?;
    Ok(hello.from)
}

/// The dialing side of the handshake.
async fn client_handshake(
    inner: &Inner,
    peer: NodeId,
    s: &mut TcpStream,
) -> Result<(), HandshakeError> {
    let my_nonce = nonce();
    let hello = Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        from: inner.node,
        to: peer,
        nonce: my_nonce,
    };
    send(s, proto::encode_message(Kind::Hello, 0, &hello)?).await?;
    let f = read_handshake_frame(s).await?;
    let ch: Challenge = match f.header.kind {
        Kind::Challenge => f.decode()?,
        Kind::Refused => {
            let r: Refusal = f.decode()?;
            return Err(HandshakeError::Refused(r.code, r.message));
        }
        k => return Err(HandshakeError::Unexpected(k)),
    };
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&ch.version) {
        return Err(HandshakeError::Version {
            min: ch.version,
            max: ch.version,
        });
    }
    if ch.node != peer {
        return Err(HandshakeError::WrongNode {
            expected: peer,
            got: ch.node,
        });
    }
    let t = Transcript {
        client: inner.node,
        server: peer,
        version: ch.version,
    };
    if !t.verify(
        &inner.key,
        HandshakeRole::Server,
        &ch.nonce,
        &my_nonce,
        &ch.proof,
    ) {
        return Err(HandshakeError::BadProof);
    }
    let auth = Auth {
        proof: t.proof(&inner.key, HandshakeRole::Client, &my_nonce, &ch.nonce),
    };
    send(s, proto::encode_message(Kind::Auth, 0, &auth)?).await?;
    let f = read_handshake_frame(s).await?;
    match f.header.kind {
        Kind::AuthOk => Ok(()),
        Kind::Refused => {
            let r: Refusal = f.decode()?;
            Err(HandshakeError::Refused(r.code, r.message))
        }
        k => Err(HandshakeError::Unexpected(k)),
    }
}

async fn dial(inner: &Inner, peer: NodeId, addr: SocketAddr) -> Result<TcpStream, HandshakeError> {
    let connect = tokio::time::timeout(inner.config.connect_timeout, TcpStream::connect(addr));
    let mut s = connect
        .await
        .map_err(|_| HandshakeError::Timeout)?
        .map_err(PeerProtoError::Io)?;
    let _ = s.set_nodelay(true);
    tokio::time::timeout(
        inner.config.handshake_timeout,
        client_handshake(inner, peer, &mut s),
    )
    .await
    .map_err(|_| HandshakeError::Timeout)??;
    Ok(s)
}

/// Exponential backoff with jitter: each delay is drawn from `[d/2, d]`, `d` doubling from
/// `min` up to `max`.
struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
    rng: SimRng,
}

impl Backoff {
    fn new(min: Duration, max: Duration, seed: u64) -> Self {
        Self {
            min,
            max,
            cur: min,
            rng: SimRng::new(seed),
        }
    }

    fn next(&mut self) -> Duration {
        let d = self.cur;
        self.cur = self.cur.saturating_mul(2).min(self.max);
        let half = d / 2;
        let span = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half.saturating_add(Duration::from_nanos(self.rng.below(span.saturating_add(1))))
    }

    fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// Dials `peer` until the transport shuts down or the peer is removed (this task is aborted),
/// running each connection to its end.
async fn dial_loop(inner: Arc<Inner>, peer: NodeId, addr: SocketAddr) {
    let seed = u64::from_le_bytes(nonce()[..8].try_into().unwrap_or([7; 8]));
    let mut backoff = Backoff::new(inner.config.backoff_min, inner.config.backoff_max, seed);
    let mut shutdown = inner.shutdown.subscribe();
    let label = peer.0.to_string();
    loop {
        if inner.shutting_down() {
            return;
        }
        match dial(&inner, peer, addr).await {
            Ok(stream) => {
                tracing::info!(node_id = inner.node.0, peer = peer.0, %addr, "peer connected (dialed)");
                let began = tokio::time::Instant::now();
                let end = run_connection(inner.clone(), stream, peer).await;
                tracing::info!(node_id = inner.node.0, peer = peer.0, reason = %end, "peer connection ended");
                if began.elapsed() >= STABLE_CONNECTION {
                    backoff.reset();
                }
            }
            Err(e) => inner.handshake_failed(&label, Some(peer), &e),
        }
        let delay = backoff.next();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shut_down(&mut shutdown) => return,
        }
    }
}

/// Cleans up after a connection however its task ends (error, supersession, abort).
struct ConnGuard {
    inner: Arc<Inner>,
    conn: Arc<Conn>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let c = &self.conn;
        c.closed.store(true, Ordering::SeqCst);
        let waiters: Vec<_> = lock(&c.pending).drain().collect();
        for (_, w) in waiters {
            let _ = w.send(Err(TransportError::Disconnected(c.peer)));
        }
        let queued = c.raft_queued.swap(0, Ordering::SeqCst) as u64;
        self.inner
            .metrics
            .drop_raft(&c.label, "disconnected", queued);
        let mut peers = lock(&self.inner.peers);
        if let Some(e) = peers.get_mut(&c.peer)
            && e.conn
                .as_ref()
                .is_some_and(|x| x.generation == c.generation)
        {
            e.conn = None;
            self.inner
                .metrics
                .connections
                .with_label_values(&[&c.label])
                .set(0);
        }
    }
}

/// Runs an authenticated connection until it fails, is superseded or removed, or the transport
/// shuts down.
async fn run_connection(inner: Arc<Inner>, stream: TcpStream, peer: NodeId) -> ConnError {
    let cfg = &inner.config;
    let (raft_tx, raft_rx) = mpsc::channel(cfg.raft_queue_len);
    let (out_tx, out_rx) = mpsc::channel(cfg.rpc_queue_len);
    let handler_kib_max = (cfg.max_handler_bytes / 1024).max(1) as u32;
    let conn = Arc::new(Conn {
        peer,
        label: peer.0.to_string(),
        generation: inner.generation.fetch_add(1, Ordering::Relaxed),
        raft_tx,
        raft_queued: AtomicUsize::new(0),
        raft_queued_bytes: AtomicUsize::new(0),
        out_tx,
        pending: Mutex::default(),
        next_tag: AtomicU64::new(1),
        closed: AtomicBool::new(false),
        stop: Notify::new(),
        calls: Semaphore::new(cfg.max_calls_in_flight),
        handlers: Arc::new(Semaphore::new(cfg.max_handlers_in_flight)),
        handler_kib: Arc::new(Semaphore::new(handler_kib_max as usize)),
        handler_kib_max,
    });
    if !inner.install(&conn) {
        return ConnError::Stopped;
    }
    let _guard = ConnGuard {
        inner: inner.clone(),
        conn: conn.clone(),
    };
    let (rd, wr) = stream.into_split();
    let mut shutdown = inner.shutdown.subscribe();
    let end = tokio::select! {
        r = read_loop(&inner, &conn, rd) => r.err().unwrap_or(ConnError::Proto(PeerProtoError::Closed)),
        r = write_loop(&inner, &conn, wr, raft_rx, out_rx) => r.err().unwrap_or(ConnError::Stopped),
        _ = conn.stop.notified() => ConnError::Stopped,
        _ = shut_down(&mut shutdown) => ConnError::Shutdown,
    };
    if let Some(reason) = end.protocol_reason() {
        inner
            .metrics
            .protocol_errors
            .with_label_values(&[&conn.label, reason])
            .inc();
    }
    end
}

async fn read_loop(inner: &Inner, conn: &Conn, rd: OwnedReadHalf) -> Result<(), ConnError> {
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let m = &inner.metrics;
    let idle = inner.config.idle_timeout;
    loop {
        let header = match tokio::time::timeout(idle, proto::read_header(&mut rd)).await {
            Err(_) => return Err(ConnError::Idle(idle)),
            Ok(Err(PeerProtoError::Closed)) => return Ok(()),
            Ok(r) => r?,
        };
        if header.kind.is_handshake() {
            return Err(PeerProtoError::Unexpected {
                got: header.kind,
                expected: "raft, request, response, rpc_error or ping",
            }
            .into());
        }
        // A peer that sends a header and then stalls must not hold this connection (and every
        // message behind it) forever: the body comes within the idle bound too.
        let frame = match tokio::time::timeout(idle, proto::read_body(&mut rd, header)).await {
            Err(_) => return Err(ConnError::Stalled(idle)),
            Ok(r) => r?,
        };
        m.received_bytes
            .with_label_values(&[&conn.label])
            .inc_by((HEADER_LEN + frame.ctl.len() + frame.data.len()) as u64);
        m.frames_received
            .with_label_values(&[&conn.label, header.kind.name()])
            .inc();
        match header.kind {
            Kind::Raft => inner.deliver_raft(conn, &frame)?,
            Kind::Request => inner.dispatch_request(conn, frame),
            Kind::Response => complete(inner, conn, header.tag, Ok((frame.ctl, frame.data))),
            Kind::RpcError => {
                let r: Refusal = frame.decode()?;
                let e = TransportError::Refused {
                    peer: conn.peer,
                    code: r.code,
                    message: r.message,
                };
                complete(inner, conn, header.tag, Err(e));
            }
            _ => {}
        }
    }
}

/// Hands a reply to its waiting call (a late reply, after a timeout, is ignored).
fn complete(inner: &Inner, conn: &Conn, tag: u64, r: CallResult) {
    let waiter = lock(&conn.pending).remove(&tag);
    if let Some(w) = waiter {
        inner
            .metrics
            .messages_received
            .with_label_values(&[&conn.label, "response"])
            .inc();
        let _ = w.send(r);
    } else {
        tracing::debug!(
            node_id = inner.node.0,
            peer = conn.peer.0,
            tag,
            "reply to no waiting call"
        );
    }
}

enum Next {
    Raft(OutRaft),
    Out(OutFrame),
    Ping,
}

async fn write_loop(
    inner: &Inner,
    conn: &Conn,
    wr: OwnedWriteHalf,
    mut raft_rx: mpsc::Receiver<OutRaft>,
    mut out_rx: mpsc::Receiver<OutFrame>,
) -> Result<(), ConnError> {
    let cfg = &inner.config;
    let m = &inner.metrics;
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    let mut carry: Option<OutRaft> = None;
    let mut batch: Vec<OutRaft> = Vec::with_capacity(cfg.batch_max_messages);
    let sent = |kind: Kind, bytes: usize| {
        m.frames_sent
            .with_label_values(&[&conn.label, kind.name()])
            .inc();
        m.sent_bytes
            .with_label_values(&[&conn.label])
            .inc_by(bytes as u64);
    };
    loop {
        let next = match carry.take() {
            Some(r) => Next::Raft(r),
            None => tokio::select! {
                r = raft_rx.recv() => match r {
                    Some(r) => { conn.took_raft(&r); Next::Raft(r) }
                    None => return Ok(()),
                },
                f = out_rx.recv() => match f {
                    Some(f) => Next::Out(f),
                    None => return Ok(()),
                },
                _ = tokio::time::sleep(cfg.keepalive_interval) => Next::Ping,
            },
        };
        match next {
            Next::Raft(first) => {
                batch.clear();
                let mut bytes = first.bytes.len();
                batch.push(first);
                while batch.len() < cfg.batch_max_messages && bytes < cfg.batch_max_bytes {
                    let Ok(r) = raft_rx.try_recv() else { break };
                    conn.took_raft(&r);
                    if bytes + r.bytes.len() > cfg.batch_max_bytes {
                        carry = Some(r);
                        break;
                    }
                    bytes += r.bytes.len();
                    batch.push(r);
                }
                let parts: Vec<(GroupId, &[u8])> =
                    batch.iter().map(|r| (r.group, &r.bytes[..])).collect();
                match proto::encode_raft_batch(&parts) {
                    Ok(head) => {
                        w.write_all(&head).await.map_err(PeerProtoError::Io)?;
                        for r in &batch {
                            w.write_all(&r.bytes).await.map_err(PeerProtoError::Io)?;
                        }
                        sent(Kind::Raft, head.len() + bytes);
                        m.messages_sent
                            .with_label_values(&[&conn.label, "raft"])
                            .inc_by(batch.len() as u64);
                    }
                    Err(e) => {
                        tracing::error!(node_id = inner.node.0, peer = conn.peer.0, error = %e,
                            "could not encode a raft batch; dropped");
                        m.drop_raft(&conn.label, "encode", batch.len() as u64);
                    }
                }
            }
            Next::Out(f) => {
                let refusal_ctl;
                let (kind, tag, ctl, data, msg_kind): (Kind, u64, &[u8], &[u8], _) = match &f {
                    OutFrame::Request { tag, ctl, data } => (
                        Kind::Request,
                        *tag,
                        &ctl[..],
                        data.as_deref().map_or(&[][..], |d| &d[..]),
                        Some("request"),
                    ),
                    OutFrame::Response { tag, ctl, data } => (
                        Kind::Response,
                        *tag,
                        &ctl[..],
                        data.as_ref().map_or(&[][..], |d| &d[..]),
                        Some("response"),
                    ),
                    OutFrame::RpcError { tag, refusal } => {
                        refusal_ctl = postcard::to_stdvec(refusal).unwrap_or_default();
                        (Kind::RpcError, *tag, &refusal_ctl[..], &[][..], None)
                    }
                };
                match proto::encode_frame_head(kind, tag, ctl, &[data]) {
                    Ok(head) => {
                        w.write_all(&head).await.map_err(PeerProtoError::Io)?;
                        w.write_all(data).await.map_err(PeerProtoError::Io)?;
                        sent(kind, head.len() + data.len());
                        if let Some(k) = msg_kind {
                            m.messages_sent.with_label_values(&[&conn.label, k]).inc();
                        }
                    }
                    Err(e) => {
                        // Sizes are checked before frames are queued; this is a bug, not input.
                        tracing::error!(node_id = inner.node.0, peer = conn.peer.0, error = %e,
                            "could not encode an rpc frame; dropped");
                    }
                }
            }
            Next::Ping => {
                let head = proto::encode_frame_head(Kind::Ping, 0, &[], &[])?;
                w.write_all(&head).await.map_err(PeerProtoError::Io)?;
                sent(Kind::Ping, head.len());
            }
        }
        if carry.is_none() && raft_rx.is_empty() && out_rx.is_empty() {
            w.flush().await.map_err(PeerProtoError::Io)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_jittered_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 42);
        let delays: Vec<_> = (0..8).map(|_| b.next()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        for d in &delays {
            assert!(*d <= Duration::from_secs(1), "{d:?}");
        }
        assert!(delays[7] >= Duration::from_millis(500), "{delays:?}");
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
        // Jitter: two seeds give different schedules.
        let mut c = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 43);
        let other: Vec<_> = (0..8).map(|_| c.next()).collect();
        assert_ne!(delays, other);
        // Extreme bounds saturate instead of overflowing.
        let mut huge = Backoff::new(Duration::MAX / 2, Duration::MAX, 1);
        for _ in 0..4 {
            assert!(huge.next() >= Duration::MAX / 4);
        }
    }

    #[test]
    fn config_validation() {
        TransportConfig::default().validate().unwrap();
        let bad = TransportConfig {
            batch_max_messages: 0,
            ..TransportConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = TransportConfig {
            keepalive_interval: Duration::from_secs(20),
            ..TransportConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn creating_outside_a_runtime_is_an_error() {
        let r = TcpTransport::new(
            NodeId(1),
            ClusterKey::generate(),
            HashMap::new(),
            &prometheus::Registry::new(),
        );
        assert!(matches!(r, Err(TransportError::NoRuntime)));
    }
}
