//! One storage device: its on-device state machine ([`core::DeviceCore`]), owned by one thread
//! ([`thread::spawn_device`]) that talks to the network side through a bounded queue.
//!
//! Everything about a device — chunk table, fence records, block checksums, in-flight I/O — is
//! owned by its state machine and touched only by its thread, so there are no locks around it.
//! The network side sends [`DevRequest`]s and awaits the reply carried in each.

pub mod core;
mod meta;
pub mod open;
pub mod thread;

#[cfg(test)]
mod tests;

use crate::reply::{Outcome, ReplyTo, Wakes};
use common::AlignedBuf;
use common::ids::{ChunkIndex, DeviceId, Epoch, NodeId, VolumeId};
use std::fmt;
use tokio::sync::oneshot;

/// A oneshot carrying a request's result to the one task that waits for it.
pub type Once<T> = oneshot::Sender<Result<T, DevError>>;

/// Where the result of a read or mutation goes.
#[derive(Debug)]
pub enum Reply<T> {
    /// To one waiting task (control requests, tests).
    Once(Once<T>),
    /// Into a connection's reply sink (the hot path): the device thread wakes the connection
    /// once per round of work, not once per request.
    To(ReplyTo),
}

impl<T> From<Once<T>> for Reply<T> {
    fn from(tx: Once<T>) -> Self {
        Reply::Once(tx)
    }
}

/// A result a connection's sink can carry.
pub trait IntoOutcome: Sized {
    /// The result as the connection receives it.
    fn outcome(r: Result<Self, DevError>) -> Outcome;
}

impl IntoOutcome for AlignedBuf {
    fn outcome(r: Result<Self, DevError>) -> Outcome {
        Outcome::Device(r.map(Some))
    }
}

impl IntoOutcome for () {
    fn outcome(r: Result<Self, DevError>) -> Outcome {
        Outcome::Device(r.map(|()| None))
    }
}

impl<T: IntoOutcome> Reply<T> {
    /// Delivers the result now (waking its connection at once).
    pub fn send(self, r: Result<T, DevError>) {
        match self {
            Reply::Once(tx) => drop(tx.send(r)),
            Reply::To(to) => to.answer_now(T::outcome(r)),
        }
    }

    /// Delivers the result; a connection is woken later, once for everything pushed to it, by
    /// [`Wakes::wake_all`].
    pub fn send_batched(self, r: Result<T, DevError>, wakes: &mut Wakes) {
        match self {
            Reply::Once(tx) => drop(tx.send(r)),
            Reply::To(to) => wakes.push(to, T::outcome(r)),
        }
    }
}

/// A claim on a volume: who holds it, from which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Holder {
    /// The epoch (Raft term of the holder's leadership).
    pub epoch: Epoch,
    /// The head node.
    pub node: NodeId,
}

/// The claim a retired volume's record holds: above every epoch, held by no head node.
pub const TOMBSTONE: Holder = Holder {
    epoch: Epoch(u64::MAX),
    node: NodeId(0),
};

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {} holder {}", self.epoch, self.node)
    }
}

/// A request to a device. Offsets and lengths are within the chunk and 4 KiB aligned; the
/// network side has already verified credentials' MACs — the device enforces epochs.
#[derive(Debug)]
pub enum DevRequest {
    /// Read; unallocated chunks and zeroed blocks read as zeros.
    Read {
        /// Volume.
        volume: VolumeId,
        /// Chunk.
        chunk: ChunkIndex,
        /// Offset in the chunk.
        offset: u64,
        /// Length.
        len: u32,
        /// Result.
        reply: Reply<AlignedBuf>,
    },
    /// Write `data` (allocating the chunk on first write).
    Write {
        /// Credential's claim.
        fence: Holder,
        /// Volume.
        volume: VolumeId,
        /// Chunk.
        chunk: ChunkIndex,
        /// Offset in the chunk.
        offset: u64,
        /// Data.
        data: AlignedBuf,
        /// Acknowledge once the device holds the data, without making it durable: a later
        /// [`DevRequest::Flush`] does (for head nodes' write-back, whose Raft log is the durable
        /// copy until they flush). Otherwise durable before acknowledged.
        cached: bool,
        /// Result.
        reply: Reply<()>,
    },
    /// Make every cached write acknowledged before this request durable.
    Flush {
        /// Result.
        reply: Reply<()>,
    },
    /// Make a range read as zeros (write-zeroes and trim).
    Zero {
        /// Credential's claim.
        fence: Holder,
        /// Volume.
        volume: VolumeId,
        /// Chunk.
        chunk: ChunkIndex,
        /// Offset in the chunk.
        offset: u64,
        /// Length.
        len: u64,
        /// Result.
        reply: Reply<()>,
    },
    /// Allocate a chunk ahead of its first write.
    Allocate {
        /// Credential's claim.
        fence: Holder,
        /// Volume.
        volume: VolumeId,
        /// Chunk.
        chunk: ChunkIndex,
        /// Result.
        reply: Reply<()>,
    },
    /// Free a chunk.
    Free {
        /// Credential's claim.
        fence: Holder,
        /// Volume.
        volume: VolumeId,
        /// Chunk.
        chunk: ChunkIndex,
        /// Result.
        reply: Reply<()>,
    },
    /// Raise the volume's fence record.
    Claim {
        /// Volume.
        volume: VolumeId,
        /// The new claim.
        fence: Holder,
        /// The record now stored (durable).
        reply: Once<Holder>,
    },
    /// Replace the volume's fence record by a tombstone (the volume is gone).
    Retire {
        /// Volume.
        volume: VolumeId,
        /// The current claim (the retiring holder's).
        fence: Holder,
        /// Done (durable).
        reply: Once<Holder>,
    },
    /// What the device holds.
    Status {
        /// Result.
        reply: oneshot::Sender<DeviceStatus>,
    },
}

impl DevRequest {
    /// Fails the request without running it (used when the device is gone).
    pub fn fail(self, e: DevError) {
        match self {
            DevRequest::Read { reply, .. } => reply.send(Err(e)),
            DevRequest::Write { reply, .. }
            | DevRequest::Zero { reply, .. }
            | DevRequest::Allocate { reply, .. }
            | DevRequest::Free { reply, .. }
            | DevRequest::Flush { reply } => reply.send(Err(e)),
            DevRequest::Claim { reply, .. } | DevRequest::Retire { reply, .. } => {
                drop(reply.send(Err(e)))
            }
            DevRequest::Status { .. } => {}
        }
    }
}

/// Errors a device returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevError {
    /// Claimed by a higher epoch, or the same epoch by another holder.
    #[error("fenced: the volume is claimed with {current}")]
    Fenced {
        /// The claim that wins.
        current: Holder,
    },
    /// The credential's epoch has not been claimed on this device.
    #[error("not claimed: {wanted} has not been claimed here (stored: {})", match current { Some(c) => c.to_string(), None => "none".into() })]
    NotClaimed {
        /// The credential's claim.
        wanted: Holder,
        /// What is stored.
        current: Option<Holder>,
    },
    /// No free chunk.
    #[error("no free chunk on the device")]
    NoSpace,
    /// The fence table is full.
    #[error("fence table full")]
    FenceTableFull,
    /// A retire of a volume that still holds chunks here.
    #[error(
        "the volume still holds {chunks} chunk(s) on this device; free them before retiring it"
    )]
    NotEmpty {
        /// Chunks it holds.
        chunks: u64,
    },
    /// Offset or length outside the chunk.
    #[error("range {offset}+{len} is outside the {chunk_size}-byte chunk")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Chunk size.
        chunk_size: u64,
    },
    /// Not 4 KiB aligned.
    #[error("range {offset}+{len} is not 4 KiB aligned")]
    Unaligned {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Stored data fails its checksum.
    #[error("checksum mismatch in block at chunk offset {offset}")]
    Checksum {
        /// Offset of the bad block within the chunk.
        offset: u64,
    },
    /// The device failed an I/O.
    #[error("device I/O error: {0}")]
    Io(String),
    /// The device is shutting down.
    #[error("device shutting down")]
    ShuttingDown,
}

/// What a device holds, for `stat` and metrics.
#[derive(Debug, Clone, Default)]
pub struct DeviceStatus {
    /// Device id.
    pub device: DeviceId,
    /// Path it was opened from.
    pub path: String,
    /// Chunk size.
    pub chunk_size: u64,
    /// Chunks in total.
    pub chunks_total: u64,
    /// Allocated chunks by owner.
    pub chunks: Vec<(VolumeId, ChunkIndex)>,
    /// Durable fence records.
    pub fences: Vec<(VolumeId, Holder)>,
    /// Regions whose checksums are not yet written back.
    pub dirty_regions: u64,
}
