//! The seam between a group's state machine and its log, and an in-memory log.
//!
//! [`RaftLog`] is what the group core needs beyond `raft::Storage`: ways to change the log once
//! a write is durable. The WAL-backed log implements it for real; [`MemLog`] implements it in
//! memory for the deterministic simulation and unit tests.

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::sync::{Arc, RwLock};

/// A group's log, as the group core changes it.
pub trait RaftLog: raft::Storage + Clone + Send + Sync + 'static {
    /// Appends entries; entries at or after the first new index are replaced (Raft's conflict
    /// truncation).
    fn append(&self, ents: &[Entry]) -> raft::Result<()>;
    /// Replaces the hard state.
    fn set_hard_state(&self, hs: HardState);
    /// Records a commit index learned after the hard state was written.
    fn set_commit(&self, commit: u64);
    /// Replaces the membership.
    fn set_conf_state(&self, cs: ConfState);
    /// Says that `cs` is now in the log on disk (the simulation's crash keeps only that).
    fn conf_state_written(&self, _cs: &ConfState) {}
    /// Replaces the log with a snapshot (a follower catching up).
    fn apply_snapshot(&self, snap: Snapshot) -> raft::Result<()>;
    /// Stores `snap` (built by the app at an index it has applied) as the log's snapshot and
    /// drops the entries at or below its index.
    fn compact(&self, snap: Snapshot) -> raft::Result<()>;
}

#[derive(Debug, Default)]
struct Inner {
    hs: HardState,
    /// The commit index of the last hard state written (what a restart reads back; `hs.commit`
    /// may be ahead of it, as [`RaftLog::set_commit`] is not durable).
    durable_commit: u64,
    cs: ConfState,
    /// The membership last written (what a restart reads back).
    durable_cs: ConfState,
    snap: Snapshot,
    entries: Vec<Entry>,
}

impl Inner {
    fn first(&self) -> u64 {
        self.snap.get_metadata().index + 1
    }
    fn last(&self) -> u64 {
        self.snap.get_metadata().index + self.entries.len() as u64
    }
}

/// An in-memory log.
#[derive(Debug, Clone, Default)]
pub struct MemLog(Arc<RwLock<Inner>>);

impl MemLog {
    /// A log for a new group with these voters (every member starts from the same state).
    pub fn new(voters: &[u64]) -> Self {
        let log = Self::default();
        {
            let mut g = log.w();
            let cs = ConfState::from((voters.to_vec(), vec![]));
            g.snap.mut_metadata().set_conf_state(cs.clone());
            g.durable_cs = cs.clone();
            g.cs = cs;
        }
        log
    }

    fn w(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    fn r(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// What a process restarting from this log would read: everything written, but the commit
    /// index only as of the last hard state written (the simulation's crash).
    pub fn crash(&self) {
        let mut g = self.w();
        g.hs.commit = g.durable_commit;
        g.cs = g.durable_cs.clone();
    }

    /// The membership as of the last one written.
    pub fn durable_conf_state(&self) -> ConfState {
        self.r().durable_cs.clone()
    }

    /// The commit index as of the last hard state written.
    pub fn durable_commit(&self) -> u64 {
        self.r().durable_commit
    }

    /// Entries held (for tests).
    pub fn len(&self) -> usize {
        self.r().entries.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.r().entries.is_empty()
    }
}

impl raft::Storage for MemLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let g = self.r();
        Ok(RaftState {
            hard_state: g.hs.clone(),
            conf_state: g.cs.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _ctx: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let g = self.r();
        if low < g.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > g.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let off = g.first();
        let mut ents: Vec<Entry> = g.entries[(low - off) as usize..(high - off) as usize].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let g = self.r();
        let snap = g.snap.get_metadata();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < g.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > g.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(g.entries[(idx - g.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.r().first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.r().last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let g = self.r();
        if g.snap.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut s = g.snap.clone();
        s.mut_metadata().set_conf_state(g.cs.clone());
        Ok(s)
    }
}

impl RaftLog for MemLog {
    fn append(&self, ents: &[Entry]) -> raft::Result<()> {
        let Some(first_new) = ents.first().map(|e| e.index) else {
            return Ok(());
        };
        let mut g = self.w();
        if first_new < g.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if first_new > g.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let keep = (first_new - g.first()) as usize;
        g.entries.truncate(keep);
        g.entries.extend_from_slice(ents);
        Ok(())
    }

    fn set_hard_state(&self, hs: HardState) {
        let mut g = self.w();
        g.durable_commit = hs.commit;
        g.hs = hs;
    }

    fn set_commit(&self, commit: u64) {
        self.w().hs.commit = commit;
    }

    fn set_conf_state(&self, cs: ConfState) {
        self.w().cs = cs;
    }

    fn conf_state_written(&self, cs: &ConfState) {
        self.w().durable_cs = cs.clone();
    }

    fn apply_snapshot(&self, snap: Snapshot) -> raft::Result<()> {
        let mut g = self.w();
        let m = snap.get_metadata();
        if m.index < g.snap.get_metadata().index {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate));
        }
        g.hs.commit = g.hs.commit.max(m.index);
        g.durable_commit = g.durable_commit.max(m.index);
        g.hs.term = g.hs.term.max(m.term);
        g.cs = m.get_conf_state().clone();
        g.entries.clear();
        g.snap = snap;
        Ok(())
    }

    fn compact(&self, snap: Snapshot) -> raft::Result<()> {
        let mut g = self.w();
        let index = snap.get_metadata().index;
        if index <= g.snap.get_metadata().index {
            return Ok(());
        }
        if index > g.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let drop = (index - g.first() + 1) as usize;
        g.entries.drain(..drop);
        g.snap = snap;
        Ok(())
    }
}
