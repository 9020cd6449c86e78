//! Benchmarks for Stockade (not tests: nothing here asserts on timing).
//!
//! * `sled-load` drives one sled controller over loopback with the sled protocol — 4 KiB random
//!   writes or reads at a fixed queue depth — and reports IOPS, latency percentiles, CPU per
//!   request, and latency by stage from the sled's own metrics.
//! * `bench-report` puts its results next to fio's on the same disk, as the table in
//!   `bench/README.md`.
//! * `bench/sled.sh` runs the whole comparison.
//!
//! The pieces they share live here: a log-linear latency histogram ([`hist`]), CPU accounting
//! from `/proc` ([`procstat`]), a reader for the sled's Prometheus text ([`promtext`]) and the
//! result formats ([`report`]).

pub mod hist;
pub mod procstat;
pub mod promtext;
pub mod report;

/// Writes `text` to standard output. A reader that went away (`sled-load … | head`) is not an
/// error; other write errors are returned.
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
