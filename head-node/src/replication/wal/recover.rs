//! Opening the log: reading every segment in order, cutting a torn tail off the last one, and
//! rebuilding each group's log and the writer's bookkeeping.

use super::format::{
    ENTRY_OVERHEAD, HeaderError, RECORD_HEADER_LEN, RECORD_MAGIC, Record, RecordHeader,
    SEGMENT_HEADER_LEN, SegmentHeader, decode_body, le_u32, le_u64, parse_record,
};
use super::track::{GroupTrack, Item, Loc, Run, SegInfo, Segments};
use super::{Corruption, Inconsistency, TornTail, WalError, sync_dir};
use crate::replication::GroupId;
use crate::replication::log::GroupLog;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The file name of segment `seq`.
pub(crate) fn segment_name(seq: u64) -> String {
    format!("{seq:020}.wal")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".wal")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segment files of `dir`, by sequence number, checked for holes.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let io = |source| WalError::Io {
        path: dir.to_path_buf(),
        what: "listing segments",
        source,
    };
    let mut out = Vec::new();
    for ent in fs::read_dir(dir).map_err(io)? {
        let ent = ent.map_err(io)?;
        let name = ent.file_name();
        let name = name.to_string_lossy();
        match parse_segment_name(&name) {
            Some(seq) => out.push((seq, ent.path())),
            None if name == super::LOCK_FILE || name.ends_with(super::spare::SPARE_SUFFIX) => {}
            None => {
                tracing::warn!(file = %ent.path().display(), "raft log: ignoring a file that is not a segment")
            }
        }
    }
    out.sort();
    for w in out.windows(2) {
        if w[1].0 != w[0].0 + 1 {
            return Err(WalError::MissingSegment {
                dir: dir.to_path_buf(),
                missing: w[0].0 + 1,
            });
        }
    }
    Ok(out)
}

/// The last segment, where writing continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LastSegment {
    pub seq: u64,
    pub size: u64,
    pub salt: u64,
}

/// Everything the log holds.
#[derive(Debug)]
pub(crate) struct Recovery {
    pub groups: BTreeMap<GroupId, (GroupLog, GroupTrack)>,
    pub segs: Segments,
    pub last: Option<LastSegment>,
    pub next_batch: u64,
    pub torn: Option<TornTail>,
}

/// A segment's valid records, and where its torn tail starts (last segment only).
#[derive(Debug)]
struct Scanned {
    records: Vec<(usize, RecordHeader, Range<usize>)>,
    cut: Option<usize>,
    /// Where its records end (before a torn tail or the zeros of a zero-filled segment).
    end: usize,
    next_batch: u64,
}

/// Reads the records of a segment. Records come in batches (`batch`, `index` of `count`) that
/// were each written with one `write` and made durable with one `fdatasync` before the next
/// began. So damage can only be a torn write in the last batch of the last segment: a bad
/// record there is cut, with the rest of its batch, unless a valid record of a *later* position
/// follows it (then the bad record had been durable: corruption). Anything wrong elsewhere is
/// corruption. Zeros from a batch boundary to the end of the file are the unused part of a
/// zero-filled segment: a clean end, in any segment (a sealed segment that lost batches is
/// still caught, by the next segment's first batch number).
fn scan(
    file: &Path,
    buf: &[u8],
    salt: u64,
    first_batch: u64,
    is_last: bool,
) -> Result<Scanned, WalError> {
    let corrupt = |offset: usize, reason| WalError::Corrupt {
        file: file.to_path_buf(),
        offset: offset as u64,
        reason,
    };
    let mut off = SEGMENT_HEADER_LEN;
    // The position the next record must have.
    let (mut batch, mut index, mut count) = (first_batch, 0u32, 0u32);
    let mut batch_start = off;
    let mut records = Vec::new();
    while off < buf.len() {
        match parse_record(&buf[off..], salt) {
            Ok((h, _, len)) => {
                // (A batch numbered u64::MAX cannot be completed: there is no next number.)
                let in_order = h.batch == batch
                    && h.index == index
                    && h.index < h.count
                    && (index == 0 || h.count == count)
                    && (h.index + 1 < h.count || batch < u64::MAX);
                if !in_order {
                    return Err(corrupt(
                        off,
                        Corruption::OutOfSequence {
                            expected_batch: batch,
                            expected_index: index,
                            batch: h.batch,
                            index: h.index,
                        },
                    ));
                }
                if index == 0 {
                    batch_start = off;
                    count = h.count;
                }
                records.push((off, h, off + RECORD_HEADER_LEN..off + len));
                off += len;
                index += 1;
                if index == count {
                    batch += 1;
                    index = 0;
                }
            }
            Err(_) if index == 0 && buf[off..].iter().all(|&b| b == 0) => {
                return Ok(Scanned {
                    records,
                    cut: None,
                    end: off,
                    next_batch: batch,
                });
            }
            Err(bad) => {
                if !is_last {
                    return Err(corrupt(off, Corruption::Record(bad)));
                }
                // Only a header that could belong to this batch or a later one of this
                // segment is checksummed (batches only grow within a segment): the bytes after
                // a torn record are a client's payload, which may hold any number of
                // record-shaped headers with huge lengths, and checksumming each of them
                // would make a restart effectively hang. The work is capped besides.
                let mut budget = (buf.len() - off).saturating_mul(4);
                let mut o = off + 1;
                while o + RECORD_HEADER_LEN <= buf.len() {
                    let plausible = buf[o..o + 4] == RECORD_MAGIC && {
                        let hb = le_u64(&buf[o + 8..o + 16]);
                        let (hi, hc) = (le_u32(&buf[o + 16..o + 20]), le_u32(&buf[o + 20..o + 24]));
                        let body = le_u32(&buf[o + 4..o + 8]) as usize;
                        hb >= batch && hi < hc && body <= budget
                    };
                    if plausible {
                        // Charged what checking it costs: a body running past the end of the
                        // file fails without being hashed, so a header claiming a huge one
                        // must not use up the search for the real records after it.
                        let body = le_u32(&buf[o + 4..o + 8]) as usize;
                        let end = o.saturating_add(RECORD_HEADER_LEN).saturating_add(body);
                        if end <= buf.len() {
                            budget -= body;
                        }
                    }
                    if plausible && let Ok((h, _, len)) = parse_record(&buf[o..], salt) {
                        if h.batch != batch || h.index <= index {
                            return Err(corrupt(
                                off,
                                Corruption::DamageBeforeValidRecord {
                                    bad,
                                    valid_at: o as u64,
                                },
                            ));
                        }
                        o += len;
                        continue;
                    }
                    o += 1;
                }
                let cut = if index > 0 { batch_start } else { off };
                records.retain(|r| r.0 < cut);
                return Ok(Scanned {
                    records,
                    cut: Some(cut),
                    end: cut,
                    next_batch: batch,
                });
            }
        }
    }
    if index > 0 {
        if !is_last {
            return Err(corrupt(
                batch_start,
                Corruption::IncompleteBatch {
                    batch,
                    records: index,
                    count,
                },
            ));
        }
        records.retain(|r| r.0 < batch_start);
        return Ok(Scanned {
            records,
            cut: Some(batch_start),
            end: batch_start,
            next_batch: batch,
        });
    }
    Ok(Scanned {
        records,
        cut: None,
        end: buf.len(),
        next_batch: batch,
    })
}

/// A group as records rebuild it. Entries are kept sparse while reading (the first segments
/// left may hold entries that later records compact or replace); the result is checked for
/// holes at the end.
#[derive(Debug, Default)]
struct ReplayGroup {
    hs: Option<(HardState, Item)>,
    cs: Option<(ConfState, Item)>,
    snap: Option<(Snapshot, Item)>,
    trunc: Option<((u64, u64), Item)>,
    /// Entry, the record it came from, its bytes in that record.
    entries: BTreeMap<u64, (Entry, Loc, u32)>,
}

impl ReplayGroup {
    fn put(&mut self, ents: Vec<Entry>, loc: Loc) {
        for e in ents {
            let size = e.compute_size() + ENTRY_OVERHEAD;
            self.entries.insert(e.index, (e, loc, size));
        }
    }

    fn apply(&mut self, rec: Record, loc: Loc) {
        let len = u64::from(loc.len);
        let item = |bytes| Item { loc, bytes };
        match rec {
            Record::Entries(ents) => {
                if let Some(first) = ents.first().map(|e| e.index) {
                    self.entries.split_off(&first);
                }
                self.put(ents, loc);
            }
            Record::PutEntries(ents) => self.put(ents, loc),
            Record::HardState(hs) => self.hs = Some((hs, item(len))),
            Record::ConfState(cs) => self.cs = Some((cs, item(len))),
            Record::ApplySnapshot { hs, snapshot } => {
                let m = snapshot.get_metadata();
                self.hs = Some((hs, item(0)));
                self.cs = Some((m.get_conf_state().clone(), item(0)));
                self.trunc = Some(((m.index, m.term), item(0)));
                self.entries.clear();
                self.snap = Some((snapshot, item(len)));
            }
            Record::SetSnapshot(s) => self.snap = Some((s, item(len))),
            Record::Compact { index, term } => {
                self.entries = self.entries.split_off(&index);
                self.trunc = Some(((index - 1, term), item(len)));
            }
            // Handled by the caller.
            Record::RemoveGroup => {}
        }
    }

    /// The group's log and its bookkeeping; the entries must be consecutive from the
    /// compaction point with terms that do not go down.
    fn finish(self, segs: &mut Segments) -> Result<(GroupLog, GroupTrack), Inconsistency> {
        let truncated = self.trunc.as_ref().map_or((0, 0), |t| t.0);
        let mut entries = VecDeque::with_capacity(self.entries.len());
        let mut runs: VecDeque<Run> = VecDeque::new();
        let (mut next, mut prev_term) = (truncated.0 + 1, truncated.1);
        for (index, (e, loc, size)) in self.entries {
            if index != next {
                return Err(Inconsistency::MissingEntries {
                    expected: next,
                    found: index,
                });
            }
            if e.term < prev_term {
                return Err(Inconsistency::TermRegression {
                    index,
                    term: e.term,
                    previous_term: prev_term,
                });
            }
            match runs.back_mut() {
                Some(r) if r.loc == loc => {
                    r.terms.push_back(e.term);
                    r.sizes.push_back(size);
                    r.bytes += u64::from(size);
                }
                _ => runs.push_back(Run::new(loc, index, &[e.term], &[size])),
            }
            prev_term = e.term;
            next += 1;
            entries.push_back(e);
        }
        let (hs, hs_item) = self
            .hs
            .map_or((HardState::default(), None), |(v, i)| (v, Some(i)));
        let (cs, cs_item) = self
            .cs
            .map_or((ConfState::default(), None), |(v, i)| (v, Some(i)));
        let (snap, snap_item) = self
            .snap
            .map_or((Snapshot::default(), None), |(v, i)| (v, Some(i)));
        let track = GroupTrack {
            hs_value: hs.clone(),
            hs: hs_item,
            cs: cs_item,
            snap_index: snap.get_metadata().index,
            snap: snap_item,
            trunc: self.trunc.map(|t| t.1),
            truncated,
            runs,
        };
        track.for_each_ref(|seg, bytes| segs.add(seg, bytes));
        Ok((
            GroupLog::from_parts(hs, cs, snap, truncated, entries),
            track,
        ))
    }
}

fn cut_file(path: &Path, len: usize) -> Result<(), WalError> {
    let io = |source| WalError::Io {
        path: path.to_path_buf(),
        what: "cutting a torn tail",
        source,
    };
    let f = fs::OpenOptions::new().write(true).open(path).map_err(io)?;
    f.set_len(len as u64).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Reads the log in `dir`.
pub(crate) fn recover(dir: &Path) -> Result<Recovery, WalError> {
    let files = list_segments(dir)?;
    let mut groups: BTreeMap<GroupId, ReplayGroup> = BTreeMap::new();
    let mut segs = Segments::default();
    let mut last = None;
    let mut next_batch: Option<u64> = None;
    let mut torn = None;
    let n = files.len();
    for (i, (seq, path)) in files.into_iter().enumerate() {
        let is_last = i + 1 == n;
        let buf = fs::read(&path).map_err(|source| WalError::Io {
            path: path.clone(),
            what: "reading a segment",
            source,
        })?;
        let header = match SegmentHeader::decode(&buf) {
            Ok(h) => h,
            Err(HeaderError::Version(found)) => {
                return Err(WalError::UnsupportedVersion {
                    file: path,
                    found,
                    supported: super::format::FORMAT_VERSION,
                });
            }
            // A segment is created with its header made durable before any record: a last
            // segment with a bad header and nothing after it was being created.
            Err(e) if is_last && buf.len() <= SEGMENT_HEADER_LEN => {
                tracing::warn!(file = %path.display(), error = %e, "raft log: removing a segment whose creation was interrupted");
                fs::remove_file(&path).map_err(|source| WalError::Io {
                    path: path.clone(),
                    what: "removing an incomplete segment",
                    source,
                })?;
                sync_dir(dir)?;
                torn = Some(TornTail {
                    file: path,
                    offset: 0,
                    dropped_bytes: buf.len() as u64,
                });
                break;
            }
            Err(e) => {
                return Err(WalError::Corrupt {
                    file: path,
                    offset: 0,
                    reason: Corruption::Header(e),
                });
            }
        };
        if header.seq != seq {
            return Err(WalError::Corrupt {
                file: path,
                offset: 0,
                reason: Corruption::SegmentNumber {
                    named: seq,
                    header: header.seq,
                },
            });
        }
        if let Some(expected) = next_batch
            && header.first_batch != expected
        {
            return Err(WalError::Corrupt {
                file: path,
                offset: 0,
                reason: Corruption::BatchSequence {
                    expected,
                    found: header.first_batch,
                },
            });
        }
        let scanned = scan(&path, &buf, header.salt, header.first_batch, is_last)?;
        let mut size = scanned.end;
        if let Some(cut) = scanned.cut {
            tracing::warn!(
                file = %path.display(),
                offset = cut,
                dropped_bytes = buf.len() - cut,
                "raft log: cutting a torn tail (a write that was never acknowledged)"
            );
            cut_file(&path, cut)?;
            torn = Some(TornTail {
                file: path.clone(),
                offset: cut as u64,
                dropped_bytes: (buf.len() - cut) as u64,
            });
            size = cut;
        }
        for (off, h, body) in scanned.records {
            let rec = decode_body(h.kind, h.flags, &buf[body]).map_err(|e| WalError::Corrupt {
                file: path.clone(),
                offset: off as u64,
                reason: Corruption::Body(e),
            })?;
            let loc = Loc {
                seg: seq,
                offset: off as u64,
                len: (RECORD_HEADER_LEN as u32).saturating_add(h.body_len),
            };
            if rec == Record::RemoveGroup {
                groups.remove(&h.group);
            } else {
                groups.entry(h.group).or_default().apply(rec, loc);
            }
        }
        segs.map.insert(
            seq,
            SegInfo {
                salt: header.salt,
                size: size as u64,
                refs: 0,
                live: 0,
            },
        );
        last = Some(LastSegment {
            seq,
            size: size as u64,
            salt: header.salt,
        });
        next_batch = Some(scanned.next_batch);
    }
    let mut out = BTreeMap::new();
    for (group, g) in groups {
        let built = g
            .finish(&mut segs)
            .map_err(|reason| WalError::Inconsistent {
                dir: dir.to_path_buf(),
                group,
                reason,
            })?;
        out.insert(group, built);
    }
    Ok(Recovery {
        groups: out,
        segs,
        last,
        next_batch: next_batch.unwrap_or(1),
        torn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names() {
        assert_eq!(segment_name(12), "00000000000000000012.wal");
        assert_eq!(parse_segment_name("00000000000000000012.wal"), Some(12));
        assert_eq!(parse_segment_name("0000000000000000012.wal"), None);
        assert_eq!(parse_segment_name("0000000000000000001x.wal"), None);
        assert_eq!(parse_segment_name("00000000000000000012.tmp"), None);
        assert_eq!(parse_segment_name("+0000000000000000012.wal"), None);
    }
}
