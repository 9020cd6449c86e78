//! CPU accounting from `/proc`: a process's CPU time, per thread name, and the machine's.
//!
//! Times come in clock ticks (`sysconf(_SC_CLK_TCK)`, 100 per second on Linux), so a 15-second
//! window measures CPU time to within about 0.1 %.

use std::collections::BTreeMap;
use std::path::Path;

/// Errors reading `/proc`.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A file did not have the expected shape.
    #[error("unexpected contents in {0}")]
    Parse(String),
}

fn read(path: &Path) -> Result<String, ProcError> {
    std::fs::read_to_string(path).map_err(|source| ProcError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Clock ticks per second.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User plus system ticks from the text of a `/proc/.../stat` file. The command name is in
/// parentheses and may contain spaces, so fields are counted from the last `)`.
pub fn parse_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": field 3 (state) is f[0]; utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds (user + system) used so far by process `pid`, all threads.
pub fn process_cpu_seconds(pid: u32) -> Result<f64, ProcError> {
    let path = format!("/proc/{pid}/stat");
    let text = read(Path::new(&path))?;
    let ticks = parse_stat_ticks(&text).ok_or(ProcError::Parse(path))?;
    Ok(ticks as f64 / ticks_per_second())
}

/// CPU seconds used so far by each thread of `pid`, summed by thread name (tokio workers share a
/// name, so they add up). Threads that exit between the listing and the read are skipped.
pub fn thread_cpu_seconds(pid: u32) -> Result<BTreeMap<String, f64>, ProcError> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|source| ProcError::Read {
        path: dir.clone(),
        source,
    })?;
    let hz = ticks_per_second();
    let mut out = BTreeMap::new();
    for e in entries.flatten() {
        let base = e.path();
        let (Ok(stat), Ok(comm)) = (
            std::fs::read_to_string(base.join("stat")),
            std::fs::read_to_string(base.join("comm")),
        ) else {
            continue;
        };
        if let Some(t) = parse_stat_ticks(&stat) {
            *out.entry(comm.trim().to_string()).or_insert(0.0) += t as f64 / hz;
        }
    }
    Ok(out)
}

/// The machine's CPU time so far: busy and total seconds summed over all CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineCpu {
    /// Seconds not idle and not waiting for I/O.
    pub busy: f64,
    /// All seconds.
    pub total: f64,
}

/// Parses the aggregate `cpu` line of `/proc/stat`.
pub fn parse_machine_cpu(text: &str) -> Option<MachineCpu> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already
    // counted in user and nice.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    let hz = ticks_per_second();
    Some(MachineCpu {
        busy: (total - idle) as f64 / hz,
        total: total as f64 / hz,
    })
}

/// The machine's CPU time so far.
pub fn machine_cpu() -> Result<MachineCpu, ProcError> {
    let text = read(Path::new("/proc/stat"))?;
    parse_machine_cpu(&text).ok_or_else(|| ProcError::Parse("/proc/stat".into()))
}

/// The 1, 5 and 15-minute load averages.
pub fn load_average() -> Result<[f64; 3], ProcError> {
    let text = read(Path::new("/proc/loadavg"))?;
    let v: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    match v[..] {
        [a, b, c] => Ok([a, b, c]),
        _ => Err(ProcError::Parse("/proc/loadavg".into())),
    }
}

/// Online CPUs.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_the_name() {
        let text = "1234 (dev-/a b) c) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 \
                    100 1000 200 18446744073709551615";
        assert_eq!(parse_stat_ticks(text), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn machine_line() {
        let text = "cpu  100 5 50 800 40 3 2 0 7 0\ncpu0 50 2 25 400 20 1 1 0 0 0\n";
        let m = parse_machine_cpu(text).unwrap();
        let hz = ticks_per_second();
        assert!((m.total - 1000.0 / hz).abs() < 1e-9);
        assert!((m.busy - 160.0 / hz).abs() < 1e-9);
        assert!(parse_machine_cpu("intr 1 2 3").is_none());
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(process_cpu_seconds(me).unwrap() >= 0.0);
        assert!(!thread_cpu_seconds(me).unwrap().is_empty());
        let m = machine_cpu().unwrap();
        assert!(m.total >= m.busy);
        load_average().unwrap();
    }
}
