//! Raw-socket tests of the NBD handshake: flags, option haggling, exports, meta contexts,
//! limits and malformed input.

mod support;

use std::time::Duration;

use head_node::nbd::proto::{self, Cmd};
use head_node::nbd::{BASE_ALLOCATION_ID, MemVolume, ServerConfig};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn vol(name: &str) -> MemVolume {
    MemVolume::new(name, 64 * MIB).with_description(format!("the {name} volume"))
}

#[tokio::test]
async fn greeting_advertises_fixed_newstyle_and_no_zeroes() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let (_s, flags) = greet(srv.addr).await;
    assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
}

#[tokio::test]
async fn unknown_client_flags_close_the_connection() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let (mut s, _) = greet(srv.addr).await;
    s.write_u32(proto::FLAG_C_FIXED_NEWSTYLE | 1 << 7)
        .await
        .unwrap();
    assert!(closed_by_server(&mut s).await);
    // The server carries on.
    let mut c = open(srv.addr, "a", Mode::Simple).await;
    assert_eq!(c.flush().await, 0);
}

#[tokio::test]
async fn unknown_option_gets_unsup_and_negotiation_continues() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut s = handshake(srv.addr).await;
    let r = opt(&mut s, 99, b"some data the server must skip").await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, proto::REP_ERR_UNSUP);
    assert_eq!(
        opt_result(&mut s, proto::OPT_STARTTLS, b"").await,
        proto::REP_ERR_UNSUP,
        "no TLS yet"
    );
    assert_eq!(
        opt_result(&mut s, proto::OPT_PEEK_EXPORT, b"").await,
        proto::REP_ERR_UNSUP
    );
    let r = opt(&mut s, proto::OPT_GO, &info_request("a", &[])).await;
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
    let info = proto::InfoReply::decode(&r[0].1).unwrap();
    assert_eq!(
        info,
        proto::InfoReply::Export {
            size: 64 * MIB,
            flags: info_flags(&r)
        }
    );
    // In transmission now: a simple-reply flush works.
    let req = proto::Request {
        flags: 0,
        kind: Cmd::Flush.wire(),
        cookie: 7,
        offset: 0,
        length: 0,
    }
    .encode(proto::HeaderStyle::Compact)
    .unwrap();
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; proto::SIMPLE_REPLY_LEN];
    s.read_exact(&mut rep).await.unwrap();
    assert_eq!(
        proto::ReplyHeader::decode(&rep).unwrap(),
        proto::ReplyHeader::Simple {
            error: 0,
            cookie: 7
        }
    );
}

#[tokio::test]
async fn a_client_session_needs_exactly_sixteen_bytes_and_then_selects_the_export_as_usual() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut s = handshake(srv.addr).await;
    for bad in [&[][..], &[0u8; 15][..], &[0u8; 17][..]] {
        assert_eq!(
            opt_result(&mut s, proto::OPT_SESSION, bad).await,
            proto::REP_ERR_INVALID,
            "{} bytes",
            bad.len()
        );
    }
    let session = head_node::volume::session::ClientSession {
        client: 0xfeed,
        generation: 3,
    };
    assert_eq!(
        opt_result(&mut s, proto::OPT_SESSION, &session.encode()).await,
        proto::REP_ACK
    );
    // An export served by this process alone records nothing and serves as usual.
    let r = opt(&mut s, proto::OPT_GO, &info_request("a", &[])).await;
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
}

fn info_flags(r: &[(u32, Vec<u8>)]) -> u16 {
    r.iter()
        .find_map(|(t, d)| match proto::InfoReply::decode(d) {
            Ok(proto::InfoReply::Export { flags, .. }) if *t == proto::REP_INFO => Some(flags),
            _ => None,
        })
        .expect("NBD_INFO_EXPORT")
}

/// Just after a head node starts, its exports are still settling: a client asking for one that
/// is not there yet waits for it a little instead of being refused at once; one that never
/// comes is refused after the wait.
#[tokio::test]
async fn an_export_that_appears_while_the_exports_settle_is_waited_for() {
    let srv = TestServer::start(vec![vol("a")]).await;
    srv.exports.set_settling(true);
    let later = srv.exports.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        later.add(std::sync::Arc::new(vol("b")));
    });
    let mut s = handshake(srv.addr).await;
    assert_eq!(
        opt_result(&mut s, proto::OPT_INFO, &info_request("b", &[])).await,
        proto::REP_ACK
    );
    let started = std::time::Instant::now();
    assert_eq!(
        opt_result(&mut s, proto::OPT_INFO, &info_request("never", &[])).await,
        proto::REP_ERR_UNKNOWN
    );
    assert!(started.elapsed() >= std::time::Duration::from_secs(4));
    // Settled: an unknown export is refused at once.
    srv.exports.set_settling(false);
    assert_eq!(
        opt_result(&mut s, proto::OPT_INFO, &info_request("never", &[])).await,
        proto::REP_ERR_UNKNOWN
    );
}

#[tokio::test]
async fn unknown_export_gets_err_unknown() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut s = handshake(srv.addr).await;
    for o in [proto::OPT_INFO, proto::OPT_GO] {
        let r = opt(&mut s, o, &info_request("nope", &[])).await;
        assert_eq!(r.len(), 1, "no NBD_REP_INFO before the error");
        assert_eq!(r[0].0, proto::REP_ERR_UNKNOWN);
    }
    // Malformed GO data is invalid, not fatal.
    assert_eq!(
        opt_result(&mut s, proto::OPT_GO, &[0, 0, 0, 9, b'a']).await,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        opt_result(&mut s, proto::OPT_GO, &info_request("a", &[])).await,
        proto::REP_ACK
    );
    // NBD_OPT_EXPORT_NAME cannot report an error: the server hangs up.
    let mut s = handshake(srv.addr).await;
    send_opt(&mut s, proto::OPT_EXPORT_NAME, b"nope").await;
    assert!(closed_by_server(&mut s).await);
}

#[tokio::test]
async fn oversized_option_gets_an_error_and_the_connection_closes() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut s = handshake(srv.addr).await;
    // Claim 1 GiB of option data but never send it: the server must neither wait for nor
    // allocate it.
    let h = proto::OptionHeader {
        option: proto::OPT_GO,
        length: 1 << 30,
    };
    s.write_all(&h.encode()).await.unwrap();
    let (rh, _) = recv_opt(&mut s).await;
    assert_eq!(rh.option, proto::OPT_GO);
    assert_eq!(rh.reply_type, proto::REP_ERR_TOO_BIG);
    assert!(closed_by_server(&mut s).await);
    // The same with 2 MiB of its data sent at once: the server reads (and drops) it before
    // closing, so the close does not reset the connection under the reply.
    let mut s = handshake(srv.addr).await;
    let h = proto::OptionHeader {
        option: proto::OPT_GO,
        length: 2 << 20,
    };
    let mut msg = h.encode().to_vec();
    msg.extend(std::iter::repeat_n(0u8, 2 << 20));
    s.write_all(&msg).await.unwrap();
    let (rh, _) = recv_opt(&mut s).await;
    assert_eq!(rh.reply_type, proto::REP_ERR_TOO_BIG);
    assert!(closed_by_server(&mut s).await);
    // An oversized NBD_OPT_EXPORT_NAME just closes.
    let mut s = handshake(srv.addr).await;
    s.write_all(
        &proto::OptionHeader {
            option: proto::OPT_EXPORT_NAME,
            length: u32::MAX,
        }
        .encode(),
    )
    .await
    .unwrap();
    assert!(closed_by_server(&mut s).await);
    // The server still serves new clients.
    let mut c = open(srv.addr, "a", Mode::Extended).await;
    assert_eq!(c.write(0, &[7; 512], 0).await, 0);
    // (A connection is counted once the server has finished with it: after its drain.)
    eventually("three connections closed for a limit", || {
        srv.metric("stockade_nbd_connections_closed_total{reason=\"limit\"}") == 3.0
    })
    .await;
}

#[tokio::test]
async fn bad_option_magic_closes_the_connection() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut s = handshake(srv.addr).await;
    s.write_all(&[0xff; 16]).await.unwrap();
    assert!(closed_by_server(&mut s).await);
    let mut c = open(srv.addr, "a", Mode::Simple).await;
    assert_eq!(c.flush().await, 0);
}

#[tokio::test]
async fn list_exports() {
    let srv = TestServer::start(vec![vol("b"), vol("a")]).await;
    let mut s = handshake(srv.addr).await;
    let r = opt(&mut s, proto::OPT_LIST, b"").await;
    let names: Vec<_> = r
        .iter()
        .filter(|(t, _)| *t == proto::REP_SERVER)
        .map(|(_, d)| {
            let n = u32::from_be_bytes(d[..4].try_into().unwrap()) as usize;
            String::from_utf8(d[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
    assert_eq!(
        opt_result(&mut s, proto::OPT_LIST, b"x").await,
        proto::REP_ERR_INVALID
    );
    // ABORT is acknowledged and the server hangs up.
    assert_eq!(
        opt_result(&mut s, proto::OPT_ABORT, b"").await,
        proto::REP_ACK
    );
    assert!(closed_by_server(&mut s).await);
}

#[tokio::test]
async fn info_reports_name_description_block_sizes_and_flags() {
    let srv = TestServer::start(vec![
        vol("a"),
        MemVolume::new("ro", 8 * MIB)
            .with_read_only(true)
            .with_multi_conn(false),
    ])
    .await;
    let mut s = handshake(srv.addr).await;
    let r = opt(
        &mut s,
        proto::OPT_INFO,
        &info_request(
            "a",
            &[
                proto::INFO_NAME,
                proto::INFO_DESCRIPTION,
                proto::INFO_BLOCK_SIZE,
                77,
            ],
        ),
    )
    .await;
    let items: Vec<_> = r
        .iter()
        .filter(|(t, _)| *t == proto::REP_INFO)
        .map(|(_, d)| proto::InfoReply::decode(d).unwrap())
        .collect();
    let flags = info_flags(&r);
    assert!(items.contains(&proto::InfoReply::Export {
        size: 64 * MIB,
        flags
    }));
    assert!(items.contains(&proto::InfoReply::Name("a".into())));
    assert!(items.contains(&proto::InfoReply::Description("the a volume".into())));
    assert!(items.contains(&proto::InfoReply::BlockSize {
        min: 512,
        preferred: 4096,
        max: 32 << 20
    }));
    for f in [
        proto::TFLAG_HAS_FLAGS,
        proto::TFLAG_SEND_FLUSH,
        proto::TFLAG_SEND_FUA,
        proto::TFLAG_SEND_TRIM,
        proto::TFLAG_SEND_WRITE_ZEROES,
        proto::TFLAG_SEND_FAST_ZERO,
        proto::TFLAG_SEND_CACHE,
        proto::TFLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} in {flags:#x}");
    }
    assert_eq!(flags & (proto::TFLAG_READ_ONLY | proto::TFLAG_SEND_DF), 0);
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
    // INFO does not end the negotiation; structured replies now add DF.
    assert_eq!(
        opt_result(&mut s, proto::OPT_STRUCTURED_REPLY, b"").await,
        proto::REP_ACK
    );
    let r = opt(&mut s, proto::OPT_INFO, &info_request("ro", &[])).await;
    let flags = info_flags(&r);
    assert_ne!(flags & proto::TFLAG_READ_ONLY, 0);
    assert_ne!(flags & proto::TFLAG_SEND_DF, 0);
    assert_eq!(
        flags & (proto::TFLAG_CAN_MULTI_CONN | proto::TFLAG_SEND_TRIM),
        0
    );
}

#[tokio::test]
async fn export_name_with_and_without_zeroes() {
    let srv = TestServer::start(vec![vol("a")]).await;
    for no_zeroes in [false, true] {
        let (mut s, _) = greet(srv.addr).await;
        let cf = proto::FLAG_C_FIXED_NEWSTYLE
            | if no_zeroes {
                proto::FLAG_C_NO_ZEROES
            } else {
                0
            };
        s.write_u32(cf).await.unwrap();
        send_opt(&mut s, proto::OPT_EXPORT_NAME, b"a").await;
        let mut r = vec![0u8; if no_zeroes { 10 } else { 134 }];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 64 * MIB);
        assert!(r[10..].iter().all(|&b| b == 0));
        // Transmission works right after, with no stray bytes.
        let req = proto::Request {
            flags: 0,
            kind: Cmd::Read.wire(),
            cookie: 3,
            offset: 0,
            length: 512,
        }
        .encode(proto::HeaderStyle::Compact)
        .unwrap();
        s.write_all(&req).await.unwrap();
        let mut rep = vec![0u8; proto::SIMPLE_REPLY_LEN + 512];
        s.read_exact(&mut rep).await.unwrap();
        assert_eq!(
            proto::ReplyHeader::decode(&rep[..16]).unwrap(),
            proto::ReplyHeader::Simple {
                error: 0,
                cookie: 3
            }
        );
    }
}

#[tokio::test]
async fn default_export_is_the_only_one() {
    let srv = TestServer::start(vec![vol("only")]).await;
    let mut s = handshake(srv.addr).await;
    let r = opt(
        &mut s,
        proto::OPT_GO,
        &info_request("", &[proto::INFO_NAME]),
    )
    .await;
    assert!(r.iter().any(|(t, d)| *t == proto::REP_INFO
        && proto::InfoReply::decode(d) == Ok(proto::InfoReply::Name("only".into()))));
    assert_eq!(r.last().unwrap().0, proto::REP_ACK);
}

#[tokio::test]
async fn meta_context_negotiation() {
    let srv = TestServer::start(vec![vol("a"), vol("b")]).await;
    let mut s = handshake(srv.addr).await;
    let base = proto::CONTEXT_BASE_ALLOCATION;
    // Needs structured replies first.
    assert_eq!(
        opt_result(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            &meta_request("a", &[base])
        )
        .await,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        opt_result(
            &mut s,
            proto::OPT_LIST_META_CONTEXT,
            &meta_request("a", &[])
        )
        .await,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        opt_result(&mut s, proto::OPT_STRUCTURED_REPLY, b"").await,
        proto::REP_ACK
    );
    let contexts = |r: &[(u32, Vec<u8>)]| -> Vec<(u32, String)> {
        r.iter()
            .filter(|(t, _)| *t == proto::REP_META_CONTEXT)
            .map(|(_, d)| {
                (
                    u32::from_be_bytes(d[..4].try_into().unwrap()),
                    String::from_utf8(d[4..].to_vec()).unwrap(),
                )
            })
            .collect()
    };
    // LIST: no query lists everything; "base:" is a wildcard; unknown namespaces are ignored.
    for queries in [
        &[][..],
        &["base:"][..],
        &[base][..],
        &["x-foo:bar", "base:"][..],
    ] {
        let r = opt(
            &mut s,
            proto::OPT_LIST_META_CONTEXT,
            &meta_request("a", queries),
        )
        .await;
        assert_eq!(contexts(&r), [(0, base.to_string())], "{queries:?}");
        assert_eq!(r.last().unwrap().0, proto::REP_ACK);
    }
    let r = opt(
        &mut s,
        proto::OPT_LIST_META_CONTEXT,
        &meta_request("a", &["x-foo:", "base:nothing"]),
    )
    .await;
    assert_eq!(r.len(), 1, "nothing matches: a bare ACK");
    assert_eq!(
        opt_result(
            &mut s,
            proto::OPT_LIST_META_CONTEXT,
            &meta_request("a", &["no-colon"])
        )
        .await,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        opt_result(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            &meta_request("nope", &[base])
        )
        .await,
        proto::REP_ERR_UNKNOWN
    );
    assert_eq!(
        opt_result(&mut s, proto::OPT_SET_META_CONTEXT, &[0, 0, 0, 5]).await,
        proto::REP_ERR_INVALID
    );
    // SET: "base:" and empty queries select nothing; base:allocation selects id 1.
    for queries in [&[][..], &["base:"][..], &["x-foo:bar"][..]] {
        let r = opt(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            &meta_request("a", queries),
        )
        .await;
        assert!(contexts(&r).is_empty(), "{queries:?}");
    }
    let r = opt(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &meta_request("a", &[base, "base:"]),
    )
    .await;
    assert_eq!(contexts(&r), [(BASE_ALLOCATION_ID, base.to_string())]);
}

/// Block status works only for the export the contexts were selected for.
#[tokio::test]
async fn meta_context_applies_to_its_export_only() {
    let srv = TestServer::start(vec![vol("a"), vol("b")]).await;
    for (go, ok) in [("a", true), ("b", false)] {
        let mut s = handshake(srv.addr).await;
        assert_eq!(
            opt_result(&mut s, proto::OPT_STRUCTURED_REPLY, b"").await,
            proto::REP_ACK
        );
        opt(
            &mut s,
            proto::OPT_SET_META_CONTEXT,
            &meta_request("a", &[proto::CONTEXT_BASE_ALLOCATION]),
        )
        .await;
        assert_eq!(
            opt_result(&mut s, proto::OPT_GO, &info_request(go, &[])).await,
            proto::REP_ACK
        );
        let req = proto::Request {
            flags: 0,
            kind: Cmd::BlockStatus.wire(),
            cookie: 1,
            offset: 0,
            length: 4096,
        }
        .encode(proto::HeaderStyle::Compact)
        .unwrap();
        s.write_all(&req).await.unwrap();
        let mut h = [0u8; proto::STRUCTURED_REPLY_LEN];
        s.read_exact(&mut h).await.unwrap();
        let proto::ReplyHeader::Chunk { chunk_type, .. } = proto::ReplyHeader::decode(&h).unwrap()
        else {
            panic!("structured reply expected")
        };
        if ok {
            assert_eq!(chunk_type, proto::REPLY_TYPE_BLOCK_STATUS);
        } else {
            assert_eq!(chunk_type, proto::REPLY_TYPE_ERROR);
        }
    }
}

#[tokio::test]
async fn extended_headers_negotiation_rules() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut s = handshake(srv.addr).await;
    assert_eq!(
        opt_result(&mut s, proto::OPT_EXTENDED_HEADERS, b"x").await,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        opt_result(&mut s, proto::OPT_STRUCTURED_REPLY, b"x").await,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        opt_result(&mut s, proto::OPT_EXTENDED_HEADERS, b"").await,
        proto::REP_ACK
    );
    // No downgrade to structured replies once extended headers are on.
    assert_eq!(
        opt_result(&mut s, proto::OPT_STRUCTURED_REPLY, b"").await,
        proto::REP_ERR_EXT_HEADER_REQD
    );
    // Meta contexts are allowed with extended headers alone.
    let r = opt(
        &mut s,
        proto::OPT_SET_META_CONTEXT,
        &meta_request("a", &[proto::CONTEXT_BASE_ALLOCATION]),
    )
    .await;
    assert_eq!(r.len(), 2);
    // NBD_OPT_EXPORT_NAME is forbidden after extended headers: hard disconnect.
    send_opt(&mut s, proto::OPT_EXPORT_NAME, b"a").await;
    assert!(closed_by_server(&mut s).await);
}

#[tokio::test]
async fn handshake_timeout_and_option_limit() {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        max_options: 3,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, vec![vol("a")]).await;
    // A client that never speaks is dropped.
    let (mut idle, _) = greet(srv.addr).await;
    assert!(closed_by_server(&mut idle).await);
    // A client that haggles forever is dropped.
    let mut s = handshake(srv.addr).await;
    for _ in 0..3 {
        assert_eq!(opt_result(&mut s, 99, b"").await, proto::REP_ERR_UNSUP);
    }
    assert!(closed_by_server(&mut s).await);
    assert_eq!(
        srv.metric("stockade_nbd_connections_closed_total{reason=\"handshake_timeout\"}"),
        1.0
    );
}

#[tokio::test]
async fn size_is_taken_at_negotiation_time() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let c = open(srv.addr, "a", Mode::Simple).await;
    assert_eq!(c.export.size, 64 * MIB);
    srv.vol("a").resize(128 * MIB);
    let c2 = open(srv.addr, "a", Mode::Simple).await;
    assert_eq!(c2.export.size, 128 * MIB);
}
