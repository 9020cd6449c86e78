//! A typed client of the head nodes' admin API (`docs/admin-api.md`): one method per endpoint,
//! answering the documents of [`common::admin`].
//!
//! The client knows several endpoints (one per head node; any of them answers any request) and
//! tries them in order, moving to the next only when a connection cannot be made (the request
//! was never sent, so even a `POST` is safe to send elsewhere). The endpoint that answered is
//! tried first next time. A `503` that says nothing was done (`no_leader`: no metadata leader,
//! during an election) is retried with a short backoff, bounded by [`RetryPolicy`]; any other
//! `503` only for requests that are safe to repeat (reads, and creates that carry their volume
//! id), since the cluster may have carried out part of the first one.
//!
//! ```no_run
//! # async fn f() -> Result<(), tools::admin_client::AdminError> {
//! use tools::admin_client::{AdminClient, AdminToken};
//! let token = AdminToken::read("stockade-data/admin.token".as_ref())?;
//! let client = AdminClient::new(vec!["http://127.0.0.1:9180".parse()?], Some(token))?;
//! for v in client.list_volumes().await? {
//!     println!("{} {}", v.name, v.size);
//! }
//! # Ok(()) }
//! ```

use common::admin::{
    AddSled, AttachVolume, Attached, ClusterStatus, CreateVolume, Created, DetachVolume, ErrorBody,
    NodeInfo, ResizeVolume, SetQos, SledInfo, VolumeInfo,
};
use common::events::http::{self, HttpError, HttpUrl, Limits, Method, UrlError, encode_component};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Deadline of one exchange: a create answers once the volume serves, which can take a while.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Exchange timeout of a delete (at least): the server may wait for exports to drain (30 s)
/// and for the volume's trim to reach the sleds (up to 2 × 60 s) before it answers.
pub const DELETE_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest accepted answer.
pub const MAX_ANSWER_BYTES: usize = 16 << 20;

/// What went wrong talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No endpoint to talk to.
    #[error("no admin endpoint to talk to")]
    NoEndpoint,
    /// An endpoint is not an `http://` URL the client can use.
    #[error("invalid admin endpoint: {0}")]
    Url(#[from] UrlError),
    /// An endpoint URL with a query or fragment (only scheme, host, port and a path prefix).
    #[error(
        "invalid admin endpoint {url:?}: use http://HOST:PORT (an optional path prefix, no query)"
    )]
    EndpointQuery {
        /// The URL.
        url: String,
    },
    /// The token file could not be read.
    #[error("reading the admin token file {}: {source}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The token is empty or has characters an HTTP header cannot carry.
    #[error("the admin token{} is empty or contains spaces or control characters", from_path(.path))]
    TokenInvalid {
        /// Where it came from.
        path: Option<PathBuf>,
    },
    /// No endpoint accepted a connection.
    #[error("cannot reach the admin API at {}: {source}", .endpoints.join(", "))]
    Unreachable {
        /// The endpoints tried.
        endpoints: Vec<String>,
        /// The last connection error.
        source: HttpError,
    },
    /// The exchange failed after connecting (timeout, reset, malformed HTTP).
    #[error("talking to the admin API at {url}: {source}")]
    Http {
        /// The endpoint.
        url: String,
        /// The cause.
        source: HttpError,
    },
    /// `401`: the token is missing or wrong.
    #[error("the admin API at {url} refused the token (HTTP 401)")]
    Unauthorized {
        /// The endpoint.
        url: String,
    },
    /// An error answer with the API's error document.
    #[error("{message} (HTTP {status} {code})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The error code (`conflict`, `not_found`…).
        code: String,
        /// The server's message.
        message: String,
    },
    /// An error status without an error document (a proxy, another service on that port).
    #[error("the admin API at {url} answered HTTP {status} without an error document: {snippet:?}")]
    Status {
        /// The endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        snippet: String,
    },
    /// A success answer that is not the expected document.
    #[error("unexpected answer from the admin API at {url} (HTTP {status}): {source}")]
    Decode {
        /// The endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The cause.
        source: serde_json::Error,
    },
    /// A request document could not be encoded.
    #[error("encoding the request: {0}")]
    Encode(#[source] serde_json::Error),
}

fn from_path(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map(|p| format!(" in {}", p.display()))
        .unwrap_or_default()
}

impl AdminError {
    /// The HTTP status of an error answer (401 included).
    pub fn status(&self) -> Option<u16> {
        match self {
            AdminError::Unauthorized { .. } => Some(401),
            AdminError::Api { status, .. } | AdminError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's error code (`conflict`, `not_found`, …) of an error answer.
    pub fn code(&self) -> Option<&str> {
        match self {
            AdminError::Api { code, .. } => Some(code),
            AdminError::Unauthorized { .. } => Some("unauthorized"),
            _ => None,
        }
    }
}

/// The admin token (sent as `Authorization: Bearer`); its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token; leading and trailing whitespace is ignored, as the server does.
    pub fn new(token: &str) -> Result<Self, AdminError> {
        Self::checked(token, None)
    }

    /// Reads a token file.
    pub fn read(path: &Path) -> Result<Self, AdminError> {
        let text = std::fs::read_to_string(path).map_err(|source| AdminError::TokenFile {
            path: path.to_path_buf(),
            source,
        })?;
        Self::checked(&text, Some(path))
    }

    fn checked(token: &str, path: Option<&Path>) -> Result<Self, AdminError> {
        let t = token.trim();
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(AdminError::TokenInvalid {
                path: path.map(Path::to_path_buf),
            });
        }
        Ok(Self(t.to_string()))
    }

    fn header(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

/// How a `503 unavailable` is retried: after `first_backoff`, doubling up to `max_backoff`,
/// while the sum of the waits stays within `max_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First wait.
    pub first_backoff: Duration,
    /// Longest wait.
    pub max_backoff: Duration,
    /// Bound on the sum of the waits.
    pub max_total: Duration,
    /// No retry starts once this long has passed since the first try (the tries themselves
    /// take time: the server waits up to 5 s for a leader before it answers `no_leader`).
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    /// 100 ms doubling to 2 s, at most 10 s in all (an election takes about a second).
    fn default() -> Self {
        Self {
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            max_total: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub const NONE: RetryPolicy = RetryPolicy {
        first_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
        max_total: Duration::ZERO,
        max_elapsed: Duration::ZERO,
    };

    /// The waits before each retry, in order.
    pub fn delays(&self) -> impl Iterator<Item = Duration> + use<> {
        let (max, total) = (self.max_backoff, self.max_total);
        let mut next = self.first_backoff.min(max);
        let mut spent = Duration::ZERO;
        std::iter::from_fn(move || {
            if next.is_zero() {
                return None;
            }
            let d = next;
            spent = spent.checked_add(d)?;
            if spent > total {
                return None;
            }
            next = next.saturating_mul(2).min(max);
            Some(d)
        })
    }
}

/// A client of the admin API.
#[derive(Debug)]
pub struct AdminClient {
    endpoints: Vec<HttpUrl>,
    token: Option<AdminToken>,
    limits: Limits,
    retry: RetryPolicy,
    /// The endpoint tried first (the last that answered).
    first: AtomicUsize,
}

impl AdminClient {
    /// A client of these endpoints (`http://HOST:PORT`, optionally with a path prefix), tried
    /// in order; requests carry `token` when there is one.
    pub fn new(endpoints: Vec<HttpUrl>, token: Option<AdminToken>) -> Result<Self, AdminError> {
        if endpoints.is_empty() {
            return Err(AdminError::NoEndpoint);
        }
        if let Some(u) = endpoints.iter().find(|u| u.path_and_query().contains('?')) {
            return Err(AdminError::EndpointQuery { url: u.to_string() });
        }
        Ok(Self {
            endpoints,
            token,
            limits: Limits {
                timeout: DEFAULT_TIMEOUT,
                connect_timeout: http::CONNECT_TIMEOUT,
                max_body_bytes: MAX_ANSWER_BYTES,
            },
            retry: RetryPolicy::default(),
            first: AtomicUsize::new(0),
        })
    }

    /// Parses endpoint URLs; `HOST:PORT` without a scheme means `http://HOST:PORT`.
    pub fn parse_endpoints<S: AsRef<str>>(urls: &[S]) -> Result<Vec<HttpUrl>, AdminError> {
        urls.iter()
            .map(|u| {
                let u = u.as_ref().trim();
                let u = if u.contains("://") {
                    u.to_string()
                } else {
                    format!("http://{u}")
                };
                Ok(HttpUrl::parse(&u)?)
            })
            .collect()
    }

    /// With other bounds per exchange.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// With another retry policy for `503`.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> &[HttpUrl] {
        &self.endpoints
    }

    /// `GET /v1/cluster`.
    pub async fn cluster(&self) -> Result<ClusterStatus, AdminError> {
        self.call(Method::Get, "/cluster", None).await
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, AdminError> {
        self.call(Method::Get, "/nodes", None).await
    }

    /// `GET /v1/sleds`.
    pub async fn sleds(&self) -> Result<Vec<SledInfo>, AdminError> {
        self.call(Method::Get, "/sleds", None).await
    }

    /// `POST /v1/sleds`: adds a running sled to the cluster; the sled as it is then. A sled
    /// already in the cluster at that address is answered as added. A `503` (the sled did not
    /// answer) is not retried: the operator sees at once that the address is wrong or the sled
    /// not running.
    pub async fn add_sled(&self, req: &AddSled) -> Result<SledInfo, AdminError> {
        self.call_with(
            Method::Post,
            "/sleds",
            Some(json(req)?),
            Repeat::IfNothingDone,
        )
        .await
    }

    /// `POST /v1/sleds/{id}/drain` (`drain`) or `/undrain`: the sled as it is then. Setting a
    /// state it has already is harmless, so the request is repeated after a lost answer.
    pub async fn drain_sled(&self, id: &str, drain: bool) -> Result<SledInfo, AdminError> {
        let path = format!(
            "/sleds/{}/{}",
            encode_component(id),
            if drain { "drain" } else { "undrain" }
        );
        self.call_with(Method::Post, &path, None, Repeat::Safe)
            .await
    }

    /// `DELETE /v1/sleds/{id}`: forgets a drained sled that is down. Not repeated after a
    /// lost answer: the second try would find no such sled.
    pub async fn remove_sled(&self, id: &str) -> Result<(), AdminError> {
        let path = format!("/sleds/{}", encode_component(id));
        let (url, resp) = self
            .send(
                Method::Delete,
                &path,
                None,
                self.limits,
                Repeat::IfNothingDone,
            )
            .await?;
        if resp.is_success() {
            Ok(())
        } else {
            Err(error_answer(&url, &resp))
        }
    }

    /// `GET /v1/volumes`: every volume, sorted by name.
    pub async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, AdminError> {
        self.call(Method::Get, "/volumes", None).await
    }

    /// `POST /v1/volumes`: answers once the volume serves.
    pub async fn create_volume(&self, req: &CreateVolume) -> Result<Created, AdminError> {
        // With an id, a create sent twice is answered as done the second time.
        let repeat = if req.id.is_some() {
            Repeat::Safe
        } else {
            Repeat::IfNothingDone
        };
        self.call_with(Method::Post, "/volumes", Some(json(req)?), repeat)
            .await
    }

    /// `GET /v1/volumes/{name}`.
    pub async fn volume(&self, name: &str) -> Result<VolumeInfo, AdminError> {
        self.call(Method::Get, &volume_path(name, ""), None).await
    }

    /// `POST /v1/volumes/{name}/resize` to `size` bytes (volumes only grow).
    pub async fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, AdminError> {
        let body = json(&ResizeVolume { size })?;
        self.call(Method::Post, &volume_path(name, "/resize"), Some(body))
            .await
    }

    /// `DELETE /v1/volumes/{name}`; `force` deletes an attached volume too.
    /// Answers what is left to do when the cluster finishes the delete by itself (`202`).
    pub async fn delete(&self, name: &str, force: bool) -> Result<Option<String>, AdminError> {
        let mut path = volume_path(name, "");
        if force {
            path.push_str("?force=true");
        }
        // A delete waits for the volume's exports to drain and its trim to reach the sleds
        // (minutes in the worst case): a shorter wait would report a failure while it goes on.
        let limits = Limits {
            timeout: self.limits.timeout.max(DELETE_TIMEOUT),
            ..self.limits
        };
        let (url, resp) = self
            .send(Method::Delete, &path, None, limits, Repeat::IfNothingDone)
            .await?;
        match resp.status {
            202 => Ok(Some(
                serde_json::from_slice::<common::admin::DeletePending>(&resp.body)
                    .map(|p| p.pending)
                    .unwrap_or_else(|_| format!("volume {name:?} is being deleted")),
            )),
            200..=299 => Ok(None),
            _ => Err(error_answer(&url, &resp)),
        }
    }

    /// `POST /v1/volumes/{name}/attach`.
    pub async fn attach(&self, name: &str, req: &AttachVolume) -> Result<Attached, AdminError> {
        let body = json(req)?;
        self.call(Method::Post, &volume_path(name, "/attach"), Some(body))
            .await
    }

    /// `POST /v1/volumes/{name}/detach`: answers once the export is closed.
    pub async fn detach(&self, name: &str, req: &DetachVolume) -> Result<VolumeInfo, AdminError> {
        let body = json(req)?;
        self.call(Method::Post, &volume_path(name, "/detach"), Some(body))
            .await
    }

    /// `POST /v1/volumes/{name}/qos`: changes the limits `req` names.
    pub async fn set_qos(&self, name: &str, req: &SetQos) -> Result<VolumeInfo, AdminError> {
        let body = json(req)?;
        self.call(Method::Post, &volume_path(name, "/qos"), Some(body))
            .await
    }

    /// Sends and decodes a 2xx answer as `T`; a `GET` is always safe to repeat, anything else
    /// only when nothing was done.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, AdminError> {
        let repeat = if method == Method::Get {
            Repeat::Safe
        } else {
            Repeat::IfNothingDone
        };
        self.call_with(method, path, body, repeat).await
    }

    async fn call_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        repeat: Repeat,
    ) -> Result<T, AdminError> {
        let (url, resp) = self
            .send(method, path, body.as_deref(), self.limits, repeat)
            .await?;
        if !resp.is_success() {
            return Err(error_answer(&url, &resp));
        }
        serde_json::from_slice(&resp.body).map_err(|source| AdminError::Decode {
            url,
            status: resp.status,
            source,
        })
    }

    /// Sends `method /v1{path}`, retrying a `503` that `repeat` allows; answers the endpoint
    /// that answered and its answer. The retries stop when the policy's waits are spent or
    /// once its `max_elapsed` has passed since the first try, however long each try took.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        limits: Limits,
        repeat: Repeat,
    ) -> Result<(String, http::Response), AdminError> {
        let mut delays = self.retry.delays();
        let started = tokio::time::Instant::now();
        loop {
            let (url, resp) = self.send_once(method, path, body, limits).await?;
            if resp.status == 503
                && repeat.allows(&resp)
                && started.elapsed() < self.retry.max_elapsed
                && let Some(d) = delays.next()
            {
                let delay_ms = d.as_millis() as u64;
                tracing::debug!(url = %url, delay_ms, "admin API unavailable; retrying");
                tokio::time::sleep(d).await;
                continue;
            }
            return Ok((url, resp));
        }
    }

    /// One request, to the first endpoint that accepts a connection.
    async fn send_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&[u8]>,
        limits: Limits,
    ) -> Result<(String, http::Response), AdminError> {
        let auth = self.token.as_ref().map(AdminToken::header);
        let mut headers = vec![
            ("User-Agent", "stockade-cli"),
            ("Accept", "application/json"),
        ];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        let n = self.endpoints.len();
        let start = self.first.load(Ordering::Relaxed) % n;
        let mut last = None;
        for i in (0..n).map(|k| (start + k) % n) {
            let base = &self.endpoints[i];
            let prefix = base.path_and_query().trim_end_matches('/');
            let url =
                base.with_path_and_query(&format!("{prefix}{}{path}", common::admin::PREFIX))?;
            match http::request(method, &url, &headers, body, limits).await {
                Ok(resp) => {
                    self.first.store(i, Ordering::Relaxed);
                    return Ok((endpoint_name(base), resp));
                }
                Err(e @ HttpError::Connect { .. }) => last = Some(e),
                Err(source) => {
                    return Err(AdminError::Http {
                        url: endpoint_name(base),
                        source,
                    });
                }
            }
        }
        match last {
            Some(source) => Err(AdminError::Unreachable {
                endpoints: self.endpoints.iter().map(endpoint_name).collect(),
                source,
            }),
            None => Err(AdminError::NoEndpoint),
        }
    }
}

/// An endpoint as users wrote it (without a trailing `/`).
/// Which `503` answers a request may be sent again after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Any: doing it twice is doing it once.
    Safe,
    /// Only `no_leader`, which says nothing was done.
    IfNothingDone,
}

impl Repeat {
    fn allows(self, resp: &http::Response) -> bool {
        self == Repeat::Safe
            || serde_json::from_slice::<ErrorBody>(&resp.body)
                .is_ok_and(|b| b.error.code == "no_leader")
    }
}

fn endpoint_name(u: &HttpUrl) -> String {
    u.to_string().trim_end_matches('/').to_string()
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, AdminError> {
    serde_json::to_vec(v).map_err(AdminError::Encode)
}

/// `/volumes/{name}{rest}`, the name percent-encoded (it cannot change the path).
fn volume_path(name: &str, rest: &str) -> String {
    format!("/volumes/{}{rest}", encode_component(name))
}

/// The error of a non-2xx answer.
fn error_answer(url: &str, resp: &http::Response) -> AdminError {
    if resp.status == 401 {
        return AdminError::Unauthorized {
            url: url.to_string(),
        };
    }
    match serde_json::from_slice::<ErrorBody>(&resp.body) {
        Ok(b) => AdminError::Api {
            status: resp.status,
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => AdminError::Status {
            url: url.to_string(),
            status: resp.status,
            snippet: resp.body_snippet(),
        },
    }
}

#[cfg(test)]
mod tests;
