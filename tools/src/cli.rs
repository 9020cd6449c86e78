//! The admin commands of `stockade`: `volume …`, `sled list`, `node list`, `cluster status`
//! and `completions`. Each talks to the head nodes' admin API through
//! [`AdminClient`](crate::admin_client::AdminClient) and prints either text for people or, with
//! `--json`, the API's document.
//!
//! Adding a command: a variant in the group's enum (for example [`volume::VolumeCmd`]) with its
//! `clap::Args` struct, and an arm in that group's `run`, which answers an [`Output`].

pub mod args;
pub mod connect;
pub mod render;
pub mod volume;

use crate::admin_client::AdminError;
use clap::{Args, Subcommand};
use common::events::http::HttpError;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;

/// Exit code of a failed admin command (clap's usage errors exit with 2).
pub const EXIT_FAILURE: u8 = 1;

/// The admin command groups (flattened into `stockade`'s subcommands).
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create, list, show, resize, attach, detach and delete volumes; change their QoS.
    Volume(volume::VolumeArgs),
    /// The sleds (storage servers) of the cluster.
    Sled(SledArgs),
    /// The head nodes of the cluster.
    Node(NodeArgs),
    /// The whole cluster.
    Cluster(ClusterArgs),
}

/// Options of every command (accepted before or after the subcommand): where the cluster
/// is and how to talk to it.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct AdminOpts {
    /// Print the API's JSON document instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Admin API of a head node, http://HOST:PORT (repeat or separate with commas to give
    /// several; they are tried in order). Default: the endpoints in DATA_DIR/cluster.json.
    #[arg(
        long = "endpoint",
        value_name = "URL",
        env = "STOCKADE_ENDPOINT",
        value_delimiter = ',',
        global = true
    )]
    pub endpoints: Vec<String>,
    /// File holding the cluster's admin token. Default: the one named in DATA_DIR/cluster.json,
    /// else DATA_DIR/admin.token.
    #[arg(long, value_name = "PATH", env = "STOCKADE_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Data directory of a `stockade up` cluster (where cluster.json and admin.token are).
    #[arg(
        long,
        value_name = "DIR",
        env = "STOCKADE_DATA_DIR",
        default_value = "./stockade-data",
        global = true
    )]
    pub data_dir: PathBuf,
}

/// `stockade sled`.
#[derive(Debug, Args)]
pub struct SledArgs {
    #[command(subcommand)]
    cmd: SledCmd,
}

/// Subcommands of `stockade sled`.
#[derive(Debug, Clone, Subcommand)]
pub enum SledCmd {
    /// List the sleds: address, state, devices, capacity.
    List,
    /// Add a running sled controller to the cluster: every head node connects to it, and new
    /// volumes, growing volumes and drains place replicas on it. No head node restarts and no
    /// configuration changes.
    Add {
        /// Its address as every head node reaches it (`IP:PORT`, the sled's `listen`).
        addr: std::net::SocketAddr,
        /// Its failure domain (rack, host…): replicas of a chunk go to different domains.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Drain a sled: no new replica goes to it, and every chunk replica it holds is copied to
    /// another sled and then dropped from it (also when the sled is down: the copies come from
    /// the other replicas). Returns at once; `sled list` shows it done when PROVISIONED is 0.
    Drain {
        /// The sled's id, as `sled list` shows it.
        id: String,
    },
    /// Stop draining a sled: placement may use it again (moved replicas stay where they are).
    Undrain {
        /// The sled's id, as `sled list` shows it.
        id: String,
    },
    /// Forget a drained sled that is down (stopped or dead), so the cluster no longer counts
    /// or reports it.
    Remove {
        /// The sled's id, as `sled list` shows it.
        id: String,
    },
}

/// `stockade node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    cmd: NodeCmd,
}

/// Subcommands of `stockade node`.
#[derive(Debug, Clone, Subcommand)]
pub enum NodeCmd {
    /// List the head nodes: addresses, state, groups, QoS load.
    List,
}

/// `stockade cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    cmd: ClusterCmd,
}

/// Subcommands of `stockade cluster`.
#[derive(Debug, Clone, Subcommand)]
pub enum ClusterCmd {
    /// Health, metadata leader, capacity and the group pool.
    Status,
}

/// `stockade completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// The completion script of `cmd` (the whole `stockade` command) for `shell`.
pub fn completions(shell: clap_complete::Shell, cmd: &mut clap::Command) -> Output {
    // Into memory first: the generators panic when their writer fails (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, cmd, "stockade", &mut script);
    Output::Text(String::from_utf8_lossy(&script).into_owned())
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The admin API or talking to it (the message adds what to do).
    #[error("{}", describe(.source, .token_note.as_deref()))]
    Admin {
        /// The cause.
        source: AdminError,
        /// Why no token was sent, when none was.
        token_note: Option<String>,
    },
    /// No endpoint given and none found.
    #[error(
        "no admin endpoint: start a cluster with `stockade up` or pass --endpoint / set STOCKADE_ENDPOINT{}",
        .cluster_file.as_ref().map(|p| format!(" ({} lists none)", p.display())).unwrap_or_default()
    )]
    NoEndpoint {
        /// The cluster.json that was read, if one was.
        cluster_file: Option<PathBuf>,
    },
    /// cluster.json could not be read.
    #[error("reading {}: {source}", path.display())]
    ClusterFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// cluster.json is not what `stockade up` writes.
    #[error("{} is not a cluster.json written by `stockade up`: {source}", path.display())]
    ClusterJson {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// Options that make an invalid QoS.
    #[error("invalid QoS options: {0}")]
    Qos(#[from] common::throttle::QosError),
    /// An import or export failed.
    #[error(transparent)]
    Image(crate::image::ImageError),
    /// The `attach --local` endpoint failed.
    #[error("local endpoint: {0}")]
    Local(#[source] crate::attach_local::AttachError),
    /// The async runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Printing the answer failed.
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
    /// Encoding the answer as JSON failed.
    #[error("encoding the answer as JSON: {0}")]
    Json(#[source] serde_json::Error),
}

impl From<AdminError> for CliError {
    fn from(source: AdminError) -> Self {
        CliError::Admin {
            source,
            token_note: None,
        }
    }
}

impl From<crate::image::ImageError> for CliError {
    fn from(e: crate::image::ImageError) -> Self {
        match e {
            crate::image::ImageError::Admin(source) => source.into(),
            other => CliError::Image(other),
        }
    }
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        EXIT_FAILURE
    }
}

/// The message for an admin API error: what was wrong and what to do.
pub fn describe(e: &AdminError, token_note: Option<&str>) -> String {
    match e {
        AdminError::Unauthorized { .. } => format!(
            "the admin API refused the token (HTTP 401): pass --token-file or set STOCKADE_TOKEN_FILE to the cluster's admin.token{}",
            token_note.map(|n| format!(" ({n})")).unwrap_or_default()
        ),
        AdminError::Api {
            status: 503,
            code,
            message,
        } if code == "no_leader" => format!(
            "{message} (HTTP 503: the cluster has no metadata leader now, probably an election; retry in a few seconds)"
        ),
        AdminError::Api {
            status: 503,
            message,
            ..
        } => format!("{message} (HTTP 503)"),
        AdminError::Api {
            status: 504,
            message,
            ..
        } => format!("{message} (HTTP 504)"),
        AdminError::Api {
            status: 500,
            message,
            ..
        } => format!("the head node failed: {message} (HTTP 500)"),
        AdminError::Api { message, .. } => message.clone(),
        AdminError::Unreachable { endpoints, source } => {
            let cause = match source {
                HttpError::Connect { source, .. } => source.to_string(),
                other => other.to_string(),
            };
            format!(
                "cannot reach the admin API at {}: {cause}; is the cluster running (`stockade up`)?",
                endpoints.join(", ")
            )
        }
        AdminError::Decode { .. } | AdminError::Status { .. } => {
            format!("{e}; is that address a Stockade head node's admin API of this version?")
        }
        AdminError::TokenFile { .. } | AdminError::TokenInvalid { .. } => {
            format!(
                "{e}; pass --token-file or set STOCKADE_TOKEN_FILE to the cluster's admin.token"
            )
        }
        AdminError::Url(_) | AdminError::EndpointQuery { .. } => {
            format!("{e} (from --endpoint, STOCKADE_ENDPOINT or cluster.json)")
        }
        AdminError::NoEndpoint => CliError::NoEndpoint { cluster_file: None }.to_string(),
        AdminError::Http { .. } | AdminError::Encode(_) => e.to_string(),
    }
}

/// What a command prints.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Text for people (printed as is).
    Text(String),
    /// A JSON document (printed pretty).
    Json(serde_json::Value),
    /// Nothing.
    Nothing,
}

impl Output {
    /// `doc` as JSON when `json`, else the text `text` makes of it.
    pub fn of<T: Serialize>(
        json: bool,
        doc: &T,
        text: impl FnOnce(&T) -> String,
    ) -> Result<Output, CliError> {
        if json {
            Ok(Output::Json(
                serde_json::to_value(doc).map_err(CliError::Json)?,
            ))
        } else {
            Ok(Output::Text(text(doc)))
        }
    }

    /// Writes it; a closed pipe (`stockade volume list | head -1`) is not an error.
    pub fn write(&self, out: &mut dyn Write) -> Result<(), CliError> {
        let res = match self {
            Output::Text(t) if t.is_empty() => Ok(()),
            Output::Text(t) if t.ends_with('\n') => out.write_all(t.as_bytes()),
            Output::Text(t) => writeln!(out, "{t}"),
            Output::Json(v) => {
                let t = serde_json::to_string_pretty(v).map_err(CliError::Json)?;
                writeln!(out, "{t}")
            }
            Output::Nothing => Ok(()),
        };
        match res.and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.map_err(CliError::Output),
        }
    }
}

/// Runs an admin command on a fresh runtime and prints its output on stdout.
pub fn run(opts: &AdminOpts, cmd: AdminCommand) -> Result<(), CliError> {
    // The `attach --local` endpoint carries I/O: it gets worker threads; the rest is one
    // request at a time.
    let serves_io = matches!(
        &cmd,
        AdminCommand::Volume(v) if matches!(&v.cmd,
            volume::VolumeCmd::Attach(a) if a.local.local)
            || matches!(&v.cmd, volume::VolumeCmd::Import(_) | volume::VolumeCmd::Export(_))
    );
    let rt = if serves_io {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .map_err(CliError::Runtime)?;
    let out = rt.block_on(run_async(opts, cmd))?;
    out.write(&mut std::io::stdout().lock())
}

/// Runs an admin command and prints the error, if any, on stderr; answers the exit code.
pub fn main(opts: &AdminOpts, cmd: AdminCommand) -> u8 {
    match run(opts, cmd) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn run_async(opts: &AdminOpts, cmd: AdminCommand) -> Result<Output, CliError> {
    let target = connect::resolve(opts)?;
    let note = target.token_note.clone();
    let client = target.client()?;
    let json = opts.json;
    let res = match cmd {
        AdminCommand::Volume(a) => volume::run(&client, a.cmd, json).await,
        AdminCommand::Sled(a) => match a.cmd {
            SledCmd::List => {
                let sleds = client.sleds().await?;
                Output::of(json, &sleds, |s| render::sleds_table(s))
            }
            SledCmd::Add { addr, domain } => {
                let sled = client
                    .add_sled(&common::admin::AddSled { addr, domain })
                    .await?;
                Output::of(json, &sled, |s| {
                    render::sleds_table(std::slice::from_ref(s))
                })
            }
            SledCmd::Drain { id } => {
                let sled = client.drain_sled(&id, true).await?;
                Output::of(json, &sled, |s| {
                    render::sleds_table(std::slice::from_ref(s))
                })
            }
            SledCmd::Undrain { id } => {
                let sled = client.drain_sled(&id, false).await?;
                Output::of(json, &sled, |s| {
                    render::sleds_table(std::slice::from_ref(s))
                })
            }
            SledCmd::Remove { id } => {
                client.remove_sled(&id).await?;
                Output::of(json, &serde_json::json!({ "removed": id }), |_| {
                    format!("sled {id} removed\n")
                })
            }
        },
        AdminCommand::Node(a) => match a.cmd {
            NodeCmd::List => {
                let nodes = client.nodes().await?;
                Output::of(json, &nodes, |n| render::nodes_table(n))
            }
        },
        AdminCommand::Cluster(a) => match a.cmd {
            ClusterCmd::Status => {
                let status = client.cluster().await?;
                Output::of(json, &status, render::cluster_block)
            }
        },
    };
    res.map_err(|e| match e {
        CliError::Admin {
            source,
            token_note: None,
        } => CliError::Admin {
            source,
            token_note: note,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests;
