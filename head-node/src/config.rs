//! Head-node configuration: a TOML file (see `head-node/head.example.toml`) with command-line
//! overrides, validated before anything starts.

use crate::nbd::ServerConfig;
use common::ids::NodeId;
use common::units::ByteSize;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// Not valid TOML for this schema.
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

/// A volume this head node serves (until the control plane assigns volumes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VolumeConfig {
    /// Export name.
    pub name: String,
    /// Size (grown when raised; never shrunk).
    pub size: ByteSize,
}

impl std::str::FromStr for VolumeConfig {
    type Err = String;
    /// `NAME:SIZE`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, size) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected NAME:SIZE, like vol0:1GiB"))?;
        Ok(Self {
            name: name.to_string(),
            size: size
                .parse()
                .map_err(|e: common::units::UnitError| e.to_string())?,
        })
    }
}

fn default_nbd() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10809))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7900))
}
fn default_replicas() -> usize {
    3
}

/// The head node's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HeadConfig {
    /// This head node's id (non-zero, unique in the cluster; the holder in its credentials).
    pub node_id: NodeId,
    /// Where NBD clients connect.
    #[serde(default = "default_nbd")]
    pub nbd_listen: SocketAddr,
    /// Where the admin API and `/metrics` are served.
    #[serde(default = "default_admin")]
    pub admin_listen: SocketAddr,
    /// The cluster key (64 hex digits).
    pub cluster_key_file: PathBuf,
    /// Where this head node keeps its state (epoch counter, volume descriptions).
    pub state_dir: PathBuf,
    /// Sled controllers to use.
    #[serde(default)]
    pub sleds: Vec<SocketAddr>,
    /// Replicas of each chunk (fewer when fewer sleds exist).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Volumes to serve.
    #[serde(default)]
    pub volume: Vec<VolumeConfig>,
    /// NBD server limits.
    #[serde(default)]
    pub nbd: ServerConfig,
    /// When set, written with the bound addresses once ready (JSON).
    #[serde(default)]
    pub ready_file: Option<PathBuf>,
}

impl HeadConfig {
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
        if self.node_id.0 == 0 {
            return Err(ConfigError::Invalid("node-id must be non-zero".into()));
        }
        if self.sleds.is_empty() {
            return Err(ConfigError::Invalid(
                "no sleds: list sled controller addresses in `sleds` or pass --sled ADDR".into(),
            ));
        }
        if self.replicas == 0 {
            return Err(ConfigError::Invalid("replicas must be at least 1".into()));
        }
        let mut names = std::collections::HashSet::new();
        for v in &self.volume {
            if v.name.is_empty() || v.name.len() > 128 || v.name.contains('/') {
                return Err(ConfigError::Invalid(format!(
                    "volume name {:?} must be 1-128 characters without '/'",
                    v.name
                )));
            }
            if !names.insert(&v.name) {
                return Err(ConfigError::Invalid(format!(
                    "volume {} listed twice",
                    v.name
                )));
            }
            if v.size.0 == 0 || !v.size.0.is_multiple_of(4096) {
                return Err(ConfigError::Invalid(format!(
                    "volume {} size {} must be a positive multiple of 4 KiB",
                    v.name, v.size
                )));
            }
        }
        self.nbd
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_validates() {
        let c: HeadConfig = toml::from_str(include_str!("../head.example.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.sleds.len(), 3);
        assert_eq!(c.volume[0].size, ByteSize(1 << 30));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let base = "node-id = 1\ncluster-key-file = 'k'\nstate-dir = 's'\n";
        let c: HeadConfig = toml::from_str(base).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("no sleds"));
        let c: HeadConfig = toml::from_str(&format!(
            "{base}sleds = ['127.0.0.1:1']\n[[volume]]\nname = 'a'\nsize = '1000'"
        ))
        .unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("multiple of 4 KiB")
        );
        assert!(toml::from_str::<HeadConfig>(&format!("{base}bogus = 1")).is_err());
        assert!("vol0".parse::<VolumeConfig>().is_err());
        assert_eq!(
            "vol0:1G".parse::<VolumeConfig>().unwrap().size,
            ByteSize(1 << 30)
        );
    }
}
