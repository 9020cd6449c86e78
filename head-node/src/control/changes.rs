//! Changes to a serving volume that need its Raft group's leader (resize, QoS) without holding
//! the metadata lock across that call.
//!
//! A change is decided under the metadata lock (`ops`), as every mutation is; then the lock is
//! released while the volume's group applies it (which waits up to 30 s for a group whose
//! leader is frozen or cut off), and taken again to record the result. So one volume with a
//! sick group delays changes to that volume only, not every other admin request of the
//! cluster. Two things keep that safe:
//!
//! * **One change per volume at a time** ([`ChangeLocks`]): a second resize or QoS change of the
//!   same volume waits for the first; the record a change writes back is the fresh one with
//!   only its own fields changed, so attaches and detaches made meanwhile are kept.
//! * **Capacity promised while the call runs is counted** ([`Reserved`]): a resize's extra
//!   provisioned bytes and a QoS raise's extra baseline IOPS are added to what the cluster has
//!   given out, so a create or another change decided meanwhile cannot take the same room.
//!   The reservation ends when the change is recorded (the state counts it from then on) or
//!   fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::OwnedMutexGuard;

/// Per-volume locks for changes that call the volume's group.
#[derive(Debug, Default)]
pub(super) struct ChangeLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while a change of one volume runs; other changes of that volume wait for it.
#[derive(Debug)]
pub(super) struct ChangeGuard<'a> {
    locks: &'a ChangeLocks,
    name: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl ChangeLocks {
    /// Waits until no other change of volume `name` runs, and holds it off until dropped.
    pub(super) async fn lock(&self, name: &str) -> ChangeGuard<'_> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        ChangeGuard {
            locks: self,
            name: name.to_string(),
            lock,
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self
            .locks
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Clones are only made under this map's lock: the map's and ours are the last two.
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.name);
        }
    }
}

/// Capacity promised to changes whose group call is running.
#[derive(Debug, Default)]
pub(super) struct Reserved {
    inner: Mutex<Totals>,
}

#[derive(Debug, Default)]
struct Totals {
    bytes: u64,
    iops: BTreeMap<u64, u64>,
}

/// One change's promise; given back when dropped.
#[derive(Debug)]
pub(super) struct Reservation<'a> {
    reserved: &'a Reserved,
    bytes: u64,
    iops: Vec<(u64, u64)>,
}

impl Reserved {
    /// Provisioned bytes promised and not yet recorded.
    pub(super) fn bytes(&self) -> u64 {
        self.totals().bytes
    }

    /// Baseline IOPS promised on head node `node` and not yet recorded.
    pub(super) fn iops_on(&self, node: u64) -> u64 {
        self.totals().iops.get(&node).copied().unwrap_or(0)
    }

    /// Baseline IOPS promised per head node and not yet recorded.
    pub(super) fn iops(&self) -> BTreeMap<u64, u64> {
        self.totals().iops.clone()
    }

    /// Promises `bytes` of provisioned capacity and `iops` more baseline on each of `nodes`.
    pub(super) fn take(&self, bytes: u64, iops: u64, nodes: &[u64]) -> Reservation<'_> {
        let mut t = self.totals();
        t.bytes = t.bytes.saturating_add(bytes);
        let mut per_node = Vec::new();
        if iops > 0 {
            let mut nodes = nodes.to_vec();
            nodes.sort_unstable();
            nodes.dedup();
            for n in nodes {
                let e = t.iops.entry(n).or_insert(0);
                *e = e.saturating_add(iops);
                per_node.push((n, iops));
            }
        }
        Reservation {
            reserved: self,
            bytes,
            iops: per_node,
        }
    }

    fn totals(&self) -> std::sync::MutexGuard<'_, Totals> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut t = self.reserved.totals();
        t.bytes = t.bytes.saturating_sub(self.bytes);
        for (n, i) in self.iops.drain(..) {
            if let Some(e) = t.iops.get_mut(&n) {
                *e = e.saturating_sub(i);
                if *e == 0 {
                    t.iops.remove(&n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reservations_add_up_and_are_given_back() {
        let r = Reserved::default();
        let a = r.take(100, 0, &[1, 2]);
        let b = r.take(50, 30, &[2, 3, 3]);
        assert_eq!(r.bytes(), 150);
        assert_eq!((r.iops_on(1), r.iops_on(2), r.iops_on(3)), (0, 30, 30));
        let c = r.take(0, 5, &[2]);
        assert_eq!(r.iops_on(2), 35);
        drop(b);
        assert_eq!(r.bytes(), 100);
        assert_eq!((r.iops_on(2), r.iops_on(3)), (5, 0));
        drop((a, c));
        assert_eq!(r.bytes(), 0);
        assert!(r.totals().iops.is_empty());
    }

    #[tokio::test]
    async fn changes_of_one_volume_wait_for_each_other_and_others_do_not() {
        let locks = ChangeLocks::default();
        let first = locks.lock("a").await;
        // Another volume: at once.
        let other = tokio::time::timeout(Duration::from_secs(5), locks.lock("b"))
            .await
            .expect("a change of another volume must not wait");
        drop(other);
        // The same volume: waits until the first is dropped.
        let second = locks.lock("a");
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut second)
                .await
                .is_err(),
            "a second change of the same volume ran alongside the first"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second change must run once the first is done");
        assert_eq!(locks.len(), 1);
        drop(second);
        assert_eq!(locks.len(), 0, "the lock of an idle volume is forgotten");
    }
}
