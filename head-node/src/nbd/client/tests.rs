//! Tests of the NBD client: against the real server over a [`MemVolume`], and against a scripted
//! fake server that sends exactly the bytes a test wants (out-of-order replies, split reads,
//! malformed chunks, a connection cut mid-reply).

use super::*;
use crate::nbd::{MemExports, MemVolume, NbdServer, ServerConfig};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;
/// Bound on every wait in these tests: a hang fails the test instead of stalling the suite.
const LIMIT: Duration = Duration::from_secs(10);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.expect("timed out")
}

/// Serves `vol` on a loopback port; aborting the handle kills the server and its connections.
pub(crate) async fn mem_server(vol: Arc<MemVolume>) -> (SocketAddr, JoinHandle<()>) {
    let exports = Arc::new(MemExports::new());
    exports.add(vol);
    let registry = prometheus::Registry::new();
    let server = NbdServer::new(exports, ServerConfig::default(), &registry).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let _ = server.serve(l, std::future::pending()).await;
    });
    (addr, h)
}

/// A TCP relay in front of `backend`. Aborting the handle is a crash as the client sees it:
/// every relayed connection and the listener close at once (aborting a server task alone does
/// not close the sockets its reply writers still hold).
pub(crate) async fn relay(backend: SocketAddr) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = l.accept().await {
            conns.spawn(async move {
                if let Ok(mut out) = TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, h)
}

/// A "head node": a server over `vol` behind a relay; abort the handle to kill it.
pub(crate) async fn head(vol: Arc<MemVolume>) -> (SocketAddr, JoinHandle<()>) {
    let (backend, _server) = mem_server(vol).await;
    relay(backend).await
}

fn cfg(extended: bool) -> ClientConfig {
    ClientConfig {
        extended_headers: extended,
        ..ClientConfig::default()
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add((i % 251) as u8))
            .collect::<Vec<u8>>(),
    )
}

// ---------------------------------------------------------------------------------------------
// Against the real server.

async fn every_command(extended: bool) {
    let vol = Arc::new(MemVolume::new("vol", 16 * MIB).with_description("test volume"));
    let (addr, _server) = mem_server(vol.clone()).await;
    let c = within(NbdClient::connect(addr, "vol", &cfg(extended)))
        .await
        .unwrap();
    let d = c.details().clone();
    assert_eq!(d.size, 16 * MIB);
    assert_eq!(d.description, "test volume");
    assert_eq!((d.min_block, d.preferred_block), (512, 4096));
    assert_eq!(d.max_block, 32 << 20);
    assert!(d.multi_conn() && !d.read_only());
    assert!(d.base_allocation.is_some());
    let style = if extended {
        ReplyStyle::Extended
    } else {
        ReplyStyle::Structured
    };
    assert_eq!(d.reply_style, style);
    assert_eq!(d.export_info().size, 16 * MIB);

    let data = pattern(3, 128 << 10);
    within(c.write(MIB, data.clone(), false)).await.unwrap();
    within(c.write(2 * MIB, data.clone(), true)).await.unwrap();
    let back = within(c.read(MIB, 128 << 10)).await.unwrap();
    assert_eq!(&back[..], &data[..]);
    within(c.flush()).await.unwrap();
    assert!(vol.flush_count() >= 1);
    within(c.cache(0, MIB)).await.unwrap();

    // Block status: hole, data, hole…
    let ext = within(c.block_status(0, 4 * MIB, false)).await.unwrap();
    assert_eq!(ext[0], Extent::hole(MIB));
    assert!(!ext[1].hole && !ext[1].zero, "{ext:?}");
    let ext1 = within(c.block_status(0, 4 * MIB, true)).await.unwrap();
    assert_eq!(ext1.len(), 1);

    // Write zeroes keeping the range allocated, then a fast zero, then trim.
    let z = ZeroFlags {
        no_hole: true,
        ..ZeroFlags::default()
    };
    within(c.write_zeroes(MIB, 64 << 10, z)).await.unwrap();
    let back = within(c.read(MIB, 128 << 10)).await.unwrap();
    assert!(back[..64 << 10].iter().all(|&b| b == 0));
    assert_eq!(&back[64 << 10..], &data[64 << 10..]);
    let ext = within(c.block_status(MIB, 64 << 10, false)).await.unwrap();
    assert_eq!(ext[0], Extent::zeroed(64 << 10));
    let fast = ZeroFlags {
        fast_only: true,
        fua: true,
        ..ZeroFlags::default()
    };
    within(c.write_zeroes(2 * MIB, 64 << 10, fast))
        .await
        .unwrap();
    within(c.trim(2 * MIB, 128 << 10, true)).await.unwrap();
    let back = within(c.read(2 * MIB, 128 << 10)).await.unwrap();
    assert!(back.iter().all(|&b| b == 0));

    // Unaligned to the preferred size but aligned to the minimum.
    within(c.write(512, pattern(9, 1024), false)).await.unwrap();
    assert_eq!(
        &within(c.read(512, 1024)).await.unwrap()[..],
        &pattern(9, 1024)[..]
    );
    assert_eq!(c.in_flight(), 0);
    within(c.disconnect()).await;
    assert!(c.is_closed());
    assert!(matches!(
        c.read(0, 512).await,
        Err(ClientError::Lost(Lost::Closed))
    ));
}

#[tokio::test]
async fn every_command_with_extended_headers() {
    every_command(true).await;
}

#[tokio::test]
async fn every_command_with_structured_replies() {
    every_command(false).await;
}

#[tokio::test]
async fn server_errors_are_typed() {
    let vol = Arc::new(MemVolume::new("vol", 4 * MIB).with_fast_zero(false));
    vol.poison(MIB + 4096..MIB + 8192);
    let (addr, _server) = mem_server(vol.clone()).await;
    let c = NbdClient::connect(addr, "vol", &ClientConfig::default())
        .await
        .unwrap();
    match within(c.read(MIB, 64 << 10)).await {
        Err(ClientError::Server {
            cmd: Cmd::Read,
            errno: proto::EIO,
            offset: Some(o),
            ..
        }) => assert_eq!(o, MIB + 4096),
        other => panic!("{other:?}"),
    }
    let fast = ZeroFlags {
        fast_only: true,
        ..ZeroFlags::default()
    };
    let e = within(c.write_zeroes(0, 4096, fast)).await.unwrap_err();
    assert_eq!(e.errno(), Some(proto::ENOTSUP), "{e}");
    let e = within(c.read(4 * MIB - 512, 1024)).await.unwrap_err();
    assert_eq!(e.errno(), Some(proto::EINVAL));
    let e = within(c.write(4 * MIB, pattern(1, 512), false))
        .await
        .unwrap_err();
    assert_eq!(e.errno(), Some(proto::ENOSPC));
    // Errors are per request: the connection carries on.
    within(c.write(0, pattern(1, 512), false)).await.unwrap();
    assert!(!c.is_closed());
    // Client-side checks.
    assert!(matches!(
        c.read(0, 0).await,
        Err(ClientError::Invalid { .. })
    ));
    assert!(matches!(
        c.read(0, (32 << 20) + 512).await,
        Err(ClientError::Invalid { .. })
    ));

    let ro = Arc::new(MemVolume::new("ro", MIB).with_read_only(true));
    let (addr, _s2) = mem_server(ro).await;
    let c = NbdClient::connect(addr, "ro", &ClientConfig::default())
        .await
        .unwrap();
    assert!(c.details().read_only());
    let e = within(c.write(0, pattern(1, 512), false))
        .await
        .unwrap_err();
    assert_eq!(e.errno(), Some(proto::EPERM));
    assert!(matches!(
        c.trim(0, 512, false).await,
        Err(ClientError::Unsupported { cmd: Cmd::Trim })
    ));

    match NbdClient::connect(addr, "nope", &ClientConfig::default()).await {
        Err(ClientError::Refused { reply, .. }) => assert_eq!(reply, proto::REP_ERR_UNKNOWN),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn many_requests_in_flight_complete_out_of_order() {
    let vol = Arc::new(MemVolume::new("vol", 64 * MIB));
    let (addr, _server) = mem_server(vol.clone()).await;
    let c = Arc::new(
        NbdClient::connect(addr, "vol", &ClientConfig::default())
            .await
            .unwrap(),
    );
    for i in 0..64u64 {
        c.write(i * 65536, pattern(i as u8, 65536), false)
            .await
            .unwrap();
    }
    vol.pause();
    let mut tasks = Vec::new();
    for i in 0..128u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                let b = c.read((i / 2) * 65536, 65536).await.unwrap();
                assert_eq!(&b[..], &pattern((i / 2) as u8, 65536)[..]);
            } else {
                c.write(32 * MIB + i * 4096, pattern(i as u8, 4096), false)
                    .await
                    .unwrap();
            }
        }));
    }
    within(async {
        while vol.pending() < 128 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    assert_eq!(c.in_flight(), 128);
    vol.resume();
    for t in tasks {
        within(t).await.unwrap();
    }
    for i in (1..128u64).step_by(2) {
        let b = c.read(32 * MIB + i * 4096, 4096).await.unwrap();
        assert_eq!(&b[..], &pattern(i as u8, 4096)[..]);
    }
}

#[tokio::test]
async fn a_killed_server_fails_requests_in_flight_instead_of_hanging() {
    let vol = Arc::new(MemVolume::new("vol", 4 * MIB));
    let (addr, server) = head(vol.clone()).await;
    let c = Arc::new(
        NbdClient::connect(addr, "vol", &ClientConfig::default())
            .await
            .unwrap(),
    );
    vol.pause();
    let r = {
        let c = c.clone();
        tokio::spawn(async move { c.read(0, 4096).await })
    };
    within(async {
        while vol.pending() < 1 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    server.abort();
    let e = within(r).await.unwrap().unwrap_err();
    assert!(e.is_connection_lost(), "{e}");
    assert!(c.is_closed());
    assert!(matches!(c.lost_reason(), Some(Lost::Eof | Lost::Io(_))));
    vol.resume();
}

// ---------------------------------------------------------------------------------------------
// A scripted fake server.

#[derive(Debug, Clone, Copy)]
struct FakeOpts {
    fixed_newstyle: bool,
    extended: bool,
    structured: bool,
    size: u64,
    flags: u16,
}

impl Default for FakeOpts {
    fn default() -> Self {
        Self {
            fixed_newstyle: true,
            extended: false,
            structured: true,
            size: 16 * MIB,
            flags: proto::TFLAG_HAS_FLAGS
                | proto::TFLAG_SEND_FLUSH
                | proto::TFLAG_SEND_FUA
                | proto::TFLAG_SEND_TRIM
                | proto::TFLAG_SEND_WRITE_ZEROES
                | proto::TFLAG_SEND_CACHE,
        }
    }
}

/// The context id the fake gives `base:allocation`.
const FAKE_CONTEXT: u32 = 7;

struct Fake {
    rd: BufReader<ReadHalf<DuplexStream>>,
    wr: WriteHalf<DuplexStream>,
    style: ReplyStyle,
}

impl Fake {
    /// Runs the server side of the handshake; `None` once it refused to go on.
    async fn accept(stream: DuplexStream, o: FakeOpts) -> Option<Fake> {
        let (rd, mut wr) = tokio::io::split(stream);
        let mut rd = BufReader::new(rd);
        let hflags = if o.fixed_newstyle {
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES
        } else {
            0
        };
        wr.write_all(&proto::encode_greeting(hflags)).await.ok()?;
        let _client_flags = rd.read_u32().await.ok()?;
        let mut style = ReplyStyle::Simple;
        loop {
            let mut hb = [0u8; proto::OptionHeader::LEN];
            rd.read_exact(&mut hb).await.ok()?;
            let h = proto::OptionHeader::decode(&hb).ok()?;
            let mut data = vec![0u8; h.length as usize];
            rd.read_exact(&mut data).await.ok()?;
            let mut out = Vec::new();
            let rep = |out: &mut Vec<u8>, t: u32, d: &[u8]| {
                proto::encode_option_reply(out, h.option, t, d).unwrap();
            };
            match h.option {
                proto::OPT_EXTENDED_HEADERS if o.extended => {
                    style = ReplyStyle::Extended;
                    rep(&mut out, proto::REP_ACK, b"");
                }
                proto::OPT_STRUCTURED_REPLY if o.structured => {
                    style = ReplyStyle::Structured;
                    rep(&mut out, proto::REP_ACK, b"");
                }
                proto::OPT_SET_META_CONTEXT => {
                    let item = proto::encode_rep_meta_context(
                        FAKE_CONTEXT,
                        proto::CONTEXT_BASE_ALLOCATION,
                    );
                    rep(&mut out, proto::REP_META_CONTEXT, &item);
                    rep(&mut out, proto::REP_ACK, b"");
                }
                proto::OPT_GO => {
                    rep(
                        &mut out,
                        proto::REP_INFO,
                        &proto::encode_info_export(o.size, o.flags),
                    );
                    rep(
                        &mut out,
                        proto::REP_INFO,
                        &proto::encode_info_block_size(512, 4096, 1 << 20),
                    );
                    rep(&mut out, proto::REP_ACK, b"");
                    wr.write_all(&out).await.ok()?;
                    return Some(Fake { rd, wr, style });
                }
                _ => rep(&mut out, proto::REP_ERR_UNSUP, b"no"),
            }
            wr.write_all(&out).await.ok()?;
        }
    }

    /// Reads one request (and a write's payload).
    async fn request(&mut self) -> (Request, Vec<u8>) {
        let hs = self.style.header_style();
        let mut hb = vec![0u8; hs.request_len()];
        self.rd.read_exact(&mut hb).await.unwrap();
        let r = Request::decode(hs, &hb).unwrap();
        let mut payload = Vec::new();
        if r.cmd() == Some(Cmd::Write) {
            payload = vec![0u8; r.length as usize];
            self.rd.read_exact(&mut payload).await.unwrap();
        }
        (r, payload)
    }

    async fn chunk(&mut self, flags: u16, chunk_type: u16, r: &Request, payload: &[u8]) {
        let mut out = Vec::new();
        proto::encode_chunk_header(
            &mut out,
            self.style,
            flags,
            chunk_type,
            r.cookie,
            r.offset,
            payload.len() as u64,
        )
        .unwrap();
        out.extend_from_slice(payload);
        self.wr.write_all(&out).await.unwrap();
    }

    async fn done(&mut self, r: &Request) {
        self.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, r, &[])
            .await;
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }
}

async fn fake(o: FakeOpts, ccfg: ClientConfig) -> (NbdClient, Fake) {
    let (a, b) = tokio::io::duplex(4 << 20);
    let (c, f) =
        within(async { tokio::join!(NbdClient::handshake(a, "vol", &ccfg), Fake::accept(b, o)) })
            .await;
    (c.unwrap(), f.unwrap())
}

fn data_payload(offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

fn hole_payload(offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    p
}

#[tokio::test]
async fn handshake_negotiates_and_falls_back() {
    let (c, _f) = fake(FakeOpts::default(), ClientConfig::default()).await;
    let d = c.details();
    assert_eq!(d.reply_style, ReplyStyle::Structured, "extended refused");
    assert_eq!(d.base_allocation, Some(FAKE_CONTEXT));
    assert_eq!(d.max_block, 1 << 20);
    assert!(!d.multi_conn());

    let (c, _f) = fake(
        FakeOpts {
            extended: true,
            ..FakeOpts::default()
        },
        ClientConfig::default(),
    )
    .await;
    assert_eq!(c.details().reply_style, ReplyStyle::Extended);

    for (o, want) in [
        (
            FakeOpts {
                structured: false,
                ..FakeOpts::default()
            },
            "structured",
        ),
        (
            FakeOpts {
                fixed_newstyle: false,
                ..FakeOpts::default()
            },
            "newstyle",
        ),
    ] {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(Fake::accept(b, o));
        let e = within(NbdClient::handshake(a, "vol", &ClientConfig::default()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        server.abort();
    }

    // A server that says nothing: the handshake times out instead of hanging.
    let (a, _b) = tokio::io::duplex(1024);
    let quick = ClientConfig {
        handshake_timeout: Duration::from_millis(50),
        ..ClientConfig::default()
    };
    assert!(matches!(
        NbdClient::handshake(a, "vol", &quick).await,
        Err(ClientError::HandshakeTimeout)
    ));
    // Garbage instead of a greeting.
    let (a, mut b) = tokio::io::duplex(1024);
    b.write_all(&[0x55; 64]).await.unwrap();
    assert!(matches!(
        within(NbdClient::handshake(a, "vol", &ClientConfig::default())).await,
        Err(ClientError::HandshakeProto(_))
    ));
}

#[tokio::test]
async fn replies_out_of_order_and_split_reads_are_assembled() {
    for extended in [false, true] {
        let o = FakeOpts {
            extended,
            ..FakeOpts::default()
        };
        let (c, mut f) = fake(o, ClientConfig::default()).await;
        let c = Arc::new(c);
        let read = {
            let c = c.clone();
            tokio::spawn(async move { c.read(4096, 12288).await })
        };
        let (r1, _) = within(f.request()).await;
        let write = {
            let c = c.clone();
            tokio::spawn(async move { c.write(0, pattern(1, 512), true).await })
        };
        let (r2, payload) = within(f.request()).await;
        assert_eq!(r2.flags & proto::CMD_FLAG_FUA, proto::CMD_FLAG_FUA);
        assert_eq!(payload, pattern(1, 512).to_vec());
        let status = {
            let c = c.clone();
            tokio::spawn(async move { c.block_status(0, 8192, false).await })
        };
        let (r3, _) = within(f.request()).await;
        assert_eq!(r3.cmd(), Some(Cmd::BlockStatus));

        // Answer the last first; the read in three chunks, out of offset order.
        let mut bs = Vec::new();
        proto::encode_block_status_payload(
            &mut bs,
            extended,
            FAKE_CONTEXT,
            &[(4096, proto::STATE_HOLE | proto::STATE_ZERO), (4096, 0)],
        )
        .unwrap();
        let bs_type = if extended {
            proto::REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            proto::REPLY_TYPE_BLOCK_STATUS
        };
        f.chunk(proto::REPLY_FLAG_DONE, bs_type, &r3, &bs).await;
        f.raw(&{
            let mut out = Vec::new();
            proto::encode_simple_reply(&mut out, 0, r2.cookie);
            out
        })
        .await;
        f.chunk(
            0,
            proto::REPLY_TYPE_OFFSET_DATA,
            &r1,
            &data_payload(12288, &[0xcc; 4096]),
        )
        .await;
        f.chunk(
            0,
            proto::REPLY_TYPE_OFFSET_DATA,
            &r1,
            &data_payload(4096, &[0xaa; 4096]),
        )
        .await;
        f.chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_HOLE,
            &r1,
            &hole_payload(8192, 4096),
        )
        .await;

        let ext = within(status).await.unwrap().unwrap();
        assert_eq!(ext, vec![Extent::hole(4096), Extent::data(4096)]);
        within(write).await.unwrap().unwrap();
        let b = within(read).await.unwrap().unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0xaa));
        assert!(b[4096..8192].iter().all(|&x| x == 0));
        assert!(b[8192..].iter().all(|&x| x == 0xcc));
        assert!(!c.is_closed());
    }
}

#[tokio::test]
async fn structured_errors_end_a_reply_with_an_error() {
    let (c, mut f) = fake(FakeOpts::default(), ClientConfig::default()).await;
    let c = Arc::new(c);
    let read = {
        let c = c.clone();
        tokio::spawn(async move { c.read(8192, 8192).await })
    };
    let (r, _) = within(f.request()).await;
    let mut p = Vec::new();
    proto::encode_error_offset_payload(&mut p, proto::EIO, "bad sector", 12288);
    f.chunk(
        0,
        proto::REPLY_TYPE_OFFSET_DATA,
        &r,
        &data_payload(8192, &[1; 4096]),
    )
    .await;
    f.chunk(0, proto::REPLY_TYPE_ERROR_OFFSET, &r, &p).await;
    f.done(&r).await;
    match within(read).await.unwrap() {
        Err(ClientError::Server {
            errno,
            message,
            offset,
            ..
        }) => {
            assert_eq!((errno, offset), (proto::EIO, Some(12288)));
            assert_eq!(message, "bad sector");
        }
        other => panic!("{other:?}"),
    }

    // A plain error chunk, and an error type the client does not know.
    let flush = {
        let c = c.clone();
        tokio::spawn(async move { c.flush().await })
    };
    let (r, _) = within(f.request()).await;
    let mut p = Vec::new();
    proto::encode_error_payload(&mut p, proto::ENOSPC, "");
    f.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, &r, &p)
        .await;
    assert_eq!(
        within(flush).await.unwrap().unwrap_err().errno(),
        Some(proto::ENOSPC)
    );
    let trim = {
        let c = c.clone();
        tokio::spawn(async move { c.trim(0, 4096, false).await })
    };
    let (r, _) = within(f.request()).await;
    f.chunk(
        proto::REPLY_FLAG_DONE,
        (1 << 15) + 40,
        &r,
        &proto::EPERM.to_be_bytes(),
    )
    .await;
    assert_eq!(
        within(trim).await.unwrap().unwrap_err().errno(),
        Some(proto::EPERM)
    );
    assert!(!c.is_closed());
}

/// Sends one read, lets `misbehave` answer it, and checks that the read and the connection
/// fail with a protocol violation instead of hanging.
async fn violation_kills_the_connection(misbehave: impl AsyncFnOnce(&mut Fake, Request)) {
    let (c, mut f) = fake(FakeOpts::default(), ClientConfig::default()).await;
    let c = Arc::new(c);
    let read = {
        let c = c.clone();
        tokio::spawn(async move { c.read(4096, 4096).await })
    };
    let (r, _) = within(f.request()).await;
    let other = {
        let c = c.clone();
        tokio::spawn(async move { c.flush().await })
    };
    let _ = within(f.request()).await;
    misbehave(&mut f, r).await;
    let e = within(read).await.unwrap().unwrap_err();
    assert!(
        matches!(e, ClientError::Lost(Lost::Protocol(_))),
        "read: {e}"
    );
    let e = within(other).await.unwrap().unwrap_err();
    assert!(e.is_connection_lost(), "flush: {e}");
    assert!(c.is_closed());
    assert!(c.write(0, pattern(0, 512), false).await.is_err());
}

#[tokio::test]
async fn malformed_replies_are_protocol_violations() {
    violation_kills_the_connection(async |f: &mut Fake, _r: Request| {
        f.raw(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]).await;
    })
    .await;
    violation_kills_the_connection(async |f: &mut Fake, r: Request| {
        let bogus = Request {
            cookie: r.cookie + 1000,
            ..r
        };
        f.done(&bogus).await;
    })
    .await;
    violation_kills_the_connection(async |f: &mut Fake, r: Request| {
        // Data outside the requested range.
        let p = data_payload(0, &[1; 4096]);
        f.chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_DATA,
            &r,
            &p,
        )
        .await;
    })
    .await;
    violation_kills_the_connection(async |f: &mut Fake, r: Request| {
        // Overlapping chunks.
        let p = data_payload(4096, &[1; 2048]);
        f.chunk(0, proto::REPLY_TYPE_OFFSET_DATA, &r, &p).await;
        let p = data_payload(5120, &[1; 1024]);
        f.chunk(0, proto::REPLY_TYPE_OFFSET_DATA, &r, &p).await;
    })
    .await;
    violation_kills_the_connection(async |f: &mut Fake, r: Request| {
        // A reply that ends without covering the read.
        let p = data_payload(4096, &[1; 1024]);
        f.chunk(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_OFFSET_DATA,
            &r,
            &p,
        )
        .await;
    })
    .await;
    violation_kills_the_connection(async |f: &mut Fake, r: Request| {
        // A successful simple reply to a read.
        let mut out = Vec::new();
        proto::encode_simple_reply(&mut out, 0, r.cookie);
        f.raw(&out).await;
    })
    .await;
    violation_kills_the_connection(async |f: &mut Fake, r: Request| {
        // A chunk announcing far more than the request could need.
        let mut out = Vec::new();
        proto::encode_chunk_header(
            &mut out,
            ReplyStyle::Structured,
            0,
            proto::REPLY_TYPE_OFFSET_DATA,
            r.cookie,
            0,
            u64::from(u32::MAX),
        )
        .unwrap();
        f.raw(&out).await;
    })
    .await;
    violation_kills_the_connection(async |f: &mut Fake, r: Request| {
        // Block status for a read, and an unknown non-error chunk type.
        let mut bs = Vec::new();
        proto::encode_block_status_payload(&mut bs, false, FAKE_CONTEXT, &[(4096, 0)]).unwrap();
        f.chunk(0, 99, &r, &bs).await;
    })
    .await;
    violation_kills_the_connection(async |f: &mut Fake, r: Request| {
        // An error value of zero.
        let mut p = Vec::new();
        proto::encode_error_payload(&mut p, 0, "fine?");
        f.chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_ERROR, &r, &p)
            .await;
    })
    .await;
}

#[tokio::test]
async fn a_server_that_disconnects_mid_reply_fails_the_request() {
    // Cut inside a data chunk.
    let (c, mut f) = fake(FakeOpts::default(), ClientConfig::default()).await;
    let c = Arc::new(c);
    let read = {
        let c = c.clone();
        tokio::spawn(async move { c.read(0, 8192).await })
    };
    let (r, _) = within(f.request()).await;
    let mut out = Vec::new();
    proto::encode_chunk_header(
        &mut out,
        ReplyStyle::Structured,
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_OFFSET_DATA,
        r.cookie,
        0,
        8 + 8192,
    )
    .unwrap();
    out.extend_from_slice(&data_payload(0, &[7; 100]));
    f.raw(&out).await;
    drop(f);
    let e = within(read).await.unwrap().unwrap_err();
    assert!(e.is_connection_lost(), "{e}");

    // Cut after receiving the request, before any reply.
    let (c, mut f) = fake(FakeOpts::default(), ClientConfig::default()).await;
    let c = Arc::new(c);
    let w = {
        let c = c.clone();
        tokio::spawn(async move { c.write(0, pattern(1, 4096), false).await })
    };
    let _ = within(f.request()).await;
    drop(f);
    let e = within(w).await.unwrap().unwrap_err();
    assert!(matches!(e, ClientError::Lost(Lost::Eof)), "{e}");
    assert!(matches!(c.lost_reason(), Some(Lost::Eof)));
}

#[tokio::test]
async fn in_flight_requests_are_bounded() {
    let ccfg = ClientConfig {
        max_inflight_requests: 2,
        ..ClientConfig::default()
    };
    let (c, mut f) = fake(FakeOpts::default(), ccfg).await;
    let c = Arc::new(c);
    let tasks: Vec<_> = (0..3u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.trim(i * 4096, 4096, false).await })
        })
        .collect();
    let (a, _) = within(f.request()).await;
    let (b, _) = within(f.request()).await;
    // The third waits for a slot: nothing more arrives until one is answered.
    let third = tokio::time::timeout(Duration::from_millis(100), f.request()).await;
    assert!(third.is_err(), "a third request was sent");
    assert_eq!(c.in_flight(), 2);
    f.done(&b).await;
    let (cc, _) = within(f.request()).await;
    f.done(&a).await;
    f.done(&cc).await;
    for t in tasks {
        within(t).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_caller_that_gives_up_does_not_disturb_the_connection() {
    let (c, mut f) = fake(FakeOpts::default(), ClientConfig::default()).await;
    let c = Arc::new(c);
    // Gives up after the request was sent: its reply must still be accepted quietly.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), c.read(0, 4096)).await;
    assert!(gave_up.is_err());
    let (r, _) = within(f.request()).await;
    let next = {
        let c = c.clone();
        tokio::spawn(async move { c.flush().await })
    };
    let (r2, _) = within(f.request()).await;
    f.chunk(
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_OFFSET_DATA,
        &r,
        &data_payload(0, &[0; 4096]),
    )
    .await;
    f.done(&r2).await;
    within(next).await.unwrap().unwrap();
    assert!(!c.is_closed());
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test]
async fn fua_is_emulated_and_missing_commands_are_refused() {
    let o = FakeOpts {
        flags: proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH,
        ..FakeOpts::default()
    };
    let (c, mut f) = fake(o, ClientConfig::default()).await;
    let c = Arc::new(c);
    let w = {
        let c = c.clone();
        tokio::spawn(async move { c.write(0, pattern(2, 512), true).await })
    };
    let (r, _) = within(f.request()).await;
    assert_eq!(r.flags & proto::CMD_FLAG_FUA, 0);
    f.done(&r).await;
    let (r, _) = within(f.request()).await;
    assert_eq!(r.cmd(), Some(Cmd::Flush));
    f.done(&r).await;
    within(w).await.unwrap().unwrap();
    assert!(matches!(
        c.write_zeroes(0, 512, ZeroFlags::default()).await,
        Err(ClientError::Unsupported { .. })
    ));
    // CACHE is a hint: without server support it succeeds without a request.
    within(c.cache(0, 512)).await.unwrap();
}

#[tokio::test]
async fn compact_requests_split_ranges_beyond_four_gib() {
    let o = FakeOpts {
        size: 16 << 30,
        ..FakeOpts::default()
    };
    let (c, mut f) = fake(o, ClientConfig::default()).await;
    let c = Arc::new(c);
    let t = {
        let c = c.clone();
        tokio::spawn(async move { c.trim(0, 10 << 30, false).await })
    };
    let mut covered = 0;
    while covered < 10 << 30 {
        let (r, _) = within(f.request()).await;
        assert_eq!(r.offset, covered);
        assert!(r.length <= u64::from(u32::MAX));
        covered += r.length;
        f.done(&r).await;
    }
    within(t).await.unwrap().unwrap();
    assert_eq!(covered, 10 << 30);
}
