//! Raw-socket tests of the NBD transmission phase: every command in every reply style, the
//! error rules of the specification, malformed input, concurrency, back-pressure, DISC,
//! detaching exports, shutdown and metrics.

mod support;

use std::collections::{HashMap, HashSet};

use head_node::nbd::proto::{self, Cmd, STATE_HOLE, STATE_ZERO};
use head_node::nbd::{BASE_ALLOCATION_ID, MemVolume, ServerConfig};
use support::*;
use tokio::io::AsyncWriteExt;

const SIZE: u64 = 64 * MIB;
const P: u64 = 64 << 10; // MemVolume page
const HZ: u32 = STATE_HOLE | STATE_ZERO;

fn vol(name: &str) -> MemVolume {
    MemVolume::new(name, SIZE)
}

#[tokio::test]
async fn read_write_in_every_reply_style() {
    let srv = TestServer::start(vec![vol("a")]).await;
    for (i, mode) in ALL_MODES.into_iter().enumerate() {
        let mut c = open(srv.addr, "a", mode).await;
        assert_eq!(
            (c.export.min, c.export.preferred, c.export.max),
            (512, 4096, 32 << 20)
        );
        let off = i as u64 * MIB + 512;
        let data = pattern(3 * 4096 + 512, i as u8);
        assert_eq!(c.write(off, &data, 0).await, 0, "{mode:?}");
        assert_eq!(
            c.read(off, data.len() as u64).await.unwrap(),
            data,
            "{mode:?}"
        );
        assert_eq!(c.write(off, &data[..512], proto::CMD_FLAG_FUA).await, 0);
        // The reply framing matches the negotiation.
        let r = c.call(Cmd::Write, 0, off, 512, &data[..512]).await;
        match mode {
            Mode::Simple | Mode::Structured => assert!(r.simple, "{mode:?}"),
            Mode::Extended => {
                assert_eq!(r.chunks, [proto::REPLY_TYPE_NONE]);
                assert_eq!(
                    r.header_offset,
                    Some(off),
                    "extended replies echo the offset"
                );
            }
        }
        let r = c.call(Cmd::Read, proto::CMD_FLAG_FUA, off, 4096, &[]).await;
        match mode {
            Mode::Simple => assert!(r.simple),
            Mode::Structured | Mode::Extended => {
                assert_eq!(r.chunks, [proto::REPLY_TYPE_OFFSET_DATA]);
                assert_eq!(r.data_offset, Some(off));
            }
        }
        assert_eq!(c.flush().await, 0);
        if mode != Mode::Simple {
            // Don't-fragment is advertised and honoured (one data chunk).
            assert_ne!(c.export.flags & proto::TFLAG_SEND_DF, 0);
            let r = c.call(Cmd::Read, proto::CMD_FLAG_DF, off, 8192, &[]).await;
            assert_eq!((r.error, r.chunks.len()), (0, 1));
        }
    }
    // Data written on one connection is visible on another.
    let mut c = open(srv.addr, "a", Mode::Simple).await;
    assert_eq!(
        c.read(512, 4096).await.unwrap(),
        pattern(3 * 4096 + 512, 0)[..4096]
    );
}

#[tokio::test]
async fn unaligned_requests_inside_the_limits() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut c = open(srv.addr, "a", Mode::Extended).await;
    // Aligned to the advertised 512-byte minimum but not to the backend's 4 KiB.
    let data = pattern(1536, 9);
    assert_eq!(c.write(4096 + 512, &data, 0).await, 0);
    assert_eq!(c.read(4096, 4096).await.unwrap()[512..2048], data[..]);
    // The full maximum payload in one request, ending at the last byte.
    let big = pattern(32 << 20, 3);
    assert_eq!(c.write(SIZE - (32 << 20), &big, 0).await, 0);
    assert_eq!(c.read(SIZE - (32 << 20), 32 << 20).await.unwrap(), big);
    // A client that asked for NBD_INFO_BLOCK_SIZE promised to honour the minimum.
    assert_eq!(c.write(4097, &data, 0).await, proto::EINVAL);
    assert_eq!(c.read(4097, 512).await, Err(proto::EINVAL));
    // A client that never saw block sizes (NBD_OPT_EXPORT_NAME) may use any alignment.
    let mut raw = open_export_name(srv.addr, "a").await;
    assert_eq!(raw.export.size, SIZE);
    let odd = pattern(3000, 11);
    assert_eq!(raw.write(4097, &odd, 0).await, 0);
    assert_eq!(raw.read(4097, 3000).await.unwrap(), odd);
    assert_eq!(
        raw.read(4096, 1).await.unwrap(),
        [0],
        "the byte before is untouched"
    );
    assert_eq!(
        raw.read(4097 + 3000, 1).await.unwrap(),
        [0],
        "and the byte after"
    );
}

#[tokio::test]
async fn trim_zeroes_cache_and_block_status() {
    let srv = TestServer::start(vec![vol("a")]).await;
    for (i, mode) in [Mode::Structured, Mode::Extended].into_iter().enumerate() {
        let base = i as u64 * 8 * MIB;
        let mut c = open(srv.addr, "a", mode).await;
        let status_type = if mode == Mode::Extended {
            proto::REPLY_TYPE_BLOCK_STATUS_EXT
        } else {
            proto::REPLY_TYPE_BLOCK_STATUS
        };
        let st = c.status(base, MIB, 0).await;
        assert_eq!(st.chunks, [status_type]);
        assert_eq!(st.context, Some(BASE_ALLOCATION_ID));
        assert_eq!(st.extents, [(MIB, HZ)], "never written: hole and zero");

        assert_eq!(c.write(base, &pattern((5 * P) as usize, 1), 0).await, 0);
        assert_eq!(
            c.status(base, MIB, 0).await.extents,
            [(5 * P, 0), (MIB - 5 * P, HZ)]
        );
        // Trim a page: a hole again, reading zero.
        assert_eq!(c.trim(base + P, P).await, 0);
        // Zero without NO_HOLE: a hole; with NO_HOLE: allocated zeroes (zero, not hole).
        assert_eq!(c.zero(base + 2 * P, P, 0).await, 0);
        assert_eq!(c.zero(base + 3 * P, P, proto::CMD_FLAG_NO_HOLE).await, 0);
        assert_eq!(
            c.status(base, MIB, 0).await.extents,
            [
                (P, 0),
                (2 * P, HZ),
                (P, STATE_ZERO),
                (P, 0),
                (MIB - 5 * P, HZ)
            ]
        );
        let back = c.read(base, 4 * P).await.unwrap();
        assert_eq!(back[..P as usize], pattern(P as usize, 1)[..]);
        assert!(back[P as usize..].iter().all(|&b| b == 0));
        // REQ_ONE: exactly one descriptor, no longer than the request.
        let one = c.status(base, P / 2, proto::CMD_FLAG_REQ_ONE).await;
        assert_eq!(one.extents, [(P / 2, 0)]);
        let one = c.status(base + P, MIB, proto::CMD_FLAG_REQ_ONE).await;
        assert_eq!(one.extents, [(2 * P, HZ)]);
        // A 512-byte write in a hole is data, never hole or zero.
        assert_eq!(c.write(base + 5 * P + 512, &[0xee; 512], 0).await, 0);
        let st = c.status(base + 5 * P, P, 0).await;
        assert_eq!(st.extents, [(P, 0)]);
        // A status request starting mid-extent is clipped to the request.
        assert_eq!(
            c.status(base + 100 * 512, 1024, 0).await.extents,
            [(1024, 0)]
        );
        assert_eq!(c.call(Cmd::Cache, 0, base, MIB, &[]).await.error, 0);
    }
}

#[tokio::test]
async fn sixty_four_bit_requests_with_extended_headers() {
    let size = 6 * GIB;
    let srv = TestServer::start(vec![MemVolume::new("big", size)]).await;
    let v = srv.vol("big");
    let mut c = open(srv.addr, "big", Mode::Extended).await;
    assert_eq!(c.export.size, size);
    assert_eq!(c.write(5 * GIB, &pattern(4096, 5), 0).await, 0);
    // One block status request over the whole export, answered with 64-bit descriptors.
    let st = c.status(0, size, 0).await;
    assert_eq!(st.chunks, [proto::REPLY_TYPE_BLOCK_STATUS_EXT]);
    assert_eq!(st.extents, [(5 * GIB, HZ), (P, 0), (GIB - P, HZ)]);
    // A 5 GiB fast write-zeroes that keeps the range allocated: no data buffers needed.
    let flags = proto::CMD_FLAG_FAST_ZERO | proto::CMD_FLAG_NO_HOLE;
    assert_eq!(c.zero(0, 5 * GIB, flags).await, 0);
    assert_eq!(v.data_bytes(), P, "only the page written above holds data");
    let st = c.status(0, size, 0).await;
    assert_eq!(st.extents, [(5 * GIB, STATE_ZERO), (P, 0), (GIB - P, HZ)]);
    assert!(
        c.read(5 * GIB - 4096, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0)
    );
    // A 6 GiB trim.
    assert_eq!(c.trim(0, size).await, 0);
    assert_eq!(c.status(0, size, 0).await.extents, [(size, HZ)]);
    assert_eq!(v.allocated_bytes(), 0);
    // 64-bit lengths past the end are still refused.
    assert_eq!(c.zero(GIB, size, 0).await, proto::ENOSPC);
    assert_eq!(c.status(GIB, size, 0).await.error, proto::EINVAL);

    // With compact headers a descriptor must fit 32 bits: the reply stops short instead.
    let mut s = open(srv.addr, "big", Mode::Structured).await;
    let len = u64::from(u32::MAX) - 511;
    let st = s.status(0, len, 0).await;
    assert_eq!(st.chunks, [proto::REPLY_TYPE_BLOCK_STATUS]);
    assert_eq!(st.extents, [(len, HZ)]);
}

#[tokio::test]
async fn errors_follow_the_specification() {
    let srv = TestServer::start(vec![vol("a")]).await;
    for mode in ALL_MODES {
        let mut c = open(srv.addr, "a", mode).await;
        let e = |r: Reply| {
            if mode == Mode::Simple {
                assert!(r.simple, "simple error reply");
            } else {
                assert_eq!(r.chunks, [proto::REPLY_TYPE_ERROR], "error chunk");
                assert!(!r.message.is_empty(), "error chunks carry a message");
            }
            r.error
        };
        // Out of range: EINVAL for reads, trims, cache; ENOSPC for writes and write-zeroes.
        assert_eq!(
            e(c.call(Cmd::Read, 0, SIZE - 512, 1024, &[]).await),
            proto::EINVAL
        );
        assert_eq!(e(c.call(Cmd::Trim, 0, SIZE, 512, &[]).await), proto::EINVAL);
        assert_eq!(
            e(c.call(Cmd::Cache, 0, SIZE, 512, &[]).await),
            proto::EINVAL
        );
        assert_eq!(
            e(c.call(Cmd::WriteZeroes, 0, SIZE - 512, 1024, &[]).await),
            proto::ENOSPC
        );
        // A write past the end: ENOSPC, and its payload is consumed (the stream stays in sync).
        assert_eq!(
            e(c.call(Cmd::Write, 0, SIZE - 512, 1024, &[7; 1024]).await),
            proto::ENOSPC
        );
        assert_eq!(c.write(0, &[1; 512], 0).await, 0);
        // Offset + length wrapping around 64 bits.
        assert_eq!(
            e(c.call(Cmd::Read, 0, u64::MAX - 511, 1024, &[]).await),
            proto::EINVAL
        );
        // Unknown command, unknown and unadvertised flags.
        let cookie = c.cookie();
        c.send(42, 0, cookie, 0, 512, &[]).await;
        assert_eq!(e(c.recv().await), proto::EINVAL);
        assert_eq!(
            e(c.call(Cmd::Flush, 1 << 15, 0, 0, &[]).await),
            proto::EINVAL
        );
        assert_eq!(
            e(c.call(Cmd::Read, proto::CMD_FLAG_REQ_ONE, 0, 512, &[])
                .await),
            proto::EINVAL
        );
        assert_eq!(
            e(c.call(Cmd::Trim, proto::CMD_FLAG_NO_HOLE, 0, 512, &[])
                .await),
            proto::EINVAL
        );
        if mode == Mode::Simple {
            // DF is only advertised with structured replies.
            assert_eq!(
                e(c.call(Cmd::Read, proto::CMD_FLAG_DF, 0, 512, &[]).await),
                proto::EINVAL
            );
            // Block status needs a negotiated meta context.
            assert_eq!(
                e(c.call(Cmd::BlockStatus, 0, 0, 512, &[]).await),
                proto::EINVAL
            );
        } else {
            assert_eq!(
                e(c.call(Cmd::BlockStatus, 0, SIZE, 512, &[]).await),
                proto::EINVAL
            );
        }
        // Zero lengths, flush with a range, reads above the maximum payload.
        assert_eq!(e(c.call(Cmd::Read, 0, 0, 0, &[]).await), proto::EINVAL);
        assert_eq!(e(c.call(Cmd::Trim, 0, 0, 0, &[]).await), proto::EINVAL);
        assert_eq!(e(c.call(Cmd::Write, 0, 0, 0, &[]).await), proto::EINVAL);
        assert_eq!(e(c.call(Cmd::Flush, 0, 512, 0, &[]).await), proto::EINVAL);
        assert_eq!(
            e(c.call(Cmd::Read, 0, 0, (32 << 20) + 512, &[]).await),
            proto::EINVAL
        );
        // Still in sync after all of it.
        assert_eq!(c.read(0, 512).await.unwrap(), [1; 512]);
    }
    assert!(
        srv.metric("stockade_nbd_request_errors_total{error=\"einval\",op=\"read\",volume=\"a\"}")
            >= 6.0
    );
    assert_eq!(
        srv.metric(
            "stockade_nbd_request_errors_total{error=\"einval\",op=\"unknown\",volume=\"a\"}"
        ),
        3.0
    );
}

#[tokio::test]
async fn oversized_payloads_never_desync_the_stream() {
    let srv = TestServer::start(vec![vol("a")]).await;
    // Compact headers: a write above the maximum payload is refused and its data drained.
    let mut c = open(srv.addr, "a", Mode::Structured).await;
    let len = (32 << 20) + 4096;
    let r = c
        .call(Cmd::Write, 0, 0, len, &vec![0xab; len as usize])
        .await;
    assert_eq!(r.error, proto::EINVAL);
    assert_eq!(c.write(0, &[2; 512], 0).await, 0);
    assert_eq!(c.read(0, 512).await.unwrap(), [2; 512]);
    assert_eq!(
        srv.vol("a").data_bytes(),
        P,
        "nothing of the refused write landed"
    );

    // Extended headers: a payload on a command that takes none is consumed and refused.
    let mut x = open(srv.addr, "a", Mode::Extended).await;
    let r = x
        .call(Cmd::Trim, proto::CMD_FLAG_PAYLOAD_LEN, 0, 100, &[9; 100])
        .await;
    assert_eq!(r.error, proto::EINVAL);
    // WRITE may carry the flag or not.
    assert_eq!(
        x.write(512, &[3; 512], proto::CMD_FLAG_PAYLOAD_LEN).await,
        0
    );
    assert_eq!(x.write(1024, &[4; 512], 0).await, 0);
    assert_eq!(
        x.read(0, 1536).await.unwrap()[512..],
        [[3u8; 512], [4; 512]].concat()
    );
    // A payload beyond the maximum with extended headers is a hard disconnect.
    let cookie = x.cookie();
    x.send(Cmd::Write.wire(), 0, cookie, 0, 64 << 20, &[]).await;
    assert!(closed_by_server(&mut x.s).await);
    // Other clients are unaffected.
    assert_eq!(
        c.read(512, 1024).await.unwrap(),
        [[3u8; 512], [4; 512]].concat()
    );
}

#[tokio::test]
async fn fast_zero_on_a_backend_that_cannot_is_enotsup() {
    let srv = TestServer::start(vec![vol("a").with_fast_zero(false)]).await;
    for mode in ALL_MODES {
        let mut c = open(srv.addr, "a", mode).await;
        assert_ne!(c.export.flags & proto::TFLAG_SEND_FAST_ZERO, 0);
        assert_eq!(c.write(0, &[5; 4096], 0).await, 0);
        assert_eq!(
            c.zero(0, 4096, proto::CMD_FLAG_FAST_ZERO).await,
            proto::ENOTSUP
        );
        assert_eq!(c.read(0, 4096).await.unwrap(), [5; 4096], "nothing changed");
        assert_eq!(c.zero(0, 4096, 0).await, 0, "without FAST_ZERO it works");
        assert_eq!(c.read(0, 4096).await.unwrap(), [0; 4096]);
    }
}

#[tokio::test]
async fn read_only_exports_refuse_writes() {
    let srv = TestServer::start(vec![vol("ro").with_read_only(true)]).await;
    let mut c = open(srv.addr, "ro", Mode::Extended).await;
    assert_ne!(c.export.flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(c.write(0, &[1; 512], 0).await, proto::EPERM);
    assert_eq!(c.trim(0, 512).await, proto::EPERM);
    assert_eq!(c.zero(0, 512, 0).await, proto::EPERM);
    assert_eq!(c.read(0, 512).await.unwrap(), [0; 512]);
    assert_eq!(c.flush().await, 0);
}

#[tokio::test]
async fn volume_errors_reach_the_client() {
    let srv = TestServer::start(vec![vol("a").with_capacity(2 * P)]).await;
    let v = srv.vol("a");
    v.poison(3 * P + 100..3 * P + 200);
    for mode in ALL_MODES {
        let mut c = open(srv.addr, "a", mode).await;
        let r = c.call(Cmd::Read, 0, 3 * P, 4096, &[]).await;
        assert_eq!(r.error, proto::EIO, "{mode:?}");
        match mode {
            Mode::Simple => assert!(r.simple && r.data.is_empty()),
            _ => {
                assert_eq!(r.chunks, [proto::REPLY_TYPE_ERROR_OFFSET]);
                assert_eq!(r.error_offset, Some(3 * P + 100));
            }
        }
        // Reads elsewhere are fine.
        assert!(c.read(0, 4096).await.is_ok());
    }
    // Out of space: ENOSPC, and the volume stays readable and consistent.
    let mut c = open(srv.addr, "a", Mode::Extended).await;
    assert_eq!(c.write(0, &[1; 4096], 0).await, 0);
    assert_eq!(c.write(P, &[2; 4096], 0).await, 0);
    assert_eq!(c.write(10 * P, &[3; 4096], 0).await, proto::ENOSPC);
    assert_eq!(
        c.write(P - 512, &[4; 1024], 0).await,
        0,
        "allocated pages still take writes"
    );
    assert_eq!(c.read(10 * P, 4096).await.unwrap(), [0; 4096]);
    assert_eq!(c.read(P - 512, 1024).await.unwrap(), [4; 1024]);
}

#[tokio::test]
async fn a_client_breaking_the_protocol_is_disconnected_alone() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut good = open(srv.addr, "a", Mode::Structured).await;
    assert_eq!(good.write(0, &[1; 512], 0).await, 0);
    for mode in ALL_MODES {
        let mut bad = open(srv.addr, "a", mode).await;
        // A request in flight, then garbage where the next header should be.
        let cookie = bad.cookie();
        bad.send(Cmd::Flush.wire(), 0, cookie, 0, 0, &[]).await;
        bad.s.write_all(&[0x5a; 32]).await.unwrap();
        assert!(closed_by_server(&mut bad.s).await, "{mode:?}");
    }
    // The compact magic is garbage once extended headers are negotiated.
    let mut bad = open(srv.addr, "a", Mode::Extended).await;
    let req = proto::Request {
        flags: 0,
        kind: Cmd::Flush.wire(),
        cookie: 1,
        offset: 0,
        length: 0,
    };
    let mut b = req.encode(proto::HeaderStyle::Compact).unwrap();
    b.extend_from_slice(&[0; 4]);
    bad.s.write_all(&b).await.unwrap();
    assert!(closed_by_server(&mut bad.s).await);
    // A client vanishing mid-header and mid-payload.
    let mut cut = open(srv.addr, "a", Mode::Simple).await;
    cut.s.write_all(&[0x25, 0x60]).await.unwrap();
    drop(cut);
    let mut cut = open(srv.addr, "a", Mode::Simple).await;
    let c = cut.cookie();
    cut.send(Cmd::Write.wire(), 0, c, 0, 4096, &[1; 100]).await;
    drop(cut);
    // The well-behaved client never noticed.
    assert_eq!(good.read(0, 512).await.unwrap(), [1; 512]);
    assert_eq!(good.write(512, &[2; 512], 0).await, 0);
    eventually("protocol errors counted", || {
        srv.metric("stockade_nbd_connections_closed_total{reason=\"protocol_error\"}") >= 6.0
    })
    .await;
}

#[tokio::test]
async fn many_requests_in_flight_matched_by_cookie() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let v = srv.vol("a");
    for mode in ALL_MODES {
        let mut c = open(srv.addr, "a", mode).await;
        // 100 pipelined writes of distinct data.
        let mut sent = HashMap::new();
        for i in 0..100u64 {
            let cookie = 1000 + i;
            let data = pattern(4096, i as u8);
            c.send(Cmd::Write.wire(), 0, cookie, i * 8192, 4096, &data)
                .await;
            sent.insert(cookie, i);
        }
        let mut seen = HashSet::new();
        for _ in 0..100 {
            let r = c.recv().await;
            assert_eq!(r.error, 0);
            assert!(sent.contains_key(&r.cookie) && seen.insert(r.cookie));
        }
        // 64 reads held in the volume until all are in flight, then released together.
        v.pause();
        for i in 0..64u64 {
            c.send(Cmd::Read.wire(), 0, 5000 + i, i * 8192, 4096, &[])
                .await;
        }
        eventually("64 reads in flight", || v.pending() == 64).await;
        v.resume();
        let mut got = HashSet::new();
        for _ in 0..64 {
            let r = c.recv().await;
            let i = r.cookie - 5000;
            assert!(i < 64 && got.insert(r.cookie), "cookie {}", r.cookie);
            assert_eq!(r.data, pattern(4096, i as u8), "read {i} matched by cookie");
        }
    }
}

#[tokio::test]
async fn in_flight_requests_and_bytes_are_bounded() {
    let cfg = ServerConfig {
        max_payload_bytes: common::ByteSize(MIB),
        max_inflight_bytes: common::ByteSize(MIB),
        max_inflight_requests: 4,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, vec![vol("a")]).await;
    let v = srv.vol("a");
    let mut c = open(srv.addr, "a", Mode::Extended).await;
    assert_eq!(c.export.max, MIB as u32);
    let waits = "stockade_nbd_backpressure_waits_total{volume=\"a\"}";

    // Request count: 12 flushes, at most 4 reach the volume while it is held.
    v.pause();
    for i in 0..12 {
        c.send(Cmd::Flush.wire(), 0, 100 + i, 0, 0, &[]).await;
    }
    eventually("reader blocked on the request bound", || {
        srv.metric(waits) >= 1.0 && v.pending() == 4
    })
    .await;
    tokio::task::yield_now().await;
    assert_eq!(v.pending(), 4, "never more than the bound");
    v.resume();
    let cookies: HashSet<u64> = futures_recv(&mut c, 12).await;
    assert_eq!(cookies, (100..112).collect());

    // Bytes: 1 MiB in flight means two 512 KiB reads at a time.
    let before = srv.metric(waits);
    v.pause();
    for i in 0..8 {
        c.send(Cmd::Read.wire(), 0, 200 + i, 0, 512 << 10, &[])
            .await;
    }
    eventually("reader blocked on the byte bound", || {
        srv.metric(waits) > before && v.pending() == 2
    })
    .await;
    tokio::task::yield_now().await;
    assert_eq!(v.pending(), 2);
    v.resume();
    assert_eq!(futures_recv(&mut c, 8).await, (200..208).collect());
    // And a write payload waits for room too, without error.
    v.pause();
    for i in 0..3 {
        c.send(
            Cmd::Write.wire(),
            0,
            300 + i,
            0,
            MIB,
            &vec![1; MIB as usize],
        )
        .await;
    }
    eventually("one 1 MiB write in flight", || v.pending() == 1).await;
    v.resume();
    assert_eq!(futures_recv(&mut c, 3).await, (300..303).collect());
}

/// 1 MiB payloads, and 1 MiB in flight per connection and server-wide.
fn one_mib_in_flight() -> ServerConfig {
    ServerConfig {
        max_payload_bytes: common::ByteSize(MIB),
        max_inflight_bytes: common::ByteSize(MIB),
        max_server_inflight_bytes: common::ByteSize(MIB),
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn in_flight_bytes_are_bounded_across_connections() {
    let srv = TestServer::start_with(one_mib_in_flight(), vec![vol("a")]).await;
    let v = srv.vol("a");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(open(srv.addr, "a", Mode::Structured).await);
    }
    v.pause();
    for (i, c) in clients.iter_mut().enumerate() {
        for j in 0..2 {
            let cookie = (i * 10 + j) as u64;
            c.send(Cmd::Read.wire(), 0, cookie, 0, 512 << 10, &[]).await;
        }
    }
    // Six 512 KiB reads on three connections, but only 1 MiB in flight server-wide.
    eventually("two reads in flight server-wide", || {
        v.pending() == 2 && srv.metric("stockade_nbd_backpressure_waits_total{volume=\"a\"}") >= 1.0
    })
    .await;
    tokio::task::yield_now().await;
    assert_eq!(v.pending(), 2);
    v.resume();
    for (i, c) in clients.iter_mut().enumerate() {
        let want: HashSet<u64> = (0..2).map(|j| (i * 10 + j) as u64).collect();
        assert_eq!(futures_recv(c, 2).await, want);
    }
}

/// A volume whose requests are held back (its throttle, a slow leader) keeps their payload in
/// flight: its connections together take at most the volume's share of the server's room, so
/// another volume's requests still find room.
#[tokio::test]
async fn a_held_back_volume_takes_only_its_share_of_the_servers_in_flight_bytes() {
    let cfg = ServerConfig {
        max_payload_bytes: common::ByteSize(MIB),
        max_inflight_bytes: common::ByteSize(MIB),
        max_volume_inflight_bytes: common::ByteSize(2 * MIB),
        max_server_inflight_bytes: common::ByteSize(4 * MIB),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, vec![vol("a"), vol("b")]).await;
    let a = srv.vol("a");
    a.pause();
    // Four connections to the held-back volume, a 1 MiB write each: enough for all the
    // server's room, but only two fit in the volume's share.
    let mut held = Vec::new();
    for i in 0..4u64 {
        let mut c = open(srv.addr, "a", Mode::Structured).await;
        c.send(
            Cmd::Write.wire(),
            0,
            i,
            i * MIB,
            MIB,
            &vec![1; MIB as usize],
        )
        .await;
        held.push(c);
    }
    eventually("writes of volume a in flight", || a.pending() >= 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut other = open(srv.addr, "b", Mode::Structured).await;
    let done = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        other.write(0, &vec![7u8; MIB as usize], 0),
    )
    .await
    .expect("volume b waited for room volume a held");
    assert_eq!(done, 0);
    assert_eq!(a.pending(), 2, "volume a is held to its share");
    assert!(srv.metric("stockade_nbd_backpressure_waits_total{volume=\"a\"}") >= 2.0);
    a.resume();
    for (i, c) in held.iter_mut().enumerate() {
        let r = c.recv().await;
        assert_eq!((r.cookie, r.error), (i as u64, 0));
    }
}

/// A block status reply can hold 1 MiB of descriptors: it counts against the in-flight bytes
/// like a read of that size.
#[tokio::test]
async fn block_status_replies_count_against_the_in_flight_bytes() {
    let srv = TestServer::start_with(one_mib_in_flight(), vec![vol("a")]).await;
    let v = srv.vol("a");
    let mut c = open(srv.addr, "a", Mode::Extended).await;
    v.pause();
    for cookie in [1, 2] {
        c.send(Cmd::BlockStatus.wire(), 0, cookie, 0, MIB, &[])
            .await;
    }
    eventually("one block status in flight, one waiting", || {
        v.pending() == 1 && srv.metric("stockade_nbd_backpressure_waits_total{volume=\"a\"}") >= 1.0
    })
    .await;
    tokio::task::yield_now().await;
    assert_eq!(v.pending(), 1);
    v.resume();
    assert_eq!(futures_recv(&mut c, 2).await, [1, 2].into_iter().collect());
}

/// A client that stops reading its replies holds the server-wide in-flight bytes its reads
/// took; one that stops sending a write's payload holds its share too. Each is closed after
/// the stall timeout, and everyone else goes on.
#[tokio::test]
async fn a_stalled_client_is_closed_and_frees_the_room_it_held() {
    let cfg = ServerConfig {
        max_inflight_bytes: common::ByteSize(64 * MIB),
        max_server_inflight_bytes: common::ByteSize(64 * MIB),
        stall_timeout: std::time::Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(cfg, vec![vol("a")]).await;
    let stalled = "stockade_nbd_connections_closed_total{reason=\"stalled\"}";
    // Two 32 MiB reads, never read: their replies fill the socket and hold all 64 MiB.
    let mut greedy = open(srv.addr, "a", Mode::Structured).await;
    for cookie in 1..=2 {
        greedy
            .send(Cmd::Read.wire(), 0, cookie, 0, 32 * MIB, &[])
            .await;
    }
    // Another client's read waits for room, then is served once the greedy one is closed.
    let mut other = open(srv.addr, "a", Mode::Structured).await;
    other.send(Cmd::Read.wire(), 0, 100, 0, 4096, &[]).await;
    eventually("the other client to wait for room", || {
        srv.metric("stockade_nbd_backpressure_waits_total{volume=\"a\"}") >= 1.0
    })
    .await;
    let r = other.recv().await;
    assert_eq!((r.cookie, r.error), (100, 0));
    assert!(closed_by_server(&mut greedy.s).await);
    assert_eq!(srv.metric(stalled), 1.0);
    // Half a write payload, then nothing: closed too; the server still serves.
    let mut half = open(srv.addr, "a", Mode::Structured).await;
    let w = proto::Request {
        flags: 0,
        kind: Cmd::Write.wire(),
        cookie: 9,
        offset: 0,
        length: MIB,
    };
    let mut frame = w.encode(half.header_style()).unwrap();
    frame.extend_from_slice(&[5u8; 1000]);
    half.s.write_all(&frame).await.unwrap();
    assert!(closed_by_server(&mut half.s).await);
    assert_eq!(srv.metric(stalled), 2.0);
    assert_eq!(other.write(0, &[6u8; 4096], 0).await, 0);
    assert_eq!(other.read(0, 4096).await.unwrap(), vec![6u8; 4096]);
}

async fn futures_recv(c: &mut Nbd, n: usize) -> HashSet<u64> {
    let mut out = HashSet::new();
    for _ in 0..n {
        let r = c.recv().await;
        assert_eq!(r.error, 0, "cookie {}", r.cookie);
        out.insert(r.cookie);
    }
    out
}

#[tokio::test]
async fn disc_answers_every_request_in_flight() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let v = srv.vol("a");
    let mut c = open(srv.addr, "a", Mode::Structured).await;
    v.pause();
    for i in 0..20u64 {
        c.send(
            Cmd::Write.wire(),
            0,
            i,
            i * 4096,
            4096,
            &pattern(4096, i as u8),
        )
        .await;
    }
    c.disc().await;
    eventually("DISC received with 20 writes in flight", || {
        srv.metric("stockade_nbd_requests_total{op=\"disc\",volume=\"a\"}") == 1.0
            && v.pending() == 20
    })
    .await;
    v.resume();
    assert_eq!(futures_recv(&mut c, 20).await, (0..20).collect());
    assert!(
        closed_by_server(&mut c.s).await,
        "closed after the last reply"
    );
    let mut d = open(srv.addr, "a", Mode::Simple).await;
    for i in 0..20u64 {
        assert_eq!(
            d.read(i * 4096, 4096).await.unwrap(),
            pattern(4096, i as u8)
        );
    }
    eventually("connection gauge back to one", || {
        srv.metric("stockade_nbd_connections{volume=\"a\"}") == 1.0
    })
    .await;
}

#[tokio::test]
async fn detaching_an_export_ends_its_connections_gracefully() {
    let srv = TestServer::start(vec![vol("a"), vol("b")]).await;
    let v = srv.vol("a");
    let mut c = open(srv.addr, "a", Mode::Extended).await;
    let mut other = open(srv.addr, "b", Mode::Extended).await;
    assert_eq!(c.write(0, &[6; 4096], 0).await, 0);
    v.pause();
    for i in 0..10 {
        c.send(Cmd::Read.wire(), 0, 50 + i, 0, 4096, &[]).await;
    }
    eventually("10 reads in flight", || v.pending() == 10).await;
    srv.exports.remove("a");
    v.close();
    // Sent after the detach: not taken, answered ESHUTDOWN (the earlier reads are still in
    // flight, so the connection is still open to answer it).
    c.send(Cmd::Read.wire(), 0, 99, 0, 4096, &[]).await;
    let r = c.recv().await;
    assert_eq!((r.cookie, r.error), (99, proto::ESHUTDOWN));
    v.resume();
    for _ in 0..10 {
        let r = c.recv().await;
        assert!((50..60).contains(&r.cookie));
        assert_eq!(r.data, [6; 4096]);
    }
    // Then the connection ends.
    assert!(closed_without_more(&mut c.s).await);
    // New connections no longer find it; other exports are untouched.
    let mut s = handshake(srv.addr).await;
    assert_eq!(
        opt_result(&mut s, proto::OPT_GO, &info_request("a", &[])).await,
        proto::REP_ERR_UNKNOWN
    );
    assert_eq!(other.write(0, &[1; 512], 0).await, 0);
    // The server waits (briefly) for the client to close its side before it counts the
    // connection closed.
    drop(c);
    eventually("the connection counted closed", || {
        srv.metric("stockade_nbd_connections_closed_total{reason=\"export_closed\"}") == 1.0
    })
    .await;
}

/// Replies still queued when a detach ends the connection all reach a client that reads them
/// slowly, even when it sent more meanwhile: input left unread at the close would make the
/// kernel reset the connection and discard the replies it had not sent yet.
#[tokio::test]
async fn replies_queued_at_a_detach_reach_a_slow_client() {
    const LEN: u64 = 4 * MIB;
    let srv = TestServer::start(vec![vol("a")]).await;
    let v = srv.vol("a");
    let mut c = open(srv.addr, "a", Mode::Extended).await;
    for i in 0..8u64 {
        let data = vec![i as u8 + 1; LEN as usize];
        assert_eq!(c.write(i * LEN, &data, 0).await, 0);
    }
    v.pause();
    for i in 0..8u64 {
        c.send(Cmd::Read.wire(), 0, 100 + i, i * LEN, LEN, &[])
            .await;
    }
    eventually("8 reads in flight", || v.pending() == 8).await;
    srv.exports.remove("a");
    v.close();
    // A request the server does not take any more (answered ESHUTDOWN, below).
    c.send(Cmd::Read.wire(), 0, 999, 0, 4096, &[]).await;
    v.resume();
    // The server writes what the socket buffers hold, then waits for this client.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut cookies = HashSet::new();
    for _ in 0..9 {
        let r = c.recv().await;
        if r.cookie == 999 {
            assert_eq!(r.error, proto::ESHUTDOWN);
            continue;
        }
        let fill = (r.cookie - 99) as u8;
        assert_eq!(r.data.len() as u64, LEN, "cookie {}", r.cookie);
        assert!(r.data.iter().all(|&b| b == fill), "cookie {}", r.cookie);
        cookies.insert(r.cookie);
    }
    assert_eq!(cookies, (100..108).collect());
    assert!(closed_without_more(&mut c.s).await);
}

#[tokio::test]
async fn shutdown_answers_in_flight_requests_then_stops() {
    let mut srv = TestServer::start(vec![vol("a")]).await;
    let v = srv.vol("a");
    let mut c = open(srv.addr, "a", Mode::Simple).await;
    v.pause();
    for i in 0..5 {
        c.send(Cmd::Read.wire(), 0, i, 0, 4096, &[]).await;
    }
    eventually("5 reads in flight", || v.pending() == 5).await;
    let stopping = tokio::spawn(async move {
        srv.shutdown().await;
        srv
    });
    // Shutdown waits for the in-flight work.
    tokio::task::yield_now().await;
    assert!(!stopping.is_finished());
    v.resume();
    assert_eq!(futures_recv(&mut c, 5).await, (0..5).collect());
    assert!(closed_by_server(&mut c.s).await);
    let srv = stopping.await.unwrap();
    assert_eq!(
        srv.metric("stockade_nbd_connections_closed_total{reason=\"shutdown\"}"),
        1.0
    );
}

#[tokio::test]
async fn flush_and_fua_are_visible_across_connections() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut a = open(srv.addr, "a", Mode::Extended).await;
    let mut b = open(srv.addr, "a", Mode::Structured).await;
    assert_ne!(a.export.flags & proto::TFLAG_CAN_MULTI_CONN, 0);
    for i in 0..20u64 {
        let off = i * P;
        assert_eq!(b.read(off, 4096).await.unwrap(), [0; 4096]);
        let d = pattern(4096, i as u8);
        assert_eq!(a.write(off, &d, 0).await, 0);
        assert_eq!(a.flush().await, 0);
        assert_eq!(b.read(off, 4096).await.unwrap(), d);
        let d2 = pattern(4096, !(i as u8));
        assert_eq!(a.write(off, &d2, proto::CMD_FLAG_FUA).await, 0);
        assert_eq!(b.read(off, 4096).await.unwrap(), d2);
    }
    assert_eq!(srv.vol("a").flush_count(), 20);
}

#[tokio::test]
async fn metrics_are_recorded_per_volume() {
    let srv = TestServer::start(vec![vol("a")]).await;
    let mut c = open(srv.addr, "a", Mode::Extended).await;
    for i in 0..3 {
        assert_eq!(c.write(i * 4096, &[1; 4096], 0).await, 0);
    }
    for _ in 0..2 {
        c.read(0, 4096).await.unwrap();
    }
    assert_eq!(c.flush().await, 0);
    assert_eq!(c.read(SIZE, 512).await, Err(proto::EINVAL));
    let m = |s: &str| srv.metric(s);
    assert_eq!(m("stockade_nbd_connections{volume=\"a\"}"), 1.0);
    c.disc().await;
    assert!(closed_by_server(&mut c.s).await);
    eventually("connection gauge back to zero", || {
        m("stockade_nbd_connections{volume=\"a\"}") == 0.0
    })
    .await;
    assert_eq!(
        m("stockade_nbd_requests_total{op=\"write\",volume=\"a\"}"),
        3.0
    );
    assert_eq!(
        m("stockade_nbd_requests_total{op=\"read\",volume=\"a\"}"),
        3.0
    );
    assert_eq!(
        m("stockade_nbd_requests_total{op=\"flush\",volume=\"a\"}"),
        1.0
    );
    assert_eq!(
        m("stockade_nbd_requests_total{op=\"disc\",volume=\"a\"}"),
        1.0
    );
    assert_eq!(m("stockade_nbd_written_bytes_total{volume=\"a\"}"), 12288.0);
    assert_eq!(m("stockade_nbd_read_bytes_total{volume=\"a\"}"), 8192.0);
    assert_eq!(
        m("stockade_nbd_request_errors_total{error=\"einval\",op=\"read\",volume=\"a\"}"),
        1.0
    );
    assert_eq!(
        m("stockade_nbd_request_duration_seconds_count{op=\"write\",volume=\"a\"}"),
        3.0
    );
    assert_eq!(
        m("stockade_nbd_request_duration_seconds_count{op=\"read\",volume=\"a\"}"),
        3.0
    );
    assert_eq!(m("stockade_nbd_requests_in_flight{volume=\"a\"}"), 0.0);
    assert_eq!(
        m("stockade_nbd_connections_closed_total{reason=\"disc\"}"),
        1.0
    );
}
