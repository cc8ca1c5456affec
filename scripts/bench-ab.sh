#!/usr/bin/env bash
# A/B of two Rampart builds by the CPU time their members use per operation, the measure that
# can tell a 5% change apart on this shared 2-core machine (op/s moves by up to ±30% between
# identical runs; see finding 12 in docs/performance.md).
#
# Usage: scripts/bench-ab.sh BINARY_A BINARY_B
#   BENCH_ROUNDS=3         alternating rounds (A then B, B then A, ...)
#   BENCH_WORKLOAD=put     any `rampart bench --workload`
#   BENCH_RATE=4000        fixed op/s (0: unlimited). A fixed rate keeps batching the same in
#                          every run, so CPU per op compares like with like.
#   BENCH_CLIENTS=64  BENCH_DURATION=8s
#
# Each run starts a fresh `rampart dev` cluster of the binary (127.0.0.1:2379, :22379, :32379;
# data under target/bench-ab), puts every key first for range workloads, runs the load with
# BINARY_A's load generator for both, and prints one line: op/s, p50/p99 µs, errors, and CPU µs
# per op for the three members together and each member (largest first).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 2 ]; then
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
a=$(realpath "$1")
b=$(realpath "$2")
rounds=${BENCH_ROUNDS:-3}
workload=${BENCH_WORKLOAD:-put}
rate=${BENCH_RATE:-4000}
clients=${BENCH_CLIENTS:-64}
duration=${BENCH_DURATION:-8s}
dir=$PWD/target/bench-ab
endpoints=127.0.0.1:2379,127.0.0.1:22379,127.0.0.1:32379
bench=("$a" bench --endpoints "$endpoints" --key-size 8 --value-size 256 --key-space 10000 --progress-interval 0)

for port in 2379 2380 22379 22380 32379 32380; do
  if ss -Hltn "sport = :$port" | grep -q .; then
    echo "bench-ab: port $port is in use; stop the cluster that listens there" >&2
    exit 1
  fi
done

dev_pid=""
stop() {
  [ -n "$dev_pid" ] || return 0
  kill -INT "$dev_pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$dev_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$dev_pid" 2>/dev/null || true
  pkill -KILL -f "^$dir/" 2>/dev/null || true
  dev_pid=""
  while ss -Hltn | grep -qE ':(2379|22379|32379|2380|22380|32380) '; do sleep 0.2; done
}
trap stop EXIT

# measure NAME BINARY: one run on a fresh cluster of BINARY.
measure() {
  local name=$1 bin=$2 pids before after json
  rm -rf "$dir" && mkdir -p "$dir"
  # Members are found by their command line: the binary is copied under $dir.
  cp "$bin" "$dir/rampart"
  "$dir/rampart" dev --data-dir "$dir/data" >"$dir/dev.log" 2>&1 &
  dev_pid=$!
  for _ in $(seq 100); do
    "${bench[@]}" --workload range --clients 1 --total 1 >/dev/null 2>&1 && break
    sleep 0.2
  done
  pids=$(pgrep -f "^$dir/rampart serve " | tr '\n' ' ')
  case $workload in
    range*|txn) "${bench[@]}" --workload put --prefill --clients 64 --connections 3 --total 1 >/dev/null 2>&1 ;;
  esac
  cpu() { local p; for p in $pids; do awk '{ printf "%d ", $14 + $15 }' "/proc/$p/stat"; done; }
  before=$(cpu)
  json=$("${bench[@]}" --workload "$workload" --clients "$clients" --connections 3 --duration "$duration" \
    --rate "$rate" 2>/dev/null | tail -n 1)
  after=$(cpu)
  stop
  python3 - "$name" "$json" "$before" "$after" <<'EOF'
import json, os, sys
name, r, before, after = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(), sys.argv[4].split()
hz = os.sysconf("SC_CLK_TCK")
per = sorted(((int(b) - int(a)) / hz * 1e6 / max(r["ops"], 1) for a, b in zip(before, after)), reverse=True)
l = r["latency"]
print(f'{name}: {r["ops_per_s"]:,.0f} op/s  p50 {l["p50_us"]} µs  p99 {l["p99_us"]} µs  errors {r["errors"]}  '
      f'CPU {sum(per):.0f} µs/op ({", ".join(f"{x:.0f}" for x in per)})')
EOF
}

echo "bench-ab: $workload, $clients clients, rate ${rate:-0}/s, $duration per run, $rounds rounds"
echo "  A = $1"
echo "  B = $2"
for i in $(seq "$rounds"); do
  if [ $((i % 2)) = 1 ]; then
    measure A "$a"; measure B "$b"
  else
    measure B "$b"; measure A "$a"
  fi
done
