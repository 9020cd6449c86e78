//! `sled-controller`: serves a sled's devices to head nodes. See `sled.example.toml`.

use anyhow::Context;
use clap::Parser;
use common::units::ByteSize;
use sled_controller::config::{DeviceConfig, EngineKind, FormatPolicy, SledConfig, Threading};
use sled_controller::device::core::Durability;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Owns storage devices through io_uring and serves them to head nodes, refusing any write
/// without a valid fencing credential.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (flags override its values).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address head nodes connect to.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address serving /metrics.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// A device: a block device, or a file as PATH:SIZE (created sparse if missing). Repeatable;
    /// replaces the config file's devices.
    #[arg(long = "device")]
    devices: Vec<DeviceConfig>,
    /// The cluster key file (64 hex digits).
    #[arg(long)]
    cluster_key_file: Option<PathBuf>,
    /// Chunk size for newly formatted devices.
    #[arg(long)]
    chunk_size: Option<ByteSize>,
    /// I/O engine.
    #[arg(long, value_enum)]
    io_engine: Option<EngineKind>,
    /// Write durability: dsync or batch-fsync.
    #[arg(long, value_parser = parse_durability)]
    durability: Option<Durability>,
    /// How work is spread over threads: event-loop (one thread for everything) or threads (a
    /// thread per device and a pool of network threads).
    #[arg(long, value_enum)]
    threading: Option<Threading>,
    /// Memory for I/O buffers registered with every device's io_uring (0: none).
    #[arg(long)]
    registered_buffers: Option<ByteSize>,
    /// Write the bound addresses here (JSON) once ready.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Format devices that hold no Stockade format even if they are not empty (destroys data).
    #[arg(long)]
    format: bool,
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "dsync" => Ok(Durability::Dsync),
        "batch-fsync" => Ok(Durability::BatchFsync),
        _ => Err(format!(
            "unknown durability {s:?}: use dsync or batch-fsync"
        )),
    }
}

fn config(args: Args) -> anyhow::Result<SledConfig> {
    let mut cfg = match &args.config {
        Some(p) => SledConfig::load(p)?,
        None => SledConfig::new(
            args.cluster_key_file
                .clone()
                .context("--cluster-key-file is required without --config")?,
        ),
    };
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.metrics_listen {
        cfg.metrics_listen = v;
    }
    if !args.devices.is_empty() {
        cfg.device = args.devices;
    }
    if let Some(v) = args.cluster_key_file {
        cfg.cluster_key_file = v;
    }
    if let Some(v) = args.chunk_size {
        cfg.chunk_size = v;
    }
    if let Some(v) = args.io_engine {
        cfg.io_engine = v;
    }
    if let Some(v) = args.durability {
        cfg.durability = v;
    }
    if let Some(v) = args.threading {
        cfg.threading = v;
    }
    if let Some(v) = args.registered_buffers {
        cfg.registered_buffers = v;
    }
    if args.ready_file.is_some() {
        cfg.ready_file = args.ready_file;
    }
    if args.format {
        for d in &mut cfg.device {
            d.format = FormatPolicy::Force;
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::logging::init("sled-controller");
    let cfg = config(args)?;
    let rt = match cfg.threading {
        Threading::EventLoop => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Threading::Threads => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("sled-net")
            .build()?,
    };
    rt.block_on(async move {
        let registry = common::metrics::new_registry();
        let running = sled_controller::app::start(cfg, registry).await?;
        common::signals::wait_for_shutdown().await;
        tracing::info!("shutting down");
        running.stop().await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
