//! The NBD listener and the fixed-newstyle handshake.
//!
//! [`NbdServer::serve`] accepts connections until its shutdown future resolves. Each connection
//! runs the handshake (option haggling) here, then the transmission phase in
//! the `transmission` module. A client that breaks the protocol is disconnected; the server and
//! every other connection carry on.
//!
//! Negotiation rules implemented (proto.md): unknown options get `NBD_REP_ERR_UNSUP` and the
//! haggling goes on; `NBD_OPT_INFO`/`NBD_OPT_GO` for an unknown export get
//! `NBD_REP_ERR_UNKNOWN`; `NBD_OPT_EXPORT_NAME` for an unknown export (it cannot report errors)
//! closes the connection; option data longer than [`ServerConfig::max_option_bytes`] gets
//! `NBD_REP_ERR_TOO_BIG` and the connection is closed (after reading a bounded part of the
//! data, so that the close does not reset the connection under the reply);
//! `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP` (no TLS yet); `NBD_OPT_EXTENDED_HEADERS` implies
//! structured replies, and a later `NBD_OPT_STRUCTURED_REPLY` gets
//! `NBD_REP_ERR_EXT_HEADER_REQD`; meta contexts need structured replies or extended headers
//! first, and only `base:allocation` exists.
//!
//! One option of Stockade's own, [`proto::OPT_SESSION`], names the connection as a client's
//! newest: before answering `NBD_OPT_GO` the export records it ([`Volume::open_session`]), and
//! answers `NBD_REP_ERR_SHUTDOWN` when it cannot (the client tries another head node).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::logging::RateLimit;
use common::metrics::MetricsError;
use common::{Clock, SystemClock};
use prometheus::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::backend::{ExportInfo, Exports, Volume};
use super::metrics::NbdMetrics;
use super::proto::{self, ProtoError, ReplyStyle};
use super::transmission::{self, CloseReason};
use crate::volume::session::ClientSession;

/// Most bytes of an oversized option's data read (and dropped) after `NBD_REP_ERR_TOO_BIG`, so
/// that closing does not reset the connection under the reply.
const TOO_BIG_DRAIN_BYTES: u64 = 16 << 20;
/// Longest time spent on that.
const TOO_BIG_DRAIN_TIME: Duration = Duration::from_secs(1);

/// The metadata context id given to `base:allocation` by `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Limits of the NBD server. Every field has a default; `validate` checks a loaded config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// Largest READ/WRITE payload advertised and accepted (`NBD_INFO_BLOCK_SIZE` maximum).
    pub max_payload_bytes: common::ByteSize,
    /// Payload bytes (write data received, read data not yet sent) a connection may have in
    /// flight before it stops reading requests.
    pub max_inflight_bytes: common::ByteSize,
    /// Payload bytes all connections together may have in flight; a connection that would
    /// exceed it waits (bounds memory however many clients connect).
    pub max_server_inflight_bytes: common::ByteSize,
    /// Payload bytes the connections of one volume together may have in flight (at most
    /// `max-server-inflight-bytes`). A volume whose requests are held back — its throttle, a
    /// slow leader — keeps its payload in flight for as long; without a share per volume,
    /// enough of its connections would take all of the server's room and stall every other
    /// volume on the node.
    pub max_volume_inflight_bytes: common::ByteSize,
    /// Requests a connection may have in flight before it stops reading requests.
    pub max_inflight_requests: u32,
    /// Longest option data accepted during the handshake.
    pub max_option_bytes: u32,
    /// Most options one handshake may send.
    pub max_options: u32,
    /// Time allowed for the whole handshake.
    #[serde(with = "common::units::duration")]
    pub handshake_timeout: Duration,
    /// While the server waits on a client (replies it has not read, a write payload it has not
    /// finished sending), the client must make some progress within this time or its
    /// connection is closed, giving back the in-flight bytes it holds, which all connections
    /// share (see `nbd::stall`). A connection idle between requests is never timed out; a
    /// peer that is gone (its machine died, the network split) is found by TCP keepalive
    /// (probes after 60 s idle, every 10 s, 6 unanswered end it: about 2 minutes).
    #[serde(with = "common::units::duration")]
    pub stall_timeout: Duration,
    /// Bytes per second a client the server waits on must average: one that falls more than
    /// `stall-timeout` behind this rate over a wait is disconnected too, however often it
    /// makes a little progress.
    pub stall_min_rate: common::ByteSize,
    /// Time connections get to answer in-flight requests after shutdown before being aborted.
    #[serde(with = "common::units::duration")]
    pub shutdown_grace: Duration,
    /// Most simultaneous connections; further clients wait in the listen backlog.
    pub max_connections: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: common::ByteSize(32 << 20),
            max_inflight_bytes: common::ByteSize(64 << 20),
            max_server_inflight_bytes: common::ByteSize(1 << 30),
            max_volume_inflight_bytes: common::ByteSize(256 << 20),
            max_inflight_requests: 256,
            max_option_bytes: 64 << 10,
            max_options: 1024,
            handshake_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
            stall_min_rate: common::ByteSize(256 << 10),
            shutdown_grace: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD server setting {field}: {reason}")]
pub struct ConfigError {
    /// The setting.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl ServerConfig {
    /// Checks the limits against each other and against the protocol.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason| Err(ConfigError { field, reason });
        let payload = self.max_payload_bytes.bytes();
        if payload < 1 << 20 || payload > u64::from(u32::MAX) || !payload.is_multiple_of(64 << 10) {
            return err(
                "max-payload-bytes",
                "must be a multiple of 64 KiB between 1 MiB and 4 GiB",
            );
        }
        if self.max_inflight_bytes.bytes() < payload
            || self.max_inflight_bytes.bytes() > u64::from(u32::MAX)
        {
            return err(
                "max-inflight-bytes",
                "must be at least max-payload-bytes and below 4 GiB",
            );
        }
        if self.max_server_inflight_bytes.bytes() < payload
            || self.max_server_inflight_bytes.bytes() > 1 << 40
        {
            return err(
                "max-server-inflight-bytes",
                "must be at least max-payload-bytes and at most 1 TiB",
            );
        }
        if self.max_volume_inflight_bytes.bytes() < payload
            || self.max_volume_inflight_bytes.bytes() > 1 << 40
        {
            return err(
                "max-volume-inflight-bytes",
                "must be at least max-payload-bytes and at most 1 TiB",
            );
        }
        if self.max_inflight_requests == 0 || self.max_inflight_requests > 1 << 16 {
            return err("max-inflight-requests", "must be between 1 and 65536");
        }
        if self.max_option_bytes < 4096 + 64 || self.max_option_bytes > 16 << 20 {
            return err("max-option-bytes", "must be between 4160 and 16 MiB");
        }
        if self.stall_timeout < Duration::from_millis(100)
            || self.stall_timeout > Duration::from_secs(86_400)
        {
            return err("stall-timeout", "must be between 100ms and 1 day");
        }
        if self.stall_min_rate.bytes() < 1024 || self.stall_min_rate.bytes() > 1 << 40 {
            return err(
                "stall-min-rate",
                "must be between 1 KiB and 1 TiB (per second)",
            );
        }
        if self.max_options == 0 || self.max_connections == 0 {
            return err("max-options/max-connections", "must be positive");
        }
        Ok(())
    }

    /// How long a client may keep the server waiting.
    pub(crate) fn stall(&self) -> super::stall::Stall {
        super::stall::Stall {
            limit: self.stall_timeout,
            min_rate: self.stall_min_rate.bytes(),
        }
    }

    pub(crate) fn max_payload(&self) -> u32 {
        self.max_payload_bytes.bytes().min(u64::from(u32::MAX)) as u32
    }
}

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Registering metrics failed (a name registered twice).
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The listener failed.
    #[error("NBD listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a connection ended before or during the handshake.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    #[error("protocol violation: {0}")]
    Violation(&'static str),
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("option {option} carries {length} bytes, more than the {limit}-byte limit")]
    OptionTooLong {
        option: u32,
        length: u32,
        limit: u32,
    },
    #[error("more than {0} options")]
    TooManyOptions(u32),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    #[error("the export could not record the client's session: {0}")]
    Session(String),
}

impl ConnError {
    /// The `reason` label for `stockade_nbd_connections_closed_total`.
    fn reason(&self) -> &'static str {
        match self {
            ConnError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
            ConnError::Io(_) => "io_error",
            ConnError::UnknownExport(_) => "unknown_export",
            ConnError::Session(_) => "session_refused",
            ConnError::OptionTooLong { .. } | ConnError::TooManyOptions(_) => "limit",
            ConnError::Proto(_) | ConnError::Violation(_) | ConnError::ClientFlags(_) => {
                "protocol_error"
            }
        }
    }

    fn is_violation(&self) -> bool {
        matches!(
            self,
            ConnError::Proto(_)
                | ConnError::Violation(_)
                | ConnError::ClientFlags(_)
                | ConnError::OptionTooLong { .. }
                | ConnError::TooManyOptions(_)
        )
    }
}

/// State shared by every connection of one server.
#[derive(Debug)]
pub(crate) struct Shared<E> {
    pub(crate) exports: Arc<E>,
    pub(crate) config: ServerConfig,
    pub(crate) metrics: NbdMetrics,
    pub(crate) warn: Arc<WarnLimit>,
    /// Payload bytes in flight across every connection.
    pub(crate) server_bytes: Arc<Semaphore>,
    /// Payload bytes in flight per volume (by export name), while anything holds them.
    volume_bytes: std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<Semaphore>>>,
}

impl<E> Shared<E> {
    /// The in-flight byte share of the volume exported as `name`, for one of its connections.
    /// (Shares nothing holds any more — no connection, no request — are forgotten here.)
    pub(crate) fn volume_bytes(&self, name: &str) -> Arc<Semaphore> {
        let share = self
            .config
            .max_volume_inflight_bytes
            .bytes()
            .min(self.config.max_server_inflight_bytes.bytes());
        let mut m = self
            .volume_bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.retain(|_, s| s.strong_count() > 0);
        if let Some(s) = m.get(name).and_then(std::sync::Weak::upgrade) {
            return s;
        }
        let s = Arc::new(Semaphore::new(share as usize));
        m.insert(name.to_string(), Arc::downgrade(&s));
        s
    }

    /// `Some(suppressed)` when a hot-path warning may be logged now.
    pub(crate) fn may_warn(&self) -> Option<u64> {
        self.warn.check()
    }
}

/// Rate-limits hot-path warnings of one server (one per second; the rest are counted).
#[derive(Debug)]
pub(crate) struct WarnLimit {
    clock: SystemClock,
    limit: RateLimit,
}

impl WarnLimit {
    fn new() -> Self {
        Self {
            clock: SystemClock::new(),
            limit: RateLimit::new(Duration::from_secs(1)),
        }
    }

    /// `Some(suppressed_since_last)` when a warning may be logged now.
    pub(crate) fn check(&self) -> Option<u64> {
        self.limit.check(self.clock.now_ns())
    }
}

/// An NBD server over a set of exports.
#[derive(Debug)]
pub struct NbdServer<E: Exports> {
    shared: Arc<Shared<E>>,
}

impl<E: Exports> NbdServer<E> {
    /// A server for `exports`, registering its metrics on `registry`.
    pub fn new(
        exports: Arc<E>,
        config: ServerConfig,
        registry: &Registry,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let server_bytes = Arc::new(Semaphore::new(
            config.max_server_inflight_bytes.bytes() as usize
        ));
        Ok(Self {
            shared: Arc::new(Shared {
                exports,
                config,
                metrics: NbdMetrics::new(registry)?,
                warn: Arc::new(WarnLimit::new()),
                server_bytes,
                volume_bytes: std::sync::Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    /// Accepts and serves connections on `listener` until `shutdown` resolves; then stops
    /// accepting, lets every connection answer its in-flight requests (up to
    /// [`ServerConfig::shutdown_grace`]) and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(self.shared.config.max_connections as usize));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        info!(addr = ?listener.local_addr().ok(), "NBD server listening");
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(joined) = conns.join_next(), if !conns.is_empty() => {
                    if let Err(e) = joined
                        && e.is_panic()
                    {
                        warn!(error = %e, "NBD connection task panicked");
                    }
                }
                accepted = accept(&listener, &slots) => match accepted {
                    Ok((stream, peer, slot)) => {
                        let shared = self.shared.clone();
                        let stop = stop_rx.clone();
                        conns.spawn(async move {
                            handle_connection(shared, stream, peer, stop).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        // Typically EMFILE: back off briefly instead of spinning.
                        warn!(error = %e, "accepting an NBD connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        info!(connections = conns.len(), "NBD server stopping");
        stop_tx.send_replace(true);
        let grace = self.shared.config.shutdown_grace;
        let drained =
            tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(
                connections = conns.len(),
                "NBD connections still busy after the shutdown grace; aborting them"
            );
            conns.shutdown().await;
        }
        Ok(())
    }
}

async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> std::io::Result<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| std::io::Error::other("connection limiter closed"))?;
    let (stream, peer) = listener.accept().await?;
    Ok((stream, peer, slot))
}

async fn handle_connection<E: Exports>(
    shared: Arc<Shared<E>>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    // The specification asks both ends to disable Nagle; keepalive frees the slot of a
    // client that vanished while idle (kernel clients keep idle connections for days).
    common::net::tune_accepted(&stream);
    debug!(%peer, "NBD connection accepted");
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(128 << 10, rd);
    let timeout = shared.config.handshake_timeout;
    let result = tokio::select! {
        r = tokio::time::timeout(timeout, handshake(&shared, &mut rd, &mut wr)) => r,
        _ = stop.wait_for(|s| *s) => {
            shared.metrics.connection_closed("shutdown");
            return;
        }
    };
    let session = match result {
        Err(_) => {
            info!(%peer, "NBD handshake timed out");
            shared.metrics.connection_closed("handshake_timeout");
            return;
        }
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => {
            debug!(%peer, "NBD client ended the negotiation");
            shared.metrics.connection_closed("abort");
            return;
        }
        Ok(Err(e)) => {
            shared.metrics.connection_closed(e.reason());
            if e.is_violation() {
                if let Some(suppressed) = shared.may_warn() {
                    warn!(%peer, error = %e, suppressed, "NBD handshake failed");
                }
            } else {
                debug!(%peer, error = %e, "NBD handshake ended");
            }
            return;
        }
    };
    let volume = session.name.clone();
    info!(%peer, volume, size = session.size, reply_style = ?session.reply_style,
        "NBD connection entered transmission");
    let reason = transmission::run(&shared, session, rd, wr, stop, peer).await;
    shared.metrics.connection_closed(reason.label());
    match &reason {
        CloseReason::Violation(e) => {
            if let Some(suppressed) = shared.may_warn() {
                warn!(%peer, volume, error = %e, suppressed,
                    "NBD client broke the protocol; disconnected");
            }
        }
        CloseReason::WriteFailed(e) => {
            info!(%peer, volume, error = %e, "NBD connection closed: writing replies failed");
        }
        CloseReason::Stalled(e) => {
            if let Some(suppressed) = shared.may_warn() {
                warn!(%peer, volume, error = %e, suppressed,
                    "NBD client stalled with requests in flight; disconnected");
            }
        }
        _ => info!(%peer, volume, reason = reason.label(), "NBD connection closed"),
    }
}

/// What the transmission phase needs from the negotiation.
#[derive(Debug)]
pub(crate) struct Session<V> {
    pub(crate) volume: Arc<V>,
    /// Canonical export name (the `volume` label).
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    pub(crate) flags: u16,
    pub(crate) limits: BlockLimits,
    pub(crate) reply_style: ReplyStyle,
    /// Context id of `base:allocation` when it was selected for this export.
    pub(crate) base_allocation: Option<u32>,
    /// The client asked for `NBD_INFO_BLOCK_SIZE` in `NBD_OPT_GO`, promising to honour the
    /// minimum block size; requests that do not are refused with `EINVAL`.
    pub(crate) enforce_alignment: bool,
    /// The client session the connection serves ([`proto::OPT_SESSION`]), recorded by the
    /// export: every request runs on its behalf.
    pub(crate) client: Option<ClientSession>,
}

/// Block size constraints as advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockLimits {
    pub(crate) min: u32,
    pub(crate) preferred: u32,
    pub(crate) max: u32,
}

/// Turns a backend's block sizes into constraints the protocol allows: minimum a power of two
/// up to 64 KiB, preferred a power of two at least max(minimum, 512), maximum a multiple of the
/// minimum, no more than the server's payload limit and no less than the preferred size.
pub(crate) fn block_limits(info: &ExportInfo, max_payload: u32) -> BlockLimits {
    let min = if info.min_block.is_power_of_two() && info.min_block <= 1 << 16 {
        info.min_block
    } else {
        1
    };
    let floor = min.max(512);
    let max = info.max_block.min(max_payload);
    let max = max - max % min;
    let preferred = info
        .preferred_block
        .max(floor)
        .checked_next_power_of_two()
        .unwrap_or(1 << 25)
        .min(1 << 25);
    // Never above the maximum (which never exceeds the server's payload limit): rounded up
    // past it, the preferred size becomes the largest power of two that fits.
    let preferred = if preferred > max && max >= floor {
        1 << (31 - max.leading_zeros())
    } else {
        preferred
    };
    // Only a nonsensical backend maximum (below 512 bytes) is raised to the preferred size.
    let max = max.max(preferred);
    BlockLimits {
        min,
        preferred,
        max,
    }
}

/// The transmission flags for an export given what was negotiated.
pub(crate) fn transmission_flags(info: &ExportInfo, style: ReplyStyle) -> u16 {
    let mut f = proto::TFLAG_HAS_FLAGS
        | proto::TFLAG_SEND_FLUSH
        | proto::TFLAG_SEND_FUA
        | proto::TFLAG_SEND_CACHE;
    if info.read_only {
        f |= proto::TFLAG_READ_ONLY;
    } else {
        f |= proto::TFLAG_SEND_TRIM | proto::TFLAG_SEND_WRITE_ZEROES | proto::TFLAG_SEND_FAST_ZERO;
    }
    if info.multi_conn {
        f |= proto::TFLAG_CAN_MULTI_CONN;
    }
    if style != ReplyStyle::Simple {
        // Reads are always answered in one chunk, so "don't fragment" costs nothing.
        f |= proto::TFLAG_SEND_DF;
    }
    f
}

/// Negotiation state.
#[derive(Debug, Default)]
struct Haggle {
    structured: bool,
    extended: bool,
    no_zeroes: bool,
    /// The last `NBD_OPT_SET_META_CONTEXT`: canonical export name and whether it selected
    /// `base:allocation`.
    meta: Option<(String, bool)>,
    /// The session the client named ([`proto::OPT_SESSION`]).
    client: Option<ClientSession>,
}

impl Haggle {
    fn reply_style(&self) -> ReplyStyle {
        if self.extended {
            ReplyStyle::Extended
        } else if self.structured {
            ReplyStyle::Structured
        } else {
            ReplyStyle::Simple
        }
    }
}

enum Next<V> {
    Continue,
    Abort,
    Go(Session<V>),
}

/// Runs the handshake; `Ok(None)` when the client aborted.
async fn handshake<E: Exports>(
    shared: &Shared<E>,
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
) -> Result<Option<Session<E::V>>, ConnError> {
    wr.write_all(&proto::encode_greeting(
        proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
    ))
    .await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & !proto::KNOWN_CLIENT_FLAGS != 0 {
        return Err(ConnError::ClientFlags(client_flags));
    }
    // Clients without FIXED_NEWSTYLE are served fixed newstyle anyway (the specification
    // allows it); they only ever send NBD_OPT_EXPORT_NAME.
    let mut st = Haggle {
        no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
        ..Haggle::default()
    };
    let cfg = &shared.config;
    let mut out = Vec::with_capacity(256);
    for _ in 0..cfg.max_options {
        let mut hb = [0u8; proto::OptionHeader::LEN];
        rd.read_exact(&mut hb).await?;
        let h = proto::OptionHeader::decode(&hb)?;
        out.clear();
        if h.length > cfg.max_option_bytes {
            if h.option != proto::OPT_EXPORT_NAME {
                reply(
                    &mut out,
                    h.option,
                    proto::REP_ERR_TOO_BIG,
                    b"option data too long",
                )?;
                wr.write_all(&out).await?;
                // Closing with the option's data unread would reset the connection, and a
                // reset can destroy the reply before the client reads it: end our side, then
                // read (and drop) a bounded part of the data for a moment before closing.
                let _ = wr.shutdown().await;
                let n = u64::from(h.length).min(TOO_BIG_DRAIN_BYTES);
                let mut sink = tokio::io::sink();
                let _ = tokio::time::timeout(
                    TOO_BIG_DRAIN_TIME,
                    tokio::io::copy(&mut (&mut *rd).take(n), &mut sink),
                )
                .await;
            }
            return Err(ConnError::OptionTooLong {
                option: h.option,
                length: h.length,
                limit: cfg.max_option_bytes,
            });
        }
        let mut data = vec![0u8; h.length as usize];
        rd.read_exact(&mut data).await?;
        debug!(
            option = proto::option_name(h.option),
            length = h.length,
            "NBD option"
        );
        if let Some(name) = requested_export(h.option, &data) {
            wait_for_export(shared, &name).await;
        }
        let mut next = handle_option(shared, &mut st, h.option, &data, &mut out)?;
        // The session is recorded by the very volume the connection is about to serve, before
        // the client hears that it may send requests.
        if let (Next::Go(session), Some(client)) = (&next, st.client)
            && let Err(e) = session.volume.open_session(client).await
        {
            info!(volume = session.name, session = %client, error = %e,
                "client session not recorded; connection refused");
            if h.option == proto::OPT_EXPORT_NAME {
                return Err(ConnError::Session(e.to_string()));
            }
            out.clear();
            let msg = format!("the client session could not be recorded: {e}");
            reply(&mut out, h.option, proto::REP_ERR_SHUTDOWN, msg.as_bytes())?;
            next = Next::Continue;
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
        }
        match next {
            Next::Continue => {}
            Next::Abort => return Ok(None),
            Next::Go(session) => return Ok(Some(session)),
        }
    }
    Err(ConnError::TooManyOptions(cfg.max_options))
}

/// Longest wait for an export that is not there yet while the exports settle.
const SETTLING_WAIT: Duration = Duration::from_secs(5);

/// The export an option names, if it names one (malformed data: none; the option's handler
/// answers that).
fn requested_export(opt: u32, data: &[u8]) -> Option<String> {
    match opt {
        proto::OPT_EXPORT_NAME => proto::to_string(data, "export name").ok(),
        proto::OPT_INFO | proto::OPT_GO => proto::InfoRequest::decode(data).ok().map(|r| r.name),
        proto::OPT_SET_META_CONTEXT | proto::OPT_LIST_META_CONTEXT => {
            proto::MetaContextRequest::decode(data)
                .ok()
                .map(|r| r.export)
        }
        _ => None,
    }
}

/// While the exports settle (a node that has just started), waits up to [`SETTLING_WAIT`]
/// for `name` to appear, so a client that connects right after a restart is not refused an
/// export the node is about to open. Otherwise returns at once.
async fn wait_for_export<E: Exports>(shared: &Shared<E>, name: &str) {
    if shared.exports.get(name).is_some() || !shared.exports.settling() {
        return;
    }
    let deadline = tokio::time::Instant::now() + SETTLING_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if shared.exports.get(name).is_some() {
            return;
        }
    }
}

fn reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) -> Result<(), ConnError> {
    proto::encode_option_reply(out, option, reply_type, data)?;
    Ok(())
}

fn session<V: Volume>(
    volume: Arc<V>,
    info: ExportInfo,
    st: &Haggle,
    max_payload: u32,
    enforce_alignment: bool,
) -> Session<V> {
    let style = st.reply_style();
    let base_allocation = match &st.meta {
        Some((export, true)) if *export == info.name => Some(BASE_ALLOCATION_ID),
        _ => None,
    };
    Session {
        flags: transmission_flags(&info, style),
        limits: block_limits(&info, max_payload),
        volume,
        size: info.size,
        read_only: info.read_only,
        name: info.name,
        reply_style: style,
        base_allocation,
        enforce_alignment,
        client: st.client,
    }
}

/// Handles one option, appending its replies to `out`.
fn handle_option<E: Exports>(
    shared: &Shared<E>,
    st: &mut Haggle,
    opt: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<Next<E::V>, ConnError> {
    let max_payload = shared.config.max_payload();
    match opt {
        proto::OPT_EXPORT_NAME => {
            if st.extended {
                return Err(ConnError::Violation(
                    "NBD_OPT_EXPORT_NAME after extended headers were negotiated",
                ));
            }
            let name = proto::to_string(data, "export name")?;
            let Some(volume) = shared.exports.get(&name) else {
                return Err(ConnError::UnknownExport(name));
            };
            let info = volume.info();
            let s = session(volume, info, st, max_payload, false);
            out.extend_from_slice(&proto::encode_export_name_reply(
                s.size,
                s.flags,
                st.no_zeroes,
            ));
            Ok(Next::Go(s))
        }
        proto::OPT_ABORT => {
            reply(out, opt, proto::REP_ACK, b"")?;
            Ok(Next::Abort)
        }
        proto::OPT_LIST => {
            if !data.is_empty() {
                reply(
                    out,
                    opt,
                    proto::REP_ERR_INVALID,
                    b"NBD_OPT_LIST takes no data",
                )?;
            } else {
                for info in shared.exports.list() {
                    reply(
                        out,
                        opt,
                        proto::REP_SERVER,
                        &proto::encode_rep_server(&info.name),
                    )?;
                }
                reply(out, opt, proto::REP_ACK, b"")?;
            }
            Ok(Next::Continue)
        }
        proto::OPT_INFO | proto::OPT_GO => {
            let Ok(req) = proto::InfoRequest::decode(data) else {
                reply(out, opt, proto::REP_ERR_INVALID, b"malformed info request")?;
                return Ok(Next::Continue);
            };
            let Some(volume) = shared.exports.get(&req.name) else {
                reply(out, opt, proto::REP_ERR_UNKNOWN, b"unknown export")?;
                return Ok(Next::Continue);
            };
            let info = volume.info();
            let wants = |t: u16| req.requests.contains(&t);
            let limits = block_limits(&info, max_payload);
            let flags = transmission_flags(&info, st.reply_style());
            reply(
                out,
                opt,
                proto::REP_INFO,
                &proto::encode_info_export(info.size, flags),
            )?;
            if wants(proto::INFO_NAME) {
                let item = proto::encode_info_string(proto::INFO_NAME, &info.name);
                reply(out, opt, proto::REP_INFO, &item)?;
            }
            if wants(proto::INFO_DESCRIPTION) && !info.description.is_empty() {
                let item = proto::encode_info_string(proto::INFO_DESCRIPTION, &info.description);
                reply(out, opt, proto::REP_INFO, &item)?;
            }
            // Sent even when not asked for: it is harmless and tells every client the limits.
            let bs = proto::encode_info_block_size(limits.min, limits.preferred, limits.max);
            reply(out, opt, proto::REP_INFO, &bs)?;
            reply(out, opt, proto::REP_ACK, b"")?;
            if opt == proto::OPT_GO {
                let enforce = wants(proto::INFO_BLOCK_SIZE);
                return Ok(Next::Go(session(volume, info, st, max_payload, enforce)));
            }
            Ok(Next::Continue)
        }
        proto::OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                reply(out, opt, proto::REP_ERR_INVALID, b"option takes no data")?;
            } else if st.extended {
                reply(
                    out,
                    opt,
                    proto::REP_ERR_EXT_HEADER_REQD,
                    b"extended headers already negotiated",
                )?;
            } else {
                st.structured = true;
                reply(out, opt, proto::REP_ACK, b"")?;
            }
            Ok(Next::Continue)
        }
        proto::OPT_EXTENDED_HEADERS => {
            if !data.is_empty() {
                reply(out, opt, proto::REP_ERR_INVALID, b"option takes no data")?;
            } else {
                st.extended = true;
                reply(out, opt, proto::REP_ACK, b"")?;
            }
            Ok(Next::Continue)
        }
        proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
            meta_context(shared, st, opt, data, out)?;
            Ok(Next::Continue)
        }
        proto::OPT_STARTTLS => {
            reply(out, opt, proto::REP_ERR_UNSUP, b"TLS is not supported")?;
            Ok(Next::Continue)
        }
        proto::OPT_SESSION => {
            match ClientSession::decode(data) {
                Some(s) => {
                    st.client = Some(s);
                    reply(out, opt, proto::REP_ACK, b"")?;
                }
                None => reply(
                    out,
                    opt,
                    proto::REP_ERR_INVALID,
                    b"a session is 16 bytes: client id and generation",
                )?,
            }
            Ok(Next::Continue)
        }
        _ => {
            reply(out, opt, proto::REP_ERR_UNSUP, b"unsupported option")?;
            Ok(Next::Continue)
        }
    }
}

fn meta_context<E: Exports>(
    shared: &Shared<E>,
    st: &mut Haggle,
    opt: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), ConnError> {
    let set = opt == proto::OPT_SET_META_CONTEXT;
    if set {
        // A SET replaces the previous selection, even when it fails.
        st.meta = None;
    }
    if !st.structured && !st.extended {
        return reply(
            out,
            opt,
            proto::REP_ERR_INVALID,
            b"negotiate structured replies or extended headers first",
        );
    }
    let Ok(req) = proto::MetaContextRequest::decode(data) else {
        return reply(
            out,
            opt,
            proto::REP_ERR_INVALID,
            b"malformed meta context request",
        );
    };
    let Some(volume) = shared.exports.get(&req.export) else {
        return reply(out, opt, proto::REP_ERR_UNKNOWN, b"unknown export");
    };
    // With no query, LIST returns everything; SET selects nothing.
    let mut base_allocation = !set && req.queries.is_empty();
    for q in &req.queries {
        let Some((namespace, leaf)) = q.split_once(':') else {
            return reply(out, opt, proto::REP_ERR_INVALID, b"query lacks a namespace");
        };
        // Unknown namespaces and unknown base: leaves are ignored, as the specification says;
        // the bare "base:" is a wildcard for LIST and ignored by SET.
        if namespace == "base" && (leaf == "allocation" || (!set && leaf.is_empty())) {
            base_allocation = true;
        }
    }
    if base_allocation {
        // LIST replies carry id 0, as the specification recommends.
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let item = proto::encode_rep_meta_context(id, proto::CONTEXT_BASE_ALLOCATION);
        reply(out, opt, proto::REP_META_CONTEXT, &item)?;
    }
    reply(out, opt, proto::REP_ACK, b"")?;
    if set {
        st.meta = Some((volume.info().name, base_allocation));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(min: u32, preferred: u32, max: u32) -> ExportInfo {
        ExportInfo {
            name: "v".into(),
            description: String::new(),
            size: 1 << 30,
            read_only: false,
            multi_conn: true,
            min_block: min,
            preferred_block: preferred,
            max_block: max,
        }
    }

    #[test]
    fn block_limits_are_sanitised() {
        let l = |min, pref, max| {
            let b = block_limits(&info(min, pref, max), 32 << 20);
            (b.min, b.preferred, b.max)
        };
        assert_eq!(l(512, 4096, 32 << 20), (512, 4096, 32 << 20));
        assert_eq!(
            l(512, 4096, 64 << 20),
            (512, 4096, 32 << 20),
            "capped by the server"
        );
        assert_eq!(
            l(3, 4096, 1 << 20),
            (1, 4096, 1 << 20),
            "min not a power of two"
        );
        assert_eq!(
            l(1 << 17, 4096, 1 << 20),
            (1, 4096, 1 << 20),
            "min above 64 KiB"
        );
        assert_eq!(
            l(4096, 512, 1 << 20),
            (4096, 4096, 1 << 20),
            "preferred below min"
        );
        assert_eq!(
            l(512, 3000, 1 << 20),
            (512, 4096, 1 << 20),
            "preferred rounded up"
        );
        assert_eq!(
            l(512, 4096, 100_000),
            (512, 4096, 99_840),
            "max a multiple of min"
        );
        assert_eq!(l(512, 4096, 0), (512, 4096, 4096), "max at least preferred");
        assert_eq!(l(0, 0, u32::MAX), (1, 512, 32 << 20));
        // A payload limit that is not a power of two: the preferred size stays under it.
        let b = block_limits(&info(512, 4 << 20, 64 << 20), 3 << 20);
        assert_eq!((b.min, b.preferred, b.max), (512, 2 << 20, 3 << 20));
        let b = block_limits(&info(512, 1 << 30, 64 << 20), 32 << 20);
        assert_eq!((b.preferred, b.max), (32 << 20, 32 << 20));
    }

    #[test]
    fn flags_follow_the_export() {
        let rw = info(512, 4096, 1 << 20);
        let f = transmission_flags(&rw, ReplyStyle::Simple);
        assert_eq!(f & proto::TFLAG_READ_ONLY, 0);
        assert_ne!(f & proto::TFLAG_SEND_FAST_ZERO, 0);
        assert_ne!(f & proto::TFLAG_CAN_MULTI_CONN, 0);
        assert_eq!(f & proto::TFLAG_SEND_DF, 0, "DF needs structured replies");
        assert_ne!(
            transmission_flags(&rw, ReplyStyle::Extended) & proto::TFLAG_SEND_DF,
            0
        );
        let ro = ExportInfo {
            read_only: true,
            multi_conn: false,
            ..rw
        };
        let f = transmission_flags(&ro, ReplyStyle::Structured);
        assert_ne!(f & proto::TFLAG_READ_ONLY, 0);
        assert_eq!(
            f & (proto::TFLAG_SEND_TRIM
                | proto::TFLAG_SEND_WRITE_ZEROES
                | proto::TFLAG_SEND_FAST_ZERO
                | proto::TFLAG_CAN_MULTI_CONN),
            0
        );
    }

    #[test]
    fn config_validation() {
        assert_eq!(ServerConfig::default().validate(), Ok(()));
        let bad = ServerConfig {
            max_inflight_bytes: common::ByteSize(1 << 20),
            ..ServerConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "max-inflight-bytes");
        let bad = ServerConfig {
            max_volume_inflight_bytes: common::ByteSize(16 << 20),
            ..ServerConfig::default()
        };
        assert_eq!(
            bad.validate().unwrap_err().field,
            "max-volume-inflight-bytes"
        );
        let bad = ServerConfig {
            max_payload_bytes: common::ByteSize(1000),
            ..ServerConfig::default()
        };
        assert!(bad.validate().is_err());
        let parsed: ServerConfig = toml::from_str(
            "max-payload-bytes = \"16MiB\"\nhandshake-timeout = \"5s\"\nmax-inflight-requests = 64\n",
        )
        .unwrap();
        assert_eq!(parsed.max_payload_bytes.bytes(), 16 << 20);
        assert_eq!(parsed.handshake_timeout, Duration::from_secs(5));
        assert_eq!(parsed.max_inflight_requests, 64);
        assert_eq!(parsed.max_connections, 1024);
        assert!(toml::from_str::<ServerConfig>("bogus = 1\n").is_err());
    }
}
