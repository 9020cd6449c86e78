//! The `stockade` admin commands, run as the real binary against a fake admin API (axum on
//! 127.0.0.1, a free port) that speaks the documents of `common::admin`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::admin::{
    AttachVolume, Attached, Attachment, CapacityInfo, ClusterStatus, CreateVolume, Created,
    DetachVolume, ErrorBody, NodeInfo, PoolInfo, SetQos, SledInfo, VolumeInfo,
};
use common::throttle::QosConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const TOKEN: &str = "the-right-token";

#[derive(Debug, Default)]
struct Data {
    volumes: BTreeMap<String, VolumeInfo>,
    /// Raw bodies of the QoS requests.
    qos_bodies: Vec<String>,
    next_attachment: u64,
}

type Shared = Arc<Mutex<Data>>;

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut r = (status, axum::Json(ErrorBody::new(code, message))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
    }
    r
}

/// The 401 answer, unless the request carries the token.
fn refused(h: &HeaderMap) -> Option<Response> {
    let want = format!("Bearer {TOKEN}");
    if h.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) == Some(want.as_str()) {
        None
    } else {
        Some(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin token",
        ))
    }
}

fn not_found(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no volume named {name:?}"),
    )
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &e.to_string(),
        ))
    })
}

fn new_volume(req: &CreateVolume, qos: QosConfig) -> VolumeInfo {
    VolumeInfo {
        name: req.name.clone(),
        id: "00000000000000a1".to_string(),
        size: req.size,
        state: "ready".to_string(),
        qos,
        chunk_size: 64 << 20,
        replicas: 3,
        chunks: req.size.div_ceil(64 << 20),
        group: "00000000000000b2".to_string(),
        members: vec![1, 2, 3],
        target_members: vec![1, 2, 3],
        leader: Some(1),
        attachments: vec![],
        uri: None,
        endpoints: vec!["127.0.0.1:10809".parse().unwrap()],
        created: 1_700_000_000,
    }
}

async fn list(State(d): State<Shared>, h: HeaderMap) -> Response {
    if let Some(r) = refused(&h) {
        return r;
    }
    let vols: Vec<VolumeInfo> = d.lock().unwrap().volumes.values().cloned().collect();
    axum::Json(vols).into_response()
}

async fn create(State(d): State<Shared>, h: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = refused(&h) {
        return r;
    }
    let req: CreateVolume = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let mut d = d.lock().unwrap();
    if d.volumes.contains_key(&req.name) {
        return error(
            StatusCode::CONFLICT,
            "conflict",
            &format!("volume {:?} already exists", req.name),
        );
    }
    // The same rule as the real server: the options given change the default's fields.
    let qos = match req.qos(QosConfig::UNLIMITED) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e),
    };
    let v = new_volume(&req, qos);
    d.volumes.insert(req.name.clone(), v.clone());
    let created = Created {
        volume: v,
        from_pool: true,
        latency_ms: 12,
    };
    (StatusCode::CREATED, axum::Json(created)).into_response()
}

async fn show(State(d): State<Shared>, h: HeaderMap, Path(name): Path<String>) -> Response {
    if let Some(r) = refused(&h) {
        return r;
    }
    if name == "garbage" {
        // A server of another version, or not a head node at all.
        return (StatusCode::OK, "{\"name\": 7, ").into_response();
    }
    match d.lock().unwrap().volumes.get(&name) {
        Some(v) => axum::Json(v.clone()).into_response(),
        None => not_found(&name),
    }
}

#[derive(serde::Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(d): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    if let Some(r) = refused(&h) {
        return r;
    }
    let mut d = d.lock().unwrap();
    match d.volumes.get(&name) {
        None => not_found(&name),
        Some(v) if !v.attachments.is_empty() && !q.force => error(
            StatusCode::CONFLICT,
            "conflict",
            &format!("volume {name:?} is attached; detach it first or pass --force"),
        ),
        Some(_) => {
            d.volumes.remove(&name);
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

async fn attach(
    State(d): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = refused(&h) {
        return r;
    }
    let req: AttachVolume = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let mut d = d.lock().unwrap();
    d.next_attachment += 1;
    let id = d.next_attachment;
    let Some(v) = d.volumes.get_mut(&name) else {
        return not_found(&name);
    };
    if v.attachments.iter().any(|a| !(a.shared && req.shared)) {
        return error(
            StatusCode::CONFLICT,
            "conflict",
            &format!("volume {name:?} is attached exclusively"),
        );
    }
    let a = Attachment {
        id,
        shared: req.shared,
        client: req.client,
        since: 1_700_000_100,
    };
    v.attachments.push(a.clone());
    let uri = format!("nbd://127.0.0.1:10809/{name}");
    v.uri = Some(uri.clone());
    axum::Json(Attached {
        uri,
        attachment: a,
        endpoints: v.endpoints.clone(),
    })
    .into_response()
}

async fn detach(
    State(d): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = refused(&h) {
        return r;
    }
    let req: DetachVolume = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let mut d = d.lock().unwrap();
    let Some(v) = d.volumes.get_mut(&name) else {
        return not_found(&name);
    };
    v.attachments
        .retain(|a| req.attachment.is_some_and(|id| id != a.id));
    if v.attachments.is_empty() {
        v.uri = None;
    }
    axum::Json(v.clone()).into_response()
}

async fn qos(
    State(d): State<Shared>,
    h: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = refused(&h) {
        return r;
    }
    let req: SetQos = match parse(&body) {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let mut d = d.lock().unwrap();
    d.qos_bodies
        .push(String::from_utf8_lossy(&body).into_owned());
    let Some(v) = d.volumes.get_mut(&name) else {
        return not_found(&name);
    };
    v.qos = req.apply(v.qos);
    axum::Json(v.clone()).into_response()
}

fn node(id: u64) -> NodeInfo {
    NodeInfo {
        id,
        nbd: format!("127.0.0.1:1080{id}").parse().unwrap(),
        admin: format!("127.0.0.1:918{id}").parse().unwrap(),
        peer: format!("127.0.0.1:970{id}").parse().unwrap(),
        domain: None,
        state: "up".to_string(),
        last_seen_secs: Some(0),
        groups: 2,
        baseline_iops: 0,
        capacity_iops: None,
        meta_leader: id == 1,
    }
}

fn sled() -> SledInfo {
    SledInfo {
        id: "00000000000000c3".to_string(),
        addr: "127.0.0.1:7001".parse().unwrap(),
        domain: None,
        state: "up".to_string(),
        devices: vec![],
        provisioned: 0,
        draining: false,
    }
}

async fn nodes(h: HeaderMap) -> Response {
    refused(&h).unwrap_or_else(|| axum::Json(vec![node(1), node(2), node(3)]).into_response())
}

async fn sleds(h: HeaderMap) -> Response {
    refused(&h).unwrap_or_else(|| axum::Json(vec![sled()]).into_response())
}

async fn cluster(State(d): State<Shared>, h: HeaderMap) -> Response {
    if let Some(r) = refused(&h) {
        return r;
    }
    let d = d.lock().unwrap();
    axum::Json(ClusterStatus {
        health: "healthy".to_string(),
        problems: vec![],
        meta_leader: Some(1),
        meta_term: 3,
        answered_by: 2,
        nodes: vec![node(1), node(2), node(3)],
        sleds: vec![sled()],
        volumes: d.volumes.len(),
        attached: d
            .volumes
            .values()
            .filter(|v| !v.attachments.is_empty())
            .count(),
        capacity: CapacityInfo {
            total: 60 << 30,
            provisioned: 0,
            allocated: 0,
            overcommit_ratio: 1.0,
        },
        pool: PoolInfo {
            target: 2,
            ready: 2,
            pending: 0,
        },
        key_version: 1,
        replicas: 3,
        group_size: 3,
    })
    .into_response()
}

/// The fake admin API; stops when dropped.
struct Fake {
    addr: SocketAddr,
    data: Shared,
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Fake {
    fn start() -> Self {
        let data = Shared::default();
        let app = Router::new()
            .route("/v1/volumes", get(list).post(create))
            .route("/v1/volumes/{name}", get(show).delete(delete))
            .route("/v1/volumes/{name}/attach", post(attach))
            .route("/v1/volumes/{name}/detach", post(detach))
            .route("/v1/volumes/{name}/qos", post(qos))
            .route("/v1/nodes", get(nodes))
            .route("/v1/sleds", get(sleds))
            .route("/v1/cluster", get(cluster))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
            .with_state(data.clone());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), format!("{TOKEN}\n")).unwrap();
        Self {
            addr,
            data,
            dir,
            stop: Some(stop),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("admin.token")
    }

    /// `stockade ARGS` with this server's endpoint and token (by environment).
    fn run(&self, args: &[&str]) -> Output {
        stockade(
            args,
            &[
                ("STOCKADE_ENDPOINT", self.endpoint()),
                (
                    "STOCKADE_TOKEN_FILE",
                    self.token_file().display().to_string(),
                ),
            ],
        )
    }

    /// Runs and checks success; answers stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// `stockade ARGS` with only `env` of the STOCKADE_ variables, in an empty directory.
fn stockade(args: &[&str], env: &[(&str, String)]) -> Output {
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stockade"));
    cmd.args(args).current_dir(cwd.path());
    for v in [
        "STOCKADE_ENDPOINT",
        "STOCKADE_TOKEN_FILE",
        "STOCKADE_DATA_DIR",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// A port nothing listens on.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[test]
fn create_list_show_and_delete() {
    let f = Fake::start();
    let out = f.ok(&[
        "volume",
        "create",
        "db",
        "--size",
        "10G",
        "--iops",
        "3000",
        "--bandwidth",
        "100MiB",
    ]);
    assert!(
        out.starts_with("created volume db in 12 ms (group from the pool of ready groups)\n"),
        "{out}"
    );
    assert!(
        out.contains("\nsize:         10GiB (10737418240 bytes)\n"),
        "{out}"
    );
    assert!(
        out.contains("\nqos:          iops 3000, bandwidth 100MiB/s\n"),
        "{out}"
    );
    {
        let d = f.data.lock().unwrap();
        let v = &d.volumes["db"];
        assert_eq!(v.size, 10 << 30);
        assert_eq!(
            v.qos,
            QosConfig {
                iops: Some(3000),
                bandwidth: Some(100 << 20),
                ..QosConfig::UNLIMITED
            }
        );
    }
    f.ok(&["volume", "create", "scratch", "--size", "512MiB"]);

    let out = f.ok(&["volume", "list"]);
    assert_eq!(
        out,
        "NAME       SIZE  STATE  IOPS       BANDWIDTH  ATTACHED  LEADER  URI\n\
         db        10GiB  ready  3000       100MiB/s   -              1  -\n\
         scratch  512MiB  ready  unlimited  unlimited  -              1  -\n"
    );

    let out = f.ok(&["volume", "show", "scratch"]);
    assert!(out.starts_with("name:         scratch\n"), "{out}");
    assert!(out.contains("\nuri:          - (not attached)\n"), "{out}");

    assert_eq!(
        f.ok(&["volume", "delete", "scratch"]),
        "deleted volume scratch\n"
    );
    let out = f.run(&["volume", "show", "scratch"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(stderr(&out), "error: no volume named \"scratch\"\n");
    assert!(out.stdout.is_empty());
}

#[test]
fn json_output_is_the_api_document() {
    let f = Fake::start();
    let created: Created =
        serde_json::from_str(&f.ok(&["volume", "create", "db", "--size", "1G", "--json"])).unwrap();
    assert_eq!(
        (created.volume.name.as_str(), created.volume.size),
        ("db", 1 << 30)
    );
    let vols: Vec<VolumeInfo> = serde_json::from_str(&f.ok(&["volume", "list", "--json"])).unwrap();
    assert_eq!(vols, vec![created.volume.clone()]);
    let v: VolumeInfo = serde_json::from_str(&f.ok(&["volume", "--json", "show", "db"])).unwrap();
    assert_eq!(v, created.volume);
    let c: ClusterStatus = serde_json::from_str(&f.ok(&["cluster", "status", "--json"])).unwrap();
    assert_eq!((c.volumes, c.answered_by), (1, 2));
    let n: Vec<NodeInfo> = serde_json::from_str(&f.ok(&["node", "list", "--json"])).unwrap();
    assert_eq!(n.len(), 3);
    let s: Vec<SledInfo> = serde_json::from_str(&f.ok(&["sled", "list", "--json"])).unwrap();
    assert_eq!(s, vec![sled()]);
    let v: VolumeInfo =
        serde_json::from_str(&f.ok(&["volume", "qos", "db", "--iops", "10", "--json"])).unwrap();
    assert_eq!(v.qos.iops, Some(10));
}

#[test]
fn attach_prints_one_line_and_detach_closes() {
    let f = Fake::start();
    f.ok(&["volume", "create", "db", "--size", "1G"]);
    let out = f.ok(&["volume", "attach", "db", "--client", "host-a"]);
    assert_eq!(out, "nbd://127.0.0.1:10809/db\n");

    // A second exclusive attach is a conflict.
    let out = f.run(&["volume", "attach", "db"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: volume \"db\" is attached exclusively\n"
    );
    assert!(out.stdout.is_empty());

    // Deleting an attached volume needs --force.
    let out = f.run(&["volume", "delete", "db"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("detach it first or pass --force"),
        "{}",
        describe(&out)
    );

    let out = f.ok(&["volume", "show", "db"]);
    assert!(
        out.contains("attachments:  #1 exclusive by \"host-a\" since 2023-11-14 22:15:00 UTC\n"),
        "{out}"
    );
    assert_eq!(f.ok(&["volume", "detach", "db"]), "detached volume db\n");
    let a: Attached =
        serde_json::from_str(&f.ok(&["volume", "attach", "db", "--shared", "--json"])).unwrap();
    assert!(a.attachment.shared);
    assert_eq!(a.uri, "nbd://127.0.0.1:10809/db");
    assert_eq!(
        f.ok(&["volume", "delete", "db", "--force"]),
        "deleted volume db\n"
    );
}

#[test]
fn qos_sends_only_the_options_given() {
    let f = Fake::start();
    f.ok(&[
        "volume",
        "create",
        "db",
        "--size",
        "1G",
        "--iops",
        "100",
        "--bandwidth",
        "1MiB",
    ]);
    let out = f.ok(&["volume", "qos", "db", "--iops", "none"]);
    assert_eq!(out, "QoS of volume db: iops unlimited, bandwidth 1MiB/s\n");
    f.ok(&["volume", "qos", "db", "--bandwidth", "2MiB", "--iops", "50"]);
    assert_eq!(
        f.data.lock().unwrap().qos_bodies,
        [r#"{"iops":null}"#, r#"{"iops":50,"bandwidth":2097152}"#]
    );

    // No option at all: clap's usage error, nothing sent.
    let out = f.run(&["volume", "qos", "db"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(stderr(&out).contains("--iops"), "{}", describe(&out));
    assert_eq!(f.data.lock().unwrap().qos_bodies.len(), 2);
}

#[test]
fn a_wrong_token_is_refused_with_what_to_do() {
    let f = Fake::start();
    let wrong = f.dir.path().join("wrong.token");
    std::fs::write(&wrong, "nope\n").unwrap();
    let out = stockade(
        &["volume", "list"],
        &[
            ("STOCKADE_ENDPOINT", f.endpoint()),
            ("STOCKADE_TOKEN_FILE", wrong.display().to_string()),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        stderr(&out),
        "error: the admin API refused the token (HTTP 401): pass --token-file or set STOCKADE_TOKEN_FILE to the cluster's admin.token\n"
    );
    assert!(out.stdout.is_empty());

    // The flag works as well as the variable.
    let token = f.token_file().display().to_string();
    let out = stockade(
        &[
            "volume",
            "list",
            "--endpoint",
            &f.endpoint(),
            "--token-file",
            &token,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn a_duplicate_name_is_a_conflict() {
    let f = Fake::start();
    f.ok(&["volume", "create", "db", "--size", "1G"]);
    let out = f.run(&["volume", "create", "db", "--size", "2G"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(stderr(&out), "error: volume \"db\" already exists\n");
    assert!(out.stdout.is_empty());
}

#[test]
fn an_unreachable_api_says_so() {
    let dead = dead_endpoint();
    let out = stockade(&["cluster", "status", "--endpoint", &dead], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let e = stderr(&out);
    assert!(
        e.starts_with(&format!("error: cannot reach the admin API at {dead}: ")),
        "{e}"
    );
    assert!(
        e.ends_with("; is the cluster running (`stockade up`)?\n"),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn without_an_endpoint_it_says_what_to_do() {
    let data = tempfile::tempdir().unwrap();
    let out = stockade(
        &["volume", "list"],
        &[("STOCKADE_DATA_DIR", data.path().display().to_string())],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(
        stderr(&out),
        "error: no admin endpoint: start a cluster with `stockade up` or pass --endpoint / set STOCKADE_ENDPOINT\n"
    );
}

#[test]
fn cluster_json_gives_the_endpoints_and_the_token() {
    let f = Fake::start();
    let data = tempfile::tempdir().unwrap();
    let doc = serde_json::json!({
        "supervisor_pid": 1,
        "cluster_key_file": data.path().join("cluster.key"),
        "processes": [],
        // The first head node is down: the next one answers.
        "admin_endpoints": [dead_endpoint(), f.endpoint()],
        "admin_token_file": f.token_file(),
    });
    std::fs::write(data.path().join("cluster.json"), doc.to_string()).unwrap();
    let dir = data.path().display().to_string();
    let out = stockade(&["node", "list", "--data-dir", &dir], &[]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    assert!(
        text.lines().nth(1).unwrap().contains("meta leader"),
        "{text}"
    );

    let out = stockade(&["cluster", "status"], &[("STOCKADE_DATA_DIR", dir)]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("health:       healthy\n"), "{text}");
    assert!(text.contains("meta leader:  node 1 (term 3)\n"), "{text}");
}

#[test]
fn a_malformed_answer_is_an_error_not_a_panic() {
    let f = Fake::start();
    let out = f.run(&["volume", "show", "garbage"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let e = stderr(&out);
    assert!(
        e.starts_with(&format!(
            "error: unexpected answer from the admin API at {} (HTTP 200): ",
            f.endpoint()
        )),
        "{e}"
    );
    assert!(!e.contains("panicked"), "{e}");
}

#[test]
fn usage_errors_exit_with_2() {
    for args in [
        &["volume", "create", "db", "--size", "1000"][..],
        &["volume", "create", "db"],
        &["volume", "resize", "db", "--size", "huge"],
        &["volume", "qos", "db", "--iops", "0"],
        &["volume", "show", "a/b"],
    ] {
        let out = stockade(args, &[("STOCKADE_ENDPOINT", dead_endpoint())]);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
    }
}

#[test]
fn completions_and_the_old_commands_still_parse() {
    let out = stockade(&["completions", "bash"], &[]);
    assert!(out.status.success(), "{}", describe(&out));
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        script.contains("stockade") && script.contains("volume"),
        "{script}"
    );
    for args in [
        &["up", "--help"][..],
        &["events", "--help"],
        &["volume", "--help"],
    ] {
        let out = stockade(args, &[]);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
    }
}
