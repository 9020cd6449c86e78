//! The client side of the fixed-newstyle handshake: structured replies or extended headers,
//! `base:allocation`, and `NBD_OPT_GO` with block sizes.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClientConfig, ClientError, ExportDetails};
use crate::nbd::proto::{self, ReplyStyle};

/// Longest option reply accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Most option replies accepted for one option.
const MAX_OPTION_REPLIES: u32 = 1024;

pub(super) async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    export: &str,
    cfg: &ClientConfig,
) -> Result<ExportDetails, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = ClientError::HandshakeIo;
    let mut greeting = [0u8; proto::GREETING_LEN];
    rd.read_exact(&mut greeting).await.map_err(io)?;
    let hflags = proto::decode_greeting(&greeting)?;
    if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::HandshakeViolation(
            "the server does not speak fixed newstyle",
        ));
    }
    let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
    if hflags & proto::FLAG_NO_ZEROES != 0 {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    wr.write_all(&cflags.to_be_bytes()).await.map_err(io)?;

    let mut style = ReplyStyle::Simple;
    if cfg.extended_headers {
        send_option(wr, proto::OPT_EXTENDED_HEADERS, &[]).await?;
        if simple_ack(rd, proto::OPT_EXTENDED_HEADERS).await? {
            style = ReplyStyle::Extended;
        }
    }
    if style == ReplyStyle::Simple {
        send_option(wr, proto::OPT_STRUCTURED_REPLY, &[]).await?;
        if !simple_ack(rd, proto::OPT_STRUCTURED_REPLY).await? {
            return Err(ClientError::NoStructuredReplies);
        }
        style = ReplyStyle::Structured;
    }

    // The session, if asked: a server without the extension refuses it.
    let mut session_recorded = false;
    if let Some(s) = cfg.session {
        send_option(wr, proto::OPT_SESSION, &s.encode()).await?;
        session_recorded = simple_ack(rd, proto::OPT_SESSION).await?;
    }

    // base:allocation, if the server has it; a refusal only means no block status.
    let meta = proto::MetaContextRequest {
        export: export.to_string(),
        queries: vec![proto::CONTEXT_BASE_ALLOCATION.to_string()],
    };
    send_option(wr, proto::OPT_SET_META_CONTEXT, &meta.encode()).await?;
    let mut base_allocation = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let (h, data) = option_reply(rd, proto::OPT_SET_META_CONTEXT).await?;
        match h.reply_type {
            proto::REP_META_CONTEXT => {
                if data.len() < 4 {
                    return Err(ClientError::HandshakeViolation("short meta context reply"));
                }
                let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                if &data[4..] == proto::CONTEXT_BASE_ALLOCATION.as_bytes() {
                    base_allocation = Some(id);
                }
            }
            proto::REP_ACK => break,
            _ if h.is_error() => break,
            _ => {
                return Err(ClientError::HandshakeViolation(
                    "unexpected reply to NBD_OPT_SET_META_CONTEXT",
                ));
            }
        }
    }

    let go = proto::InfoRequest {
        name: export.to_string(),
        requests: vec![
            proto::INFO_BLOCK_SIZE,
            proto::INFO_NAME,
            proto::INFO_DESCRIPTION,
        ],
    };
    send_option(wr, proto::OPT_GO, &go.encode()).await?;
    let mut export_info = None;
    let mut name = export.to_string();
    let mut description = String::new();
    let mut sizes = None;
    for _ in 0..MAX_OPTION_REPLIES {
        let (h, data) = option_reply(rd, proto::OPT_GO).await?;
        match h.reply_type {
            proto::REP_INFO => match proto::InfoReply::decode(&data)? {
                proto::InfoReply::Export { size, flags } => export_info = Some((size, flags)),
                proto::InfoReply::Name(n) => name = n,
                proto::InfoReply::Description(d) => description = d,
                proto::InfoReply::BlockSize {
                    min,
                    preferred,
                    max,
                } => sizes = Some((min, preferred, max)),
                proto::InfoReply::Unknown(_) => {}
            },
            proto::REP_ACK => {
                let Some((size, flags)) = export_info else {
                    return Err(ClientError::HandshakeViolation(
                        "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT",
                    ));
                };
                let default_max = (32u64 << 20).min(size.max(1)) as u32;
                let (min, preferred, max) = sizes.unwrap_or((1, 4096, default_max));
                if min == 0 || !min.is_power_of_two() || max < min {
                    return Err(ClientError::HandshakeViolation("invalid block size limits"));
                }
                return Ok(ExportDetails {
                    name,
                    description,
                    size,
                    flags,
                    min_block: min,
                    preferred_block: preferred.max(min),
                    max_block: max,
                    reply_style: style,
                    base_allocation,
                    session_recorded,
                });
            }
            t if h.is_error() => {
                return Err(ClientError::Refused {
                    option: proto::option_name(proto::OPT_GO),
                    reply: t,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            _ => {
                return Err(ClientError::HandshakeViolation(
                    "unexpected reply to NBD_OPT_GO",
                ));
            }
        }
    }
    Err(ClientError::HandshakeViolation(
        "too many replies to one option",
    ))
}

async fn send_option<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    data: &[u8],
) -> Result<(), ClientError> {
    let length = u32::try_from(data.len())
        .map_err(|_| ClientError::HandshakeViolation("option data too long"))?;
    let mut out = proto::OptionHeader { option, length }.encode().to_vec();
    out.extend_from_slice(data);
    wr.write_all(&out).await.map_err(ClientError::HandshakeIo)?;
    wr.flush().await.map_err(ClientError::HandshakeIo)
}

/// Reads one option reply for `option` (header and data).
async fn option_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    option: u32,
) -> Result<(proto::OptionReplyHeader, Vec<u8>), ClientError> {
    let mut hb = [0u8; proto::OptionReplyHeader::LEN];
    rd.read_exact(&mut hb)
        .await
        .map_err(ClientError::HandshakeIo)?;
    let h = proto::OptionReplyHeader::decode(&hb)?;
    if h.option != option {
        return Err(ClientError::HandshakeViolation(
            "option reply names another option",
        ));
    }
    if h.length > MAX_OPTION_REPLY {
        return Err(ClientError::HandshakeViolation("option reply too long"));
    }
    let mut data = vec![0u8; h.length as usize];
    rd.read_exact(&mut data)
        .await
        .map_err(ClientError::HandshakeIo)?;
    Ok((h, data))
}

/// Reads the reply to an option that is answered with a single ACK or error: `true` on ACK.
async fn simple_ack<R: AsyncRead + Unpin>(rd: &mut R, option: u32) -> Result<bool, ClientError> {
    let (h, _) = option_reply(rd, option).await?;
    match h.reply_type {
        proto::REP_ACK => Ok(true),
        _ if h.is_error() => Ok(false),
        _ => Err(ClientError::HandshakeViolation(
            "unexpected reply to a negotiation option",
        )),
    }
}
