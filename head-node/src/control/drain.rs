//! Draining a sled: `stockade sled drain` records the sled as draining in the cluster state; from
//! then on placement gives it no new replica, and the metadata leader moves every chunk replica
//! it holds to another sled, one volume step at a time, make-before-break:
//!
//! 1. a chunk on the draining sled gets a replacement replica on another sled (a new failure
//!    domain when there is one, else the least filled) — the volume's group records that sled
//!    stale and resynchronises it: it copies the chunk from a current replica while writes go
//!    on (see `replication::driver::place`);
//! 2. once every other replica of the chunk is current, the draining sled is dropped from the
//!    chunk's placement, and what it holds of the chunk is freed (if it answers).
//!
//! The draining sled keeps serving its replicas until step 2, so a drain of a live sled never
//! lowers redundancy; a dead sled's replicas are rebuilt from the survivors (re-replication).
//! The state lives in the cluster state and the volumes' groups, so a new metadata leader goes
//! on where the last one stopped. A drained sled holds nothing of any volume; `undrain` makes it
//! a placement target again.

use super::rpc::{GroupOp, GroupReply};
use super::state::{ClusterState, MetaCmd, Phase};
use super::{AdminError, ControlPlane, placement};
use crate::replication::driver::GroupHandle;
use crate::volume::VolumeSpec;
use common::admin::SledInfo;
use common::ids::SledId;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// How long a placement step on a volume's group may take (a drop frees chunks on the sled).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// A sled id from a request path.
fn parse_sled(id: &str) -> Result<SledId, AdminError> {
    id.parse().map_err(|e| {
        AdminError::BadRequest(format!("{e}; `stockade sled list` shows the sleds' ids"))
    })
}

/// Refuses a sled the cluster state does not hold.
fn known(st: &ClusterState, sled: SledId) -> Result<(), AdminError> {
    if st.sleds.contains_key(&sled) {
        Ok(())
    } else {
        Err(AdminError::NotFound(format!(
            "no sled {sled}; `stockade sled list` shows the sleds"
        )))
    }
}

/// A drain that cannot progress is reported at most this often per sled and volume.
const DRAIN_WARN_EVERY: Duration = Duration::from_secs(60);

impl ControlPlane {
    /// `POST /v1/sleds/{id}/drain` and `/undrain`.
    pub(super) async fn drain_sled(&self, id: &str, drain: bool) -> Result<SledInfo, AdminError> {
        let sled = parse_sled(id)?;
        {
            let _lock = self.ops.lock().await;
            let st = self.state();
            known(&st, sled)?;
            let left = st
                .sleds
                .keys()
                .filter(|s| **s != sled && !st.draining.contains(s))
                .count();
            if drain && !st.draining.contains(&sled) && left < st.settings.replicas as usize {
                return Err(AdminError::Conflict(format!(
                    "draining sled {sled} would leave {left} sleds for {} replicas per chunk; add \
                     a sled first (or undrain another)",
                    st.settings.replicas
                )));
            }
            if st.draining.contains(&sled) != drain {
                tracing::info!(sled_id = %sled, drain, "sled drain changed");
                self.propose(MetaCmd::DrainSled { sled, drain }).await?;
            }
        }
        self.sled_info(sled)
    }

    /// `DELETE /v1/sleds/{id}`: forgets a sled that is drained (holds no replica) and down
    /// (a sled that is up would be registered again by the head nodes that reach it).
    pub(super) async fn remove_sled(&self, id: &str) -> Result<(), AdminError> {
        let sled = parse_sled(id)?;
        let _lock = self.ops.lock().await;
        let st = self.state();
        known(&st, sled)?;
        let held = st.sled_load().get(&sled).copied().unwrap_or(0);
        if !st.draining.contains(&sled) || held > 0 {
            return Err(AdminError::Conflict(format!(
                "sled {sled} still holds {held} chunk replicas: `stockade sled drain {sled}` \
                 moves them, then remove it once `sled list` shows it drained"
            )));
        }
        if self.up_sleds(&st).contains(&sled) {
            return Err(AdminError::Conflict(format!(
                "sled {sled} is up: stop its sled controller (or take it out of the head \
                 nodes' configuration) first, or the head nodes register it again"
            )));
        }
        tracing::info!(sled_id = %sled, "sled removed from the cluster");
        self.propose(MetaCmd::RemoveSled(sled)).await
    }

    /// The metadata leader's duty: one step for each volume with replicas on a draining sled.
    pub(super) async fn drain_sleds(&self, st: &ClusterState) {
        for sled in &st.draining {
            let volumes: Vec<String> = st
                .volumes
                .values()
                .filter(|v| v.phase == Phase::Serving)
                .filter(|v| v.sled_chunks.get(sled).is_some_and(|n| *n > 0))
                .map(|v| v.name.clone())
                .collect();
            for name in volumes {
                match self.drain_step(*sled, &name).await {
                    // Stuck until something changes: worth an operator's eye, once a minute.
                    Err(e @ AdminError::Conflict(_)) if self.drain_warn_due(*sled, &name) => {
                        tracing::warn!(sled_id = %sled, volume = %name, error = %e,
                            "draining: cannot move this volume's replicas now");
                    }
                    Err(e) => tracing::debug!(sled_id = %sled, volume = %name, error = %e,
                        "draining: step not done; retrying"),
                    Ok(()) => {}
                }
            }
        }
    }

    /// True at most once a minute per sled and volume.
    fn drain_warn_due(&self, sled: SledId, volume: &str) -> bool {
        let now = self.now();
        let mut w = self.drain_warned.lock().unwrap_or_else(|p| p.into_inner());
        let last = w
            .entry((sled, volume.to_string()))
            .or_insert(Duration::ZERO);
        if *last == Duration::ZERO || now.saturating_sub(*last) >= DRAIN_WARN_EVERY {
            *last = now.max(Duration::from_nanos(1));
            true
        } else {
            false
        }
    }

    /// Moves `volume`'s replicas off `sled` by one step: add replacements, or drop the replicas
    /// whose replacements are current.
    async fn drain_step(&self, sled: SledId, volume: &str) -> Result<(), AdminError> {
        let _change = self.changes.lock(volume).await;
        let st = self.state();
        let Some(v) = st.volumes.get(volume).cloned() else {
            return Ok(());
        };
        let g = st
            .groups
            .get(&v.group)
            .cloned()
            .ok_or_else(|| AdminError::Internal(format!("volume {volume:?} has no group")))?;
        let Some((leader, _)) = self.find_leader(&g).await else {
            return Err(AdminError::Unavailable(
                "no leader of the volume's group".into(),
            ));
        };
        let (mut now, stale) = match self
            .group_call(leader, g.id, &GroupOp::Replicas, STEP_TIMEOUT)
            .await?
        {
            GroupReply::Replicas { placement, stale } => {
                (placement, stale.into_iter().collect::<BTreeSet<_>>())
            }
            other => return Err(AdminError::Unavailable(format!("{other:?}"))),
        };
        let up = self.up_sleds(&st);
        let mut slots = placement::sled_slots(&st, &up);
        slots.retain(|s| st.sleds.get(&s.id).and_then(|r| r.chunk_size()) == Some(v.chunk_size));
        // Replicas a chunk keeps: the volume's count, or all the sleds there are — counting
        // those down for now, so that a sled away for a moment makes the drain wait for it
        // rather than drop a replica for good.
        let eligible = st
            .sleds
            .values()
            .filter(|s| !st.draining.contains(&s.id) && s.chunk_size() == Some(v.chunk_size))
            .count();
        let wanted = (v.replicas as usize).min(eligible).max(1);
        let step = match plan_step(sled, &now, &stale, &up, wanted, &mut slots) {
            Plan::Add(adds) => {
                tracing::info!(sled_id = %sled, volume, chunks = adds.len(), to = %adds[0].1,
                    "draining: placing replacement replicas");
                for (c, to) in &adds {
                    now[*c as usize].push(*to);
                }
                GroupOp::AddReplicas(adds)
            }
            Plan::Drop(drops) => {
                tracing::info!(sled_id = %sled, volume, chunks = drops.len(),
                    "draining: dropping replicas whose replacements are current");
                for (c, _) in &drops {
                    now[*c as usize].retain(|s| *s != sled);
                }
                GroupOp::DropReplicas(drops)
            }
            // Replacements are being resynchronised, or a sled to take one is away.
            Plan::Wait => return self.record_placement(volume, &now).await,
            Plan::Blocked => {
                return Err(AdminError::Conflict(
                    "no sled can take a replacement without leaving a chunk with no current \
                     replica while it is resynchronised (too few replicas per chunk, or too \
                     many sleds stale)"
                        .into(),
                ));
            }
        };
        self.leader_call(&g, &step, STEP_TIMEOUT).await?;
        let kind = if matches!(step, GroupOp::AddReplicas(_)) {
            "add"
        } else {
            "drop"
        };
        self.metrics.drain_steps.with_label_values(&[kind]).inc();
        self.record_placement(volume, &now).await
    }

    /// Records the replicas per sled of `placement` in the volume's record, if they changed.
    async fn record_placement(&self, volume: &str, now: &[Vec<SledId>]) -> Result<(), AdminError> {
        let per_sled: BTreeMap<SledId, u64> = placement::per_sled(now);
        let _lock = self.ops.lock().await;
        let st = self.state();
        let Some(v) = st.volumes.get(volume) else {
            return Ok(());
        };
        if v.sled_chunks == per_sled {
            return Ok(());
        }
        let mut v = v.clone();
        v.sled_chunks = per_sled;
        self.propose(MetaCmd::PutVolume(v)).await
    }

    /// [`GroupOp::Replicas`] on this node's member (the leader).
    pub(super) fn replicas_of(h: &GroupHandle) -> GroupReply {
        let st = h.status();
        match (st.serving, st.spec, st.store) {
            (true, Some(spec), Some(store)) => GroupReply::Replicas {
                placement: spec.placement.clone(),
                stale: store.stale().into_iter().collect(),
            },
            (false, ..) => GroupReply::NotLeader(st.leader.map(|l| l.0)),
            _ => GroupReply::Failed("the group has no volume".into()),
        }
    }

    /// [`GroupOp::AddReplicas`] on this node's member (the leader).
    pub(super) async fn add_replicas(h: &GroupHandle, adds: &[(u64, SledId)]) -> GroupReply {
        let Some(spec) = h.status().spec else {
            return GroupReply::Failed("the group has no volume".into());
        };
        let mut new = VolumeSpec::clone(&spec);
        for (c, sled) in adds {
            let Some(set) = new.placement.get_mut(*c as usize) else {
                return GroupReply::Failed(format!("the volume has no chunk {c}"));
            };
            if !set.contains(sled) {
                set.push(*sled);
            }
        }
        if new == *spec {
            return GroupReply::Ok;
        }
        match h.place(new).await {
            Ok(_) => GroupReply::Ok,
            Err(e) => super::agent::repl_reply(e),
        }
    }

    /// [`GroupOp::DropReplicas`] on this node's member (the leader): the placement without
    /// them, then frees on each sled what it holds of the chunks it lost. A sled that does not
    /// answer keeps its copies (nothing reads them; they are freed with its device).
    pub(super) async fn drop_replicas(h: &GroupHandle, drops: &[(u64, SledId)]) -> GroupReply {
        let st = h.status();
        let (Some(spec), Some(store)) = (st.spec, st.store) else {
            return GroupReply::Failed("the group has no volume".into());
        };
        let mut new = VolumeSpec::clone(&spec);
        for (c, sled) in drops {
            let Some(set) = new.placement.get_mut(*c as usize) else {
                return GroupReply::Failed(format!("the volume has no chunk {c}"));
            };
            set.retain(|s| s != sled);
        }
        if new != *spec
            && let Err(e) = h.place(new).await
        {
            return super::agent::repl_reply(e);
        }
        let mut by_sled: BTreeMap<SledId, Vec<u64>> = BTreeMap::new();
        for (c, sled) in drops {
            by_sled.entry(*sled).or_default().push(*c);
        }
        for (sled, chunks) in by_sled {
            match store.release(sled, &chunks).await {
                Ok(freed) => tracing::info!(volume_id = %spec.id, sled_id = %sled, freed,
                    "freed the chunks a drained sled no longer holds replicas of"),
                Err(e) => tracing::warn!(volume_id = %spec.id, sled_id = %sled, error = %e,
                    "cannot free the chunks a drained sled no longer holds replicas of; \
                     they stay allocated there, unread"),
            }
        }
        GroupReply::Ok
    }
}

/// What one drain step on a volume does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    /// Give these chunks a replica on one target sled.
    Add(Vec<(u64, SledId)>),
    /// Drop the draining sled from these chunks.
    Drop(Vec<(u64, SledId)>),
    /// Nothing to do now (replacements resynchronising, or no sled up to take one).
    Wait,
    /// Every sled that could take a replacement would, once recorded stale, leave a chunk
    /// without a current replica.
    Blocked,
}

/// The next step of draining `sled` from a volume whose placement is `now`, with `stale`
/// recorded stale, `up` the sleds up, `wanted` replicas per chunk, and `slots` the sleds that
/// may take replicas (up, not draining).
fn plan_step(
    sled: SledId,
    now: &[Vec<SledId>],
    stale: &BTreeSet<SledId>,
    up: &BTreeSet<SledId>,
    wanted: usize,
    slots: &mut [placement::SledSlot],
) -> Plan {
    let on_sled: Vec<usize> = (0..now.len()).filter(|c| now[*c].contains(&sled)).collect();
    let mut by_target: BTreeMap<SledId, Vec<u64>> = BTreeMap::new();
    for c in &on_sled {
        if now[*c].len() - 1 < wanted
            && let Some(to) = placement::replacement(slots, &now[*c])
        {
            by_target.entry(to).or_default().push(*c as u64);
        }
    }
    // One target sled per step: it is recorded stale for the whole volume until it is
    // resynchronised, so every chunk must keep a current replica besides it — one that is up
    // (a sled that died since the last write to it is not recorded stale yet), and not the
    // draining sled, which may be dead without anyone knowing yet.
    let serves = |s: &SledId| !stale.contains(s) && up.contains(s) && *s != sled;
    let safe = |to: &SledId| now.iter().all(|r| r.iter().any(|s| s != to && serves(s)));
    if !by_target.is_empty() {
        return by_target
            .into_iter()
            .filter(|(to, _)| safe(to))
            .max_by_key(|(_, chunks)| chunks.len())
            .map_or(Plan::Blocked, |(to, chunks)| {
                Plan::Add(chunks.into_iter().map(|c| (c, to)).collect())
            });
    }
    let drops: Vec<(u64, SledId)> = on_sled
        .iter()
        .filter(|c| {
            let others: Vec<&SledId> = now[**c].iter().filter(|s| **s != sled).collect();
            others.len() >= wanted && others.iter().all(|s| serves(s))
        })
        .map(|c| (*c as u64, sled))
        .collect();
    if drops.is_empty() {
        Plan::Wait
    } else {
        Plan::Drop(drops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ids::Uuid128;

    fn id(n: u128) -> SledId {
        Uuid128(n)
    }

    fn slots(ids: &[u128]) -> Vec<placement::SledSlot> {
        ids.iter()
            .map(|n| placement::SledSlot {
                id: id(*n),
                domain: None,
                chunks: 100,
                load: 0,
            })
            .collect()
    }

    fn set(ids: &[u128]) -> BTreeSet<SledId> {
        ids.iter().map(|n| id(*n)).collect()
    }

    /// Four sleds, three replicas: sled 1 dies (nobody recorded it stale) and is drained. At
    /// every step every chunk keeps a current replica; the drain ends with three replicas per
    /// chunk, none on sled 1.
    #[test]
    fn a_dead_sled_is_drained_without_ever_leaving_a_chunk_with_no_current_replica() {
        let mut now: Vec<Vec<SledId>> = [[1, 2, 3], [1, 2, 4], [1, 3, 4], [2, 3, 4]]
            .iter()
            .map(|r| r.iter().map(|n| id(*n)).collect())
            .collect();
        let up = set(&[2, 3, 4]);
        let mut stale = BTreeSet::new();
        let mut adds_seen = 0;
        for step in 0.. {
            assert!(step < 20, "the drain does not end: {now:?}");
            if !now.iter().any(|r| r.contains(&id(1))) {
                break;
            }
            match plan_step(id(1), &now, &stale, &up, 3, &mut slots(&[2, 3, 4])) {
                Plan::Add(adds) => {
                    let to = adds[0].1;
                    assert!(adds.iter().all(|(_, s)| *s == to), "one target: {adds:?}");
                    stale.insert(to);
                    for (c, s) in &adds {
                        now[*c as usize].push(*s);
                    }
                    for r in &now {
                        assert!(
                            r.iter().any(|s| *s != id(1) && !stale.contains(s)),
                            "{r:?} with {stale:?} stale"
                        );
                    }
                    adds_seen += adds.len();
                }
                Plan::Drop(drops) => {
                    for (c, s) in &drops {
                        assert!(
                            now[*c as usize]
                                .iter()
                                .all(|x| x == s || !stale.contains(x))
                        );
                        now[*c as usize].retain(|x| x != s);
                    }
                }
                // Waiting for resynchronisations: they finish.
                Plan::Wait | Plan::Blocked => {
                    assert!(
                        !stale.is_empty(),
                        "stuck with nothing resynchronising: {now:?}"
                    );
                    stale.clear();
                }
            }
        }
        assert_eq!(adds_seen, 3);
        for r in &now {
            assert_eq!(r.len(), 3, "{now:?}");
        }
    }

    #[test]
    fn a_sled_away_for_a_moment_makes_the_drain_wait_instead_of_dropping_a_replica() {
        let now = vec![vec![id(1), id(2), id(3)]];
        // Sled 4 (the only one that could take the replica) is down: no slot for it.
        let plan = plan_step(
            id(1),
            &now,
            &BTreeSet::new(),
            &set(&[1, 2, 3]),
            3,
            &mut slots(&[2, 3]),
        );
        assert_eq!(plan, Plan::Wait);
    }

    #[test]
    fn two_replicas_and_a_dead_sled_not_yet_stale_cannot_be_drained() {
        let now = vec![vec![id(1), id(2)], vec![id(1), id(3)]];
        let plan = plan_step(
            id(1),
            &now,
            &BTreeSet::new(),
            &set(&[2, 3]),
            2,
            &mut slots(&[2, 3]),
        );
        assert_eq!(plan, Plan::Blocked);
    }
}
