//! A first-come-first-served lock over ranges of blocks.
//!
//! Overlapping holders exclude each other; a request waits while an overlapping range is held
//! *or an earlier request for an overlapping range is still waiting*, so overlapping mutations are
//! applied in the order they arrived (which is what keeps every replica in the same order).
//! Non-overlapping requests never wait for each other. A waiter that gives up (its future is
//! dropped) releases its place; a grant that arrives after it gave up is released at once.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

#[derive(Debug)]
struct Waiter {
    id: u64,
    first: u64,
    last: u64,
    tx: oneshot::Sender<()>,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    held: Vec<(u64, u64, u64)>,
    waiting: VecDeque<Waiter>,
}

impl State {
    fn overlaps_held(&self, first: u64, last: u64) -> bool {
        self.held.iter().any(|&(_, f, l)| f <= last && first <= l)
    }

    /// Grants every waiter that can go, in order.
    fn grant(&mut self) {
        let mut i = 0;
        while i < self.waiting.len() {
            let (f, l) = (self.waiting[i].first, self.waiting[i].last);
            let blocked_by_earlier = self
                .waiting
                .iter()
                .take(i)
                .any(|w| w.first <= l && f <= w.last);
            if blocked_by_earlier || self.overlaps_held(f, l) {
                i += 1;
                continue;
            }
            let w = self.waiting.remove(i).expect("index in range");
            if w.tx.send(()).is_ok() {
                self.held.push((w.id, w.first, w.last));
            }
            // A waiter that gave up is simply dropped; look at the same index again.
        }
    }
}

/// The lock.
#[derive(Debug, Clone, Default)]
pub struct RangeLock {
    state: Arc<Mutex<State>>,
}

/// Holds a range until dropped.
#[derive(Debug)]
pub struct RangeGuard {
    state: Arc<Mutex<State>>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.held.retain(|&(id, _, _)| id != self.id);
        st.grant();
    }
}

impl RangeLock {
    /// A new lock.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks blocks `first..=last`, waiting behind overlapping holders and earlier overlapping
    /// waiters.
    pub async fn lock(&self, first: u64, last: u64) -> RangeGuard {
        let (id, rx) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let id = st.next;
            st.next += 1;
            let queued = st
                .waiting
                .iter()
                .any(|w| w.first <= last && first <= w.last);
            if !queued && !st.overlaps_held(first, last) {
                st.held.push((id, first, last));
                return RangeGuard {
                    state: self.state.clone(),
                    id,
                };
            }
            let (tx, rx) = oneshot::channel();
            st.waiting.push_back(Waiter {
                id,
                first,
                last,
                tx,
            });
            (id, rx)
        };
        // If this future is dropped here, the sender sees a closed receiver at grant time and
        // the range is never held.
        let _ = rx.await;
        RangeGuard {
            state: self.state.clone(),
            id,
        }
    }

    /// Ranges held and waiting (for tests and metrics).
    pub fn counts(&self) -> (usize, usize) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (st.held.len(), st.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_go_in_arrival_order() {
        let l = RangeLock::new();
        let g1 = l.lock(0, 10).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, (f, t)) in [(5u64, 6u64), (20, 30), (0, 1), (6, 25)]
            .into_iter()
            .enumerate()
        {
            let l = l.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let _g = l.lock(f, t).await;
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // (20,30) does not overlap anything held or queued: it went through at once.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*order.lock().unwrap(), vec![1]);
        drop(g1);
        for t in tasks {
            t.await.unwrap();
        }
        let got = order.lock().unwrap().clone();
        // 0 before 2 and 3 (arrival order among overlapping), 3 after 1 as well.
        let pos = |x| got.iter().position(|&y| y == x).unwrap();
        assert!(
            pos(0) < pos(3) && pos(2) < pos(3) && pos(1) < pos(3),
            "{got:?}"
        );
        assert_eq!(l.counts(), (0, 0));
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_does_not_block_others() {
        let l = RangeLock::new();
        let g = l.lock(0, 0).await;
        let l2 = l.clone();
        let t = tokio::spawn(async move { l2.lock(0, 0).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        t.abort();
        let _ = t.await;
        drop(g);
        // The abandoned waiter never holds the range.
        let _g = tokio::time::timeout(Duration::from_secs(1), l.lock(0, 0))
            .await
            .expect("not blocked by the abandoned waiter");
    }
}
