//! Replication of volumes among head nodes with Raft (raft-rs `RawNode`, one group per volume,
//! many groups per node).
//!
//! * [`GroupId`] — a Raft group's identity (independent of the volume it serves, so groups can
//!   be created ahead of volumes and bound later).

pub mod driver;
pub mod entry;
pub mod group;
pub mod log;
pub mod memlog;
pub mod node;
pub mod overlay;
pub mod peer_proto;
pub mod rvolume;
pub mod slog_bridge;
pub mod throttle;

#[cfg(test)]
mod sim;
pub mod transport;
pub mod wal;
pub mod walpersist;

use serde::{Deserialize, Serialize};
use std::fmt;

/// A Raft group. Random 128-bit, never reused.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct GroupId(pub u128);

impl GroupId {
    /// The metadata group (the control plane), on every head node.
    pub const META: GroupId = GroupId(0x6d65_7461);

    /// A fresh random id.
    pub fn random() -> Self {
        Self(common::ids::VolumeId::random().0)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GroupId({self})")
    }
}
