//! The durable Raft log of a head node: one write-ahead log shared by every Raft group on the
//! node, with group commit.
//!
//! # Use
//!
//! [`Wal::open`] reads the log and returns each group's log in memory ([`GroupStorage`], a
//! `raft::Storage`). A group driver turns each raft `Ready` into a [`GroupWrite`]
//! ([`GroupWrite::from_ready`]), calls [`Wal::write`], and once that returns applies the same
//! write to its `GroupStorage` ([`GroupStorage::apply`]). Writes from many groups issued at the
//! same time are merged by one writer thread into one `write` and one `fdatasync`, then every
//! caller is answered.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use head_node::replication::GroupId;
//! use head_node::replication::log::GroupWrite;
//! use head_node::replication::wal::{Wal, WalConfig};
//! use raft::prelude::{ConfState, Entry};
//!
//! let dir = tempfile::tempdir()?;
//! let registry = prometheus::Registry::new();
//! let (wal, recovered) = Wal::open(dir.path(), &WalConfig::default(), &registry)?;
//! assert!(recovered.groups.is_empty());
//!
//! let group = GroupId(1);
//! let mut w = GroupWrite::new(group);
//! w.conf_state(ConfState::from((vec![1, 2, 3], vec![])))
//!     .append(vec![Entry { index: 1, term: 1, ..Default::default() }]);
//! let rt = tokio::runtime::Builder::new_current_thread().build()?;
//! rt.block_on(wal.write(&[w]))?; // durable when this returns
//! drop(wal);
//!
//! let (_wal, recovered) = Wal::open(dir.path(), &WalConfig::default(), &prometheus::Registry::new())?;
//! assert_eq!(recovered.groups[&group].last_index(), 1);
//! # Ok(()) }
//! ```
//!
//! # On disk (format version 1)
//!
//! A directory holding a `LOCK` file (locked while open, so two processes never share a log)
//! and segment files `NNNNNNNNNNNNNNNNNNNN.wal` (20-digit sequence number), written in order.
//! Integers are little-endian.
//!
//! Segment header, 64 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `STKRLOG\0` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | header length (64) |
//! | 16 | 8 | segment sequence number (equals the file name) |
//! | 24 | 8 | salt: random, seeds every record checksum of the segment |
//! | 32 | 8 | number of the first batch in the segment |
//! | 40 | 20 | zero |
//! | 60 | 4 | CRC-32 of bytes 0..60 |
//!
//! Then records, each a 48-byte header and a body:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SRR1` |
//! | 4 | 4 | body length |
//! | 8 | 8 | batch number |
//! | 16 | 4 | position of the record in its batch |
//! | 20 | 4 | records in the batch |
//! | 24 | 16 | group id |
//! | 40 | 1 | kind |
//! | 41 | 1 | flags (0) |
//! | 42 | 2 | zero |
//! | 44 | 4 | CRC-32 of the salt, header bytes 0..44 and the body |
//!
//! Bodies by kind (protobuf is raft-rs's own encoding of its messages):
//!
//! | kind | body | effect on the group |
//! |---|---|---|
//! | 1 entries | `u32 n`, then n × (`u32 len`, `Entry`) | entries at and after the first index are replaced |
//! | 2 hard state | `HardState` | replaces the hard state |
//! | 3 conf state | `ConfState` | replaces the membership |
//! | 4 apply snapshot | `u32 len`, `HardState` (after installing), `Snapshot` | replaces everything: no entries, compaction point and membership from the snapshot |
//! | 5 set snapshot | `Snapshot` | replaces the stored snapshot |
//! | 6 compact | `u64 index`, `u64 term` | entries before `index` go; `term` is the term of `index - 1` |
//! | 7 remove group | empty | the group is gone |
//! | 8 put entries | as 1 | entries are put without removing later ones (clean-up copies) |
//!
//! A newer format version in a segment header, or a record kind or flag this build does not
//! know, is refused with an error that says so.
//!
//! # Batches and torn tails
//!
//! Every group-commit batch is written with one `pwrite` at the end of the active segment and
//! made durable with one `fdatasync` before the next batch is written. A batch never spans
//! segments. Hence only the last batch of the last segment can be damaged by a crash, and
//! batches are all-or-nothing on replay: when the last segment ends inside a batch, or a record
//! of it is incomplete or fails its checksum, the whole batch (never acknowledged) is cut off
//! (the file is truncated, with a warning). To tell a torn write from corruption, the bytes after
//! a bad record are searched for valid records (the per-segment salt makes stale or embedded bytes
//! fail the checksum): a valid record of a later batch, or an earlier position of the same batch,
//! proves the bad record had been durable, so that is an error naming the file and offset, as is
//! any bad record in an earlier segment, a missing segment, or records out of sequence. (Damage to
//! the last batch itself cannot be told from a torn write; it is cut, with a warning.) The search
//! checks only headers that could belong to this batch or a later one and hashes at most four
//! times the bytes left, so a payload full of record-shaped bytes cannot make a restart hang; the
//! price is that such a payload, in a batch before bit rot, can hide the valid records after the
//! damage, and the rot is then cut as if it were a torn tail.
//!
//! Segments are usually zero-filled ahead of need (`spare`), so a segment may end in zeros:
//! zeros from a batch boundary to the end of the file are a clean end (nothing is cut), and
//! writing resumes at that boundary. A sealed segment that lost whole batches this way is still
//! caught: the next segment's header names the batch it starts with.
//!
//! # Which segments are needed, and clean-up
//!
//! A group's state is set by a few records: the last one that set its hard state, its
//! membership, its stored snapshot and its compaction point (an apply-snapshot record sets all
//! four), and for each live entry the record that last wrote it. The writer keeps, per group,
//! where those records are, and per segment how many it holds. Records are only ever appended,
//! and replay applies them in order to a sparse per-group state, so replaying any suffix of the
//! segments that still holds every such record rebuilds the same state: the superseded records
//! in it are overridden, cut or compacted by later ones, exactly as they were when first
//! written. (Replay then checks that each group's entries are consecutive from its compaction
//! point.) So:
//!
//! * the oldest segment is deleted (and the directory synced) as soon as none of its records
//!   sets anything any more — compaction, conflict truncation, newer hard states and snapshots,
//!   and group removal all release records;
//! * a segment that stays pinned by a few records (an idle group's hard state, a membership that
//!   has not changed for a long time, entries not yet compacted) is *cleaned* when those records
//!   take at most `gc-live-percent` of it and it is not the only sealed segment (the live entries
//!   of the segment sealed last are usually compacted soon), or when there are more than
//!   `max-segments` segments and at most half of it is live. Cleaning reads the live records
//!   back (checksums verified), copies them to the end of the log in one batch (hard state,
//!   membership and snapshot as such, the compaction point as a compact record, entries as
//!   "put entries" records, which do not cut later entries), makes that durable, and only then
//!   deletes the segment. A crash before the copy is durable leaves the old segment in place; a
//!   crash after it leaves harmless duplicates. At most one segment is cleaned per batch.
//!   Copying cannot shrink a log whose records are all live: that is unflushed data, which the
//!   group drivers bound.
//!
//! Segments are deleted oldest first, so the files left are always a contiguous range.
//!
//! # Failures
//!
//! A failed `write` or `fdatasync` fails the batch and every later write (the kernel may have
//! dropped the dirty pages, so a retry could acknowledge data that is not durable); the node
//! must restart and replay. A write that breaks a group's log rules (a gap, a compacted index,
//! …) is refused with [`WalError::Rejected`] before anything is written.

pub(crate) mod format;
mod recover;
mod spare;
pub(crate) mod track;
mod writer;

#[cfg(test)]
mod tests;

pub use format::{BadRecord, BodyError, HeaderError};

use crate::replication::GroupId;
use crate::replication::log::{GroupStorage, GroupWrite, LogError};
use common::units::ByteSize;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use writer::{PreparedOp, PreparedWrite, Request, Writer};

/// Where a caller waits for its write to be durable.
type Reply = oneshot::Receiver<Result<(), WalError>>;

/// Name of the lock file in the log directory.
pub(crate) const LOCK_FILE: &str = "LOCK";

/// Configuration of the raft log (`[raft-log]` in the head node's TOML file).
///
/// ```toml
/// segment-size = "64MiB"     # start a new segment at this size
/// queue-depth = 1024          # writes waiting for the writer; callers wait beyond it
/// max-batch-bytes = "16MiB"   # bytes merged into one write + fdatasync
/// gc-live-percent = 25        # clean an old segment when at most this much of it is live
/// max-segments = 64           # beyond this, clean the oldest when at most half of it is live
/// preallocate = true          # zero-fill the next segment ahead of need (cheaper fsyncs)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct WalConfig {
    /// A segment is closed, and a new one started, once it reaches this size.
    pub segment_size: ByteSize,
    /// Write requests waiting for the writer thread; when it is full, callers wait.
    pub queue_depth: usize,
    /// Bytes of requests merged into one batch (a larger request is written alone).
    pub max_batch_bytes: ByteSize,
    /// The oldest segment is cleaned (its live records copied forward) so it can be deleted
    /// when its live records take at most this percentage of it.
    pub gc_live_percent: u8,
    /// With more segments than this, the oldest is also cleaned when at most half of it is
    /// live.
    pub max_segments: usize,
    /// Zero-fill the next segment in the background while the active one fills, so that each
    /// commit's `fdatasync` writes the data only, not the inode of a growing file.
    pub preallocate: bool,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            segment_size: ByteSize(64 << 20),
            queue_depth: 1024,
            max_batch_bytes: ByteSize(16 << 20),
            gc_live_percent: 25,
            max_segments: 64,
            preallocate: true,
        }
    }
}

impl WalConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), WalError> {
        let bad = |key, reason| Err(WalError::InvalidConfig { key, reason });
        if !(4 << 10..=1 << 40).contains(&self.segment_size.bytes()) {
            return bad("segment-size", "must be between 4KiB and 1TiB");
        }
        if !(1..=1 << 20).contains(&self.queue_depth) {
            return bad("queue-depth", "must be between 1 and 1048576");
        }
        if !(4 << 10..=1 << 32).contains(&self.max_batch_bytes.bytes()) {
            return bad("max-batch-bytes", "must be between 4KiB and 4GiB");
        }
        if self.gc_live_percent > 100 {
            return bad("gc-live-percent", "must be at most 100");
        }
        if self.max_segments < 2 {
            return bad("max-segments", "must be at least 2");
        }
        Ok(())
    }
}

/// What is wrong with a segment's contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// The segment header is damaged.
    #[error("segment header: {0}")]
    Header(#[source] HeaderError),
    /// The header's sequence number is not the file's.
    #[error("the file is segment {named} but its header says {header}")]
    SegmentNumber {
        /// From the file name.
        named: u64,
        /// From the header.
        header: u64,
    },
    /// The segment does not start where the previous one ended.
    #[error("the segment starts at batch {found}, expected {expected}")]
    BatchSequence {
        /// Batch after the previous segment's last.
        expected: u64,
        /// Batch in this header.
        found: u64,
    },
    /// A bad record where every record must be durable.
    #[error("{0}")]
    Record(#[source] BadRecord),
    /// A bad record followed by a valid one of a later position: not a torn write.
    #[error("{bad}, yet a later valid record follows at offset {valid_at}")]
    DamageBeforeValidRecord {
        /// What is wrong with the record.
        bad: BadRecord,
        /// Offset of the later valid record.
        valid_at: u64,
    },
    /// A valid record in the wrong place.
    #[error(
        "record out of sequence: expected batch {expected_batch} record {expected_index}, found batch {batch} record {index}"
    )]
    OutOfSequence {
        /// Expected batch.
        expected_batch: u64,
        /// Expected position in it.
        expected_index: u32,
        /// Found batch.
        batch: u64,
        /// Found position.
        index: u32,
    },
    /// A sealed segment ends inside a batch.
    #[error("batch {batch} ends after {records} of its {count} records")]
    IncompleteBatch {
        /// The batch.
        batch: u64,
        /// Records present.
        records: u32,
        /// Records it should have.
        count: u32,
    },
    /// A record whose body cannot be read (a newer kind, or damage that kept its checksum).
    #[error("{0}")]
    Body(#[source] BodyError),
    /// A record copied by clean-up is not of the kind the bookkeeping expects.
    #[error("record is not the one expected for clean-up")]
    UnexpectedRecord,
}

/// A group whose records do not add up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistency {
    /// A hole in the entries.
    #[error("entry {expected} is missing (next held: {found})")]
    MissingEntries {
        /// The index expected next.
        expected: u64,
        /// The index found instead.
        found: u64,
    },
    /// Terms going down.
    #[error("entry {index} has term {term}, lower than {previous_term} before it")]
    TermRegression {
        /// The entry.
        index: u64,
        /// Its term.
        term: u64,
        /// The term before it.
        previous_term: u64,
    },
}

/// Errors of the raft log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// An I/O error.
    #[error("raft log {path}: {what}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Damaged contents (not a torn tail).
    #[error("raft log {file} at offset {offset}: {reason}")]
    Corrupt {
        /// The segment.
        file: PathBuf,
        /// Offset of the damaged record or header.
        offset: u64,
        /// What is wrong.
        #[source]
        reason: Corruption,
    },
    /// Written by a format version this build cannot read.
    #[error("raft log {file}: format version {found}; this build reads version {supported}")]
    UnsupportedVersion {
        /// The segment.
        file: PathBuf,
        /// Its version.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// A segment between others is missing.
    #[error("raft log {dir}: segment {missing} is missing")]
    MissingSegment {
        /// The log directory.
        dir: PathBuf,
        /// Its sequence number.
        missing: u64,
    },
    /// A group's records do not add up.
    #[error("raft log {dir}: group {group}: {reason}")]
    Inconsistent {
        /// The log directory.
        dir: PathBuf,
        /// The group.
        group: GroupId,
        /// What is wrong.
        #[source]
        reason: Inconsistency,
    },
    /// Another process has the log open.
    #[error("raft log {dir} is in use by another process")]
    Locked {
        /// The log directory.
        dir: PathBuf,
    },
    /// A write that breaks the group's log rules; nothing of the request was written.
    #[error("raft log: group {group}: {source}")]
    Rejected {
        /// The group.
        group: GroupId,
        /// The rule broken.
        #[source]
        source: LogError,
    },
    /// A record too large for the format.
    #[error("raft log: group {group}: record of {bytes} bytes is too large")]
    TooLarge {
        /// The group.
        group: GroupId,
        /// Its size.
        bytes: u64,
    },
    /// A raft message could not be encoded.
    #[error("raft log: group {group}: encoding: {source}")]
    Encode {
        /// The group.
        group: GroupId,
        /// Cause.
        #[source]
        source: protobuf::ProtobufError,
    },
    /// An earlier write or sync failed; the log takes no more writes until restarted.
    #[error("raft log: {what} failed ({kind}); no write is accepted until restart")]
    Failed {
        /// The operation that failed.
        what: &'static str,
        /// Its error kind.
        kind: io::ErrorKind,
    },
    /// The writer thread is gone.
    #[error("raft log: the writer has stopped")]
    Closed,
    /// A configuration value out of range.
    #[error("invalid raft log configuration: {key} {reason}")]
    InvalidConfig {
        /// The key.
        key: &'static str,
        /// The rule.
        reason: &'static str,
    },
    /// Registering metrics failed.
    #[error(transparent)]
    Metrics(#[from] common::metrics::MetricsError),
    /// A bug: an internal invariant does not hold.
    #[error("raft log: internal error: {0}")]
    Internal(&'static str),
}

/// Makes a directory's entries durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| WalError::Io {
            path: dir.to_path_buf(),
            what: "syncing the directory",
            source,
        })
}

/// The log's metrics.
#[derive(Debug, Clone)]
pub(crate) struct WalMetrics {
    pub fsync_seconds: Histogram,
    pub batch_records: Histogram,
    pub batch_writes: Histogram,
    pub written_bytes: IntCounter,
    pub segments: IntGauge,
    pub gc_rewritten_bytes: IntCounter,
    pub torn_tails: IntCounter,
    pub preallocated_segments: IntCounter,
}

const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

impl WalMetrics {
    fn new(registry: &Registry) -> Result<Self, WalError> {
        use common::metrics::{LATENCY_BUCKETS, register};
        let hist = |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, WalError> {
            Ok(register(
                registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                    .map_err(common::metrics::MetricsError)?,
            )?)
        };
        Ok(Self {
            fsync_seconds: hist(
                "stockade_raft_log_fsync_duration_seconds",
                "Time of one fdatasync of the raft log (one per group-commit batch).",
                LATENCY_BUCKETS,
            )?,
            batch_records: hist(
                "stockade_raft_log_batch_records",
                "Records written per group-commit batch.",
                COUNT_BUCKETS,
            )?,
            batch_writes: hist(
                "stockade_raft_log_batch_writes",
                "Write calls merged into one group-commit batch.",
                COUNT_BUCKETS,
            )?,
            written_bytes: common::metrics::counter(
                registry,
                "stockade_raft_log_written_bytes_total",
                "Bytes appended to the raft log (records and their headers).",
            )?,
            segments: common::metrics::int_gauge(
                registry,
                "stockade_raft_log_segments",
                "Segment files of the raft log.",
            )?,
            gc_rewritten_bytes: common::metrics::counter(
                registry,
                "stockade_raft_log_gc_rewritten_bytes_total",
                "Bytes of live records copied forward to free old segments.",
            )?,
            torn_tails: common::metrics::counter(
                registry,
                "stockade_raft_log_torn_tails_total",
                "Torn tails (unacknowledged partial writes) cut when opening the raft log.",
            )?,
            preallocated_segments: common::metrics::counter(
                registry,
                "stockade_raft_log_preallocated_segments_total",
                "Segments started from a file zero-filled ahead of need (the rest grow as written).",
            )?,
        })
    }
}

/// A torn tail cut when the log was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment.
    pub file: PathBuf,
    /// Where it was cut.
    pub offset: u64,
    /// Bytes dropped.
    pub dropped_bytes: u64,
}

/// What the log held when opened.
#[derive(Debug)]
pub struct Recovered {
    /// Each group's log.
    pub groups: BTreeMap<GroupId, GroupStorage>,
    /// The torn tail cut, if there was one.
    pub torn_tail: Option<TornTail>,
}

#[derive(Debug)]
struct WalInner {
    dir: PathBuf,
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WalInner {
    fn drop(&mut self) {
        // Closing the queue stops the writer once it has answered what is queued.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The node's raft log: a handle to its writer thread. Cheap to clone; the writer stops (after
/// answering every queued write) and the directory is unlocked when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Wal {
    inner: Arc<WalInner>,
}

impl Wal {
    /// Opens (or creates) the log in `dir`, replays it, cuts a torn tail, and starts the writer.
    /// Blocking: call it at start-up or from `spawn_blocking`.
    pub fn open(
        dir: impl AsRef<Path>,
        config: &WalConfig,
        registry: &Registry,
    ) -> Result<(Wal, Recovered), WalError> {
        let dir = dir.as_ref().to_path_buf();
        config.validate()?;
        fs::create_dir_all(&dir).map_err(|source| WalError::Io {
            path: dir.clone(),
            what: "creating the directory",
            source,
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| WalError::Io {
                path: lock_path.clone(),
                what: "opening the lock file",
                source,
            })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(WalError::Locked { dir }),
            Err(fs::TryLockError::Error(source)) => {
                return Err(WalError::Io {
                    path: lock_path,
                    what: "locking",
                    source,
                });
            }
        }
        let metrics = WalMetrics::new(registry)?;
        spare::remove_leftovers(&dir)?;
        let rec = recover::recover(&dir)?;
        if rec.torn.is_some() {
            metrics.torn_tails.inc();
        }
        let mut segs = rec.segs;
        let active = match rec.last {
            Some(last) => {
                let path = dir.join(recover::segment_name(last.seq));
                let file = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|source| WalError::Io {
                        path,
                        what: "opening the last segment",
                        source,
                    })?;
                writer::Active {
                    seq: last.seq,
                    file,
                    size: last.size,
                    salt: last.salt,
                }
            }
            None => {
                let a = writer::create_segment(&dir, 1, rec.next_batch)?;
                segs.map.insert(
                    a.seq,
                    track::SegInfo {
                        salt: a.salt,
                        size: a.size,
                        refs: 0,
                        live: 0,
                    },
                );
                a
            }
        };
        metrics.segments.set(segs.map.len() as i64);
        let mut groups = BTreeMap::new();
        let mut tracks = BTreeMap::new();
        for (g, (log, track)) in rec.groups {
            groups.insert(g, GroupStorage::from_log(log));
            tracks.insert(g, track);
        }
        tracing::info!(
            dir = %dir.display(),
            groups = groups.len(),
            segments = segs.map.len(),
            "raft log: opened"
        );
        let mut w = Writer {
            dir: dir.clone(),
            cfg: config.clone(),
            metrics,
            segs,
            active,
            next_batch: rec.next_batch,
            groups: tracks,
            buf: Vec::new(),
            failed: None,
            gc_stopped: false,
            spare: spare::Spare::default(),
            _lock: lock,
        };
        // Segments left unneeded by the last run go now.
        w.maybe_gc();
        w.maybe_prepare_spare();
        let (tx, rx) = mpsc::channel(config.queue_depth);
        let thread = std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || w.run(rx))
            .map_err(|source| WalError::Io {
                path: dir.clone(),
                what: "starting the writer thread",
                source,
            })?;
        Ok((
            Wal {
                inner: Arc::new(WalInner {
                    dir,
                    tx: Some(tx),
                    thread: Some(thread),
                }),
            },
            Recovered {
                groups,
                torn_tail: rec.torn,
            },
        ))
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn prepare(writes: &[GroupWrite]) -> Result<Option<(Request, Reply)>, WalError> {
        let mut prepared = Vec::with_capacity(writes.len());
        let mut bytes = 0;
        for w in writes.iter().filter(|w| !w.is_empty()) {
            let ops = w
                .ops
                .iter()
                .map(|op| PreparedOp::prepare(w.group, op))
                .collect::<Result<Vec<_>, _>>()?;
            bytes += ops.iter().map(PreparedOp::bytes).sum::<u64>();
            prepared.push(PreparedWrite {
                group: w.group,
                ops,
            });
        }
        if prepared.is_empty() {
            return Ok(None);
        }
        let (reply, rx) = oneshot::channel();
        Ok(Some((
            Request {
                writes: prepared,
                bytes,
                reply,
            },
            rx,
        )))
    }

    /// Makes `writes` durable: returns once they are on disk (merged with other callers'
    /// writes into one `fdatasync`). Each request is all or nothing: if one write breaks its
    /// group's log rules, [`WalError::Rejected`] and nothing is written. Writes of the same group
    /// apply in order. When the queue is full this waits. Dropping the future does not cancel a
    /// write already queued. An empty slice returns at once.
    pub async fn write(&self, writes: &[GroupWrite]) -> Result<(), WalError> {
        self.submit(writes).await?.await
    }

    /// [`Wal::write`] in two steps: returns once `writes` are queued (waiting while the queue
    /// is full), with a future that completes once they are durable. Requests queued one after
    /// another are written, and become durable, in that order; a caller may queue the next
    /// before the last is durable.
    pub async fn submit(
        &self,
        writes: &[GroupWrite],
    ) -> Result<impl Future<Output = Result<(), WalError>> + Send + 'static, WalError> {
        let rx = match Self::prepare(writes)? {
            Some((req, rx)) => {
                let tx = self.inner.tx.as_ref().ok_or(WalError::Closed)?;
                tx.send(req).await.map_err(|_| WalError::Closed)?;
                Some(rx)
            }
            None => None,
        };
        Ok(async move {
            match rx {
                Some(rx) => rx.await.map_err(|_| WalError::Closed)?,
                None => Ok(()),
            }
        })
    }

    /// [`Wal::write`] for threads outside an async runtime (it panics inside one, as tokio's
    /// blocking channel calls do).
    pub fn write_blocking(&self, writes: &[GroupWrite]) -> Result<(), WalError> {
        let Some((req, rx)) = Self::prepare(writes)? else {
            return Ok(());
        };
        let tx = self.inner.tx.as_ref().ok_or(WalError::Closed)?;
        tx.blocking_send(req).map_err(|_| WalError::Closed)?;
        rx.blocking_recv().map_err(|_| WalError::Closed)?
    }
}
