//! An asynchronous NBD client, and [`RemoteVolume`]: a [`super::Volume`] whose storage is a
//! remote export reached through a list of head nodes, surviving the loss of any of them.
//!
//! [`NbdClient`] speaks the fixed-newstyle protocol of the NBD project's `proto.md`: the
//! handshake (`NBD_OPT_EXTENDED_HEADERS` when wanted, else `NBD_OPT_STRUCTURED_REPLY`;
//! `NBD_OPT_SET_META_CONTEXT` for `base:allocation`; `NBD_OPT_GO` asking for
//! `NBD_INFO_BLOCK_SIZE`), then many requests in flight at once, each with its own cookie. One
//! writer task sends requests in batches; one reader task matches reply chunks to cookies, so
//! replies may come back in any order. Read data lands straight in the caller's buffer
//! (`OFFSET_DATA`; `OFFSET_HOLE` leaves zeroes); errors (`ERROR`, `ERROR_OFFSET`) and
//! `base:allocation` block status are decoded into typed results.
//!
//! Bounds: requests and payload bytes in flight are limited by semaphores (the caller waits,
//! nothing grows), reply chunks by their type (a data chunk can carry no more than its request
//! asked for; metadata chunks at most [`MAX_META_PAYLOAD`] bytes), read replies by
//! [`MAX_CHUNKS_PER_REPLY`] chunks.
//!
//! A server that breaks the protocol — bad magic, a cookie never issued, data outside the
//! request, a chunk type that does not fit the command, a truncated message — loses the
//! connection: every request in flight fails with [`ClientError::Lost`] and later requests fail
//! at once. Nothing a server sends can make the client panic or hang once the connection is
//! closed; a server that stops answering is the caller's timeout to detect (see
//! [`RemoteConfig::request_timeout`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use head_node::nbd::client::{ClientConfig, NbdClient};
//!
//! let addr = "127.0.0.1:10809".parse()?;
//! let client = NbdClient::connect(addr, "vol0", &ClientConfig::default()).await?;
//! client.write(0, bytes::Bytes::from(vec![7u8; 4096]), true).await?;
//! let data = client.read(0, 4096).await?;
//! assert_eq!(data[0], 7);
//! client.disconnect().await;
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use common::AlignedBuf;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::AbortHandle;

use super::backend::{ExportInfo, Extent};
use super::proto::{self, Cmd, ProtoError, ReplyStyle, Request};

mod handshake;
mod remote;
mod wire;

pub use remote::{RemoteConfig, RemoteError, RemoteMetrics, RemoteVolume};

/// Largest payload accepted in a non-data reply chunk (block status, errors): room for 2^20
/// extended block status descriptors, the most the specification suggests a server send.
pub const MAX_META_PAYLOAD: u64 = 8 + 16 * (1 << 20);
/// Most chunks one read reply may consist of.
pub const MAX_CHUNKS_PER_REPLY: u32 = 1 << 16;
/// Longest span of a TRIM, WRITE_ZEROES or CACHE in a compact (32-bit) request; a multiple of
/// every permitted minimum block size, so split requests stay aligned.
const MAX_COMPACT_SPAN: u64 = 0xffff_0000;
/// Time a graceful disconnect waits for the writer to send `NBD_CMD_DISC`.
const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Configuration and results.

/// Limits and choices of one client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// Time allowed for the TCP connection.
    pub connect_timeout: Duration,
    /// Time allowed for the whole handshake.
    pub handshake_timeout: Duration,
    /// Requests in flight at once; further callers wait.
    pub max_inflight_requests: u32,
    /// Read and write payload bytes in flight at once; further callers wait (a single request
    /// larger than this waits for the connection to be otherwise idle).
    pub max_inflight_bytes: u32,
    /// Ask for extended headers (64-bit lengths); falls back to structured replies when the
    /// server refuses.
    pub extended_headers: bool,
    /// Name the connection as this client's newest ([`proto::OPT_SESSION`], a Stockade
    /// extension): the server records it before it answers `NBD_OPT_GO`, ending the client's
    /// older connections (see [`crate::volume::session`]). A server without the extension
    /// refuses the option and serves the connection without it
    /// ([`ExportDetails::session_recorded`]).
    pub session: Option<crate::volume::session::ClientSession>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_inflight_requests: 256,
            max_inflight_bytes: 128 << 20,
            extended_headers: true,
            session: None,
        }
    }
}

/// What the server told the client about the export it selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportDetails {
    /// The export name as asked for (or as the server named it with `NBD_INFO_NAME`).
    pub name: String,
    /// `NBD_INFO_DESCRIPTION`, or empty.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Minimum block size (1 when the server sent none).
    pub min_block: u32,
    /// Preferred block size (4096 when the server sent none).
    pub preferred_block: u32,
    /// Largest READ/WRITE payload (32 MiB, or the export size if smaller, when the server sent
    /// none).
    pub max_block: u32,
    /// How replies are framed.
    pub reply_style: ReplyStyle,
    /// The context id of `base:allocation`, when the server selected it.
    pub base_allocation: Option<u32>,
    /// The server recorded [`ClientConfig::session`] before it served the connection.
    pub session_recorded: bool,
}

impl ExportDetails {
    /// True when the transmission flag `f` is set.
    pub fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    /// The export refuses writes.
    pub fn read_only(&self) -> bool {
        self.has(proto::TFLAG_READ_ONLY)
    }

    /// FLUSH and FUA on one connection cover every connection.
    pub fn multi_conn(&self) -> bool {
        self.has(proto::TFLAG_CAN_MULTI_CONN)
    }

    /// The export as a local NBD server would advertise it.
    pub fn export_info(&self) -> ExportInfo {
        ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.size,
            read_only: self.read_only(),
            multi_conn: self.multi_conn(),
            min_block: self.min_block,
            preferred_block: self.preferred_block,
            max_block: self.max_block,
        }
    }
}

/// Flags of a WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// `NBD_CMD_FLAG_NO_HOLE`: keep the range allocated.
    pub no_hole: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail with `ENOTSUP` unless zeroing is fast.
    pub fast_only: bool,
    /// `NBD_CMD_FLAG_FUA`.
    pub fua: bool,
}

// ---------------------------------------------------------------------------------------------
// Errors.

/// How a server broke the protocol after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A message could not be decoded.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// A reply named a cookie that is not in flight.
    #[error("reply for cookie {0:#x}, which is not in flight")]
    UnknownCookie(u64),
    /// A reply does not fit the request it answers.
    #[error("{what} (cookie {cookie:#x})")]
    Reply {
        /// What was wrong.
        what: &'static str,
        /// The request's cookie.
        cookie: u64,
    },
    /// A chunk announced more payload than its type allows.
    #[error("chunk type {chunk_type} of {length} bytes is too long (cookie {cookie:#x})")]
    TooLong {
        /// The chunk type.
        chunk_type: u16,
        /// The announced payload length.
        length: u64,
        /// The request's cookie.
        cookie: u64,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Lost {
    /// The server closed the connection.
    #[error("the server closed the connection")]
    Eof,
    /// Reading or writing the socket failed.
    #[error("connection I/O error: {0}")]
    Io(Arc<std::io::Error>),
    /// The server broke the protocol.
    #[error("the server broke the protocol: {0}")]
    Protocol(Violation),
    /// This side closed the connection.
    #[error("the connection was closed by the client")]
    Closed,
}

impl Lost {
    /// A short label (a bounded set, used in metrics): `eof`, `io_error`, `protocol_error`,
    /// `closed`.
    pub fn label(&self) -> &'static str {
        match self {
            Lost::Eof => "eof",
            Lost::Io(_) => "io_error",
            Lost::Protocol(_) => "protocol_error",
            Lost::Closed => "closed",
        }
    }

    fn io(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Lost::Eof
        } else {
            Lost::Io(Arc::new(e))
        }
    }
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The server address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TCP connection took longer than [`ClientConfig::connect_timeout`].
    #[error("connecting to {addr} timed out")]
    ConnectTimeout {
        /// The server address.
        addr: SocketAddr,
    },
    /// Reading or writing failed during the handshake.
    #[error("NBD handshake: {0}")]
    HandshakeIo(#[source] std::io::Error),
    /// The handshake took longer than [`ClientConfig::handshake_timeout`].
    #[error("NBD handshake timed out")]
    HandshakeTimeout,
    /// The server sent something undecodable during the handshake.
    #[error("NBD handshake: {0}")]
    HandshakeProto(#[from] ProtoError),
    /// The server broke the handshake rules.
    #[error("NBD handshake: {0}")]
    HandshakeViolation(&'static str),
    /// The server refused an option (`NBD_REP_ERR_*`), e.g. an unknown export.
    #[error("the server refused {option} with error {reply:#x}: {message}")]
    Refused {
        /// The option (`go`, `structured_reply`…).
        option: &'static str,
        /// The `NBD_REP_ERR_*` value.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// The server offers neither structured replies nor extended headers.
    #[error("the server does not support structured replies")]
    NoStructuredReplies,
    /// The connection ended before the request was answered.
    #[error(transparent)]
    Lost(#[from] Lost),
    /// The server answered the request with an error.
    #[error("the server answered {cmd} with {} ({errno}): {message}", proto::errno_name(*errno))]
    Server {
        /// The command.
        cmd: Cmd,
        /// The NBD error value.
        errno: u32,
        /// The server's message (may be empty).
        message: String,
        /// The failing offset, from `NBD_REPLY_TYPE_ERROR_OFFSET`.
        offset: Option<u64>,
    },
    /// The export does not offer the command (its transmission flag is not set).
    #[error("the export does not support {cmd}")]
    Unsupported {
        /// The command.
        cmd: Cmd,
    },
    /// The request is not valid for this connection (empty, or larger than the maximum).
    #[error("invalid {cmd} request: {reason}")]
    Invalid {
        /// The command.
        cmd: Cmd,
        /// What is wrong.
        reason: &'static str,
    },
}

impl ClientError {
    /// The NBD error value the server answered with, if any.
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True when the request failed because the connection ended.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, ClientError::Lost(_))
    }
}

// ---------------------------------------------------------------------------------------------
// The client.

/// What a completed request produced.
#[derive(Debug)]
enum Outcome {
    Done,
    Data(AlignedBuf),
    Extents(Vec<Extent>),
}

/// The state of a reply being assembled.
#[derive(Debug)]
enum Progress {
    /// No payload expected (or not yet seen).
    Plain,
    /// A read: the buffer, the ranges already filled (start → end, merged) and their total.
    Read {
        buf: AlignedBuf,
        covered: BTreeMap<u64, u64>,
        bytes: u64,
    },
    /// A block status: the extents, once the chunk came.
    Status(Option<Vec<Extent>>),
}

/// A request waiting for its reply.
#[derive(Debug)]
struct InFlight {
    cmd: Cmd,
    offset: u64,
    len: u64,
    reply: oneshot::Sender<Result<Outcome, ClientError>>,
    progress: Progress,
    /// The first error chunk, as `(errno, message, offset)`.
    error: Option<(u32, String, Option<u64>)>,
    chunks: u32,
    /// Held until the reply is complete, so the bounds count what is on the wire.
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    fn finish(self, result: Result<Outcome, ClientError>) {
        // The caller may have given up; then nobody wants the answer.
        let _ = self.reply.send(result);
    }
}

#[derive(Debug, Default)]
struct Pending {
    map: HashMap<u64, InFlight>,
    /// Set once the connection is dead; no request is registered after that.
    dead: Option<Lost>,
}

/// A message for the writer task.
#[derive(Debug)]
enum Outgoing {
    Request {
        header: Vec<u8>,
        payload: Option<Bytes>,
    },
    Disconnect {
        header: Vec<u8>,
        done: oneshot::Sender<()>,
    },
}

/// State shared by the handle and the two tasks.
#[derive(Debug)]
struct Inner {
    details: ExportDetails,
    pending: Mutex<Pending>,
    tx: mpsc::Sender<Outgoing>,
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
    max_requests: u32,
    next_cookie: AtomicU64,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Inner {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the connection dead (keeping the first reason), fails every request in flight and
    /// stops both tasks.
    fn fail(&self, reason: Lost) {
        let (drained, reason) = {
            let mut p = self.pending();
            let reason = p.dead.get_or_insert(reason).clone();
            (std::mem::take(&mut p.map), reason)
        };
        for (_, entry) in drained {
            entry.finish(Err(ClientError::Lost(reason.clone())));
        }
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
    }

    fn lost(&self) -> Option<Lost> {
        self.pending().dead.clone()
    }
}

/// Removes a registered request that never reached the writer (its caller gave up first).
struct Unsent<'a> {
    inner: &'a Inner,
    cookie: u64,
    armed: bool,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.pending().map.remove(&self.cookie);
        }
    }
}

/// A connected NBD client in the transmission phase. Methods take `&self` and may be called
/// concurrently; share it in an `Arc`. Dropping it closes the connection (requests still in
/// flight fail with [`Lost::Closed`]); [`NbdClient::disconnect`] ends it politely.
#[derive(Debug)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.inner.fail(Lost::Closed);
    }
}

impl NbdClient {
    /// Connects to `addr` and selects `export`.
    pub async fn connect(
        addr: SocketAddr,
        export: &str,
        cfg: &ClientConfig,
    ) -> Result<Self, ClientError> {
        let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::ConnectTimeout { addr })?
            .map_err(|source| ClientError::Connect { addr, source })?;
        // The specification asks both ends to disable Nagle.
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        Self::start(rd, wr, export, cfg).await
    }

    /// Runs the handshake over an established byte stream and starts the transmission phase.
    pub async fn handshake<S>(
        stream: S,
        export: &str,
        cfg: &ClientConfig,
    ) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        Self::start(rd, wr, export, cfg).await
    }

    async fn start<R, W>(
        rd: R,
        wr: W,
        export: &str,
        cfg: &ClientConfig,
    ) -> Result<Self, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let mut wr = wr;
        let details = tokio::time::timeout(
            cfg.handshake_timeout,
            handshake::negotiate(&mut rd, &mut wr, export, cfg),
        )
        .await
        .map_err(|_| ClientError::HandshakeTimeout)??;
        let requests = cfg.max_inflight_requests.max(1);
        let max_bytes = cfg.max_inflight_bytes.max(1);
        let (tx, rx) = mpsc::channel(requests as usize + 1);
        let inner = Arc::new(Inner {
            details,
            pending: Mutex::new(Pending::default()),
            tx,
            slots: Arc::new(Semaphore::new(requests as usize)),
            bytes: Arc::new(Semaphore::new(max_bytes as usize)),
            max_bytes,
            max_requests: requests,
            next_cookie: AtomicU64::new(1),
            tasks: Mutex::new(Vec::new()),
        });
        let reader = {
            let inner = inner.clone();
            tokio::spawn(async move {
                let reason = wire::read_replies(rd, &inner).await;
                inner.fail(reason);
            })
        };
        let writer = {
            let inner = inner.clone();
            tokio::spawn(async move {
                match wire::write_requests(rx, wr).await {
                    // Disconnected politely: the reader ends when the server closes.
                    Ok(()) => {}
                    Err(e) => inner.fail(Lost::io(e)),
                }
            })
        };
        {
            let mut tasks = inner.tasks.lock().unwrap_or_else(PoisonError::into_inner);
            tasks.push(reader.abort_handle());
            tasks.push(writer.abort_handle());
        }
        // A task that failed before its handles were stored could not stop the other one.
        if inner.lost().is_some() {
            reader.abort();
            writer.abort();
        }
        Ok(Self { inner })
    }

    /// What the server said about the export.
    pub fn details(&self) -> &ExportDetails {
        &self.inner.details
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.lost().is_some()
    }

    /// Why the connection ended, once it has.
    pub fn lost_reason(&self) -> Option<Lost> {
        self.inner.lost()
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inner.pending().map.len()
    }

    /// Closes the connection now; requests in flight fail with [`Lost::Closed`].
    pub fn close(&self) {
        self.inner.fail(Lost::Closed);
    }

    /// Ends the connection politely: waits for the requests in flight, sends `NBD_CMD_DISC`,
    /// and closes. Gives up after a few seconds and closes anyway.
    pub async fn disconnect(&self) {
        let inner = self.inner.clone();
        let polite = async move {
            // Every request holds one slot until its reply: holding them all means none is in
            // flight. The semaphore is never closed.
            let Ok(_all) = inner.slots.acquire_many(inner.max_requests).await else {
                return;
            };
            let req = Request {
                flags: 0,
                kind: Cmd::Disc.wire(),
                cookie: inner.next_cookie.fetch_add(1, Ordering::Relaxed),
                offset: 0,
                length: 0,
            };
            let Ok(header) = req.encode(inner.details.reply_style.header_style()) else {
                return;
            };
            let (done, sent) = oneshot::channel();
            if inner
                .tx
                .send(Outgoing::Disconnect { header, done })
                .await
                .is_ok()
            {
                let _ = sent.await;
            }
        };
        let _ = tokio::time::timeout(DISCONNECT_GRACE, polite).await;
        self.close();
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, ClientError> {
        self.check_payload(Cmd::Read, len)?;
        match self
            .submit(Cmd::Read, 0, offset, u64::from(len), None)
            .await?
        {
            Outcome::Data(buf) => Ok(buf),
            _ => Err(self.internal(Cmd::Read)),
        }
    }

    /// Writes `data` at `offset`; with `fua`, the server replies once it is durable (emulated
    /// with a FLUSH when the server does not offer FUA).
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ClientError> {
        let len = u32::try_from(data.len()).map_err(|_| ClientError::Invalid {
            cmd: Cmd::Write,
            reason: "payload larger than the maximum block size",
        })?;
        self.check_payload(Cmd::Write, len)?;
        let (flag, emulate) = self.fua(fua);
        self.submit(Cmd::Write, flag, offset, u64::from(len), Some(data))
            .await?;
        if emulate {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes every write answered before this call durable. A server that does not offer FLUSH
    /// has nothing to flush: the call succeeds at once.
    pub async fn flush(&self) -> Result<(), ClientError> {
        if !self.details().has(proto::TFLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.submit(Cmd::Flush, 0, 0, 0, None).await.map(|_| ())
    }

    /// Discards a range.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), ClientError> {
        if !self.details().has(proto::TFLAG_SEND_TRIM) {
            return Err(ClientError::Unsupported { cmd: Cmd::Trim });
        }
        let (flag, emulate) = self.fua(fua);
        self.spans(Cmd::Trim, flag, offset, len).await?;
        if emulate {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes a range read as zeroes.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), ClientError> {
        let d = self.details();
        if !d.has(proto::TFLAG_SEND_WRITE_ZEROES)
            || (flags.fast_only && !d.has(proto::TFLAG_SEND_FAST_ZERO))
        {
            return Err(ClientError::Unsupported {
                cmd: Cmd::WriteZeroes,
            });
        }
        let (fua, emulate) = self.fua(flags.fua);
        let mut f = fua;
        if flags.no_hole {
            f |= proto::CMD_FLAG_NO_HOLE;
        }
        if flags.fast_only {
            f |= proto::CMD_FLAG_FAST_ZERO;
        }
        self.spans(Cmd::WriteZeroes, f, offset, len).await?;
        if emulate {
            self.flush().await?;
        }
        Ok(())
    }

    /// A hint that the range will be read soon; succeeds at once when the server does not
    /// offer CACHE.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        if !self.details().has(proto::TFLAG_SEND_CACHE) {
            return Ok(());
        }
        self.spans(Cmd::Cache, 0, offset, len).await
    }

    /// The `base:allocation` state of a range, starting at `offset`; may cover less than
    /// `len` (ask again for the rest). With `req_one`, the server sends one extent.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<Vec<Extent>, ClientError> {
        if self.details().base_allocation.is_none() {
            return Err(ClientError::Unsupported {
                cmd: Cmd::BlockStatus,
            });
        }
        if len == 0 {
            return Err(ClientError::Invalid {
                cmd: Cmd::BlockStatus,
                reason: "zero length",
            });
        }
        // A compact request cannot ask about more than 4 GiB; the answer may be partial anyway.
        let len = if self.details().reply_style == ReplyStyle::Extended {
            len
        } else {
            len.min(MAX_COMPACT_SPAN)
        };
        let flags = if req_one { proto::CMD_FLAG_REQ_ONE } else { 0 };
        match self
            .submit(Cmd::BlockStatus, flags, offset, len, None)
            .await?
        {
            Outcome::Extents(e) => Ok(e),
            _ => Err(self.internal(Cmd::BlockStatus)),
        }
    }

    fn internal(&self, cmd: Cmd) -> ClientError {
        // Unreachable by construction (the reader builds the outcome from the command); kept
        // as an error rather than a panic.
        ClientError::Invalid {
            cmd,
            reason: "reply of the wrong kind",
        }
    }

    /// The FUA flag to send and whether to follow with a FLUSH instead.
    fn fua(&self, fua: bool) -> (u16, bool) {
        if !fua {
            (0, false)
        } else if self.details().has(proto::TFLAG_SEND_FUA) {
            (proto::CMD_FLAG_FUA, false)
        } else {
            (0, true)
        }
    }

    fn check_payload(&self, cmd: Cmd, len: u32) -> Result<(), ClientError> {
        if len == 0 {
            return Err(ClientError::Invalid {
                cmd,
                reason: "zero length",
            });
        }
        if len > self.details().max_block {
            return Err(ClientError::Invalid {
                cmd,
                reason: "payload larger than the maximum block size",
            });
        }
        Ok(())
    }

    /// Sends a range command, split into compact-sized pieces when the headers are compact.
    async fn spans(&self, cmd: Cmd, flags: u16, offset: u64, len: u64) -> Result<(), ClientError> {
        if len == 0 {
            return Err(ClientError::Invalid {
                cmd,
                reason: "zero length",
            });
        }
        if self.details().reply_style == ReplyStyle::Extended {
            return self.submit(cmd, flags, offset, len, None).await.map(|_| ());
        }
        let mut pos = offset;
        let end = offset.saturating_add(len);
        while pos < end {
            let n = (end - pos).min(MAX_COMPACT_SPAN);
            self.submit(cmd, flags, pos, n, None).await?;
            pos += n;
        }
        Ok(())
    }

    /// Registers a request, hands it to the writer and waits for its reply.
    async fn submit(
        &self,
        cmd: Cmd,
        flags: u16,
        offset: u64,
        len: u64,
        payload: Option<Bytes>,
    ) -> Result<Outcome, ClientError> {
        let inner = &*self.inner;
        if let Some(lost) = inner.lost() {
            return Err(ClientError::Lost(lost));
        }
        let payload_bytes = match cmd {
            Cmd::Read | Cmd::Write => len.min(u64::from(inner.max_bytes)) as u32,
            _ => 0,
        };
        // Neither semaphore is ever closed.
        let slot = inner
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::Lost(Lost::Closed))?;
        let bytes = if payload_bytes > 0 {
            Some(
                inner
                    .bytes
                    .clone()
                    .acquire_many_owned(payload_bytes)
                    .await
                    .map_err(|_| ClientError::Lost(Lost::Closed))?,
            )
        } else {
            None
        };
        let cookie = inner.next_cookie.fetch_add(1, Ordering::Relaxed);
        let header = Request {
            flags,
            kind: cmd.wire(),
            cookie,
            offset,
            length: len,
        }
        .encode(inner.details.reply_style.header_style())
        .map_err(|_| ClientError::Invalid {
            cmd,
            reason: "length does not fit a compact request",
        })?;
        let progress = match cmd {
            Cmd::Read => Progress::Read {
                buf: AlignedBuf::zeroed(len as usize),
                covered: BTreeMap::new(),
                bytes: 0,
            },
            Cmd::BlockStatus => Progress::Status(None),
            _ => Progress::Plain,
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut p = inner.pending();
            if let Some(lost) = &p.dead {
                return Err(ClientError::Lost(lost.clone()));
            }
            p.map.insert(
                cookie,
                InFlight {
                    cmd,
                    offset,
                    len,
                    reply: tx,
                    progress,
                    error: None,
                    chunks: 0,
                    _slot: slot,
                    _bytes: bytes,
                },
            );
        }
        let mut unsent = Unsent {
            inner,
            cookie,
            armed: true,
        };
        if inner
            .tx
            .send(Outgoing::Request { header, payload })
            .await
            .is_err()
        {
            // The writer is gone: the connection is dead (or dying).
            drop(unsent);
            return Err(ClientError::Lost(inner.lost().unwrap_or(Lost::Closed)));
        }
        unsent.armed = false;
        match rx.await {
            Ok(r) => r,
            // The entry was dropped without an answer: the reader was stopped mid-reply.
            Err(_) => Err(ClientError::Lost(inner.lost().unwrap_or(Lost::Closed))),
        }
    }
}

#[cfg(test)]
mod tests;
