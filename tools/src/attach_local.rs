//! `stockade volume attach NAME --local`: a small NBD endpoint on the client machine.
//!
//! Unmodified NBD clients (nbdfuse, QEMU, fio, nbd-client) connect to it on loopback; it serves
//! one export, the volume, whose storage is the cluster reached through the head nodes'
//! NBD servers ([`head_node::nbd::client::RemoteVolume`]). When the head node it uses dies, it
//! connects to the next one and sends again every request that had not been answered, so the
//! client sees a pause, never an error — until the cluster stays unreachable for the retry
//! deadline (60 s by default); then the requests fail with `EIO`.
//!
//! The local side is the head node's own NBD server (`head_node::nbd::NbdServer`): fixed
//! newstyle, structured replies, extended headers, block status, multi-conn when the cluster
//! advertises it, block sizes as the cluster advertises them. Its `/metrics` carry the
//! `stockade_nbd_*` families of that server (as the client sees the volume) and the
//! `stockade_attach_*` families of the path to the cluster (see `docs/metrics.md`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tools::attach_local::AttachError> {
//! use tools::attach_local::{LocalConfig, LocalEndpoint};
//!
//! let heads = vec!["127.0.0.1:10810".parse().unwrap(), "127.0.0.1:10811".parse().unwrap()];
//! let endpoint = LocalEndpoint::start(LocalConfig::new("vol0", heads)).await?;
//! println!("{}", endpoint.uri()); // nbd://127.0.0.1:10809/vol0
//! endpoint.stop().await
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::metrics::MetricsError;
use head_node::nbd::client::{RemoteConfig, RemoteError, RemoteVolume};
use head_node::nbd::{ExportInfo, Exports, NbdServer, ServerConfig, ServerError, Volume};
use prometheus::Registry;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

/// Where the endpoint listens unless told otherwise (the standard NBD port, loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// Default retry deadline.
pub const DEFAULT_RETRY_DEADLINE: Duration = Duration::from_secs(60);
/// A head node answers slow requests within its own failover timeout (30 s); an attempt
/// unanswered for longer than this means a hung head node.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(35);

/// What the endpoint serves and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// The volume (the export name on the head nodes and locally).
    pub export: String,
    /// The NBD addresses of the head nodes serving the volume, tried round robin.
    pub heads: Vec<SocketAddr>,
    /// Local NBD address.
    pub listen: SocketAddr,
    /// Address of the endpoint's `/metrics`, if wanted.
    pub metrics_listen: Option<SocketAddr>,
    /// A JSON file written once the endpoint serves ([`LocalReady`]), removed when it stops.
    pub ready_file: Option<PathBuf>,
    /// How long a request is retried through other head nodes before it fails with `EIO`.
    pub retry_deadline: Duration,
    /// An attempt unanswered this long means a hung head node: the request goes to another.
    pub request_timeout: Duration,
}

impl LocalConfig {
    /// `export` through `heads`, on [`DEFAULT_LISTEN`], no metrics, no ready file, 60 s retry
    /// deadline.
    pub fn new(export: impl Into<String>, heads: Vec<SocketAddr>) -> Self {
        Self {
            export: export.into(),
            heads,
            listen: default_listen(),
            metrics_listen: None,
            ready_file: None,
            retry_deadline: DEFAULT_RETRY_DEADLINE,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// The settings of the remote volume behind the endpoint.
    pub fn remote(&self) -> RemoteConfig {
        RemoteConfig {
            retry_deadline: self.retry_deadline,
            request_timeout: self.request_timeout.min(self.retry_deadline),
            ..RemoteConfig::new(self.export.clone(), self.heads.clone())
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10809))
}

fn parse_duration(s: &str) -> Result<Duration, common::units::UnitError> {
    common::units::parse_duration(s)
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    match common::units::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// The `--local` options of `stockade volume attach`, to flatten into that command.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LocalArgs {
    /// Run a local NBD endpoint in this process that forwards to the volume's head nodes and
    /// rides through a head node's death (reconnects elsewhere, retries what was not answered).
    /// It serves until Ctrl-C/SIGTERM, then detaches the attachment it made.
    #[arg(long)]
    pub local: bool,
    /// Address of the local NBD endpoint (keep it on loopback: NBD has no authentication).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN, requires = "local")]
    pub listen: SocketAddr,
    /// Serve the endpoint's Prometheus metrics on this address (`GET /metrics`).
    #[arg(long, value_name = "ADDR", requires = "local")]
    pub metrics_listen: Option<SocketAddr>,
    /// Write a JSON file with the endpoint's addresses and URI once it serves.
    #[arg(long, value_name = "PATH", requires = "local")]
    pub ready_file: Option<PathBuf>,
    /// How long a request is retried through other head nodes before the client gets an I/O
    /// error (e.g. `60s`, `5m`).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration,
          requires = "local")]
    pub retry_deadline: Duration,
    /// How long a request may go unanswered by one head node before it is sent through
    /// another. Keep it above the head nodes' failover timeout (30 s by default), or a slow but
    /// healthy cluster is taken for a hung head node.
    #[arg(long, value_name = "DURATION", default_value = "35s", value_parser = positive_duration,
          requires = "local")]
    pub request_timeout: Duration,
}

impl LocalArgs {
    /// The endpoint configuration for `export` served by `heads` (from the control plane).
    pub fn config(&self, export: impl Into<String>, heads: Vec<SocketAddr>) -> LocalConfig {
        LocalConfig {
            export: export.into(),
            heads,
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            ready_file: self.ready_file.clone(),
            retry_deadline: self.retry_deadline,
            request_timeout: self.request_timeout,
        }
    }
}

/// The ready file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalReady {
    /// Always `attach-local`.
    pub role: String,
    /// The export.
    pub export: String,
    /// The local NBD address actually bound.
    pub nbd: SocketAddr,
    /// The metrics address actually bound, if any.
    pub metrics: Option<SocketAddr>,
    /// The NBD URI clients should use.
    pub uri: String,
    /// The head nodes.
    pub heads: Vec<SocketAddr>,
    /// Process id.
    pub pid: u32,
}

/// Why the endpoint could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A setting is invalid, or no head node served the volume within the retry deadline.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// An address could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The local NBD server failed to start or stopped with an error.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Registering metrics failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The ready file could not be written.
    #[error("writing the ready file: {0}")]
    ReadyFile(#[source] head_node::state::StateError),
    /// A task of the endpoint panicked.
    #[error("the local NBD server task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// Stopped (Ctrl-C, SIGTERM) before the endpoint served: no URI was printed, so a script
    /// waiting for one must see a failure, not a success.
    #[error("interrupted before the local endpoint served")]
    Interrupted,
}

/// The single export of the endpoint.
#[derive(Debug)]
struct OneExport {
    name: String,
    volume: Arc<RemoteVolume>,
}

impl Exports for OneExport {
    type V = RemoteVolume;

    fn get(&self, name: &str) -> Option<Arc<RemoteVolume>> {
        (name.is_empty() || name == self.name).then(|| self.volume.clone())
    }

    fn list(&self) -> Vec<ExportInfo> {
        vec![self.volume.info()]
    }
}

/// A running endpoint. Stop it with [`LocalEndpoint::stop`]; dropping it leaves the tasks
/// running until the runtime ends.
#[derive(Debug)]
pub struct LocalEndpoint {
    export: String,
    nbd_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    volume: Arc<RemoteVolume>,
    registry: Registry,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), ServerError>>,
    metrics: Option<JoinHandle<std::io::Result<()>>>,
    ready_file: Option<PathBuf>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, AttachError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AttachError::Listen { addr, source })
}

fn local_addr(l: &TcpListener, asked: SocketAddr) -> Result<SocketAddr, AttachError> {
    l.local_addr().map_err(|source| AttachError::Listen {
        addr: asked,
        source,
    })
}

impl LocalEndpoint {
    /// Binds the local addresses, connects to the cluster (trying every head node until the
    /// retry deadline) and starts serving.
    pub async fn start(cfg: LocalConfig) -> Result<Self, AttachError> {
        let remote = cfg.remote();
        remote.validate()?;
        let listener = bind(cfg.listen).await?;
        let nbd_addr = local_addr(&listener, cfg.listen)?;
        let metrics_listener = match cfg.metrics_listen {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        let metrics_addr = match (&metrics_listener, cfg.metrics_listen) {
            (Some(l), Some(a)) => Some(local_addr(l, a)?),
            _ => None,
        };
        let registry = common::metrics::new_registry();
        let volume = RemoteVolume::connect(remote, &registry).await?;
        let server_cfg = ServerConfig {
            // Requests still retrying when the endpoint stops get until the deadline.
            shutdown_grace: cfg.retry_deadline,
            ..ServerConfig::default()
        };
        let exports = Arc::new(OneExport {
            name: cfg.export.clone(),
            volume: volume.clone(),
        });
        let server = NbdServer::new(exports, server_cfg, &registry)?;
        let (stop, stop_rx) = watch::channel(false);
        let server = {
            let mut rx = stop_rx.clone();
            tokio::spawn(async move {
                server
                    .serve(listener, async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await
            })
        };
        let metrics = metrics_listener.map(|l| {
            let mut rx = stop_rx.clone();
            let router = common::metrics::router(registry.clone());
            tokio::spawn(common::metrics::serve(l, router, async move {
                let _ = rx.wait_for(|s| *s).await;
            }))
        });
        let ep = Self {
            export: cfg.export.clone(),
            nbd_addr,
            metrics_addr,
            volume,
            registry,
            stop,
            server,
            metrics,
            ready_file: cfg.ready_file.clone(),
        };
        info!(volume = ep.export, nbd = %nbd_addr, metrics = ?metrics_addr,
            head = ?ep.current_head(), "local NBD endpoint serving");
        if let Some(path) = &cfg.ready_file {
            let ready = LocalReady {
                role: "attach-local".into(),
                export: cfg.export.clone(),
                nbd: nbd_addr,
                metrics: metrics_addr,
                uri: ep.uri(),
                heads: cfg.heads.clone(),
                pid: std::process::id(),
            };
            if let Err(e) = head_node::state::write_json_atomic(path, &ready) {
                // The ready-file error is the one worth reporting.
                let _ = ep.stop_tasks().await;
                return Err(AttachError::ReadyFile(e));
            }
        }
        Ok(ep)
    }

    /// The local NBD address.
    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd_addr
    }

    /// The metrics address, when serving metrics.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The NBD URI clients should use.
    pub fn uri(&self) -> String {
        nbd_uri(self.nbd_addr, &self.export)
    }

    /// The head node currently in use, if connected.
    pub fn current_head(&self) -> Option<SocketAddr> {
        self.volume.current_head()
    }

    /// The volume behind the endpoint.
    pub fn volume(&self) -> &Arc<RemoteVolume> {
        &self.volume
    }

    /// The endpoint's metrics registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Stops: local connections answer the requests they hold (still retrying through the
    /// cluster, up to the retry deadline) and close; the connection to the head node ends with
    /// `NBD_CMD_DISC`; the ready file is removed.
    pub async fn stop(self) -> Result<(), AttachError> {
        if let Some(path) = &self.ready_file {
            let _ = std::fs::remove_file(path);
        }
        self.stop_tasks().await
    }

    async fn stop_tasks(self) -> Result<(), AttachError> {
        info!(volume = self.export, "local NBD endpoint stopping");
        self.volume.close();
        self.stop.send_replace(true);
        let served = self.server.await;
        self.volume.shutdown().await;
        if let Some(m) = self.metrics {
            // The metrics server has nothing to drain; its outcome does not matter any more.
            let _ = m.await;
        }
        served.map_err(AttachError::Task)??;
        Ok(())
    }
}

/// Runs an endpoint until `shutdown` resolves: starts it, prints its URI (one line on stdout),
/// waits, stops it.
pub async fn serve_local(
    cfg: LocalConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AttachError> {
    tokio::pin!(shutdown);
    // A signal while the endpoint is still starting (it retries the head nodes for a while)
    // ends it at once, as a failure: it never served.
    let ep = tokio::select! {
        r = LocalEndpoint::start(cfg) => r?,
        () = &mut shutdown => return Err(AttachError::Interrupted),
    };
    // Nothing useful can be done when stdout is gone; the endpoint serves anyway.
    let _ = print_uri(&ep);
    shutdown.await;
    ep.stop().await
}

/// Prints the endpoint's NBD URI as one line on stdout.
pub fn print_uri(ep: &LocalEndpoint) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", ep.uri())?;
    out.flush()
}

/// The NBD URI (`nbd://HOST:PORT/EXPORT`, as libnbd, QEMU and nbdfuse read it) of `export` at
/// `addr`; characters outside the URI's unreserved set are percent-encoded.
pub fn nbd_uri(addr: SocketAddr, export: &str) -> String {
    let mut name = String::with_capacity(export.len());
    for b in export.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            name.push(char::from(b));
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    format!("nbd://{addr}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        local: LocalArgs,
    }

    #[test]
    fn args_have_documented_defaults() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.local.listen, default_listen());
        assert_eq!(cli.local.retry_deadline, DEFAULT_RETRY_DEADLINE);
        assert_eq!(cli.local.metrics_listen, None);
        assert!(!cli.local.local);
        assert!(Cli::try_parse_from(["x", "--listen", "127.0.0.1:0"]).is_err());
        let cli = Cli::try_parse_from([
            "x",
            "--local",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:9100",
            "--ready-file",
            "/tmp/r.json",
            "--retry-deadline",
            "5m",
            "--request-timeout",
            "40s",
        ])
        .unwrap();
        let heads = vec!["127.0.0.1:1".parse().unwrap()];
        let cfg = cli.local.config("vol0", heads.clone());
        assert_eq!(cfg.export, "vol0");
        assert_eq!(cfg.heads, heads);
        assert_eq!(cfg.listen.port(), 0);
        assert_eq!(cfg.metrics_listen.map(|a| a.port()), Some(9100));
        assert_eq!(cfg.retry_deadline, Duration::from_secs(300));
        assert_eq!(cfg.remote().request_timeout, Duration::from_secs(40));
        let defaults = Cli::try_parse_from(["x", "--local"]).unwrap().local;
        assert_eq!(defaults.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert!(Cli::try_parse_from(["x", "--local", "--request-timeout", "0s"]).is_err());
        assert!(Cli::try_parse_from(["x", "--local", "--retry-deadline", "soon"]).is_err());
        assert!(Cli::try_parse_from(["x", "--local", "--listen", "nowhere"]).is_err());
        let short = LocalConfig {
            retry_deadline: Duration::from_secs(5),
            ..LocalConfig::new("v", heads)
        };
        assert_eq!(short.remote().request_timeout, Duration::from_secs(5));
    }

    #[test]
    fn uris_are_what_nbd_clients_expect() {
        let a: SocketAddr = "127.0.0.1:10809".parse().unwrap();
        assert_eq!(nbd_uri(a, "vol0"), "nbd://127.0.0.1:10809/vol0");
        assert_eq!(nbd_uri(a, "a b/c"), "nbd://127.0.0.1:10809/a%20b%2Fc");
        let v6: SocketAddr = "[::1]:10809".parse().unwrap();
        assert_eq!(nbd_uri(v6, "v"), "nbd://[::1]:10809/v");
    }

    #[tokio::test]
    async fn a_cluster_that_never_answers_fails_the_start_cleanly() {
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let cfg = LocalConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            retry_deadline: Duration::from_millis(200),
            ..LocalConfig::new("vol0", vec![dead])
        };
        match LocalEndpoint::start(cfg).await {
            Err(AttachError::Remote(RemoteError::Unreachable { .. })) => {}
            other => panic!("{other:?}"),
        }
        let cfg = LocalConfig::new("vol0", vec![]);
        assert!(matches!(
            LocalEndpoint::start(cfg).await,
            Err(AttachError::Remote(RemoteError::Config { .. }))
        ));
    }
}
