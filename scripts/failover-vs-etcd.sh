#!/usr/bin/env bash
# Failover benchmark, Rampart and etcd 3.4 side by side in one run: rounds of leader SIGKILL under
# a steady write load, write-unavailability gap p50/p99/max. Writes docs/failover.md.
# Usage: scripts/failover-vs-etcd.sh [ROUNDS]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-10}"
if ! command -v etcd >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q && apt-get install -y -q etcd-server etcd-client
fi
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -p rampart-cli
out=docs/failover.md
{
  echo "# Failover: Rampart vs etcd 3.4"
  echo
  echo "Leader SIGKILL under a steady write load (8 writers), $rounds rounds per system, 3 members each"
  echo "on loopback, each member on its own address. The write gap is the longest time without a"
  echo "successful write from the kill until writes have flowed again for a second. Every"
  echo "acknowledged write is read back afterwards (lost must be 0). Both systems run with their"
  echo "default timings (Rampart: heartbeat 50 ms, election timeout 250 ms; etcd: 100 ms, 1000 ms)."
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- commit: $(git rev-parse --short HEAD)"
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "- etcd: $(etcd --version | head -1)"
  echo "- reproduce: \`scripts/failover-vs-etcd.sh $rounds\`"
  echo
  echo "| system | rounds | p50 write gap | p99 write gap | max | acked writes | lost |"
  echo "|---|---|---|---|---|---|---|"
} > "$out"
target/release/rampart failover-bench --rounds "$rounds" --with-etcd --markdown-out "$out"
echo "wrote $out"
