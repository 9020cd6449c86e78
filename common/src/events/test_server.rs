//! A tiny HTTP/1.1 server for tests: answers each connection with whatever the handler returns
//! (raw response bytes), then closes it.

use super::http::HttpUrl;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A request as the handler sees it.
#[derive(Debug, Clone)]
pub(crate) struct Req {
    pub method: String,
    pub path: String,
    pub head: String,
    pub body: Vec<u8>,
}

/// The server; stops when dropped.
#[derive(Debug)]
pub(crate) struct TestServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

type Handler = dyn Fn(Req) -> Vec<u8> + Send + Sync;

impl TestServer {
    pub async fn start(f: impl Fn(Req) -> Vec<u8> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let f: Arc<Handler> = Arc::new(f);
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let f = f.clone();
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
                        head,
                    };
                    let resp = f(req);
                    let _ = s.write_all(&resp).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self { addr, task }
    }

    pub fn url(&self, path: &str) -> HttpUrl {
        HttpUrl::parse(&format!("http://{}{path}", self.addr)).expect("url")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A complete `200 OK` response with a Content-Length.
pub(crate) fn ok(content_type: &str, body: &str) -> Vec<u8> {
    status(200, content_type, body)
}

/// A complete response with the given status.
pub(crate) fn status(code: u16, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
