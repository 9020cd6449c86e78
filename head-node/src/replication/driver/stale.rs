//! Recording sleds stale for the volume and current again, and starting their
//! resynchronisation (leader).

use super::{Driver, GroupError, Input};
use crate::replication::entry::EntryHeader;
use crate::replication::memlog::RaftLog;
use crate::replication::transport::Transport;
use bytes::Bytes;
use common::ids::SledId;
use std::collections::BTreeSet;

impl<L: RaftLog, T: Transport> Driver<L, T> {
    /// Records `sled` stale for the volume (leader only), unless it already is or it is the
    /// last current replica of some chunk: writes then wait for it instead.
    pub(super) fn mark_stale(&mut self, sled: SledId, why: &str) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let stale = &self.core.state.stale;
        if stale.contains(&sled) && !self.fresh_pending.contains_key(&sled) {
            // Stale already: a resynchronisation that was sending it writes is over.
            store.abort_resync(sled);
            return;
        }
        if self.stale_pending.contains_key(&sled) {
            return;
        }
        let out: BTreeSet<SledId> = stale
            .iter()
            .chain(self.stale_pending.keys())
            .copied()
            .filter(|s| !self.fresh_pending.contains_key(s))
            .chain([sled])
            .collect();
        if self.last_current(sled, &out) {
            tracing::error!(group = %self.group, sled_id = %sled, reason = why,
                "the last current replica of a chunk is failing; writes wait for it");
            return;
        }
        match self.propose_stale(sled, true) {
            Ok(index) => {
                // The resynchronisation's progress is kept: a sled whose current-again mark is
                // still pending must go on failing writes (they retry) until this mark is
                // applied, or it would be current for a moment without them.
                tracing::warn!(group = %self.group, sled_id = %sled, reason = why,
                    "recording a sled stale for the volume; writes go on without it");
                self.stale_pending.insert(sled, index);
            }
            Err(e) => {
                tracing::warn!(group = %self.group, sled_id = %sled, error = %e,
                    "cannot record a sled stale");
            }
        }
    }

    /// Proposes recording `sled` stale (with what it is known to hold: every write up to the
    /// flushed index, which every current sled had flushed) or current again; returns the
    /// entry's log index.
    pub(super) fn propose_stale(&mut self, sled: SledId, stale: bool) -> Result<u64, GroupError> {
        let tag = self.next_tag();
        let header = if stale {
            EntryHeader::SledStaleSince {
                sled,
                since: self.core.state.flushed,
            }
        } else {
            EntryHeader::SledStale { sled, stale }
        };
        self.core.propose(tag, &header, Bytes::new())
    }

    /// Starts resynchronising one stale sled when none is and the last attempt is old enough.
    pub(super) fn maybe_resync(&mut self) {
        let (Some(term), Some(store), None) = (self.serving, self.store.clone(), self.resyncing)
        else {
            return;
        };
        if tokio::time::Instant::now() < self.resync_after {
            return;
        }
        let candidates: Vec<SledId> = self
            .core
            .state
            .stale
            .iter()
            .copied()
            .filter(|s| !self.fresh_pending.contains_key(s))
            .collect();
        // Round robin: the first after the one started last, else the first.
        let Some(sled) = candidates
            .iter()
            .copied()
            .find(|s| self.resync_last.is_some_and(|last| *s > last))
            .or_else(|| candidates.first().copied())
        else {
            return;
        };
        self.resyncing = Some(sled);
        self.resync_last = Some(sled);
        // What it missed, by the replicated record (`None`: unknown, so everything).
        let missed = self.core.state.missed_chunks(sled);
        let epoch = store.epoch();
        let tx = self.tx.clone();
        let task = tokio::spawn(async move {
            let result = store.resync(sled, missed, epoch).await;
            let _ = tx.send(Input::Resynced { term, sled, result }).await;
        });
        self.resync_task = Some(task.abort_handle());
    }
}
