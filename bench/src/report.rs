//! Results: what `sled-load` writes, what fio writes, and the table that puts them side by side.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Errors reading results.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not the JSON expected.
    #[error("{path}: {message}")]
    Format {
        /// File.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencyUs {
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest.
    pub max: f64,
}

/// Where the CPU went during the measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CpuReport {
    /// Cores the sled process used on average (CPU seconds / wall seconds).
    pub sled_cores: Option<f64>,
    /// Sled CPU microseconds per request.
    pub sled_us_per_op: Option<f64>,
    /// Sled CPU seconds per second per 1k IOPS (= `sled_us_per_op` / 1000).
    pub sled_cpu_s_per_kiops: Option<f64>,
    /// Cores used by each sled thread name (tokio workers share one name).
    pub sled_threads: BTreeMap<String, f64>,
    /// Cores the load generator used.
    pub load_cores: f64,
    /// Load generator CPU microseconds per request.
    pub load_us_per_op: f64,
    /// Cores busy on the whole machine (everything, including the kernel and other processes).
    pub machine_busy_cores: f64,
    /// CPUs online.
    pub machine_cpus: usize,
}

/// Mean latency by stage, from the sled's own histograms over the same window.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct StagesUs {
    /// As the load generator saw it (send to reply).
    pub client_mean: f64,
    /// Inside the sled: frame read to reply queued (`stockade_sled_request_duration_seconds`).
    pub sled_request_mean: f64,
    /// Inside the device thread: accepted to answered, I/O included
    /// (`stockade_sled_device_request_duration_seconds`).
    pub device_mean: f64,
}

/// One `sled-load` run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    /// Always `sled-load`.
    pub tool: String,
    /// Free text from `--label` (the script puts the durability mode here).
    pub label: Option<String>,
    /// `randwrite`, `randread` or `fill`.
    pub pattern: String,
    /// Bytes per request.
    pub block_size: u64,
    /// Requests kept in flight.
    pub queue_depth: usize,
    /// TCP connections used.
    pub connections: usize,
    /// Load generator runtime threads (1 = current-thread runtime).
    pub threads: usize,
    /// Bytes addressed.
    pub working_set: u64,
    /// Warm-up before measuring, seconds.
    pub warmup_s: f64,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Requests completed in the window.
    pub ops: u64,
    /// Requests that failed (any phase).
    pub errors: u64,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency of requests completed in the window.
    pub latency_us: LatencyUs,
    /// CPU use.
    pub cpu: CpuReport,
    /// Latency by stage, when the sled's metrics were reachable.
    pub stages_us: Option<StagesUs>,
    /// 1/5/15-minute load average when the run started.
    pub load_average: [f64; 3],
}

impl LoadReport {
    /// Human-readable summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "sled-load {}{} bs={} qd={} conns={} threads={} working-set={} window={:.1}s (warm-up {:.1}s)",
            self.pattern,
            self.label
                .as_deref()
                .map(|x| format!(" [{x}]"))
                .unwrap_or_default(),
            common::ByteSize(self.block_size),
            self.queue_depth,
            self.connections,
            self.threads,
            common::ByteSize(self.working_set),
            self.duration_s,
            self.warmup_s,
        );
        let _ = writeln!(
            s,
            "  {:.0} IOPS, {:.1} MiB/s, {} ops, {} errors",
            self.iops, self.mib_s, self.ops, self.errors
        );
        let _ = writeln!(
            s,
            "  latency µs: min {:.1} mean {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
            l.min, l.mean, l.p50, l.p99, l.p99_9, l.max
        );
        let c = &self.cpu;
        if let (Some(cores), Some(us), Some(k)) =
            (c.sled_cores, c.sled_us_per_op, c.sled_cpu_s_per_kiops)
        {
            let threads: Vec<String> = c
                .sled_threads
                .iter()
                .filter(|(_, v)| **v >= 0.005)
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect();
            let _ = writeln!(
                s,
                "  sled CPU: {cores:.2} cores, {us:.1} µs/op ({k:.4} CPU-s/s per 1k IOPS); threads: {}",
                threads.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "  load generator CPU: {:.2} cores, {:.1} µs/op; machine busy {:.2} of {} cores; load average {:.2} {:.2} {:.2}",
            c.load_cores,
            c.load_us_per_op,
            c.machine_busy_cores,
            c.machine_cpus,
            self.load_average[0],
            self.load_average[1],
            self.load_average[2]
        );
        if let Some(st) = &self.stages_us {
            let _ = writeln!(
                s,
                "  mean latency by stage µs: client {:.1} = network+client {:.1} + sled {:.1} (= server-side {:.1} + device thread {:.1})",
                st.client_mean,
                st.client_mean - st.sled_request_mean,
                st.sled_request_mean,
                st.sled_request_mean - st.device_mean,
                st.device_mean
            );
        }
        s
    }
}

/// What matters of one fio run.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct FioRun {
    /// Requests per second (reads or writes; syncs not counted).
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Submission-to-completion latency (`lat_ns`).
    pub latency_us: LatencyUs,
    /// fio's own CPU (user + system) per request, microseconds.
    pub cpu_us_per_op: f64,
    /// Mean latency of the `fdatasync` calls, if any were issued.
    pub sync_mean_us: Option<f64>,
    /// `fdatasync` calls per second, if any were issued.
    pub syncs_per_s: Option<f64>,
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_f64()
}

/// Parses fio's `--output-format=json` (first job).
pub fn parse_fio(text: &str, path: &str) -> Result<FioRun, ReportError> {
    let bad = |m: &str| ReportError::Format {
        path: path.to_string(),
        message: m.to_string(),
    };
    // fio may print notes before the JSON object.
    let start = text.find('{').ok_or_else(|| bad("no JSON object"))?;
    let v: Value = serde_json::from_str(&text[start..]).map_err(|e| bad(&e.to_string()))?;
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or_else(|| bad("no jobs"))?;
    let dir = ["write", "read"]
        .into_iter()
        .find(|d| num(job, &[d, "total_ios"]).unwrap_or(0.0) > 0.0)
        .ok_or_else(|| bad("neither reads nor writes were done"))?;
    let d = &job[dir];
    let lat = if d["lat_ns"].get("percentile").is_some() {
        &d["lat_ns"]
    } else {
        &d["clat_ns"]
    };
    let pct = |p: &str| num(lat, &["percentile", p]).unwrap_or(0.0) / 1000.0;
    let ops = num(d, &["total_ios"]).unwrap_or(0.0);
    let runtime_s = num(job, &["job_runtime"]).unwrap_or(0.0) / 1000.0;
    let cpu_pct = num(job, &["usr_cpu"]).unwrap_or(0.0) + num(job, &["sys_cpu"]).unwrap_or(0.0);
    // fio leaves `sync.total_ios` at 0; the sample count is `sync.lat_ns.N`.
    let syncs = num(job, &["sync", "lat_ns", "N"]).filter(|n| *n > 0.0);
    let sync_mean_us = num(job, &["sync", "lat_ns", "mean"])
        .filter(|_| syncs.is_some())
        .map(|ns| ns / 1000.0);
    let syncs_per_s = syncs.filter(|_| runtime_s > 0.0).map(|n| n / runtime_s);
    Ok(FioRun {
        iops: num(d, &["iops"]).unwrap_or(0.0),
        mib_s: num(d, &["bw"]).unwrap_or(0.0) / 1024.0,
        latency_us: LatencyUs {
            min: num(&d["lat_ns"], &["min"]).unwrap_or(0.0) / 1000.0,
            mean: num(&d["lat_ns"], &["mean"]).unwrap_or(0.0) / 1000.0,
            p50: pct("50.000000"),
            p99: pct("99.000000"),
            p99_9: pct("99.900000"),
            max: num(&d["lat_ns"], &["max"]).unwrap_or(0.0) / 1000.0,
        },
        cpu_us_per_op: if ops > 0.0 {
            cpu_pct / 100.0 * runtime_s / ops * 1e6
        } else {
            0.0
        },
        sync_mean_us,
        syncs_per_s,
    })
}

/// What `bench/sled.sh` records around every run in `NAME.env.json`: the machine's busy cores
/// and the benchmark disk's activity (`/proc/diskstats`), which neither fio nor sled-load report.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct RunEnv {
    /// Cores busy on the whole machine.
    pub machine_busy_cores: f64,
    /// Reads and writes the disk completed per second.
    pub disk_ios_per_s: f64,
    /// Share of the time the disk had at least one request, percent.
    pub disk_util_pct: f64,
    /// Mean requests in flight at the disk (time-weighted).
    pub disk_queue: f64,
    /// Cache flushes per second.
    pub disk_flushes_per_s: f64,
}

/// Reads the `.env.json` next to a result file, if there is one.
pub fn read_env(result: &Path) -> Option<RunEnv> {
    let text = std::fs::read_to_string(result.with_extension("env.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// One row of the comparison: a sled run and the fio run it is held against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// The sled's `--durability`.
    pub durability: &'static str,
    /// `randwrite` or `randread`.
    pub pattern: &'static str,
    /// Queue depth.
    pub qd: usize,
    /// What fio did, for the table.
    pub baseline: String,
    /// fio result files: `{fio_stem}.r{N}.json`, N = 1, 2, …
    pub fio_stem: String,
    /// sled-load result files: `{sled_stem}.r{N}.json`.
    pub sled_stem: String,
}

/// The rows `bench/sled.sh` produces, with the file names it writes (`.rN.json` for the Nth
/// repetition): `fio-{pattern}-qd{QD}[-dsync|-fdatasync]` and `sled-{durability}-{pattern}-qd{QD}`.
///
/// Writes under `dsync` are held against fio `--sync=dsync` (both make every write durable by
/// itself); writes under `batch-fsync` against fio `--fdatasync=QD` (one fdatasync per QD writes)
/// and also against `--sync=dsync`, the durability every acknowledged write gets either way.
pub fn standard_comparisons(qds: &[usize]) -> Vec<Comparison> {
    let mut rows = Vec::new();
    for durability in ["dsync", "batch-fsync"] {
        for pattern in ["randwrite", "randread"] {
            for &qd in qds {
                let sled_stem = format!("sled-{durability}-{pattern}-qd{qd}");
                let mut add = |baseline: String, fio_stem: String| {
                    rows.push(Comparison {
                        durability,
                        pattern,
                        qd,
                        baseline,
                        fio_stem,
                        sled_stem: sled_stem.clone(),
                    });
                };
                match (pattern, durability) {
                    ("randread", _) => add("fio".into(), format!("fio-randread-qd{qd}")),
                    (_, "dsync") => add(
                        "fio --sync=dsync".into(),
                        format!("fio-randwrite-qd{qd}-dsync"),
                    ),
                    _ => {
                        add(
                            format!("fio --fdatasync={qd}"),
                            format!("fio-randwrite-qd{qd}-fdatasync"),
                        );
                        add(
                            "fio --sync=dsync".into(),
                            format!("fio-randwrite-qd{qd}-dsync"),
                        );
                    }
                }
            }
        }
    }
    rows
}

/// A row with whatever results were found. With several repetitions, `fio` and `sled` are the
/// runs with the median IOPS and `ratio` the median of the per-repetition ratios (each
/// repetition's fio and sled runs ran back to back).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The sled's durability mode.
    pub durability: String,
    /// Workload.
    pub pattern: String,
    /// Queue depth.
    pub qd: usize,
    /// What fio did.
    pub baseline: String,
    /// fio's result.
    pub fio: Option<FioRun>,
    /// The sled's result.
    pub sled: Option<LoadReport>,
    /// sled IOPS / fio IOPS.
    pub ratio: Option<f64>,
    /// Smallest and largest per-repetition ratio.
    pub ratio_range: Option<(f64, f64)>,
    /// The sled's best IOPS over fio's best: other work on the machine only ever lowers a
    /// result, so on a shared machine the best of several runs is the better estimate of each.
    pub best_ratio: Option<f64>,
    /// Repetitions with both results.
    pub pairs: usize,
    /// The machine and the disk during the fio run.
    pub fio_env: Option<RunEnv>,
    /// The machine and the disk during the sled run (warm-up included).
    pub sled_env: Option<RunEnv>,
}

/// Reads a sled-load result file.
pub fn read_load_report(path: &Path) -> Result<LoadReport, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ReportError::Format {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Reads a fio result file.
pub fn read_fio(path: &Path) -> Result<FioRun, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_fio(&text, &path.display().to_string())
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The index of the element with the (lower) median key.
fn median_index<T>(items: &[T], key: impl Fn(&T) -> f64) -> Option<usize> {
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.sort_by(|a, b| key(&items[*a]).total_cmp(&key(&items[*b])));
    idx.get(items.len().saturating_sub(1) / 2).copied()
}

/// The most repetitions looked for.
const MAX_REPEATS: usize = 1000;

/// Builds the rows from the files in `dir`; a missing file leaves its cell empty, a malformed
/// one is an error.
pub fn collect(dir: &Path, comparisons: &[Comparison]) -> Result<Vec<Row>, ReportError> {
    let mut rows = Vec::new();
    for c in comparisons {
        let mut fios = Vec::new();
        let mut sleds = Vec::new();
        let mut ratios = Vec::new();
        for r in 1..=MAX_REPEATS {
            let fio_path = dir.join(format!("{}.r{r}.json", c.fio_stem));
            let sled_path = dir.join(format!("{}.r{r}.json", c.sled_stem));
            if !fio_path.exists() && !sled_path.exists() {
                break;
            }
            let fio = fio_path.exists().then(|| read_fio(&fio_path)).transpose()?;
            let sled = sled_path
                .exists()
                .then(|| read_load_report(&sled_path))
                .transpose()?;
            if let (Some(f), Some(s)) = (&fio, &sled)
                && f.iops > 0.0
            {
                ratios.push(s.iops / f.iops);
            }
            if let Some(f) = fio {
                fios.push((f, read_env(&fio_path)));
            }
            if let Some(s) = sled {
                sleds.push((s, read_env(&sled_path)));
            }
        }
        let fio = median_index(&fios, |(f, _)| f.iops).map(|i| fios[i]);
        let sled = median_index(&sleds, |(s, _)| s.iops).map(|i| sleds[i].clone());
        let range = ratios
            .iter()
            .copied()
            .fold(None, |acc: Option<(f64, f64)>, x| {
                Some(acc.map_or((x, x), |(lo, hi)| (lo.min(x), hi.max(x))))
            });
        let best_fio = fios.iter().map(|(f, _)| f.iops).fold(0.0, f64::max);
        let best_sled = sleds.iter().map(|(s, _)| s.iops).fold(0.0, f64::max);
        let best_ratio = (best_fio > 0.0 && !sleds.is_empty()).then(|| best_sled / best_fio);
        rows.push(Row {
            durability: c.durability.into(),
            pattern: c.pattern.into(),
            qd: c.qd,
            baseline: c.baseline.clone(),
            fio: fio.map(|(f, _)| f),
            fio_env: fio.and_then(|(_, e)| e),
            sled_env: sled.as_ref().and_then(|(_, e)| *e),
            sled: sled.map(|(s, _)| s),
            ratio: median(&ratios),
            ratio_range: range,
            best_ratio,
            pairs: ratios.len(),
        });
    }
    Ok(rows)
}

const HEADERS: [&str; 15] = [
    "sled durability",
    "workload",
    "QD",
    "baseline",
    "fio IOPS",
    "sled IOPS",
    "sled/fio",
    "range (runs)",
    "best/best",
    "fio p50/p99 µs",
    "sled p50/p99/p99.9 µs",
    "sled CPU µs/op",
    "load-gen CPU µs/op",
    "busy cores fio/sled",
    "disk queue fio/sled",
];

fn cells(r: &Row) -> Vec<String> {
    let dash = || "—".to_string();
    vec![
        r.durability.clone(),
        r.pattern.clone(),
        r.qd.to_string(),
        r.baseline.clone(),
        r.fio.map_or_else(dash, |f| format!("{:.0}", f.iops)),
        r.sled
            .as_ref()
            .map_or_else(dash, |s| format!("{:.0}", s.iops)),
        r.ratio.map_or_else(dash, |x| format!("{x:.2}×")),
        r.ratio_range
            .map_or_else(dash, |(lo, hi)| format!("{lo:.2}–{hi:.2} ({})", r.pairs)),
        r.best_ratio.map_or_else(dash, |x| format!("{x:.2}×")),
        r.fio.map_or_else(dash, |f| {
            format!("{:.0}/{:.0}", f.latency_us.p50, f.latency_us.p99)
        }),
        r.sled.as_ref().map_or_else(dash, |s| {
            format!(
                "{:.0}/{:.0}/{:.0}",
                s.latency_us.p50, s.latency_us.p99, s.latency_us.p99_9
            )
        }),
        r.sled
            .as_ref()
            .and_then(|s| s.cpu.sled_us_per_op)
            .map_or_else(dash, |x| format!("{x:.1}")),
        r.sled
            .as_ref()
            .map_or_else(dash, |s| format!("{:.1}", s.cpu.load_us_per_op)),
        format!(
            "{}/{}",
            r.fio_env
                .map_or_else(dash, |e| format!("{:.2}", e.machine_busy_cores)),
            r.sled
                .as_ref()
                .map_or_else(dash, |s| format!("{:.2}", s.cpu.machine_busy_cores)),
        ),
        format!(
            "{}/{}",
            r.fio_env
                .map_or_else(dash, |e| format!("{:.1}", e.disk_queue)),
            r.sled_env
                .map_or_else(dash, |e| format!("{:.1}", e.disk_queue)),
        ),
    ]
}

/// A table with aligned columns.
pub fn render_text(rows: &[Row]) -> String {
    let body: Vec<Vec<String>> = rows.iter().map(cells).collect();
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
    for r in &body {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: Vec<String>| {
        let mut s = String::new();
        for (i, (c, w)) in cols.iter().zip(&widths).enumerate() {
            let pad = w - c.chars().count();
            // Text left, numbers right.
            if i < 4 {
                let _ = write!(s, "{c}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(s, "{}{c}  ", " ".repeat(pad));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(HEADERS.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for r in body {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// The same table in Markdown.
pub fn render_markdown(rows: &[Row]) -> String {
    let mut out = format!("| {} |\n", HEADERS.join(" | "));
    let align: Vec<&str> = (0..HEADERS.len())
        .map(|i| if i < 4 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "|{}|", align.join("|"));
    for r in rows {
        let _ = writeln!(out, "| {} |", cells(r).join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIO: &str = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "jobs": [{
    "jobname": "w", "job_runtime": 10000, "usr_cpu": 5.0, "sys_cpu": 45.0,
    "read": {"total_ios": 0, "iops": 0.0, "bw": 0},
    "write": {"total_ios": 500000, "iops": 50000.0, "bw": 200000,
      "lat_ns": {"min": 20000, "max": 3000000, "mean": 640000.0,
        "percentile": {"50.000000": 600000, "99.000000": 1200000, "99.900000": 2000000}},
      "clat_ns": {"min": 1, "max": 2, "mean": 1.5}},
    "sync": {"total_ios": 0, "lat_ns": {"mean": 300000.0, "N": 15000}}
  }]
}"#;

    #[test]
    fn fio_json_is_read() {
        let f = parse_fio(FIO, "x.json").unwrap();
        assert_eq!(f.iops, 50000.0);
        assert!((f.mib_s - 195.3125).abs() < 1e-9);
        assert_eq!(f.latency_us.p50, 600.0);
        assert_eq!(f.latency_us.p99_9, 2000.0);
        assert_eq!(f.latency_us.mean, 640.0);
        // 50 % of a core for 10 s over 500k requests = 10 µs each.
        assert!((f.cpu_us_per_op - 10.0).abs() < 1e-9);
        assert_eq!(f.sync_mean_us, Some(300.0));
        assert_eq!(f.syncs_per_s, Some(1500.0));
        assert!(parse_fio("{}", "y").is_err());
        assert!(parse_fio("not json", "z").is_err());
    }

    #[test]
    fn comparisons_name_the_files_the_script_writes() {
        let c = standard_comparisons(&[1, 32]);
        // dsync: 2 patterns × 2 depths; batch-fsync: writes twice (two baselines), reads once.
        assert_eq!(c.len(), 4 + 6);
        assert!(
            c.iter()
                .any(|r| r.fio_stem == "fio-randwrite-qd32-fdatasync"
                    && r.sled_stem == "sled-batch-fsync-randwrite-qd32")
        );
        assert!(
            c.iter()
                .any(|r| r.fio_stem == "fio-randread-qd1"
                    && r.sled_stem == "sled-dsync-randread-qd1")
        );
    }

    #[test]
    fn tables_render_missing_results_as_dashes() {
        let rows = vec![Row {
            durability: "dsync".into(),
            pattern: "randwrite".into(),
            qd: 32,
            baseline: "fio --sync=dsync".into(),
            fio: Some(parse_fio(FIO, "x").unwrap()),
            sled: None,
            ratio: None,
            ratio_range: None,
            best_ratio: None,
            pairs: 0,
            fio_env: None,
            sled_env: None,
        }];
        let t = render_text(&rows);
        assert!(t.contains("50000") && t.contains('—'), "{t}");
        let m = render_markdown(&rows);
        assert_eq!(m.lines().count(), 3);
        let columns = |l: &str| l.matches('|').count();
        assert!(m.lines().all(|l| columns(l) == HEADERS.len() + 1), "{m}");
        assert!(m.lines().all(|l| l.starts_with('|') && l.ends_with('|')));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    fn load_report(iops: f64) -> LoadReport {
        LoadReport {
            tool: "sled-load".into(),
            label: Some("dsync".into()),
            pattern: "randread".into(),
            block_size: 4096,
            queue_depth: 32,
            connections: 1,
            threads: 1,
            working_set: 1 << 30,
            warmup_s: 3.0,
            duration_s: 15.0,
            ops: (iops * 15.0) as u64,
            errors: 0,
            iops,
            mib_s: iops / 256.0,
            latency_us: LatencyUs::default(),
            cpu: CpuReport::default(),
            stages_us: None,
            load_average: [0.0; 3],
        }
    }

    #[test]
    fn repetitions_give_medians_and_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let fio = |iops: f64| FIO.replace("50000.0", &format!("{iops:.1}"));
        for (r, (f, s)) in [(100.0, 50.0), (200.0, 60.0), (300.0, 240.0)]
            .iter()
            .enumerate()
        {
            let r = r + 1;
            std::fs::write(
                dir.path().join(format!("fio-randread-qd32.r{r}.json")),
                fio(*f),
            )
            .unwrap();
            std::fs::write(
                dir.path()
                    .join(format!("sled-dsync-randread-qd32.r{r}.json")),
                serde_json::to_string(&load_report(*s)).unwrap(),
            )
            .unwrap();
        }
        std::fs::write(
            dir.path().join("fio-randread-qd32.r2.env.json"),
            r#"{"machine_busy_cores": 0.5, "disk_ios_per_s": 1, "disk_util_pct": 90, "disk_queue": 31.5, "disk_flushes_per_s": 0, "load_average": "0 0 0"}"#,
        )
        .unwrap();
        let rows = collect(dir.path(), &standard_comparisons(&[32])).unwrap();
        let row = rows
            .iter()
            .find(|r| r.durability == "dsync" && r.pattern == "randread")
            .unwrap();
        // Ratios 0.5, 0.3, 0.8: median 0.5; the median runs are fio 200 and sled 60.
        assert_eq!(row.pairs, 3);
        assert_eq!(row.ratio, Some(0.5));
        assert_eq!(row.ratio_range, Some((0.3, 0.8)));
        assert_eq!(row.best_ratio, Some(0.8));
        assert_eq!(row.fio.unwrap().iops, 200.0);
        assert_eq!(row.sled.as_ref().unwrap().iops, 60.0);
        assert_eq!(row.fio_env.unwrap().disk_queue, 31.5);
        // Nothing measured for the other rows.
        let other = rows.iter().find(|r| r.durability == "batch-fsync").unwrap();
        assert_eq!((other.pairs, other.ratio), (0, None));
        assert!(render_text(&rows).contains("0.30–0.80 (3)"));
    }
}
