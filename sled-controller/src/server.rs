//! The sled's network server: authenticated connections speaking the framed protocol of
//! [`common::sled_proto`].
//!
//! A connection must prove knowledge of the cluster key (mutual HMAC over fresh nonces) before
//! anything else is accepted, within a deadline. Then requests are read in a loop and each is
//! served by its own task, so many are in flight and replies go out in completion order through
//! one writer task. In-flight requests and payload bytes per connection are bounded; at the bound
//! the reader simply stops reading (TCP back-pressure). A frame that is malformed, oversized or
//! fails its checksum gets an error reply and the connection is closed; other connections carry
//! on.

use crate::device::DevError;
use crate::sled::{Sled, SledError};
use common::AlignedBuf;
use common::cred::{HandshakeRole, nonce};
use common::sled_proto::{
    ErrorCode, Frame, KIND_REQUEST, KIND_RESPONSE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
    ProtoError, Request, Response, WireError, read_body, read_frame, read_header, write_frame,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

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

type Reply = (u64, Response, Option<AlignedBuf>);

/// Accepts connections until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    sled: Arc<Sled>,
    limits: ConnLimits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let sled = sled.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        sled.metrics().connections.inc();
                        if let Err(e) = connection(stream, sled.clone(), limits, shutdown).await {
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
) -> Result<(), ConnError> {
    let run = async {
        let f = read_frame(stream).await?;
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
        let f = read_frame(stream).await?;
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
        Ok(())
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

async fn connection(
    mut stream: TcpStream,
    sled: Arc<Sled>,
    limits: ConnLimits,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ConnError> {
    handshake(&mut stream, &sled, limits.handshake_timeout).await?;
    let (mut rd, wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Reply>(limits.max_requests);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 * 1024, wr);
        while let Some((tag, resp, data)) = rx.recv().await {
            let data = data.as_deref().unwrap_or(&[]);
            if write_frame(&mut w, KIND_RESPONSE, tag, &resp, data)
                .await
                .is_err()
            {
                return;
            }
            if rx.is_empty() && w.flush().await.is_err() {
                return;
            }
        }
        let _ = w.flush().await;
    });
    let requests = Arc::new(Semaphore::new(limits.max_requests));
    let kib = Arc::new(Semaphore::new((limits.max_bytes / 1024).max(1)));
    let max_kib = (limits.max_bytes / 1024).max(1) as u32;
    let result = loop {
        let header = tokio::select! {
            h = read_header(&mut rd) => h,
            _ = shutdown.changed() => break Ok(()),
        };
        let header = match header {
            Ok(h) if h.kind == KIND_REQUEST => h,
            Ok(h) => {
                let _ = tx
                    .send((
                        h.tag,
                        proto_error(ErrorCode::Malformed, "expected a request frame"),
                        None,
                    ))
                    .await;
                break Err(ProtoError::Kind(h.kind).into());
            }
            Err(ProtoError::Closed) => break Ok(()),
            Err(e) => {
                sled.metrics()
                    .protocol_errors
                    .with_label_values(&[reject_reason(&e)])
                    .inc();
                let code = if matches!(e, ProtoError::TooLarge { .. }) {
                    ErrorCode::TooLarge
                } else {
                    ErrorCode::Malformed
                };
                let _ = tx.send((0, proto_error(code, e.to_string()), None)).await;
                break Err(e.into());
            }
        };
        // Reserve before reading the payload: at the bound we stop reading.
        let req_permit = requests
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let want_kib = ((header.data_len as usize / 1024) as u32 + 1).min(max_kib);
        let byte_permit = kib
            .clone()
            .acquire_many_owned(want_kib)
            .await
            .expect("never closed");
        let frame = match read_body(&mut rd, header).await {
            Ok(f) => f,
            Err(e) => {
                sled.metrics()
                    .protocol_errors
                    .with_label_values(&[reject_reason(&e)])
                    .inc();
                let _ = tx
                    .send((
                        header.tag,
                        proto_error(ErrorCode::Malformed, e.to_string()),
                        None,
                    ))
                    .await;
                break Err(e.into());
            }
        };
        let req = match frame.decode::<Request>() {
            Ok(r) => r,
            Err(e) => {
                sled.metrics()
                    .protocol_errors
                    .with_label_values(&["decode"])
                    .inc();
                let _ = tx
                    .send((
                        header.tag,
                        proto_error(ErrorCode::Malformed, e.to_string()),
                        None,
                    ))
                    .await;
                break Err(e.into());
            }
        };
        let sled = sled.clone();
        let tx = tx.clone();
        let kib = kib.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let op = req.op_name();
            // A read reply carries its payload: account for it too.
            let extra = match &req {
                Request::Read { len, .. } => ((*len as usize / 1024) as u32 + 1).min(max_kib),
                _ => 0,
            };
            let extra_permit = if extra > 0 {
                kib.acquire_many_owned(extra).await.ok()
            } else {
                None
            };
            let (resp, data) = handle(&sled, req, frame).await;
            let ok = !matches!(resp, Response::Error(_));
            sled.metrics()
                .requests
                .with_label_values(&[op, if ok { "ok" } else { "error" }])
                .inc();
            sled.metrics()
                .request_seconds
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
            let _ = tx.send((header.tag, resp, data)).await;
            drop((req_permit, byte_permit, extra_permit));
        });
    };
    drop(tx);
    let _ = writer.await;
    result
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

fn err(e: SledError) -> (Response, Option<AlignedBuf>) {
    (Response::Error(wire_error(&e)), None)
}

fn check_len(frame: &Frame, want_data: bool) -> Option<(Response, Option<AlignedBuf>)> {
    let has = frame.header.data_len > 0;
    (has != want_data).then(|| {
        (
            proto_error(
                ErrorCode::Malformed,
                if want_data {
                    "write without data"
                } else {
                    "unexpected data part"
                },
            ),
            None,
        )
    })
}

async fn handle(sled: &Sled, req: Request, frame: Frame) -> (Response, Option<AlignedBuf>) {
    let m = sled.metrics();
    match req {
        Request::Hello { .. } | Request::Auth { .. } => (
            proto_error(ErrorCode::Malformed, "already authenticated"),
            None,
        ),
        Request::Read {
            volume,
            chunk,
            offset,
            len,
        } => {
            if let Some(bad) = check_len(&frame, false) {
                return bad;
            }
            match sled.read(volume, chunk, offset, len).await {
                Ok(buf) => {
                    let v = volume.to_string();
                    m.volume_ops.with_label_values(&[&v, "read"]).inc();
                    m.volume_bytes
                        .with_label_values(&[&v, "read"])
                        .inc_by(u64::from(len));
                    (Response::Data, Some(buf))
                }
                Err(e) => err(e),
            }
        }
        Request::Write {
            cred,
            chunk,
            offset,
        } => {
            if let Some(bad) = check_len(&frame, true) {
                return bad;
            }
            let len = frame.header.data_len;
            match sled.write(&cred, chunk, offset, frame.data).await {
                Ok(()) => {
                    let v = cred.volume.to_string();
                    m.volume_ops.with_label_values(&[&v, "write"]).inc();
                    m.volume_bytes
                        .with_label_values(&[&v, "write"])
                        .inc_by(u64::from(len));
                    (Response::Ok, None)
                }
                Err(e) => err(e),
            }
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
                return bad;
            }
            match sled.zero(&cred, chunk, offset, len).await {
                Ok(()) => (Response::Ok, None),
                Err(e) => err(e),
            }
        }
        Request::Allocate { cred, chunk } => match sled.allocate(&cred, chunk).await {
            Ok(()) => (Response::Ok, None),
            Err(e) => err(e),
        },
        Request::Free { cred, chunk } => match sled.free(&cred, chunk).await {
            Ok(()) => (Response::Ok, None),
            Err(e) => err(e),
        },
        Request::Claim { cred } => match sled.claim(&cred).await {
            Ok(h) => (
                Response::Claimed {
                    epoch: h.epoch,
                    holder: h.node,
                },
                None,
            ),
            Err(e) => err(e),
        },
        // Every write is durable when acknowledged.
        Request::Flush => (Response::Ok, None),
        Request::Stat => (Response::Stat(sled.stat().await), None),
        Request::VolumeStat { volume } => {
            (Response::VolumeStat(sled.volume_stat(volume).await), None)
        }
    }
}
