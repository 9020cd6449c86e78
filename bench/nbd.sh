#!/usr/bin/env bash
# The NBD benchmark (issues 3 and 4), in one run on one disk: fio through NBD against
#
#   * Stockade, one head node over three sleds (R = 3 sled copies, no Raft peers), and again with
#     R = 1 (one sled copy per chunk: the R = 1 write target);
#   * Stockade, three head nodes over three sleds (a 3-way Raft-replicated volume, R = 3), at its
#     leader, the write runs sustained for LONG seconds so write-back to the sleds sets the pace;
#   * nbdkit's file plugin (page cache: what a user would otherwise pick);
#   * qemu-nbd --cache=none --aio=io_uring (the like-for-like peer: no page cache);
#
# and fio --ioengine=io_uring --direct=1 on a file of the same disk (writes with --sync=dsync,
# the durability the sleds give): the device limits. Workloads: 4 KiB random write and read at
# queue depth 1 and 32, 1 MiB sequential write and read at queue depth 8. Then the failover
# pause: a paced writer on a follower while the leader is killed with SIGKILL.
#
#     bench/nbd.sh
#
# Knobs (environment): DURATION (seconds per run, 15), LONG (seconds of the replicated random
# write runs, 60), SIZE (working set, 1GiB: the volume `stockade up` creates), SKIP_BUILD=1.
# Needs fio, nbdkit, qemu-utils, jq. Results: target/bench-scratch/nbd/results.md. This is a
# benchmark, not a test: it never fails on a number.
set -euo pipefail

if [[ ! -f Cargo.toml || ! -d bench ]]; then
    echo "run from the repository root: bench/nbd.sh" >&2
    exit 2
fi
DURATION=${DURATION:-15}
LONG=${LONG:-60}
SIZE=${SIZE:-1GiB}
S=target/bench-scratch/nbd
BIN=target/release/stockade
TICK=$(getconf CLK_TCK)

if [[ -z "${SKIP_BUILD:-}" ]]; then
    cargo build --release --workspace --bins >&2
fi
for t in fio nbdkit qemu-nbd jq; do
    command -v $t >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
rm -rf "$S"
mkdir -p "$S"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for d in "$S"/up-*; do
        if [[ -f $d/cluster.json ]]; then
            jq -r '.processes[].pid' "$d/cluster.json" | xargs -r kill 2>/dev/null || true
        fi
    done
    true
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# CPU seconds (user + system) of the processes given, as one number.
cpu_of() {
    local total=0 p
    for p in "$@"; do
        [[ -r /proc/$p/stat ]] || continue
        total=$(( total + $(awk '{ print $14 + $15 }' "/proc/$p/stat") ))
    done
    echo "$total"
}

RESULTS=$S/rows.tsv
: >"$RESULTS"

# fio NAME TARGET-ARGS… -- runs every workload, recording IOPS, MiB/s, p50/p99 µs and the CPU of
# the server processes in $SERVER_PIDS (fio's own when empty: the direct-on-device case).
workloads() {
    local name=$1 long=$2; shift 2
    local spec
    for spec in "randwrite 4k 1" "randwrite 4k 32" "randread 4k 1" "randread 4k 32" "write 1m 8" "read 1m 8"; do
        set -- $spec
        local rw=$1 bs=$2 qd=$3 secs=$DURATION
        [[ $rw == randwrite && $long == long ]] && secs=$LONG
        local before after json
        before=$(cpu_of ${SERVER_PIDS:-})
        json=$(fio --name=b --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$SIZE" --time_based \
            --runtime="$secs" --ramp_time=2 --randrepeat=0 --norandommap --group_reporting \
            --output-format=json "${TARGET[@]}" 2>"$S/fio.err" | sed -n '/^{/,$p') || {
            echo "fio failed for $name $spec: $(cat "$S/fio.err")" >&2
            continue
        }
        after=$(cpu_of ${SERVER_PIDS:-})
        local dir=write
        [[ $rw == *read ]] && dir=read
        jq -r --arg n "$name" --arg w "$rw $bs QD$qd" --arg d "$dir" --arg secs "$secs" \
            --arg cpu "$(( after - before ))" --arg tick "$TICK" '
            .jobs[0] as $j | $j[$d] as $r
            | ($r.iops) as $iops
            | (if ($cpu | tonumber) > 0 then ($cpu | tonumber) / ($tick | tonumber)
               else ($j.usr_cpu + $j.sys_cpu) / 100 * ($secs | tonumber) end) as $cpus
            | [$n, $w, ($iops | floor), ($r.bw_bytes / 1048576 * 10 | floor / 10),
               ($r.clat_ns.percentile["50.000000"] / 1000 | floor),
               ($r.clat_ns.percentile["99.000000"] / 1000 | floor),
               (if $iops > 0 then ($cpus * 1000 / ($iops * ($secs | tonumber) / 1000) * 100 | floor / 100) else 0 end),
               ($j.error)] | @tsv' <<<"$json" >>"$RESULTS"
        echo "  $name $rw $bs QD$qd: $(tail -1 "$RESULTS" | cut -f3-6 | tr '\t' ' ')" >&2
    done
}

echo "== preparing a $SIZE file on the same disk" >&2
F=$S/peer.img
fio --name=fill --rw=write --bs=1m --iodepth=8 --size="$SIZE" --filename="$F" \
    --ioengine=io_uring --direct=1 --end_fsync=1 >/dev/null

echo "== fio directly on the file (device limits)" >&2
SERVER_PIDS=""
TARGET=(--ioengine=io_uring --direct=1 --filename="$F" --sync=dsync)
workloads "device (fio io_uring direct, dsync writes)" short

echo "== nbdkit file (page cache)" >&2
P=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$P" file file="$F" >"$S/nbdkit.log" 2>&1 &
PIDS+=($!); SERVER_PIDS=$!
sleep 1
TARGET=(--ioengine=nbd --uri="nbd://127.0.0.1:$P/")
workloads "nbdkit file" short
kill "$SERVER_PIDS"; wait "$SERVER_PIDS" 2>/dev/null || true

echo "== qemu-nbd --cache=none --aio=io_uring" >&2
P=$(free_port)
qemu-nbd -f raw --cache=none --aio=io_uring -b 127.0.0.1 -p "$P" -x b --persistent --shared=8 "$F" \
    >"$S/qemu-nbd.log" 2>&1 &
PIDS+=($!); SERVER_PIDS=$!
sleep 1
TARGET=(--ioengine=nbd --uri="nbd://127.0.0.1:$P/b")
workloads "qemu-nbd cache=none" short
kill "$SERVER_PIDS"; wait "$SERVER_PIDS" 2>/dev/null || true

stockade() {
    local heads=$1 replicas=$2 label=$3 long=$4 d=$S/up-$1-r$2
    echo "== Stockade, $heads head node(s), 3 sleds, R=$replicas" >&2
    "$BIN" --data-dir "$d" up --heads "$heads" --sleds 3 --replicas "$replicas" \
        --sled-size 8GiB --detach >"$d.log" 2>&1
    # The leader's NBD address (a follower would forward every request to it).
    local leader uri
    leader=$(jq -r .leader < <("$BIN" --data-dir "$d" volume show vol0 --json))
    uri=$(jq -r --arg id "head-$leader" '.processes[] | select(.id == $id) | "nbd://\(.listen)/vol0"' "$d/cluster.json")
    SERVER_PIDS=$(jq -r '[.processes[].pid] | join(" ")' "$d/cluster.json")
    # Write the whole volume once, so reads and overwrites reach allocated, written blocks.
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1m --iodepth=8 --size="$SIZE" >/dev/null
    TARGET=(--ioengine=nbd --uri="$uri")
    workloads "$label" "$long"
}
stockade 1 3 "Stockade, 1 head node (R=3 sleds)" short
jq -r '.processes[].pid' "$S/up-1-r3/cluster.json" | xargs -r kill; sleep 2
stockade 1 1 "Stockade, 1 head node (R=1 sled)" short
jq -r '.processes[].pid' "$S/up-1-r1/cluster.json" | xargs -r kill; sleep 2
stockade 3 3 "Stockade, 3 head nodes (Raft x3, R=3 sleds)" long

echo "== failover pause" >&2
d=$S/up-3-r3
leader=$(jq -r .leader < <("$BIN" --data-dir "$d" volume show vol0 --json))
follower=$(jq -r --arg id "head-$leader" '[.processes[] | select(.role == "head" and .id != $id)][0].listen' "$d/cluster.json")
lpid=$(jq -r --arg id "head-$leader" '.processes[] | select(.id == $id) | .pid' "$d/cluster.json")
fio --name=failover --ioengine=nbd --uri="nbd://$follower/vol0" --rw=randwrite --bs=4k --iodepth=1 \
    --rate_iops=200 --size="$SIZE" --time_based --runtime=15 --output-format=json \
    2>"$S/failover.err" | sed -n '/^{/,$p' >"$S/failover.json" &
FIO=$!
sleep 5
kill -9 "$lpid"
wait "$FIO" || true
fio_ok=$(jq -r 'if .jobs[0].error == 0 then "yes" else "no" end' "$S/failover.json" 2>/dev/null || echo no)
pause_ms=$(jq '.jobs[0].write.clat_ns.max / 1e6 | floor' "$S/failover.json" 2>/dev/null || echo "-")
errors=$(jq '.jobs[0].error' "$S/failover.json" 2>/dev/null || echo "-")

{
    echo "date: $(date -Is); git: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (uncommitted changes)')"
    echo "cpus: $(nproc) ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)); kernel $(uname -r); DURATION=$DURATION LONG=$LONG SIZE=$SIZE"
    echo
    echo "| target | workload | IOPS | MiB/s | p50 µs | p99 µs | server CPU ms per 1k ops | fio errors |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8 }' "$RESULTS"
    echo
    echo "Ratios at QD 32 (IOPS):"
    for w in "randwrite 4k QD32" "randread 4k QD32"; do
        dev=$(awk -F'\t' -v w="$w" '$1 ~ /^device/ && $2 == w { print $3 }' "$RESULTS")
        kit=$(awk -F'\t' -v w="$w" '$1 == "nbdkit file" && $2 == w { print $3 }' "$RESULTS")
        qn=$(awk -F'\t' -v w="$w" '$1 ~ /^qemu-nbd/ && $2 == w { print $3 }' "$RESULTS")
        awk -F'\t' -v w="$w" -v dev="$dev" -v kit="$kit" -v qn="$qn" '$1 ~ /^Stockade/ && $2 == w {
            r = match($1, /R=[0-9]+/) ? substr($1, RSTART + 2, RLENGTH - 2) : 3
            lim = (w ~ /write/) ? dev / r : dev
            printf "  %s, %s: %.2fx the device limit (%s), %.2fx qemu-nbd cache=none, %.2fx nbdkit\n",
                $1, w, $3 / (lim ? lim : 1), (w ~ /write/) ? "device write IOPS / " r " copies" : "device read IOPS",
                $3 / (qn ? qn : 1), $3 / (kit ? kit : 1) }' "$RESULTS"
    done
    echo
    echo "Failover: a writer at 200 IOPS (QD 1) on a follower, leader killed with SIGKILL: longest write $pause_ms ms, fio finished: $fio_ok, fio errors: $errors"
} | tee "$S/results.md"
