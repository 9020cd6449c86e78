//! The head-node ↔ sled-controller wire protocol, version 3.
//!
//! Every frame is a fixed 32-byte little-endian header, a control part (a postcard-encoded
//! [`Request`] or [`Response`]) and a raw data part (block payloads are never serialized: they are
//! read straight into an aligned buffer):
//!
//! ```text
//! offset size field
//!      0    4 magic     0x53_4B_54_53 ("STKS" little-endian)
//!      4    2 version   frame layout version (FRAME_VERSION, 1 so far)
//!      6    2 kind      1 = request, 2 = response
//!      8    8 tag       chosen by the requester, echoed in the response
//!     16    4 ctl_len   length of the control part (≤ max_ctl_len(kind))
//!     20    4 data_len  length of the data part (≤ MAX_DATA_LEN)
//!     24    4 crc       CRC-32 (IEEE) of header-with-crc-zeroed ‖ control ‖ data
//!     28    4 reserved  must be zero
//! ```
//!
//! Requests are tagged, so many can be in flight on one connection and responses may come back in
//! any order. As in NBD, requests in flight together are not ordered with respect to each other:
//! a requester that needs one applied before another (a write after a free, a claim or a retire
//! of its volume; two overlapping writes) waits for the first one's response before sending the
//! second. A flush covers every cached write whose response came before the flush was sent. A
//! frame that is too large, malformed or fails its checksum is answered with an error and the
//! connection is closed.
//!
//! Versions: the frame layout has its own version ([`FRAME_VERSION`], in every header); the
//! message set is negotiated at hello (the highest version both sides speak, between
//! [`MIN_PROTOCOL_VERSION`] and [`PROTOCOL_VERSION`]). Version 2 added [`Request::WriteCached`]
//! and made [`Request::Flush`] mean something; a client talking to a version 1 sled sends
//! durable writes instead (see `SledClient::write_cached`). Version 3 added [`Request::Retire`].
//!
//! Postcard encodes enum variants by their position: variants of [`Request`], [`Response`] and
//! [`ErrorCode`] are append-only. The golden-bytes tests below pin the encoding.

use crate::cred::{Credential, HandshakeProof};
use crate::ids::{ChunkIndex, DeviceId, Epoch, NodeId, SledId, VolumeId};
use crate::{AlignedBuf, aligned};
use serde::{Deserialize, Serialize};
use std::fmt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frame magic.
pub const MAGIC: u32 = u32::from_le_bytes(*b"STKS");
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
/// The first version with [`Request::WriteCached`] (and a `Flush` that does something).
pub const CACHED_WRITES_VERSION: u16 = 2;
/// The first version with [`Request::Retire`].
pub const RETIRE_VERSION: u16 = 3;
/// The oldest protocol version this build accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// The layout of frames (the header below), independent of the message set.
pub const FRAME_VERSION: u16 = 1;
/// Header length.
pub const HEADER_LEN: usize = 32;
/// Largest control part of a request.
pub const MAX_CTL_LEN: u32 = 64 * 1024;
/// Largest control part of a response. A volume's chunk list (`VolumeStat`) is the big one: the
/// largest volume (64 TiB) in the default 64 MiB chunks is 1 Mi chunk indexes of at most 3
/// bytes each (postcard varints), 3 MiB. Only authenticated sleds send responses, and a sled
/// refuses a response-kind frame before reading its body.
pub const MAX_RESPONSE_CTL_LEN: u32 = 8 * 1024 * 1024;

/// The largest control part of a frame of `kind`.
pub const fn max_ctl_len(kind: u16) -> u32 {
    if kind == KIND_RESPONSE {
        MAX_RESPONSE_CTL_LEN
    } else {
        MAX_CTL_LEN
    }
}
/// Largest data part (and the largest single read or write).
pub const MAX_DATA_LEN: u32 = 32 * 1024 * 1024;

/// Frame kind: request.
pub const KIND_REQUEST: u16 = 1;
/// Frame kind: response.
pub const KIND_RESPONSE: u16 = 2;

/// Errors reading or decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// Not a Stockade frame.
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    /// A version this build does not speak.
    #[error("unsupported frame version {got} (this build reads {min}..={max})")]
    Version {
        /// What the peer sent.
        got: u16,
        /// Oldest supported.
        min: u16,
        /// Newest supported.
        max: u16,
    },
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    Kind(u16),
    /// A length beyond the protocol maximum.
    #[error("{what} length {len} exceeds the maximum {max}")]
    TooLarge {
        /// Which part.
        what: &'static str,
        /// Its length.
        len: u32,
        /// The maximum.
        max: u32,
    },
    /// Reserved header bits set.
    #[error("reserved header field is {0:#x}, must be zero")]
    Reserved(u32),
    /// The frame checksum does not match.
    #[error("frame checksum mismatch: header says {expected:#010x}, computed {actual:#010x}")]
    Checksum {
        /// From the header.
        expected: u32,
        /// Computed.
        actual: u32,
    },
    /// The control part does not decode.
    #[error("malformed control message: {0}")]
    Decode(#[from] postcard::Error),
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame layout version ([`FRAME_VERSION`]).
    pub version: u16,
    /// [`KIND_REQUEST`] or [`KIND_RESPONSE`].
    pub kind: u16,
    /// Request tag.
    pub tag: u64,
    /// Control part length.
    pub ctl_len: u32,
    /// Data part length.
    pub data_len: u32,
    /// Checksum.
    pub crc: u32,
}

impl FrameHeader {
    /// Encodes the header with the given crc.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..20].copy_from_slice(&self.ctl_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.data_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header (lengths bounded, magic, version, reserved bits).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, ProtoError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        let version = u16_at(4);
        if version != FRAME_VERSION {
            return Err(ProtoError::Version {
                got: version,
                min: FRAME_VERSION,
                max: FRAME_VERSION,
            });
        }
        let kind = u16_at(6);
        if kind != KIND_REQUEST && kind != KIND_RESPONSE {
            return Err(ProtoError::Kind(kind));
        }
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&b[8..16]);
        let ctl_len = u32_at(16);
        let data_len = u32_at(20);
        if ctl_len > max_ctl_len(kind) {
            return Err(ProtoError::TooLarge {
                what: "control",
                len: ctl_len,
                max: max_ctl_len(kind),
            });
        }
        if data_len > MAX_DATA_LEN {
            return Err(ProtoError::TooLarge {
                what: "data",
                len: data_len,
                max: MAX_DATA_LEN,
            });
        }
        let reserved = u32_at(28);
        if reserved != 0 {
            return Err(ProtoError::Reserved(reserved));
        }
        Ok(Self {
            version,
            kind,
            tag: u64::from_le_bytes(tag),
            ctl_len,
            data_len,
            crc: u32_at(24),
        })
    }
}

/// The checksum of a frame: header with the crc field zeroed, then control, then data.
pub fn frame_crc(header: &FrameHeader, ctl: &[u8], data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&FrameHeader { crc: 0, ..*header }.encode());
    h.update(ctl);
    h.update(data);
    h.finalize()
}

/// A received frame.
#[derive(Debug)]
pub struct Frame {
    /// Its header.
    pub header: FrameHeader,
    /// The control bytes.
    pub ctl: Vec<u8>,
    /// The data bytes, in an aligned buffer.
    pub data: AlignedBuf,
}

impl Frame {
    /// Decodes the control part as `T`, rejecting trailing bytes.
    pub fn decode<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtoError> {
        let (v, rest) = postcard::take_from_bytes::<T>(&self.ctl)?;
        if !rest.is_empty() {
            return Err(ProtoError::Decode(postcard::Error::DeserializeBadEncoding));
        }
        Ok(v)
    }
}

/// Reads one frame: validates the header before allocating, reads the payload into an aligned
/// buffer and verifies the checksum. `Err(Closed)` when the peer closed cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtoError> {
    let header = read_header(r).await?;
    read_body(r, header).await
}

/// Reads one handshake frame (`Hello`, `Challenge`, `Auth`, `Welcome`): control part only. A
/// frame that announces data is refused before anything is allocated, so a peer that has not
/// proved the cluster key cannot make the other side reserve a data-sized buffer.
pub async fn read_handshake_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtoError> {
    let header = read_header(r).await?;
    if header.data_len != 0 {
        return Err(ProtoError::TooLarge {
            what: "handshake data",
            len: header.data_len,
            max: 0,
        });
    }
    read_body(r, header).await
}

/// Reads and validates a frame header (lengths bounded before anything is allocated).
/// `Err(Closed)` when the peer closed cleanly before the first byte.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<FrameHeader, ProtoError> {
    let mut hb = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut hb[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                ProtoError::Closed
            } else {
                ProtoError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        got += n;
    }
    FrameHeader::decode(&hb)
}

/// Reads the control and data parts of a frame whose header was read, and verifies the checksum.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    header: FrameHeader,
) -> Result<Frame, ProtoError> {
    read_body_with(r, header, AlignedBuf::zeroed).await
}

/// [`read_body`], taking the data buffer from `alloc` (given the data length; e.g. a
/// [`BufPool`](crate::aligned::BufPool) whose region a ring has registered).
pub async fn read_body_with<R: AsyncRead + Unpin>(
    r: &mut R,
    header: FrameHeader,
    alloc: impl FnOnce(usize) -> AlignedBuf,
) -> Result<Frame, ProtoError> {
    let mut ctl = vec![0u8; header.ctl_len as usize];
    r.read_exact(&mut ctl).await?;
    let mut data = alloc(header.data_len as usize);
    r.read_exact(&mut data).await?;
    let actual = frame_crc(&header, &ctl, &data);
    if actual != header.crc {
        return Err(ProtoError::Checksum {
            expected: header.crc,
            actual,
        });
    }
    Ok(Frame { header, ctl, data })
}

/// Encodes a control message and the header for a frame carrying `data`.
pub fn encode_frame<T: Serialize>(
    kind: u16,
    tag: u64,
    msg: &T,
    data: &[u8],
) -> Result<(Vec<u8>, usize), ProtoError> {
    let ctl = postcard::to_stdvec(msg)?;
    // Never send what the other end must refuse (it would close the connection).
    let ctl_len = u32::try_from(ctl.len())
        .ok()
        .filter(|l| *l <= max_ctl_len(kind))
        .ok_or(ProtoError::TooLarge {
            what: "control",
            len: u32::try_from(ctl.len()).unwrap_or(u32::MAX),
            max: max_ctl_len(kind),
        })?;
    let data_len = u32::try_from(data.len())
        .ok()
        .filter(|l| *l <= MAX_DATA_LEN)
        .ok_or(ProtoError::TooLarge {
            what: "data",
            len: u32::try_from(data.len()).unwrap_or(u32::MAX),
            max: MAX_DATA_LEN,
        })?;
    let mut header = FrameHeader {
        version: FRAME_VERSION,
        kind,
        tag,
        ctl_len,
        data_len,
        crc: 0,
    };
    header.crc = frame_crc(&header, &ctl, data);
    let mut out = Vec::with_capacity(HEADER_LEN + ctl.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&ctl);
    let ctl_end = out.len();
    Ok((out, ctl_end))
}

/// Writes one frame (header, control, data). Does not flush.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    kind: u16,
    tag: u64,
    msg: &T,
    data: &[u8],
) -> Result<(), ProtoError> {
    let (head, _) = encode_frame(kind, tag, msg, data)?;
    w.write_all(&head).await?;
    if !data.is_empty() {
        w.write_all(data).await?;
    }
    Ok(())
}

/// A request from a head node to a sled controller. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First message on a connection: versions spoken and the client's nonce.
    Hello {
        /// Oldest protocol version the client speaks.
        min_version: u16,
        /// Newest protocol version the client speaks.
        max_version: u16,
        /// The head node connecting.
        node: NodeId,
        /// Fresh random nonce.
        nonce: [u8; 32],
    },
    /// Second message: the client's proof of the cluster key over both nonces.
    Auth {
        /// `HMAC(key, client role, client nonce, server nonce)`.
        proof: HandshakeProof,
    },
    /// Read `len` bytes at `offset` within a chunk. Unallocated chunks read as zeros.
    Read {
        /// Volume.
        volume: VolumeId,
        /// Chunk within the volume.
        chunk: ChunkIndex,
        /// Byte offset within the chunk (4 KiB aligned).
        offset: u64,
        /// Length (4 KiB aligned, ≤ [`MAX_DATA_LEN`]).
        len: u32,
    },
    /// Write the frame's data at `offset` within a chunk (allocating it on first write).
    Write {
        /// Fencing credential of the writer; names the volume.
        cred: Credential,
        /// Chunk within the volume.
        chunk: ChunkIndex,
        /// Byte offset within the chunk (4 KiB aligned).
        offset: u64,
    },
    /// Make a range read as zeros.
    WriteZeroes {
        /// Fencing credential.
        cred: Credential,
        /// Chunk.
        chunk: ChunkIndex,
        /// Offset within the chunk (4 KiB aligned).
        offset: u64,
        /// Length (4 KiB aligned).
        len: u64,
    },
    /// Discard a range: it reads as zeros afterwards and its space may be reclaimed.
    Trim {
        /// Fencing credential.
        cred: Credential,
        /// Chunk.
        chunk: ChunkIndex,
        /// Offset within the chunk (4 KiB aligned).
        offset: u64,
        /// Length (4 KiB aligned).
        len: u64,
    },
    /// Allocate a chunk ahead of its first write.
    Allocate {
        /// Fencing credential.
        cred: Credential,
        /// Chunk.
        chunk: ChunkIndex,
    },
    /// Free a chunk; it reads as zeros afterwards.
    Free {
        /// Fencing credential.
        cred: Credential,
        /// Chunk.
        chunk: ChunkIndex,
    },
    /// Raise the volume's fencing record to the credential's `{epoch, holder}`.
    Claim {
        /// The new credential.
        cred: Credential,
    },
    /// Make durable every [`Request::WriteCached`] acknowledged before this request was sent, on
    /// every device of the sled (other writes are durable when acknowledged). Answered `Ok` once
    /// they are.
    Flush,
    /// Sled-wide statistics.
    Stat,
    /// What this sled holds of one volume.
    VolumeStat {
        /// The volume.
        volume: VolumeId,
    },
    /// End every other connection of this head node to this sled: they stop reading, what
    /// they already read runs and is answered, then this is answered `Ok`. Nothing the head
    /// node sent on an older connection can run after anything it sends on this one after the
    /// answer — the barrier a head node needs before trusting a sled it had given up on (its
    /// timed-out requests may still sit in the old connection's socket buffer).
    Supersede,
    /// Like [`Request::Write`] (fenced the same way), but acknowledged once the device holds the
    /// data, before it is durable: a later [`Request::Flush`] makes it durable. For head nodes'
    /// write-back, whose Raft log keeps the data durable until they flush the sleds. Since
    /// protocol version [`CACHED_WRITES_VERSION`].
    WriteCached {
        /// Fencing credential of the writer; names the volume.
        cred: Credential,
        /// Chunk within the volume.
        chunk: ChunkIndex,
        /// Byte offset within the chunk (4 KiB aligned).
        offset: u64,
    },
    /// The volume is gone (deleted): replace its fencing record on every device by a tombstone
    /// that no claim, write or free can pass, and whose place in the fence table a new volume
    /// may take when the table is full. Refused unless the credential holds the current claim
    /// and the volume holds no chunk here any more. Since protocol version [`RETIRE_VERSION`].
    Retire {
        /// The current holder's credential.
        cred: Credential,
    },
}

impl Request {
    /// Short name for logs and metric labels.
    pub fn op_name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Auth { .. } => "auth",
            Request::Read { .. } => "read",
            Request::Write { .. } => "write",
            Request::WriteZeroes { .. } => "write_zeroes",
            Request::Trim { .. } => "trim",
            Request::Allocate { .. } => "allocate",
            Request::Free { .. } => "free",
            Request::Claim { .. } => "claim",
            Request::Flush => "flush",
            Request::Stat => "stat",
            Request::VolumeStat { .. } => "volume_stat",
            Request::Supersede => "supersede",
            Request::WriteCached { .. } => "write_cached",
            Request::Retire { .. } => "retire",
        }
    }
}

/// A response from a sled controller. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to `Hello`: the chosen version, the server's nonce and its proof of the key.
    Challenge {
        /// Version both sides will speak.
        version: u16,
        /// This sled.
        sled: SledId,
        /// Fresh random nonce.
        nonce: [u8; 32],
        /// `HMAC(key, server role, server nonce, client nonce)`.
        proof: HandshakeProof,
    },
    /// The connection is authenticated.
    AuthOk,
    /// The request succeeded.
    Ok,
    /// Read data follows in the data part.
    Data,
    /// The claim is durable and every older write has completed.
    Claimed {
        /// The stored epoch.
        epoch: Epoch,
        /// The stored holder.
        holder: NodeId,
    },
    /// Sled statistics.
    Stat(SledStat),
    /// Volume statistics.
    VolumeStat(VolumeStat),
    /// The request failed.
    Error(WireError),
}

/// Stable error codes on the wire. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The frame or message could not be decoded.
    Malformed,
    /// A length beyond a protocol or device limit.
    TooLarge,
    /// No common protocol version.
    Version,
    /// A request other than Hello/Auth before authentication.
    NotAuthenticated,
    /// The peer could not prove knowledge of the cluster key.
    AuthFailed,
    /// A credential whose MAC does not verify, or that names another volume.
    BadCredential,
    /// The volume has been claimed with a higher epoch (or the same epoch by another holder).
    Fenced,
    /// Offset or length outside the chunk.
    OutOfRange,
    /// Offset or length not 4 KiB aligned.
    Unaligned,
    /// No free chunk on any device.
    NoSpace,
    /// Stored data fails its checksum.
    Checksum,
    /// The device returned an I/O error.
    Io,
    /// The sled is shutting down.
    ShuttingDown,
    /// The credential's epoch is above the volume's durable claim: claim first.
    NotClaimed,
    /// The fence table of a device is full.
    FenceTableFull,
    /// The volume still holds chunks (a retire before every chunk was freed).
    NotEmpty,
}

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// For `Fenced`: the epoch and holder now stored, which the caller could not see.
    pub current: Option<(Epoch, NodeId)>,
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)?;
        if let Some((e, h)) = self.current {
            write!(f, " (stored epoch {e}, holder {h})")?;
        }
        Ok(())
    }
}

/// Sled-wide statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SledStat {
    /// The sled.
    pub sled: SledId,
    /// Its devices.
    pub devices: Vec<DeviceStat>,
}

/// One device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStat {
    /// Device id.
    pub device: DeviceId,
    /// Path it was opened from.
    pub path: String,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Chunks in total.
    pub chunks_total: u64,
    /// Chunks allocated.
    pub chunks_used: u64,
}

/// What a sled holds of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStat {
    /// Stored fencing record, if the volume was ever claimed here.
    pub fence: Option<(Epoch, NodeId)>,
    /// Allocated chunks, ascending.
    pub chunks: Vec<ChunkIndex>,
}

/// Checks 4 KiB alignment of an offset and length.
pub fn check_aligned(offset: u64, len: u64) -> bool {
    aligned::is_aligned(offset) && aligned::is_aligned(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_cred() -> Credential {
        Credential {
            volume: VolumeId(0x11),
            epoch: Epoch(3),
            holder: NodeId(2),
            mac: [0xaa; 32],
        }
    }

    #[test]
    fn header_round_trip_and_golden_bytes() {
        let h = FrameHeader {
            version: 1,
            kind: KIND_REQUEST,
            tag: 0x0102_0304_0506_0708,
            ctl_len: 5,
            data_len: 4096,
            crc: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(
            b,
            [
                b'S', b'T', b'K', b'S', 1, 0, 1, 0, 8, 7, 6, 5, 4, 3, 2, 1, 5, 0, 0, 0, 0, 16, 0,
                0, 0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0
            ]
        );
        assert_eq!(FrameHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn golden_message_bytes() {
        // Pin postcard's encoding of a few messages: changing these bytes breaks compatibility
        // with sleds and head nodes of the previous release.
        let read = Request::Read {
            volume: VolumeId(1),
            chunk: ChunkIndex(2),
            offset: 4096,
            len: 8192,
        };
        assert_eq!(
            postcard::to_stdvec(&read).unwrap(),
            // variant 2, then varints: volume 1, chunk 2, offset 4096, len 8192
            [2, 1, 2, 0x80, 0x20, 0x80, 0x40]
        );
        assert_eq!(postcard::to_stdvec(&Request::Flush).unwrap(), [9]);
        assert_eq!(postcard::to_stdvec(&Request::Supersede).unwrap(), [12]);
        // Appended in version 2: after every variant of version 1.
        let wc = postcard::to_stdvec(&Request::WriteCached {
            cred: Credential {
                volume: VolumeId(1),
                epoch: Epoch(2),
                holder: NodeId(3),
                mac: [0; 32],
            },
            chunk: ChunkIndex(4),
            offset: 4096,
        })
        .unwrap();
        assert_eq!(&wc[..4], [13, 1, 2, 3]);
        assert_eq!(&wc[wc.len() - 3..], [4, 0x80, 0x20]);
        let err = Response::Error(WireError {
            code: ErrorCode::Fenced,
            message: "x".into(),
            current: Some((Epoch(7), NodeId(1))),
        });
        assert_eq!(postcard::to_stdvec(&err).unwrap(), [7, 6, 1, b'x', 1, 7, 1]);
    }

    /// The chunk list of the largest volume fits in a response; nothing too large for the
    /// other end to read is ever encoded.
    #[test]
    fn a_large_volume_stat_fits_and_oversized_frames_are_not_encoded() {
        let chunks = (64u64 << 40) / (64 << 20);
        let stat = Response::VolumeStat(VolumeStat {
            fence: Some((Epoch(7), NodeId(1))),
            chunks: (0..chunks).map(ChunkIndex).collect(),
        });
        let (head, _) = encode_frame(KIND_RESPONSE, 9, &stat, &[]).expect("fits");
        let h = FrameHeader::decode(head[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert!(h.ctl_len > MAX_CTL_LEN && h.ctl_len <= MAX_RESPONSE_CTL_LEN);
        assert!(matches!(
            encode_frame(KIND_REQUEST, 9, &stat, &[]),
            Err(ProtoError::TooLarge {
                what: "control",
                ..
            })
        ));
    }

    #[test]
    fn header_rejects_bad_fields() {
        let good = FrameHeader {
            version: 1,
            kind: KIND_RESPONSE,
            tag: 1,
            ctl_len: 1,
            data_len: 0,
            crc: 0,
        }
        .encode();
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtoError::BadMagic(_))
        ));
        let mut b = good;
        b[4] = 9;
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtoError::Version { .. })
        ));
        let mut b = good;
        b[6] = 3;
        assert!(matches!(FrameHeader::decode(&b), Err(ProtoError::Kind(3))));
        let mut b = good;
        b[20..24].copy_from_slice(&(MAX_DATA_LEN + 1).to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtoError::TooLarge { .. })
        ));
        // Control parts: 64 KiB in a request, more in a response (a volume's chunk list).
        let mut b = good;
        b[16..20].copy_from_slice(&(MAX_RESPONSE_CTL_LEN + 1).to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtoError::TooLarge { .. })
        ));
        let mut b = good;
        b[16..20].copy_from_slice(&(MAX_CTL_LEN + 1).to_le_bytes());
        assert!(FrameHeader::decode(&b).is_ok());
        b[6..8].copy_from_slice(&KIND_REQUEST.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtoError::TooLarge { .. })
        ));
        let mut b = good;
        b[31] = 1;
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(ProtoError::Reserved(_))
        ));
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn frame_round_trip_and_checksum() {
        rt().block_on(async {
            let msg = Request::Write {
                cred: sample_cred(),
                chunk: ChunkIndex(9),
                offset: 8192,
            };
            let data = vec![0x5a; 4096];
            let mut wire = Vec::new();
            write_frame(&mut wire, KIND_REQUEST, 42, &msg, &data)
                .await
                .unwrap();
            let f = read_frame(&mut &wire[..]).await.unwrap();
            assert_eq!(f.header.tag, 42);
            assert_eq!(f.decode::<Request>().unwrap(), msg);
            assert_eq!(&f.data[..], &data[..]);
            // Flip one data bit: the checksum catches it.
            let last = wire.len() - 1;
            wire[last] ^= 1;
            assert!(matches!(
                read_frame(&mut &wire[..]).await,
                Err(ProtoError::Checksum { .. })
            ));
            // Truncated frame: an error, not a hang or panic.
            assert!(read_frame(&mut &wire[..40]).await.is_err());
            assert!(matches!(
                read_frame(&mut &wire[..0]).await,
                Err(ProtoError::Closed)
            ));
        });
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let r = rt();
            r.block_on(async {
                if let Ok(f) = read_frame(&mut &bytes[..]).await {
                    let _ = f.decode::<Request>();
                    let _ = f.decode::<Response>();
                }
            });
            let _ = postcard::from_bytes::<Request>(&bytes);
            let _ = postcard::from_bytes::<Response>(&bytes);
        }

        #[test]
        fn valid_header_with_garbage_control_is_an_error(
            ctl in proptest::collection::vec(any::<u8>(), 0..64), tag in any::<u64>()
        ) {
            let mut h = FrameHeader { version: 1, kind: KIND_REQUEST, tag, ctl_len: ctl.len() as u32, data_len: 0, crc: 0 };
            h.crc = frame_crc(&h, &ctl, &[]);
            let mut wire = h.encode().to_vec();
            wire.extend_from_slice(&ctl);
            let f = rt().block_on(read_frame(&mut &wire[..])).unwrap();
            // Decoding may succeed (the bytes happen to be a message) or fail; it never panics.
            let _ = f.decode::<Request>();
        }
    }
}
