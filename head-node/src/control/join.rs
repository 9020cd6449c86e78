//! Adding a sled to a running cluster: `stockade sled add ADDR`. The metadata leader connects to
//! the sled — the handshake proves the sled holds the cluster key and gives its id — reads its
//! devices and records it in the cluster state. Every head node then adds the address to its
//! pool (the agent's reconcile pass), so no configuration changes and nothing restarts. New
//! volumes, new chunks of growing volumes and drains place replicas on it; existing chunks stay
//! where they are.

use super::state::{ClusterState, MetaCmd, SledRecord};
use super::{AdminError, ControlPlane};
use common::admin::{AddSled, SledInfo};
use common::ids::SledId;
use std::time::Duration;

/// How long the sled may take to describe its devices.
const STAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest failure domain name.
const MAX_DOMAIN: usize = 64;

/// Refuses a failure domain name that `sled list` could not show on one line.
fn check_domain(domain: Option<&str>) -> Result<(), AdminError> {
    match domain {
        Some(d) if d.is_empty() || d.len() > MAX_DOMAIN => Err(AdminError::BadRequest(format!(
            "a failure domain has 1 to {MAX_DOMAIN} bytes; got {}",
            d.len()
        ))),
        Some(d) if d.chars().any(|c| c.is_whitespace() || c.is_control()) => Err(
            AdminError::BadRequest(format!("failure domain {d:?} contains spaces or controls")),
        ),
        _ => Ok(()),
    }
}

/// Refuses a sled the cluster cannot take: one whose id is a member at another address, or whose
/// chunk size is not the cluster's (placement could never use it).
fn admissible(st: &ClusterState, record: &SledRecord) -> Result<(), AdminError> {
    let addr = record.addr;
    if let Some(other) = st.sleds.get(&record.id) {
        return Err(AdminError::Conflict(format!(
            "the sled at {addr} is sled {}, a member already at {}: a sled that moved is \
             registered at its new address by the head nodes configured with it",
            record.id, other.addr
        )));
    }
    if let Some(c) = st.sleds.values().find_map(SledRecord::chunk_size)
        && let Some(d) = record.devices.iter().find(|d| d.chunk_size != c)
    {
        return Err(AdminError::Conflict(format!(
            "the sled at {addr} has chunks of {} bytes and the cluster's have {c}: format its \
             devices with the cluster's chunk size",
            d.chunk_size
        )));
    }
    Ok(())
}

impl ControlPlane {
    /// `POST /v1/sleds`: the sled as `sled list` shows it, and whether it is new (a sled
    /// already in the cluster at that address is no error: the request is repeated after a lost
    /// answer).
    pub(super) async fn add_sled(&self, req: AddSled) -> Result<(bool, SledInfo), AdminError> {
        check_domain(req.domain.as_deref())?;
        let addr = req.addr;
        if addr.ip().is_unspecified() || addr.port() == 0 {
            return Err(AdminError::BadRequest(format!(
                "{addr} is not an address a head node can connect to: give the sled's own IP \
                 address and port"
            )));
        }
        let id = {
            let _lock = self.ops.lock().await;
            let st = self.state();
            if let Some(s) = st.sleds.values().find(|s| s.addr == addr) {
                if req.domain.is_some() && req.domain != s.domain {
                    return Err(AdminError::Conflict(format!(
                        "sled {} at {addr} is already a member, in failure domain {}",
                        s.id,
                        s.domain.as_deref().unwrap_or("(none)")
                    )));
                }
                return Ok((false, self.sled_info(s.id)?));
            }
            let pool = &self.sleds.pool;
            let pooled = pool.all().iter().any(|c| c.addr() == addr);
            let record = match self
                .describe_sled(req)
                .await
                .and_then(|r| admissible(&st, &r).map(|()| r))
            {
                Ok(r) => r,
                Err(e) => {
                    // Nothing joined: the pool goes back to what it was.
                    if !pooled {
                        pool.forget(addr);
                    }
                    return Err(e);
                }
            };
            let id = record.id;
            tracing::info!(sled_id = %id, %addr, capacity = record.capacity(),
                "sled added to the cluster");
            self.propose(MetaCmd::PutSled(record)).await?;
            id
        };
        Ok((true, self.sled_info(id)?))
    }

    /// Connects to the sled at `req.addr` and reads its id and devices.
    async fn describe_sled(&self, req: AddSled) -> Result<SledRecord, AdminError> {
        let addr = req.addr;
        let conn = self.sleds.pool.add(addr);
        let client = conn
            .client()
            .await
            .map_err(|e| AdminError::Unavailable(format!("cannot add the sled at {addr}: {e}")))?;
        let stat = match tokio::time::timeout(STAT_TIMEOUT, client.stat()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(AdminError::Unavailable(format!(
                    "the sled at {addr} did not describe its devices: {e}"
                )));
            }
            Err(_) => {
                return Err(AdminError::Unavailable(format!(
                    "the sled at {addr} did not describe its devices within {STAT_TIMEOUT:?}"
                )));
            }
        };
        if stat.devices.is_empty() {
            return Err(AdminError::Conflict(format!(
                "the sled at {addr} has no devices"
            )));
        }
        Ok(SledRecord::described(&stat, addr, req.domain))
    }

    /// One sled as `sled list` shows it.
    pub(super) fn sled_info(&self, id: SledId) -> Result<SledInfo, AdminError> {
        let (st, obs) = self.observed();
        super::view::sleds(&st, &obs)
            .into_iter()
            .find(|s| s.id == id.to_string())
            .ok_or_else(|| AdminError::Internal(format!("sled {id} vanished")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::state::DeviceRecord;
    use std::net::SocketAddr;

    fn sled(id: SledId, port: u16, chunk_size: u64) -> SledRecord {
        SledRecord {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            domain: None,
            devices: vec![DeviceRecord {
                id: common::ids::DeviceId::random(),
                chunks: 16,
                chunk_size,
            }],
        }
    }

    #[test]
    fn a_sled_joins_with_a_new_id_and_the_clusters_chunk_size() {
        let member = sled(SledId::random(), 7001, 8 << 20);
        let mut st = ClusterState::default();
        // The first sled sets the chunk size.
        assert!(admissible(&st, &sled(SledId::random(), 7002, 4 << 20)).is_ok());
        st.sleds.insert(member.id, member.clone());
        assert!(admissible(&st, &sled(SledId::random(), 7002, 8 << 20)).is_ok());
        let e = admissible(&st, &sled(SledId::random(), 7002, 4 << 20)).unwrap_err();
        assert!(e.to_string().contains("chunks of 4194304 bytes"), "{e}");
        let e = admissible(&st, &sled(member.id, 7002, 8 << 20)).unwrap_err();
        assert_eq!(e.status(), 409);
        assert!(
            e.to_string().contains("a member already at 127.0.0.1:7001"),
            "{e}"
        );
    }

    #[test]
    fn failure_domains_are_short_printable_words() {
        assert!(check_domain(None).is_ok());
        assert!(check_domain(Some("rack-1")).is_ok());
        for bad in ["", "rack 1", "rack\n1", &"r".repeat(MAX_DOMAIN + 1)] {
            let e = check_domain(Some(bad)).unwrap_err();
            assert_eq!(e.status(), 400, "{bad:?}");
        }
    }
}
