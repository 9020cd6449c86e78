//! The seam between the NBD front end and whatever stores a volume.
//!
//! The server speaks NBD; a [`Volume`] stores bytes. Today [`super::mem::MemVolume`] implements
//! it for tests and examples; the real volume (sleds, then a Raft group per volume) will
//! implement the same trait. The server guarantees, before calling the backend, that:
//!
//! - every range lies inside the size the connection was given at `NBD_OPT_GO` time (a volume
//!   that shrinks later must still refuse out-of-range requests itself);
//! - `read` and `write` lengths are at most the advertised maximum payload (32 MiB by default),
//!   and non-zero; other lengths are non-zero and may be anything up to the export size (64-bit
//!   with extended headers);
//! - nothing is written to a read-only export.
//!
//! Requests need not be aligned to the backend's 4 KiB: the server accepts anything inside the
//! advertised block-size limits, and the backend does read-modify-write where it must.
//!
//! Errors are typed ([`VolumeError`]) and mapped to NBD error values in exactly one place,
//! [`VolumeError::nbd_errno`].

use std::future::Future;
use std::sync::Arc;

use common::AlignedBuf;

use super::proto::{self, Cmd};

/// What the server advertises for one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name, as used in `NBD_OPT_GO`; also the `volume` metric label.
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`); may be empty.
    pub description: String,
    /// Size in bytes. It may change (resize) between connections; a connection keeps the size
    /// it was given.
    pub size: u64,
    /// Writes, trims and write-zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// A FLUSH or FUA on one connection makes data durable and visible on every connection, so
    /// the server may advertise `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
    /// Smallest addressable unit (a power of two, at most 64 KiB); typically 512.
    pub min_block: u32,
    /// Size at which aligned I/O avoids read-modify-write; typically 4096.
    pub preferred_block: u32,
    /// Largest READ/WRITE payload the backend accepts; the server advertises the smaller of this
    /// and its own limit.
    pub max_block: u32,
}

/// A run of bytes with the same allocation state (the `base:allocation` context).
///
/// `hole` means "not allocated" and `zero` means "reads as zeroes". A backend may always answer
/// `hole: false, zero: false` (unknown); it must never report written data as `hole` or `zero`
/// unless the bytes really read as zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (zero-length extents are ignored).
    pub length: u64,
    /// The range is not allocated.
    pub hole: bool,
    /// The range reads as zeroes.
    pub zero: bool,
}

impl Extent {
    /// Allocated data (status unknown): neither hole nor zero.
    pub const fn data(length: u64) -> Self {
        Self {
            length,
            hole: false,
            zero: false,
        }
    }

    /// Unallocated and reading as zeroes.
    pub const fn hole(length: u64) -> Self {
        Self {
            length,
            hole: true,
            zero: true,
        }
    }

    /// Allocated and reading as zeroes.
    pub const fn zeroed(length: u64) -> Self {
        Self {
            length,
            hole: false,
            zero: true,
        }
    }

    /// The `base:allocation` flags of this extent.
    pub fn flags(&self) -> u32 {
        (if self.hole { proto::STATE_HOLE } else { 0 })
            | (if self.zero { proto::STATE_ZERO } else { 0 })
    }
}

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The storage failed; `offset`, when known, is the first byte that failed (it lets the
    /// server send `NBD_REPLY_TYPE_ERROR_OFFSET`).
    #[error("I/O error{}: {source}", offset.map(|o| format!(" at offset {o}")).unwrap_or_default())]
    Io {
        /// First failing byte, if known.
        offset: Option<u64>,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// No space is left to store the data.
    #[error("no space left on the volume")]
    NoSpace,
    /// The range lies outside the volume (it may have shrunk).
    #[error("range {offset}+{length} lies outside the volume")]
    OutOfRange {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        length: u64,
    },
    /// The operation cannot be done as asked; for a fast write-zeroes it means "not fast".
    #[error("operation not supported: {reason}")]
    NotSupported {
        /// What is not supported.
        reason: &'static str,
    },
    /// The volume refuses writes.
    #[error("volume is read-only")]
    ReadOnly,
    /// The volume is being detached or the node is stopping.
    #[error("volume is shutting down")]
    ShuttingDown,
}

impl VolumeError {
    /// An I/O error without a known offset.
    pub fn io(source: std::io::Error) -> Self {
        VolumeError::Io {
            offset: None,
            source,
        }
    }

    /// The NBD error value for this error as the answer to `cmd`: the one place where volume
    /// errors become wire errors.
    ///
    /// `ENOTSUP` is only allowed for `WRITE_ZEROES` (a fast zero that cannot be fast); elsewhere
    /// "not supported" is `EINVAL`. Out-of-range writes are `ENOSPC`, other out-of-range
    /// requests `EINVAL`, as `proto.md` asks.
    pub fn nbd_errno(&self, cmd: Cmd) -> u32 {
        match self {
            VolumeError::Io { .. } => proto::EIO,
            VolumeError::NoSpace => proto::ENOSPC,
            VolumeError::OutOfRange { .. } => match cmd {
                Cmd::Write | Cmd::WriteZeroes => proto::ENOSPC,
                _ => proto::EINVAL,
            },
            VolumeError::NotSupported { .. } => match cmd {
                Cmd::WriteZeroes => proto::ENOTSUP,
                _ => proto::EINVAL,
            },
            VolumeError::ReadOnly => proto::EPERM,
            VolumeError::ShuttingDown => proto::ESHUTDOWN,
        }
    }

    /// The failing offset, if the error carries one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            VolumeError::Io { offset, .. } => *offset,
            _ => None,
        }
    }
}

/// One volume as the NBD server sees it.
///
/// Implementations are shared by every connection to the export (`Arc<Self>`), and every method
/// may be called concurrently. Ordering and durability contract:
///
/// - a `write`, `trim` or `write_zeroes` that has returned is visible to every later `read` on
///   any connection;
/// - `flush` returns once every write that had returned before `flush` was called is durable;
/// - an operation with `fua: true` returns only once its own effect is durable.
///
/// Those are exactly what `NBD_FLAG_CAN_MULTI_CONN` promises, so a backend that keeps them may set
/// [`ExportInfo::multi_conn`].
pub trait Volume: Send + Sync + 'static {
    /// The export's current description (called at negotiation time).
    fn info(&self) -> ExportInfo;

    /// Reads `len` bytes at `offset`; the returned buffer must hold exactly `len` bytes.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<AlignedBuf, VolumeError>> + Send;

    /// Writes `data` at `offset`; with `fua`, returns once the data is durable.
    fn write(
        &self,
        offset: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send;

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> impl Future<Output = Result<(), VolumeError>> + Send;

    /// Discards a range (a hint: contents afterwards are unspecified but must be stable).
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send;

    /// Makes a range read as zeroes. With `no_hole` the range must stay allocated. With
    /// `fast_only`, return [`VolumeError::NotSupported`] at once, changing nothing, unless this
    /// is faster than writing zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
        fua: bool,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send;

    /// The allocation state of a range, as consecutive extents starting at `offset`. The list
    /// must not be empty; it may cover less than `len` (the client asks again) or more (the
    /// server clips it).
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, VolumeError>> + Send;

    /// A hint that the range will be read soon.
    fn cache(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), VolumeError>> + Send;

    /// Resolves when the export is being detached: connections stop taking requests, answer the
    /// ones in flight and disconnect. Must resolve at once if the volume is already closed.
    fn closed(&self) -> impl Future<Output = ()> + Send;

    /// A client names the connection being negotiated as its newest (see
    /// [`crate::volume::session`]); requests of its older connections that have not taken
    /// effect yet must never take effect once this returns `Ok`. The connection is refused
    /// on an error. A backend that only this process serves has nothing to do (the default):
    /// a client has no other server to move to while this one holds its old requests.
    fn open_session(
        &self,
        _session: crate::volume::session::ClientSession,
    ) -> impl Future<Output = Result<(), VolumeError>> + Send {
        std::future::ready(Ok(()))
    }
}

/// The set of exports a server offers.
pub trait Exports: Send + Sync + 'static {
    /// The volume type.
    type V: Volume;

    /// The export called `name` ("" asks for the default export, if any).
    fn get(&self, name: &str) -> Option<Arc<Self::V>>;

    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;

    /// True while the set of exports may still be filling in (a node that has just started):
    /// a client asking for an export not there yet is then kept waiting a little for it
    /// instead of being told at once that it does not exist.
    fn settling(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_follows_the_specification() {
        let io = VolumeError::Io {
            offset: Some(7),
            source: std::io::Error::other("disk"),
        };
        assert_eq!(io.nbd_errno(Cmd::Read), proto::EIO);
        assert_eq!(io.offset(), Some(7));
        assert!(io.to_string().contains("at offset 7"), "{io}");
        let oor = VolumeError::OutOfRange {
            offset: 1,
            length: 2,
        };
        assert_eq!(oor.nbd_errno(Cmd::Write), proto::ENOSPC);
        assert_eq!(oor.nbd_errno(Cmd::WriteZeroes), proto::ENOSPC);
        assert_eq!(oor.nbd_errno(Cmd::Read), proto::EINVAL);
        assert_eq!(oor.nbd_errno(Cmd::Trim), proto::EINVAL);
        let ns = VolumeError::NotSupported { reason: "x" };
        assert_eq!(ns.nbd_errno(Cmd::WriteZeroes), proto::ENOTSUP);
        assert_eq!(ns.nbd_errno(Cmd::Cache), proto::EINVAL);
        assert_eq!(VolumeError::NoSpace.nbd_errno(Cmd::Write), proto::ENOSPC);
        assert_eq!(VolumeError::ReadOnly.nbd_errno(Cmd::Trim), proto::EPERM);
        assert_eq!(
            VolumeError::ShuttingDown.nbd_errno(Cmd::Flush),
            proto::ESHUTDOWN
        );
        assert_eq!(VolumeError::io(std::io::Error::other("x")).offset(), None);
    }

    #[test]
    fn extent_flags() {
        assert_eq!(Extent::data(1).flags(), 0);
        assert_eq!(
            Extent::hole(1).flags(),
            proto::STATE_HOLE | proto::STATE_ZERO
        );
        assert_eq!(Extent::zeroed(1).flags(), proto::STATE_ZERO);
    }
}
