//! Starting head nodes and small clusters (sleds plus head nodes) for tests.

use crate::sled::{START_TIMEOUT, SledProc};
use crate::{Proc, bin, key_file, scratch};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// What a head node's ready file says.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HeadReady {
    /// Node id.
    pub node_id: u64,
    /// NBD address.
    pub nbd: SocketAddr,
    /// Admin and metrics address.
    pub admin: SocketAddr,
    /// PID.
    pub pid: u32,
    /// Epoch of this run.
    pub epoch: u64,
}

/// A running head node.
#[derive(Debug)]
pub struct HeadProc {
    /// The process.
    pub proc: Proc,
    /// Its addresses (of the latest start).
    pub ready: HeadReady,
}

impl HeadProc {
    /// Starts head node `node_id` over `sleds` serving `volumes` (`NAME:SIZE`).
    pub fn start(
        name: &str,
        dir: &Path,
        key: &Path,
        node_id: u64,
        sleds: &[SocketAddr],
        volumes: &[&str],
        extra: &[&str],
    ) -> Self {
        let state = dir.join(format!("{name}-state"));
        let mut args = vec![
            "--node-id".to_string(),
            node_id.to_string(),
            "--nbd-listen".into(),
            "127.0.0.1:0".into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--cluster-key-file".into(),
            key.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--ready-file".into(),
            dir.join(format!("{name}.ready.json")).display().to_string(),
        ];
        for s in sleds {
            args.push("--sled".into());
            args.push(s.to_string());
        }
        for v in volumes {
            args.push("--volume".into());
            args.push(v.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Proc::spawn(name, &bin("head-node"), &args, dir);
        let ready: HeadReady = proc.wait_ready(START_TIMEOUT);
        proc.set_arg("--nbd-listen", &ready.nbd.to_string());
        proc.set_arg("--admin-listen", &ready.admin.to_string());
        Self { proc, ready }
    }

    /// Restarts on the same addresses.
    pub fn restart(&mut self) {
        self.proc.start();
        self.ready = self.proc.wait_ready(START_TIMEOUT);
    }

    /// The NBD URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.ready.nbd)
    }
}

/// Sleds and one head node serving volumes.
#[derive(Debug)]
pub struct Cluster {
    /// Scratch directory (removed on drop).
    pub dir: tempfile::TempDir,
    /// Key file.
    pub key_path: PathBuf,
    /// The key.
    pub key: common::ClusterKey,
    /// Sleds.
    pub sleds: Vec<SledProc>,
    /// Head node.
    pub head: HeadProc,
}

impl Cluster {
    /// `n` sleds with `sled_size` device files (chunk size `chunk`), one head node serving
    /// `volumes` (`NAME:SIZE`).
    pub fn start(name: &str, n: usize, sled_size: &str, chunk: &str, volumes: &[&str]) -> Self {
        let dir = scratch(name);
        let (key_path, key) = key_file(dir.path());
        let sleds: Vec<SledProc> = (1..=n)
            .map(|i| {
                let dev = format!(
                    "{}:{sled_size}",
                    dir.path().join(format!("sled{i}.img")).display()
                );
                SledProc::start(
                    &format!("sled{i}"),
                    dir.path(),
                    &key_path,
                    &[dev],
                    None,
                    &["--chunk-size", chunk],
                )
            })
            .collect();
        let addrs: Vec<SocketAddr> = sleds.iter().map(|s| s.ready.listen).collect();
        let head = HeadProc::start("head1", dir.path(), &key_path, 1, &addrs, volumes, &[]);
        Self {
            dir,
            key_path,
            key,
            sleds,
            head,
        }
    }

    /// Sled protocol addresses.
    pub fn sled_addrs(&self) -> Vec<SocketAddr> {
        self.sleds.iter().map(|s| s.ready.listen).collect()
    }
}
