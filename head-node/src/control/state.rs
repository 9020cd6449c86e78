//! The cluster's truth, as the metadata Raft group replicates it: head nodes, sleds, Raft
//! groups (ready in the pool, or bound to a volume), volumes, settings and the credential key
//! version.
//!
//! Every command is an absolute put or remove, so its effect does not depend on what came
//! before it beyond the key it names; the metadata group snapshots exactly at its applied index
//! (never replays entries over a later state). Checks (duplicate names, capacity, exclusivity)
//! happen on the metadata leader before it proposes, under one lock, so commands in the log
//! are always valid.

use crate::replication::GroupId;
use common::ids::{DeviceId, SledId, VolumeId};
use common::throttle::QosConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// A head node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id.
    pub id: u64,
    /// NBD address.
    pub nbd: SocketAddr,
    /// Admin and metrics address.
    pub admin: SocketAddr,
    /// Peer address.
    pub peer: SocketAddr,
    /// Failure domain.
    pub domain: Option<String>,
    /// Throttling capacity in ops per second (`None`: unlimited).
    pub capacity_iops: Option<u64>,
}

/// A device of a sled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Device id.
    pub id: DeviceId,
    /// Chunks it holds.
    pub chunks: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
}

/// A sled controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SledRecord {
    /// Sled id.
    pub id: SledId,
    /// Address.
    pub addr: SocketAddr,
    /// Failure domain.
    pub domain: Option<String>,
    /// Devices.
    pub devices: Vec<DeviceRecord>,
}

impl SledRecord {
    /// The record of a sled from its own description (`Stat`): its id and devices.
    pub fn described(
        stat: &common::sled_proto::SledStat,
        addr: SocketAddr,
        domain: Option<String>,
    ) -> Self {
        Self {
            id: stat.sled,
            addr,
            domain,
            devices: stat
                .devices
                .iter()
                .map(|d| DeviceRecord {
                    id: d.device,
                    chunks: d.chunks_total,
                    chunk_size: d.chunk_size,
                })
                .collect(),
        }
    }

    /// Usable bytes.
    pub fn capacity(&self) -> u64 {
        self.devices.iter().map(|d| d.chunks * d.chunk_size).sum()
    }

    /// Chunk size of its first device (sleds of one cluster share a chunk size).
    pub fn chunk_size(&self) -> Option<u64> {
        self.devices.first().map(|d| d.chunk_size)
    }
}

/// A Raft group other than the metadata group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The group.
    pub id: GroupId,
    /// The members it was created with (they start its log with this membership; nodes added
    /// later start empty and catch up from the leader).
    pub founders: Vec<u64>,
    /// Its voters, as the control plane last changed them.
    pub members: Vec<u64>,
    /// A node being added (a learner catching up), which must run the group too.
    pub joining: Option<u64>,
    /// The members it should have.
    pub target: Vec<u64>,
    /// The volume it serves; `None` while in the pool.
    pub volume: Option<String>,
    /// A pool group that passed validation.
    pub ready: bool,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

impl GroupRecord {
    /// Nodes that must run the group.
    pub fn runners(&self) -> impl Iterator<Item = u64> + '_ {
        self.members.iter().copied().chain(self.joining)
    }

    /// True while members are missing.
    pub fn growing(&self) -> bool {
        self.target.iter().any(|t| !self.members.contains(t))
    }
}

/// Where a volume is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Recorded; its group is being given its description.
    Creating,
    /// Serving.
    Serving,
    /// Being deleted.
    Deleting,
}

/// An attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    /// Id within the volume.
    pub id: u64,
    /// Shared.
    pub shared: bool,
    /// Who.
    pub client: Option<String>,
    /// When (seconds since the epoch).
    pub since: u64,
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Name.
    pub name: String,
    /// Id.
    pub id: VolumeId,
    /// Size in bytes.
    pub size: u64,
    /// QoS limits.
    pub qos: QosConfig,
    /// Its Raft group.
    pub group: GroupId,
    /// Chunk size.
    pub chunk_size: u64,
    /// Replicas per chunk.
    pub replicas: u32,
    /// Chunk replicas placed on each sled (the placement itself lives in the volume's group).
    pub sled_chunks: BTreeMap<SledId, u64>,
    /// Attachments.
    pub attachments: Vec<AttachmentRecord>,
    /// Phase.
    pub phase: Phase,
    /// Its group came from the pool.
    pub from_pool: bool,
    /// Creation time (seconds since the epoch).
    pub created: u64,
}

impl VolumeRecord {
    /// Bytes provisioned on the sleds (size × replicas).
    pub fn provisioned(&self) -> u64 {
        self.sled_chunks.values().sum::<u64>() * self.chunk_size
    }
}

/// Cluster-wide settings (from the metadata leader's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Replicas per chunk.
    pub replicas: u32,
    /// Head nodes per volume group.
    pub group_size: u32,
    /// Ready groups kept in the pool.
    pub pool_target: u32,
    /// Provisioned bytes may reach total capacity × this / 1000.
    pub overcommit_permille: u32,
    /// QoS of volumes created without one.
    pub default_qos: QosConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            replicas: 3,
            group_size: 3,
            pool_target: 2,
            overcommit_permille: 2000,
            default_qos: QosConfig::UNLIMITED,
        }
    }
}

/// A change of the cluster state. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCmd {
    /// Adds or replaces a head node.
    PutNode(NodeRecord),
    /// Adds or replaces a sled.
    PutSled(SledRecord),
    /// Adds or replaces a group.
    PutGroup(GroupRecord),
    /// Removes a group.
    RemoveGroup(GroupId),
    /// Adds or replaces a volume.
    PutVolume(VolumeRecord),
    /// Removes a volume.
    RemoveVolume(String),
    /// Replaces the settings.
    Settings(Settings),
    /// Sets the credential key version.
    KeyVersion(u32),
    /// Several changes at once.
    Batch(Vec<MetaCmd>),
    /// Starts (`drain`) or stops draining a sled: no new replica is placed on it, and the
    /// metadata leader moves the replicas it holds to other sleds. An older head node cannot
    /// read this kind.
    DrainSled {
        /// The sled.
        sled: SledId,
        /// Draining (true) or not any more (false).
        drain: bool,
    },
    /// Forgets a drained sled that is gone. An older head node cannot read this kind.
    RemoveSled(SledId),
}

/// The cluster state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Head nodes by id.
    pub nodes: BTreeMap<u64, NodeRecord>,
    /// Sleds by id.
    pub sleds: BTreeMap<SledId, SledRecord>,
    /// Groups by id.
    pub groups: BTreeMap<GroupId, GroupRecord>,
    /// Volumes by name.
    pub volumes: BTreeMap<String, VolumeRecord>,
    /// Settings.
    pub settings: Settings,
    /// Credential key version.
    pub key_version: u32,
    /// Sleds being drained (see [`MetaCmd::DrainSled`]).
    pub draining: BTreeSet<SledId>,
}

/// The cluster state as snapshots of format version 3 and older hold it (before draining).
#[derive(Deserialize)]
pub(crate) struct ClusterStateV1 {
    nodes: BTreeMap<u64, NodeRecord>,
    sleds: BTreeMap<SledId, SledRecord>,
    groups: BTreeMap<GroupId, GroupRecord>,
    volumes: BTreeMap<String, VolumeRecord>,
    settings: Settings,
    key_version: u32,
}

impl From<ClusterStateV1> for ClusterState {
    fn from(old: ClusterStateV1) -> Self {
        Self {
            nodes: old.nodes,
            sleds: old.sleds,
            groups: old.groups,
            volumes: old.volumes,
            settings: old.settings,
            key_version: old.key_version,
            draining: BTreeSet::new(),
        }
    }
}

impl ClusterState {
    /// Applies a command.
    pub fn apply(&mut self, cmd: &MetaCmd) {
        match cmd {
            MetaCmd::PutNode(n) => {
                self.nodes.insert(n.id, n.clone());
            }
            MetaCmd::PutSled(s) => {
                self.sleds.insert(s.id, s.clone());
            }
            MetaCmd::PutGroup(g) => {
                self.groups.insert(g.id, g.clone());
            }
            MetaCmd::RemoveGroup(g) => {
                self.groups.remove(g);
            }
            MetaCmd::PutVolume(v) => {
                self.volumes.insert(v.name.clone(), v.clone());
            }
            MetaCmd::RemoveVolume(name) => {
                self.volumes.remove(name);
            }
            MetaCmd::Settings(s) => self.settings = s.clone(),
            MetaCmd::KeyVersion(v) => self.key_version = *v,
            MetaCmd::Batch(cmds) => {
                for c in cmds {
                    self.apply(c);
                }
            }
            MetaCmd::RemoveSled(sled) => {
                self.sleds.remove(sled);
                self.draining.remove(sled);
            }
            MetaCmd::DrainSled { sled, drain } => {
                if *drain {
                    self.draining.insert(*sled);
                } else {
                    self.draining.remove(sled);
                }
            }
        }
    }

    /// Total usable bytes of the sleds.
    pub fn capacity(&self) -> u64 {
        self.sleds.values().map(SledRecord::capacity).sum()
    }

    /// Provisioned bytes (sizes × replicas).
    pub fn provisioned(&self) -> u64 {
        self.volumes.values().map(VolumeRecord::provisioned).sum()
    }

    /// Chunk replicas placed on each sled.
    pub fn sled_load(&self) -> BTreeMap<SledId, u64> {
        let mut m = BTreeMap::new();
        for v in self.volumes.values() {
            for (s, n) in &v.sled_chunks {
                *m.entry(*s).or_insert(0) += n;
            }
        }
        m
    }

    /// Groups each node runs (as member or joiner).
    pub fn node_groups(&self) -> BTreeMap<u64, usize> {
        let mut m: BTreeMap<u64, usize> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for g in self.groups.values() {
            for n in g.runners() {
                *m.entry(n).or_insert(0) += 1;
            }
        }
        m
    }

    /// Groups each node started (is the first founder of: it runs their first election).
    pub fn node_starts(&self) -> BTreeMap<u64, usize> {
        let mut m: BTreeMap<u64, usize> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for g in self.groups.values() {
            if let Some(n) = g.founders.first() {
                *m.entry(*n).or_insert(0) += 1;
            }
        }
        m
    }

    /// Sum of the baselines of the volumes whose group each node belongs to (or will).
    pub fn node_baselines(&self) -> BTreeMap<u64, u64> {
        let mut m: BTreeMap<u64, u64> = self.nodes.keys().map(|n| (*n, 0)).collect();
        for v in self.volumes.values() {
            let Some(g) = self.groups.get(&v.group) else {
                continue;
            };
            let b = v.qos.iops.unwrap_or(0);
            let mut nodes: Vec<u64> = g.target.iter().copied().chain(g.runners()).collect();
            nodes.sort_unstable();
            nodes.dedup();
            for n in nodes {
                let e = m.entry(n).or_insert(0);
                *e = e.saturating_add(b);
            }
        }
        m
    }

    /// The pool groups: `(ready, pending)`.
    pub fn pool(&self) -> (Vec<&GroupRecord>, Vec<&GroupRecord>) {
        self.groups
            .values()
            .filter(|g| g.volume.is_none())
            .partition(|g| g.ready)
    }

    /// The volume bound to a group.
    pub fn volume_of(&self, group: GroupId) -> Option<&VolumeRecord> {
        let name = self.groups.get(&group)?.volume.as_ref()?;
        self.volumes.get(name).filter(|v| v.group == group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(id: u128, members: &[u64], volume: Option<&str>) -> GroupRecord {
        GroupRecord {
            id: GroupId(id),
            founders: members.to_vec(),
            members: members.to_vec(),
            joining: None,
            target: members.to_vec(),
            volume: volume.map(str::to_string),
            ready: false,
            created: 0,
        }
    }

    fn volume(name: &str, g: u128, iops: Option<u64>) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            id: VolumeId(g),
            size: 1 << 30,
            qos: QosConfig {
                iops,
                ..QosConfig::UNLIMITED
            },
            group: GroupId(g),
            chunk_size: 1 << 20,
            replicas: 3,
            sled_chunks: [(common::ids::Uuid128(1), 1024)].into(),
            attachments: vec![],
            phase: Phase::Serving,
            from_pool: false,
            created: 0,
        }
    }

    #[test]
    fn commands_are_absolute() {
        let mut s = ClusterState::default();
        let cmds = [
            MetaCmd::PutGroup(group(1, &[1, 2, 3], None)),
            MetaCmd::Batch(vec![
                MetaCmd::PutGroup(group(1, &[1, 2, 3], Some("a"))),
                MetaCmd::PutVolume(volume("a", 1, Some(100))),
            ]),
            MetaCmd::PutGroup(group(2, &[2], None)),
        ];
        for c in &cmds {
            s.apply(c);
        }
        let once = s.clone();
        // Applying the same puts again changes nothing.
        for c in &cmds[1..] {
            s.apply(c);
        }
        assert_eq!(s, once);
        assert_eq!(s.volume_of(GroupId(1)).map(|v| v.name.as_str()), Some("a"));
        let (ready, pending) = s.pool();
        assert!(ready.is_empty());
        assert_eq!(pending.len(), 1);
        assert_eq!(s.provisioned(), 1 << 30);
        assert_eq!(s.node_baselines().get(&2), Some(&100));
        assert_eq!(s.node_groups().get(&2), Some(&2));
        s.apply(&MetaCmd::Batch(vec![
            MetaCmd::RemoveVolume("a".into()),
            MetaCmd::RemoveGroup(GroupId(1)),
        ]));
        assert!(s.volumes.is_empty());
        assert_eq!(s.groups.len(), 1);
    }

    #[test]
    fn encodes_with_postcard() {
        let mut s = ClusterState::default();
        s.apply(&MetaCmd::PutVolume(volume("a", 1, None)));
        s.apply(&MetaCmd::PutNode(NodeRecord {
            id: 1,
            nbd: "127.0.0.1:1".parse().unwrap(),
            admin: "127.0.0.1:2".parse().unwrap(),
            peer: "127.0.0.1:3".parse().unwrap(),
            domain: Some("rack-a".into()),
            capacity_iops: None,
        }));
        let b = postcard::to_stdvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<ClusterState>(&b).unwrap(), s);
    }
}
