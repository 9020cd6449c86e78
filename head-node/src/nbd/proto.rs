//! The NBD wire protocol: constants, and pure encoders and decoders for the handshake, the option
//! haggling, requests and replies.
//!
//! Everything here follows the `proto.md` of the NetworkBlockDevice/nbd project, including the
//! extended-headers extension (`NBD_OPT_EXTENDED_HEADERS`: 32-byte requests with a 64-bit length,
//! 32-byte reply headers, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`). All integers are big-endian. Nothing
//! in this module does I/O; the server and the tests' raw-socket client both use it, and the
//! unit tests below pin each message to its layout in the specification byte by byte.

use std::fmt;

// ---------------------------------------------------------------------------------------------
// Magic numbers.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, sent by the server after `NBDMAGIC` and by the client before
/// every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------------------------
// Handshake flags (16 bits, server) and client flags (32 bits).

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit makes the server hang up.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits).

/// Always set.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational medium.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported on reads.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// FLUSH and FUA on one connection are visible on every connection to the export.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` (experimental extension; not implemented).
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// Block status requests may carry a payload (extension; not implemented).
pub const TFLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---------------------------------------------------------------------------------------------
// Options.

/// Choose an export and enter transmission (no error reporting possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List the exports.
pub const OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension.
pub const OPT_PEEK_EXPORT: u32 = 4;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Use 32-byte extended headers with 64-bit lengths.
pub const OPT_EXTENDED_HEADERS: u32 = 11;
/// Stockade's own option (not in proto.md; other servers answer `NBD_REP_ERR_UNSUP`): 16
/// bytes of data, a client id and a generation ([`ClientSession`](crate::volume::session)),
/// sent before `NBD_OPT_GO`. The head node then commits the session before it answers `GO`,
/// ending the client's older connections (see [`crate::volume::session`]).
pub const OPT_SESSION: u32 = 0x5354_4b53;

// ---------------------------------------------------------------------------------------------
// Option reply types.

/// Success, or the end of a list.
pub const REP_ACK: u32 = 1;
/// One export in the reply to `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// One item of information in the reply to `NBD_OPT_INFO` or `NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// The option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
/// Policy forbids the option.
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
/// The option is syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
/// Not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
/// TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
/// The export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
/// The client must request block sizes first.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
/// The request or its reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;
/// Extended headers are required (or cannot be downgraded).
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR + 10;

// ---------------------------------------------------------------------------------------------
// Information types in `NBD_REP_INFO`.

/// Size and transmission flags (mandatory).
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Commands and command flags.

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (`WRITE_ZEROES`): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (`READ`): do not fragment the reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (`BLOCK_STATUS`): one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (`WRITE_ZEROES`): fail with `ENOTSUP` unless fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended headers): the length is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cmd {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1).
    Write,
    /// `NBD_CMD_DISC` (2).
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
}

impl Cmd {
    /// Every command, in wire order.
    pub const ALL: [Cmd; 8] = [
        Cmd::Read,
        Cmd::Write,
        Cmd::Disc,
        Cmd::Flush,
        Cmd::Trim,
        Cmd::Cache,
        Cmd::WriteZeroes,
        Cmd::BlockStatus,
    ];

    /// The command for a wire type, if known.
    pub fn from_wire(t: u16) -> Option<Cmd> {
        Cmd::ALL.get(usize::from(t)).copied()
    }

    /// The wire type.
    pub fn wire(self) -> u16 {
        match self {
            Cmd::Read => 0,
            Cmd::Write => 1,
            Cmd::Disc => 2,
            Cmd::Flush => 3,
            Cmd::Trim => 4,
            Cmd::Cache => 5,
            Cmd::WriteZeroes => 6,
            Cmd::BlockStatus => 7,
        }
    }

    /// Lower-case name, used as the `op` metric label.
    pub fn name(self) -> &'static str {
        match self {
            Cmd::Read => "read",
            Cmd::Write => "write",
            Cmd::Disc => "disc",
            Cmd::Flush => "flush",
            Cmd::Trim => "trim",
            Cmd::Cache => "cache",
            Cmd::WriteZeroes => "write_zeroes",
            Cmd::BlockStatus => "block_status",
        }
    }

    /// The command flags that are meaningful for this command (before negotiation is taken into
    /// account). `FUA` is accepted on every command, as the specification requires once
    /// `NBD_FLAG_SEND_FUA` is advertised.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Cmd::Read => CMD_FLAG_FUA | CMD_FLAG_DF,
            Cmd::Write => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
            Cmd::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Cmd::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            Cmd::Disc | Cmd::Flush | Cmd::Trim | Cmd::Cache => CMD_FLAG_FUA,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replies.

/// Reply flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload; ends a successful reply.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data read at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range reading as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status with 32-bit descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: block status with 64-bit descriptors (extended headers only).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// ---------------------------------------------------------------------------------------------
// Error values.

/// Operation not permitted (write to a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left on device (including writes past the end).
pub const ENOSPC: u32 = 28;
/// Value too large.
pub const EOVERFLOW: u32 = 75;
/// Operation not supported (a fast zero that cannot be fast).
pub const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// A short lower-case name for an NBD error value (a bounded set, used as a metric label).
pub fn errno_name(e: u32) -> &'static str {
    match e {
        EPERM => "eperm",
        EIO => "eio",
        ENOMEM => "enomem",
        EINVAL => "einval",
        ENOSPC => "enospc",
        EOVERFLOW => "eoverflow",
        ENOTSUP => "enotsup",
        ESHUTDOWN => "eshutdown",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata contexts.

/// The only metadata context this server offers.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The longest string the specification permits (names, descriptions, messages).
pub const MAX_STRING_BYTES: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Errors.

/// A message that does not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A magic number was wrong.
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// What was received.
        found: u64,
    },
    /// A message was shorter than its layout, or its length fields disagree.
    #[error("malformed {what}")]
    Malformed {
        /// Which message.
        what: &'static str,
    },
    /// A string is not valid UTF-8, contains NUL or is longer than 4096 bytes.
    #[error("invalid string in {what}")]
    BadString {
        /// Which message.
        what: &'static str,
    },
    /// A length does not fit the chosen encoding.
    #[error("{what} length {len} does not fit")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length.
        len: u64,
    },
}

// ---------------------------------------------------------------------------------------------
// A tiny big-endian cursor.

/// Reads big-endian fields from a byte slice; every read is checked.
#[derive(Debug)]
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Malformed { what: self.what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string prefixed by a 32-bit length.
    fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        to_string(bytes, self.what)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed { what: self.what })
        }
    }
}

/// Validates a protocol string: UTF-8, no NUL, at most [`MAX_STRING_BYTES`].
pub fn to_string(bytes: &[u8], what: &'static str) -> Result<String, ProtoError> {
    if bytes.len() > MAX_STRING_BYTES || bytes.contains(&0) {
        return Err(ProtoError::BadString { what });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::BadString { what })
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn len32(what: &'static str, len: usize) -> Result<u32, ProtoError> {
    u32::try_from(len).map_err(|_| ProtoError::TooLong {
        what,
        len: len as u64,
    })
}

/// Truncates `s` to at most `max` bytes at a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Handshake.

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// Decodes the server greeting (client side); returns the handshake flags.
pub fn decode_greeting(b: &[u8; GREETING_LEN]) -> Result<u16, ProtoError> {
    let mut c = Cursor::new(b, "greeting");
    let magic = c.u64()?;
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "greeting",
            found: magic,
        });
    }
    let opt = c.u64()?;
    if opt != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "newstyle",
            found: opt,
        });
    }
    c.u16()
}

/// The header of a client option: `IHAVEOPT`, option, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`NBD_OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Decodes and checks the magic.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(b, "option");
        let magic = c.u64()?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                found: magic,
            });
        }
        Ok(Self {
            option: c.u32()?,
            length: c.u32()?,
        })
    }

    /// Encodes (client side).
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: u32,
    /// `NBD_REP_*`.
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Encoded length.
    pub const LEN: usize = 20;

    /// Decodes (client side) and checks the magic.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(b, "option reply");
        let magic = c.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                found: magic,
            });
        }
        Ok(Self {
            option: c.u32()?,
            reply_type: c.u32()?,
            length: c.u32()?,
        })
    }

    /// True for the `NBD_REP_ERR_*` types.
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_ERR != 0
    }
}

/// Appends an option reply (header and data) to `out`.
pub fn encode_option_reply(
    out: &mut Vec<u8>,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> Result<(), ProtoError> {
    let len = len32("option reply", data.len())?;
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply_type);
    put_u32(out, len);
    out.extend_from_slice(data);
    Ok(())
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client asked
/// for `NBD_FLAG_C_NO_ZEROES`, 124 zero bytes.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    put_u64(&mut out, size);
    put_u16(&mut out, flags);
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    put_u16(&mut out, INFO_EXPORT);
    put_u64(&mut out, size);
    put_u16(&mut out, flags);
    out
}

/// Data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    put_u16(&mut out, INFO_BLOCK_SIZE);
    put_u32(&mut out, min);
    put_u32(&mut out, preferred);
    put_u32(&mut out, max);
    out
}

/// Data of `NBD_REP_INFO` for a string item (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`); the
/// string is truncated to the protocol's 4096-byte limit.
pub fn encode_info_string(info_type: u16, s: &str) -> Vec<u8> {
    let s = truncate_str(s, MAX_STRING_BYTES);
    let mut out = Vec::with_capacity(2 + s.len());
    put_u16(&mut out, info_type);
    out.extend_from_slice(s.as_bytes());
    out
}

/// Data of `NBD_REP_SERVER`: the export name with its 32-bit length.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    put_u32(&mut out, name.len() as u32);
    out.extend_from_slice(name.as_bytes());
    out
}

/// Data of `NBD_REP_META_CONTEXT`: context id and name.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    put_u32(&mut out, id);
    out.extend_from_slice(name.as_bytes());
    out
}

/// One parsed `NBD_REP_INFO` item (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        max: u32,
    },
    /// An information type this decoder does not know.
    Unknown(u16),
}

impl InfoReply {
    /// Decodes the data of an `NBD_REP_INFO` reply.
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data, "info reply");
        let t = c.u16()?;
        let item = match t {
            INFO_EXPORT => InfoReply::Export {
                size: c.u64()?,
                flags: c.u16()?,
            },
            INFO_NAME => InfoReply::Name(to_string(c.rest(), "info name")?),
            INFO_DESCRIPTION => InfoReply::Description(to_string(c.rest(), "info description")?),
            INFO_BLOCK_SIZE => InfoReply::BlockSize {
                min: c.u32()?,
                preferred: c.u32()?,
                max: c.u32()?,
            },
            other => {
                c.rest();
                InfoReply::Unknown(other)
            }
        };
        c.finish()?;
        Ok(item)
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Requested information types.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses the option data; the lengths must account for every byte.
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data, "info request");
        let name = c.string32()?;
        let n = c.u16()?;
        let mut requests = Vec::with_capacity(usize::from(n).min(16));
        for _ in 0..n {
            requests.push(c.u16()?);
        }
        c.finish()?;
        Ok(Self { name, requests })
    }

    /// Encodes (client side).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_u32(&mut out, self.name.len() as u32);
        out.extend_from_slice(self.name.as_bytes());
        put_u16(&mut out, self.requests.len() as u16);
        for r in &self.requests {
            put_u16(&mut out, *r);
        }
        out
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export: String,
    /// Queries (`namespace:leaf`).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses the option data; the lengths must account for every byte.
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data, "meta context request");
        let export = c.string32()?;
        let n = c.u32()?;
        // Each query takes at least 4 bytes, so `n` cannot honestly exceed what is left.
        if u64::from(n) * 4 > c.buf.len() as u64 {
            return Err(ProtoError::Malformed {
                what: "meta context request",
            });
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            queries.push(c.string32()?);
        }
        c.finish()?;
        Ok(Self { export, queries })
    }

    /// Encodes (client side).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_u32(&mut out, self.export.len() as u32);
        out.extend_from_slice(self.export.as_bytes());
        put_u32(&mut out, self.queries.len() as u32);
        for q in &self.queries {
            put_u32(&mut out, q.len() as u32);
            out.extend_from_slice(q.as_bytes());
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests.

/// Which request header the client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStyle {
    /// 28-byte requests with a 32-bit length.
    Compact,
    /// 32-byte requests with a 64-bit length (`NBD_OPT_EXTENDED_HEADERS`).
    Extended,
}

impl HeaderStyle {
    /// Length of a request header in this style.
    pub fn request_len(self) -> usize {
        match self {
            HeaderStyle::Compact => Request::COMPACT_LEN,
            HeaderStyle::Extended => Request::EXTENDED_LEN,
        }
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type (raw, since unknown commands must be answered, not rejected).
    pub kind: u16,
    /// The client's opaque cookie (formerly "handle").
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length: an effect length, or the payload length of a write.
    pub length: u64,
}

impl Request {
    /// Length of a compact request header.
    pub const COMPACT_LEN: usize = 28;
    /// Length of an extended request header.
    pub const EXTENDED_LEN: usize = 32;

    /// Decodes a header of the given style, checking its magic.
    pub fn decode(style: HeaderStyle, b: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(b, "request");
        let magic = c.u32()?;
        let expected = match style {
            HeaderStyle::Compact => REQUEST_MAGIC,
            HeaderStyle::Extended => EXTENDED_REQUEST_MAGIC,
        };
        if magic != expected {
            return Err(ProtoError::BadMagic {
                what: "request",
                found: u64::from(magic),
            });
        }
        let flags = c.u16()?;
        let kind = c.u16()?;
        let cookie = c.u64()?;
        let offset = c.u64()?;
        let length = match style {
            HeaderStyle::Compact => u64::from(c.u32()?),
            HeaderStyle::Extended => c.u64()?,
        };
        c.finish()?;
        Ok(Self {
            flags,
            kind,
            cookie,
            offset,
            length,
        })
    }

    /// Encodes (client side). A compact header cannot carry a length above `u32::MAX`.
    pub fn encode(&self, style: HeaderStyle) -> Result<Vec<u8>, ProtoError> {
        let mut out = Vec::with_capacity(style.request_len());
        match style {
            HeaderStyle::Compact => put_u32(&mut out, REQUEST_MAGIC),
            HeaderStyle::Extended => put_u32(&mut out, EXTENDED_REQUEST_MAGIC),
        }
        put_u16(&mut out, self.flags);
        put_u16(&mut out, self.kind);
        put_u64(&mut out, self.cookie);
        put_u64(&mut out, self.offset);
        match style {
            HeaderStyle::Compact => {
                let len = u32::try_from(self.length).map_err(|_| ProtoError::TooLong {
                    what: "compact request",
                    len: self.length,
                })?;
                put_u32(&mut out, len);
            }
            HeaderStyle::Extended => put_u64(&mut out, self.length),
        }
        Ok(out)
    }

    /// The command, if known.
    pub fn cmd(&self) -> Option<Cmd> {
        Cmd::from_wire(self.kind)
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies.

/// How the server frames replies, fixed by negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// Only simple replies (nothing negotiated).
    Simple,
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`): 20-byte chunk headers; simple replies
    /// still allowed for payload-free answers other than to reads.
    Structured,
    /// Extended headers: 32-byte chunk headers for every reply.
    Extended,
}

impl ReplyStyle {
    /// The request header style that goes with this reply style.
    pub fn header_style(self) -> HeaderStyle {
        match self {
            ReplyStyle::Extended => HeaderStyle::Extended,
            ReplyStyle::Simple | ReplyStyle::Structured => HeaderStyle::Compact,
        }
    }
}

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// Appends a simple reply header.
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    put_u32(out, SIMPLE_REPLY_MAGIC);
    put_u32(out, error);
    put_u64(out, cookie);
}

/// Appends a chunk header in the structured or extended style. `offset` (the request's offset)
/// is only sent in the extended style. Fails when the payload length does not fit a structured
/// header, or when asked for the simple style.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    style: ReplyStyle,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    offset: u64,
    payload_len: u64,
) -> Result<(), ProtoError> {
    match style {
        ReplyStyle::Simple => Err(ProtoError::Malformed {
            what: "chunk in simple reply mode",
        }),
        ReplyStyle::Structured => {
            let len = u32::try_from(payload_len).map_err(|_| ProtoError::TooLong {
                what: "structured reply",
                len: payload_len,
            })?;
            put_u32(out, STRUCTURED_REPLY_MAGIC);
            put_u16(out, flags);
            put_u16(out, chunk_type);
            put_u64(out, cookie);
            put_u32(out, len);
            Ok(())
        }
        ReplyStyle::Extended => {
            put_u32(out, EXTENDED_REPLY_MAGIC);
            put_u16(out, flags);
            put_u16(out, chunk_type);
            put_u64(out, cookie);
            put_u64(out, offset);
            put_u64(out, payload_len);
            Ok(())
        }
    }
}

/// Appends the payload of an `NBD_REPLY_TYPE_ERROR` chunk (message truncated to 4096 bytes).
pub fn encode_error_payload(out: &mut Vec<u8>, error: u32, message: &str) {
    let m = truncate_str(message, MAX_STRING_BYTES);
    put_u32(out, error);
    put_u16(out, m.len() as u16);
    out.extend_from_slice(m.as_bytes());
}

/// Appends the payload of an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk.
pub fn encode_error_offset_payload(out: &mut Vec<u8>, error: u32, message: &str, offset: u64) {
    encode_error_payload(out, error, message);
    put_u64(out, offset);
}

/// Length of a block status payload with `n` descriptors.
pub fn block_status_payload_len(extended: bool, n: usize) -> u64 {
    if extended {
        8 + 16 * n as u64
    } else {
        4 + 8 * n as u64
    }
}

/// Appends the payload of a block status chunk: `NBD_REPLY_TYPE_BLOCK_STATUS` (32-bit lengths)
/// or, with `extended`, `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (context id, descriptor count, then
/// 64-bit length and 64-bit flags per descriptor). Each descriptor is `(length, flags)`.
pub fn encode_block_status_payload(
    out: &mut Vec<u8>,
    extended: bool,
    context_id: u32,
    descriptors: &[(u64, u32)],
) -> Result<(), ProtoError> {
    put_u32(out, context_id);
    if extended {
        put_u32(out, len32("descriptor count", descriptors.len())?);
        for &(len, flags) in descriptors {
            put_u64(out, len);
            put_u64(out, u64::from(flags));
        }
    } else {
        for &(len, flags) in descriptors {
            let l = u32::try_from(len).map_err(|_| ProtoError::TooLong {
                what: "block status descriptor",
                len,
            })?;
            put_u32(out, l);
            put_u32(out, flags);
        }
    }
    Ok(())
}

/// Decodes a block status payload (client side) into `(context_id, descriptors)`.
pub fn decode_block_status_payload(
    extended: bool,
    payload: &[u8],
) -> Result<(u32, Vec<(u64, u32)>), ProtoError> {
    let what = "block status payload";
    let mut c = Cursor::new(payload, what);
    let id = c.u32()?;
    let mut out = Vec::new();
    if extended {
        let count = c.u32()?;
        if !c.buf.len().is_multiple_of(16) || (count != 0 && c.buf.len() / 16 != count as usize) {
            return Err(ProtoError::Malformed { what });
        }
        while !c.buf.is_empty() {
            let len = c.u64()?;
            let flags = c.u64()?;
            out.push((len, flags as u32));
        }
    } else {
        if !c.buf.len().is_multiple_of(8) {
            return Err(ProtoError::Malformed { what });
        }
        while !c.buf.is_empty() {
            out.push((u64::from(c.u32()?), c.u32()?));
        }
    }
    if out.is_empty() {
        return Err(ProtoError::Malformed { what });
    }
    Ok((id, out))
}

/// A decoded reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple {
        /// Error value (0 for success).
        error: u32,
        /// Cookie of the request.
        cookie: u64,
    },
    /// A structured or extended chunk.
    Chunk {
        /// Reply flags.
        flags: u16,
        /// Chunk type.
        chunk_type: u16,
        /// Cookie of the request.
        cookie: u64,
        /// The request's offset (extended chunks only).
        offset: Option<u64>,
        /// Payload length.
        length: u64,
    },
}

impl ReplyHeader {
    /// Total header length for a reply starting with `magic`, if the magic is known.
    pub fn len_for_magic(magic: u32) -> Option<usize> {
        match magic {
            SIMPLE_REPLY_MAGIC => Some(SIMPLE_REPLY_LEN),
            STRUCTURED_REPLY_MAGIC => Some(STRUCTURED_REPLY_LEN),
            EXTENDED_REPLY_MAGIC => Some(EXTENDED_REPLY_LEN),
            _ => None,
        }
    }

    /// Decodes a whole header (magic included).
    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(b, "reply");
        let magic = c.u32()?;
        let h = match magic {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: c.u32()?,
                cookie: c.u64()?,
            },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: c.u16()?,
                chunk_type: c.u16()?,
                cookie: c.u64()?,
                offset: None,
                length: u64::from(c.u32()?),
            },
            EXTENDED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: c.u16()?,
                chunk_type: c.u16()?,
                cookie: c.u64()?,
                offset: Some(c.u64()?),
                length: c.u64()?,
            },
            other => {
                return Err(ProtoError::BadMagic {
                    what: "reply",
                    found: u64::from(other),
                });
            }
        };
        c.finish()?;
        Ok(h)
    }

    /// The cookie.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// Decodes an error chunk payload (client side) into `(error, message, offset)`; the offset is
/// present for `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub fn decode_error_payload(
    chunk_type: u16,
    payload: &[u8],
) -> Result<(u32, String, Option<u64>), ProtoError> {
    let mut c = Cursor::new(payload, "error chunk");
    let error = c.u32()?;
    let mlen = c.u16()?;
    let msg = to_string(c.take(usize::from(mlen))?, "error message")?;
    let offset = if chunk_type == REPLY_TYPE_ERROR_OFFSET {
        Some(c.u64()?)
    } else {
        None
    };
    c.finish()?;
    Ok((error, msg, offset))
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A short name of an option, for logs.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export_name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_PEEK_EXPORT => "peek_export",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured_reply",
        OPT_LIST_META_CONTEXT => "list_meta_context",
        OPT_SET_META_CONTEXT => "set_meta_context",
        OPT_EXTENDED_HEADERS => "extended_headers",
        OPT_SESSION => "stockade_session",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests;
