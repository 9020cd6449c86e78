//! The transport between head nodes: Raft messages of many groups, batched, and request/response
//! RPCs (forwarded volume I/O, admin calls), over one authenticated connection per pair of nodes.
//!
//! * [`Transport`] — the seam: what the replication layer uses. It never sees sockets.
//! * [`TcpTransport`] — the real one: TCP, the [`peer_proto`](super::peer_proto) wire format,
//!   mutual HMAC handshake, reconnection with jittered backoff, Prometheus metrics.
//! * [`SimNetwork`] / [`SimTransport`] — an in-memory network for tests: seeded drop, delay,
//!   reorder and partition, stepped explicitly by a harness ([`SimNetwork::deliver_next`]), no
//!   timers inside.
//!
//! Semantics shared by both:
//!
//! * [`Transport::send_raft`] never blocks and is best effort. An `Err` whose
//!   [`TransportError::is_unreachable`] is true means the message was dropped because the peer
//!   cannot be reached now (no connection, or its queue is full): the caller should tell raft
//!   (`RawNode::report_unreachable`).
//! * Incoming Raft messages go to the bounded channel of the registered [`Inbound`] as
//!   [`InboundRaft`]; when it is full they are dropped and counted (raft retransmits).
//! * [`Transport::call`] sends opaque control bytes and an optional data payload and waits for
//!   the reply of the peer's [`RpcHandler`]. Many calls are in flight at once; replies match by
//!   tag. A call fails at once when the connection drops, not after its timeout.
//!
//! ```
//! use head_node::replication::GroupId;
//! use head_node::replication::transport::{
//!     Inbound, SimConfig, SimNetwork, Transport, handler_fn,
//! };
//! use common::NodeId;
//! use raft::prelude::Message;
//! use std::time::Duration;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let net = SimNetwork::new(7, SimConfig::default());
//! let a = net.endpoint(NodeId(1), [NodeId(2)]);
//! let b = net.endpoint(NodeId(2), [NodeId(1)]);
//! let (tx, mut rx) = tokio::sync::mpsc::channel(16);
//! b.set_inbound(Inbound::new(tx).with_rpc(handler_fn(|_from, ctl: Vec<u8>, _data| async move {
//!     (ctl.into_iter().rev().collect(), None)
//! })));
//!
//! let mut m = Message::default();
//! m.from = 1;
//! m.to = 2;
//! a.send_raft(NodeId(2), GroupId(9), m.clone()).unwrap();
//! let call = a.call(NodeId(2), b"abc".to_vec(), None, Duration::from_secs(1));
//! let (reply, _) = tokio::join!(call, net.run_until_idle(100));
//! assert_eq!(reply.unwrap().0, b"cba");
//! let got = rx.recv().await.unwrap();
//! assert_eq!((got.from, got.group, got.msg), (NodeId(1), GroupId(9), m));
//! # });
//! ```

mod metrics;
mod sim;
mod tcp;

pub use metrics::PeerMetrics;
pub use sim::{Delivery, SimConfig, SimNetwork, SimReplyTo, SimRng, SimStats, SimTransport};
pub use tcp::TcpTransport;

use super::GroupId;
use super::peer_proto::RefuseCode;
use common::AlignedBuf;
use common::ids::NodeId;
use futures_util::future::BoxFuture;
use raft::prelude::Message;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Errors of the transport.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The node is not a configured peer.
    #[error("node {0} is not a configured peer")]
    UnknownPeer(NodeId),
    /// There is no connection to the peer now.
    #[error("node {0} is unreachable (no connection)")]
    Unreachable(NodeId),
    /// The peer's bounded queue is full.
    #[error("the send queue to node {0} is full")]
    QueueFull(NodeId),
    /// A message or payload beyond the protocol's bounds.
    #[error("{what} of {len} bytes exceeds the maximum {max}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A Raft message could not be encoded.
    #[error("encoding a raft message: {0}")]
    Encode(Arc<super::peer_proto::RaftCodecError>),
    /// The connection dropped while the call was in flight.
    #[error("connection to node {0} lost")]
    Disconnected(NodeId),
    /// No reply within the call's timeout.
    #[error("node {0} did not answer in time")]
    Timeout(NodeId),
    /// The peer's transport refused the call (no handler, busy, too large, shutting down).
    #[error("node {peer} refused the call: {code:?}: {message}")]
    Refused {
        /// The peer.
        peer: NodeId,
        /// Stable code.
        code: RefuseCode,
        /// Detail.
        message: String,
    },
    /// The transport was shut down.
    #[error("the transport is shut down")]
    ShutDown,
    /// Created outside a Tokio runtime.
    #[error("the TCP transport must be created inside a Tokio runtime")]
    NoRuntime,
    /// Registering metrics failed.
    #[error(transparent)]
    Metrics(Arc<common::metrics::MetricsError>),
    /// A configuration value out of range.
    #[error("invalid transport configuration: {0}")]
    Config(&'static str),
}

impl TransportError {
    /// True when a Raft message was dropped because the peer cannot be reached now: the caller
    /// should call `report_unreachable` for it.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            TransportError::Unreachable(_)
                | TransportError::QueueFull(_)
                | TransportError::Disconnected(_)
        )
    }
}

/// A Raft message received from a peer.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundRaft {
    /// The authenticated peer it came from.
    pub from: NodeId,
    /// Its group.
    pub group: GroupId,
    /// The message.
    pub msg: Message,
}

/// A reply of an RPC handler: control bytes and optional data.
pub type RpcReply = (Vec<u8>, Option<AlignedBuf>);

/// Serves incoming RPCs. Each call runs on its own task; the transport bounds how many are in
/// flight per connection. The transport does not interpret control bytes or data.
pub trait RpcHandler: Send + Sync + 'static {
    /// Handles one request from the authenticated peer `from`.
    fn handle(&self, from: NodeId, ctl: Vec<u8>, data: AlignedBuf) -> BoxFuture<'_, RpcReply>;
}

/// An [`RpcHandler`] made of a closure; see [`handler_fn`].
pub struct FnHandler<F>(F);

impl<F> fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnHandler")
    }
}

impl<F, Fut> RpcHandler for FnHandler<F>
where
    F: Fn(NodeId, Vec<u8>, AlignedBuf) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = RpcReply> + Send + 'static,
{
    fn handle(&self, from: NodeId, ctl: Vec<u8>, data: AlignedBuf) -> BoxFuture<'_, RpcReply> {
        Box::pin((self.0)(from, ctl, data))
    }
}

/// An RPC handler from a closure returning a future.
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn RpcHandler>
where
    F: Fn(NodeId, Vec<u8>, AlignedBuf) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = RpcReply> + Send + 'static,
{
    Arc::new(FnHandler(f))
}

/// Where incoming traffic goes: Raft messages to a bounded channel, RPCs to a handler.
#[derive(Clone)]
pub struct Inbound {
    /// Incoming Raft messages (dropped and counted when full).
    pub raft: mpsc::Sender<InboundRaft>,
    /// Incoming RPCs; without one they are refused with [`RefuseCode::NoHandler`].
    pub rpc: Option<Arc<dyn RpcHandler>>,
}

impl Inbound {
    /// Raft messages to `raft`, no RPC handler.
    pub fn new(raft: mpsc::Sender<InboundRaft>) -> Self {
        Self { raft, rpc: None }
    }

    /// With an RPC handler.
    pub fn with_rpc(mut self, rpc: Arc<dyn RpcHandler>) -> Self {
        self.rpc = Some(rpc);
        self
    }
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbound")
            .field("raft_capacity", &self.raft.max_capacity())
            .field("rpc", &self.rpc.is_some())
            .finish()
    }
}

/// The transport between head nodes, as the replication layer sees it.
pub trait Transport: Send + Sync + 'static {
    /// This node.
    fn node(&self) -> NodeId;

    /// Registers (or replaces) where incoming Raft messages and RPCs go. Until then incoming
    /// Raft messages are dropped and RPCs refused.
    fn set_inbound(&self, inbound: Inbound);

    /// Adds a peer, or changes its address (its connection is then re-established).
    fn add_peer(&self, node: NodeId, addr: SocketAddr);

    /// Removes a peer: its connection closes, its calls fail, it is refused from now on.
    fn remove_peer(&self, node: NodeId);

    /// True while a connection to `node` is up.
    fn is_connected(&self, node: NodeId) -> bool;

    /// Queues a Raft message for `to`; never blocks. `Err` means the message was dropped (see
    /// [`TransportError::is_unreachable`]).
    fn send_raft(&self, to: NodeId, group: GroupId, msg: Message) -> Result<(), TransportError>;

    /// Calls the RPC handler of `to` and waits for its reply, at most `timeout`.
    fn call(
        &self,
        to: NodeId,
        ctl: Vec<u8>,
        data: Option<Arc<AlignedBuf>>,
        timeout: Duration,
    ) -> impl Future<Output = Result<(Vec<u8>, AlignedBuf), TransportError>> + Send;
}

/// Limits and timings of the TCP transport.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// Time allowed for a whole handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for the TCP connect.
    pub connect_timeout: Duration,
    /// Raft messages queued per peer.
    pub raft_queue_len: usize,
    /// Raft message bytes queued per peer.
    pub raft_queue_bytes: usize,
    /// Most Raft messages in one frame.
    pub batch_max_messages: usize,
    /// A batch frame is closed once it holds this many bytes.
    pub batch_max_bytes: usize,
    /// Outgoing RPC frames (requests and replies) queued per connection.
    pub rpc_queue_len: usize,
    /// Outgoing calls in flight per peer.
    pub max_calls_in_flight: usize,
    /// Incoming calls being handled per connection; beyond it calls are refused as `Busy`.
    /// The default equals `max_calls_in_flight`, so a peer of the same configuration is never
    /// refused for the number of its calls: a call it may send is one this side may run (a
    /// `Busy` answer would make the caller retry in a loop against the calls that hold the
    /// slots). Their bytes are bounded separately (`max_handler_bytes`).
    pub max_handlers_in_flight: usize,
    /// Incoming call payload bytes being handled per connection; beyond it refused as `Busy`.
    pub max_handler_bytes: usize,
    /// First redial delay.
    pub backoff_min: Duration,
    /// Longest redial delay.
    pub backoff_max: Duration,
    /// A ping goes out after this long without sending anything.
    pub keepalive_interval: Duration,
    /// A connection on which nothing arrives for this long is closed.
    pub idle_timeout: Duration,
    /// Handshakes in progress on the accepting side; further connections are closed at once.
    pub max_pending_handshakes: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            raft_queue_len: 4096,
            raft_queue_bytes: 64 << 20,
            batch_max_messages: 1024,
            batch_max_bytes: 4 << 20,
            rpc_queue_len: 1024,
            max_calls_in_flight: 1024,
            max_handlers_in_flight: 1024,
            max_handler_bytes: 256 << 20,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(10),
            max_pending_handshakes: 64,
        }
    }
}

impl TransportConfig {
    /// Checks the values are usable.
    pub fn validate(&self) -> Result<(), TransportError> {
        use super::peer_proto::{MAX_BATCH_MESSAGES, MAX_DATA_LEN};
        let checks: [(bool, &'static str); 9] = [
            (
                self.raft_queue_len > 0 && self.raft_queue_bytes > 0,
                "raft queue bounds must be positive",
            ),
            (
                (1..=MAX_BATCH_MESSAGES).contains(&self.batch_max_messages),
                "batch-max-messages must be 1..=2048",
            ),
            (
                self.batch_max_bytes > 0 && self.batch_max_bytes <= MAX_DATA_LEN as usize,
                "batch-max-bytes must be 1..=64 MiB",
            ),
            (self.rpc_queue_len > 0, "rpc-queue-len must be positive"),
            (
                self.max_calls_in_flight > 0 && self.max_handlers_in_flight > 0,
                "in-flight bounds must be positive",
            ),
            (
                self.max_handler_bytes >= MAX_DATA_LEN as usize,
                "max-handler-bytes must hold one largest payload (64 MiB)",
            ),
            (
                !self.backoff_min.is_zero() && self.backoff_min <= self.backoff_max,
                "backoff-min must be positive and at most backoff-max",
            ),
            (
                !self.keepalive_interval.is_zero() && self.keepalive_interval < self.idle_timeout,
                "keepalive-interval must be positive and below idle-timeout",
            ),
            (
                self.max_pending_handshakes > 0 && !self.handshake_timeout.is_zero(),
                "handshake bounds must be positive",
            ),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, why)) => Err(TransportError::Config(why)),
            None => Ok(()),
        }
    }
}
