//! Text output for people: aligned tables for lists, `key: value` blocks for one thing.
//! Sizes print with binary units (`1GiB`, `512MiB`), times in UTC.

use common::admin::{Attachment, ClusterStatus, Created, NodeInfo, SledInfo, VolumeInfo};
use common::throttle::QosConfig;
use common::units::ByteSize;
use std::fmt::{self, Write as _};

/// Alignment of a table column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// A table: a header row, then one row per item; columns two spaces apart, no trailing spaces.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub fn new(headers: &[(&'static str, Align)]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are empty, extra cells are dropped).
    pub fn row(&mut self, mut cells: Vec<String>) {
        cells.resize(self.headers.len(), String::new());
        self.rows.push(cells);
    }
}

fn width(s: &str) -> usize {
    s.chars().count()
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let widths: Vec<usize> = self
            .headers
            .iter()
            .enumerate()
            .map(|(i, (h, _))| {
                self.rows
                    .iter()
                    .map(|r| width(&r[i]))
                    .chain([width(h)])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| h.to_string()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = " ".repeat(widths[i] - width(cell));
                match self.headers[i].1 {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(cell);
                    }
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// `key: value` lines with the values aligned; a value with several lines continues under
/// the first.
#[derive(Debug, Clone, Default)]
pub struct Block {
    rows: Vec<(&'static str, String)>,
}

impl Block {
    /// An empty block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a line.
    pub fn add(&mut self, key: &'static str, value: impl fmt::Display) -> &mut Self {
        self.rows.push((key, value.to_string()));
        self
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The longest key, its colon and two spaces.
        let w = self.rows.iter().map(|(k, _)| width(k)).max().unwrap_or(0) + 3;
        for (k, v) in &self.rows {
            let mut lines = v.lines();
            let first = lines.next().unwrap_or_default();
            writeln!(f, "{:w$}{first}", format!("{k}:"))?;
            for l in lines {
                writeln!(f, "{:w$}{l}", "")?;
            }
        }
        Ok(())
    }
}

/// A size with binary units: `1GiB`, `1.5GiB`, `100B`.
pub fn size(bytes: u64) -> String {
    ByteSize(bytes).to_string()
}

/// A bandwidth: `128MiB/s`.
pub fn rate(bytes_per_s: u64) -> String {
    format!("{}/s", size(bytes_per_s))
}

/// A time in seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(secs: u64) -> String {
    // Days to civil date (Howard Hinnant's algorithm), valid for any u64 of seconds.
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "-".to_string();
    }
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn or_dash<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The IOPS part of a QoS: `3000 iops (burst 6000, 5400000 credits)`, `unlimited`.
fn qos_iops(q: &QosConfig) -> String {
    let Some(iops) = q.iops else {
        return "unlimited".to_string();
    };
    let mut s = format!("{iops}");
    match (q.burst_iops, q.burst_credits) {
        (_, 0) => {}
        (Some(b), c) => s.push_str(&format!(" (burst {b}, {c} credits)")),
        (None, c) => s.push_str(&format!(" (burst {c} credits)")),
    }
    s
}

/// A QoS in one line: `iops 3000 (burst 6000, 5400000 credits), bandwidth 128MiB/s`.
pub fn qos(q: &QosConfig) -> String {
    if q.iops.is_none() && q.bandwidth.is_none() {
        return "unlimited".to_string();
    }
    format!(
        "iops {}, bandwidth {}",
        qos_iops(q),
        q.bandwidth.map_or_else(|| "unlimited".to_string(), rate)
    )
}

fn attachment(a: &Attachment) -> String {
    let mut s = format!(
        "#{} {}",
        a.id,
        if a.shared { "shared" } else { "exclusive" }
    );
    if let Some(c) = &a.client {
        s.push_str(&format!(" by {c:?}"));
    }
    s.push_str(&format!(" since {}", utc(a.since)));
    s
}

fn attached_cell(v: &VolumeInfo) -> String {
    match v.attachments.as_slice() {
        [] => "-".to_string(),
        [a] if !a.shared => "yes".to_string(),
        all => format!("{} shared", all.len()),
    }
}

/// `volume list`.
pub fn volumes_table(vols: &[VolumeInfo]) -> String {
    if vols.is_empty() {
        return "no volumes (create one with `stockade volume create NAME --size 10G`)\n"
            .to_string();
    }
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("SIZE", Align::Right),
        ("STATE", Align::Left),
        ("IOPS", Align::Left),
        ("BANDWIDTH", Align::Left),
        ("ATTACHED", Align::Left),
        ("LEADER", Align::Right),
        ("URI", Align::Left),
    ]);
    for v in vols {
        t.row(vec![
            v.name.clone(),
            size(v.size),
            v.state.clone(),
            qos_iops(&v.qos),
            v.qos
                .bandwidth
                .map_or_else(|| "unlimited".to_string(), rate),
            attached_cell(v),
            or_dash(v.leader),
            v.uri.clone().unwrap_or_else(|| "-".to_string()),
        ]);
    }
    t.to_string()
}

/// `volume show`.
pub fn volume_block(v: &VolumeInfo) -> String {
    let mut b = Block::new();
    b.add("name", &v.name)
        .add("id", &v.id)
        .add("state", &v.state)
        .add("size", format!("{} ({} bytes)", size(v.size), v.size))
        .add("qos", qos(&v.qos))
        .add(
            "chunks",
            format!(
                "{} × {}, {} replicas",
                v.chunks,
                size(v.chunk_size),
                v.replicas
            ),
        )
        .add("group", &v.group);
    let mut members = join(&v.members);
    if v.target_members != v.members {
        members.push_str(&format!(" (growing to {})", join(&v.target_members)));
    }
    b.add("members", members)
        .add("leader", or_dash(v.leader.map(|l| format!("node {l}"))));
    let atts: Vec<String> = v.attachments.iter().map(attachment).collect();
    b.add(
        "attachments",
        if atts.is_empty() {
            "none".to_string()
        } else {
            atts.join("\n")
        },
    )
    .add("uri", v.uri.as_deref().unwrap_or("- (not attached)"))
    .add("endpoints", join(&v.endpoints))
    .add("created", utc(v.created));
    b.to_string()
}

/// `volume create`.
pub fn created(c: &Created) -> String {
    format!(
        "created volume {} in {} ms ({})\n{}",
        c.volume.name,
        c.latency_ms,
        if c.from_pool {
            "group from the pool of ready groups"
        } else {
            "new group"
        },
        volume_block(&c.volume)
    )
}

/// `node list`.
pub fn nodes_table(nodes: &[NodeInfo]) -> String {
    if nodes.is_empty() {
        return "no head nodes\n".to_string();
    }
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("STATE", Align::Left),
        ("ROLE", Align::Left),
        ("NBD", Align::Left),
        ("ADMIN", Align::Left),
        ("PEER", Align::Left),
        ("DOMAIN", Align::Left),
        ("GROUPS", Align::Right),
        ("BASELINE IOPS", Align::Right),
        ("CAPACITY IOPS", Align::Right),
        ("LAST SEEN", Align::Right),
    ]);
    for n in nodes {
        t.row(vec![
            n.id.to_string(),
            n.state.clone(),
            if n.meta_leader { "meta leader" } else { "-" }.to_string(),
            n.nbd.to_string(),
            n.admin.to_string(),
            n.peer.to_string(),
            or_dash(n.domain.as_deref()),
            n.groups.to_string(),
            n.baseline_iops.to_string(),
            n.capacity_iops
                .map_or_else(|| "unlimited".to_string(), |c| c.to_string()),
            or_dash(n.last_seen_secs.map(|s| format!("{s}s ago"))),
        ]);
    }
    t.to_string()
}

fn sled_capacity(s: &SledInfo) -> u64 {
    s.devices
        .iter()
        .fold(0u64, |a, d| a.saturating_add(d.capacity))
}

fn sled_allocated(s: &SledInfo) -> u64 {
    s.devices.iter().fold(0u64, |a, d| {
        a.saturating_add(d.allocated_chunks.saturating_mul(d.chunk_size))
    })
}

/// `sled list`.
pub fn sleds_table(sleds: &[SledInfo]) -> String {
    if sleds.is_empty() {
        return "no sleds\n".to_string();
    }
    let mut t = Table::new(&[
        ("ID", Align::Left),
        ("ADDR", Align::Left),
        ("DOMAIN", Align::Left),
        ("STATE", Align::Left),
        ("DEVICES", Align::Right),
        ("CAPACITY", Align::Right),
        ("ALLOCATED", Align::Right),
        ("PROVISIONED", Align::Right),
    ]);
    for s in sleds {
        t.row(vec![
            s.id.clone(),
            s.addr.to_string(),
            or_dash(s.domain.as_deref()),
            if s.draining {
                format!("{}, draining", s.state)
            } else {
                s.state.clone()
            },
            s.devices.len().to_string(),
            size(sled_capacity(s)),
            size(sled_allocated(s)),
            size(s.provisioned),
        ]);
    }
    t.to_string()
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return String::new();
    }
    format!(" ({:.1}%)", part as f64 * 100.0 / whole as f64)
}

/// `cluster status`.
pub fn cluster_block(c: &ClusterStatus) -> String {
    let up = |s: &str| s == "up";
    let nodes_up = c.nodes.iter().filter(|n| up(&n.state)).count();
    let sleds_up = c.sleds.iter().filter(|s| up(&s.state)).count();
    let cap = &c.capacity;
    let mut b = Block::new();
    b.add("health", &c.health).add(
        "problems",
        if c.problems.is_empty() {
            "none".to_string()
        } else {
            c.problems.join("\n")
        },
    );
    b.add(
        "meta leader",
        match c.meta_leader {
            Some(l) => format!("node {l} (term {})", c.meta_term),
            None => format!("none (term {})", c.meta_term),
        },
    )
    .add("answered by", format!("node {}", c.answered_by))
    .add("nodes", format!("{} ({nodes_up} up)", c.nodes.len()))
    .add("sleds", format!("{} ({sleds_up} up)", c.sleds.len()))
    .add(
        "volumes",
        format!("{} ({} attached)", c.volumes, c.attached),
    );
    let mut capacity = String::new();
    let _ = write!(
        capacity,
        "{} total\n{} provisioned{} (may reach {} × total)\n{} allocated{}",
        size(cap.total),
        size(cap.provisioned),
        percent(cap.provisioned, cap.total),
        cap.overcommit_ratio,
        size(cap.allocated),
        percent(cap.allocated, cap.total),
    );
    b.add("capacity", capacity)
        .add(
            "group pool",
            format!(
                "{} of {} ready ({} pending)",
                c.pool.ready, c.pool.target, c.pool.pending
            ),
        )
        .add(
            "new volumes",
            format!(
                "{} replicas per chunk, groups of {} head nodes",
                c.replicas, c.group_size
            ),
        )
        .add("key version", c.key_version);
    b.to_string()
}

#[cfg(test)]
mod tests;
