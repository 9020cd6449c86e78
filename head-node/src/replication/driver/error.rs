//! The errors group operations give their callers.

use super::GroupError;
use crate::volume::session::ClientSession;
use common::ids::NodeId;

/// Errors of group operations, as callers see them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplError {
    /// This node does not serve the volume now; `leader` does, if known.
    #[error("not the serving leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, if known.
        leader: Option<NodeId>,
    },
    /// The group task has stopped.
    #[error("the group is stopped")]
    Stopped,
    /// The volume has no description yet.
    #[error("the volume is not created yet")]
    NoVolume,
    /// A sled error while serving.
    #[error("{0}")]
    Store(String),
    /// The sleds are out of space.
    #[error("no space left on the sleds")]
    NoSpace,
    /// The group failed.
    #[error("{0}")]
    Failed(String),
    /// The proposal was made for a client connection the client has replaced.
    #[error("{0} has ended: the client connected again since")]
    SessionEnded(ClientSession),
}

impl ReplError {
    /// True when retrying (possibly on another node) may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, ReplError::NotLeader { .. } | ReplError::NoVolume)
    }
}

/// A group core's error as the group's callers see it.
pub(super) fn group_error(e: GroupError) -> ReplError {
    match e {
        GroupError::NotLeader { leader } => ReplError::NotLeader { leader },
        GroupError::SessionEnded(s) => ReplError::SessionEnded(s),
        other => ReplError::Failed(other.to_string()),
    }
}
