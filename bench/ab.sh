#!/usr/bin/env bash
# A/B of the NBD data path between two builds, interleaved on the same disk:
#
#     bench/ab.sh OLD_BIN_DIR NEW_BIN_DIR
#
# Each directory holds the three binaries (stockade, head-node, sled-controller) of one build,
# e.g. copies of target/release taken at two commits. For each run, in the order of VERS (default
# "old new old new old new"): a fresh `stockade up --heads H --sleds 3 --replicas R` (H: HEADS,
# default 1; R: 1) under target/bench-scratch/ab, a 1 GiB sequential fill, then fio
# --ioengine=nbd 4 KiB random I/O of kind RW (randwrite; randread reads the filled GiB) at each
# queue depth of QDS (default "32 1") for DURATION seconds (10), with the IOPS, p50/p99 latency,
# the leader's log fdatasyncs over the run (from its metrics) and the CPU time of the whole
# cluster per request. Interleaving matters: this VM's disk drifts by tens of percent within
# minutes. A benchmark, not a test.
set -euo pipefail
if [[ $# -ne 2 || ! -x $1/stockade || ! -x $2/stockade ]]; then
    echo "usage: bench/ab.sh OLD_BIN_DIR NEW_BIN_DIR (each with stockade, head-node, sled-controller)" >&2
    exit 2
fi
old=$(realpath "$1")
new=$(realpath "$2")
d=${SCRATCH:-target/bench-scratch/ab}
stop() { if [[ -f $d/cluster.json ]]; then jq -r '.processes[].pid' "$d/cluster.json" | xargs -r kill 2>/dev/null || true; fi; sleep 2; }
trap stop EXIT
rw=${RW:-randwrite}
dir=$([[ $rw == *read* ]] && echo read || echo write)
for v in ${VERS:-old new old new old new}; do
    bin=$([[ $v == old ]] && echo "$old" || echo "$new")
    stop
    rm -rf "$d"
    mkdir -p "$(dirname "$d")"
    "$bin/stockade" --data-dir "$d" up --heads "${HEADS:-1}" --sleds 3 --replicas "${R:-1}" --sled-size 4GiB --detach >"$d.up.log" 2>&1 ||
        { tail "$d.up.log"; exit 1; }
    leader=
    for _ in $(seq 100); do
        leader=$("$bin/stockade" --data-dir "$d" volume show vol0 --json 2>/dev/null | jq -r .leader) || true
        [[ -n $leader && $leader != null ]] && break
        sleep 0.3
    done
    uri=$(jq -r --arg id "head-$leader" '.processes[] | select(.id == $id) | "nbd://\(.listen)/vol0"' "$d/cluster.json")
    metrics=$(jq -r --arg id "head-$leader" '.processes[] | select(.id == $id) | .metrics' "$d/cluster.json")
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1m --iodepth=8 --size=1GiB >/dev/null
    fsync() { curl -s "http://$metrics/metrics" | awk '/^stockade_raft_log_fsync_duration_seconds_(sum|count)/{printf "%s ", $2}'; }
    # CPU seconds (user + system) of every process of the cluster, in clock ticks.
    cpu() { jq -r '.processes[].pid' "$d/cluster.json" | while read -r p; do awk '{print $14 + $15}' "/proc/$p/stat"; done | awk '{t += $1} END {print t}'; }
    hz=$(getconf CLK_TCK)
    for qd in ${QDS:-32 1}; do
        read -r s0 c0 <<<"$(fsync)"
        t0=$(cpu)
        r=$(fio --name=ab --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth="$qd" --size=1GiB \
            --time_based --runtime="${DURATION:-10}" --output-format=json | sed -n '/^{/,$p')
        read -r s1 c1 <<<"$(fsync)"
        t1=$(cpu)
        iops=$(jq ".jobs[0].$dir.iops|floor" <<<"$r")
        echo "$v qd$qd iops=$iops" \
            "p50_us=$(jq ".jobs[0].$dir.clat_ns.percentile[\"50.000000\"]/1000|floor" <<<"$r")" \
            "p99_us=$(jq ".jobs[0].$dir.clat_ns.percentile[\"99.000000\"]/1000|floor" <<<"$r")" \
            "log_fsyncs=$((c1 - c0)) log_fsync_mean_us=$( ((c1 > c0)) && echo "($s1 - $s0) * 1000000 / ($c1 - $c0)" | bc || echo -)" \
            "cluster_cpu_us_per_op=$(( (t1 - t0) * 1000000 / hz / (iops * ${DURATION:-10} + 1) ))"
    done
done
