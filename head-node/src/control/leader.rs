//! The metadata leader's background work: keep the settings, keep the pool of ready groups
//! full and validated, grow partially provisioned groups one membership change at a time,
//! and finish creates a previous leader left half done.

use super::rpc::{GroupOp, GroupReply};
use super::state::{ClusterState, GroupRecord, MetaCmd, Phase, VolumeRecord};
use super::{AdminError, ControlPlane, placement, unix_now};
use crate::replication::GroupId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A pool group that has not validated within this long is discarded.
const POOL_VALIDATION_TIMEOUT: u64 = 60;

/// A pending delete is tried again at most this often.
const DELETE_RETRY: Duration = Duration::from_secs(5);

/// A learner this close to the commit index is promoted to voter.
const PROMOTE_LAG: u64 = 256;

pub(super) async fn leader_loop(cp: Arc<ControlPlane>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let st = cp.meta.status();
        cp.metrics.is_leader.set(i64::from(st.serving));
        if !st.serving {
            continue;
        }
        let now = cp.now();
        cp.live().reset_for(st.term, now);
        if let Err(e) = cp.duties().await {
            tracing::debug!(error = %e, "metadata leader duties");
        }
        ControlPlane::retry_deletes(&cp);
    }
}

impl ControlPlane {
    async fn duties(&self) -> Result<(), AdminError> {
        let st = self.state();
        if st.settings != self.settings {
            let _lock = self.ops.lock().await;
            tracing::info!(settings = ?self.settings, "applying this node's control settings to the cluster");
            self.propose(MetaCmd::Settings(self.settings.clone()))
                .await?;
        }
        self.export_gauges(&st);
        // Each duty runs whatever the others did: a create that cannot finish must not stop
        // groups from growing or the pool from refilling.
        self.finish_interrupted(&st).await;
        if let Err(e) = self.grow(&st).await {
            tracing::warn!(error = %e, "metadata leader: growing groups");
        }
        self.drain_sleds(&st).await;
        self.keep_pool(&st).await
    }

    fn export_gauges(&self, st: &ClusterState) {
        let (ready, pending) = st.pool();
        self.metrics
            .pool_groups
            .with_label_values(&["ready"])
            .set(ready.len() as i64);
        self.metrics
            .pool_groups
            .with_label_values(&["pending"])
            .set(pending.len() as i64);
        self.metrics.volumes.set(st.volumes.len() as i64);
        self.metrics
            .up
            .with_label_values(&["node"])
            .set(self.up_nodes(st).len() as i64);
        self.metrics
            .up
            .with_label_values(&["sled"])
            .set(self.up_sleds(st).len() as i64);
        let load = st.sled_load();
        let draining: u64 = st.draining.iter().filter_map(|s| load.get(s)).sum();
        self.metrics.draining_replicas.set(draining as i64);
    }

    /// Creates whose requester is gone (leader change, timeout): bind each one's group and mark
    /// it serving. One that fails is logged and tried again at the next tick; it does not hold
    /// up the others.
    async fn finish_interrupted(&self, st: &ClusterState) {
        let todo: Vec<_> = {
            let busy = self.in_create.lock().unwrap_or_else(|p| p.into_inner());
            st.volumes
                .values()
                .filter(|v| v.phase == Phase::Creating && !busy.contains(&v.name))
                .cloned()
                .collect()
        };
        for v in todo {
            if let Err(e) = self.finish_one(st, &v).await {
                tracing::warn!(volume = %v.name, error = %e, "cannot finish an interrupted create yet");
            }
        }
    }

    async fn finish_one(&self, st: &ClusterState, v: &VolumeRecord) -> Result<(), AdminError> {
        let Some(g) = st.groups.get(&v.group).cloned() else {
            return Ok(());
        };
        let Some((_, probe)) = self.find_leader(&g).await else {
            return Ok(());
        };
        if probe.volume.is_none() {
            // Never bound: place it again (the sleds hold nothing of it yet), against the
            // cluster without its own earlier placement, which would count twice.
            let mut others = st.clone();
            others.volumes.remove(&v.name);
            let (spec, _) = self.place_volume(&others, v.id, &v.name, v.size)?;
            let mut rec = v.clone();
            rec.sled_chunks = placement::per_sled(&spec.placement);
            {
                let _lock = self.ops.lock().await;
                if self.state().volumes.get(&v.name) != Some(v) {
                    return Ok(());
                }
                self.propose(MetaCmd::PutVolume(rec)).await?;
            }
            tracing::info!(volume = %v.name, "finishing an interrupted create");
            self.bind(&g, &spec, v.qos, Duration::from_secs(10)).await?;
            self.finish_create(&v.name, v.id, Some(v.qos)).await?;
        } else if probe.volume.as_deref() == Some(v.name.as_str()) {
            // Bound by the interrupted create, with the QoS of that moment.
            self.finish_create(&v.name, v.id, None).await?;
        }
        Ok(())
    }

    /// Volumes marked deleting whose delete is not running (it waited for a stale sled, failed,
    /// or ran on an earlier leader): starts it again in the background, at most every
    /// [`DELETE_RETRY`] per volume.
    fn retry_deletes(cp: &Arc<Self>) {
        let st = cp.state();
        let now = cp.now();
        let mut running = cp.in_delete.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|name, _| st.volumes.contains_key(name));
        for v in st.volumes.values().filter(|v| v.phase == Phase::Deleting) {
            match running.get(&v.name) {
                Some((true, _)) => continue,
                Some((false, at)) if now.saturating_sub(*at) < DELETE_RETRY => continue,
                _ => {}
            }
            // Marked running here, so the next tick does not start another one before the
            // task's own guard does.
            running.insert(v.name.clone(), (true, now));
            let (cp, name) = (cp.clone(), v.name.clone());
            tokio::spawn(async move {
                match cp.delete(&name, false).await {
                    Ok(None) => tracing::info!(volume = %name, "finished a pending delete"),
                    Ok(Some(note)) => {
                        tracing::debug!(volume = %name, %note, "delete still pending")
                    }
                    Err(e) => tracing::debug!(volume = %name, error = %e, "delete still pending"),
                }
            });
        }
    }

    /// One membership step for every group that is smaller than its target.
    async fn grow(&self, st: &ClusterState) -> Result<(), AdminError> {
        let up = self.up_nodes(st);
        let growing: Vec<GroupRecord> = st
            .groups
            .values()
            .filter(|g| g.growing())
            .filter(|g| st.volume_of(g.id).is_none_or(|v| v.phase == Phase::Serving))
            .cloned()
            .collect();
        for g in growing {
            match g.joining {
                None => {
                    let Some(next) = g
                        .target
                        .iter()
                        .copied()
                        .find(|t| !g.members.contains(t) && up.contains(t))
                    else {
                        continue;
                    };
                    self.put_group_if_unchanged(&g, |r| r.joining = Some(next))
                        .await?;
                    tracing::info!(group = %g.id, node_id = next, "growing group: starting the new member");
                }
                Some(n) => self.grow_step(&g, n).await?,
            }
        }
        Ok(())
    }

    async fn grow_step(&self, g: &GroupRecord, n: u64) -> Result<(), AdminError> {
        let Some((_, p)) = self.find_leader(g).await else {
            return Ok(());
        };
        if p.voters.contains(&n) {
            self.put_group_if_unchanged(g, |r| {
                if !r.members.contains(&n) {
                    r.members.push(n);
                }
                r.joining = None;
            })
            .await?;
            tracing::info!(group = %g.id, node_id = n, members = p.voters.len(), "group grew");
            return Ok(());
        }
        if !p.learners.contains(&n) {
            // The new member must run the group before it is added.
            match self
                .group_call(n, g.id, &GroupOp::Probe, Duration::from_secs(2))
                .await
            {
                Ok(GroupReply::Probe(_)) => {}
                _ => return Ok(()),
            }
            self.leader_call(g, &GroupOp::AddLearner(n), Duration::from_secs(10))
                .await?;
            self.metrics.growth_steps.inc();
            tracing::info!(group = %g.id, node_id = n, "growing group: learner added");
            return Ok(());
        }
        let matched = p
            .progress
            .iter()
            .find(|(id, _)| *id == n)
            .map_or(0, |(_, m)| *m);
        if matched + PROMOTE_LAG >= p.committed && matched > 1 {
            self.leader_call(g, &GroupOp::Promote(n), Duration::from_secs(10))
                .await?;
            self.metrics.growth_steps.inc();
            tracing::info!(group = %g.id, node_id = n, matched, committed = p.committed, "growing group: learner promoted");
        }
        Ok(())
    }

    /// Writes a changed copy of `g` unless someone changed it meanwhile.
    async fn put_group_if_unchanged(
        &self,
        g: &GroupRecord,
        change: impl FnOnce(&mut GroupRecord),
    ) -> Result<(), AdminError> {
        let _lock = self.ops.lock().await;
        if self.state().groups.get(&g.id) != Some(g) {
            return Ok(());
        }
        let mut r = g.clone();
        change(&mut r);
        self.propose(MetaCmd::PutGroup(r)).await
    }

    /// Validates pending pool groups and starts new ones up to the target.
    async fn keep_pool(&self, st: &ClusterState) -> Result<(), AdminError> {
        let (ready, pending) = st.pool();
        let pending: Vec<GroupRecord> = pending.into_iter().cloned().collect();
        let have = ready.len() + pending.len();
        for g in pending {
            if self.validated(&g).await {
                self.put_group_if_unchanged(&g, |r| r.ready = true).await?;
                tracing::info!(group = %g.id, members = ?g.members, "pool group ready");
            } else if unix_now().saturating_sub(g.created) > POOL_VALIDATION_TIMEOUT {
                let _lock = self.ops.lock().await;
                if self.state().groups.get(&g.id) == Some(&g) {
                    self.propose(MetaCmd::RemoveGroup(g.id)).await?;
                    self.metrics.pool_validation_failures.inc();
                    tracing::warn!(group = %g.id, members = ?g.members,
                        "pool group failed validation; discarded");
                }
            }
        }
        let target = st.settings.pool_target as usize;
        if have >= target {
            return Ok(());
        }
        let up = self.up_nodes(st);
        let known = self.known_nodes(st);
        let want = (st.settings.group_size as usize).min(known.len());
        let Ok(heads) =
            placement::choose_heads(st, &known, &up, want, Some(0), &self.reserved.iops())
        else {
            return Ok(());
        };
        if heads.len() < want || heads.iter().any(|h| !up.contains(h)) {
            // Wait for every node to be up: a pool group is a full group.
            return Ok(());
        }
        let _lock = self.ops.lock().await;
        let now = self.state();
        let (r, p) = now.pool();
        if r.len() + p.len() >= target {
            return Ok(());
        }
        let g = GroupRecord {
            id: GroupId::random(),
            founders: heads.clone(),
            members: heads.clone(),
            joining: None,
            target: heads,
            volume: None,
            ready: false,
            created: unix_now(),
        };
        tracing::info!(group = %g.id, members = ?g.members, "starting a pool group");
        self.propose(MetaCmd::PutGroup(g)).await
    }

    /// A pool group passes validation when its leader has committed an entry of its term and
    /// every member has it: each member runs the group, persists and acknowledges appends.
    async fn validated(&self, g: &GroupRecord) -> bool {
        let Some((_, p)) = self.find_leader(g).await else {
            return false;
        };
        let mut voters = p.voters.clone();
        voters.sort_unstable();
        let mut members = g.members.clone();
        members.sort_unstable();
        p.committed >= 2
            && voters == members
            && members.iter().all(|m| {
                p.progress
                    .iter()
                    .any(|(id, matched)| id == m && *matched >= p.committed)
            })
    }
}
