//! The device's tables in memory and the lane that makes their changes durable.
//!
//! Changes mark a page dirty; the lane writes every dirty page as one batch (the other copy of
//! each page pair, next sequence number, `RWF_DSYNC`) and, when the whole batch has completed,
//! wakes everything that waited for it. Only one batch is in flight at a time, so two writes of
//! the same page are never in flight together and page versions land in order.

use crate::layout::{
    CT_ENTRY, CT_PER_PAGE, ChunkEntry, FT_ENTRY, FT_PER_PAGE, FenceEntry, Geometry, PAGE_HEADER,
    Table, encode_page,
};
use common::AlignedBuf;
use std::collections::BTreeSet;

/// Which copy of a page pair holds the current version.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PageState {
    pub copy: u8,
    pub seq: u64,
}

/// The chunk and fence tables.
#[derive(Debug)]
pub(crate) struct Tables {
    pub chunks: Vec<ChunkEntry>,
    pub ct_pages: Vec<PageState>,
    pub fences: Vec<Option<FenceEntry>>,
    pub ft_pages: Vec<PageState>,
}

impl Tables {
    /// Empty tables for a fresh format.
    pub fn empty(g: &Geometry) -> Self {
        Self {
            chunks: vec![ChunkEntry::default(); g.chunk_count as usize],
            ct_pages: vec![PageState::default(); g.ct_pages as usize],
            fences: vec![None; g.ft_capacity() as usize],
            ft_pages: vec![PageState::default(); g.ft_pages as usize],
        }
    }

    /// The body of a page as it stands in memory.
    pub fn body(&self, table: Table, page: u64) -> Vec<u8> {
        let mut body = vec![0u8; 4096 - PAGE_HEADER];
        match table {
            Table::Chunks => {
                let first = (page * CT_PER_PAGE) as usize;
                let last = (first + CT_PER_PAGE as usize).min(self.chunks.len());
                for (i, e) in self.chunks[first..last].iter().enumerate() {
                    e.encode(&mut body[i * CT_ENTRY..(i + 1) * CT_ENTRY]);
                }
            }
            Table::Fences => {
                let first = (page * FT_PER_PAGE) as usize;
                let last = (first + FT_PER_PAGE as usize).min(self.fences.len());
                for (i, e) in self.fences[first..last].iter().enumerate() {
                    if let Some(e) = e {
                        e.encode(&mut body[i * FT_ENTRY..(i + 1) * FT_ENTRY]);
                    }
                }
            }
        }
        body
    }

    /// Page state of a table page.
    pub fn page_state(&mut self, table: Table, page: u64) -> &mut PageState {
        match table {
            Table::Chunks => &mut self.ct_pages[page as usize],
            Table::Fences => &mut self.ft_pages[page as usize],
        }
    }

    /// The next version of a page: where to write it, its sequence number and bytes.
    pub fn next_version(&mut self, g: &Geometry, table: Table, page: u64) -> PageWrite {
        let body = self.body(table, page);
        let st = *self.page_state(table, page);
        let copy = 1 - st.copy;
        let seq = st.seq + 1;
        let pos = match table {
            Table::Chunks => g.ct_page_pos(page, copy),
            Table::Fences => g.ft_page_pos(page, copy),
        };
        let snapshot = match table {
            Table::Chunks => {
                let first = (page * CT_PER_PAGE) as usize;
                let last = (first + CT_PER_PAGE as usize).min(self.chunks.len());
                (first..last).map(|s| (s as u64, self.chunks[s])).collect()
            }
            Table::Fences => Vec::new(),
        };
        let fence_snapshot = match table {
            Table::Fences => {
                let first = (page * FT_PER_PAGE) as usize;
                let last = (first + FT_PER_PAGE as usize).min(self.fences.len());
                self.fences[first..last].iter().flatten().copied().collect()
            }
            Table::Chunks => Vec::new(),
        };
        PageWrite {
            table,
            page,
            copy,
            seq,
            pos,
            bytes: AlignedBuf::from_slice(&encode_page(table, page, seq, &body)),
            chunk_snapshot: snapshot,
            fence_snapshot,
        }
    }
}

/// One page write of a batch.
#[derive(Debug)]
pub(crate) struct PageWrite {
    pub table: Table,
    pub page: u64,
    pub copy: u8,
    pub seq: u64,
    pub pos: u64,
    pub bytes: AlignedBuf,
    /// For chunk pages: the entries as written (their dirty bits become durable at commit).
    pub chunk_snapshot: Vec<(u64, ChunkEntry)>,
    /// For fence pages: the records as written.
    pub fence_snapshot: Vec<FenceEntry>,
}

/// Something waiting for a batch to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Waiter {
    /// A job to step again.
    Job(u64),
}

/// A batch in flight.
#[derive(Debug)]
pub(crate) struct Batch {
    pub remaining: usize,
    pub waiters: Vec<Waiter>,
    pub failed: Option<String>,
    pub pages: Vec<(Table, u64, u8, u64)>,
    pub chunk_snapshots: Vec<(u64, ChunkEntry)>,
    pub fence_snapshots: Vec<FenceEntry>,
}

/// The metadata lane.
#[derive(Debug, Default)]
pub(crate) struct MetaLane {
    pub dirty: BTreeSet<(TableKey, u64)>,
    pub next_waiters: Vec<Waiter>,
    pub inflight: Option<Batch>,
    pub commits: u64,
}

/// An orderable table key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum TableKey {
    Chunks,
    Fences,
}

impl TableKey {
    pub fn table(self) -> Table {
        match self {
            TableKey::Chunks => Table::Chunks,
            TableKey::Fences => Table::Fences,
        }
    }
}

impl MetaLane {
    /// Marks the chunk-table page of `slot` dirty.
    pub fn touch_chunk(&mut self, slot: u64) {
        self.dirty.insert((TableKey::Chunks, slot / CT_PER_PAGE));
    }

    /// Marks the fence-table page of fence slot `slot` dirty.
    pub fn touch_fence(&mut self, slot: u64) {
        self.dirty.insert((TableKey::Fences, slot / FT_PER_PAGE));
    }

    /// Waits for the next commit that includes every change made so far.
    pub fn wait(&mut self, w: Waiter) {
        self.next_waiters.push(w);
    }

    /// True when there is nothing to write and nobody waiting.
    pub fn idle(&self) -> bool {
        self.dirty.is_empty() && self.next_waiters.is_empty() && self.inflight.is_none()
    }
}
