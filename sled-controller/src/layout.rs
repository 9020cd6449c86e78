//! The on-device format, version 1. Pure encoding and decoding; no I/O.
//!
//! ```text
//! 0            superblock copy A (4 KiB)
//! 4 KiB        superblock copy B (identical; survives damage to A)
//! ct_offset    chunk table: ct_pages page pairs (copy A, copy B), 31 entries of 128 B per page
//! ft_offset    fence table: ft_pages page pairs, 127 entries of 32 B per page
//! crc_offset   block checksums: for each chunk, 8 B per 4 KiB block (crc32 + flags)
//! data_offset  chunks, chunk_size each (1 MiB aligned)
//! ```
//!
//! **Crash atomicity.** Every table page exists twice and carries a sequence number and a CRC. An
//! update writes the *other* copy with the next sequence number and makes it durable before the
//! change is acknowledged; on open the valid copy with the higher sequence wins. A torn or lost
//! page write therefore leaves the previous version readable: the table is always consistent.
//!
//! **Block checksums.** Each 4 KiB block has an 8-byte entry: its CRC-32 and a `WRITTEN` flag (an
//! all-zero entry means the block reads as zeros). Entries are kept in memory and written back
//! lazily per 2 MiB *region* (one 4 KiB page of entries); a region whose on-disk entries may be
//! stale is marked *dirty* in its chunk's entry, durably, before the first write into it. After a
//! crash, the entries of dirty regions are recomputed from the data (which is the truth there), so
//! a crash between a data write and its checksum write never makes a block look corrupt. See
//! `docs/design/001-sled-block-checksums.md`.

use common::ids::{ChunkIndex, DeviceId, Epoch, NodeId, SledId, Uuid128, VolumeId};

/// Page (and alignment) size of all metadata.
pub const PAGE: u64 = 4096;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"STKDSLED";
/// Device format version written by this build.
pub const FORMAT_VERSION: u32 = 1;
/// Table page magic.
pub const PAGE_MAGIC: u32 = u32::from_le_bytes(*b"STKP");
/// Bytes per checksummed block.
pub const BLOCK: u64 = 4096;
/// Bytes per checksum entry.
pub const CRC_ENTRY: u64 = 8;
/// Blocks covered by one page of checksum entries: a region.
pub const REGION_BLOCKS: u64 = PAGE / CRC_ENTRY;
/// Bytes of data in one region (2 MiB).
pub const REGION_BYTES: u64 = REGION_BLOCKS * BLOCK;
/// Most regions a chunk may have (the dirty bitmap is 64 bytes).
pub const MAX_REGIONS: u64 = 512;
/// Chunk table entry size.
pub const CT_ENTRY: usize = 128;
/// Chunk table entries per page.
pub const CT_PER_PAGE: u64 = 31;
/// Fence table entry size.
pub const FT_ENTRY: usize = 32;
/// Fence table entries per page.
pub const FT_PER_PAGE: u64 = 127;
/// Header size of a table page.
pub const PAGE_HEADER: usize = 32;
/// Flag in a checksum entry: the block holds written data (else it reads as zeros).
pub const CRC_WRITTEN: u32 = 1;

/// Errors decoding a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// No superblock copy has the Stockade magic.
    #[error("not a Stockade sled device (no superblock magic); format it first")]
    NotFormatted,
    /// The device was formatted by another format version.
    #[error(
        "device format version {found} is not supported by this build (it reads version {FORMAT_VERSION}); use a matching sled-controller release"
    )]
    Version {
        /// Version found on the device.
        found: u32,
    },
    /// Both superblock copies fail their checksum.
    #[error("superblock corrupted: both copies fail their checksum")]
    SuperblockCorrupt,
    /// The device is smaller than its superblock says.
    #[error("device truncated: it has {actual} bytes but was formatted with {expected}")]
    Truncated {
        /// Size from the superblock.
        expected: u64,
        /// Size now.
        actual: u64,
    },
    /// Both copies of a table page are invalid.
    #[error("{table} page {index} corrupted: both copies fail their checksum")]
    PageCorrupt {
        /// Which table.
        table: &'static str,
        /// Page index.
        index: u64,
    },
    /// The superblock's geometry is inconsistent.
    #[error("superblock geometry is inconsistent: {0}")]
    Geometry(String),
    /// The device cannot hold even one chunk.
    #[error(
        "device of {size} bytes is too small for one chunk of {chunk_size} bytes plus metadata"
    )]
    TooSmall {
        /// Device size.
        size: u64,
        /// Chunk size.
        chunk_size: u64,
    },
    /// Chunk size not supported.
    #[error("chunk size {0} is invalid: use a multiple of 2 MiB between 2 MiB and 1 GiB")]
    ChunkSize(u64),
}

/// Where everything is on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Device size in bytes at format time.
    pub device_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Number of chunks.
    pub chunk_count: u64,
    /// Chunk table offset.
    pub ct_offset: u64,
    /// Chunk table pages (each stored twice).
    pub ct_pages: u64,
    /// Fence table offset.
    pub ft_offset: u64,
    /// Fence table pages (each stored twice).
    pub ft_pages: u64,
    /// Checksum area offset.
    pub crc_offset: u64,
    /// First chunk's offset.
    pub data_offset: u64,
}

const fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl Geometry {
    /// Checks a chunk size.
    pub fn check_chunk_size(chunk_size: u64) -> Result<(), LayoutError> {
        if chunk_size == 0
            || !chunk_size.is_multiple_of(REGION_BYTES)
            || chunk_size / REGION_BYTES > MAX_REGIONS
        {
            return Err(LayoutError::ChunkSize(chunk_size));
        }
        Ok(())
    }

    fn with_count(device_size: u64, chunk_size: u64, n: u64) -> Self {
        let ct_pages = n.div_ceil(CT_PER_PAGE);
        // Room for fencing records of twice as many volumes as chunks, at least 1016.
        let ft_pages = (2 * n).div_ceil(FT_PER_PAGE).max(8);
        let ct_offset = 2 * PAGE;
        let ft_offset = ct_offset + ct_pages * 2 * PAGE;
        let crc_offset = ft_offset + ft_pages * 2 * PAGE;
        let crc_bytes = n * Self::crc_bytes_per_chunk_for(chunk_size);
        let data_offset = align_up(crc_offset + crc_bytes, 1 << 20);
        Self {
            device_size,
            chunk_size,
            chunk_count: n,
            ct_offset,
            ct_pages,
            ft_offset,
            ft_pages,
            crc_offset,
            data_offset,
        }
    }

    const fn crc_bytes_per_chunk_for(chunk_size: u64) -> u64 {
        chunk_size / BLOCK * CRC_ENTRY
    }

    /// The largest layout that fits `device_size`.
    pub fn compute(device_size: u64, chunk_size: u64) -> Result<Self, LayoutError> {
        Self::check_chunk_size(chunk_size)?;
        // An upper bound (no metadata at all); the loop walks down a few steps to what fits.
        let mut n = device_size / chunk_size;
        loop {
            if n == 0 {
                return Err(LayoutError::TooSmall {
                    size: device_size,
                    chunk_size,
                });
            }
            let g = Self::with_count(device_size, chunk_size, n);
            if g.data_offset + n * chunk_size <= device_size {
                return Ok(g);
            }
            n -= 1;
        }
    }

    /// Checks a geometry read from a superblock against what this build would compute.
    pub fn validate(&self) -> Result<(), LayoutError> {
        Self::check_chunk_size(self.chunk_size)?;
        let want = Self::with_count(self.device_size, self.chunk_size, self.chunk_count);
        if want != *self {
            return Err(LayoutError::Geometry(format!(
                "offsets {self:?} differ from the format's {want:?}"
            )));
        }
        if self.data_offset + self.chunk_count * self.chunk_size > self.device_size {
            return Err(LayoutError::Geometry(
                "chunks extend past the device".into(),
            ));
        }
        Ok(())
    }

    /// Bytes of checksum entries per chunk.
    pub fn crc_bytes_per_chunk(&self) -> u64 {
        Self::crc_bytes_per_chunk_for(self.chunk_size)
    }

    /// Regions per chunk.
    pub fn regions_per_chunk(&self) -> u64 {
        self.chunk_size / REGION_BYTES
    }

    /// Device offset of a byte within a physical chunk.
    pub fn data_pos(&self, slot: u64, offset: u64) -> u64 {
        self.data_offset + slot * self.chunk_size + offset
    }

    /// Device offset of a region's checksum page.
    pub fn crc_page_pos(&self, slot: u64, region: u64) -> u64 {
        self.crc_offset + slot * self.crc_bytes_per_chunk() + region * PAGE
    }

    /// Device offset of copy `copy` (0 or 1) of chunk-table page `page`.
    pub fn ct_page_pos(&self, page: u64, copy: u8) -> u64 {
        self.ct_offset + page * 2 * PAGE + u64::from(copy) * PAGE
    }

    /// Device offset of copy `copy` of fence-table page `page`.
    pub fn ft_page_pos(&self, page: u64, copy: u8) -> u64 {
        self.ft_offset + page * 2 * PAGE + u64::from(copy) * PAGE
    }

    /// Fence table capacity (volumes).
    pub fn ft_capacity(&self) -> u64 {
        self.ft_pages * FT_PER_PAGE
    }
}

/// The superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// The sled this device belongs to.
    pub sled: SledId,
    /// This device.
    pub device: DeviceId,
    /// Where things are.
    pub geometry: Geometry,
    /// Seconds since the Unix epoch at format time.
    pub created_unix_s: u64,
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn put_u128(b: &mut [u8], at: usize, v: u128) {
    b[at..at + 16].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn get_u128(b: &[u8], at: usize) -> u128 {
    u128::from_le_bytes(b[at..at + 16].try_into().expect("16 bytes"))
}

const SB_CRC_AT: usize = PAGE as usize - 4;

impl Superblock {
    /// Encodes into one page.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE as usize];
        b[0..8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, PAGE as u32);
        put_u128(&mut b, 16, self.sled.0);
        put_u128(&mut b, 32, self.device.0);
        let g = &self.geometry;
        put_u64(&mut b, 48, g.chunk_size);
        put_u64(&mut b, 56, g.chunk_count);
        put_u64(&mut b, 64, g.device_size);
        put_u64(&mut b, 72, g.ct_offset);
        put_u64(&mut b, 80, g.ct_pages);
        put_u64(&mut b, 88, g.ft_offset);
        put_u64(&mut b, 96, g.ft_pages);
        put_u64(&mut b, 104, g.crc_offset);
        put_u64(&mut b, 112, g.data_offset);
        put_u64(&mut b, 120, self.created_unix_s);
        let crc = crc32fast::hash(&b[..SB_CRC_AT]);
        put_u32(&mut b, SB_CRC_AT, crc);
        b
    }

    /// Decodes one copy. `Ok(None)` when the page lacks the magic (unformatted or destroyed).
    fn decode_one(b: &[u8]) -> Result<Option<Self>, LayoutError> {
        if b.len() < PAGE as usize || b[0..8] != SB_MAGIC {
            return Ok(None);
        }
        let version = get_u32(b, 8);
        if crc32fast::hash(&b[..SB_CRC_AT]) != get_u32(b, SB_CRC_AT) {
            return Err(LayoutError::SuperblockCorrupt);
        }
        if version != FORMAT_VERSION {
            return Err(LayoutError::Version { found: version });
        }
        let geometry = Geometry {
            chunk_size: get_u64(b, 48),
            chunk_count: get_u64(b, 56),
            device_size: get_u64(b, 64),
            ct_offset: get_u64(b, 72),
            ct_pages: get_u64(b, 80),
            ft_offset: get_u64(b, 88),
            ft_pages: get_u64(b, 96),
            crc_offset: get_u64(b, 104),
            data_offset: get_u64(b, 112),
        };
        geometry.validate()?;
        Ok(Some(Self {
            sled: Uuid128(get_u128(b, 16)),
            device: Uuid128(get_u128(b, 32)),
            geometry,
            created_unix_s: get_u64(b, 120),
        }))
    }

    /// True when one copy of the superblock is damaged or gone (it fails its checksum or lacks
    /// the magic) and should be rewritten from the valid other copy. A copy written by another
    /// format version is not damaged: it is left for that version to read.
    pub fn copy_damaged(b: &[u8]) -> bool {
        matches!(
            Self::decode_one(b),
            Ok(None) | Err(LayoutError::SuperblockCorrupt)
        )
    }

    /// Decodes from the two copies (A then B), preferring a valid A. A version mismatch is
    /// reported as such even when the other copy is damaged.
    pub fn decode(a: &[u8], b: &[u8]) -> Result<Self, LayoutError> {
        let ra = Self::decode_one(a);
        let rb = Self::decode_one(b);
        match (ra, rb) {
            (Ok(Some(s)), _) | (_, Ok(Some(s))) => Ok(s),
            (Err(e @ LayoutError::Version { .. }), _)
            | (_, Err(e @ LayoutError::Version { .. })) => Err(e),
            (Err(e @ LayoutError::Geometry(_)), _) | (_, Err(e @ LayoutError::Geometry(_))) => {
                Err(e)
            }
            (Ok(None), Ok(None)) => Err(LayoutError::NotFormatted),
            _ => Err(LayoutError::SuperblockCorrupt),
        }
    }
}

/// Which table a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Chunk table.
    Chunks,
    /// Fence table.
    Fences,
}

impl Table {
    fn code(self) -> u16 {
        match self {
            Table::Chunks => 1,
            Table::Fences => 2,
        }
    }

    /// Name for errors.
    pub fn name(self) -> &'static str {
        match self {
            Table::Chunks => "chunk table",
            Table::Fences => "fence table",
        }
    }
}

/// Encodes a table page: header then `body` (≤ 4064 bytes).
pub fn encode_page(table: Table, index: u64, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; PAGE as usize];
    put_u32(&mut b, 0, PAGE_MAGIC);
    b[4..6].copy_from_slice(&table.code().to_le_bytes());
    put_u64(&mut b, 8, index);
    put_u64(&mut b, 16, seq);
    b[PAGE_HEADER..PAGE_HEADER + body.len()].copy_from_slice(body);
    let crc = crc32fast::hash(&b);
    put_u32(&mut b, 24, crc);
    b
}

/// Decodes one copy of a table page: `Some((seq, body))` when valid for this table and index.
pub fn decode_page(table: Table, index: u64, b: &[u8]) -> Option<(u64, &[u8])> {
    if b.len() != PAGE as usize || get_u32(b, 0) != PAGE_MAGIC || get_u16(b, 4) != table.code() {
        return None;
    }
    if get_u64(b, 8) != index {
        return None;
    }
    let stored = get_u32(b, 24);
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..24]);
    h.update(&[0u8; 4]);
    h.update(&b[28..]);
    if h.finalize() != stored {
        return None;
    }
    Some((get_u64(b, 16), &b[PAGE_HEADER..]))
}

/// Picks the current version of a page from its two copies: `(copy, seq, body)`.
pub fn pick_page<'a>(
    table: Table,
    index: u64,
    a: &'a [u8],
    b: &'a [u8],
) -> Result<(u8, u64, &'a [u8]), LayoutError> {
    match (decode_page(table, index, a), decode_page(table, index, b)) {
        (Some((sa, ba)), Some((sb, bb))) => Ok(if sb > sa { (1, sb, bb) } else { (0, sa, ba) }),
        (Some((s, body)), None) => Ok((0, s, body)),
        (None, Some((s, body))) => Ok((1, s, body)),
        (None, None) => Err(LayoutError::PageCorrupt {
            table: table.name(),
            index,
        }),
    }
}

/// A chunk table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Allocated to `volume`'s `chunk`.
    pub allocated: bool,
    /// Owner.
    pub volume: VolumeId,
    /// Index within the owner.
    pub chunk: ChunkIndex,
    /// Times this slot was allocated (informational).
    pub alloc_gen: u64,
    /// Bit r set: region r's checksum entries on disk may be stale.
    pub dirty: [u8; 64],
}

impl Default for ChunkEntry {
    fn default() -> Self {
        Self {
            allocated: false,
            volume: VolumeId::default(),
            chunk: ChunkIndex::default(),
            alloc_gen: 0,
            dirty: [0; 64],
        }
    }
}

impl ChunkEntry {
    /// Encodes into 128 bytes.
    pub fn encode(&self, out: &mut [u8]) {
        out[..CT_ENTRY].fill(0);
        out[0] = u8::from(self.allocated);
        put_u128(out, 8, self.volume.0);
        put_u64(out, 24, self.chunk.0);
        put_u64(out, 32, self.alloc_gen);
        out[40..104].copy_from_slice(&self.dirty);
    }

    /// Decodes from 128 bytes.
    pub fn decode(b: &[u8]) -> Self {
        let mut dirty = [0u8; 64];
        dirty.copy_from_slice(&b[40..104]);
        Self {
            allocated: b[0] == 1,
            volume: VolumeId(get_u128(b, 8)),
            chunk: ChunkIndex(get_u64(b, 24)),
            alloc_gen: get_u64(b, 32),
            dirty,
        }
    }

    /// Is region `r` marked dirty?
    pub fn is_dirty(&self, r: u64) -> bool {
        self.dirty[(r / 8) as usize] & (1 << (r % 8)) != 0
    }

    /// Marks or clears region `r`.
    pub fn set_dirty(&mut self, r: u64, on: bool) {
        let bit = 1u8 << (r % 8);
        let byte = &mut self.dirty[(r / 8) as usize];
        if on {
            *byte |= bit;
        } else {
            *byte &= !bit;
        }
    }
}

/// A fence table entry: the highest claim seen for a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceEntry {
    /// The volume (never zero; zero marks an empty slot).
    pub volume: VolumeId,
    /// Highest claimed epoch.
    pub epoch: Epoch,
    /// Its holder.
    pub holder: NodeId,
}

impl FenceEntry {
    /// Encodes into 32 bytes.
    pub fn encode(&self, out: &mut [u8]) {
        put_u128(out, 0, self.volume.0);
        put_u64(out, 16, self.epoch.0);
        put_u64(out, 24, self.holder.0);
    }

    /// Decodes from 32 bytes; `None` for an empty slot.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let volume = VolumeId(get_u128(b, 0));
        (volume.0 != 0).then(|| Self {
            volume,
            epoch: Epoch(get_u64(b, 16)),
            holder: NodeId(get_u64(b, 24)),
        })
    }
}

/// A block checksum entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CrcEntry {
    /// CRC-32 of the block (meaningful when `written`).
    pub crc: u32,
    /// The block holds written data; otherwise it reads as zeros.
    pub written: bool,
}

impl CrcEntry {
    /// The entry of a block whose content is unknown (it could not be read when its checksum
    /// had to be recomputed): written, with a checksum that almost no data matches (CRC-32 of
    /// a 4 KiB block is zero for one block in 2³²), so its reads fail their checksum and a
    /// head node reads another replica, until the block is written again.
    pub const UNKNOWN: Self = Self {
        crc: 0,
        written: true,
    };

    /// Encodes into 8 bytes.
    pub fn encode(&self, out: &mut [u8]) {
        put_u32(out, 0, if self.written { self.crc } else { 0 });
        put_u32(out, 4, if self.written { CRC_WRITTEN } else { 0 });
    }

    /// Decodes from 8 bytes.
    pub fn decode(b: &[u8]) -> Self {
        Self {
            crc: get_u32(b, 0),
            written: get_u32(b, 4) & CRC_WRITTEN != 0,
        }
    }

    /// The entry describing `data` (a 4 KiB block): all-zero data is stored as a zero block.
    pub fn of(data: &[u8]) -> Self {
        if data.iter().all(|&b| b == 0) {
            Self::default()
        } else {
            Self {
                crc: crc32fast::hash(data),
                written: true,
            }
        }
    }

    /// Does `data` match this entry?
    pub fn matches(&self, data: &[u8]) -> bool {
        if self.written {
            crc32fast::hash(data) == self.crc
        } else {
            data.iter().all(|&b| b == 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sb(size: u64) -> Superblock {
        Superblock {
            sled: Uuid128(1),
            device: Uuid128(2),
            geometry: Geometry::compute(size, 64 << 20).unwrap(),
            created_unix_s: 3,
        }
    }

    #[test]
    fn geometry_fits_and_is_aligned() {
        for size in [200 << 20, 1 << 30, 10 << 30, (1u64 << 40) + 12345 * 4096] {
            let g = Geometry::compute(size, 64 << 20).unwrap();
            assert!(g.data_offset + g.chunk_count * g.chunk_size <= size);
            // Not wasteful: one more chunk would not fit.
            let more = Geometry::with_count(size, g.chunk_size, g.chunk_count + 1);
            assert!(more.data_offset + more.chunk_count * more.chunk_size > size);
            assert_eq!(g.data_offset % (1 << 20), 0);
            assert_eq!(g.crc_offset % PAGE, 0);
            g.validate().unwrap();
        }
        assert!(matches!(
            Geometry::compute(64 << 20, 64 << 20),
            Err(LayoutError::TooSmall { .. })
        ));
        assert!(matches!(
            Geometry::compute(1 << 30, 3 << 20),
            Err(LayoutError::ChunkSize(_))
        ));
        assert!(matches!(
            Geometry::compute(8 << 30, 2 << 30),
            Err(LayoutError::ChunkSize(_))
        ));
    }

    #[test]
    fn superblock_round_trip_and_damage() {
        let s = sb(1 << 30);
        let a = s.encode();
        assert_eq!(Superblock::decode(&a, &a).unwrap(), s);
        // Copy A damaged: B is used.
        let mut bad = a.clone();
        bad[100] ^= 0xff;
        assert_eq!(Superblock::decode(&bad, &a).unwrap(), s);
        assert!(Superblock::copy_damaged(&bad));
        assert!(!Superblock::copy_damaged(&a));
        assert!(Superblock::copy_damaged(&[0u8; 4096]));
        // Both damaged: a clear error.
        assert_eq!(
            Superblock::decode(&bad, &bad).unwrap_err(),
            LayoutError::SuperblockCorrupt
        );
        // Never formatted.
        let zero = vec![0u8; 4096];
        assert_eq!(
            Superblock::decode(&zero, &zero).unwrap_err(),
            LayoutError::NotFormatted
        );
        // Another format version (with a valid checksum) is named as such.
        let mut v2 = a.clone();
        put_u32(&mut v2, 8, 2);
        let crc = crc32fast::hash(&v2[..SB_CRC_AT]);
        put_u32(&mut v2, SB_CRC_AT, crc);
        assert!(
            !Superblock::copy_damaged(&v2),
            "another version's copy is left alone"
        );
        let e = Superblock::decode(&v2, &v2).unwrap_err();
        assert_eq!(e, LayoutError::Version { found: 2 });
        assert!(e.to_string().contains("version 2"));
    }

    #[test]
    fn page_pairs_pick_the_newest_valid_copy() {
        let p1 = encode_page(Table::Chunks, 5, 1, b"one");
        let p2 = encode_page(Table::Chunks, 5, 2, b"two");
        let (copy, seq, body) = pick_page(Table::Chunks, 5, &p1, &p2).unwrap();
        assert_eq!((copy, seq, &body[..3]), (1, 2, &b"two"[..]));
        // Torn newer copy: the older one is used.
        let mut torn = p2.clone();
        torn[2000] ^= 1;
        let (copy, seq, _) = pick_page(Table::Chunks, 5, &p1, &torn).unwrap();
        assert_eq!((copy, seq), (0, 1));
        // A page of another table or index is not accepted.
        assert!(decode_page(Table::Fences, 5, &p1).is_none());
        assert!(decode_page(Table::Chunks, 6, &p1).is_none());
        assert!(pick_page(Table::Chunks, 5, &torn, &torn).is_err());
    }

    #[test]
    fn entries_round_trip() {
        let mut e = ChunkEntry {
            allocated: true,
            volume: VolumeId(0xabc),
            chunk: ChunkIndex(7),
            alloc_gen: 3,
            dirty: [0; 64],
        };
        e.set_dirty(31, true);
        e.set_dirty(511, true);
        let mut b = [0u8; CT_ENTRY];
        e.encode(&mut b);
        let d = ChunkEntry::decode(&b);
        assert_eq!(d, e);
        assert!(d.is_dirty(31) && d.is_dirty(511) && !d.is_dirty(30));
        let f = FenceEntry {
            volume: VolumeId(9),
            epoch: Epoch(4),
            holder: NodeId(2),
        };
        let mut b = [0u8; FT_ENTRY];
        f.encode(&mut b);
        assert_eq!(FenceEntry::decode(&b), Some(f));
        assert_eq!(FenceEntry::decode(&[0u8; 32]), None);
        let data = vec![7u8; 4096];
        let c = CrcEntry::of(&data);
        let mut b = [0u8; 8];
        c.encode(&mut b);
        assert_eq!(CrcEntry::decode(&b), c);
        assert!(c.matches(&data));
        assert!(!c.matches(&[0u8; 4096]));
        assert!(CrcEntry::decode(&[0u8; 8]).matches(&[0u8; 4096]));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
            let _ = Superblock::decode(&bytes, &bytes);
            let _ = pick_page(Table::Chunks, 0, &bytes, &bytes);
            let _ = ChunkEntry::decode(&bytes[..128]);
            let _ = FenceEntry::decode(&bytes[..32]);
        }

        #[test]
        fn any_single_bit_flip_in_a_superblock_copy_is_detected(bit in 0usize..(4096 * 8)) {
            let s = sb(4 << 30);
            let good = s.encode();
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            // The damaged copy alone is always rejected (the crc covers every byte)...
            prop_assert!(Superblock::decode(&bad, &bad).is_err());
            // ...and the intact copy takes over.
            prop_assert_eq!(Superblock::decode(&bad, &good).unwrap(), s);
        }
    }
}
