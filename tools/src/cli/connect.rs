//! Where the admin commands connect and with which token.
//!
//! Endpoints: `--endpoint` (or `STOCKADE_ENDPOINT`), else the `admin_endpoints` of
//! `DATA_DIR/cluster.json` (written by `stockade up`). Token: `--token-file` (or
//! `STOCKADE_TOKEN_FILE`), which must exist; else the `admin_token_file` of cluster.json, else
//! `DATA_DIR/admin.token`; a default that does not exist means no token (the server then
//! answers 401, and the message says which file was missing).

use super::{AdminOpts, CliError};
use crate::admin_client::{AdminClient, AdminError, AdminToken};
use crate::up::ClusterInfo;
use common::events::http::HttpUrl;
use std::path::{Path, PathBuf};

/// Name of the cluster description in a data directory.
pub const CLUSTER_FILE: &str = "cluster.json";
/// Name of the default token file in a data directory.
pub const TOKEN_FILE: &str = "admin.token";

/// Endpoints and token to use.
#[derive(Debug, Clone)]
pub struct Target {
    /// Admin API endpoints, in the order to try them.
    pub endpoints: Vec<HttpUrl>,
    /// The token, if one was found.
    pub token: Option<AdminToken>,
    /// Why there is no token, when there is none.
    pub token_note: Option<String>,
}

impl Target {
    /// A client of these endpoints with this token.
    pub fn client(&self) -> Result<AdminClient, AdminError> {
        AdminClient::new(self.endpoints.clone(), self.token.clone())
    }
}

/// Resolves the options (see the module documentation).
pub fn resolve(opts: &AdminOpts) -> Result<Target, CliError> {
    let cluster_path = opts.data_dir.join(CLUSTER_FILE);
    let explicit: Vec<&str> = opts
        .endpoints
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    let (endpoints, cluster) = if explicit.is_empty() {
        let Some(cluster) = load_cluster(&cluster_path)? else {
            return Err(CliError::NoEndpoint { cluster_file: None });
        };
        if cluster.admin_endpoints.is_empty() {
            return Err(CliError::NoEndpoint {
                cluster_file: Some(cluster_path),
            });
        }
        let endpoints = AdminClient::parse_endpoints(&cluster.admin_endpoints)?;
        (endpoints, Some(cluster))
    } else {
        // The file only matters for the token here: one that cannot be read is ignored.
        let cluster = load_cluster(&cluster_path).ok().flatten();
        (AdminClient::parse_endpoints(&explicit)?, cluster)
    };

    if let Some(path) = &opts.token_file {
        return Ok(Target {
            endpoints,
            token: Some(AdminToken::read(path)?),
            token_note: None,
        });
    }
    let default = cluster
        .and_then(|c| c.admin_token_file)
        .map(|p| opts.data_dir.join(p))
        .unwrap_or_else(|| opts.data_dir.join(TOKEN_FILE));
    if default.exists() {
        Ok(Target {
            endpoints,
            token: Some(AdminToken::read(&default)?),
            token_note: None,
        })
    } else {
        Ok(Target {
            endpoints,
            token: None,
            token_note: Some(format!(
                "no token was sent: {} does not exist",
                default.display()
            )),
        })
    }
}

/// Reads cluster.json; `None` when there is none.
fn load_cluster(path: &Path) -> Result<Option<ClusterInfo>, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CliError::ClusterFile {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| CliError::ClusterJson {
            path: PathBuf::from(path),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> AdminOpts {
        AdminOpts {
            json: false,
            endpoints: vec![],
            token_file: None,
            data_dir: dir.to_path_buf(),
        }
    }

    fn write_cluster(dir: &Path, endpoints: &[&str], token_file: Option<&str>) {
        let doc = serde_json::json!({
            "supervisor_pid": 1,
            "cluster_key_file": dir.join("cluster.key"),
            "processes": [],
            "admin_endpoints": endpoints,
            "admin_token_file": token_file,
        });
        std::fs::write(dir.join(CLUSTER_FILE), doc.to_string()).unwrap();
    }

    #[test]
    fn nothing_found_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(&opts(dir.path())).unwrap_err().to_string();
        assert_eq!(
            e,
            "no admin endpoint: start a cluster with `stockade up` or pass --endpoint / set STOCKADE_ENDPOINT"
        );
        write_cluster(dir.path(), &[], None);
        let e = resolve(&opts(dir.path())).unwrap_err().to_string();
        assert!(e.starts_with("no admin endpoint: start a cluster"), "{e}");
        assert!(e.contains("cluster.json lists none"), "{e}");
        std::fs::write(dir.path().join(CLUSTER_FILE), "{").unwrap();
        let e = resolve(&opts(dir.path())).unwrap_err().to_string();
        assert!(
            e.contains("is not a cluster.json written by `stockade up`"),
            "{e}"
        );
    }

    #[test]
    fn cluster_json_gives_endpoints_and_token() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "from-cluster\n").unwrap();
        std::fs::write(dir.path().join(TOKEN_FILE), "default\n").unwrap();
        write_cluster(
            dir.path(),
            &["http://127.0.0.1:9180", "127.0.0.1:9181"],
            Some("t"),
        );
        let t = resolve(&opts(dir.path())).unwrap();
        let urls: Vec<String> = t.endpoints.iter().map(|u| u.to_string()).collect();
        assert_eq!(urls, ["http://127.0.0.1:9180/", "http://127.0.0.1:9181/"]);
        assert_eq!(t.token, Some(AdminToken::new("from-cluster").unwrap()));

        // Without a token file in cluster.json: DATA_DIR/admin.token.
        write_cluster(dir.path(), &["http://127.0.0.1:9180"], None);
        let t = resolve(&opts(dir.path())).unwrap();
        assert_eq!(t.token, Some(AdminToken::new("default").unwrap()));
        assert_eq!(t.token_note, None);
    }

    #[test]
    fn explicit_options_win() {
        let dir = tempfile::tempdir().unwrap();
        write_cluster(dir.path(), &["http://127.0.0.1:9180"], None);
        std::fs::write(dir.path().join("mine"), "mine").unwrap();
        let o = AdminOpts {
            endpoints: vec!["http://10.0.0.1:9180".to_string(), " ".to_string()],
            token_file: Some(dir.path().join("mine")),
            ..opts(dir.path())
        };
        let t = resolve(&o).unwrap();
        assert_eq!(t.endpoints.len(), 1);
        assert_eq!(t.endpoints[0].host(), "10.0.0.1");
        assert_eq!(t.token, Some(AdminToken::new("mine").unwrap()));

        // An explicit token file must exist.
        let o = AdminOpts {
            token_file: Some(dir.path().join("missing")),
            ..o
        };
        let e = resolve(&o).unwrap_err().to_string();
        assert!(e.contains("reading the admin token file"), "{e}");
        assert!(e.contains("--token-file"), "{e}");
    }

    #[test]
    fn a_missing_default_token_is_noted() {
        let dir = tempfile::tempdir().unwrap();
        let o = AdminOpts {
            endpoints: vec!["127.0.0.1:1".to_string()],
            ..opts(dir.path())
        };
        let t = resolve(&o).unwrap();
        assert_eq!(t.token, None);
        let note = t.token_note.unwrap();
        assert!(note.contains("admin.token does not exist"), "{note}");
        let bad = AdminOpts {
            endpoints: vec!["https://x".to_string()],
            ..opts(dir.path())
        };
        let e = resolve(&bad).unwrap_err().to_string();
        assert!(e.contains("only http://"), "{e}");
        assert!(e.contains("--endpoint"), "{e}");
    }
}
