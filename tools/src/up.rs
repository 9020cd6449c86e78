//! `stockade up`: a whole cluster on one machine, as child processes on loopback.
//!
//! The data directory holds everything: the cluster key, the ports chosen on the first run
//! (`ports.json`, reused on every later run so addresses stay stable and two data directories
//! never collide), one directory per process with its device files, ready file and log, and
//! `cluster.json` describing the running processes for scripts and tests. A lock file keeps two
//! `stockade up` from sharing a data directory. Ctrl-C or SIGTERM stops every child cleanly.

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
    /// Where the cluster keeps its state (created on the first run, reused afterwards).
    #[arg(long, default_value = "./stockade-data")]
    pub data_dir: PathBuf,
    /// Number of sled controllers.
    #[arg(long, default_value_t = 3)]
    pub sleds: usize,
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
    /// Main listener.
    pub listen: SocketAddr,
    /// Metrics listener.
    pub metrics: SocketAddr,
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
    /// Main address.
    pub listen: SocketAddr,
    /// Metrics address (`http://…/metrics`).
    pub metrics: SocketAddr,
    /// Log file.
    pub log: PathBuf,
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
        .flat_map(|p| [p.listen.port(), p.metrics.port()])
        .collect();
    let mut changed = false;
    for n in names {
        if map.contains_key(n) {
            continue;
        }
        let a = free_port(&taken)?;
        taken.push(a);
        let b = free_port(&taken)?;
        taken.push(b);
        map.insert(
            n.clone(),
            Ports {
                listen: SocketAddr::from(([127, 0, 0, 1], a)),
                metrics: SocketAddr::from(([127, 0, 0, 1], b)),
            },
        );
        changed = true;
    }
    if changed {
        std::fs::write(&path, serde_json::to_string_pretty(&map)?)?;
    }
    Ok(map)
}

/// Holds an exclusive lock on the data directory for the life of `stockade up`.
struct DirLock(#[allow(dead_code)] File);

fn lock_dir(dir: &Path) -> anyhow::Result<DirLock> {
    let f = File::create(dir.join("lock"))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let who = std::fs::read_to_string(dir.join("cluster.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<ClusterInfo>(&t).ok())
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
) -> anyhow::Result<Member> {
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
    // Children ignore the terminal's Ctrl-C; `stockade up` stops them itself, in order.
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setpgid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpgid(0, 0);
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

fn wait_ready(m: &mut Member, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if m.ready_file.exists() {
            return Ok(());
        }
        if let Some(status) = m.child.try_wait()? {
            let tail = std::fs::read_to_string(&m.log).unwrap_or_default();
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

fn stop_all(members: &mut [Member]) {
    for m in members.iter().rev() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(m.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for m in members.iter_mut().rev() {
        loop {
            match m.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    eprintln!("{} did not stop in time; killing it", m.name);
                    let _ = m.child.kill();
                    let _ = m.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Runs `stockade up`.
pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.sleds == 0 {
        bail!("--sleds must be at least 1");
    }
    let dir = &args.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let _lock = lock_dir(&dir)?;
    let key = dir.join("cluster.key");
    common::ClusterKey::load_or_create(&key)?;
    let sled_names: Vec<String> = (1..=args.sleds).map(|i| format!("sled-{i}")).collect();
    let ports = ports(&dir, &sled_names)?;
    let sled_bin = sibling_binary("sled-controller")?;

    let mut members: Vec<Member> = Vec::new();
    let started = (|| -> anyhow::Result<()> {
        for name in &sled_names {
            let p = ports[name];
            let sdir = dir.join(name);
            let dev = sdir.join("dev0.img");
            let a = vec![
                "--listen".to_string(),
                p.listen.to_string(),
                "--metrics-listen".into(),
                p.metrics.to_string(),
                "--cluster-key-file".into(),
                key.display().to_string(),
                "--chunk-size".into(),
                args.chunk_size.to_string(),
                "--device".into(),
                format!("{}:{}", dev.display(), args.sled_size.0),
            ];
            members.push(spawn("sled", name, &sled_bin, &a, &sdir, p)?);
        }
        for m in &mut members {
            wait_ready(m, Duration::from_secs(120))?;
        }
        Ok(())
    })();
    if let Err(e) = started {
        stop_all(&mut members);
        return Err(e);
    }
    let info = ClusterInfo {
        supervisor_pid: std::process::id(),
        cluster_key_file: key.clone(),
        processes: members
            .iter()
            .map(|m| ProcessInfo {
                role: m.info_role.to_string(),
                id: m.name.clone(),
                pid: m.child.id(),
                listen: m.ports.listen,
                metrics: m.ports.metrics,
                log: m.log.clone(),
            })
            .collect(),
        admin_endpoints: Vec::new(),
        admin_token_file: None,
        nbd_uri: None,
    };
    let cluster_json = dir.join("cluster.json");
    std::fs::write(&cluster_json, serde_json::to_string_pretty(&info)?)?;

    println!("Stockade is up ({}).", dir.display());
    println!();
    println!(
        "  {:<10} {:<22} {:<40} pid",
        "process", "address", "metrics"
    );
    for p in &info.processes {
        println!(
            "  {:<10} {:<22} {:<40} {}",
            p.id,
            p.listen.to_string(),
            format!("http://{}/metrics", p.metrics),
            p.pid
        );
    }
    println!();
    println!("  cluster key  {}", key.display());
    println!("  processes    {}", cluster_json.display());
    println!("  logs         {}/<process>/log", dir.display());
    println!();
    println!("Stop with Ctrl-C; run `stockade up` again to restart on the same data.");
    if args.detach {
        for m in &mut members {
            // Leave them running, detached from this process.
            let _ = m.child.id();
        }
        std::mem::forget(members);
        return Ok(());
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let stop = common::signals::wait_for_shutdown();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {
                    for m in &mut members {
                        if let Ok(Some(status)) = m.child.try_wait() {
                            eprintln!("{} exited unexpectedly ({status}); see {}", m.name, m.log.display());
                        }
                    }
                }
            }
        }
    });
    println!("Stopping…");
    stop_all(&mut members);
    let _ = std::fs::remove_file(&cluster_json);
    println!("Stopped. Data kept in {}.", dir.display());
    Ok(())
}
