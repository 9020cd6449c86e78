//! `head-node`: serves volumes over NBD, stored on sled controllers. See `head.example.toml`.

use anyhow::Context;
use clap::Parser;
use common::ids::NodeId;
use head_node::config::{HeadConfig, PeerConfig, VolumeConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Serves volumes over NBD to unmodified clients; their data lives on sled controllers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (flags override its values).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This head node's id (non-zero, unique in the cluster).
    #[arg(long)]
    node_id: Option<NodeId>,
    /// Address NBD clients connect to.
    #[arg(long)]
    nbd_listen: Option<SocketAddr>,
    /// Address serving the admin API and /metrics.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// A sled controller address (repeatable; replaces the config file's list).
    #[arg(long = "sled")]
    sleds: Vec<SocketAddr>,
    /// The cluster key file (64 hex digits).
    #[arg(long)]
    cluster_key_file: Option<PathBuf>,
    /// The state directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Replicas per chunk.
    #[arg(long)]
    replicas: Option<usize>,
    /// Address other head nodes connect to.
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Another head node, ID=ADDR (repeatable; replaces the config file's list).
    #[arg(long = "peer")]
    peers: Vec<PeerConfig>,
    /// A volume to serve, NAME:SIZE (repeatable; replaces the config file's list).
    #[arg(long = "volume")]
    volumes: Vec<VolumeConfig>,
    /// Write the bound addresses here (JSON) once ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// The admin API token file.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// This node's failure domain.
    #[arg(long)]
    domain: Option<String>,
    /// Head nodes per volume group.
    #[arg(long)]
    group_size: Option<usize>,
    /// Ready Raft groups kept in the pool (0: none).
    #[arg(long)]
    pool_size: Option<usize>,
    /// Provisioned bytes may reach the sleds' capacity times this.
    #[arg(long)]
    overcommit_ratio: Option<f64>,
    /// The node's throttling capacity, ops per second.
    #[arg(long)]
    capacity_iops: Option<u64>,
    /// How long write-back may keep failing on a sled before the leader records it stale
    /// (e.g. `1s`, `500ms`).
    #[arg(long, value_parser = common::units::parse_duration)]
    stale_after: Option<std::time::Duration>,
    /// Deadline of a sled request (e.g. `5s`): past it the connection is closed.
    #[arg(long, value_parser = common::units::parse_duration)]
    sled_timeout: Option<std::time::Duration>,
    /// This node lost its Raft state (its state directory is new or was moved away) and
    /// rejoins its cluster: it neither votes nor campaigns until it holds everything the
    /// cluster committed. Refused when the state directory holds a Raft log.
    #[arg(long)]
    rejoin: bool,
}

fn config(a: Args) -> anyhow::Result<HeadConfig> {
    let mut cfg = match &a.config {
        Some(p) => HeadConfig::load(p)?,
        None => HeadConfig::new(
            a.node_id
                .context("--node-id is required without --config")?,
            a.cluster_key_file
                .clone()
                .context("--cluster-key-file is required without --config")?,
            a.state_dir
                .clone()
                .context("--state-dir is required without --config")?,
        ),
    };
    if let Some(v) = a.node_id {
        cfg.node_id = v;
    }
    if let Some(v) = a.nbd_listen {
        cfg.nbd_listen = v;
    }
    if let Some(v) = a.admin_listen {
        cfg.admin_listen = v;
    }
    if let Some(v) = a.peer_listen {
        cfg.peer_listen = v;
    }
    if !a.peers.is_empty() {
        cfg.peer = a.peers;
    }
    if !a.sleds.is_empty() {
        cfg.sleds = a.sleds;
    }
    if let Some(v) = a.cluster_key_file {
        cfg.cluster_key_file = v;
    }
    if let Some(v) = a.state_dir {
        cfg.state_dir = v;
    }
    if let Some(v) = a.replicas {
        cfg.replicas = v;
    }
    if !a.volumes.is_empty() {
        cfg.volume = a.volumes;
    }
    if a.ready_file.is_some() {
        cfg.ready_file = a.ready_file;
    }
    if a.admin_token_file.is_some() {
        cfg.admin_token_file = a.admin_token_file;
    }
    if a.domain.is_some() {
        cfg.domain = a.domain;
    }
    if let Some(v) = a.group_size {
        cfg.control.group_size = v;
    }
    if let Some(v) = a.pool_size {
        cfg.control.pool_size = v;
    }
    if let Some(v) = a.overcommit_ratio {
        cfg.control.overcommit_ratio = v;
    }
    if let Some(v) = a.sled_timeout {
        cfg.sled_timeout = v;
    }
    if let Some(v) = a.stale_after {
        cfg.raft.stale_after = v;
    }
    cfg.rejoin = a.rejoin;
    if a.capacity_iops.is_some() {
        cfg.throttle.capacity_iops = a.capacity_iops;
    }
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::logging::init("head-node");
    let cfg = config(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("head")
        .build()?;
    rt.block_on(async move {
        let registry = common::metrics::new_registry();
        let running = head_node::app::start(cfg, registry).await?;
        common::signals::wait_for_shutdown().await;
        tracing::info!("shutting down");
        running.stop().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
