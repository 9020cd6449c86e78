//! The transmission phase on the wire: the writer task that sends requests in batches, and
//! the reader task that matches reply chunks to the requests in flight and checks each against
//! the protocol.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use super::{
    ClientError, InFlight, Inner, Lost, MAX_CHUNKS_PER_REPLY, MAX_META_PAYLOAD, Outcome, Outgoing,
    Progress, Violation,
};
use crate::nbd::backend::Extent;
use crate::nbd::proto::{self, Cmd, ProtoError, ReplyHeader, ReplyStyle};

/// Requests the writer sends before flushing the socket.
const WRITE_BATCH: usize = 64;

/// Sends requests in batches until a disconnect (`Ok`) or a write error.
pub(super) async fn write_requests<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Outgoing>,
    wr: W,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(msg) = next.take() {
            match msg {
                Outgoing::Request { header, payload } => {
                    w.write_all(&header).await?;
                    if let Some(p) = payload {
                        w.write_all(&p).await?;
                    }
                }
                Outgoing::Disconnect { header, done } => {
                    w.write_all(&header).await?;
                    w.flush().await?;
                    let r = w.shutdown().await;
                    let _ = done.send(());
                    return r;
                }
            }
            n += 1;
            if n < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        w.flush().await?;
    }
    // Every sender is gone (the client was dropped).
    w.shutdown().await
}

// ---------------------------------------------------------------------------------------------
// Transmission: the reader.

/// Reads replies until the connection ends; returns why.
pub(super) async fn read_replies<R: AsyncRead + Unpin>(mut rd: R, inner: &Inner) -> Lost {
    let style = inner.details.reply_style;
    let mut hb = [0u8; proto::EXTENDED_REPLY_LEN];
    loop {
        match read_or_eof(&mut rd, &mut hb[..4]).await {
            Ok(true) => {}
            Ok(false) => return Lost::Eof,
            Err(e) => return Lost::io(e),
        }
        let magic = u32::from_be_bytes([hb[0], hb[1], hb[2], hb[3]]);
        let allowed = match magic {
            proto::SIMPLE_REPLY_MAGIC => true,
            proto::STRUCTURED_REPLY_MAGIC => style == ReplyStyle::Structured,
            proto::EXTENDED_REPLY_MAGIC => style == ReplyStyle::Extended,
            _ => false,
        };
        let Some(len) = ReplyHeader::len_for_magic(magic).filter(|_| allowed) else {
            return Lost::Protocol(Violation::Proto(ProtoError::BadMagic {
                what: "reply",
                found: u64::from(magic),
            }));
        };
        if let Err(e) = rd.read_exact(&mut hb[4..len]).await {
            return Lost::io(e);
        }
        let header = match ReplyHeader::decode(&hb[..len]) {
            Ok(h) => h,
            Err(e) => return Lost::Protocol(Violation::Proto(e)),
        };
        let cookie = header.cookie();
        let Some(mut entry) = inner.pending().map.remove(&cookie) else {
            return Lost::Protocol(Violation::UnknownCookie(cookie));
        };
        match on_reply(&mut rd, &mut entry, header, inner).await {
            Ok(Step::More) => {
                let mut p = inner.pending();
                match &p.dead {
                    // The connection died meanwhile: nobody will complete the entry later.
                    Some(lost) => {
                        let lost = lost.clone();
                        drop(p);
                        entry.finish(Err(ClientError::Lost(lost)));
                    }
                    None => {
                        p.map.insert(cookie, entry);
                    }
                }
            }
            Ok(Step::Done(result)) => entry.finish(result),
            Err(lost) => {
                entry.finish(Err(ClientError::Lost(lost.clone())));
                return lost;
            }
        }
    }
}

/// Whether a request's reply is complete.
enum Step {
    More,
    Done(Result<Outcome, ClientError>),
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` on a clean end of stream before the first.
async fn read_or_eof<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        let k = rd.read(&mut buf[n..]).await?;
        if k == 0 {
            return if n == 0 {
                Ok(false)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        n += k;
    }
    Ok(true)
}

fn violation(what: &'static str, cookie: u64) -> Lost {
    Lost::Protocol(Violation::Reply { what, cookie })
}

/// Handles one reply header (and its payload) for `entry`.
async fn on_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    entry: &mut InFlight,
    header: ReplyHeader,
    inner: &Inner,
) -> Result<Step, Lost> {
    let cookie = header.cookie();
    match header {
        ReplyHeader::Simple { error, .. } => {
            if entry.chunks > 0 {
                return Err(violation("simple reply after structured chunks", cookie));
            }
            if error != 0 {
                return Ok(Step::Done(Err(ClientError::Server {
                    cmd: entry.cmd,
                    errno: error,
                    message: String::new(),
                    offset: None,
                })));
            }
            match entry.cmd {
                // With structured replies, data and status travel in chunks only.
                Cmd::Read | Cmd::BlockStatus => Err(violation(
                    "successful simple reply to a read or block status",
                    cookie,
                )),
                _ => Ok(Step::Done(Ok(Outcome::Done))),
            }
        }
        ReplyHeader::Chunk {
            flags,
            chunk_type,
            length,
            ..
        } => {
            entry.chunks += 1;
            if entry.chunks > MAX_CHUNKS_PER_REPLY {
                return Err(violation("too many chunks in one reply", cookie));
            }
            on_chunk(rd, entry, chunk_type, length, cookie, inner).await?;
            if flags & proto::REPLY_FLAG_DONE == 0 {
                return Ok(Step::More);
            }
            complete(entry, cookie).map(Step::Done)
        }
    }
}

/// The final result of a reply whose last chunk arrived.
fn complete(entry: &mut InFlight, cookie: u64) -> Result<Result<Outcome, ClientError>, Lost> {
    if let Some((errno, message, offset)) = entry.error.take() {
        return Ok(Err(ClientError::Server {
            cmd: entry.cmd,
            errno,
            message,
            offset,
        }));
    }
    match std::mem::replace(&mut entry.progress, Progress::Plain) {
        Progress::Read { buf, bytes, .. } => {
            if bytes != entry.len {
                return Err(violation("read reply does not cover the request", cookie));
            }
            Ok(Ok(Outcome::Data(buf)))
        }
        Progress::Status(Some(extents)) => Ok(Ok(Outcome::Extents(extents))),
        Progress::Status(None) => Err(violation("block status reply without status", cookie)),
        Progress::Plain => Ok(Ok(Outcome::Done)),
    }
}

async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, length: u64) -> Result<Vec<u8>, Lost> {
    let mut data = vec![0u8; length as usize];
    rd.read_exact(&mut data).await.map_err(Lost::io)?;
    Ok(data)
}

/// Handles one structured chunk's payload.
async fn on_chunk<R: AsyncRead + Unpin>(
    rd: &mut R,
    entry: &mut InFlight,
    chunk_type: u16,
    length: u64,
    cookie: u64,
    inner: &Inner,
) -> Result<(), Lost> {
    let too_long = |max: u64| {
        if length > max {
            Err(Lost::Protocol(Violation::TooLong {
                chunk_type,
                length,
                cookie,
            }))
        } else {
            Ok(())
        }
    };
    match chunk_type {
        proto::REPLY_TYPE_NONE => {
            if length != 0 {
                return Err(violation("NBD_REPLY_TYPE_NONE with a payload", cookie));
            }
            Ok(())
        }
        proto::REPLY_TYPE_OFFSET_DATA => {
            too_long(8 + entry.len)?;
            if length <= 8 {
                return Err(violation("data chunk without data", cookie));
            }
            let mut ob = [0u8; 8];
            rd.read_exact(&mut ob).await.map_err(Lost::io)?;
            let at = u64::from_be_bytes(ob);
            let n = length - 8;
            let start = claim_range(entry, at, n, cookie)?;
            if let Progress::Read { buf, .. } = &mut entry.progress {
                let dst = &mut buf[start..start + n as usize];
                rd.read_exact(dst).await.map_err(Lost::io)?;
            }
            Ok(())
        }
        proto::REPLY_TYPE_OFFSET_HOLE => {
            // 32-bit hole size; accept a 64-bit one under extended headers too.
            too_long(16)?;
            let p = read_payload(rd, length).await?;
            let (at, n) = match p.len() {
                12 => (
                    be_u64(&p[..8]),
                    u64::from(u32::from_be_bytes([p[8], p[9], p[10], p[11]])),
                ),
                16 if inner.details.reply_style == ReplyStyle::Extended => {
                    (be_u64(&p[..8]), be_u64(&p[8..]))
                }
                _ => return Err(violation("malformed hole chunk", cookie)),
            };
            if n == 0 {
                return Err(violation("empty hole chunk", cookie));
            }
            // The buffer starts zeroed and no other chunk may cover this range.
            claim_range(entry, at, n, cookie).map(|_| ())
        }
        proto::REPLY_TYPE_BLOCK_STATUS | proto::REPLY_TYPE_BLOCK_STATUS_EXT => {
            too_long(MAX_META_PAYLOAD)?;
            let p = read_payload(rd, length).await?;
            if entry.cmd != Cmd::BlockStatus {
                return Err(violation("block status chunk for another command", cookie));
            }
            let extended = chunk_type == proto::REPLY_TYPE_BLOCK_STATUS_EXT;
            let (id, descriptors) = proto::decode_block_status_payload(extended, &p)
                .map_err(|e| Lost::Protocol(Violation::Proto(e)))?;
            if Some(id) != inner.details.base_allocation {
                return Err(violation(
                    "block status for a context never selected",
                    cookie,
                ));
            }
            let Progress::Status(slot) = &mut entry.progress else {
                return Err(violation("block status chunk for another command", cookie));
            };
            if slot.is_some() {
                return Err(violation("two block status chunks for one context", cookie));
            }
            let mut extents = Vec::with_capacity(descriptors.len());
            for (len, flags) in descriptors {
                if len == 0 {
                    return Err(violation("zero-length block status descriptor", cookie));
                }
                extents.push(Extent {
                    length: len,
                    hole: flags & proto::STATE_HOLE != 0,
                    zero: flags & proto::STATE_ZERO != 0,
                });
            }
            *slot = Some(extents);
            Ok(())
        }
        t if t & (1 << 15) != 0 => {
            too_long(6 + proto::MAX_STRING_BYTES as u64 + 8)?;
            let p = read_payload(rd, length).await?;
            let (errno, message, offset) =
                if t == proto::REPLY_TYPE_ERROR || t == proto::REPLY_TYPE_ERROR_OFFSET {
                    proto::decode_error_payload(t, &p)
                        .map_err(|e| Lost::Protocol(Violation::Proto(e)))?
                } else {
                    // An error type this client does not know: its first field is the error value.
                    let errno = p
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                        .unwrap_or(proto::EIO);
                    (errno, String::new(), None)
                };
            if errno == 0 {
                return Err(violation("error chunk with error value 0", cookie));
            }
            if let Some(o) = offset
                && (o < entry.offset || o - entry.offset >= entry.len.max(1))
            {
                return Err(violation("error offset outside the request", cookie));
            }
            entry.error.get_or_insert((errno, message, offset));
            Ok(())
        }
        _ => Err(violation("unknown chunk type", cookie)),
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Checks that `[at, at + n)` lies inside the read and overlaps nothing already received;
/// records it and returns its start relative to the request.
fn claim_range(entry: &mut InFlight, at: u64, n: u64, cookie: u64) -> Result<usize, Lost> {
    let Progress::Read { covered, bytes, .. } = &mut entry.progress else {
        return Err(violation("read data for another command", cookie));
    };
    let (req_start, req_end) = (entry.offset, entry.offset + entry.len);
    let end = at
        .checked_add(n)
        .ok_or_else(|| violation("chunk range overflows", cookie))?;
    if at < req_start || end > req_end {
        return Err(violation("chunk outside the requested range", cookie));
    }
    let mut start = at;
    let mut stop = end;
    if let Some((&s, &e)) = covered.range(..=at).next_back() {
        if e > at {
            return Err(violation("overlapping read chunks", cookie));
        }
        if e == at {
            covered.remove(&s);
            start = s;
        }
    }
    if let Some((&s, &e)) = covered.range(at..).next() {
        if s < end {
            return Err(violation("overlapping read chunks", cookie));
        }
        if s == end {
            covered.remove(&s);
            stop = e;
        }
    }
    covered.insert(start, stop);
    *bytes += n;
    Ok((at - req_start) as usize)
}
