//! Starting head nodes and small clusters (sleds plus head nodes) for tests.

use crate::sled::{START_TIMEOUT, SledProc};
use crate::{Proc, bin, key_file, scratch, token_file};
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
    /// Peer (Raft) address.
    pub peer: SocketAddr,
    /// PID.
    pub pid: u32,
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
            "--admin-token-file".into(),
            token_file(dir).display().to_string(),
        ];
        for s in sleds {
            args.push("--sled".into());
            args.push(s.to_string());
        }
        for v in volumes {
            args.push("--volume".into());
            args.push(v.to_string());
        }
        if !extra.contains(&"--peer-listen") {
            args.push("--peer-listen".into());
            args.push("127.0.0.1:0".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Proc::spawn(name, &bin("head-node"), &args, dir);
        let ready: HeadReady = proc.wait_ready(START_TIMEOUT);
        proc.set_arg("--nbd-listen", &ready.nbd.to_string());
        proc.set_arg("--admin-listen", &ready.admin.to_string());
        proc.set_arg("--peer-listen", &ready.peer.to_string());
        Self { proc, ready }
    }

    /// Restarts on the same addresses.
    pub fn restart(&mut self) {
        self.proc.start();
        self.ready = self.proc.wait_ready(START_TIMEOUT);
    }

    /// Waits until the export is served (its group elected a leader that created the volume).
    pub fn wait_export(&self, export: &str, timeout: std::time::Duration) {
        let uri = self.uri(export);
        crate::eventually(timeout, &format!("export {uri}"), || {
            match std::process::Command::new("nbdinfo")
                .args(["--size", &uri])
                .output()
            {
                Ok(o) => o.status.success().then_some(()),
                // Not worth waiting for: say so at once rather than time out.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    panic!("nbdinfo not found (tests/run.sh installs libnbd-bin)")
                }
                Err(_) => None,
            }
        });
    }

    /// The NBD URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.ready.nbd)
    }

    /// The admin API base URL.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.ready.admin)
    }
}

/// Sleds and one head node serving volumes.
#[derive(Debug)]
pub struct Cluster {
    /// Key file.
    pub key_path: PathBuf,
    /// The key.
    pub key: common::ClusterKey,
    /// Sleds.
    pub sleds: Vec<SledProc>,
    /// Head node.
    pub head: HeadProc,
    /// Scratch directory (removed on drop; declared last so the processes, whose drop prints
    /// their logs after a failure, go first).
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// `n` sleds with `sled_size` device files (chunk size `chunk`), one head node serving
    /// `volumes` (`NAME:SIZE`).
    pub fn start(name: &str, n: usize, sled_size: &str, chunk: &str, volumes: &[&str]) -> Self {
        Self::start_with(name, n, sled_size, chunk, volumes, &[])
    }

    /// The same with `extra` head-node flags.
    pub fn start_with(
        name: &str,
        n: usize,
        sled_size: &str,
        chunk: &str,
        volumes: &[&str],
        extra: &[&str],
    ) -> Self {
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
        let head = HeadProc::start("head1", dir.path(), &key_path, 1, &addrs, volumes, extra);
        for v in volumes {
            let name = v.split(':').next().unwrap_or_default();
            head.wait_export(name, START_TIMEOUT);
        }
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

/// Picks `n` free loopback ports for processes to bind right after (peer addresses every head
/// node must know before any starts).
///
/// They come from below the kernel's ephemeral range, never from a bind to port 0: the kernel
/// hands ephemeral ports to outgoing connections too, and a head node dialling a peer that is
/// not listening yet can be given the peer's port as its own source port (on loopback it may
/// even connect to itself), which then fails that peer's start with "address in use". Each
/// call in a process takes ports the earlier calls did not.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let low = ephemeral_low.saturating_sub(12_000).max(10_000);
    let span = ephemeral_low.saturating_sub(low).max(1);
    // Start somewhere that depends on the process, so test binaries do not retrace each other.
    let base = std::process::id().wrapping_mul(7919);
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..span {
        if ports.len() == n {
            break;
        }
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + base.wrapping_add(k) % span) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            ports.push(port);
            held.push(l);
        }
    }
    assert_eq!(
        ports.len(),
        n,
        "no {n} free ports below the ephemeral range"
    );
    ports
}

/// Sleds and three head nodes replicating each volume with Raft.
#[derive(Debug)]
pub struct Cluster3 {
    /// Key file.
    pub key_path: PathBuf,
    /// The key.
    pub key: common::ClusterKey,
    /// Sleds.
    pub sleds: Vec<SledProc>,
    /// Head nodes (node id = index + 1).
    pub heads: Vec<HeadProc>,
    /// Scratch directory (removed on drop; declared last, see [`Cluster::dir`]).
    pub dir: tempfile::TempDir,
}

impl Cluster3 {
    /// `n_sleds` sleds and three head nodes serving `volumes` (`NAME:SIZE`), with `extra` flags
    /// for every head node.
    pub fn start(
        name: &str,
        n_sleds: usize,
        sled_size: &str,
        chunk: &str,
        volumes: &[&str],
        extra: &[&str],
    ) -> Self {
        let dir = scratch(name);
        let (key_path, key) = key_file(dir.path());
        let sleds: Vec<SledProc> = (1..=n_sleds)
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
        let ports = free_ports(3);
        let mut heads = Vec::new();
        for i in 0..3usize {
            let mut args: Vec<String> =
                vec!["--peer-listen".into(), format!("127.0.0.1:{}", ports[i])];
            for (j, port) in ports.iter().enumerate() {
                if j != i {
                    args.push("--peer".into());
                    args.push(format!("{}=127.0.0.1:{port}", j + 1));
                }
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            heads.push(HeadProc::start(
                &format!("head{}", i + 1),
                dir.path(),
                &key_path,
                i as u64 + 1,
                &addrs,
                volumes,
                &a,
            ));
        }
        for v in volumes {
            let name = v.split(':').next().unwrap_or_default();
            for h in &heads {
                h.wait_export(name, START_TIMEOUT);
            }
        }
        Self {
            dir,
            key_path,
            key,
            sleds,
            heads,
        }
    }
}
