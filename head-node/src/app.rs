//! Starting and stopping a head node: sleds, volumes, the NBD server and the admin/metrics
//! listener.

use crate::config::{ConfigError, HeadConfig};
use crate::metrics::HeadMetrics;
use crate::nbd::{ExportInfo, Exports, NbdServer, Volume};
use crate::sleds::SledPool;
use crate::state::{StateDir, StateError};
use crate::volume::direct::DirectVolume;
use crate::volume::store::{SledStore, StoreError};
use crate::volume::{PlacementError, VolumeSpec};
use common::cred::{ClusterKey, KeyError};
use common::ids::VolumeId;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

/// Errors starting a head node.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cluster key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The state directory.
    #[error(transparent)]
    State(#[from] StateError),
    /// Sleds disagree or cannot be reached.
    #[error("{0}")]
    Sleds(String),
    /// A volume cannot be placed.
    #[error("volume {name}: {source}")]
    Placement {
        /// Volume.
        name: String,
        /// Cause.
        #[source]
        source: PlacementError,
    },
    /// A volume could not be opened on its sleds.
    #[error("volume {name}: {source}")]
    Open {
        /// Volume.
        name: String,
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// A listener.
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        /// Which.
        what: &'static str,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Metrics or NBD server setup.
    #[error("{0}")]
    Setup(String),
}

/// The volumes this node serves, by name.
#[derive(Debug, Default)]
pub struct VolumeSet {
    volumes: RwLock<BTreeMap<String, Arc<DirectVolume>>>,
}

impl VolumeSet {
    /// Adds or replaces a volume.
    pub fn insert(&self, v: Arc<DirectVolume>) {
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(v.spec().name.clone(), v);
    }

    /// Removes a volume (its connections are detached by the caller).
    pub fn remove(&self, name: &str) -> Option<Arc<DirectVolume>> {
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    /// Every volume.
    pub fn all(&self) -> Vec<Arc<DirectVolume>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl Exports for VolumeSet {
    type V = DirectVolume;

    fn get(&self, name: &str) -> Option<Arc<DirectVolume>> {
        let vols = self.volumes.read().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() && vols.len() == 1 {
            return vols.values().next().cloned();
        }
        vols.get(name).cloned()
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.all().iter().map(|v| v.info()).collect()
    }
}

/// What the ready file holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReadyInfo {
    /// Role.
    pub role: String,
    /// Node id.
    pub node_id: u64,
    /// NBD address.
    pub nbd: SocketAddr,
    /// Admin and metrics address.
    pub admin: SocketAddr,
    /// PID.
    pub pid: u32,
    /// Epoch of this run.
    pub epoch: u64,
}

/// A running head node.
#[derive(Debug)]
pub struct Running {
    /// Bound NBD address.
    pub nbd: SocketAddr,
    /// Bound admin/metrics address.
    pub admin: SocketAddr,
    /// The volumes served.
    pub volumes: Arc<VolumeSet>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops: NBD connections answer what they have in flight, then everything exits.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

/// Creates or loads a volume's description, growing it to the configured size.
fn volume_spec(
    state: &StateDir,
    name: &str,
    size: u64,
    chunk_size: u64,
    sleds: &[common::ids::SledId],
    replicas: usize,
) -> Result<VolumeSpec, StartError> {
    let placement = |source| StartError::Placement {
        name: name.to_string(),
        source,
    };
    match state.load_volume(name)? {
        Some(mut spec) => {
            if size < spec.size {
                return Err(StartError::Config(ConfigError::Invalid(format!(
                    "volume {name} is {} bytes; it cannot shrink to {size}",
                    spec.size
                ))));
            }
            if size > spec.size {
                spec.grow(size, sleds, replicas).map_err(placement)?;
                state.save_volume(&spec)?;
                tracing::info!(volume = name, size, "volume grown");
            }
            Ok(spec)
        }
        None => {
            let spec =
                VolumeSpec::place(VolumeId::random(), name, size, chunk_size, sleds, replicas)
                    .map_err(placement)?;
            state.save_volume(&spec)?;
            tracing::info!(volume = name, volume_id = %spec.id, size, "volume created");
            Ok(spec)
        }
    }
}

/// Starts a head node. `registry` receives its metrics.
pub async fn start(cfg: HeadConfig, registry: prometheus::Registry) -> Result<Running, StartError> {
    cfg.validate()?;
    let key = ClusterKey::load(&cfg.cluster_key_file)?;
    let state = StateDir::open(&cfg.state_dir)?;
    let epoch = state.bump_epoch()?;
    let metrics = HeadMetrics::new(&registry).map_err(|e| StartError::Setup(e.to_string()))?;
    let pool = Arc::new(SledPool::new(&cfg.sleds, key.clone(), cfg.node_id));
    let reached = pool.discover().await;
    if reached.is_empty() {
        return Err(StartError::Sleds(format!(
            "none of the sleds {:?} can be reached",
            cfg.sleds
        )));
    }
    // Every sled must use the same chunk size (it is a volume's chunk size).
    let mut chunk_size = None;
    for (id, conn) in &reached {
        let client = conn
            .client()
            .await
            .map_err(|e| StartError::Sleds(e.to_string()))?;
        let st = client
            .stat()
            .await
            .map_err(|e| StartError::Sleds(e.to_string()))?;
        for d in &st.devices {
            match chunk_size {
                None => chunk_size = Some(d.chunk_size),
                Some(c) if c != d.chunk_size => {
                    return Err(StartError::Sleds(format!(
                        "sled {id} uses {}-byte chunks, others {c}: all sleds must share a chunk size",
                        d.chunk_size
                    )));
                }
                Some(_) => {}
            }
        }
    }
    let chunk_size =
        chunk_size.ok_or_else(|| StartError::Sleds("the sleds report no devices".into()))?;
    let sled_ids: Vec<_> = reached.iter().map(|(id, _)| *id).collect();
    let replicas = cfg.replicas.min(sled_ids.len());
    if replicas < cfg.replicas {
        tracing::warn!(
            replicas,
            wanted = cfg.replicas,
            sleds = sled_ids.len(),
            "fewer sleds than replicas: placing fewer replicas"
        );
    }

    let volumes = Arc::new(VolumeSet::default());
    let mut epoch = epoch;
    for v in &cfg.volume {
        let spec = volume_spec(&state, &v.name, v.size.0, chunk_size, &sled_ids, replicas)?;
        let vm = metrics.volume(&v.name);
        let mut attempt = 0;
        let store = loop {
            vm.epoch.set(epoch.0 as i64);
            let store = Arc::new(SledStore::new(
                spec.clone(),
                pool.clone(),
                key.clone(),
                cfg.node_id,
                epoch,
                vm.clone(),
            ));
            match store.open().await {
                Ok(()) => break store,
                // Until volumes have a Raft group, the node started last serves the volume: it
                // claims above the holder it finds, which fences that holder out at the sleds.
                Err(StoreError::Deposed {
                    epoch: theirs,
                    holder,
                }) if attempt == 0 => {
                    tracing::warn!(volume = %v.name, stored_epoch = theirs.0, stored_holder = holder.0,
                        "volume claimed by another head node; taking it over with a higher epoch");
                    epoch = state.raise_epoch(common::ids::Epoch(theirs.0 + 1))?;
                    attempt += 1;
                }
                Err(source) => {
                    return Err(StartError::Open {
                        name: v.name.clone(),
                        source,
                    });
                }
            }
        };
        volumes.insert(Arc::new(DirectVolume::new(store)));
    }

    let server = NbdServer::new(volumes.clone(), cfg.nbd.clone(), &registry)
        .map_err(|e| StartError::Setup(e.to_string()))?;
    let nbd_listener = tokio::net::TcpListener::bind(cfg.nbd_listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "NBD",
            addr: cfg.nbd_listen,
            source,
        })?;
    let nbd = nbd_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "NBD",
            addr: cfg.nbd_listen,
            source,
        })?;
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "admin",
            addr: cfg.admin_listen,
            source,
        })?;
    let admin = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "admin",
            addr: cfg.admin_listen,
            source,
        })?;
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut nrx = rx.clone();
    tasks.push(tokio::spawn(async move {
        let stop = async move {
            let _ = nrx.wait_for(|s| *s).await;
        };
        if let Err(e) = server.serve(nbd_listener, stop).await {
            tracing::error!(error = %e, "NBD server failed");
        }
    }));
    let mut arx = rx.clone();
    tasks.push(tokio::spawn(async move {
        let router = common::metrics::router(registry);
        let stop = async move {
            let _ = arx.wait_for(|s| *s).await;
        };
        if let Err(e) = common::metrics::serve(admin_listener, router, stop).await {
            tracing::error!(error = %e, "admin server failed");
        }
    }));
    if let Some(path) = &cfg.ready_file {
        let info = ReadyInfo {
            role: "head".into(),
            node_id: cfg.node_id.0,
            nbd,
            admin,
            pid: std::process::id(),
            epoch: epoch.0,
        };
        crate::state::write_json_atomic(path, &info)?;
    }
    tracing::info!(node_id = cfg.node_id.0, epoch = epoch.0, %nbd, %admin,
        volumes = cfg.volume.len(), "head node ready");
    Ok(Running {
        nbd,
        admin,
        volumes,
        shutdown,
        tasks,
    })
}
