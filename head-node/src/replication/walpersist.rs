//! The write-ahead log as the group drivers' log: [`RaftLog`] for [`GroupStorage`] and
//! [`Persist`] over [`Wal`].

use super::GroupId;
use super::driver::{Durable, Persist};
use super::group::LogWrite;
use super::log::{GroupStorage, GroupWrite, LogError};
use super::memlog::RaftLog;
use super::wal::Wal;
use futures_util::future::BoxFuture;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};

impl RaftLog for GroupStorage {
    fn append(&self, ents: &[Entry]) -> raft::Result<()> {
        Ok(GroupStorage::append(self, ents)?)
    }

    fn set_hard_state(&self, hs: HardState) {
        GroupStorage::set_hard_state(self, hs);
    }

    fn set_commit(&self, commit: u64) {
        GroupStorage::set_commit(self, commit);
    }

    fn set_conf_state(&self, cs: ConfState) {
        GroupStorage::set_conf_state(self, cs);
    }

    fn apply_snapshot(&self, snap: Snapshot) -> raft::Result<()> {
        Ok(GroupStorage::apply_snapshot(self, snap)?)
    }

    fn compact(&self, snap: Snapshot) -> raft::Result<()> {
        let index = snap.get_metadata().index;
        GroupStorage::set_snapshot(self, snap)?;
        Ok(GroupStorage::compact(self, index + 1)?)
    }
}

/// The WAL record sequence of one [`LogWrite`], in the order the group core applies it.
pub fn group_write(group: GroupId, w: &LogWrite) -> GroupWrite {
    let mut g = GroupWrite::new(group);
    if let Some(s) = &w.snapshot {
        g.apply_snapshot(s.clone());
    }
    g.append(w.entries.clone());
    if let Some(hs) = &w.hard_state {
        g.hard_state(hs.clone());
    }
    if let Some(cs) = &w.conf_state {
        g.conf_state(cs.clone());
    }
    if let Some(s) = &w.compact {
        let index = s.get_metadata().index;
        g.set_snapshot(s.clone());
        g.compact(index + 1);
    }
    g
}

/// Persists group writes in the node's WAL (group commit across all groups).
#[derive(Debug, Clone)]
pub struct WalPersist {
    wal: Wal,
}

impl WalPersist {
    /// Over an open WAL.
    pub fn new(wal: Wal) -> Self {
        Self { wal }
    }

    /// The WAL.
    pub fn wal(&self) -> &Wal {
        &self.wal
    }
}

impl Persist for WalPersist {
    fn persist<'a>(
        &'a self,
        group: GroupId,
        write: &'a LogWrite,
    ) -> BoxFuture<'a, Result<Durable, String>> {
        Box::pin(async move {
            let g = group_write(group, write);
            let durable = self.wal.submit(&[g]).await.map_err(|e| e.to_string())?;
            Ok(Box::pin(async move { durable.await.map_err(|e| e.to_string()) }) as Durable)
        })
    }
}

/// A new group's log, made durable: a snapshot at index 1 (term 1) holding the initial
/// membership and an empty state. Starting from a snapshot rather than a bare membership means
/// a node added later, which starts with an empty log, is brought up to date with a snapshot
/// carrying the membership — raft-rs would otherwise replay the membership changes onto an
/// empty configuration.
pub async fn new_group_log(
    wal: &Wal,
    group: GroupId,
    voters: &[u64],
) -> Result<GroupStorage, String> {
    let mut snap = raft::prelude::Snapshot {
        data: super::entry::VolumeState::default().encode().into(),
        ..Default::default()
    };
    let m = snap.mut_metadata();
    m.index = 1;
    m.term = 1;
    m.set_conf_state(ConfState::from((voters.to_vec(), vec![])));
    let mut w = GroupWrite::new(group);
    w.apply_snapshot(snap);
    wal.write(std::slice::from_ref(&w))
        .await
        .map_err(|e| e.to_string())?;
    let log = GroupStorage::new();
    log.apply(&w).map_err(|e: LogError| e.to_string())?;
    Ok(log)
}

/// Drops a group's log from the WAL (the group was deleted or this node left it).
pub async fn remove_group_log(wal: &Wal, group: GroupId) -> Result<(), String> {
    wal.write(&[GroupWrite::remove(group)])
        .await
        .map_err(|e| e.to_string())
}
