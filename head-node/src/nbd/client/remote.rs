//! [`RemoteVolume`]: a [`Volume`] stored in a remote NBD export that every head node of the
//! cluster serves, surviving the death of the head node it goes through.
//!
//! It keeps one [`NbdClient`] connection to one head node at a time. Every request is sent on
//! the current connection; when it fails because of that connection, the request is sent again
//! on the next connection, until [`RemoteConfig::retry_deadline`] has passed since its first
//! failure, and only then fails with `EIO`. Requests in flight when a connection dies are
//! therefore all re-sent: nothing that the local client was not told about is lost.
//!
//! # Which failures are retried
//!
//! * **Connection lost** (the server closed it, reset it, broke the protocol) or a request
//!   unanswered for [`RemoteConfig::request_timeout`] (the connection is then closed, so every
//!   request on it is re-sent too): always retried, on the next head node.
//! * **`ESHUTDOWN`**: the head node is stopping or detaching the export; always retried, on the
//!   next head node. The old connection is retired, not killed: its other requests finish —
//!   or, those that had not reached the volume's log when the new connection's session was
//!   recorded, are refused with `ESHUTDOWN` in turn and re-sent on the new one.
//! * **`EIO`**: a head node answers it when its Raft group failed (a dying node) but also when
//!   the cluster really cannot do the I/O (a head node already retries through elections for
//!   its own failover timeout before answering `EIO`). So `EIO` is retried on the next head
//!   node, at most once per configured head node: an error every head node agrees on is real
//!   and is returned (with its offset) rather than retried until the deadline.
//! * **Anything else** (`ENOSPC`, `EPERM`, `EINVAL`, `ENOTSUP` for a fast zero…) is an answer,
//!   not a failure of the path, and goes back to the local client unchanged.
//!
//! Connecting walks the head nodes round robin, starting after the one that failed; a head node
//! that refuses the connection or the export (`NBD_REP_ERR_UNKNOWN` while it starts) is skipped;
//! after a whole round fails the walk pauses, with exponential backoff.
//!
//! # Why re-sending is safe
//!
//! READ, BLOCK_STATUS and CACHE change nothing. WRITE, TRIM and WRITE_ZEROES are idempotent:
//! they set a range to a value that does not depend on what was there, so applying one twice —
//! once through the dead head node (which may have committed it without the reply getting
//! back) and once through the next — leaves the same bytes as applying it once.
//!
//! The one subtlety is ordering. Two overlapping writes both in flight may be re-sent in a
//! different order than they first reached the cluster. That is allowed: the NBD client sent
//! both without waiting for either, so it did not order them, and NBD promises nothing about
//! the outcome of overlapping requests in flight together. A write is only ever re-sent while
//! the local client is still waiting for it, so a write the client *did* order after it (sent
//! after its reply) cannot be overtaken by the re-send.
//!
//! FLUSH is the other place where reconnecting matters: a FLUSH must not be acknowledged until
//! every write acknowledged before it is durable on the cluster. Head nodes acknowledge a write
//! once it is durable in a majority of Raft logs, and advertise multi-conn: a FLUSH on any
//! connection to any head node covers every write acknowledged on any connection. So a FLUSH
//! that was in flight when its connection died is simply sent again on the new one, and
//! acknowledged only when that answer comes. Should the remote export not advertise multi-conn,
//! a FLUSH on a new connection would not cover writes acknowledged on the old one; then every
//! write, trim and write-zeroes is sent with FUA, so an acknowledged write is already durable.
//!
//! # The head node that was left
//!
//! A head node that is frozen rather than dead (SIGSTOP, a paused VM, a long stall) keeps the
//! requests it had received — in its socket or its tasks. Once the timeout moved them elsewhere
//! and the client went on, such a node could still hand an old write to the volume's leader
//! when it wakes, overwriting a newer one. So every connection is a new *session* of this
//! client: a random client id for this `RemoteVolume`'s lifetime and a generation raised at
//! every connection attempt, sent with the Stockade option `OPT_SESSION`. The head node commits the
//! session to the volume's Raft log before it answers `NBD_OPT_GO`, and from then on the leader
//! refuses whatever is still proposed for an older generation (see
//! [`crate::volume::session`]). No request is sent on the new connection before that answer,
//! so a re-sent write and every later one land after anything the old connection left behind.
//! A server without the extension (not a Stockade head node, or one of a release before it) is
//! used without it, with a warning: the protection is then lost.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::logging::RateLimit;
use common::metrics::{MetricsError, counter_vec, int_gauge, latency_vec};
use common::{AlignedBuf, Clock, SystemClock};
use prometheus::{HistogramVec, IntCounterVec, IntGauge, Registry};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{ClientConfig, ClientError, NbdClient, ZeroFlags};
use crate::nbd::backend::{ExportInfo, Extent, Volume, VolumeError};
use crate::nbd::proto::{self, Cmd};
use crate::volume::session::ClientSession;

/// How a [`RemoteVolume`] reaches its export and how hard it tries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// Export name on the head nodes (also the local export name).
    pub export: String,
    /// Head-node NBD addresses, tried round robin.
    pub heads: Vec<SocketAddr>,
    /// How long a request is retried after its first failure before it fails with `EIO`.
    pub retry_deadline: Duration,
    /// An attempt unanswered for this long is a dead connection (closed, every request on it
    /// re-sent). Longer than a head node's own failover timeout (30 s), so a healthy but slow
    /// cluster is not mistaken for a dead head node.
    pub request_timeout: Duration,
    /// First pause after a whole round of head nodes failed to connect, and between repeated
    /// failures of one request; doubles up to [`RemoteConfig::backoff_max`].
    pub backoff_initial: Duration,
    /// Longest pause between rounds.
    pub backoff_max: Duration,
    /// Settings of each connection.
    pub client: ClientConfig,
}

impl RemoteConfig {
    /// Defaults for `export` served by `heads`: 60 s retry deadline, 35 s request timeout.
    pub fn new(export: impl Into<String>, heads: Vec<SocketAddr>) -> Self {
        Self {
            export: export.into(),
            heads,
            retry_deadline: Duration::from_secs(60),
            request_timeout: Duration::from_secs(35),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            client: ClientConfig::default(),
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), RemoteError> {
        let bad = |field, reason| Err(RemoteError::Config { field, reason });
        if self.heads.is_empty() {
            return bad("heads", "at least one head-node address is needed");
        }
        if self.export.is_empty() || self.export.len() > proto::MAX_STRING_BYTES {
            return bad("export", "must be 1 to 4096 bytes");
        }
        if self.retry_deadline.is_zero() || self.request_timeout.is_zero() {
            return bad("retry-deadline/request-timeout", "must be positive");
        }
        if self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return bad(
                "backoff",
                "initial must be positive and at most the maximum",
            );
        }
        Ok(())
    }
}

/// Errors creating a [`RemoteVolume`].
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A setting is out of range.
    #[error("invalid remote volume setting {field}: {reason}")]
    Config {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// Registering the metrics failed (registered twice).
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// No head node served the export within the retry deadline.
    #[error("no head node served export {export:?} within {deadline:?}{}",
        last.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    Unreachable {
        /// The export.
        export: String,
        /// How long it tried.
        deadline: Duration,
        /// The last connection error.
        #[source]
        last: Option<Box<ClientError>>,
    },
}

/// The metrics of a remote volume (`stockade_attach_*`; one remote volume per registry).
#[derive(Debug, Clone)]
pub struct RemoteMetrics {
    connects: IntCounterVec,
    reconnects: IntCounterVec,
    retried: IntCounterVec,
    failed: IntCounterVec,
    duration: HistogramVec,
    in_flight: IntGauge,
    head: IntGauge,
    heads: IntGauge,
}

impl RemoteMetrics {
    /// Registers every family on `registry`.
    pub fn new(registry: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            connects: counter_vec(
                registry,
                "stockade_attach_connects_total",
                "Connection attempts to head nodes, by result.",
                &["result"],
            )?,
            reconnects: counter_vec(
                registry,
                "stockade_attach_reconnects_total",
                "Head-node connections abandoned for another head node, by reason.",
                &["reason"],
            )?,
            retried: counter_vec(
                registry,
                "stockade_attach_retried_requests_total",
                "Requests sent again to the cluster after a failed attempt, by command.",
                &["op"],
            )?,
            failed: counter_vec(
                registry,
                "stockade_attach_failed_requests_total",
                "Requests answered with an error to the local client, by command and reason.",
                &["op", "reason"],
            )?,
            duration: latency_vec(
                registry,
                "stockade_attach_remote_request_duration_seconds",
                "Time of one attempt of a request to the cluster, from sending it to its reply.",
                &["op"],
            )?,
            in_flight: int_gauge(
                registry,
                "stockade_attach_remote_requests_in_flight",
                "Attempts sent to the cluster and not yet answered.",
            )?,
            head: int_gauge(
                registry,
                "stockade_attach_head_index",
                "Index in the configured head-node list of the head node in use; -1 when none.",
            )?,
            heads: int_gauge(
                registry,
                "stockade_attach_heads",
                "Head-node addresses configured.",
            )?,
        })
    }
}

/// Why a request's attempt failed, and what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The connection is gone or hung: close it and retry elsewhere.
    Lost(&'static str),
    /// The head node is stopping: move new requests elsewhere and retry.
    Shutdown,
    /// `EIO`: retry on another head node, once per head node.
    Eio,
    /// An answer: give it to the local client.
    Final,
}

fn verdict(e: &ClientError) -> Verdict {
    match e {
        ClientError::Lost(l) => Verdict::Lost(l.label()),
        ClientError::Server { errno, .. } => match *errno {
            proto::ESHUTDOWN => Verdict::Shutdown,
            proto::EIO => Verdict::Eio,
            _ => Verdict::Final,
        },
        _ => Verdict::Final,
    }
}

/// The local error for a remote answer to `cmd`; [`VolumeError::nbd_errno`] maps it back to
/// the same NBD error where the variants allow it.
fn volume_error(cmd: Cmd, e: ClientError) -> VolumeError {
    match e {
        ClientError::Server {
            errno,
            message,
            offset,
            ..
        } => match errno {
            proto::ENOSPC => VolumeError::NoSpace,
            proto::EPERM => VolumeError::ReadOnly,
            proto::ESHUTDOWN => VolumeError::ShuttingDown,
            proto::ENOTSUP => VolumeError::NotSupported {
                reason: "the cluster cannot do this fast",
            },
            // `NotSupported` is EINVAL for every command but WRITE_ZEROES.
            proto::EINVAL if cmd != Cmd::WriteZeroes => VolumeError::NotSupported {
                reason: "the cluster refused the request as invalid",
            },
            _ => VolumeError::Io {
                offset,
                source: std::io::Error::other(format!(
                    "head node answered {}: {message}",
                    proto::errno_name(errno)
                )),
            },
        },
        ClientError::Unsupported { .. } => VolumeError::NotSupported {
            reason: "the remote export does not offer this command",
        },
        other => VolumeError::io(std::io::Error::other(other)),
    }
}

/// Counts one attempt in a gauge for as long as it lives (also when the attempt is dropped).
struct Counted<'a>(&'a IntGauge);

impl<'a> Counted<'a> {
    fn new(g: &'a IntGauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The connection in use.
#[derive(Debug, Clone)]
struct Conn {
    generation: u64,
    head: usize,
    client: Arc<NbdClient>,
}

/// A connection failure while waiting for a connection.
#[derive(Debug)]
struct NoConnection {
    last: Option<ClientError>,
}

/// A [`Volume`] whose storage is a remote NBD export, reached through whichever head node is
/// alive. See the module documentation for what is retried and why that is safe.
#[derive(Debug)]
pub struct RemoteVolume {
    cfg: RemoteConfig,
    info: Mutex<ExportInfo>,
    /// Send every mutation with FUA (the remote is not multi-conn).
    force_fua: AtomicBool,
    conn: Mutex<Option<Conn>>,
    /// Serialises connecting; holds the generation counter.
    connecting: tokio::sync::Mutex<u64>,
    /// The head node to try next.
    next_head: AtomicUsize,
    closed: watch::Sender<bool>,
    metrics: RemoteMetrics,
    clock: SystemClock,
    warn: RateLimit,
    /// This client's id in the sessions of its connections (random, for its lifetime).
    client_id: u64,
    /// The generation of the last connection attempt's session.
    session_generation: std::sync::atomic::AtomicU64,
}

impl RemoteVolume {
    /// Connects to the first head node that serves the export (trying them in turn until the
    /// retry deadline) and learns the export's size, flags and block sizes.
    pub async fn connect(cfg: RemoteConfig, registry: &Registry) -> Result<Arc<Self>, RemoteError> {
        cfg.validate()?;
        let metrics = RemoteMetrics::new(registry)?;
        metrics.heads.set(cfg.heads.len() as i64);
        metrics.head.set(-1);
        let info = ExportInfo {
            name: cfg.export.clone(),
            description: String::new(),
            size: 0,
            read_only: false,
            multi_conn: false,
            min_block: 512,
            preferred_block: 4096,
            max_block: 32 << 20,
        };
        let v = Arc::new(Self {
            info: Mutex::new(info),
            force_fua: AtomicBool::new(false),
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(0),
            next_head: AtomicUsize::new(0),
            closed: watch::channel(false).0,
            metrics,
            clock: SystemClock::new(),
            warn: RateLimit::new(Duration::from_secs(1)),
            client_id: random_client_id(),
            session_generation: std::sync::atomic::AtomicU64::new(0),
            cfg,
        });
        let deadline = Instant::now() + v.cfg.retry_deadline;
        match v.connection(deadline).await {
            Ok(_) => Ok(v),
            Err(e) => Err(RemoteError::Unreachable {
                export: v.cfg.export.clone(),
                deadline: v.cfg.retry_deadline,
                last: e.last.map(Box::new),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    /// The head node in use, if connected.
    pub fn current_head(&self) -> Option<SocketAddr> {
        self.lock_conn()
            .as_ref()
            .filter(|c| !c.client.is_closed())
            .and_then(|c| self.cfg.heads.get(c.head).copied())
    }

    /// Detaches: [`Volume::closed`] resolves, so the local server stops taking requests.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Closes and ends the current connection politely (`NBD_CMD_DISC` once its requests are
    /// answered).
    pub async fn shutdown(&self) {
        self.close();
        let conn = self.lock_conn().take();
        self.metrics.head.set(-1);
        if let Some(c) = conn {
            c.client.disconnect().await;
        }
    }

    fn lock_conn(&self) -> std::sync::MutexGuard<'_, Option<Conn>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current connection if it is alive; a dead one is dropped (and counted).
    fn live(&self) -> Option<Conn> {
        let dead = {
            let mut g = self.lock_conn();
            match g.as_ref() {
                Some(c) if !c.client.is_closed() => return Some(c.clone()),
                Some(_) => g.take(),
                None => None,
            }
        };
        if let Some(c) = dead {
            let reason = c
                .client
                .lost_reason()
                .map(|l| l.label())
                .unwrap_or("closed");
            self.abandoned(&c, reason);
        }
        None
    }

    /// Books the end of connection `c` (already removed from `conn`).
    fn abandoned(&self, c: &Conn, reason: &'static str) {
        self.next_head
            .store((c.head + 1) % self.cfg.heads.len(), Ordering::Release);
        self.metrics.head.set(-1);
        self.metrics.reconnects.with_label_values(&[reason]).inc();
        warn!(volume = self.cfg.export, head = %self.cfg.heads[c.head], reason,
            "leaving head node; requests in flight will be sent to the next one");
    }

    /// Stops using connection `c` for new requests. With `kill`, also closes it, failing its
    /// requests in flight (they are retried by their callers).
    fn leave(&self, c: &Conn, reason: &'static str, kill: bool) {
        let taken = {
            let mut g = self.lock_conn();
            if g.as_ref().map(|x| x.generation) == Some(c.generation) {
                g.take()
            } else {
                None
            }
        };
        if let Some(t) = taken {
            self.abandoned(&t, reason);
        }
        if kill {
            c.client.close();
        }
    }

    /// A live connection, connecting if needed, until `deadline`.
    async fn connection(&self, deadline: Instant) -> Result<Conn, NoConnection> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let Ok(mut generation) = tokio::time::timeout_at(deadline, self.connecting.lock()).await
        else {
            return Err(NoConnection { last: None });
        };
        // Someone else may have connected while this one waited.
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let n = self.cfg.heads.len();
        let mut backoff = self.cfg.backoff_initial;
        let mut last = None;
        let mut failed_in_round = 0;
        loop {
            let head = self.next_head.load(Ordering::Acquire) % n;
            let addr = self.cfg.heads[head];
            let client_cfg = ClientConfig {
                session: Some(self.next_session()),
                ..self.cfg.client.clone()
            };
            let attempt = tokio::time::timeout_at(
                deadline,
                NbdClient::connect(addr, &self.cfg.export, &client_cfg),
            )
            .await;
            match attempt {
                Ok(Ok(client)) => {
                    *generation += 1;
                    let conn = Conn {
                        generation: *generation,
                        head,
                        client: Arc::new(client),
                    };
                    self.installed(&conn, addr);
                    *self.lock_conn() = Some(conn.clone());
                    return Ok(conn);
                }
                Ok(Err(e)) => {
                    let result = match &e {
                        ClientError::Connect { .. } => "connect_error",
                        ClientError::ConnectTimeout { .. } => "timeout",
                        ClientError::Refused { .. } => "refused",
                        _ => "handshake_error",
                    };
                    self.metrics.connects.with_label_values(&[result]).inc();
                    if let Some(suppressed) = self.warn.check(self.clock.now_ns()) {
                        warn!(volume = self.cfg.export, head = %addr, error = %e, suppressed,
                            "cannot reach the export through this head node");
                    }
                    last = Some(e);
                }
                Err(_) => {
                    self.metrics.connects.with_label_values(&["timeout"]).inc();
                    return Err(NoConnection { last });
                }
            }
            self.next_head.store((head + 1) % n, Ordering::Release);
            failed_in_round += 1;
            if failed_in_round >= n {
                failed_in_round = 0;
                if Instant::now() + backoff >= deadline {
                    tokio::time::sleep_until(deadline).await;
                    return Err(NoConnection { last });
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.cfg.backoff_max);
            }
        }
    }

    /// The session of the next connection attempt: each attempt a new generation, so a
    /// connection never shares one with another.
    fn next_session(&self) -> ClientSession {
        ClientSession {
            client: self.client_id,
            generation: self.session_generation.fetch_add(1, Ordering::AcqRel) + 1,
        }
    }

    /// Adopts what a new connection says about the export.
    fn installed(&self, conn: &Conn, addr: SocketAddr) {
        let d = conn.client.details();
        if !d.session_recorded {
            warn!(volume = self.cfg.export, head = %addr,
                "the server does not record client sessions: a head node this client leaves \
                 could still apply its old requests after newer ones");
        }
        let mut fresh = d.export_info();
        fresh.name = self.cfg.export.clone();
        self.force_fua.store(!d.multi_conn(), Ordering::Release);
        let old = std::mem::replace(
            &mut *self.info.lock().unwrap_or_else(PoisonError::into_inner),
            fresh.clone(),
        );
        if old.size != 0 && old != fresh {
            info!(
                volume = self.cfg.export,
                old_size = old.size,
                size = fresh.size,
                "remote export changed; new local connections get the new description"
            );
        }
        self.metrics.connects.with_label_values(&["ok"]).inc();
        self.metrics.head.set(conn.head as i64);
        info!(volume = self.cfg.export, head = %addr, size = fresh.size,
            multi_conn = fresh.multi_conn, "connected to head node");
    }

    /// Runs `attempt` on the current connection, retrying as the module documentation says.
    async fn run<T, F, Fut>(&self, cmd: Cmd, attempt: F) -> Result<T, VolumeError>
    where
        F: Fn(Arc<NbdClient>) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let op = cmd.name();
        let started = Instant::now();
        let mut first_failure: Option<Instant> = None;
        let mut eio_answers = 0usize;
        let mut failures = 0u32;
        loop {
            let deadline = first_failure.unwrap_or(started) + self.cfg.retry_deadline;
            let conn = match self.connection(deadline).await {
                Ok(c) => c,
                Err(e) => return Err(self.give_up(cmd, e.last)),
            };
            if failures > 0 {
                self.metrics.retried.with_label_values(&[op]).inc();
            }
            let t0 = Instant::now();
            // After a failure, no attempt runs past the retry deadline: a head that accepts
            // the request and never answers must not stretch it by a whole request timeout.
            let limit = match first_failure {
                Some(_) => self
                    .cfg
                    .request_timeout
                    .min(deadline.saturating_duration_since(t0)),
                None => self.cfg.request_timeout,
            };
            let counted = Counted::new(&self.metrics.in_flight);
            let result = tokio::time::timeout(limit, attempt(conn.client.clone())).await;
            drop(counted);
            self.metrics
                .duration
                .with_label_values(&[op])
                .observe(t0.elapsed().as_secs_f64());
            let err = match result {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => {
                    self.leave(&conn, "timeout", true);
                    ClientError::Lost(super::Lost::Closed)
                }
            };
            match verdict(&err) {
                Verdict::Final => {
                    self.metrics.failed.with_label_values(&[op, "remote"]).inc();
                    return Err(volume_error(cmd, err));
                }
                Verdict::Eio => {
                    eio_answers += 1;
                    if eio_answers >= self.cfg.heads.len() {
                        self.metrics.failed.with_label_values(&[op, "remote"]).inc();
                        return Err(volume_error(cmd, err));
                    }
                    self.leave(&conn, "eio", false);
                }
                Verdict::Shutdown => self.leave(&conn, "eshutdown", false),
                Verdict::Lost(reason) => self.leave(&conn, reason, true),
            }
            debug!(volume = self.cfg.export, op, error = %err, "request failed; retrying");
            failures += 1;
            let now = Instant::now();
            let first = *first_failure.get_or_insert(now);
            if now >= first + self.cfg.retry_deadline {
                return Err(self.give_up(cmd, Some(err)));
            }
            // The first retry goes at once (a new head node); later ones back off.
            if failures >= 2 {
                let exp = (failures - 2).min(16);
                let pause = self
                    .cfg
                    .backoff_initial
                    .saturating_mul(1 << exp)
                    .min(self.cfg.backoff_max);
                tokio::time::sleep_until((now + pause).min(first + self.cfg.retry_deadline)).await;
            }
        }
    }

    fn give_up(&self, cmd: Cmd, last: Option<ClientError>) -> VolumeError {
        self.metrics
            .failed
            .with_label_values(&[cmd.name(), "deadline"])
            .inc();
        let why = match last {
            Some(e) => format!(
                "no head node answered within the retry deadline of {:?}; last error: {e}",
                self.cfg.retry_deadline
            ),
            None => format!(
                "no head node answered within the retry deadline of {:?}",
                self.cfg.retry_deadline
            ),
        };
        if let Some(suppressed) = self.warn.check(self.clock.now_ns()) {
            warn!(
                volume = self.cfg.export,
                op = cmd.name(),
                suppressed,
                "{why}"
            );
        }
        VolumeError::io(std::io::Error::other(why))
    }

    fn fua(&self, fua: bool) -> bool {
        fua || self.force_fua.load(Ordering::Acquire)
    }
}

impl Volume for RemoteVolume {
    fn info(&self) -> ExportInfo {
        self.info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<AlignedBuf, VolumeError> {
        self.run(Cmd::Read, |c| async move { c.read(offset, len).await })
            .await
    }

    async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), VolumeError> {
        // Shared, not copied, by every attempt.
        let data = data.into_bytes();
        let fua = self.fua(fua);
        self.run(Cmd::Write, |c| {
            let data = data.clone();
            async move { c.write(offset, data, fua).await }
        })
        .await
    }

    async fn flush(&self) -> Result<(), VolumeError> {
        self.run(Cmd::Flush, |c| async move { c.flush().await })
            .await
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), VolumeError> {
        let fua = self.fua(fua);
        self.run(Cmd::Trim, |c| async move { c.trim(offset, len, fua).await })
            .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast_only: bool,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let flags = ZeroFlags {
            no_hole,
            fast_only,
            fua: self.fua(fua),
        };
        self.run(Cmd::WriteZeroes, |c| async move {
            c.write_zeroes(offset, len, flags).await
        })
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        self.run(Cmd::BlockStatus, |c| async move {
            if c.details().base_allocation.is_none() {
                // The remote cannot tell: "allocated data" is always a correct answer.
                return Ok(vec![Extent::data(len)]);
            }
            c.block_status(offset, len, false).await
        })
        .await
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.run(Cmd::Cache, |c| async move { c.cache(offset, len).await })
            .await
    }

    async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        // The sender lives in `self`; this resolves once `close` was called.
        let _ = rx.wait_for(|closed| *closed).await;
    }
}

/// A client id no other client is likely to have: 64 bits from the standard library's
/// randomly seeded hasher, mixed with the time and the process.
fn random_client_id() -> u64 {
    use std::hash::BuildHasher;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    std::collections::hash_map::RandomState::new().hash_one((now, std::process::id()))
}

#[cfg(test)]
mod tests;
