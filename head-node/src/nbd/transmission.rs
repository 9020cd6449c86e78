//! The transmission phase of one connection.
//!
//! The connection task reads request headers (and write payloads, straight into
//! [`AlignedBuf`]s), validates each request, and spawns one task per valid request that calls
//! the [`Volume`]. Replies, including immediate error replies, go through one bounded channel to
//! the connection's single writer task, which frames them for the negotiated style, batches them
//! into one flush and records latency. Replies are therefore out of order, matched by cookie.
//!
//! Bounds: each request holds a permit from a request semaphore, and each READ/WRITE holds
//! permits for its payload bytes from the connection's byte semaphore and from the server-wide
//! one, until its reply is written. When any runs out, the reader stops reading from the socket
//! (back-pressure, never an error).
//!
//! Ending: on `NBD_CMD_DISC`, the client closing its side, the export being detached
//! ([`Volume::closed`]) or server shutdown, the reader stops taking requests, every request in
//! flight is answered, and the socket is closed. After a detach or shutdown, requests that keep
//! arriving meanwhile are answered `ESHUTDOWN` (as the specification asks); once the last reply
//! is out, the client's input is read and dropped until it closes (briefly), because closing
//! with unread input makes the kernel reset the connection under replies not yet sent. A
//! protocol violation (bad magic, a payload beyond the maximum with extended headers, a
//! truncated message) disconnects at once; work already handed to the volume still completes,
//! its replies are dropped.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use common::AlignedBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, warn};

use super::backend::{Extent, Volume, VolumeError};
use super::metrics::{GaugeGuard, VolumeMetrics, op_index};
use super::proto::{self, Cmd, HeaderStyle, ProtoError, ReplyStyle, Request};
use super::server::{Session, Shared, WarnLimit};
use super::stall::{self, StallGuard};
use crate::volume::session;

/// Most descriptors in one block status reply (the specification suggests at most 2^20; the
/// client asks again for the rest).
pub(crate) const MAX_DESCRIPTORS: usize = 1 << 16;
/// Bytes of one block status descriptor in the larger (extended) form.
const DESCRIPTOR_BYTES: u32 = 16;
/// Replies the writer encodes before flushing the socket.
const WRITE_BATCH: usize = 64;

/// Why the transmission phase ended.
#[derive(Debug)]
pub(crate) enum CloseReason {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed its side (or reset the connection) without `NBD_CMD_DISC`.
    ClientGone,
    /// The export is being detached.
    ExportClosed,
    /// The server is stopping.
    Shutdown,
    /// Writing replies failed.
    WriteFailed(std::io::Error),
    /// The client made no progress for the stall timeout while the server waited on it.
    Stalled(std::io::Error),
    /// The client broke the protocol.
    Violation(String),
}

impl CloseReason {
    /// The `reason` label of `stockade_nbd_connections_closed_total`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            CloseReason::Disconnect => "disc",
            CloseReason::ClientGone => "eof",
            CloseReason::ExportClosed => "export_closed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::WriteFailed(_) => "io_error",
            CloseReason::Stalled(_) => "stalled",
            CloseReason::Violation(_) => "protocol_error",
        }
    }
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
        context_id: u32,
    },
}

impl Op {
    /// Payload bytes this request keeps in memory while in flight. A block status reply is
    /// counted at its largest ([`MAX_DESCRIPTORS`] descriptors of 16 bytes, 1 MiB), or clients
    /// could hold that much per request outside every bound.
    fn payload_bytes(&self) -> u32 {
        match *self {
            Op::Read { len, .. } | Op::Write { len, .. } => len,
            Op::BlockStatus { req_one: true, .. } => DESCRIPTOR_BYTES,
            Op::BlockStatus { req_one: false, .. } => MAX_DESCRIPTORS as u32 * DESCRIPTOR_BYTES,
            _ => 0,
        }
    }
}

/// A request refused before reaching the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) errno: u32,
    pub(crate) message: Cow<'static, str>,
}

fn refuse(errno: u32, message: impl Into<Cow<'static, str>>) -> Refusal {
    Refusal {
        errno,
        message: message.into(),
    }
}

/// The parts of a session validation needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub(crate) size: u64,
    pub(crate) flags: u16,
    pub(crate) read_only: bool,
    pub(crate) min_block: u32,
    pub(crate) max_payload: u32,
    pub(crate) header_style: HeaderStyle,
    pub(crate) base_allocation: Option<u32>,
    pub(crate) enforce_alignment: bool,
}

impl Rules {
    /// Bytes following a request's header: a write's data, or, with extended headers, any
    /// payload announced by `NBD_CMD_FLAG_PAYLOAD_LEN`.
    fn payload_len(&self, req: &Request) -> u64 {
        let announced = self.header_style == HeaderStyle::Extended
            && req.flags & proto::CMD_FLAG_PAYLOAD_LEN != 0;
        if req.cmd() == Some(Cmd::Write) || announced {
            req.length
        } else {
            0
        }
    }

    fn of<V>(s: &Session<V>) -> Self {
        Self {
            size: s.size,
            flags: s.flags,
            read_only: s.read_only,
            min_block: s.limits.min,
            max_payload: s.limits.max,
            header_style: s.reply_style.header_style(),
            base_allocation: s.base_allocation,
            enforce_alignment: s.enforce_alignment,
        }
    }

    /// Command flags valid for `cmd` on this connection.
    fn allowed_flags(&self, cmd: Cmd) -> u16 {
        let mut allowed = cmd.allowed_flags();
        if self.flags & proto::TFLAG_SEND_DF == 0 {
            allowed &= !proto::CMD_FLAG_DF;
        }
        if self.flags & proto::TFLAG_SEND_FAST_ZERO == 0 {
            allowed &= !proto::CMD_FLAG_FAST_ZERO;
        }
        if self.header_style == HeaderStyle::Compact {
            allowed &= !proto::CMD_FLAG_PAYLOAD_LEN;
        }
        allowed
    }

    /// Checks `[offset, offset + len)` against the export: `beyond` is the error for a range
    /// past the end (ENOSPC for writes, EINVAL otherwise).
    fn range(&self, offset: u64, len: u64, beyond: u32) -> Result<(), Refusal> {
        if len == 0 {
            return Err(refuse(proto::EINVAL, "zero-length request"));
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => {}
            _ => {
                return Err(refuse(
                    beyond,
                    format!("range {offset}+{len} exceeds the export size {}", self.size),
                ));
            }
        }
        if self.enforce_alignment {
            let min = u64::from(self.min_block);
            if !offset.is_multiple_of(min)
                || (!len.is_multiple_of(min) && offset + len != self.size)
            {
                return Err(refuse(
                    proto::EINVAL,
                    format!("range {offset}+{len} is not aligned to {min} bytes"),
                ));
            }
        }
        Ok(())
    }

    fn writable(&self) -> Result<(), Refusal> {
        if self.read_only {
            Err(refuse(proto::EPERM, "export is read-only"))
        } else {
            Ok(())
        }
    }

    fn payload(&self, len: u64) -> Result<u32, Refusal> {
        match u32::try_from(len) {
            Ok(l) if l <= self.max_payload => Ok(l),
            _ => Err(refuse(
                proto::EINVAL,
                format!(
                    "length {len} exceeds the maximum payload {}",
                    self.max_payload
                ),
            )),
        }
    }

    /// Validates a request (not `NBD_CMD_DISC`, handled by the caller).
    pub(crate) fn validate(&self, req: &Request) -> Result<Op, Refusal> {
        let Some(cmd) = req.cmd() else {
            return Err(refuse(
                proto::EINVAL,
                format!("unknown command {}", req.kind),
            ));
        };
        let bad = req.flags & !self.allowed_flags(cmd);
        if bad != 0 {
            return Err(refuse(
                proto::EINVAL,
                format!("flags {bad:#x} are not valid for {cmd}"),
            ));
        }
        let has = |f: u16| req.flags & f != 0;
        let (offset, len) = (req.offset, req.length);
        match cmd {
            Cmd::Read => {
                let l = self.payload(len)?;
                self.range(offset, len, proto::EINVAL)?;
                Ok(Op::Read { offset, len: l })
            }
            Cmd::Write => {
                // With extended headers a write's length is its payload length whether or not
                // NBD_CMD_FLAG_PAYLOAD_LEN is set (QEMU does not set it).
                self.writable()?;
                let l = self.payload(len)?;
                self.range(offset, len, proto::ENOSPC)?;
                Ok(Op::Write {
                    offset,
                    len: l,
                    fua: has(proto::CMD_FLAG_FUA),
                })
            }
            Cmd::Flush => {
                if offset != 0 || len != 0 {
                    return Err(refuse(
                        proto::EINVAL,
                        "NBD_CMD_FLUSH offset and length must be zero",
                    ));
                }
                Ok(Op::Flush)
            }
            Cmd::Trim => {
                self.writable()?;
                self.range(offset, len, proto::EINVAL)?;
                Ok(Op::Trim {
                    offset,
                    len,
                    fua: has(proto::CMD_FLAG_FUA),
                })
            }
            Cmd::WriteZeroes => {
                self.writable()?;
                self.range(offset, len, proto::ENOSPC)?;
                Ok(Op::WriteZeroes {
                    offset,
                    len,
                    no_hole: has(proto::CMD_FLAG_NO_HOLE),
                    fast_only: has(proto::CMD_FLAG_FAST_ZERO),
                    fua: has(proto::CMD_FLAG_FUA),
                })
            }
            Cmd::Cache => {
                self.range(offset, len, proto::EINVAL)?;
                Ok(Op::Cache { offset, len })
            }
            Cmd::BlockStatus => {
                let Some(context_id) = self.base_allocation else {
                    return Err(refuse(
                        proto::EINVAL,
                        "no metadata context was negotiated for this export",
                    ));
                };
                self.range(offset, len, proto::EINVAL)?;
                Ok(Op::BlockStatus {
                    offset,
                    len,
                    req_one: has(proto::CMD_FLAG_REQ_ONE),
                    context_id,
                })
            }
            Cmd::Disc => Err(refuse(proto::EINVAL, "NBD_CMD_DISC is not validated")),
        }
    }
}

/// Turns a backend's extents into block status descriptors `(length, flags)` for a request of
/// `len` bytes: zero-length extents are skipped, the list is clipped to the request, adjacent
/// extents with identical flags are merged (and only those), `req_one` keeps only the first
/// descriptor, and at most `max` descriptors are returned.
pub(crate) fn shape_extents(
    extents: &[Extent],
    len: u64,
    req_one: bool,
    max: usize,
) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        if covered >= len {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let l = e.length.min(len - covered);
        let flags = e.flags();
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += l,
            _ => {
                if out.len() >= max || (req_one && !out.is_empty()) {
                    break;
                }
                out.push((l, flags));
            }
        }
        covered += l;
    }
    out
}

/// What a reply says.
#[derive(Debug)]
enum Body {
    Ok,
    Data(AlignedBuf),
    Status {
        context_id: u32,
        descriptors: Vec<(u64, u32)>,
    },
    Error {
        errno: u32,
        message: Cow<'static, str>,
        offset: Option<u64>,
    },
}

/// A reply on its way to the writer. Dropping it releases the request's in-flight permits.
#[derive(Debug)]
struct Reply {
    cookie: u64,
    /// The request's offset (echoed in extended headers).
    offset: u64,
    /// The request's length (bounds an error offset).
    length: u64,
    op: usize,
    cmd: Option<Cmd>,
    started: Instant,
    body: Body,
    _slot: OwnedSemaphorePermit,
    _bytes: Option<BytePermits>,
    _in_flight: GaugeGuard,
}

/// Room for a payload in the connection's, the volume's and the server's in-flight byte bounds.
#[derive(Debug)]
struct BytePermits {
    _connection: OwnedSemaphorePermit,
    _volume: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
}

/// Runs the transmission phase until the connection ends.
pub(crate) async fn run<E, V: Volume>(
    shared: &Shared<E>,
    session: Session<V>,
    mut rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    mut stop: watch::Receiver<bool>,
    peer: SocketAddr,
) -> CloseReason {
    let cfg = &shared.config;
    let metrics = shared.metrics.volume(&session.name);
    let _conn = GaugeGuard::new(&metrics.connections);
    let rules = Rules::of(&session);
    let style = session.reply_style;
    let header_len = rules.header_style.request_len();
    let (tx, rx) = mpsc::channel::<Reply>(cfg.max_inflight_requests as usize + 1);
    let mut writer = tokio::spawn(write_replies(
        rx,
        BufWriter::with_capacity(256 << 10, StallGuard::new(wr, cfg.stall())),
        WriterCtx {
            style,
            metrics: metrics.clone(),
            warn: shared.warn.clone(),
            volume: session.name.clone(),
            peer,
        },
    ));
    let slots = Arc::new(Semaphore::new(cfg.max_inflight_requests as usize));
    let bytes = Arc::new(Semaphore::new(
        cfg.max_inflight_bytes.bytes().min(u64::from(u32::MAX)) as usize,
    ));
    let volume_bytes = shared.volume_bytes(&session.name);
    let volume = session.volume.clone();
    let client = session.client;
    let closed = volume.closed();
    tokio::pin!(closed);
    let mut header = [0u8; Request::EXTENDED_LEN];
    let mut writer_done = None;

    let reason = loop {
        let got = tokio::select! {
            biased;
            _ = &mut closed => break CloseReason::ExportClosed,
            _ = stop.wait_for(|s| *s) => break CloseReason::Shutdown,
            res = &mut writer => {
                writer_done = Some(res);
                break CloseReason::WriteFailed(std::io::Error::other("reply writer stopped"));
            }
            r = read_header(&mut rd, &mut header[..header_len]) => r,
        };
        match got {
            Ok(true) => {}
            Ok(false) => break CloseReason::ClientGone,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break CloseReason::Violation("connection closed inside a request header".into());
            }
            Err(_) => break CloseReason::ClientGone,
        }
        let req = match Request::decode(rules.header_style, &header[..header_len]) {
            Ok(r) => r,
            Err(e) => break CloseReason::Violation(e.to_string()),
        };
        let cmd = req.cmd();
        let op_i = op_index(cmd);
        metrics.request(op_i);
        if cmd == Some(Cmd::Disc) {
            break CloseReason::Disconnect;
        }
        let started = Instant::now();
        let payload = rules.payload_len(&req);
        if rules.header_style == HeaderStyle::Extended && payload > u64::from(rules.max_payload) {
            break CloseReason::Violation(format!(
                "payload of {payload} bytes exceeds the maximum {}",
                rules.max_payload
            ));
        }
        let Some(slot) = acquire(&slots, 1, &metrics).await else {
            break CloseReason::Shutdown;
        };
        let in_flight = GaugeGuard::new(&metrics.in_flight);
        let verdict = rules.validate(&req);
        let (op, byte_permit) = match verdict {
            Ok(op) => {
                let n = op.payload_bytes();
                if n == 0 {
                    (op, None)
                } else {
                    // The connection's bound first, so one connection cannot queue for more of
                    // the server's room than its own share.
                    let Some(connection) = acquire(&bytes, n, &metrics).await else {
                        break CloseReason::Shutdown;
                    };
                    // Then the volume's share, so that one volume held back cannot take all of
                    // the server's room; both are shared: waiting for them must not keep this
                    // connection from seeing a detach or a shutdown.
                    let share = tokio::select! {
                        biased;
                        _ = &mut closed => break CloseReason::ExportClosed,
                        _ = stop.wait_for(|s| *s) => break CloseReason::Shutdown,
                        p = acquire(&volume_bytes, n, &metrics) => p,
                    };
                    let Some(share) = share else {
                        break CloseReason::Shutdown;
                    };
                    let server = tokio::select! {
                        biased;
                        _ = &mut closed => break CloseReason::ExportClosed,
                        _ = stop.wait_for(|s| *s) => break CloseReason::Shutdown,
                        p = acquire(&shared.server_bytes, n, &metrics) => p,
                    };
                    let Some(server) = server else {
                        break CloseReason::Shutdown;
                    };
                    (
                        op,
                        Some(BytePermits {
                            _connection: connection,
                            _volume: share,
                            _server: server,
                        }),
                    )
                }
            }
            Err(refusal) => {
                if payload > 0
                    && let Err(e) = stall::drain(&mut rd, payload, cfg.stall()).await
                {
                    debug!(%peer, error = %e, "draining a refused payload failed");
                    break if stall::is_stall(&e) {
                        CloseReason::Stalled(e)
                    } else {
                        CloseReason::ClientGone
                    };
                }
                debug!(%peer, cookie = req.cookie, op = ?cmd, errno = refusal.errno,
                    message = %refusal.message, "NBD request refused");
                let reply = Reply {
                    cookie: req.cookie,
                    offset: req.offset,
                    length: req.length,
                    op: op_i,
                    cmd,
                    started,
                    body: Body::Error {
                        errno: refusal.errno,
                        message: refusal.message,
                        offset: None,
                    },
                    _slot: slot,
                    _bytes: None,
                    _in_flight: in_flight,
                };
                if tx.send(reply).await.is_err() {
                    break CloseReason::WriteFailed(std::io::Error::other("reply writer stopped"));
                }
                continue;
            }
        };
        let data = if let Op::Write { len, .. } = op {
            let mut buf = AlignedBuf::zeroed(len as usize);
            if let Err(e) = stall::read_exact(&mut rd, &mut buf, cfg.stall()).await {
                break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    CloseReason::Violation("connection closed inside a write payload".into())
                } else if stall::is_stall(&e) {
                    CloseReason::Stalled(e)
                } else {
                    CloseReason::ClientGone
                };
            }
            Some(buf)
        } else {
            None
        };
        let vol = volume.clone();
        let tx = tx.clone();
        let m = metrics.clone();
        tokio::spawn(async move {
            let body = session::scope(client, execute(&*vol, op, data, &m)).await;
            let reply = Reply {
                cookie: req.cookie,
                offset: req.offset,
                length: req.length,
                op: op_i,
                cmd,
                started,
                body,
                _slot: slot,
                _bytes: byte_permit,
                _in_flight: in_flight,
            };
            // If the writer is gone the connection is closing; the reply has nowhere to go.
            let _ = tx.send(reply).await;
        });
    };

    if matches!(reason, CloseReason::ExportClosed | CloseReason::Shutdown) && writer_done.is_none()
    {
        // Requests the client sent before it saw the end are answered ESHUTDOWN, as the
        // specification asks, until everything taken before the end has been answered.
        let late = Late {
            rules: &rules,
            header_len,
            slots: &slots,
            max_slots: cfg.max_inflight_requests,
            tx: &tx,
            metrics: &metrics,
            stall: cfg.stall(),
        };
        late.answer(&mut rd).await;
    }
    drop(tx);
    if let CloseReason::Violation(_) = reason {
        writer.abort();
        return reason;
    }
    // Every request task holds a sender: the writer ends once the last reply is written. A
    // client may still be sending (requests it sent before it saw the end): that input is read
    // and dropped, because closing a socket with unread input makes the kernel reset the
    // connection and discard the replies it has not sent yet.
    let graceful = matches!(
        reason,
        CloseReason::ExportClosed | CloseReason::Shutdown | CloseReason::Disconnect
    );
    let written = match writer_done {
        Some(res) => res,
        None if graceful => discard_input_until(&mut rd, &mut writer).await,
        None => writer.await,
    };
    if graceful && matches!(written, Ok(Ok(()))) {
        // The replies and the end of stream are queued: wait (bounded) for the client to
        // read them and close its side, still dropping what it sends.
        let _ = tokio::time::timeout(LINGER, discard_input(&mut rd, LINGER_BYTES)).await;
    }
    match written {
        Ok(Ok(())) => reason,
        // A client that left cannot be written to; that is not a separate failure.
        _ if matches!(reason, CloseReason::ClientGone) => reason,
        Ok(Err(e)) if stall::is_stall(&e) => CloseReason::Stalled(e),
        Ok(Err(e)) => CloseReason::WriteFailed(e),
        Err(e) => CloseReason::WriteFailed(std::io::Error::other(e)),
    }
}

/// What answering the requests that arrive after a detach or shutdown needs.
struct Late<'a> {
    rules: &'a Rules,
    header_len: usize,
    slots: &'a Arc<Semaphore>,
    max_slots: u32,
    tx: &'a mpsc::Sender<Reply>,
    metrics: &'a Arc<VolumeMetrics>,
    stall: stall::Stall,
}

impl Late<'_> {
    /// Reads requests and answers each `ESHUTDOWN` (dropping a write's payload) until every
    /// request taken before the end has been answered, the client sends `NBD_CMD_DISC` or
    /// closes, or it breaks the protocol.
    async fn answer<R: AsyncRead + Unpin>(&self, rd: &mut R) {
        let mut header = [0u8; Request::EXTENDED_LEN];
        loop {
            let got = tokio::select! {
                biased;
                // Every slot free: every earlier reply has been written.
                all = self.slots.acquire_many(self.max_slots) => {
                    drop(all);
                    return;
                }
                r = read_header(rd, &mut header[..self.header_len]) => r,
            };
            if !matches!(got, Ok(true)) {
                return;
            }
            let Ok(req) = Request::decode(self.rules.header_style, &header[..self.header_len])
            else {
                return;
            };
            let cmd = req.cmd();
            if cmd == Some(Cmd::Disc) {
                return;
            }
            let payload = self.rules.payload_len(&req);
            if payload > u64::from(self.rules.max_payload)
                || (payload > 0 && stall::drain(rd, payload, self.stall).await.is_err())
            {
                return;
            }
            let Some(slot) = acquire(self.slots, 1, self.metrics).await else {
                return;
            };
            let op = op_index(cmd);
            self.metrics.request(op);
            let reply = Reply {
                cookie: req.cookie,
                offset: req.offset,
                length: req.length,
                op,
                cmd,
                started: Instant::now(),
                body: Body::Error {
                    errno: proto::ESHUTDOWN,
                    message: Cow::Borrowed("the export is closing"),
                    offset: None,
                },
                _slot: slot,
                _bytes: None,
                _in_flight: GaugeGuard::new(&self.metrics.in_flight),
            };
            if self.tx.send(reply).await.is_err() {
                return;
            }
        }
    }
}

/// How long a gracefully closed connection waits for the client to close its side after the
/// last reply.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// Most input dropped while lingering.
const LINGER_BYTES: u64 = 64 << 20;

/// Reads and drops input until `writer` ends (or the input does); answers the writer's result.
async fn discard_input_until<R: AsyncRead + Unpin>(
    rd: &mut R,
    writer: &mut tokio::task::JoinHandle<std::io::Result<()>>,
) -> Result<std::io::Result<()>, tokio::task::JoinError> {
    let mut scratch = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            res = &mut *writer => return res,
            r = rd.read(&mut scratch) => {
                if !matches!(r, Ok(n) if n > 0) {
                    return writer.await;
                }
            }
        }
    }
}

/// Reads and drops input until the end of stream, an error, or `limit` bytes.
async fn discard_input<R: AsyncRead + Unpin>(rd: &mut R, limit: u64) {
    let mut sink = tokio::io::sink();
    let _ = tokio::io::copy(&mut rd.take(limit), &mut sink).await;
}

/// Takes `n` permits, counting a back-pressure wait when none are free right away. `None` only
/// if the semaphore was closed (it never is).
async fn acquire(
    sem: &Arc<Semaphore>,
    n: u32,
    metrics: &VolumeMetrics,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(p) = sem.clone().try_acquire_many_owned(n) {
        return Some(p);
    }
    metrics.backpressure.inc();
    sem.clone().acquire_many_owned(n).await.ok()
}

/// Reads a whole header; `Ok(false)` on a clean end of stream before its first byte.
async fn read_header<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut [u8]) -> std::io::Result<bool> {
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

fn volume_error(cmd: Cmd, e: VolumeError) -> Body {
    Body::Error {
        errno: e.nbd_errno(cmd),
        offset: e.offset(),
        message: Cow::Owned(e.to_string()),
    }
}

/// Runs one validated request against the volume.
async fn execute<V: Volume>(
    vol: &V,
    op: Op,
    data: Option<AlignedBuf>,
    metrics: &VolumeMetrics,
) -> Body {
    match op {
        Op::Read { offset, len } => match vol.read(offset, len).await {
            Ok(buf) if buf.len() == len as usize => {
                metrics.read_bytes.inc_by(u64::from(len));
                Body::Data(buf)
            }
            Ok(buf) => Body::Error {
                errno: proto::EIO,
                message: Cow::Owned(format!(
                    "volume returned {} bytes for a {len}-byte read",
                    buf.len()
                )),
                offset: None,
            },
            Err(e) => volume_error(Cmd::Read, e),
        },
        Op::Write { offset, len, fua } => {
            let Some(buf) = data else {
                return Body::Error {
                    errno: proto::EIO,
                    message: Cow::Borrowed("write payload missing"),
                    offset: None,
                };
            };
            match vol.write(offset, buf, fua).await {
                Ok(()) => {
                    metrics.written_bytes.inc_by(u64::from(len));
                    Body::Ok
                }
                Err(e) => volume_error(Cmd::Write, e),
            }
        }
        Op::Flush => match vol.flush().await {
            Ok(()) => Body::Ok,
            Err(e) => volume_error(Cmd::Flush, e),
        },
        Op::Trim { offset, len, fua } => match vol.trim(offset, len, fua).await {
            Ok(()) => Body::Ok,
            Err(e) => volume_error(Cmd::Trim, e),
        },
        Op::WriteZeroes {
            offset,
            len,
            no_hole,
            fast_only,
            fua,
        } => match vol.write_zeroes(offset, len, no_hole, fast_only, fua).await {
            Ok(()) => Body::Ok,
            Err(e) => volume_error(Cmd::WriteZeroes, e),
        },
        Op::Cache { offset, len } => match vol.cache(offset, len).await {
            Ok(()) => Body::Ok,
            Err(e) => volume_error(Cmd::Cache, e),
        },
        Op::BlockStatus {
            offset,
            len,
            req_one,
            context_id,
        } => match vol.block_status(offset, len).await {
            Ok(extents) => {
                let descriptors = shape_extents(&extents, len, req_one, MAX_DESCRIPTORS);
                if descriptors.is_empty() {
                    Body::Error {
                        errno: proto::EIO,
                        message: Cow::Borrowed("volume returned no extent"),
                        offset: None,
                    }
                } else {
                    Body::Status {
                        context_id,
                        descriptors,
                    }
                }
            }
            Err(e) => volume_error(Cmd::BlockStatus, e),
        },
    }
}

/// The single writer of a connection: frames replies, flushes in batches, records latency.
async fn write_replies(
    mut rx: mpsc::Receiver<Reply>,
    mut w: BufWriter<StallGuard<OwnedWriteHalf>>,
    ctx: WriterCtx,
) -> std::io::Result<()> {
    let mut header = Vec::with_capacity(64);
    let mut done: Vec<(usize, Instant)> = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            note_reply(&reply, &ctx);
            write_reply(&mut w, &mut header, ctx.style, &reply).await?;
            done.push((reply.op, reply.started));
            drop(reply);
            if done.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        w.flush().await?;
        for (op, started) in done.drain(..) {
            ctx.metrics.observe(op, started.elapsed().as_secs_f64());
        }
    }
    w.shutdown().await
}

/// Counts and logs an error reply.
fn note_reply(reply: &Reply, ctx: &WriterCtx) {
    if let Body::Error { errno, message, .. } = &reply.body {
        ctx.metrics.error(reply.op, proto::errno_name(*errno));
        // Volume failures are worth a warning, rate-limited so a failing volume cannot flood the
        // log; client mistakes (EINVAL and friends) are logged at debug when refused.
        if matches!(*errno, proto::EIO | proto::ENOSPC | proto::ESHUTDOWN)
            && let Some(suppressed) = ctx.warn.check()
        {
            warn!(peer = %ctx.peer, volume = ctx.volume, op = ?reply.cmd, errno, %message,
                suppressed, "NBD request failed");
        }
    }
}

/// What the writer needs besides the socket.
#[derive(Debug)]
struct WriterCtx {
    style: ReplyStyle,
    metrics: Arc<VolumeMetrics>,
    warn: Arc<WarnLimit>,
    volume: String,
    peer: SocketAddr,
}

fn proto_io(e: ProtoError) -> std::io::Error {
    std::io::Error::other(e)
}

/// Frames one reply in the negotiated style.
async fn write_reply(
    w: &mut BufWriter<StallGuard<OwnedWriteHalf>>,
    h: &mut Vec<u8>,
    style: ReplyStyle,
    r: &Reply,
) -> std::io::Result<()> {
    h.clear();
    let done = proto::REPLY_FLAG_DONE;
    let chunk = |h: &mut Vec<u8>, chunk_type: u16, len: u64| {
        proto::encode_chunk_header(h, style, done, chunk_type, r.cookie, r.offset, len)
            .map_err(proto_io)
    };
    match (&r.body, style) {
        (Body::Ok, ReplyStyle::Simple | ReplyStyle::Structured) => {
            proto::encode_simple_reply(h, 0, r.cookie);
        }
        (Body::Ok, ReplyStyle::Extended) => chunk(h, proto::REPLY_TYPE_NONE, 0)?,
        (Body::Data(d), ReplyStyle::Simple) => {
            proto::encode_simple_reply(h, 0, r.cookie);
            w.write_all(h).await?;
            return w.write_all(d).await;
        }
        (Body::Data(d), _) => {
            chunk(h, proto::REPLY_TYPE_OFFSET_DATA, 8 + d.len() as u64)?;
            h.extend_from_slice(&r.offset.to_be_bytes());
            w.write_all(h).await?;
            return w.write_all(d).await;
        }
        (Body::Error { errno, .. }, ReplyStyle::Simple) => {
            proto::encode_simple_reply(h, *errno, r.cookie);
        }
        (
            Body::Error {
                errno,
                message,
                offset,
            },
            _,
        ) => {
            let mut payload = Vec::with_capacity(16 + message.len());
            // ERROR_OFFSET is valid for the commands with a range, and only for an offset
            // inside the request.
            let ranged = !matches!(r.cmd, None | Some(Cmd::Flush) | Some(Cmd::Disc));
            let inside = |o: u64| o >= r.offset && o - r.offset < r.length;
            match offset {
                Some(o) if ranged && inside(*o) => {
                    proto::encode_error_offset_payload(&mut payload, *errno, message, *o);
                    chunk(h, proto::REPLY_TYPE_ERROR_OFFSET, payload.len() as u64)?;
                }
                _ => {
                    proto::encode_error_payload(&mut payload, *errno, message);
                    chunk(h, proto::REPLY_TYPE_ERROR, payload.len() as u64)?;
                }
            }
            h.extend_from_slice(&payload);
        }
        (Body::Status { .. }, ReplyStyle::Simple) => {
            // Unreachable: meta contexts need structured replies. Answer rather than desync.
            proto::encode_simple_reply(h, proto::EIO, r.cookie);
        }
        (
            Body::Status {
                context_id,
                descriptors,
            },
            _,
        ) => {
            // With extended headers the 64-bit descriptors are mandatory.
            let extended = style == ReplyStyle::Extended;
            let t = if extended {
                proto::REPLY_TYPE_BLOCK_STATUS_EXT
            } else {
                proto::REPLY_TYPE_BLOCK_STATUS
            };
            let plen = proto::block_status_payload_len(extended, descriptors.len());
            chunk(h, t, plen)?;
            proto::encode_block_status_payload(h, extended, *context_id, descriptors)
                .map_err(proto_io)?;
        }
    }
    w.write_all(h).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rules(style: HeaderStyle) -> Rules {
        Rules {
            size: 1 << 20,
            flags: proto::TFLAG_HAS_FLAGS
                | proto::TFLAG_SEND_FLUSH
                | proto::TFLAG_SEND_FUA
                | proto::TFLAG_SEND_TRIM
                | proto::TFLAG_SEND_WRITE_ZEROES
                | proto::TFLAG_SEND_FAST_ZERO
                | proto::TFLAG_SEND_CACHE
                | proto::TFLAG_SEND_DF,
            read_only: false,
            min_block: 512,
            max_payload: 64 << 10,
            header_style: style,
            base_allocation: Some(1),
            enforce_alignment: false,
        }
    }

    fn req(cmd: Cmd, flags: u16, offset: u64, length: u64) -> Request {
        Request {
            flags,
            kind: cmd.wire(),
            cookie: 1,
            offset,
            length,
        }
    }

    fn errno(r: Result<Op, Refusal>) -> u32 {
        r.map(|_| 0).unwrap_or_else(|e| e.errno)
    }

    #[test]
    fn validation_follows_the_specification() {
        let r = rules(HeaderStyle::Compact);
        let size = r.size;
        assert_eq!(
            r.validate(&req(Cmd::Read, 0, 0, 4096)),
            Ok(Op::Read {
                offset: 0,
                len: 4096
            })
        );
        // Out of range: EINVAL for reads, trims, cache and block status; ENOSPC for writes.
        assert_eq!(
            errno(r.validate(&req(Cmd::Read, 0, size - 1, 2))),
            proto::EINVAL
        );
        assert_eq!(
            errno(r.validate(&req(Cmd::Trim, 0, size, 1))),
            proto::EINVAL
        );
        assert_eq!(
            errno(r.validate(&req(Cmd::Cache, 0, size, 1))),
            proto::EINVAL
        );
        assert_eq!(
            errno(r.validate(&req(Cmd::BlockStatus, 0, size, 1))),
            proto::EINVAL
        );
        assert_eq!(
            errno(r.validate(&req(Cmd::Write, 0, size - 1, 2))),
            proto::ENOSPC
        );
        assert_eq!(
            errno(r.validate(&req(Cmd::WriteZeroes, 0, size, 1))),
            proto::ENOSPC
        );
        // Offset + length overflowing 64 bits.
        assert_eq!(
            errno(r.validate(&req(Cmd::Read, 0, u64::MAX, 1))),
            proto::EINVAL
        );
        // Zero lengths, oversized payloads, unknown commands and flags.
        assert_eq!(errno(r.validate(&req(Cmd::Read, 0, 0, 0))), proto::EINVAL);
        assert_eq!(errno(r.validate(&req(Cmd::Trim, 0, 0, 0))), proto::EINVAL);
        assert_eq!(
            errno(r.validate(&req(Cmd::Read, 0, 0, (64 << 10) + 1))),
            proto::EINVAL
        );
        assert_eq!(
            errno(r.validate(&Request {
                kind: 42,
                ..req(Cmd::Read, 0, 0, 1)
            })),
            proto::EINVAL
        );
        assert_eq!(
            errno(r.validate(&req(Cmd::Read, proto::CMD_FLAG_NO_HOLE, 0, 512))),
            proto::EINVAL
        );
        assert_eq!(
            errno(r.validate(&req(Cmd::Read, 1 << 9, 0, 512))),
            proto::EINVAL
        );
        assert_eq!(
            errno(r.validate(&req(Cmd::Write, proto::CMD_FLAG_PAYLOAD_LEN, 0, 512))),
            proto::EINVAL,
            "PAYLOAD_LEN needs extended headers"
        );
        assert_eq!(errno(r.validate(&req(Cmd::Flush, 0, 1, 0))), proto::EINVAL);
        // FUA is accepted on anything.
        assert_eq!(
            r.validate(&req(Cmd::Flush, proto::CMD_FLAG_FUA, 0, 0)),
            Ok(Op::Flush)
        );
        // Flags not advertised.
        let no_fast = Rules {
            flags: r.flags & !(proto::TFLAG_SEND_FAST_ZERO | proto::TFLAG_SEND_DF),
            ..r
        };
        assert_eq!(
            errno(no_fast.validate(&req(Cmd::WriteZeroes, proto::CMD_FLAG_FAST_ZERO, 0, 512))),
            proto::EINVAL
        );
        assert_eq!(
            errno(no_fast.validate(&req(Cmd::Read, proto::CMD_FLAG_DF, 0, 512))),
            proto::EINVAL
        );
        assert!(
            r.validate(&req(Cmd::Read, proto::CMD_FLAG_DF, 0, 512))
                .is_ok()
        );
        // Block status without a negotiated context.
        let no_ctx = Rules {
            base_allocation: None,
            ..r
        };
        assert_eq!(
            errno(no_ctx.validate(&req(Cmd::BlockStatus, 0, 0, 512))),
            proto::EINVAL
        );
        // Read-only exports refuse writes with EPERM.
        let ro = Rules {
            read_only: true,
            ..r
        };
        for c in [Cmd::Write, Cmd::Trim, Cmd::WriteZeroes] {
            assert_eq!(errno(ro.validate(&req(c, 0, 0, 512))), proto::EPERM, "{c}");
        }
        assert!(ro.validate(&req(Cmd::Read, 0, 0, 512)).is_ok());
    }

    #[test]
    fn alignment_only_when_promised() {
        let r = rules(HeaderStyle::Compact);
        assert!(r.validate(&req(Cmd::Write, 0, 4097, 3000)).is_ok());
        let strict = Rules {
            enforce_alignment: true,
            size: (1 << 20) + 100,
            ..r
        };
        assert_eq!(
            errno(strict.validate(&req(Cmd::Write, 0, 4097, 3000))),
            proto::EINVAL
        );
        assert!(strict.validate(&req(Cmd::Write, 0, 4096, 3072)).is_ok());
        // The unaligned tail of an export is reachable.
        assert!(strict.validate(&req(Cmd::Read, 0, 1 << 20, 100)).is_ok());
    }

    #[test]
    fn extended_headers_lengths() {
        let r = rules(HeaderStyle::Extended);
        let big = Rules { size: 5 << 30, ..r };
        assert_eq!(
            big.validate(&req(
                Cmd::WriteZeroes,
                proto::CMD_FLAG_FAST_ZERO | proto::CMD_FLAG_NO_HOLE,
                0,
                4 << 30
            )),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 4 << 30,
                no_hole: true,
                fast_only: true,
                fua: false
            })
        );
        assert!(big.validate(&req(Cmd::BlockStatus, 0, 0, 5 << 30)).is_ok());
        assert!(big.validate(&req(Cmd::Trim, 0, 0, 5 << 30)).is_ok());
        // A read above the maximum payload is refused even if it fits the export.
        assert_eq!(
            errno(big.validate(&req(Cmd::Read, 0, 0, 1 << 32))),
            proto::EINVAL
        );
        assert!(r.validate(&req(Cmd::Write, 0, 0, 512)).is_ok());
        assert!(
            r.validate(&req(Cmd::Write, proto::CMD_FLAG_PAYLOAD_LEN, 0, 512))
                .is_ok()
        );
        assert_eq!(
            errno(r.validate(&req(Cmd::Trim, proto::CMD_FLAG_PAYLOAD_LEN, 0, 512))),
            proto::EINVAL
        );
    }

    #[test]
    fn shaping_examples() {
        let e = [
            Extent::data(100),
            Extent::data(0),
            Extent::data(50),
            Extent::hole(1000),
            Extent::zeroed(10),
        ];
        assert_eq!(
            shape_extents(&e, 2000, false, 10),
            vec![(150, 0), (1000, 3), (10, 2)]
        );
        assert_eq!(shape_extents(&e, 200, false, 10), vec![(150, 0), (50, 3)]);
        assert_eq!(shape_extents(&e, 2000, true, 10), vec![(150, 0)]);
        assert_eq!(shape_extents(&e, 120, true, 10), vec![(120, 0)]);
        assert_eq!(shape_extents(&e, 2000, false, 2), vec![(150, 0), (1000, 3)]);
        assert!(shape_extents(&[], 10, false, 10).is_empty());
        // Hole and zero-but-allocated are different states and are never merged.
        assert_eq!(
            shape_extents(
                &[Extent::hole(1), Extent::zeroed(1), Extent::hole(1)],
                3,
                false,
                9
            ),
            vec![(1, 3), (1, 2), (1, 3)]
        );
    }

    fn extent() -> impl Strategy<Value = Extent> {
        (0u64..5000, any::<bool>(), any::<bool>()).prop_map(|(length, hole, zero)| Extent {
            length,
            hole,
            zero,
        })
    }

    proptest! {
        /// Per byte, the shaped descriptors give the same flags as the backend's extents, never
        /// describe more than the request, merge only equal neighbours and honour REQ_ONE.
        #[test]
        fn shaping_preserves_every_byte(ext in proptest::collection::vec(extent(), 0..20), len in 1u64..30_000, req_one: bool, max in 1usize..8) {
            let d = shape_extents(&ext, len, req_one, max);
            let total: u64 = d.iter().map(|x| x.0).sum();
            prop_assert!(total <= len);
            prop_assert!(d.len() <= max);
            if req_one { prop_assert!(d.len() <= 1); }
            if ext.iter().any(|e| e.length > 0) { prop_assert!(!d.is_empty()); }
            for w in d.windows(2) { prop_assert_ne!(w[0].1, w[1].1); }
            let mut truth = Vec::new();
            for e in &ext { truth.extend(std::iter::repeat_n(e.flags(), e.length as usize)); }
            let mut pos = 0usize;
            for (l, f) in d {
                prop_assert!(l > 0);
                prop_assert!(truth[pos..pos + l as usize].iter().all(|&t| t == f));
                pos += l as usize;
            }
        }
    }
}
