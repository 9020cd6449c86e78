//! What a volume's Raft log holds, and the state it replicates.
//!
//! Each log entry carries its header in the entry's `context` (a version byte, then a postcard
//! [`EntryHeader`]) and, for writes, the block data in the entry's `data`, untouched — so data
//! moves from the NBD socket to the log, the peers and the sleds as shared `Bytes`, never
//! re-encoded. [`EntryHeader`] is append-only; a log written by a later version with a kind this
//! build does not know, or another version byte, is refused with a clear error.
//!
//! The Raft snapshot is only metadata ([`VolumeState`]): the data lives on the sleds, so a
//! snapshot is taken at the flushed index and carries no blocks.

use crate::control::state::{ClusterState, MetaCmd};
use crate::volume::VolumeSpec;
use common::ids::SledId;
use common::throttle::{QosConfig, QosState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Version byte of entry headers and snapshots written by this build.
pub const LOG_FORMAT_VERSION: u8 = 1;

/// Errors decoding log entries or snapshots.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// A version this build cannot read.
    #[error(
        "log format version {found} is not supported (this build reads {LOG_FORMAT_VERSION}); upgrade the head node"
    )]
    Version {
        /// Version found.
        found: u8,
    },
    /// Bytes that do not decode.
    #[error("malformed log entry: {0}")]
    Malformed(String),
}

/// The header of a volume log entry. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryHeader {
    /// Block-aligned data at `offset`; the entry's data is the `len` bytes.
    Write {
        /// Byte offset in the volume (4 KiB aligned).
        offset: u64,
        /// Length (4 KiB multiple); equals the entry's data length.
        len: u32,
    },
    /// Block-aligned range that reads as zeros; `free` lets whole chunks be freed (trim, or
    /// write-zeroes without NO_HOLE).
    Zero {
        /// Byte offset (4 KiB aligned).
        offset: u64,
        /// Length (4 KiB multiple).
        len: u64,
        /// Whole chunks may be freed.
        free: bool,
    },
    /// Every write at or below `index` is on the sleds; the log may be compacted up to it.
    FlushedUpTo {
        /// The flushed index.
        index: u64,
    },
    /// The volume's description (creation, or growth with the new chunks placed).
    Spec(VolumeSpec),
    /// QoS limits of the volume.
    Qos(QosConfig),
    /// The burst-credit balance, so a new leader continues from it.
    QosState(QosState),
    /// A sled is stale for this volume (unreachable when a write had to land) or fresh again.
    SledStale {
        /// The sled.
        sled: SledId,
        /// Stale (true) or resynchronised (false).
        stale: bool,
    },
    /// A change of the cluster state (metadata group only).
    Meta(MetaCmd),
}

impl EntryHeader {
    /// Encodes into an entry context.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![LOG_FORMAT_VERSION];
        // Serializing a plain enum into a Vec cannot fail.
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Decodes an entry context; `Ok(None)` for an empty context (Raft's own empty entries).
    pub fn decode(ctx: &[u8]) -> Result<Option<Self>, EntryError> {
        let Some((&v, rest)) = ctx.split_first() else {
            return Ok(None);
        };
        if v != LOG_FORMAT_VERSION {
            return Err(EntryError::Version { found: v });
        }
        let (h, tail) = postcard::take_from_bytes::<Self>(rest)
            .map_err(|e| EntryError::Malformed(e.to_string()))?;
        if !tail.is_empty() {
            return Err(EntryError::Malformed(
                "trailing bytes after the header".into(),
            ));
        }
        Ok(Some(h))
    }
}

/// The replicated state of a volume's group (everything but the data).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeState {
    /// The volume, once created.
    pub spec: Option<VolumeSpec>,
    /// Every write at or below this index is on the sleds.
    pub flushed: u64,
    /// QoS limits.
    pub qos: QosConfig,
    /// Burst-credit balance as last recorded.
    pub qos_state: Option<QosState>,
    /// Sleds that must not be read for this volume until resynchronised.
    pub stale: BTreeSet<SledId>,
    /// The cluster state (metadata group only).
    pub cluster: Option<ClusterState>,
}

impl VolumeState {
    /// Applies a metadata entry (data entries change nothing here). Every change is absolute,
    /// so replaying entries over a state that already has them is harmless — which is what
    /// makes a snapshot taken at the flushed index with the state of a later index correct.
    /// (Cluster commands are absolute too, but a put replayed after a later remove would
    /// resurrect it: the metadata group snapshots exactly at its applied index instead, see
    /// [`GroupConfig::exact_snapshots`](super::group::GroupConfig::exact_snapshots).)
    pub fn apply(&mut self, h: &EntryHeader) {
        match h {
            EntryHeader::Write { .. } | EntryHeader::Zero { .. } => {}
            EntryHeader::FlushedUpTo { index } => self.flushed = self.flushed.max(*index),
            EntryHeader::Spec(s) => self.spec = Some(s.clone()),
            EntryHeader::Qos(q) => self.qos = *q,
            EntryHeader::QosState(q) => self.qos_state = Some(*q),
            EntryHeader::SledStale { sled, stale } => {
                if *stale {
                    self.stale.insert(*sled);
                } else {
                    self.stale.remove(sled);
                }
            }
            EntryHeader::Meta(cmd) => self.cluster.get_or_insert_default().apply(cmd),
        }
    }

    /// Encodes as Raft snapshot data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![LOG_FORMAT_VERSION];
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Decodes Raft snapshot data (empty data: the initial state).
    pub fn decode(data: &[u8]) -> Result<Self, EntryError> {
        let Some((&v, rest)) = data.split_first() else {
            return Ok(Self::default());
        };
        if v != LOG_FORMAT_VERSION {
            return Err(EntryError::Version { found: v });
        }
        postcard::from_bytes(rest).map_err(|e| EntryError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ids::{Uuid128, VolumeId};
    use proptest::prelude::*;

    #[test]
    fn headers_round_trip_and_golden_bytes() {
        let w = EntryHeader::Write {
            offset: 4096,
            len: 8192,
        };
        let b = w.encode();
        // version 1, variant 0, varint 4096, varint 8192
        assert_eq!(b, [1, 0, 0x80, 0x20, 0x80, 0x40]);
        assert_eq!(EntryHeader::decode(&b).unwrap(), Some(w));
        assert_eq!(EntryHeader::decode(&[]).unwrap(), None);
        assert_eq!(
            EntryHeader::decode(&[2, 0]).unwrap_err(),
            EntryError::Version { found: 2 }
        );
        assert!(EntryHeader::decode(&[1, 99]).is_err());
        let f = EntryHeader::FlushedUpTo { index: 7 };
        assert_eq!(f.encode(), [1, 2, 7]);
    }

    #[test]
    fn state_applies_absolute_changes() {
        let mut s = VolumeState::default();
        let spec = VolumeSpec {
            id: VolumeId(1),
            name: "v".into(),
            size: 4096,
            chunk_size: 1 << 20,
            placement: vec![vec![Uuid128(1)]],
        };
        for h in [
            EntryHeader::Spec(spec.clone()),
            EntryHeader::FlushedUpTo { index: 5 },
            EntryHeader::FlushedUpTo { index: 3 },
            EntryHeader::SledStale {
                sled: Uuid128(2),
                stale: true,
            },
        ] {
            s.apply(&h);
        }
        assert_eq!(s.flushed, 5);
        assert_eq!(s.spec, Some(spec));
        assert!(s.stale.contains(&Uuid128(2)));
        let again = {
            let mut t = s.clone();
            t.apply(&EntryHeader::FlushedUpTo { index: 5 });
            t
        };
        assert_eq!(again, s);
        assert_eq!(VolumeState::decode(&s.encode()).unwrap(), s);
        assert_eq!(VolumeState::decode(&[]).unwrap(), VolumeState::default());
        assert!(VolumeState::decode(&[9, 0]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = EntryHeader::decode(&b);
            let _ = VolumeState::decode(&b);
        }
    }
}
