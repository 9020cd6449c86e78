#!/usr/bin/env bash
# Volume create latency with and without the pool of ready Raft groups (issue 5, US10452681B1 /
# US10733201B1). Starts a `stockade up` cluster (3 sleds, 3 head nodes) with --pool-size 2, then
# with --pool-size 0, creates volumes one after another through the real CLI and prints the
# latency the control plane reports (request to serving) and the CLI's wall time, as medians.
# Run from the repository root:
#
#     bench/create.sh
#
# Knobs (environment): CREATES (volumes per configuration, 8), PAUSE (seconds between creates
# with the pool, so it refills, 3), SKIP_BUILD=1. This is a benchmark, not a test: it never
# fails on a number. Needs jq.
set -euo pipefail

if [[ ! -f Cargo.toml || ! -d bench ]]; then
    echo "run from the repository root: bench/create.sh" >&2
    exit 2
fi
CREATES=${CREATES:-8}
PAUSE=${PAUSE:-3}
SCRATCH=target/bench-scratch/create
BIN=target/release/stockade

if [[ -z "${SKIP_BUILD:-}" ]]; then
    cargo build --release --workspace --bins >&2
fi
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"

median() { sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

run() {
    local pool=$1 dir=$SCRATCH/pool-$1
    "$BIN" --data-dir "$dir" up --pool-size "$pool" --sled-size 8GiB --detach >"$dir.up.log" 2>&1
    local server=() wall=() from_pool=0
    for i in $(seq 1 "$CREATES"); do
        local t0 t1 out
        t0=$(date +%s%N)
        out=$("$BIN" --data-dir "$dir" volume create "b$i" --size 1GiB --json)
        t1=$(date +%s%N)
        server+=("$(jq -r .latency_ms <<<"$out")")
        wall+=("$(( (t1 - t0) / 1000000 ))")
        [[ $(jq -r .from_pool <<<"$out") == true ]] && from_pool=$((from_pool + 1))
        [[ $pool -gt 0 ]] && sleep "$PAUSE"
    done
    # Stop the detached cluster by the PIDs it recorded.
    jq -r '.processes[].pid' "$dir/cluster.json" | xargs -r kill 2>/dev/null || true
    sleep 2
    printf '| %s | %d | %d of %d | %s | %s | %s |\n' \
        "$([[ $pool -gt 0 ]] && echo "pool ($pool ready groups)" || echo "pool empty (partial group)")" \
        "$CREATES" "$from_pool" "$CREATES" \
        "$(printf '%s\n' "${server[@]}" | median)" \
        "$(printf '%s\n' "${server[@]}" | sort -n | tail -1)" \
        "$(printf '%s\n' "${wall[@]}" | median)"
}

echo "date: $(date -Is); git: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (uncommitted changes)'); cpus: $(nproc)"
echo
echo "| configuration | creates | from the pool | server ms (median) | server ms (max) | CLI wall ms (median) |"
echo "|---|---:|---:|---:|---:|---:|"
run 2
run 0
