//! An in-memory, thin-provisioned [`Volume`] and an export registry for tests and examples.
//!
//! [`MemVolume`] stores 64 KiB pages in a `BTreeMap`: a page is absent (a hole), allocated and
//! zero (after `WRITE_ZEROES` with `NO_HOLE`; no buffer is kept), or data. A 5 GiB volume that
//! was never written costs nothing, and its block status is honest: absent pages are
//! hole + zero, allocated zero pages are zero (not hole), written pages are data.
//!
//! FUA and FLUSH are no-ops (memory is as durable as this backend gets, and every write is
//! visible to every connection at once), so the volume advertises multi-conn. Test hooks:
//! [`MemVolume::pause`]/[`MemVolume::resume`] hold every operation at its start (to keep requests
//! in flight deterministically), [`MemVolume::poison`] makes reads of a range fail with an I/O
//! error at a known offset, [`MemVolume::close`] detaches the export, and builder options make
//! the volume read-only, give it a capacity (`ENOSPC` beyond it) or make fast zeroing
//! impossible.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use common::AlignedBuf;
use tokio::sync::watch;

use super::backend::{ExportInfo, Exports, Extent, Volume, VolumeError};

/// Granularity of allocation.
pub const PAGE_BYTES: u64 = 64 * 1024;
/// Most extents one block status answer carries (the client asks again for the rest).
const MAX_EXTENTS: usize = 1 << 16;

/// Advertised minimum block size.
pub const MIN_BLOCK: u32 = 512;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Advertised maximum block size.
pub const MAX_BLOCK: u32 = 32 << 20;

enum Page {
    /// Allocated, reads as zeroes, no buffer kept.
    Zero,
    /// Written data (exactly [`PAGE_BYTES`] long).
    Data(Box<[u8]>),
}

#[derive(Default)]
struct Store {
    pages: BTreeMap<u64, Page>,
}

/// A sparse in-memory volume. Build it with [`MemVolume::new`] and the `with_*` methods, then
/// share it in an `Arc`.
pub struct MemVolume {
    name: String,
    description: String,
    size: AtomicU64,
    read_only: bool,
    multi_conn: bool,
    fast_zero: AtomicBool,
    capacity_pages: Option<u64>,
    store: RwLock<Store>,
    poisoned: Mutex<Vec<Range<u64>>>,
    closed: watch::Sender<bool>,
    paused: watch::Sender<bool>,
    pending: AtomicUsize,
    flushes: AtomicU64,
}

impl fmt::Debug for MemVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemVolume")
            .field("name", &self.name)
            .field("size", &self.size())
            .field("read_only", &self.read_only)
            .field("allocated_bytes", &self.allocated_bytes())
            .finish()
    }
}

impl MemVolume {
    /// A writable, empty volume of `size` bytes.
    pub fn new(name: impl Into<String>, size: u64) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            size: AtomicU64::new(size),
            read_only: false,
            multi_conn: true,
            fast_zero: AtomicBool::new(true),
            capacity_pages: None,
            store: RwLock::new(Store::default()),
            poisoned: Mutex::new(Vec::new()),
            closed: watch::channel(false).0,
            paused: watch::channel(false).0,
            pending: AtomicUsize::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// Sets the description sent as `NBD_INFO_DESCRIPTION`.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Makes the volume read-only.
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Sets whether multi-conn is advertised (default true).
    pub fn with_multi_conn(mut self, multi_conn: bool) -> Self {
        self.multi_conn = multi_conn;
        self
    }

    /// Sets whether a fast write-zeroes is possible (default true).
    pub fn with_fast_zero(self, fast_zero: bool) -> Self {
        self.fast_zero.store(fast_zero, Ordering::Relaxed);
        self
    }

    /// Limits allocation to `bytes` (rounded up to pages); beyond it writes fail with
    /// [`VolumeError::NoSpace`].
    pub fn with_capacity(mut self, bytes: u64) -> Self {
        self.capacity_pages = Some(bytes.div_ceil(PAGE_BYTES));
        self
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Changes the size; bytes beyond a shrunk end are dropped (and read as zero if the volume
    /// grows again). Connections keep the size they negotiated.
    pub fn resize(&self, size: u64) {
        let mut st = self.write_store();
        self.size.store(size, Ordering::Release);
        let first_gone = size.div_ceil(PAGE_BYTES);
        let gone: Vec<u64> = st.pages.range(first_gone..).map(|(k, _)| *k).collect();
        for k in gone {
            st.pages.remove(&k);
        }
        if !size.is_multiple_of(PAGE_BYTES)
            && let Some(Page::Data(d)) = st.pages.get_mut(&(size / PAGE_BYTES))
        {
            d[(size % PAGE_BYTES) as usize..].fill(0);
        }
    }

    /// Bytes held in allocated pages (data or zero).
    pub fn allocated_bytes(&self) -> u64 {
        self.read_store().pages.len() as u64 * PAGE_BYTES
    }

    /// Bytes held in data pages.
    pub fn data_bytes(&self) -> u64 {
        self.read_store()
            .pages
            .values()
            .filter(|p| matches!(p, Page::Data(_)))
            .count() as u64
            * PAGE_BYTES
    }

    /// Detaches the export: [`Volume::closed`] resolves for every connection.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// True once [`MemVolume::close`] was called.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Holds every operation at its start until [`MemVolume::resume`].
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Lets held operations run.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Operations currently inside the volume (including those held by [`MemVolume::pause`]).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Number of `flush` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Acquire)
    }

    /// Makes reads overlapping `range` fail with an I/O error at the first poisoned byte.
    pub fn poison(&self, range: Range<u64>) {
        self.poisoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(range);
    }

    fn read_store(&self) -> std::sync::RwLockReadGuard<'_, Store> {
        self.store.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_store(&self) -> std::sync::RwLockWriteGuard<'_, Store> {
        self.store.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64, VolumeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(end),
            _ => Err(VolumeError::OutOfRange {
                offset,
                length: len,
            }),
        }
    }

    fn check_writable(&self) -> Result<(), VolumeError> {
        if self.read_only {
            Err(VolumeError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Waits while paused; the returned guard counts the operation as pending.
    async fn enter(&self) -> PendingGuard<'_> {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let guard = PendingGuard(&self.pending);
        let mut rx = self.paused.subscribe();
        // The sender lives in `self`, so this only ends when not paused.
        let _ = rx.wait_for(|paused| !*paused).await;
        guard
    }

    fn read_now(&self, offset: u64, len: u32) -> Result<AlignedBuf, VolumeError> {
        let end = self.check_range(offset, u64::from(len))?;
        if let Some(bad) = self
            .poisoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|r| r.start < end && offset < r.end)
        {
            return Err(VolumeError::Io {
                offset: Some(bad.start.max(offset)),
                source: std::io::Error::other("poisoned range"),
            });
        }
        let mut buf = AlignedBuf::zeroed(len as usize);
        if len == 0 {
            return Ok(buf);
        }
        let st = self.read_store();
        for (&idx, page) in st.pages.range(offset / PAGE_BYTES..=(end - 1) / PAGE_BYTES) {
            if let Page::Data(d) = page {
                let ps = idx * PAGE_BYTES;
                let s = ps.max(offset);
                let e = (ps + PAGE_BYTES).min(end);
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - ps) as usize..(e - ps) as usize]);
            }
        }
        Ok(buf)
    }

    fn new_pages(st: &Store, pages: Range<u64>) -> u64 {
        let present = st.pages.range(pages.clone()).count() as u64;
        (pages.end - pages.start) - present
    }

    fn check_capacity(&self, st: &Store, new_pages: u64) -> Result<(), VolumeError> {
        match self.capacity_pages {
            Some(cap) if st.pages.len() as u64 + new_pages > cap => Err(VolumeError::NoSpace),
            _ => Ok(()),
        }
    }

    fn write_now(&self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.check_writable()?;
        let end = self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut st = self.write_store();
        let pages = offset / PAGE_BYTES..(end - 1) / PAGE_BYTES + 1;
        self.check_capacity(&st, Self::new_pages(&st, pages))?;
        let mut pos = offset;
        while pos < end {
            let idx = pos / PAGE_BYTES;
            let ps = idx * PAGE_BYTES;
            let e = (ps + PAGE_BYTES).min(end);
            let src = &data[(pos - offset) as usize..(e - offset) as usize];
            let page = match st.pages.entry(idx) {
                Entry::Vacant(v) => v.insert(Page::Zero),
                Entry::Occupied(o) => o.into_mut(),
            };
            if let Page::Zero = page {
                *page = Page::Data(vec![0u8; PAGE_BYTES as usize].into_boxed_slice());
            }
            if let Page::Data(d) = page {
                d[(pos - ps) as usize..(e - ps) as usize].copy_from_slice(src);
            }
            pos = e;
        }
        Ok(())
    }

    /// Zeroes `[s, e)` inside page `idx`; with `no_hole` an absent page becomes allocated.
    fn zero_partial(st: &mut Store, idx: u64, s: u64, e: u64, no_hole: bool) {
        let ps = idx * PAGE_BYTES;
        match st.pages.get_mut(&idx) {
            Some(Page::Data(d)) => d[(s - ps) as usize..(e - ps) as usize].fill(0),
            Some(Page::Zero) => {}
            None => {
                if no_hole {
                    st.pages.insert(idx, Page::Zero);
                }
            }
        }
    }

    fn zero_now(&self, offset: u64, len: u64, no_hole: bool) -> Result<(), VolumeError> {
        self.check_writable()?;
        let end = self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut st = self.write_store();
        let first_full = offset.div_ceil(PAGE_BYTES);
        let end_full = end / PAGE_BYTES;
        if no_hole {
            let touched = offset / PAGE_BYTES..(end - 1) / PAGE_BYTES + 1;
            self.check_capacity(&st, Self::new_pages(&st, touched))?;
        }
        if first_full > end_full {
            // Inside one page, touching neither of its ends.
            Self::zero_partial(&mut st, offset / PAGE_BYTES, offset, end, no_hole);
            return Ok(());
        }
        if !offset.is_multiple_of(PAGE_BYTES) {
            Self::zero_partial(
                &mut st,
                offset / PAGE_BYTES,
                offset,
                first_full * PAGE_BYTES,
                no_hole,
            );
        }
        if !end.is_multiple_of(PAGE_BYTES) {
            Self::zero_partial(&mut st, end_full, end_full * PAGE_BYTES, end, no_hole);
        }
        if no_hole {
            for idx in first_full..end_full {
                st.pages.insert(idx, Page::Zero);
            }
        } else {
            let gone: Vec<u64> = st
                .pages
                .range(first_full..end_full)
                .map(|(k, _)| *k)
                .collect();
            for k in gone {
                st.pages.remove(&k);
            }
        }
        Ok(())
    }

    fn block_status_now(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        let end = self.check_range(offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        fn push(out: &mut Vec<Extent>, e: Extent) {
            match out.last_mut() {
                Some(last) if last.hole == e.hole && last.zero == e.zero => last.length += e.length,
                _ => out.push(e),
            }
        }
        let st = self.read_store();
        let mut pos = offset;
        for (&idx, page) in st.pages.range(offset / PAGE_BYTES..=(end - 1) / PAGE_BYTES) {
            if out.len() >= MAX_EXTENTS {
                return Ok(out);
            }
            let ps = idx * PAGE_BYTES;
            let s = ps.max(offset);
            let e = (ps + PAGE_BYTES).min(end);
            if s > pos {
                push(&mut out, Extent::hole(s - pos));
            }
            push(
                &mut out,
                match page {
                    Page::Zero => Extent::zeroed(e - s),
                    Page::Data(_) => Extent::data(e - s),
                },
            );
            pos = e;
        }
        if pos < end {
            push(&mut out, Extent::hole(end - pos));
        }
        Ok(out)
    }
}

struct PendingGuard<'a>(&'a AtomicUsize);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Volume for MemVolume {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.size(),
            read_only: self.read_only,
            multi_conn: self.multi_conn,
            min_block: MIN_BLOCK,
            preferred_block: PREFERRED_BLOCK,
            max_block: MAX_BLOCK,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, VolumeError> {
        let _g = self.enter().await;
        self.read_now(offset, len)
    }

    async fn write(&self, offset: u64, data: AlignedBuf, _fua: bool) -> Result<(), VolumeError> {
        let _g = self.enter().await;
        self.write_now(offset, &data)
    }

    async fn flush(&self) -> Result<(), VolumeError> {
        let _g = self.enter().await;
        self.flushes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), VolumeError> {
        let _g = self.enter().await;
        // Trimmed ranges read back as zero; whole pages become holes again.
        self.zero_now(offset, len, false)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
        _fua: bool,
    ) -> Result<(), VolumeError> {
        let _g = self.enter().await;
        if fast_only && !self.fast_zero.load(Ordering::Relaxed) {
            return Err(VolumeError::NotSupported {
                reason: "fast zeroing is disabled on this volume",
            });
        }
        self.zero_now(offset, len, no_hole)
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        let _g = self.enter().await;
        self.block_status_now(offset, len)
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let _g = self.enter().await;
        self.check_range(offset, len).map(|_| ())
    }

    async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        // The sender lives in `self`; this resolves once `close` was called.
        let _ = rx.wait_for(|closed| *closed).await;
    }
}

/// A registry of [`MemVolume`]s by name.
#[derive(Debug, Default)]
pub struct MemExports {
    volumes: RwLock<BTreeMap<String, Arc<MemVolume>>>,
    settling: std::sync::atomic::AtomicBool,
}

impl MemExports {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a volume under its own name; returns the one it replaced.
    pub fn add(&self, volume: Arc<MemVolume>) -> Option<Arc<MemVolume>> {
        self.volumes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(volume.name.clone(), volume)
    }

    /// Makes the registry report that it is settling ([`Exports::settling`]), as a head node
    /// does just after it starts.
    pub fn set_settling(&self, settling: bool) {
        self.settling.store(settling, Ordering::Release);
    }

    /// Removes a volume: new connections no longer find it (existing ones carry on until the
    /// volume is closed).
    pub fn remove(&self, name: &str) -> Option<Arc<MemVolume>> {
        self.volumes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
    }
}

impl Exports for MemExports {
    type V = MemVolume;

    /// The named volume; the empty name selects the only volume when there is exactly one.
    fn get(&self, name: &str) -> Option<Arc<MemVolume>> {
        let v = self.volumes.read().unwrap_or_else(PoisonError::into_inner);
        if name.is_empty() && v.len() == 1 {
            return v.values().next().cloned();
        }
        v.get(name).cloned()
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.volumes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|v| v.info())
            .collect()
    }

    fn settling(&self) -> bool {
        self.settling.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: u64 = PAGE_BYTES;

    #[test]
    fn thin_volume_costs_nothing_and_reads_zero() {
        let v = MemVolume::new("v", 5 << 30);
        assert_eq!(v.allocated_bytes(), 0);
        let b = v.read_now((5 << 30) - 4096, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert_eq!(
            v.block_status_now(0, 5 << 30).unwrap(),
            vec![Extent::hole(5 << 30)]
        );
    }

    #[test]
    fn unaligned_write_read_and_status() {
        let v = MemVolume::new("v", 4 * P);
        let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8 + 1).collect();
        v.write_now(P - 100, &data).unwrap();
        assert_eq!(&v.read_now(P - 100, 3000).unwrap()[..], &data[..]);
        let around = v.read_now(P - 200, 3200).unwrap();
        assert!(around[..100].iter().all(|&x| x == 0));
        assert!(around[3100..].iter().all(|&x| x == 0));
        assert_eq!(v.data_bytes(), 2 * P);
        assert_eq!(
            v.block_status_now(0, 4 * P).unwrap(),
            vec![Extent::data(2 * P), Extent::hole(2 * P)]
        );
        // Status of a sub-range is clipped to it.
        assert_eq!(
            v.block_status_now(P + 10, P).unwrap(),
            vec![Extent::data(P - 10), Extent::hole(10)]
        );
    }

    #[test]
    fn zeroes_with_and_without_holes() {
        let v = MemVolume::new("v", 8 * P);
        v.write_now(0, &vec![0xab; (8 * P) as usize]).unwrap();
        // Without NO_HOLE whole pages are dropped, partial ones zeroed in place.
        v.zero_now(P / 2, 2 * P, false).unwrap();
        assert_eq!(
            v.block_status_now(0, 8 * P).unwrap(),
            vec![Extent::data(P), Extent::hole(P), Extent::data(6 * P)]
        );
        let r = v.read_now(0, (3 * P) as u32).unwrap();
        assert!(r[..(P / 2) as usize].iter().all(|&x| x == 0xab));
        assert!(
            r[(P / 2) as usize..(5 * P / 2) as usize]
                .iter()
                .all(|&x| x == 0)
        );
        assert!(r[(5 * P / 2) as usize..].iter().all(|&x| x == 0xab));
        // With NO_HOLE the pages stay allocated, reported zero and not hole.
        v.zero_now(4 * P, 2 * P, true).unwrap();
        assert_eq!(
            v.block_status_now(4 * P, 2 * P).unwrap(),
            vec![Extent::zeroed(2 * P)]
        );
        // NO_HOLE on a hole allocates it.
        v.zero_now(2 * P, P, true).unwrap();
        assert_eq!(
            v.block_status_now(2 * P, P).unwrap(),
            vec![Extent::zeroed(P)]
        );
        assert!(v.read_now(4 * P, P as u32).unwrap().iter().all(|&x| x == 0));
    }

    #[test]
    fn huge_no_hole_zeroing_keeps_no_buffers() {
        let v = MemVolume::new("v", 5 << 30);
        v.zero_now(0, 4 << 30, true).unwrap();
        assert_eq!(v.allocated_bytes(), 4 << 30);
        assert_eq!(v.data_bytes(), 0);
        assert_eq!(
            v.block_status_now(0, 5 << 30).unwrap(),
            vec![Extent::zeroed(4 << 30), Extent::hole(1 << 30)]
        );
    }

    #[test]
    fn range_capacity_read_only_and_poison() {
        let v = MemVolume::new("v", 10 * P).with_capacity(2 * P);
        assert!(matches!(
            v.write_now(10 * P - 1, &[1, 2]),
            Err(VolumeError::OutOfRange { .. })
        ));
        assert!(matches!(
            v.read_now(u64::MAX, 1),
            Err(VolumeError::OutOfRange { .. })
        ));
        v.write_now(0, &[1; 10]).unwrap();
        v.write_now(P, &[1; 10]).unwrap();
        assert!(matches!(
            v.write_now(5 * P, &[1; 10]),
            Err(VolumeError::NoSpace)
        ));
        // Rewriting allocated pages needs no space.
        v.write_now(0, &[2; 10]).unwrap();
        assert!(matches!(
            v.zero_now(5 * P, P, true),
            Err(VolumeError::NoSpace)
        ));
        v.poison(3 * P..3 * P + 10);
        match v.read_now(2 * P, (2 * P) as u32) {
            Err(VolumeError::Io { offset, .. }) => assert_eq!(offset, Some(3 * P)),
            other => panic!("{other:?}"),
        }
        assert!(v.read_now(0, 100).is_ok());
        let ro = MemVolume::new("r", P).with_read_only(true);
        assert!(matches!(ro.write_now(0, &[1]), Err(VolumeError::ReadOnly)));
        assert!(matches!(
            ro.zero_now(0, 1, false),
            Err(VolumeError::ReadOnly)
        ));
    }

    #[test]
    fn resize_drops_the_tail() {
        let v = MemVolume::new("v", 4 * P);
        v.write_now(0, &vec![7; (4 * P) as usize]).unwrap();
        v.resize(P + 100);
        assert_eq!(v.info().size, P + 100);
        v.resize(4 * P);
        let r = v.read_now(P, (3 * P) as u32).unwrap();
        assert!(r[..100].iter().all(|&x| x == 7));
        assert!(r[100..].iter().all(|&x| x == 0));
    }

    #[tokio::test]
    async fn pause_close_and_registry() {
        let v = Arc::new(MemVolume::new("a", P));
        v.pause();
        let v2 = v.clone();
        let t = tokio::spawn(async move { v2.flush().await });
        while v.pending() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(v.flush_count(), 0);
        v.resume();
        t.await.unwrap().unwrap();
        assert_eq!(v.flush_count(), 1);
        assert_eq!(v.pending(), 0);
        assert!(matches!(
            v.write_zeroes(0, 10, false, true, false).await,
            Ok(())
        ));
        let slow = MemVolume::new("s", P).with_fast_zero(false);
        assert!(matches!(
            slow.write_zeroes(0, 10, false, true, false).await,
            Err(VolumeError::NotSupported { .. })
        ));
        slow.write_zeroes(0, 10, false, false, false).await.unwrap();

        let reg = MemExports::new();
        reg.add(v.clone());
        assert!(reg.get("").is_some(), "sole export is the default");
        reg.add(Arc::new(MemVolume::new("b", P)));
        assert!(reg.get("").is_none());
        assert_eq!(
            reg.list()
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(reg.remove("a").is_some());
        assert!(reg.get("a").is_none());
        v.close();
        assert!(v.is_closed());
        v.closed().await; // resolves at once once closed
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, u32, u8),
        Zero(u64, u32, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let size = 6 * P;
        prop_oneof![
            (0..size, 1u32..(2 * P) as u32, 1u8..255).prop_map(move |(o, l, b)| {
                let l = (l as u64).min(size - o).max(1) as u32;
                Op::Write(o.min(size - 1), l, b)
            }),
            (0..size, 1u32..(3 * P) as u32, any::<bool>()).prop_map(move |(o, l, h)| {
                let o = o.min(size - 1);
                Op::Zero(o, (l as u64).min(size - o) as u32, h)
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Against a flat model: every byte reads back right, and block status never calls a
        /// range zero (or a hole) unless every byte in it is zero.
        #[test]
        fn matches_a_flat_model(ops in proptest::collection::vec(op(), 1..12), q in 0u64..6 * P, ql in 1u64..6 * P) {
            let size = 6 * P;
            let v = MemVolume::new("m", size);
            let mut model = vec![0u8; size as usize];
            for op in &ops {
                match *op {
                    Op::Write(o, l, b) => {
                        v.write_now(o, &vec![b; l as usize]).unwrap();
                        model[o as usize..(o + u64::from(l)) as usize].fill(b);
                    }
                    Op::Zero(o, l, h) => {
                        v.zero_now(o, u64::from(l), h).unwrap();
                        model[o as usize..(o + u64::from(l)) as usize].fill(0);
                    }
                }
            }
            prop_assert_eq!(&v.read_now(0, size as u32).unwrap()[..], &model[..]);
            let ql = ql.min(size - q);
            if ql > 0 {
                let ext = v.block_status_now(q, ql).unwrap();
                prop_assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), ql);
                let mut pos = q;
                for e in ext {
                    prop_assert!(e.length > 0);
                    if e.zero || e.hole {
                        prop_assert!(model[pos as usize..(pos + e.length) as usize].iter().all(|&x| x == 0));
                    }
                    pos += e.length;
                }
            }
        }
    }
}
