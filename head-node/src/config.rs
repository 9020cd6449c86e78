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
    /// How long the write-back may keep failing on one sled before the leader records the
    /// sled stale for the volume and writes go on with the other replicas.
    #[serde(with = "common::units::duration")]
    pub stale_after: std::time::Duration,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            tick: std::time::Duration::from_millis(50),
            election_tick: 10,
            heartbeat_tick: 2,
            max_unflushed: ByteSize(256 << 20),
            failover_timeout: std::time::Duration::from_secs(30),
            stale_after: std::time::Duration::from_secs(1),
        }
    }
}

/// Control-plane settings. The metadata leader's apply to the whole cluster: keep them the
/// same on every head node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Head nodes in each volume's Raft group (fewer when the cluster has fewer).
    pub group_size: usize,
    /// Ready, validated Raft groups kept in the pool for fast creates (0: no pool).
    pub pool_size: usize,
    /// Provisioned bytes (size × replicas of every volume) may reach the sleds' capacity
    /// times this.
    pub overcommit_ratio: f64,
    /// QoS of volumes created without one (default: unlimited).
    pub default_qos: common::throttle::QosConfig,
    /// How often each head node reports to the metadata leader.
    #[serde(with = "common::units::duration")]
    pub heartbeat_interval: std::time::Duration,
    /// A head node or sled not heard of for this long is down.
    #[serde(with = "common::units::duration")]
    pub down_after: std::time::Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            group_size: 3,
            pool_size: 2,
            overcommit_ratio: 2.0,
            default_qos: common::throttle::QosConfig::UNLIMITED,
            heartbeat_interval: std::time::Duration::from_millis(500),
            down_after: std::time::Duration::from_secs(5),
        }
    }
}

/// Throttling of the head node (its global bucket).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// The node's capacity in ops per second (unset: unlimited). The sum of the baselines of
    /// the volumes it serves never exceeds it.
    pub capacity_iops: Option<u64>,
    /// While the node has spare capacity, above-baseline I/O is charged to volumes at this
    /// factor in (0, 1] (unset: exact limits).
    pub spare_capacity_discount: Option<f64>,
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
    /// A sled request not answered within this fails and closes the connection (a hung sled
    /// is then treated like a dead one: reads go elsewhere, write-back marks it stale).
    #[serde(default = "default_sled_timeout", with = "common::units::duration")]
    pub sled_timeout: std::time::Duration,
    /// Volumes to serve.
    #[serde(default)]
    pub volume: Vec<VolumeConfig>,
    /// NBD server limits.
    #[serde(default)]
    pub nbd: ServerConfig,
    /// When set, written with the bound addresses once ready (JSON).
    #[serde(default)]
    pub ready_file: Option<PathBuf>,
    /// The admin API token (a file holding it). Without it the admin API refuses every
    /// request.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// This node's failure domain (rack, host…): a volume's group spreads over domains.
    #[serde(default)]
    pub domain: Option<String>,
    /// Failure domains of sleds, by address.
    #[serde(default)]
    pub sled_domains: std::collections::BTreeMap<SocketAddr, String>,
    /// Control plane.
    #[serde(default)]
    pub control: ControlConfig,
    /// Throttling.
    #[serde(default)]
    pub throttle: ThrottleConfig,
    /// The correlated-events engine (`GET /v1/events`).
    #[serde(default)]
    pub events: crate::events::EventsConfig,
    /// This node lost its Raft state and rejoins its cluster (`--rejoin`, never from a file:
    /// it is a one-time act, remembered in the state directory until done). See
    /// `docs/deploy.md`, "A head node that lost its state".
    #[serde(skip)]
    pub rejoin: bool,
}

fn default_sled_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

impl HeadConfig {
    /// A configuration with every default.
    pub fn new(node_id: NodeId, cluster_key_file: PathBuf, state_dir: PathBuf) -> Self {
        Self {
            node_id,
            nbd_listen: default_nbd(),
            admin_listen: default_admin(),
            cluster_key_file,
            state_dir,
            peer_listen: default_peer_listen(),
            peer: Vec::new(),
            raft: RaftConfig::default(),
            wal: Default::default(),
            sleds: Vec::new(),
            replicas: default_replicas(),
            sled_timeout: default_sled_timeout(),
            volume: Vec::new(),
            nbd: Default::default(),
            ready_file: None,
            admin_token_file: None,
            domain: None,
            sled_domains: Default::default(),
            control: ControlConfig::default(),
            throttle: ThrottleConfig::default(),
            events: crate::events::EventsConfig::default(),
            rejoin: false,
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
            common::admin::validate_name(&v.name).map_err(ConfigError::Invalid)?;
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
        let c = &self.control;
        if c.group_size == 0 || c.group_size > 7 {
            return Err(ConfigError::Invalid(
                "control.group-size must be between 1 and 7".into(),
            ));
        }
        if c.pool_size > 64 {
            return Err(ConfigError::Invalid(
                "control.pool-size must be at most 64".into(),
            ));
        }
        if !(c.overcommit_ratio.is_finite()
            && c.overcommit_ratio > 0.0
            && c.overcommit_ratio <= 100.0)
        {
            return Err(ConfigError::Invalid(
                "control.overcommit-ratio must be greater than 0 and at most 100".into(),
            ));
        }
        c.default_qos
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("control.default-qos: {e}")))?;
        if c.heartbeat_interval.is_zero() || c.down_after <= c.heartbeat_interval {
            return Err(ConfigError::Invalid(
                "control: heartbeat-interval must be positive and down-after longer".into(),
            ));
        }
        let t = &self.throttle;
        if t.capacity_iops == Some(0) {
            return Err(ConfigError::Invalid(
                "throttle.capacity-iops must be positive (omit it for no limit)".into(),
            ));
        }
        if let Some(d) = t.spare_capacity_discount {
            if !(d > 0.0 && d <= 1.0) {
                return Err(ConfigError::Invalid(
                    "throttle.spare-capacity-discount must be in (0, 1]".into(),
                ));
            }
            if t.capacity_iops.is_none() {
                return Err(ConfigError::Invalid(
                    "throttle.spare-capacity-discount needs throttle.capacity-iops".into(),
                ));
            }
        }
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
