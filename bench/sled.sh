#!/usr/bin/env bash
# The sled benchmark, in one run on one disk: fio (io_uring, O_DIRECT) on a preconditioned file,
# and one sled controller on another preconditioned file driven over loopback by sled-load, with
# 4 KiB random writes and reads at each queue depth, writes under the same durability on both
# sides; then a table of both with the ratio sled/fio. Run from the repository root:
#
#     bench/sled.sh
#
# Knobs (environment): DURATION (measured seconds per run, 15), WARMUP (seconds before each
# measured window, 3), WORKING_SET (MiB addressed by both, 2048), QDS ("1 32"), REPEAT (times each
# workload is measured on both sides; the table shows medians, 1), SKIP_BUILD=1,
# SLED_CONTROLLER (a sled-controller binary to measure instead of this tree's), SLED_LOAD (likewise
# for the load generator, which contains the client of common::sled_client), KEEP_DATA=1 (keep
# the data files), QUIET_CORES / QUIET_DISK / QUIET_WAIT (before each run, wait up to QUIET_WAIT
# seconds, 30, for a second in which the machine is less than QUIET_CORES cores busy, 0.3, and the
# disk less than QUIET_DISK % busy, 10). Results go to target/bench-scratch/results-<time>/ (and .../latest).
# This is a benchmark, not a test: it never fails on a number.
set -euo pipefail

if [[ ! -f Cargo.toml || ! -d bench || ! -d sled-controller ]]; then
    echo "run from the repository root: bench/sled.sh" >&2
    exit 2
fi

DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
WORKING_SET=${WORKING_SET:-2048}
QDS=${QDS:-"1 32"}
REPEAT=${REPEAT:-1}
QUIET_CORES=${QUIET_CORES:-0.3}
QUIET_DISK=${QUIET_DISK:-10}
QUIET_WAIT=${QUIET_WAIT:-30}
SCRATCH=target/bench-scratch
RESULTS=$SCRATCH/results-$(date +%Y%m%d-%H%M%S)
SLED_BIN=${SLED_CONTROLLER:-target/release/sled-controller}
LOAD_BIN=${SLED_LOAD:-target/release/sled-load}
REPORT_BIN=target/release/bench-report
FIO_FILE=$SCRATCH/fio.dat
SLED_IMG=$SCRATCH/sled.img
KEY=$SCRATCH/cluster.key
READY=$SCRATCH/sled.ready.json
# Room for the chunk table, fence table and checksum area next to the working set's chunks.
SLED_SIZE_MIB=$((WORKING_SET + 256))

for n in DURATION WARMUP WORKING_SET QUIET_WAIT REPEAT; do
    if ! [[ ${!n} =~ ^[0-9]+$ ]]; then
        echo "$n must be a whole number (got '${!n}')" >&2
        exit 2
    fi
done
if (( DURATION == 0 || REPEAT == 0 || WORKING_SET < 64 )); then
    echo "DURATION and REPEAT must be positive and WORKING_SET at least 64 (MiB)" >&2
    exit 2
fi
for qd in $QDS; do
    if ! [[ $qd =~ ^[0-9]+$ ]] || (( qd == 0 )); then
        echo "QDS must list positive integers (got '$QDS')" >&2
        exit 2
    fi
done
for tool in fio awk; do
    command -v "$tool" >/dev/null || { echo "$tool is required" >&2; exit 2; }
done

SLED_PID=""
CHILD_PID=""

# Stops what this script started, by PID.
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [[ -n $CHILD_PID ]] && kill -0 "$CHILD_PID" 2>/dev/null; then
        kill -TERM "$CHILD_PID" 2>/dev/null || true
        wait "$CHILD_PID" 2>/dev/null || true
    fi
    if [[ -n $SLED_PID ]]; then
        stop_sled
    fi
    if [[ ${KEEP_DATA:-0} != 1 ]]; then
        rm -f "$FIO_FILE" "$SLED_IMG"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

# Runs a command in the background and waits for it, so the trap can stop it by PID.
run() {
    "$@" &
    CHILD_PID=$!
    local status=0
    wait "$CHILD_PID" || status=$?
    CHILD_PID=""
    return "$status"
}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# Busy CPU ticks of the machine (user, nice, system, irq, softirq, steal).
cpu_ticks() { awk '/^cpu /{ print $2+$3+$4+$7+$8+$9 }' /proc/stat; }

# Milliseconds the benchmark's disk has spent doing I/O.
disk_ticks() { awk -v d="$DISK" '$3 == d { print $13 }' /proc/diskstats; }

# "busy-cores disk-percent" over the next second.
activity() {
    local c0 d0 c1 d1
    c0=$(cpu_ticks)
    d0=$(disk_ticks)
    sleep 1
    c1=$(cpu_ticks)
    d1=$(disk_ticks)
    awk -v c="$((c1 - c0))" -v d="$((${d1:-0} - ${d0:-0}))" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "%.2f %.0f\n", c / hz, d / 10 }'
}

# Waits (up to QUIET_WAIT seconds) until, over one second, the machine's CPUs are less than
# QUIET_CORES busy and the disk less than QUIET_DISK % busy: other work on this machine (builds,
# other benchmarks) makes numbers noisy. Proceeds anyway after that, saying so; every check is
# logged in quiet.log next to the results.
wait_quiet() {
    local name=$1 start=$SECONDS a busy disk
    while true; do
        a=$(activity)
        read -r busy disk <<<"$a"
        if awk -v b="$busy" -v d="$disk" -v qb="$QUIET_CORES" -v qd="$QUIET_DISK" \
            'BEGIN { exit !(b < qb && d < qd) }'; then
            echo "$name: quiet after $((SECONDS - start))s (busy $busy cores, disk $disk%), load average $(loadavg)" >>"$RESULTS/quiet.log"
            return
        fi
        if (( SECONDS - start >= QUIET_WAIT )); then
            echo "$name: NOT quiet after $((SECONDS - start))s (busy $busy cores, disk $disk%), load average $(loadavg)" >>"$RESULTS/quiet.log"
            log "warning: machine still busy ($busy cores, disk $disk%) after ${QUIET_WAIT}s; measuring $name anyway (noisy)"
            return
        fi
    done
}

# The benchmark disk's counters (/proc/diskstats): requests done, time busy, time-weighted
# requests in flight, flushes.
disk_counters() { awk -v d="$DISK" '$3 == d { print $4 + $8, $13, $14, $19 }' /proc/diskstats; }

# env_begin / env_end NAME: the machine's busy cores and the disk's activity over a run, written
# to NAME.env.json next to the run's result (fio reports neither; for sled runs it shows how
# full the disk was kept).
env_begin() {
    ENV_LOAD=$(loadavg)
    ENV_T0=$(date +%s.%N)
    ENV_C0=$(cpu_ticks)
    ENV_D0=$(disk_counters)
}
env_end() {
    local name=$1 t1 c1 d1
    c1=$(cpu_ticks)
    d1=$(disk_counters)
    t1=$(date +%s.%N)
    awk -v t0="$ENV_T0" -v t1="$t1" -v c0="$ENV_C0" -v c1="$c1" -v hz="$(getconf CLK_TCK)" \
        -v d0="$ENV_D0" -v d1="$d1" -v load="$ENV_LOAD" 'BEGIN {
            split(d0, a, " "); split(d1, b, " "); s = t1 - t0
            printf "{\"machine_busy_cores\": %.3f, \"disk_ios_per_s\": %.0f, \"disk_util_pct\": %.1f, \"disk_queue\": %.2f, \"disk_flushes_per_s\": %.0f, \"load_average\": \"%s\"}\n",
                (c1 - c0) / hz / s, (b[1] - a[1]) / s, (b[2] - a[2]) / s / 10, (b[3] - a[3]) / s / 1000,
                (b[4] - a[4]) / s, load
        }' >"$RESULTS/$name.env.json"
}

fio_common=(--ioengine=io_uring --direct=1 --bs=4k --size="${WORKING_SET}M" --filename="$FIO_FILE"
    --time_based --runtime="$DURATION" --ramp_time="$WARMUP" --norandommap --randrepeat=0
    --lat_percentiles=1 --percentile_list=50:99:99.9 --output-format=json)

# fio_run NAME ARGS...: one measured fio run.
fio_run() {
    local name=$1
    shift
    wait_quiet "$name"
    env_begin
    run fio --name="$name" "${fio_common[@]}" "$@" --output="$RESULTS/$name.json"
    env_end "$name"
    log "$name: $(awk -F'"iops" : ' 'NF > 1 { split($2, a, ","); if (a[1] + 0 > 0) { printf "%.0f IOPS", a[1]; exit } }' "$RESULTS/$name.json")"
}

start_sled() {
    local mode=$1
    rm -f "$READY"
    "$SLED_BIN" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --cluster-key-file "$KEY" \
        --device "$SLED_IMG:${SLED_SIZE_MIB}MiB" --durability "$mode" --io-engine uring \
        --ready-file "$READY" >>"$RESULTS/sled-$mode.log" 2>&1 &
    SLED_PID=$!
    for _ in $(seq 1 600); do
        [[ -s $READY ]] && return 0
        if ! kill -0 "$SLED_PID" 2>/dev/null; then
            SLED_PID=""
            echo "the sled controller exited during start-up; its log:" >&2
            tail -n 20 "$RESULTS/sled-$mode.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "the sled controller did not become ready in 60 s" >&2
    exit 1
}

stop_sled() {
    local pid=$SLED_PID
    SLED_PID=""
    [[ -n $pid ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "the sled controller did not stop in 30 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    rm -f "$READY"
}

# sled_run NAME ARGS...: one sled-load run against the running sled.
sled_run() {
    local name=$1
    shift
    wait_quiet "$name"
    env_begin
    run "$LOAD_BIN" --ready-file "$READY" --key-file "$KEY" --working-set "${WORKING_SET}MiB" \
        --json-out "$RESULTS/$name.json" "$@"
    env_end "$name"
}

mkdir -p "$RESULTS"
DISK=$(basename "$(findmnt -no SOURCE -T "$SCRATCH")")
ln -sfn "$(basename "$RESULTS")" "$SCRATCH/latest"

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building release binaries"
    cargo build --release -p sled-controller -p bench
fi

{
    echo "date: $(date -Is)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "sled binary: $SLED_BIN"
    echo "load generator: $LOAD_BIN"
    echo "cpus: $(nproc) ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo))"
    echo "kernel: $(uname -r)"
    dev=$(findmnt -no SOURCE -T "$SCRATCH")
    echo "filesystem: $(findmnt -no FSTYPE,OPTIONS -T "$SCRATCH") on $dev"
    base=$(basename "$dev")
    if [[ -e /sys/class/block/$base ]]; then
        echo "disk: $(lsblk -dno NAME,SIZE,MODEL "$dev" 2>/dev/null | xargs), rotational=$(cat /sys/class/block/"$base"/queue/rotational 2>/dev/null), scheduler=$(cat /sys/class/block/"$base"/queue/scheduler 2>/dev/null), write_cache=$(cat /sys/class/block/"$base"/queue/write_cache 2>/dev/null)"
    fi
    echo "fio: $(fio --version)"
    echo "working set: ${WORKING_SET} MiB, ${DURATION}s measured after ${WARMUP}s warm-up per run, QD: $QDS"
    echo "load average at start: $(loadavg)"
} | tee "$RESULTS/machine.txt"

# ------------------------------------------------------------------------------ precondition
log "fio: preconditioning a ${WORKING_SET} MiB file (sequential 1 MiB writes)"
rm -f "$FIO_FILE"
run fio --name=precondition --ioengine=io_uring --direct=1 --rw=write --bs=1M --iodepth=8 \
    --size="${WORKING_SET}M" --filename="$FIO_FILE" --end_fsync=1 --output-format=json \
    --output="$RESULTS/fio-precondition.json"
if [[ ! -s $KEY ]]; then
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$KEY" && echo >>"$KEY")
fi
rm -f "$SLED_IMG"
log "sled: preconditioning a fresh ${SLED_SIZE_MIB} MiB file (${WORKING_SET} MiB of sequential 1 MiB writes through the sled)"
start_sled dsync
sled_run sled-precondition --pattern fill --bs 1MiB --qd 8
stop_sled

# ------------------------------------------------------------------------------------- runs
# Each workload runs on fio and then on the sled in both durability modes before the next one,
# so a drift in the machine or the disk over the run lands on both sides of a ratio. With REPEAT,
# the whole sequence runs that many times; results are NAME.rN.json.
for r in $(seq 1 "$REPEAT"); do
    for qd in $QDS; do
        for pattern in randwrite randread; do
            if [[ $pattern == randwrite ]]; then
                # Every write durable on completion, as under the sled's dsync (O_DSYNC =
                # RWF_DSYNC per write).
                fio_run "fio-randwrite-qd$qd-dsync.r$r" --rw=randwrite --iodepth="$qd" --sync=dsync
                # One fdatasync per QD writes, issued next to them: the closest fio has to the
                # sled's group fdatasync (see bench/README.md for how the two differ).
                fio_run "fio-randwrite-qd$qd-fdatasync.r$r" --rw=randwrite --iodepth="$qd" \
                    --fdatasync="$qd"
            else
                fio_run "fio-randread-qd$qd.r$r" --rw=randread --iodepth="$qd"
            fi
            for mode in dsync batch-fsync; do
                start_sled "$mode"
                sled_run "sled-$mode-$pattern-qd$qd.r$r" --pattern "$pattern" --qd "$qd" \
                    --duration "${DURATION}s" --warmup "${WARMUP}s" --label "$mode"
                stop_sled
            done
        done
    done
done

# ------------------------------------------------------------------------------------ report
qd_list=$(echo $QDS | tr ' ' ',')
max_qd=$(echo $QDS | tr ' ' '\n' | sort -n | tail -1)
"$REPORT_BIN" --dir "$RESULTS" --qd "$qd_list" --markdown >"$RESULTS/table.md"
echo
"$REPORT_BIN" --dir "$RESULTS" --qd "$qd_list" --target-qd "$max_qd" | tee "$RESULTS/table.txt"
echo
log "results in $RESULTS (table.md for bench/README.md); load average at the end: $(loadavg)"
