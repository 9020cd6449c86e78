//! The control plane: the cluster's truth in a metadata Raft group spread over the head
//! nodes, the admin API every head node serves, and the work the metadata leader does
//! (placement, the pool of ready Raft groups, growing partially provisioned groups).
//!
//! * [`state`] — the replicated cluster state and its commands.
//! * [`placement`] — choosing head nodes and sleds for a volume.
//! * [`rpc`] — group operations and heartbeats between head nodes.
//! * `ops` — what the metadata leader does for each admin request.
//! * `agent` — what every head node does: run the groups the state gives it, export the
//!   attached volumes, answer group operations, report to the leader.
//! * `leader` — the metadata leader's background work: the pool, growing groups, finishing
//!   interrupted creates.
//! * [`api`] — the HTTP front end.
//!
//! The I/O path never waits on any of this: a volume's description, placement and QoS live
//! in its own group's log, and its group keeps serving while the metadata group elects.

mod agent;
pub mod api;
mod changes;
mod drain;
mod join;
mod leader;
mod metrics;
mod ops;
pub mod placement;
pub mod rpc;
pub mod state;
mod view;

use crate::app::VolumeSet;
use crate::config::ControlConfig;
use crate::replication::GroupId;
use crate::replication::driver::{GroupHandle, ReplError, SledAccess};
use crate::replication::entry::EntryHeader;
use crate::replication::log::GroupStorage;
use crate::replication::node::ReplNode;
use crate::replication::rvolume::{VolumeRpc, VolumeRpcReply};
use crate::replication::transport::{TcpTransport, Transport, TransportError};
use crate::replication::wal::Wal;
use common::AlignedBuf;
use common::SharedClock;
use common::admin::{AttachVolume, DetachVolume};
use common::admin::{CreateVolume, ErrorBody, ErrorDetail, SetQos};
use common::ids::{NodeId, SledId};
use serde::{Deserialize, Serialize};
use state::{ClusterState, MetaCmd, NodeRecord, Settings, SledRecord};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use metrics::ControlMetrics;

/// An admin request, as the HTTP front end parses it and forwards it to the metadata leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    /// `GET /v1/cluster`.
    Cluster,
    /// `GET /v1/nodes`.
    Nodes,
    /// `GET /v1/sleds`.
    Sleds,
    /// `GET /v1/volumes`.
    Volumes,
    /// `GET /v1/volumes/{name}`.
    Volume {
        /// Name.
        name: String,
    },
    /// `POST /v1/volumes`.
    Create(CreateVolume),
    /// `DELETE /v1/volumes/{name}`.
    Delete {
        /// Name.
        name: String,
        /// Even while attached.
        force: bool,
    },
    /// `POST /v1/volumes/{name}/resize`.
    Resize {
        /// Name.
        name: String,
        /// New size.
        size: u64,
    },
    /// `POST /v1/volumes/{name}/attach`.
    Attach {
        /// Name.
        name: String,
        /// Options.
        req: AttachVolume,
    },
    /// `POST /v1/volumes/{name}/detach`.
    Detach {
        /// Name.
        name: String,
        /// Options.
        req: DetachVolume,
    },
    /// `POST /v1/volumes/{name}/qos`.
    Qos {
        /// Name.
        name: String,
        /// Changes.
        req: SetQos,
    },
    /// A head node's report (internal).
    Heartbeat(Heartbeat),
    /// Create the volume unless it exists, grow it to `size`, attach it unless attached
    /// (volumes named in a head node's configuration).
    Ensure {
        /// Name.
        name: String,
        /// Size.
        size: u64,
        /// Attach it too.
        attach: bool,
    },
    /// `POST /v1/sleds/{id}/drain` (`drain`) or `/undrain`.
    DrainSled {
        /// The sled's id, as given.
        id: String,
        /// Drain (true) or stop draining (false).
        drain: bool,
    },
    /// `POST /v1/sleds`: add a running sled to the cluster.
    AddSled(common::admin::AddSled),
    /// `DELETE /v1/sleds/{id}`: forget a drained sled that is down.
    RemoveSled {
        /// The sled's id, as given.
        id: String,
    },
}

impl AdminRequest {
    /// Whether carrying the request out twice is the same as once: reads, reports, and the
    /// requests made idempotent by design (`Ensure`; a create that names its volume id).
    /// Only these are sent to the metadata leader again after a lost answer.
    pub fn repeatable(&self) -> bool {
        match self {
            AdminRequest::Cluster
            | AdminRequest::Nodes
            | AdminRequest::Sleds
            | AdminRequest::Volumes
            | AdminRequest::Volume { .. }
            | AdminRequest::Heartbeat(_)
            | AdminRequest::Ensure { .. }
            | AdminRequest::DrainSled { .. }
            | AdminRequest::AddSled(_) => true,
            AdminRequest::Create(c) => c.id.is_some(),
            AdminRequest::Delete { .. }
            | AdminRequest::Resize { .. }
            | AdminRequest::Attach { .. }
            | AdminRequest::Detach { .. }
            | AdminRequest::Qos { .. }
            | AdminRequest::RemoveSled { .. } => false,
        }
    }

    /// How long the metadata leader may take to answer it when forwarded: a delete waits for
    /// exports to close (30 s per member), a flush (30 s) and the trim of its chunks (120 s).
    fn forward_timeout(&self) -> Duration {
        match self {
            AdminRequest::Delete { .. } => Duration::from_secs(280),
            _ => Duration::from_secs(120),
        }
    }

    /// A short name for metrics and logs.
    pub fn op(&self) -> &'static str {
        match self {
            AdminRequest::Cluster => "cluster",
            AdminRequest::Nodes => "nodes",
            AdminRequest::Sleds => "sleds",
            AdminRequest::Volumes => "volumes",
            AdminRequest::Volume { .. } => "volume",
            AdminRequest::Create(_) => "create",
            AdminRequest::Delete { .. } => "delete",
            AdminRequest::Resize { .. } => "resize",
            AdminRequest::Attach { .. } => "attach",
            AdminRequest::Detach { .. } => "detach",
            AdminRequest::Qos { .. } => "qos",
            AdminRequest::Heartbeat(_) => "heartbeat",
            AdminRequest::Ensure { .. } => "ensure",
            AdminRequest::DrainSled { drain: true, .. } => "drain",
            AdminRequest::DrainSled { drain: false, .. } => "undrain",
            AdminRequest::AddSled(_) => "add_sled",
            AdminRequest::RemoveSled { .. } => "remove_sled",
        }
    }
}

/// What a head node reports to the metadata leader every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The node.
    pub node: NodeRecord,
    /// The sleds it reaches, with their devices.
    pub sleds: Vec<SledRecord>,
    /// Chunks allocated on each device of the sleds it reaches.
    pub allocated: Vec<(common::ids::DeviceId, u64)>,
    /// Groups it leads and serves.
    pub leads: Vec<GroupId>,
}

/// An admin error: an HTTP status, a code and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("{0}")]
    Unauthorized(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 507.
    #[error("{0}")]
    Capacity(String),
    /// 503.
    #[error("{0}")]
    Unavailable(String),
    /// 503 `no_leader`: no metadata leader took the request, so nothing was done; sending it
    /// again is always safe (the one 503 the CLI retries for every request).
    #[error("{0}")]
    NoLeader(String),
    /// 504: the request went to the metadata leader, which did not answer; it may or may not
    /// have been carried out, so it is not sent again.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl AdminError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            AdminError::BadRequest(_) => 400,
            AdminError::Unauthorized(_) => 401,
            AdminError::NotFound(_) => 404,
            AdminError::Conflict(_) => 409,
            AdminError::Capacity(_) => 507,
            AdminError::Unavailable(_) | AdminError::NoLeader(_) => 503,
            AdminError::OutcomeUnknown(_) => 504,
            AdminError::Internal(_) => 500,
        }
    }

    /// The error code of the body.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::BadRequest(_) => "bad_request",
            AdminError::Unauthorized(_) => "unauthorized",
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::Capacity(_) => "insufficient_capacity",
            AdminError::Unavailable(_) => "unavailable",
            AdminError::NoLeader(_) => "no_leader",
            AdminError::OutcomeUnknown(_) => "outcome_unknown",
            AdminError::Internal(_) => "internal",
        }
    }

    fn reply(&self) -> AdminReply {
        AdminReply {
            status: self.status(),
            body: serde_json::to_value(ErrorBody {
                error: ErrorDetail {
                    code: self.code().into(),
                    message: self.to_string(),
                },
            })
            .unwrap_or_default(),
        }
    }
}

/// An answer: HTTP status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminReply {
    /// Status.
    pub status: u16,
    /// Body.
    pub body: serde_json::Value,
}

impl AdminReply {
    fn ok<T: Serialize>(status: u16, v: &T) -> Self {
        match serde_json::to_value(v) {
            Ok(body) => Self { status, body },
            Err(e) => AdminError::Internal(format!("encoding the answer: {e}")).reply(),
        }
    }
}

/// Which nodes and sleds the metadata leader has heard of lately (leader memory, not
/// replicated: a new leader starts empty and gives everything `down_after` to report).
#[derive(Debug, Default)]
struct Liveness {
    term: u64,
    since: Duration,
    nodes: HashMap<u64, Duration>,
    sleds: HashMap<SledId, Duration>,
    /// When each head node last reported reaching each sled.
    reached: HashMap<(u64, SledId), Duration>,
    allocated: HashMap<common::ids::DeviceId, u64>,
    leaders: HashMap<GroupId, u64>,
}

impl Liveness {
    /// Starts over when the metadata term changes.
    fn reset_for(&mut self, term: u64, now: Duration) {
        if self.term != term {
            *self = Liveness {
                term,
                since: now,
                ..Default::default()
            };
        }
    }

    fn grace(&self, now: Duration, down_after: Duration) -> bool {
        now.saturating_sub(self.since) < down_after
    }

    fn node_up(&self, id: u64, now: Duration, down_after: Duration) -> bool {
        match self.nodes.get(&id) {
            Some(t) => now.saturating_sub(*t) < down_after,
            None => self.grace(now, down_after),
        }
    }

    fn sled_up(&self, id: SledId, now: Duration, down_after: Duration) -> bool {
        match self.sleds.get(&id) {
            Some(t) => now.saturating_sub(*t) < down_after,
            None => self.grace(now, down_after),
        }
    }

    /// The pairs of a head node and a sled, both up, where the node has not reported reaching
    /// the sled lately: its volumes' leaders there cannot use that sled (a firewall, a route,
    /// an address only some nodes can reach), which `up` alone does not show.
    fn unreached(
        &self,
        nodes: &BTreeSet<u64>,
        sleds: &BTreeSet<SledId>,
        now: Duration,
        down_after: Duration,
    ) -> Vec<(u64, SledId)> {
        if self.grace(now, down_after) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for n in nodes {
            for s in sleds {
                let fresh = self
                    .reached
                    .get(&(*n, *s))
                    .is_some_and(|t| now.saturating_sub(*t) < down_after);
                if !fresh {
                    out.push((*n, *s));
                }
            }
        }
        out
    }
}

/// Everything the control plane needs on one head node.
pub struct ControlPlane {
    node: NodeId,
    me: NodeRecord,
    cfg: ControlConfig,
    settings: Settings,
    token: Option<String>,
    repl: Arc<ReplNode<TcpTransport>>,
    transport: Arc<TcpTransport>,
    meta: GroupHandle,
    volumes: Arc<VolumeSet>,
    wal: Wal,
    recovered: Mutex<HashMap<GroupId, GroupStorage>>,
    sleds: SledAccess,
    sled_domains: BTreeMap<SocketAddr, String>,
    clock: SharedClock,
    live: Mutex<Liveness>,
    ops: tokio::sync::Mutex<()>,
    absent: Mutex<HashMap<GroupId, Duration>>,
    in_create: Mutex<std::collections::HashSet<String>>,
    /// Deletes by volume name: running now, and when the latest one started.
    in_delete: Mutex<HashMap<String, (bool, Duration)>>,
    /// Volumes whose exports a detach is closing (see `ops::attach`).
    closing: Mutex<std::collections::HashSet<String>>,
    /// Resizes and QoS changes: one at a time per volume (see `changes`).
    changes: changes::ChangeLocks,
    /// Capacity promised to changes whose group call is running (see `changes`).
    reserved: changes::Reserved,
    /// When a stuck drain was last reported, by sled and volume (see `drain`).
    drain_warned: Mutex<HashMap<(SledId, String), Duration>>,
    metrics: ControlMetrics,
    /// Set once a reconcile pass ran on a metadata state that had caught up with the leader
    /// (see [`ControlPlane::caught_up`]).
    caught_up: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// How a head node joins the control plane.
#[derive(Debug)]
pub struct ControlSetup {
    /// This node's record (addresses, domain, capacity).
    pub me: NodeRecord,
    /// Control settings.
    pub cfg: ControlConfig,
    /// Replicas per chunk.
    pub replicas: usize,
    /// Admin token (`None`: the admin API refuses everything).
    pub token: Option<String>,
    /// Sled failure domains by address.
    pub sled_domains: BTreeMap<SocketAddr, String>,
}

impl ControlPlane {
    /// The control plane of this node over its running metadata group.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        setup: ControlSetup,
        repl: Arc<ReplNode<TcpTransport>>,
        transport: Arc<TcpTransport>,
        meta: GroupHandle,
        volumes: Arc<VolumeSet>,
        wal: Wal,
        recovered: HashMap<GroupId, GroupStorage>,
        sleds: SledAccess,
        clock: SharedClock,
        metrics: ControlMetrics,
    ) -> Arc<Self> {
        let cfg = setup.cfg;
        let settings = Settings {
            replicas: setup.replicas as u32,
            group_size: cfg.group_size as u32,
            pool_target: cfg.pool_size as u32,
            overcommit_permille: (cfg.overcommit_ratio * 1000.0).round() as u32,
            default_qos: cfg.default_qos,
        };
        Arc::new(Self {
            node: repl.node(),
            me: setup.me,
            cfg,
            settings,
            token: setup.token,
            repl,
            transport,
            meta,
            volumes,
            wal,
            recovered: Mutex::new(recovered),
            sleds,
            sled_domains: setup.sled_domains,
            clock,
            live: Mutex::new(Liveness::default()),
            ops: tokio::sync::Mutex::new(()),
            absent: Mutex::new(HashMap::new()),
            in_create: Mutex::new(Default::default()),
            in_delete: Mutex::new(Default::default()),
            closing: Mutex::new(Default::default()),
            changes: Default::default(),
            drain_warned: Mutex::default(),
            reserved: Default::default(),
            metrics,
            caught_up: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Waits until this node has caught up with the cluster state — a metadata leader is
    /// known, everything it committed is applied here, and a reconcile pass opened the exports
    /// it asks for — or until `limit` passes; returns whether it caught up. A restarted node
    /// waits here before it serves NBD, so a client connecting right after it reports ready
    /// finds its exports rather than an "unknown export" refusal.
    pub async fn caught_up(&self, limit: Duration) -> bool {
        let mut rx = self.caught_up.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Marks the node caught up after a reconcile pass that worked from a caught-up state. The
    /// state is judged as the pass saw it, not as it is afterwards: a pass that found no state
    /// yet (or an older one) opened no exports, and marking the node caught up then let
    /// clients in to be refused an export the next pass would open.
    fn note_reconciled(&self, pass_caught_up: bool) {
        if pass_caught_up && !*self.caught_up.borrow() {
            self.caught_up.send_replace(true);
        }
    }

    /// Starts the background work: reconciling this node with the cluster state, heartbeats,
    /// and the leader's duties while this node leads the metadata group.
    pub fn start(
        self: &Arc<Self>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let handler: Arc<dyn crate::replication::node::ControlHandler> =
            Arc::new(agent::Handler(Arc::downgrade(self)));
        self.repl.set_control(handler);
        vec![
            tokio::spawn(agent::reconcile_loop(self.clone(), stop.clone())),
            tokio::spawn(agent::heartbeat_loop(self.clone(), stop.clone())),
            tokio::spawn(leader::leader_loop(self.clone(), stop)),
        ]
    }

    /// The token requests must carry.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The cluster state as applied here (empty before the metadata group has any).
    pub fn state(&self) -> Arc<ClusterState> {
        self.meta.status().cluster.unwrap_or_default()
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers an admin request: here when this node leads the metadata group, else on the
    /// leader; waits out a short election.
    pub async fn admin(&self, req: AdminRequest) -> AdminReply {
        let op = req.op();
        let started = std::time::Instant::now();
        let reply = self.route(req).await;
        self.metrics.observe(op, reply.status, started);
        reply
    }

    async fn route(&self, req: AdminRequest) -> AdminReply {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let st = self.meta.status();
            if st.serving {
                return match self.execute(req).await {
                    Ok(r) => r,
                    Err(e) => e.reply(),
                };
            }
            if let Some(l) = st.leader.filter(|l| *l != self.node) {
                match self.forward(l, &req).await {
                    Ok(Some(r)) => return r,
                    Ok(None) => {}
                    Err(e) => return e.reply(),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return AdminError::NoLeader(
                    "the metadata group has no leader right now (an election, or too few head nodes are up); retry shortly".into(),
                )
                .reply();
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.meta.changed()).await;
        }
    }

    /// Forwards to the leader; `Ok(None)` when it was not the leader after all (retry).
    async fn forward(
        &self,
        to: NodeId,
        req: &AdminRequest,
    ) -> Result<Option<AdminReply>, AdminError> {
        let body = serde_json::to_vec(req).map_err(|e| AdminError::Internal(e.to_string()))?;
        let ctl = postcard::to_stdvec(&VolumeRpc::Admin)
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        let data = Arc::new(AlignedBuf::from_slice(&body));
        match self
            .transport
            .call(to, ctl, Some(data), req.forward_timeout())
            .await
        {
            Ok((ctl, data)) => match postcard::from_bytes::<VolumeRpcReply>(&ctl) {
                Ok(VolumeRpcReply::Admin(status)) => {
                    let body = serde_json::from_slice(&data).map_err(|e| {
                        AdminError::Internal(format!(
                            "malformed answer from the metadata leader: {e}"
                        ))
                    })?;
                    Ok(Some(AdminReply { status, body }))
                }
                Ok(VolumeRpcReply::NotLeader(_)) => Ok(None),
                Ok(VolumeRpcReply::Failed(m)) => Err(AdminError::Internal(m)),
                Ok(other) => Err(AdminError::Internal(format!("unexpected answer {other:?}"))),
                Err(e) => Err(AdminError::Internal(format!("malformed answer: {e}"))),
            },
            Err(TransportError::UnknownPeer(p)) => Err(AdminError::Internal(format!(
                "the metadata leader {p} is not among this node's peers"
            ))),
            Err(e @ (TransportError::Timeout(_) | TransportError::Disconnected(_)))
                if !req.repeatable() =>
            {
                // It reached the leader, or may have: sending it again could do it twice.
                tracing::warn!(to = to.0, op = req.op(), error = %e, "lost the metadata leader's answer");
                Err(AdminError::OutcomeUnknown(format!(
                    "the request went to the metadata leader (head node {}) but its answer was lost ({e}); it may or may not have been carried out: look before retrying (`stockade volume show`)",
                    to.0
                )))
            }
            Err(e) => {
                tracing::debug!(to = to.0, error = %e, "forwarding an admin request failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(None)
            }
        }
    }

    /// Proposes a cluster change through the metadata group (leader only).
    async fn propose(&self, cmd: MetaCmd) -> Result<(), AdminError> {
        let index = self
            .meta
            .propose(EntryHeader::Meta(cmd), bytes::Bytes::new())
            .await
            .map_err(|e| match e {
                ReplError::NotLeader { .. } | ReplError::Stopped => AdminError::Unavailable(
                    "the metadata leader changed during the request; retry".into(),
                ),
                other => AdminError::Internal(other.to_string()),
            })?;
        // Applied in the group task; wait until its published state shows it, so what this
        // request reads next includes its own change.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.meta.status().applied < index && tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(20), self.meta.changed()).await;
        }
        Ok(())
    }

    /// Head nodes that reported lately.
    fn up_nodes(&self, st: &ClusterState) -> BTreeSet<u64> {
        let now = self.now();
        let live = self.live();
        st.nodes
            .keys()
            .copied()
            .filter(|id| live.node_up(*id, now, self.cfg.down_after))
            .collect()
    }

    /// Head nodes the cluster has: registered ones and the metadata group's voters.
    fn known_nodes(&self, st: &ClusterState) -> BTreeSet<u64> {
        let meta = self.meta.status();
        st.nodes
            .keys()
            .copied()
            .chain(meta.voters.iter().copied())
            .collect()
    }

    /// Head nodes up that have not reached a sled that is up (see [`Liveness::unreached`]).
    fn unreached(&self, st: &ClusterState) -> Vec<(u64, SledId)> {
        let (nodes, sleds) = (self.up_nodes(st), self.up_sleds(st));
        self.live()
            .unreached(&nodes, &sleds, self.now(), self.cfg.down_after)
    }

    /// Sleds some head node reached lately.
    fn up_sleds(&self, st: &ClusterState) -> BTreeSet<SledId> {
        let now = self.now();
        let live = self.live();
        st.sleds
            .keys()
            .copied()
            .filter(|id| live.sled_up(*id, now, self.cfg.down_after))
            .collect()
    }
}

/// Seconds since the Unix epoch (for display fields).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_gives_a_new_leader_a_grace_period() {
        let mut l = Liveness::default();
        let down = Duration::from_secs(5);
        l.reset_for(3, Duration::from_secs(100));
        assert!(l.node_up(1, Duration::from_secs(101), down));
        assert!(!l.node_up(1, Duration::from_secs(106), down));
        l.nodes.insert(1, Duration::from_secs(104));
        assert!(l.node_up(1, Duration::from_secs(108), down));
        assert!(!l.node_up(1, Duration::from_secs(110), down));
        l.reset_for(3, Duration::from_secs(200));
        assert_eq!(l.nodes.len(), 1, "same term: kept");
        l.reset_for(4, Duration::from_secs(200));
        assert!(l.nodes.is_empty());
    }

    #[test]
    fn a_sled_one_head_node_does_not_reach_is_named_after_the_grace_period() {
        let mut l = Liveness::default();
        let down = Duration::from_secs(5);
        let (a, b) = (SledId::random(), SledId::random());
        let nodes: BTreeSet<u64> = [1, 2].into();
        let sleds: BTreeSet<SledId> = [a, b].into();
        l.reset_for(3, Duration::from_secs(100));
        // A new leader waits a heartbeat period before it believes nobody reaches anything.
        assert!(
            l.unreached(&nodes, &sleds, Duration::from_secs(101), down)
                .is_empty()
        );
        for (n, s) in [(1, a), (1, b), (2, a)] {
            l.reached.insert((n, s), Duration::from_secs(104));
        }
        assert_eq!(
            l.unreached(&nodes, &sleds, Duration::from_secs(106), down),
            [(2, b)]
        );
        // Reports grow old like heartbeats do.
        l.reached.insert((2, b), Duration::from_secs(107));
        let late: BTreeSet<(u64, SledId)> = l
            .unreached(&nodes, &sleds, Duration::from_secs(110), down)
            .into_iter()
            .collect();
        assert_eq!(late, [(1, a), (1, b), (2, a)].into());
    }

    #[test]
    fn admin_errors_map_to_statuses() {
        let e = AdminError::Conflict("x".into());
        assert_eq!(e.status(), 409);
        let r = e.reply();
        let b: ErrorBody = serde_json::from_value(r.body).unwrap();
        assert_eq!(b.error.code, "conflict");
        assert_eq!(AdminError::Capacity("x".into()).status(), 507);
        let e = AdminError::NoLeader("x".into());
        assert_eq!((e.status(), e.code()), (503, "no_leader"));
        let e = AdminError::OutcomeUnknown("x".into());
        assert_eq!((e.status(), e.code()), (504, "outcome_unknown"));
    }

    #[test]
    fn only_repeatable_requests_are_forwarded_twice() {
        let create = |id: Option<&str>| {
            AdminRequest::Create(CreateVolume {
                name: "a".into(),
                size: 4096,
                qos: None,
                qos_changes: None,
                id: id.map(str::to_string),
            })
        };
        assert!(AdminRequest::Volumes.repeatable());
        assert!(create(Some("0123456789abcdef0123456789abcdef")).repeatable());
        assert!(!create(None).repeatable());
        let name = "a".to_string();
        for r in [
            AdminRequest::Delete {
                name: name.clone(),
                force: false,
            },
            AdminRequest::Resize {
                name: name.clone(),
                size: 8192,
            },
        ] {
            assert!(!r.repeatable(), "{r:?}");
        }
        assert!(
            AdminRequest::Delete { name, force: false }.forward_timeout()
                > Duration::from_secs(240)
        );
    }

    #[test]
    fn requests_round_trip_as_json() {
        let r = AdminRequest::Create(CreateVolume {
            name: "a".into(),
            size: 4096,
            qos: None,
            qos_changes: None,
            id: None,
        });
        let j = serde_json::to_string(&r).unwrap();
        let back: AdminRequest = serde_json::from_str(&j).unwrap();
        assert_eq!(back.op(), "create");
    }
}
