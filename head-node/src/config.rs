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
fn default_peer_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7910))
}

/// Another head node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id.
    pub id: NodeId,
    /// Its peer address (its `peer-listen`).
    pub addr: SocketAddr,
}

impl std::str::FromStr for PeerConfig {
    type Err = String;
    /// `ID=ADDR`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (id, addr) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected ID=ADDR, like 2=127.0.0.1:7911"))?;
        Ok(Self {
            id: id
                .parse()
                .map_err(|e: common::ids::ParseIdError| e.to_string())?,
            addr: addr
                .parse()
                .map_err(|e: std::net::AddrParseError| format!("{addr:?}: {e}"))?,
        })
    }
}

/// Raft timing and limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct RaftConfig {
    /// One logical tick.
    #[serde(with = "common::units::duration")]
    pub tick: std::time::Duration,
    /// Ticks without hearing from the leader before a follower campaigns (plus up to as many
    /// again at random).
    pub election_tick: usize,
    /// Ticks between the leader's heartbeats.
    pub heartbeat_tick: usize,
    /// Committed data not yet written back to the sleds above which writes wait.
    pub max_unflushed: ByteSize,
    /// How long a request rides out an election (retrying on the new leader) before it fails.
    #[serde(with = "common::units::duration")]
    pub failover_timeout: std::time::Duration,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            tick: std::time::Duration::from_millis(50),
            election_tick: 10,
            heartbeat_tick: 2,
            max_unflushed: ByteSize(256 << 20),
            failover_timeout: std::time::Duration::from_secs(30),
        }
    }
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
    /// Where this head node keeps its state (the Raft log of its groups).
    pub state_dir: PathBuf,
    /// Where the other head nodes connect (Raft and forwarded volume I/O).
    #[serde(default = "default_peer_listen")]
    pub peer_listen: SocketAddr,
    /// The other head nodes.
    #[serde(default)]
    pub peer: Vec<PeerConfig>,
    /// Raft timing and limits.
    #[serde(default)]
    pub raft: RaftConfig,
    /// The Raft log.
    #[serde(default)]
    pub wal: crate::replication::wal::WalConfig,
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
        let mut ids = std::collections::HashSet::from([self.node_id]);
        for p in &self.peer {
            if p.id.0 == 0 || !ids.insert(p.id) {
                return Err(ConfigError::Invalid(format!(
                    "peer id {} is zero or listed twice (or is this node's id)",
                    p.id
                )));
            }
        }
        let r = &self.raft;
        if r.tick.is_zero() || r.heartbeat_tick == 0 || r.election_tick <= r.heartbeat_tick {
            return Err(ConfigError::Invalid(
                "raft: tick must be positive and election-tick greater than heartbeat-tick".into(),
            ));
        }
        if r.max_unflushed.0 < 64 << 20 {
            return Err(ConfigError::Invalid(
                "raft.max-unflushed must be at least 64MiB (two maximal writes)".into(),
            ));
        }
        self.wal
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
        assert_eq!(c.peer.len(), 2);
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
        assert_eq!("2=127.0.0.1:9".parse::<PeerConfig>().unwrap().id, NodeId(2));
        assert!("2:127.0.0.1:9".parse::<PeerConfig>().is_err());
        let c: HeadConfig = toml::from_str(&format!(
            "{base}sleds = ['127.0.0.1:1']\n[[peer]]\nid = 1\naddr = '127.0.0.1:2'"
        ))
        .unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("peer id"));
    }
}
