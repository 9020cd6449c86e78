//! `stockade volume …`.

use super::args::{self, Limit};
use super::{CliError, Output, render};
use crate::admin_client::AdminClient;
use clap::{ArgGroup, Args, Subcommand};
use common::admin::{AttachVolume, CreateVolume, DetachVolume, SetQos};
use common::throttle::QosError;

/// `stockade volume`.
#[derive(Debug, Args)]
pub struct VolumeArgs {
    #[command(subcommand)]
    pub(super) cmd: VolumeCmd,
}

/// Subcommands of `stockade volume`.
#[derive(Debug, Clone, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume; prints it once it serves.
    Create(CreateArgs),
    /// List the volumes.
    List,
    /// Show a volume.
    Show(NameArg),
    /// Grow a volume (volumes only grow).
    Resize(ResizeArgs),
    /// Delete a volume and its data.
    Delete(DeleteArgs),
    /// Attach a volume: makes its NBD export visible and prints the NBD URI to give clients.
    Attach(AttachArgs),
    /// Detach a volume: closes its NBD export once the requests in flight finish.
    Detach(DetachArgs),
    /// Change the QoS limits of a volume (only the options given change).
    Qos(QosArgs),
    /// Copy a raw image file into a detached volume over NBD (its first len(FILE) bytes), then
    /// verify it by reading it back; prints the image's SHA-256.
    Import(ImageArgs),
    /// Copy a detached volume into a new raw image file over NBD (sparse), then verify the
    /// file; prints the image's SHA-256.
    Export(ExportArgs),
}

/// `volume import`.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// The volume.
    #[arg(value_name = "NAME", value_parser = args::volume_name)]
    pub name: String,
    /// The raw image file.
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
}

/// `volume export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// The volume.
    #[arg(value_name = "NAME", value_parser = args::volume_name)]
    pub name: String,
    /// The raw image file to create.
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
    /// Replace FILE if it exists (only once the copy is complete and verified).
    #[arg(long)]
    pub force: bool,
}

/// A volume name.
#[derive(Debug, Clone, Args)]
pub struct NameArg {
    /// The volume.
    #[arg(value_name = "NAME", value_parser = args::volume_name)]
    pub name: String,
}

/// `volume create`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// Name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
    #[arg(value_name = "NAME", value_parser = args::volume_name)]
    pub name: String,
    /// Size: `10G`, `512MiB` or bytes; a multiple of 4KiB.
    #[arg(long, value_name = "SIZE", value_parser = args::volume_size)]
    pub size: u64,
    /// Baseline operations per second (an operation is up to 256KiB of a request).
    #[arg(long, value_name = "N", value_parser = args::ops_rate)]
    pub iops: Option<u64>,
    /// Burst ceiling, operations per second (at least --iops).
    #[arg(long, value_name = "N", value_parser = args::ops_rate)]
    pub burst_iops: Option<u64>,
    /// Burst credits (operations) the volume can save up.
    #[arg(long, value_name = "N")]
    pub burst_credits: Option<u64>,
    /// Bandwidth per second: `100MiB` (bytes per second).
    #[arg(long, value_name = "SIZE", value_parser = args::bandwidth)]
    pub bandwidth: Option<u64>,
}

impl CreateArgs {
    /// The request: the QoS options given replace those of the cluster's default, the others
    /// stay the default's (the cluster checks the result: it knows the default).
    pub fn request(&self) -> Result<CreateVolume, CliError> {
        let changes = SetQos {
            iops: self.iops.map(Some),
            burst_iops: self.burst_iops.map(Some),
            burst_credits: self.burst_credits,
            bandwidth: self.bandwidth.map(Some),
        };
        if let (Some(iops), Some(burst_iops)) = (self.iops, self.burst_iops)
            && burst_iops < iops
        {
            return Err(QosError::BurstBelowBaseline { iops, burst_iops }.into());
        }
        Ok(CreateVolume {
            name: self.name.clone(),
            size: self.size,
            qos: None,
            qos_changes: (!changes.is_empty()).then_some(changes),
            // Chosen here, so that the create the client sends again after a 503 (a leader
            // change may have dropped the answer, not the create) is recognised as this one.
            id: Some(common::ids::VolumeId::random().to_string()),
        })
    }
}

/// `volume resize`.
#[derive(Debug, Clone, Args)]
pub struct ResizeArgs {
    /// The volume.
    #[arg(value_name = "NAME", value_parser = args::volume_name)]
    pub name: String,
    /// New size (larger than the current one): `20G`, `1TiB` or bytes; a multiple of 4KiB.
    #[arg(long, value_name = "SIZE", value_parser = args::volume_size)]
    pub size: u64,
}

/// `volume delete`.
#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    /// The volume.
    #[arg(value_name = "NAME", value_parser = args::volume_name)]
    pub name: String,
    /// Delete it even while attached (its clients lose the device).
    #[arg(long)]
    pub force: bool,
}

/// `volume attach`.
#[derive(Debug, Clone, Args)]
pub struct AttachArgs {
    /// The volume.
    #[arg(value_name = "NAME", value_parser = args::volume_name)]
    pub name: String,
    /// Allow other shared attachments at the same time (only for clients that coordinate
    /// their writes, like a cluster filesystem).
    #[arg(long)]
    pub shared: bool,
    /// Who attaches (free text, shown by `volume show`).
    #[arg(long, value_name = "TEXT")]
    pub client: Option<String>,
    /// The `--local` endpoint and its options.
    #[command(flatten)]
    pub local: crate::attach_local::LocalArgs,
}

impl AttachArgs {
    /// The request.
    pub fn request(&self) -> AttachVolume {
        AttachVolume {
            shared: self.shared,
            client: self.client.clone(),
        }
    }
}

/// `volume detach`.
#[derive(Debug, Clone, Args)]
pub struct DetachArgs {
    /// The volume.
    #[arg(value_name = "NAME", value_parser = args::volume_name)]
    pub name: String,
    /// Remove only this attachment (its id, from `volume show`); default: all of them.
    #[arg(long, value_name = "ID")]
    pub attachment: Option<u64>,
}

/// `volume qos`.
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("limits")
        .args(["iops", "burst_iops", "burst_credits", "bandwidth"])
        .required(true)
        .multiple(true)
))]
pub struct QosArgs {
    /// The volume.
    #[arg(value_name = "NAME", value_parser = args::volume_name)]
    pub name: String,
    /// Baseline operations per second, or `none` for no limit.
    #[arg(long, value_name = "N|none", value_parser = args::ops_limit)]
    pub iops: Option<Limit>,
    /// Burst ceiling in operations per second, or `none` (credits spent as fast as asked).
    #[arg(long, value_name = "N|none", value_parser = args::ops_limit)]
    pub burst_iops: Option<Limit>,
    /// Burst credits (operations); 0 disables bursting.
    #[arg(long, value_name = "N")]
    pub burst_credits: Option<u64>,
    /// Bandwidth per second (`100MiB`), or `none` for no limit.
    #[arg(long, value_name = "SIZE|none", value_parser = args::bandwidth_limit)]
    pub bandwidth: Option<Limit>,
}

impl QosArgs {
    /// The request: the options given, `none` as `null`.
    pub fn request(&self) -> SetQos {
        SetQos {
            iops: self.iops.map(|l| l.0),
            burst_iops: self.burst_iops.map(|l| l.0),
            burst_credits: self.burst_credits,
            bandwidth: self.bandwidth.map(|l| l.0),
        }
    }
}

/// Runs a volume command.
pub async fn run(client: &AdminClient, cmd: VolumeCmd, json: bool) -> Result<Output, CliError> {
    match cmd {
        VolumeCmd::Create(a) => {
            let created = client.create_volume(&a.request()?).await?;
            Output::of(json, &created, render::created)
        }
        VolumeCmd::List => {
            let vols = client.list_volumes().await?;
            Output::of(json, &vols, |v| render::volumes_table(v))
        }
        VolumeCmd::Show(a) => {
            let v = client.volume(&a.name).await?;
            Output::of(json, &v, render::volume_block)
        }
        VolumeCmd::Resize(a) => {
            let v = client.resize(&a.name, a.size).await?;
            Output::of(json, &v, |v| {
                format!(
                    "volume {} is now {}\n{}",
                    v.name,
                    render::size(v.size),
                    render::volume_block(v)
                )
            })
        }
        VolumeCmd::Delete(a) => match client.delete(&a.name, a.force).await? {
            None if json => Ok(Output::Nothing),
            None => Ok(Output::Text(format!("deleted volume {}\n", a.name))),
            Some(pending) if json => Ok(Output::Json(serde_json::json!({ "pending": pending }))),
            Some(pending) => Ok(Output::Text(format!("{pending}\n"))),
        },
        VolumeCmd::Attach(a) if a.local.local => attach_local(client, &a).await,
        VolumeCmd::Attach(a) => {
            let att = client.attach(&a.name, &a.request()).await?;
            // One line, so that `$(stockade volume attach NAME)` is the URI.
            Output::of(json, &att, |att| format!("{}\n", att.uri))
        }
        VolumeCmd::Detach(a) => {
            let req = DetachVolume {
                attachment: a.attachment,
            };
            let v = client.detach(&a.name, &req).await?;
            Output::of(json, &v, |v| match a.attachment {
                Some(id) => format!("removed attachment {id} of volume {}\n", v.name),
                None => format!("detached volume {}\n", v.name),
            })
        }
        VolumeCmd::Import(a) => {
            let c = crate::image::import(client, &a.name, &a.file).await?;
            Output::of(json, &c, |c| {
                format!(
                    "imported {} bytes from {} into volume {}, verified; sha256 {}\n",
                    c.bytes,
                    c.file.display(),
                    c.volume,
                    c.sha256
                )
            })
        }
        VolumeCmd::Export(a) => {
            let c = crate::image::export(client, &a.name, &a.file, a.force).await?;
            Output::of(json, &c, |c| {
                format!(
                    "exported volume {} ({} bytes) to {}, verified; sha256 {}\n",
                    c.volume,
                    c.bytes,
                    c.file.display(),
                    c.sha256
                )
            })
        }
        VolumeCmd::Qos(a) => {
            let v = client.set_qos(&a.name, &a.request()).await?;
            Output::of(json, &v, |v| {
                format!("QoS of volume {}: {}\n", v.name, render::qos(&v.qos))
            })
        }
    }
}

/// `volume attach NAME --local`: attaches, serves the local endpoint (its URI is printed as one
/// line on stdout once it serves) until Ctrl-C/SIGTERM, then stops it and removes the attachment
/// it made, so the volume is free for the next client.
async fn attach_local(client: &AdminClient, a: &AttachArgs) -> Result<Output, CliError> {
    let mut req = a.request();
    if req.client.is_none() {
        req.client = Some(format!("attach --local pid {}", std::process::id()));
    }
    // Catch Ctrl-C/SIGTERM before attaching: one that comes while the attach or the endpoint's
    // start is under way must still end in the detach below, not kill the process and leave
    // the volume attached. The attach itself is let finish (its answer names the attachment).
    let mut shutdown = common::signals::Shutdown::catch();
    let att = client.attach(&a.name, &req).await?;
    let cfg = a.local.config(a.name.clone(), att.endpoints.clone());
    let served = crate::attach_local::serve_local(cfg, async move { shutdown.wait().await }).await;
    let detach = DetachVolume {
        attachment: Some(att.attachment.id),
    };
    let detached = client.detach(&a.name, &detach).await;
    served.map_err(CliError::Local)?;
    detached?;
    Ok(Output::Nothing)
}
