//! What a volume's Raft log holds, and the state it replicates.
//!
//! Each log entry carries its header in the entry's `context` (a version byte, then a postcard
//! [`EntryHeader`]) and, for writes, the block data in the entry's `data`, untouched — so data
//! moves from the NBD socket to the log, the peers and the sleds as shared `Bytes`, never
//! re-encoded. [`EntryHeader`] is append-only; a log written by a later version with a kind this
//! build does not know, or another version byte, is refused with a clear error.
//!
//! The Raft snapshot is only metadata ([`VolumeState`]): the data lives on the sleds, so a
//! snapshot is taken at the flushed index and carries no blocks. Its own version byte
//! ([`SNAPSHOT_FORMAT_VERSION`]) moves separately from the entries'; this build still reads
//! version-1 snapshots (written before the state tracked which chunks changed), version-2
//! ones (before it recorded client sessions) and version-3 ones (before the cluster state
//! recorded sleds being drained).

use crate::control::state::{ClusterState, ClusterStateV1, MetaCmd};
use crate::volume::VolumeSpec;
use crate::volume::session::{ClientSession, SessionFloors};
use common::ids::SledId;
use common::throttle::{QosConfig, QosState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Version byte of entry headers written by this build.
pub const LOG_FORMAT_VERSION: u8 = 1;
/// Version byte of snapshots written by this build (2: [`VolumeState`] records which chunks
/// changed while a sled was stale; 3: and the client sessions; 4: the cluster state records the
/// sleds being drained). Versions 1 to 3 are still read.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 4;

/// Errors decoding log entries or snapshots.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// A version this build cannot read.
    #[error(
        "log format version {found} is not supported (this build reads entries of version {LOG_FORMAT_VERSION} and snapshots of versions 1 to {SNAPSHOT_FORMAT_VERSION}); upgrade the head node"
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
    /// A sled is stale for this volume, and holds every write at or below `since` (the flushed
    /// index when the leader proposed this): its resynchronisation copies only the chunks
    /// written after it. (Appended after `SledStale`, which still records a sled current again;
    /// an older head node cannot read this kind.)
    SledStaleSince {
        /// The sled.
        sled: SledId,
        /// Every write at or below this index is on the sled.
        since: u64,
    },
    /// A client's new connection: the leader refuses whatever is still proposed for its older
    /// connections (see [`crate::volume::session`]). An older head node cannot read this kind.
    ClientSession(ClientSession),
}

impl EntryHeader {
    /// Checks a data entry (`Write`, `Zero`) against the volume it changes: its range does not
    /// overflow and ends inside a volume of `size` bytes (when the size is known), and a write
    /// carries exactly `len` bytes of data. Other headers pass. The leader checks before it
    /// proposes and every node again before it applies, so a malformed entry (a bug, a damaged
    /// log) is refused the same way everywhere instead of panicking a replica.
    pub fn check_data(&self, data_len: usize, size: Option<u64>) -> Result<(), String> {
        let (offset, len) = match self {
            EntryHeader::Write { offset, len } => {
                if data_len != *len as usize {
                    return Err(format!(
                        "write of {len} bytes carries {data_len} bytes of data"
                    ));
                }
                (*offset, u64::from(*len))
            }
            EntryHeader::Zero { offset, len, .. } => (*offset, *len),
            _ => return Ok(()),
        };
        let end = offset
            .checked_add(len)
            .ok_or_else(|| format!("range {offset}+{len} overflows"))?;
        match size {
            Some(size) if end > size => Err(format!(
                "range {offset}+{len} ends past the volume's {size} bytes"
            )),
            _ => Ok(()),
        }
    }

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
    /// Per stale sled: every write at or below this index is on it. A stale sled missing here
    /// (recorded stale by an older head node) is resynchronised in full.
    pub stale_since: BTreeMap<SledId, u64>,
    /// Per chunk: the index of the last write or zero entry that touched it, for the chunks a
    /// stale sled (or one that may be marked stale later) can have missed: entries at or below
    /// both the flushed index and every stale sled's `since` are dropped, so with no sled stale
    /// this holds only the chunks of the unflushed tail.
    pub chunk_written: BTreeMap<u64, u64>,
    /// `chunk_written` covers every data entry above this index (`u64::MAX` until the first
    /// entry is applied after a version-1 snapshot, which did not track it).
    pub written_from: u64,
    /// Per client, the oldest connection whose requests are still accepted.
    pub sessions: SessionFloors,
}

/// The state as version-3 snapshots hold it.
#[derive(Deserialize)]
struct VolumeStateV3 {
    spec: Option<VolumeSpec>,
    flushed: u64,
    qos: QosConfig,
    qos_state: Option<QosState>,
    stale: BTreeSet<SledId>,
    cluster: Option<ClusterStateV1>,
    stale_since: BTreeMap<SledId, u64>,
    chunk_written: BTreeMap<u64, u64>,
    written_from: u64,
    sessions: SessionFloors,
}

impl From<VolumeStateV3> for VolumeState {
    fn from(old: VolumeStateV3) -> Self {
        Self {
            spec: old.spec,
            flushed: old.flushed,
            qos: old.qos,
            qos_state: old.qos_state,
            stale: old.stale,
            // Nothing was being drained.
            cluster: old.cluster.map(ClusterState::from),
            stale_since: old.stale_since,
            chunk_written: old.chunk_written,
            written_from: old.written_from,
            sessions: old.sessions,
        }
    }
}

/// The state as version-2 snapshots hold it.
#[derive(Deserialize)]
struct VolumeStateV2 {
    spec: Option<VolumeSpec>,
    flushed: u64,
    qos: QosConfig,
    qos_state: Option<QosState>,
    stale: BTreeSet<SledId>,
    cluster: Option<ClusterStateV1>,
    stale_since: BTreeMap<SledId, u64>,
    chunk_written: BTreeMap<u64, u64>,
    written_from: u64,
}

/// The state as version-1 snapshots hold it.
#[derive(Deserialize)]
struct VolumeStateV1 {
    spec: Option<VolumeSpec>,
    flushed: u64,
    qos: QosConfig,
    qos_state: Option<QosState>,
    stale: BTreeSet<SledId>,
    cluster: Option<ClusterStateV1>,
}

impl From<VolumeStateV1> for VolumeStateV2 {
    fn from(old: VolumeStateV1) -> Self {
        Self {
            spec: old.spec,
            flushed: old.flushed,
            qos: old.qos,
            qos_state: old.qos_state,
            stale: old.stale,
            cluster: old.cluster,
            // Nothing was tracked: stale sleds are copied in full, and tracking starts with the
            // next entry applied.
            stale_since: BTreeMap::new(),
            chunk_written: BTreeMap::new(),
            written_from: u64::MAX,
        }
    }
}

impl From<VolumeStateV2> for VolumeStateV3 {
    fn from(old: VolumeStateV2) -> Self {
        Self {
            spec: old.spec,
            flushed: old.flushed,
            qos: old.qos,
            qos_state: old.qos_state,
            stale: old.stale,
            cluster: old.cluster,
            stale_since: old.stale_since,
            chunk_written: old.chunk_written,
            written_from: old.written_from,
            // No client had a session with a head node of that version.
            sessions: SessionFloors::default(),
        }
    }
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
            EntryHeader::FlushedUpTo { index } => {
                self.flushed = self.flushed.max(*index);
                // What every sled has (the entry's own index, not the state's flushed: in a
                // replay over a later state that one may be ahead of this point of the log).
                let keep_above = self.stale_since.values().copied().fold(*index, u64::min);
                self.chunk_written.retain(|_, at| *at > keep_above);
            }
            EntryHeader::Spec(s) => self.spec = Some(s.clone()),
            EntryHeader::Qos(q) => self.qos = *q,
            EntryHeader::QosState(q) => self.qos_state = Some(*q),
            EntryHeader::SledStale { sled, stale } => {
                if *stale {
                    self.stale.insert(*sled);
                } else {
                    self.stale.remove(sled);
                    self.stale_since.remove(sled);
                }
            }
            EntryHeader::SledStaleSince { sled, since } => {
                // Already stale: it has missed everything since the earlier mark.
                if self.stale.insert(*sled) || self.stale_since.contains_key(sled) {
                    let at = self.stale_since.entry(*sled).or_insert(*since);
                    *at = (*at).min(*since);
                }
            }
            EntryHeader::Meta(cmd) => self.cluster.get_or_insert_default().apply(cmd),
            EntryHeader::ClientSession(session) => self.sessions.raise(*session),
        }
    }

    /// Records which chunks the entry at `index` touches (call for every applied entry, in
    /// order; only writes and zeroes change anything). Taking the maximum keeps replays over a
    /// later state harmless.
    pub fn note_applied(&mut self, index: u64, h: &EntryHeader) {
        if self.written_from == u64::MAX {
            self.written_from = index.saturating_sub(1);
        }
        let (offset, len) = match h {
            EntryHeader::Write { offset, len } => (*offset, u64::from(*len)),
            EntryHeader::Zero { offset, len, .. } => (*offset, *len),
            _ => return,
        };
        let Some(chunk) = self.spec.as_ref().map(|s| s.chunk_size).filter(|c| *c > 0) else {
            return;
        };
        if len == 0 {
            return;
        }
        let (first, last) = (offset / chunk, (offset.saturating_add(len) - 1) / chunk);
        // Bounded by the volume's size: the entry was checked against it when proposed.
        let chunks = self.spec.as_ref().map_or(0, |s| s.chunks());
        let last = last.min(chunks.saturating_sub(1));
        for c in first..=last {
            let at = self.chunk_written.entry(c).or_insert(index);
            *at = (*at).max(index);
        }
    }

    /// The chunks a stale `sled` may have missed: those written after its mark's `since`.
    /// `None` when that is not known (every chunk must be copied).
    pub fn missed_chunks(&self, sled: SledId) -> Option<BTreeSet<u64>> {
        let since = *self.stale_since.get(&sled)?;
        if since < self.written_from {
            return None;
        }
        Some(
            self.chunk_written
                .iter()
                .filter(|(_, at)| **at > since)
                .map(|(c, _)| *c)
                .collect(),
        )
    }

    /// Encodes as Raft snapshot data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![SNAPSHOT_FORMAT_VERSION];
        out.extend(postcard::to_stdvec(self).unwrap_or_default());
        out
    }

    /// Decodes Raft snapshot data (empty data: the initial state).
    pub fn decode(data: &[u8]) -> Result<Self, EntryError> {
        let Some((&v, rest)) = data.split_first() else {
            return Ok(Self::default());
        };
        let malformed = |e: postcard::Error| EntryError::Malformed(e.to_string());
        match v {
            SNAPSHOT_FORMAT_VERSION => postcard::from_bytes(rest).map_err(malformed),
            3 => postcard::from_bytes::<VolumeStateV3>(rest)
                .map(Self::from)
                .map_err(malformed),
            2 => postcard::from_bytes::<VolumeStateV2>(rest)
                .map(|v2| Self::from(VolumeStateV3::from(v2)))
                .map_err(malformed),
            1 => postcard::from_bytes::<VolumeStateV1>(rest)
                .map(|v1| Self::from(VolumeStateV3::from(VolumeStateV2::from(v1))))
                .map_err(malformed),
            found => Err(EntryError::Version { found }),
        }
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

    fn four_chunk_spec() -> VolumeSpec {
        VolumeSpec {
            id: VolumeId(1),
            name: "v".into(),
            size: 4 << 20,
            chunk_size: 1 << 20,
            placement: vec![vec![Uuid128(1), Uuid128(2)]; 4],
        }
    }

    fn write(offset: u64, len: u32) -> EntryHeader {
        EntryHeader::Write { offset, len }
    }

    /// Applies `(index, header)` pairs the way the group does.
    fn run(s: &mut VolumeState, entries: &[(u64, EntryHeader)]) {
        for (i, h) in entries {
            s.note_applied(*i, h);
            s.apply(h);
        }
    }

    #[test]
    fn a_stale_sled_missed_only_the_chunks_written_after_its_mark() {
        let sled = Uuid128(2);
        let log = vec![
            (1, EntryHeader::Spec(four_chunk_spec())),
            (2, write(0, 4096)),                // chunk 0
            (3, write((1 << 20) - 4096, 8192)), // chunks 0 and 1
            (4, EntryHeader::FlushedUpTo { index: 3 }),
            (5, write(2 << 20, 4096)), // chunk 2: not flushed when the sled went away
            (6, EntryHeader::SledStaleSince { sled, since: 3 }),
            (
                7,
                EntryHeader::Zero {
                    offset: 3 << 20,
                    len: 1 << 20,
                    free: true,
                },
            ), // chunk 3
            // A later mark with a later flushed index does not forget the earlier misses.
            (8, EntryHeader::FlushedUpTo { index: 7 }),
            (9, EntryHeader::SledStaleSince { sled, since: 7 }),
        ];
        let mut s = VolumeState::default();
        run(&mut s, &log);
        assert_eq!(s.missed_chunks(sled), Some(BTreeSet::from([2, 3])));
        assert_eq!(s.missed_chunks(Uuid128(1)), None, "not stale");
        // Replaying the log over the state it produced changes nothing (snapshots are taken at
        // the flushed index with the state of a later one).
        let mut again = s.clone();
        run(&mut again, &log);
        assert_eq!(again, s);
        // Current again: nothing recorded; stale again later: only what follows.
        run(
            &mut s,
            &[
                (10, EntryHeader::SledStale { sled, stale: false }),
                (11, EntryHeader::FlushedUpTo { index: 10 }),
                (12, EntryHeader::SledStaleSince { sled, since: 10 }),
                (13, write(4096, 4096)),
            ],
        );
        assert_eq!(s.missed_chunks(sled), Some(BTreeSet::from([0])));
        // Marked stale by an older head node: what it missed is unknown.
        let mut old = VolumeState::default();
        run(
            &mut old,
            &[
                (1, EntryHeader::Spec(four_chunk_spec())),
                (2, EntryHeader::SledStale { sled, stale: true }),
                (3, EntryHeader::SledStaleSince { sled, since: 2 }),
            ],
        );
        assert_eq!(old.missed_chunks(sled), None);
        // Entries past the end of the volume (never proposed) do not grow the record.
        let mut s = VolumeState::default();
        run(
            &mut s,
            &[
                (1, EntryHeader::Spec(four_chunk_spec())),
                (2, write(64 << 20, 4096)),
            ],
        );
        assert_eq!(s.chunk_written.len(), 0);
    }

    #[test]
    fn the_record_keeps_only_what_a_stale_sled_can_miss() {
        let sled = Uuid128(2);
        let mut s = VolumeState::default();
        run(
            &mut s,
            &[
                (1, EntryHeader::Spec(four_chunk_spec())),
                (2, write(0, 4096)),
                (3, write(1 << 20, 4096)),
                (4, EntryHeader::FlushedUpTo { index: 2 }),
            ],
        );
        // No sled stale: only the unflushed tail is kept.
        assert_eq!(s.chunk_written, BTreeMap::from([(1, 3)]));
        run(
            &mut s,
            &[
                (5, EntryHeader::SledStaleSince { sled, since: 2 }),
                (6, write(2 << 20, 4096)),
                (7, EntryHeader::FlushedUpTo { index: 6 }),
            ],
        );
        // Stale since 2: everything after it is kept through later flushes.
        assert_eq!(s.missed_chunks(sled), Some(BTreeSet::from([1, 2])));
        run(
            &mut s,
            &[
                (8, EntryHeader::SledStale { sled, stale: false }),
                (9, EntryHeader::FlushedUpTo { index: 8 }),
            ],
        );
        assert!(s.chunk_written.is_empty());
    }

    #[test]
    fn version_1_snapshots_are_read_and_tracking_starts_after_them() {
        let sled = Uuid128(2);
        let stale = BTreeSet::from([sled]);
        let mut v1 = vec![1u8];
        v1.extend(
            postcard::to_stdvec(&(
                Some(four_chunk_spec()),
                9u64,
                QosConfig::default(),
                None::<QosState>,
                stale.clone(),
                None::<ClusterState>,
            ))
            .unwrap(),
        );
        let mut s = VolumeState::decode(&v1).unwrap();
        assert_eq!(s.flushed, 9);
        assert_eq!(s.stale, stale);
        assert_eq!(s.written_from, u64::MAX);
        // Stale before the upgrade: unknown, whatever follows.
        run(&mut s, &[(12, write(0, 4096))]);
        assert_eq!(s.written_from, 11);
        assert_eq!(s.missed_chunks(sled), None);
        // Stale after it: known.
        let other = Uuid128(1);
        run(
            &mut s,
            &[
                (
                    13,
                    EntryHeader::SledStaleSince {
                        sled: other,
                        since: 12,
                    },
                ),
                (14, write(2 << 20, 4096)),
            ],
        );
        assert_eq!(s.missed_chunks(other), Some(BTreeSet::from([2])));
        // And it is kept in a current snapshot.
        assert_eq!(s.encode()[0], SNAPSHOT_FORMAT_VERSION);
        assert_eq!(VolumeState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn version_2_snapshots_are_read_without_sessions_and_sessions_are_kept_in_version_3() {
        let sled = Uuid128(2);
        let mut v2 = vec![2u8];
        v2.extend(
            postcard::to_stdvec(&(
                Some(four_chunk_spec()),
                9u64,
                QosConfig::default(),
                None::<QosState>,
                BTreeSet::from([sled]),
                None::<ClusterState>,
                BTreeMap::from([(sled, 7u64)]),
                BTreeMap::from([(2u64, 8u64)]),
                6u64,
            ))
            .unwrap(),
        );
        let mut s = VolumeState::decode(&v2).unwrap();
        assert_eq!(s.flushed, 9);
        assert_eq!(s.missed_chunks(sled), Some(BTreeSet::from([2])));
        assert!(s.sessions.is_empty());

        let session = ClientSession {
            client: 5,
            generation: 2,
        };
        let h = EntryHeader::ClientSession(session);
        assert_eq!(EntryHeader::decode(&h.encode()).unwrap(), Some(h.clone()));
        s.apply(&h);
        assert!(!s.sessions.admits(ClientSession {
            client: 5,
            generation: 1
        }));
        assert_eq!(s.encode()[0], SNAPSHOT_FORMAT_VERSION);
        assert_eq!(VolumeState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn version_3_snapshots_are_read_with_nothing_draining_and_draining_is_kept_in_version_4() {
        use crate::control::state::Settings;
        let sled = Uuid128(2);
        let settings = Settings::default();
        let mut v3 = vec![3u8];
        v3.extend(
            postcard::to_stdvec(&(
                None::<VolumeSpec>,
                4u64,
                QosConfig::default(),
                None::<QosState>,
                BTreeSet::<SledId>::new(),
                // The cluster state of then: no `draining`.
                Some((
                    BTreeMap::<u64, ()>::new(),
                    BTreeMap::<SledId, ()>::new(),
                    BTreeMap::<u64, ()>::new(),
                    BTreeMap::<String, ()>::new(),
                    settings.clone(),
                    7u32,
                )),
                BTreeMap::<SledId, u64>::new(),
                BTreeMap::<u64, u64>::new(),
                0u64,
                SessionFloors::default(),
            ))
            .unwrap(),
        );
        let mut s = VolumeState::decode(&v3).unwrap();
        assert_eq!(s.flushed, 4);
        let cluster = s.cluster.as_mut().expect("the cluster state");
        assert_eq!(cluster.key_version, 7);
        assert_eq!(cluster.settings, settings);
        assert!(cluster.draining.is_empty());
        cluster.apply(&MetaCmd::DrainSled { sled, drain: true });
        assert_eq!(cluster.draining, BTreeSet::from([sled]));
        assert_eq!(s.encode()[0], SNAPSHOT_FORMAT_VERSION);
        assert_eq!(VolumeState::decode(&s.encode()).unwrap(), s);
    }

    /// One step of a random history of a sled going stale and coming back.
    #[derive(Debug, Clone)]
    enum Step {
        /// A write to a chunk (0..4).
        Write(u64),
        /// The write-back caught up with part of the unflushed tail (a fraction in 0..=4 of it).
        Flush(u64),
        /// The leader records the sled stale (with the flushed index it knows).
        Stale,
        /// A resynchronisation finished: the sled is recorded current.
        Current,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..4).prop_map(Step::Write),
            2 => (0u64..=4).prop_map(Step::Flush),
            1 => Just(Step::Stale),
            1 => Just(Step::Current),
        ]
    }

    /// The log of a history, and for each point in it the chunks the sled may really miss:
    /// it holds every write up to `has` (the flushed index while it was current, or everything
    /// before the entry recording it current), and may miss any later one.
    /// A log, and per entry what the stale sled may miss then (`None`: it is current).
    type History = (Vec<(u64, EntryHeader)>, Vec<Option<BTreeSet<u64>>>);

    fn history(steps: &[Step]) -> History {
        let sled = Uuid128(2);
        let mut log = vec![(1, EntryHeader::Spec(four_chunk_spec()))];
        let mut truth = vec![None];
        let (mut flushed, mut has, mut stale) = (0u64, 0u64, false);
        let mut writes: Vec<(u64, u64)> = Vec::new();
        for st in steps {
            let index = log.len() as u64 + 1;
            let h = match st {
                Step::Write(c) => {
                    writes.push((index, *c));
                    write(c << 20, 4096)
                }
                Step::Flush(part) => {
                    let tail: Vec<u64> = writes
                        .iter()
                        .map(|(i, _)| *i)
                        .filter(|i| *i > flushed)
                        .collect();
                    let upto = tail.len() * *part as usize / 4;
                    let Some(f) = upto.checked_sub(1).map(|k| tail[k]) else {
                        continue;
                    };
                    flushed = f;
                    if !stale {
                        has = has.max(f);
                    }
                    EntryHeader::FlushedUpTo { index: f }
                }
                Step::Stale => {
                    stale = true;
                    EntryHeader::SledStaleSince {
                        sled,
                        since: flushed,
                    }
                }
                Step::Current if stale => {
                    stale = false;
                    has = index - 1;
                    EntryHeader::SledStale { sled, stale: false }
                }
                Step::Current => continue,
            };
            log.push((index, h));
            truth.push(stale.then(|| {
                writes
                    .iter()
                    .filter(|(i, _)| *i > has)
                    .map(|(_, c)| *c)
                    .collect()
            }));
        }
        (log, truth)
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = EntryHeader::decode(&b);
            let _ = VolumeState::decode(&b);
        }

        /// Whatever the history, the record names every chunk the stale sled may miss — also
        /// after a node restores a snapshot of a later state labelled at the flushed index and
        /// replays the log from there.
        #[test]
        fn the_record_covers_every_chunk_a_stale_sled_may_miss(
            steps in proptest::collection::vec(step(), 1..60),
            cut in any::<proptest::sample::Index>(),
        ) {
            let sled = Uuid128(2);
            let (log, truth) = history(&steps);
            let mut s = VolumeState::default();
            for (k, (i, h)) in log.iter().enumerate() {
                s.note_applied(*i, h);
                s.apply(h);
                if let Some(must) = &truth[k] {
                    let named = s.missed_chunks(sled).expect("a stale sled with a since");
                    prop_assert!(named.is_superset(must), "at {i}: named {named:?}, missed {must:?}");
                }
            }
            // A snapshot of the state at `at`, labelled at its flushed index, then replayed.
            let at = cut.index(log.len());
            let mut snap = VolumeState::default();
            for (i, h) in &log[..=at] {
                snap.note_applied(*i, h);
                snap.apply(h);
            }
            let mut r = VolumeState::decode(&snap.encode()).unwrap();
            let from = r.flushed;
            for (k, (i, h)) in log.iter().enumerate().filter(|(_, (i, _))| *i > from) {
                r.note_applied(*i, h);
                r.apply(h);
                if k > at && let Some(must) = &truth[k] {
                    let named = r.missed_chunks(sled).expect("a stale sled with a since");
                    prop_assert!(named.is_superset(must), "replayed, at {i}: named {named:?}, missed {must:?}");
                }
            }
        }
    }

    #[test]
    fn data_entries_are_checked_against_their_data_and_the_volume() {
        let size = Some(1 << 20);
        let w = |offset, len| EntryHeader::Write { offset, len };
        let z = |offset, len| EntryHeader::Zero {
            offset,
            len,
            free: true,
        };
        assert_eq!(w(0, 4096).check_data(4096, size), Ok(()));
        assert_eq!(w((1 << 20) - 4096, 4096).check_data(4096, size), Ok(()));
        assert_eq!(z(0, 1 << 20).check_data(0, size), Ok(()));
        // Unknown size (not created yet): only the shape is checked.
        assert_eq!(w(1 << 40, 4096).check_data(4096, None), Ok(()));
        for (h, data) in [
            (w(0, 4096), 4095),
            (w(0, 4096), 8192),
            (w(1 << 20, 4096), 4096),
            (w(u64::MAX - 4095, 4096), 4096),
            (z(4096, 1 << 20), 0),
            (z(u64::MAX, 4096), 0),
        ] {
            assert!(h.check_data(data, size).is_err(), "{h:?} with {data} bytes");
        }
        assert!(z(u64::MAX, 4096).check_data(0, None).is_err(), "overflow");
        // Other entries carry no range.
        assert_eq!(
            EntryHeader::FlushedUpTo { index: 9 }.check_data(0, size),
            Ok(())
        );
    }
}
