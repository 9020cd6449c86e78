//! Starting and stopping a sled controller: open (or format) the devices, start their drivers,
//! serve the protocol and `/metrics`, and stop cleanly.

use crate::config::{ConfigError, EngineKind, FormatPolicy, SledConfig, Threading};
use crate::device::core::{CoreConfig, DeviceCore};
use crate::device::open::{OpenError, format, looks_empty, read_superblock};
use crate::device::thread::{spawn_device, spawn_device_task};
use crate::engine::IoEngine;
use crate::engine::devfile::{DevFile, DevFileError};
use crate::engine::sync::SyncEngine;
use crate::engine::uring::UringEngine;
use crate::layout::LayoutError;
use crate::metrics::SledMetrics;
use crate::server::{ConnLimits, serve};
use crate::sled::{Device, Sled};
use common::aligned::BufPool;
use common::clock::{SharedClock, SystemClock};
use common::cred::{ClusterKey, KeyError};
use common::ids::{SledId, Uuid128};
use std::net::SocketAddr;
use std::sync::Arc;

/// Errors starting a sled controller.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cluster key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A device could not be opened.
    #[error(transparent)]
    DevFile(#[from] DevFileError),
    /// A device's format.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// An engine could not be created.
    #[error("starting the {engine:?} engine on {path}: {source}")]
    Engine {
        /// Engine.
        engine: EngineKind,
        /// Device.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A blank device beside formatted ones, without `format = "force"`.
    #[error(
        "device {path} is blank but the sled's other devices are formatted (sled {sled}): if it replaces a failed device, the chunks that device held are gone, and this sled would read them as zeros for volumes that still count it current. Retire the whole sled instead (docs/deploy.md, \"One device of a sled with several dies\"); to add the device as new capacity, set format = \"force\" for it in the configuration"
    )]
    JoinsFormattedSled {
        /// The blank device.
        path: String,
        /// The sled its other devices belong to.
        sled: SledId,
    },
    /// Devices disagree.
    #[error("{0}")]
    Mismatch(String),
    /// A listener could not be bound.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Metrics registration.
    #[error(transparent)]
    Metrics(#[from] common::metrics::MetricsError),
    /// Writing the ready file.
    #[error("writing ready file {path}: {source}")]
    ReadyFile {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the ready file holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReadyInfo {
    /// Role.
    pub role: String,
    /// Sled id.
    pub sled_id: String,
    /// Protocol address.
    pub listen: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// Process id.
    pub pid: u32,
}

/// A running sled controller.
#[derive(Debug)]
pub struct Running {
    /// Bound protocol address.
    pub listen: SocketAddr,
    /// Bound metrics address.
    pub metrics: SocketAddr,
    /// The sled's id.
    pub sled_id: SledId,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    device_tasks: Vec<tokio::task::JoinHandle<()>>,
    sled: Option<Arc<Sled>>,
}

impl Running {
    /// Stops serving, lets every device answer what it holds and write back its checksums, and
    /// waits for the device drivers (tasks or threads).
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        // Dropping the last reference to the sled drops the device handles: each driver sees
        // its queue close, finishes, writes back its checksums and exits.
        self.sled.take();
        for t in self.device_tasks.drain(..) {
            let _ = t.await;
        }
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

fn engine_for(
    kind: EngineKind,
    dev: DevFile,
    depth: u32,
    path: &str,
    pool: Option<&BufPool>,
) -> Result<Box<dyn IoEngine>, StartError> {
    Ok(match kind {
        EngineKind::Uring => {
            let mut engine = UringEngine::new(dev, depth).map_err(|source| StartError::Engine {
                engine: kind,
                path: path.to_string(),
                source,
            })?;
            if let Some(pool) = pool
                && let Err(e) = engine.register_pool(pool)
            {
                // Still correct without it: every operation then pins its pages itself.
                tracing::warn!(device = path, error = %e, bytes = pool.region().1,
                    "cannot register the I/O buffer region with io_uring; using unregistered \
                     buffers (raise the locked-memory limit, or set registered-buffers = 0)");
            }
            Box::new(engine)
        }
        EngineKind::Sync => Box::new(SyncEngine::new(dev, depth as usize)),
    })
}

impl IoEngine for Box<dyn IoEngine> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn capacity(&self) -> usize {
        (**self).capacity()
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
    fn submit(&mut self, op: crate::engine::Op) -> Result<(), crate::engine::Op> {
        (**self).submit(op)
    }
    fn poll(
        &mut self,
        wait: Option<std::time::Duration>,
        doorbell: &crate::engine::Doorbell,
        out: &mut Vec<crate::engine::Completion>,
    ) -> std::io::Result<()> {
        (**self).poll(wait, doorbell, out)
    }
    fn kind(&self) -> crate::engine::DeviceKind {
        (**self).kind()
    }
    fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
        (**self).completion_fd()
    }
    fn unsubmitted(&self) -> bool {
        (**self).unsubmitted()
    }
}

/// Starts a sled controller. `registry` receives its metrics.
pub async fn start(cfg: SledConfig, registry: prometheus::Registry) -> Result<Running, StartError> {
    cfg.validate()?;
    let key = ClusterKey::load(&cfg.cluster_key_file)?;
    let metrics = SledMetrics::new(&registry)?;
    let pool =
        (cfg.registered_buffers.0 > 0).then(|| BufPool::new(cfg.registered_buffers.0 as usize));
    if let Some(p) = &pool {
        crate::metrics::register_pool(&registry, p)?;
    }
    let clock: SharedClock = Arc::new(SystemClock::new());

    // Open every device; learn the sled id and chunk size from those already formatted.
    let mut engines = Vec::new();
    let mut sled_id: Option<SledId> = None;
    let mut chunk_size: Option<u64> = None;
    for d in &cfg.device {
        let path = d.path.display().to_string();
        let dev = DevFile::open(&d.path, d.size.map(|s| s.0))?;
        let mut engine = engine_for(cfg.io_engine, dev, cfg.queue_depth, &path, pool.as_ref())?;
        let formatted = match read_superblock(&mut engine, &path) {
            Ok(sb) => Some(sb),
            Err(OpenError::Layout {
                source: LayoutError::NotFormatted,
                ..
            }) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(sb) = formatted {
            if let Some(id) = sled_id
                && id != sb.sled
            {
                return Err(StartError::Mismatch(format!(
                    "device {path} belongs to sled {}, other devices to {id}",
                    sb.sled
                )));
            }
            sled_id = Some(sb.sled);
            if let Some(cs) = chunk_size
                && cs != sb.geometry.chunk_size
            {
                return Err(StartError::Mismatch(format!(
                    "device {path} has {}-byte chunks, other devices {cs}: all devices of a sled share a chunk size",
                    sb.geometry.chunk_size
                )));
            }
            chunk_size = Some(sb.geometry.chunk_size);
        }
        engines.push((path, d.format, engine, formatted.is_some()));
    }
    // A blank device joining a sled that has data is formatted only when asked for by name
    // (it cannot be told from a replacement for a lost device); checked before any device is
    // opened, so a refusal leaves every device as it was.
    if let Some(sled) = sled_id
        && let Some((path, ..)) = engines
            .iter()
            .find(|(_, policy, _, formatted)| !formatted && *policy == FormatPolicy::IfEmpty)
    {
        return Err(StartError::JoinsFormattedSled {
            path: path.clone(),
            sled,
        });
    }
    let sled_id = sled_id.unwrap_or_else(Uuid128::random);
    let chunk_size = chunk_size.unwrap_or(cfg.chunk_size.0);

    let core_cfg = CoreConfig {
        durability: cfg.durability,
        clean_after: cfg.clean_after,
        pool: pool.clone(),
        ..CoreConfig::default()
    };
    let mut devices = Vec::new();
    let mut threads = Vec::new();
    let mut device_tasks = Vec::new();
    for (path, policy, mut engine, formatted) in engines {
        if !formatted {
            let erase = match policy {
                FormatPolicy::Force => true,
                FormatPolicy::Never => false,
                FormatPolicy::IfEmpty => looks_empty(&mut engine, &path, chunk_size)?,
            };
            if !erase {
                return Err(OpenError::NotEmpty { path }.into());
            }
            let sb = format(&mut engine, &path, sled_id, chunk_size)?;
            tracing::info!(device = %path, sled_id = %sled_id, chunks = sb.geometry.chunk_count,
                chunk_size, "formatted device");
        }
        let (core, _) = DeviceCore::open(
            engine,
            &path,
            Some(sled_id),
            clock.clone(),
            core_cfg.clone(),
            metrics.device(&path),
        )?;
        let chunks_total = core.superblock().geometry.chunk_count;
        let engine_err = |source| StartError::Engine {
            engine: cfg.io_engine,
            path: path.clone(),
            source,
        };
        let handle = if cfg.threading == Threading::EventLoop {
            let (handle, task) = spawn_device_task(path.clone(), core, 1024).map_err(engine_err)?;
            device_tasks.push(task);
            handle
        } else {
            let (handle, join) = spawn_device(path.clone(), core, 1024).map_err(engine_err)?;
            threads.push(join);
            handle
        };
        tracing::info!(device = %path, chunks_total, "device ready");
        devices.push(Device {
            handle,
            path,
            chunks_total,
        });
    }
    let sled = Arc::new(Sled::new(sled_id, key, chunk_size, devices, metrics, pool).await);

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "sled protocol",
            addr: cfg.listen,
            source,
        })?;
    let listen = listener.local_addr().map_err(|source| StartError::Bind {
        what: "sled protocol",
        addr: cfg.listen,
        source,
    })?;
    let mlistener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "metrics",
            addr: cfg.metrics_listen,
            source,
        })?;
    let metrics_addr = mlistener.local_addr().map_err(|source| StartError::Bind {
        what: "metrics",
        addr: cfg.metrics_listen,
        source,
    })?;
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(serve(
        listener,
        sled.clone(),
        ConnLimits::default(),
        rx.clone(),
    )));
    let mut mrx = rx.clone();
    tasks.push(tokio::spawn(async move {
        let router = common::metrics::router(registry);
        let stop = async move {
            let _ = mrx.changed().await;
        };
        if let Err(e) = common::metrics::serve(mlistener, router, stop).await {
            tracing::error!(error = %e, "metrics server failed");
        }
    }));
    if let Some(path) = &cfg.ready_file {
        let info = ReadyInfo {
            role: "sled".into(),
            sled_id: sled_id.to_string(),
            listen,
            metrics: metrics_addr,
            pid: std::process::id(),
        };
        write_ready(path, &info).map_err(|source| StartError::ReadyFile {
            path: path.display().to_string(),
            source,
        })?;
    }
    tracing::info!(sled_id = %sled_id, %listen, metrics = %metrics_addr, "sled controller ready");
    Ok(Running {
        listen,
        metrics: metrics_addr,
        sled_id,
        shutdown,
        tasks,
        threads,
        device_tasks,
        sled: Some(sled),
    })
}

/// Writes a JSON file atomically (temp file, fsync, rename).
pub fn write_ready<T: serde::Serialize>(path: &std::path::Path, info: &T) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(info)
                .map_err(std::io::Error::other)?
                .as_bytes(),
        )?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)
}
