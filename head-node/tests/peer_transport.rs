//! The TCP transport between head nodes, on 127.0.0.1: real transports, plus a fake peer that
//! speaks the wire protocol by hand to send what a real one never would.

use common::cred::{ClusterKey, HandshakeRole, nonce};
use common::{AlignedBuf, NodeId};
use head_node::replication::GroupId;
use head_node::replication::peer_proto::{
    self as proto, Auth, Challenge, HEADER_LEN, Hello, Kind, MAX_DATA_LEN, PROTOCOL_VERSION,
    Refusal, RefuseCode, Transcript,
};
use head_node::replication::transport::{
    Inbound, InboundRaft, TcpTransport, Transport, TransportConfig, TransportError, handler_fn,
};
use prometheus::Registry;
use raft::prelude::{Message, MessageType};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

fn key() -> ClusterKey {
    ClusterKey::from_bytes([0x42; 32])
}

fn raft_msg(from: u64, to: u64, index: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.from = from;
    m.to = to;
    m.term = 1;
    m.index = index;
    m
}

/// The value of `series` (name and labels as exposed) in `registry`; 0 when absent.
fn metric(registry: &Registry, series: &str) -> f64 {
    common::metrics::render(registry)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `cond` until it holds (10 s limit).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One head node's transport, serving on its listener.
struct Node {
    id: NodeId,
    addr: SocketAddr,
    t: Arc<TcpTransport>,
    registry: Registry,
    raft_rx: mpsc::Receiver<InboundRaft>,
    serve: JoinHandle<()>,
}

impl Node {
    fn start(
        id: u64,
        key: ClusterKey,
        listener: TcpListener,
        peers: &[(u64, SocketAddr)],
        config: TransportConfig,
    ) -> Self {
        let registry = Registry::new();
        let peers: HashMap<NodeId, SocketAddr> =
            peers.iter().map(|(n, a)| (NodeId(*n), *a)).collect();
        let addr = listener.local_addr().unwrap();
        let t =
            Arc::new(TcpTransport::with_config(NodeId(id), key, peers, &registry, config).unwrap());
        let (tx, raft_rx) = mpsc::channel(4096);
        t.set_inbound(Inbound::new(tx));
        let serve = tokio::spawn(t.serve(listener));
        Self {
            id: NodeId(id),
            addr,
            t,
            registry,
            raft_rx,
            serve,
        }
    }

    fn m(&self, series: &str) -> f64 {
        metric(&self.registry, series)
    }

    /// Shuts the transport down and waits until its listener is closed.
    async fn stop(self) {
        self.t.shutdown();
        self.serve.await.unwrap();
    }

    /// Receives `n` raft messages (10 s limit).
    async fn recv(&mut self, n: usize) -> Vec<InboundRaft> {
        let mut out = Vec::new();
        while out.len() < n {
            let m = tokio::time::timeout(Duration::from_secs(10), self.raft_rx.recv())
                .await
                .unwrap_or_else(|_| panic!("node {} got {} of {n} messages", self.id, out.len()))
                .unwrap();
            out.push(m);
        }
        out
    }
}

/// Node `id` alone, configured with a lower peer `peer` it never dials (only fakes connect).
fn lone(id: u64, peer: u64) -> Node {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let l = TcpListener::from_std(l).unwrap();
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    Node::start(id, key(), l, &[(peer, unused)], TransportConfig::default())
}

async fn listeners(n: usize) -> Vec<TcpListener> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    v
}

/// Nodes 1..=n, each configured with all the others.
async fn cluster(n: u64, config: TransportConfig) -> Vec<Node> {
    let ls = listeners(n as usize).await;
    let addrs: Vec<(u64, SocketAddr)> = ls
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.local_addr().unwrap()))
        .collect();
    ls.into_iter()
        .enumerate()
        .map(|(i, l)| {
            let id = i as u64 + 1;
            let peers: Vec<_> = addrs.iter().copied().filter(|(p, _)| *p != id).collect();
            Node::start(id, key(), l, &peers, config.clone())
        })
        .collect()
}

async fn connected(nodes: &[&Node]) {
    for a in nodes {
        for b in nodes {
            if a.id != b.id {
                eventually(&format!("{} connected to {}", a.id, b.id), || {
                    a.t.is_connected(b.id)
                })
                .await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_messages_of_many_groups_flow_both_ways_over_one_connection_per_pair() {
    let mut nodes = cluster(3, TransportConfig::default()).await;
    connected(&nodes.iter().collect::<Vec<_>>()).await;
    let mut expected: Vec<BTreeSet<(u64, u128, u64)>> = vec![BTreeSet::new(); 3];
    for a in &nodes {
        for b in &nodes {
            if a.id == b.id {
                continue;
            }
            for i in 0..40u64 {
                let group = GroupId((i % 8) as u128 + 1000 * a.id.0 as u128);
                a.t.send_raft(b.id, group, raft_msg(a.id.0, b.id.0, i))
                    .unwrap();
                expected[b.id.0 as usize - 1].insert((a.id.0, group.0, i));
            }
        }
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        let got: BTreeSet<_> = node
            .recv(80)
            .await
            .into_iter()
            .map(|m| {
                assert_eq!(m.msg.to, node.id.0);
                assert_eq!(
                    m.msg.from, m.from.0,
                    "delivered as from its authenticated peer"
                );
                (m.from.0, m.group.0, m.msg.index)
            })
            .collect();
        assert_eq!(got, expected[i]);
    }
    // One connection per pair: each side counted exactly one established connection per peer,
    // although both directions carried traffic; the higher id never dialed.
    for a in &nodes {
        for b in &nodes {
            if a.id != b.id {
                let p = format!("{{peer=\"{}\"}}", b.id);
                assert_eq!(
                    a.m(&format!("stockade_peer_connections_established_total{p}")),
                    1.0,
                    "{} ↔ {}",
                    a.id,
                    b.id
                );
                assert_eq!(a.m(&format!("stockade_peer_connections{p}")), 1.0);
                assert_eq!(
                    a.m(&format!(
                        "stockade_peer_messages_received_total{{kind=\"raft\",peer=\"{}\"}}",
                        b.id
                    )),
                    40.0
                );
            }
        }
        assert!(!common::metrics::render(&a.registry).contains("handshake_failures"));
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn batching_packs_many_messages_into_few_frames_and_full_queues_drop() {
    // Everything sent in one synchronous burst is queued before the writer runs: it must leave
    // in as few frames as the batch bound allows.
    let config = TransportConfig {
        batch_max_messages: 100,
        ..TransportConfig::default()
    };
    let mut nodes = cluster(2, config).await;
    connected(&[&nodes[0], &nodes[1]]).await;
    for i in 0..1000u64 {
        nodes[0]
            .t
            .send_raft(NodeId(2), GroupId(i as u128 % 50), raft_msg(1, 2, i))
            .unwrap();
    }
    let got = nodes[1].recv(1000).await;
    let order: Vec<u64> = got.iter().map(|m| m.msg.index).collect();
    assert_eq!(
        order,
        (0..1000).collect::<Vec<_>>(),
        "one peer's messages keep their order"
    );
    let a = &nodes[0];
    assert_eq!(
        a.m("stockade_peer_messages_sent_total{kind=\"raft\",peer=\"2\"}"),
        1000.0
    );
    assert_eq!(
        a.m("stockade_peer_frames_sent_total{kind=\"raft\",peer=\"2\"}"),
        10.0,
        "1000 messages in frames of at most 100"
    );
    assert_eq!(
        nodes[1].m("stockade_peer_frames_received_total{kind=\"raft\",peer=\"1\"}"),
        10.0
    );

    // A bounded queue: with room for 4 messages, a burst of 10 loses 6, counted, and each loss
    // tells the caller to report the peer unreachable.
    let config = TransportConfig {
        raft_queue_len: 4,
        ..TransportConfig::default()
    };
    let mut small = cluster(2, config).await;
    connected(&[&small[0], &small[1]]).await;
    let results: Vec<_> = (0..10u64)
        .map(|i| {
            small[0]
                .t
                .send_raft(NodeId(2), GroupId(1), raft_msg(1, 2, i))
        })
        .collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 4);
    for r in &results[4..] {
        let e = r.as_ref().unwrap_err();
        assert!(
            matches!(e, TransportError::QueueFull(_)) && e.is_unreachable(),
            "{e}"
        );
    }
    assert_eq!(
        small[0].m("stockade_peer_dropped_messages_total{peer=\"2\",reason=\"queue_full\"}"),
        6.0
    );
    assert_eq!(small[1].recv(4).await.len(), 4);
    // Sending to a peer that is not configured is refused and counted too.
    assert!(matches!(
        small[0]
            .t
            .send_raft(NodeId(9), GroupId(1), raft_msg(1, 9, 0)),
        Err(TransportError::UnknownPeer(_))
    ));
    for n in nodes.into_iter().chain(small) {
        n.stop().await;
    }
}

type Gates = Arc<Mutex<HashMap<u32, oneshot::Sender<()>>>>;

/// A handler that parks each call (ctl = 4-byte id) until the test opens its gate, then
/// replies with the id and the data reversed.
fn gated_handler(gates: Gates, handled: Arc<AtomicU64>) -> Inbound {
    let (tx, _) = mpsc::channel(1);
    Inbound::new(tx).with_rpc(handler_fn(move |_from, ctl: Vec<u8>, data: AlignedBuf| {
        let gates = gates.clone();
        let handled = handled.clone();
        async move {
            handled.fetch_add(1, Ordering::SeqCst);
            let id = u32::from_le_bytes(ctl[..4].try_into().unwrap());
            let (tx, rx) = oneshot::channel();
            gates.lock().unwrap().insert(id, tx);
            let _ = rx.await;
            let mut rev = data.to_vec();
            rev.reverse();
            (ctl, Some(AlignedBuf::from_slice(&rev)))
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_are_in_flight_together_and_replies_match_out_of_order() {
    let nodes = cluster(2, TransportConfig::default()).await;
    connected(&[&nodes[0], &nodes[1]]).await;
    let gates: Gates = Arc::default();
    let handled = Arc::new(AtomicU64::new(0));
    nodes[1]
        .t
        .set_inbound(gated_handler(gates.clone(), handled.clone()));
    let mut calls = Vec::new();
    for id in 0..10u32 {
        let t = nodes[0].t.clone();
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i as u32 * 7 + id) as u8).collect();
        let data = Arc::new(AlignedBuf::from_slice(&data));
        calls.push(tokio::spawn(async move {
            let r = t
                .call(
                    NodeId(2),
                    id.to_le_bytes().to_vec(),
                    Some(data.clone()),
                    Duration::from_secs(30),
                )
                .await;
            (r, data)
        }));
    }
    eventually("all 10 calls in the handler at once", || {
        gates.lock().unwrap().len() == 10
    })
    .await;
    // Release them last to first; each reply reaches its own caller while the others wait.
    for id in (0..10u32).rev() {
        let gate = gates.lock().unwrap().remove(&id).unwrap();
        gate.send(()).unwrap();
        let call = calls.pop().unwrap();
        let (r, data) = call.await.unwrap();
        let (ctl, reply) = r.unwrap();
        assert_eq!(ctl, id.to_le_bytes());
        let mut want = data.to_vec();
        want.reverse();
        assert_eq!(&reply[..], &want[..]);
        assert_eq!(
            gates.lock().unwrap().len(),
            id as usize,
            "the others are still in flight"
        );
    }
    assert_eq!(handled.load(Ordering::SeqCst), 10);
    assert_eq!(
        nodes[0].m("stockade_peer_rpc_duration_seconds_count{peer=\"2\"}"),
        10.0
    );
    // A peer without a handler refuses at once; an unconnected peer fails at once.
    let r = nodes[1]
        .t
        .call(NodeId(1), vec![1], None, Duration::from_secs(30))
        .await;
    assert!(
        matches!(
            r,
            Err(TransportError::Refused {
                code: RefuseCode::NoHandler,
                ..
            })
        ),
        "{r:?}"
    );
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_fail_promptly_when_the_connection_drops() {
    let mut nodes = cluster(2, TransportConfig::default()).await;
    connected(&[&nodes[0], &nodes[1]]).await;
    let gates: Gates = Arc::default();
    nodes[1]
        .t
        .set_inbound(gated_handler(gates.clone(), Arc::default()));
    let mut calls = Vec::new();
    for id in 0..5u32 {
        let t = nodes[0].t.clone();
        calls.push(tokio::spawn(async move {
            t.call(
                NodeId(2),
                id.to_le_bytes().to_vec(),
                None,
                Duration::MAX, // "no timeout" must not overflow; only the drop ends these
            )
            .await
        }));
    }
    eventually("5 calls in the handler", || {
        gates.lock().unwrap().len() == 5
    })
    .await;
    let started = Instant::now();
    nodes.pop().unwrap().stop().await;
    for c in calls {
        let r = tokio::time::timeout(Duration::from_secs(5), c)
            .await
            .expect("a call must fail when its connection drops, not at its timeout")
            .unwrap();
        assert!(
            matches!(r, Err(TransportError::Disconnected(n)) if n == NodeId(2)),
            "{r:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // With no connection, a call fails at once.
    eventually("node 1 notices", || !nodes[0].t.is_connected(NodeId(2))).await;
    let r = nodes[0]
        .t
        .call(NodeId(2), vec![], None, Duration::from_secs(60))
        .await;
    assert!(matches!(r, Err(TransportError::Unreachable(_))), "{r:?}");
    assert!(
        nodes[0].m("stockade_peer_rpc_failures_total{peer=\"2\",reason=\"disconnected\"}") >= 5.0
    );
    nodes.pop().unwrap().stop().await;
}

/// What a fake peer got back from a handshake attempt.
#[derive(Debug)]
enum FakeOutcome {
    Authenticated(TcpStream),
    Refused(RefuseCode),
    /// The acceptor's proof did not verify with the fake's key.
    ServerProofBad(TcpStream, Challenge, [u8; 32]),
}

async fn write_msg<T: serde::Serialize>(s: &mut TcpStream, kind: Kind, msg: &T) {
    s.write_all(&proto::encode_message(kind, 0, msg).unwrap())
        .await
        .unwrap();
}

/// Runs the dialer's side of the handshake by hand as node `from`, with `key`.
async fn fake_handshake(addr: SocketAddr, key: &ClusterKey, from: u64, to: u64) -> FakeOutcome {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let my_nonce = nonce();
    let hello = Hello {
        min_version: 1,
        max_version: PROTOCOL_VERSION,
        from: NodeId(from),
        to: NodeId(to),
        nonce: my_nonce,
    };
    write_msg(&mut s, Kind::Hello, &hello).await;
    let f = proto::read_frame(&mut s).await.unwrap();
    let ch: Challenge = match f.header.kind {
        Kind::Challenge => f.decode().unwrap(),
        Kind::Refused => return FakeOutcome::Refused(f.decode::<Refusal>().unwrap().code),
        k => panic!("unexpected {k:?}"),
    };
    let t = Transcript {
        client: NodeId(from),
        server: NodeId(to),
        version: ch.version,
    };
    if !t.verify(key, HandshakeRole::Server, &ch.nonce, &my_nonce, &ch.proof) {
        return FakeOutcome::ServerProofBad(s, ch, my_nonce);
    }
    let auth = Auth {
        proof: t.proof(key, HandshakeRole::Client, &my_nonce, &ch.nonce),
    };
    write_msg(&mut s, Kind::Auth, &auth).await;
    let f = proto::read_frame(&mut s).await.unwrap();
    match f.header.kind {
        Kind::AuthOk => FakeOutcome::Authenticated(s),
        Kind::Refused => FakeOutcome::Refused(f.decode::<Refusal>().unwrap().code),
        k => panic!("unexpected {k:?}"),
    }
}

async fn authenticated(addr: SocketAddr, from: u64, to: u64) -> TcpStream {
    match fake_handshake(addr, &key(), from, to).await {
        FakeOutcome::Authenticated(s) => s,
        other => panic!("{other:?}"),
    }
}

/// A whole Raft frame carrying `messages` as raw bytes.
fn raft_frame(messages: &[(GroupId, Vec<u8>)]) -> Vec<u8> {
    let parts: Vec<(GroupId, &[u8])> = messages.iter().map(|(g, b)| (*g, &b[..])).collect();
    let mut wire = proto::encode_raft_batch(&parts).unwrap();
    for (_, b) in messages {
        wire.extend_from_slice(b);
    }
    wire
}

fn encoded(m: &Message) -> Vec<u8> {
    proto::encode_raft_message(m).unwrap()
}

/// True when the other side closes `s` (EOF or reset) within 3 s — well inside the 10 s idle
/// timeout, so a close means the node decided it — skipping what it sent first.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_key_is_refused_before_anything_is_decoded() {
    // Real transports with different keys never connect, in either role.
    let ls = listeners(2).await;
    let (a1, a2) = (ls[0].local_addr().unwrap(), ls[1].local_addr().unwrap());
    let mut it = ls.into_iter();
    let n1 = Node::start(
        1,
        key(),
        it.next().unwrap(),
        &[(2, a2)],
        TransportConfig::default(),
    );
    let mut n2 = Node::start(
        2,
        ClusterKey::from_bytes([0x43; 32]),
        it.next().unwrap(),
        &[(1, a1)],
        TransportConfig::default(),
    );
    eventually("the dialer to refuse the acceptor's proof", || {
        n1.m("stockade_peer_handshake_failures_total{peer=\"2\",reason=\"bad_proof\"}") >= 1.0
    })
    .await;
    eventually("the acceptor to count the failed handshake", || {
        n2.m("stockade_peer_handshake_failures_total{peer=\"1\",reason=\"io\"}") >= 1.0
    })
    .await;
    assert!(!n1.t.is_connected(NodeId(2)) && !n2.t.is_connected(NodeId(1)));
    assert!(matches!(
        n1.t.send_raft(NodeId(2), GroupId(1), raft_msg(1, 2, 1)),
        Err(TransportError::Unreachable(_))
    ));
    n1.stop().await;

    // A fake node 1 without the key, trying everything it can against node 2: its Auth is
    // refused, and whatever it pipelines after it (a valid raft message, a garbage one, a
    // request) is never read, decoded or handled.
    let handled = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel(16);
    n2.raft_rx = rx;
    let h = handled.clone();
    n2.t.set_inbound(Inbound::new(tx).with_rpc(handler_fn(move |_, ctl, _| {
        h.fetch_add(1, Ordering::SeqCst);
        async move { (ctl, None) }
    })));
    let bad = key();
    let FakeOutcome::ServerProofBad(mut s, ch, my_nonce) =
        fake_handshake(n2.addr, &bad, 1, 2).await
    else {
        panic!("node 2 has another key: its proof must not verify under ours");
    };
    let t = Transcript {
        client: NodeId(1),
        server: NodeId(2),
        version: ch.version,
    };
    let auth = Auth {
        proof: t.proof(&bad, HandshakeRole::Client, &my_nonce, &ch.nonce),
    };
    let mut wire = proto::encode_message(Kind::Auth, 0, &auth).unwrap();
    wire.extend(raft_frame(&[
        (GroupId(1), encoded(&raft_msg(1, 2, 1))),
        (GroupId(2), vec![0x0b, 0x0c, 0xff]),
    ]));
    wire.extend(proto::encode_frame_head(Kind::Request, 1, b"hi", &[]).unwrap());
    s.write_all(&wire).await.unwrap();
    let f = proto::read_frame(&mut s).await.unwrap();
    assert_eq!(f.header.kind, Kind::Refused);
    assert_eq!(f.decode::<Refusal>().unwrap().code, RefuseCode::AuthFailed);
    assert!(closed_by_peer(&mut s).await);
    // A fake that skips Auth and sends a raft frame right after Hello: closed on its header.
    let mut s = TcpStream::connect(n2.addr).await.unwrap();
    let hello = Hello {
        min_version: 1,
        max_version: 1,
        from: NodeId(1),
        to: NodeId(2),
        nonce: nonce(),
    };
    let mut wire = proto::encode_message(Kind::Hello, 0, &hello).unwrap();
    wire.extend(raft_frame(&[(GroupId(1), encoded(&raft_msg(1, 2, 2)))]));
    s.write_all(&wire).await.unwrap();
    assert!(closed_by_peer(&mut s).await);
    eventually("both failures counted", || {
        n2.m("stockade_peer_handshake_failures_total{peer=\"1\",reason=\"bad_proof\"}") >= 1.0
            && n2.m("stockade_peer_handshake_failures_total{peer=\"1\",reason=\"malformed\"}")
                >= 1.0
    })
    .await;
    let text = common::metrics::render(&n2.registry);
    for never in [
        "stockade_peer_frames_received_total",
        "stockade_peer_messages_received_total",
        "stockade_peer_dropped_messages_total",
        "stockade_peer_connections_established_total",
    ] {
        assert!(!text.contains(never), "{never} moved:\n{text}");
    }
    assert_eq!(handled.load(Ordering::SeqCst), 0, "no handler ran");
    assert!(
        n2.raft_rx.try_recv().is_err(),
        "no raft message was delivered"
    );
    n2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_raft_message_after_a_valid_handshake_is_dropped_alone() {
    // Node 2 alone (it never dials node 1, the lower id); a fake node 1 with the key connects
    // and sends a batch of good and bad messages.
    let mut nodes = vec![lone(2, 1)];
    let idx = 0;
    let mut s = authenticated(nodes[idx].addr, 1, 2).await;
    let batch = raft_frame(&[
        (GroupId(1), encoded(&raft_msg(1, 2, 10))),
        (GroupId(2), vec![0x0b, 0x0c]),             // group wire type
        (GroupId(3), vec![0xff; 11]),               // a varint that never ends
        (GroupId(4), vec![0x62, 0x7f, 1]),          // a length beyond the message
        (GroupId(5), encoded(&raft_msg(3, 2, 11))), // claims another sender
        (GroupId(6), encoded(&raft_msg(1, 2, 12))),
    ]);
    s.write_all(&batch).await.unwrap();
    let got = nodes[idx].recv(2).await;
    let got: Vec<_> = got.iter().map(|m| (m.group.0, m.msg.index)).collect();
    assert_eq!(got, [(1, 10), (6, 12)]);
    let n2 = &nodes[idx];
    assert_eq!(
        n2.m("stockade_peer_dropped_messages_total{peer=\"1\",reason=\"decode\"}"),
        3.0
    );
    assert_eq!(
        n2.m("stockade_peer_dropped_messages_total{peer=\"1\",reason=\"misaddressed\"}"),
        1.0
    );
    // The connection is still up and usable.
    s.write_all(&raft_frame(&[(GroupId(7), encoded(&raft_msg(1, 2, 13)))]))
        .await
        .unwrap();
    assert_eq!(nodes[idx].recv(1).await[0].msg.index, 13);
    for n in nodes {
        n.stop().await;
    }
}

/// A peer that sends a frame's header and then stalls in its body is cut off after the idle
/// timeout, as one that sends nothing is: it must not hold the connection, and the messages
/// behind it, forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_whose_body_stalls_closes_the_connection() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let unused: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let config = TransportConfig {
        idle_timeout: Duration::from_secs(1),
        keepalive_interval: Duration::from_millis(300),
        ..TransportConfig::default()
    };
    let n2 = Node::start(2, key(), l, &[(1, unused)], config);
    let mut s = authenticated(n2.addr, 1, 2).await;
    let frame = raft_frame(&[(GroupId(1), encoded(&raft_msg(1, 2, 10)))]);
    // Everything but the last byte: the header is whole, the body never is. The fake still
    // answers nothing, but the node's keepalive pings keep arriving, so only the stall can
    // close the connection.
    s.write_all(&frame[..frame.len() - 1]).await.unwrap();
    assert!(
        closed_by_peer(&mut s).await,
        "a stalled body kept the connection open"
    );
    assert_eq!(
        n2.m("stockade_peer_protocol_errors_total{peer=\"1\",reason=\"stalled\"}"),
        1.0
    );
    n2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_wrong_and_higher_nodes_are_refused() {
    let nodes = cluster(2, TransportConfig::default()).await;
    let n2 = &nodes[1];
    for (from, to, code) in [
        (7, 2, RefuseCode::UnknownNode),
        (1, 5, RefuseCode::WrongNode),
        (3, 2, RefuseCode::UnknownNode),
    ] {
        match fake_handshake(n2.addr, &key(), from, to).await {
            FakeOutcome::Refused(c) => assert_eq!(c, code, "{from}→{to}"),
            other => panic!("{from}→{to}: {other:?}"),
        }
    }
    // Node 1 is a configured peer but may not be dialed by a higher node: node 2 refuses a
    // "node 2" hello at node 1 (the higher id never dials).
    match fake_handshake(nodes[0].addr, &key(), 2, 1).await {
        FakeOutcome::Refused(c) => assert_eq!(c, RefuseCode::NotDialer),
        other => panic!("{other:?}"),
    }
    eventually("the refusals counted", || {
        n2.m("stockade_peer_handshake_failures_total{peer=\"unknown\",reason=\"unknown_node\"}")
            == 2.0
            && n2.m("stockade_peer_handshake_failures_total{peer=\"1\",reason=\"wrong_node\"}")
                == 1.0
    })
    .await;
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_that_connection_while_other_peers_carry_on() {
    // Node 3 accepts node 2 (real) and a fake node 1.
    let mut nodes = cluster(3, TransportConfig::default()).await;
    let first = nodes.remove(0);
    first.stop().await;
    connected(&[&nodes[0], &nodes[1]]).await;
    let n3_addr = nodes[1].addr;
    let mut header_len_too_big = proto::encode_frame_head(Kind::Request, 1, b"", &[]).unwrap();
    header_len_too_big[20..24].copy_from_slice(&(MAX_DATA_LEN + 1).to_le_bytes());
    let mut bad_crc = raft_frame(&[(GroupId(1), encoded(&raft_msg(1, 3, 1)))]);
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x40;
    // Make the index claim 5 bytes while the data part holds 4 (crc recomputed: valid frame).
    let ctl = vec![1u8, 1, 5];
    let mut batch_mismatch = proto::encode_frame_head(Kind::Raft, 0, &ctl, &[&[0u8; 4]]).unwrap();
    batch_mismatch.extend_from_slice(&[0u8; 4]);
    let garbage = vec![0xa5u8; HEADER_LEN * 3];
    let handshake_again = proto::encode_message(
        Kind::Hello,
        0,
        &Hello {
            min_version: 1,
            max_version: 1,
            from: NodeId(1),
            to: NodeId(3),
            nonce: [0; 32],
        },
    )
    .unwrap();
    let cases = [
        ("too_large", header_len_too_big),
        ("checksum", bad_crc),
        ("batch", batch_mismatch),
        ("malformed", garbage),
        ("unexpected", handshake_again),
    ];
    for (i, (reason, wire)) in cases.iter().enumerate() {
        let mut s = authenticated(n3_addr, 1, 3).await;
        s.write_all(wire).await.unwrap();
        assert!(
            closed_by_peer(&mut s).await,
            "{reason}: connection must close"
        );
        eventually(reason, || {
            nodes[1].m(&format!(
                "stockade_peer_protocol_errors_total{{peer=\"1\",reason=\"{reason}\"}}"
            )) == 1.0
        })
        .await;
        // Node 2 ↔ node 3 is untouched: still its first connection, still carrying traffic.
        nodes[0]
            .t
            .send_raft(NodeId(3), GroupId(9), raft_msg(2, 3, i as u64))
            .unwrap();
        nodes[1]
            .t
            .send_raft(NodeId(2), GroupId(9), raft_msg(3, 2, i as u64))
            .unwrap();
        assert_eq!(nodes[1].recv(1).await[0].msg.index, i as u64);
        assert_eq!(nodes[0].recv(1).await[0].msg.index, i as u64);
        assert_eq!(
            nodes[1].m("stockade_peer_connections_established_total{peer=\"2\"}"),
            1.0
        );
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dialer_reconnects_after_the_acceptor_restarts_on_the_same_port() {
    let config = TransportConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..TransportConfig::default()
    };
    let mut nodes = cluster(2, config.clone()).await;
    connected(&[&nodes[0], &nodes[1]]).await;
    nodes[0]
        .t
        .send_raft(NodeId(2), GroupId(1), raft_msg(1, 2, 1))
        .unwrap();
    nodes[1].recv(1).await;
    let n2 = nodes.pop().unwrap();
    let addr = n2.addr;
    n2.stop().await;
    let n1 = nodes.pop().unwrap();
    eventually("node 1 sees the connection drop", || {
        !n1.t.is_connected(NodeId(2))
    })
    .await;
    let r = n1.t.send_raft(NodeId(2), GroupId(1), raft_msg(1, 2, 2));
    assert!(r.as_ref().is_err_and(|e| e.is_unreachable()), "{r:?}");
    // Restart node 2 on the same port.
    let listener = TcpListener::bind(addr).await.unwrap();
    let mut n2 = Node::start(2, key(), listener, &[(1, n1.addr)], config);
    eventually("node 1 redials", || n1.t.is_connected(NodeId(2))).await;
    eventually("node 2 accepted", || n2.t.is_connected(NodeId(1))).await;
    n1.t.send_raft(NodeId(2), GroupId(1), raft_msg(1, 2, 3))
        .unwrap();
    n2.t.send_raft(NodeId(1), GroupId(1), raft_msg(2, 1, 4))
        .unwrap();
    assert_eq!(n2.recv(1).await[0].msg.index, 3);
    let mut n1 = n1;
    assert_eq!(n1.recv(1).await[0].msg.index, 4);
    assert_eq!(
        n1.m("stockade_peer_connections_established_total{peer=\"2\"}"),
        2.0
    );
    assert!(n1.m("stockade_peer_dropped_messages_total{peer=\"2\",reason=\"unreachable\"}") >= 1.0);
    n1.stop().await;
    n2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_from_a_peer_supersedes_the_old_one() {
    let mut n2 = lone(2, 1);
    let mut old = authenticated(n2.addr, 1, 2).await;
    let mut new = authenticated(n2.addr, 1, 2).await;
    assert!(
        closed_by_peer(&mut old).await,
        "the old connection is closed"
    );
    new.write_all(&raft_frame(&[(GroupId(1), encoded(&raft_msg(1, 2, 5)))]))
        .await
        .unwrap();
    assert_eq!(n2.recv(1).await[0].msg.index, 5);
    assert_eq!(
        n2.m("stockade_peer_connections_established_total{peer=\"1\"}"),
        2.0
    );
    assert_eq!(n2.m("stockade_peer_connections{peer=\"1\"}"), 1.0);
    // Node 2 sends over the new connection.
    n2.t.send_raft(NodeId(1), GroupId(1), raft_msg(2, 1, 6))
        .unwrap();
    let f = loop {
        let f = tokio::time::timeout(Duration::from_secs(10), proto::read_frame(&mut new))
            .await
            .unwrap()
            .unwrap();
        if f.header.kind == Kind::Raft {
            break f;
        }
    };
    let batch = f.raft_batch().unwrap();
    assert_eq!(batch.len(), 1);
    assert_eq!(proto::decode_raft_message(batch[0].1).unwrap().index, 6);
    // Removing the peer closes its connection and refuses it from then on.
    n2.t.remove_peer(NodeId(1));
    assert!(closed_by_peer(&mut new).await);
    match fake_handshake(n2.addr, &key(), 1, 2).await {
        FakeOutcome::Refused(c) => assert_eq!(c, RefuseCode::UnknownNode),
        other => panic!("{other:?}"),
    }
    n2.stop().await;
}
