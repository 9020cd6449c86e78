//! The real `stockade` CLI pointed at a test cluster: what the end-to-end tests drive it with.

use crate::head::Cluster3;
use crate::{bin, eventually};
use common::admin::ClusterStatus;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

/// How the CLI reaches a cluster: its head nodes' admin endpoints and the token file.
#[derive(Debug, Clone)]
pub struct Admin {
    /// `http://…` of every head node, comma-separated (as `--endpoint` takes them).
    pub endpoints: String,
    /// The admin token file.
    pub token: PathBuf,
}

impl Admin {
    /// The CLI for `c` (its token is `admin.token` in the cluster's directory).
    pub fn of(c: &Cluster3) -> Self {
        Self {
            endpoints: c
                .heads
                .iter()
                .map(|h| h.admin_url())
                .collect::<Vec<_>>()
                .join(","),
            token: c.dir.path().join("admin.token"),
        }
    }

    /// `--endpoint … --token-file …`, to put before a command.
    pub fn global_args(&self) -> Vec<String> {
        vec![
            "--endpoint".into(),
            self.endpoints.clone(),
            "--token-file".into(),
            self.token.display().to_string(),
        ]
    }

    /// Runs `stockade args…`.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(bin("stockade"))
            .args(self.global_args())
            .args(args)
            .output()
            .expect("running stockade")
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "stockade {args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs a command that must fail with `code`; returns its stderr.
    pub fn fails(&self, code: i32, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "stockade {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// Runs a command with `--json` that must succeed; parses its output.
    pub fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// Waits until `heads` head nodes and `sleds` sleds are up and the pool holds `pool` ready
    /// groups.
    pub fn wait_healthy(&self, heads: usize, sleds: usize, pool: usize) -> ClusterStatus {
        eventually(Duration::from_secs(60), "a healthy cluster", || {
            let o = self.run(&["cluster", "status", "--json"]);
            let st: ClusterStatus = serde_json::from_slice(&o.stdout).ok()?;
            let up_heads = st.nodes.iter().filter(|n| n.state == "up").count();
            let up_sleds = st.sleds.iter().filter(|s| s.state == "up").count();
            (up_heads == heads && up_sleds == sleds && st.pool.ready >= pool).then_some(st)
        })
    }
}
