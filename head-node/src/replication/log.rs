//! The in-memory log of one Raft group ([`GroupStorage`], a `raft::Storage`) and the mutations
//! the node's write-ahead log makes durable ([`GroupWrite`], [`LogOp`]).
//!
//! A group's log is changed in two steps: the driver hands a [`GroupWrite`] to
//! [`Wal::write`](super::wal::Wal::write), and once that returns (the write is durable) applies
//! the *same* write to the group's [`GroupStorage`] with [`GroupStorage::apply`]. Both sides check
//! the write with the same rules, so a write the WAL accepted never fails in memory,
//! and replaying the WAL after a restart rebuilds exactly the state the storage had.
//!
//! Semantics follow raft-rs's `MemStorage`:
//!
//! * **append** at index `i` replaces the entries at and after `i` (Raft's conflict truncation);
//!   `i` must lie in `[first_index, last_index + 1]`, the entries must be consecutive and their
//!   terms must not go down.
//! * **compact(`i`)** discards the entries *before* `i` (afterwards `first_index() == i`); the term
//!   of entry `i - 1` is kept so `term(first_index - 1)` still answers. Compacting at or below
//!   the first index does nothing; beyond `last_index + 1` is an error.
//! * **apply_snapshot** (a follower installing the leader's snapshot) replaces the log: no
//!   entries, first index `snapshot.index + 1`, membership from the snapshot, hard state
//!   `commit = snapshot.index`, `term = max(term, snapshot.term)`.
//! * **set_snapshot** stores a snapshot the application produced (Stockade's snapshots are
//!   metadata only: the flushed index and the volume state, since data lives on the sleds). It
//!   does not change the log. It is what [`raft::Storage::snapshot`] returns to a leader that
//!   must catch a follower up.
//!
//! # Snapshots
//!
//! [`raft::Storage::snapshot`] returns the stored snapshot (from `set_snapshot` or
//! `apply_snapshot`) when its index is at least `request_index` *and* at least
//! `first_index() - 1` (a follower installing it must be able to continue from the log);
//! otherwise `SnapshotTemporarilyUnavailable`, and raft asks again later. So before (or in the same
//! write as) compacting to `i`, the application stores a snapshot at an index `≥ i - 1`, e.g.
//! with [`GroupStorage::snapshot_at`].
//!
//! ```
//! use head_node::replication::log::{GroupStorage, GroupWrite};
//! use head_node::replication::GroupId;
//! use raft::prelude::{ConfState, Entry};
//! use raft::Storage;
//!
//! let entry = |index, term| Entry { index, term, ..Default::default() };
//! let log = GroupStorage::new();
//! let mut w = GroupWrite::new(GroupId(7));
//! w.conf_state(ConfState::from((vec![1, 2, 3], vec![])))
//!     .append((1..=5).map(|i| entry(i, 1)).collect());
//! // ... `wal.write(&[w.clone()]).await?` makes it durable, then:
//! log.apply(&w).unwrap();
//! assert_eq!((log.first_index(), log.last_index()), (1, 5));
//!
//! // Conflict: a new leader's entries from index 4 replace 4 and 5.
//! log.append(&[entry(4, 2)]).unwrap();
//! assert_eq!(log.last_index(), 4);
//!
//! // Keep a snapshot at 3, then drop the entries before 4.
//! log.set_snapshot(log.snapshot_at(3, b"volume state".to_vec()).unwrap()).unwrap();
//! log.compact(4).unwrap();
//! assert_eq!(Storage::term(&log, 3).unwrap(), 1);
//! assert!(Storage::entries(&log, 2, 4, None, raft::GetEntriesContext::empty(false)).is_err());
//! assert_eq!(Storage::snapshot(&log, 0, 2).unwrap().get_metadata().index, 3);
//! ```

use super::GroupId;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A mutation of a group's log that breaks its rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// Entries or a read at an index that was compacted away.
    #[error("index {index} is compacted (first index is {first_index})")]
    Compacted {
        /// The index asked for.
        index: u64,
        /// The first index still held.
        first_index: u64,
    },
    /// Appending at `index` would leave a hole after the last entry.
    #[error("appending at {index} leaves a gap after the last index {last_index}")]
    Gap {
        /// The first appended index.
        index: u64,
        /// The last index held.
        last_index: u64,
    },
    /// The entries of one append do not have consecutive indexes.
    #[error("entries are not consecutive: {index} follows {previous}")]
    NotConsecutive {
        /// The index before.
        previous: u64,
        /// The index that does not follow it.
        index: u64,
    },
    /// An entry's term is lower than the term of the entry before it.
    #[error("entry {index} has term {term}, lower than the term {previous_term} before it")]
    TermRegression {
        /// The entry.
        index: u64,
        /// Its term.
        term: u64,
        /// The term of the entry before it.
        previous_term: u64,
    },
    /// Compacting past the end of the log.
    #[error("cannot compact to {index}: the last index is {last_index}")]
    CompactBeyondLast {
        /// The compaction index.
        index: u64,
        /// The last index held.
        last_index: u64,
    },
    /// A snapshot at index 0 (raft's empty snapshot).
    #[error("snapshot at index 0")]
    EmptySnapshot,
    /// An index no log reaches (above [`MAX_INDEX`]).
    #[error("index {0} is out of range")]
    IndexOutOfRange(u64),
    /// A snapshot older than what the log already has.
    #[error("snapshot at {index} is out of date (the log is at {current})")]
    SnapshotOutOfDate {
        /// The snapshot's index.
        index: u64,
        /// The index it would have to reach.
        current: u64,
    },
    /// A local snapshot at an index the log does not hold.
    #[error("snapshot at {index} is outside the log [{truncated}, {last_index}]")]
    SnapshotOutOfRange {
        /// The snapshot's index.
        index: u64,
        /// The compaction point (first index - 1).
        truncated: u64,
        /// The last index.
        last_index: u64,
    },
    /// A local snapshot whose term does not match the log's entry at its index.
    #[error("snapshot at {index} has term {term} but the log has term {log_term} there")]
    SnapshotTermMismatch {
        /// The snapshot's index.
        index: u64,
        /// The snapshot's term.
        term: u64,
        /// The log's term at that index.
        log_term: u64,
    },
    /// A read beyond the last index.
    #[error("entries [{low}, {high}) are not available (last index {last_index})")]
    Unavailable {
        /// Start of the range.
        low: u64,
        /// End of the range (exclusive).
        high: u64,
        /// The last index held.
        last_index: u64,
    },
}

impl From<LogError> for raft::Error {
    fn from(e: LogError) -> Self {
        let s = match e {
            LogError::Compacted { .. } => StorageError::Compacted,
            LogError::Gap { .. }
            | LogError::Unavailable { .. }
            | LogError::CompactBeyondLast { .. }
            | LogError::SnapshotOutOfRange { .. } => StorageError::Unavailable,
            LogError::SnapshotOutOfDate { .. } => StorageError::SnapshotOutOfDate,
            other => StorageError::Other(Box::new(other)),
        };
        raft::Error::Store(s)
    }
}

/// The largest log index accepted (far beyond any real log; it keeps index arithmetic from
/// overflowing, whatever a file says).
pub const MAX_INDEX: u64 = 1 << 62;

/// One mutation of a group's log; each becomes one WAL record.
#[derive(Debug, Clone, PartialEq)]
pub enum LogOp {
    /// Append entries, replacing any at or after the first one's index.
    Append(Vec<Entry>),
    /// Replace the hard state.
    HardState(HardState),
    /// Replace the membership.
    ConfState(ConfState),
    /// Install a snapshot received from the leader: replaces the log (see the module doc).
    ApplySnapshot(Snapshot),
    /// Store a snapshot the application produced; the log is unchanged.
    SetSnapshot(Snapshot),
    /// Discard the entries before this index.
    Compact(u64),
    /// Forget the group (its later writes, if any, start from an empty log).
    Remove,
}

/// The mutations of one group that must become durable together: one call of
/// [`Wal::write`](super::wal::Wal::write) writes a slice of these, all or nothing each, then the
/// caller applies each to its [`GroupStorage`]. Ops apply in order.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupWrite {
    /// The group.
    pub group: GroupId,
    /// Its mutations, in order.
    pub ops: Vec<LogOp>,
}

impl GroupWrite {
    /// An empty write for `group`.
    pub fn new(group: GroupId) -> Self {
        Self {
            group,
            ops: Vec::new(),
        }
    }

    /// A write that removes `group`.
    pub fn remove(group: GroupId) -> Self {
        Self {
            group,
            ops: vec![LogOp::Remove],
        }
    }

    /// The durable part of a raft `Ready`, in the order raft-rs documents: the snapshot to
    /// install, the entries to append, the hard state. Takes the entries out of the `Ready`
    /// (`advance` does not need them); the snapshot is cloned (it is metadata only).
    pub fn from_ready(group: GroupId, ready: &mut raft::Ready) -> Self {
        let mut w = Self::new(group);
        if !ready.snapshot().is_empty() {
            w.apply_snapshot(ready.snapshot().clone());
        }
        w.append(ready.take_entries());
        if let Some(hs) = ready.hs() {
            w.hard_state(hs.clone());
        }
        w
    }

    /// Appends entries (an empty list adds nothing).
    pub fn append(&mut self, entries: Vec<Entry>) -> &mut Self {
        if !entries.is_empty() {
            self.ops.push(LogOp::Append(entries));
        }
        self
    }

    /// Sets the hard state.
    pub fn hard_state(&mut self, hs: HardState) -> &mut Self {
        self.ops.push(LogOp::HardState(hs));
        self
    }

    /// Sets the membership.
    pub fn conf_state(&mut self, cs: ConfState) -> &mut Self {
        self.ops.push(LogOp::ConfState(cs));
        self
    }

    /// Installs a received snapshot.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> &mut Self {
        self.ops.push(LogOp::ApplySnapshot(snapshot));
        self
    }

    /// Stores a locally produced snapshot.
    pub fn set_snapshot(&mut self, snapshot: Snapshot) -> &mut Self {
        self.ops.push(LogOp::SetSnapshot(snapshot));
        self
    }

    /// Discards the entries before `index`.
    pub fn compact(&mut self, index: u64) -> &mut Self {
        self.ops.push(LogOp::Compact(index));
        self
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// The rules, shared by the in-memory log and the WAL writer.

/// What [`plan`] needs to know about an op.
#[derive(Debug, Clone)]
pub(crate) enum OpMeta<'a> {
    Append { first: u64, terms: Cow<'a, [u64]> },
    HardState(&'a HardState),
    ConfState,
    ApplySnapshot { index: u64, term: u64 },
    SetSnapshot { index: u64, term: u64 },
    Compact(u64),
    Remove,
}

/// What an accepted op does; `op` is its position in the write. Ops that change nothing (a
/// compaction at or below the first index) have no step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    Append {
        op: usize,
    },
    HardState {
        op: usize,
    },
    ConfState {
        op: usize,
    },
    /// `hard_state` is the hard state after installing the snapshot.
    ApplySnapshot {
        op: usize,
        hard_state: HardState,
    },
    SetSnapshot {
        op: usize,
    },
    /// Entries before `index` go; `term` is the term of `index - 1`.
    Compact {
        index: u64,
        term: u64,
    },
    Remove,
}

/// A log's state as far as checking a write needs it.
pub(crate) trait LogView {
    /// `(index, term)` of the last discarded entry (first index - 1).
    fn truncated(&self) -> (u64, u64);
    fn last_index(&self) -> u64;
    /// Index of the stored snapshot (0: none).
    fn snapshot_index(&self) -> u64;
    fn hard_state(&self) -> HardState;
    /// Term of a held entry, `truncated().0 < index <= last_index()`.
    fn term_of(&self, index: u64) -> Option<u64>;
}

/// Checks the metadata of entries to append: consecutive indexes, terms not going down.
pub(crate) fn append_meta(entries: &[Entry]) -> Result<(u64, Vec<u64>), LogError> {
    let first = entries.first().map_or(0, |e| e.index);
    let mut terms = Vec::with_capacity(entries.len());
    let mut prev: Option<&Entry> = None;
    for e in entries {
        if let Some(p) = prev {
            if p.index.checked_add(1) != Some(e.index) {
                return Err(LogError::NotConsecutive {
                    previous: p.index,
                    index: e.index,
                });
            }
            if e.term < p.term {
                return Err(LogError::TermRegression {
                    index: e.index,
                    term: e.term,
                    previous_term: p.term,
                });
            }
        }
        terms.push(e.term);
        prev = Some(e);
    }
    Ok((first, terms))
}

impl LogOp {
    pub(crate) fn meta(&self) -> Result<OpMeta<'_>, LogError> {
        Ok(match self {
            LogOp::Append(entries) => {
                let (first, terms) = append_meta(entries)?;
                OpMeta::Append {
                    first,
                    terms: Cow::Owned(terms),
                }
            }
            LogOp::HardState(hs) => OpMeta::HardState(hs),
            LogOp::ConfState(_) => OpMeta::ConfState,
            LogOp::ApplySnapshot(s) => OpMeta::ApplySnapshot {
                index: s.get_metadata().index,
                term: s.get_metadata().term,
            },
            LogOp::SetSnapshot(s) => OpMeta::SetSnapshot {
                index: s.get_metadata().index,
                term: s.get_metadata().term,
            },
            LogOp::Compact(i) => OpMeta::Compact(*i),
            LogOp::Remove => OpMeta::Remove,
        })
    }
}

/// The log as a write changes it, op by op, without touching the real one.
struct Sim<'v, V> {
    /// The log before the write; `None` once the write replaced it (or there was none).
    base: Option<&'v V>,
    /// Base entries at indexes above this were replaced.
    base_until: u64,
    truncated: (u64, u64),
    last: u64,
    snap_index: u64,
    hs: HardState,
    overlay_start: u64,
    /// Terms of the entries this write appended, from `overlay_start` to `last`.
    overlay: Vec<u64>,
}

impl<V: LogView> Sim<'_, V> {
    fn term(&self, i: u64) -> Option<u64> {
        if i == self.truncated.0 {
            return Some(self.truncated.1);
        }
        if i < self.truncated.0 || i > self.last {
            return None;
        }
        if !self.overlay.is_empty() && i >= self.overlay_start {
            return self.overlay.get((i - self.overlay_start) as usize).copied();
        }
        match self.base {
            Some(b) if i <= self.base_until => b.term_of(i),
            _ => None,
        }
    }

    fn reset(&mut self) {
        self.base = None;
        self.base_until = 0;
        self.truncated = (0, 0);
        self.last = 0;
        self.snap_index = 0;
        self.hs = HardState::default();
        self.overlay.clear();
    }
}

/// Checks a write against a log (`None`: a group with no state yet) and says what each op does.
/// All or nothing: an error means no op may be applied.
pub(crate) fn plan<V: LogView>(
    view: Option<&V>,
    ops: &[OpMeta<'_>],
) -> Result<Vec<Step>, LogError> {
    let mut s = Sim {
        base: view,
        base_until: view.map_or(0, |v| v.last_index()),
        truncated: view.map_or((0, 0), |v| v.truncated()),
        last: view.map_or(0, |v| v.last_index()),
        snap_index: view.map_or(0, |v| v.snapshot_index()),
        hs: view.map(|v| v.hard_state()).unwrap_or_default(),
        overlay_start: 0,
        overlay: Vec::new(),
    };
    let mut steps = Vec::with_capacity(ops.len());
    for (op, meta) in ops.iter().enumerate() {
        let index = match meta {
            OpMeta::Append { first, terms } => first.saturating_add(terms.len() as u64),
            OpMeta::ApplySnapshot { index, .. }
            | OpMeta::SetSnapshot { index, .. }
            | OpMeta::Compact(index) => *index,
            _ => 0,
        };
        if index > MAX_INDEX {
            return Err(LogError::IndexOutOfRange(index));
        }
        match meta {
            OpMeta::Append { first, terms } => {
                if terms.is_empty() {
                    continue;
                }
                let first = *first;
                let first_index = s.truncated.0 + 1;
                if first < first_index {
                    return Err(LogError::Compacted {
                        index: first,
                        first_index,
                    });
                }
                if first > s.last + 1 {
                    return Err(LogError::Gap {
                        index: first,
                        last_index: s.last,
                    });
                }
                let previous_term = s.term(first - 1).unwrap_or(0);
                if terms[0] < previous_term {
                    return Err(LogError::TermRegression {
                        index: first,
                        term: terms[0],
                        previous_term,
                    });
                }
                if !s.overlay.is_empty() && first >= s.overlay_start {
                    s.overlay.truncate((first - s.overlay_start) as usize);
                } else {
                    s.overlay.clear();
                    s.overlay_start = first;
                    s.base_until = s.base_until.min(first - 1);
                }
                s.overlay.extend_from_slice(terms);
                s.last = first + terms.len() as u64 - 1;
                steps.push(Step::Append { op });
            }
            OpMeta::HardState(hs) => {
                s.hs = (*hs).clone();
                steps.push(Step::HardState { op });
            }
            OpMeta::ConfState => steps.push(Step::ConfState { op }),
            OpMeta::ApplySnapshot { index, term } => {
                let (index, term) = (*index, *term);
                if index == 0 {
                    return Err(LogError::EmptySnapshot);
                }
                if index <= s.truncated.0 {
                    return Err(LogError::SnapshotOutOfDate {
                        index,
                        current: s.truncated.0,
                    });
                }
                s.base = None;
                s.overlay.clear();
                s.truncated = (index, term);
                s.last = index;
                s.snap_index = index;
                s.hs.term = s.hs.term.max(term);
                s.hs.commit = index;
                steps.push(Step::ApplySnapshot {
                    op,
                    hard_state: s.hs.clone(),
                });
            }
            OpMeta::SetSnapshot { index, term } => {
                let (index, term) = (*index, *term);
                if index == 0 {
                    return Err(LogError::EmptySnapshot);
                }
                if index < s.snap_index {
                    return Err(LogError::SnapshotOutOfDate {
                        index,
                        current: s.snap_index,
                    });
                }
                let log_term = s.term(index).ok_or(LogError::SnapshotOutOfRange {
                    index,
                    truncated: s.truncated.0,
                    last_index: s.last,
                })?;
                if log_term != term {
                    return Err(LogError::SnapshotTermMismatch {
                        index,
                        term,
                        log_term,
                    });
                }
                s.snap_index = index;
                steps.push(Step::SetSnapshot { op });
            }
            OpMeta::Compact(index) => {
                let index = *index;
                if index <= s.truncated.0 + 1 {
                    continue;
                }
                if index > s.last + 1 {
                    return Err(LogError::CompactBeyondLast {
                        index,
                        last_index: s.last,
                    });
                }
                let term = s.term(index - 1).ok_or(LogError::Unavailable {
                    low: index - 1,
                    high: index,
                    last_index: s.last,
                })?;
                s.truncated = (index - 1, term);
                steps.push(Step::Compact { index, term });
            }
            OpMeta::Remove => {
                s.reset();
                steps.push(Step::Remove);
            }
        }
    }
    Ok(steps)
}

// ---------------------------------------------------------------------------------------------
// The in-memory log.

/// A group's log in memory: what [`GroupStorage`] shares, and what replaying the WAL builds.
#[derive(Default, Clone, PartialEq)]
pub struct GroupLog {
    hs: HardState,
    cs: ConfState,
    /// The stored snapshot (index 0: none).
    snapshot: Snapshot,
    /// `(index, term)` of the entry before the first one held.
    truncated: (u64, u64),
    entries: VecDeque<Entry>,
    /// Sum of the entries' protobuf sizes.
    entries_bytes: u64,
}

impl fmt::Debug for GroupLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupLog")
            .field("hard_state", &self.hs)
            .field("conf_state", &self.cs)
            .field("snapshot", self.snapshot.get_metadata())
            .field("truncated", &self.truncated)
            .field("first_index", &self.first_index())
            .field("last_index", &self.last_index())
            .field("entries_bytes", &self.entries_bytes)
            .finish()
    }
}

impl LogView for GroupLog {
    fn truncated(&self) -> (u64, u64) {
        self.truncated
    }
    fn last_index(&self) -> u64 {
        self.truncated.0 + self.entries.len() as u64
    }
    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }
    fn hard_state(&self) -> HardState {
        self.hs.clone()
    }
    fn term_of(&self, index: u64) -> Option<u64> {
        self.entry(index).map(|e| e.term)
    }
}

impl GroupLog {
    /// A log rebuilt from its parts (WAL replay). `entries` must be consecutive from
    /// `truncated.0 + 1`.
    pub(crate) fn from_parts(
        hs: HardState,
        cs: ConfState,
        snapshot: Snapshot,
        truncated: (u64, u64),
        entries: VecDeque<Entry>,
    ) -> Self {
        let entries_bytes = entries.iter().map(|e| u64::from(e.compute_size())).sum();
        Self {
            hs,
            cs,
            snapshot,
            truncated,
            entries,
            entries_bytes,
        }
    }

    /// First index that `entries` may return.
    pub fn first_index(&self) -> u64 {
        self.truncated.0 + 1
    }

    /// Last index held (`first_index() - 1` when empty).
    pub fn last_index(&self) -> u64 {
        LogView::last_index(self)
    }

    fn entry(&self, index: u64) -> Option<&Entry> {
        let off = index.checked_sub(self.first_index())?;
        self.entries.get(usize::try_from(off).ok()?)
    }

    fn append_entries(&mut self, ents: &[Entry]) {
        let Some(first) = ents.first().map(|e| e.index) else {
            return;
        };
        let keep = first.saturating_sub(self.first_index()) as usize;
        while self.entries.len() > keep {
            if let Some(e) = self.entries.pop_back() {
                self.entries_bytes -= u64::from(e.compute_size());
            }
        }
        for e in ents {
            self.entries_bytes += u64::from(e.compute_size());
            self.entries.push_back(e.clone());
        }
    }

    fn compact_to(&mut self, index: u64, term: u64) {
        while self.entries.front().is_some_and(|e| e.index < index) {
            if let Some(e) = self.entries.pop_front() {
                self.entries_bytes -= u64::from(e.compute_size());
            }
        }
        self.truncated = (index - 1, term);
    }

    fn install_snapshot(&mut self, snap: &Snapshot, hs: HardState) {
        let meta = snap.get_metadata();
        self.hs = hs;
        self.cs = meta.get_conf_state().clone();
        self.truncated = (meta.index, meta.term);
        self.entries.clear();
        self.entries_bytes = 0;
        self.snapshot = snap.clone();
    }

    /// Applies a planned write (`steps` from [`plan`] over `ops`).
    fn apply_steps(&mut self, ops: &[LogOp], steps: &[Step]) {
        for step in steps {
            match step {
                Step::Append { op } => {
                    if let Some(LogOp::Append(ents)) = ops.get(*op) {
                        self.append_entries(ents);
                    }
                }
                Step::HardState { op } => {
                    if let Some(LogOp::HardState(hs)) = ops.get(*op) {
                        self.hs = hs.clone();
                    }
                }
                Step::ConfState { op } => {
                    if let Some(LogOp::ConfState(cs)) = ops.get(*op) {
                        self.cs = cs.clone();
                    }
                }
                Step::ApplySnapshot { op, hard_state } => {
                    if let Some(LogOp::ApplySnapshot(snap)) = ops.get(*op) {
                        self.install_snapshot(snap, hard_state.clone());
                    }
                }
                Step::SetSnapshot { op } => {
                    if let Some(LogOp::SetSnapshot(snap)) = ops.get(*op) {
                        self.snapshot = snap.clone();
                    }
                }
                Step::Compact { index, term } => self.compact_to(*index, *term),
                Step::Remove => *self = GroupLog::default(),
            }
        }
    }

    /// Entries in `[low, high)`, at most `max_size` bytes but at least one (raft's rule).
    fn slice(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>, LogError> {
        let first = self.first_index();
        let last = self.last_index();
        if low < first {
            return Err(LogError::Compacted {
                index: low,
                first_index: first,
            });
        }
        if high > last + 1 || low > high {
            return Err(LogError::Unavailable {
                low,
                high,
                last_index: last,
            });
        }
        let max = max_size.unwrap_or(raft::NO_LIMIT);
        let mut out = Vec::new();
        let mut size = 0u64;
        for i in low..high {
            let Some(e) = self.entry(i) else { break };
            size = size.saturating_add(u64::from(e.compute_size()));
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }
}

/// A group's log in memory, shared: the raft `RawNode` owns one handle (as its
/// `raft::Storage`), the group driver another, which it updates once a write is durable.
/// Cloning is cheap.
///
/// With a WAL, change it only with [`GroupStorage::apply`], passing the write the WAL just made
/// durable (plus [`GroupStorage::set_commit`], which is not logged). The single-op mutators
/// (`append`, `set_hard_state`, …) change memory only: they serve tests and simulations
/// without a disk, and follow the same rules.
#[derive(Clone, Default)]
pub struct GroupStorage {
    inner: Arc<RwLock<GroupLog>>,
}

impl fmt::Debug for GroupStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.r().fmt(f)
    }
}

fn one_op<'a>(meta: OpMeta<'a>) -> [OpMeta<'a>; 1] {
    [meta]
}

impl GroupStorage {
    /// An empty log (first index 1, nothing stored): a group that has no state yet.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn from_log(log: GroupLog) -> Self {
        Self {
            inner: Arc::new(RwLock::new(log)),
        }
    }

    fn r(&self) -> RwLockReadGuard<'_, GroupLog> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn w(&self) -> RwLockWriteGuard<'_, GroupLog> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the whole log (tests, diagnostics).
    pub fn to_log(&self) -> GroupLog {
        self.r().clone()
    }

    /// Checks `write` without applying it.
    pub fn check(&self, write: &GroupWrite) -> Result<(), LogError> {
        let metas = write
            .ops
            .iter()
            .map(LogOp::meta)
            .collect::<Result<Vec<_>, _>>()?;
        plan(Some(&*self.r()), &metas).map(|_| ())
    }

    /// Applies a write (normally one the WAL just made durable), all or nothing. `write.group`
    /// is not checked.
    pub fn apply(&self, write: &GroupWrite) -> Result<(), LogError> {
        let metas = write
            .ops
            .iter()
            .map(LogOp::meta)
            .collect::<Result<Vec<_>, _>>()?;
        let mut g = self.w();
        let steps = plan(Some(&*g), &metas)?;
        g.apply_steps(&write.ops, &steps);
        Ok(())
    }

    /// Appends entries, replacing those at and after the first new index.
    pub fn append(&self, ents: &[Entry]) -> Result<(), LogError> {
        let (first, terms) = append_meta(ents)?;
        let mut g = self.w();
        let meta = OpMeta::Append {
            first,
            terms: Cow::Owned(terms),
        };
        if !plan(Some(&*g), &one_op(meta))?.is_empty() {
            g.append_entries(ents);
        }
        Ok(())
    }

    /// Replaces the hard state.
    pub fn set_hard_state(&self, hs: HardState) {
        self.w().hs = hs;
    }

    /// Records a commit index learned after the hard state was written (raft's `LightReady`).
    /// In memory only: raft does not need the commit index to be durable.
    pub fn set_commit(&self, commit: u64) {
        self.w().hs.commit = commit;
    }

    /// Replaces the membership.
    pub fn set_conf_state(&self, cs: ConfState) {
        self.w().cs = cs;
    }

    /// Installs a snapshot received from the leader (see the module doc).
    pub fn apply_snapshot(&self, snap: Snapshot) -> Result<(), LogError> {
        let mut g = self.w();
        let meta = OpMeta::ApplySnapshot {
            index: snap.get_metadata().index,
            term: snap.get_metadata().term,
        };
        if let Some(Step::ApplySnapshot { hard_state, .. }) = plan(Some(&*g), &one_op(meta))?.pop()
        {
            g.install_snapshot(&snap, hard_state);
        }
        Ok(())
    }

    /// Stores a snapshot produced by the application (the log is unchanged). Its index must be
    /// held (`first_index() - 1 ..= last_index()`), its term must match, and it must not be older
    /// than the stored one.
    pub fn set_snapshot(&self, snap: Snapshot) -> Result<(), LogError> {
        let mut g = self.w();
        let meta = OpMeta::SetSnapshot {
            index: snap.get_metadata().index,
            term: snap.get_metadata().term,
        };
        plan(Some(&*g), &one_op(meta))?;
        g.snapshot = snap;
        Ok(())
    }

    /// Discards the entries before `index` (raft `MemStorage::compact` semantics).
    pub fn compact(&self, index: u64) -> Result<(), LogError> {
        let mut g = self.w();
        if let Some(Step::Compact { index, term }) =
            plan(Some(&*g), &one_op(OpMeta::Compact(index)))?.pop()
        {
            g.compact_to(index, term);
        }
        Ok(())
    }

    /// A snapshot at `index` (which must be held) with the log's term there, the current
    /// membership and `data`: what the application passes to [`GroupStorage::set_snapshot`].
    /// The membership is the current one, so take `index` at or after the last applied
    /// membership change.
    pub fn snapshot_at(&self, index: u64, data: Vec<u8>) -> Result<Snapshot, LogError> {
        let g = self.r();
        let term = if index == g.truncated.0 {
            g.truncated.1
        } else {
            g.term_of(index).ok_or(LogError::Unavailable {
                low: index,
                high: index + 1,
                last_index: g.last_index(),
            })?
        };
        let mut s = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let m = s.mut_metadata();
        m.index = index;
        m.term = term;
        m.set_conf_state(g.cs.clone());
        Ok(s)
    }

    /// First index held (or that the next append must start at, when empty).
    pub fn first_index(&self) -> u64 {
        self.r().first_index()
    }

    /// Last index held.
    pub fn last_index(&self) -> u64 {
        self.r().last_index()
    }

    /// `(index, term)` of the entry before the first one held.
    pub fn truncated(&self) -> (u64, u64) {
        self.r().truncated
    }

    /// The hard state.
    pub fn hard_state(&self) -> HardState {
        self.r().hs.clone()
    }

    /// The membership.
    pub fn conf_state(&self) -> ConfState {
        self.r().cs.clone()
    }

    /// The stored snapshot (index 0: none).
    pub fn stored_snapshot(&self) -> Snapshot {
        self.r().snapshot.clone()
    }

    /// Sum of the protobuf sizes of the entries held.
    pub fn entries_bytes(&self) -> u64 {
        self.r().entries_bytes
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.r().entries.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.r().entries.is_empty()
    }

    /// Committed entries in `[low, high)` (cut at the commit index of the hard state), at most
    /// `max_size` bytes but at least one: what the application re-reads, e.g. to re-flush the
    /// unflushed tail after becoming leader.
    pub fn committed_entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, LogError> {
        let g = self.r();
        let high = high.min(g.hs.commit.saturating_add(1)).max(low);
        g.slice(low, high, max_size)
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let g = self.r();
        Ok(RaftState::new(g.hs.clone(), g.cs.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        Ok(self.r().slice(low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let g = self.r();
        if idx == g.truncated.0 {
            return Ok(g.truncated.1);
        }
        if idx < g.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        g.term_of(idx)
            .ok_or(raft::Error::Store(StorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.r().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.r().last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let g = self.r();
        let index = g.snapshot.get_metadata().index;
        if index == 0 || index < request_index || index < g.truncated.0 {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(g.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use raft::storage::MemStorage;
    use raft::{Error as RaftError, Storage};

    fn e(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; (index % 7) as usize].into(),
            ..Default::default()
        }
    }

    fn snap(index: u64, term: u64, voters: Vec<u64>) -> Snapshot {
        let mut s = Snapshot::default();
        s.mut_metadata().index = index;
        s.mut_metadata().term = term;
        s.mut_metadata().mut_conf_state().voters = voters;
        s
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    fn store(ents: &[Entry]) -> GroupStorage {
        // raft's tests start from a "dummy" entry at 3 (term 3): a log compacted at 3.
        let s = GroupStorage::new();
        s.apply_snapshot(snap(ents[0].index, ents[0].term, vec![1]))
            .unwrap();
        s.append(&ents[1..]).unwrap();
        s
    }

    #[test]
    fn term_matches_raft_semantics() {
        let s = store(&[e(3, 3), e(4, 4), e(5, 5)]);
        let c = RaftError::Store(StorageError::Compacted);
        let u = RaftError::Store(StorageError::Unavailable);
        assert_eq!(s.term(2), Err(c));
        assert_eq!(s.term(3), Ok(3));
        assert_eq!(s.term(4), Ok(4));
        assert_eq!(s.term(5), Ok(5));
        assert_eq!(s.term(6), Err(u));
    }

    #[test]
    fn entries_honour_bounds_and_max_size() {
        let s = store(&[e(3, 3), e(4, 4), e(5, 5), e(6, 6)]);
        let size = |es: &[Entry]| es.iter().map(|x| u64::from(x.compute_size())).sum::<u64>();
        let all = s.entries(4, 7, None, ctx()).unwrap();
        assert_eq!(all, vec![e(4, 4), e(5, 5), e(6, 6)]);
        assert_eq!(
            s.entries(2, 6, None, ctx()),
            Err(RaftError::Store(StorageError::Compacted))
        );
        assert_eq!(
            s.entries(3, 4, None, ctx()),
            Err(RaftError::Store(StorageError::Compacted))
        );
        assert_eq!(
            s.entries(4, 8, None, ctx()),
            Err(RaftError::Store(StorageError::Unavailable))
        );
        assert_eq!(s.entries(4, 4, None, ctx()).unwrap(), vec![]);
        // At least one entry even when it alone exceeds the limit.
        assert_eq!(s.entries(4, 7, 0, ctx()).unwrap(), vec![e(4, 4)]);
        let two = size(&all[..2]);
        assert_eq!(s.entries(4, 7, two, ctx()).unwrap(), all[..2].to_vec());
        assert_eq!(s.entries(4, 7, two - 1, ctx()).unwrap(), all[..1].to_vec());
        assert_eq!(s.entries(4, 7, size(&all), ctx()).unwrap(), all);
        assert_eq!(s.entries_bytes(), size(&all));
    }

    #[test]
    fn compact_and_append_like_mem_storage() {
        let s = store(&[e(3, 3), e(4, 4), e(5, 5)]);
        s.compact(2).unwrap(); // below first: nothing
        assert_eq!(s.first_index(), 4);
        s.compact(5).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (5, 5));
        assert_eq!(s.term(4), Ok(4)); // kept for matching
        assert_eq!(s.term(3), Err(RaftError::Store(StorageError::Compacted)));
        assert_eq!(
            s.compact(7),
            Err(LogError::CompactBeyondLast {
                index: 7,
                last_index: 5
            })
        );
        s.compact(6).unwrap(); // everything
        assert_eq!((s.first_index(), s.last_index(), s.len()), (6, 5, 0));
        assert_eq!(s.term(5), Ok(5));
        assert_eq!(
            s.append(&[e(7, 5)]),
            Err(LogError::Gap {
                index: 7,
                last_index: 5
            })
        );
        assert_eq!(
            s.append(&[e(5, 5)]),
            Err(LogError::Compacted {
                index: 5,
                first_index: 6
            })
        );
        s.append(&[e(6, 5), e(7, 6)]).unwrap();
        s.append(&[e(7, 7), e(8, 7)]).unwrap(); // conflict at 7
        assert_eq!(
            s.entries(6, 9, None, ctx()).unwrap(),
            vec![e(6, 5), e(7, 7), e(8, 7)]
        );
        assert_eq!(
            s.append(&[e(9, 7), e(11, 7)]),
            Err(LogError::NotConsecutive {
                previous: 9,
                index: 11
            })
        );
        assert_eq!(
            s.append(&[e(9, 6)]),
            Err(LogError::TermRegression {
                index: 9,
                term: 6,
                previous_term: 7
            })
        );
        assert_eq!(s.last_index(), 8, "a refused append changes nothing");
    }

    #[test]
    fn snapshots() {
        let s = store(&[e(3, 3), e(4, 4), e(5, 5)]);
        let unavailable = || RaftError::Store(StorageError::SnapshotTemporarilyUnavailable);
        // The dummy entry's snapshot serves until the log is compacted past it.
        assert_eq!(s.snapshot(0, 2).unwrap().get_metadata().index, 3);
        assert_eq!(s.snapshot(4, 2), Err(unavailable()));
        s.compact(5).unwrap();
        assert_eq!(s.snapshot(0, 2), Err(unavailable()));
        let local = s.snapshot_at(5, b"state".to_vec()).unwrap();
        assert_eq!(local.get_metadata().term, 5);
        assert_eq!(local.get_metadata().get_conf_state().voters, vec![1]);
        s.set_snapshot(local.clone()).unwrap();
        assert_eq!(s.snapshot(5, 2).unwrap(), local);
        assert!(matches!(
            s.set_snapshot(snap(4, 4, vec![])),
            Err(LogError::SnapshotOutOfDate { .. })
        ));
        assert!(matches!(
            s.set_snapshot(snap(6, 5, vec![])),
            Err(LogError::SnapshotOutOfRange { .. })
        ));
        assert!(matches!(
            s.set_snapshot(snap(5, 4, vec![])),
            Err(LogError::SnapshotTermMismatch { .. })
        ));
        assert_eq!(
            s.set_snapshot(snap(0, 0, vec![])),
            Err(LogError::EmptySnapshot)
        );

        // Installing a leader's snapshot replaces the log and moves the hard state.
        s.set_hard_state(HardState {
            term: 9,
            vote: 2,
            commit: 5,
            ..Default::default()
        });
        assert!(matches!(
            s.apply_snapshot(snap(3, 3, vec![1])),
            Err(LogError::SnapshotOutOfDate { .. })
        ));
        s.apply_snapshot(snap(10, 8, vec![1, 2, 3])).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (11, 10));
        assert_eq!(s.hard_state().term, 9);
        assert_eq!(s.hard_state().vote, 2);
        assert_eq!(s.hard_state().commit, 10);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(s.term(10), Ok(8));
        assert_eq!(s.snapshot(0, 2).unwrap().get_metadata().index, 10);
    }

    #[test]
    fn writes_are_all_or_nothing() {
        let s = GroupStorage::new();
        let mut w = GroupWrite::new(GroupId(1));
        w.append(vec![e(1, 1), e(2, 1)])
            .hard_state(HardState {
                term: 1,
                commit: 2,
                ..Default::default()
            })
            .compact(9);
        assert!(matches!(
            s.apply(&w),
            Err(LogError::CompactBeyondLast { .. })
        ));
        assert_eq!(s.to_log(), GroupLog::default());
        assert_eq!(
            s.compact(u64::MAX),
            Err(LogError::IndexOutOfRange(u64::MAX))
        );
        assert_eq!(
            s.apply_snapshot(snap(MAX_INDEX + 1, 1, vec![])),
            Err(LogError::IndexOutOfRange(MAX_INDEX + 1))
        );
        assert_eq!(
            s.append(&[e(MAX_INDEX, 1)]),
            Err(LogError::IndexOutOfRange(MAX_INDEX + 1))
        );
        // Later ops see earlier ones: set a snapshot on entries appended in the same write,
        // then compact past them.
        let mut w = GroupWrite::new(GroupId(1));
        w.append(vec![e(1, 1), e(2, 1), e(3, 2)])
            .set_snapshot(snap(3, 2, vec![1]))
            .compact(4)
            .append(vec![e(4, 2)]);
        s.check(&w).unwrap();
        s.apply(&w).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (4, 4));
        assert_eq!(s.term(3), Ok(2));
        let mut w = GroupWrite::remove(GroupId(1));
        w.append(vec![e(1, 1)]);
        s.apply(&w).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (1, 1));
        assert_eq!(s.stored_snapshot(), Snapshot::default());
    }

    #[test]
    fn committed_entries_stop_at_commit() {
        let s = GroupStorage::new();
        s.append(&[e(1, 1), e(2, 1), e(3, 1)]).unwrap();
        s.set_commit(2);
        assert_eq!(
            s.committed_entries(1, 10, None).unwrap(),
            vec![e(1, 1), e(2, 1)]
        );
        assert_eq!(s.committed_entries(3, 10, None).unwrap(), vec![]);
        s.compact(2).unwrap();
        assert!(matches!(
            s.committed_entries(1, 3, None),
            Err(LogError::Compacted { .. })
        ));
    }

    #[test]
    fn from_ready_takes_the_durable_parts() {
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1], vec![])));
        let cfg = raft::Config {
            id: 1,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = raft::RawNode::new(&cfg, storage, &logger).unwrap();
        node.campaign().unwrap();
        let mut rd = node.ready();
        let w = GroupWrite::from_ready(GroupId(3), &mut rd);
        assert_eq!(w.group, GroupId(3));
        assert!(matches!(w.ops.last(), Some(LogOp::HardState(hs)) if hs.term == 1 && hs.vote == 1));
        assert!(rd.entries().is_empty());
    }

    /// An op for the model test, with indexes relative to the log at the time it applies.
    #[derive(Debug, Clone)]
    enum ModelOp {
        Append { back: u64, len: u64, bump: u64 },
        Compact { back: u64 },
        Snapshot { ahead: u64, term_bump: u64 },
        Hs(u64),
    }

    fn model_op() -> impl Strategy<Value = ModelOp> {
        prop_oneof![
            4 => (0u64..4, 0u64..5, 0u64..2).prop_map(|(back, len, bump)| ModelOp::Append { back, len, bump }),
            2 => (0u64..6).prop_map(|back| ModelOp::Compact { back }),
            1 => (0u64..4, 0u64..2).prop_map(|(ahead, term_bump)| ModelOp::Snapshot { ahead, term_bump }),
            1 => (0u64..20).prop_map(ModelOp::Hs),
        ]
    }

    proptest! {
        /// Append, conflict truncation, compaction and snapshot installation behave like raft's
        /// own `MemStorage` (where `MemStorage` does not panic; we refuse those cases instead).
        #[test]
        fn behaves_like_mem_storage(ops in proptest::collection::vec(model_op(), 1..60)) {
            let ours = GroupStorage::new();
            let theirs = MemStorage::new();
            let mut max_term = 1u64;
            for op in ops {
                let (first, last) = (ours.first_index(), ours.last_index());
                match op {
                    ModelOp::Append { back, len, bump } => {
                        let start = (last + 1).saturating_sub(back).max(1);
                        let prev = ours.term(start - 1).unwrap_or(0);
                        max_term = max_term.max(prev) + bump;
                        let ents: Vec<Entry> =
                            (start..start + len).map(|i| e(i, max_term)).collect();
                        let ok = ours.append(&ents);
                        if start < first && len > 0 {
                            prop_assert!(matches!(ok, Err(LogError::Compacted { .. })), "{:?}", ok);
                        } else {
                            prop_assert!(ok.is_ok(), "{ok:?}");
                            theirs.wl().append(&ents).unwrap();
                        }
                    }
                    ModelOp::Compact { back } => {
                        // MemStorage forgets its first index when compacted empty: keep one.
                        let idx = (last + 1).saturating_sub(back + 1);
                        ours.compact(idx).unwrap();
                        if idx > first {
                            theirs.wl().compact(idx).unwrap();
                        }
                    }
                    ModelOp::Snapshot { ahead, term_bump } => {
                        let idx = last + ahead;
                        max_term += term_bump;
                        let s = snap(idx.max(1), max_term, vec![1, 2]);
                        let r1 = ours.apply_snapshot(s.clone());
                        let r2 = theirs.wl().apply_snapshot(s);
                        prop_assert_eq!(r1.is_ok(), r2.is_ok(), "{:?} {:?}", r1, r2);
                    }
                    ModelOp::Hs(commit) => {
                        let hs = HardState { term: max_term, vote: 1, commit, ..Default::default() };
                        ours.set_hard_state(hs.clone());
                        theirs.wl().set_hardstate(hs);
                    }
                }
                prop_assert_eq!(ours.last_index(), theirs.last_index().unwrap());
                let (first, last) = (ours.first_index(), ours.last_index());
                prop_assert_eq!(first, theirs.first_index().unwrap());
                for i in first..=last {
                    prop_assert_eq!(ours.term(i), theirs.term(i));
                }
                if first <= last {
                    // (MemStorage indexes out of bounds on an empty log.)
                    prop_assert_eq!(
                        ours.entries(first, last + 1, None, ctx()),
                        theirs.entries(first, last + 1, None, ctx())
                    );
                }
                prop_assert_eq!(ours.initial_state().unwrap().hard_state,
                    theirs.initial_state().unwrap().hard_state);
                let bytes: u64 = ours.entries(first, last + 1, None, ctx()).unwrap()
                    .iter().map(|x| u64::from(x.compute_size())).sum();
                prop_assert_eq!(ours.entries_bytes(), bytes);
            }
        }
    }
}
