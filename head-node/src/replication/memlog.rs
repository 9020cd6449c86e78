//! The seam between a group's state machine and its log, and an in-memory log.
//!
//! [`RaftLog`] is what the group core needs beyond `raft::Storage`: ways to change the log in
//! memory as soon as a write is handed to the durable log (raft-rs reads it from there while the
//! write is still being made durable), and to learn when it is. The WAL-backed log implements it
//! for real; [`MemLog`] implements it in memory for the deterministic simulation and unit tests,
//! where a crash keeps only what was made durable.

use super::group::LogWrite;
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
    /// Says that `write`, already applied in memory, is now durable (the simulation's crash
    /// keeps only such writes). Writes become durable in the order they were applied.
    fn made_durable(&self, _write: &LogWrite) {}
    /// Replaces the log with a snapshot (a follower catching up).
    fn apply_snapshot(&self, snap: Snapshot) -> raft::Result<()>;
    /// Stores `snap` (built by the app at an index it has applied) as the log's snapshot and
    /// drops the entries at or below its index.
    fn compact(&self, snap: Snapshot) -> raft::Result<()>;
}

#[derive(Debug, Default, Clone)]
struct Log {
    hs: HardState,
    cs: ConfState,
    snap: Snapshot,
    entries: Vec<Entry>,
}

/// The log as raft-rs reads it, and the log a restart would read back.
#[derive(Debug, Default)]
struct Inner {
    live: Log,
    /// Only the writes made durable, in order: `hs.commit` may be behind the live one (a
    /// commit index set on its own, [`RaftLog::set_commit`], is never durable).
    durable: Log,
}

impl Log {
    fn first(&self) -> u64 {
        self.snap.get_metadata().index + 1
    }
    fn last(&self) -> u64 {
        self.snap.get_metadata().index + self.entries.len() as u64
    }

    fn append(&mut self, ents: &[Entry]) -> raft::Result<()> {
        let Some(first_new) = ents.first().map(|e| e.index) else {
            return Ok(());
        };
        if first_new < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if first_new > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let keep = (first_new - self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
        Ok(())
    }

    fn apply_snapshot(&mut self, snap: Snapshot) -> raft::Result<()> {
        let m = snap.get_metadata();
        if m.index < self.snap.get_metadata().index {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate));
        }
        self.hs.commit = self.hs.commit.max(m.index);
        self.hs.term = self.hs.term.max(m.term);
        self.cs = m.get_conf_state().clone();
        self.entries.clear();
        self.snap = snap;
        Ok(())
    }

    fn compact(&mut self, snap: Snapshot) -> raft::Result<()> {
        let index = snap.get_metadata().index;
        // As the WAL does: storing the snapshot in place again is fine, going back is not.
        if index < self.snap.get_metadata().index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index == self.snap.get_metadata().index {
            self.snap = snap;
            return Ok(());
        }
        if index > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let drop = (index - self.first() + 1) as usize;
        self.entries.drain(..drop);
        self.snap = snap;
        Ok(())
    }

    /// A whole write, in the order the group core applies it.
    fn apply(&mut self, w: &LogWrite) -> raft::Result<()> {
        if let Some(s) = &w.snapshot {
            self.apply_snapshot(s.clone())?;
        }
        self.append(&w.entries)?;
        if let Some(hs) = &w.hard_state {
            self.hs = hs.clone();
        }
        if let Some(cs) = &w.conf_state {
            self.cs = cs.clone();
        }
        if let Some(s) = &w.compact {
            self.compact(s.clone())?;
        }
        Ok(())
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
            g.live.snap.mut_metadata().set_conf_state(cs.clone());
            g.live.cs = cs;
            g.durable = g.live.clone();
        }
        log
    }

    fn w(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    fn r(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// What a process restarting from this log would read: the writes made durable, with the
    /// commit index only as of the last hard state written (the simulation's crash).
    pub fn crash(&self) {
        let mut g = self.w();
        g.live = g.durable.clone();
    }

    /// The membership as of the last one written.
    pub fn durable_conf_state(&self) -> ConfState {
        self.r().durable.cs.clone()
    }

    /// The commit index as of the last hard state written.
    pub fn durable_commit(&self) -> u64 {
        self.r().durable.hs.commit
    }

    /// Entries held (for tests).
    pub fn len(&self) -> usize {
        self.r().live.entries.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.r().live.entries.is_empty()
    }
}

impl raft::Storage for MemLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let guard = self.r();
        let g = &guard.live;
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
        let guard = self.r();
        let g = &guard.live;
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
        let guard = self.r();
        let g = &guard.live;
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
        Ok(self.r().live.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.r().live.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let guard = self.r();
        let g = &guard.live;
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
        self.w().live.append(ents)
    }

    fn set_hard_state(&self, hs: HardState) {
        self.w().live.hs = hs;
    }

    fn set_commit(&self, commit: u64) {
        self.w().live.hs.commit = commit;
    }

    fn set_conf_state(&self, cs: ConfState) {
        self.w().live.cs = cs;
    }

    fn made_durable(&self, write: &LogWrite) {
        // The same write succeeded on the live log, and the durable one is an earlier state
        // of it, to which every earlier write was applied in the same order.
        if let Err(e) = self.w().durable.apply(write) {
            panic!("a durable write the live log took does not apply: {e}");
        }
    }

    fn apply_snapshot(&self, snap: Snapshot) -> raft::Result<()> {
        self.w().live.apply_snapshot(snap)
    }

    fn compact(&self, snap: Snapshot) -> raft::Result<()> {
        self.w().live.compact(snap)
    }
}
