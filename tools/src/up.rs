//! `stockade up`: a whole cluster on one machine, as child processes on loopback.
//!
//! The data directory holds everything: the cluster key and admin token, the ports chosen on
//! the first run (`ports.json`, reused on every later run so addresses stay stable — head nodes
//! know their peers by address; ports are picked free, so clusters running at once never share
//! one), one directory per
//! process with its TOML configuration, device files or Raft log, ready file and log, and
//! `cluster.json` describing the running processes for scripts and tests. Processes start from
//! the same TOML files an operator writes on real machines (`docs/deploy.md`). A lock file keeps
//! two `stockade up` from sharing a data directory. Ctrl-C, SIGTERM or SIGHUP stops every child
//! cleanly (heads, then sleds); a second one kills what has not stopped yet.

use anyhow::{Context, bail};
use common::units::ByteSize;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `stockade up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Number of sled controllers.
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
    pub sleds: usize,
    /// Number of head nodes (a volume's Raft group has min(3, heads) members).
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=7))]
    pub heads: usize,
    /// Ready Raft groups the control plane keeps for fast creates (0: every create starts a
    /// one-member group that grows while serving).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=64))]
    pub pool_size: u8,
    /// Sled copies of each chunk of new volumes, at most the number of sleds [default: 3, or
    /// every sled when there are fewer].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub replicas: Option<u8>,
    /// Size of each sled's device file (sparse: only written data takes disk space).
    #[arg(long, default_value = "20GiB")]
    pub sled_size: ByteSize,
    /// Chunk size of newly formatted sled devices.
    #[arg(long, default_value = "64MiB")]
    pub chunk_size: ByteSize,
    /// Start, print the addresses and exit once everything is ready, leaving the processes
    /// running (stop them with `kill` on the PIDs in cluster.json).
    #[arg(long)]
    pub detach: bool,
}

/// Ports of one process, chosen on the first run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ports {
    /// Main listener (a head node's NBD address).
    pub listen: SocketAddr,
    /// Metrics listener (a head node's admin API and metrics).
    pub metrics: SocketAddr,
    /// A head node's peer (Raft) address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
}

/// One process of the cluster, as written to `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// `sled` or `head`.
    pub role: String,
    /// Name within the cluster (`sled-1`, …).
    pub id: String,
    /// PID.
    pub pid: u32,
    /// Main address (a head node's NBD address).
    pub listen: SocketAddr,
    /// Metrics address (`http://…/metrics`; a head node's admin API too).
    pub metrics: SocketAddr,
    /// A head node's peer (Raft) address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
    /// Log file.
    pub log: PathBuf,
    /// Configuration file it was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
}

/// `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// PID of `stockade up`.
    pub supervisor_pid: u32,
    /// The cluster key file.
    pub cluster_key_file: PathBuf,
    /// The processes.
    pub processes: Vec<ProcessInfo>,
    /// Admin API endpoints (`http://ADDR`), one per head node.
    #[serde(default)]
    pub admin_endpoints: Vec<String>,
    /// The admin token file.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// NBD URI of the attached default volume.
    #[serde(default)]
    pub nbd_uri: Option<String>,
}

fn free_port(taken: &[u16]) -> anyhow::Result<u16> {
    use rand::Rng;
    // Below Linux's ephemeral range (32768+), so outgoing connections never occupy them later.
    for _ in 0..1000 {
        let p = rand::thread_rng().gen_range(20000..32000);
        if taken.contains(&p) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    bail!("could not find a free port on 127.0.0.1")
}

/// Loads `ports.json`, adding ports for processes that have none yet.
fn ports(dir: &Path, names: &[String]) -> anyhow::Result<BTreeMap<String, Ports>> {
    let path = dir.join("ports.json");
    let mut map: BTreeMap<String, Ports> = match std::fs::read_to_string(&path) {
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("parsing {}", path.display()))?,
        Err(_) => BTreeMap::new(),
    };
    let mut taken: Vec<u16> = map
        .values()
        .flat_map(|p| [Some(p.listen), Some(p.metrics), p.peer])
        .flatten()
        .map(|a| a.port())
        .collect();
    let mut changed = false;
    let local = |p| SocketAddr::from(([127, 0, 0, 1], p));
    for n in names {
        let head = n.starts_with("head-");
        if map.get(n).is_some_and(|p| p.peer.is_some() || !head) {
            continue;
        }
        let mut pick = || -> anyhow::Result<u16> {
            let p = free_port(&taken)?;
            taken.push(p);
            Ok(p)
        };
        let ports = Ports {
            listen: local(pick()?),
            metrics: local(pick()?),
            peer: if head { Some(local(pick()?)) } else { None },
        };
        map.insert(n.clone(), ports);
        changed = true;
    }
    if changed {
        // Atomically: a crash halfway must not leave a file every later run fails to parse.
        head_node::state::write_json_atomic(&path, &map)?;
    }
    Ok(map)
}

/// How many head nodes an earlier run of this data directory started (those with state).
/// The file recording how many head nodes the cluster of a data directory has: written by the
/// first run before any head node starts, so a first run stopped half-way through its start
/// (some head nodes with state, others not yet) still names the cluster it was forming.
const HEADS_FILE: &str = "heads";

/// How many head nodes the data directory's cluster has (0: none yet): the recorded number, or
/// for a directory written before it was recorded, the head nodes with state.
fn existing_heads(dir: &Path) -> anyhow::Result<usize> {
    let recorded = dir.join(HEADS_FILE);
    match std::fs::read_to_string(&recorded) {
        Ok(t) => {
            return t.trim().parse::<usize>().with_context(|| {
                format!(
                    "{} should hold the number of head nodes, not {:?}",
                    recorded.display(),
                    t.trim()
                )
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", recorded.display())),
    }
    let mut n = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name
            .strip_prefix("head-")
            .is_some_and(|i| i.parse::<usize>().is_ok())
            && e.path().join("state").is_dir()
        {
            n += 1;
        }
    }
    Ok(n)
}

/// Records the number of head nodes (atomically: a crash leaves the old file or the new one).
fn record_heads(dir: &Path, heads: usize) -> anyhow::Result<()> {
    let path = dir.join(HEADS_FILE);
    if path.exists() {
        return Ok(());
    }
    let tmp = dir.join(format!("{HEADS_FILE}.tmp"));
    std::fs::write(&tmp, format!("{heads}\n"))
        .and_then(|()| File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .and_then(|()| File::open(dir)?.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Holds an exclusive lock on the data directory for the life of `stockade up`.
struct DirLock(File);

fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    let f = File::create(dir.join("lock"))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let info = std::fs::read_to_string(dir.join("cluster.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<ClusterInfo>(&t).ok());
        let alive = |pid: u32| {
            // SAFETY: signal 0 only checks that the process exists; nothing is sent.
            unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
        };
        if let Some(c) = info.as_ref().filter(|c| !alive(c.supervisor_pid)) {
            // Started with --detach: the children hold the lock after `stockade up` left.
            let pids: Vec<String> = c
                .processes
                .iter()
                .filter(|p| alive(p.pid))
                .map(|p| p.pid.to_string())
                .collect();
            bail!(
                "a cluster started with `stockade up --detach` is still running on {} (pids {}); \
                 stop it first (`kill {}`) or use another --data-dir",
                dir.display(),
                pids.join(" "),
                pids.join(" ")
            );
        }
        let who = info
            .map(|c| format!(" (pid {})", c.supervisor_pid))
            .unwrap_or_default();
        bail!(
            "another `stockade up` is already running on {}{who}; stop it first or use another --data-dir",
            dir.display()
        );
    }
    Ok(DirLock(f))
}

/// A child process of the cluster.
struct Member {
    info_role: &'static str,
    name: String,
    child: Child,
    ready_file: PathBuf,
    log: PathBuf,
    ports: Ports,
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating the stockade binary")?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {}; build the whole workspace (cargo build --release)",
            name,
            me.display()
        );
    }
    Ok(p)
}

fn spawn(
    role: &'static str,
    name: &str,
    program: &Path,
    args: &[String],
    dir: &Path,
    ports: Ports,
    detach: Option<&DirLock>,
) -> anyhow::Result<Member> {
    // Detached children keep the data directory locked once `stockade up` has left: each gets
    // the lock's descriptor, so no second `stockade up` can start sleds on devices in use.
    let lock_fd = detach.map(|l| l.0.as_raw_fd());
    let detach = lock_fd.is_some();
    std::fs::create_dir_all(dir)?;
    let log = dir.join("log");
    let ready_file = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready_file);
    let out = File::options().create(true).append(true).open(&log)?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg("--ready-file")
        .arg(&ready_file)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // Children ignore the terminal's Ctrl-C; `stockade up` stops them itself, in order. Unless
    // detached, they also get SIGTERM (and stop cleanly) if `stockade up` dies without stopping
    // them (kill -9, a crash): a cluster left running without its supervisor would hold the
    // ports the next `stockade up` needs.
    {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: setpgid, fcntl, prctl and getppid are async-signal-safe system calls; the closure
        // allocates nothing and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                libc::setpgid(0, 0);
                if let Some(fd) = lock_fd
                    && libc::fcntl(fd, libc::F_SETFD, 0) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if !detach {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died before the prctl.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                }
                Ok(())
            });
        }
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(Member {
        info_role: role,
        name: name.to_string(),
        child,
        ready_file,
        log,
        ports,
    })
}

fn wait_ready(
    m: &mut Member,
    timeout: Duration,
    signalled: &tokio::sync::watch::Receiver<u32>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if m.ready_file.exists() {
            return Ok(());
        }
        if *signalled.borrow() > 0 {
            bail!(INTERRUPTED);
        }
        if let Some(status) = m.child.try_wait()? {
            let tail = log_tail(&m.log);
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            bail!(
                "{} exited ({status}) before it was ready; last log lines ({}):\n{}",
                m.name,
                m.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if start.elapsed() > timeout {
            bail!(
                "{} not ready after {timeout:?}; see {}",
                m.name,
                m.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last 64 KiB of a log (as text): enough for its last lines, however long the log has grown
/// over earlier runs.
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 64 << 10;
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(len.saturating_sub(TAIL))).is_err()
        || f.read_to_end(&mut buf).is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Stops the cluster in order: the head nodes first (they answer their clients and write back to
/// the sleds while they stop), then the sleds. A child that has already exited (and been reaped)
/// is not signalled: its pid may belong to another process by now. A signal received while
/// stopping (a second Ctrl-C) kills what is still running instead of waiting for it.
fn stop_all(members: &mut [Member], signalled: &tokio::sync::watch::Receiver<u32>) {
    let signals_before = *signalled.borrow();
    let forced = || *signalled.borrow() > signals_before;
    for role in ["head", "sled"] {
        let mut group: Vec<&mut Member> =
            members.iter_mut().filter(|m| m.info_role == role).collect();
        for m in group.iter_mut() {
            if let Ok(None) = m.child.try_wait() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(m.child.id() as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for m in group {
            loop {
                match m.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline || forced() => {
                        let why = if forced() {
                            "asked again to stop"
                        } else {
                            "did not stop in time"
                        };
                        say_err(&format!("{}: {why}; killing it", m.name));
                        let _ = m.child.kill();
                        let _ = m.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

/// Written in the data directory once every head node of the cluster has registered (each has
/// a Raft log from then on).
const FORMED_FILE: &str = "formed";

/// True when head node state directory `state` has lost the Raft log of a cluster that has
/// formed (see [`FORMED_FILE`]); a run interrupted before that has nothing to rejoin. Such a
/// node must start with `--rejoin` (voting with an empty log could elect a peer that lacks
/// acknowledged writes). A node already rejoining keeps its marker and needs no flag.
fn lost_state(dir: &Path, heads: usize, state: &Path) -> bool {
    let has_log = std::fs::read_dir(state.join("wal")).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.path().extension().is_some_and(|x| x == "wal"))
    });
    heads > 1
        && dir.join(FORMED_FILE).exists()
        && !has_log
        && !state.join(head_node::app::REJOIN_MARKER).exists()
}

/// A TOML string literal (paths may hold quotes or backslashes).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A size for a configuration file, exact.
fn toml_size(b: ByteSize) -> String {
    let text = b.to_string();
    if text.parse::<ByteSize>().ok() == Some(b) {
        toml_str(&text)
    } else {
        b.0.to_string()
    }
}

/// The configuration of a sled controller, as an operator would write it.
fn sled_config(p: Ports, key: &Path, chunk: ByteSize, dev: &Path, size: ByteSize) -> String {
    format!(
        "# Written by `stockade up`; the same file a sled controller uses on a real machine.\n\
         listen = {}\nmetrics-listen = {}\ncluster-key-file = {}\nchunk-size = {}\n\n\
         [[device]]\npath = {}\nsize = {}\n",
        toml_str(&p.listen.to_string()),
        toml_str(&p.metrics.to_string()),
        toml_str(&key.display().to_string()),
        toml_size(chunk),
        toml_str(&dev.display().to_string()),
        toml_size(size),
    )
}

/// The configuration of head node `id`, as an operator would write it.
#[allow(clippy::too_many_arguments)]
fn head_config(
    id: usize,
    p: Ports,
    peers: &[(usize, SocketAddr)],
    sleds: &[SocketAddr],
    key: &Path,
    token: &Path,
    state: &Path,
    pool_size: usize,
    replicas: u8,
) -> String {
    let mut t = format!(
        "# Written by `stockade up`; the same file a head node uses on a real machine.\n\
         node-id = {id}\nnbd-listen = {}\nadmin-listen = {}\npeer-listen = {}\n\
         cluster-key-file = {}\nadmin-token-file = {}\nstate-dir = {}\nsleds = [{}]\n\
         replicas = {replicas}\n",
        toml_str(&p.listen.to_string()),
        toml_str(&p.metrics.to_string()),
        toml_str(&p.peer.map(|a| a.to_string()).unwrap_or_default()),
        toml_str(&key.display().to_string()),
        toml_str(&token.display().to_string()),
        toml_str(&state.display().to_string()),
        sleds
            .iter()
            .map(|a| toml_str(&a.to_string()))
            .collect::<Vec<_>>()
            .join(", "),
    );
    for (pid, addr) in peers.iter().filter(|(pid, _)| *pid != id) {
        t.push_str(&format!(
            "\n[[peer]]\nid = {pid}\naddr = {}\n",
            toml_str(&addr.to_string())
        ));
    }
    t.push_str(&format!("\n[control]\npool-size = {pool_size}\n"));
    t
}

/// Creates the admin token file (random, mode 0600) unless it exists.
fn token_file(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("admin.token");
    if p.exists() {
        return Ok(p);
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("creating {}", p.display()))?;
    writeln!(f, "{token}")?;
    Ok(p)
}

/// The name and size of the volume `stockade up` creates and attaches.
pub const DEFAULT_VOLUME: (&str, u64) = ("vol0", 1 << 30);

/// Waits until the cluster is healthy, then creates (unless it exists) and attaches (unless
/// attached) the default volume; returns its NBD URI.
async fn prepare(
    client: &crate::admin_client::AdminClient,
    heads: usize,
    sleds: usize,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match client.cluster().await {
            Ok(c) => {
                let heads_up = c.nodes.iter().filter(|n| n.state == "up").count();
                let sleds_up = c.sleds.iter().filter(|s| s.state == "up").count();
                if c.meta_leader.is_some() && heads_up >= heads && sleds_up >= sleds {
                    break;
                }
                last = format!(
                    "{heads_up} of {heads} head nodes and {sleds_up} of {sleds} sleds registered"
                );
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!("the cluster did not become healthy within {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (name, size) = DEFAULT_VOLUME;
    let info = match client.volume(name).await {
        Ok(v) => v,
        Err(e) if e.status() == Some(404) => {
            client
                .create_volume(&common::admin::CreateVolume {
                    name: name.into(),
                    size,
                    qos: None,
                    qos_changes: None,
                    id: Some(common::ids::VolumeId::random().to_string()),
                })
                .await
                .with_context(|| format!("creating volume {name}"))?
                .volume
        }
        Err(e) => return Err(e).with_context(|| format!("looking up volume {name}")),
    };
    if let Some(uri) = info.uri.filter(|_| !info.attachments.is_empty()) {
        return Ok(uri);
    }
    let a = client
        .attach(
            name,
            &common::admin::AttachVolume {
                // Shared: the demo volume may be attached again (a local endpoint, another
                // client), as the README suggests.
                shared: true,
                client: Some("stockade up".into()),
            },
        )
        .await
        .with_context(|| format!("attaching volume {name}"))?;
    Ok(a.uri)
}

/// Runs `stockade up`.
/// Runs `stockade up` on `data_dir` (where the cluster keeps its state: created on the first
/// run, reused afterwards).
/// The error of a run stopped by Ctrl-C/SIGTERM before the cluster was up.
const INTERRUPTED: &str = "interrupted before the cluster was up; stopped what had started";

impl UpArgs {
    /// The checks between options that clap cannot make (a usage error: exit status 2).
    pub fn check(&self) -> Result<(), String> {
        if let Some(r) = self.replicas
            && usize::from(r) > self.sleds
        {
            return Err(format!(
                "--replicas {r} needs at least as many sleds (--sleds {}): each copy of a chunk lives on another sled",
                self.sleds
            ));
        }
        Ok(())
    }
}

pub fn run(args: UpArgs, data_dir: &Path) -> anyhow::Result<()> {
    if let Err(e) = args.check() {
        bail!(e);
    }
    let replicas = args
        .replicas
        .unwrap_or_else(|| u8::try_from(args.sleds.min(3)).unwrap_or(3));
    let dir = data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let lock = lock_dir(&dir)?;
    let detach = args.detach.then_some(&lock);
    let key = dir.join("cluster.key");
    common::ClusterKey::load_or_create(&key)?;
    let token = token_file(&dir)?;
    // The head nodes' Raft groups were formed by the first run: a later run with another number
    // of head nodes would wait for members that can never join (or lose its quorum).
    let existing = existing_heads(&dir)?;
    if existing > 0 && existing != args.heads {
        bail!(
            "{} holds a cluster of {existing} head node(s), created by an earlier `stockade up \
             --heads {existing}`; run it with --heads {existing}, or use another --data-dir",
            dir.display()
        );
    }
    record_heads(&dir, args.heads)?;
    let sled_names: Vec<String> = (1..=args.sleds).map(|i| format!("sled-{i}")).collect();
    let head_names: Vec<String> = (1..=args.heads).map(|i| format!("head-{i}")).collect();
    let all: Vec<String> = sled_names.iter().chain(&head_names).cloned().collect();
    let ports = ports(&dir, &all)?;
    let sled_bin = sibling_binary("sled-controller")?;
    let head_bin = sibling_binary("head-node")?;

    // Signals are caught before anything starts: a Ctrl-C (or SIGTERM) during the start stops
    // what has started, heads before sleds, instead of killing this process and leaving
    // detached children running. One worker runs the watcher while this thread starts.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // The number of stop signals so far: the first stops the cluster in order, a second one
    // kills what is still running. SIGHUP counts too: a closed terminal must not orphan the
    // cluster.
    let (signal_tx, signalled) = tokio::sync::watch::channel(0u32);
    {
        let (mut shutdown, mut hangup) = {
            let _in_rt = rt.enter();
            use tokio::signal::unix::{SignalKind, signal};
            (
                common::signals::Shutdown::catch(),
                signal(SignalKind::hangup()).ok(),
            )
        };
        rt.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.wait() => {}
                    Some(()) = async {
                        match hangup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
                signal_tx.send_modify(|n| *n += 1);
            }
        });
    }

    let mut members: Vec<Member> = Vec::new();
    let mut configs: BTreeMap<String, PathBuf> = BTreeMap::new();
    let started = (|| -> anyhow::Result<()> {
        for name in &sled_names {
            let p = ports[name];
            let sdir = dir.join(name);
            std::fs::create_dir_all(&sdir)?;
            let cfg = sdir.join("sled.toml");
            std::fs::write(
                &cfg,
                sled_config(
                    p,
                    &key,
                    args.chunk_size,
                    &sdir.join("dev0.img"),
                    args.sled_size,
                ),
            )?;
            let a = vec!["--config".to_string(), cfg.display().to_string()];
            members.push(spawn("sled", name, &sled_bin, &a, &sdir, p, detach)?);
            configs.insert(name.clone(), cfg);
        }
        for m in &mut members {
            wait_ready(m, Duration::from_secs(120), &signalled)?;
        }
        let sled_addrs: Vec<SocketAddr> = sled_names.iter().map(|n| ports[n].listen).collect();
        let peers: Vec<(usize, SocketAddr)> = head_names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| Some((i + 1, ports[n].peer?)))
            .collect();
        for (i, name) in head_names.iter().enumerate() {
            let p = ports[name];
            let hdir = dir.join(name);
            std::fs::create_dir_all(&hdir)?;
            let cfg = hdir.join("head.toml");
            std::fs::write(
                &cfg,
                head_config(
                    i + 1,
                    p,
                    &peers,
                    &sled_addrs,
                    &key,
                    &token,
                    &hdir.join("state"),
                    usize::from(args.pool_size),
                    replicas,
                ),
            )?;
            let mut a = vec!["--config".to_string(), cfg.display().to_string()];
            if lost_state(&dir, args.heads, &hdir.join("state")) {
                say(&format!(
                    "{name} has lost its state (its Raft log is gone): it rebuilds it from the \
                     other head nodes, and votes again once it holds everything committed\n"
                ));
                a.push("--rejoin".into());
            }
            members.push(spawn("head", name, &head_bin, &a, &hdir, p, detach)?);
            configs.insert(name.clone(), cfg);
        }
        for m in members.iter_mut().filter(|m| m.info_role == "head") {
            wait_ready(m, Duration::from_secs(120), &signalled)?;
        }
        Ok(())
    })();
    if let Err(e) = started {
        stop_all(&mut members, &signalled);
        return Err(e);
    }
    // From here on every error stops the processes that are running: none is left behind.
    match serve(
        &args,
        &dir,
        &token,
        &key,
        &head_names,
        &ports,
        configs,
        &mut members,
        &rt,
        &signalled,
    ) {
        Ok(()) => Ok(()),
        Err(e) => {
            stop_all(&mut members, &signalled);
            Err(e)
        }
    }
}

/// Prepares the default volume, writes `cluster.json`, prints the summary and (unless
/// detached) supervises the processes until a signal stops them.
#[allow(clippy::too_many_arguments)]
fn serve(
    args: &UpArgs,
    dir: &Path,
    token: &Path,
    key: &Path,
    head_names: &[String],
    ports: &BTreeMap<String, Ports>,
    configs: BTreeMap<String, PathBuf>,
    members: &mut Vec<Member>,
    rt: &tokio::runtime::Runtime,
    signalled: &tokio::sync::watch::Receiver<u32>,
) -> anyhow::Result<()> {
    let admin_endpoints: Vec<String> = head_names
        .iter()
        .map(|n| format!("http://{}", ports[n].metrics))
        .collect();
    let uri = {
        let endpoints = crate::admin_client::AdminClient::parse_endpoints(&admin_endpoints)?;
        let client = crate::admin_client::AdminClient::new(
            endpoints,
            Some(crate::admin_client::AdminToken::read(token)?),
        )?;
        let mut signal = signalled.clone();
        match rt.block_on(async {
            tokio::select! {
                r = prepare(&client, args.heads, args.sleds, Duration::from_secs(120)) => r,
                _ = signal.wait_for(|s| *s > 0) => Err(anyhow::anyhow!(INTERRUPTED)),
            }
        }) {
            Ok(u) => u,
            Err(e) => {
                return Err(e.context(format!("logs are in {}/<process>/log", dir.display())));
            }
        }
    };
    let info = ClusterInfo {
        supervisor_pid: std::process::id(),
        cluster_key_file: key.to_path_buf(),
        processes: members
            .iter()
            .map(|m| ProcessInfo {
                role: m.info_role.to_string(),
                id: m.name.clone(),
                pid: m.child.id(),
                listen: m.ports.listen,
                metrics: m.ports.metrics,
                peer: m.ports.peer,
                log: m.log.clone(),
                config: configs.get(&m.name).cloned(),
            })
            .collect(),
        admin_endpoints: admin_endpoints.clone(),
        admin_token_file: Some(token.to_path_buf()),
        nbd_uri: Some(uri.clone()),
    };
    // Every head node registered, so each has a Raft log from now on (see `lost_state`).
    let formed = dir.join(FORMED_FILE);
    if !formed.exists() {
        std::fs::write(&formed, "every head node of this cluster has run\n")
            .and_then(|()| File::open(&formed)?.sync_all())
            .and_then(|()| File::open(dir)?.sync_all())
            .with_context(|| format!("writing {}", formed.display()))?;
    }
    let cluster_json = dir.join("cluster.json");
    let tmp = dir.join("cluster.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&info)?)
        .and_then(|()| std::fs::rename(&tmp, &cluster_json))
        .with_context(|| format!("writing {}", cluster_json.display()))?;

    say(&summary(args, dir, &info, &uri));
    if args.detach {
        // Leave them running, detached from this process.
        std::mem::forget(std::mem::take(members));
        return Ok(());
    }

    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut signal = signalled.clone();
        let stop = signal.wait_for(|s| *s > 0);
        tokio::pin!(stop);
        // try_wait keeps returning the exit status of a child that has exited: say it once.
        let mut reported = vec![false; members.len()];
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {
                    for (m, said) in members.iter_mut().zip(&mut reported) {
                        if !*said && let Ok(Some(status)) = m.child.try_wait() {
                            *said = true;
                            say_err(&format!("{} exited unexpectedly ({status}); see {}", m.name, m.log.display()));
                        }
                    }
                }
            }
        }
    });
    say("Stopping… (again to kill what has not stopped)\n");
    stop_all(members, signalled);
    let _ = std::fs::remove_file(&cluster_json);
    say(&format!("Stopped. Data kept in {}.\n", dir.display()));
    Ok(())
}

/// Writes to stdout, ignoring a closed one (a terminal that went away, `| head`): the cluster
/// must still be stopped cleanly, where `println!` would panic.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// [`say`] for stderr, one line.
fn say_err(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The summary `stockade up` prints once the cluster is ready.
fn summary(args: &UpArgs, dir: &Path, info: &ClusterInfo, uri: &str) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    use std::fmt::Write as _;
    let (vol, size) = DEFAULT_VOLUME;
    let _ = writeln!(
        s,
        "Stockade is up: {} sleds, {} head nodes ({}).",
        args.sleds,
        args.heads,
        dir.display()
    );
    s.push('\n');
    let _ = writeln!(
        s,
        "  NBD URI      {uri}   (volume {vol}, {})",
        ByteSize(size)
    );
    let _ = writeln!(
        s,
        "  admin API    {}   (token in {})",
        info.admin_endpoints.join(", "),
        info.admin_token_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    s.push('\n');
    let _ = writeln!(
        s,
        "  {:<8} {:<22} {:<40} pid",
        "process", "address", "metrics"
    );
    for p in &info.processes {
        let _ = writeln!(
            s,
            "  {:<8} {:<22} {:<40} {}",
            p.id,
            p.listen.to_string(),
            format!("http://{}/metrics", p.metrics),
            p.pid
        );
    }
    s.push('\n');
    let _ = writeln!(s, "  processes    {}", dir.join("cluster.json").display());
    let _ = writeln!(s, "  logs         {}/<process>/log", dir.display());
    s.push('\n');
    let default_dir = Path::new("./stockade-data")
        .canonicalize()
        .ok()
        .is_some_and(|d| d == dir);
    let cli = if default_dir {
        "stockade".to_string()
    } else {
        format!("stockade --data-dir {}", dir.display())
    };
    let _ = writeln!(s, "Try:");
    let _ = writeln!(s, "  nbdinfo {uri}");
    let _ = writeln!(s, "  qemu-img bench -f raw -w -t none {uri}");
    let _ = writeln!(s, "  {cli} volume list");
    let _ = writeln!(
        s,
        "  {cli} volume create db --size 10G && {cli} volume attach db"
    );
    let _ = writeln!(s, "  {cli} cluster status");
    let _ = writeln!(
        s,
        "  mkdir -p /tmp/vol0 && nbdfuse /tmp/vol0 {uri} &   # then mkfs/mount /tmp/vol0/nbd"
    );
    s.push('\n');
    if args.detach {
        let pids: Vec<String> = info.processes.iter().map(|p| p.pid.to_string()).collect();
        let _ = writeln!(
            s,
            "Running detached. Stop with `kill {}`; `stockade up` again restarts on the same data.",
            pids.join(" ")
        );
    } else {
        let _ = writeln!(
            s,
            "Stop with Ctrl-C; `stockade up` again restarts on the same data."
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_count_is_the_one_the_first_run_recorded() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(existing_heads(d.path()).unwrap(), 0);
        // A first run of three head nodes, stopped after the first one had state.
        record_heads(d.path(), 3).unwrap();
        std::fs::create_dir_all(d.path().join("head-1/state")).unwrap();
        assert_eq!(existing_heads(d.path()).unwrap(), 3);
        // Recorded once: a later run does not change it.
        record_heads(d.path(), 1).unwrap();
        assert_eq!(existing_heads(d.path()).unwrap(), 3);
        // A damaged record is an error that names the file, not a guess.
        std::fs::write(d.path().join(HEADS_FILE), "three").unwrap();
        let e = existing_heads(d.path()).unwrap_err().to_string();
        assert!(e.contains("heads") && e.contains("three"), "{e}");
    }

    #[test]
    fn a_directory_from_before_the_record_counts_its_head_nodes_with_state() {
        let d = tempfile::tempdir().unwrap();
        for h in ["head-1/state", "head-2/state", "head-x/state", "sled-1"] {
            std::fs::create_dir_all(d.path().join(h)).unwrap();
        }
        assert_eq!(existing_heads(d.path()).unwrap(), 2);
    }

    #[test]
    fn a_head_node_rejoins_only_when_a_cluster_that_ran_lost_its_log() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("head-2/state");
        // A first run (or one interrupted before the cluster formed): nothing to rejoin.
        assert!(!lost_state(d.path(), 3, &state));
        std::fs::write(d.path().join(FORMED_FILE), "").unwrap();
        // The cluster ran; this node's state is gone.
        assert!(lost_state(d.path(), 3, &state));
        std::fs::create_dir_all(state.join("wal")).unwrap();
        assert!(
            lost_state(d.path(), 3, &state),
            "an empty log directory is no log"
        );
        // A single head node has no peers to rebuild from.
        assert!(!lost_state(d.path(), 1, &state));
        // Already rejoining: the node keeps doing so by itself.
        std::fs::write(state.join(head_node::app::REJOIN_MARKER), "").unwrap();
        assert!(!lost_state(d.path(), 3, &state));
        std::fs::remove_file(state.join(head_node::app::REJOIN_MARKER)).unwrap();
        // A log: a normal restart.
        std::fs::write(state.join("wal/00000000000000000001.wal"), "x").unwrap();
        assert!(!lost_state(d.path(), 3, &state));
    }
}
