//! Starting and stopping a head node: the Raft log, the peer transport, one Raft group per
//! volume, the NBD server and the admin/metrics listener.

use crate::config::{ConfigError, HeadConfig};
use crate::control::state::NodeRecord;
use crate::control::{AdminRequest, ControlMetrics, ControlPlane, ControlSetup};
use crate::metrics::HeadMetrics;
use crate::nbd::{ExportInfo, Exports, NbdServer, Volume};
use crate::replication::GroupId;
use crate::replication::driver::{DriverConfig, GroupKind, SledAccess};
use crate::replication::group::GroupConfig;
use crate::replication::node::ReplNode;
use crate::replication::rvolume::ReplicatedVolume;
use crate::replication::throttle::NodeThrottle;
use crate::replication::transport::TcpTransport;
use crate::replication::wal::Wal;
use crate::replication::walpersist::{WalPersist, new_group_log};
use crate::sleds::SledPool;
use common::cred::{ClusterKey, KeyError};
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
    /// The Raft log.
    #[error("raft log in {dir}: {source}{hint}")]
    Wal {
        /// Its directory.
        dir: String,
        /// What the operator can do about it (empty, or starting with a separator).
        hint: &'static str,
        /// Cause.
        #[source]
        source: crate::replication::wal::WalError,
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
    /// Setting up a component.
    #[error("{0}")]
    Setup(String),
}

/// How long a starting node waits to catch up with the cluster state before it serves NBD
/// anyway (see [`ControlPlane::caught_up`]).
const NBD_CATCH_UP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long after a head node starts its set of exports counts as settling (see
/// [`Exports::settling`]): the node serves NBD once caught up (at most 10 s), and its view of
/// the cluster can still be a step behind then (a node restarted while the metadata group had
/// no leader learns the newest state only once one is elected).
const EXPORTS_SETTLE: std::time::Duration = std::time::Duration::from_secs(30);

/// The volumes this node serves, by name.
#[derive(Debug)]
pub struct VolumeSet {
    volumes: RwLock<BTreeMap<String, Arc<ReplicatedVolume<TcpTransport>>>>,
    started: std::time::Instant,
}

impl Default for VolumeSet {
    fn default() -> Self {
        Self {
            volumes: RwLock::default(),
            started: std::time::Instant::now(),
        }
    }
}

impl VolumeSet {
    /// Adds or replaces a volume.
    pub fn insert(&self, name: &str, v: Arc<ReplicatedVolume<TcpTransport>>) {
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), v);
    }

    /// Removes a volume (its connections are detached by the caller).
    pub fn remove(&self, name: &str) -> Option<Arc<ReplicatedVolume<TcpTransport>>> {
        self.volumes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    /// The exported volume of this name.
    pub fn by_name(&self, name: &str) -> Option<Arc<ReplicatedVolume<TcpTransport>>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Names exported.
    pub fn names(&self) -> Vec<String> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Removes the exports of `group`.
    pub fn remove_group(&self, group: GroupId) -> Vec<Arc<ReplicatedVolume<TcpTransport>>> {
        let mut vols = self.volumes.write().unwrap_or_else(|p| p.into_inner());
        let names: Vec<String> = vols
            .iter()
            .filter(|(_, v)| v.handle().group() == group)
            .map(|(n, _)| n.clone())
            .collect();
        names.iter().filter_map(|n| vols.remove(n)).collect()
    }

    /// True when `group`'s volume is exported (and not detached).
    pub fn exports_group(&self, group: GroupId) -> bool {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|v| v.handle().group() == group && !v.is_detached())
    }

    /// Every volume.
    pub fn all(&self) -> Vec<Arc<ReplicatedVolume<TcpTransport>>> {
        self.volumes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

impl Exports for VolumeSet {
    type V = ReplicatedVolume<TcpTransport>;

    fn settling(&self) -> bool {
        self.started.elapsed() < EXPORTS_SETTLE
    }

    fn get(&self, name: &str) -> Option<Arc<Self::V>> {
        let vols = self.volumes.read().unwrap_or_else(|p| p.into_inner());
        let v = if name.is_empty() && vols.len() == 1 {
            vols.values().next().cloned()
        } else {
            vols.get(name).cloned()
        };
        // A volume not created yet (its group has no leader so far) is not offered.
        v.filter(|v| v.spec().is_some())
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.all()
            .iter()
            .filter(|v| v.spec().is_some())
            .map(|v| v.info())
            .collect()
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
    /// Peer (Raft) address.
    pub peer: SocketAddr,
    /// PID.
    pub pid: u32,
}

/// A running head node.
#[derive(Debug)]
pub struct Running {
    /// Bound NBD address.
    pub nbd: SocketAddr,
    /// Bound admin/metrics address.
    pub admin: SocketAddr,
    /// Bound peer address.
    pub peer: SocketAddr,
    /// The volumes served.
    pub volumes: Arc<VolumeSet>,
    /// The replication layer.
    pub node: Arc<ReplNode<TcpTransport>>,
    /// The control plane.
    pub control: Arc<ControlPlane>,
    transport: Arc<TcpTransport>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops: NBD connections answer what they have in flight, then everything exits.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        // The NBD server answers what is in flight (forwarding may still need the peers), then
        // the peer transport closes.
        let mut tasks = std::mem::take(&mut self.tasks);
        let serve_peers = tasks.remove(0);
        for t in tasks {
            let _ = t.await;
        }
        self.transport.shutdown();
        let _ = serve_peers.await;
    }
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let err = |source| StartError::Bind { what, addr, source };
    let l = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let a = l.local_addr().map_err(err)?;
    Ok((l, a))
}

/// Reads the admin token (whitespace around it ignored).
fn read_token(path: &std::path::Path) -> Result<String, StartError> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| StartError::Setup(format!("admin token file {}: {e}", path.display())))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        return Err(StartError::Setup(format!(
            "admin token file {}: the token must be at least 16 characters",
            path.display()
        )));
    }
    Ok(t)
}

/// What to do about a Raft log that cannot be opened.
fn wal_hint(e: &crate::replication::wal::WalError) -> &'static str {
    use crate::replication::wal::WalError as W;
    match e {
        W::Corrupt { .. } | W::MissingSegment { .. } | W::Inconsistent { .. } => {
            "; the log is damaged: keep the state directory for inspection, move it away and \
             start this node with --rejoin to rebuild its state from its peers (docs/deploy.md, \
             \"A head node that lost its state\")"
        }
        _ => "",
    }
}

/// The file a rejoining node keeps in its state directory until it holds everything committed
/// in every group it runs: a restart meanwhile rejoins again.
pub const REJOIN_MARKER: &str = "REJOIN";

/// Decides whether this node rejoins (see `GroupCore::rejoining`): it does while the marker
/// is there, and `--rejoin` puts it there, but only on a node whose Raft log is empty (one
/// with a log would throw away its votes' protection for nothing).
fn prepare_rejoin(
    cfg: &HeadConfig,
    marker: &std::path::Path,
    log_empty: bool,
) -> Result<bool, StartError> {
    if marker.exists() {
        tracing::warn!(marker = %marker.display(),
            "rejoining: this node lost its Raft state; it neither votes nor campaigns until it \
             holds everything the cluster committed");
        return Ok(true);
    }
    if !cfg.rejoin {
        if log_empty && !cfg.peer.is_empty() {
            tracing::info!(state_dir = %cfg.state_dir.display(),
                "starting with an empty Raft log, as a new cluster member; if this node ran \
                 before and lost its state, stop it and start it with --rejoin");
        }
        return Ok(false);
    }
    if cfg.peer.is_empty() {
        return Err(StartError::Setup(
            "--rejoin: this node has no peers to catch up from (a single head node's lost state \
             cannot be rebuilt)"
                .into(),
        ));
    }
    if !log_empty {
        return Err(StartError::Setup(format!(
            "--rejoin is for a node that lost its Raft state, but {} holds a Raft log: start it \
             without --rejoin (a damaged log: move the state directory away first)",
            cfg.state_dir.join("wal").display()
        )));
    }
    crate::state::write_atomic(
        marker,
        b"rejoining: lost Raft state, catching up from peers\n",
    )
    .map_err(|e| StartError::Setup(format!("rejoin marker: {e}")))?;
    tracing::warn!(marker = %marker.display(),
        "rejoining: this node neither votes nor campaigns until it holds everything the cluster \
         committed");
    Ok(true)
}

/// Ends rejoining once the metadata group and every group the cluster state has this node
/// run hold everything committed: the marker goes and groups started later vote at once.
async fn finish_rejoin(
    node: Arc<ReplNode<TcpTransport>>,
    me: u64,
    marker: std::path::PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
        let Some(meta) = node.handle(GroupId::META) else {
            continue;
        };
        let ms = meta.status();
        let Some(st) = ms.cluster.clone().filter(|_| !ms.rejoining) else {
            continue;
        };
        if ms.applied < ms.committed {
            continue;
        }
        let mine: Vec<GroupId> = (st.groups.values())
            .filter(|g| g.runners().any(|n| n == me))
            .map(|g| g.id)
            .collect();
        if (mine.iter()).any(|g| node.handle(*g).is_none_or(|h| h.status().rejoining)) {
            continue;
        }
        if let Err(e) = std::fs::remove_file(&marker).and_then(|()| {
            let dir = marker.parent().unwrap_or(std::path::Path::new("."));
            std::fs::File::open(dir)?.sync_all()
        }) {
            tracing::error!(marker = %marker.display(), error = %e,
                "removing the rejoin marker failed; retrying");
            continue;
        }
        node.set_rejoining(false);
        tracing::info!(
            groups = mine.len(),
            "rejoined: this node holds everything committed in its groups and votes again"
        );
        return;
    }
}

/// Starts a head node. `registry` receives its metrics.
pub async fn start(cfg: HeadConfig, registry: prometheus::Registry) -> Result<Running, StartError> {
    cfg.validate()?;
    let key = ClusterKey::load(&cfg.cluster_key_file)?;
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        StartError::Setup(format!("state directory {}: {e}", cfg.state_dir.display()))
    })?;
    let metrics = HeadMetrics::new(&registry).map_err(|e| StartError::Setup(e.to_string()))?;

    // The Raft log of every group on this node.
    let wal_dir = cfg.state_dir.join("wal");
    let (wal, mut recovered) = {
        let (dir, wcfg, reg) = (wal_dir.clone(), cfg.wal.clone(), registry.clone());
        tokio::task::spawn_blocking(move || Wal::open(&dir, &wcfg, &reg))
            .await
            .map_err(|e| StartError::Setup(e.to_string()))?
            .map_err(|source| StartError::Wal {
                dir: wal_dir.display().to_string(),
                hint: wal_hint(&source),
                source,
            })?
    };
    let marker = cfg.state_dir.join(REJOIN_MARKER);
    let rejoining = prepare_rejoin(&cfg, &marker, recovered.groups.is_empty())?;
    if let Some(t) = &recovered.torn_tail {
        tracing::warn!(file = %t.file.display(), offset = t.offset, dropped_bytes = t.dropped_bytes,
            "cut a torn tail off the raft log (an unacknowledged write)");
    }

    // The peers.
    let (peer_listener, peer) = bind("peer", cfg.peer_listen).await?;
    let peers = cfg.peer.iter().map(|p| (p.id, p.addr)).collect();
    let transport = Arc::new(
        TcpTransport::new(cfg.node_id, key.clone(), peers, &registry)
            .map_err(|e| StartError::Setup(e.to_string()))?,
    );
    let mut tasks = vec![tokio::spawn(transport.serve(peer_listener))];

    let driver = DriverConfig {
        tick: cfg.raft.tick,
        group: GroupConfig {
            election_tick: cfg.raft.election_tick,
            heartbeat_tick: cfg.raft.heartbeat_tick,
            ..GroupConfig::default()
        },
        max_unflushed_bytes: cfg.raft.max_unflushed.0,
        stale_after: cfg.raft.stale_after,
        ..DriverConfig::default()
    };
    let node = ReplNode::new(
        cfg.node_id,
        transport.clone(),
        Arc::new(WalPersist::new(wal.clone())),
        driver,
        cfg.raft.failover_timeout,
    );
    // One global bucket for the node, shared by every volume it leads, on one clock.
    let discount = cfg
        .throttle
        .spare_capacity_discount
        .map(common::throttle::Discount::new)
        .transpose()
        .map_err(|e| StartError::Setup(format!("throttle.spare-capacity-discount: {e}")))?;
    let throttle = NodeThrottle::new(
        common::throttle::GlobalConfig {
            capacity_iops: cfg.throttle.capacity_iops,
            spare_capacity_discount: discount,
        },
        Arc::new(common::SystemClock::new()),
    )
    .map_err(|e| StartError::Setup(e.to_string()))?;
    throttle
        .register(&registry)
        .map_err(|e| StartError::Setup(e.to_string()))?;
    node.set_throttle(throttle);
    node.set_client_bytes(cfg.nbd.max_volume_inflight_bytes.bytes());
    let pool = Arc::new(
        SledPool::new(&cfg.sleds, key.clone(), cfg.node_id).with_request_timeout(cfg.sled_timeout),
    );
    let sleds = SledAccess {
        pool,
        key: key.clone(),
        metrics: metrics.clone(),
    };
    let mut voters: Vec<u64> = cfg.peer.iter().map(|p| p.id.0).collect();
    voters.push(cfg.node_id.0);
    voters.sort_unstable();

    // Every group a rejoining node starts (the metadata group first) waits to vote.
    node.set_rejoining(rejoining);
    // The metadata group, on every configured head node.
    let fresh_meta = !recovered.groups.contains_key(&GroupId::META);
    let meta_log = match recovered.groups.remove(&GroupId::META) {
        Some(log) => log,
        None => new_group_log(&wal, GroupId::META, &voters)
            .await
            .map_err(StartError::Setup)?,
    };
    node.add_group(
        GroupId::META,
        "_meta",
        meta_log,
        sleds.clone(),
        GroupKind::Meta,
    )
    .map_err(|e| StartError::Setup(format!("metadata group: {e}")))?;
    let meta = node
        .handle(GroupId::META)
        .ok_or_else(|| StartError::Setup("metadata group did not start".into()))?;
    if fresh_meta && !rejoining && voters.first() == Some(&cfg.node_id.0) {
        // A new cluster: the lowest id starts the first election at once.
        meta.campaign().await;
    }
    // The groups this node ran before it stopped serve again at once; the control plane
    // stops any that were deleted meanwhile.
    for (gid, log) in std::mem::take(&mut recovered.groups) {
        let label = format!("_pool-{}", &gid.to_string()[..8]);
        node.add_group(
            gid,
            &label,
            log,
            sleds.clone(),
            GroupKind::Volume { template: None },
        )
        .map_err(|e| StartError::Setup(format!("group {gid}: {e}")))?;
    }

    let volumes = Arc::new(VolumeSet::default());
    let server = NbdServer::new(volumes.clone(), cfg.nbd.clone(), &registry)
        .map_err(|e| StartError::Setup(e.to_string()))?;
    let (nbd_listener, nbd) = bind("NBD", cfg.nbd_listen).await?;
    let (admin_listener, admin) = bind("admin", cfg.admin_listen).await?;
    let (shutdown, rx) = tokio::sync::watch::channel(false);

    let token = match &cfg.admin_token_file {
        Some(p) => Some(read_token(p)?),
        None => None,
    };
    let control = ControlPlane::new(
        ControlSetup {
            me: NodeRecord {
                id: cfg.node_id.0,
                nbd,
                admin,
                peer,
                domain: cfg.domain.clone(),
                capacity_iops: cfg.throttle.capacity_iops,
            },
            cfg: cfg.control.clone(),
            replicas: cfg.replicas,
            token,
            sled_domains: cfg.sled_domains.clone(),
        },
        node.clone(),
        transport.clone(),
        meta,
        volumes.clone(),
        wal.clone(),
        std::collections::HashMap::new(),
        sleds,
        Arc::new(common::SystemClock::new()),
        ControlMetrics::new(&registry).map_err(|e| StartError::Setup(e.to_string()))?,
    );
    tasks.extend(control.start(rx.clone()));
    if rejoining {
        tasks.push(tokio::spawn(finish_rejoin(
            node.clone(),
            cfg.node_id.0,
            marker,
            rx.clone(),
        )));
    }
    // Volumes named in the configuration: created (or grown) and attached through the
    // control plane, like an operator would.
    if !cfg.volume.is_empty() {
        let (cp, vols, mut stop) = (control.clone(), cfg.volume.clone(), rx.clone());
        tasks.push(tokio::spawn(async move {
            for v in vols {
                loop {
                    let r = cp
                        .admin(AdminRequest::Ensure {
                            name: v.name.clone(),
                            size: v.size.0,
                            attach: true,
                        })
                        .await;
                    if r.status == 200 {
                        break;
                    }
                    if (400..500).contains(&r.status) && r.status != 409 {
                        tracing::error!(volume = %v.name, status = r.status, answer = %r.body,
                            "the configured volume was refused");
                        break;
                    }
                    tracing::info!(volume = %v.name, status = r.status, answer = %r.body,
                        "configured volume not ready yet; retrying");
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        }));
    }
    let mut nrx = rx.clone();
    let nbd_cp = control.clone();
    tasks.push(tokio::spawn(async move {
        // NBD is served once this node has caught up with the cluster state and opened its
        // exports: a client connecting right after a restart waits in the listen backlog
        // instead of being refused an export the node is about to open. Bounded, so a node
        // that cannot reach a metadata quorum still serves (and refuses what it cannot know).
        tokio::select! {
            _ = nrx.wait_for(|s| *s) => return,
            caught_up = nbd_cp.caught_up(NBD_CATCH_UP_LIMIT) => if !caught_up {
                tracing::warn!(limit = ?NBD_CATCH_UP_LIMIT,
                    "serving NBD before catching up with the cluster state (no metadata leader yet)");
            },
        }
        let stop = async move {
            let _ = nrx.wait_for(|s| *s).await;
        };
        if let Err(e) = server.serve(nbd_listener, stop).await {
            tracing::error!(error = %e, "NBD server failed");
        }
    }));
    let mut erx = rx.clone();
    let events = crate::events::start(&cfg.events, admin, &registry, async move {
        let _ = erx.wait_for(|s| *s).await;
    })
    .map_err(|e| StartError::Setup(e.to_string()))?;
    let mut arx = rx.clone();
    let api_cp = control.clone();
    tasks.push(tokio::spawn(async move {
        let router =
            common::metrics::router(registry).merge(crate::control::api::router(api_cp, events));
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
            peer,
            pid: std::process::id(),
        };
        crate::state::write_json_atomic(path, &info)
            .map_err(|e| StartError::Setup(e.to_string()))?;
    }
    tracing::info!(node_id = cfg.node_id.0, %nbd, %admin, %peer, volumes = cfg.volume.len(),
        "head node ready");
    Ok(Running {
        nbd,
        admin,
        peer,
        volumes,
        node,
        control,
        transport,
        shutdown,
        tasks,
    })
}
