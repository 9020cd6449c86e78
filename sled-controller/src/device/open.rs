//! Formatting a device, opening it, and recovering block checksums after a crash.

use super::meta::{PageState, Tables};
use crate::engine::{IoEngine, OpKind, read_sync, run_sync, write_sync};
use crate::layout::{
    BLOCK, CRC_ENTRY, CT_ENTRY, CT_PER_PAGE, ChunkEntry, CrcEntry, FT_ENTRY, FT_PER_PAGE,
    FenceEntry, Geometry, LayoutError, PAGE, REGION_BLOCKS, REGION_BYTES, Superblock, Table,
    decode_page, encode_page, pick_page,
};
use common::AlignedBuf;
use common::ids::{SledId, Uuid128};
use std::io;

/// Errors formatting or opening a device.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The on-device format is wrong.
    #[error("{path}: {source}")]
    Layout {
        /// Device path.
        path: String,
        /// What is wrong.
        #[source]
        source: LayoutError,
    },
    /// An I/O error while reading metadata.
    #[error("{path}: I/O error while {what}: {source}")]
    Io {
        /// Device path.
        path: String,
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The device belongs to another sled.
    #[error("{path}: device belongs to sled {found}, not {expected}")]
    WrongSled {
        /// Device path.
        path: String,
        /// Its sled.
        found: SledId,
        /// This sled.
        expected: SledId,
    },
    /// The same chunk of a volume is allocated twice on a device.
    #[error("{path}: chunk table lists volume {volume} chunk {chunk} twice")]
    DuplicateChunk {
        /// Device path.
        path: String,
        /// Volume.
        volume: String,
        /// Chunk.
        chunk: u64,
    },
    /// The device is not formatted and holds data: refusing to erase it.
    #[error(
        "{path}: not a Stockade device and not empty; refusing to format it (pass --format to erase it)"
    )]
    NotEmpty {
        /// Device path.
        path: String,
    },
}

/// A device opened and recovered.
#[derive(Debug)]
pub(crate) struct Opened {
    pub sb: Superblock,
    pub tables: Tables,
    /// Regions whose checksums were recomputed from data after an unclean shutdown.
    pub recovered_regions: u64,
    /// Superblock copies (0 = A, 1 = B) found damaged and rewritten from the other one.
    pub repaired_superblock: Vec<u8>,
    /// Table pages with one copy damaged, rewritten from the valid one.
    pub repaired_pages: u64,
}

fn io_err<'a>(path: &'a str, what: &'static str) -> impl FnOnce(io::Error) -> OpenError + 'a {
    move |source| OpenError::Io {
        path: path.to_string(),
        what,
        source,
    }
}

/// True when the device may be formatted without `--format`: its first MiB is all zeros (a new
/// device), or it holds exactly what a format with `chunk_size` writes before its superblock
/// (a format that was interrupted: the superblock is written last).
pub fn looks_empty(
    engine: &mut dyn IoEngine,
    path: &str,
    chunk_size: u64,
) -> Result<bool, OpenError> {
    let len = (1u64 << 20).min(engine.size()) as usize;
    let b = read_sync(engine, 0, len).map_err(io_err(path, "reading the first MiB"))?;
    if b.iter().all(|&x| x == 0) {
        return Ok(true);
    }
    let Ok(geometry) = Geometry::compute(engine.size(), chunk_size) else {
        return Ok(false);
    };
    let mut expected = vec![0u8; len];
    for (base, image) in empty_tables(&geometry) {
        let Ok(base) = usize::try_from(base) else {
            continue;
        };
        if base < len {
            let n = image.len().min(len - base);
            expected[base..base + n].copy_from_slice(&image[..n]);
        }
    }
    Ok(b[..] == expected[..])
}

/// What a format writes for the tables of `geometry`: `(offset, bytes)` per table.
fn empty_tables(geometry: &Geometry) -> Vec<(u64, AlignedBuf)> {
    let tables = Tables::empty(geometry);
    [
        (Table::Chunks, geometry.ct_pages, geometry.ct_offset),
        (Table::Fences, geometry.ft_pages, geometry.ft_offset),
    ]
    .into_iter()
    .map(|(table, pages, base)| {
        // Both copies of every page: copy A valid with sequence 1, copy B zero (invalid).
        let mut region = AlignedBuf::zeroed((pages * 2 * PAGE) as usize);
        for p in 0..pages {
            let page = encode_page(table, p, 1, &tables.body(table, p));
            let at = (p * 2 * PAGE) as usize;
            region[at..at + PAGE as usize].copy_from_slice(&page);
        }
        (base, region)
    })
    .collect()
}

/// Writes a fresh format: superblock copies and empty tables, then fsync.
pub fn format(
    engine: &mut dyn IoEngine,
    path: &str,
    sled: SledId,
    chunk_size: u64,
) -> Result<Superblock, OpenError> {
    let geometry =
        Geometry::compute(engine.size(), chunk_size).map_err(|source| OpenError::Layout {
            path: path.to_string(),
            source,
        })?;
    let sb = Superblock {
        sled,
        device: Uuid128::random(),
        geometry,
        created_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    // Tables first, superblock last: a crash mid-format leaves no superblock, and what it
    // leaves is recognised by `looks_empty`, so the device is formatted again.
    for (base, region) in empty_tables(&geometry) {
        write_sync(engine, base, region).map_err(io_err(path, "writing empty tables"))?;
    }
    let sbb = sb.encode();
    let mut two = AlignedBuf::zeroed(2 * PAGE as usize);
    two[..PAGE as usize].copy_from_slice(&sbb);
    two[PAGE as usize..].copy_from_slice(&sbb);
    write_sync(engine, 0, two).map_err(io_err(path, "writing the superblock"))?;
    run_sync(engine, OpKind::Fsync).map_err(io_err(path, "syncing the format"))?;
    Ok(sb)
}

/// Reads the superblock without loading anything else.
pub fn read_superblock(engine: &mut dyn IoEngine, path: &str) -> Result<Superblock, OpenError> {
    let layout = |source| OpenError::Layout {
        path: path.to_string(),
        source,
    };
    if engine.size() < 2 * PAGE {
        return Err(layout(LayoutError::NotFormatted));
    }
    let b =
        read_sync(engine, 0, 2 * PAGE as usize).map_err(io_err(path, "reading the superblock"))?;
    let sb = Superblock::decode(&b[..PAGE as usize], &b[PAGE as usize..]).map_err(layout)?;
    if engine.size() < sb.geometry.device_size {
        return Err(layout(LayoutError::Truncated {
            expected: sb.geometry.device_size,
            actual: engine.size(),
        }));
    }
    Ok(sb)
}

fn load_table(
    engine: &mut dyn IoEngine,
    path: &str,
    table: Table,
    base: u64,
    pages: u64,
) -> Result<Vec<(PageState, Vec<u8>, bool)>, OpenError> {
    let mut out = Vec::with_capacity(pages as usize);
    // Read in slices of up to 4 MiB (256 page pairs).
    let per_read = 256u64;
    let mut p = 0;
    while p < pages {
        let n = per_read.min(pages - p);
        let buf = read_sync(engine, base + p * 2 * PAGE, (n * 2 * PAGE) as usize)
            .map_err(io_err(path, "reading a table"))?;
        for i in 0..n {
            let at = (i * 2 * PAGE) as usize;
            let a = &buf[at..at + PAGE as usize];
            let b = &buf[at + PAGE as usize..at + 2 * PAGE as usize];
            let (copy, seq, body) =
                pick_page(table, p + i, a, b).map_err(|source| OpenError::Layout {
                    path: path.to_string(),
                    source,
                })?;
            let other = if copy == 0 { b } else { a };
            // A copy never written yet (all zeros: format writes copy A only) is not damaged.
            let damaged =
                decode_page(table, p + i, other).is_none() && other.iter().any(|&x| x != 0);
            out.push((PageState { copy, seq }, body.to_vec(), damaged));
        }
        p += n;
    }
    Ok(out)
}

/// Opens a formatted device: superblock, tables, and checksum recovery of dirty regions.
pub(crate) fn open(
    engine: &mut dyn IoEngine,
    path: &str,
    expect_sled: Option<SledId>,
) -> Result<Opened, OpenError> {
    let sb = read_superblock(engine, path)?;
    if let Some(expected) = expect_sled
        && expected != sb.sled
    {
        return Err(OpenError::WrongSled {
            path: path.to_string(),
            found: sb.sled,
            expected,
        });
    }
    let repaired_superblock = repair_superblock(engine, path, &sb)?;
    let g = sb.geometry;
    let mut tables = Tables::empty(&g);
    // Pages with one copy damaged (a torn write of a newer version, or a bad sector): rewritten
    // below, so that every page again has a valid older copy to fall back on.
    let mut damaged = Vec::new();
    for (p, (st, body, bad)) in load_table(engine, path, Table::Chunks, g.ct_offset, g.ct_pages)?
        .into_iter()
        .enumerate()
    {
        if bad {
            damaged.push((Table::Chunks, p as u64));
        }
        tables.ct_pages[p] = st;
        for i in 0..CT_PER_PAGE as usize {
            let slot = p * CT_PER_PAGE as usize + i;
            if slot < tables.chunks.len() {
                tables.chunks[slot] = ChunkEntry::decode(&body[i * CT_ENTRY..(i + 1) * CT_ENTRY]);
            }
        }
    }
    for (p, (st, body, bad)) in load_table(engine, path, Table::Fences, g.ft_offset, g.ft_pages)?
        .into_iter()
        .enumerate()
    {
        if bad {
            damaged.push((Table::Fences, p as u64));
        }
        tables.ft_pages[p] = st;
        for i in 0..FT_PER_PAGE as usize {
            let slot = p * FT_PER_PAGE as usize + i;
            if slot < tables.fences.len() {
                tables.fences[slot] = FenceEntry::decode(&body[i * FT_ENTRY..(i + 1) * FT_ENTRY]);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    for e in tables.chunks.iter().filter(|e| e.allocated) {
        if !seen.insert((e.volume, e.chunk)) {
            return Err(OpenError::DuplicateChunk {
                path: path.to_string(),
                volume: e.volume.to_string(),
                chunk: e.chunk.0,
            });
        }
    }
    for &(table, page) in &damaged {
        // The next version goes to the other copy (the damaged one), with the same contents.
        let w = tables.next_version(&g, table, page);
        write_sync(engine, w.pos, w.bytes)
            .map_err(io_err(path, "rewriting a damaged table page copy"))?;
        *tables.page_state(table, page) = PageState {
            copy: w.copy,
            seq: w.seq,
        };
    }
    if !damaged.is_empty() {
        run_sync(engine, OpKind::Fsync).map_err(io_err(path, "syncing table page repairs"))?;
    }
    let repaired_pages = damaged.len() as u64;
    let recovered_regions = recover(engine, path, &g, &mut tables)?;
    Ok(Opened {
        sb,
        tables,
        recovered_regions,
        repaired_superblock,
        repaired_pages,
    })
}

/// Rewrites a damaged superblock copy from the valid one (the one `sb` was read from), so the
/// device again survives the loss of either copy instead of running on one until that one goes
/// too. The valid copy is never written. Returns the copies rewritten (0 = A, 1 = B).
fn repair_superblock(
    engine: &mut dyn IoEngine,
    path: &str,
    sb: &Superblock,
) -> Result<Vec<u8>, OpenError> {
    let pages =
        read_sync(engine, 0, 2 * PAGE as usize).map_err(io_err(path, "reading the superblock"))?;
    let page = PAGE as usize;
    let damaged: Vec<u8> = (0..2u8)
        .filter(|&c| Superblock::copy_damaged(&pages[c as usize * page..(c as usize + 1) * page]))
        .collect();
    if damaged.is_empty() {
        return Ok(damaged);
    }
    for &c in &damaged {
        let mut good = AlignedBuf::zeroed(page);
        good.copy_from_slice(&sb.encode());
        write_sync(engine, u64::from(c) * PAGE, good)
            .map_err(io_err(path, "rewriting a damaged superblock copy"))?;
    }
    run_sync(engine, OpKind::Fsync).map_err(io_err(path, "syncing the superblock repair"))?;
    Ok(damaged)
}

/// The checksum page of a region, from each block's entry.
fn region_checksums(mut entry: impl FnMut(usize) -> CrcEntry) -> AlignedBuf {
    let mut page = AlignedBuf::zeroed(PAGE as usize);
    for b in 0..REGION_BLOCKS as usize {
        entry(b).encode(&mut page[b * CRC_ENTRY as usize..(b + 1) * CRC_ENTRY as usize]);
    }
    page
}

/// Recomputes the checksum entries of every dirty region from its data, writes them, then clears
/// the dirty bits (each step durable before the next).
fn recover(
    engine: &mut dyn IoEngine,
    path: &str,
    g: &Geometry,
    tables: &mut Tables,
) -> Result<u64, OpenError> {
    let mut recovered = 0;
    let mut touched_pages = std::collections::BTreeSet::new();
    for slot in 0..tables.chunks.len() {
        let entry = tables.chunks[slot];
        if !entry.allocated && entry.dirty.iter().all(|&b| b == 0) {
            continue;
        }
        for r in 0..g.regions_per_chunk() {
            if !entry.is_dirty(r) {
                continue;
            }
            if entry.allocated {
                let pos = g.data_pos(slot as u64, r * REGION_BYTES);
                let page = match read_sync(engine, pos, REGION_BYTES as usize) {
                    Ok(data) => region_checksums(|b| {
                        CrcEntry::of(&data[b * BLOCK as usize..(b + 1) * BLOCK as usize])
                    }),
                    // A bad sector must not keep the whole device from opening (it is most
                    // likely why the region was left dirty): block by block, and a block that
                    // cannot be read is marked as holding nothing known.
                    Err(e) => {
                        tracing::warn!(device = path, slot, region = r, error = %e,
                            "a dirty region could not be read; recovering it block by block");
                        region_checksums(|b| {
                            let at = pos + (b as u64) * BLOCK;
                            match read_sync(engine, at, BLOCK as usize) {
                                Ok(block) => CrcEntry::of(&block),
                                Err(e) => {
                                    tracing::error!(device = path, slot, offset = at,
                                        error = %e, "unreadable block: its reads will fail \
                                        their checksum until it is written again");
                                    CrcEntry::UNKNOWN
                                }
                            }
                        })
                    }
                };
                write_sync(engine, g.crc_page_pos(slot as u64, r), page)
                    .map_err(io_err(path, "writing recovered checksums"))?;
                recovered += 1;
            }
            tables.chunks[slot].set_dirty(r, false);
            touched_pages.insert(slot as u64 / CT_PER_PAGE);
        }
    }
    for page in touched_pages {
        let w = tables.next_version(g, Table::Chunks, page);
        write_sync(engine, w.pos, w.bytes).map_err(io_err(path, "clearing dirty bits"))?;
        *tables.page_state(Table::Chunks, page) = PageState {
            copy: w.copy,
            seq: w.seq,
        };
    }
    Ok(recovered)
}
