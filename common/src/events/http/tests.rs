use super::*;
use crate::events::test_server::{TestServer, ok, status};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

fn limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        max_body_bytes: 1024,
    }
}

#[test]
fn urls_parse() {
    let u = HttpUrl::parse("http://127.0.0.1:9100/metrics").unwrap();
    assert_eq!(
        (u.host(), u.port(), u.path_and_query()),
        ("127.0.0.1", 9100, "/metrics")
    );
    assert_eq!(u.to_string(), "http://127.0.0.1:9100/metrics");
    let u = HttpUrl::parse("HTTP://Example.COM").unwrap();
    assert_eq!(
        (u.host(), u.port(), u.path_and_query()),
        ("example.com", 80, "/")
    );
    let u = HttpUrl::parse("http://[::1]:9090?x=1#frag").unwrap();
    assert_eq!(
        (u.host(), u.port(), u.path_and_query()),
        ("::1", 9090, "/?x=1")
    );
    assert_eq!(u.authority(), "[::1]:9090");
    let u = HttpUrl::parse("http://h/a/b?q=%20").unwrap();
    assert_eq!(u.path_and_query(), "/a/b?q=%20");
    assert_eq!(
        u.with_path_and_query("/api/v1/query").unwrap().to_string(),
        "http://h:80/api/v1/query"
    );
    for (bad, want) in [
        ("https://h/", "only http://"),
        ("ftp://h/", "only http://"),
        ("h:80/metrics", "only http://"),
        ("http://", "invalid host"),
        ("http://:80/", "invalid host"),
        ("http://h:0/", "invalid port"),
        ("http://h:99999/", "invalid port"),
        ("http://h:+80/", "invalid port"),
        ("http://h:/", "invalid port"),
        ("http://u:p@h/", "user information"),
        ("http://h/a b", "percent-encode"),
        ("http://h/\u{e9}", "percent-encode"),
        ("http://h\r\nX: y/", "invalid host"),
        ("http://[::1/", "invalid host"),
        ("http://[zz]/", "invalid host"),
        ("http://[::1]x/", "invalid port"),
    ] {
        let e = HttpUrl::parse(bad).unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
    assert!(matches!(
        HttpUrl::parse(&format!("http://h/{}", "a".repeat(MAX_URL_BYTES))),
        Err(UrlError::TooLong { .. })
    ));
}

#[test]
fn components_are_percent_encoded() {
    assert_eq!(
        encode_component("rate(x{a=\"b\"}[1m]) + 1"),
        "rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%20%2B%201"
    );
    assert_eq!(encode_component("a-b_c.d~"), "a-b_c.d~");
}

#[tokio::test]
async fn get_with_content_length() {
    let seen = Arc::new(Mutex::new(String::new()));
    let s2 = seen.clone();
    let srv = TestServer::start(move |r| {
        *s2.lock().unwrap() = r.head.clone();
        ok("text/plain", "up 1\n")
    })
    .await;
    let r = get(&srv.url("/metrics"), "text/plain", limits())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.is_success());
    assert_eq!(r.body, b"up 1\n");
    assert_eq!(r.header("Content-Type"), Some("text/plain"));
    let head = seen.lock().unwrap().clone();
    assert!(head.starts_with("GET /metrics HTTP/1.1\r\n"), "{head}");
    assert!(head.contains(&format!("Host: {}\r\n", srv.addr)), "{head}");
    assert!(head.contains("Connection: close\r\n"), "{head}");
}

#[tokio::test]
async fn chunked_and_eof_delimited_bodies() {
    let srv = TestServer::start(|r| match r.path.as_str() {
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
            .to_vec(),
        "/eof" => b"HTTP/1.0 200 OK\r\n\r\nuntil the end".to_vec(),
        "/nocontent" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        _ => status(404, "text/plain", "no"),
    })
    .await;
    let r = get(&srv.url("/chunked"), "*/*", limits()).await.unwrap();
    assert_eq!(r.body, b"hello, world");
    let r = get(&srv.url("/eof"), "*/*", limits()).await.unwrap();
    assert_eq!(r.body, b"until the end");
    let r = get(&srv.url("/nocontent"), "*/*", limits()).await.unwrap();
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = get(&srv.url("/other"), "*/*", limits()).await.unwrap();
    assert_eq!(r.status, 404);
    assert!(!r.is_success());
    assert_eq!(r.body_snippet(), "no");
}

#[tokio::test]
async fn oversized_and_malformed_responses_are_errors() {
    let big = "x".repeat(2000);
    let srv = TestServer::start(move |r| match r.path.as_str() {
        "/big-length" => ok("text/plain", &big),
        "/big-eof" => format!("HTTP/1.1 200 OK\r\n\r\n{big}").into_bytes(),
        "/big-chunked" => {
            let mut v = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..40 {
                v.extend_from_slice(b"40\r\n");
                v.extend_from_slice(&[b'y'; 64]);
                v.extend_from_slice(b"\r\n");
            }
            v
        }
        "/huge-head" => format!(
            "HTTP/1.1 200 OK\r\nX: {}\r\n\r\n",
            "h".repeat(MAX_HEAD_BYTES + 10)
        )
        .into_bytes(),
        "/garbage" => b"SSH-2.0-OpenSSH\r\n\r\n".to_vec(),
        "/bad-chunk" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        "/short" => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
        "/bad-length" => b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n".to_vec(),
        "/no-head-end" => b"HTTP/1.1 200 OK\r\n".to_vec(),
        _ => Vec::new(),
    })
    .await;
    for (path, want) in [
        ("/big-length", "larger than 1024"),
        ("/big-eof", "larger than 1024"),
        ("/big-chunked", "larger than 1024"),
        ("/huge-head", "larger than"),
        ("/garbage", "not an HTTP/1.x status line"),
        ("/bad-chunk", "invalid chunk size"),
        ("/short", "before the end of the body"),
        ("/bad-length", "invalid Content-Length"),
        ("/no-head-end", "before the end of the headers"),
        ("/empty", "before the end of the headers"),
    ] {
        let e = get(&srv.url(path), "*/*", limits())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{path}: {e}");
    }
}

#[tokio::test]
async fn connect_failure_and_timeout() {
    // A port that was just free: connection refused.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let u = HttpUrl::parse(&format!("http://{addr}/")).unwrap();
    let e = get(&u, "*/*", limits()).await.unwrap_err();
    assert!(matches!(e, HttpError::Connect { .. }), "{e}");

    // A server that accepts and never answers.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let u = HttpUrl::parse(&format!("http://{}/", l.local_addr().unwrap())).unwrap();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            conns.push(s);
        }
    });
    let short = Limits {
        timeout: Duration::from_millis(100),
        ..limits()
    };
    let e = get(&u, "*/*", short).await.unwrap_err();
    assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
    hold.abort();
}

/// A host that never completes the connection (here: a listener whose accept queue is full, so
/// the kernel drops further SYNs) is a connect failure after `connect_timeout`, not a timeout of
/// the whole exchange: callers with several endpoints move on to the next one.
#[tokio::test]
async fn a_connection_that_never_completes_is_a_connect_failure() {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(0).unwrap();
    let addr = l.local_addr().unwrap();
    // Fill the accept queue (never accepted) until a connection no longer completes.
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
        assert!(held.len() < 64, "the accept queue never filled");
    }
    let u = HttpUrl::parse(&format!("http://{addr}/")).unwrap();
    let quick = Limits {
        connect_timeout: Duration::from_millis(300),
        ..limits()
    };
    let started = std::time::Instant::now();
    let e = get(&u, "*/*", quick).await.unwrap_err();
    match &e {
        HttpError::Connect { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::TimedOut, "{e}")
        }
        other => panic!("expected a connect failure, got {other}"),
    }
    assert!(started.elapsed() < Duration::from_secs(4), "{e}");
    drop(l);
}

#[tokio::test]
async fn post_sends_json() {
    let got = Arc::new(Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let (g2, c2) = (got.clone(), calls.clone());
    let srv = TestServer::start(move |r| {
        c2.fetch_add(1, Ordering::SeqCst);
        assert_eq!(r.method, "POST");
        assert!(r.head.contains("Content-Type: application/json"));
        *g2.lock().unwrap() = r.body;
        status(202, "text/plain", "")
    })
    .await;
    let r = post_json(&srv.url("/hook"), br#"{"a":1}"#, limits())
        .await
        .unwrap();
    assert_eq!(r.status, 202);
    assert_eq!(&*got.lock().unwrap(), br#"{"a":1}"#);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn chunked_decoder_resumes_at_any_split() {
    let raw = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    for split in 0..raw.len() {
        let mut d = Chunked::default();
        let first = d.advance(&raw[..split], 100).unwrap();
        assert!(!first, "done early at {split}");
        assert!(d.advance(raw, 100).unwrap());
        assert_eq!(d.out, b"abcde");
    }
}

#[test]
fn requests_are_encoded_with_their_headers_and_body() {
    let u = HttpUrl::parse("http://127.0.0.1:9180/v1/volumes/a?force=true").unwrap();
    let req = encode_request(
        Method::Delete,
        &u,
        &[("Authorization", "Bearer t0k\ten")],
        None,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(req).unwrap(),
        "DELETE /v1/volumes/a?force=true HTTP/1.1\r\nHost: 127.0.0.1:9180\r\nAuthorization: Bearer t0k\ten\r\nConnection: close\r\n\r\n"
    );
    let req = encode_request(Method::Post, &u, &[], Some(b"")).unwrap();
    assert!(
        String::from_utf8(req)
            .unwrap()
            .ends_with("Content-Length: 0\r\nConnection: close\r\n\r\n")
    );
    // The old entry points send what they always sent.
    let req = encode_request(
        Method::Get,
        &u,
        &[("User-Agent", "stockade-events"), ("Accept", "*/*")],
        None,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(req).unwrap(),
        "GET /v1/volumes/a?force=true HTTP/1.1\r\nHost: 127.0.0.1:9180\r\nUser-Agent: stockade-events\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn header_injection_is_refused() {
    let u = HttpUrl::parse("http://h/").unwrap();
    for (name, value) in [
        ("Authorization", "Bearer x\r\nX-Evil: 1"),
        ("Authorization", "Bearer x\n"),
        ("Auth orization", "x"),
        ("X:Y", "x"),
        ("", "x"),
        ("X", "\0"),
    ] {
        let e = encode_request(Method::Get, &u, &[(name, value)], None).unwrap_err();
        assert!(
            matches!(e, HttpError::InvalidHeader { .. }),
            "{name:?}: {e}"
        );
    }
}

#[tokio::test]
async fn request_sends_method_headers_and_body() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let srv = TestServer::start(move |r| {
        let answer = match r.method.as_str() {
            "DELETE" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            _ => ok("application/json", "{}"),
        };
        s2.lock().unwrap().push(r);
        answer
    })
    .await;
    let auth = [("Authorization", "Bearer secret")];
    let r = request(
        Method::Delete,
        &srv.url("/v1/x?force=true"),
        &auth,
        None,
        limits(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = request(
        Method::Put,
        &srv.url("/v1/y"),
        &auth,
        Some(b"[1]"),
        limits(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"{}"[..]));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("DELETE", "/v1/x?force=true")
    );
    assert!(seen[0].head.contains("Authorization: Bearer secret\r\n"));
    assert_eq!(
        (seen[1].method.as_str(), seen[1].body.as_slice()),
        ("PUT", &b"[1]"[..])
    );
}
