use super::*;
use common::admin::Attachment;
use common::throttle::QosConfig;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A request as the fake server saw it.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    head: String,
    body: Vec<u8>,
}

type Handler = dyn Fn(&Req) -> Vec<u8> + Send + Sync;

/// A raw HTTP server: one request per connection, answered with the handler's bytes.
struct Raw {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Req>>>,
    task: JoinHandle<()>,
}

impl Raw {
    async fn start(f: impl Fn(&Req) -> Vec<u8> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let f: Arc<Handler> = Arc::new(f);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (f, seen) = (f.clone(), seen2.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    let mut words = head.split_whitespace();
                    let req = Req {
                        method: words.next().unwrap_or_default().to_string(),
                        path: words.next().unwrap_or_default().to_string(),
                        body: buf[head_end..head_end + len].to_vec(),
                        head: head.clone(),
                    };
                    let answer = f(&req);
                    seen.lock().unwrap().push(req);
                    let _ = s.write_all(&answer).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self { addr, seen, task }
    }

    fn url(&self) -> HttpUrl {
        HttpUrl::parse(&format!("http://{}", self.addr)).unwrap()
    }

    fn seen(&self) -> Vec<Req> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn api_error(status: u16, code: &str, message: &str) -> Vec<u8> {
    answer(
        status,
        &serde_json::to_string(&ErrorBody::new(code, message)).unwrap(),
    )
}

/// A URL nothing listens on (connection refused).
fn dead_url() -> HttpUrl {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    HttpUrl::parse(&format!("http://{addr}")).unwrap()
}

fn volume(name: &str) -> VolumeInfo {
    VolumeInfo {
        name: name.to_string(),
        id: "00000000000000a1".to_string(),
        size: 1 << 30,
        state: "ready".to_string(),
        qos: QosConfig::UNLIMITED,
        chunk_size: 64 << 20,
        replicas: 3,
        chunks: 16,
        group: "00000000000000b2".to_string(),
        members: vec![1, 2, 3],
        target_members: vec![1, 2, 3],
        leader: Some(1),
        attachments: vec![],
        uri: None,
        endpoints: vec!["127.0.0.1:10809".parse().unwrap()],
        created: 1_700_000_000,
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        first_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        max_total: Duration::from_millis(20),
        max_elapsed: Duration::from_secs(30),
    }
}

fn client(urls: Vec<HttpUrl>) -> AdminClient {
    AdminClient::new(urls, Some(AdminToken::new(" s3cret\n").unwrap()))
        .unwrap()
        .with_retry(fast_retry())
}

#[tokio::test]
async fn requests_carry_the_token_and_answers_are_decoded() {
    let list = serde_json::to_string(&vec![volume("a"), volume("b")]).unwrap();
    let srv = Raw::start(move |r| match (r.method.as_str(), r.path.as_str()) {
        ("GET", "/v1/volumes") => answer(200, &list),
        ("POST", "/v1/volumes/a%2Fb/resize") => {
            answer(200, &serde_json::to_string(&volume("a/b")).unwrap())
        }
        ("DELETE", "/v1/volumes/a?force=true") => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        _ => api_error(404, "not_found", "no such route"),
    })
    .await;
    let c = client(vec![srv.url()]);
    let vols = c.list_volumes().await.unwrap();
    assert_eq!(vols, vec![volume("a"), volume("b")]);
    // A name cannot change the path.
    assert_eq!(c.resize("a/b", 2 << 30).await.unwrap().name, "a/b");
    c.delete("a", true).await.unwrap();

    let seen = srv.seen();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert!(
            r.head.contains("\r\nAuthorization: Bearer s3cret\r\n"),
            "{}",
            r.head
        );
    }
    assert!(!seen[0].head.contains("Content-Type"), "GET without a body");
    assert!(seen[1].head.contains("Content-Type: application/json\r\n"));
    let resize: ResizeVolume = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(resize.size, 2 << 30);
}

#[tokio::test]
async fn bodies_are_the_documented_documents() {
    let attached = Attached {
        uri: "nbd://127.0.0.1:10809/v".to_string(),
        attachment: Attachment {
            id: 7,
            shared: true,
            client: Some("host-a".to_string()),
            since: 1,
        },
        endpoints: vec![],
    };
    let att = serde_json::to_string(&attached).unwrap();
    let vol = serde_json::to_string(&volume("v")).unwrap();
    let srv = Raw::start(move |r| match r.path.as_str() {
        "/v1/volumes/v/attach" => answer(200, &att),
        _ => answer(200, &vol),
    })
    .await;
    let c = client(vec![srv.url()]);
    let req = AttachVolume {
        shared: true,
        client: Some("host-a".to_string()),
    };
    assert_eq!(c.attach("v", &req).await.unwrap(), attached);
    let qos = SetQos {
        iops: Some(None),
        burst_credits: Some(10),
        ..SetQos::default()
    };
    c.set_qos("v", &qos).await.unwrap();
    c.detach("v", &DetachVolume::default()).await.unwrap();
    let seen = srv.seen();
    assert_eq!(
        serde_json::from_slice::<AttachVolume>(&seen[0].body).unwrap(),
        req
    );
    assert_eq!(seen[1].path, "/v1/volumes/v/qos");
    assert_eq!(seen[1].body, br#"{"iops":null,"burst_credits":10}"#);
    assert_eq!(seen[2].path, "/v1/volumes/v/detach");
}

#[tokio::test]
async fn error_answers_are_typed() {
    let srv = Raw::start(|r| match r.path.as_str() {
        "/v1/volumes/locked" => answer(401, ""),
        "/v1/volumes/taken" => api_error(409, "conflict", "volume \"taken\" exists"),
        "/v1/volumes/proxy" => answer(502, "<html>bad gateway</html>"),
        "/v1/volumes/garbage" => answer(200, "{\"name\": 1"),
        "/v1/volumes/wrong" => answer(200, "[]"),
        _ => api_error(404, "not_found", "no such volume"),
    })
    .await;
    let c = client(vec![srv.url()]);
    let e = c.volume("locked").await.unwrap_err();
    assert!(matches!(e, AdminError::Unauthorized { .. }), "{e}");
    assert_eq!((e.status(), e.code()), (Some(401), Some("unauthorized")));
    let e = c.volume("taken").await.unwrap_err();
    match &e {
        AdminError::Api {
            status,
            code,
            message,
        } => {
            assert_eq!((*status, code.as_str()), (409, "conflict"));
            assert_eq!(message, "volume \"taken\" exists");
        }
        other => panic!("{other}"),
    }
    let e = c.volume("proxy").await.unwrap_err();
    assert!(matches!(e, AdminError::Status { status: 502, .. }), "{e}");
    assert!(e.to_string().contains("bad gateway"), "{e}");
    for name in ["garbage", "wrong"] {
        let e = c.volume(name).await.unwrap_err();
        assert!(matches!(e, AdminError::Decode { status: 200, .. }), "{e}");
    }
    let e = c.delete("nope", false).await.unwrap_err();
    assert_eq!(e.code(), Some("not_found"));
}

/// A `503` other than `no_leader` may come after part of a change was made: only requests
/// that are safe to repeat are sent again; `no_leader` says nothing was done, so any is.
#[tokio::test]
async fn only_what_is_safe_to_repeat_is_retried_after_a_503() {
    let calls = Arc::new(AtomicUsize::new(0));
    let code = Arc::new(Mutex::new("unavailable"));
    let (c2, code2) = (calls.clone(), code.clone());
    let srv = Raw::start(move |_| {
        c2.fetch_add(1, Ordering::SeqCst);
        api_error(503, *code2.lock().unwrap(), "busy")
    })
    .await;
    let c = client(vec![srv.url()]);
    let retried = fast_retry().delays().count();
    let create = |id: Option<&str>| CreateVolume {
        name: "v".into(),
        size: 4096,
        qos: None,
        qos_changes: None,
        id: id.map(str::to_string),
    };
    let id = Some("0123456789abcdef0123456789abcdef");
    let cases: Vec<(&str, bool)> = vec![
        ("resize", false),
        ("delete", false),
        ("create without an id", false),
        ("create with an id", true),
        ("list", true),
    ];
    for (code_now, any) in [("unavailable", false), ("no_leader", true)] {
        *code.lock().unwrap() = code_now;
        for (what, safe) in &cases {
            calls.store(0, Ordering::SeqCst);
            let e = match *what {
                "resize" => c.resize("v", 8192).await.unwrap_err(),
                "delete" => c.delete("v", false).await.unwrap_err(),
                "create without an id" => c.create_volume(&create(None)).await.unwrap_err(),
                "create with an id" => c.create_volume(&create(id)).await.unwrap_err(),
                _ => c.list_volumes().await.unwrap_err(),
            };
            assert_eq!((e.status(), e.code()), (Some(503), Some(code_now)));
            let want = if *safe || any { 1 + retried } else { 1 };
            assert_eq!(
                calls.load(Ordering::SeqCst),
                want,
                "{what} after {code_now}"
            );
        }
    }
}

#[tokio::test]
async fn unavailable_is_retried_with_a_bound() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let vol = serde_json::to_string(&volume("v")).unwrap();
    let srv = Raw::start(move |r| {
        let n = c2.fetch_add(1, Ordering::SeqCst);
        if r.path == "/v1/volumes/v" && n >= 2 {
            answer(200, &vol)
        } else {
            api_error(503, "unavailable", "no metadata leader")
        }
    })
    .await;
    let c = client(vec![srv.url()]);
    assert_eq!(c.volume("v").await.unwrap().name, "v");
    assert_eq!(calls.load(Ordering::SeqCst), 3);

    // Always unavailable: one try plus one per delay of the policy, then the 503 itself.
    calls.store(100, Ordering::SeqCst);
    let e = c.list_volumes().await.unwrap_err();
    assert_eq!((e.status(), e.code()), (Some(503), Some("unavailable")));
    let tries = calls.load(Ordering::SeqCst) - 100;
    assert_eq!(tries, 1 + fast_retry().delays().count());
    assert!(tries > 2, "{tries}");

    // Without retries: one request.
    let c = client(vec![srv.url()]).with_retry(RetryPolicy::NONE);
    calls.store(100, Ordering::SeqCst);
    c.list_volumes().await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 101);
}

#[test]
fn retry_delays_double_and_stay_within_the_total() {
    let d: Vec<_> = RetryPolicy::default().delays().collect();
    assert_eq!(d[0], Duration::from_millis(100));
    assert_eq!(d[1], Duration::from_millis(200));
    assert!(d.iter().all(|d| *d <= Duration::from_secs(2)));
    let total: Duration = d.iter().sum();
    assert!(total <= Duration::from_secs(10), "{total:?}");
    assert!(total >= Duration::from_secs(8), "{total:?}");
    assert_eq!(RetryPolicy::NONE.delays().count(), 0);
}

#[tokio::test]
async fn a_refused_connection_moves_to_the_next_endpoint() {
    let vol = serde_json::to_string(&volume("v")).unwrap();
    let srv = Raw::start(move |_| answer(200, &vol)).await;
    let c = client(vec![dead_url(), srv.url()]);
    c.volume("v").await.unwrap();
    assert_eq!(
        c.first.load(Ordering::Relaxed),
        1,
        "the live one is tried first next time"
    );
    c.volume("v").await.unwrap();
    assert_eq!(srv.seen().len(), 2);

    let dead = vec![dead_url(), dead_url()];
    let names: Vec<String> = dead.iter().map(endpoint_name).collect();
    let e = client(dead).volume("v").await.unwrap_err();
    match &e {
        AdminError::Unreachable { endpoints, source } => {
            assert_eq!(endpoints, &names);
            assert!(matches!(source, HttpError::Connect { .. }));
        }
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains(&names.join(", ")), "{e}");
}

#[tokio::test]
async fn endpoints_may_have_a_path_prefix() {
    let srv = Raw::start(|_| answer(200, "[]")).await;
    let urls = AdminClient::parse_endpoints(&[format!("{}/admin/", srv.addr)]).unwrap();
    assert_eq!(urls[0].to_string(), format!("http://{}/admin/", srv.addr));
    client(urls).nodes().await.unwrap();
    assert_eq!(srv.seen()[0].path, "/admin/v1/nodes");

    let q = HttpUrl::parse("http://127.0.0.1:1/?x=1").unwrap();
    assert!(matches!(
        AdminClient::new(vec![q], None),
        Err(AdminError::EndpointQuery { .. })
    ));
    assert!(matches!(
        AdminClient::new(vec![], None),
        Err(AdminError::NoEndpoint)
    ));
    assert!(AdminClient::parse_endpoints(&["https://h"]).is_err());
}

#[test]
fn tokens() {
    let t = AdminToken::new("  abc\n").unwrap();
    assert_eq!(t.header(), "Bearer abc");
    assert!(!format!("{t:?}").contains("abc"));
    for bad in ["", " \n", "a b", "a\r\nX: y"] {
        assert!(
            matches!(
                AdminToken::new(bad),
                Err(AdminError::TokenInvalid { path: None })
            ),
            "{bad:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("admin.token");
    let e = AdminToken::read(&p).unwrap_err();
    assert!(matches!(e, AdminError::TokenFile { .. }), "{e}");
    assert!(e.to_string().contains("admin.token"), "{e}");
    std::fs::write(&p, "tok\n").unwrap();
    assert_eq!(
        AdminToken::read(&p).unwrap(),
        AdminToken::new("tok").unwrap()
    );
    std::fs::write(&p, "\n").unwrap();
    let e = AdminToken::read(&p).unwrap_err();
    assert!(e.to_string().contains("admin.token is empty"), "{e}");
}
