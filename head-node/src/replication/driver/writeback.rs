//! Write-back: the task that writes committed entries to the sleds, and the driver's
//! bookkeeping of what reached them (the flushed prefix, sled flushes, rewrites).

use super::*;

impl<L: RaftLog, T: Transport> Driver<L, T> {
    /// The sleds flushed what was written back up to `upto` (or some failed).
    pub(super) fn sleds_flushed(
        &mut self,
        term: u64,
        upto: u64,
        failed: Vec<(SledId, FlushFailure)>,
    ) {
        if self.serving != Some(term) || self.sleds_flushing != Some(upto) {
            return;
        }
        self.sleds_flushing = None;
        let now = tokio::time::Instant::now();
        self.flush_failing.retain(|s, _| {
            failed
                .iter()
                .any(|(f, why)| f == s && matches!(why, FlushFailure::Failed(_)))
        });
        if let Some((sled, _)) = failed
            .iter()
            .find(|(_, why)| *why == FlushFailure::MayHaveLost)
        {
            self.write_back_again(*sled);
        }
        if !failed.is_empty() {
            for (sled, why) in failed {
                let FlushFailure::Failed(why) = why else {
                    continue;
                };
                let since = *self.flush_failing.entry(sled).or_insert(now);
                tracing::debug!(group = %self.group, sled_id = %sled, error = %why,
                    "flushing a sled's write-back failed; retrying");
                if now.duration_since(since) >= self.cfg.stale_after {
                    self.flush_failing.remove(&sled);
                    self.mark_stale(sled, "flushing write-back keeps failing");
                }
            }
            // Not recorded: the next report retries (a sled recorded stale is left out).
            self.flush_due = true;
            return;
        }
        if upto > self.flush_reported {
            let tag = self.next_tag();
            if self
                .core
                .propose(tag, &EntryHeader::FlushedUpTo { index: upto }, Bytes::new())
                .is_ok()
            {
                self.flush_reported = upto;
            }
        }
    }

    /// Writes back again everything above the recorded flushed prefix, in log order, after the
    /// committed entries already queued (so every block ends with its latest write): `sled` may
    /// have lost cached writes it had acknowledged. Reads are unaffected meanwhile: the overlay
    /// serves every block written above the recorded prefix.
    pub(super) fn write_back_again(&mut self, sled: SledId) {
        let Some(f) = &self.flusher else {
            return;
        };
        let from = self.flush_reported;
        // A new generation: copies still queued from before are skipped, and copies already
        // written do not count (their sled may have lost them).
        let generation = {
            let mut r = f.rewrite.lock().unwrap_or_else(|p| p.into_inner());
            r.generation += 1;
            r.from = from;
            r.generation
        };
        let mut n = 0u64;
        for (index, e) in self.core.overlay.entries_after(from) {
            let _ = f
                .jobs
                .send((index, e.header.clone(), e.data.clone(), generation));
            n += 1;
        }
        tracing::warn!(group = %self.group, sled_id = %sled, from_index = from, entries = n,
            "a sled may have restarted and lost cached write-back; writing the unflushed tail again");
        self.vm.rewrites.inc();
        // Their first write-back no longer counts.
        self.flush_done.retain(|k| *k <= from);
        self.flush_written = from;
    }

    /// Highest index such that every data entry at or below it is on the sleds.
    pub(super) fn flushed_prefix(&mut self) -> u64 {
        let base = self
            .core
            .state
            .flushed
            .max(self.flush_reported)
            .max(self.flush_written);
        let mut upto = self.core.applied();
        for (k, _) in self.core.overlay.entries_after(base) {
            if !self.flush_done.contains(&k) {
                upto = k - 1;
                break;
            }
        }
        self.flush_done.retain(|k| *k > upto);
        self.flush_written = upto.max(base);
        self.flush_written
    }
}

/// The sled to blame when a write-back attempt fails, if one is. A sled that is out of space
/// cannot take an acknowledged write any more than one that is down: if it keeps refusing for
/// `stale_after` it is recorded stale and the write-back goes on without it, instead of retrying
/// for ever while the unflushed log fills and every new write waits.
fn failing_sled(e: &StoreError) -> Option<SledId> {
    match e {
        StoreError::Replica { sled, .. } | StoreError::NoSpace(sled) => Some(*sled),
        _ => None,
    }
}

/// Limits of the write-back.
#[derive(Debug, Clone, Copy)]
pub(super) struct FlushLimits {
    /// Writes in flight at once.
    pub(super) window: usize,
    /// Failing on one sled this long reports it down.
    pub(super) stale_after: Duration,
}

/// Writes committed entries to the sleds in log order (per block range), many at a time,
/// retrying I/O errors; reports each one done. A `Fenced` answer ends it. A write that keeps
/// failing on one sled for `stale_after` reports the sled down (the leader records it stale
/// and the retries then go on without it).
pub(super) async fn flusher(
    term: u64,
    store: Arc<SledStore>,
    mut jobs: mpsc::UnboundedReceiver<FlushJob>,
    done: mpsc::Sender<Input>,
    limits: FlushLimits,
    stopping: watch::Receiver<bool>,
    rewrite: Arc<std::sync::Mutex<Rewrite>>,
) {
    let window = limits.window;
    let locks = RangeLock::new();
    // A sled outage fails every entry in flight: one warning per interval, the rest at debug.
    let warn = Arc::new(common::logging::RateLimit::new(Duration::from_secs(10)));
    let started = tokio::time::Instant::now();
    let window = Arc::new(Semaphore::new(window.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((index, header, data, generation)) = jobs.recv().await {
        // Queued again by a later rewrite of the tail: that copy is the one to write.
        if rewrite
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .superseded(generation, index)
        {
            continue;
        }
        let (offset, len) = match &header {
            EntryHeader::Write { offset, len } => (*offset, u64::from(*len)),
            EntryHeader::Zero { offset, len, .. } => (*offset, *len),
            _ => continue,
        };
        if len == 0 {
            continue;
        }
        // Taken in log order: overlapping entries are written in log order.
        let guard = locks.lock(offset / BLOCK, (offset + len - 1) / BLOCK).await;
        let Ok(permit) = window.clone().acquire_owned().await else {
            return;
        };
        if *stopping.borrow() {
            break;
        }
        let store = store.clone();
        let done = done.clone();
        let stopping = stopping.clone();
        let warn = warn.clone();
        tasks.spawn(async move {
            let mut backoff = Duration::from_millis(20);
            // Per failing sled: when it first failed, and whether it was reported.
            let mut failing: HashMap<SledId, (tokio::time::Instant, bool)> = HashMap::new();
            let mut attempts = 0u32;
            let result = loop {
                let attempt = tokio::time::Instant::now();
                // The store is shared across terms: once this node leads again under a newer
                // term, this task's writes would carry the new credential while not ordered
                // with the new term's write-back. Its term is over: stop.
                if store.epoch() != Epoch(term) {
                    break Err(StoreError::Io(format!(
                        "write-back of term {term} ended: the store writes under epoch {} now",
                        store.epoch().0
                    )));
                }
                let r = match &header {
                    EntryHeader::Write { .. } => {
                        store.write(Epoch(term), offset, data.clone()).await
                    }
                    EntryHeader::Zero { free, .. } => {
                        store.zero(Epoch(term), offset, len, *free).await
                    }
                    _ => Ok(()),
                };
                match r {
                    Ok(()) => break Ok(()),
                    Err(e @ (StoreError::Deposed { .. } | StoreError::EpochEnded { .. })) => {
                        break Err(e);
                    }
                    // This leadership is over: no more retries.
                    Err(e) if *stopping.borrow() => break Err(e),
                    Err(e) => {
                        if let Some(sled) = failing_sled(&e) {
                            let now = tokio::time::Instant::now();
                            // Failing since the attempt began: a hung sled's request that
                            // timed out has been failing for the whole deadline.
                            let (since, reported) =
                                failing.entry(sled).or_insert((attempt, false));
                            if !*reported && now.duration_since(*since) >= limits.stale_after {
                                *reported = true;
                                let _ = done.send(Input::SledDown { term, sled }).await;
                            }
                        }
                        attempts += 1;
                        let now_ns = started.elapsed().as_nanos() as u64;
                        if attempts == 1
                            && let Some(suppressed) = warn.check(now_ns)
                        {
                            tracing::warn!(volume_id = %store.spec().id, index, error = %e,
                                suppressed, "write-back failed; retrying");
                        } else {
                            tracing::debug!(index, attempts, error = %e, "write-back failed again; retrying");
                        }
                        tokio::time::sleep(backoff).await;
                        // Short enough that a sled recorded stale stops delaying the write soon.
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            };
            let _ = done
                .send(Input::FlushDone {
                    term,
                    index,
                    generation,
                    result,
                })
                .await;
            drop((guard, permit));
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ids::Uuid128;

    #[test]
    fn only_copies_older_than_the_latest_rewrite_of_their_entry_are_superseded() {
        let r = Rewrite {
            generation: 2,
            from: 10,
        };
        // Written before the rewrite, above its start: superseded.
        assert!(r.superseded(0, 11));
        assert!(r.superseded(1, 11));
        // At or below the start (flushed already), or of the latest generation: they count.
        assert!(!r.superseded(0, 10));
        assert!(!r.superseded(2, 11));
        assert!(!Rewrite::default().superseded(0, 1));
    }

    #[test]
    fn a_full_sled_is_blamed_like_a_failing_one() {
        let s = Uuid128(7);
        assert_eq!(failing_sled(&StoreError::NoSpace(s)), Some(s));
        let down = StoreError::Replica {
            sled: s,
            msg: "connection refused".into(),
        };
        assert_eq!(failing_sled(&down), Some(s));
        assert_eq!(failing_sled(&StoreError::Io("no replica".into())), None);
    }
}
