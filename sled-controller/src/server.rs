//! The sled's network server: authenticated connections speaking the framed protocol of
//! [`common::sled_proto`].
//!
//! A connection must prove knowledge of the cluster key (mutual HMAC over fresh nonces) before
//! anything else is accepted, within a deadline. Then the connection's task reads requests through
//! a 64 KiB buffer and a writer task answers them, in completion order:
//!
//! * Reads, writes, write-zeroes and trims — the hot path — are checked at once (credential MACs
//!   through a per-connection cache of credentials that verified before) and handed to the device
//!   threads in batches: everything one socket read brought in goes to a device in one queue
//!   reservation with at most one doorbell. No task is spawned for them.
//! * Control requests (claim, allocate, free, stat) each run in a task of their own.
//! * `Supersede` ends the head node's other connections ([`Sessions`]) and is answered once
//!   everything they had read has run: a barrier between a head node's old and new
//!   connection.
//! * Results come back through the connection's [`ReplySink`]: device threads push into it and
//!   wake the writer once per round of work; the writer answers everything it finds and flushes
//!   once.
//!
//! In-flight requests and payload bytes per connection are bounded: the reader takes permits
//! before it reads a frame's payload and the writer gives them back once the reply is written. At
//! the bound the reader simply stops reading (TCP back-pressure), so a client that does not read
//! its replies cannot make the sled buffer without limit. A frame that is malformed, oversized or
//! fails its checksum gets an error reply and the connection is closed (after what was read
//! before it is answered); other connections carry on.

use crate::device::{DevError, DevRequest, Reply};
use crate::reply::{Entry, Outcome, ReplySink, ReplyTo, Ticket};
use crate::sled::{Sled, SledError};
use common::AlignedBuf;
use common::cred::{Credential, HandshakeRole, VerifiedCredentials, nonce};
use common::ids::NodeId;
use common::ids::{ChunkIndex, VolumeId};
use common::sled_proto::{
    ErrorCode, Frame, FrameHeader, HEADER_LEN, KIND_REQUEST, KIND_RESPONSE, MAX_DATA_LEN,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ProtoError, Request, Response, WireError,
    read_body_with, read_handshake_frame, read_header, write_frame,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Connections at most in their handshake at once (each holds at most one 64 KiB control part).
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Limits of one connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Requests in flight.
    pub max_requests: usize,
    /// Payload bytes in flight (requests plus read replies).
    pub max_bytes: usize,
    /// Time allowed for the handshake.
    pub handshake_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_requests: 512,
            max_bytes: 128 << 20,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Maps an error to its stable wire form, in one place.
pub fn wire_error(e: &SledError) -> WireError {
    let (code, current) = match e {
        SledError::BadCredential(_) => (ErrorCode::BadCredential, None),
        SledError::Device(d) => match d {
            DevError::Fenced { current } => {
                (ErrorCode::Fenced, Some((current.epoch, current.node)))
            }
            DevError::NotClaimed { current, .. } => {
                (ErrorCode::NotClaimed, current.map(|c| (c.epoch, c.node)))
            }
            DevError::NoSpace => (ErrorCode::NoSpace, None),
            DevError::FenceTableFull => (ErrorCode::FenceTableFull, None),
            DevError::NotEmpty { .. } => (ErrorCode::NotEmpty, None),
            DevError::OutOfRange { .. } => (ErrorCode::OutOfRange, None),
            DevError::Unaligned { .. } => (ErrorCode::Unaligned, None),
            DevError::Checksum { .. } => (ErrorCode::Checksum, None),
            DevError::Io(_) => (ErrorCode::Io, None),
            DevError::ShuttingDown => (ErrorCode::ShuttingDown, None),
        },
    };
    WireError {
        code,
        message: e.to_string(),
        current,
    }
}

fn proto_error(code: ErrorCode, message: impl Into<String>) -> Response {
    Response::Error(WireError {
        code,
        message: message.into(),
        current: None,
    })
}

/// Accepts connections until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    sled: Arc<Sled>,
    limits: ConnLimits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let sessions = Arc::new(Sessions::default());
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Connections that have not proved the cluster key yet are bounded.
                    let Ok(pending) = handshakes.clone().try_acquire_owned() else {
                        tracing::debug!(%peer, "too many handshakes in progress; closing a new connection");
                        continue;
                    };
                    common::net::tune_accepted(&stream);
                    let sled = sled.clone();
                    let shutdown = shutdown.clone();
                    let sessions = sessions.clone();
                    tokio::spawn(async move {
                        sled.metrics().connections.inc();
                        if let Err(e) =
                            connection(stream, sled.clone(), sessions, limits, shutdown, pending).await
                        {
                            tracing::debug!(%peer, error = %e, "connection ended");
                        }
                        sled.metrics().connections.dec();
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("handshake: {0}")]
    Handshake(String),
}

async fn handshake(
    stream: &mut TcpStream,
    sled: &Sled,
    timeout: Duration,
) -> Result<NodeId, ConnError> {
    let run = async {
        let f = read_handshake_frame(stream).await?;
        let hello = f.decode::<Request>();
        let (min, max, client_nonce, node) = match hello {
            Ok(Request::Hello {
                min_version,
                max_version,
                nonce,
                node,
            }) => (min_version, max_version, nonce, node),
            _ => {
                write_frame(
                    stream,
                    KIND_RESPONSE,
                    f.header.tag,
                    &proto_error(ErrorCode::NotAuthenticated, "expected Hello"),
                    &[],
                )
                .await?;
                return Err(ConnError::Handshake("first message was not Hello".into()));
            }
        };
        let version = max.min(PROTOCOL_VERSION);
        if version < min.max(MIN_PROTOCOL_VERSION) {
            let msg = format!(
                "no common protocol version: client speaks {min}..={max}, sled {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
            );
            write_frame(
                stream,
                KIND_RESPONSE,
                f.header.tag,
                &proto_error(ErrorCode::Version, msg.clone()),
                &[],
            )
            .await?;
            return Err(ConnError::Handshake(msg));
        }
        let server_nonce = nonce();
        let proof = sled
            .key()
            .handshake_proof(HandshakeRole::Server, &server_nonce, &client_nonce);
        let challenge = Response::Challenge {
            version,
            sled: sled.id(),
            nonce: server_nonce,
            proof,
        };
        write_frame(stream, KIND_RESPONSE, f.header.tag, &challenge, &[]).await?;
        stream.flush().await.map_err(ProtoError::Io)?;
        let f = read_handshake_frame(stream).await?;
        let ok = match f.decode::<Request>() {
            Ok(Request::Auth { proof }) => sled.key().verify_handshake(
                HandshakeRole::Client,
                &client_nonce,
                &server_nonce,
                &proof,
            ),
            _ => false,
        };
        if !ok {
            tracing::warn!(
                node_id = node.0,
                "refused a connection that could not prove the cluster key"
            );
            write_frame(
                stream,
                KIND_RESPONSE,
                f.header.tag,
                &proto_error(
                    ErrorCode::AuthFailed,
                    "authentication failed: wrong cluster key",
                ),
                &[],
            )
            .await?;
            return Err(ConnError::Handshake("authentication failed".into()));
        }
        write_frame(stream, KIND_RESPONSE, f.header.tag, &Response::AuthOk, &[]).await?;
        stream.flush().await.map_err(ProtoError::Io)?;
        tracing::debug!(node_id = node.0, version, "head node authenticated");
        Ok(node)
    };
    let res = match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) => Err(ConnError::Handshake("timed out".into())),
    };
    // Every handshake that does not complete counts, whoever gave up (a client with the wrong
    // key drops the connection as soon as it cannot verify the sled's proof).
    if res.is_err() {
        sled.metrics().auth_failures.inc();
    }
    res
}

/// Bytes the connection reader takes from the socket at once.
const READ_BUFFER: usize = 64 * 1024;
/// Bytes of replies buffered before they are sent (a batch is flushed once, when written).
const WRITE_BUFFER: usize = 256 * 1024;
/// Most requests handed to one device in one batch.
const MAX_BATCH: usize = 64;

/// A connection's in-flight bounds: taken by the reader (before a frame's payload is read), given
/// back by the writer once the reply is written.
#[derive(Debug)]
struct Permits {
    requests: Semaphore,
    max_requests: usize,
    kib: Semaphore,
    max_kib: u32,
}

#[derive(Debug, Clone, Copy)]
enum Pool {
    Requests,
    Kib,
}

impl Permits {
    fn new(limits: &ConnLimits) -> Self {
        let max_requests = limits.max_requests.max(1);
        let max_kib = (limits.max_bytes / 1024).clamp(1, u32::MAX as usize);
        Self {
            requests: Semaphore::new(max_requests),
            max_requests,
            kib: Semaphore::new(max_kib),
            max_kib: max_kib as u32,
        }
    }

    fn pool(&self, p: Pool) -> &Semaphore {
        match p {
            Pool::Requests => &self.requests,
            Pool::Kib => &self.kib,
        }
    }

    /// KiB permits for a payload of `len` bytes (a request's data, or a read's reply).
    fn kib_for(&self, len: u32) -> u32 {
        (len / 1024 + 1).min(self.max_kib)
    }

    /// True when every request permit is back: nothing is in flight.
    fn idle(&self) -> bool {
        self.requests.available_permits() == self.max_requests
    }
}

/// Longest a `Supersede` waits for the older connections to finish.
const SUPERSEDE_TIMEOUT: Duration = Duration::from_secs(30);

/// The authenticated connections, by head node, so a new one can end the older ones.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Session>>,
}

#[derive(Debug)]
struct Session {
    node: NodeId,
    /// Set to make the connection stop reading.
    stop: watch::Sender<bool>,
    /// Closed (its sender dropped) once the connection has answered everything it read.
    done: watch::Receiver<()>,
}

/// A registered connection; dropping it (the connection is over) unregisters it and tells the
/// waiters.
struct SessionGuard {
    sessions: Arc<Sessions>,
    id: u64,
    _done: watch::Sender<()>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Sessions {
    fn register(self: &Arc<Self>, node: NodeId) -> (SessionGuard, watch::Receiver<bool>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (stop, stop_rx) = watch::channel(false);
        let (done_tx, done) = watch::channel(());
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, Session { node, stop, done });
        (
            SessionGuard {
                sessions: self.clone(),
                id,
                _done: done_tx,
            },
            stop_rx,
        )
    }

    /// Stops every other connection of `node` and waits until each has answered what it read.
    async fn supersede(&self, node: NodeId, me: u64) -> Result<usize, String> {
        let others: Vec<watch::Receiver<()>> = {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            live.iter()
                .filter(|(id, s)| **id != me && s.node == node)
                .map(|(_, s)| {
                    s.stop.send_replace(true);
                    s.done.clone()
                })
                .collect()
        };
        let n = others.len();
        let wait = async {
            for mut d in others {
                // Resolves when the sender is dropped: the connection is over.
                while d.changed().await.is_ok() {}
            }
        };
        tokio::time::timeout(SUPERSEDE_TIMEOUT, wait)
            .await
            .map_err(|_| {
                format!(
                    "older connections of node {node} did not finish within {SUPERSEDE_TIMEOUT:?}"
                )
            })?;
        Ok(n)
    }
}

/// Serves one connection: handshake, then this task reads requests while a writer task answers
/// them.
async fn connection(
    mut stream: TcpStream,
    sled: Arc<Sled>,
    sessions: Arc<Sessions>,
    limits: ConnLimits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    pending: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), ConnError> {
    let node = handshake(&mut stream, &sled, limits.handshake_timeout).await?;
    drop(pending);
    let (guard, mut stop) = sessions.register(node);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let sink = Arc::new(ReplySink::default());
    let permits = Arc::new(Permits::new(&limits));
    let writer = tokio::spawn(write_replies(
        wr,
        sled.clone(),
        sink.clone(),
        permits.clone(),
    ));
    let mut reader = Reader {
        sessions: sessions.clone(),
        session: guard.id,
        node,
        creds: sled.credential_cache(),
        batches: (0..sled.device_count()).map(|_| Vec::new()).collect(),
        queued: 0,
        woken: true,
        sled,
        sink: sink.clone(),
        permits,
    };
    let result = reader.run(&mut rd, &mut shutdown, &mut stop).await;
    // What was read before the end still runs and is answered.
    reader.submit().await;
    sink.end();
    let _ = writer.await;
    drop(guard);
    result
}

/// The reading side of a connection: parses frames, checks what can be checked at once, and
/// hands reads and mutations to the device threads in batches.
struct Reader {
    sessions: Arc<Sessions>,
    /// This connection's id in `sessions`.
    session: u64,
    /// The head node on the other end.
    node: NodeId,
    sled: Arc<Sled>,
    sink: Arc<ReplySink>,
    permits: Arc<Permits>,
    creds: VerifiedCredentials,
    /// Requests for each device, not yet handed over.
    batches: Vec<Vec<DevRequest>>,
    queued: usize,
    /// False when replies were pushed into the sink without waking the writer.
    woken: bool,
}

/// Control requests: rare, each served by a task of its own through the sled's async API.
enum Control {
    Allocate(Credential, ChunkIndex),
    Free(Credential, ChunkIndex),
    Claim(Credential),
    Retire(Credential),
    Stat,
    VolumeStat(VolumeId),
    Flush,
}

impl Reader {
    async fn run(
        &mut self,
        rd: &mut BufReader<OwnedReadHalf>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        loop {
            // Everything one socket read brought in goes to the devices together; before waiting
            // for more bytes, hand it over.
            if !frame_buffered(rd.buffer()) {
                self.submit().await;
            }
            let header = tokio::select! {
                h = read_header(rd) => h,
                _ = shutdown.changed() => return Ok(()),
                // A newer connection of the same head node superseded this one.
                _ = stop.wait_for(|s| *s) => {
                    tracing::debug!(node_id = self.node.0, "connection superseded by a newer one");
                    return Ok(());
                }
            };
            let started = Instant::now();
            let header = match header {
                Ok(h) if h.kind == KIND_REQUEST => h,
                Ok(h) => {
                    self.refuse(
                        h.tag,
                        started,
                        proto_error(ErrorCode::Malformed, "expected a request frame"),
                    );
                    return Err(ProtoError::Kind(h.kind).into());
                }
                Err(ProtoError::Closed) => return Ok(()),
                Err(e) => {
                    self.count_rejected(reject_reason(&e));
                    let code = if matches!(e, ProtoError::TooLarge { .. }) {
                        ErrorCode::TooLarge
                    } else {
                        ErrorCode::Malformed
                    };
                    self.refuse(0, started, proto_error(code, e.to_string()));
                    return Err(e.into());
                }
            };
            // Reserve before reading the payload: at the bound we stop reading.
            let kib = self.permits.kib_for(header.data_len);
            self.acquire(Pool::Requests, 1).await;
            self.acquire(Pool::Kib, kib).await;
            let mut ticket = Ticket {
                tag: header.tag,
                op: None,
                started,
                requests: 1,
                kib,
                volume: VolumeId(0),
                len: 0,
                routed: None,
            };
            // A peer that stops in the middle of a frame must not hold off a shutdown or a
            // newer connection of its head node (which waits for this one to end): the frame
            // is dropped (it was never answered) and its permits go back.
            let body = tokio::select! {
                f = read_body_with(rd, header, |n| self.sled.alloc(n)) => f,
                _ = shutdown.changed() => {
                    self.give_back(&ticket);
                    return Ok(());
                }
                _ = stop.wait_for(|s| *s) => {
                    self.give_back(&ticket);
                    return Ok(());
                }
            };
            let frame = match body {
                Ok(f) => f,
                Err(e) => {
                    self.count_rejected(reject_reason(&e));
                    self.reply(ticket, proto_error(ErrorCode::Malformed, e.to_string()));
                    return Err(e.into());
                }
            };
            let req = match frame.decode::<Request>() {
                Ok(r) => r,
                Err(e) => {
                    self.count_rejected("decode");
                    self.reply(ticket, proto_error(ErrorCode::Malformed, e.to_string()));
                    return Err(e.into());
                }
            };
            ticket.op = Some(req.op_name());
            self.dispatch(req, frame, ticket).await;
        }
    }

    async fn dispatch(&mut self, req: Request, frame: Frame, mut t: Ticket) {
        match req {
            Request::Read {
                volume,
                chunk,
                offset,
                len,
            } => {
                if let Some(bad) = check_len(&frame, false) {
                    return self.reply(t, bad);
                }
                // Its reply must fit in a frame: refuse now, not after reading the device.
                if len > MAX_DATA_LEN {
                    return self.reply(
                        t,
                        proto_error(
                            ErrorCode::TooLarge,
                            format!("read of {len} bytes; at most {MAX_DATA_LEN} per request"),
                        ),
                    );
                }
                // A read reply carries its payload: account for it too (never more than the
                // pool holds beside what this request has, or it would wait for itself).
                let extra = self
                    .permits
                    .kib_for(len)
                    .min(self.permits.max_kib.saturating_sub(t.kib));
                self.acquire(Pool::Kib, extra).await;
                t.kib += extra;
                t.volume = volume;
                t.len = u64::from(len);
                let dev = self.sled.route(volume, chunk);
                let reply = self.reply_to(t);
                self.queue_for(
                    dev,
                    DevRequest::Read {
                        volume,
                        chunk,
                        offset,
                        len,
                        reply,
                    },
                )
                .await;
            }
            Request::Write {
                cred,
                chunk,
                offset,
            }
            | Request::WriteCached {
                cred,
                chunk,
                offset,
            } => {
                let cached = matches!(req, Request::WriteCached { .. });
                if let Some(bad) = check_len(&frame, true) {
                    return self.reply(t, bad);
                }
                let fence = match self.sled.verify_cached(&mut self.creds, &cred) {
                    Ok(f) => f,
                    Err(e) => return self.reply(t, Response::Error(wire_error(&e))),
                };
                let volume = cred.volume;
                t.volume = volume;
                t.len = u64::from(frame.header.data_len);
                let routed = self.sled.route_write(volume, chunk);
                t.routed = Some(routed);
                let reply = self.reply_to(t);
                self.queue_for(
                    routed.dev,
                    DevRequest::Write {
                        fence,
                        volume,
                        chunk,
                        offset,
                        data: frame.data,
                        cached,
                        reply,
                    },
                )
                .await;
            }
            Request::WriteZeroes {
                cred,
                chunk,
                offset,
                len,
            }
            | Request::Trim {
                cred,
                chunk,
                offset,
                len,
            } => {
                if let Some(bad) = check_len(&frame, false) {
                    return self.reply(t, bad);
                }
                let fence = match self.sled.verify_cached(&mut self.creds, &cred) {
                    Ok(f) => f,
                    Err(e) => return self.reply(t, Response::Error(wire_error(&e))),
                };
                let volume = cred.volume;
                t.volume = volume;
                // Unallocated chunks are already zero, but the fence is still checked.
                let dev = self.sled.route(volume, chunk);
                let reply = self.reply_to(t);
                self.queue_for(
                    dev,
                    DevRequest::Zero {
                        fence,
                        volume,
                        chunk,
                        offset,
                        len,
                        reply,
                    },
                )
                .await;
            }
            // After the requests read before it reached their devices: a flush covers every
            // cached write acknowledged before it was sent.
            Request::Flush => self.control(t, Control::Flush).await,
            Request::Hello { .. } | Request::Auth { .. } => {
                self.reply(
                    t,
                    proto_error(ErrorCode::Malformed, "already authenticated"),
                );
            }
            Request::Allocate { cred, chunk } => {
                self.control(t, Control::Allocate(cred, chunk)).await
            }
            Request::Free { cred, chunk } => self.control(t, Control::Free(cred, chunk)).await,
            Request::Claim { cred } => self.control(t, Control::Claim(cred)).await,
            Request::Retire { cred } => self.control(t, Control::Retire(cred)).await,
            Request::Stat => self.control(t, Control::Stat).await,
            Request::VolumeStat { volume } => self.control(t, Control::VolumeStat(volume)).await,
            Request::Supersede => {
                // Inline: this connection reads nothing more until the older ones are done.
                self.submit().await;
                let resp = match self.sessions.supersede(self.node, self.session).await {
                    Ok(n) => {
                        if n > 0 {
                            tracing::info!(
                                node_id = self.node.0,
                                connections = n,
                                "older connections of the head node ended"
                            );
                        }
                        Response::Ok
                    }
                    Err(msg) => proto_error(ErrorCode::Io, msg),
                };
                self.reply(t, resp);
            }
        }
    }

    fn reply_to<T>(&self, ticket: Ticket) -> Reply<T> {
        Reply::To(ReplyTo::new(self.sink.clone(), ticket))
    }

    /// Queues a request for device `dev`; a full batch is handed over at once.
    async fn queue_for(&mut self, dev: usize, req: DevRequest) {
        self.batches[dev].push(req);
        self.queued += 1;
        if self.batches[dev].len() >= MAX_BATCH {
            self.submit().await;
        }
    }

    /// Hands every queued request to its device (one queue reservation and at most one doorbell
    /// per device), and wakes the writer for replies made here.
    async fn submit(&mut self) {
        if self.queued > 0 {
            for (dev, batch) in self.batches.iter_mut().enumerate() {
                if !batch.is_empty() {
                    self.sled.device(dev).send_batch(batch).await;
                }
            }
            self.queued = 0;
        }
        if !self.woken {
            self.sink.wake();
            self.woken = true;
        }
    }

    /// Runs a control request in a task of its own, after the requests read before it have
    /// reached their devices.
    async fn control(&mut self, t: Ticket, c: Control) {
        self.submit().await;
        let sled = self.sled.clone();
        let sink = self.sink.clone();
        tokio::spawn(async move {
            let resp = control(&sled, c).await;
            sink.push_and_wake(Entry {
                ticket: t,
                outcome: Outcome::Ready(resp, None),
            });
        });
    }

    /// Returns the permits of a frame that will never be answered.
    fn give_back(&self, t: &Ticket) {
        self.permits.requests.add_permits(t.requests as usize);
        self.permits.kib.add_permits(t.kib as usize);
    }

    /// Answers a request without the devices.
    fn reply(&mut self, t: Ticket, resp: Response) {
        self.sink.push(Entry {
            ticket: t,
            outcome: Outcome::Ready(resp, None),
        });
        self.woken = false;
    }

    /// Answers a frame that was refused before any permit was taken for it.
    fn refuse(&mut self, tag: u64, started: Instant, resp: Response) {
        let t = Ticket {
            tag,
            op: None,
            started,
            requests: 0,
            kib: 0,
            volume: VolumeId(0),
            len: 0,
            routed: None,
        };
        self.reply(t, resp);
    }

    fn count_rejected(&self, reason: &str) {
        self.sled
            .metrics()
            .protocol_errors
            .with_label_values(&[reason])
            .inc();
    }

    /// Takes `n` permits from a pool. When it has to wait, the queued requests are handed over
    /// first: the permits it waits for come back only as requests complete.
    async fn acquire(&mut self, pool: Pool, n: u32) {
        if let Ok(p) = self.permits.pool(pool).try_acquire_many(n) {
            p.forget();
            return;
        }
        self.submit().await;
        let permits = self.permits.clone();
        permits
            .pool(pool)
            .acquire_many(n)
            .await
            .expect("the connection's semaphores are never closed")
            .forget();
    }
}

/// True when `buf` starts with a whole frame (or with a header that will be refused).
fn frame_buffered(buf: &[u8]) -> bool {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return false;
    };
    match FrameHeader::decode(h) {
        Ok(h) => buf.len() - HEADER_LEN >= h.ctl_len as usize + h.data_len as usize,
        Err(_) => true,
    }
}

async fn control(sled: &Sled, c: Control) -> Response {
    let done = |r: Result<(), SledError>| match r {
        Ok(()) => Response::Ok,
        Err(e) => Response::Error(wire_error(&e)),
    };
    match c {
        Control::Allocate(cred, chunk) => done(sled.allocate(&cred, chunk).await),
        Control::Free(cred, chunk) => done(sled.free(&cred, chunk).await),
        Control::Claim(cred) => match sled.claim(&cred).await {
            Ok(h) => Response::Claimed {
                epoch: h.epoch,
                holder: h.node,
            },
            Err(e) => Response::Error(wire_error(&e)),
        },
        Control::Retire(cred) => done(sled.retire(&cred).await),
        Control::Stat => Response::Stat(sled.stat().await),
        Control::Flush => done(sled.flush().await),
        Control::VolumeStat(volume) => Response::VolumeStat(sled.volume_stat(volume).await),
    }
}

/// The writing side of a connection: waits for its sink, answers everything in it, gives the
/// permits back and flushes once per batch. Ends when the reader has ended and every request
/// read is answered. After a failed write it keeps draining (without writing), so permits still
/// come back and nothing waits forever.
async fn write_replies(
    wr: OwnedWriteHalf,
    sled: Arc<Sled>,
    sink: Arc<ReplySink>,
    permits: Arc<Permits>,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, wr);
    let mut metrics = sled.metrics().connection();
    let mut entries = Vec::new();
    let mut broken = false;
    loop {
        // Read before taking: once the reader has ended, whatever it pushed is in this take.
        let ended = sink.ended();
        sink.take(&mut entries);
        if entries.is_empty() {
            if ended && permits.idle() {
                break;
            }
            sink.woken().await;
            continue;
        }
        let now = Instant::now();
        let (mut requests, mut kib) = (0usize, 0usize);
        for Entry { ticket: t, outcome } in entries.drain(..) {
            let (resp, data) = answer(&sled, &t, outcome);
            if let Some(op) = t.op {
                let ok = !matches!(resp, Response::Error(_));
                metrics.request(
                    op,
                    ok,
                    now.saturating_duration_since(t.started).as_secs_f64(),
                );
                if ok {
                    metrics.volume(t.volume, op, t.len);
                }
            }
            if !broken {
                let data = data.as_deref().unwrap_or(&[]);
                broken = match write_frame(&mut w, KIND_RESPONSE, t.tag, &resp, data).await {
                    Ok(()) => false,
                    // Too large for the client to read (refused before a byte was written): the
                    // request gets an error instead, and the connection carries on.
                    Err(ProtoError::TooLarge { what, len, max }) => {
                        let e = proto_error(
                            ErrorCode::TooLarge,
                            format!("the reply's {what} part would be {len} bytes, over {max}"),
                        );
                        write_frame(&mut w, KIND_RESPONSE, t.tag, &e, &[])
                            .await
                            .is_err()
                    }
                    Err(_) => true,
                };
            }
            requests += t.requests as usize;
            kib += t.kib as usize;
        }
        if requests > 0 {
            permits.requests.add_permits(requests);
        }
        if kib > 0 {
            permits.kib.add_permits(kib);
        }
        if !broken {
            broken = w.flush().await.is_err();
        }
    }
}

/// The reply to a finished request.
fn answer(sled: &Sled, t: &Ticket, outcome: Outcome) -> (Response, Option<AlignedBuf>) {
    if let (Some(routed), Outcome::Device(res)) = (t.routed, &outcome) {
        sled.write_done(t.volume, routed, res.as_ref().map(|_| ()));
    }
    match outcome {
        Outcome::Ready(resp, data) => (resp, data),
        Outcome::Device(Ok(Some(buf))) => (Response::Data, Some(buf)),
        Outcome::Device(Ok(None)) => (Response::Ok, None),
        Outcome::Device(Err(e)) => (Response::Error(wire_error(&SledError::Device(e))), None),
    }
}

fn reject_reason(e: &ProtoError) -> &'static str {
    match e {
        ProtoError::Checksum { .. } => "checksum",
        ProtoError::TooLarge { .. } => "too_large",
        ProtoError::BadMagic(_) | ProtoError::Kind(_) | ProtoError::Reserved(_) => "malformed",
        ProtoError::Version { .. } => "version",
        ProtoError::Decode(_) => "decode",
        ProtoError::Io(_) | ProtoError::Closed => "io",
    }
}

fn check_len(frame: &Frame, want_data: bool) -> Option<Response> {
    let has = frame.header.data_len > 0;
    (has != want_data).then(|| {
        proto_error(
            ErrorCode::Malformed,
            if want_data {
                "write without data"
            } else {
                "unexpected data part"
            },
        )
    })
}
