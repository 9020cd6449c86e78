//! Changing where a volume's chunks live (draining a sled): a new placement is proposed by the
//! driver itself, so that it is ordered against the stale and current-again marks the driver
//! proposes for resynchronisation.
//!
//! A sled given a chunk it does not hold must never be read for it before it has been copied
//! there: it would answer zeros. So every sled the new placement adds is recorded stale in the
//! entry right before the placement (its resynchronisation then copies what a current replica
//! holds and it lacks), and while the placement is proposed and not applied, no sled is
//! recorded current again — a pass that finished against the old placement would otherwise
//! mark a sled current right after the new one made it a replica of a chunk it lacks.

use super::{Driver, ReplError, group_error};
use crate::replication::entry::EntryHeader;
use crate::replication::memlog::RaftLog;
use crate::replication::transport::Transport;
use crate::volume::VolumeSpec;
use bytes::Bytes;
use common::ids::SledId;
use std::collections::BTreeSet;
use std::sync::Arc;

impl<L: RaftLog, T: Transport> Driver<L, T> {
    /// Proposes `spec` as the volume's new placement (leader, serving): the same volume, size
    /// and chunk size, chunks only gaining or losing replicas. The reply comes once it is
    /// applied here.
    pub(super) fn place(&mut self, spec: VolumeSpec, reply: super::ProposeReply) {
        match self.check_placement(&spec) {
            Ok(added) => {
                for sled in &added {
                    match self.propose_stale(*sled, true) {
                        Ok(index) => {
                            self.stale_pending.insert(*sled, index);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(group_error(e)));
                            return;
                        }
                    }
                }
                let tag = self.next_tag();
                let spec = Arc::new(spec);
                match self
                    .core
                    .propose(tag, &EntryHeader::Spec((*spec).clone()), Bytes::new())
                {
                    Ok(index) => {
                        tracing::info!(group = %self.group, index, added = ?added,
                            "proposing a new placement of the volume's chunks");
                        self.proposals.insert(tag, reply);
                        // A stale sled the placement no longer names is nothing to
                        // resynchronise (a drained sled that is away): recorded current, so
                        // the volume stops waiting for it.
                        let gone: Vec<SledId> = self
                            .core
                            .state
                            .stale
                            .iter()
                            .copied()
                            .filter(|s| !spec.placement.iter().any(|r| r.contains(s)))
                            .filter(|s| !self.fresh_pending.contains_key(s))
                            .collect();
                        self.placing = Some((index, spec));
                        for sled in gone {
                            if let Ok(i) = self.propose_stale(sled, false) {
                                self.fresh_pending.insert(sled, i);
                            }
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(group_error(e)));
                    }
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// The sleds `spec` adds to some chunk, or why it cannot be proposed now.
    fn check_placement(&self, spec: &VolumeSpec) -> Result<BTreeSet<SledId>, ReplError> {
        if self.serving.is_none() {
            return Err(self.not_leader());
        }
        let Some(old) = self.core.state.spec.as_ref() else {
            return Err(ReplError::NoVolume);
        };
        if spec.id != old.id
            || spec.size != old.size
            || spec.chunk_size != old.chunk_size
            || spec.placement.len() != old.placement.len()
        {
            return Err(ReplError::Failed(
                "a new placement must describe the same volume, size and chunks".into(),
            ));
        }
        if self.placing_pending() {
            return Err(ReplError::Failed(
                "another placement change is not applied yet; retry".into(),
            ));
        }
        let mut added = BTreeSet::new();
        for (new, old) in spec.placement.iter().zip(&old.placement) {
            added.extend(new.iter().filter(|s| !old.contains(s)).copied());
        }
        let unsettled = |s: &SledId| {
            self.core.state.stale.contains(s)
                || self.stale_pending.contains_key(s)
                || self.fresh_pending.contains_key(s)
        };
        if let Some(s) = added.iter().find(|s| unsettled(s)) {
            return Err(ReplError::Failed(format!(
                "sled {s} is stale for this volume (or about to change): it takes new replicas \
                 once it is current; retry"
            )));
        }
        for (c, set) in spec.placement.iter().enumerate() {
            let mut seen = BTreeSet::new();
            if set.is_empty() || !set.iter().all(|s| seen.insert(*s)) {
                return Err(ReplError::Failed(format!(
                    "chunk {c} would have no replica, or one sled twice"
                )));
            }
            if !set.iter().any(|s| !unsettled(s) && !added.contains(s)) {
                return Err(ReplError::Failed(format!(
                    "chunk {c} would have no current replica"
                )));
            }
        }
        Ok(added)
    }

    /// A placement is proposed and not applied yet.
    pub(super) fn placing_pending(&self) -> bool {
        self.placing
            .as_ref()
            .is_some_and(|(i, _)| *i > self.core.applied())
    }

    /// True when recording `sled` stale would leave a chunk of the applied placement, or of
    /// the one proposed, without a current replica (`out`: the sleds that would be stale).
    pub(super) fn last_current(&self, sled: SledId, out: &BTreeSet<SledId>) -> bool {
        let applied = self.store.as_ref().map(|s| s.spec());
        let pending = self
            .placing
            .as_ref()
            .filter(|_| self.placing_pending())
            .map(|(_, s)| s.clone());
        [applied, pending].into_iter().flatten().any(|spec| {
            spec.placement
                .iter()
                .any(|r| r.contains(&sled) && r.iter().all(|s| out.contains(s)))
        })
    }
}
