//! A client of the sled protocol: one authenticated TCP connection, many tagged requests in
//! flight, replies matched by tag.
//!
//! A writer task sends frames from a bounded queue (whatever is queued goes out with one flush); a
//! buffered reader task routes each reply to the caller waiting on its tag. When the connection
//! fails, every pending and later call fails with [`ClientError::Disconnected`]; the owner
//! reconnects.

use crate::AlignedBuf;
use crate::Credential;
use crate::cred::{ClusterKey, HandshakeRole, nonce};
use crate::ids::{ChunkIndex, NodeId, SledId, VolumeId};
use crate::sled_proto::{
    CACHED_WRITES_VERSION, ErrorCode, KIND_REQUEST, KIND_RESPONSE, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, ProtoError, RETIRE_VERSION, Request, Response, SledStat, VolumeStat,
    WireError, encode_frame, read_frame, read_handshake_frame, write_frame,
};
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Errors of sled calls.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("connecting to sled {addr}: {message}")]
    Connect {
        /// Address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The sled refused the handshake.
    #[error("sled {addr} refused the handshake: {message}")]
    Handshake {
        /// Address.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// The connection is gone.
    #[error("connection to sled {0} lost")]
    Disconnected(SocketAddr),
    /// The sled answered with an error.
    #[error("sled error: {0}")]
    Remote(WireError),
    /// The sled answered something that does not fit the request.
    #[error("unexpected reply from sled: {0}")]
    Unexpected(String),
    /// The call took too long.
    #[error("sled {0} did not answer in time")]
    Timeout(SocketAddr),
    /// The sled speaks an older protocol without this request.
    #[error("the sled speaks protocol version {version}; {what} needs version {needs}")]
    TooOld {
        /// The request.
        what: &'static str,
        /// The negotiated version.
        version: u16,
        /// The version the request needs.
        needs: u16,
    },
}

impl ClientError {
    /// The wire error code, when the sled answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote(w) => Some(w.code),
            _ => None,
        }
    }
}

type Pending =
    Arc<Mutex<HashMap<u64, oneshot::Sender<Result<(Response, AlignedBuf), ClientError>>>>>;

struct Outgoing {
    head: Vec<u8>,
    data: Option<Bytes>,
}

/// A connection to one sled.
#[derive(Debug)]
pub struct SledClient {
    addr: SocketAddr,
    sled: SledId,
    /// Unique in this process: which connection acknowledged what (see [`SledClient::id`]).
    id: u64,
    /// The protocol version agreed at hello.
    version: u16,
    tx: mpsc::Sender<Outgoing>,
    pending: Pending,
    next_tag: AtomicU64,
    alive: Arc<AtomicBool>,
    inflight: Arc<Semaphore>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
    /// A request not answered within this closes the connection (see [`SledClient::call`]).
    request_timeout: Option<Duration>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Outgoing({} + {} bytes)",
            self.head.len(),
            self.data.as_ref().map_or(0, |d| d.len())
        )
    }
}

impl Drop for SledClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// The data part of a request: shared bytes, taken from whatever the caller holds without a
/// copy.
#[derive(Debug, Clone)]
pub struct Payload(pub Bytes);

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Self(b)
    }
}

impl From<AlignedBuf> for Payload {
    fn from(b: AlignedBuf) -> Self {
        Self(b.into_bytes())
    }
}

impl From<Arc<AlignedBuf>> for Payload {
    fn from(b: Arc<AlignedBuf>) -> Self {
        Self(AlignedBuf::shared_bytes(b))
    }
}

/// A call's entry in the table of waiters, removed when the call ends (a no-op when the reader
/// already took it to answer it).
struct Waiter<'a> {
    pending: &'a Pending,
    tag: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.tag);
    }
}

/// Most requests in flight on one connection.
pub const MAX_IN_FLIGHT: usize = 256;

/// Bytes the reader takes from the socket at once.
const READ_BUFFER: usize = 64 * 1024;

/// Source of [`SledClient::id`]s.
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

impl SledClient {
    /// Connects and authenticates as head node `node`, within `timeout`.
    pub async fn connect(
        addr: SocketAddr,
        key: &ClusterKey,
        node: NodeId,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let conn_err = |m: String| ClientError::Connect { addr, message: m };
        let mut stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| conn_err("timed out".into()))?
            .map_err(|e| conn_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let hs = async {
            let my_nonce = nonce();
            let hello = Request::Hello {
                min_version: MIN_PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                node,
                nonce: my_nonce,
            };
            write_frame(&mut stream, KIND_REQUEST, 0, &hello, &[]).await?;
            stream.flush().await?;
            let f = read_handshake_frame(&mut stream).await?;
            let (sled, version, their_nonce, proof) = match f.decode::<Response>()? {
                Response::Challenge {
                    sled,
                    version,
                    nonce,
                    proof,
                } => (sled, version, nonce, proof),
                Response::Error(e) => return Ok(Err(e.to_string())),
                other => return Ok(Err(format!("expected Challenge, got {other:?}"))),
            };
            if !key.verify_handshake(HandshakeRole::Server, &their_nonce, &my_nonce, &proof) {
                return Ok(Err("the sled could not prove the cluster key".into()));
            }
            let auth = Request::Auth {
                proof: key.handshake_proof(HandshakeRole::Client, &my_nonce, &their_nonce),
            };
            write_frame(&mut stream, KIND_REQUEST, 1, &auth, &[]).await?;
            stream.flush().await?;
            let f = read_handshake_frame(&mut stream).await?;
            match f.decode::<Response>()? {
                Response::AuthOk => Ok(Ok((sled, version))),
                Response::Error(e) => Ok(Err(e.to_string())),
                other => Ok(Err(format!("expected AuthOk, got {other:?}"))),
            }
        };
        let (sled, version) = match tokio::time::timeout(timeout, hs).await {
            Err(_) => return Err(conn_err("handshake timed out".into())),
            Ok(Err::<_, ProtoError>(e)) => return Err(conn_err(e.to_string())),
            Ok(Ok(Err(message))) => return Err(ClientError::Handshake { addr, message }),
            Ok(Ok(Ok(answer))) => answer,
        };
        let (rd, wr) = stream.into_split();
        let pending: Pending = Arc::default();
        let alive = Arc::new(AtomicBool::new(true));
        let (tx, mut rx) = mpsc::channel::<Outgoing>(MAX_IN_FLIGHT);
        let walive = alive.clone();
        let writer = tokio::spawn(async move {
            let mut w = BufWriter::with_capacity(256 * 1024, wr);
            // Everything queued goes out with one flush (one send for a burst of requests).
            while let Some(first) = rx.recv().await {
                let ok = async {
                    let mut next = Some(first);
                    while let Some(o) = next {
                        w.write_all(&o.head).await?;
                        if let Some(d) = &o.data {
                            w.write_all(d).await?;
                        }
                        next = rx.try_recv().ok();
                    }
                    w.flush().await
                }
                .await;
                if ok.is_err() {
                    walive.store(false, Ordering::SeqCst);
                    return;
                }
            }
        });
        let rpending = pending.clone();
        let ralive = alive.clone();
        let reader = tokio::spawn(async move {
            // Buffered: a burst of replies costs one receive, not three per reply.
            let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
            loop {
                let frame = match read_frame(&mut rd).await {
                    Ok(f) if f.header.kind == KIND_RESPONSE => f,
                    Ok(_) | Err(_) => break,
                };
                let tag = frame.header.tag;
                let result = frame
                    .decode::<Response>()
                    .map(|r| (r, frame.data))
                    .map_err(|e| ClientError::Unexpected(e.to_string()));
                let waiter = rpending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&tag);
                if let Some(w) = waiter {
                    let _ = w.send(result);
                }
            }
            ralive.store(false, Ordering::SeqCst);
            let drained: Vec<_> = rpending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .collect();
            for (_, w) in drained {
                let _ = w.send(Err(ClientError::Disconnected(addr)));
            }
        });
        Ok(Self {
            addr,
            sled,
            id: NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed),
            version,
            tx,
            pending,
            next_tag: AtomicU64::new(2),
            alive,
            inflight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            reader,
            writer,
            request_timeout: None,
        })
    }

    /// Gives every request `timeout` to be answered: past it the request fails with
    /// [`ClientError::Timeout`] and the whole connection is closed (its other requests fail
    /// too), because a sled that does not answer one request is hung or unreachable, and a
    /// connection with a request of unknown fate must not be reused. A caller that must know
    /// that nothing sent on the closed connection can still run calls
    /// [`SledClient::supersede`] on its next one.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Closes the connection: requests in flight fail with `Disconnected`.
    pub fn close(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.reader.abort();
        self.writer.abort();
        let drained: Vec<_> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, w) in drained {
            let _ = w.send(Err(ClientError::Disconnected(self.addr)));
        }
    }

    /// Ends this head node's other connections to the sled and waits until everything they
    /// had sent has run there or been dropped (see `Request::Supersede`).
    pub async fn supersede(&self) -> Result<(), ClientError> {
        let r = self.call(&Request::Supersede, None).await?;
        Self::expect_ok(r)
    }

    /// The sled's id (from its handshake).
    pub fn sled_id(&self) -> SledId {
        self.sled
    }

    /// The sled's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// False once the connection has failed.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst) && !self.reader.is_finished()
    }

    /// Sends a request (with an optional data part) and waits for its reply. An error reply is
    /// returned as [`ClientError::Remote`].
    pub async fn call(
        &self,
        req: &Request,
        data: Option<Bytes>,
    ) -> Result<(Response, AlignedBuf), ClientError> {
        if !self.is_alive() {
            return Err(ClientError::Disconnected(self.addr));
        }
        let _permit = self
            .inflight
            .acquire()
            .await
            .map_err(|_| ClientError::Disconnected(self.addr))?;
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (head, _) = encode_frame(KIND_REQUEST, tag, req, data.as_deref().unwrap_or(&[]))
            .map_err(|e| ClientError::Unexpected(e.to_string()))?;
        let (wtx, wrx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tag, wtx);
        // However this call ends — answered, failed, or dropped by its caller while it waited
        // for room in the queue or for the reply — its waiter does not outlive it.
        let _waiter = Waiter {
            pending: &self.pending,
            tag,
        };
        if self.tx.send(Outgoing { head, data }).await.is_err() {
            return Err(ClientError::Disconnected(self.addr));
        }
        // If the reader already exited, make sure this waiter is not forgotten.
        if !self.is_alive()
            && let Some(w) = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&tag)
        {
            let _ = w.send(Err(ClientError::Disconnected(self.addr)));
        }
        let answer = match self.request_timeout {
            None => wrx.await,
            Some(t) => match tokio::time::timeout(t, wrx).await {
                Ok(a) => a,
                Err(_) => {
                    tracing::warn!(sled = %self.addr, timeout = ?t, op = req.op_name(),
                        "sled request timed out; closing the connection");
                    self.close();
                    return Err(ClientError::Timeout(self.addr));
                }
            },
        };
        match answer {
            Ok(Ok((Response::Error(e), _))) => Err(ClientError::Remote(e)),
            Ok(r) => r,
            Err(_) => Err(ClientError::Disconnected(self.addr)),
        }
    }

    fn expect_ok(r: (Response, AlignedBuf)) -> Result<(), ClientError> {
        match r.0 {
            Response::Ok => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Reads `len` bytes at `offset` within a chunk.
    pub async fn read(
        &self,
        volume: VolumeId,
        chunk: ChunkIndex,
        offset: u64,
        len: u32,
    ) -> Result<AlignedBuf, ClientError> {
        let (resp, data) = self
            .call(
                &Request::Read {
                    volume,
                    chunk,
                    offset,
                    len,
                },
                None,
            )
            .await?;
        match resp {
            Response::Data if data.len() == len as usize => Ok(data),
            Response::Data => Err(ClientError::Unexpected(format!(
                "read of {len} bytes returned {}",
                data.len()
            ))),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Writes `data` at `offset` within a chunk (any shared bytes: the sled receives them into
    /// its own aligned buffer).
    pub async fn write(
        &self,
        cred: &Credential,
        chunk: ChunkIndex,
        offset: u64,
        data: impl Into<Payload>,
    ) -> Result<(), ClientError> {
        self.write_as(false, cred, chunk, offset, data.into()).await
    }

    /// Writes, acknowledged once the sled's device holds the data but before it is durable;
    /// [`SledClient::flush`] makes it durable (see `Request::WriteCached`). A sled older than
    /// protocol version 2 gets a durable write instead, which is at least as strong.
    pub async fn write_cached(
        &self,
        cred: &Credential,
        chunk: ChunkIndex,
        offset: u64,
        data: impl Into<Payload>,
    ) -> Result<(), ClientError> {
        let cached = self.version >= CACHED_WRITES_VERSION;
        self.write_as(cached, cred, chunk, offset, data.into())
            .await
    }

    async fn write_as(
        &self,
        cached: bool,
        cred: &Credential,
        chunk: ChunkIndex,
        offset: u64,
        data: Payload,
    ) -> Result<(), ClientError> {
        let cred = *cred;
        let req = if cached {
            Request::WriteCached {
                cred,
                chunk,
                offset,
            }
        } else {
            Request::Write {
                cred,
                chunk,
                offset,
            }
        };
        Self::expect_ok(self.call(&req, Some(data.0)).await?)
    }

    /// Makes every cached write this head node had acknowledged before the call durable on the
    /// sled.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let r = self.call(&Request::Flush, None).await?;
        Self::expect_ok(r)
    }

    /// This connection's identity, unique in the process. A sled's flush covers the cached writes
    /// it acknowledged before, on any connection, unless it restarted in between, which always
    /// ends the connection: cached writes acknowledged on another connection than the flush's
    /// may have been lost.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The protocol version agreed with the sled.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Makes a range read as zeros.
    pub async fn write_zeroes(
        &self,
        cred: &Credential,
        chunk: ChunkIndex,
        offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        let r = self
            .call(
                &Request::WriteZeroes {
                    cred: *cred,
                    chunk,
                    offset,
                    len,
                },
                None,
            )
            .await?;
        Self::expect_ok(r)
    }

    /// Discards a range.
    pub async fn trim(
        &self,
        cred: &Credential,
        chunk: ChunkIndex,
        offset: u64,
        len: u64,
    ) -> Result<(), ClientError> {
        let r = self
            .call(
                &Request::Trim {
                    cred: *cred,
                    chunk,
                    offset,
                    len,
                },
                None,
            )
            .await?;
        Self::expect_ok(r)
    }

    /// Frees a chunk.
    pub async fn free(&self, cred: &Credential, chunk: ChunkIndex) -> Result<(), ClientError> {
        let r = self
            .call(&Request::Free { cred: *cred, chunk }, None)
            .await?;
        Self::expect_ok(r)
    }

    /// Retires a volume that holds no chunk on this sled any more (it was deleted): its fence
    /// records become tombstones (see [`Request::Retire`]).
    pub async fn retire(&self, cred: &Credential) -> Result<(), ClientError> {
        if self.version < RETIRE_VERSION {
            return Err(ClientError::TooOld {
                what: "retire",
                version: self.version,
                needs: RETIRE_VERSION,
            });
        }
        let r = self.call(&Request::Retire { cred: *cred }, None).await?;
        Self::expect_ok(r)
    }

    /// Allocates a chunk.
    pub async fn allocate(&self, cred: &Credential, chunk: ChunkIndex) -> Result<(), ClientError> {
        let r = self
            .call(&Request::Allocate { cred: *cred, chunk }, None)
            .await?;
        Self::expect_ok(r)
    }

    /// Claims a volume; returns the stored `(epoch, holder)`.
    pub async fn claim(
        &self,
        cred: &Credential,
    ) -> Result<(crate::ids::Epoch, NodeId), ClientError> {
        match self.call(&Request::Claim { cred: *cred }, None).await?.0 {
            Response::Claimed { epoch, holder } => Ok((epoch, holder)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sled statistics.
    pub async fn stat(&self) -> Result<SledStat, ClientError> {
        match self.call(&Request::Stat, None).await?.0 {
            Response::Stat(s) => Ok(s),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// What the sled holds of a volume.
    pub async fn volume_stat(&self, volume: VolumeId) -> Result<VolumeStat, ClientError> {
        match self.call(&Request::VolumeStat { volume }, None).await?.0 {
            Response::VolumeStat(s) => Ok(s),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }
}
