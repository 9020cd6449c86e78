//! Volumes whose data lives on sleds.
//!
//! * [`VolumeSpec`] — what a volume is: id, name, size, chunk size and the sleds of each chunk
//!   (chosen once, at creation, and kept with the volume so the I/O path never asks anyone).
//! * [`store::SledStore`] — block-aligned replicated I/O on the sleds of one volume, with this
//!   head node's fencing credential: every write to every replica, reads from one replica with
//!   fall-back, zeroing and trimming as sled operations, claims.
//! * [`rangelock::RangeLock`] — first-come-first-served block-range locks.

pub mod rangelock;
pub mod session;
pub mod store;

use common::ids::{ChunkIndex, SledId, VolumeId};
use serde::{Deserialize, Serialize};

/// The block size of the sled layer: every sled I/O is aligned to it.
pub const BLOCK: u64 = 4096;

/// Largest NBD READ/WRITE payload advertised.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What a volume is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Never reused.
    pub id: VolumeId,
    /// A label.
    pub name: String,
    /// Size in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Chunk size (the sleds' chunk size).
    pub chunk_size: u64,
    /// For each chunk, the sleds holding its replicas (the first is read first).
    pub placement: Vec<Vec<SledId>>,
}

/// Errors creating or growing a volume's placement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// Not enough sleds for the requested replicas.
    #[error("cannot place {replicas} replicas on {sleds} reachable sleds")]
    NotEnoughSleds {
        /// Replicas wanted.
        replicas: usize,
        /// Sleds available.
        sleds: usize,
    },
    /// Size not usable.
    #[error("volume size {0} must be a positive multiple of 4096")]
    Size(u64),
}

impl VolumeSpec {
    /// A new volume over `sleds` (sorted by id for determinism): each chunk's `replicas` sleds
    /// are consecutive in that order, starting at a position that rotates with the chunk index
    /// (and the volume id), so replicas of one chunk are on distinct sleds and load spreads
    /// evenly.
    pub fn place(
        id: VolumeId,
        name: &str,
        size: u64,
        chunk_size: u64,
        sleds: &[SledId],
        replicas: usize,
    ) -> Result<Self, PlacementError> {
        if size == 0 || !size.is_multiple_of(BLOCK) {
            return Err(PlacementError::Size(size));
        }
        let mut spec = Self {
            id,
            name: name.to_string(),
            size: 0,
            chunk_size,
            placement: Vec::new(),
        };
        spec.grow(size, sleds, replicas)?;
        Ok(spec)
    }

    /// Grows the volume to `size`, placing the new chunks.
    pub fn grow(
        &mut self,
        size: u64,
        sleds: &[SledId],
        replicas: usize,
    ) -> Result<(), PlacementError> {
        if size == 0 || !size.is_multiple_of(BLOCK) {
            return Err(PlacementError::Size(size));
        }
        let mut sorted = sleds.to_vec();
        sorted.sort();
        sorted.dedup();
        if replicas == 0 || sorted.len() < replicas {
            return Err(PlacementError::NotEnoughSleds {
                replicas,
                sleds: sorted.len(),
            });
        }
        let chunks = size.div_ceil(self.chunk_size) as usize;
        let n = sorted.len();
        let base = (self.id.0 % n as u128) as usize;
        while self.placement.len() < chunks {
            let i = self.placement.len();
            let set = (0..replicas).map(|k| sorted[(base + i + k) % n]).collect();
            self.placement.push(set);
        }
        self.size = self.size.max(size);
        Ok(())
    }

    /// This spec grown to `size` with `extra`, the placement the control plane chose for the
    /// chunks past *its* record of the size. `Ok(None)` when already that large. The record may
    /// be behind the group (an earlier resize grew the group, then failed to record it): then
    /// `extra` covers more chunks than are missing, and the missing ones are its tail.
    pub fn grown(&self, size: u64, extra: &[Vec<SledId>]) -> Result<Option<Self>, String> {
        if self.size >= size {
            return Ok(None);
        }
        let need = size.div_ceil(self.chunk_size);
        let missing = need.saturating_sub(self.chunks()) as usize;
        if extra.len() < missing {
            return Err(format!(
                "growth placement covers {} chunks; {size} bytes need {missing} more",
                extra.len()
            ));
        }
        let mut grown = self.clone();
        grown
            .placement
            .extend_from_slice(&extra[extra.len() - missing..]);
        grown.size = size;
        Ok(Some(grown))
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.placement.len() as u64
    }

    /// Every sled this volume uses.
    pub fn sleds(&self) -> Vec<SledId> {
        let mut all: Vec<SledId> = self.placement.iter().flatten().copied().collect();
        all.sort();
        all.dedup();
        all
    }

    /// Splits `[offset, offset+len)` at chunk boundaries: `(chunk, offset in chunk, length,
    /// offset in the request)`.
    pub fn segments(&self, offset: u64, len: u64) -> Vec<Segment> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let chunk = pos / self.chunk_size;
            let within = pos % self.chunk_size;
            let n = (self.chunk_size - within).min(end - pos);
            out.push(Segment {
                chunk: ChunkIndex(chunk),
                offset: within,
                len: n,
                at: pos - offset,
            });
            pos += n;
        }
        out
    }
}

/// A piece of a request within one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Chunk.
    pub chunk: ChunkIndex,
    /// Offset within the chunk.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Offset within the request.
    pub at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::ids::Uuid128;
    use proptest::prelude::*;

    fn sleds(n: u128) -> Vec<SledId> {
        (1..=n).map(Uuid128).collect()
    }

    #[test]
    fn growth_takes_the_missing_tail_of_the_placement() {
        let chunk = 64 << 20;
        let s = VolumeSpec::place(VolumeId(7), "v", 2 * chunk, chunk, &sleds(3), 3).unwrap();
        let set = |n: u128| vec![Uuid128(n); 3];
        assert_eq!(s.grown(2 * chunk, &[]), Ok(None));
        let g = s.grown(3 * chunk, &[set(9)]).unwrap().unwrap();
        assert_eq!((g.size, g.chunks()), (3 * chunk, 3));
        assert_eq!(g.placement[2], set(9));
        // The control plane's record said 2 chunks while the group had 3: a resize to 5
        // chunks places 3; the group takes the last 2.
        let g5 = g
            .grown(5 * chunk, &[set(1), set(2), set(3)])
            .unwrap()
            .unwrap();
        assert_eq!(g5.chunks(), 5);
        assert_eq!(g5.placement[..3], g.placement[..]);
        assert_eq!(g5.placement[3..], [set(2), set(3)]);
        assert!(g.grown(5 * chunk, &[set(1)]).is_err(), "too few");
        // A size inside the last chunk needs no new chunk.
        let odd =
            VolumeSpec::place(VolumeId(7), "v", 2 * chunk + 4096, chunk, &sleds(3), 3).unwrap();
        let g = odd.grown(3 * chunk, &[]).unwrap().unwrap();
        assert_eq!((g.size, g.chunks()), (3 * chunk, 3));
    }

    #[test]
    fn replicas_are_distinct_and_spread() {
        let s = VolumeSpec::place(VolumeId(7), "v", 64 << 20 << 4, 64 << 20, &sleds(5), 3).unwrap();
        assert_eq!(s.chunks(), 16);
        let mut load = std::collections::HashMap::new();
        for set in &s.placement {
            let mut d = set.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3);
            for x in set {
                *load.entry(*x).or_insert(0) += 1;
            }
        }
        let (min, max) = (load.values().min().unwrap(), load.values().max().unwrap());
        assert!(max - min <= 1, "{load:?}");
        assert!(matches!(
            VolumeSpec::place(VolumeId(7), "v", 4096, 64 << 20, &sleds(2), 3),
            Err(PlacementError::NotEnoughSleds { .. })
        ));
        assert!(matches!(
            VolumeSpec::place(VolumeId(7), "v", 4095, 64 << 20, &sleds(3), 3),
            Err(PlacementError::Size(_))
        ));
    }

    #[test]
    fn growing_keeps_existing_placement() {
        let mut s = VolumeSpec::place(VolumeId(1), "v", 128 << 20, 64 << 20, &sleds(3), 2).unwrap();
        let before = s.placement.clone();
        s.grow(512 << 20, &sleds(3), 2).unwrap();
        assert_eq!(&s.placement[..2], &before[..]);
        assert_eq!(s.chunks(), 8);
    }

    proptest! {
        #[test]
        fn segments_tile_the_request(offset in 0u64..(1 << 34), len in 1u64..(1 << 28)) {
            let s = VolumeSpec { id: VolumeId(1), name: "v".into(), size: 1 << 40, chunk_size: 64 << 20, placement: vec![] };
            let segs = s.segments(offset, len);
            let mut at = 0;
            for seg in &segs {
                prop_assert_eq!(seg.at, at);
                prop_assert!(seg.offset + seg.len <= s.chunk_size);
                prop_assert_eq!(seg.chunk.0 * s.chunk_size + seg.offset, offset + seg.at);
                at += seg.len;
            }
            prop_assert_eq!(at, len);
        }
    }
}
