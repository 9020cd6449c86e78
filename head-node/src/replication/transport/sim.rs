//! An in-memory [`Transport`] over a simulated network, for tests of the components above the
//! transport and for a deterministic simulation harness.
//!
//! Every message sent through a [`SimTransport`] goes into one queue ordered by simulated
//! delivery time. Nothing moves on its own: the test (or harness) calls
//! [`SimNetwork::deliver_next`], which advances simulated time to the next message and returns
//! it — the harness hands it to the node it chooses to run — or [`SimNetwork::dispatch`] to give
//! it to the registered [`Inbound`]. There are no timers and no threads inside; all randomness
//! (drops, delays, hence reordering) comes from one [`SimRng`] seeded at creation, so a run is a
//! function of its seed and its sequence of calls.
//!
//! Faults:
//! * **drop** — each message (Raft, request or reply) is lost with
//!   [`SimConfig::drop_probability`];
//! * **delay and reorder** — each message takes a delay drawn from
//!   `[min_delay, max_delay]`; with [`SimConfig::reorder`] off, messages on one link keep their
//!   order (like TCP), with it on, they may overtake each other;
//! * **partition** — [`SimNetwork::partition`], [`SimNetwork::disconnect`],
//!   [`SimNetwork::isolate`] cut links both ways like a dropped connection does: sends across
//!   fail as unreachable, messages in flight across are lost, calls in flight across fail at
//!   once; [`SimNetwork::heal`] restores every link.
//!
//! Calls time out in simulated time: [`SimNetwork::advance`] (or delivering a later message)
//! fails the calls whose deadline has passed.

use super::{Inbound, InboundRaft, Transport, TransportError};
use crate::replication::GroupId;
use crate::replication::peer_proto::{MAX_CTL_LEN, MAX_DATA_LEN, RefuseCode};
use common::AlignedBuf;
use common::ids::NodeId;
use raft::prelude::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// A small deterministic random generator (SplitMix64): the only source of randomness of the
/// simulated network.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator with the given seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// True with probability `p` (clamped to `0..=1`).
    pub fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        if p >= 1.0 {
            return true;
        }
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// Fault settings of a simulated network.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Probability that any one message is lost.
    pub drop_probability: f64,
    /// Shortest delivery delay.
    pub min_delay: Duration,
    /// Longest delivery delay.
    pub max_delay: Duration,
    /// Let messages on one link overtake each other.
    pub reorder: bool,
    /// Messages in flight in the whole network; beyond it sends fail as `QueueFull`.
    pub max_in_flight: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            drop_probability: 0.0,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            reorder: false,
            max_in_flight: 65_536,
        }
    }
}

/// Counters of a simulated network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Messages accepted for sending.
    pub sent: u64,
    /// Messages handed out by `deliver_next`.
    pub delivered: u64,
    /// Messages lost to the drop probability.
    pub dropped_random: u64,
    /// Messages lost to a partition while in flight.
    pub dropped_partition: u64,
    /// Raft messages dispatched to a node whose inbound channel was full or missing.
    pub dropped_inbound: u64,
    /// Sends refused (unknown peer, unreachable, network full).
    pub refused: u64,
    /// Calls failed by their deadline.
    pub timed_out: u64,
}

/// Where the reply to a simulated request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimReplyTo {
    /// The calling node.
    pub caller: NodeId,
    /// The called node.
    pub callee: NodeId,
    call: u64,
}

/// A message the network delivers now.
#[derive(Debug)]
pub enum Delivery {
    /// A Raft message for `to`.
    Raft {
        /// Sender.
        from: NodeId,
        /// Recipient.
        to: NodeId,
        /// Group.
        group: GroupId,
        /// The message.
        msg: Message,
    },
    /// A request for `reply_to.callee`; answer it with [`SimNetwork::respond`].
    Request {
        /// Caller, callee and call.
        reply_to: SimReplyTo,
        /// Control bytes.
        ctl: Vec<u8>,
        /// Data.
        data: AlignedBuf,
    },
    /// A reply reached its caller (its call has completed, unless it had already failed).
    Response {
        /// The node that answered.
        from: NodeId,
        /// The caller.
        to: NodeId,
    },
}

type CallResult = Result<(Vec<u8>, AlignedBuf), TransportError>;

enum Payload {
    Raft {
        group: GroupId,
        msg: Message,
    },
    Request {
        call: u64,
        ctl: Vec<u8>,
        data: AlignedBuf,
    },
    Response {
        call: u64,
        result: CallResult,
    },
}

struct InFlight {
    from: NodeId,
    to: NodeId,
    payload: Payload,
}

struct PendingCall {
    from: NodeId,
    to: NodeId,
    deadline: Duration,
    tx: oneshot::Sender<CallResult>,
}

#[derive(Default)]
struct Endpoint {
    peers: BTreeSet<NodeId>,
    inbound: Option<Inbound>,
}

struct SimState {
    rng: SimRng,
    config: SimConfig,
    now: Duration,
    seq: u64,
    queue: BTreeMap<(Duration, u64), InFlight>,
    last_on_link: BTreeMap<(NodeId, NodeId), Duration>,
    endpoints: BTreeMap<NodeId, Endpoint>,
    cuts: BTreeSet<(NodeId, NodeId)>,
    calls: BTreeMap<u64, PendingCall>,
    next_call: u64,
    stats: SimStats,
}

fn link(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl SimState {
    fn is_cut(&self, a: NodeId, b: NodeId) -> bool {
        self.cuts.contains(&link(a, b))
    }

    /// Checks that `from` may send to `to` now.
    fn check_send(&mut self, from: NodeId, to: NodeId) -> Result<(), TransportError> {
        let known = self
            .endpoints
            .get(&from)
            .is_some_and(|e| e.peers.contains(&to));
        let r = if !known {
            Err(TransportError::UnknownPeer(to))
        } else if !self.endpoints.contains_key(&to) || self.is_cut(from, to) {
            Err(TransportError::Unreachable(to))
        } else if self.queue.len() >= self.config.max_in_flight {
            Err(TransportError::QueueFull(to))
        } else {
            Ok(())
        };
        if r.is_err() {
            self.stats.refused += 1;
        }
        r
    }

    /// Puts a message on the wire: lost with the drop probability, else delayed.
    fn transmit(&mut self, from: NodeId, to: NodeId, payload: Payload) {
        self.stats.sent += 1;
        if self.rng.chance(self.config.drop_probability) {
            self.stats.dropped_random += 1;
            return;
        }
        let min = self.config.min_delay;
        let max = self.config.max_delay.max(min);
        let span = u64::try_from((max - min).as_nanos()).unwrap_or(u64::MAX);
        let delay =
            min.saturating_add(Duration::from_nanos(self.rng.below(span.saturating_add(1))));
        let mut at = self.now.saturating_add(delay);
        if !self.config.reorder {
            let last = self.last_on_link.entry((from, to)).or_default();
            at = at.max(*last);
            *last = at;
        }
        self.seq += 1;
        self.queue
            .insert((at, self.seq), InFlight { from, to, payload });
    }

    fn expire_calls(&mut self) {
        let now = self.now;
        let expired: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(c) = self.calls.remove(&id) {
                self.stats.timed_out += 1;
                let _ = c.tx.send(Err(TransportError::Timeout(c.to)));
            }
        }
    }

    fn set_now(&mut self, t: Duration) {
        if t > self.now {
            self.now = t;
        }
        self.expire_calls();
    }

    fn cut(&mut self, a: NodeId, b: NodeId) {
        if a == b {
            return;
        }
        let l = link(a, b);
        self.cuts.insert(l);
        let before = self.queue.len();
        self.queue.retain(|_, m| link(m.from, m.to) != l);
        self.stats.dropped_partition += (before - self.queue.len()) as u64;
        let failed: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| link(c.from, c.to) == l)
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            if let Some(c) = self.calls.remove(&id) {
                let _ = c.tx.send(Err(TransportError::Disconnected(c.to)));
            }
        }
    }
}

/// A simulated network shared by the [`SimTransport`]s of the nodes of a test. Cloning it
/// shares it.
#[derive(Clone)]
pub struct SimNetwork {
    state: Arc<Mutex<SimState>>,
}

impl fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("SimNetwork")
            .field("now", &s.now)
            .field("in_flight", &s.queue.len())
            .field("nodes", &s.endpoints.keys().collect::<Vec<_>>())
            .field("cuts", &s.cuts)
            .finish()
    }
}

impl SimNetwork {
    /// An empty network whose randomness comes from `seed`.
    pub fn new(seed: u64, config: SimConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(SimState {
                rng: SimRng::new(seed),
                config,
                now: Duration::ZERO,
                seq: 0,
                queue: BTreeMap::new(),
                last_on_link: BTreeMap::new(),
                endpoints: BTreeMap::new(),
                cuts: BTreeSet::new(),
                calls: BTreeMap::new(),
                next_call: 1,
                stats: SimStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches node `node` (or returns its transport again) with the given peers.
    pub fn endpoint(&self, node: NodeId, peers: impl IntoIterator<Item = NodeId>) -> SimTransport {
        let mut s = self.lock();
        let e = s.endpoints.entry(node).or_default();
        e.peers.extend(peers.into_iter().filter(|p| *p != node));
        SimTransport {
            net: self.clone(),
            node,
        }
    }

    /// Changes the fault settings from now on.
    pub fn set_config(&self, config: SimConfig) {
        self.lock().config = config;
    }

    /// Simulated time since the network was created.
    pub fn now(&self) -> Duration {
        self.lock().now
    }

    /// Moves simulated time forward by `d`, failing calls whose deadline passes.
    pub fn advance(&self, d: Duration) {
        let mut s = self.lock();
        let t = s.now.saturating_add(d);
        s.set_now(t);
    }

    /// Cuts every link between a node of `a` and a node of `b`.
    pub fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut s = self.lock();
        for x in a {
            for y in b {
                s.cut(*x, *y);
            }
        }
    }

    /// Cuts the link between `a` and `b`.
    pub fn disconnect(&self, a: NodeId, b: NodeId) {
        self.lock().cut(a, b);
    }

    /// Cuts every link of `node`.
    pub fn isolate(&self, node: NodeId) {
        let mut s = self.lock();
        let others: Vec<NodeId> = s.endpoints.keys().copied().collect();
        for o in others {
            s.cut(node, o);
        }
    }

    /// Restores the link between `a` and `b`.
    pub fn reconnect(&self, a: NodeId, b: NodeId) {
        self.lock().cuts.remove(&link(a, b));
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.lock().cuts.clear();
    }

    /// Messages in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().queue.len()
    }

    /// Calls waiting for a reply.
    pub fn pending_calls(&self) -> usize {
        self.lock().calls.len()
    }

    /// When the next message is due, if any.
    pub fn next_delivery_at(&self) -> Option<Duration> {
        self.lock().queue.keys().next().map(|(t, _)| *t)
    }

    /// The counters so far.
    pub fn stats(&self) -> SimStats {
        self.lock().stats.clone()
    }

    /// Takes the next message in delivery order, advancing simulated time to it (failing calls
    /// whose deadline passes on the way). A reply completes its call here. `None` when nothing
    /// is in flight.
    pub fn deliver_next(&self) -> Option<Delivery> {
        let mut s = self.lock();
        loop {
            let ((at, _), m) = s.queue.pop_first()?;
            s.set_now(at);
            if s.is_cut(m.from, m.to) || !s.endpoints.contains_key(&m.to) {
                s.stats.dropped_partition += 1;
                continue;
            }
            s.stats.delivered += 1;
            let (from, to) = (m.from, m.to);
            return Some(match m.payload {
                Payload::Raft { group, msg } => Delivery::Raft {
                    from,
                    to,
                    group,
                    msg,
                },
                Payload::Request { call, ctl, data } => Delivery::Request {
                    reply_to: SimReplyTo {
                        caller: from,
                        callee: to,
                        call,
                    },
                    ctl,
                    data,
                },
                Payload::Response { call, result } => {
                    if let Some(c) = s.calls.remove(&call) {
                        let _ = c.tx.send(result);
                    }
                    Delivery::Response { from, to }
                }
            });
        }
    }

    /// Every message due at the current simulated time or before, in order, without advancing
    /// time (for a harness that keeps its own clock and calls [`SimNetwork::advance`]).
    pub fn deliver_due(&self) -> Vec<Delivery> {
        let mut out = Vec::new();
        while self.next_delivery_at().is_some_and(|t| t <= self.now()) {
            match self.deliver_next() {
                Some(d) => out.push(d),
                None => break,
            }
        }
        out
    }

    fn reply(&self, to: &SimReplyTo, result: CallResult) {
        let mut s = self.lock();
        if s.is_cut(to.callee, to.caller) || !s.calls.contains_key(&to.call) {
            return;
        }
        s.transmit(
            to.callee,
            to.caller,
            Payload::Response {
                call: to.call,
                result,
            },
        );
    }

    /// Sends the callee's reply to a request back over the network.
    pub fn respond(&self, to: &SimReplyTo, ctl: Vec<u8>, data: Option<AlignedBuf>) {
        let data = data.unwrap_or_else(|| AlignedBuf::zeroed(0));
        self.reply(to, Ok((ctl, data)));
    }

    /// Sends a transport-level refusal of a request back over the network.
    pub fn refuse(&self, to: &SimReplyTo, code: RefuseCode, message: &str) {
        let e = TransportError::Refused {
            peer: to.callee,
            code,
            message: message.to_string(),
        };
        self.reply(to, Err(e));
    }

    /// Gives a delivery to its node's registered [`Inbound`]: a Raft message to its channel
    /// (dropped when full or missing), a request to its handler (awaited here, then answered).
    /// A handler that itself waits for the network must be dispatched on its own task.
    pub async fn dispatch(&self, d: Delivery) {
        match d {
            Delivery::Raft {
                from,
                to,
                group,
                msg,
            } => {
                let inbound = self
                    .lock()
                    .endpoints
                    .get(&to)
                    .and_then(|e| e.inbound.clone());
                let ok = inbound
                    .is_some_and(|i| i.raft.try_send(InboundRaft { from, group, msg }).is_ok());
                if !ok {
                    self.lock().stats.dropped_inbound += 1;
                }
            }
            Delivery::Request {
                reply_to,
                ctl,
                data,
            } => {
                let handler = self
                    .lock()
                    .endpoints
                    .get(&reply_to.callee)
                    .and_then(|e| e.inbound.as_ref())
                    .and_then(|i| i.rpc.clone());
                match handler {
                    Some(h) => {
                        let (ctl, data) = h.handle(reply_to.caller, ctl, data).await;
                        self.respond(&reply_to, ctl, data);
                    }
                    None => self.refuse(&reply_to, RefuseCode::NoHandler, "no rpc handler"),
                }
            }
            Delivery::Response { .. } => {}
        }
    }

    /// Delivers and dispatches until nothing is in flight and no call is waiting (advancing
    /// simulated time to call deadlines when only those remain), or `max_steps` deliveries.
    /// Returns the number of deliveries.
    pub async fn run_until_idle(&self, max_steps: usize) -> usize {
        let mut steps = 0;
        while steps < max_steps {
            if let Some(d) = self.deliver_next() {
                steps += 1;
                self.dispatch(d).await;
                continue;
            }
            // Let tasks woken by completed calls run: they may send more.
            tokio::task::yield_now().await;
            if self.in_flight() > 0 {
                continue;
            }
            let mut s = self.lock();
            match s.calls.values().map(|c| c.deadline).min() {
                Some(t) => s.set_now(t),
                None => break,
            }
        }
        steps
    }
}

/// One node's [`Transport`] on a [`SimNetwork`]. Cloning it shares it.
#[derive(Clone)]
pub struct SimTransport {
    net: SimNetwork,
    node: NodeId,
}

impl fmt::Debug for SimTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimTransport")
            .field("node", &self.node)
            .finish()
    }
}

impl SimTransport {
    /// The network this endpoint is attached to.
    pub fn network(&self) -> &SimNetwork {
        &self.net
    }
}

/// Forgets a call's waiter when the call future is dropped before its reply.
struct CallGuard {
    net: SimNetwork,
    call: u64,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.net.lock().calls.remove(&self.call);
    }
}

impl Transport for SimTransport {
    fn node(&self) -> NodeId {
        self.node
    }

    fn set_inbound(&self, inbound: Inbound) {
        self.net
            .lock()
            .endpoints
            .entry(self.node)
            .or_default()
            .inbound = Some(inbound);
    }

    fn add_peer(&self, node: NodeId, _addr: SocketAddr) {
        if node != self.node {
            let mut s = self.net.lock();
            s.endpoints.entry(self.node).or_default().peers.insert(node);
        }
    }

    fn remove_peer(&self, node: NodeId) {
        let mut s = self.net.lock();
        s.endpoints
            .entry(self.node)
            .or_default()
            .peers
            .remove(&node);
        let me = self.node;
        let failed: Vec<u64> = s
            .calls
            .iter()
            .filter(|(_, c)| c.from == me && c.to == node)
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            if let Some(c) = s.calls.remove(&id) {
                let _ = c.tx.send(Err(TransportError::Disconnected(node)));
            }
        }
    }

    fn is_connected(&self, node: NodeId) -> bool {
        let s = self.net.lock();
        s.endpoints
            .get(&self.node)
            .is_some_and(|e| e.peers.contains(&node))
            && s.endpoints.contains_key(&node)
            && !s.is_cut(self.node, node)
    }

    fn send_raft(&self, to: NodeId, group: GroupId, msg: Message) -> Result<(), TransportError> {
        let mut s = self.net.lock();
        s.check_send(self.node, to)?;
        s.transmit(self.node, to, Payload::Raft { group, msg });
        Ok(())
    }

    fn call(
        &self,
        to: NodeId,
        ctl: Vec<u8>,
        data: Option<Arc<AlignedBuf>>,
        timeout: Duration,
    ) -> impl Future<Output = Result<(Vec<u8>, AlignedBuf), TransportError>> + Send {
        let net = self.net.clone();
        let from = self.node;
        async move {
            let data_len = data.as_ref().map_or(0, |d| d.len());
            if ctl.len() > MAX_CTL_LEN as usize || data_len > MAX_DATA_LEN as usize {
                return Err(TransportError::TooLarge {
                    what: "rpc",
                    len: (ctl.len() + data_len) as u64,
                    max: MAX_DATA_LEN as u64,
                });
            }
            let (rx, call) = {
                let mut s = net.lock();
                s.check_send(from, to)?;
                let call = s.next_call;
                s.next_call += 1;
                let (tx, rx) = oneshot::channel();
                let deadline = s.now.saturating_add(timeout);
                s.calls.insert(
                    call,
                    PendingCall {
                        from,
                        to,
                        deadline,
                        tx,
                    },
                );
                let data =
                    data.map_or_else(|| AlignedBuf::zeroed(0), |d| AlignedBuf::from_slice(&d));
                s.transmit(from, to, Payload::Request { call, ctl, data });
                (rx, call)
            };
            let _guard = CallGuard {
                net: net.clone(),
                call,
            };
            rx.await.unwrap_or(Err(TransportError::Disconnected(to)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::transport::handler_fn;
    use raft::prelude::MessageType;
    use tokio::sync::mpsc;

    fn msg(from: u64, to: u64, index: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = from;
        m.to = to;
        m.index = index;
        m
    }

    fn three(seed: u64, config: SimConfig) -> (SimNetwork, Vec<SimTransport>) {
        let net = SimNetwork::new(seed, config);
        let ids = [NodeId(1), NodeId(2), NodeId(3)];
        let eps = ids
            .iter()
            .map(|id| net.endpoint(*id, ids.iter().copied()))
            .collect();
        (net, eps)
    }

    /// Sends 100 messages on every link, then delivers everything: the trace of what arrived.
    fn scenario(seed: u64, config: SimConfig) -> (Vec<(u64, u64, u64)>, SimStats) {
        let (net, eps) = three(seed, config);
        for i in 0..100u64 {
            for a in &eps {
                for b in 1..=3u64 {
                    if b != a.node().0 {
                        a.send_raft(NodeId(b), GroupId(i as u128 % 3), msg(a.node().0, b, i))
                            .unwrap();
                    }
                }
            }
        }
        let mut trace = Vec::new();
        while let Some(d) = net.deliver_next() {
            if let Delivery::Raft { from, to, msg, .. } = d {
                trace.push((from.0, to.0, msg.index));
            }
        }
        (trace, net.stats())
    }

    fn faulty() -> SimConfig {
        SimConfig {
            drop_probability: 0.2,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
            reorder: true,
            ..SimConfig::default()
        }
    }

    #[test]
    fn same_seed_same_run_other_seed_other_run() {
        let (a, sa) = scenario(11, faulty());
        let (b, sb) = scenario(11, faulty());
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        let (c, _) = scenario(12, faulty());
        assert_ne!(a, c, "another seed must give another run");
        // About a fifth of 600 messages were dropped, and exactly those were not delivered.
        assert!(
            (80..=160).contains(&sa.dropped_random),
            "{}",
            sa.dropped_random
        );
        assert_eq!(a.len() as u64, 600 - sa.dropped_random);
    }

    #[test]
    fn links_are_fifo_unless_reordering_is_on() {
        let in_order = |trace: &[(u64, u64, u64)]| {
            let mut last: BTreeMap<(u64, u64), u64> = BTreeMap::new();
            trace.iter().all(|(f, t, i)| {
                let prev = last.insert((*f, *t), *i);
                prev.is_none_or(|p| p < *i)
            })
        };
        let fifo = SimConfig {
            reorder: false,
            drop_probability: 0.0,
            ..faulty()
        };
        let (t, _) = scenario(5, fifo);
        assert_eq!(t.len(), 600);
        assert!(in_order(&t));
        let (t, _) = scenario(5, faulty());
        assert!(
            !in_order(&t),
            "with reordering some messages overtake others"
        );
    }

    #[test]
    fn drop_everything() {
        let cfg = SimConfig {
            drop_probability: 1.0,
            ..SimConfig::default()
        };
        let (t, s) = scenario(1, cfg);
        assert!(t.is_empty());
        assert_eq!(s.dropped_random, 600);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn partition_refuses_drops_in_flight_fails_calls_and_heals() {
        let (net, eps) = three(3, SimConfig::default());
        let (n1, n2, n3) = (NodeId(1), NodeId(2), NodeId(3));
        eps[0].send_raft(n2, GroupId(1), msg(1, 2, 1)).unwrap();
        eps[1].send_raft(n3, GroupId(1), msg(2, 3, 1)).unwrap();
        let caller = eps[0].clone();
        let call =
            tokio::spawn(async move { caller.call(n2, b"x".to_vec(), None, Duration::MAX).await });
        tokio::task::yield_now().await;
        assert_eq!(net.pending_calls(), 1);
        net.partition(&[n1], &[n2, n3]);
        // The call fails at once, not at its deadline; the 1→2 message is gone.
        let r = call.await.unwrap();
        assert!(
            matches!(r, Err(TransportError::Disconnected(n)) if n == n2),
            "{r:?}"
        );
        assert_eq!(net.now(), Duration::ZERO);
        assert!(matches!(
            eps[0].send_raft(n3, GroupId(1), msg(1, 3, 2)),
            Err(TransportError::Unreachable(_))
        ));
        assert!(!eps[0].is_connected(n2));
        assert!(eps[1].is_connected(n3));
        let mut got = Vec::new();
        while let Some(d) = net.deliver_next() {
            if let Delivery::Raft { from, to, .. } = d {
                got.push((from.0, to.0));
            }
        }
        assert_eq!(got, [(2, 3)]);
        net.heal();
        eps[0].send_raft(n2, GroupId(1), msg(1, 2, 3)).unwrap();
        assert!(matches!(net.deliver_next(), Some(Delivery::Raft { from, .. }) if from == n1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_get_replies_refusals_and_time_out_in_simulated_time() {
        let (net, eps) = three(9, SimConfig::default());
        let (raft_tx, _raft_rx) = mpsc::channel(8);
        eps[1].set_inbound(
            Inbound::new(raft_tx).with_rpc(handler_fn(|from, ctl, _| async move {
                let mut r = ctl;
                r.push(from.0 as u8);
                (r, None)
            })),
        );
        let a = eps[0].call(NodeId(2), vec![1], None, Duration::from_secs(1));
        let b = eps[0].call(NodeId(2), vec![2], None, Duration::from_secs(1));
        let (ra, rb, _) = tokio::join!(a, b, net.run_until_idle(100));
        assert_eq!(ra.unwrap().0, [1, 1]);
        assert_eq!(rb.unwrap().0, [2, 1]);
        // Node 3 has no handler: refused. Then a lost request times out at its deadline.
        let r = tokio::join!(
            eps[0].call(NodeId(3), vec![], None, Duration::from_secs(1)),
            net.run_until_idle(100)
        )
        .0;
        assert!(matches!(
            r,
            Err(TransportError::Refused {
                code: RefuseCode::NoHandler,
                ..
            })
        ));
        net.set_config(SimConfig {
            drop_probability: 1.0,
            ..SimConfig::default()
        });
        let start = net.now();
        let r = tokio::join!(
            eps[0].call(NodeId(2), vec![], None, Duration::from_secs(3)),
            net.run_until_idle(100)
        )
        .0;
        assert!(matches!(r, Err(TransportError::Timeout(_))), "{r:?}");
        assert_eq!(net.now() - start, Duration::from_secs(3));
        assert_eq!(net.stats().timed_out, 1);
    }

    #[test]
    fn unknown_peers_are_refused() {
        let net = SimNetwork::new(1, SimConfig::default());
        let a = net.endpoint(NodeId(1), [NodeId(2)]);
        let _b = net.endpoint(NodeId(2), [NodeId(1)]);
        assert!(matches!(
            a.send_raft(NodeId(9), GroupId(1), msg(1, 9, 1)),
            Err(TransportError::UnknownPeer(_))
        ));
        a.remove_peer(NodeId(2));
        assert!(matches!(
            a.send_raft(NodeId(2), GroupId(1), msg(1, 2, 1)),
            Err(TransportError::UnknownPeer(_))
        ));
        a.add_peer(NodeId(2), "127.0.0.1:1".parse().unwrap());
        a.send_raft(NodeId(2), GroupId(1), msg(1, 2, 1)).unwrap();
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut r = SimRng::new(1);
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            buckets[r.below(10) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|b| (800..1200).contains(b)),
            "{buckets:?}"
        );
        assert_eq!(SimRng::new(5).next_u64(), SimRng::new(5).next_u64());
    }
}
