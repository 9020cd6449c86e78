//! All the groups of one head node: routes incoming Raft messages to their group's driver, and
//! serves forwarded volume calls from the other nodes.

use super::GroupId;
use super::driver::{self, DriverConfig, GroupHandle, Persist, SledAccess, VolumeTemplate};
use super::group::GroupError;
use super::memlog::RaftLog;
use super::rvolume::{ReplicatedVolume, VolumeRpc, VolumeRpcReply};
use super::transport::{Inbound, InboundRaft, Transport, handler_fn};
use common::ids::NodeId;
use std::collections::HashMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

struct Member<T: Transport> {
    handle: GroupHandle,
    volume: Arc<ReplicatedVolume<T>>,
    task: tokio::task::JoinHandle<()>,
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
                m.task.abort();
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
            move |_from, ctl: Vec<u8>, data| {
                let node = hweak.upgrade();
                async move {
                    let reply = match (node, postcard::from_bytes::<VolumeRpc>(&ctl)) {
                        (None, _) => (VolumeRpcReply::Failed("node stopping".into()), None),
                        (_, Err(e)) => {
                            (VolumeRpcReply::Failed(format!("malformed call: {e}")), None)
                        }
                        (Some(node), Ok(rpc)) => {
                            let group = match &rpc {
                                VolumeRpc::Read { group, .. }
                                | VolumeRpc::Write { group, .. }
                                | VolumeRpc::WriteZeroes { group, .. }
                                | VolumeRpc::Trim { group, .. }
                                | VolumeRpc::BlockStatus { group, .. } => *group,
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

    /// Starts a group on this node over `log` (its persisted state). `template` creates the
    /// volume when the group has none yet.
    pub fn add_group<L: RaftLog>(
        &self,
        group: GroupId,
        name: &str,
        log: L,
        sleds: SledAccess,
        template: Option<VolumeTemplate>,
    ) -> Result<Arc<ReplicatedVolume<T>>, GroupError> {
        let (handle, task) = driver::spawn(
            group,
            self.node,
            log,
            self.cfg.clone(),
            self.transport.clone(),
            self.persist.clone(),
            sleds,
            template,
        )?;
        let volume = Arc::new(ReplicatedVolume::new(
            handle.clone(),
            self.node,
            name.to_string(),
            self.transport.clone(),
            self.failover_timeout,
        ));
        let mut g = self.groups.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = g.insert(
            group,
            Member {
                handle,
                volume: volume.clone(),
                task,
            },
        ) {
            old.task.abort();
        }
        Ok(volume)
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
