//! Where a new volume goes: the head nodes of its Raft group and the sleds of each chunk.
//!
//! Both choices spread load (fewest groups per node, lowest fill per sled) and use distinct
//! failure domains where the cluster has them, then distinct nodes or sleds. Capacity is
//! checked first: provisioned bytes may not exceed the sleds' capacity times the overcommit
//! ratio, and every head node of the group must have room for the volume's baseline IOPS
//! (so whichever of them leads can always give it).

use super::state::ClusterState;
use common::ids::SledId;
use common::units::ByteSize;
use std::collections::{BTreeMap, BTreeSet};

/// Why a volume cannot be placed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlaceError {
    /// No sled is registered (or none is up).
    #[error(
        "no sled is available to hold the volume; start a sled controller and list it in the head nodes' configuration"
    )]
    NoSleds,
    /// No head node can take the group.
    #[error("no head node is available for the volume's group")]
    NoHeads,
    /// The heads lack throttling capacity for the baseline.
    #[error(
        "no head node has {iops} IOPS of unreserved capacity for the volume's baseline (the sum of the baselines a node serves may not exceed its capacity); lower --iops or add head nodes"
    )]
    NodeCapacity {
        /// The baseline asked for.
        iops: u64,
    },
    /// Every head node that could serve it has a capacity, and the volume has no baseline.
    #[error(
        "the volume has no IOPS baseline, and every head node that could serve it has a capacity-iops: a volume there needs --iops (or set the cluster's default QoS) so that every volume can always get its baseline"
    )]
    UnlimitedOnCapped,
    /// Provisioning would exceed capacity × overcommit.
    #[error(
        "the volume needs {} of sled space ({replicas} replicas) but only {} of the {} provisionable are left (sled capacity {} × overcommit ratio {ratio}); add sleds, delete volumes or raise control.overcommit-ratio",
        ByteSize(*need), ByteSize(*free), ByteSize(*limit), ByteSize(*capacity)
    )]
    Overcommit {
        /// Bytes needed (size × replicas, whole chunks).
        need: u64,
        /// Bytes left.
        free: u64,
        /// Provisionable bytes.
        limit: u64,
        /// Raw capacity.
        capacity: u64,
        /// Ratio.
        ratio: f64,
        /// Replicas.
        replicas: usize,
    },
}

/// A sled as placement sees it.
#[derive(Debug, Clone)]
pub struct SledSlot {
    /// Id.
    pub id: SledId,
    /// Failure domain.
    pub domain: Option<String>,
    /// Capacity in chunks.
    pub chunks: u64,
    /// Chunk replicas already placed on it.
    pub load: u64,
}

/// Chunk placement of `count` new chunks, `replicas` each (at most the number of sleds).
/// `salt` rotates tie-breaks so volumes do not all start on the same sled.
pub fn place_chunks(
    sleds: &mut [SledSlot],
    count: u64,
    replicas: usize,
    salt: u64,
) -> Result<Vec<Vec<SledId>>, PlaceError> {
    if sleds.is_empty() || replicas == 0 {
        return Err(PlaceError::NoSleds);
    }
    let replicas = replicas.min(sleds.len());
    let n = sleds.len();
    let mut out = Vec::with_capacity(count as usize);
    let mut order: Vec<usize> = (0..n).collect();
    for i in 0..count {
        // Least filled first (load relative to capacity), rotating among equals.
        order.sort_by(|&a, &b| {
            let fa = fill(&sleds[a]);
            let fb = fill(&sleds[b]);
            fa.partial_cmp(&fb)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| rot(a, i, salt, n).cmp(&rot(b, i, salt, n)))
        });
        let mut chosen: Vec<usize> = Vec::with_capacity(replicas);
        let mut domains = BTreeSet::new();
        // First pass: distinct domains; second: any remaining sled.
        for pass in 0..2 {
            for &s in &order {
                if chosen.len() == replicas {
                    break;
                }
                if chosen.contains(&s) {
                    continue;
                }
                let d = sleds[s].domain.as_deref();
                if pass == 0 && d.is_some_and(|d| domains.contains(d)) {
                    continue;
                }
                if let Some(d) = d {
                    domains.insert(d.to_string());
                }
                chosen.push(s);
            }
        }
        for &s in &chosen {
            sleds[s].load += 1;
        }
        out.push(chosen.iter().map(|&s| sleds[s].id).collect());
    }
    Ok(out)
}

fn fill(s: &SledSlot) -> f64 {
    s.load as f64 / s.chunks.max(1) as f64
}

fn rot(i: usize, chunk: u64, salt: u64, n: usize) -> usize {
    (i + n - ((chunk.wrapping_add(salt)) % n as u64) as usize) % n
}

/// A sled to take a replica of a chunk whose other replicas are `keep`: one of `sleds` not in
/// `keep`, in a failure domain none of them uses when there is one, least filled first (ties
/// by id). Counts the new replica in its load. `None` when every sled already holds one.
pub fn replacement(sleds: &mut [SledSlot], keep: &[SledId]) -> Option<SledId> {
    let used: BTreeSet<String> = sleds
        .iter()
        .filter(|s| keep.contains(&s.id))
        .filter_map(|s| s.domain.clone())
        .collect();
    let best = sleds
        .iter_mut()
        .filter(|s| !keep.contains(&s.id))
        .min_by(|a, b| {
            let new_domain = |s: &SledSlot| s.domain.as_ref().is_none_or(|d| !used.contains(d));
            new_domain(b)
                .cmp(&new_domain(a))
                .then(
                    fill(a)
                        .partial_cmp(&fill(b))
                        .unwrap_or(std::cmp::Ordering::Equal),
                )
                .then(a.id.cmp(&b.id))
        })?;
    best.load += 1;
    Some(best.id)
}

/// The sleds of `state` that are up and not being drained, as placement slots.
pub fn sled_slots(state: &ClusterState, up: &BTreeSet<SledId>) -> Vec<SledSlot> {
    let load = state.sled_load();
    state
        .sleds
        .values()
        .filter(|s| up.contains(&s.id) && !state.draining.contains(&s.id))
        .map(|s| SledSlot {
            id: s.id,
            domain: s.domain.clone(),
            chunks: s.devices.iter().map(|d| d.chunks).sum(),
            load: load.get(&s.id).copied().unwrap_or(0),
        })
        .collect()
}

/// Checks that `chunks × chunk_size × replicas` more bytes fit under the overcommit limit,
/// next to what the state records and `reserved` bytes promised to changes not recorded yet.
pub fn check_capacity(
    state: &ClusterState,
    chunks: u64,
    chunk_size: u64,
    replicas: usize,
    reserved: u64,
) -> Result<(), PlaceError> {
    let capacity = state.capacity();
    let ratio = f64::from(state.settings.overcommit_permille) / 1000.0;
    let limit = (capacity as f64 * ratio) as u64;
    let provisioned = state.provisioned().saturating_add(reserved);
    let need = chunks
        .saturating_mul(chunk_size)
        .saturating_mul(replicas as u64);
    let free = limit.saturating_sub(provisioned);
    if need > free {
        return Err(PlaceError::Overcommit {
            need,
            free,
            limit,
            capacity,
            ratio,
            replicas,
        });
    }
    Ok(())
}

/// Head nodes for a new group: up to `size` of the `known` nodes (registered ones and the
/// metadata group's voters) with room for `iops` of baseline (`None`: no baseline, which only
/// nodes without a `capacity-iops` can take), nodes that are `up` first, then
/// fewest groups, distinct domains first. The first one is always up (the group starts
/// there); the others may be down for now (the group grows onto them when they come up).
/// `reserved` is baseline promised on each node to changes not recorded in `state` yet.
pub fn choose_heads(
    state: &ClusterState,
    known: &BTreeSet<u64>,
    up: &BTreeSet<u64>,
    size: usize,
    iops: Option<u64>,
    reserved: &BTreeMap<u64, u64>,
) -> Result<Vec<u64>, PlaceError> {
    let groups = state.node_groups();
    let mut baselines = state.node_baselines();
    for (n, r) in reserved {
        let e = baselines.entry(*n).or_insert(0);
        *e = e.saturating_add(*r);
    }
    let candidates: BTreeSet<u64> = known
        .iter()
        .copied()
        .chain(state.nodes.keys().copied())
        .collect();
    if !candidates.iter().any(|c| up.contains(c)) {
        return Err(PlaceError::NoHeads);
    }
    let mut fit: Vec<u64> = candidates
        .into_iter()
        .filter(|id| {
            let cap = state.nodes.get(id).and_then(|n| n.capacity_iops);
            let used = baselines.get(id).copied().unwrap_or(0);
            cap.is_none_or(|c| iops.is_some_and(|i| used.saturating_add(i) <= c))
        })
        .collect();
    if !fit.iter().any(|c| up.contains(c)) {
        return Err(match iops {
            Some(iops) => PlaceError::NodeCapacity { iops },
            None => PlaceError::UnlimitedOnCapped,
        });
    }
    fit.sort_by_key(|id| (!up.contains(id), groups.get(id).copied().unwrap_or(0), *id));
    let want = size.min(fit.len());
    let mut chosen = Vec::with_capacity(want);
    let mut domains = BTreeSet::new();
    for pass in 0..2 {
        for &id in &fit {
            if chosen.len() == want {
                break;
            }
            if chosen.contains(&id) {
                continue;
            }
            let d = state.nodes.get(&id).and_then(|n| n.domain.clone());
            if pass == 0 && d.as_ref().is_some_and(|d| domains.contains(d)) {
                continue;
            }
            if let Some(d) = d {
                domains.insert(d);
            }
            chosen.push(id);
        }
    }
    // Start on a node that is up, and of those on the one that starts the fewest groups: the
    // first founder runs the group's first election, so this spreads leadership (and with it
    // the serving of volumes) over the head nodes instead of putting every group on the node
    // with the lowest id.
    let starts = state.node_starts();
    if let Some(i) = chosen
        .iter()
        .enumerate()
        .filter(|(_, c)| up.contains(c))
        .min_by_key(|(_, c)| (starts.get(c).copied().unwrap_or(0), **c))
        .map(|(i, _)| i)
    {
        chosen.swap(0, i);
    }
    Ok(chosen)
}

/// Chunk replicas per sled of a placement.
pub fn per_sled(placement: &[Vec<SledId>]) -> BTreeMap<SledId, u64> {
    let mut m = BTreeMap::new();
    for set in placement {
        for s in set {
            *m.entry(*s).or_insert(0) += 1;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::state::{DeviceRecord, GroupRecord, NodeRecord, SledRecord};
    use crate::replication::GroupId;
    use common::ids::Uuid128;
    use proptest::prelude::*;

    fn slots(domains: &[Option<&str>], chunks: u64) -> Vec<SledSlot> {
        domains
            .iter()
            .enumerate()
            .map(|(i, d)| SledSlot {
                id: Uuid128(i as u128 + 1),
                domain: d.map(str::to_string),
                chunks,
                load: 0,
            })
            .collect()
    }

    #[test]
    fn replicas_use_distinct_domains_when_there_are_enough() {
        let mut s = slots(
            &[
                Some("a"),
                Some("a"),
                Some("b"),
                Some("b"),
                Some("c"),
                Some("c"),
            ],
            100,
        );
        let p = place_chunks(&mut s, 30, 3, 7).unwrap();
        let dom = |id: SledId| (id.0 as usize - 1) / 2;
        for set in &p {
            let d: BTreeSet<_> = set.iter().map(|x| dom(*x)).collect();
            assert_eq!(d.len(), 3, "{set:?}");
        }
        // Load is even: 90 replicas over 6 sleds.
        let per = per_sled(&p);
        assert!(per.values().all(|n| *n == 15), "{per:?}");
    }

    #[test]
    fn a_replacement_takes_a_new_domain_then_the_least_filled_sled() {
        let mut s = slots(&[Some("a"), Some("b"), Some("b"), Some("c")], 10);
        s[3].load = 9;
        let ids: Vec<SledId> = s.iter().map(|x| x.id).collect();
        // Domains a and b are in use: c is the only new domain, however full.
        assert_eq!(replacement(&mut s, &[ids[0], ids[1]]), Some(ids[3]));
        assert_eq!(s[3].load, 10);
        // No new domain left: the least filled sled not already holding a replica.
        s[1].load = 5;
        assert_eq!(replacement(&mut s, &[ids[0], ids[3]]), Some(ids[2]));
        // Every sled holds one.
        assert_eq!(replacement(&mut s, &ids), None);
    }

    #[test]
    fn fewer_sleds_than_replicas_places_on_all() {
        let mut s = slots(&[None, None], 10);
        let p = place_chunks(&mut s, 4, 3, 0).unwrap();
        assert!(p.iter().all(|set| set.len() == 2));
        assert_eq!(place_chunks(&mut [], 1, 3, 0), Err(PlaceError::NoSleds));
    }

    #[test]
    fn fuller_sleds_get_fewer_chunks() {
        let mut s = slots(&[None, None, None, None], 100);
        s[0].load = 50;
        let p = place_chunks(&mut s, 20, 2, 0).unwrap();
        let per = per_sled(&p);
        assert!(per.get(&Uuid128(1)).copied().unwrap_or(0) < 10, "{per:?}");
    }

    proptest! {
        #[test]
        fn sets_are_distinct_sleds(n in 1usize..8, r in 1usize..4, count in 0u64..50, salt in any::<u64>()) {
            let doms: Vec<Option<&str>> = (0..n).map(|i| if i % 2 == 0 { Some("x") } else { None }).collect();
            let mut s = slots(&doms, 10);
            let p = place_chunks(&mut s, count, r, salt).unwrap();
            prop_assert_eq!(p.len() as u64, count);
            for set in &p {
                let d: BTreeSet<_> = set.iter().collect();
                prop_assert_eq!(d.len(), set.len());
                prop_assert_eq!(set.len(), r.min(n));
            }
        }
    }

    fn state(nodes: &[(u64, Option<&str>, Option<u64>)]) -> ClusterState {
        let mut st = ClusterState::default();
        for (id, d, cap) in nodes {
            let a: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
            st.nodes.insert(
                *id,
                NodeRecord {
                    id: *id,
                    nbd: a,
                    admin: a,
                    peer: a,
                    domain: d.map(str::to_string),
                    capacity_iops: *cap,
                },
            );
        }
        st.sleds.insert(
            Uuid128(1),
            SledRecord {
                id: Uuid128(1),
                addr: "127.0.0.1:2".parse().unwrap(),
                domain: None,
                devices: vec![DeviceRecord {
                    id: Uuid128(9),
                    chunks: 100,
                    chunk_size: 1 << 20,
                }],
            },
        );
        st
    }

    #[test]
    fn heads_prefer_domains_and_respect_capacity() {
        let st = state(&[
            (1, Some("a"), None),
            (2, Some("a"), None),
            (3, Some("b"), Some(1000)),
            (4, Some("c"), None),
        ]);
        let up: BTreeSet<u64> = [1, 2, 3, 4].into();
        let none = BTreeSet::new();
        let h = choose_heads(&st, &none, &up, 3, Some(0), &BTreeMap::new()).unwrap();
        let d: BTreeSet<_> = h
            .iter()
            .map(|i| st.nodes[i].domain.clone().unwrap())
            .collect();
        assert_eq!(d.len(), 3, "{h:?}");
        // Node 3 cannot take 2000 IOPS: the group avoids it.
        let h = choose_heads(&st, &none, &up, 3, Some(2000), &BTreeMap::new()).unwrap();
        assert!(!h.contains(&3), "{h:?}");
        let small = state(&[(1, None, Some(10))]);
        assert_eq!(
            choose_heads(&small, &none, &[1].into(), 3, Some(11), &BTreeMap::new()),
            Err(PlaceError::NodeCapacity { iops: 11 })
        );
        // Baseline promised to a change not recorded yet counts as taken.
        assert!(choose_heads(&small, &none, &[1].into(), 3, Some(6), &BTreeMap::new()).is_ok());
        assert_eq!(
            choose_heads(&small, &none, &[1].into(), 3, Some(6), &[(1, 5)].into()),
            Err(PlaceError::NodeCapacity { iops: 6 })
        );
        assert_eq!(
            choose_heads(
                &small,
                &none,
                &BTreeSet::new(),
                3,
                Some(0),
                &BTreeMap::new()
            ),
            Err(PlaceError::NoHeads)
        );
        // A volume without a baseline only goes where there is no capacity to protect.
        let h = choose_heads(&st, &none, &up, 3, None, &BTreeMap::new()).unwrap();
        assert!(!h.contains(&3), "{h:?}");
        assert_eq!(
            choose_heads(&small, &none, &[1].into(), 3, None, &BTreeMap::new()),
            Err(PlaceError::UnlimitedOnCapped)
        );
        // A voter that has not registered yet is a target; the group starts on an up node.
        let h = choose_heads(
            &small,
            &[1, 7, 8].into(),
            &[1].into(),
            3,
            Some(0),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(h[0], 1);
        assert_eq!(h.len(), 3, "{h:?}");
    }

    #[test]
    fn groups_start_on_the_node_that_starts_the_fewest() {
        let mut st = state(&[(1, None, None), (2, None, None), (3, None, None)]);
        let up: BTreeSet<u64> = [1, 2, 3].into();
        let none = BTreeSet::new();
        let mut first = Vec::new();
        for i in 0..6u128 {
            let h = choose_heads(&st, &none, &up, 3, Some(0), &BTreeMap::new()).unwrap();
            assert_eq!(h.len(), 3);
            first.push(h[0]);
            st.groups.insert(
                GroupId(i),
                GroupRecord {
                    id: GroupId(i),
                    founders: h.clone(),
                    members: h.clone(),
                    joining: None,
                    target: h,
                    volume: None,
                    ready: true,
                    created: 0,
                },
            );
        }
        assert_eq!(first, vec![1, 2, 3, 1, 2, 3]);
        // A node that is down does not start one, however few it started.
        let h = choose_heads(&st, &none, &[1, 2].into(), 3, Some(0), &BTreeMap::new()).unwrap();
        assert_ne!(h[0], 3, "{h:?}");
    }

    #[test]
    fn overcommit_is_refused_beyond_the_ratio() {
        let mut st = state(&[(1, None, None)]);
        st.settings.overcommit_permille = 1500;
        // 100 MiB capacity × 1.5 = 150 MiB provisionable.
        assert!(check_capacity(&st, 50, 1 << 20, 3, 0).is_ok());
        let e = check_capacity(&st, 51, 1 << 20, 3, 0).unwrap_err();
        assert!(e.to_string().contains("overcommit ratio 1.5"), "{e}");
        // Bytes promised to a change not recorded yet count as taken.
        assert!(check_capacity(&st, 49, 1 << 20, 3, 3 << 20).is_ok());
        assert!(check_capacity(&st, 50, 1 << 20, 3, 3 << 20).is_err());
    }
}
