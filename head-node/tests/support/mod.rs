//! Test harness: an in-process NBD server on 127.0.0.1:0 over [`MemExports`], and a raw-socket
//! NBD client built on the crate's pure protocol codecs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use head_node::nbd::proto::{self, HeaderStyle, OptionHeader, OptionReplyHeader, Request};
use head_node::nbd::{Exports, MemExports, MemVolume, NbdServer, ServerConfig, ServerError};
use prometheus::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A server running in the test's runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub registry: Registry,
    pub exports: Arc<MemExports>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub async fn start(volumes: Vec<MemVolume>) -> Self {
        Self::start_with(ServerConfig::default(), volumes).await
    }

    pub async fn start_with(config: ServerConfig, volumes: Vec<MemVolume>) -> Self {
        let exports = Arc::new(MemExports::new());
        for v in volumes {
            exports.add(Arc::new(v));
        }
        let registry = Registry::new();
        let server = NbdServer::new(exports.clone(), config, &registry).expect("server");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            registry,
            exports,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// The volume called `name`.
    pub fn vol(&self, name: &str) -> Arc<MemVolume> {
        self.exports.get(name).expect("volume")
    }

    /// Stops the server and waits for `serve` to return.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("serve returns after shutdown")
                .expect("serve task")
                .expect("serve ok");
        }
    }

    /// The value of one series in the text exposition (0 when absent).
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.registry, series)
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }
}

/// The value of `series` (name with its labels in exposition order) in `registry`.
pub fn metric(registry: &Registry, series: &str) -> f64 {
    let text = common::metrics::render(registry);
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `cond` until it holds (10 s limit).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// True when the server closes the connection (EOF or reset) within 10 s; bytes still on the
/// wire before the end (replies to earlier requests) are skipped.
pub async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// True when the server closes the connection (EOF or reset) within 10 s without sending
/// anything more first.
pub async fn closed_without_more(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

// ---------------------------------------------------------------------------------------------
// Handshake helpers.

/// Connects and reads the greeting; returns the handshake flags.
pub async fn greet(addr: SocketAddr) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut g = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut g).await.expect("greeting");
    let flags = proto::decode_greeting(&g).expect("valid greeting");
    (s, flags)
}

/// Connects and completes the flag exchange (fixed newstyle, no zeroes).
pub async fn handshake(addr: SocketAddr) -> TcpStream {
    let (mut s, _) = greet(addr).await;
    s.write_u32(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .await
        .expect("client flags");
    s
}

pub async fn send_opt(s: &mut TcpStream, option: u32, data: &[u8]) {
    let h = OptionHeader {
        option,
        length: data.len() as u32,
    };
    s.write_all(&h.encode()).await.expect("option header");
    s.write_all(data).await.expect("option data");
}

pub async fn recv_opt(s: &mut TcpStream) -> (OptionReplyHeader, Vec<u8>) {
    let mut h = [0u8; OptionReplyHeader::LEN];
    s.read_exact(&mut h).await.expect("option reply header");
    let h = OptionReplyHeader::decode(&h).expect("option reply magic");
    let mut data = vec![0u8; h.length as usize];
    s.read_exact(&mut data).await.expect("option reply data");
    (h, data)
}

/// Sends an option and reads replies up to the final one (ACK or an error).
pub async fn opt(s: &mut TcpStream, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
    send_opt(s, option, data).await;
    let mut out = Vec::new();
    loop {
        let (h, d) = recv_opt(s).await;
        assert_eq!(h.option, option, "reply for the option sent");
        let last = h.reply_type == proto::REP_ACK || h.is_error();
        out.push((h.reply_type, d));
        if last {
            return out;
        }
    }
}

/// The final reply type of an option.
pub async fn opt_result(s: &mut TcpStream, option: u32, data: &[u8]) -> u32 {
    opt(s, option, data).await.last().expect("a reply").0
}

pub fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    proto::InfoRequest {
        name: name.into(),
        requests: requests.to_vec(),
    }
    .encode()
}

pub fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    proto::MetaContextRequest {
        export: export.into(),
        queries: queries.iter().map(|q| q.to_string()).collect(),
    }
    .encode()
}

/// What a client negotiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing: simple replies only.
    Simple,
    /// Structured replies and `base:allocation`.
    Structured,
    /// Extended headers and `base:allocation`.
    Extended,
}

pub const ALL_MODES: [Mode; 3] = [Mode::Simple, Mode::Structured, Mode::Extended];

/// The export as described by `NBD_OPT_GO`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// Negotiates `mode` for `export` with `NBD_OPT_GO` (asking for block sizes).
pub async fn open(addr: SocketAddr, export: &str, mode: Mode) -> Nbd {
    let mut s = handshake(addr).await;
    let style = match mode {
        Mode::Simple => proto::ReplyStyle::Simple,
        Mode::Structured => {
            assert_eq!(
                opt_result(&mut s, proto::OPT_STRUCTURED_REPLY, b"").await,
                proto::REP_ACK
            );
            proto::ReplyStyle::Structured
        }
        Mode::Extended => {
            assert_eq!(
                opt_result(&mut s, proto::OPT_EXTENDED_HEADERS, b"").await,
                proto::REP_ACK
            );
            proto::ReplyStyle::Extended
        }
    };
    if mode != Mode::Simple {
        let r = opt(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            &meta_request(export, &[proto::CONTEXT_BASE_ALLOCATION]),
        )
        .await;
        assert_eq!(r.len(), 2, "one context then ACK: {r:?}");
    }
    let replies = opt(
        &mut s,
        proto::OPT_GO,
        &info_request(export, &[proto::INFO_BLOCK_SIZE]),
    )
    .await;
    assert_eq!(
        replies.last().map(|r| r.0),
        Some(proto::REP_ACK),
        "GO {export}"
    );
    let mut info = Export::default();
    for (t, d) in &replies {
        if *t != proto::REP_INFO {
            continue;
        }
        match proto::InfoReply::decode(d).expect("info item") {
            proto::InfoReply::Export { size, flags } => {
                info.size = size;
                info.flags = flags;
            }
            proto::InfoReply::BlockSize {
                min,
                preferred,
                max,
            } => {
                info.min = min;
                info.preferred = preferred;
                info.max = max;
            }
            _ => {}
        }
    }
    Nbd {
        s,
        style,
        export: info,
        reads: HashMap::new(),
        next_cookie: 1,
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission helpers.

/// A client in the transmission phase.
pub struct Nbd {
    pub s: TcpStream,
    pub style: proto::ReplyStyle,
    pub export: Export,
    /// Outstanding reads (cookie → length), needed to parse simple replies.
    reads: HashMap<u64, u64>,
    next_cookie: u64,
}

/// One complete reply.
#[derive(Debug, Default, Clone)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub message: String,
    pub error_offset: Option<u64>,
    pub data: Vec<u8>,
    pub data_offset: Option<u64>,
    pub context: Option<u32>,
    pub extents: Vec<(u64, u32)>,
    /// Chunk types received (empty for a simple reply).
    pub chunks: Vec<u16>,
    pub simple: bool,
    /// The offset echoed by an extended header.
    pub header_offset: Option<u64>,
}

/// Enters transmission with `NBD_OPT_EXPORT_NAME` (no block sizes, simple replies).
pub async fn open_export_name(addr: SocketAddr, export: &str) -> Nbd {
    let mut s = handshake(addr).await;
    send_opt(&mut s, proto::OPT_EXPORT_NAME, export.as_bytes()).await;
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await.expect("export name reply");
    let size = u64::from_be_bytes(r[..8].try_into().unwrap());
    let flags = u16::from_be_bytes(r[8..].try_into().unwrap());
    let mut c = Nbd::from_stream(s, proto::ReplyStyle::Simple);
    c.export = Export {
        size,
        flags,
        ..Export::default()
    };
    c
}

impl Nbd {
    /// A client over a stream already in transmission.
    pub fn from_stream(s: TcpStream, style: proto::ReplyStyle) -> Self {
        Self {
            s,
            style,
            export: Export::default(),
            reads: HashMap::new(),
            next_cookie: 1,
        }
    }

    pub fn header_style(&self) -> HeaderStyle {
        self.style.header_style()
    }

    pub fn cookie(&mut self) -> u64 {
        self.next_cookie += 1;
        self.next_cookie
    }

    /// Sends a raw request (the caller supplies any payload).
    pub async fn send(
        &mut self,
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) {
        let r = Request {
            flags,
            kind: cmd,
            cookie,
            offset,
            length,
        };
        if cmd == proto::Cmd::Read.wire() {
            self.reads.insert(cookie, length);
        }
        let mut buf = r.encode(self.header_style()).expect("encodable request");
        buf.extend_from_slice(payload);
        self.s.write_all(&buf).await.expect("send request");
    }

    /// Receives one complete reply (all its chunks).
    pub async fn recv(&mut self) -> Reply {
        tokio::time::timeout(Duration::from_secs(20), self.recv_inner())
            .await
            .expect("a reply within 20 s")
    }

    async fn recv_inner(&mut self) -> Reply {
        let mut reply = Reply::default();
        loop {
            let mut magic = [0u8; 4];
            self.s.read_exact(&mut magic).await.expect("reply magic");
            let len = proto::ReplyHeader::len_for_magic(u32::from_be_bytes(magic))
                .unwrap_or_else(|| panic!("unknown reply magic {magic:x?}"));
            let mut h = magic.to_vec();
            h.resize(len, 0);
            self.s.read_exact(&mut h[4..]).await.expect("reply header");
            match proto::ReplyHeader::decode(&h).expect("reply header") {
                proto::ReplyHeader::Simple { error, cookie } => {
                    assert_ne!(
                        self.style,
                        proto::ReplyStyle::Extended,
                        "simple reply with extended headers"
                    );
                    reply.simple = true;
                    reply.cookie = cookie;
                    reply.error = error;
                    let want = self.reads.remove(&cookie);
                    if error == 0
                        && let Some(n) = want
                    {
                        assert_eq!(self.style, proto::ReplyStyle::Simple, "simple read reply");
                        reply.data = vec![0u8; n as usize];
                        self.s.read_exact(&mut reply.data).await.expect("read data");
                    }
                    return reply;
                }
                proto::ReplyHeader::Chunk {
                    flags,
                    chunk_type,
                    cookie,
                    offset,
                    length,
                } => {
                    assert_ne!(
                        self.style,
                        proto::ReplyStyle::Simple,
                        "chunk not negotiated"
                    );
                    assert_eq!(
                        offset.is_some(),
                        self.style == proto::ReplyStyle::Extended,
                        "chunk header style"
                    );
                    assert!(length <= 64 * MIB, "sane chunk length {length}");
                    reply.cookie = cookie;
                    reply.header_offset = offset;
                    reply.chunks.push(chunk_type);
                    let mut p = vec![0u8; length as usize];
                    self.s.read_exact(&mut p).await.expect("chunk payload");
                    match chunk_type {
                        proto::REPLY_TYPE_NONE => assert!(p.is_empty()),
                        proto::REPLY_TYPE_OFFSET_DATA => {
                            reply.data_offset =
                                Some(u64::from_be_bytes(p[..8].try_into().unwrap()));
                            reply.data.extend_from_slice(&p[8..]);
                        }
                        proto::REPLY_TYPE_BLOCK_STATUS | proto::REPLY_TYPE_BLOCK_STATUS_EXT => {
                            let ext = chunk_type == proto::REPLY_TYPE_BLOCK_STATUS_EXT;
                            let (id, d) =
                                proto::decode_block_status_payload(ext, &p).expect("status");
                            reply.context = Some(id);
                            reply.extents = d;
                        }
                        proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => {
                            let (e, m, o) =
                                proto::decode_error_payload(chunk_type, &p).expect("error chunk");
                            reply.error = e;
                            reply.message = m;
                            reply.error_offset = o;
                        }
                        other => panic!("unexpected chunk type {other}"),
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        self.reads.remove(&cookie);
                        return reply;
                    }
                }
            }
        }
    }

    /// Sends a request and waits for its reply (nothing else in flight).
    pub async fn call(
        &mut self,
        cmd: proto::Cmd,
        flags: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Reply {
        let cookie = self.cookie();
        self.send(cmd.wire(), flags, cookie, offset, length, payload)
            .await;
        let r = self.recv().await;
        assert_eq!(r.cookie, cookie, "reply matches the request");
        r
    }

    pub async fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, u32> {
        let r = self.call(proto::Cmd::Read, 0, offset, len, &[]).await;
        if r.error != 0 {
            return Err(r.error);
        }
        if self.style != proto::ReplyStyle::Simple {
            assert_eq!(r.data_offset, Some(offset));
            assert_eq!(r.chunks, [proto::REPLY_TYPE_OFFSET_DATA]);
        }
        assert_eq!(r.data.len() as u64, len);
        Ok(r.data)
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.call(proto::Cmd::Write, flags, offset, data.len() as u64, data)
            .await
            .error
    }

    pub async fn flush(&mut self) -> u32 {
        self.call(proto::Cmd::Flush, 0, 0, 0, &[]).await.error
    }

    pub async fn trim(&mut self, offset: u64, len: u64) -> u32 {
        self.call(proto::Cmd::Trim, 0, offset, len, &[]).await.error
    }

    pub async fn zero(&mut self, offset: u64, len: u64, flags: u16) -> u32 {
        self.call(proto::Cmd::WriteZeroes, flags, offset, len, &[])
            .await
            .error
    }

    pub async fn status(&mut self, offset: u64, len: u64, flags: u16) -> Reply {
        self.call(proto::Cmd::BlockStatus, flags, offset, len, &[])
            .await
    }

    /// Sends NBD_CMD_DISC.
    pub async fn disc(&mut self) {
        let c = self.cookie();
        self.send(proto::Cmd::Disc.wire(), 0, c, 0, 0, &[]).await;
    }
}

/// Deterministic test data.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}
