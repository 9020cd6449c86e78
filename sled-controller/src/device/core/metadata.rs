//! Chunk allocation, freeing and claims, and the metadata lane that makes them durable.

use super::*;
use crate::device::TOMBSTONE;

impl<E: IoEngine> DeviceCore<E> {
    // ----------------------------------------------------------------------------- allocation

    pub(super) fn start_alloc(
        &mut self,
        volume: VolumeId,
        chunk: ChunkIndex,
    ) -> Result<u64, DevError> {
        let Some(slot) = self.free.pop_first() else {
            return Err(DevError::NoSpace);
        };
        self.owners
            .insert((volume, chunk), SlotState::Allocating(slot));
        self.allocs.insert(
            slot,
            Alloc {
                volume,
                chunk,
                ops_left: 2,
                failed: None,
                waiters: Vec::new(),
                committing: false,
            },
        );
        // A reused slot holds its previous owner's data and checksums: zero both, durably,
        // before the table says the slot is this volume's.
        self.submit(
            OpCtx::AllocZero(slot),
            OpKind::ZeroRange {
                offset: self.geo.data_pos(slot, 0),
                len: self.geo.chunk_size,
            },
        );
        self.submit(
            OpCtx::AllocZero(slot),
            OpKind::ZeroRange {
                offset: self.geo.crc_page_pos(slot, 0),
                len: self.geo.crc_bytes_per_chunk(),
            },
        );
        Ok(slot)
    }

    pub(super) fn alloc_failed(&mut self, slot: u64, why: String) {
        let Some(a) = self.allocs.remove(&slot) else {
            return;
        };
        tracing::error!(device = %self.path, slot, error = %why, "chunk allocation failed");
        self.owners.remove(&(a.volume, a.chunk));
        self.free.insert(slot);
        for id in a.waiters {
            if let Some(job) = self.jobs.remove(&id) {
                self.finish(job, Err(DevError::Io(why.clone())));
            }
        }
    }

    // ----------------------------------------------------------------------------- free

    pub(super) fn start_free(&mut self, id: u64, job: &mut Job) -> Park {
        let slot = job.slot.expect("located");
        let fence = job.fence.expect("free carries a fence");
        if let Err(e) = self.check_fence(job.volume, fence) {
            self.fence_refused(job.volume, fence, &e);
            return Park::Done(Err(e));
        }
        *self.mutations.entry(job.volume).or_default() += 1;
        job.counted = true;
        job.undo = Some(self.tables.chunks[slot as usize]);
        self.tables.chunks[slot as usize] = ChunkEntry {
            alloc_gen: self.tables.chunks[slot as usize].alloc_gen,
            ..ChunkEntry::default()
        };
        self.lane.touch_chunk(slot);
        self.lane.wait(Waiter::Job(id));
        // No checksum write-back may start for a slot on its way out. Its regions stay: should
        // the free fail, their dirty state is what keeps the checksums right (and their pages
        // in the cache).
        self.freeing.insert(slot);
        Park::WaitAt(Stage::FreeCommit)
    }

    pub(super) fn step_free_committed(&mut self, job: &mut Job) -> Park {
        let slot = job.slot.expect("located");
        self.freeing.remove(&slot);
        self.owners.remove(&(job.volume, job.chunk));
        self.pages.retain(|(s, _), _| *s != slot);
        self.regions.retain(|(s, _), _| *s != slot);
        // Reclaim the space; the slot returns to the free list once the discard has completed,
        // so no later write to a reused slot can be overtaken by it.
        self.submit(
            OpCtx::FreeDiscard(slot),
            OpKind::ZeroRange {
                offset: self.geo.data_pos(slot, 0),
                len: self.geo.chunk_size,
            },
        );
        Park::Done(Ok(None))
    }

    // ----------------------------------------------------------------------------- claims

    /// Retires a volume: its fence record becomes a tombstone, a claim no holder can pass,
    /// whose slot a new volume may take when the table is full. Only by the current holder, and
    /// only once the volume holds no chunk here.
    pub(super) fn retire(&mut self, volume: VolumeId, h: Holder, reply: Once<Holder>) {
        if !self.fences.contains_key(&volume) {
            // Never claimed here: nothing to retire.
            let _ = reply.send(Ok(TOMBSTONE));
            return;
        }
        if let Err(e) = self.check_fence(volume, h) {
            if self.fences.get(&volume).and_then(|r| r.durable) == Some(TOMBSTONE) {
                // Retired already (a retry).
                let _ = reply.send(Ok(TOMBSTONE));
                return;
            }
            self.fence_refused(volume, h, &e);
            let _ = reply.send(Err(e));
            return;
        }
        let chunks = self.owners.keys().filter(|(v, _)| *v == volume).count() as u64;
        if chunks > 0 {
            let _ = reply.send(Err(DevError::NotEmpty { chunks }));
            return;
        }
        tracing::info!(volume_id = %volume, device = %self.path, "retiring volume");
        // The highest claim there can be: it waits for the volume's mutations in flight like
        // any claim, and nothing older can pass it afterwards.
        self.claim(volume, TOMBSTONE, reply);
    }

    pub(super) fn claim(&mut self, volume: VolumeId, h: Holder, reply: Once<Holder>) {
        let rec = self.fences.entry(volume).or_default();
        let effective = rec.pending.as_ref().map(|p| p.holder).or(rec.durable);
        if let Some(e) = effective {
            if h.epoch < e.epoch || (h.epoch == e.epoch && h.node != e.node) {
                self.metrics.claims.with_label_values(&["refused"]).inc();
                tracing::warn!(volume_id = %volume, epoch = h.epoch.0, node_id = h.node.0,
                    stored_epoch = e.epoch.0, stored_holder = e.node.0, device = %self.path,
                    "refused a stale claim");
                let _ = reply.send(Err(DevError::Fenced { current: e }));
                return;
            }
            if h == e {
                match &mut rec.pending {
                    Some(p) if p.holder == h => p.waiters.push(reply),
                    _ => {
                        let _ = reply.send(Ok(h));
                    }
                }
                return;
            }
        }
        // A higher claim: it supersedes any pending one.
        if let Some(old) = rec.pending.take() {
            for w in old.waiters {
                let _ = w.send(Err(DevError::Fenced { current: h }));
            }
        }
        rec.pending = Some(PendingClaim {
            holder: h,
            waiters: vec![reply],
            writing: false,
        });
        self.try_finish_claim(volume);
        self.run_ready();
    }

    /// Writes a pending claim once no older mutation is in flight.
    pub(super) fn try_finish_claim(&mut self, volume: VolumeId) {
        if self.mutations.get(&volume).copied().unwrap_or(0) > 0 {
            return;
        }
        let Some(rec) = self.fences.get_mut(&volume) else {
            return;
        };
        let Some(p) = rec.pending.as_mut() else {
            return;
        };
        if p.writing {
            return;
        }
        let slot = match rec.slot {
            Some(s) => s,
            None => match self.free_fence_slots.pop_first() {
                Some(s) => {
                    rec.slot = Some(s);
                    s
                }
                None => {
                    // A full table: a retired volume's tombstone gives its place up.
                    let victim = self
                        .fences
                        .iter()
                        .find(|(v, r)| {
                            **v != volume && r.pending.is_none() && r.durable == Some(TOMBSTONE)
                        })
                        .and_then(|(v, r)| Some((*v, r.slot?)));
                    let Some(rec) = self.fences.get_mut(&volume) else {
                        return;
                    };
                    match victim {
                        Some((gone, s)) => {
                            rec.slot = Some(s);
                            self.fences.remove(&gone);
                            tracing::info!(volume_id = %volume, retired = %gone, slot = s,
                                device = %self.path, "fence table full: reusing a retired volume's slot");
                            s
                        }
                        None => {
                            let p = rec.pending.take().expect("checked");
                            for w in p.waiters {
                                let _ = w.send(Err(DevError::FenceTableFull));
                            }
                            return;
                        }
                    }
                }
            },
        };
        let Some(rec) = self.fences.get_mut(&volume) else {
            return;
        };
        let Some(p) = rec.pending.as_mut() else {
            return;
        };
        p.writing = true;
        self.tables.fences[slot as usize] = Some(FenceEntry {
            volume,
            epoch: p.holder.epoch,
            holder: p.holder.node,
        });
        self.lane.touch_fence(slot);
    }

    // ----------------------------------------------------------------------------- metadata lane

    pub(super) fn pump_lane(&mut self) {
        if self.lane.inflight.is_some() {
            return;
        }
        if self.lane.dirty.is_empty() {
            // Nothing to write: everything changed so far is durable.
            for Waiter::Job(id) in std::mem::take(&mut self.lane.next_waiters) {
                self.ready.push_back(id);
            }
            return;
        }
        let dirty = std::mem::take(&mut self.lane.dirty);
        let mut batch = Batch {
            remaining: 0,
            waiters: std::mem::take(&mut self.lane.next_waiters),
            failed: None,
            pages: Vec::new(),
            chunk_snapshots: Vec::new(),
            fence_snapshots: Vec::new(),
        };
        let writes: Vec<_> = dirty
            .into_iter()
            .map(|(t, p)| self.tables.next_version(&self.geo, t.table(), p))
            .collect();
        for w in writes {
            batch.pages.push((w.table, w.page, w.copy, w.seq));
            batch.chunk_snapshots.extend(w.chunk_snapshot);
            batch.fence_snapshots.extend(w.fence_snapshot);
            batch.remaining += 1;
            self.submit(
                OpCtx::Meta,
                OpKind::Write {
                    buf: w.bytes,
                    offset: w.pos,
                    dsync: true,
                },
            );
        }
        self.lane.inflight = Some(batch);
    }

    pub(super) fn meta_done(&mut self, result: std::io::Result<usize>) {
        let Some(batch) = self.lane.inflight.as_mut() else {
            return;
        };
        if let Err(e) = result {
            batch.failed.get_or_insert(e.to_string());
        }
        batch.remaining -= 1;
        if batch.remaining > 0 {
            return;
        }
        let batch = self.lane.inflight.take().expect("checked");
        self.lane.commits += 1;
        if let Some(why) = batch.failed {
            // The old copies are intact; the change stays in memory and is retried with the
            // next batch. Waiters fail: their change is not known durable.
            tracing::error!(device = %self.path, error = %why, "metadata write failed");
            // Which of the batch's pages reached the disk is unknown, and one that did may say
            // less than memory does (a free undone below): until a later batch has rewritten
            // them, none of their chunks' dirty bits counts as durable.
            for (slot, _) in &batch.chunk_snapshots {
                self.durable_bits[*slot as usize] = [0; 64];
            }
            for (t, p, _, _) in &batch.pages {
                let key = match t {
                    Table::Chunks => TableKey::Chunks,
                    Table::Fences => TableKey::Fences,
                };
                self.lane.dirty.insert((key, *p));
            }
            for Waiter::Job(id) in batch.waiters {
                if let Some(mut job) = self.jobs.remove(&id) {
                    // A free that failed is undone, not left to the next batch: the chunk
                    // stays its volume's (its owner entry was never dropped), so the table must
                    // say so too, or a later batch would make "free" durable under live data.
                    if let (Some(undo), Some(slot)) = (job.undo.take(), job.slot) {
                        self.tables.chunks[slot as usize] = undo;
                        self.lane.touch_chunk(slot);
                        self.freeing.remove(&slot);
                    }
                    self.finish(job, Err(DevError::Io(why.clone())));
                }
            }
            return;
        }
        for (t, p, copy, seq) in &batch.pages {
            *self.tables.page_state(*t, *p) = PageState {
                copy: *copy,
                seq: *seq,
            };
        }
        for (slot, e) in &batch.chunk_snapshots {
            // Durable and not about to be cleared: a bit cleared in memory since this batch
            // started will be written cleared by the next one.
            let mem = self.tables.chunks[*slot as usize].dirty;
            let d = &mut self.durable_bits[*slot as usize];
            for i in 0..d.len() {
                d[i] = e.dirty[i] & mem[i];
            }
            if let Some(a) = self.allocs.get(slot)
                && a.committing
                && e.allocated
            {
                let a = self.allocs.remove(slot).expect("checked");
                self.owners
                    .insert((a.volume, a.chunk), SlotState::Ready(*slot));
                self.ready.extend(a.waiters);
            }
        }
        for f in &batch.fence_snapshots {
            let h = Holder {
                epoch: f.epoch,
                node: f.holder,
            };
            let rec = self.fences.entry(f.volume).or_default();
            if rec.durable.is_none_or(|d| d.epoch < h.epoch) {
                rec.durable = Some(h);
            }
            if let Some(p) = &rec.pending
                && p.holder == h
                && p.writing
            {
                let p = rec.pending.take().expect("checked");
                self.metrics.claims.with_label_values(&["accepted"]).inc();
                tracing::info!(volume_id = %f.volume, epoch = h.epoch.0, node_id = h.node.0,
                    device = %self.path, "claim durable");
                for w in p.waiters {
                    let _ = w.send(Ok(h));
                }
            }
        }
        // Free jobs advance past their commit.
        for Waiter::Job(id) in batch.waiters {
            self.ready.push_back(id);
        }
        self.update_gauges();
    }
}
