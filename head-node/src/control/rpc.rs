//! Calls between head nodes for the control plane, carried by the peer transport next to the
//! forwarded volume I/O: operations on a group sent to one of its members, and the heartbeat
//! every node sends to the metadata leader. Append-only (postcard on the wire).

use crate::volume::VolumeSpec;
use common::ids::SledId;
use common::throttle::QosConfig;
use serde::{Deserialize, Serialize};

/// An operation on a group, run by the member that receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupOp {
    /// How the group looks from that member.
    Probe,
    /// Give the group its volume (leader): the description and QoS, unless it has them.
    Bind {
        /// Description.
        spec: VolumeSpec,
        /// QoS.
        qos: QosConfig,
    },
    /// Grow the volume to `size`, with the placement of the new chunks (leader).
    Grow {
        /// New size.
        size: u64,
        /// Placement of the chunks beyond the current ones.
        extra: Vec<Vec<SledId>>,
    },
    /// New QoS limits (leader).
    SetQos(QosConfig),
    /// Add `node` as a learner (leader).
    AddLearner(u64),
    /// Make learner `node` a voter (leader).
    Promote(u64),
    /// Remove `node` (leader).
    Remove(u64),
    /// Close the volume's export on this member: no new connections; those open finish
    /// what they have in flight and disconnect.
    CloseExport,
    /// Wait until everything committed so far is on the sleds (leader).
    Flush,
    /// Trim the whole volume so the sleds free its chunks, and wait until it is on the
    /// sleds (leader).
    Destroy,
    /// The volume's chunk placement and its stale sleds (leader).
    Replicas,
    /// Give chunks one more replica each, `(chunk, sled)`: the sleds are recorded stale first
    /// and resynchronised, then serve like the others (leader). Part of draining a sled.
    AddReplicas(Vec<(u64, SledId)>),
    /// Take replicas away from chunks, `(chunk, sled)`, once every other replica of each is
    /// current; the sled's copies are freed once the change is on the sleds (leader). Part
    /// of draining a sled.
    DropReplicas(Vec<(u64, SledId)>),
}

/// How a group looks from one member.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupProbe {
    /// That member's role.
    pub role: String,
    /// Term.
    pub term: u64,
    /// Known leader.
    pub leader: Option<u64>,
    /// This member serves I/O (leader with its sleds claimed).
    pub serving: bool,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// On the leader: each member's matched index.
    pub progress: Vec<(u64, u64)>,
    /// Committed index.
    pub committed: u64,
    /// Applied index.
    pub applied: u64,
    /// Flushed index.
    pub flushed: u64,
    /// The volume bound to the group, if any.
    pub volume: Option<String>,
    /// Volume size.
    pub size: u64,
    /// This member exports the volume over NBD.
    pub exported: bool,
}

/// The answer to a [`GroupOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupReply {
    /// Done.
    Ok,
    /// The probe.
    Probe(GroupProbe),
    /// This member does not run the group.
    NoGroup,
    /// Only the leader does that; here is who it is, if known.
    NotLeader(Option<u64>),
    /// Failed.
    Failed(String),
    /// Done on every current replica; these sleds are recorded stale and get it when they
    /// are resynchronised (their return). Only `Destroy` answers this.
    Stale(Vec<SledId>),
    /// The answer to [`GroupOp::Replicas`].
    Replicas {
        /// For each chunk, the sleds holding its replicas.
        placement: Vec<Vec<SledId>>,
        /// Sleds recorded stale for the volume.
        stale: Vec<SledId>,
    },
}
