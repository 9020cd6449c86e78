//! `sled-load`: a load generator that speaks the sled protocol to one sled controller.
//!
//! It keeps exactly `--qd` requests in flight (one task per slot, each issuing its next request
//! as soon as the previous one is answered), spread over `--connections` authenticated
//! connections, for a warm-up and then a measured window. It reports IOPS, MiB/s, latency
//! percentiles of the requests completed in the window, the CPU the sled and the generator
//! itself used per request, and — from the sled's own `/metrics` over the same window — how the
//! mean latency splits between the network hop, the sled's network side and its device thread.

use anyhow::{Context, bail};
use bench::hist::Histogram;
use bench::procstat::{self, MachineCpu};
use bench::promtext::{self, Sample};
use bench::report::{CpuReport, LatencyUs, LoadReport, StagesUs};
use clap::{Parser, ValueEnum};
use common::sled_client::{MAX_IN_FLIGHT, SledClient};
use common::sled_proto::MAX_DATA_LEN;
use common::{AlignedBuf, ByteSize, ChunkIndex, ClusterKey, Credential, Epoch, NodeId, VolumeId};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the requests do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    /// Writes at uniformly random block-aligned offsets of the working set.
    Randwrite,
    /// Reads at uniformly random block-aligned offsets of the working set.
    Randread,
    /// Writes the whole working set once, sequentially (preconditioning), and reports it.
    Fill,
}

impl Pattern {
    fn name(self) -> &'static str {
        match self {
            Pattern::Randwrite => "randwrite",
            Pattern::Randread => "randread",
            Pattern::Fill => "fill",
        }
    }
}

/// Drives one sled controller with random 4 KiB writes or reads at a fixed queue depth and
/// reports IOPS, latency percentiles and CPU per request.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The sled's ready file (JSON with `listen`, `metrics` and `pid`), as written by
    /// `sled-controller --ready-file`.
    #[arg(long, required_unless_present = "sled")]
    ready_file: Option<PathBuf>,
    /// The sled's protocol address (instead of --ready-file).
    #[arg(long, conflicts_with = "ready_file")]
    sled: Option<SocketAddr>,
    /// The sled's metrics address, for the latency-by-stage breakdown (taken from the ready
    /// file when there is one).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The sled's process id, for its CPU use (taken from the ready file when there is one).
    #[arg(long)]
    sled_pid: Option<u32>,
    /// The cluster key file (64 hex digits).
    #[arg(long)]
    key_file: PathBuf,
    /// Workload.
    #[arg(long, value_enum, default_value_t = Pattern::Randwrite)]
    pattern: Pattern,
    /// Bytes per request (a multiple of 4 KiB that divides the chunk size).
    #[arg(long, default_value = "4KiB", value_parser = parse_size)]
    bs: ByteSize,
    /// Requests kept in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    qd: u32,
    /// TCP connections to spread the requests over (at most 256 in flight on each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    connections: u32,
    /// Runtime threads of the load generator; 1 runs everything on one thread (the cheapest).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// Length of the measured window.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before the measured window (not counted).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    warmup: Duration,
    /// Bytes of the volume addressed, from offset 0 (a multiple of --bs).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    working_set: ByteSize,
    /// Write the whole working set once (sequentially) before the run, so every chunk is
    /// allocated and every block written: reads then hit the device, and writes overwrite.
    #[arg(long)]
    precondition: bool,
    /// Request size of the precondition pass.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    precondition_bs: ByteSize,
    /// Queue depth of the precondition pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    precondition_qd: u32,
    /// Volume to use (32 hex digits).
    #[arg(long, default_value = "5354424e4300000000000000000000b1")]
    volume: VolumeId,
    /// Fencing epoch to claim and write under (re-claiming the same epoch as the same node is
    /// accepted, so repeated runs work).
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// Head-node id to act as.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    node: u64,
    /// Seed of the offset generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Free text copied into the report (e.g. the sled's durability mode).
    #[arg(long)]
    label: Option<String>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse::<ByteSize>().map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    common::units::parse_duration(s).map_err(|e| e.to_string())
}

/// The parts of a sled ready file this tool uses.
#[derive(Debug, serde::Deserialize)]
struct Ready {
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    pid: Option<u32>,
}

/// Where the sled is.
#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
    pid: Option<u32>,
}

fn target(args: &Args) -> anyhow::Result<Target> {
    let mut t = match (&args.ready_file, args.sled) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading ready file {}", path.display()))?;
            let r: Ready = serde_json::from_str(&text)
                .with_context(|| format!("ready file {} is not valid", path.display()))?;
            Target {
                addr: r.listen,
                metrics: r.metrics,
                pid: r.pid,
            }
        }
        (None, Some(addr)) => Target {
            addr,
            metrics: None,
            pid: None,
        },
        (None, None) => bail!("give --ready-file or --sled"),
    };
    if args.metrics.is_some() {
        t.metrics = args.metrics;
    }
    if args.sled_pid.is_some() {
        t.pid = args.sled_pid;
    }
    Ok(t)
}

fn check_block_size(name: &str, bs: u64, chunk_size: u64) -> anyhow::Result<()> {
    if bs == 0 || !bs.is_multiple_of(4096) || bs > u64::from(MAX_DATA_LEN) {
        bail!(
            "{name} {} must be a non-zero multiple of 4KiB of at most {}",
            ByteSize(bs),
            ByteSize(u64::from(MAX_DATA_LEN))
        );
    }
    if !chunk_size.is_multiple_of(bs) {
        bail!(
            "{name} {} must divide the sled's chunk size {} (a request may not cross chunks)",
            ByteSize(bs),
            ByteSize(chunk_size)
        );
    }
    Ok(())
}

/// SplitMix64: small, fast, and good enough to pick offsets.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2^-40 for the sizes used here).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

fn random_buffer(len: usize, rng: &mut Rng) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    for word in b.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
    b
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// What every worker of a run shares.
#[derive(Debug)]
struct Job {
    pattern: Pattern,
    bs: u64,
    chunk_size: u64,
    working_set: u64,
    volume: VolumeId,
    cred: Credential,
    phase: AtomicU8,
    /// Next offset of a fill.
    next: AtomicU64,
    /// Wakes the controller when a worker fails.
    failed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct WorkerOut {
    hist: Histogram,
    errors: u64,
    first_error: Option<String>,
}

impl Job {
    fn locate(&self, offset: u64) -> (ChunkIndex, u64) {
        (
            ChunkIndex(offset / self.chunk_size),
            offset % self.chunk_size,
        )
    }

    fn fail(&self, out: &mut WorkerOut, e: impl std::fmt::Display) {
        out.errors += 1;
        out.first_error.get_or_insert_with(|| e.to_string());
        self.phase.store(STOP, Ordering::SeqCst);
        self.failed.notify_one();
    }
}

async fn random_worker(client: Arc<SledClient>, job: Arc<Job>, mut rng: Rng) -> WorkerOut {
    let mut out = WorkerOut::default();
    let blocks = job.working_set / job.bs;
    let data = Arc::new(random_buffer(job.bs as usize, &mut rng));
    while job.phase.load(Ordering::Relaxed) != STOP {
        let (chunk, offset) = job.locate(rng.below(blocks) * job.bs);
        let started = Instant::now();
        let res = match job.pattern {
            Pattern::Randread => client
                .read(job.volume, chunk, offset, job.bs as u32)
                .await
                .map(drop),
            _ => client.write(&job.cred, chunk, offset, data.clone()).await,
        };
        let ns = started.elapsed().as_nanos() as u64;
        match res {
            Ok(()) if job.phase.load(Ordering::Relaxed) == MEASURE => out.hist.record(ns),
            Ok(()) => {}
            Err(e) => {
                job.fail(
                    &mut out,
                    format!("{} at {chunk:?}+{offset}: {e}", job.pattern.name()),
                );
                break;
            }
        }
    }
    out
}

async fn fill_worker(client: Arc<SledClient>, job: Arc<Job>, mut rng: Rng) -> WorkerOut {
    let mut out = WorkerOut::default();
    let data = Arc::new(random_buffer(job.bs as usize, &mut rng));
    while job.phase.load(Ordering::Relaxed) != STOP {
        let at = job.next.fetch_add(job.bs, Ordering::Relaxed);
        if at >= job.working_set {
            break;
        }
        let (chunk, offset) = job.locate(at);
        let started = Instant::now();
        match client.write(&job.cred, chunk, offset, data.clone()).await {
            Ok(()) => out.hist.record(started.elapsed().as_nanos() as u64),
            Err(e) => {
                job.fail(&mut out, format!("fill at {chunk:?}+{offset}: {e}"));
                break;
            }
        }
    }
    out
}

/// CPU and metric counters at one instant.
#[derive(Debug)]
struct Snapshot {
    at: Instant,
    sled_cpu: Option<f64>,
    sled_threads: Option<BTreeMap<String, f64>>,
    own_cpu: f64,
    machine: MachineCpu,
    metrics: Option<Vec<Sample>>,
}

impl Snapshot {
    async fn take(target: &Target) -> Self {
        let at = Instant::now();
        let sled_cpu = target
            .pid
            .and_then(|p| procstat::process_cpu_seconds(p).ok());
        let sled_threads = target
            .pid
            .and_then(|p| procstat::thread_cpu_seconds(p).ok());
        let own_cpu = procstat::process_cpu_seconds(std::process::id()).unwrap_or(0.0);
        let machine = procstat::machine_cpu().unwrap_or_default();
        let metrics = match target.metrics {
            Some(addr) => promtext::fetch(addr, Duration::from_secs(5))
                .await
                .ok()
                .map(|t| promtext::parse(&t)),
            None => None,
        };
        Self {
            at,
            sled_cpu,
            sled_threads,
            own_cpu,
            machine,
            metrics,
        }
    }
}

fn mean_delta(before: &[Sample], after: &[Sample], name: &str, op: &str) -> Option<f64> {
    let sum = |s: &[Sample]| promtext::sum_where(s, &format!("{name}_sum"), "op", op);
    let count = |s: &[Sample]| promtext::sum_where(s, &format!("{name}_count"), "op", op);
    let n = count(after) - count(before);
    (n > 0.0).then(|| (sum(after) - sum(before)) / n)
}

fn window(before: &Snapshot, after: &Snapshot, ops: u64) -> (f64, CpuReport) {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-9);
    let per_op = |cpu: f64| {
        if ops > 0 { cpu / ops as f64 * 1e6 } else { 0.0 }
    };
    let sled_cpu = match (before.sled_cpu, after.sled_cpu) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let mut sled_threads = BTreeMap::new();
    if let (Some(a), Some(b)) = (&before.sled_threads, &after.sled_threads) {
        for (name, t) in b {
            let d = t - a.get(name).copied().unwrap_or(0.0);
            sled_threads.insert(name.clone(), d.max(0.0) / secs);
        }
    }
    let own = after.own_cpu - before.own_cpu;
    let iops = ops as f64 / secs;
    let cpu = CpuReport {
        sled_cores: sled_cpu.map(|c| c / secs),
        sled_us_per_op: sled_cpu.map(per_op),
        sled_cpu_s_per_kiops: sled_cpu
            .filter(|_| iops > 0.0)
            .map(|c| c / secs / (iops / 1e3)),
        sled_threads,
        load_cores: own / secs,
        load_us_per_op: per_op(own),
        machine_busy_cores: (after.machine.busy - before.machine.busy) / secs,
        machine_cpus: procstat::cpu_count(),
    };
    (secs, cpu)
}

fn latency(h: &Histogram) -> LatencyUs {
    let us = |ns: u64| ns as f64 / 1e3;
    LatencyUs {
        min: us(h.min()),
        mean: h.mean() / 1e3,
        p50: us(h.percentile(50.0)),
        p99: us(h.percentile(99.0)),
        p99_9: us(h.percentile(99.9)),
        max: us(h.max()),
    }
}

/// Connections, the credential and the sled's geometry.
#[derive(Debug)]
struct Session {
    clients: Vec<Arc<SledClient>>,
    cred: Credential,
    chunk_size: u64,
}

async fn connect(args: &Args, target: &Target) -> anyhow::Result<Session> {
    let key = ClusterKey::load(&args.key_file)
        .with_context(|| format!("loading cluster key {}", args.key_file.display()))?;
    let node = NodeId(args.node);
    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let c = SledClient::connect(target.addr, &key, node, Duration::from_secs(10))
            .await
            .with_context(|| format!("connecting to the sled at {}", target.addr))?;
        clients.push(Arc::new(c));
    }
    let stat = clients[0]
        .stat()
        .await
        .context("asking the sled for its stat")?;
    let chunk_size = stat
        .devices
        .first()
        .map(|d| d.chunk_size)
        .context("the sled has no devices")?;
    let capacity: u64 = stat
        .devices
        .iter()
        .map(|d| d.chunks_total * d.chunk_size)
        .sum();
    if args.working_set.0 > capacity {
        bail!(
            "working set {} is larger than the sled's chunk space {}",
            args.working_set,
            ByteSize(capacity)
        );
    }
    let cred = key.mint(args.volume, Epoch(args.epoch), node);
    clients[0]
        .claim(&cred)
        .await
        .with_context(|| format!("claiming volume {} at epoch {}", args.volume, args.epoch))?;
    Ok(Session {
        clients,
        cred,
        chunk_size,
    })
}

/// Runs `qd` workers of `pattern` and measures them: after `warmup`, for `duration` (random
/// patterns), or until the working set is written (fill).
#[allow(clippy::too_many_arguments)]
async fn run_phase(
    session: &Session,
    target: &Target,
    args: &Args,
    pattern: Pattern,
    bs: u64,
    qd: u32,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<LoadReport> {
    let load_average = procstat::load_average().unwrap_or_default();
    let job = Arc::new(Job {
        pattern,
        bs,
        chunk_size: session.chunk_size,
        working_set: args.working_set.0,
        volume: args.volume,
        cred: session.cred,
        phase: AtomicU8::new(if pattern == Pattern::Fill {
            MEASURE
        } else {
            WARMUP
        }),
        next: AtomicU64::new(0),
        failed: tokio::sync::Notify::new(),
    });
    let mut seeder = Rng(args.seed);
    let spawn = |job: &Arc<Job>, seeder: &mut Rng| {
        (0..qd as usize)
            .map(|i| {
                let client = session.clients[i % session.clients.len()].clone();
                let rng = Rng(seeder.next());
                match pattern {
                    Pattern::Fill => tokio::spawn(fill_worker(client, job.clone(), rng)),
                    _ => tokio::spawn(random_worker(client, job.clone(), rng)),
                }
            })
            .collect::<Vec<_>>()
    };
    let (before, workers, after) = if pattern == Pattern::Fill {
        // Measured from the first request to the last reply.
        let before = Snapshot::take(target).await;
        let workers = spawn(&job, &mut seeder);
        let mut outs = Vec::new();
        for w in workers {
            outs.push(w.await.context("a worker panicked")?);
        }
        let after = Snapshot::take(target).await;
        (Some(before), outs, after)
    } else {
        let workers = spawn(&job, &mut seeder);
        tokio::select! {
            _ = tokio::time::sleep(warmup) => {}
            _ = job.failed.notified() => {}
        }
        let mut before = None;
        if job
            .phase
            .compare_exchange(WARMUP, MEASURE, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            before = Some(Snapshot::take(target).await);
            tokio::select! {
                _ = tokio::time::sleep(duration) => {}
                _ = job.failed.notified() => {}
            }
        }
        job.phase.store(STOP, Ordering::SeqCst);
        let after = Snapshot::take(target).await;
        let mut outs = Vec::new();
        for w in workers {
            outs.push(w.await.context("a worker panicked")?);
        }
        (before, outs, after)
    };
    finish(
        args,
        pattern,
        bs,
        qd,
        warmup,
        before,
        after,
        workers,
        load_average,
    )
}

#[allow(clippy::too_many_arguments)]
fn finish(
    args: &Args,
    pattern: Pattern,
    bs: u64,
    qd: u32,
    warmup: Duration,
    before: Option<Snapshot>,
    after: Snapshot,
    outs: Vec<WorkerOut>,
    load_average: [f64; 3],
) -> anyhow::Result<LoadReport> {
    let mut hist = Histogram::new();
    let mut errors = 0;
    let mut first_error = None;
    for o in outs {
        hist.merge(&o.hist);
        errors += o.errors;
        if first_error.is_none() {
            first_error = o.first_error;
        }
    }
    if let Some(e) = first_error {
        bail!("{errors} request(s) failed; the first: {e}");
    }
    let Some(before) = before else {
        bail!("the run ended before its measured window started");
    };
    let ops = hist.count();
    let (secs, cpu) = window(&before, &after, ops);
    let stages = match (&before.metrics, &after.metrics) {
        (Some(b), Some(a)) if pattern != Pattern::Fill => {
            let op = if pattern == Pattern::Randread {
                "read"
            } else {
                "write"
            };
            let req = mean_delta(b, a, "stockade_sled_request_duration_seconds", op);
            let dev = mean_delta(b, a, "stockade_sled_device_request_duration_seconds", op);
            match (req, dev) {
                (Some(r), Some(d)) => Some(StagesUs {
                    client_mean: hist.mean() / 1e3,
                    sled_request_mean: r * 1e6,
                    device_mean: d * 1e6,
                }),
                _ => None,
            }
        }
        _ => None,
    };
    let iops = ops as f64 / secs;
    Ok(LoadReport {
        tool: "sled-load".into(),
        label: args.label.clone(),
        pattern: pattern.name().into(),
        block_size: bs,
        queue_depth: qd as usize,
        connections: args.connections as usize,
        threads: args.threads as usize,
        working_set: args.working_set.0,
        warmup_s: if pattern == Pattern::Fill {
            0.0
        } else {
            warmup.as_secs_f64()
        },
        duration_s: secs,
        ops,
        errors,
        iops,
        mib_s: iops * bs as f64 / f64::from(1 << 20),
        latency_us: latency(&hist),
        cpu,
        stages_us: stages,
        load_average,
    })
}

async fn unwritten_chunks(session: &Session, args: &Args) -> anyhow::Result<u64> {
    let vs = session.clients[0]
        .volume_stat(args.volume)
        .await
        .context("asking the sled what it holds of the volume")?;
    let need = args.working_set.0.div_ceil(session.chunk_size);
    let have = vs.chunks.iter().filter(|c| c.0 < need).count() as u64;
    Ok(need - have)
}

fn emit(args: &Args, report: &LoadReport) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        bench::print_stdout(&format!("{json}\n"))?;
    } else {
        bench::print_stdout(&report.render())?;
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = target(&args)?;
    let session = connect(&args, &target).await?;
    check_block_size("--bs", args.bs.0, session.chunk_size)?;
    if args.working_set.0 < args.bs.0 || !args.working_set.0.is_multiple_of(args.bs.0) {
        bail!(
            "--working-set {} must be a non-zero multiple of --bs {}",
            args.working_set,
            args.bs
        );
    }
    let per_conn = args.qd.div_ceil(args.connections) as usize;
    if per_conn > MAX_IN_FLIGHT {
        bail!(
            "--qd {} over {} connection(s) puts {per_conn} requests on one connection; the client allows {MAX_IN_FLIGHT}: add --connections",
            args.qd,
            args.connections
        );
    }
    if args.pattern != Pattern::Fill && args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if args.precondition || args.pattern == Pattern::Fill {
        let (bs, qd) = if args.pattern == Pattern::Fill {
            (args.bs.0, args.qd)
        } else {
            (args.precondition_bs.0, args.precondition_qd)
        };
        check_block_size("--precondition-bs", bs, session.chunk_size)?;
        if !args.working_set.0.is_multiple_of(bs) {
            bail!(
                "--working-set {} must be a multiple of the fill's block size {}",
                args.working_set,
                ByteSize(bs)
            );
        }
        let fill = run_phase(
            &session,
            &target,
            &args,
            Pattern::Fill,
            bs,
            qd,
            Duration::ZERO,
            Duration::ZERO,
        )
        .await?;
        if args.pattern == Pattern::Fill {
            return emit(&args, &fill);
        }
        eprintln!(
            "preconditioned {} in {:.1}s ({:.0} MiB/s, {} requests of {})",
            args.working_set,
            fill.duration_s,
            fill.mib_s,
            fill.ops,
            ByteSize(bs)
        );
    }
    if args.pattern == Pattern::Randread {
        let missing = unwritten_chunks(&session, &args).await?;
        if missing > 0 {
            eprintln!(
                "warning: {missing} chunk(s) of the working set were never written; reads of them are answered with zeros without touching the device (use --precondition)"
            );
        }
    }
    let report = run_phase(
        &session,
        &target,
        &args,
        args.pattern,
        args.bs.0,
        args.qd,
        args.warmup,
        args.duration,
    )
    .await?;
    emit(&args, &report)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads as usize)
            .enable_all()
            .build()
    };
    let res = match rt {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => Err(anyhow::Error::new(e).context("starting the runtime")),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sled-load: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
