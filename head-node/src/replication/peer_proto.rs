//! The head-node ↔ head-node wire protocol ("peer protocol"), version 1.
//!
//! One authenticated TCP connection per pair of head nodes carries Raft messages of many groups
//! (batched) and tagged request/response RPCs. The framing follows [`common::sled_proto`]: a
//! fixed 32-byte little-endian header, a control part and a raw data part, one CRC over all:
//!
//! ```text
//! offset size field
//!      0    4 magic     0x50_4B_54_53 ("STKP" little-endian)
//!      4    2 version   protocol version of this frame
//!      6    2 kind      see `Kind` (hello, challenge, auth, auth_ok, refused, raft, request,
//!                       response, rpc_error, ping)
//!      8    8 tag       RPC tag chosen by the caller, echoed in its response; 0 otherwise
//!     16    4 ctl_len   length of the control part (bounded per kind)
//!     20    4 data_len  length of the data part (bounded per kind)
//!     24    4 crc       CRC-32 (IEEE) of header-with-crc-zeroed ‖ control ‖ data
//!     28    4 reserved  must be zero
//! ```
//!
//! Every bound is checked on the header, **before** anything is allocated, and depends on the
//! kind: handshake frames carry at most [`HANDSHAKE_MAX_CTL_LEN`] control bytes and no data, so an
//! unauthenticated peer cannot make a node allocate more than that.
//!
//! | kind | control part | data part |
//! |---|---|---|
//! | `Hello` (1) | postcard [`Hello`] | — |
//! | `Challenge` (2) | postcard [`Challenge`] | — |
//! | `Auth` (3) | postcard [`Auth`] | — |
//! | `AuthOk` (4) | — | — |
//! | `Refused` (5) | postcard [`Refusal`] | — |
//! | `Raft` (6) | postcard [`RaftBatch`]: `(group, len)` of each message | the messages' protobuf encodings, concatenated |
//! | `Request` (7) | the RPC's control bytes (opaque) | the RPC's data (opaque) |
//! | `Response` (8) | the reply's control bytes (opaque) | the reply's data (opaque) |
//! | `RpcError` (9) | postcard [`Refusal`] (the transport, not the handler, refused the call) | — |
//! | `Ping` (10) | — | — |
//!
//! **Handshake** (the dialer is the node with the lower id, role `Client`):
//! `Hello{from, to, nonce_c}` → `Challenge{node, nonce_s, proof_s}` → `Auth{proof_c}` →
//! `AuthOk` (or `Refused` at any step, then close). Proofs are
//! [`ClusterKey::handshake_proof`] (HMAC-SHA256, role-bound) over both nonces, each first bound
//! to the transcript — both node ids and the negotiated version — with a MAC under its own domain
//! ([`Transcript::proof`]), so a proof of the sled protocol is never valid here and a relayed
//! handshake cannot change whom a node believes it is talking to.
//!
//! Postcard encodes enum variants by position: [`RefuseCode`] and the kinds are append-only. The
//! golden-bytes tests pin the encoding.
//!
//! ```
//! use head_node::replication::peer_proto::{Kind, encode_frame_head, read_frame};
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let data = b"payload";
//! let mut wire = encode_frame_head(Kind::Request, 7, b"ctl", &[&data[..]]).unwrap();
//! wire.extend_from_slice(data);
//! let frame = read_frame(&mut &wire[..]).await.unwrap();
//! assert_eq!((frame.header.kind, frame.header.tag), (Kind::Request, 7));
//! assert_eq!((&frame.ctl[..], &frame.data[..]), (&b"ctl"[..], &data[..]));
//! # });
//! ```

use crate::replication::GroupId;
use common::AlignedBuf;
use common::cred::{ClusterKey, HandshakeProof, HandshakeRole};
use common::ids::NodeId;
use raft::prelude::Message;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Frame magic.
pub const MAGIC: u32 = u32::from_le_bytes(*b"STKP");
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this build accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Header length.
pub const HEADER_LEN: usize = 32;
/// Largest control part of an RPC or Raft frame.
pub const MAX_CTL_LEN: u32 = 64 * 1024;
/// Largest data part (a Raft batch or an RPC payload).
pub const MAX_DATA_LEN: u32 = 64 * 1024 * 1024;
/// Largest control part of a handshake frame (hello, challenge, auth, refused).
pub const HANDSHAKE_MAX_CTL_LEN: u32 = 512;
/// Most messages in one Raft batch frame.
pub const MAX_BATCH_MESSAGES: usize = 2048;

/// Errors reading or decoding frames and messages.
#[derive(Debug, thiserror::Error)]
pub enum PeerProtoError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    /// Not a peer-protocol frame.
    #[error("bad frame magic {0:#010x}")]
    BadMagic(u32),
    /// A version this build does not speak.
    #[error("unsupported protocol version {got} (this build speaks {min}..={max})")]
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
    /// A length beyond the bound for this kind of frame.
    #[error("{what} length {len} exceeds the maximum {max} for a {kind:?} frame")]
    TooLarge {
        /// The frame kind.
        kind: Kind,
        /// Which part.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The maximum.
        max: u64,
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
    #[error("malformed control part: {0}")]
    Decode(#[from] postcard::Error),
    /// A Raft batch whose index does not describe its data part.
    #[error(
        "raft batch index covers {indexed} bytes in {count} messages, data part has {data_len}"
    )]
    BatchMismatch {
        /// Messages in the index.
        count: usize,
        /// Bytes the index covers.
        indexed: u64,
        /// Bytes in the data part.
        data_len: u64,
    },
    /// A frame kind that is not allowed at this point of the conversation.
    #[error("unexpected {got:?} frame, expected {expected}")]
    Unexpected {
        /// What arrived.
        got: Kind,
        /// What was allowed.
        expected: &'static str,
    },
}

/// Why one Raft message could not be encoded or decoded (the rest of its batch is unaffected).
#[derive(Debug, thiserror::Error)]
pub enum RaftCodecError {
    /// The bytes do not have the shape of an `eraftpb.Message` (checked before protobuf sees
    /// them).
    #[error("not an eraftpb message: {0}")]
    Shape(&'static str),
    /// The protobuf codec refused the bytes (or the message, when encoding).
    #[error("protobuf: {0}")]
    Protobuf(#[from] protobuf::ProtobufError),
    /// The protobuf decoder panicked; the panic was contained.
    #[error("the protobuf decoder panicked")]
    Panicked,
}

/// Frame kinds. Append-only; numbering is part of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// Dialer → acceptor: first frame.
    Hello = 1,
    /// Acceptor → dialer: nonce and proof.
    Challenge = 2,
    /// Dialer → acceptor: proof.
    Auth = 3,
    /// Acceptor → dialer: authenticated.
    AuthOk = 4,
    /// Either side during the handshake: refused, the connection closes.
    Refused = 5,
    /// A batch of Raft messages.
    Raft = 6,
    /// An RPC request.
    Request = 7,
    /// The handler's reply to a request.
    Response = 8,
    /// The transport refused a request (no handler, busy, too large).
    RpcError = 9,
    /// Keepalive.
    Ping = 10,
}

impl Kind {
    /// The kind with this wire number.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Challenge,
            3 => Kind::Auth,
            4 => Kind::AuthOk,
            5 => Kind::Refused,
            6 => Kind::Raft,
            7 => Kind::Request,
            8 => Kind::Response,
            9 => Kind::RpcError,
            10 => Kind::Ping,
            _ => return None,
        })
    }

    /// True for the frames of the handshake.
    pub fn is_handshake(self) -> bool {
        matches!(
            self,
            Kind::Hello | Kind::Challenge | Kind::Auth | Kind::AuthOk | Kind::Refused
        )
    }

    /// Largest control and data parts of a frame of this kind.
    pub fn limits(self) -> (u32, u32) {
        match self {
            Kind::Hello | Kind::Challenge | Kind::Auth | Kind::Refused => {
                (HANDSHAKE_MAX_CTL_LEN, 0)
            }
            Kind::AuthOk | Kind::Ping => (0, 0),
            Kind::RpcError => (HANDSHAKE_MAX_CTL_LEN, 0),
            Kind::Raft | Kind::Request | Kind::Response => (MAX_CTL_LEN, MAX_DATA_LEN),
        }
    }

    /// Name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Challenge => "challenge",
            Kind::Auth => "auth",
            Kind::AuthOk => "auth_ok",
            Kind::Refused => "refused",
            Kind::Raft => "raft",
            Kind::Request => "request",
            Kind::Response => "response",
            Kind::RpcError => "rpc_error",
            Kind::Ping => "ping",
        }
    }
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Protocol version.
    pub version: u16,
    /// Frame kind.
    pub kind: Kind,
    /// RPC tag.
    pub tag: u64,
    /// Control part length.
    pub ctl_len: u32,
    /// Data part length.
    pub data_len: u32,
    /// Checksum.
    pub crc: u32,
}

impl FrameHeader {
    /// Encodes the header with its crc field as stored.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..20].copy_from_slice(&self.ctl_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.data_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header: magic, version, kind, the kind's length bounds, reserved
    /// bits.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, PeerProtoError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(PeerProtoError::BadMagic(magic));
        }
        let version = u16_at(4);
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(PeerProtoError::Version {
                got: version,
                min: MIN_PROTOCOL_VERSION,
                max: PROTOCOL_VERSION,
            });
        }
        let kind = Kind::from_u16(u16_at(6)).ok_or(PeerProtoError::Kind(u16_at(6)))?;
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&b[8..16]);
        let (ctl_len, data_len) = (u32_at(16), u32_at(20));
        check_lengths(kind, ctl_len as u64, data_len as u64)?;
        let reserved = u32_at(28);
        if reserved != 0 {
            return Err(PeerProtoError::Reserved(reserved));
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

fn check_lengths(kind: Kind, ctl: u64, data: u64) -> Result<(), PeerProtoError> {
    let (max_ctl, max_data) = kind.limits();
    if ctl > max_ctl as u64 {
        return Err(PeerProtoError::TooLarge {
            kind,
            what: "control",
            len: ctl,
            max: max_ctl as u64,
        });
    }
    if data > max_data as u64 {
        return Err(PeerProtoError::TooLarge {
            kind,
            what: "data",
            len: data,
            max: max_data as u64,
        });
    }
    Ok(())
}

/// The checksum of a frame: header with the crc field zeroed, control, then each data piece.
pub fn frame_crc(header: &FrameHeader, ctl: &[u8], data: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&FrameHeader { crc: 0, ..*header }.encode());
    h.update(ctl);
    for d in data {
        h.update(d);
    }
    h.finalize()
}

/// Encodes the header and control part of a frame whose data part is the concatenation of
/// `data` (written separately by the caller, so payloads are never copied). Checks the kind's
/// bounds.
pub fn encode_frame_head(
    kind: Kind,
    tag: u64,
    ctl: &[u8],
    data: &[&[u8]],
) -> Result<Vec<u8>, PeerProtoError> {
    let data_len: u64 = data.iter().map(|d| d.len() as u64).sum();
    check_lengths(kind, ctl.len() as u64, data_len)?;
    let mut header = FrameHeader {
        version: PROTOCOL_VERSION,
        kind,
        tag,
        ctl_len: ctl.len() as u32,
        data_len: data_len as u32,
        crc: 0,
    };
    header.crc = frame_crc(&header, ctl, data);
    let mut out = Vec::with_capacity(HEADER_LEN + ctl.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(ctl);
    Ok(out)
}

/// Encodes a whole frame without data whose control part is the postcard encoding of `msg`.
pub fn encode_message<T: Serialize>(
    kind: Kind,
    tag: u64,
    msg: &T,
) -> Result<Vec<u8>, PeerProtoError> {
    encode_frame_head(kind, tag, &postcard::to_stdvec(msg)?, &[])
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
    pub fn decode<T: for<'de> Deserialize<'de>>(&self) -> Result<T, PeerProtoError> {
        decode_exact(&self.ctl)
    }

    /// The Raft batch of a [`Kind::Raft`] frame: each message's group and bytes, checked against
    /// the data part.
    pub fn raft_batch(&self) -> Result<Vec<(GroupId, &[u8])>, PeerProtoError> {
        if self.header.kind != Kind::Raft {
            return Err(PeerProtoError::Unexpected {
                got: self.header.kind,
                expected: "raft",
            });
        }
        let index: RaftBatch = self.decode()?;
        split_batch(&index, &self.data)
    }
}

fn decode_exact<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, PeerProtoError> {
    let (v, rest) = postcard::take_from_bytes::<T>(b)?;
    if !rest.is_empty() {
        return Err(PeerProtoError::Decode(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(v)
}

fn split_batch<'a>(
    index: &RaftBatch,
    data: &'a [u8],
) -> Result<Vec<(GroupId, &'a [u8])>, PeerProtoError> {
    let indexed: u64 = index.messages.iter().map(|s| s.len as u64).sum();
    let mismatch = || PeerProtoError::BatchMismatch {
        count: index.messages.len(),
        indexed,
        data_len: data.len() as u64,
    };
    if index.messages.len() > MAX_BATCH_MESSAGES || indexed != data.len() as u64 {
        return Err(mismatch());
    }
    let mut out = Vec::with_capacity(index.messages.len());
    let mut at = 0usize;
    for s in &index.messages {
        let end = at + s.len as usize;
        out.push((s.group, data.get(at..end).ok_or_else(mismatch)?));
        at = end;
    }
    Ok(out)
}

/// Reads and validates a frame header; `Err(Closed)` when the peer closed cleanly before its
/// first byte.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<FrameHeader, PeerProtoError> {
    let mut hb = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut hb[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                PeerProtoError::Closed
            } else {
                PeerProtoError::Io(std::io::ErrorKind::UnexpectedEof.into())
            });
        }
        got += n;
    }
    FrameHeader::decode(&hb)
}

/// Reads the control and data parts of a frame whose header was read (its lengths are already
/// bounded) and verifies the checksum.
pub async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    header: FrameHeader,
) -> Result<Frame, PeerProtoError> {
    let mut ctl = vec![0u8; header.ctl_len as usize];
    r.read_exact(&mut ctl).await?;
    let mut data = AlignedBuf::zeroed(header.data_len as usize);
    r.read_exact(&mut data).await?;
    let actual = frame_crc(&header, &ctl, &[&data]);
    if actual != header.crc {
        return Err(PeerProtoError::Checksum {
            expected: header.crc,
            actual,
        });
    }
    Ok(Frame { header, ctl, data })
}

/// Reads one whole frame.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, PeerProtoError> {
    let header = read_header(r).await?;
    read_body(r, header).await
}

/// Dialer → acceptor, first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the dialer speaks.
    pub min_version: u16,
    /// Newest protocol version the dialer speaks.
    pub max_version: u16,
    /// The dialing node.
    pub from: NodeId,
    /// The node the dialer means to reach.
    pub to: NodeId,
    /// Fresh random nonce.
    pub nonce: [u8; 32],
}

/// Acceptor → dialer: the chosen version, the acceptor's nonce and its proof of the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Version both sides speak from now on.
    pub version: u16,
    /// The accepting node.
    pub node: NodeId,
    /// Fresh random nonce.
    pub nonce: [u8; 32],
    /// [`Transcript::proof`] with role `Server`.
    pub proof: HandshakeProof,
}

/// Dialer → acceptor: the dialer's proof of the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Auth {
    /// [`Transcript::proof`] with role `Client`.
    pub proof: HandshakeProof,
}

/// Stable refusal codes. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefuseCode {
    /// A frame or message could not be decoded.
    Malformed,
    /// No common protocol version.
    Version,
    /// The peer could not prove knowledge of the cluster key.
    AuthFailed,
    /// The dialer is not a configured peer of the acceptor.
    UnknownNode,
    /// The dialer asked for another node than the one it reached.
    WrongNode,
    /// The dialer's id is not lower than the acceptor's (the lower id dials).
    NotDialer,
    /// No RPC handler is registered.
    NoHandler,
    /// Too many RPCs (or payload bytes) in flight on the connection.
    Busy,
    /// A reply beyond the protocol's size bounds.
    TooLarge,
    /// The node is shutting down.
    ShuttingDown,
    /// The RPC handler failed (panicked) without a reply.
    HandlerFailed,
}

/// A refusal: of a handshake (kind `Refused`) or of one RPC by the transport (kind `RpcError`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Stable code.
    pub code: RefuseCode,
    /// Human-readable detail (at most [`MAX_REFUSAL_TEXT`] bytes).
    pub message: String,
}

/// Longest refusal text sent.
pub const MAX_REFUSAL_TEXT: usize = 200;

impl Refusal {
    /// A refusal, its text cut to [`MAX_REFUSAL_TEXT`] bytes (on a character boundary).
    pub fn new(code: RefuseCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_REFUSAL_TEXT {
            let mut cut = MAX_REFUSAL_TEXT;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self { code, message }
    }
}

/// One message of a Raft batch: its group and the length of its encoding in the data part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftSlot {
    /// The Raft group.
    pub group: GroupId,
    /// Bytes of its protobuf encoding.
    pub len: u32,
}

/// The control part of a [`Kind::Raft`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RaftBatch {
    /// The messages, in the order of their bytes in the data part.
    pub messages: Vec<RaftSlot>,
}

/// Encodes a Raft batch's header and control part; the caller writes the message bytes after
/// it, in order.
pub fn encode_raft_batch(messages: &[(GroupId, &[u8])]) -> Result<Vec<u8>, PeerProtoError> {
    if messages.len() > MAX_BATCH_MESSAGES {
        return Err(PeerProtoError::TooLarge {
            kind: Kind::Raft,
            what: "batch",
            len: messages.len() as u64,
            max: MAX_BATCH_MESSAGES as u64,
        });
    }
    let index = RaftBatch {
        messages: messages
            .iter()
            .map(|(group, b)| RaftSlot {
                group: *group,
                len: u32::try_from(b.len()).unwrap_or(u32::MAX),
            })
            .collect(),
    };
    let ctl = postcard::to_stdvec(&index)?;
    let data: Vec<&[u8]> = messages.iter().map(|(_, b)| *b).collect();
    encode_frame_head(Kind::Raft, 0, &ctl, &data)
}

/// The transcript-bound nonce that goes into the handshake MAC: binds a nonce to both node ids
/// and the version under this protocol's own MAC domain.
fn bind_nonce(key: &ClusterKey, nonce: &[u8; 32], t: &Transcript) -> [u8; 32] {
    let mut b = [0u8; 50];
    b[..32].copy_from_slice(nonce);
    b[32..40].copy_from_slice(&t.client.0.to_le_bytes());
    b[40..48].copy_from_slice(&t.server.0.to_le_bytes());
    b[48..50].copy_from_slice(&t.version.to_le_bytes());
    key.sign(b"stockade-peer-hello-v1", &b)
}

/// What a handshake's proofs are bound to besides the nonces: both node ids and the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcript {
    /// The dialing node (role `Client`).
    pub client: NodeId,
    /// The accepting node (role `Server`).
    pub server: NodeId,
    /// The negotiated protocol version.
    pub version: u16,
}

impl Transcript {
    /// The proof that the side playing `role` sends: `HMAC(key, role, own', peer')` where each
    /// nonce is first bound to this transcript (see the module docs).
    pub fn proof(
        &self,
        key: &ClusterKey,
        role: HandshakeRole,
        own_nonce: &[u8; 32],
        peer_nonce: &[u8; 32],
    ) -> HandshakeProof {
        key.handshake_proof(
            role,
            &bind_nonce(key, own_nonce, self),
            &bind_nonce(key, peer_nonce, self),
        )
    }

    /// Checks a proof received from the peer playing `role` (constant-time comparison).
    pub fn verify(
        &self,
        key: &ClusterKey,
        role: HandshakeRole,
        peer_nonce: &[u8; 32],
        own_nonce: &[u8; 32],
        proof: &HandshakeProof,
    ) -> bool {
        key.verify_handshake(
            role,
            &bind_nonce(key, peer_nonce, self),
            &bind_nonce(key, own_nonce, self),
            proof,
        )
    }
}

/// Encodes a Raft message with its protobuf codec.
pub fn encode_raft_message(msg: &Message) -> Result<Vec<u8>, RaftCodecError> {
    Ok(protobuf::Message::write_to_bytes(msg)?)
}

/// Decodes one Raft message. The bytes are first checked to have the shape of an
/// `eraftpb.Message` (no group wire types, nesting only where the schema nests, lengths in
/// bounds) so protobuf 2.28 sees nothing its known weaknesses need; a panic of the decoder is
/// contained. Callers must still only decode bytes from an authenticated peer.
pub fn decode_raft_message(bytes: &[u8]) -> Result<Message, RaftCodecError> {
    check_raft_shape(bytes)?;
    match std::panic::catch_unwind(|| <Message as protobuf::Message>::parse_from_bytes(bytes)) {
        Ok(r) => Ok(r?),
        Err(_) => Err(RaftCodecError::Panicked),
    }
}

/// The nested messages of `eraftpb` that a `Message` can contain.
#[derive(Clone, Copy)]
enum Schema {
    Message,
    Entry,
    Snapshot,
    SnapshotMetadata,
    ConfState,
}

impl Schema {
    /// The schema of field `field` when it is an embedded message.
    fn child(self, field: u64) -> Option<Schema> {
        match (self, field) {
            (Schema::Message, 7) => Some(Schema::Entry),
            (Schema::Message, 9) => Some(Schema::Snapshot),
            (Schema::Snapshot, 2) => Some(Schema::SnapshotMetadata),
            (Schema::SnapshotMetadata, 1) => Some(Schema::ConfState),
            _ => None,
        }
    }
}

/// Walks the protobuf wire structure of an `eraftpb.Message` without building it.
pub fn check_raft_shape(bytes: &[u8]) -> Result<(), RaftCodecError> {
    walk(bytes, Schema::Message, 0)
}

fn read_varint(b: &[u8], at: &mut usize) -> Result<u64, RaftCodecError> {
    let mut v = 0u64;
    for i in 0..10 {
        let byte = *b
            .get(*at)
            .ok_or(RaftCodecError::Shape("truncated varint"))?;
        *at += 1;
        v |= ((byte & 0x7f) as u64) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(RaftCodecError::Shape("varint longer than 10 bytes"))
}

fn walk(b: &[u8], schema: Schema, depth: u32) -> Result<(), RaftCodecError> {
    if depth > 4 {
        return Err(RaftCodecError::Shape("nested too deeply"));
    }
    let mut at = 0usize;
    while at < b.len() {
        let key = read_varint(b, &mut at)?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 {
            return Err(RaftCodecError::Shape("field number 0"));
        }
        let skip = match wire {
            0 => {
                read_varint(b, &mut at)?;
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let len = read_varint(b, &mut at)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| *l <= b.len() - at)
                    .ok_or(RaftCodecError::Shape("length beyond the message"))?;
                if let Some(child) = schema.child(field) {
                    walk(&b[at..at + len], child, depth + 1)?;
                }
                len
            }
            3 | 4 => return Err(RaftCodecError::Shape("group wire type")),
            _ => return Err(RaftCodecError::Shape("unknown wire type")),
        };
        if skip > b.len() - at {
            return Err(RaftCodecError::Shape("field beyond the message"));
        }
        at += skip;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use raft::prelude::{Entry, MessageType, Snapshot};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    fn sample_message() -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.to = 2;
        m.from = 1;
        m.term = 5;
        let e = Entry {
            term: 5,
            index: 9,
            data: b"hello".to_vec().into(),
            ..Default::default()
        };
        m.entries = vec![e].into();
        let mut s = Snapshot::default();
        s.mut_metadata().index = 3;
        s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        m.set_snapshot(s);
        m
    }

    #[test]
    fn header_golden_bytes() {
        let h = FrameHeader {
            version: 1,
            kind: Kind::Raft,
            tag: 0x0102_0304_0506_0708,
            ctl_len: 5,
            data_len: 4096,
            crc: 0xdead_beef,
        };
        let b = h.encode();
        assert_eq!(
            b,
            [
                b'S', b'T', b'K', b'P', 1, 0, 6, 0, 8, 7, 6, 5, 4, 3, 2, 1, 5, 0, 0, 0, 0, 16, 0,
                0, 0xef, 0xbe, 0xad, 0xde, 0, 0, 0, 0
            ]
        );
        assert_eq!(FrameHeader::decode(&b).unwrap(), h);
    }

    #[test]
    fn whole_frame_golden_bytes() {
        // A ping: header only. The crc pins the checksum definition too.
        let ping = encode_frame_head(Kind::Ping, 0, &[], &[]).unwrap();
        let crc = frame_crc(
            &FrameHeader::decode(ping[..HEADER_LEN].try_into().unwrap()).unwrap(),
            &[],
            &[],
        );
        assert_eq!(
            ping,
            [
                b'S', b'T', b'K', b'P', 1, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0x85, 0x7b, 0x69, 0xb7, 0, 0, 0, 0
            ]
        );
        // CRC-32 (IEEE) of the header with a zero crc field: zlib.crc32 gives the same.
        assert_eq!(crc, 0xb769_7b85);
        // A raft batch of two messages in groups 1 and 300: index [count 2, (1, 3), (300, 2)].
        let head = encode_raft_batch(&[(GroupId(1), b"abc"), (GroupId(300), b"de")]).unwrap();
        // Kind 6, tag 0, ctl_len 6, data_len 5, crc over header ‖ ctl ‖ "abcde" (zlib.crc32).
        assert_eq!(
            head,
            [
                b'S', b'T', b'K', b'P', 1, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 5, 0, 0, 0,
                0xfd, 0xd0, 0xdb, 0x30, 0, 0, 0, 0, 2, 1, 3, 0xac, 0x02, 2
            ]
        );
    }

    #[test]
    fn golden_message_bytes() {
        let hello = Hello {
            min_version: 1,
            max_version: 1,
            from: NodeId(1),
            to: NodeId(2),
            nonce: [0xab; 32],
        };
        let mut want = vec![1, 1, 1, 2];
        want.extend_from_slice(&[0xab; 32]);
        assert_eq!(postcard::to_stdvec(&hello).unwrap(), want);
        let auth = Auth {
            proof: HandshakeProof([7; 32]),
        };
        assert_eq!(postcard::to_stdvec(&auth).unwrap(), [7; 32]);
        let challenge = Challenge {
            version: 1,
            node: NodeId(3),
            nonce: [1; 32],
            proof: HandshakeProof([2; 32]),
        };
        let mut want = vec![1, 3];
        want.extend_from_slice(&[1; 32]);
        want.extend_from_slice(&[2; 32]);
        assert_eq!(postcard::to_stdvec(&challenge).unwrap(), want);
        let refusal = Refusal::new(RefuseCode::UnknownNode, "x");
        assert_eq!(postcard::to_stdvec(&refusal).unwrap(), [3, 1, b'x']);
        assert_eq!(
            postcard::to_stdvec(&Refusal::new(RefuseCode::ShuttingDown, "")).unwrap(),
            [9, 0]
        );
    }

    #[test]
    fn header_rejects_bad_fields_and_per_kind_bounds() {
        let good = FrameHeader {
            version: 1,
            kind: Kind::Request,
            tag: 1,
            ctl_len: 1,
            data_len: 0,
            crc: 0,
        }
        .encode();
        let cases: Vec<(usize, Vec<u8>)> = vec![
            (0, vec![b'X']),
            (4, vec![9, 0]),
            (6, vec![0, 0]),
            (6, vec![11, 0]),
            (28, vec![1]),
            (20, (MAX_DATA_LEN + 1).to_le_bytes().to_vec()),
            (16, (MAX_CTL_LEN + 1).to_le_bytes().to_vec()),
        ];
        for (at, bytes) in cases {
            let mut b = good;
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            assert!(FrameHeader::decode(&b).is_err(), "{at} {bytes:?}");
        }
        // A handshake frame may not carry data, nor more than 512 control bytes.
        let mut b = good;
        b[6] = Kind::Hello as u8;
        b[20] = 1;
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(PeerProtoError::TooLarge { what: "data", .. })
        ));
        let mut b = good;
        b[6] = Kind::Auth as u8;
        b[16..20].copy_from_slice(&(HANDSHAKE_MAX_CTL_LEN + 1).to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&b),
            Err(PeerProtoError::TooLarge {
                what: "control",
                ..
            })
        ));
        let mut b = good;
        b[6] = Kind::Ping as u8;
        assert!(FrameHeader::decode(&b).is_err(), "ping carries nothing");
    }

    #[test]
    fn frame_round_trip_checksum_and_truncation() {
        rt().block_on(async {
            let data = vec![0x5a; 5000];
            let mut wire = encode_frame_head(Kind::Response, 42, b"reply", &[&data]).unwrap();
            wire.extend_from_slice(&data);
            let f = read_frame(&mut &wire[..]).await.unwrap();
            assert_eq!(f.header.tag, 42);
            assert_eq!(f.ctl, b"reply");
            assert_eq!(&f.data[..], &data[..]);
            let last = wire.len() - 1;
            wire[last] ^= 1;
            assert!(matches!(
                read_frame(&mut &wire[..]).await,
                Err(PeerProtoError::Checksum { .. })
            ));
            assert!(read_frame(&mut &wire[..40]).await.is_err());
            assert!(matches!(
                read_frame(&mut &wire[..0]).await,
                Err(PeerProtoError::Closed)
            ));
        });
    }

    #[test]
    fn raft_batch_round_trip_and_mismatch() {
        let m1 = encode_raft_message(&sample_message()).unwrap();
        let mut m2m = Message::default();
        m2m.set_msg_type(MessageType::MsgHeartbeat);
        let m2 = encode_raft_message(&m2m).unwrap();
        let head = encode_raft_batch(&[(GroupId(7), &m1), (GroupId(u128::MAX), &m2)]).unwrap();
        let mut wire = head.clone();
        wire.extend_from_slice(&m1);
        wire.extend_from_slice(&m2);
        let f = rt().block_on(read_frame(&mut &wire[..])).unwrap();
        let batch = f.raft_batch().unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].0, GroupId(7));
        assert_eq!(batch[1].0, GroupId(u128::MAX));
        assert_eq!(decode_raft_message(batch[0].1).unwrap(), sample_message());
        assert_eq!(decode_raft_message(batch[1].1).unwrap(), m2m);
        // An index that does not add up to the data part is refused.
        let bad = RaftBatch {
            messages: vec![RaftSlot {
                group: GroupId(1),
                len: 3,
            }],
        };
        assert!(matches!(
            split_batch(&bad, b"ab"),
            Err(PeerProtoError::BatchMismatch { .. })
        ));
        let too_many = RaftBatch {
            messages: vec![
                RaftSlot {
                    group: GroupId(1),
                    len: 0
                };
                MAX_BATCH_MESSAGES + 1
            ],
        };
        assert!(split_batch(&too_many, b"").is_err());
    }

    #[test]
    fn handshake_proofs_bind_roles_ids_and_version() {
        let k = ClusterKey::from_bytes([3; 32]);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let t = Transcript {
            client: NodeId(1),
            server: NodeId(2),
            version: 1,
        };
        let p = t.proof(&k, HandshakeRole::Client, &a, &b);
        assert!(t.verify(&k, HandshakeRole::Client, &a, &b, &p));
        assert!(!t.verify(&k, HandshakeRole::Server, &a, &b, &p));
        assert!(!t.verify(&k, HandshakeRole::Client, &b, &a, &p));
        for other in [
            Transcript {
                client: NodeId(3),
                ..t
            },
            Transcript {
                server: NodeId(3),
                ..t
            },
            Transcript { version: 2, ..t },
        ] {
            assert!(!other.verify(&k, HandshakeRole::Client, &a, &b, &p));
        }
        let wrong_key = ClusterKey::from_bytes([4; 32]);
        assert!(!t.verify(&wrong_key, HandshakeRole::Client, &a, &b, &p));
        // Not the sled protocol's proof over the same nonces.
        assert_ne!(p, k.handshake_proof(HandshakeRole::Client, &a, &b));
    }

    #[test]
    fn shape_check_refuses_groups_and_accepts_real_messages() {
        let good = encode_raft_message(&sample_message()).unwrap();
        check_raft_shape(&good).unwrap();
        // A start-group field at top level, and one hidden inside an entry.
        assert!(matches!(
            decode_raft_message(&[0x0b, 0x0c]),
            Err(RaftCodecError::Shape(_))
        ));
        let nested = [0x3a, 0x02, 0x0b, 0x0c]; // field 7 (entries), len 2, start/end group
        assert!(matches!(
            decode_raft_message(&nested),
            Err(RaftCodecError::Shape(_))
        ));
        // Group-looking bytes inside entry *data* are just bytes.
        let mut m = Message::default();
        let e = Entry {
            data: vec![0x0b; 64].into(),
            ..Default::default()
        };
        m.entries = vec![e].into();
        let bytes = encode_raft_message(&m).unwrap();
        assert_eq!(decode_raft_message(&bytes).unwrap(), m);
        // Length running past the end.
        assert!(decode_raft_message(&[0x62, 0x05, 1]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let r = rt();
            r.block_on(async {
                if let Ok(f) = read_frame(&mut &bytes[..]).await {
                    let _ = f.decode::<Hello>();
                    let _ = f.raft_batch();
                }
            });
            let _ = decode_raft_message(&bytes);
            let _ = postcard::from_bytes::<RaftBatch>(&bytes);
            let _ = postcard::from_bytes::<Refusal>(&bytes);
        }

        #[test]
        fn encoded_messages_pass_the_shape_check(
            term in any::<u64>(), idx in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..64),
            voters in proptest::collection::vec(any::<u64>(), 0..5), ctx in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut m = sample_message();
            m.term = term;
            m.index = idx;
            m.context = ctx.into();
            m.entries.push(Entry { data: data.into(), ..Default::default() });
            m.mut_snapshot().mut_metadata().mut_conf_state().learners = voters;
            let b = encode_raft_message(&m).unwrap();
            prop_assert_eq!(decode_raft_message(&b).unwrap(), m);
        }

        #[test]
        fn mutated_messages_never_panic(flip in any::<(usize, u8)>()) {
            let mut b = encode_raft_message(&sample_message()).unwrap();
            let at = flip.0 % b.len();
            b[at] ^= flip.1;
            let _ = decode_raft_message(&b);
        }
    }
}
