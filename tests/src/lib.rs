//! The process harness every integration test uses.
//!
//! It starts the real binaries (`sled-controller`, `head-node`, `stockade`) on loopback with
//! ports they pick themselves (port 0; each process reports what it bound in a ready file), waits
//! for readiness, collects each process's logs in a file, and stops processes by PID — also when
//! a test panics, in which case the tail of every log is printed. Tests can kill -9, SIGSTOP and
//! SIGCONT a process on demand.
//!
//! Binaries are built once per test process with `cargo build --bins` (a no-op when up to date),
//! so a test never runs a stale binary.

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod admin;
pub mod head;
pub mod nbd;
pub mod sled;
pub mod writer;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A test that cannot run here (a tool or privilege missing) fails, saying why: the test
/// command installs everything the suite needs, so a silent skip would hide a failure. On a
/// developer machine `STOCKADE_ALLOW_SKIP=1` turns it into a printed skip (the caller returns).
pub fn cannot_run(test: &str, why: &str) {
    assert!(
        std::env::var_os("STOCKADE_ALLOW_SKIP").is_some(),
        "{test} cannot run: {why} (tests/run.sh installs what the suite needs; set \
         STOCKADE_ALLOW_SKIP=1 to skip instead)"
    );
    eprintln!("SKIP {test}: {why}");
}

/// The real-client acceptance script: the shared one next to the repository when it is there
/// (the source of truth), else the copy kept in `tests/acceptance/` (a clone on its own).
pub fn acceptance_script() -> PathBuf {
    let shared = workspace().join("../shared/acceptance/nbd-clients.sh");
    if shared.is_file() {
        shared
    } else {
        workspace().join("tests/acceptance/nbd-clients.sh")
    }
}

/// Runs the acceptance script against `nbd`'s `export` with QEMU required to negotiate extended
/// headers, and fails `test` unless every step ran and passed (a skipped step — not root, no
/// multi-conn — is a test that cannot run here, see [`cannot_run`]).
pub fn run_acceptance(test: &str, nbd: SocketAddr, export: &str) {
    let out = Command::new("bash")
        .arg(acceptance_script())
        .arg(nbd.ip().to_string())
        .arg(nbd.port().to_string())
        .arg(export)
        .env("REQUIRE_EXTENDED_HEADERS", "1")
        .output()
        .expect("acceptance script runs");
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{t}");
    assert!(out.status.success(), "acceptance failed:\n{t}");
    assert!(t.contains(", 0 failed"), "{t}");
    if t.contains("skipping") {
        cannot_run(
            test,
            "the acceptance script skipped part of its run (not root, or no multi-conn?)",
        );
    }
}

/// The directory holding the binaries of the profile the tests were built with.
pub fn bin_dir() -> PathBuf {
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Builds every binary of the workspace once per test process.
///
/// `--tests` is there so that the build selects the same targets as `cargo test --workspace`:
/// with the version 2 feature resolver, a build without test targets resolves the dependencies'
/// features differently and compiles a second copy of every library (minutes of CPU and about a
/// gigabyte of disk, enough to fill a small CI disk).
pub fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let release = bin_dir().file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(workspace())
            .args(["build", "--workspace", "--bins", "--tests", "--quiet"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build --bins failed");
    });
}

/// Path of a workspace binary.
pub fn bin(name: &str) -> PathBuf {
    ensure_built();
    let p = bin_dir().join(name);
    assert!(p.exists(), "binary {} not found", p.display());
    p
}

/// A scratch directory on a disk-backed file system (O_DIRECT does not work on tmpfs), removed
/// when dropped unless `STOCKADE_KEEP_SCRATCH` is set.
pub fn scratch(name: &str) -> tempfile::TempDir {
    let base = std::env::var_os("STOCKADE_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/test-scratch"));
    std::fs::create_dir_all(&base).expect("scratch base");
    let prefix = format!("{name}-");
    let mut b = tempfile::Builder::new();
    b.prefix(&prefix);
    if std::env::var_os("STOCKADE_KEEP_SCRATCH").is_some() {
        b.disable_cleanup(true);
    }
    b.tempdir_in(base).expect("scratch dir")
}

/// Writes a fresh cluster key file in `dir` and returns its path and the key.
pub fn key_file(dir: &Path) -> (PathBuf, common::ClusterKey) {
    let p = dir.join("cluster.key");
    let k = common::ClusterKey::load_or_create(&p).expect("key file");
    (p, k)
}

/// The admin token every test cluster uses (written next to the key as `admin.token`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// Writes `admin.token` in `dir` and returns its path.
pub fn token_file(dir: &Path) -> PathBuf {
    let p = dir.join("admin.token");
    std::fs::write(&p, format!("{ADMIN_TOKEN}\n")).expect("token file");
    p
}

/// A child process started by a test.
#[derive(Debug)]
pub struct Proc {
    /// A name for messages.
    pub name: String,
    child: Option<Child>,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
    /// The ready file it writes.
    pub ready_file: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
}

impl Proc {
    /// Starts `program args…`, logging to `dir/name.log`. The caller passes the ready-file flag
    /// if the program needs one; [`Proc::wait_ready`] waits for it.
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Self {
        let mut p = Self {
            name: name.to_string(),
            child: None,
            log: dir.join(format!("{name}.log")),
            ready_file: dir.join(format!("{name}.ready.json")),
            program: program.to_path_buf(),
            args: args.to_vec(),
            dir: dir.to_path_buf(),
        };
        p.start();
        p
    }

    /// (Re)starts the process with the same arguments; the ready file is removed first.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let _ = std::fs::remove_file(&self.ready_file);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.program)
            .args(&self.args)
            .current_dir(&self.dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// Replaces the value following `flag` in the arguments used by the next [`Proc::start`].
    pub fn set_arg(&mut self, flag: &str, value: &str) {
        if let Some(i) = self.args.iter().position(|a| a == flag)
            && i + 1 < self.args.len()
        {
            self.args[i + 1] = value.to_string();
        } else {
            self.args.push(flag.to_string());
            self.args.push(value.to_string());
        }
    }

    /// Adds a flag without a value (e.g. `--rejoin`) to the arguments of the next
    /// [`Proc::start`], once.
    pub fn add_flag(&mut self, flag: &str) {
        if !self.args.iter().any(|a| a == flag) {
            self.args.push(flag.to_string());
        }
    }

    /// Removes a flag without a value from the arguments of the next [`Proc::start`].
    pub fn remove_flag(&mut self, flag: &str) {
        self.args.retain(|a| a != flag);
    }

    /// Waits up to `timeout` for the process to exit by itself; its status, or `None` if it
    /// still runs (it is left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its PID, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the ready file (JSON) and parses it; panics with the log on timeout or exit.
    pub fn wait_ready<T: DeserializeOwned>(&mut self, timeout: Duration) -> T {
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.ready_file)
                && let Ok(v) = serde_json::from_str(&text)
            {
                return v;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} not ready after {timeout:?}:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: the process freezes (its sockets stay open).
    pub fn sigstop(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// SIGCONT.
    pub fn sigcont(&self) {
        self.signal(Signal::SIGCONT);
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit (kill -9 after). Returns true when it
    /// exited by itself with status 0.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Its whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last log lines of {} ----\n{}",
                self.name,
                self.log_tail(40)
            );
        }
        if let Some(c) = self.child.as_mut() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Fetches `http://addr/path` with a plain HTTP/1.0 request (enough for /metrics and
/// /healthz); returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], b"")
}

/// The sum of every sample of metric `name` (all label sets) in the `/metrics` at `addr`; 0 when
/// it has none.
pub fn metric_sum(addr: SocketAddr, name: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").expect("metrics");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends one HTTP/1.0 request (`headers` as `Name: value` lines, `body` as is); returns the
/// status code and body. For testing how the admin API answers malformed requests.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Runs `promtool check metrics` on an exposition and checks that every metric family it names
/// is documented in `docs/metrics.md`. Returns the problems found.
pub fn check_metrics(exposition: &str) -> Vec<String> {
    use std::io::Write;
    let mut problems = Vec::new();
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(exposition.as_bytes());
            }
            let out = child.wait_with_output().expect("promtool output");
            if !out.status.success() {
                problems.push(format!(
                    "promtool check metrics failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        Err(e) => problems.push(format!(
            "promtool not runnable ({e}); install the Debian package prometheus"
        )),
    }
    let docs = std::fs::read_to_string(workspace().join("docs/metrics.md")).unwrap_or_default();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_whitespace().next().unwrap_or_default();
            if !docs.contains(&format!("`{name}`")) {
                problems.push(format!(
                    "metric {name} is not documented in docs/metrics.md"
                ));
            }
        }
    }
    problems
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}
