//! Dashboards and alert rules as code (`deploy/`), checked against `docs/metrics.md`, `promtool`,
//! a real Prometheus server scraping a running cluster, and the processes' own `/metrics`.
//!
//! `docs/metrics.md` is the contract: the other suites fail when a process exports a metric it
//! does not list; here every metric a dashboard or an alert names must be listed (so it exists),
//! and every metric it lists must be exported by the processes after some I/O, with the
//! documented type and label names.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tests::head::{Cluster, Cluster3, free_ports};
use tests::{Proc, check_metrics, eventually, http_get, scratch, workspace};

// ------------------------------------------------------------------------------------------
// docs/metrics.md

/// One metric as `docs/metrics.md` lists it.
#[derive(Debug, Clone)]
struct DocMetric {
    /// `counter`, `gauge` or `histogram`.
    kind: String,
    /// Label names (without `le`).
    labels: BTreeSet<String>,
    /// The `## ` section it is listed under.
    section: String,
}

/// Every metric in the tables of `docs/metrics.md`.
fn documented() -> BTreeMap<String, DocMetric> {
    let text = std::fs::read_to_string(workspace().join("docs/metrics.md")).expect("metrics.md");
    let mut out = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("## ") {
            section = s.trim().to_string();
            continue;
        }
        let Some(row) = line.strip_prefix("| `") else {
            continue;
        };
        let cols: Vec<&str> = row.split('|').map(str::trim).collect();
        assert!(cols.len() >= 3, "malformed row in docs/metrics.md: {line}");
        let name = cols[0].trim_end_matches('`').to_string();
        let labels = cols[2]
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        out.insert(
            name,
            DocMetric {
                kind: cols[1].to_string(),
                labels,
                section: section.clone(),
            },
        );
    }
    assert!(
        out.len() > 40,
        "docs/metrics.md parsed to {} metrics",
        out.len()
    );
    out
}

/// Which process type a section of `docs/metrics.md` describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcessType {
    Sled,
    Head,
    /// `stockade volume attach NAME --local`: its own metrics and its local NBD server's.
    AttachLocal,
}

fn exported_by(doc: &DocMetric, t: ProcessType) -> bool {
    let s = doc.section.to_lowercase();
    s.starts_with("every process")
        || match t {
            ProcessType::Sled => s.starts_with("sled controller"),
            ProcessType::Head => s.contains("head node"),
            ProcessType::AttachLocal => {
                s.starts_with("attach --local") || s.contains("nbd front end")
            }
        }
}

// ------------------------------------------------------------------------------------------
// PromQL, crudely

/// A metric named in a PromQL expression, with the label names of its matchers.
#[derive(Debug)]
struct MetricRef {
    name: String,
    labels: Vec<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Skips a quoted string starting at `i` (the quote); returns the index after it.
fn skip_string(chars: &[char], i: usize) -> usize {
    let q = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != q {
        if chars[j] == '\\' && q != '`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// Metrics an expression names: identifiers `stockade_…`, `process_…` and `up`, outside
/// strings, with the label names of a `{…}` matcher right after them.
fn metric_refs(expr: &str) -> Vec<MetricRef> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
            continue;
        }
        if c == '$' {
            // A Grafana variable ($volume, ${volume}, $__rate_interval): not a metric.
            i += 1;
            while i < chars.len() && (is_ident(chars[i]) || chars[i] == '{' || chars[i] == '}') {
                i += 1;
            }
            continue;
        }
        if !is_ident_start(c) || (i > 0 && is_ident(chars[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let ident: String = chars[start..i].iter().collect();
        if !(ident.starts_with("stockade_") || ident.starts_with("process_") || ident == "up") {
            continue;
        }
        let mut labels = Vec::new();
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        if j < chars.len() && chars[j] == '{' {
            j += 1;
            loop {
                while j < chars.len() && (chars[j].is_whitespace() || chars[j] == ',') {
                    j += 1;
                }
                if j >= chars.len() || chars[j] == '}' {
                    break;
                }
                let ls = j;
                while j < chars.len() && is_ident(chars[j]) {
                    j += 1;
                }
                labels.push(chars[ls..j].iter().collect());
                while j < chars.len() && !matches!(chars[j], '"' | '\'' | '`' | '}') {
                    j += 1;
                }
                if j < chars.len() && chars[j] != '}' {
                    j = skip_string(&chars, j);
                }
            }
            i = j + 1;
        }
        out.push(MetricRef {
            name: ident,
            labels,
        });
    }
    out
}

/// Problems with the metrics `expr` names: each must be documented (a histogram only through
/// its `_bucket`, `_sum` or `_count` series), and each matcher must use a documented label
/// (or `job`, `instance`, `le` on buckets).
fn check_expr(expr: &str, docs: &BTreeMap<String, DocMetric>) -> Vec<String> {
    let mut problems = Vec::new();
    let refs = metric_refs(expr);
    for r in refs {
        let mut allowed: BTreeSet<String> = ["job", "instance", "__name__"]
            .into_iter()
            .map(String::from)
            .collect();
        if r.name == "up" {
            // Prometheus's own series for every target.
        } else if let Some(d) = docs.get(&r.name) {
            if d.kind == "histogram" {
                problems.push(format!(
                    "{} is a histogram: name its _bucket, _sum or _count series (in `{expr}`)",
                    r.name
                ));
            }
            allowed.extend(d.labels.iter().cloned());
        } else if let Some((base, suffix)) = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| r.name.strip_suffix(s).map(|b| (b, *s)))
            .filter(|(b, _)| docs.get(*b).is_some_and(|d| d.kind == "histogram"))
        {
            allowed.extend(docs[base].labels.iter().cloned());
            if suffix == "_bucket" {
                allowed.insert("le".into());
            }
        } else {
            problems.push(format!(
                "{} is not a metric listed in docs/metrics.md (in `{expr}`)",
                r.name
            ));
            continue;
        }
        for l in &r.labels {
            if !allowed.contains(l) {
                problems.push(format!(
                    "{} has no label `{l}` (documented: {allowed:?}) in `{expr}`",
                    r.name
                ));
            }
        }
    }
    problems
}

// ------------------------------------------------------------------------------------------
// Dashboards

fn grafana_dir() -> PathBuf {
    workspace().join("deploy/grafana/dashboards")
}

/// Every dashboard file with its parsed JSON (a parse error fails the test that asks).
fn dashboards() -> Vec<(PathBuf, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(grafana_dir())
        .expect("deploy/grafana/dashboards")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no dashboards in {}",
        grafana_dir().display()
    );
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("dashboard file");
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", p.display()));
            (p, v)
        })
        .collect()
}

/// Every panel of a dashboard, including those nested in (collapsed) rows.
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(inner) = p.get("panels") {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// The PromQL of every query target and query variable of a dashboard, with where it is.
fn queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dash) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((format!("panel {:?}", p["title"]), e.to_string()));
            }
        }
    }
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]
                .as_str()
                .or_else(|| v["query"]["query"].as_str())
                .unwrap_or_default();
            out.push((format!("variable {:?}", v["name"]), q.to_string()));
        }
    }
    out
}

/// Grafana variables (`$name`, `${name}`, `${name:fmt}`) an expression uses, without the
/// built-ins (`$__rate_interval`, …).
fn variables_used(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' {
            let mut j = i + 1;
            if j < chars.len() && chars[j] == '{' {
                j += 1;
            }
            let s = j;
            while j < chars.len() && is_ident(chars[j]) && chars[j] != ':' {
                j += 1;
            }
            let name: String = chars[s..j].iter().collect();
            if !name.is_empty() && !name.starts_with("__") {
                out.insert(name);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The stages of `stockade_volume_stage_duration_seconds` the waterfall must show.
const STAGES: &[&str] = &[
    "throttle",
    "raft_commit",
    "read_index",
    "sled_read",
    "sled_write",
    "sled_zero",
    "sled_flush",
];

/// Schema problems of one dashboard (Grafana 9/10 model, as far as import needs it).
fn dashboard_problems(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    match d["schemaVersion"].as_u64() {
        Some(36..=39) => {}
        other => out.push(format!("schemaVersion {other:?} (expected 36-39)")),
    }
    let uid = d["uid"].as_str().unwrap_or_default();
    if uid.is_empty() || uid.len() > 40 {
        out.push(format!("uid {uid:?} must be 1-40 characters"));
    }
    if d["title"].as_str().unwrap_or_default().is_empty() {
        out.push("no title".into());
    }
    if !d["id"].is_null() {
        out.push("`id` must be null (Grafana assigns it on import)".into());
    }
    let vars: BTreeMap<String, &Value> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| (v["name"].as_str().unwrap_or_default().to_string(), v))
        .collect();
    match vars.get("datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => out.push("no `datasource` variable of type datasource (query prometheus)".into()),
    }
    for (name, v) in &vars {
        if v["type"] == "query" && v["datasource"]["uid"] != "${datasource}" {
            out.push(format!("variable {name} does not query ${{datasource}}"));
        }
    }
    let all = panels(d);
    if all.iter().all(|p| p["type"] == "row") {
        out.push("no panels".into());
    }
    let mut ids = BTreeSet::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or_default();
        let mut bad = |m: String| out.push(format!("panel {title:?}: {m}"));
        match p["id"].as_u64() {
            Some(id) if ids.insert(id) => {}
            other => bad(format!("id {other:?} missing or not unique")),
        }
        let g = &p["gridPos"];
        match (
            g["x"].as_u64(),
            g["y"].as_u64(),
            g["w"].as_u64(),
            g["h"].as_u64(),
        ) {
            (Some(x), Some(_), Some(w), Some(h)) if w >= 1 && x + w <= 24 && h >= 1 => {}
            _ => bad(format!("bad gridPos {g}")),
        }
        let kind = p["type"].as_str().unwrap_or_default();
        if kind.is_empty() {
            bad("no type".into());
        }
        if title.is_empty() {
            bad("no title".into());
        }
        if kind == "row" {
            // A row groups panels; it has no query of its own.
            if p["targets"].as_array().is_some_and(|t| !t.is_empty()) {
                bad("a row with targets".into());
            }
            continue;
        }
        if p["datasource"]["uid"] != "${datasource}" {
            bad(format!(
                "datasource {} is not ${{datasource}}",
                p["datasource"]
            ));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            bad("no targets".into());
        }
        let mut refs = BTreeSet::new();
        for t in &targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            if expr.trim().is_empty() {
                bad(format!("target without expr: {t}"));
            }
            if !refs.insert(t["refId"].as_str().unwrap_or_default().to_string()) {
                bad("refId missing or repeated".into());
            }
            if t["datasource"].is_object() && t["datasource"]["uid"] != "${datasource}" {
                bad(format!("target datasource {}", t["datasource"]));
            }
            for v in variables_used(expr) {
                if !vars.contains_key(&v) {
                    bad(format!("uses ${v}, which is not a dashboard variable"));
                }
            }
        }
    }
    out
}

#[test]
fn dashboards_are_valid_grafana_json() {
    let mut problems = Vec::new();
    let mut uids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for (path, d) in dashboards() {
        let f = path.file_name().unwrap().to_string_lossy().to_string();
        problems.extend(
            dashboard_problems(&d)
                .into_iter()
                .map(|p| format!("{f}: {p}")),
        );
        if !uids.insert(d["uid"].as_str().unwrap_or_default().to_string()) {
            problems.push(format!("{f}: uid {} used twice", d["uid"]));
        }
        if !titles.insert(d["title"].as_str().unwrap_or_default().to_string()) {
            problems.push(format!("{f}: title {} used twice", d["title"]));
        }
    }
    // The four dashboards the issue asks for.
    for uid in [
        "stockade-overview",
        "stockade-volume",
        "stockade-sled",
        "stockade-raft",
    ] {
        if !uids.contains(uid) {
            problems.push(format!("no dashboard with uid {uid}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The checker refuses what it must.
    let (_, good) = dashboards().swap_remove(0);
    assert!(dashboard_problems(&good).is_empty());
    let mut broken = good.clone();
    broken["schemaVersion"] = 16.into();
    assert!(!dashboard_problems(&broken).is_empty());
    let mut broken = good.clone();
    let p = broken["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["type"] != "row")
        .unwrap();
    p["targets"][0]["expr"] = "".into();
    assert!(!dashboard_problems(&broken).is_empty());
    let mut broken = good;
    let p = broken["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["type"] != "row")
        .unwrap();
    p["targets"][0]["expr"] = "up{instance=~\"$nope\"}".into();
    assert!(!dashboard_problems(&broken).is_empty());
}

#[test]
fn dashboard_queries_name_documented_metrics() {
    let docs = documented();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (path, d) in dashboards() {
        let f = path.file_name().unwrap().to_string_lossy().to_string();
        for (wher, expr) in queries(&d) {
            for p in check_expr(&expr, &docs) {
                problems.push(format!("{f} {wher}: {p}"));
            }
            used.extend(metric_refs(&expr).into_iter().map(|r| r.name));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The volume dashboard's latency waterfall covers the whole path: NBD, every Raft and sled
    // stage of the head node, the sled request and the device thread.
    let (_, vol) = dashboards()
        .into_iter()
        .find(|(_, d)| d["uid"] == "stockade-volume")
        .expect("volume dashboard");
    let exprs: Vec<String> = queries(&vol).into_iter().map(|(_, e)| e).collect();
    let joined = exprs.join("\n");
    let stage_doc = &std::fs::read_to_string(workspace().join("docs/metrics.md")).unwrap();
    for s in STAGES {
        assert!(
            stage_doc.contains(&format!("`{s}`")),
            "stage {s} is not documented"
        );
        assert!(
            joined.contains(&format!("stage=\"{s}\"")),
            "the waterfall has no {s} stage"
        );
    }
    for m in [
        "stockade_nbd_request_duration_seconds_bucket",
        "stockade_volume_stage_duration_seconds_bucket",
        "stockade_sled_request_duration_seconds_bucket",
        "stockade_sled_device_request_duration_seconds_bucket",
    ] {
        assert!(joined.contains(m), "the volume dashboard never queries {m}");
    }
    // Sanity of the checker itself: it refuses what it must.
    assert!(!check_expr("rate(stockade_no_such_metric[1m])", &docs).is_empty());
    assert!(!check_expr("stockade_raft_ready_entries", &docs).is_empty());
    assert!(!check_expr("stockade_raft_term_bucket", &docs).is_empty());
    assert!(!check_expr(r#"stockade_raft_term{stage="x"}"#, &docs).is_empty());
    assert!(
        check_expr(
            r#"sum by (le) (rate(stockade_raft_ready_entries_bucket{volume="a", le!=""}[1m]))"#,
            &docs
        )
        .is_empty()
    );
    assert!(
        used.len() > 60,
        "dashboards name only {} metrics",
        used.len()
    );
}

// ------------------------------------------------------------------------------------------
// Prometheus configuration and rules

fn prom_dir() -> PathBuf {
    workspace().join("deploy/prometheus")
}

/// The throttling rules, loaded by prometheus.yml next to alerts.yml and checked like it.
const THROTTLING_RULES: &str = "alerts-throttling.yml";

/// Runs promtool; returns its combined output, or panics with it when it fails.
fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package prometheus) runnable");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The `expr:` values of a rule file (block scalars included), crudely but without a YAML
/// parser: an expression on the line, or the more-indented lines after `expr: |`.
fn rule_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let Some(rest) = t.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if ["|", "|-", ">", ">-"].contains(&rest) {
            let indent = line.len() - t.len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join(" "));
        } else {
            out.push(rest.trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    out
}

/// Alert names of a rule file.
fn alert_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect()
}

#[test]
fn alert_rules_and_scrape_config_pass_promtool_and_name_documented_metrics() {
    let dir = prom_dir();
    promtool(&["check", "rules", "alerts.yml"], &dir);
    promtool(&["check", "rules", THROTTLING_RULES], &dir);
    let cfg = promtool(&["check", "config", "prometheus.yml"], &dir);
    assert!(cfg.contains("2 rule files found"), "{cfg}");
    // The unit tests show every alert firing on a broken cluster and quiet on a healthy one.
    promtool(&["test", "rules", "alerts_test.yml"], &dir);

    let docs = documented();
    let unit_tests = std::fs::read_to_string(dir.join("alerts_test.yml")).unwrap();
    let mut problems = Vec::new();
    let mut names = Vec::new();
    for file in ["alerts.yml", THROTTLING_RULES] {
        let rules = std::fs::read_to_string(dir.join(file)).unwrap();
        let exprs = rule_exprs(&rules);
        let file_names = alert_names(&rules);
        assert!(!exprs.is_empty(), "{file} has no rules");
        assert_eq!(
            exprs.len(),
            file_names.len(),
            "{file}: one expr per alert: {exprs:?}"
        );
        for e in &exprs {
            problems.extend(
                check_expr(e, &docs)
                    .into_iter()
                    .map(|p| format!("{file}: {p}")),
            );
            if metric_refs(e).is_empty() {
                problems.push(format!("{file}: `{e}` names no metric"));
            }
        }
        if !unit_tests.contains(&format!("  - {file}\n")) {
            problems.push(format!("alerts_test.yml does not load {file}"));
        }
        names.extend(file_names);
    }
    for n in &names {
        if !unit_tests.contains(&format!("alertname: {n}\n")) {
            problems.push(format!("alert {n} has no unit test in alerts_test.yml"));
        }
    }
    for required in [
        "StockadeLeaderFlapping",
        "StockadeFencedWrites",
        "StockadeChecksumErrors",
        "StockadeSledDown",
        "StockadeWriteBackLagging",
        "StockadeWalFsyncSlow",
        "StockadeThrottleGlobalSaturated",
        "StockadeVolumeThrottled",
    ] {
        if !names.iter().any(|n| n == required) {
            problems.push(format!("the alert rules have no {required}"));
        }
    }
    // Both rule files are loaded.
    let config = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    for file in ["alerts.yml", THROTTLING_RULES] {
        let loaded = config.lines().any(|l| {
            let t = l.trim();
            !t.starts_with('#') && t.trim_start_matches("- ").trim() == file
        });
        if !loaded {
            problems.push(format!("prometheus.yml does not load {file}"));
        }
    }
    for job in ["job_name: stockade-sled", "job_name: stockade-head"] {
        if !config.contains(job) {
            problems.push(format!("prometheus.yml has no `{job}`"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ------------------------------------------------------------------------------------------
// A real Prometheus server

/// Percent-encodes a query-string value.
fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// GETs a Prometheus API path and returns its `data`, or the error it reported.
fn prom_api(addr: SocketAddr, path: &str) -> Result<Value, String> {
    let (status, body) = http_get(addr, path).map_err(|e| format!("GET {path}: {e}"))?;
    let v: Value =
        serde_json::from_str(&body).map_err(|e| format!("GET {path}: {status} {e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("GET {path}: {status} {body}"));
    }
    Ok(v["data"].clone())
}

/// An instant query; the result vector as (labels, value).
fn prom_query(addr: SocketAddr, q: &str) -> Result<Vec<(Value, f64)>, String> {
    let data = prom_api(addr, &format!("/api/v1/query?query={}", urlencode(q)))?;
    Ok(data["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let v = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN);
            (r["metric"].clone(), v)
        })
        .collect())
}

/// `deploy/prometheus/prometheus.yml` with the real targets, 1 s scrape and evaluation
/// intervals. Panics if the file no longer has the shape this relies on (one `targets:` line
/// per job).
fn generated_config(sleds: &[SocketAddr], heads: &[SocketAddr]) -> String {
    let text = std::fs::read_to_string(prom_dir().join("prometheus.yml")).unwrap();
    let list = |a: &[SocketAddr]| {
        let t: Vec<String> = a.iter().map(|a| format!("\"{a}\"")).collect();
        format!("[{}]", t.join(", "))
    };
    let mut job = String::new();
    let mut replaced = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        let indent = &line[..line.len() - t.len()];
        if let Some(j) = t.strip_prefix("- job_name:") {
            job = j.trim().to_string();
        }
        let new = if let Some(k) = [
            "scrape_interval:",
            "evaluation_interval:",
            "scrape_timeout:",
        ]
        .iter()
        .find(|k| t.starts_with(**k))
        {
            format!("{indent}{k} 1s")
        } else if t.starts_with("- targets:") {
            *replaced.entry(job.clone()).or_insert(0) += 1;
            match job.as_str() {
                "stockade-sled" => format!("{indent}- targets: {}", list(sleds)),
                "stockade-head" => format!("{indent}- targets: {}", list(heads)),
                other => panic!("unexpected job {other} in prometheus.yml"),
            }
        } else {
            line.to_string()
        };
        out.push(new);
    }
    assert_eq!(
        replaced,
        BTreeMap::from([
            ("stockade-head".to_string(), 1),
            ("stockade-sled".to_string(), 1)
        ]),
        "prometheus.yml must have one static `- targets: [...]` line per job"
    );
    out.join("\n") + "\n"
}

/// Replaces the Grafana variables of a dashboard query with values for the test cluster.
fn substitute_variables(expr: &str) -> String {
    let mut e = expr.to_string();
    for (k, v) in [
        ("${__rate_interval}", "1m"),
        ("$__rate_interval", "1m"),
        ("$__interval", "1m"),
        ("$__range", "1m"),
        ("${volume}", "vol0"),
        ("$volume", "vol0"),
        ("${instance}", ".+"),
        ("$instance", ".+"),
        ("${device}", ".+"),
        ("$device", ".+"),
    ] {
        e = e.replace(k, v);
    }
    e
}

/// One value of a metric in an exposition (the first series whose line starts with `prefix`).
fn scraped(addr: SocketAddr, prefix: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").ok()?;
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// True once a head node holds no unflushed data of vol0 (its write-back is done).
fn written_back(admin: SocketAddr) -> bool {
    scraped(admin, r#"stockade_volume_unflushed_bytes{volume="vol0"}"#) == Some(0.0)
}

fn qemu_io(uri: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c.arg(uri).output().expect("qemu-io runnable");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("fail") && !text.contains("error"),
        "qemu-io {cmds:?} on {uri}:\n{text}"
    );
}

#[test]
fn prometheus_scrapes_a_running_cluster_with_the_shipped_config() {
    let mut c = Cluster::start("obs-prom", 3, "1GiB", "8MiB", &["vol0:64MiB"]);
    qemu_io(&c.head.uri("vol0"), &["write -P 1 0 1M", "read -P 1 0 1M"]);
    // A healthy, quiet cluster: nothing waits for write-back when Prometheus first looks.
    eventually(Duration::from_secs(60), "write-back done", || {
        written_back(c.head.ready.admin).then_some(())
    });

    let dir = scratch("obs-prometheus");
    let sleds: Vec<SocketAddr> = c.sleds.iter().map(|s| s.ready.metrics).collect();
    let heads = [c.head.ready.admin];
    std::fs::write(
        dir.path().join("prometheus.yml"),
        generated_config(&sleds, &heads),
    )
    .unwrap();
    for file in ["alerts.yml", THROTTLING_RULES] {
        std::fs::copy(prom_dir().join(file), dir.path().join(file)).unwrap();
    }
    promtool(&["check", "config", "prometheus.yml"], dir.path());

    let port = free_ports(1)[0];
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let args: Vec<String> = vec![
        format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ),
        format!("--storage.tsdb.path={}", dir.path().join("data").display()),
        format!("--web.listen-address={addr}"),
        "--storage.tsdb.retention.time=1h".into(),
    ];
    let mut prom = Proc::spawn(
        "prometheus",
        Path::new("/usr/bin/prometheus"),
        &args,
        dir.path(),
    );
    eventually(Duration::from_secs(60), "prometheus ready", || {
        assert!(
            prom.is_running(),
            "prometheus exited:\n{}",
            prom.log_tail(30)
        );
        http_get(addr, "/-/ready")
            .ok()
            .filter(|(s, _)| *s == 200)
            .map(|_| ())
    });

    // The scrape config and the job names: every target up under its job.
    let up_sleds = eventually(Duration::from_secs(60), "3 sleds up", || {
        prom_query(addr, r#"up{job="stockade-sled"}"#)
            .ok()
            .filter(|r| r.len() == 3 && r.iter().all(|(_, v)| *v == 1.0))
    });
    let mut instances: Vec<String> = up_sleds
        .iter()
        .map(|(m, _)| m["instance"].as_str().unwrap_or_default().to_string())
        .collect();
    instances.sort();
    let mut expected: Vec<String> = sleds.iter().map(ToString::to_string).collect();
    expected.sort();
    assert_eq!(instances, expected);
    eventually(Duration::from_secs(30), "head node up", || {
        prom_query(addr, r#"up{job="stockade-head"}"#)
            .ok()
            .filter(|r| r.len() == 1 && r[0].1 == 1.0)
    });

    // The names the dashboards and rules rely on, with values that show the I/O.
    let writes = eventually(Duration::from_secs(30), "vol0 writes scraped", || {
        prom_query(
            addr,
            r#"stockade_nbd_requests_total{job="stockade-head", volume="vol0", op="write"}"#,
        )
        .ok()
        .filter(|r| !r.is_empty() && r[0].1 >= 1.0)
    });
    assert_eq!(writes.len(), 1, "{writes:?}");
    let used = prom_query(
        addr,
        r#"stockade_sled_device_chunks_used{job="stockade-sled"}"#,
    )
    .unwrap();
    assert_eq!(used.len(), 3, "{used:?}");
    assert!(used.iter().all(|(_, v)| *v >= 1.0), "{used:?}");
    let term = prom_query(addr, r#"stockade_raft_term{volume="vol0"}"#).unwrap();
    assert!(term.len() == 1 && term[0].1 >= 1.0, "{term:?}");

    // Every dashboard query is valid PromQL to a real server (variables substituted).
    let mut problems = Vec::new();
    for (path, d) in dashboards() {
        for (wher, expr) in queries(&d) {
            if wher.starts_with("variable") {
                continue; // label_values() is Grafana's, not PromQL
            }
            let q = substitute_variables(&expr);
            assert!(!q.contains('$'), "unsubstituted variable in {q}");
            if let Err(e) = prom_query(addr, &q) {
                problems.push(format!("{} {wher}: {e}", path.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The rules load and evaluate without errors against the real series.
    let names: BTreeSet<String> = ["alerts.yml", THROTTLING_RULES]
        .iter()
        .flat_map(|f| alert_names(&std::fs::read_to_string(prom_dir().join(f)).unwrap()))
        .collect();
    eventually(Duration::from_secs(30), "every rule evaluated ok", || {
        let data = prom_api(addr, "/api/v1/rules").ok()?;
        let mut seen = BTreeSet::new();
        for g in data["groups"].as_array()? {
            for r in g["rules"].as_array()? {
                let h = r["health"].as_str()?;
                assert_ne!(h, "err", "rule {} failed: {}", r["name"], r["lastError"]);
                if h != "ok" {
                    return None;
                }
                seen.insert(r["name"].as_str()?.to_string());
            }
        }
        (seen == names).then_some(())
    });
    // Nothing fires on a healthy cluster. (Alerts with a `for` may be pending for a moment
    // while groups elect their first leaders; none can fire within this test.)
    let alerts = prom_api(addr, "/api/v1/alerts").unwrap();
    let firing: Vec<&Value> = alerts["alerts"]
        .as_array()
        .expect("alerts list")
        .iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert!(
        firing.is_empty(),
        "alerts firing on a healthy cluster: {firing:?}"
    );

    // A sled dies: StockadeSledDown goes pending for it, and only for it.
    let victim = c.sleds[2].ready.metrics.to_string();
    c.sleds[2].proc.kill9();
    let alerts = eventually(Duration::from_secs(30), "StockadeSledDown pending", || {
        let data = prom_api(addr, "/api/v1/alerts").ok()?;
        let a: Vec<Value> = data["alerts"]
            .as_array()?
            .iter()
            .filter(|a| a["labels"]["alertname"] == "StockadeSledDown")
            .cloned()
            .collect();
        (!a.is_empty()).then_some(a)
    });
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["labels"]["instance"], victim.as_str());
    assert_eq!(alerts[0]["labels"]["severity"], "critical");

    assert!(
        prom.stop(Duration::from_secs(20)),
        "prometheus did not stop cleanly:\n{}",
        prom.log_tail(20)
    );
}

// ------------------------------------------------------------------------------------------
// Coverage: every documented metric is exported

/// Families of an exposition: name → (type, label-name sets seen, values of label `stage`).
#[derive(Debug, Default)]
struct Family {
    kind: String,
    label_sets: BTreeSet<BTreeSet<String>>,
    stages: BTreeSet<String>,
}

fn families(exposition: &str) -> BTreeMap<String, Family> {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (n, k) = (it.next().unwrap_or_default(), it.next().unwrap_or_default());
            fams.entry(n.to_string()).or_default().kind = k.to_string();
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let series = &line[..end];
        let fam = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| series.strip_suffix(s))
            .filter(|b| fams.get(*b).is_some_and(|f| f.kind == "histogram"))
            .unwrap_or(series)
            .to_string();
        let mut labels = BTreeSet::new();
        let mut stage = None;
        if line[end..].starts_with('{') {
            let close = line.rfind('}').expect("closing brace");
            // Label values here never contain `,` or `"` (paths, ids, enum names).
            for pair in line[end + 1..close].split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').expect("label pair");
                if k == "stage" {
                    stage = Some(v.trim_matches('"').to_string());
                }
                if k != "le" {
                    labels.insert(k.to_string());
                }
            }
        }
        let f = fams.entry(fam).or_default();
        f.label_sets.insert(labels);
        f.stages.extend(stage);
    }
    fams
}

/// Documented metrics a head node may legitimately not export in this test, and why.
fn head_exceptions() -> HashMap<&'static str, &'static str> {
    HashMap::from([
        (
            "process_virtual_memory_max_bytes",
            "documented, but the prometheus crate's process collector (0.14) never exports it",
        ),
        (
            "stockade_nbd_request_errors_total",
            "labelled by errno: no series until a request fails",
        ),
        (
            "stockade_control_drain_steps_total",
            "labelled by kind: no series until a sled is drained",
        ),
        (
            "stockade_peer_dropped_messages_total",
            "labelled by reason: no series until a Raft message is dropped",
        ),
        (
            "stockade_peer_rpc_failures_total",
            "labelled by reason: no series until a forwarded call fails",
        ),
        (
            "stockade_peer_handshake_failures_total",
            "labelled by reason: only when a handshake fails (e.g. a peer not yet listening)",
        ),
        (
            "stockade_peer_protocol_errors_total",
            "labelled by reason: no series until a peer connection breaks the protocol",
        ),
        (
            "stockade_events_scrapes_total",
            "labelled by result: no series until the events engine's first round (every 5 s by default)",
        ),
        (
            "stockade_throttle_work_tokens",
            "only for volumes with a baseline (--iops); this cluster's volumes are unlimited (tests/tests/throttle.rs covers it)",
        ),
        (
            "stockade_throttle_global_level",
            "only on a head node with a capacity (capacity-iops); this cluster's are unlimited (tests/tests/throttle.rs covers it)",
        ),
        (
            "stockade_events_webhook_deliveries_total",
            "labelled by result: only with a webhook configured ([events] webhook)",
        ),
    ])
}

/// Documented metrics a sled may legitimately not export in this test, and why.
fn attach_local_exceptions() -> HashMap<&'static str, &'static str> {
    HashMap::from([
        (
            "process_virtual_memory_max_bytes",
            "documented, but the prometheus crate's process collector (0.14) never exports it",
        ),
        (
            "stockade_nbd_request_errors_total",
            "labelled by errno: no series until a request fails",
        ),
        (
            "stockade_attach_reconnects_total",
            "labelled by reason: no series until a head-node connection is abandoned",
        ),
        (
            "stockade_attach_retried_requests_total",
            "labelled by op: no series until a request is retried",
        ),
        (
            "stockade_attach_failed_requests_total",
            "labelled by op and reason: no series until a request fails",
        ),
    ])
}

fn sled_exceptions() -> HashMap<&'static str, &'static str> {
    HashMap::from([
        (
            "process_virtual_memory_max_bytes",
            "documented, but the prometheus crate's process collector (0.14) never exports it",
        ),
        (
            "stockade_sled_protocol_errors_total",
            "labelled by reason: no series until a frame is refused",
        ),
        (
            "stockade_sled_device_request_errors_total",
            "no series until a device request fails",
        ),
    ])
}

/// Problems of the families of one process type against the docs: documented metrics missing
/// (beyond the exceptions), wrong type, label names other than documented.
fn coverage_problems(
    who: &str,
    t: ProcessType,
    fams: &BTreeMap<String, Family>,
    docs: &BTreeMap<String, DocMetric>,
    exceptions: &HashMap<&str, &str>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for name in exceptions.keys() {
        match docs.get(*name) {
            Some(d) if exported_by(d, t) => {}
            _ => problems.push(format!(
                "{who}: exception {name} is not a documented metric of this process type"
            )),
        }
    }
    for (name, d) in docs.iter().filter(|(_, d)| exported_by(d, t)) {
        let Some(f) = fams.get(name).filter(|f| !f.label_sets.is_empty()) else {
            if !exceptions.contains_key(name.as_str()) {
                problems.push(format!("{who}: documented metric {name} is not exported"));
            }
            continue;
        };
        if f.kind != d.kind {
            problems.push(format!(
                "{who}: {name} is exported as a {}, documented as a {}",
                f.kind, d.kind
            ));
        }
        for ls in &f.label_sets {
            if *ls != d.labels {
                problems.push(format!(
                    "{who}: {name} is exported with labels {ls:?}, documented {:?}",
                    d.labels
                ));
            }
        }
    }
    problems
}

#[test]
fn every_documented_metric_is_exported_with_its_labels() {
    let c = Cluster3::start("obs-coverage", 3, "1GiB", "8MiB", &["vol0:64MiB"], &[]);
    // I/O through every head node: followers forward to the leader (peer calls), the leader
    // commits (raft_commit), writes back (sled_write), zeroes (sled_zero) and reads (read_index).
    for (i, h) in c.heads.iter().enumerate() {
        let off = format!("{}M", i * 2);
        qemu_io(
            &h.uri("vol0"),
            &[
                &format!("write -P 1 {off} 1M"),
                &format!("read -P 1 {off} 1M"),
            ],
        );
    }
    qemu_io(
        &c.heads[0].uri("vol0"),
        &["write -z 8M 1M", "discard 16M 1M"],
    );
    // Once written back and dropped from the overlay, reads reach the sleds (sled_read).
    eventually(Duration::from_secs(60), "write-back done", || {
        c.heads
            .iter()
            .all(|h| written_back(h.ready.admin))
            .then_some(())
    });
    for h in &c.heads {
        qemu_io(&h.uri("vol0"), &["read -P 1 0 1M"]);
    }

    let docs = documented();
    let mut problems = Vec::new();
    for (name, d) in &docs {
        if ![
            ProcessType::Sled,
            ProcessType::Head,
            ProcessType::AttachLocal,
        ]
        .iter()
        .any(|t| exported_by(d, *t))
        {
            problems.push(format!(
                "{name}: section {:?} of docs/metrics.md maps to no process type (see exported_by)",
                d.section
            ));
        }
    }

    // Head nodes: some families depend on the role (forwarded calls on followers, stages on
    // the leader), so the three together must export every head-node metric.
    let mut head_fams: BTreeMap<String, Family> = BTreeMap::new();
    for h in &c.heads {
        let (status, body) = http_get(h.ready.admin, "/metrics").unwrap();
        assert_eq!(status, 200);
        problems.extend(
            check_metrics(&body)
                .into_iter()
                .map(|p| format!("head {}: {p}", h.ready.node_id)),
        );
        for (n, f) in families(&body) {
            let e = head_fams.entry(n).or_default();
            e.kind = f.kind;
            e.label_sets.extend(f.label_sets);
            e.stages.extend(f.stages);
        }
    }
    problems.extend(coverage_problems(
        "head nodes",
        ProcessType::Head,
        &head_fams,
        &docs,
        &head_exceptions(),
    ));
    let stages = head_fams
        .get("stockade_volume_stage_duration_seconds")
        .map(|f| f.stages.clone())
        .unwrap_or_default();
    let want: BTreeSet<String> = STAGES.iter().map(|s| s.to_string()).collect();
    if stages != want {
        problems.push(format!(
            "stockade_volume_stage_duration_seconds stages {stages:?}, documented {want:?}"
        ));
    }

    // The `attach --local` endpoint, the real CLI command, after I/O through it.
    let ports = free_ports(2);
    let metrics: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse().unwrap();
    let ready_file = c.dir.path().join("attach-local.ready.json");
    let admin = tests::admin::Admin::of(&c).global_args();
    let created = Command::new(tests::bin("stockade"))
        .args(&admin)
        .args(["volume", "create", "local0", "--size", "64MiB"])
        .output()
        .expect("stockade runs");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let args: Vec<String> = [
        &admin[..],
        &[
            "volume".to_string(),
            "attach".to_string(),
            "local0".to_string(),
        ],
    ]
    .concat()
    .into_iter()
    .chain(
        [
            "--local",
            "--listen",
            &format!("127.0.0.1:{}", ports[0]),
            "--metrics-listen",
            &metrics.to_string(),
            "--ready-file",
            &ready_file.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string()),
    )
    .collect();
    let mut local = Proc::spawn("attach-local", &tests::bin("stockade"), &args, c.dir.path());
    local.ready_file = ready_file;
    let ready: Value = local.wait_ready(Duration::from_secs(60));
    let uri = ready["uri"]
        .as_str()
        .expect("uri in the ready file")
        .to_string();
    qemu_io(&uri, &["write -P 2 0 1M", "read -P 2 0 1M", "flush"]);
    // The server counts the connection closed once it has seen qemu-io go, which may be a
    // moment after qemu-io exits (a busy machine showed the gap).
    let body = eventually(
        Duration::from_secs(30),
        "attach --local counts qemu-io's connection closed",
        || {
            let (status, body) = http_get(metrics, "/metrics").ok()?;
            (status == 200 && body.contains("stockade_nbd_connections_closed_total{"))
                .then_some(body)
        },
    );
    problems.extend(
        check_metrics(&body)
            .into_iter()
            .map(|p| format!("attach --local: {p}")),
    );
    problems.extend(coverage_problems(
        "attach --local",
        ProcessType::AttachLocal,
        &families(&body),
        &docs,
        &attach_local_exceptions(),
    ));
    assert!(
        local.stop(Duration::from_secs(30)),
        "attach --local did not stop"
    );

    // A sled on its own.
    let (status, body) = http_get(c.sleds[0].ready.metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    problems.extend(
        check_metrics(&body)
            .into_iter()
            .map(|p| format!("sled1: {p}")),
    );
    problems.extend(coverage_problems(
        "sled1",
        ProcessType::Sled,
        &families(&body),
        &docs,
        &sled_exceptions(),
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn coverage_check_refuses_missing_and_mislabelled_metrics() {
    let docs = documented();
    let sled_names: Vec<&String> = docs
        .iter()
        .filter(|(_, d)| exported_by(d, ProcessType::Sled))
        .map(|(n, _)| n)
        .collect();
    // A synthetic exposition with every sled metric as documented passes …
    let mut text = String::new();
    for n in &sled_names {
        let d = &docs[*n];
        let labels: Vec<String> = d.labels.iter().map(|l| format!("{l}=\"x\"")).collect();
        let sel = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.join(","))
        };
        text.push_str(&format!("# TYPE {n} {}\n", d.kind));
        if d.kind == "histogram" {
            let with_le = [labels.clone(), vec!["le=\"+Inf\"".into()]].concat();
            text.push_str(&format!("{n}_bucket{{{}}} 1\n", with_le.join(",")));
            text.push_str(&format!("{n}_sum{sel} 1\n{n}_count{sel} 1\n"));
        } else {
            text.push_str(&format!("{n}{sel} 1\n"));
        }
    }
    let none = HashMap::new();
    let ok = coverage_problems(
        "synthetic",
        ProcessType::Sled,
        &families(&text),
        &docs,
        &none,
    );
    assert!(ok.is_empty(), "{ok:?}");
    // … and fails when a metric is missing, has other labels, or another type.
    let missing = text.replace(
        "stockade_sled_checksum_errors_total{",
        "stockade_sled_checksum_errorz_total{",
    );
    let p = coverage_problems("m", ProcessType::Sled, &families(&missing), &docs, &none);
    assert!(
        p.iter()
            .any(|p| p.contains("checksum_errors_total is not exported")),
        "{p:?}"
    );
    let relabelled = text.replace(
        "stockade_sled_fenced_writes_total{device=\"x\"}",
        "stockade_sled_fenced_writes_total{device=\"x\",volume=\"v\"}",
    );
    let p = coverage_problems("l", ProcessType::Sled, &families(&relabelled), &docs, &none);
    assert!(
        p.iter()
            .any(|p| p.contains("fenced_writes_total is exported with labels")),
        "{p:?}"
    );
    let retyped = text.replace(
        "# TYPE stockade_sled_connections gauge",
        "# TYPE stockade_sled_connections counter",
    );
    let p = coverage_problems("t", ProcessType::Sled, &families(&retyped), &docs, &none);
    assert!(
        p.iter().any(|p| p.contains("documented as a gauge")),
        "{p:?}"
    );
    // An exception that is not a documented metric of the process type is refused.
    let stale = HashMap::from([("stockade_raft_term", "not a sled metric")]);
    let p = coverage_problems("e", ProcessType::Sled, &families(&text), &docs, &stale);
    assert!(
        p.iter().any(|p| p.contains("exception stockade_raft_term")),
        "{p:?}"
    );
}
