//! The admin API's JSON documents: what every head node serves under `/v1` and what the
//! `stockade` CLI sends (see `docs/admin-api.md`).
//!
//! Sizes and rates are plain integers (bytes, ops per second, bytes per second); ids are the
//! hex strings the processes log. Requests refuse unknown fields, so a typo is a 400 rather
//! than a silently ignored option.

use crate::throttle::QosConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Path prefix of the API.
pub const PREFIX: &str = "/v1";

/// Longest volume name.
pub const MAX_NAME_LEN: usize = 64;

/// Checks a volume name: 1 to 64 characters from `A-Z a-z 0-9 . _ -`, not starting with a
/// dot or a dash (it is an NBD export name, a path component and a CLI argument).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "volume name {name:?} must be 1 to {MAX_NAME_LEN} characters long"
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!(
            "volume name {name:?} must not start with '.' or '-'"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "volume name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// An error answer (any 4xx or 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

impl ErrorBody {
    /// An error answer with that code (see [`ErrorDetail::code`]) and message.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Machine-readable code: `bad_request`, `unauthorized`, `not_found`, `conflict`,
    /// `insufficient_capacity`, `unavailable`, `internal`.
    pub code: String,
    /// What was wrong and, where it helps, what to do.
    pub message: String,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// Name (see [`validate_name`]).
    pub name: String,
    /// Size in bytes: a positive multiple of 4096.
    pub size: u64,
    /// QoS limits; absent: the cluster's default (changed by `qos_changes`).
    #[serde(default)]
    pub qos: Option<QosConfig>,
    /// Fields that replace the cluster default's (the others stay the default's), so that
    /// `--iops` alone keeps the default bandwidth and burst. Not together with `qos`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_changes: Option<SetQos>,
    /// The id to give the volume (32 hex digits), chosen by the client so that a create it
    /// sends again after an unclear failure (a leader change, a lost answer) is recognised as
    /// the same one and answered as done, not as a conflict. Absent: the cluster picks one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

impl CreateVolume {
    /// The volume's QoS given the cluster's `default`, checked ([`check_qos`]).
    pub fn qos(&self, default: QosConfig) -> Result<QosConfig, String> {
        let q = match (&self.qos, &self.qos_changes) {
            (Some(_), Some(_)) => {
                return Err("qos: give either `qos` or `qos_changes`, not both".into());
            }
            (Some(q), None) => *q,
            (None, Some(c)) => c.apply(default),
            (None, None) => default,
        };
        check_qos(&q)?;
        Ok(q)
    }
}

/// Checks the QoS a volume is given: [`QosConfig::validate`], and no burst ceiling without
/// credits to burst with (such a volume could never go above its baseline, which is never what
/// the operator who set a ceiling meant).
pub fn check_qos(q: &QosConfig) -> Result<(), String> {
    q.validate().map_err(|e| format!("qos: {e}"))?;
    if q.burst_iops.is_some() && q.burst_credits == 0 {
        return Err(
            "qos: a burst ceiling (burst_iops) needs burst credits (burst_credits > 0) \
                    to burst with"
                .into(),
        );
    }
    Ok(())
}

/// `POST /v1/volumes/{name}/resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    /// New size in bytes (volumes only grow).
    pub size: u64,
}

/// `POST /v1/volumes/{name}/attach`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    /// Allow other attachments at the same time (only for clients that coordinate their
    /// writes, like a cluster filesystem).
    #[serde(default)]
    pub shared: bool,
    /// Who attaches (free text, shown in `volume show`).
    #[serde(default)]
    pub client: Option<String>,
}

/// `POST /v1/volumes/{name}/detach`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetachVolume {
    /// Only this attachment (default: every attachment).
    #[serde(default)]
    pub attachment: Option<u64>,
}

/// `POST /v1/sleds`: add a running sled controller to the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddSled {
    /// The sled's address, as every head node can reach it.
    pub addr: SocketAddr,
    /// Its failure domain (rack, host…), if any.
    #[serde(default)]
    pub domain: Option<String>,
}

/// `POST /v1/volumes/{name}/qos`: the fields given replace the current ones; `null` clears a
/// limit (unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetQos {
    /// Baseline ops per second.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub iops: Option<Option<u64>>,
    /// Burst ceiling, ops per second.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub burst_iops: Option<Option<u64>>,
    /// Burst credit maximum, ops. A size rather than a limit: `null` is refused.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "not_null"
    )]
    pub burst_credits: Option<u64>,
    /// Bandwidth, bytes per second.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub bandwidth: Option<Option<u64>>,
}

/// A field that is present (possibly `null`): `Some(value)`; absent fields get the default.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A field that, when present, must hold a value: `Some(value)`; `null` is an error (absent
/// fields get the default).
fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

impl SetQos {
    /// True when it names no field (a request that changes nothing).
    pub fn is_empty(&self) -> bool {
        self.iops.is_none()
            && self.burst_iops.is_none()
            && self.burst_credits.is_none()
            && self.bandwidth.is_none()
    }

    /// `base` with these changes.
    pub fn apply(&self, base: QosConfig) -> QosConfig {
        QosConfig {
            iops: self.iops.unwrap_or(base.iops),
            burst_iops: self.burst_iops.unwrap_or(base.burst_iops),
            burst_credits: self.burst_credits.unwrap_or(base.burst_credits),
            bandwidth: self.bandwidth.unwrap_or(base.bandwidth),
        }
    }
}

/// An attachment of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Its id (unique within the volume).
    pub id: u64,
    /// Shared attachment.
    pub shared: bool,
    /// Who attached, if they said.
    pub client: Option<String>,
    /// When (seconds since the Unix epoch, from the leader's clock).
    pub since: u64,
}

/// A volume as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Name.
    pub name: String,
    /// Id (hex).
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// `creating`, `ready` (serving with its full group), `growing` (serving while its group
    /// grows to its target), `deleting`.
    pub state: String,
    /// QoS limits.
    pub qos: QosConfig,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Replicas of each chunk.
    pub replicas: usize,
    /// Number of chunks.
    pub chunks: u64,
    /// The Raft group (hex).
    pub group: String,
    /// Head nodes of the group now.
    pub members: Vec<u64>,
    /// Head nodes the group is meant to have.
    pub target_members: Vec<u64>,
    /// The group's leader as last reported, if known.
    pub leader: Option<u64>,
    /// Attachments.
    pub attachments: Vec<Attachment>,
    /// NBD URI for clients (set while attached).
    pub uri: Option<String>,
    /// NBD addresses of the group's head nodes (any of them serves the volume).
    pub endpoints: Vec<SocketAddr>,
    /// Creation time (seconds since the Unix epoch).
    pub created: u64,
}

/// `202 Accepted` to a delete: the volume is marked deleting and the cluster finishes the
/// delete by itself (a sled holding some of its chunks is away).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletePending {
    /// What is left to do, for a person.
    pub pending: String,
}

/// The answer to a create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// The volume.
    pub volume: VolumeInfo,
    /// The group came from the pool of ready groups.
    pub from_pool: bool,
    /// Milliseconds from the request to the volume serving.
    pub latency_ms: u64,
}

/// The answer to an attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    /// NBD URI for the client.
    pub uri: String,
    /// The attachment.
    pub attachment: Attachment,
    /// NBD addresses of the volume's head nodes.
    pub endpoints: Vec<SocketAddr>,
}

/// A head node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: u64,
    /// NBD address.
    pub nbd: SocketAddr,
    /// Admin API and metrics address.
    pub admin: SocketAddr,
    /// Peer (Raft) address.
    pub peer: SocketAddr,
    /// Failure domain (rack, host…), if configured.
    pub domain: Option<String>,
    /// `up` when its last heartbeat is recent, else `down`.
    pub state: String,
    /// Seconds since its last heartbeat reached the metadata leader.
    pub last_seen_secs: Option<u64>,
    /// Volume groups it is a member of.
    pub groups: usize,
    /// Sum of the baselines (ops per second) of the volumes whose group it belongs to.
    pub baseline_iops: u64,
    /// Its throttling capacity (ops per second), if limited.
    pub capacity_iops: Option<u64>,
    /// True for the metadata group's leader.
    pub meta_leader: bool,
}

/// A device of a sled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device id (hex).
    pub id: String,
    /// Usable capacity in bytes (chunks × chunk size).
    pub capacity: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Chunks allocated (as last reported).
    pub allocated_chunks: u64,
}

/// A sled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SledInfo {
    /// Sled id (hex).
    pub id: String,
    /// Address.
    pub addr: SocketAddr,
    /// Failure domain, if configured.
    pub domain: Option<String>,
    /// `up` when a head node reached it recently, else `down`.
    pub state: String,
    /// Devices.
    pub devices: Vec<DeviceInfo>,
    /// Bytes of volumes placed on it (provisioned, not written).
    pub provisioned: u64,
    /// Being drained: no new replica goes to it and its replicas move to other sleds; done
    /// when `provisioned` is 0. (Absent from older head nodes' answers: false.)
    #[serde(default)]
    pub draining: bool,
}

/// Capacity of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityInfo {
    /// Sum of the sleds' device capacities, bytes.
    pub total: u64,
    /// Sum over volumes of size × replicas, bytes.
    pub provisioned: u64,
    /// Bytes allocated on the sleds (as last reported).
    pub allocated: u64,
    /// Provisioned may reach `total × overcommit_ratio`.
    pub overcommit_ratio: f64,
}

/// The pool of ready Raft groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Ready groups wanted.
    pub target: usize,
    /// Ready (validated) groups.
    pub ready: usize,
    /// Groups being started or validated.
    pub pending: usize,
}

/// `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// `healthy`, `degraded` (a node or sled down, a volume growing) or `unavailable`.
    pub health: String,
    /// Why it is not healthy.
    pub problems: Vec<String>,
    /// The metadata group's leader.
    pub meta_leader: Option<u64>,
    /// Its term.
    pub meta_term: u64,
    /// The node that answered.
    pub answered_by: u64,
    /// Head nodes.
    pub nodes: Vec<NodeInfo>,
    /// Sleds.
    pub sleds: Vec<SledInfo>,
    /// Number of volumes.
    pub volumes: usize,
    /// Volumes attached.
    pub attached: usize,
    /// Capacity.
    pub capacity: CapacityInfo,
    /// The group pool.
    pub pool: PoolInfo,
    /// Version of the cluster credential key in use.
    pub key_version: u32,
    /// Replicas per chunk for new volumes.
    pub replicas: usize,
    /// Head nodes per volume group for new volumes.
    pub group_size: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["vol0", "a", "db-1.data_x", &"x".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let e = serde_json::from_str::<CreateVolume>(r#"{"name":"a","size":4096,"sise":1}"#);
        assert!(e.unwrap_err().to_string().contains("unknown field"));
        let c: CreateVolume = serde_json::from_str(r#"{"name":"a","size":4096}"#).unwrap();
        assert_eq!(c.qos, None);
    }

    #[test]
    fn set_qos_changes_only_what_it_names() {
        let base = QosConfig {
            iops: Some(100),
            burst_iops: Some(300),
            burst_credits: 1000,
            bandwidth: Some(1 << 20),
        };
        let s: SetQos = serde_json::from_str(r#"{"iops":200,"bandwidth":null}"#).unwrap();
        let q = s.apply(base);
        assert_eq!(q.iops, Some(200));
        assert_eq!(q.burst_iops, Some(300));
        assert_eq!(q.burst_credits, 1000);
        assert_eq!(q.bandwidth, None);
    }

    #[test]
    fn burst_credits_cannot_be_null() {
        let e = serde_json::from_str::<SetQos>(r#"{"burst_credits":null}"#).unwrap_err();
        assert!(e.to_string().contains("null"), "{e}");
        let s: SetQos = serde_json::from_str(r#"{"burst_credits":5}"#).unwrap();
        assert_eq!(s.burst_credits, Some(5));
        let s: SetQos = serde_json::from_str(r#"{"iops":5}"#).unwrap();
        assert_eq!(s.burst_credits, None);
    }

    #[test]
    fn set_qos_sends_null_to_remove_and_omits_the_rest() {
        let s = SetQos {
            iops: Some(None),
            bandwidth: Some(Some(1 << 20)),
            ..SetQos::default()
        };
        assert!(!s.is_empty());
        assert!(SetQos::default().is_empty());
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(text, r#"{"iops":null,"bandwidth":1048576}"#);
        assert_eq!(serde_json::from_str::<SetQos>(&text).unwrap(), s);
    }

    #[test]
    fn error_bodies() {
        let e = ErrorBody::new("conflict", "volume \"a\" exists");
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"error":{"code":"conflict","message":"volume \"a\" exists"}}"#
        );
        assert_eq!(serde_json::from_str::<ErrorBody>(&text).unwrap(), e);
    }
}
