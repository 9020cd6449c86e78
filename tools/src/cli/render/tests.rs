use super::*;
use common::admin::{CapacityInfo, DeviceInfo, PoolInfo};

fn vol(name: &str, size: u64) -> VolumeInfo {
    VolumeInfo {
        name: name.to_string(),
        id: "00000000000000a1".to_string(),
        size,
        state: "ready".to_string(),
        qos: QosConfig::UNLIMITED,
        chunk_size: 64 << 20,
        replicas: 3,
        chunks: size.div_ceil(64 << 20),
        group: "00000000000000b2".to_string(),
        members: vec![1, 2, 3],
        target_members: vec![1, 2, 3],
        leader: Some(2),
        attachments: vec![],
        uri: None,
        endpoints: vec!["127.0.0.1:10809".parse().unwrap()],
        created: 1_700_000_000,
    }
}

#[test]
fn tables_align_columns_without_trailing_spaces() {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("SIZE", Align::Right),
        ("X", Align::Left),
    ]);
    t.row(vec!["a".into(), "1GiB".into(), "".into()]);
    t.row(vec!["longer-name".into(), "512MiB".into(), "é".into()]);
    t.row(vec!["short".into()]);
    assert_eq!(
        t.to_string(),
        "NAME           SIZE  X\n\
         a              1GiB\n\
         longer-name  512MiB  é\n\
         short\n"
    );
}

#[test]
fn blocks_align_values_and_continue_lines() {
    let mut b = Block::new();
    b.add("a", 1).add("longer", "x\ny").add("empty", "");
    assert_eq!(
        b.to_string(),
        "a:       1\nlonger:  x\n         y\nempty:   \n"
    );
}

#[test]
fn units_and_times() {
    assert_eq!(size(1 << 30), "1GiB");
    assert_eq!(size(512 << 20), "512MiB");
    assert_eq!(size(1536 << 20), "1.5GiB");
    assert_eq!(rate(100 << 20), "100MiB/s");
    assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(utc(4_102_444_799), "2099-12-31 23:59:59 UTC");
    // Any value prints (no panic far in the future).
    assert!(utc(u64::MAX).ends_with(" UTC"));
}

#[test]
fn qos_reads_as_one_line() {
    assert_eq!(qos(&QosConfig::UNLIMITED), "unlimited");
    let q = QosConfig {
        iops: Some(3000),
        burst_iops: Some(6000),
        burst_credits: 5_400_000,
        bandwidth: Some(128 << 20),
    };
    assert_eq!(
        qos(&q),
        "iops 3000 (burst 6000, 5400000 credits), bandwidth 128MiB/s"
    );
    let q = QosConfig {
        bandwidth: Some(1 << 20),
        ..QosConfig::UNLIMITED
    };
    assert_eq!(qos(&q), "iops unlimited, bandwidth 1MiB/s");
}

#[test]
fn volume_list_and_show() {
    let mut b = vol("b-longer", 512 << 20);
    b.qos.iops = Some(300);
    b.qos.bandwidth = Some(64 << 20);
    b.attachments = vec![Attachment {
        id: 4,
        shared: false,
        client: Some("host-a".to_string()),
        since: 1_700_000_000,
    }];
    b.uri = Some("nbd://127.0.0.1:10809/b-longer".to_string());
    b.leader = None;
    let text = volumes_table(&[vol("a", 1 << 30), b.clone()]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "NAME        SIZE  STATE  IOPS       BANDWIDTH  ATTACHED  LEADER  URI",
            "a           1GiB  ready  unlimited  unlimited  -              2  -",
            "b-longer  512MiB  ready  300        64MiB/s    yes            -  nbd://127.0.0.1:10809/b-longer",
        ]
    );
    assert!(volumes_table(&[]).starts_with("no volumes"));

    b.target_members = vec![1, 2, 3, 4];
    let text = volume_block(&b);
    for want in [
        "name:         b-longer\n",
        "size:         512MiB (536870912 bytes)\n",
        "qos:          iops 300, bandwidth 64MiB/s\n",
        "chunks:       8 × 64MiB, 3 replicas\n",
        "members:      1, 2, 3 (growing to 1, 2, 3, 4)\n",
        "leader:       -\n",
        "attachments:  #4 exclusive by \"host-a\" since 2023-11-14 22:13:20 UTC\n",
        "uri:          nbd://127.0.0.1:10809/b-longer\n",
        "endpoints:    127.0.0.1:10809\n",
        "created:      2023-11-14 22:13:20 UTC\n",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
    let c = created(&Created {
        volume: vol("a", 1 << 30),
        from_pool: true,
        latency_ms: 42,
    });
    assert!(
        c.starts_with("created volume a in 42 ms (group from the pool of ready groups)\nname:"),
        "{c}"
    );
}

fn node(id: u64, state: &str) -> NodeInfo {
    NodeInfo {
        id,
        nbd: format!("127.0.0.1:1080{id}").parse().unwrap(),
        admin: format!("127.0.0.1:918{id}").parse().unwrap(),
        peer: format!("127.0.0.1:970{id}").parse().unwrap(),
        domain: None,
        state: state.to_string(),
        last_seen_secs: Some(1),
        groups: 4,
        baseline_iops: 3000,
        capacity_iops: None,
        meta_leader: id == 1,
    }
}

fn sled(id: &str) -> SledInfo {
    SledInfo {
        id: id.to_string(),
        addr: "127.0.0.1:7001".parse().unwrap(),
        domain: Some("rack-1".to_string()),
        state: "up".to_string(),
        devices: vec![
            DeviceInfo {
                id: "d1".to_string(),
                capacity: 10 << 30,
                chunk_size: 64 << 20,
                allocated_chunks: 16,
            },
            DeviceInfo {
                id: "d2".to_string(),
                capacity: 10 << 30,
                chunk_size: 64 << 20,
                allocated_chunks: 0,
            },
        ],
        provisioned: 3 << 30,
        draining: false,
    }
}

#[test]
fn node_and_sled_tables() {
    let text = nodes_table(&[node(1, "up"), node(2, "down")]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines[0].starts_with("ID  STATE  ROLE         NBD"),
        "{text}"
    );
    assert!(
        lines[1].starts_with(" 1  up     meta leader  127.0.0.1:10801"),
        "{text}"
    );
    assert!(
        lines[2].starts_with(" 2  down   -            127.0.0.1:10802"),
        "{text}"
    );
    assert!(
        lines[1].ends_with("3000      unlimited     1s ago"),
        "{text}"
    );

    let text = sleds_table(&[sled("00ab")]);
    assert_eq!(
        text,
        "ID    ADDR            DOMAIN  STATE  DEVICES  CAPACITY  ALLOCATED  PROVISIONED\n\
         00ab  127.0.0.1:7001  rack-1  up           2     20GiB       1GiB         3GiB\n"
    );
    let mut draining = sled("00cd");
    draining.draining = true;
    draining.state = "down".to_string();
    let text = sleds_table(&[draining]);
    assert!(
        text.lines().nth(1).unwrap().contains("  down, draining  "),
        "{text}"
    );
    assert_eq!(nodes_table(&[]), "no head nodes\n");
}

#[test]
fn cluster_status_block() {
    let c = ClusterStatus {
        health: "degraded".to_string(),
        problems: vec![
            "node 2 is down".to_string(),
            "volume a is growing".to_string(),
        ],
        meta_leader: Some(1),
        meta_term: 7,
        answered_by: 3,
        nodes: vec![node(1, "up"), node(2, "down")],
        sleds: vec![sled("00ab")],
        volumes: 2,
        attached: 1,
        capacity: CapacityInfo {
            total: 20 << 30,
            provisioned: 5 << 30,
            allocated: 1 << 30,
            overcommit_ratio: 1.5,
        },
        pool: PoolInfo {
            target: 2,
            ready: 1,
            pending: 1,
        },
        key_version: 1,
        replicas: 3,
        group_size: 3,
    };
    let text = cluster_block(&c);
    for want in [
        "health:       degraded\n",
        "problems:     node 2 is down\n              volume a is growing\n",
        "meta leader:  node 1 (term 7)\n",
        "answered by:  node 3\n",
        "nodes:        2 (1 up)\n",
        "volumes:      2 (1 attached)\n",
        "capacity:     20GiB total\n              5GiB provisioned (25.0%) (may reach 1.5 × total)\n              1GiB allocated (5.0%)\n",
        "group pool:   1 of 2 ready (1 pending)\n",
        "new volumes:  3 replicas per chunk, groups of 3 head nodes\n",
    ] {
        assert!(text.contains(want), "{want:?} in\n{text}");
    }
}
