//! The cluster state as the admin API shows it.

use super::state::{ClusterState, GroupRecord, Phase, VolumeRecord};
use common::admin::{Attachment, DeviceInfo, NodeInfo, SledInfo, VolumeInfo};
use common::ids::SledId;
use std::collections::{BTreeSet, HashMap};

/// What the leader knows beyond the replicated state.
#[derive(Debug, Default)]
pub struct Observed {
    /// Group leaders reported by heartbeats.
    pub leaders: HashMap<crate::replication::GroupId, u64>,
    /// Head nodes up.
    pub nodes_up: BTreeSet<u64>,
    /// Sleds up.
    pub sleds_up: BTreeSet<SledId>,
    /// Seconds since each node's last heartbeat.
    pub last_seen: HashMap<u64, u64>,
    /// Chunks allocated per device.
    pub allocated: HashMap<common::ids::DeviceId, u64>,
    /// The metadata leader.
    pub meta_leader: u64,
}

/// The phase as text.
pub fn phase(v: &VolumeRecord, g: Option<&GroupRecord>) -> &'static str {
    match v.phase {
        Phase::Creating => "creating",
        Phase::Deleting => "deleting",
        Phase::Serving if g.is_some_and(GroupRecord::growing) => "growing",
        Phase::Serving => "ready",
    }
}

/// The node whose NBD address clients should use: the group's leader if known and a
/// member, else its first member.
pub fn preferred_node(g: &GroupRecord, obs: &Observed) -> Option<u64> {
    obs.leaders
        .get(&g.id)
        .copied()
        .filter(|l| g.members.contains(l))
        .or_else(|| g.members.first().copied())
}

/// A volume.
pub fn volume(st: &ClusterState, v: &VolumeRecord, obs: &Observed) -> VolumeInfo {
    let g = st.groups.get(&v.group);
    let endpoints = g
        .map(|g| {
            g.members
                .iter()
                .filter_map(|m| st.nodes.get(m).map(|n| n.nbd))
                .collect()
        })
        .unwrap_or_default();
    let uri = (!v.attachments.is_empty())
        .then(|| {
            let n = g.and_then(|g| preferred_node(g, obs))?;
            let addr = st.nodes.get(&n)?.nbd;
            Some(format!("nbd://{addr}/{}", v.name))
        })
        .flatten();
    VolumeInfo {
        name: v.name.clone(),
        id: v.id.to_string(),
        size: v.size,
        state: phase(v, g).into(),
        qos: v.qos,
        chunk_size: v.chunk_size,
        replicas: v.replicas as usize,
        chunks: v.size.div_ceil(v.chunk_size.max(1)),
        group: v.group.to_string(),
        members: g.map(|g| g.members.clone()).unwrap_or_default(),
        target_members: g.map(|g| g.target.clone()).unwrap_or_default(),
        leader: obs.leaders.get(&v.group).copied(),
        attachments: v
            .attachments
            .iter()
            .map(|a| Attachment {
                id: a.id,
                shared: a.shared,
                client: a.client.clone(),
                since: a.since,
            })
            .collect(),
        uri,
        endpoints,
        created: v.created,
    }
}

/// Every head node.
pub fn nodes(
    st: &ClusterState,
    obs: &Observed,
    capacity_of: &dyn Fn(u64) -> Option<u64>,
) -> Vec<NodeInfo> {
    let groups = st.node_groups();
    let baselines = st.node_baselines();
    st.nodes
        .values()
        .map(|n| NodeInfo {
            id: n.id,
            nbd: n.nbd,
            admin: n.admin,
            peer: n.peer,
            domain: n.domain.clone(),
            state: if obs.nodes_up.contains(&n.id) {
                "up"
            } else {
                "down"
            }
            .into(),
            last_seen_secs: obs.last_seen.get(&n.id).copied(),
            groups: groups.get(&n.id).copied().unwrap_or(0),
            baseline_iops: baselines.get(&n.id).copied().unwrap_or(0),
            capacity_iops: capacity_of(n.id).or(n.capacity_iops),
            meta_leader: n.id == obs.meta_leader,
        })
        .collect()
}

/// Every sled.
pub fn sleds(st: &ClusterState, obs: &Observed) -> Vec<SledInfo> {
    let load = st.sled_load();
    st.sleds
        .values()
        .map(|s| {
            let chunk = s.chunk_size().unwrap_or(0);
            SledInfo {
                id: s.id.to_string(),
                addr: s.addr,
                domain: s.domain.clone(),
                state: if obs.sleds_up.contains(&s.id) {
                    "up"
                } else {
                    "down"
                }
                .into(),
                devices: s
                    .devices
                    .iter()
                    .map(|d| DeviceInfo {
                        id: d.id.to_string(),
                        capacity: d.chunks * d.chunk_size,
                        chunk_size: d.chunk_size,
                        allocated_chunks: obs.allocated.get(&d.id).copied().unwrap_or(0),
                    })
                    .collect(),
                provisioned: load.get(&s.id).copied().unwrap_or(0) * chunk,
                draining: st.draining.contains(&s.id),
            }
        })
        .collect()
}
