//! Starting sled controllers for tests.

use crate::{Proc, bin};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a sled's ready file says.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SledReady {
    /// Sled id.
    pub sled_id: String,
    /// Protocol address.
    pub listen: SocketAddr,
    /// Metrics address.
    pub metrics: SocketAddr,
    /// PID.
    pub pid: u32,
}

/// A running sled controller.
#[derive(Debug)]
pub struct SledProc {
    /// The process.
    pub proc: Proc,
    /// Its addresses (of the latest start).
    pub ready: SledReady,
    /// Its devices (`PATH:SIZE` or a block device path).
    pub devices: Vec<String>,
}

/// Startup timeout for test processes.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

impl SledProc {
    /// Starts a sled on loopback with the given devices; `listen` fixes its protocol address
    /// (for restarts that must keep it), otherwise the port is picked by the process.
    pub fn start(
        name: &str,
        dir: &Path,
        key: &Path,
        devices: &[String],
        listen: Option<SocketAddr>,
        extra: &[&str],
    ) -> Self {
        let ready_file: PathBuf = dir.join(format!("{name}.ready.json"));
        let mut args = vec![
            "--listen".to_string(),
            listen.map_or("127.0.0.1:0".to_string(), |a| a.to_string()),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--cluster-key-file".into(),
            key.display().to_string(),
            "--ready-file".into(),
            ready_file.display().to_string(),
        ];
        for d in devices {
            args.push("--device".into());
            args.push(d.clone());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Proc::spawn(name, &bin("sled-controller"), &args, dir);
        let ready: SledReady = proc.wait_ready(START_TIMEOUT);
        // Restarts keep the address head nodes know.
        proc.set_arg("--listen", &ready.listen.to_string());
        Self {
            proc,
            ready,
            devices: devices.to_vec(),
        }
    }

    /// Restarts after a stop or kill, on the same protocol address.
    pub fn restart(&mut self) {
        self.proc.start();
        self.ready = self.proc.wait_ready(START_TIMEOUT);
    }
}
