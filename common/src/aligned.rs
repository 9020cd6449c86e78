//! Page-aligned byte buffers for `O_DIRECT` I/O.
//!
//! `O_DIRECT` needs the memory address, the file offset and the length all aligned to the
//! device's logical block size. Stockade uses 4 KiB everywhere, which satisfies every device it
//! supports. Buffers are allocated zeroed, so no uninitialised memory ever reaches a device or the
//! network. An empty buffer allocates nothing (frames without a data part are the common case on
//! the hot path).

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

mod pool;
pub use pool::{BufPool, MAX_POOLED, PoolStats};

/// The alignment of every device I/O buffer, offset and length.
pub const ALIGN: usize = 4096;

/// A zero-sized type aligned like a page: the dangling, aligned address of empty buffers.
#[repr(C, align(4096))]
struct EmptyPage;

const _: () = assert!(std::mem::align_of::<EmptyPage>() == ALIGN);

/// A zero-initialised buffer whose start is aligned to [`ALIGN`]: on the heap, or a slot of a
/// [`BufPool`] region that it gives back when dropped.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    /// The pool owning the memory, for pooled buffers.
    home: Option<std::sync::Arc<pool::PoolShared>>,
}

// SAFETY: AlignedBuf owns its allocation (or pool slot) exclusively (like Vec<u8>); moving it
// between threads moves that ownership, and shared references only allow reads. The pool it may
// point to is itself Send + Sync.
unsafe impl Send for AlignedBuf {}
// SAFETY: &AlignedBuf only exposes &[u8]; there is no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// An empty buffer (capacity 0). Allocates nothing; its pointer is aligned but dangling.
    pub const fn empty() -> Self {
        Self {
            ptr: NonNull::<EmptyPage>::dangling().cast::<u8>(),
            len: 0,
            cap: 0,
            home: None,
        }
    }

    /// A zeroed buffer of `len` bytes; its capacity is `len` rounded up to [`ALIGN`]. A length of
    /// zero gives [`AlignedBuf::empty`], which allocates nothing.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self::empty();
        }
        let cap = len.div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer size overflows isize");
        // SAFETY: the layout has a non-zero size (cap >= ALIGN).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        Self {
            ptr,
            len,
            cap,
            home: None,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in bytes (a multiple of [`ALIGN`]; 0 for an empty buffer).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the length within the capacity; new bytes are whatever the buffer held (zero if
    /// never written).
    ///
    /// # Panics
    /// When `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "set_len {len} beyond capacity {}",
            self.cap
        );
        self.len = len;
    }

    /// Raw pointer to the start, for I/O submission.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer to the start, for I/O submission.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            home.release(self.ptr, self.cap);
            return;
        }
        if self.cap == 0 {
            // An empty buffer owns no allocation.
            return;
        }
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("layout was valid at alloc");
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is non-null, aligned and valid for cap >= len initialised (zeroed at
        // allocation) bytes, and the borrow of self keeps the allocation alive; an empty buffer
        // has len 0, for which any non-null aligned pointer is valid.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuf(len={}, cap={})", self.len, self.cap)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AlignedBuf {
    /// Turns the buffer into shared, immutable [`bytes::Bytes`] without copying.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }

    /// Views a shared buffer as [`bytes::Bytes`] without copying.
    pub fn shared_bytes(buf: std::sync::Arc<AlignedBuf>) -> bytes::Bytes {
        bytes::Bytes::from_owner(SharedBuf(buf))
    }
}

/// An `Arc<AlignedBuf>` as an owner for [`bytes::Bytes::from_owner`].
struct SharedBuf(std::sync::Arc<AlignedBuf>);

impl AsRef<[u8]> for SharedBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl Eq for AlignedBuf {}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

/// True when `v` is a multiple of [`ALIGN`].
pub const fn is_aligned(v: u64) -> bool {
    v.is_multiple_of(ALIGN as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len && b.capacity().is_multiple_of(ALIGN));
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn empty_buffers_allocate_nothing() {
        let mut e = AlignedBuf::zeroed(0);
        assert_eq!((e.len(), e.capacity()), (0, 0));
        assert_eq!(e.as_ptr() as usize % ALIGN, 0);
        assert!(e.is_empty() && e[..].is_empty());
        e.fill(7);
        e.set_len(0);
        assert_eq!(e.clone(), AlignedBuf::empty());
        assert_eq!(AlignedBuf::from_slice(&[]).capacity(), 0);
        assert!(e.into_bytes().is_empty());
    }

    #[test]
    #[should_panic(expected = "beyond capacity")]
    fn empty_buffers_cannot_grow() {
        AlignedBuf::empty().set_len(1);
    }

    #[test]
    fn set_len_and_clone() {
        let mut b = AlignedBuf::from_slice(b"hello");
        b.set_len(4096);
        assert_eq!(&b[..5], b"hello");
        let c = b.clone();
        assert_eq!(&c[..], &b[..]);
    }
}
