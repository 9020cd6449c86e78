//! What every head node does for the control plane: run the groups the cluster state gives
//! it (and stop the ones it takes away), export the attached volumes it serves, answer group
//! operations, and report to the metadata leader.

use super::rpc::{GroupOp, GroupProbe, GroupReply};
use super::state::SledRecord;
use super::{AdminRequest, ControlPlane, Heartbeat};
use crate::replication::GroupId;
use crate::replication::driver::{GroupKind, ReplError};
use crate::replication::entry::EntryHeader;
use crate::replication::log::GroupStorage;
use crate::replication::node::ControlHandler;
use crate::replication::rvolume::{VolumeRpc, VolumeRpcReply};
use crate::replication::walpersist::{new_group_log, remove_group_log};
use common::AlignedBuf;
use common::ids::NodeId;
use futures_util::future::BoxFuture;
use raft::prelude::{ConfChangeSingle, ConfChangeType, ConfChangeV2};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// The control calls of the peer transport.
pub(super) struct Handler(pub(super) Weak<ControlPlane>);

impl ControlHandler for Handler {
    fn handle(
        &self,
        _from: NodeId,
        rpc: VolumeRpc,
        data: AlignedBuf,
    ) -> BoxFuture<'static, (VolumeRpcReply, Option<AlignedBuf>)> {
        let cp = self.0.upgrade();
        Box::pin(async move {
            let Some(cp) = cp else {
                return (VolumeRpcReply::Failed("node stopping".into()), None);
            };
            match rpc {
                VolumeRpc::Group { group } => match postcard::from_bytes::<GroupOp>(&data) {
                    Ok(op) => (VolumeRpcReply::Group(cp.group_op(group, op).await), None),
                    Err(e) => (
                        VolumeRpcReply::Failed(format!("malformed group operation: {e}")),
                        None,
                    ),
                },
                VolumeRpc::Admin => {
                    let st = cp.meta.status();
                    if !st.serving {
                        return (VolumeRpcReply::NotLeader(st.leader), None);
                    }
                    let reply = match serde_json::from_slice::<AdminRequest>(&data) {
                        Ok(req) => match cp.execute(req).await {
                            Ok(r) => r,
                            Err(e) => e.reply(),
                        },
                        Err(e) => super::AdminError::BadRequest(format!(
                            "malformed forwarded request: {e}"
                        ))
                        .reply(),
                    };
                    let body = serde_json::to_vec(&reply.body).unwrap_or_default();
                    (
                        VolumeRpcReply::Admin(reply.status),
                        Some(AlignedBuf::from_slice(&body)),
                    )
                }
                _ => (VolumeRpcReply::Failed("not a control call".into()), None),
            }
        })
    }
}

fn single(kind: ConfChangeType, node: u64) -> ConfChangeV2 {
    let mut s = ConfChangeSingle::default();
    s.set_change_type(kind);
    s.node_id = node;
    let mut cc = ConfChangeV2::default();
    cc.set_changes(vec![s].into());
    cc
}

pub(super) fn repl_reply(e: ReplError) -> GroupReply {
    match e {
        ReplError::NotLeader { leader } => GroupReply::NotLeader(leader.map(|l| l.0)),
        other => GroupReply::Failed(other.to_string()),
    }
}

impl ControlPlane {
    /// Runs a group operation on this node's member of `group`.
    pub(super) async fn group_op(&self, group: GroupId, op: GroupOp) -> GroupReply {
        let Some(h) = self.repl.handle(group) else {
            return GroupReply::NoGroup;
        };
        let st = h.status();
        let leader_only = !matches!(op, GroupOp::Probe | GroupOp::CloseExport);
        if leader_only && st.role != "leader" {
            return GroupReply::NotLeader(st.leader.map(|l| l.0));
        }
        match op {
            GroupOp::Probe => GroupReply::Probe(GroupProbe {
                role: st.role.to_string(),
                term: st.term,
                leader: st.leader.map(|l| l.0),
                serving: st.serving,
                voters: st.voters.clone(),
                learners: st.learners.clone(),
                progress: st.progress.clone(),
                committed: st.committed,
                applied: st.applied,
                flushed: st.flushed,
                volume: st.spec.as_ref().map(|s| s.name.clone()),
                size: st.spec.as_ref().map_or(0, |s| s.size),
                exported: self.volumes.exports_group(group),
            }),
            GroupOp::Bind { spec, qos } => match &st.spec {
                Some(s) if s.id == spec.id => GroupReply::Ok,
                Some(s) => {
                    GroupReply::Failed(format!("group {group} already serves volume {:?}", s.name))
                }
                None => {
                    if let Err(e) = h.propose_as_leader(EntryHeader::Qos(qos)).await {
                        return repl_reply(e);
                    }
                    match h.propose_as_leader(EntryHeader::Spec(spec)).await {
                        Ok(_) => GroupReply::Ok,
                        Err(e) => repl_reply(e),
                    }
                }
            },
            GroupOp::Grow { size, extra } => {
                let Some(spec) = st.spec.clone() else {
                    return GroupReply::Failed("the group has no volume".into());
                };
                let grown = match spec.grown(size, &extra) {
                    Ok(Some(g)) => g,
                    Ok(None) => return GroupReply::Ok,
                    Err(m) => return GroupReply::Failed(m),
                };
                match h
                    .propose(EntryHeader::Spec(grown), bytes::Bytes::new())
                    .await
                {
                    Ok(_) => GroupReply::Ok,
                    Err(e) => repl_reply(e),
                }
            }
            GroupOp::SetQos(q) => match h.propose(EntryHeader::Qos(q), bytes::Bytes::new()).await {
                Ok(_) => GroupReply::Ok,
                Err(e) => repl_reply(e),
            },
            GroupOp::AddLearner(n) => {
                if st.voters.contains(&n) || st.learners.contains(&n) {
                    return GroupReply::Ok;
                }
                self.change(&h, single(ConfChangeType::AddLearnerNode, n), |s| {
                    s.learners.contains(&n) || s.voters.contains(&n)
                })
                .await
            }
            GroupOp::Promote(n) => {
                if st.voters.contains(&n) {
                    return GroupReply::Ok;
                }
                self.change(&h, single(ConfChangeType::AddNode, n), |s| {
                    s.voters.contains(&n)
                })
                .await
            }
            GroupOp::Remove(n) => {
                if !st.voters.contains(&n) && !st.learners.contains(&n) {
                    return GroupReply::Ok;
                }
                self.change(&h, single(ConfChangeType::RemoveNode, n), |s| {
                    !s.voters.contains(&n) && !s.learners.contains(&n)
                })
                .await
            }
            GroupOp::CloseExport => {
                for v in self.volumes.remove_group(group) {
                    v.detach();
                }
                // Wait on the group's volume even when it was no longer exported: a close
                // sent again after one that timed out waits for the same requests.
                if let Some(v) = self.repl.volume(group)
                    && v.is_detached()
                    && tokio::time::timeout(Duration::from_secs(30), v.drained())
                        .await
                        .is_err()
                {
                    return GroupReply::Failed(format!(
                        "{} requests of the detached clients still in flight after 30 s",
                        v.inflight()
                    ));
                }
                GroupReply::Ok
            }
            GroupOp::Flush => self.wait_flushed(&h).await,
            GroupOp::Replicas => Self::replicas_of(&h),
            GroupOp::AddReplicas(adds) => Self::add_replicas(&h, &adds).await,
            GroupOp::DropReplicas(drops) => Self::drop_replicas(&h, &drops).await,
            GroupOp::Destroy => {
                let Some(spec) = st.spec.clone() else {
                    return GroupReply::Ok;
                };
                // A retried delete that had got as far as retiring the volume on the sleds:
                // they refuse everything for it now, and there is nothing left to free.
                if let Some(store) = h.status().store
                    && store.retired_everywhere().await
                {
                    return GroupReply::Ok;
                }
                let zero = EntryHeader::Zero {
                    offset: 0,
                    len: spec.size.div_ceil(crate::volume::BLOCK) * crate::volume::BLOCK,
                    free: true,
                };
                let index = match h.propose(zero, bytes::Bytes::new()).await {
                    Ok(i) => i,
                    Err(e) => return repl_reply(e),
                };
                // Until the trim itself is on the sleds (the flushed index passed it): a trim
                // adds no unflushed bytes, so `wait_flushed` alone answered before it was
                // written back, and the group could be removed before its chunks were freed.
                match self.wait_flushed_to(&h, index).await {
                    // Write-back skips a stale sled: its chunks are freed by its resync, once
                    // it is back. Until then the volume's space is not all free.
                    GroupReply::Ok => match h.status().store {
                        Some(store) if !store.stale().is_empty() => {
                            GroupReply::Stale(store.stale().into_iter().collect())
                        }
                        Some(store) => {
                            // Every chunk is freed: the sleds may give the volume's places in
                            // their fence tables to new volumes.
                            for (sled, e) in store.retire().await {
                                tracing::warn!(volume = %spec.name, sled_id = %sled, error = %e,
                                    "retiring the deleted volume on a sled failed; its fence \
                                     record stays (safe, but its place is not reclaimed)");
                            }
                            GroupReply::Ok
                        }
                        None => GroupReply::Ok,
                    },
                    other => other,
                }
            }
        }
    }

    async fn change(
        &self,
        h: &crate::replication::driver::GroupHandle,
        cc: ConfChangeV2,
        done: impl Fn(&crate::replication::driver::GroupStatus) -> bool,
    ) -> GroupReply {
        match h.change_membership(cc).await {
            Ok(_) if done(&h.status()) => GroupReply::Ok,
            Ok(_) => GroupReply::Failed(
                "the membership change was not applied (another one was pending); retry".into(),
            ),
            Err(e) => repl_reply(e),
        }
    }

    /// Waits (bounded) until the leader holds no committed data that is not on the sleds.
    /// Waits until the replicated flushed index reaches `index` (as leader).
    async fn wait_flushed_to(
        &self,
        h: &crate::replication::driver::GroupHandle,
        index: u64,
    ) -> GroupReply {
        Self::wait_leader(h, |st| {
            (st.flushed < index).then(|| {
                format!(
                    "entry {index} is still not on the sleds after 60 s (flushed up to {})",
                    st.flushed
                )
            })
        })
        .await
    }

    async fn wait_flushed(&self, h: &crate::replication::driver::GroupHandle) -> GroupReply {
        Self::wait_leader(h, |st| {
            (st.unflushed_bytes > 0).then(|| {
                format!(
                    "{} committed bytes are still not on the sleds after 60 s",
                    st.unflushed_bytes
                )
            })
        })
        .await
    }

    /// Waits (as leader, at most 60 s) until `pending` answers `None`; `Some(why)` is the
    /// failure if it still does at the deadline.
    async fn wait_leader(
        h: &crate::replication::driver::GroupHandle,
        pending: impl Fn(&crate::replication::driver::GroupStatus) -> Option<String>,
    ) -> GroupReply {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let st = h.status();
            if !st.serving {
                return GroupReply::NotLeader(st.leader.map(|l| l.0));
            }
            let Some(why) = pending(&st) else {
                return GroupReply::Ok;
            };
            if tokio::time::Instant::now() >= deadline {
                return GroupReply::Failed(why);
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), h.changed()).await;
        }
    }

    /// Brings this node in line with the cluster state: groups it runs, exports it offers.
    /// Answers whether the state it worked from was caught up (a metadata leader known and
    /// every commit applied): only such a pass may mark the node ready to serve NBD.
    pub(super) async fn reconcile(&self) -> bool {
        let meta = self.meta.status();
        let pass_caught_up =
            meta.leader.is_some() && meta.cluster.is_some() && meta.applied >= meta.committed;
        let Some(st) = meta.cluster.clone() else {
            return false;
        };
        let me = self.node.0;
        // Sleds: every one the cluster lists, besides the configured ones (a sled added with
        // `stockade sled add` is in no configuration).
        self.sleds
            .pool
            .sync(&st.sleds.values().map(|s| s.addr).collect());
        // Groups to run.
        for g in st.groups.values() {
            if !g.runners().any(|n| n == me) || self.repl.handle(g.id).is_some() {
                continue;
            }
            let recovered = self
                .recovered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&g.id);
            let founder = g.founders.contains(&me);
            let log = match recovered {
                Some(log) => log,
                None if founder => match new_group_log(&self.wal, g.id, &g.founders).await {
                    Ok(log) => log,
                    Err(e) => {
                        tracing::error!(group = %g.id, error = %e, "creating a group's log failed");
                        continue;
                    }
                },
                // A node added to a running group starts empty and catches up from the leader.
                None => GroupStorage::new(),
            };
            let label = g
                .volume
                .clone()
                .unwrap_or_else(|| format!("_pool-{}", &g.id.to_string()[..8]));
            match self.repl.add_group(
                g.id,
                &label,
                log,
                self.sleds.clone(),
                GroupKind::Volume { template: None },
            ) {
                Ok(_) => {
                    tracing::info!(group = %g.id, volume = ?g.volume, founder, "running group");
                    // The first founder starts the first election at once (a fresh group
                    // would otherwise wait out an election timeout).
                    if founder
                        && g.founders.first() == Some(&me)
                        && let Some(h) = self.repl.handle(g.id)
                        && h.status().term <= 1
                    {
                        h.campaign().await;
                    }
                }
                Err(e) => tracing::error!(group = %g.id, error = %e, "starting a group failed"),
            }
        }
        // Groups to stop: only once this node's view is caught up with the leader's, and after
        // the group has been absent for a while (a state being replayed after a restart does
        // not know the newest groups yet).
        let caught_up =
            meta.leader.is_some() && meta.applied >= meta.committed && meta.committed > 1;
        let now = self.now();
        let mut stop = Vec::new();
        {
            let mut absent = self.absent.lock().unwrap_or_else(|p| p.into_inner());
            let running = self.repl.groups();
            absent.retain(|g, _| running.contains(g));
            for gid in running {
                if gid == GroupId::META {
                    continue;
                }
                let wanted = st
                    .groups
                    .get(&gid)
                    .is_some_and(|g| g.runners().any(|n| n == me));
                if wanted || !caught_up {
                    absent.remove(&gid);
                    continue;
                }
                let since = *absent.entry(gid).or_insert(now);
                if now.saturating_sub(since) >= Duration::from_secs(2) {
                    stop.push(gid);
                }
            }
        }
        for gid in stop {
            for v in self.volumes.remove_group(gid) {
                v.detach();
            }
            if let Some(h) = self.repl.remove_group(gid).await {
                let label = h.peek(|s| s.spec.as_ref().map(|s| s.name.clone()));
                if let Some(name) = label {
                    self.sleds.metrics.forget(&name);
                }
            }
            self.sleds
                .metrics
                .forget(&format!("_pool-{}", &gid.to_string()[..8]));
            if let Err(e) = remove_group_log(&self.wal, gid).await {
                tracing::error!(group = %gid, error = %e, "removing a group's log failed");
            }
            self.absent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&gid);
            tracing::info!(group = %gid, "stopped group (deleted, or this node left it)");
        }
        // Exports: attached, serving volumes whose group this node is a voter of.
        let mut want = std::collections::BTreeMap::new();
        for v in st.volumes.values() {
            if v.attachments.is_empty() || v.phase != super::state::Phase::Serving {
                continue;
            }
            if st
                .groups
                .get(&v.group)
                .is_some_and(|g| g.members.contains(&me))
            {
                want.insert(v.name.clone(), v.group);
            }
        }
        for name in self.volumes.names() {
            let keep = want.get(&name).is_some_and(|g| {
                self.volumes
                    .by_name(&name)
                    .is_some_and(|v| v.handle().group() == *g)
            });
            if !keep && let Some(v) = self.volumes.remove(&name) {
                v.detach();
                tracing::info!(volume = %name, "export closed");
            }
        }
        for (name, gid) in want {
            if self.volumes.by_name(&name).is_some() {
                continue;
            }
            if let Some(v) = self.repl.volume(gid) {
                // Requests of the clients a detach cut off are still running: a new client
                // must not write beside them. Open once they are done (a later round).
                if v.is_detached() && v.inflight() > 0 {
                    tracing::info!(volume = %name, inflight = v.inflight(),
                        "export waits for the requests of detached clients");
                    continue;
                }
                v.attach();
                self.volumes.insert(&name, v);
                tracing::info!(volume = %name, "export opened");
            }
        }
        pass_caught_up
    }

    /// This node's report to the metadata leader.
    async fn heartbeat_report(&self) -> Heartbeat {
        let mut sleds = Vec::new();
        let mut allocated = Vec::new();
        for (_, conn) in self.sleds.pool.discover().await {
            let Ok(client) = conn.client().await else {
                continue;
            };
            let Ok(Ok(stat)) = tokio::time::timeout(Duration::from_secs(2), client.stat()).await
            else {
                continue;
            };
            for d in &stat.devices {
                allocated.push((d.device, d.chunks_used));
            }
            sleds.push(SledRecord::described(
                &stat,
                conn.addr(),
                self.sled_domains.get(&conn.addr()).cloned(),
            ));
        }
        let leads = self
            .repl
            .groups()
            .into_iter()
            .filter(|g| *g != GroupId::META)
            .filter(|g| self.repl.handle(*g).is_some_and(|h| h.status().serving))
            .collect();
        Heartbeat {
            node: self.me.clone(),
            sleds,
            allocated,
            leads,
        }
    }
}

/// Reconciles on every change of the cluster state, and every second anyway.
pub(super) async fn reconcile_loop(cp: Arc<ControlPlane>, mut stop: watch::Receiver<bool>) {
    // One receiver for the whole loop, marked seen before each pass: a change published while
    // a pass runs wakes the next one, and an unchanged state does not (a fresh receiver per
    // wait would either miss such a change or, never marked seen, never wait at all).
    let mut meta = cp.meta.watch();
    loop {
        meta.borrow_and_update();
        let caught_up = cp.reconcile().await;
        cp.note_reconciled(caught_up);
        let meta_stopped = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = meta.changed() => r.is_err(),
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        if meta_stopped {
            // The metadata group stopped (its sender is gone): only the once-a-second pass.
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Reports to the metadata leader every heartbeat interval.
pub(super) async fn heartbeat_loop(cp: Arc<ControlPlane>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(cp.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let hb = cp.heartbeat_report().await;
        let r = tokio::time::timeout(
            cp.cfg.heartbeat_interval * 4,
            cp.admin(AdminRequest::Heartbeat(hb)),
        )
        .await;
        match r {
            Ok(r) if r.status == 200 => {}
            Ok(r) => tracing::debug!(status = r.status, body = %r.body, "heartbeat refused"),
            Err(_) => tracing::debug!("heartbeat timed out"),
        }
    }
}
