//! Golden-bytes tests of every encoder and decoder, against the layouts in proto.md.

use super::*;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn constants_match_the_specification() {
    // Magic numbers spelled as in proto.md.
    assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
    assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
    assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
    assert_eq!(REP_ERR_UNKNOWN, 0x8000_0006);
    assert_eq!(REP_ERR_TOO_BIG, 0x8000_0009);
    assert_eq!(REP_ERR_EXT_HEADER_REQD, 0x8000_000a);
    assert_eq!(REPLY_TYPE_ERROR, 32769);
    assert_eq!(REPLY_TYPE_ERROR_OFFSET, 32770);
    assert_eq!(TFLAG_SEND_FAST_ZERO, 0x0800);
    assert_eq!(TFLAG_CAN_MULTI_CONN, 0x0100);
    assert_eq!(TFLAG_SEND_CACHE, 0x0400);
    assert_eq!(CMD_FLAG_PAYLOAD_LEN, 0x20);
    for (i, c) in Cmd::ALL.iter().enumerate() {
        assert_eq!(usize::from(c.wire()), i);
        assert_eq!(Cmd::from_wire(c.wire()), Some(*c));
    }
    assert_eq!(Cmd::from_wire(8), None);
    assert_eq!(Cmd::from_wire(0xffff), None);
}

#[test]
fn greeting_golden() {
    let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    assert_eq!(g.to_vec(), hex("4e42444d41474943 49484156454f5054 0003"));
    assert_eq!(decode_greeting(&g), Ok(3));
    let mut bad = g;
    bad[0] = 0;
    assert!(matches!(
        decode_greeting(&bad),
        Err(ProtoError::BadMagic { .. })
    ));
}

#[test]
fn option_header_golden() {
    let h = OptionHeader {
        option: OPT_GO,
        length: 0x0102,
    };
    let b = h.encode();
    assert_eq!(b.to_vec(), hex("49484156454f5054 00000007 00000102"));
    assert_eq!(OptionHeader::decode(&b), Ok(h));
    let mut bad = b;
    bad[7] ^= 1;
    assert!(OptionHeader::decode(&bad).is_err());
}

#[test]
fn option_reply_golden() {
    let mut out = Vec::new();
    encode_option_reply(&mut out, OPT_LIST, REP_SERVER, &encode_rep_server("vol")).unwrap();
    assert_eq!(
        out,
        hex("0003e889045565a9 00000003 00000002 00000007 00000003 766f6c")
    );
    let h = OptionReplyHeader::decode(out[..20].try_into().unwrap()).unwrap();
    assert_eq!(
        h,
        OptionReplyHeader {
            option: OPT_LIST,
            reply_type: REP_SERVER,
            length: 7
        }
    );
    assert!(!h.is_error());
    let mut e = Vec::new();
    encode_option_reply(&mut e, 99, REP_ERR_UNSUP, b"").unwrap();
    assert_eq!(e, hex("0003e889045565a9 00000063 80000001 00000000"));
    assert!(
        OptionReplyHeader::decode(e[..20].try_into().unwrap())
            .unwrap()
            .is_error()
    );
}

#[test]
fn export_name_reply_golden() {
    let r = encode_export_name_reply(0x1_0000_0000, 0x0d6d, false);
    assert_eq!(r.len(), 8 + 2 + 124);
    assert_eq!(&r[..10], &hex("0000000100000000 0d6d")[..]);
    assert!(r[10..].iter().all(|&b| b == 0));
    assert_eq!(
        encode_export_name_reply(5, 1, true),
        hex("0000000000000005 0001")
    );
}

#[test]
fn info_items_golden() {
    let e = encode_info_export(1 << 30, 0x0001);
    assert_eq!(e, hex("0000 0000000040000000 0001"));
    assert_eq!(
        InfoReply::decode(&e),
        Ok(InfoReply::Export {
            size: 1 << 30,
            flags: 1
        })
    );
    let b = encode_info_block_size(512, 4096, 32 << 20);
    assert_eq!(b, hex("0003 00000200 00001000 02000000"));
    assert_eq!(
        InfoReply::decode(&b),
        Ok(InfoReply::BlockSize {
            min: 512,
            preferred: 4096,
            max: 32 << 20
        })
    );
    let n = encode_info_string(INFO_NAME, "ab");
    assert_eq!(n, hex("0001 6162"));
    assert_eq!(InfoReply::decode(&n), Ok(InfoReply::Name("ab".into())));
    let d = encode_info_string(INFO_DESCRIPTION, "x");
    assert_eq!(
        InfoReply::decode(&d),
        Ok(InfoReply::Description("x".into()))
    );
    // Wrong lengths are rejected.
    assert!(InfoReply::decode(&e[..11]).is_err());
    let mut long = e.clone();
    long.push(0);
    assert!(InfoReply::decode(&long).is_err());
    assert_eq!(
        InfoReply::decode(&hex("0009 00")),
        Ok(InfoReply::Unknown(9))
    );
    // Long strings are truncated to the protocol limit.
    let big = "é".repeat(3000);
    let enc = encode_info_string(INFO_DESCRIPTION, &big);
    assert!(enc.len() - 2 <= MAX_STRING_BYTES);
    assert!(std::str::from_utf8(&enc[2..]).is_ok());
}

#[test]
fn info_request_golden_and_strict() {
    let r = InfoRequest {
        name: "vol".into(),
        requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
    };
    let b = r.encode();
    assert_eq!(b, hex("00000003 766f6c 0002 0003 0001"));
    assert_eq!(InfoRequest::decode(&b), Ok(r));
    // Name length beyond the data, trailing bytes, truncated list: all malformed.
    assert!(InfoRequest::decode(&hex("00000009 766f6c 0000")).is_err());
    assert!(InfoRequest::decode(&hex("00000000 0000 00")).is_err());
    assert!(InfoRequest::decode(&hex("00000000 0002 0003")).is_err());
    assert!(InfoRequest::decode(&hex("00000000")).is_err());
    // NUL and invalid UTF-8 in the name.
    assert!(InfoRequest::decode(&hex("00000001 00 0000")).is_err());
    assert!(InfoRequest::decode(&hex("00000001 ff 0000")).is_err());
    assert_eq!(
        InfoRequest::decode(&hex("00000000 0000")),
        Ok(InfoRequest {
            name: String::new(),
            requests: vec![]
        })
    );
}

#[test]
fn meta_context_request_golden_and_strict() {
    let r = MetaContextRequest {
        export: "v".into(),
        queries: vec!["base:".into(), "base:allocation".into()],
    };
    let b = r.encode();
    assert_eq!(
        b,
        hex("00000001 76 00000002 00000005 626173653a 0000000f 626173653a616c6c6f636174696f6e")
    );
    assert_eq!(MetaContextRequest::decode(&b), Ok(r));
    // A query count far beyond the data is rejected without allocating for it.
    assert!(MetaContextRequest::decode(&hex("00000000 ffffffff")).is_err());
    // A query length running past the end.
    assert!(MetaContextRequest::decode(&hex("00000000 00000001 00000009 61")).is_err());
    // Trailing garbage.
    assert!(MetaContextRequest::decode(&hex("00000000 00000000 00")).is_err());
    assert_eq!(
        MetaContextRequest::decode(&hex("00000000 00000000")),
        Ok(MetaContextRequest {
            export: String::new(),
            queries: vec![]
        })
    );
    assert_eq!(
        encode_rep_meta_context(1, "base:allocation"),
        hex("00000001 626173653a616c6c6f636174696f6e")
    );
}

#[test]
fn compact_request_golden() {
    let b = hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200");
    let r = Request::decode(HeaderStyle::Compact, &b).unwrap();
    assert_eq!(
        r,
        Request {
            flags: CMD_FLAG_FUA,
            kind: 1,
            cookie: 0x0102030405060708,
            offset: 4096,
            length: 512
        }
    );
    assert_eq!(r.cmd(), Some(Cmd::Write));
    assert_eq!(r.encode(HeaderStyle::Compact).unwrap(), b);
    // The extended magic is a protocol error in compact mode and vice versa.
    let mut wrong = b.clone();
    wrong[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    assert!(matches!(
        Request::decode(HeaderStyle::Compact, &wrong),
        Err(ProtoError::BadMagic { .. })
    ));
    assert!(Request::decode(HeaderStyle::Compact, &b[..27]).is_err());
    let big = Request {
        length: 1 << 32,
        ..r
    };
    assert!(big.encode(HeaderStyle::Compact).is_err());
}

#[test]
fn extended_request_golden() {
    let b = hex("21e41c71 0030 0006 00000000000000ff 0000000000000000 0000000140000000");
    let r = Request::decode(HeaderStyle::Extended, &b).unwrap();
    assert_eq!(
        r,
        Request {
            flags: CMD_FLAG_FAST_ZERO | CMD_FLAG_PAYLOAD_LEN,
            kind: 6,
            cookie: 255,
            offset: 0,
            length: 5 << 30
        }
    );
    assert_eq!(r.cmd(), Some(Cmd::WriteZeroes));
    assert_eq!(r.encode(HeaderStyle::Extended).unwrap(), b);
    assert!(Request::decode(HeaderStyle::Compact, &b).is_err());
}

#[test]
fn simple_reply_golden() {
    let mut out = Vec::new();
    encode_simple_reply(&mut out, EINVAL, 0xaabb);
    assert_eq!(out, hex("67446698 00000016 000000000000aabb"));
    assert_eq!(
        ReplyHeader::decode(&out),
        Ok(ReplyHeader::Simple {
            error: 22,
            cookie: 0xaabb
        })
    );
}

#[test]
fn structured_chunk_golden() {
    let mut out = Vec::new();
    encode_chunk_header(
        &mut out,
        ReplyStyle::Structured,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        7,
        999,
        8 + 512,
    )
    .unwrap();
    assert_eq!(out, hex("668e33ef 0001 0001 0000000000000007 00000208"));
    assert_eq!(ReplyHeader::len_for_magic(STRUCTURED_REPLY_MAGIC), Some(20));
    assert_eq!(
        ReplyHeader::decode(&out),
        Ok(ReplyHeader::Chunk {
            flags: 1,
            chunk_type: 1,
            cookie: 7,
            offset: None,
            length: 520
        })
    );
    let mut too_big = Vec::new();
    assert!(
        encode_chunk_header(&mut too_big, ReplyStyle::Structured, 0, 0, 0, 0, 1 << 32).is_err()
    );
    assert!(encode_chunk_header(&mut too_big, ReplyStyle::Simple, 0, 0, 0, 0, 0).is_err());
}

#[test]
fn extended_chunk_golden() {
    let mut out = Vec::new();
    encode_chunk_header(
        &mut out,
        ReplyStyle::Extended,
        REPLY_FLAG_DONE,
        REPLY_TYPE_NONE,
        0x11,
        0x2000,
        0,
    )
    .unwrap();
    assert_eq!(
        out,
        hex("6e8a278c 0001 0000 0000000000000011 0000000000002000 0000000000000000")
    );
    assert_eq!(ReplyHeader::len_for_magic(EXTENDED_REPLY_MAGIC), Some(32));
    assert_eq!(
        ReplyHeader::decode(&out),
        Ok(ReplyHeader::Chunk {
            flags: 1,
            chunk_type: 0,
            cookie: 0x11,
            offset: Some(0x2000),
            length: 0
        })
    );
    assert!(ReplyHeader::decode(&hex("deadbeef 00000000 0000000000000000")).is_err());
}

#[test]
fn error_payloads_golden() {
    let mut out = Vec::new();
    encode_error_payload(&mut out, ENOSPC, "full");
    assert_eq!(out, hex("0000001c 0004 66756c6c"));
    assert_eq!(
        decode_error_payload(REPLY_TYPE_ERROR, &out),
        Ok((28, "full".into(), None))
    );
    let mut o2 = Vec::new();
    encode_error_offset_payload(&mut o2, EIO, "", 4096);
    assert_eq!(o2, hex("00000005 0000 0000000000001000"));
    assert_eq!(
        decode_error_payload(REPLY_TYPE_ERROR_OFFSET, &o2),
        Ok((5, String::new(), Some(4096)))
    );
    // A message length beyond the payload is malformed.
    assert!(decode_error_payload(REPLY_TYPE_ERROR, &hex("00000005 0009 61")).is_err());
    let mut long = Vec::new();
    encode_error_payload(&mut long, EIO, &"x".repeat(10_000));
    assert_eq!(long.len(), 6 + MAX_STRING_BYTES);
}

#[test]
fn block_status_payloads_golden() {
    let d = [(4096u64, STATE_HOLE | STATE_ZERO), (512, 0)];
    let mut c = Vec::new();
    encode_block_status_payload(&mut c, false, 1, &d).unwrap();
    assert_eq!(c, hex("00000001 00001000 00000003 00000200 00000000"));
    assert_eq!(c.len() as u64, block_status_payload_len(false, 2));
    assert_eq!(
        decode_block_status_payload(false, &c).unwrap(),
        (1, d.to_vec())
    );
    let mut e = Vec::new();
    let big = [(5u64 << 30, STATE_HOLE | STATE_ZERO)];
    encode_block_status_payload(&mut e, true, 1, &big).unwrap();
    assert_eq!(
        e,
        hex("00000001 00000001 0000000140000000 0000000000000003")
    );
    assert_eq!(e.len() as u64, block_status_payload_len(true, 1));
    assert_eq!(
        decode_block_status_payload(true, &e).unwrap(),
        (1, big.to_vec())
    );
    // A 64-bit extent cannot be sent in a compact descriptor.
    assert!(encode_block_status_payload(&mut Vec::new(), false, 1, &big).is_err());
    // Descriptor count disagreeing with the length, or no descriptor at all.
    let mut bad = e.clone();
    bad[7] = 2;
    assert!(decode_block_status_payload(true, &bad).is_err());
    assert!(decode_block_status_payload(false, &hex("00000001")).is_err());
}

#[test]
fn truncate_respects_char_boundaries() {
    assert_eq!(truncate_str("héllo", 2), "h");
    assert_eq!(truncate_str("héllo", 3), "hé");
    assert_eq!(truncate_str("abc", 10), "abc");
}

proptest! {
    #[test]
    fn requests_roundtrip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u64, ext: bool) {
        let style = if ext { HeaderStyle::Extended } else { HeaderStyle::Compact };
        let length = if ext { length } else { length & 0xffff_ffff };
        let r = Request { flags, kind, cookie, offset, length };
        let b = r.encode(style).unwrap();
        prop_assert_eq!(b.len(), style.request_len());
        prop_assert_eq!(Request::decode(style, &b).unwrap(), r);
    }

    #[test]
    fn request_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40), ext: bool) {
        let style = if ext { HeaderStyle::Extended } else { HeaderStyle::Compact };
        let _ = Request::decode(style, &bytes);
        let _ = ReplyHeader::decode(&bytes);
        let _ = InfoRequest::decode(&bytes);
        let _ = MetaContextRequest::decode(&bytes);
        let _ = InfoReply::decode(&bytes);
        let _ = decode_block_status_payload(ext, &bytes);
        let _ = decode_error_payload(REPLY_TYPE_ERROR_OFFSET, &bytes);
    }

    #[test]
    fn meta_requests_roundtrip(export in "[a-z]{0,8}", queries in proptest::collection::vec("[a-z:]{0,12}", 0..5)) {
        let r = MetaContextRequest { export, queries };
        prop_assert_eq!(MetaContextRequest::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn block_status_roundtrip(ext: bool, id: u32, d in proptest::collection::vec((1u64..u64::from(u32::MAX), 0u32..4), 1..20)) {
        let mut out = Vec::new();
        encode_block_status_payload(&mut out, ext, id, &d).unwrap();
        prop_assert_eq!(out.len() as u64, block_status_payload_len(ext, d.len()));
        prop_assert_eq!(decode_block_status_payload(ext, &out).unwrap(), (id, d));
    }
}
