//! Cleaning: writing back the checksums of idle dirty regions and clearing their dirty bits.

use super::*;

impl<E: IoEngine> DeviceCore<E> {
    // ----------------------------------------------------------------------------- cleaning

    /// Periodic work: write back checksums of idle dirty regions, clear their dirty bits, and
    /// trim the checksum cache.
    pub fn tick(&mut self) {
        let now = self.now();
        self.last_tick_ns = now;
        let over = self.regions.len() > self.cfg.max_dirty_regions;
        let idle_ns = self.cfg.clean_after.as_nanos() as u64;
        let to_flush = self.regions_to_clean((!over).then_some(idle_ns));
        for (slot, r) in to_flush {
            self.flush_region(slot, r);
        }
        self.start_group_fsync();
        self.evict_pages();
        self.run_ready();
        self.update_gauges();
    }

    /// Whether a region's checksums may be written back now. A checksum page may only be
    /// written while its region is durably dirty (a torn page write in a region the device says
    /// is clean would read as corruption), with no write in flight, and after its cached
    /// writes are durable (else a power cut could leave checksums of data that never landed).
    pub(super) fn clean_state(&self, slot: u64, r: u64, reg: &Region) -> Cleanable {
        if reg.failed
            || reg.flushing
            || reg.writes_in_flight > 0
            || !self.bit_durable(slot, r)
            || self.freeing.contains(&slot)
        {
            Cleanable::No
        } else if reg.needs_sync > self.sync_done {
            Cleanable::AfterSync
        } else {
            Cleanable::Now
        }
    }

    /// The regions whose checksums may be written back now (all of them, or the idle ones);
    /// asks for a group fsync when some wait only for their cached writes to be durable.
    pub(super) fn regions_to_clean(&mut self, min_idle_ns: Option<u64>) -> Vec<(u64, u64)> {
        let now = self.now();
        let mut out = Vec::new();
        let mut want_sync = false;
        for (&(slot, r), reg) in &self.regions {
            let idle = min_idle_ns.is_none_or(|d| now.saturating_sub(reg.last_write_ns) >= d);
            match self.clean_state(slot, r, reg) {
                Cleanable::Now if idle => out.push((slot, r)),
                Cleanable::AfterSync if idle => want_sync = true,
                _ => {}
            }
        }
        if want_sync {
            self.sync_wanted = true;
        }
        out
    }

    pub(super) fn flush_region(&mut self, slot: u64, r: u64) {
        let Some(page) = self.pages.get(&(slot, r)).filter(|p| p.loaded) else {
            // A dirty region whose page was never loaded has no changes to write.
            self.regions.remove(&(slot, r));
            self.clear_dirty(slot, r);
            return;
        };
        let mut buf = AlignedBuf::zeroed(PAGE as usize);
        for (i, e) in page.entries.iter().enumerate() {
            e.encode(&mut buf[i * CRC_ENTRY as usize..(i + 1) * CRC_ENTRY as usize]);
        }
        if let Some(reg) = self.regions.get_mut(&(slot, r)) {
            reg.flushing = true;
            reg.changed = false;
        }
        *self.slot_flushing.entry(slot).or_default() += 1;
        let pos = self.geo.crc_page_pos(slot, r);
        self.submit(
            OpCtx::CrcFlush(slot, r),
            OpKind::Write {
                buf,
                offset: pos,
                dsync: true,
            },
        );
    }

    pub(super) fn flush_done(&mut self, slot: u64, r: u64, res: std::io::Result<usize>) {
        if let Some(n) = self.slot_flushing.get_mut(&slot) {
            *n -= 1;
            if *n == 0 {
                self.slot_flushing.remove(&slot);
                self.wake_range_waiters();
            }
        }
        let Some(reg) = self.regions.get_mut(&(slot, r)) else {
            return;
        };
        reg.flushing = false;
        if let Err(e) = res {
            tracing::warn!(device = %self.path, slot, region = r, error = %e,
                "writing back checksums failed; the region stays dirty");
            return;
        }
        if reg.changed || reg.writes_in_flight > 0 {
            return;
        }
        self.regions.remove(&(slot, r));
        self.clear_dirty(slot, r);
    }

    pub(super) fn bit_durable(&self, slot: u64, r: u64) -> bool {
        self.durable_bits[slot as usize][(r / 8) as usize] & (1 << (r % 8)) != 0
    }

    /// Clears a region's dirty bit. The bit stops counting as durable at once: a write that
    /// comes next must set it again and wait for a commit that writes it set, or the commit
    /// clearing it could land after the write was acknowledged.
    pub(super) fn clear_dirty(&mut self, slot: u64, r: u64) {
        self.tables.chunks[slot as usize].set_dirty(r, false);
        self.durable_bits[slot as usize][(r / 8) as usize] &= !(1 << (r % 8));
        self.lane.touch_chunk(slot);
    }

    pub(super) fn evict_pages(&mut self) {
        let limit = self.cfg.crc_cache_pages;
        if self.pages.len() <= limit {
            return;
        }
        let mut candidates: Vec<(u64, (u64, u64))> = self
            .pages
            .iter()
            .filter(|(k, p)| {
                p.loaded && p.pins == 0 && p.waiters.is_empty() && !self.regions.contains_key(k)
            })
            .map(|(k, p)| (p.last_use, *k))
            .collect();
        candidates.sort_unstable();
        let excess = self.pages.len() - limit;
        for (_, k) in candidates.into_iter().take(excess) {
            self.pages.remove(&k);
        }
    }

    /// Writes back every dirty region and waits until the tables say the device is clean (used at
    /// shutdown, so the next open needs no recovery). Blocks.
    pub fn flush_all(&mut self, doorbell: &Doorbell) -> std::io::Result<()> {
        for _ in 0..10_000 {
            let keys = self.regions_to_clean(None);
            for (slot, r) in keys {
                self.flush_region(slot, r);
            }
            self.start_group_fsync();
            self.run_ready();
            if self.regions.is_empty() && self.ops.is_empty() && self.lane.idle() {
                return Ok(());
            }
            self.poll(Some(Duration::from_millis(50)), doorbell)?;
        }
        Err(std::io::Error::other("device did not become clean"))
    }

    /// Milliseconds until the next tick is due (for the thread's wait).
    pub fn tick_due_in(&self) -> Duration {
        let period = (self.cfg.clean_after / 4).max(Duration::from_millis(10));
        let since = Duration::from_nanos(self.now().saturating_sub(self.last_tick_ns));
        period.saturating_sub(since)
    }
}
