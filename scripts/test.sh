#!/usr/bin/env bash
# The whole test suite. Installs what the tests need (idempotently), builds, runs every test.
# Usage: scripts/test.sh            (CI and humans alike)
set -euo pipefail
cd "$(dirname "$0")/.."

# Test-only dependencies from Debian: etcd 3.4 and etcdctl 3.4 (compatibility and side-by-side
# tests), protoc (the etcd-client crate used by the tests compiles etcd's protos with it; Rampart
# itself needs no protoc), curl (the JSON gateway tests speak HTTP/1.1 with it), nftables (the
# fault harness cuts links between members with it).
# The fault campaign also mounts a small tmpfs per member: it runs as root, as CI does.
need=()
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing test dependencies: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${need[@]}"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo build --workspace --bins
# Unit and storage tests in parallel; multi-process cluster tests one at a time, so that elections
# on this 2-core machine are not starved by another cluster's processes.
cargo nextest run --workspace --exclude rampart-cli --no-fail-fast
cargo nextest run -p rampart-cli --test-threads 1 --no-fail-fast
