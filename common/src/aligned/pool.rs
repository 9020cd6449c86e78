//! A pool of aligned buffers carved from one long-lived region.
//!
//! An io_uring can register memory once and then read and write it with `READ_FIXED` /
//! `WRITE_FIXED`, which skips pinning the pages of every `O_DIRECT` operation. That needs the
//! data to live in memory that stays put for the ring's whole life, while Stockade's buffers are
//! allocated per request (a write's payload is read from the socket straight into one, a read's
//! destination is handed to the device and then to the socket). [`BufPool`] reconciles the two:
//! it owns one region for the process's life and hands out ordinary [`AlignedBuf`]s carved from
//! it, which return themselves to the pool when dropped, wherever that happens.
//!
//! Buffers come in power-of-two size classes from 4 KiB to [`MAX_POOLED`]. A class takes its
//! slots from the region the first time it needs them (a bump pointer), and freed slots go back
//! to their class's free list, so a steady workload reaches a steady state with no allocation at
//! all. When the region is used up, or a request is larger than the largest class, the buffer
//! comes from the heap as before: correct, only without the registered fast path. The count of
//! such fall-backs is exported so an operator can size the region.
//!
//! Every buffer handed out is zeroed (a recycled slot is cleared), as [`AlignedBuf::zeroed`]
//! promises: no earlier request's data can reach a device or the network through it.

use super::{ALIGN, AlignedBuf};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The largest buffer the pool serves (larger ones come from the heap).
pub const MAX_POOLED: usize = 1 << 20;

const MIN_SHIFT: u32 = ALIGN.trailing_zeros();
const CLASSES: usize = (MAX_POOLED.trailing_zeros() - MIN_SHIFT + 1) as usize;

/// Counters of a pool, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Size of the region in bytes.
    pub region_bytes: u64,
    /// Bytes of the region handed out to size classes so far.
    pub carved_bytes: u64,
    /// Allocations served from the region.
    pub hits: u64,
    /// Allocations that fell back to the heap (region used up, or larger than [`MAX_POOLED`]).
    pub misses: u64,
}

#[derive(Debug, Default)]
struct Slots {
    /// Next uncarved byte of the region.
    bump: usize,
    /// Free slot offsets per class.
    free: [Vec<usize>; CLASSES],
}

/// The region and its bookkeeping; every pooled buffer holds a reference, so the region is freed
/// only after the last of them.
pub(super) struct PoolShared {
    base: NonNull<u8>,
    len: usize,
    slots: Mutex<Slots>,
    hits: AtomicU64,
    misses: AtomicU64,
}

// SAFETY: the region is plain memory owned by this struct; the bookkeeping is behind a mutex or
// atomic, and each carved slot is owned by exactly one AlignedBuf at a time.
unsafe impl Send for PoolShared {}
// SAFETY: as above; shared references only touch the mutex and the atomics.
unsafe impl Sync for PoolShared {}

impl PoolShared {
    /// Takes back a slot (called from the buffer's drop).
    pub(super) fn release(&self, ptr: NonNull<u8>, cap: usize) {
        let offset = ptr.as_ptr() as usize - self.base.as_ptr() as usize;
        let class = class_of(cap).expect("pooled buffers have a class size");
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).free[class].push(offset);
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, ALIGN).expect("layout was valid at alloc");
        // SAFETY: base was returned by alloc_zeroed with exactly this layout; no buffer can still
        // point into it, since every pooled buffer holds a reference to this struct.
        unsafe { dealloc(self.base.as_ptr(), layout) }
    }
}

/// The class whose slots hold `cap` bytes, if `cap` is exactly a class size.
fn class_of(cap: usize) -> Option<usize> {
    (cap.is_power_of_two() && (ALIGN..=MAX_POOLED).contains(&cap))
        .then(|| (cap.trailing_zeros() - MIN_SHIFT) as usize)
}

/// A pool of aligned buffers in one region (see the module documentation). Cloning shares it.
#[derive(Clone)]
pub struct BufPool {
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl BufPool {
    /// A pool over a new zeroed region of `bytes` (rounded up to [`ALIGN`], at least one page).
    pub fn new(bytes: usize) -> Self {
        let len = bytes.max(ALIGN).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(len, ALIGN).expect("pool size overflows isize");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(base) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        Self {
            shared: Arc::new(PoolShared {
                base,
                len,
                slots: Mutex::new(Slots::default()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            }),
        }
    }

    /// A zeroed buffer of `len` bytes: from the region when a slot is free or can be carved,
    /// otherwise from the heap. Its capacity is at least `len`.
    pub fn alloc(&self, len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf::empty();
        }
        let cap = len.div_ceil(ALIGN).next_power_of_two() * ALIGN;
        let Some(class) = class_of(cap) else {
            self.shared.misses.fetch_add(1, Ordering::Relaxed);
            return AlignedBuf::zeroed(len);
        };
        let (offset, recycled) = {
            let mut s = self.shared.slots.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(off) = s.free[class].pop() {
                (Some(off), true)
            } else if s.bump + cap <= self.shared.len {
                let off = s.bump;
                s.bump += cap;
                (Some(off), false)
            } else {
                (None, false)
            }
        };
        let Some(offset) = offset else {
            self.shared.misses.fetch_add(1, Ordering::Relaxed);
            return AlignedBuf::zeroed(len);
        };
        self.shared.hits.fetch_add(1, Ordering::Relaxed);
        // SAFETY: offset + cap <= len (carved within the region), so the pointer stays inside the
        // region's allocation and is ALIGN-aligned (the base is, and every class size is a
        // multiple of ALIGN, so every carved offset is too).
        let ptr = unsafe { NonNull::new_unchecked(self.shared.base.as_ptr().add(offset)) };
        if recycled {
            // SAFETY: the slot [ptr, ptr + cap) lies inside the region and is owned by nobody
            // (it was just taken off the free list).
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, cap) };
        }
        AlignedBuf {
            ptr,
            len,
            cap,
            home: Some(self.shared.clone()),
        }
    }

    /// A zeroed buffer from `pool` when there is one, else from the heap.
    pub fn alloc_in(pool: Option<&BufPool>, len: usize) -> AlignedBuf {
        match pool {
            Some(p) => p.alloc(len),
            None => AlignedBuf::zeroed(len),
        }
    }

    /// The region as (start address, length), for registering it with a ring.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.shared.base.as_ptr(), self.shared.len)
    }

    /// True when `len` bytes at `ptr` lie inside the region.
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let start = self.shared.base.as_ptr() as usize;
        let p = ptr as usize;
        p >= start && p.saturating_add(len) <= start + self.shared.len
    }

    /// Counters, for metrics.
    pub fn stats(&self) -> PoolStats {
        let carved = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bump;
        PoolStats {
            region_bytes: self.shared.len as u64,
            carved_bytes: carved as u64,
            hits: self.shared.hits.load(Ordering::Relaxed),
            misses: self.shared.misses.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_from_the_region_aligned_and_zeroed() {
        let pool = BufPool::new(1 << 20);
        for len in [1, 4095, 4096, 4097, 65536, 100_000] {
            let b = pool.alloc(len);
            assert!(pool.contains(b.as_ptr(), b.capacity()), "len {len}");
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len && b.capacity().is_power_of_two());
            assert!(b.iter().all(|&x| x == 0));
        }
        assert_eq!(pool.alloc(0).capacity(), 0);
        assert_eq!(pool.stats().misses, 0);
    }

    #[test]
    fn a_freed_slot_is_reused_and_cleared() {
        let pool = BufPool::new(64 << 10);
        let mut a = pool.alloc(4096);
        let addr = a.as_ptr();
        a.fill(0xAB);
        drop(a);
        let mut b = pool.alloc(100);
        assert_eq!(b.as_ptr(), addr, "the freed slot comes back");
        b.set_len(4096);
        assert!(b.iter().all(|&x| x == 0), "no earlier data leaks");
        assert_eq!(pool.stats().carved_bytes, 4096);
    }

    #[test]
    fn an_exhausted_or_oversized_request_falls_back_to_the_heap() {
        let pool = BufPool::new(8192);
        let a = pool.alloc(4096);
        let b = pool.alloc(4096);
        let c = pool.alloc(4096);
        assert!(pool.contains(a.as_ptr(), 4096) && pool.contains(b.as_ptr(), 4096));
        assert!(!pool.contains(c.as_ptr(), 4096));
        let big = pool.alloc(MAX_POOLED + 1);
        assert!(!pool.contains(big.as_ptr(), 1));
        assert_eq!(big.len(), MAX_POOLED + 1);
        let s = pool.stats();
        assert_eq!((s.hits, s.misses, s.carved_bytes), (2, 2, 8192));
        drop(a);
        assert!(pool.contains(pool.alloc(10).as_ptr(), 10));
    }

    #[test]
    fn buffers_outlive_the_pool_handle_and_move_between_threads() {
        let pool = BufPool::new(1 << 20);
        let bufs: Vec<AlignedBuf> = (0..8).map(|i| pool.alloc(4096 << (i % 3))).collect();
        drop(pool);
        let sum = std::thread::spawn(move || {
            let mut sum = 0;
            for mut b in bufs {
                b.fill(1);
                sum += b.iter().map(|&x| x as usize).sum::<usize>();
            }
            sum
        })
        .join()
        .unwrap();
        assert_eq!(sum, 4096 * (3 + 3 * 2 + 2 * 4));
    }

    #[test]
    fn contains_rejects_ranges_that_leave_the_region() {
        let pool = BufPool::new(8192);
        let (base, len) = pool.region();
        assert!(pool.contains(base, len));
        assert!(!pool.contains(base, len + 1));
        // SAFETY: only the address is computed, never dereferenced.
        let inside = unsafe { base.add(4096) };
        assert!(pool.contains(inside, 4096) && !pool.contains(inside, 4097));
        assert!(!pool.contains(std::ptr::null(), 1));
    }
}
