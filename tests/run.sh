#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with Rust installed:
#   installs the Debian packages the tests need (when missing), then runs the format check,
#   clippy, and every test of the workspace (unit, integration, real NBD clients, promtool).
# Run as root (apt-get, loop devices and FUSE mounts need it). A test that cannot run (a tool or
# root missing) fails rather than passing silently; STOCKADE_ALLOW_SKIP=1 makes it skip instead.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] && [ -z "${STOCKADE_ALLOW_SKIP:-}" ]; then
  echo "run as root: the loop-device and FUSE tests need it (or set STOCKADE_ALLOW_SKIP=1 to skip them)" >&2
  exit 1
fi

PKGS=(libnbd-bin python3-libnbd qemu-utils fio fuse3 e2fsprogs prometheus nbdkit util-linux procps)
need=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: ${need[*]}; run as root (or apt-get install them)" >&2
    exit 1
  fi
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# A fresh checkout gains nothing from incremental compilation, and its caches are the largest
# part of target/ (about 1.5 GB): CI disks can be small.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build"
cargo build --workspace --all-targets
threads="${STOCKADE_TEST_THREADS:-2}"
start=$(date +%s)
# cargo-nextest (when installed; .config/nextest.toml) runs the same tests in about 6 minutes
# here where `cargo test` took 9-16: it keeps both slots busy across test binaries, where
# `cargo test` runs the binaries one after another. It does not run doctests, so those follow. STOCKADE_NO_NEXTEST=1 forces
# `cargo test`.
if [ -z "${STOCKADE_NO_NEXTEST:-}" ] && cargo nextest --version >/dev/null 2>&1; then
  echo "== cargo nextest run ($(cargo nextest --version | head -1))"
  cargo nextest run --workspace --test-threads="$threads"
  echo "== cargo test --doc"
  cargo test --workspace --doc
else
  echo "== cargo test (cargo-nextest not installed)"
  cargo test --workspace -- --test-threads="$threads"
fi
echo "== all tests passed in $(( $(date +%s) - start ))s"
