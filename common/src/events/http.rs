//! A minimal HTTP/1.1 client over [`tokio::net::TcpStream`]: `GET` (for `/metrics` and the
//! Prometheus API), `POST` of JSON (for webhooks) and [`request`] with any [`Method`] and extra
//! headers (for the admin API: `DELETE`, `Authorization`). One request per connection
//! (`Connection: close`), `http://` only, a deadline over the whole exchange, and bounded
//! headers and body; the body may be framed by `Content-Length`, chunked, or the end of the
//! connection.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest accepted URL, in bytes.
pub const MAX_URL_BYTES: usize = 8192;
/// Largest accepted response head (status line and headers), in bytes.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;
/// Most response headers.
pub const MAX_HEADERS: usize = 100;

/// A URL the client cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// Not `http://` (https and other schemes are not supported).
    #[error("{url:?}: only http:// URLs are supported")]
    Scheme {
        /// The URL.
        url: String,
    },
    /// The host is missing or has characters a host cannot have.
    #[error("{url:?}: missing or invalid host")]
    Host {
        /// The URL.
        url: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error("{url:?}: invalid port")]
    Port {
        /// The URL.
        url: String,
    },
    /// User information (`user:pass@`) is not supported.
    #[error("{url:?}: user information in URLs is not supported")]
    UserInfo {
        /// The URL.
        url: String,
    },
    /// Spaces, control or non-ASCII characters (percent-encode them).
    #[error(
        "{url:?}: the path contains spaces, control or non-ASCII characters; percent-encode them"
    )]
    Characters {
        /// The URL.
        url: String,
    },
    /// Longer than [`MAX_URL_BYTES`].
    #[error("URL is {len} bytes long; the limit is {MAX_URL_BYTES}")]
    TooLong {
        /// Its length.
        len: usize,
    },
}

/// An `http://` URL: host, port and the path with its query.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct HttpUrl {
    host: String,
    port: u16,
    path: String,
}

impl HttpUrl {
    /// Parses `http://host[:port][/path][?query]` (the host may be a bracketed IPv6 address;
    /// a fragment is dropped).
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let url = url.trim();
        if url.len() > MAX_URL_BYTES {
            return Err(UrlError::TooLong { len: url.len() });
        }
        let err_url = || url.to_string();
        let rest = match url.get(..7) {
            Some(s) if s.eq_ignore_ascii_case("http://") => &url[7..],
            _ => return Err(UrlError::Scheme { url: err_url() }),
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        if authority.contains('@') {
            return Err(UrlError::UserInfo { url: err_url() });
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err(UrlError::Host { url: err_url() });
            };
            if h.is_empty()
                || !h
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
            {
                return Err(UrlError::Host { url: err_url() });
            }
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| UrlError::Port { url: err_url() })?,
                ),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let v6 = authority.starts_with('[');
        if host.is_empty()
            || !(v6
                || host
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-._".contains(&c)))
        {
            return Err(UrlError::Host { url: err_url() });
        }
        let port = match port {
            None => 80,
            Some(p) if !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) => {
                match p.parse::<u16>() {
                    Ok(p) if p > 0 => p,
                    _ => return Err(UrlError::Port { url: err_url() }),
                }
            }
            Some(_) => return Err(UrlError::Port { url: err_url() }),
        };
        if !path.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(UrlError::Characters { url: err_url() });
        }
        let path = if path.is_empty() {
            "/".to_string()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }

    /// The host (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path and query, starting with `/`.
    pub fn path_and_query(&self) -> &str {
        &self.path
    }

    /// `host:port` (IPv6 in brackets): the `Host` header and Prometheus' `instance` label.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A `/metrics` target as operators write it: a full `http://` URL, `host:port/path`, or
    /// `host:port` alone, which means `http://host:port/metrics`.
    ///
    /// ```
    /// use common::events::http::HttpUrl;
    /// assert_eq!(HttpUrl::metrics_target("127.0.0.1:9100").unwrap().to_string(), "http://127.0.0.1:9100/metrics");
    /// assert_eq!(HttpUrl::metrics_target("h:1/m").unwrap().to_string(), "http://h:1/m");
    /// assert!(HttpUrl::metrics_target("ftp://h/metrics").is_err());
    /// ```
    pub fn metrics_target(s: &str) -> Result<Self, UrlError> {
        let s = s.trim();
        if s.contains("://") {
            Self::parse(s)
        } else if s.contains('/') {
            Self::parse(&format!("http://{s}"))
        } else {
            Self::parse(&format!("http://{s}/metrics"))
        }
    }

    /// The same server with another path and query (which must start with `/`).
    pub fn with_path_and_query(&self, path: &str) -> Result<Self, UrlError> {
        Self::parse(&format!("http://{}{}", self.authority(), path))
    }
}

impl FromStr for HttpUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.path)
    }
}

impl fmt::Debug for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HttpUrl({self})")
    }
}

/// Percent-encodes `s` for a query string component (everything but unreserved characters).
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A failed exchange.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The connection could not be made.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error("talking to {addr}: {source}")]
    Io {
        /// `host:port`.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The exchange did not finish in time.
    #[error("{addr} did not answer within {after:?}")]
    Timeout {
        /// `host:port`.
        addr: String,
        /// The deadline.
        after: Duration,
    },
    /// The response head or body is over its bound.
    #[error("the response from {addr} is larger than {limit} bytes")]
    TooLarge {
        /// `host:port`.
        addr: String,
        /// The bound that was crossed.
        limit: usize,
    },
    /// A request header name that is not an HTTP token, or a value with control characters
    /// (it would break the request apart).
    #[error("request header {name:?} has an invalid name or value")]
    InvalidHeader {
        /// The header's name.
        name: String,
    },
    /// The response is not HTTP/1.x.
    #[error("malformed response from {addr}: {what}")]
    Malformed {
        /// `host:port`.
        addr: String,
        /// What was wrong.
        what: &'static str,
    },
}

/// Bounds of one exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deadline for connecting, sending and receiving everything.
    pub timeout: Duration,
    /// Deadline for the connection alone (within `timeout`): a host that does not answer the
    /// connection (down, or packets dropped) fails with [`HttpError::Connect`] soon, so a caller
    /// with several endpoints can try the next one while it still has time.
    pub connect_timeout: Duration,
    /// Largest accepted body (after removing chunked framing).
    pub max_body_bytes: usize,
}

/// The default [`Limits::connect_timeout`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            connect_timeout: CONNECT_TIMEOUT,
            max_body_bytes: 16 << 20,
        }
    }
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, unframed.
    pub body: Vec<u8>,
}

impl Response {
    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first header of that (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The start of the body as text, for error messages.
    pub fn body_snippet(&self) -> String {
        let end = self.body.len().min(200);
        String::from_utf8_lossy(&self.body[..end])
            .trim()
            .to_string()
    }
}

/// A request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`.
    Get,
    /// `POST`.
    Post,
    /// `PUT`.
    Put,
    /// `DELETE`.
    Delete,
}

impl Method {
    /// The method as it appears on the request line.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET url` with the given `Accept` header.
pub async fn get(url: &HttpUrl, accept: &str, limits: Limits) -> Result<Response, HttpError> {
    let headers = [("User-Agent", "stockade-events"), ("Accept", accept)];
    request(Method::Get, url, &headers, None, limits).await
}

/// `POST url` with a JSON body.
pub async fn post_json(url: &HttpUrl, body: &[u8], limits: Limits) -> Result<Response, HttpError> {
    let headers = [
        ("User-Agent", "stockade-events"),
        ("Content-Type", "application/json"),
    ];
    request(Method::Post, url, &headers, Some(body), limits).await
}

/// `method url` with `headers` (after `Host`, which the client sets) and an optional body
/// (sent with its `Content-Length`; `Some(&[])` sends `Content-Length: 0`). The client adds
/// `Connection: close`; do not pass `Host`, `Content-Length` or `Connection` yourself.
///
/// A header name must be an HTTP token and a value must not contain control characters
/// (other than tab): anything else is [`HttpError::InvalidHeader`], before connecting.
pub async fn request(
    method: Method,
    url: &HttpUrl,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    limits: Limits,
) -> Result<Response, HttpError> {
    let req = encode_request(method, url, headers, body)?;
    exchange(url, req, limits).await
}

/// The bytes of a request (see [`request`]).
fn encode_request(
    method: Method,
    url: &HttpUrl,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Vec<u8>, HttpError> {
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\n",
        url.path,
        url.authority()
    );
    for (name, value) in headers {
        if !valid_header(name, value) {
            return Err(HttpError::InvalidHeader {
                name: name.escape_debug().to_string(),
            });
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut req = head.into_bytes();
    req.extend_from_slice(body.unwrap_or_default());
    Ok(req)
}

/// A header name is a non-empty token (RFC 9110 `tchar`s); a value has no control characters
/// but tab.
fn valid_header(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
        && value.bytes().all(|c| c == b'\t' || !c.is_ascii_control())
}

async fn exchange(url: &HttpUrl, req: Vec<u8>, limits: Limits) -> Result<Response, HttpError> {
    match tokio::time::timeout(limits.timeout, exchange_inner(url, &req, limits)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout {
            addr: url.authority(),
            after: limits.timeout,
        }),
    }
}

async fn exchange_inner(url: &HttpUrl, req: &[u8], limits: Limits) -> Result<Response, HttpError> {
    let addr = url.authority();
    let connect = TcpStream::connect((url.host.as_str(), url.port));
    let mut stream = match tokio::time::timeout(limits.connect_timeout, connect).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {:?}", limits.connect_timeout),
        )),
    }
    .map_err(|source| HttpError::Connect {
        addr: addr.clone(),
        source,
    })?;
    let io = |source| HttpError::Io {
        addr: addr.clone(),
        source,
    };
    stream.write_all(req).await.map_err(io)?;
    let mut conn = Conn {
        stream,
        buf: Vec::with_capacity(8192),
        eof: false,
    };
    let head_end = loop {
        if let Some(p) = find(&conn.buf, b"\r\n\r\n") {
            break p + 4;
        }
        if conn.buf.len() > MAX_HEAD_BYTES {
            return Err(HttpError::TooLarge {
                addr,
                limit: MAX_HEAD_BYTES,
            });
        }
        if conn.fill(MAX_HEAD_BYTES + 4).await.map_err(io)? == 0 {
            return Err(malformed(
                &addr,
                "connection closed before the end of the headers",
            ));
        }
    };
    let (status, headers) =
        parse_head(&conn.buf[..head_end - 4]).map_err(|w| malformed(&addr, w))?;
    conn.buf.drain(..head_end);
    let too_large = |limit| HttpError::TooLarge {
        addr: addr.clone(),
        limit,
    };
    let max = limits.max_body_bytes;
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        Vec::new()
    } else if header("transfer-encoding").is_some_and(|v| {
        v.rsplit(',')
            .next()
            .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
    }) {
        let mut dec = Chunked::default();
        let raw_limit = max.saturating_add(max / 2).saturating_add(64 * 1024);
        loop {
            match dec.advance(&conn.buf, max) {
                Ok(true) => break dec.out,
                Ok(false) => {}
                Err(ChunkError::TooLarge) => return Err(too_large(max)),
                Err(ChunkError::Malformed(w)) => return Err(malformed(&addr, w)),
            }
            if conn.buf.len() >= raw_limit {
                return Err(too_large(max));
            }
            if conn.fill(raw_limit).await.map_err(io)? == 0 {
                return Err(malformed(&addr, "connection closed inside a chunked body"));
            }
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len
            .trim()
            .parse()
            .map_err(|_| malformed(&addr, "invalid Content-Length"))?;
        if len > max {
            return Err(too_large(max));
        }
        while conn.buf.len() < len {
            if conn.fill(len).await.map_err(io)? == 0 {
                return Err(malformed(
                    &addr,
                    "connection closed before the end of the body",
                ));
            }
        }
        conn.buf.truncate(len);
        conn.buf
    } else {
        // Delimited by the end of the connection.
        while !conn.eof {
            if conn.buf.len() > max {
                return Err(too_large(max));
            }
            conn.fill(max + 1).await.map_err(io)?;
        }
        if conn.buf.len() > max {
            return Err(too_large(max));
        }
        conn.buf
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn malformed(addr: &str, what: &'static str) -> HttpError {
    HttpError::Malformed {
        addr: addr.to_string(),
        what,
    }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Conn {
    /// Reads more into the buffer, never past `limit` bytes in total; returns bytes read (0 at
    /// the end of the connection or at the limit).
    async fn fill(&mut self, limit: usize) -> std::io::Result<usize> {
        let room = limit.saturating_sub(self.buf.len()).min(64 * 1024);
        if room == 0 || self.eof {
            return Ok(0);
        }
        // Read straight into the buffer (a stack buffer would bloat every future above).
        let start = self.buf.len();
        self.buf.resize(start + room, 0);
        let res = self.stream.read(&mut self.buf[start..]).await;
        let n = *res.as_ref().unwrap_or(&0);
        self.buf.truncate(start + n);
        let n = res?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

type Head = (u16, Vec<(String, String)>);

fn parse_head(head: &[u8]) -> Result<Head, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "headers are not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err("not an HTTP/1.x status line");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or("invalid status code")?;
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err("too many headers");
        }
        let (name, value) = line.split_once(':').ok_or("header line without a colon")?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok((status, headers))
}

#[derive(Debug)]
enum ChunkError {
    TooLarge,
    Malformed(&'static str),
}

#[derive(Debug, Default)]
enum ChunkState {
    #[default]
    Size,
    Data(usize),
    DataEnd,
    Trailers,
}

/// An incremental decoder of a chunked body, resumed as more bytes arrive.
#[derive(Debug, Default)]
struct Chunked {
    pos: usize,
    state: ChunkState,
    out: Vec<u8>,
}

impl Chunked {
    /// Consumes what it can of `raw` (the whole body so far); `Ok(true)` once the last chunk and
    /// the trailers are read.
    fn advance(&mut self, raw: &[u8], max: usize) -> Result<bool, ChunkError> {
        loop {
            let rest = raw.get(self.pos..).unwrap_or_default();
            match self.state {
                ChunkState::Size | ChunkState::Trailers => {
                    let Some(eol) = find(rest, b"\r\n") else {
                        if rest.len() > 4096 {
                            return Err(ChunkError::Malformed("chunk header line too long"));
                        }
                        return Ok(false);
                    };
                    let line = &rest[..eol];
                    self.pos += eol + 2;
                    if matches!(self.state, ChunkState::Trailers) {
                        if line.is_empty() {
                            return Ok(true);
                        }
                        continue;
                    }
                    let size = std::str::from_utf8(line)
                        .ok()
                        .and_then(|l| l.split(';').next())
                        .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                        .ok_or(ChunkError::Malformed("invalid chunk size"))?;
                    if size == 0 {
                        self.state = ChunkState::Trailers;
                    } else if self.out.len().saturating_add(size) > max {
                        return Err(ChunkError::TooLarge);
                    } else {
                        self.state = ChunkState::Data(size);
                    }
                }
                ChunkState::Data(left) => {
                    let n = left.min(rest.len());
                    self.out.extend_from_slice(&rest[..n]);
                    self.pos += n;
                    if n < left {
                        self.state = ChunkState::Data(left - n);
                        return Ok(false);
                    }
                    self.state = ChunkState::DataEnd;
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(false);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(ChunkError::Malformed("chunk data not followed by CRLF"));
                    }
                    self.pos += 2;
                    self.state = ChunkState::Size;
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
