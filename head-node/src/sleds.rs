//! Connections from this head node to the sleds it uses.
//!
//! Each sled is known by its address (from configuration, or from the cluster state for a sled
//! added to a running cluster) and, once reached, by the id it proves in the handshake. A
//! connection is made on first use and remade after it fails, with a short back-off so a dead
//! sled does not cost a connect attempt per request. Every request has a deadline
//! (`sled-timeout`): a hung sled's connection is closed like a dead one's. Every new connection
//! first supersedes this node's older ones at the sled, so a request that timed out on a closed
//! connection (and may still sit in the sled's socket buffer) can never run after what is sent
//! on the new one — what makes resynchronising a sled that hung safe.

use common::ClusterKey;
use common::ids::{NodeId, SledId};
use common::sled_client::{ClientError, SledClient};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
// tokio's clock, so a test that pauses time drives the retry window too.
use tokio::time::Instant;

/// Time allowed to connect and authenticate.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Minimum time between two connect attempts to a sled that failed (callers in between get the
/// last attempt's error at once).
pub const RETRY_AFTER: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct Slot {
    client: Option<Arc<SledClient>>,
    last_failure: Option<(Instant, ClientError)>,
}

/// One sled.
#[derive(Debug)]
pub struct SledConn {
    addr: SocketAddr,
    key: ClusterKey,
    node: NodeId,
    slot: tokio::sync::Mutex<Slot>,
    id: Mutex<Option<SledId>>,
    /// When the last connect attempt failed (cleared by a success).
    failed_at: Mutex<Option<Instant>>,
    /// Given to every request on this sled's connections.
    request_timeout: Option<Duration>,
}

impl SledConn {
    /// The sled's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its id, once it has been reached.
    pub fn id(&self) -> Option<SledId> {
        *self.id.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when the sled could not be reached on the last attempt, less than
    /// [`RETRY_AFTER`] ago and not since: callers with a choice (a read with other replicas)
    /// try it last instead of waiting out the back-off.
    pub fn is_suspect(&self) -> bool {
        self.failed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < RETRY_AFTER)
    }

    /// A live connection, connecting if needed.
    pub async fn client(&self) -> Result<Arc<SledClient>, ClientError> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = &slot.client {
            if c.is_alive() {
                return Ok(c.clone());
            }
            slot.client = None;
        }
        // Within the back-off after a failed attempt, fail at once with that attempt's error:
        // callers retry on their own schedule, and none queues behind another's wait (a
        // write-back with many requests in flight would otherwise make one attempt per
        // back-off period, one caller at a time).
        if let Some((when, e)) = &slot.last_failure
            && when.elapsed() < RETRY_AFTER
        {
            return Err(e.clone());
        }
        let connected = async {
            let mut c =
                SledClient::connect(self.addr, &self.key, self.node, CONNECT_TIMEOUT).await?;
            if let Some(t) = self.request_timeout {
                c = c.with_request_timeout(t);
            }
            // A barrier with this node's older connections: requests of unknown fate (a
            // connection closed after a timeout) can no longer run after this one's.
            c.supersede().await?;
            Ok::<_, ClientError>(c)
        };
        match connected.await {
            Ok(c) => {
                let c = Arc::new(c);
                *self.id.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.sled_id());
                slot.client = Some(c.clone());
                slot.last_failure = None;
                *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
                Ok(c)
            }
            Err(e) => {
                // Once per outage at warning level; each further attempt at debug level.
                if slot.last_failure.is_none() {
                    tracing::warn!(sled = %self.addr, error = %e, "cannot reach sled");
                } else {
                    tracing::debug!(sled = %self.addr, error = %e, "still cannot reach sled");
                }
                slot.last_failure = Some((Instant::now(), e.clone()));
                *self.failed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                Err(e)
            }
        }
    }
}

/// The sleds of this head node, by address and by id: the configured ones, and those the
/// cluster state lists (added to a running cluster with `stockade sled add`).
#[derive(Debug)]
pub struct SledPool {
    key: ClusterKey,
    node: NodeId,
    request_timeout: Option<Duration>,
    /// Every sled, the configured ones first. Read on every request (by id), changed only when
    /// the cluster's sled membership does.
    sleds: RwLock<Vec<Member>>,
}

#[derive(Debug, Clone)]
struct Member {
    conn: Arc<SledConn>,
    /// From this node's configuration (kept for good), or learnt from the cluster state.
    configured: bool,
}

impl SledPool {
    /// A pool over the configured sled addresses; nothing is connected yet.
    pub fn new(addrs: &[SocketAddr], key: ClusterKey, node: NodeId) -> Self {
        let pool = Self {
            key,
            node,
            request_timeout: None,
            sleds: RwLock::new(Vec::new()),
        };
        let members = addrs
            .iter()
            .map(|a| Member {
                conn: pool.conn(*a),
                configured: true,
            })
            .collect();
        *pool.write() = members;
        pool
    }

    fn conn(&self, addr: SocketAddr) -> Arc<SledConn> {
        Arc::new(SledConn {
            addr,
            key: self.key.clone(),
            node: self.node,
            slot: tokio::sync::Mutex::new(Slot::default()),
            id: Mutex::new(None),
            failed_at: Mutex::new(None),
            request_timeout: self.request_timeout,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Member>> {
        self.sleds.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Member>> {
        self.sleds.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives every request `timeout` (see [`SledClient::with_request_timeout`]). Call before
    /// the pool is shared.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        for m in self.write().iter_mut() {
            if let Some(s) = Arc::get_mut(&mut m.conn) {
                s.request_timeout = Some(timeout);
            }
        }
        self
    }

    /// Every sled.
    pub fn all(&self) -> Vec<Arc<SledConn>> {
        self.read().iter().map(|m| m.conn.clone()).collect()
    }

    /// The sled at `addr`, added (not connected yet) unless the pool has it.
    pub fn add(&self, addr: SocketAddr) -> Arc<SledConn> {
        if let Some(m) = self.read().iter().find(|m| m.conn.addr == addr) {
            return m.conn.clone();
        }
        let mut sleds = self.write();
        if let Some(m) = sleds.iter().find(|m| m.conn.addr == addr) {
            return m.conn.clone();
        }
        let conn = self.conn(addr);
        sleds.push(Member {
            conn: conn.clone(),
            configured: false,
        });
        tracing::info!(sled = %addr, "sled added to this node's pool");
        conn
    }

    /// Makes the sleds not from the configuration exactly those at `listed`: adds the ones
    /// missing, and drops the others (sleds that left the cluster).
    pub fn sync(&self, listed: &BTreeSet<SocketAddr>) {
        for a in listed {
            self.add(*a);
        }
        let stale = self
            .read()
            .iter()
            .any(|m| !m.configured && !listed.contains(&m.conn.addr));
        if stale {
            self.write().retain(|m| {
                let keep = m.configured || listed.contains(&m.conn.addr);
                if !keep {
                    tracing::info!(sled = %m.conn.addr, "sled dropped from this node's pool");
                }
                keep
            });
        }
    }

    /// Drops the sled at `addr` unless it is configured (an `add` that did not lead anywhere).
    pub fn forget(&self, addr: SocketAddr) {
        self.write().retain(|m| m.configured || m.conn.addr != addr);
    }

    /// Connects to every sled (concurrently) so their ids are known; returns the ones reached.
    pub async fn discover(&self) -> Vec<(SledId, Arc<SledConn>)> {
        let tries = self
            .all()
            .into_iter()
            .map(|s| async move { s.client().await.ok().map(|c| (c.sled_id(), s)) });
        futures_util::future::join_all(tries)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The sled with this id, if it has been reached.
    pub fn by_id(&self, id: SledId) -> Option<Arc<SledConn>> {
        self.read()
            .iter()
            .find(|m| m.conn.id() == Some(id))
            .map(|m| m.conn.clone())
    }

    /// The sled with this id, connecting to the sleds not reached yet to learn their ids.
    pub async fn find(&self, id: SledId) -> Option<Arc<SledConn>> {
        if let Some(s) = self.by_id(id) {
            return Some(s);
        }
        let unknown: Vec<Arc<SledConn>> = self
            .all()
            .into_iter()
            .filter(|s| s.id().is_none())
            .collect();
        for s in unknown {
            if s.client().await.is_ok() && s.id() == Some(id) {
                return Some(s);
            }
        }
        self.by_id(id)
    }

    /// Map of reached sleds by id.
    pub fn known(&self) -> HashMap<SledId, Arc<SledConn>> {
        self.read()
            .iter()
            .filter_map(|m| m.conn.id().map(|id| (id, m.conn.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(pool: &SledPool) -> Vec<SocketAddr> {
        pool.all().iter().map(|c| c.addr()).collect()
    }

    #[test]
    fn the_cluster_state_adds_and_drops_sleds_but_never_configured_ones() {
        let [a, b, c]: [SocketAddr; 3] =
            ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"].map(|s| s.parse().unwrap());
        let pool = SledPool::new(&[a], ClusterKey::from_bytes([7; 32]), NodeId(1))
            .with_request_timeout(Duration::from_secs(2));
        pool.sync(&[a, b].into());
        assert_eq!(addrs(&pool), [a, b]);
        // The same connection each time, with the pool's request timeout.
        let first = pool.add(b);
        assert!(Arc::ptr_eq(&first, &pool.add(b)));
        assert_eq!(first.request_timeout, Some(Duration::from_secs(2)));
        pool.sync(&[c].into());
        assert_eq!(addrs(&pool), [a, c]);
        pool.sync(&BTreeSet::new());
        assert_eq!(addrs(&pool), [a]);
        pool.forget(a);
        assert_eq!(addrs(&pool), [a]);
        pool.add(b);
        pool.forget(b);
        assert_eq!(addrs(&pool), [a]);
    }
}
