//! The writer thread: merges queued writes into batches (one `write` + one `fdatasync` each),
//! rotates segments, and deletes (after cleaning, if needed) segments nobody needs.

use super::format::{
    Body, Kind, RECORD_HEADER_LEN, Record, RecordHeader, SegmentHeader, decode_body,
    encode_apply_snapshot, encode_compact, encode_entries, encode_pb, parse_record,
};
use super::recover::segment_name;
use super::spare::Spare;
use super::track::{Applied, GroupTrack, Item, Loc, SegInfo, Segments};
use super::{Corruption, WalConfig, WalError, WalMetrics, sync_dir};
use crate::replication::GroupId;
use crate::replication::log::{LogError, LogOp, OpMeta, Step, append_meta, plan};
use raft::prelude::HardState;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// One op, encoded by the caller (off the writer thread).
#[derive(Debug)]
pub(crate) enum PreparedOp {
    Append {
        first: u64,
        terms: Vec<u64>,
        sizes: Vec<u32>,
        body: Body,
    },
    HardState {
        hs: HardState,
        body: Body,
    },
    ConfState {
        body: Body,
    },
    ApplySnapshot {
        index: u64,
        term: u64,
        /// The snapshot's protobuf bytes (the writer adds the hard state after it).
        snapshot: Vec<u8>,
    },
    SetSnapshot {
        index: u64,
        term: u64,
        body: Body,
    },
    Compact {
        index: u64,
    },
    Remove,
}

/// Largest record body (the header's length field is 32 bits).
const MAX_BODY: usize = u32::MAX as usize - RECORD_HEADER_LEN;

impl PreparedOp {
    pub(crate) fn prepare(group: GroupId, op: &LogOp) -> Result<Self, WalError> {
        let encode = |source| WalError::Encode { group, source };
        let body = |bytes: Vec<u8>| {
            if bytes.len() > MAX_BODY {
                return Err(WalError::TooLarge {
                    group,
                    bytes: bytes.len() as u64,
                });
            }
            Ok(Body::new(bytes))
        };
        Ok(match op {
            LogOp::Append(entries) => {
                let (first, terms) =
                    append_meta(entries).map_err(|source| WalError::Rejected { group, source })?;
                let (bytes, sizes) = encode_entries(entries).map_err(encode)?;
                PreparedOp::Append {
                    first,
                    terms,
                    sizes,
                    body: body(bytes)?,
                }
            }
            LogOp::HardState(hs) => PreparedOp::HardState {
                hs: hs.clone(),
                body: body(encode_pb(hs).map_err(encode)?)?,
            },
            LogOp::ConfState(cs) => PreparedOp::ConfState {
                body: body(encode_pb(cs).map_err(encode)?)?,
            },
            LogOp::ApplySnapshot(s) => {
                let snapshot = encode_pb(s).map_err(encode)?;
                if snapshot.len() > MAX_BODY / 2 {
                    return Err(WalError::TooLarge {
                        group,
                        bytes: snapshot.len() as u64,
                    });
                }
                PreparedOp::ApplySnapshot {
                    index: s.get_metadata().index,
                    term: s.get_metadata().term,
                    snapshot,
                }
            }
            LogOp::SetSnapshot(s) => PreparedOp::SetSnapshot {
                index: s.get_metadata().index,
                term: s.get_metadata().term,
                body: body(encode_pb(s).map_err(encode)?)?,
            },
            LogOp::Compact(index) => PreparedOp::Compact { index: *index },
            LogOp::Remove => PreparedOp::Remove,
        })
    }

    /// Bytes this op adds to a batch (about).
    pub(crate) fn bytes(&self) -> u64 {
        let body = match self {
            PreparedOp::Append { body, .. }
            | PreparedOp::HardState { body, .. }
            | PreparedOp::ConfState { body }
            | PreparedOp::SetSnapshot { body, .. } => body.bytes.len(),
            PreparedOp::ApplySnapshot { snapshot, .. } => snapshot.len() + 32,
            PreparedOp::Compact { .. } => 16,
            PreparedOp::Remove => 0,
        };
        (RECORD_HEADER_LEN + body) as u64
    }

    fn meta(&self) -> OpMeta<'_> {
        match self {
            PreparedOp::Append { first, terms, .. } => OpMeta::Append {
                first: *first,
                terms: Cow::Borrowed(terms),
            },
            PreparedOp::HardState { hs, .. } => OpMeta::HardState(hs),
            PreparedOp::ConfState { .. } => OpMeta::ConfState,
            PreparedOp::ApplySnapshot { index, term, .. } => OpMeta::ApplySnapshot {
                index: *index,
                term: *term,
            },
            PreparedOp::SetSnapshot { index, term, .. } => OpMeta::SetSnapshot {
                index: *index,
                term: *term,
            },
            PreparedOp::Compact { index } => OpMeta::Compact(*index),
            PreparedOp::Remove => OpMeta::Remove,
        }
    }
}

/// The writes of one group in one request.
#[derive(Debug)]
pub(crate) struct PreparedWrite {
    pub group: GroupId,
    pub ops: Vec<PreparedOp>,
}

/// One caller's writes, answered once durable (or refused).
#[derive(Debug)]
pub(crate) struct Request {
    pub writes: Vec<PreparedWrite>,
    pub bytes: u64,
    pub reply: oneshot::Sender<Result<(), WalError>>,
}

/// The segment being appended to.
#[derive(Debug)]
pub(crate) struct Active {
    pub seq: u64,
    pub file: File,
    pub size: u64,
    pub salt: u64,
}

/// Creates segment `seq` and makes its header (and its directory entry) durable.
pub(crate) fn create_segment(dir: &Path, seq: u64, first_batch: u64) -> Result<Active, WalError> {
    let path = dir.join(segment_name(seq));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|source| WalError::Io {
            path: path.clone(),
            what: "creating a segment",
            source,
        })?;
    start_segment(dir, file, None, seq, first_batch)
}

/// Makes `file` segment `seq`: its header written and durable (with the file's size), then,
/// for a file prepared under another name (`from`), renamed into place; then the directory
/// synced. A crash before the rename leaves the prepared file (removed on open); after it, a
/// segment with a header and nothing written after it, which replays as empty.
pub(crate) fn start_segment(
    dir: &Path,
    file: File,
    from: Option<&Path>,
    seq: u64,
    first_batch: u64,
) -> Result<Active, WalError> {
    let path = dir.join(segment_name(seq));
    let io = |what, source| WalError::Io {
        path: path.clone(),
        what,
        source,
    };
    let salt = common::ids::Uuid128::random().0 as u64;
    let header = SegmentHeader {
        seq,
        salt,
        first_batch,
    };
    file.write_all_at(&header.encode(), 0)
        .map_err(|e| io("writing a segment header", e))?;
    file.sync_all()
        .map_err(|e| io("syncing a segment header", e))?;
    if let Some(from) = from {
        fs::rename(from, &path).map_err(|e| io("renaming a spare segment", e))?;
    }
    sync_dir(dir)?;
    tracing::debug!(
        segment = seq,
        first_batch,
        zero_filled = from.is_some(),
        "raft log: new segment"
    );
    Ok(Active {
        seq,
        file,
        size: super::format::SEGMENT_HEADER_LEN as u64,
        salt,
    })
}

/// A record of the batch being built.
struct Pending<'a> {
    group: GroupId,
    kind: Kind,
    body: Cow<'a, Body>,
}

/// Where a copied-forward record goes in the group's bookkeeping.
#[derive(Debug, Clone, Copy)]
enum Moved {
    Hs,
    Cs,
    Snap,
    Trunc,
    Run(u64),
}

/// The writer: sole owner of the files and of the bookkeeping.
#[derive(Debug)]
pub(crate) struct Writer {
    pub dir: PathBuf,
    pub cfg: WalConfig,
    pub metrics: WalMetrics,
    pub segs: Segments,
    pub active: Active,
    pub next_batch: u64,
    pub groups: BTreeMap<GroupId, GroupTrack>,
    pub buf: Vec<u8>,
    /// Set by a failed write or sync: nothing is written after it (the kernel may have dropped
    /// the dirty pages, so retrying could acknowledge data that is not on disk).
    pub failed: Option<(&'static str, io::ErrorKind)>,
    /// Set when clean-up met an error; it is not tried again until restart.
    pub gc_stopped: bool,
    /// The next segment, zero-filled ahead of need (see `spare`).
    pub spare: Spare,
    /// Held for the writer's lifetime: the directory's lock.
    pub _lock: File,
}

impl Writer {
    /// Serves requests until every [`super::Wal`] handle is gone.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let max = self.cfg.max_batch_bytes.bytes();
        let mut carry: Option<Request> = None;
        loop {
            let first = match carry.take() {
                Some(r) => r,
                None => match rx.blocking_recv() {
                    Some(r) => r,
                    None => break,
                },
            };
            let mut bytes = first.bytes;
            let mut reqs = vec![first];
            while bytes < max {
                match rx.try_recv() {
                    Ok(r) if bytes + r.bytes > max => {
                        carry = Some(r);
                        break;
                    }
                    Ok(r) => {
                        bytes += r.bytes;
                        reqs.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.commit(reqs);
            self.maybe_gc();
            self.maybe_prepare_spare();
        }
        tracing::debug!(dir = %self.dir.display(), "raft log: writer stopped");
    }

    fn fail(&mut self, what: &'static str, e: &io::Error) {
        tracing::error!(dir = %self.dir.display(), what, error = %e, "raft log: write failed; the log refuses every later write");
        self.failed = Some((what, e.kind()));
    }

    fn failed_error(&self) -> Option<WalError> {
        self.failed
            .map(|(what, kind)| WalError::Failed { what, kind })
    }

    fn rotate_if_full(&mut self) -> Result<(), WalError> {
        if self.active.size < self.cfg.segment_size.bytes() {
            return Ok(());
        }
        let seq = self.active.seq + 1;
        let active = match self.spare.take() {
            Some((file, from)) => {
                self.metrics.preallocated_segments.inc();
                start_segment(&self.dir, file, Some(&from), seq, self.next_batch)?
            }
            None => create_segment(&self.dir, seq, self.next_batch)?,
        };
        self.segs.map.insert(
            seq,
            SegInfo {
                salt: active.salt,
                size: active.size,
                refs: 0,
                live: 0,
            },
        );
        self.active = active;
        self.metrics.segments.set(self.segs.map.len() as i64);
        Ok(())
    }

    /// Starts zero-filling the next segment once the active one is half full.
    pub(crate) fn maybe_prepare_spare(&mut self) {
        let len = self.cfg.segment_size.bytes();
        if self.cfg.preallocate
            && self.failed.is_none()
            && !self.spare.pending()
            && self.active.size >= len / 2
        {
            self.spare.prepare(&self.dir, len);
        }
    }

    /// Writes `self.buf` at the end of the active segment and makes it durable.
    fn flush_batch(&mut self, records: usize) -> Result<(), WalError> {
        if let Err(e) = self.active.file.write_all_at(&self.buf, self.active.size) {
            self.fail("write", &e);
            return Err(WalError::Failed {
                what: "write",
                kind: e.kind(),
            });
        }
        let t = Instant::now();
        let synced = self.active.file.sync_data();
        self.metrics
            .fsync_seconds
            .observe(t.elapsed().as_secs_f64());
        if let Err(e) = synced {
            self.fail("fdatasync", &e);
            return Err(WalError::Failed {
                what: "fdatasync",
                kind: e.kind(),
            });
        }
        let n = self.buf.len() as u64;
        self.active.size += n;
        if let Some(s) = self.segs.map.get_mut(&self.active.seq) {
            s.size = self.active.size;
        }
        self.next_batch += 1;
        self.metrics.written_bytes.inc_by(n);
        self.metrics.batch_records.observe(records as f64);
        Ok(())
    }

    /// Encodes a batch into `self.buf`.
    fn encode_batch<'b>(
        &mut self,
        records: impl ExactSizeIterator<Item = (GroupId, Kind, &'b Body)>,
    ) {
        self.buf.clear();
        let count = records.len() as u32;
        for (i, (group, kind, body)) in records.enumerate() {
            let h = RecordHeader {
                body_len: body.bytes.len() as u32,
                batch: self.next_batch,
                index: i as u32,
                count,
                group,
                kind: kind as u8,
                flags: 0,
            };
            self.buf
                .extend_from_slice(&h.encode(self.active.salt, &body.crc));
            self.buf.extend_from_slice(&body.bytes);
        }
    }

    /// Checks, writes and answers a batch of requests.
    pub(crate) fn commit(&mut self, reqs: Vec<Request>) {
        let reply_all = |reqs: Vec<Request>, e: &dyn Fn() -> WalError| {
            for r in reqs {
                let _ = r.reply.send(Err(e()));
            }
        };
        if let Some(e) = self.failed {
            reply_all(reqs, &|| WalError::Failed {
                what: e.0,
                kind: e.1,
            });
            return;
        }
        if let Err(e) = self.rotate_if_full() {
            tracing::error!(error = %e, "raft log: cannot start a new segment");
            let kind = match &e {
                WalError::Io { source, .. } => source.kind(),
                _ => io::ErrorKind::Other,
            };
            self.failed = Some(("creating a segment", kind));
            reply_all(reqs, &|| WalError::Failed {
                what: "creating a segment",
                kind,
            });
            return;
        }
        let mut outcome: Vec<Result<(), WalError>> = Vec::with_capacity(reqs.len());
        let mut pending: Vec<Pending<'_>> = Vec::new();
        let mut offset = self.active.size;
        let seg = self.active.seq;
        for req in &reqs {
            match plan_request(&self.groups, req) {
                Err(e) => outcome.push(Err(e)),
                Ok(planned) => {
                    for (group, ops, steps, bodies) in planned {
                        for (step, (kind, body)) in steps.iter().zip(bodies) {
                            let len = (RECORD_HEADER_LEN + body.bytes.len()) as u32;
                            let loc = Loc { seg, offset, len };
                            offset += u64::from(len);
                            let applied = applied_of(step, &ops);
                            if *step == Step::Remove {
                                if let Some(mut t) = self.groups.remove(&group) {
                                    t.release_all(&mut self.segs);
                                }
                            } else {
                                self.groups.entry(group).or_default().apply(
                                    step,
                                    applied,
                                    loc,
                                    &mut self.segs,
                                );
                            }
                            pending.push(Pending { group, kind, body });
                        }
                    }
                    outcome.push(Ok(()));
                }
            }
        }
        let accepted = outcome.iter().filter(|o| o.is_ok()).count();
        if !pending.is_empty() {
            let records = pending.len();
            self.encode_batch(pending.iter().map(|p| (p.group, p.kind, &*p.body)));
            drop(pending);
            if let Err(e) = self.flush_batch(records) {
                tracing::debug!(error = %e, "raft log: batch failed");
                for o in outcome.iter_mut().filter(|o| o.is_ok()) {
                    *o = Err(self.failed_error().unwrap_or(WalError::Closed));
                }
            } else {
                self.metrics.batch_writes.observe(accepted as f64);
            }
        }
        for (r, o) in reqs.into_iter().zip(outcome) {
            let _ = r.reply.send(o);
        }
    }

    /// Deletes the oldest segments nobody needs; cleans the oldest one first (at most one per
    /// call, so writers are not starved) when few of its bytes are still needed.
    pub(crate) fn maybe_gc(&mut self) {
        if self.failed.is_some() || self.gc_stopped {
            return;
        }
        let mut cleaned = false;
        loop {
            let Some((&oldest, info)) = self.segs.map.iter().next() else {
                return;
            };
            if oldest == self.active.seq {
                return;
            }
            if info.refs == 0 {
                if let Err(e) = self.delete_segment(oldest) {
                    tracing::warn!(error = %e, "raft log: cannot delete a segment; clean-up stops until restart");
                    self.gc_stopped = true;
                    return;
                }
                continue;
            }
            if cleaned || !self.worth_cleaning(info) {
                return;
            }
            if let Err(e) = self.rewrite(oldest) {
                tracing::error!(segment = oldest, error = %e, "raft log: cleaning a segment failed; clean-up stops until restart");
                self.gc_stopped = true;
                return;
            }
            cleaned = true;
        }
    }

    /// Whether copying the live records of the oldest segment forward is worth it: they take
    /// at most `gc-live-percent` of it and it is not the segment sealed last (whose live
    /// entries are usually about to be compacted), or there are more than `max-segments`
    /// segments and either at most half of it is live or at most half of the whole log is.
    ///
    /// The last case matters: segments are deleted oldest first, so one oldest segment kept
    /// mostly live (a volume whose write-back is stalled holds its unflushed entries) would
    /// otherwise keep every later segment on disk however dead, until the disk fills and the
    /// log refuses every group's writes. Copying it forward costs at most one segment per
    /// call; when most of the log is live, nothing can be reclaimed and nothing is copied.
    fn worth_cleaning(&self, oldest: &SegInfo) -> bool {
        let n = self.segs.map.len();
        let live = oldest.live.saturating_mul(100);
        let mostly_dead =
            n > 2 && live <= u64::from(self.cfg.gc_live_percent).saturating_mul(oldest.size);
        let crowded = n > self.cfg.max_segments
            && (live <= 50u64.saturating_mul(oldest.size) || {
                let (all_live, all_size) = self
                    .segs
                    .map
                    .values()
                    .fold((0u64, 0u64), |(l, s), i| (l + i.live, s + i.size));
                all_live.saturating_mul(2) <= all_size
            });
        mostly_dead || crowded
    }

    fn delete_segment(&mut self, seq: u64) -> Result<(), WalError> {
        let path = self.dir.join(segment_name(seq));
        fs::remove_file(&path).map_err(|source| WalError::Io {
            path: path.clone(),
            what: "deleting a segment",
            source,
        })?;
        sync_dir(&self.dir)?;
        self.segs.map.remove(&seq);
        self.metrics.segments.set(self.segs.map.len() as i64);
        tracing::debug!(segment = seq, "raft log: deleted a segment nobody needs");
        Ok(())
    }

    /// Copies every record of segment `victim` that still sets part of a group's state to the
    /// end of the log (one batch), so the segment can be deleted.
    fn rewrite(&mut self, victim: u64) -> Result<(), WalError> {
        let path = self.dir.join(segment_name(victim));
        let salt = self.segs.map.get(&victim).map_or(0, |s| s.salt);
        let file = File::open(&path).map_err(|source| WalError::Io {
            path: path.clone(),
            what: "opening a segment to clean it",
            source,
        })?;
        let mut cache: HashMap<u64, Record> = HashMap::new();
        let mut read = |loc: Loc| -> Result<Record, WalError> {
            if let Some(r) = cache.get(&loc.offset) {
                return Ok(r.clone());
            }
            let mut b = vec![0u8; loc.len as usize];
            file.read_exact_at(&mut b, loc.offset)
                .map_err(|source| WalError::Io {
                    path: path.clone(),
                    what: "reading a record to copy it",
                    source,
                })?;
            let corrupt = |reason| WalError::Corrupt {
                file: path.clone(),
                offset: loc.offset,
                reason,
            };
            let (h, body, _) =
                parse_record(&b, salt).map_err(|e| corrupt(Corruption::Record(e)))?;
            let rec =
                decode_body(h.kind, h.flags, body).map_err(|e| corrupt(Corruption::Body(e)))?;
            cache.insert(loc.offset, rec.clone());
            Ok(rec)
        };
        let in_victim = |i: &Option<Item>| i.filter(|i| i.loc.seg == victim).map(|i| i.loc);
        let encode = |group, source| WalError::Encode { group, source };
        let mut out: Vec<(GroupId, Kind, Body, Moved)> = Vec::new();
        for (&group, t) in &self.groups {
            if let Some(loc) = in_victim(&t.trunc) {
                let (index, term) = match read(loc)? {
                    Record::Compact { index, term } => (index, term),
                    Record::ApplySnapshot { snapshot, .. } => {
                        let m = snapshot.get_metadata();
                        (m.index + 1, m.term)
                    }
                    _ => return Err(mismatch(&path, loc)),
                };
                out.push((
                    group,
                    Kind::Compact,
                    Body::new(encode_compact(index, term)),
                    Moved::Trunc,
                ));
            }
            for run in t.runs.iter().filter(|r| r.loc.seg == victim) {
                let ents = match read(run.loc)? {
                    Record::Entries(e) | Record::PutEntries(e) => e,
                    _ => return Err(mismatch(&path, run.loc)),
                };
                let live: Vec<_> = ents
                    .into_iter()
                    .filter(|e| e.index >= run.first && e.index <= run.last())
                    .collect();
                if live.len() != run.terms.len() {
                    return Err(mismatch(&path, run.loc));
                }
                let (bytes, _) = encode_entries(&live).map_err(|e| encode(group, e))?;
                out.push((
                    group,
                    Kind::PutEntries,
                    Body::new(bytes),
                    Moved::Run(run.first),
                ));
            }
            if let Some(loc) = in_victim(&t.hs) {
                let hs = match read(loc)? {
                    Record::HardState(hs) | Record::ApplySnapshot { hs, .. } => hs,
                    _ => return Err(mismatch(&path, loc)),
                };
                let b = encode_pb(&hs).map_err(|e| encode(group, e))?;
                out.push((group, Kind::HardState, Body::new(b), Moved::Hs));
            }
            if let Some(loc) = in_victim(&t.cs) {
                let cs = match read(loc)? {
                    Record::ConfState(cs) => cs,
                    Record::ApplySnapshot { snapshot, .. } => {
                        snapshot.get_metadata().get_conf_state().clone()
                    }
                    _ => return Err(mismatch(&path, loc)),
                };
                let b = encode_pb(&cs).map_err(|e| encode(group, e))?;
                out.push((group, Kind::ConfState, Body::new(b), Moved::Cs));
            }
            if let Some(loc) = in_victim(&t.snap) {
                let s = match read(loc)? {
                    Record::SetSnapshot(s) | Record::ApplySnapshot { snapshot: s, .. } => s,
                    _ => return Err(mismatch(&path, loc)),
                };
                let b = encode_pb(&s).map_err(|e| encode(group, e))?;
                out.push((group, Kind::SetSnapshot, Body::new(b), Moved::Snap));
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        self.rotate_if_full()?;
        let seg = self.active.seq;
        let mut offset = self.active.size;
        let records = out.len();
        self.encode_batch(out.iter().map(|(g, k, b, _)| (*g, *k, b)));
        self.flush_batch(records)?;
        self.metrics
            .gc_rewritten_bytes
            .inc_by(self.buf.len() as u64);
        for (group, _, body, moved) in out {
            let len = (RECORD_HEADER_LEN + body.bytes.len()) as u32;
            let loc = Loc { seg, offset, len };
            offset += u64::from(len);
            let Some(t) = self.groups.get_mut(&group) else {
                continue;
            };
            let item = Some(Item {
                loc,
                bytes: u64::from(len),
            });
            match moved {
                Moved::Hs => self.segs.replace(&mut t.hs, item),
                Moved::Cs => self.segs.replace(&mut t.cs, item),
                Moved::Snap => self.segs.replace(&mut t.snap, item),
                Moved::Trunc => self.segs.replace(&mut t.trunc, item),
                Moved::Run(first) => t.move_run(first, loc, &mut self.segs),
            }
        }
        tracing::debug!(
            segment = victim,
            records,
            "raft log: copied live records forward"
        );
        Ok(())
    }
}

fn mismatch(path: &Path, loc: Loc) -> WalError {
    WalError::Corrupt {
        file: path.to_path_buf(),
        offset: loc.offset,
        reason: Corruption::UnexpectedRecord,
    }
}

/// What a step's op gives the bookkeeping.
fn applied_of<'a>(step: &Step, ops: &[&'a PreparedOp]) -> Applied<'a> {
    let op = |i: &usize| ops.get(*i).copied();
    match step {
        Step::Append { op: i } => match op(i) {
            Some(PreparedOp::Append {
                first,
                terms,
                sizes,
                ..
            }) => Applied::Append {
                first: *first,
                terms,
                sizes,
            },
            _ => Applied::Other,
        },
        Step::HardState { op: i } => match op(i) {
            Some(PreparedOp::HardState { hs, .. }) => Applied::HardState(hs),
            _ => Applied::Other,
        },
        Step::ApplySnapshot { op: i, .. } | Step::SetSnapshot { op: i } => match op(i) {
            Some(
                PreparedOp::ApplySnapshot { index, term, .. }
                | PreparedOp::SetSnapshot { index, term, .. },
            ) => Applied::Snapshot {
                index: *index,
                term: *term,
            },
            _ => Applied::Other,
        },
        _ => Applied::Other,
    }
}

type Planned<'a> = (
    GroupId,
    Vec<&'a PreparedOp>,
    Vec<Step>,
    Vec<(Kind, Cow<'a, Body>)>,
);

/// Checks a request against the bookkeeping and encodes the records it adds; nothing changes
/// yet. The writes of one group in a request are checked as one sequence.
fn plan_request<'a>(
    groups: &BTreeMap<GroupId, GroupTrack>,
    req: &'a Request,
) -> Result<Vec<Planned<'a>>, WalError> {
    let mut order: Vec<(GroupId, Vec<&'a PreparedOp>)> = Vec::new();
    let mut at: HashMap<GroupId, usize> = HashMap::new();
    for w in &req.writes {
        let i = *at.entry(w.group).or_insert_with(|| {
            order.push((w.group, Vec::new()));
            order.len() - 1
        });
        order[i].1.extend(w.ops.iter());
    }
    let mut out = Vec::with_capacity(order.len());
    for (group, ops) in order {
        let metas: Vec<OpMeta<'_>> = ops.iter().map(|o| o.meta()).collect();
        let steps = plan(groups.get(&group), &metas)
            .map_err(|source: LogError| WalError::Rejected { group, source })?;
        let mut bodies = Vec::with_capacity(steps.len());
        for step in &steps {
            let get = |i: &usize| ops.get(*i).copied();
            let borrowed = |kind, i: &usize| match get(i) {
                Some(
                    PreparedOp::Append { body, .. }
                    | PreparedOp::HardState { body, .. }
                    | PreparedOp::ConfState { body }
                    | PreparedOp::SetSnapshot { body, .. },
                ) => Ok((kind, Cow::Borrowed(body))),
                _ => Err(WalError::Internal("step does not match its op")),
            };
            bodies.push(match step {
                Step::Append { op } => borrowed(Kind::Entries, op)?,
                Step::HardState { op } => borrowed(Kind::HardState, op)?,
                Step::ConfState { op } => borrowed(Kind::ConfState, op)?,
                Step::SetSnapshot { op } => borrowed(Kind::SetSnapshot, op)?,
                Step::ApplySnapshot { op, hard_state } => match get(op) {
                    Some(PreparedOp::ApplySnapshot { snapshot, .. }) => {
                        let b = encode_apply_snapshot(hard_state, snapshot)
                            .map_err(|source| WalError::Encode { group, source })?;
                        (Kind::ApplySnapshot, Cow::Owned(Body::new(b)))
                    }
                    _ => return Err(WalError::Internal("step does not match its op")),
                },
                Step::Compact { index, term } => (
                    Kind::Compact,
                    Cow::Owned(Body::new(encode_compact(*index, *term))),
                ),
                Step::Remove => (Kind::RemoveGroup, Cow::Owned(Body::new(Vec::new()))),
            });
        }
        out.push((group, ops, steps, bodies));
    }
    Ok(out)
}
