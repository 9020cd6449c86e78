//! What the metadata leader does for each admin request.
//!
//! Mutations check the state and propose under one lock (`ops`), so two requests never both
//! pass a check that only one of them may pass (two creates of one name, two exclusive
//! attaches, two creates taking the same pool group). Slow work that follows a decision
//! (binding a group, waiting for exports to close) runs after the lock is released; a resize or
//! QoS change calls the volume's group between two short holds of the lock, with the capacity
//! it promised counted meanwhile (`changes`).

use super::placement::{self, PlaceError};
use super::rpc::{GroupOp, GroupProbe, GroupReply};
use super::state::{AttachmentRecord, ClusterState, GroupRecord, MetaCmd, Phase, VolumeRecord};
use super::view::{self, Observed};
use super::{AdminError, AdminReply, AdminRequest, ControlPlane, Heartbeat, unix_now};
use crate::replication::GroupId;
use crate::volume::{BLOCK, VolumeSpec};
use common::AlignedBuf;
use common::admin::{
    Attached, CapacityInfo, ClusterStatus, CreateVolume, Created, PoolInfo, SetQos, VolumeInfo,
    validate_name,
};
use common::ids::{NodeId, VolumeId};
use common::throttle::QosConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most attachments one volume may have (shared attachments; an exclusive one is alone).
const MAX_ATTACHMENTS: usize = 64;
/// Longest `client` text of an attachment.
const MAX_CLIENT_TEXT: usize = 256;

/// Largest volume: 64 TiB.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;

/// How long a create waits for its group to serve.
const BIND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a create waits for each sled to say whether it knows a client-chosen volume id.
const ID_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

fn capacity_error(e: PlaceError) -> AdminError {
    match e {
        PlaceError::NoHeads => AdminError::Unavailable(e.to_string()),
        other => AdminError::Capacity(other.to_string()),
    }
}

fn check_size(size: u64) -> Result<(), AdminError> {
    if size == 0 || !size.is_multiple_of(BLOCK) {
        return Err(AdminError::BadRequest(format!(
            "size {size} must be a positive multiple of 4096 bytes (4 KiB), like 10G or 512MiB"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(AdminError::BadRequest(format!(
            "size {size} is larger than the largest volume ({MAX_VOLUME_SIZE} bytes, 64 TiB)"
        )));
    }
    Ok(())
}

fn not_found(name: &str) -> AdminError {
    AdminError::NotFound(format!(
        "no volume named {name:?}; `stockade volume list` shows the volumes"
    ))
}

impl ControlPlane {
    pub(super) async fn execute(&self, req: AdminRequest) -> Result<AdminReply, AdminError> {
        match req {
            AdminRequest::Cluster => Ok(AdminReply::ok(200, &self.cluster_status())),
            AdminRequest::Nodes => {
                let (st, obs) = self.observed();
                Ok(AdminReply::ok(200, &view::nodes(&st, &obs, &|_| None)))
            }
            AdminRequest::Sleds => {
                let (st, obs) = self.observed();
                Ok(AdminReply::ok(200, &view::sleds(&st, &obs)))
            }
            AdminRequest::Volumes => {
                let (st, obs) = self.observed();
                let list: Vec<VolumeInfo> = st
                    .volumes
                    .values()
                    .map(|v| view::volume(&st, v, &obs))
                    .collect();
                Ok(AdminReply::ok(200, &list))
            }
            AdminRequest::Volume { name } => Ok(AdminReply::ok(200, &self.volume_info(&name)?)),
            AdminRequest::Create(c) => Ok(AdminReply::ok(201, &self.create(c).await?)),
            AdminRequest::Delete { name, force } => match self.delete(&name, force).await? {
                None => Ok(AdminReply {
                    status: 204,
                    body: serde_json::Value::Null,
                }),
                Some(note) => Ok(AdminReply::ok(
                    202,
                    &common::admin::DeletePending { pending: note },
                )),
            },
            AdminRequest::Resize { name, size } => {
                Ok(AdminReply::ok(200, &self.resize(&name, size).await?))
            }
            AdminRequest::Attach { name, req } => Ok(AdminReply::ok(
                200,
                &self.attach(&name, req.shared, req.client).await?,
            )),
            AdminRequest::Detach { name, req } => Ok(AdminReply::ok(
                200,
                &self.detach(&name, req.attachment).await?,
            )),
            AdminRequest::Qos { name, req } => {
                Ok(AdminReply::ok(200, &self.set_qos(&name, &req).await?))
            }
            AdminRequest::Heartbeat(hb) => {
                self.heartbeat(hb).await?;
                Ok(AdminReply {
                    status: 200,
                    body: serde_json::json!({"ok": true}),
                })
            }
            AdminRequest::Ensure { name, size, attach } => Ok(AdminReply::ok(
                200,
                &self.ensure(&name, size, attach).await?,
            )),
            AdminRequest::DrainSled { id, drain } => {
                Ok(AdminReply::ok(200, &self.drain_sled(&id, drain).await?))
            }
            AdminRequest::AddSled(req) => {
                let (created, sled) = self.add_sled(req).await?;
                Ok(AdminReply::ok(if created { 201 } else { 200 }, &sled))
            }
            AdminRequest::RemoveSled { id } => {
                self.remove_sled(&id).await?;
                Ok(AdminReply {
                    status: 204,
                    body: serde_json::Value::Null,
                })
            }
        }
    }

    /// The state and what the leader observed.
    pub(super) fn observed(&self) -> (std::sync::Arc<ClusterState>, Observed) {
        let st = self.state();
        let nodes_up = self.up_nodes(&st);
        let sleds_up = self.up_sleds(&st);
        let now = self.now();
        let live = self.live();
        let obs = Observed {
            leaders: live.leaders.clone(),
            nodes_up,
            sleds_up,
            last_seen: live
                .nodes
                .iter()
                .map(|(n, t)| (*n, now.saturating_sub(*t).as_secs()))
                .collect(),
            allocated: live.allocated.clone(),
            meta_leader: self.node.0,
        };
        (st, obs)
    }

    fn volume_info(&self, name: &str) -> Result<VolumeInfo, AdminError> {
        let (st, obs) = self.observed();
        let v = st.volumes.get(name).ok_or_else(|| not_found(name))?;
        Ok(view::volume(&st, v, &obs))
    }

    fn cluster_status(&self) -> ClusterStatus {
        let (st, obs) = self.observed();
        let mut problems = Vec::new();
        for n in st.nodes.keys().filter(|n| !obs.nodes_up.contains(n)) {
            problems.push(format!("head node {n} is down"));
        }
        for s in st.sleds.keys().filter(|s| !obs.sleds_up.contains(s)) {
            problems.push(format!("sled {s} is down"));
        }
        if st.sleds.is_empty() {
            problems.push("no sled has registered yet".into());
        }
        for (n, s) in self.unreached(&st) {
            problems.push(format!(
                "head node {n} cannot reach sled {s} (the volumes it leads cannot use it)"
            ));
        }
        let load = st.sled_load();
        for s in &st.draining {
            if let Some(n) = load.get(s).filter(|n| **n > 0) {
                problems.push(format!(
                    "sled {s} is draining: {n} chunk replicas left on it"
                ));
            }
        }
        for v in st.volumes.values() {
            let g = st.groups.get(&v.group);
            match view::phase(v, g) {
                "ready" => {}
                p => problems.push(format!("volume {} is {p}", v.name)),
            }
        }
        let (ready, pending) = st.pool();
        if ready.len() < st.settings.pool_target as usize {
            problems.push(format!(
                "the pool has {} of {} ready groups",
                ready.len(),
                st.settings.pool_target
            ));
        }
        let allocated = st
            .sleds
            .values()
            .flat_map(|s| s.devices.iter())
            .map(|d| obs.allocated.get(&d.id).copied().unwrap_or(0) * d.chunk_size)
            .sum();
        let meta = self.meta.status();
        ClusterStatus {
            health: if problems.is_empty() {
                "healthy"
            } else {
                "degraded"
            }
            .into(),
            problems,
            meta_leader: Some(self.node.0),
            meta_term: meta.term,
            answered_by: self.node.0,
            nodes: view::nodes(&st, &obs, &|_| None),
            sleds: view::sleds(&st, &obs),
            volumes: st.volumes.len(),
            attached: st
                .volumes
                .values()
                .filter(|v| !v.attachments.is_empty())
                .count(),
            capacity: CapacityInfo {
                total: st.capacity(),
                provisioned: st.provisioned(),
                allocated,
                overcommit_ratio: f64::from(st.settings.overcommit_permille) / 1000.0,
            },
            pool: PoolInfo {
                target: st.settings.pool_target as usize,
                ready: ready.len(),
                pending: pending.len(),
            },
            key_version: st.key_version,
            replicas: st.settings.replicas as usize,
            group_size: st.settings.group_size as usize,
        }
    }

    /// A new volume's chunks: sleds up, one chunk size, capacity checked.
    pub(super) fn place_volume(
        &self,
        st: &ClusterState,
        id: VolumeId,
        name: &str,
        size: u64,
    ) -> Result<(VolumeSpec, usize), AdminError> {
        let up = self.up_sleds(st);
        let mut slots = placement::sled_slots(st, &up);
        // Sleds of one cluster share a chunk size; use the most common one if they do not.
        let mut sizes = std::collections::BTreeMap::<u64, usize>::new();
        for s in st.sleds.values().filter(|s| up.contains(&s.id)) {
            if let Some(c) = s.chunk_size() {
                *sizes.entry(c).or_insert(0) += 1;
            }
        }
        let Some((&chunk, _)) = sizes.iter().max_by_key(|(_, n)| **n) else {
            return Err(capacity_error(PlaceError::NoSleds));
        };
        slots.retain(|s| st.sleds.get(&s.id).and_then(|r| r.chunk_size()) == Some(chunk));
        let replicas = (st.settings.replicas as usize).min(slots.len()).max(1);
        let chunks = size.div_ceil(chunk);
        placement::check_capacity(st, chunks, chunk, replicas, self.reserved.bytes())
            .map_err(capacity_error)?;
        let placement = placement::place_chunks(&mut slots, chunks, replicas, id.0 as u64)
            .map_err(capacity_error)?;
        Ok((
            VolumeSpec {
                id,
                name: name.to_string(),
                size,
                chunk_size: chunk,
                placement,
            },
            replicas,
        ))
    }

    /// True when every one of `nodes` has room for `iops` more baseline.
    /// Whether `iops` more of baseline (`None`: a volume without one) fits on every one of
    /// `nodes`: a node with a `capacity-iops` takes only volumes with a baseline, up to it.
    fn heads_fit(&self, st: &ClusterState, nodes: &[u64], iops: Option<u64>) -> bool {
        let base = st.node_baselines();
        nodes.iter().all(|n| {
            let cap = st.nodes.get(n).and_then(|r| r.capacity_iops);
            let given = base
                .get(n)
                .copied()
                .unwrap_or(0)
                .saturating_add(self.reserved.iops_on(*n));
            cap.is_none_or(|c| iops.is_some_and(|i| given.saturating_add(i) <= c))
        })
    }

    /// Refuses a client-chosen id that a sled of its placement already knows: volume ids are
    /// never reused, and a deleted volume's sleds keep its tombstone (a claim above every
    /// epoch), so a volume created again under that id could never be claimed — its group
    /// would hold elections forever and the create would never finish. A fresh id is unknown
    /// to every sled until the volume's first claim, which comes after this check. A sled that
    /// does not answer within [`ID_CHECK_TIMEOUT`] is not waited for: it is recorded stale by
    /// the volume's group like any sled away at creation.
    async fn check_id_unused(&self, spec: &VolumeSpec) -> Result<(), AdminError> {
        let asks = spec.sleds().into_iter().map(|sled| async move {
            let ask = async {
                let conn = self.sleds.pool.find(sled).await?;
                let client = conn.client().await.ok()?;
                client.volume_stat(spec.id).await.ok()
            };
            let stat = tokio::time::timeout(ID_CHECK_TIMEOUT, ask)
                .await
                .ok()
                .flatten();
            (sled, stat.and_then(|s| s.fence))
        });
        for (sled, fence) in futures_util::future::join_all(asks).await {
            if let Some((epoch, holder)) = fence {
                let what = if epoch.0 == u64::MAX {
                    "a deleted volume's".to_string()
                } else {
                    format!(
                        "a volume's (claimed at epoch {} by node {})",
                        epoch.0, holder.0
                    )
                };
                return Err(AdminError::Conflict(format!(
                    "volume id {} is {what} on sled {sled}: ids are never reused; leave the id to the cluster",
                    spec.id
                )));
            }
        }
        Ok(())
    }

    async fn create(&self, c: CreateVolume) -> Result<Created, AdminError> {
        let started = Instant::now();
        validate_name(&c.name).map_err(AdminError::BadRequest)?;
        check_size(c.size)?;
        let (spec, group, rec, qos) = {
            let _lock = self.ops.lock().await;
            let st = self.state();
            let qos = c
                .qos(st.settings.default_qos)
                .map_err(AdminError::BadRequest)?;
            let wanted =
                c.id.as_deref()
                    .map(|t| match t.parse::<VolumeId>() {
                        Ok(id) if id != VolumeId::default() => Ok(id),
                        _ => Err(AdminError::BadRequest(format!(
                            "volume id {t:?}: expected 32 hex digits, not all zero"
                        ))),
                    })
                    .transpose()?;
            if let Some(v) = st.volumes.get(&c.name) {
                if wanted == Some(v.id) && v.size == c.size {
                    // This very create, sent again: it was done (or is being finished).
                    drop(_lock);
                    return Ok(Created {
                        volume: self.volume_info(&c.name)?,
                        from_pool: v.from_pool,
                        latency_ms: 0,
                    });
                }
                return Err(AdminError::Conflict(format!(
                    "a volume named {:?} already exists (id {}, {} bytes); pick another name or delete it first",
                    c.name, v.id, v.size
                )));
            }
            if let Some(id) = wanted
                && st.volumes.values().any(|v| v.id == id)
            {
                return Err(AdminError::Conflict(format!(
                    "another volume has id {id}; leave the id to the cluster"
                )));
            }
            let id = wanted.unwrap_or_else(VolumeId::random);
            let (spec, replicas) = self.place_volume(&st, id, &c.name, c.size)?;
            if wanted.is_some() {
                self.check_id_unused(&spec).await?;
            }
            let up = self.up_nodes(&st);
            let iops = qos.iops;
            let pooled = st
                .pool()
                .0
                .into_iter()
                .find(|g| {
                    g.members.iter().all(|m| up.contains(m))
                        && self.heads_fit(&st, &g.members, iops)
                })
                .cloned();
            let from_pool = pooled.is_some();
            let group = match pooled {
                Some(g) => GroupRecord {
                    volume: Some(c.name.clone()),
                    ..g
                },
                None => {
                    let known = self.known_nodes(&st);
                    let heads = placement::choose_heads(
                        &st,
                        &known,
                        &up,
                        st.settings.group_size as usize,
                        iops,
                        &self.reserved.iops(),
                    )
                    .map_err(capacity_error)?;
                    // Partial provisioning: serve on one member now, grow to the others.
                    let first = heads[0];
                    GroupRecord {
                        id: GroupId::random(),
                        founders: vec![first],
                        members: vec![first],
                        joining: None,
                        target: heads,
                        volume: Some(c.name.clone()),
                        ready: true,
                        created: unix_now(),
                    }
                }
            };
            let rec = VolumeRecord {
                name: c.name.clone(),
                id,
                size: c.size,
                qos,
                group: group.id,
                chunk_size: spec.chunk_size,
                replicas: replicas as u32,
                sled_chunks: placement::per_sled(&spec.placement),
                attachments: Vec::new(),
                phase: Phase::Creating,
                from_pool,
                created: unix_now(),
            };
            self.propose(MetaCmd::Batch(vec![
                MetaCmd::PutGroup(group.clone()),
                MetaCmd::PutVolume(rec.clone()),
            ]))
            .await?;
            (spec, group, rec, qos)
        };
        let from_pool = rec.from_pool;
        tracing::info!(volume = %c.name, group = %group.id, from_pool, members = ?group.members,
            target = ?group.target, "creating volume");
        let bound = {
            // Cleared however the bind ends, also when the request is dropped (its client
            // went away): the background loop finishes creates this leader is not running.
            let _creating = Marked::enter(&self.in_create, &c.name);
            self.bind(&group, &spec, qos, BIND_TIMEOUT).await
        };
        bound.map_err(|e| {
            AdminError::Internal(format!(
                "volume {:?} is recorded but its Raft group did not start serving: {e}; the metadata leader keeps trying (see `stockade volume show {}`)",
                c.name, c.name
            ))
        })?;
        self.finish_create(&c.name, rec.id, Some(qos)).await?;
        let latency = started.elapsed();
        self.metrics
            .create_seconds
            .with_label_values(&[if from_pool { "pool" } else { "partial" }])
            .observe(latency.as_secs_f64());
        tracing::info!(volume = %c.name, from_pool, latency_ms = latency.as_millis() as u64, "volume created");
        Ok(Created {
            volume: self.volume_info(&c.name)?,
            from_pool,
            latency_ms: latency.as_millis() as u64,
        })
    }

    /// Records a created volume as serving.
    ///
    /// `bound` is the QoS the group was bound with, if known. A QoS change accepted while the
    /// volume was being created went only into its record (`set_qos` calls the group only
    /// once it serves): it is given to the group here, before the volume is marked serving.
    pub(super) async fn finish_create(
        &self,
        name: &str,
        id: VolumeId,
        bound: Option<QosConfig>,
    ) -> Result<(), AdminError> {
        let mut bound = bound;
        loop {
            let lock = self.ops.lock().await;
            let st = self.state();
            let Some(v) = st.volumes.get(name).filter(|v| v.id == id) else {
                return Err(AdminError::Conflict(format!(
                    "volume {name:?} was deleted while it was being created"
                )));
            };
            if v.phase != Phase::Creating {
                return Ok(());
            }
            if bound != Some(v.qos) {
                // The group call runs without the metadata lock (a stalled group must not stop
                // every other admin request); a QoS change recorded meanwhile goes round again.
                let g =
                    st.groups.get(&v.group).cloned().ok_or_else(|| {
                        AdminError::Internal(format!("volume {name:?} has no group"))
                    })?;
                let qos = v.qos;
                drop(st);
                drop(lock);
                self.leader_call(&g, &GroupOp::SetQos(qos), Duration::from_secs(30))
                    .await?;
                bound = Some(qos);
                continue;
            }
            let mut v = v.clone();
            v.phase = Phase::Serving;
            self.propose(MetaCmd::PutVolume(v)).await?;
            return Ok(());
        }
    }

    /// Gives a group its volume and waits until it serves.
    pub(super) async fn bind(
        &self,
        g: &GroupRecord,
        spec: &VolumeSpec,
        qos: QosConfig,
        timeout: Duration,
    ) -> Result<(), AdminError> {
        let op = GroupOp::Bind {
            spec: spec.clone(),
            qos,
        };
        self.leader_call(g, &op, timeout).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((l, p)) = self.find_leader(g).await
                && p.serving
                && p.volume.as_deref() == Some(spec.name.as_str())
            {
                self.live().leaders.insert(g.id, l);
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AdminError::Unavailable(
                    "the group has its volume but no member serves it yet".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Calls `op` on one node's member of `group`.
    pub(super) async fn group_call(
        &self,
        node: u64,
        group: GroupId,
        op: &GroupOp,
        timeout: Duration,
    ) -> Result<GroupReply, AdminError> {
        if node == self.node.0 {
            return Ok(self.group_op(group, op.clone()).await);
        }
        let rpc = crate::replication::rvolume::VolumeRpc::Group { group };
        let ctl = postcard::to_stdvec(&rpc).map_err(|e| AdminError::Internal(e.to_string()))?;
        let data = postcard::to_stdvec(op).map_err(|e| AdminError::Internal(e.to_string()))?;
        let data = Some(Arc::new(AlignedBuf::from_slice(&data)));
        use crate::replication::transport::Transport;
        match self.transport.call(NodeId(node), ctl, data, timeout).await {
            Ok((ctl, _)) => match postcard::from_bytes(&ctl) {
                Ok(crate::replication::rvolume::VolumeRpcReply::Group(r)) => Ok(r),
                Ok(other) => Err(AdminError::Internal(format!(
                    "head node {node} answered {other:?}"
                ))),
                Err(e) => Err(AdminError::Internal(format!(
                    "malformed answer from head node {node}: {e}"
                ))),
            },
            Err(e) => Err(AdminError::Unavailable(format!(
                "head node {node} did not answer: {e}"
            ))),
        }
    }

    /// Probes the runners of `g` and returns its leader and the leader's probe.
    pub(super) async fn find_leader(&self, g: &GroupRecord) -> Option<(u64, GroupProbe)> {
        let mut hinted = None;
        for n in g.runners() {
            match self
                .group_call(n, g.id, &GroupOp::Probe, Duration::from_secs(2))
                .await
            {
                Ok(GroupReply::Probe(p)) if p.role == "leader" => return Some((n, p)),
                Ok(GroupReply::Probe(p)) => hinted = hinted.or(p.leader),
                _ => {}
            }
        }
        let l = hinted?;
        match self
            .group_call(l, g.id, &GroupOp::Probe, Duration::from_secs(2))
            .await
        {
            Ok(GroupReply::Probe(p)) if p.role == "leader" => Some((l, p)),
            _ => None,
        }
    }

    /// Runs `op` on the group's leader, following leadership until `timeout`.
    pub(super) async fn leader_call(
        &self,
        g: &GroupRecord,
        op: &GroupOp,
        timeout: Duration,
    ) -> Result<(), AdminError> {
        match self.leader_call_reply(g, op, timeout).await? {
            GroupReply::Stale(sleds) => Err(AdminError::Unavailable(format!(
                "done except on the stale sleds {sleds:?}"
            ))),
            _ => Ok(()),
        }
    }

    /// [`ControlPlane::leader_call`], answering `Ok` or `Stale` as the leader did.
    pub(super) async fn leader_call_reply(
        &self,
        g: &GroupRecord,
        op: &GroupOp,
        timeout: Duration,
    ) -> Result<GroupReply, AdminError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("no member of the group answered");
        loop {
            if let Some((l, _)) = self.find_leader(g).await {
                match self.group_call(l, g.id, op, timeout).await {
                    Ok(r @ (GroupReply::Ok | GroupReply::Stale(_))) => return Ok(r),
                    Ok(GroupReply::Failed(m)) => return Err(AdminError::Internal(m)),
                    Ok(other) => last = format!("{other:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AdminError::Unavailable(format!(
                    "the volume's Raft group did not complete the operation within {timeout:?} ({last})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn attach(
        &self,
        name: &str,
        shared: bool,
        client: Option<String>,
    ) -> Result<Attached, AdminError> {
        // Bounded, so a volume's record (one metadata entry) stays small whoever attaches.
        if let Some(c) = &client
            && (c.len() > MAX_CLIENT_TEXT || c.chars().any(char::is_control))
        {
            return Err(AdminError::BadRequest(format!(
                "client: at most {MAX_CLIENT_TEXT} bytes of printable text"
            )));
        }
        // A detach that has just removed the last attachment closes the exports after it
        // lets go of the lock; an attach in between would have its export closed under it.
        // So wait for that close first (and refuse, retryably, if another starts meanwhile).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(35);
        while self.is_closing(name) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (att, g) = {
            let _lock = self.ops.lock().await;
            if self.is_closing(name) {
                return Err(AdminError::Unavailable(format!(
                    "volume {name:?} is being detached (its exports are closing); retry in a moment"
                )));
            }
            let st = self.state();
            let v = st.volumes.get(name).ok_or_else(|| not_found(name))?;
            if v.attachments.len() >= MAX_ATTACHMENTS {
                return Err(AdminError::Conflict(format!(
                    "volume {name:?} has {MAX_ATTACHMENTS} attachments, the most one volume may have; detach some first"
                )));
            }
            if v.phase != Phase::Serving {
                return Err(AdminError::Conflict(format!(
                    "volume {name:?} is {}; attach it once it is ready",
                    view::phase(v, st.groups.get(&v.group))
                )));
            }
            if let Some(a) = v.attachments.first()
                && !(shared && v.attachments.iter().all(|a| a.shared))
            {
                return Err(AdminError::Conflict(format!(
                    "volume {name:?} is already attached (attachment {}{}); two writers corrupt an ordinary filesystem: detach it first (`stockade volume detach {name}`), or attach with --shared if every client coordinates its writes",
                    a.id,
                    a.client
                        .as_deref()
                        .map(|c| format!(", client {c}"))
                        .unwrap_or_default()
                )));
            }
            // Ids are never reused, or a client cleaning up its own attachment (attach --local,
            // import, export detach by id) could remove a newer one that got its number. Each
            // attach is a metadata entry of its own, proposed under the ops lock, so the
            // applied index has passed every earlier attach's entry.
            let id = v
                .attachments
                .iter()
                .map(|a| a.id)
                .max()
                .unwrap_or(0)
                .max(self.meta.status().applied)
                + 1;
            let att = AttachmentRecord {
                id,
                shared,
                client,
                since: unix_now(),
            };
            let mut v = v.clone();
            v.attachments.push(att.clone());
            self.propose(MetaCmd::PutVolume(v.clone())).await?;
            let g = st.groups.get(&v.group).cloned();
            (att, g)
        };
        // Wait until the node the URI names exports the volume.
        if let Some(g) = &g {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let node = {
                    let (_, obs) = self.observed();
                    view::preferred_node(g, &obs)
                };
                let exported = match node {
                    Some(n) => matches!(
                        self.group_call(n, g.id, &GroupOp::Probe, Duration::from_secs(2)).await,
                        Ok(GroupReply::Probe(p)) if p.exported
                    ),
                    None => false,
                };
                if exported || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let info = self.volume_info(name)?;
        Ok(Attached {
            uri: info.uri.clone().unwrap_or_default(),
            attachment: common::admin::Attachment {
                id: att.id,
                shared: att.shared,
                client: att.client,
                since: att.since,
            },
            endpoints: info.endpoints,
        })
    }

    /// Closes the volume's export on every member of its group, then waits until its
    /// committed data is on the sleds.
    /// A member that answers but cannot close (its detached clients' requests still run after
    /// 30 s) fails the call: the caller must not report the volume closed. A member that does
    /// not answer has no connections; its export closes when it comes back and reconciles.
    async fn close_everywhere(&self, g: &GroupRecord) -> Result<(), AdminError> {
        let mut unreached = Vec::new();
        let mut failed = Vec::new();
        for n in g.runners() {
            match self
                .group_call(n, g.id, &GroupOp::CloseExport, Duration::from_secs(35))
                .await
            {
                Ok(GroupReply::Ok | GroupReply::NoGroup) => {}
                Ok(GroupReply::Failed(m)) => failed.push(format!("head node {n}: {m}")),
                Ok(other) => unreached.push(format!("head node {n}: {other:?}")),
                Err(e) => unreached.push(format!("head node {n}: {e}")),
            }
        }
        if !unreached.is_empty() {
            tracing::warn!(group = %g.id, errors = ?unreached, "closing the export did not reach every member");
        }
        if !failed.is_empty() {
            return Err(AdminError::Unavailable(format!(
                "the export is not closed yet: {}; no new client is let in until they finish; send the request again to wait for them",
                failed.join("; ")
            )));
        }
        self.leader_call(g, &GroupOp::Flush, Duration::from_secs(30))
            .await
    }

    async fn detach(&self, name: &str, only: Option<u64>) -> Result<VolumeInfo, AdminError> {
        let close = {
            let _lock = self.ops.lock().await;
            let st = self.state();
            let v = st.volumes.get(name).ok_or_else(|| not_found(name))?;
            if v.attachments.is_empty() {
                // Nothing to remove; but a detach sent again after one that could not close
                // every export (or flush) finishes that work before it answers.
                let g = st.groups.get(&v.group).cloned();
                drop(st);
                if let Some(g) = g {
                    let _closing = Marked::enter(&self.closing, name);
                    drop(_lock);
                    self.close_everywhere(&g).await?;
                }
                return self.volume_info(name);
            }
            let mut v = v.clone();
            match only {
                Some(id) => {
                    let before = v.attachments.len();
                    v.attachments.retain(|a| a.id != id);
                    if v.attachments.len() == before {
                        return Err(AdminError::NotFound(format!(
                            "volume {name:?} has no attachment {id}"
                        )));
                    }
                }
                None => v.attachments.clear(),
            }
            self.propose(MetaCmd::PutVolume(v.clone())).await?;
            v.attachments
                .is_empty()
                .then(|| st.groups.get(&v.group).cloned())
                .flatten()
                .map(|g| (g, Marked::enter(&self.closing, name)))
        };
        if let Some((g, _closing)) = close {
            self.close_everywhere(&g).await?;
        }
        self.volume_info(name)
    }

    fn is_closing(&self, name: &str) -> bool {
        self.closing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// Deletes a volume: marks it deleting, closes its exports, frees its chunks on the sleds,
    /// then removes its records. `Ok(Some(note))` when a sled that holds some of its chunks
    /// is stale: the volume stays marked deleting until that sled is back and resynchronised
    /// (which frees them there), and the metadata leader finishes the delete then
    /// ([`ControlPlane::retry_deletes`]). `force` drops the records anyway.
    pub(super) async fn delete(
        &self,
        name: &str,
        force: bool,
    ) -> Result<Option<String>, AdminError> {
        let _busy = DeleteGuard::enter(self, name);
        let (v, g) = {
            let _lock = self.ops.lock().await;
            let st = self.state();
            let v = st.volumes.get(name).ok_or_else(|| not_found(name))?;
            if !v.attachments.is_empty() && !force {
                return Err(AdminError::Conflict(format!(
                    "volume {name:?} is attached; detach it first (`stockade volume detach {name}`) or pass --force"
                )));
            }
            let mut v = v.clone();
            v.attachments.clear();
            v.phase = Phase::Deleting;
            // A retried delete (every 5 s while a sled is away) finds it marked already: no
            // metadata entry for nothing.
            if st.volumes.get(name) != Some(&v) {
                self.propose(MetaCmd::PutVolume(v.clone())).await?;
            }
            let g = st.groups.get(&v.group).cloned();
            (v, g)
        };
        if let Some(g) = &g {
            let freed = match self.close_everywhere(g).await {
                Ok(()) => {
                    self.leader_call_reply(g, &GroupOp::Destroy, Duration::from_secs(120))
                        .await
                }
                Err(e) => Err(e),
            };
            match freed {
                Ok(GroupReply::Stale(sleds)) if !force => {
                    let note = format!(
                        "volume {name:?} is being deleted: its chunks are freed everywhere but on the stale sleds {}, which free theirs when they are back; until then it is listed as deleting (`--force` drops it now and leaves their space allocated)",
                        sleds
                            .iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    tracing::info!(volume = %name, stale = ?sleds, "delete waits for stale sleds");
                    return Ok(Some(note));
                }
                Ok(_) => {}
                Err(e) if !force => {
                    return Err(AdminError::Unavailable(format!(
                        "could not free volume {name:?} on the sleds ({e}); it is marked deleting and the metadata leader keeps trying (`--force` drops it now without freeing its space)"
                    )));
                }
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "deleting without freeing the volume's chunks (--force)");
                }
            }
        }
        let _lock = self.ops.lock().await;
        // Only the record this delete marked: another delete may have finished it meanwhile,
        // and the name may already belong to a new volume.
        let st = self.state();
        let mut cmds = Vec::new();
        if st
            .volumes
            .get(name)
            .is_some_and(|now| now.id == v.id && now.phase == Phase::Deleting)
        {
            cmds.push(MetaCmd::RemoveVolume(v.name.clone()));
        }
        if let Some(g) = g.filter(|g| st.groups.contains_key(&g.id)) {
            cmds.push(MetaCmd::RemoveGroup(g.id));
        }
        drop(st);
        if cmds.is_empty() {
            tracing::info!(volume = %name, "volume already deleted by another request");
            return Ok(None);
        }
        self.propose(MetaCmd::Batch(cmds)).await?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(None)
    }

    async fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, AdminError> {
        check_size(size)?;
        // One change of this volume at a time; the metadata lock only around the decision and
        // the record, not the group call between them (see `changes`).
        let _change = self.changes.lock(name).await;
        let (id, g, placed, _reserved) = {
            let _lock = self.ops.lock().await;
            let st = self.state();
            let v = st.volumes.get(name).ok_or_else(|| not_found(name))?;
            if size < v.size {
                return Err(AdminError::Conflict(format!(
                    "volume {name:?} is {} bytes; volumes only grow (a smaller size would cut off data)",
                    v.size
                )));
            }
            if size == v.size {
                drop(_lock);
                return self.volume_info(name);
            }
            if v.phase != Phase::Serving {
                return Err(AdminError::Conflict(format!(
                    "volume {name:?} is not ready"
                )));
            }
            let g = st
                .groups
                .get(&v.group)
                .cloned()
                .ok_or_else(|| AdminError::Internal(format!("volume {name:?} has no group")))?;
            let extra = size.div_ceil(v.chunk_size) - v.size.div_ceil(v.chunk_size);
            let replicas = v.replicas as usize;
            placement::check_capacity(&st, extra, v.chunk_size, replicas, self.reserved.bytes())
                .map_err(capacity_error)?;
            let up = self.up_sleds(&st);
            let mut slots = placement::sled_slots(&st, &up);
            slots
                .retain(|s| st.sleds.get(&s.id).and_then(|r| r.chunk_size()) == Some(v.chunk_size));
            let placed = placement::place_chunks(&mut slots, extra, replicas, v.id.0 as u64)
                .map_err(capacity_error)?;
            let bytes = extra
                .saturating_mul(v.chunk_size)
                .saturating_mul(replicas as u64);
            (v.id, g, placed, self.reserved.take(bytes, 0, &[]))
        };
        self.leader_call(
            &g,
            &GroupOp::Grow {
                size,
                extra: placed.clone(),
            },
            Duration::from_secs(30),
        )
        .await?;
        let _lock = self.ops.lock().await;
        let mut v = self.changed_record(name, id, "resized")?;
        v.size = size;
        for (s, n) in placement::per_sled(&placed) {
            *v.sled_chunks.entry(s).or_insert(0) += n;
        }
        self.propose(MetaCmd::PutVolume(v)).await?;
        drop(_lock);
        self.volume_info(name)
    }

    async fn set_qos(&self, name: &str, req: &SetQos) -> Result<VolumeInfo, AdminError> {
        let _change = self.changes.lock(name).await;
        let lock = self.ops.lock().await;
        let st = self.state();
        let v = st.volumes.get(name).ok_or_else(|| not_found(name))?;
        let q = req.apply(v.qos);
        common::admin::check_qos(&q).map_err(AdminError::BadRequest)?;
        let g = st
            .groups
            .get(&v.group)
            .cloned()
            .ok_or_else(|| AdminError::Internal(format!("volume {name:?} has no group")))?;
        let nodes: Vec<u64> = g.target.iter().copied().chain(g.runners()).collect();
        let mut more = 0;
        match q.iops {
            None if !self.heads_fit(&st, &nodes, None) => {
                return Err(AdminError::Capacity(format!(
                    "{name:?} cannot lose its IOPS baseline: one of its head nodes {nodes:?} has a capacity-iops, and every volume there needs a baseline"
                )));
            }
            Some(new) => {
                more = new.saturating_sub(v.qos.iops.unwrap_or(0));
                if more > 0 && !self.heads_fit(&st, &nodes, Some(more)) {
                    return Err(AdminError::Capacity(format!(
                        "raising the baseline of {name:?} to {new} IOPS would exceed the capacity of one of its head nodes {nodes:?}"
                    )));
                }
            }
            None => {}
        }
        let (id, serving) = (v.id, v.phase == Phase::Serving);
        drop(st);
        // A volume still being created takes the QoS from its record when it starts serving
        // (`finish_create`, under the metadata lock): record it without letting go.
        let (_reserved, _lock) = if serving {
            let reserved = self.reserved.take(0, more, &nodes);
            drop(lock);
            self.leader_call(&g, &GroupOp::SetQos(q), Duration::from_secs(30))
                .await?;
            (Some(reserved), self.ops.lock().await)
        } else {
            (None, lock)
        };
        let mut v = self.changed_record(name, id, "given its new QoS")?;
        v.qos = q;
        self.propose(MetaCmd::PutVolume(v)).await?;
        drop(_lock);
        self.volume_info(name)
    }

    /// The record of volume `name` (id `id`) to write a change into, as it is now: attaches
    /// and detaches made while the change's group call ran are kept. Refused when the volume
    /// was deleted (or is being deleted) meanwhile. Call under the metadata lock.
    fn changed_record(
        &self,
        name: &str,
        id: VolumeId,
        what: &str,
    ) -> Result<VolumeRecord, AdminError> {
        let st = self.state();
        match st.volumes.get(name) {
            Some(v) if v.id == id && v.phase != Phase::Deleting => Ok(v.clone()),
            _ => Err(AdminError::Conflict(format!(
                "volume {name:?} was deleted while it was being {what}"
            ))),
        }
    }

    async fn heartbeat(&self, hb: Heartbeat) -> Result<(), AdminError> {
        let st = self.state();
        let now = self.now();
        {
            let term = self.meta.status().term;
            let mut live = self.live();
            live.reset_for(term, now);
            live.nodes.insert(hb.node.id, now);
            for s in &hb.sleds {
                live.sleds.insert(s.id, now);
                live.reached.insert((hb.node.id, s.id), now);
            }
            for (d, n) in &hb.allocated {
                live.allocated.insert(*d, *n);
            }
            let node = hb.node.id;
            live.leaders
                .retain(|g, n| *n != node || hb.leads.contains(g));
            for g in &hb.leads {
                live.leaders.insert(*g, node);
            }
        }
        let mut cmds = Vec::new();
        if st.nodes.get(&hb.node.id) != Some(&hb.node) {
            tracing::info!(node_id = hb.node.id, nbd = %hb.node.nbd, "head node registered");
            cmds.push(MetaCmd::PutNode(hb.node.clone()));
        }
        for s in &hb.sleds {
            // Keep a domain configured elsewhere when this node has none for the sled.
            let mut s = s.clone();
            if s.domain.is_none() {
                s.domain = st.sleds.get(&s.id).and_then(|o| o.domain.clone());
            }
            if st.sleds.get(&s.id) != Some(&s) {
                tracing::info!(sled = %s.id, addr = %s.addr, capacity = s.capacity(), "sled registered");
                cmds.push(MetaCmd::PutSled(s));
            }
        }
        if !cmds.is_empty() {
            self.propose(MetaCmd::Batch(cmds)).await?;
        }
        Ok(())
    }

    async fn ensure(&self, name: &str, size: u64, attach: bool) -> Result<VolumeInfo, AdminError> {
        let exists = self.state().volumes.contains_key(name);
        if !exists {
            match self
                .create(CreateVolume {
                    name: name.to_string(),
                    size,
                    qos: None,
                    qos_changes: None,
                    id: None,
                })
                .await
            {
                Ok(_) | Err(AdminError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // Another request may be creating it: wait until it serves.
        let deadline = tokio::time::Instant::now() + BIND_TIMEOUT;
        loop {
            let st = self.state();
            let v = st.volumes.get(name).ok_or_else(|| not_found(name))?;
            if v.phase == Phase::Serving {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AdminError::Unavailable(format!(
                    "volume {name:?} is still {}",
                    view::phase(v, st.groups.get(&v.group))
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let current = self.state().volumes.get(name).map_or(0, |v| v.size);
        if size > current {
            self.resize(name, size).await?;
        }
        if attach
            && self
                .state()
                .volumes
                .get(name)
                .is_some_and(|v| v.attachments.is_empty())
        {
            match self
                .attach(
                    name,
                    false,
                    Some(format!("configuration of head node {}", self.node)),
                )
                .await
            {
                Ok(_) | Err(AdminError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.volume_info(name)
    }
}

/// Marks a delete as running (so the metadata leader does not start another one for the same
/// volume) and remembers when it started.
struct DeleteGuard<'a> {
    cp: &'a ControlPlane,
    name: String,
}

impl<'a> DeleteGuard<'a> {
    fn enter(cp: &'a ControlPlane, name: &str) -> Self {
        cp.in_delete
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (true, cp.now()));
        Self {
            cp,
            name: name.to_string(),
        }
    }
}

impl Drop for DeleteGuard<'_> {
    fn drop(&mut self) {
        if let Some(e) = self
            .cp
            .in_delete
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&self.name)
        {
            e.0 = false;
        }
    }
}

/// Keeps a volume name in one of the control plane's sets of names (creates running on this
/// leader, exports being closed by a detach) until dropped, however the work ends.
struct Marked<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    name: String,
}

impl<'a> Marked<'a> {
    fn enter(set: &'a std::sync::Mutex<std::collections::HashSet<String>>, name: &str) -> Self {
        set.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        Self {
            set,
            name: name.to_string(),
        }
    }
}

impl Drop for Marked<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}
