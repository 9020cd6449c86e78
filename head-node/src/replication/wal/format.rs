//! The on-disk format of the raft log, version 1: segment headers, record headers and record
//! bodies. All integers are little-endian. See the module doc of [`super`] for the layout.

use crate::replication::GroupId;
use crate::replication::log::MAX_INDEX;
use protobuf::Message;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};

/// First bytes of every segment file.
pub(crate) const SEGMENT_MAGIC: [u8; 8] = *b"STKRLOG\0";
/// The format this build writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Size of the segment header.
pub(crate) const SEGMENT_HEADER_LEN: usize = 64;
/// First bytes of every record.
pub(crate) const RECORD_MAGIC: [u8; 4] = *b"SRR1";
/// Size of a record header.
pub(crate) const RECORD_HEADER_LEN: usize = 48;

/// The header at the start of each segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    /// The segment's sequence number (also its file name).
    pub seq: u64,
    /// Random per segment; seeds every record checksum in the segment, so bytes that look like a
    /// record inside a record's payload (or left by another segment) never verify.
    pub salt: u64,
    /// The batch number of the first batch written to this segment.
    pub first_batch: u64,
}

/// Why a segment header is not readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than a header.
    #[error("segment header is incomplete")]
    Short,
    /// Not a raft log segment.
    #[error("not a raft log segment (bad magic)")]
    Magic,
    /// Written by a format this build cannot read.
    #[error("format version {0}")]
    Version(u32),
    /// The header's checksum does not match.
    #[error("segment header checksum mismatch")]
    Checksum,
}

impl SegmentHeader {
    /// The 64 header bytes.
    pub(crate) fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.salt.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_batch.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses a header; the version is checked before the checksum so that a segment written
    /// by another format version is reported as such.
    pub(crate) fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        let b = b.get(..SEGMENT_HEADER_LEN).ok_or(HeaderError::Short)?;
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::Magic);
        }
        let version = le_u32(&b[8..12]);
        if version != FORMAT_VERSION {
            return Err(HeaderError::Version(version));
        }
        if le_u32(&b[60..64]) != crc32fast::hash(&b[..60])
            || le_u32(&b[12..16]) != SEGMENT_HEADER_LEN as u32
        {
            return Err(HeaderError::Checksum);
        }
        Ok(Self {
            seq: le_u64(&b[16..24]),
            salt: le_u64(&b[24..32]),
            first_batch: le_u64(&b[32..40]),
        })
    }
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Record kinds (byte 40 of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    /// Append: entries at and after the first one's index are replaced.
    Entries = 1,
    /// Hard state.
    HardState = 2,
    /// Membership.
    ConfState = 3,
    /// A received snapshot: hard state after it, then the snapshot.
    ApplySnapshot = 4,
    /// A snapshot produced locally.
    SetSnapshot = 5,
    /// Entries before an index discarded; the term of the entry before it.
    Compact = 6,
    /// The group is gone.
    RemoveGroup = 7,
    /// Entries copied forward by segment clean-up: put without truncating later ones.
    PutEntries = 8,
}

impl Kind {
    pub(crate) fn from_u8(k: u8) -> Option<Self> {
        Some(match k {
            1 => Kind::Entries,
            2 => Kind::HardState,
            3 => Kind::ConfState,
            4 => Kind::ApplySnapshot,
            5 => Kind::SetSnapshot,
            6 => Kind::Compact,
            7 => Kind::RemoveGroup,
            8 => Kind::PutEntries,
            _ => return None,
        })
    }
}

/// A record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub body_len: u32,
    /// The group-commit batch the record belongs to (one `write` + `fdatasync`).
    pub batch: u64,
    /// Position of the record in its batch.
    pub index: u32,
    /// Records in the batch.
    pub count: u32,
    pub group: GroupId,
    pub kind: u8,
    /// Must be 0 in version 1.
    pub flags: u8,
}

impl RecordHeader {
    /// Header bytes with the checksum over `salt`, the header and the body (whose checksum the
    /// caller computed as `body_crc`).
    pub(crate) fn encode(
        &self,
        salt: u64,
        body_crc: &crc32fast::Hasher,
    ) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4..8].copy_from_slice(&self.body_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.batch.to_le_bytes());
        b[16..20].copy_from_slice(&self.index.to_le_bytes());
        b[20..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..40].copy_from_slice(&self.group.0.to_le_bytes());
        b[40] = self.kind;
        b[41] = self.flags;
        let crc = header_crc(salt, &b, body_crc);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

fn header_crc(salt: u64, header: &[u8], body_crc: &crc32fast::Hasher) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&salt.to_le_bytes());
    h.update(&header[..44]);
    h.combine(body_crc);
    h.finalize()
}

/// Why the bytes at an offset are not a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRecord {
    /// The file ends inside the header or the body.
    #[error("record is incomplete")]
    Incomplete,
    /// No record magic.
    #[error("no record magic")]
    Magic,
    /// The checksum does not match.
    #[error("record checksum mismatch")]
    Checksum,
}

/// Parses the record at the start of `b`: its header, its body and its total length.
pub(crate) fn parse_record(b: &[u8], salt: u64) -> Result<(RecordHeader, &[u8], usize), BadRecord> {
    let Some(h) = b.get(..RECORD_HEADER_LEN) else {
        return Err(if b.len() >= 4 && b[0..4] != RECORD_MAGIC {
            BadRecord::Magic
        } else {
            BadRecord::Incomplete
        });
    };
    if h[0..4] != RECORD_MAGIC {
        return Err(BadRecord::Magic);
    }
    let body_len = le_u32(&h[4..8]);
    let total = RECORD_HEADER_LEN + body_len as usize;
    let body = b
        .get(RECORD_HEADER_LEN..total)
        .ok_or(BadRecord::Incomplete)?;
    let mut body_crc = crc32fast::Hasher::new();
    body_crc.update(body);
    if le_u32(&h[44..48]) != header_crc(salt, h, &body_crc) {
        return Err(BadRecord::Checksum);
    }
    let mut g = [0u8; 16];
    g.copy_from_slice(&h[24..40]);
    Ok((
        RecordHeader {
            body_len,
            batch: le_u64(&h[8..16]),
            index: le_u32(&h[16..20]),
            count: le_u32(&h[20..24]),
            group: GroupId(u128::from_le_bytes(g)),
            kind: h[40],
            flags: h[41],
        },
        body,
        total,
    ))
}

/// A record body and its checksum, computed where it was encoded.
#[derive(Debug, Clone)]
pub(crate) struct Body {
    pub bytes: Vec<u8>,
    pub crc: crc32fast::Hasher,
}

impl Body {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes);
        Self { bytes, crc }
    }
}

/// Bytes of an entry in an entries body: a 4-byte length and the protobuf encoding.
pub(crate) const ENTRY_OVERHEAD: u32 = 4;

/// Encodes entries: `u32 count`, then per entry `u32 len` and its protobuf bytes. Returns the
/// body and each entry's share of it.
pub(crate) fn encode_entries(
    entries: &[Entry],
) -> Result<(Vec<u8>, Vec<u32>), protobuf::ProtobufError> {
    let total: usize = entries
        .iter()
        .map(|e| e.compute_size() as usize + ENTRY_OVERHEAD as usize)
        .sum();
    let mut out = Vec::with_capacity(4 + total);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    let mut sizes = Vec::with_capacity(entries.len());
    for e in entries {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        e.write_to_vec(&mut out)?;
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        sizes.push(len + ENTRY_OVERHEAD);
    }
    Ok((out, sizes))
}

/// Encodes a protobuf message as a whole body.
pub(crate) fn encode_pb<M: Message>(m: &M) -> Result<Vec<u8>, protobuf::ProtobufError> {
    m.write_to_bytes()
}

/// The body of an apply-snapshot record: `u32 len`, the hard state after installing the
/// snapshot, then the snapshot (protobuf).
pub(crate) fn encode_apply_snapshot(
    hs: &HardState,
    snapshot_pb: &[u8],
) -> Result<Vec<u8>, protobuf::ProtobufError> {
    let hs = hs.write_to_bytes()?;
    let mut out = Vec::with_capacity(4 + hs.len() + snapshot_pb.len());
    out.extend_from_slice(&(hs.len() as u32).to_le_bytes());
    out.extend_from_slice(&hs);
    out.extend_from_slice(snapshot_pb);
    Ok(out)
}

/// The body of a compaction record: the first index kept and the term of the entry before it.
pub(crate) fn encode_compact(index: u64, term: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&term.to_le_bytes());
    out
}

/// A decoded record body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    Entries(Vec<Entry>),
    PutEntries(Vec<Entry>),
    HardState(HardState),
    ConfState(ConfState),
    ApplySnapshot { hs: HardState, snapshot: Snapshot },
    SetSnapshot(Snapshot),
    Compact { index: u64, term: u64 },
    RemoveGroup,
}

/// Why a record body (with a good checksum) cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A record kind this build does not know.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// Flags this build does not know.
    #[error("unknown record flags {0:#x}")]
    Flags(u8),
    /// The body ends early.
    #[error("record body is truncated")]
    Truncated,
    /// Bytes left after the body.
    #[error("{0} bytes after the record body")]
    Trailing(usize),
    /// A protobuf message did not decode.
    #[error("protobuf: {0}")]
    Protobuf(String),
    /// Entries that do not follow each other.
    #[error("entries in one record are not consecutive")]
    NotConsecutive,
    /// An entries record without entries.
    #[error("entries record without entries")]
    Empty,
    /// A compaction to index 0.
    #[error("compaction to index 0")]
    CompactZero,
    /// An index beyond [`MAX_INDEX`].
    #[error("index {0} is out of range")]
    IndexOutOfRange(u64),
}

fn pb<M: Message>(b: &[u8]) -> Result<M, BodyError> {
    M::parse_from_bytes(b).map_err(|e| BodyError::Protobuf(e.to_string()))
}

fn snapshot(b: &[u8]) -> Result<Snapshot, BodyError> {
    let s: Snapshot = pb(b)?;
    match s.get_metadata().index {
        i if i > MAX_INDEX => Err(BodyError::IndexOutOfRange(i)),
        _ => Ok(s),
    }
}

/// Reads a `u32` length prefix and the bytes it covers.
fn take_prefixed<'a>(b: &mut &'a [u8]) -> Result<&'a [u8], BodyError> {
    let len = b.get(..4).ok_or(BodyError::Truncated)?;
    let len = le_u32(len) as usize;
    let out = b.get(4..4 + len).ok_or(BodyError::Truncated)?;
    *b = &b[4 + len..];
    Ok(out)
}

fn decode_entries(mut b: &[u8]) -> Result<Vec<Entry>, BodyError> {
    let count = le_u32(b.get(..4).ok_or(BodyError::Truncated)?) as usize;
    b = &b[4..];
    // Every entry takes at least its 4-byte length: bound the allocation by the body.
    if count > b.len() / 4 {
        return Err(BodyError::Truncated);
    }
    if count == 0 {
        return Err(BodyError::Empty);
    }
    let mut out: Vec<Entry> = Vec::with_capacity(count);
    for _ in 0..count {
        let e: Entry = pb(take_prefixed(&mut b)?)?;
        if e.index > MAX_INDEX {
            return Err(BodyError::IndexOutOfRange(e.index));
        }
        if let Some(p) = out.last()
            && p.index.checked_add(1) != Some(e.index)
        {
            return Err(BodyError::NotConsecutive);
        }
        out.push(e);
    }
    if !b.is_empty() {
        return Err(BodyError::Trailing(b.len()));
    }
    Ok(out)
}

/// Decodes a body of the given kind and flags.
pub(crate) fn decode_body(kind: u8, flags: u8, b: &[u8]) -> Result<Record, BodyError> {
    let k = Kind::from_u8(kind).ok_or(BodyError::UnknownKind(kind))?;
    if flags != 0 {
        return Err(BodyError::Flags(flags));
    }
    Ok(match k {
        Kind::Entries => Record::Entries(decode_entries(b)?),
        Kind::PutEntries => Record::PutEntries(decode_entries(b)?),
        Kind::HardState => Record::HardState(pb(b)?),
        Kind::ConfState => Record::ConfState(pb(b)?),
        Kind::ApplySnapshot => {
            let mut rest = b;
            let hs = pb(take_prefixed(&mut rest)?)?;
            Record::ApplySnapshot {
                hs,
                snapshot: snapshot(rest)?,
            }
        }
        Kind::SetSnapshot => Record::SetSnapshot(snapshot(b)?),
        Kind::Compact => {
            if b.len() != 16 {
                return Err(if b.len() < 16 {
                    BodyError::Truncated
                } else {
                    BodyError::Trailing(b.len() - 16)
                });
            }
            let index = le_u64(&b[..8]);
            if index == 0 {
                return Err(BodyError::CompactZero);
            }
            if index > MAX_INDEX {
                return Err(BodyError::IndexOutOfRange(index));
            }
            Record::Compact {
                index,
                term: le_u64(&b[8..16]),
            }
        }
        Kind::RemoveGroup => {
            if !b.is_empty() {
                return Err(BodyError::Trailing(b.len()));
            }
            Record::RemoveGroup
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Golden bytes: the version 1 layout must not change by accident.
    #[test]
    fn golden_segment_header() {
        let h = SegmentHeader {
            seq: 7,
            salt: 0x0102_0304_0506_0708,
            first_batch: 42,
        };
        let b = h.encode();
        assert_eq!(
            hex(&b[..40]),
            "53544b524c4f4700\
             01000000\
             40000000\
             0700000000000000\
             0807060504030201\
             2a00000000000000"
        );
        assert_eq!(&b[40..60], &[0u8; 20]);
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        assert_eq!(SegmentHeader::decode(&b[..63]), Err(HeaderError::Short));
        let mut v2 = b;
        v2[8] = 2;
        assert_eq!(SegmentHeader::decode(&v2), Err(HeaderError::Version(2)));
        let mut bad = b;
        bad[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderError::Checksum));
        let mut other = b;
        other[0] = b'X';
        assert_eq!(SegmentHeader::decode(&other), Err(HeaderError::Magic));
    }

    #[test]
    fn golden_record() {
        let body = encode_compact(5, 3);
        let h = RecordHeader {
            body_len: body.len() as u32,
            batch: 9,
            index: 1,
            count: 2,
            group: GroupId(0xaabb),
            kind: Kind::Compact as u8,
            flags: 0,
        };
        let b = Body::new(body.clone());
        let mut rec = h.encode(77, &b.crc).to_vec();
        rec.extend_from_slice(&body);
        assert_eq!(
            hex(&rec[..44]),
            "53525231\
             10000000\
             0900000000000000\
             01000000\
             02000000\
             bbaa0000000000000000000000000000\
             06000000"
        );
        assert_eq!(hex(&rec[48..]), "05000000000000000300000000000000");
        let (h2, body2, len) = parse_record(&rec, 77).unwrap();
        assert_eq!((h2, body2, len), (h, &body[..], rec.len()));
        assert_eq!(
            decode_body(h2.kind, h2.flags, body2),
            Ok(Record::Compact { index: 5, term: 3 })
        );
        // Another segment's salt: the same bytes do not verify.
        assert_eq!(parse_record(&rec, 78).unwrap_err(), BadRecord::Checksum);
        assert_eq!(
            parse_record(&rec[..rec.len() - 1], 77).unwrap_err(),
            BadRecord::Incomplete
        );
        for i in 0..rec.len() {
            for bit in 0..8 {
                let mut r = rec.clone();
                r[i] ^= 1 << bit;
                assert!(
                    parse_record(&r, 77).is_err(),
                    "flip {i}.{bit} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn bodies_round_trip() {
        let e = |index, term| Entry {
            index,
            term,
            data: vec![1, 2, 3].into(),
            ..Default::default()
        };
        let (b, sizes) = encode_entries(&[e(4, 1), e(5, 2)]).unwrap();
        assert_eq!(sizes.iter().sum::<u32>() as usize + 4, b.len());
        assert_eq!(
            decode_body(Kind::Entries as u8, 0, &b),
            Ok(Record::Entries(vec![e(4, 1), e(5, 2)]))
        );
        let (gap, _) = encode_entries(&[e(4, 1), e(6, 2)]).unwrap();
        assert_eq!(
            decode_body(Kind::PutEntries as u8, 0, &gap),
            Err(BodyError::NotConsecutive)
        );
        assert_eq!(
            decode_body(Kind::Entries as u8, 0, &b[..b.len() - 1]),
            Err(BodyError::Truncated)
        );
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_body(Kind::Entries as u8, 0, &huge),
            Err(BodyError::Truncated)
        );
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 9,
            ..Default::default()
        };
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 9;
        snap.mut_metadata().term = 3;
        snap.data = b"state".to_vec().into();
        let body = encode_apply_snapshot(&hs, &encode_pb(&snap).unwrap()).unwrap();
        assert_eq!(
            decode_body(Kind::ApplySnapshot as u8, 0, &body),
            Ok(Record::ApplySnapshot { hs, snapshot: snap })
        );
        assert_eq!(decode_body(99, 0, &[]), Err(BodyError::UnknownKind(99)));
        assert_eq!(
            decode_body(Kind::RemoveGroup as u8, 1, &[]),
            Err(BodyError::Flags(1))
        );
        assert_eq!(
            decode_body(Kind::RemoveGroup as u8, 0, &[0]),
            Err(BodyError::Trailing(1))
        );
        assert_eq!(
            decode_body(Kind::Compact as u8, 0, &encode_compact(0, 0)),
            Err(BodyError::CompactZero)
        );
        assert_eq!(
            decode_body(Kind::Compact as u8, 0, &encode_compact(u64::MAX, 0)),
            Err(BodyError::IndexOutOfRange(u64::MAX))
        );
        let (far, _) = encode_entries(&[e(u64::MAX, 1)]).unwrap();
        assert_eq!(
            decode_body(Kind::Entries as u8, 0, &far),
            Err(BodyError::IndexOutOfRange(u64::MAX))
        );
    }
}
