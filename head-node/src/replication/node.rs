//! All the groups of one head node: routes incoming Raft messages to their group's driver, and
//! serves forwarded volume calls from the other nodes.

use super::GroupId;
use super::driver::{self, DriverConfig, GroupHandle, GroupKind, Persist, SledAccess};
use super::group::GroupError;
use super::memlog::RaftLog;
use super::rvolume::{ReplicatedVolume, VolumeRpc, VolumeRpcReply};
use super::throttle::{NodeThrottle, STATE_INTERVAL};
use super::transport::{Inbound, InboundRaft, Transport, handler_fn};
use common::AlignedBuf;
use common::ids::NodeId;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

struct Member<T: Transport> {
    handle: GroupHandle,
    volume: Arc<ReplicatedVolume<T>>,
    task: tokio::task::JoinHandle<()>,
    /// The volume's throttle task (QoS changes, credit balance), if throttled.
    throttle_task: Option<tokio::task::JoinHandle<()>>,
}

impl<T: Transport> Member<T> {
    fn abort(&self) {
        self.task.abort();
        if let Some(t) = &self.throttle_task {
            t.abort();
        }
    }
}

/// Serves the calls that are not volume I/O: group operations from the control plane and
/// admin requests forwarded to the metadata leader.
pub trait ControlHandler: Send + Sync + 'static {
    /// Answers `rpc` (a `Group` or `Admin` call) from `from`.
    fn handle(
        &self,
        from: NodeId,
        rpc: VolumeRpc,
        data: AlignedBuf,
    ) -> BoxFuture<'static, (VolumeRpcReply, Option<AlignedBuf>)>;
}

/// The groups of this node.
pub struct ReplNode<T: Transport> {
    node: NodeId,
    transport: Arc<T>,
    persist: Arc<dyn Persist>,
    cfg: DriverConfig,
    failover_timeout: Duration,
    groups: RwLock<HashMap<GroupId, Member<T>>>,
    router: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    control: OnceLock<Arc<dyn ControlHandler>>,
    throttle: OnceLock<Arc<NodeThrottle>>,
    /// What this node's NBD clients may have in flight on one volume (bytes).
    client_bytes: OnceLock<u64>,
    /// This node lost its Raft state: groups started while this is set rejoin (they neither
    /// vote nor campaign until caught up; see `GroupCore::rejoining`).
    rejoining: std::sync::atomic::AtomicBool,
}

impl<T: Transport> std::fmt::Debug for ReplNode<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplNode")
            .field("node", &self.node)
            .field("groups", &self.groups.read().map(|g| g.len()).unwrap_or(0))
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Drop for ReplNode<T> {
    fn drop(&mut self) {
        if let Some(r) = self.router.lock().ok().and_then(|mut r| r.take()) {
            r.abort();
        }
        if let Ok(g) = self.groups.read() {
            for m in g.values() {
                m.abort();
            }
        }
    }
}

impl<T: Transport> ReplNode<T> {
    /// Creates the node and registers it as the transport's inbound side.
    pub fn new(
        node: NodeId,
        transport: Arc<T>,
        persist: Arc<dyn Persist>,
        cfg: DriverConfig,
        failover_timeout: Duration,
    ) -> Arc<Self> {
        let this = Arc::new(Self {
            node,
            transport: transport.clone(),
            persist,
            cfg,
            failover_timeout,
            groups: RwLock::new(HashMap::new()),
            router: std::sync::Mutex::new(None),
            control: OnceLock::new(),
            throttle: OnceLock::new(),
            client_bytes: OnceLock::new(),
            rejoining: std::sync::atomic::AtomicBool::new(false),
        });
        let (tx, mut rx) = mpsc::channel::<InboundRaft>(16384);
        let weak: Weak<Self> = Arc::downgrade(&this);
        let rweak = weak.clone();
        let router = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let Some(node) = rweak.upgrade() else { break };
                let handle = node
                    .groups
                    .read()
                    .ok()
                    .and_then(|g| g.get(&m.group).map(|x| x.handle.clone()));
                if let Some(h) = handle {
                    h.deliver(m.msg);
                }
            }
        });
        *this.router.lock().unwrap_or_else(|p| p.into_inner()) = Some(router);
        let hweak = weak;
        transport.set_inbound(Inbound::new(tx).with_rpc(handler_fn(
            move |from, ctl: Vec<u8>, data| {
                let node = hweak.upgrade();
                async move {
                    let reply = match (node, postcard::from_bytes::<VolumeRpc>(&ctl)) {
                        (None, _) => (VolumeRpcReply::Failed("node stopping".into()), None),
                        (_, Err(e)) => {
                            (VolumeRpcReply::Failed(format!("malformed call: {e}")), None)
                        }
                        (Some(node), Ok(rpc @ (VolumeRpc::Group { .. } | VolumeRpc::Admin))) => {
                            match node.control.get().cloned() {
                                Some(c) => c.handle(from, rpc, data).await,
                                None => (VolumeRpcReply::Failed("node starting".into()), None),
                            }
                        }
                        (Some(node), Ok(rpc)) => {
                            let Some(group) = rpc.group() else {
                                return (
                                    postcard::to_stdvec(&VolumeRpcReply::NoGroup)
                                        .unwrap_or_default(),
                                    None,
                                );
                            };
                            match node.volume(group) {
                                Some(v) => v.serve_rpc(rpc, data).await,
                                None => (VolumeRpcReply::NoGroup, None),
                            }
                        }
                    };
                    (postcard::to_stdvec(&reply.0).unwrap_or_default(), reply.1)
                }
            },
        )));
        this
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Installs the handler of control calls (once).
    pub fn set_control(&self, h: Arc<dyn ControlHandler>) {
        let _ = self.control.set(h);
    }

    /// Throttles the volumes of the groups added from now on (once, before any group).
    pub fn set_throttle(&self, t: Arc<NodeThrottle>) {
        let _ = self.throttle.set(t);
    }

    /// Tells the volumes of the groups added from now on how many payload bytes the NBD clients
    /// of one node may have in flight on a volume (once, before any group): it sizes how long
    /// a forwarded call waits for the leader's throttle.
    pub fn set_client_bytes(&self, bytes: u64) {
        let _ = self.client_bytes.set(bytes);
    }

    /// Says whether this node rejoins after losing its Raft state: every group started while
    /// it does rejoins (groups already running keep their own state).
    pub fn set_rejoining(&self, on: bool) {
        self.rejoining
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Starts a group on this node over `log` (its persisted state).
    pub fn add_group<L: RaftLog>(
        &self,
        group: GroupId,
        name: &str,
        log: L,
        sleds: SledAccess,
        kind: GroupKind,
    ) -> Result<Arc<ReplicatedVolume<T>>, GroupError> {
        let is_volume = matches!(kind, GroupKind::Volume { .. });
        let mut cfg = self.cfg.clone();
        cfg.group.rejoining = self.rejoining.load(std::sync::atomic::Ordering::SeqCst);
        let (handle, task) = driver::spawn(
            group,
            self.node,
            log,
            cfg,
            self.transport.clone(),
            self.persist.clone(),
            sleds,
            kind,
        )?;
        let mut volume = ReplicatedVolume::new(
            handle.clone(),
            self.node,
            name.to_string(),
            self.transport.clone(),
            self.failover_timeout,
        );
        if let Some(&bytes) = self.client_bytes.get() {
            volume = volume.with_client_bytes(bytes);
        }
        let mut throttle_task = None;
        if let Some(nt) = self.throttle.get().filter(|_| is_volume) {
            let vt = nt.volume(group, &handle);
            throttle_task = Some(tokio::spawn(vt.clone().run(handle.clone(), STATE_INTERVAL)));
            volume = volume.with_throttle(vt);
        }
        let volume = Arc::new(volume);
        let mut g = self.groups.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.insert(
            group,
            Member {
                handle,
                volume: volume.clone(),
                task,
                throttle_task,
            },
        ) {
            old.abort();
        }
        Ok(volume)
    }

    /// Stops a group on this node (its log is the caller's to remove); returns its handle.
    ///
    /// Returns once the group's tasks are gone, not merely told to stop: a driver in the middle
    /// of a poll can still hand the log one last write, and a caller that removes the group's log
    /// right after must not be overtaken by it (the write would bring an empty group back at the
    /// next start).
    pub async fn remove_group(&self, group: GroupId) -> Option<GroupHandle> {
        let m = self
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group)?;
        m.volume.detach();
        m.abort();
        if let Some(t) = self.throttle.get() {
            t.forget(group);
        }
        let Member {
            handle,
            task,
            throttle_task,
            ..
        } = m;
        // Cancelled (or finished): either way the task is dropped once this returns.
        let _ = task.await;
        if let Some(t) = throttle_task {
            let _ = t.await;
        }
        Some(handle)
    }

    /// The handle of a group on this node.
    pub fn handle(&self, group: GroupId) -> Option<GroupHandle> {
        self.groups
            .read()
            .ok()
            .and_then(|g| g.get(&group).map(|m| m.handle.clone()))
    }

    /// Groups on this node.
    pub fn groups(&self) -> Vec<GroupId> {
        self.groups
            .read()
            .map(|g| g.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The volume of a group on this node.
    pub fn volume(&self, group: GroupId) -> Option<Arc<ReplicatedVolume<T>>> {
        self.groups
            .read()
            .ok()
            .and_then(|g| g.get(&group).map(|m| m.volume.clone()))
    }

    /// Every group's handle.
    pub fn handles(&self) -> Vec<GroupHandle> {
        self.groups
            .read()
            .map(|g| g.values().map(|m| m.handle.clone()).collect())
            .unwrap_or_default()
    }
}
