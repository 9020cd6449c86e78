//! Committed writes not yet on the sleds, indexed by byte range.
//!
//! Every node applies committed data entries into its overlay; the leader serves reads from it
//! (falling through to the sleds where it holds nothing) and flushes it to the sleds; every node
//! drops entries once a `FlushedUpTo` entry says they are on the sleds. The range map keeps, for
//! each byte, only the newest entry that covers it.

use super::entry::EntryHeader;
use bytes::Bytes;
use std::collections::BTreeMap;

/// A committed data entry.
#[derive(Debug, Clone)]
pub struct OverlayEntry {
    /// Its header (`Write` or `Zero`).
    pub header: EntryHeader,
    /// Its data (empty for `Zero`).
    pub data: Bytes,
}

impl OverlayEntry {
    /// The byte range the entry covers.
    pub fn range(&self) -> (u64, u64) {
        match &self.header {
            EntryHeader::Write { offset, len } => (*offset, *offset + u64::from(*len)),
            EntryHeader::Zero { offset, len, .. } => (*offset, *offset + *len),
            _ => (0, 0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Interval {
    end: u64,
    index: u64,
}

/// Where the bytes of a piece of a read come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// From a committed, unflushed write.
    Data(Bytes),
    /// Zeros (a committed, unflushed write-zeroes or trim); `provisioned` when it keeps the
    /// space (a write-zeroes with NBD_CMD_FLAG_NO_HOLE, whose chunks were allocated before it
    /// was proposed).
    Zero {
        /// The space stays allocated.
        provisioned: bool,
    },
    /// From the sleds.
    Sled,
}

/// What an entry counts against the unflushed bound at least: its data, or for an entry with
/// little or none (a trim, a write-zeroes) this much, for its bookkeeping here and in the log —
/// else a workload of trims alone while write-back is stalled would grow memory without bound.
pub const MIN_ENTRY_CHARGE: u64 = 4096;

/// What an entry carrying `data_len` bytes counts against the unflushed bound.
pub const fn charge(data_len: u64) -> u64 {
    if data_len > MIN_ENTRY_CHARGE {
        data_len
    } else {
        MIN_ENTRY_CHARGE
    }
}

/// The overlay.
#[derive(Debug, Default)]
pub struct Overlay {
    entries: BTreeMap<u64, OverlayEntry>,
    map: BTreeMap<u64, Interval>,
    bytes: u64,
}

impl Overlay {
    /// An empty overlay.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes charged for what is held ([`charge`] of each entry).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a committed data entry at `index` (indexes increase). Other headers are ignored.
    pub fn insert(&mut self, index: u64, header: EntryHeader, data: Bytes) {
        if !matches!(header, EntryHeader::Write { .. } | EntryHeader::Zero { .. }) {
            return;
        }
        let e = OverlayEntry { header, data };
        let (s, end) = e.range();
        if s >= end {
            return;
        }
        self.bytes += charge(e.data.len() as u64);
        if let Some(old) = self.entries.insert(index, e) {
            self.bytes -= charge(old.data.len() as u64);
        }
        // Cut every interval that overlaps [s, end), keeping the parts outside it.
        let first = self
            .map
            .range(..=s)
            .next_back()
            .filter(|(_, iv)| iv.end > s)
            .map(|(k, _)| *k)
            .unwrap_or(s);
        let overlapping: Vec<(u64, Interval)> =
            self.map.range(first..end).map(|(k, v)| (*k, *v)).collect();
        for (start, iv) in overlapping {
            self.map.remove(&start);
            if start < s {
                self.map.insert(
                    start,
                    Interval {
                        end: s,
                        index: iv.index,
                    },
                );
            }
            if iv.end > end {
                self.map.insert(
                    end,
                    Interval {
                        end: iv.end,
                        index: iv.index,
                    },
                );
            }
        }
        self.map.insert(s, Interval { end, index });
    }

    /// What `[offset, offset+len)` reads as: consecutive pieces with their lengths.
    pub fn lookup(&self, offset: u64, len: u64) -> Vec<(u64, Piece)> {
        let end = offset + len;
        let mut out: Vec<(u64, Piece)> = Vec::new();
        let mut push = |l: u64, p: Piece| {
            if l == 0 {
                return;
            }
            match (out.last_mut(), &p) {
                (Some((ll, Piece::Sled)), Piece::Sled) => *ll += l,
                (Some((ll, Piece::Zero { provisioned: a })), Piece::Zero { provisioned: b })
                    if *a == *b =>
                {
                    *ll += l
                }
                _ => out.push((l, p)),
            }
        };
        let first = self
            .map
            .range(..=offset)
            .next_back()
            .filter(|(_, iv)| iv.end > offset)
            .map(|(k, _)| *k)
            .unwrap_or(offset);
        let mut pos = offset;
        for (&start, iv) in self.map.range(first..end) {
            let s = start.max(offset);
            let e = iv.end.min(end);
            if s > pos {
                push(s - pos, Piece::Sled);
            }
            let entry = &self.entries[&iv.index];
            match &entry.header {
                EntryHeader::Write { offset: eo, .. } => {
                    let at = (s - eo) as usize;
                    push(
                        e - s,
                        Piece::Data(entry.data.slice(at..at + (e - s) as usize)),
                    );
                }
                EntryHeader::Zero { free, .. } => push(e - s, Piece::Zero { provisioned: !free }),
                _ => push(e - s, Piece::Zero { provisioned: false }),
            }
            pos = e;
        }
        if pos < end {
            push(end - pos, Piece::Sled);
        }
        out
    }

    /// Entries above `index`, in order (the flusher's work).
    pub fn entries_after(&self, index: u64) -> impl Iterator<Item = (u64, &OverlayEntry)> {
        self.entries
            .range(index.saturating_add(1)..)
            .map(|(i, e)| (*i, e))
    }

    /// Drops every entry at or below `index` (they are on the sleds).
    pub fn remove_upto(&mut self, index: u64) {
        if self
            .entries
            .first_key_value()
            .is_none_or(|(k, _)| *k > index)
        {
            return;
        }
        let keep = self.entries.split_off(&(index + 1));
        for e in self.entries.values() {
            self.bytes -= charge(e.data.len() as u64);
        }
        self.entries = keep;
        self.map.retain(|_, iv| iv.index > index);
    }

    /// Drops everything (a snapshot replaced the state).
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(offset: u64, len: u32, byte: u8) -> (EntryHeader, Bytes) {
        (
            EntryHeader::Write { offset, len },
            Bytes::from(vec![byte; len as usize]),
        )
    }

    /// Reads through the overlay over a "sled" of `sled_byte`.
    fn read(o: &Overlay, offset: u64, len: u64, sled_byte: u8) -> Vec<u8> {
        let mut out = Vec::new();
        for (l, p) in o.lookup(offset, len) {
            match p {
                Piece::Data(b) => {
                    assert_eq!(b.len() as u64, l);
                    out.extend_from_slice(&b);
                }
                Piece::Zero { .. } => out.extend(std::iter::repeat_n(0, l as usize)),
                Piece::Sled => out.extend(std::iter::repeat_n(sled_byte, l as usize)),
            }
        }
        assert_eq!(out.len() as u64, len);
        out
    }

    #[test]
    fn newest_entry_wins_and_flushed_entries_go() {
        let mut o = Overlay::new();
        let (h, d) = w(0, 8192, 1);
        o.insert(1, h, d);
        let (h, d) = w(4096, 8192, 2);
        o.insert(2, h, d);
        o.insert(
            3,
            EntryHeader::Zero {
                offset: 2048,
                len: 1024,
                free: false,
            },
            Bytes::new(),
        );
        let r = read(&o, 0, 16384, 9);
        assert!(r[..2048].iter().all(|&b| b == 1));
        assert!(r[2048..3072].iter().all(|&b| b == 0));
        assert!(r[3072..4096].iter().all(|&b| b == 1));
        assert!(r[4096..12288].iter().all(|&b| b == 2));
        assert!(r[12288..].iter().all(|&b| b == 9));
        // Two 8 KiB writes, and the write-zeroes at its minimum charge.
        assert_eq!(o.bytes(), 8192 + 8192 + MIN_ENTRY_CHARGE);
        o.remove_upto(1);
        let r = read(&o, 0, 16384, 9);
        assert!(
            r[..2048].iter().all(|&b| b == 9),
            "entry 1 is on the sleds now"
        );
        assert_eq!(o.bytes(), 8192 + MIN_ENTRY_CHARGE);
        assert_eq!(
            o.entries_after(0).map(|(i, _)| i).collect::<Vec<_>>(),
            vec![2, 3]
        );
        o.remove_upto(3);
        assert!(o.is_empty());
        assert_eq!(o.lookup(0, 100), vec![(100, Piece::Sled)]);
    }

    proptest! {
        /// Against a byte model: every read equals the newest write of each byte not yet
        /// removed, else the sled.
        #[test]
        fn matches_a_byte_model(ops in proptest::collection::vec((0u8..4, 0u64..64, 1u64..24, any::<u8>()), 1..60)) {
            let mut o = Overlay::new();
            let mut model: Vec<Option<(u64, u8)>> = vec![None; 96];
            let mut index = 0u64;
            for (kind, start, len, byte) in ops {
                let byte = byte | 1;
                match kind {
                    0 | 1 => {
                        index += 1;
                        let (h, d) = w(start, len as u32, byte);
                        o.insert(index, h, d);
                        for b in start..start + len { model[b as usize] = Some((index, byte)); }
                    }
                    2 => {
                        index += 1;
                        o.insert(index, EntryHeader::Zero { offset: start, len, free: true }, Bytes::new());
                        for b in start..start + len { model[b as usize] = Some((index, 0)); }
                    }
                    _ => {
                        let upto = index.saturating_sub(len);
                        o.remove_upto(upto);
                        for m in model.iter_mut() {
                            if m.is_some_and(|(i, _)| i <= upto) { *m = None; }
                        }
                    }
                }
                let got = read(&o, 0, 96, 0xee);
                let want: Vec<u8> = model.iter().map(|m| m.map_or(0xee, |(_, b)| b)).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
