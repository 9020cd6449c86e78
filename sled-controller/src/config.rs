//! Configuration: a TOML file (see `sled-controller/sled.example.toml`) with command-line
//! overrides, validated before anything starts.

use crate::device::core::Durability;
use common::units::ByteSize;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config {path}: {source}")]
    Parse {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range or missing.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Which I/O engine drives the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// io_uring (default).
    #[default]
    Uring,
    /// pread/pwrite (a fallback and a reference).
    Sync,
}

/// How the sled's work is spread over threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Threading {
    /// One thread runs everything: connections, every device's io_uring (its completions are
    /// waited for in the same event loop as the sockets) and `/metrics`. No hand-off between
    /// threads on the data path; the fastest for a sled with one or a few devices.
    #[default]
    EventLoop,
    /// A thread per device blocking in its ring, a pool of network threads (one per core) for
    /// the connections; requests and replies cross between them through bounded queues. Spreads
    /// a sled with many fast devices over more cores, at a higher cost per request.
    Threads,
}

/// What to do with a device that holds no Stockade format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FormatPolicy {
    /// Format it only if its first MiB is all zeros (a new device or a new sparse file).
    #[default]
    IfEmpty,
    /// Never format: refuse to start.
    Never,
    /// Format it even if it holds data (destroys it).
    Force,
}

/// One device.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DeviceConfig {
    /// A block device or a file.
    pub path: PathBuf,
    /// For a file: create it sparse at this size if missing (development).
    #[serde(default)]
    pub size: Option<ByteSize>,
    /// Formatting policy for an unformatted device.
    #[serde(default)]
    pub format: FormatPolicy,
}

impl std::str::FromStr for DeviceConfig {
    type Err = String;
    /// `PATH` or `PATH:SIZE` (a file created sparse at SIZE if missing).
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, size) = match s.rsplit_once(':') {
            Some((p, sz)) if !p.is_empty() => {
                (p, Some(sz.parse::<ByteSize>().map_err(|e| e.to_string())?))
            }
            _ => (s, None),
        };
        if path.is_empty() {
            return Err("empty device path".into());
        }
        Ok(Self {
            path: PathBuf::from(path),
            size,
            format: FormatPolicy::IfEmpty,
        })
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7700))
}
fn default_metrics() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7701))
}
fn default_chunk() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_depth() -> u32 {
    256
}
fn default_clean_after() -> Duration {
    Duration::from_secs(2)
}
fn default_durability() -> Durability {
    Durability::Dsync
}
fn default_registered_buffers() -> ByteSize {
    ByteSize(32 << 20)
}

/// The most memory one io_uring buffer registration may cover.
pub const MAX_REGISTERED_BUFFERS: u64 = 1 << 30;

/// The sled controller's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SledConfig {
    /// Where head nodes connect.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where `/metrics` is served.
    #[serde(default = "default_metrics")]
    pub metrics_listen: SocketAddr,
    /// The cluster key (64 hex digits).
    pub cluster_key_file: PathBuf,
    /// Devices.
    #[serde(default)]
    pub device: Vec<DeviceConfig>,
    /// Chunk size for devices formatted by this process.
    #[serde(default = "default_chunk")]
    pub chunk_size: ByteSize,
    /// I/O engine.
    #[serde(default)]
    pub io_engine: EngineKind,
    /// When a write is durable (`dsync` per write, or `batch-fsync`).
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// How work is spread over threads.
    #[serde(default)]
    pub threading: Threading,
    /// io_uring entries per device.
    #[serde(default = "default_depth")]
    pub queue_depth: u32,
    /// Memory for I/O buffers, registered with every device's io_uring so data reads and writes
    /// use fixed buffers (0: none, every buffer from the heap). Pinned while the process runs.
    #[serde(default = "default_registered_buffers")]
    pub registered_buffers: ByteSize,
    /// Idle time after which a region's checksums are written back.
    #[serde(default = "default_clean_after", with = "common::units::duration")]
    pub clean_after: Duration,
    /// When set, written with the bound addresses once the process is ready (JSON).
    #[serde(default)]
    pub ready_file: Option<PathBuf>,
}

impl SledConfig {
    /// A configuration with defaults and no devices.
    pub fn new(cluster_key_file: PathBuf) -> Self {
        Self {
            listen: default_listen(),
            metrics_listen: default_metrics(),
            cluster_key_file,
            device: Vec::new(),
            chunk_size: default_chunk(),
            io_engine: EngineKind::default(),
            durability: default_durability(),
            threading: Threading::default(),
            queue_depth: default_depth(),
            registered_buffers: default_registered_buffers(),
            clean_after: default_clean_after(),
            ready_file: None,
        }
    }

    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    /// Checks everything that can be checked before starting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.device.is_empty() {
            return Err(ConfigError::Invalid(
                "no devices: add [[device]] entries to the config or pass --device PATH[:SIZE]"
                    .into(),
            ));
        }
        crate::layout::Geometry::check_chunk_size(self.chunk_size.0)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !(4..=4096).contains(&self.queue_depth) {
            return Err(ConfigError::Invalid(format!(
                "queue-depth {} out of range 4..=4096",
                self.queue_depth
            )));
        }
        if self.registered_buffers.0 > MAX_REGISTERED_BUFFERS {
            return Err(ConfigError::Invalid(format!(
                "registered-buffers {} is above the {} one io_uring registration can cover",
                self.registered_buffers,
                ByteSize(MAX_REGISTERED_BUFFERS)
            )));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.device {
            if !seen.insert(&d.path) {
                return Err(ConfigError::Invalid(format!(
                    "device {} listed twice",
                    d.path.display()
                )));
            }
            if let Some(sz) = d.size
                && sz.0 < 2 * self.chunk_size.0
            {
                return Err(ConfigError::Invalid(format!(
                    "device {} size {sz} is too small for {} chunks plus metadata",
                    d.path.display(),
                    self.chunk_size
                )));
            }
        }
        if self.clean_after.is_zero() {
            return Err(ConfigError::Invalid("clean-after must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../sled.example.toml");
        let c: SledConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.device.len(), 2);
        assert_eq!(c.chunk_size, ByteSize(64 << 20));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let e = toml::from_str::<SledConfig>("cluster-key-file = 'k'\nbogus = 1").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let c: SledConfig = toml::from_str("cluster-key-file = 'k'").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("no devices"));
        let c: SledConfig =
            toml::from_str("cluster-key-file = 'k'\nchunk-size = '3MiB'\n[[device]]\npath = 'x'")
                .unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("chunk size"));
        let c: SledConfig = toml::from_str(
            "cluster-key-file = 'k'\nregistered-buffers = '2GiB'\n[[device]]\npath = 'x'",
        )
        .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("registered-buffers"), "{e}");
    }

    #[test]
    fn device_flags_parse() {
        let d: DeviceConfig = "data/d0.img:10G".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("data/d0.img"));
        assert_eq!(d.size, Some(ByteSize(10 << 30)));
        let d: DeviceConfig = "/dev/nvme0n1".parse().unwrap();
        assert_eq!(d.size, None);
        assert!("x:lots".parse::<DeviceConfig>().is_err());
    }
}
