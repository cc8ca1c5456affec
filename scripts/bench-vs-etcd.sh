#!/usr/bin/env bash
# Rampart against etcd 3.4 on this machine, one command: the same 3-member topology on loopback,
# the same durability (every write fsynced on a quorum before it is acknowledged), the same load
# generator (`rampart bench`, etcd v3 gRPC API), the same workloads, alternating the two systems
# workload by workload. Writes the table into docs/performance.md between the
# `bench-vs-etcd` markers (the hand-written text around them is kept).
#
# Usage: scripts/bench-vs-etcd.sh
# Environment (all optional):
#   BENCH_DURATION=10s     measured time of each workload on each system
#   BENCH_OUT=docs/performance.md
#   BENCH_DIR=target       where the temporary data dirs go (must be a real disk, not tmpfs)
#   BENCH_SKIP_BUILD=1     use the existing target/release binaries
#   BENCH_KEEP=1           keep the data dirs, logs and raw JSON results after the run
#   BENCH_PROFILE=1        also record `perf` on the Rampart leader during an extra put run
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

duration=${BENCH_DURATION:-10s}
out=${BENCH_OUT:-docs/performance.md}
key_size=8
value_size=256
key_space=10000
# Both systems get the same space quota, above the 2 GiB default: the capacity phase writes over
# 1 GiB of values, and the two stores do not take the same space for it.
quota=$((8 * 1024 * 1024 * 1024))

log() { echo "bench-vs-etcd: $*" >&2; }

# (a) etcd 3.4 and etcdctl, from Debian.
if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
  log "installing etcd-server and etcd-client"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q etcd-server etcd-client
fi
etcd_version=$(etcd --version | sed -n 's/^etcd Version: //p')
case "$etcd_version" in
  3.4.*) ;;
  *) log "warning: etcd $etcd_version is not 3.4; the comparison is meant against etcd 3.4" ;;
esac

# What is measured, named before the build: edits made while the benchmark runs are not in it.
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi

# (b) Rampart, release build. The load generator is `rampart bench`.
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  log "building rampart (release)"
  cargo build --release -p rampart-cli
fi
rampart=$repo/target/release/rampart
bench=("$rampart" bench)
log "load generator: ${bench[*]}"

# (c) Two 3-member clusters on loopback. Ports 31x79/31x80 (etcd) and 41x79/41x80 (Rampart) are
# away from etcd's defaults and from the tests' addresses (127.a.b.n with etcd's ports).
mkdir -p "${BENCH_DIR:-$repo/target}"
work=$(mktemp -d "$(cd "${BENCH_DIR:-$repo/target}" && pwd)/bench-vs-etcd.XXXXXX")
# stat -f names ext4 "ext2/ext3" (one magic number for the family); the mount table says which.
fs=$(findmnt -no FSTYPE --target "$work" 2>/dev/null || stat -f -c %T "$work")
if [ "$fs" = tmpfs ] || [ "$fs" = ramfs ]; then
  log "$work is on $fs; fsync would be free there. Set BENCH_DIR to a directory on a real disk."
  exit 1
fi

pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${BENCH_KEEP:-}" ] || [ $status != 0 ]; then
    log "kept $work (logs, data dirs, results.jsonl)"
  else
    rm -rf "$work"
  fi
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# client_url SYSTEM MEMBER, peer_url SYSTEM MEMBER
base_port() { if [ "$1" = etcd ]; then echo 31000; else echo 41000; fi; }
client_url() { echo "http://127.0.0.1:$(( $(base_port "$1") + $2 * 100 + 79 ))"; }
peer_url() { echo "http://127.0.0.1:$(( $(base_port "$1") + $2 * 100 + 80 ))"; }

start_cluster() {
  local system=$1 cluster="" i
  for i in 1 2 3; do
    for url in "$(client_url "$system" "$i")" "$(peer_url "$system" "$i")"; do
      if ss -Hltn "sport = :${url##*:}" | grep -q .; then
        log "port ${url##*:} is already in use; stop whatever listens there"
        exit 1
      fi
    done
    cluster+="${cluster:+,}m$i=$(peer_url "$system" "$i")"
  done
  echo "$cluster" >"$work/$system.cluster"
  for i in 1 2 3; do
    start_member "$system" "$i"
  done
}

# start_member SYSTEM MEMBER: (re)starts one member with the same flags (an existing data dir is
# reused, as after a crash).
start_member() {
  local system=$1 i=$2 cmd
  if [ "$system" = etcd ]; then cmd=(etcd); else cmd=("$rampart" serve); fi
  mkdir -p "$work/$system"
  "${cmd[@]}" --name "m$i" --data-dir "$work/$system/m$i" \
    --listen-client-urls "$(client_url "$system" "$i")" --advertise-client-urls "$(client_url "$system" "$i")" \
    --listen-peer-urls "$(peer_url "$system" "$i")" --initial-advertise-peer-urls "$(peer_url "$system" "$i")" \
    --initial-cluster "$(cat "$work/$system.cluster")" --initial-cluster-token "bench-$system" --initial-cluster-state new \
    --quota-backend-bytes "$quota" \
    >>"$work/$system/m$i.log" 2>&1 &
  pids+=($!)
  echo $! >"$work/$system/m$i.pid"
}

# host:port without the scheme: `etcdctl endpoint status` 3.4 sends an http:// endpoint as the
# HTTP/2 :authority, which Rampart's HTTP/2 server (hyper) refuses with PROTOCOL_ERROR.
endpoints() { local u1 u2 u3; u1=$(client_url "$1" 1) u2=$(client_url "$1" 2) u3=$(client_url "$1" 3); echo "${u1#http://},${u2#http://},${u3#http://}"; }

wait_healthy() {
  local system=$1
  for _ in $(seq 60); do
    if etcdctl --endpoints="$(endpoints "$system")" --command-timeout=2s endpoint health >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.5
  done
  log "$system did not become healthy in 30 s; logs in $work/$system"
  exit 1
}

# The endpoints with the leader first, so a 1-client run talks to the leader on both systems.
leader_first() {
  local system=$1
  etcdctl --endpoints="$(endpoints "$system")" endpoint status -w json | python3 -c '
import json, sys
members = json.load(sys.stdin)
leader = [m["Endpoint"] for m in members if m["Status"]["leader"] == m["Status"]["header"]["member_id"]]
rest = [m["Endpoint"] for m in members if m["Endpoint"] not in leader]
print(",".join(leader + rest))'
}

# Both systems share 2 cores with the load generator: anything else running skews the numbers.
load_before=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load_before" 'BEGIN { exit !(l > 1.0) }'; then
  log "warning: load average is $load_before before the run; other processes will skew the numbers"
fi
log "starting etcd $etcd_version and rampart, 3 members each, data in $work"
start_cluster etcd
start_cluster rampart
wait_healthy etcd
wait_healthy rampart
declare -A eps
for system in etcd rampart; do
  eps[$system]=$(leader_first "$system")
  log "$system endpoints (leader first): ${eps[$system]}"
done

results=$work/results.jsonl
: >"$results"

# cpu_ticks SYSTEM: CPU time (user + system, in clock ticks) used so far by each of the system's
# three members, space-separated.
cpu_ticks() {
  local i
  for i in 1 2 3; do awk '{ printf "%d ", $14 + $15 }' "/proc/$(cat "$work/$1/m$i.pid")/stat"; done
}

# settle: before each measured run, write dirty pages out and wait (at most SETTLE_MAX_S) until
# the six members together use under 10% of a core for a second, so neither system's run pays
# for the other's background work (etcd's backend commits and snapshots, Rampart's MVCC commits,
# writeback of the previous run's data). Idle, etcd's three members use 3-5% of a core and
# Rampart's 1-3% (heartbeats, timers).
SETTLE_MAX_S=15
settle() {
  sync
  local t ticks0 ticks1 hz
  hz=$(getconf CLK_TCK)
  for ((t = 0; t < SETTLE_MAX_S; t++)); do
    ticks0=$(cpu_ticks etcd; cpu_ticks rampart)
    sleep 1
    ticks1=$(cpu_ticks etcd; cpu_ticks rampart)
    if python3 -c 'import sys; a=sum(map(int,sys.argv[1].split())); b=sum(map(int,sys.argv[2].split())); sys.exit(0 if (b-a) < 0.10*int(sys.argv[3]) else 1)' "$ticks0" "$ticks1" "$hz"; then
      return
    fi
  done
  log "members still busy after ${SETTLE_MAX_S}s; measuring anyway"
}

# run SYSTEM NAME FLAGS...: one measured run, its JSON line appended to results.jsonl with the
# run's name and the members' CPU time per operation; a failure is recorded (with its message)
# instead of stopping the script.
run() {
  local system=$1 name=$2
  shift 2
  settle
  log "$name on $system"
  local json err before after
  err=$work/$system-$name.err
  before=$(cpu_ticks "$system")
  if json=$(timeout -k 5 300 "${bench[@]}" --endpoints "${eps[$system]}" --label "$system" \
      --key-size $key_size --value-size $value_size --key-space $key_space --progress-interval 5s "$@" 2>"$err"); then
    after=$(cpu_ticks "$system")
    grep -v '^bench:' "$err" >&2 || true
    # Server CPU per operation: far steadier than op/s on a shared machine, and what decides
    # throughput once the machine is CPU-bound (see "Where the limit is" in docs/performance.md).
    python3 -c '
import json, os, sys
r = json.loads(sys.argv[1]); r["name"] = sys.argv[2]
hz = os.sysconf("SC_CLK_TCK")
used = [(int(b) - int(a)) / hz for a, b in zip(sys.argv[3].split(), sys.argv[4].split())]
if r.get("ops"):
    r["server_cpu_us_per_op"] = round(sum(used) * 1e6 / r["ops"], 1)
    r["member_cpu_us_per_op"] = [round(u * 1e6 / r["ops"], 1) for u in used]
print(json.dumps(r))' "$(echo "$json" | tail -n 1)" "$name" "$before" "$after" >>"$results"
  else
    tail -n 3 "$err" >&2
    python3 -c 'import json,sys; print(json.dumps({"name":sys.argv[1],"label":sys.argv[2],"failed":sys.argv[3]}))' \
      "$name" "$system" "$(tail -n 1 "$err" | sed 's/^bench: //')" >>"$results"
  fi
}

# Warm-up, unmeasured: every key of the key space written once (so the reads find values), and a
# few seconds of puts on each system.
for system in etcd rampart; do
  log "warming up $system"
  timeout -k 5 300 "${bench[@]}" --endpoints "${eps[$system]}" --key-size $key_size --value-size $value_size \
    --key-space $key_space --prefill --clients 64 --connections 3 --duration 3s --progress-interval 0 \
    >/dev/null 2>"$work/$system-warmup.err" || { cat "$work/$system-warmup.err" >&2; exit 1; }
done

# The matrix: name, then bench flags. Alternation: even rows etcd first, odd rows rampart first.
matrix=(
  "put-1|--workload put --clients 1 --connections 1"
  "put-64|--workload put --clients 64 --connections 3"
  "put-256|--workload put --clients 256 --connections 3"
  "range-64|--workload range --clients 64 --connections 3"
  "range-serializable-64|--workload range-serializable --clients 64 --connections 3"
  "txn-64|--workload txn --clients 64 --connections 3"
  "watch-16x8|--workload watch --watchers 16 --clients 8 --connections 3"
  "lease-64|--workload lease --clients 64 --connections 3"
)
row=0
for entry in "${matrix[@]}"; do
  name=${entry%%|*}
  read -r -a flags <<<"${entry#*|}"
  if [ $((row % 2)) = 0 ]; then order=(etcd rampart); else order=(rampart etcd); fi
  for system in "${order[@]}"; do
    run "$system" "$name" "${flags[@]}" --duration "$duration"
  done
  row=$((row + 1))
done

# Optional: where Rampart's time goes under put-64, from perf on the leader.
if [ -n "${BENCH_PROFILE:-}" ]; then
  # Asked again: leadership may have moved during the matrix.
  leader_url=$(leader_first rampart)
  leader_url=${leader_url%%,*}
  for i in 1 2 3; do
    [ "$(client_url rampart "$i")" = "http://$leader_url" ] && leader_pid=$(cat "$work/rampart/m$i.pid")
  done
  log "profiling the rampart leader (pid $leader_pid) during put-64"
  perf record -F 999 -g -o "$work/perf.data" -p "$leader_pid" -- sleep 8 2>"$work/perf.err" &
  perf_pid=$!
  "${bench[@]}" --endpoints "${eps[rampart]}" --key-size $key_size --value-size $value_size --key-space $key_space \
    --workload put --clients 64 --connections 3 --duration 8s --progress-interval 0 >/dev/null 2>&1 || true
  wait $perf_pid || true
  perf report -i "$work/perf.data" --no-children --sort dso,sym --percent-limit 1 --stdio 2>/dev/null \
    | grep -v '^$' | head -60 >"$work/perf-report.txt" || true
  cp "$work/perf-report.txt" "$repo/target/bench-vs-etcd-perf-report.txt"
  log "perf report: target/bench-vs-etcd-perf-report.txt"
fi
cp "$results" "$repo/target/bench-vs-etcd-results.jsonl"

# (c2) Capacity: memory per member after 1 million 256-byte keys, then the time a restarted member
# holding about 1 GiB takes to serve reads. On by default; BENCH_CAPACITY=0 skips it (it adds
# several minutes: every key is written through the cluster).
capacity=$work/capacity.jsonl
: >"$capacity"
if [ "${BENCH_CAPACITY:-1}" != 0 ]; then
  cap_keys=${BENCH_CAPACITY_KEYS:-1000000}
  big_keys=${BENCH_CAPACITY_BIG_KEYS:-80000}
  big_value=8192
  rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
  # db_size SYSTEM MEMBER: the member's own dbSize from Maintenance.Status.
  db_size() {
    local u; u=$(client_url "$1" "$2")
    etcdctl --endpoints="${u#http://}" endpoint status -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Status"]["dbSize"])'
  }
  for system in etcd rampart; do
    log "capacity: writing $cap_keys keys of $value_size B to $system"
    started=$(date +%s.%N)
    timeout -k 5 1800 "${bench[@]}" --endpoints "${eps[$system]}" --key-size $key_size --value-size $value_size \
      --key-space "$cap_keys" --prefill --clients 256 --connections 3 --workload range-serializable --total 1 \
      --progress-interval 0 >/dev/null 2>"$work/$system-capacity.err" || { cat "$work/$system-capacity.err" >&2; exit 1; }
    load_s=$(python3 -c "import sys,time; print(round(time.time() - float(sys.argv[1]), 1))" "$started")
    sleep 5 # let followers finish applying
    rss=()
    dbs=()
    for i in 1 2 3; do
      rss+=("$(rss_kib "$(cat "$work/$system/m$i.pid")")")
      dbs+=("$(db_size "$system" "$i")")
    done
    log "capacity: $system RSS per member (KiB): ${rss[*]}; db sizes: ${dbs[*]}; load took ${load_s}s"
    log "capacity: writing $big_keys keys of $big_value B to $system"
    timeout -k 5 1800 "${bench[@]}" --endpoints "${eps[$system]}" --key-size 12 --value-size $big_value \
      --key-space "$big_keys" --prefill --clients 64 --connections 3 --workload range-serializable --total 1 \
      --progress-interval 0 >/dev/null 2>>"$work/$system-capacity.err" || { cat "$work/$system-capacity.err" >&2; exit 1; }
    sleep 5
    # A follower: SIGKILL (a crash), restart with the same flags, and time its first serializable
    # read (served from its own state) and first linearizable read (it has rejoined the cluster).
    leader_url=$(leader_first "$system"); leader_url=${leader_url%%,*}
    victim=""
    for i in 1 2 3; do
      [ "$(client_url "$system" "$i")" != "http://$leader_url" ] && [ -z "$victim" ] && victim=$i
    done
    victim_db=$(db_size "$system" "$victim")
    victim_url=$(client_url "$system" "$victim")
    pid=$(cat "$work/$system/m$victim.pid")
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    log "capacity: restarting $system member m$victim (dbSize $victim_db)"
    started=$(date +%s.%N)
    start_member "$system" "$victim"
    times=$(python3 - "${victim_url#http://}" "$started" <<'PY'
import subprocess, sys, time
ep, started = sys.argv[1], float(sys.argv[2])
def first_ok(extra):
    deadline = time.time() + 300
    while time.time() < deadline:
        r = subprocess.run(["etcdctl", "--endpoints=" + ep, "--command-timeout=1s", "get", "00000001"] + extra,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            return round((time.time() - started) * 1000)
        time.sleep(0.02)
    return None
s = first_ok(["--consistency=s"])
l = first_ok([])
print(s, l)
PY
)
    read -r serial_ms linear_ms <<<"$times"
    log "capacity: $system m$victim serves a serializable read after ${serial_ms} ms, a linearizable one after ${linear_ms} ms"
    python3 -c 'import json,sys; a=sys.argv; print(json.dumps({"system":a[1],"keys":int(a[2]),"rss_kib":[int(x) for x in a[3].split()],"db_bytes":[int(x) for x in a[4].split()],"load_s":float(a[5]),"restart_db_bytes":int(a[6]),"serializable_ms":None if a[7]=="None" else int(a[7]),"linearizable_ms":None if a[8]=="None" else int(a[8])}))' \
      "$system" "$cap_keys" "${rss[*]}" "${dbs[*]}" "$load_s" "$victim_db" "$serial_ms" "$linear_ms" >>"$capacity"
  done
  cp "$capacity" "$repo/target/bench-vs-etcd-capacity.jsonl"
fi

# (d) The table, into $out between the markers.
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
mem_gib=$(awk '/^MemTotal/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)
disk="$fs on $(df --output=source "$work" | tail -n 1)"
python3 - "$results" "$out" "$(date -u '+%Y-%m-%d %H:%M UTC')" "$commit" "$(nproc)" "$cpu" "$mem_gib" "$disk" \
  "$etcd_version" "$duration" "$key_size" "$value_size" "$key_space" "$load_before" <<'EOF'
import json, os, re, sys
results, out, date, commit, nproc, cpu, mem, disk, etcd_version, duration, key_size, value_size, key_space, load = sys.argv[1:]
rows, by = [], {}
for line in open(results):
    r = json.loads(line)
    if r["name"] not in rows:
        rows.append(r["name"])
    by[(r["name"], r["label"])] = r

def cells(r):
    if r is None:
        return ["–", "–", "–", "–"]
    if "failed" in r:
        reason = "not implemented" if "does not implement" in r["failed"] else "failed"
        return [reason, "–", "–", "–"]
    l = r["latency"]
    cpu = f'{r["server_cpu_us_per_op"]:.0f}' if "server_cpu_us_per_op" in r else "–"
    return [f'{r["ops_per_s"]:,.0f}', f'{l["p50_us"] / 1000:.2f}', f'{l["p99_us"] / 1000:.2f}', cpu]

lines = [
    f"Measured {date} at commit `{commit}` by `scripts/bench-vs-etcd.sh`.",
    "",
    f"Machine: {nproc} cores ({cpu}), {mem} GiB memory, data dirs on {disk}; 1-minute load average {load} before the run. "
    f"etcd {etcd_version} and Rampart, 3 members each on 127.0.0.1, default settings, both running "
    f"throughout; each workload runs {duration} per system, alternating which system goes first. "
    f"Keys {key_size} B over a key space of {key_space} (all written before the first run), values {value_size} B; "
    "clients spread over 3 connections, one per member (1 client: one connection, to the leader). "
    "Watch and lease rows count events and keep-alives; p50/p99 are milliseconds; CPU is the CPU time "
    "all three members used during the run, in microseconds per operation (lower is better).",
    "",
    "| workload | etcd op/s | etcd p50 | etcd p99 | etcd CPU | rampart op/s | rampart p50 | rampart p99 | rampart CPU | rampart/etcd op/s | etcd/rampart CPU |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for name in rows:
    e, r = by.get((name, "etcd")), by.get((name, "rampart"))
    ok = lambda x: x is not None and "failed" not in x and x["ops_per_s"] > 0
    ratio = f'{r["ops_per_s"] / e["ops_per_s"]:.2f}' if ok(e) and ok(r) else "–"
    has_cpu = lambda x: ok(x) and x.get("server_cpu_us_per_op")
    cpu_ratio = f'{e["server_cpu_us_per_op"] / r["server_cpu_us_per_op"]:.2f}' if has_cpu(e) and has_cpu(r) else "–"
    lines.append("| " + " | ".join([name] + cells(e) + cells(r) + [ratio, cpu_ratio]) + " |")
errors = [(k, v) for k, v in by.items() if "failed" not in v and v.get("errors")]
for (name, label), v in errors:
    lines.append("")
    lines.append(f"{label} {name}: {v['errors']} errors, e.g. {v.get('error_samples', [''])[0]}")
failed = sorted({v["failed"] for v in by.values() if "failed" in v})
for f in failed:
    lines.append("")
    lines.append(f"Not run: {f}")
table = "\n".join(lines)

begin, end = "<!-- bench-vs-etcd:begin -->", "<!-- bench-vs-etcd:end -->"
block = f"{begin}\n{table}\n{end}"
text = open(out).read() if os.path.exists(out) else ""
if begin in text and end in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
else:
    text = (text or "# Performance\n") + f"\n## Rampart against etcd 3.4\n\n{block}\n"
open(out, "w").write(text)
print(table)
EOF
if [ -s "$capacity" ]; then
python3 - "$capacity" "$out" "$(date -u '+%Y-%m-%d %H:%M UTC')" "$commit" <<'EOF'
import json, os, re, sys
capacity, out, date, commit = sys.argv[1:]
by = {r["system"]: r for r in map(json.loads, open(capacity))}
e, r = by.get("etcd"), by.get("rampart")
mib = lambda b: b / 1048576
def row(name, f, fmt):
    ev, rv = (f(x) if x else None for x in (e, r))
    cell = lambda v: "–" if v is None else fmt.format(v)
    ratio = f"{rv / ev:.2f}" if ev and rv is not None else "–"
    return f"| {name} | {cell(ev)} | {cell(rv)} | {ratio} |"
mean = lambda xs: sum(xs) / len(xs)
keys = (e or r)["keys"]
lines = [
    f"Measured {date} at commit `{commit}` by `scripts/bench-vs-etcd.sh` (capacity phase), same clusters as above.",
    "",
    f"{keys:,} keys of 256 B written through the cluster (256 clients), RSS of each member read from /proc afterwards; "
    "then 8 KiB values added until each member holds about 1 GiB, a follower killed with SIGKILL and restarted with the "
    "same flags (both with an 8 GiB space quota), and the time from its start to its first successful `etcdctl get` measured (serializable: served from "
    "its own state; linearizable: it has rejoined the cluster). Lower is better in every row.",
    "",
    "| measure | etcd | rampart | rampart/etcd |",
    "|---|---:|---:|---:|",
    row(f"RSS per member after {keys:,} keys, MiB (mean of 3)", lambda x: mib(mean(x["rss_kib"]) * 1024), "{:,.0f}"),
    row(f"RSS per member after {keys:,} keys, MiB (largest)", lambda x: mib(max(x["rss_kib"]) * 1024), "{:,.0f}"),
    row(f"dbSize per member after {keys:,} keys, MiB (mean)", lambda x: mib(mean(x["db_bytes"])), "{:,.0f}"),
    row("dbSize of the restarted member, MiB", lambda x: mib(x["restart_db_bytes"]), "{:,.0f}"),
    row("restart to first serializable read, ms", lambda x: x["serializable_ms"], "{:,}"),
    row("restart to first linearizable read, ms", lambda x: x["linearizable_ms"], "{:,}"),
    row(f"time to write the {keys:,} keys, s", lambda x: x["load_s"], "{:,.1f}"),
]
table = "\n".join(lines)
begin, end = "<!-- bench-capacity:begin -->", "<!-- bench-capacity:end -->"
block = f"{begin}\n{table}\n{end}"
text = open(out).read()
if begin in text and end in text:
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
else:
    text = text.replace("<!-- bench-vs-etcd:end -->", "<!-- bench-vs-etcd:end -->\n\n### Memory and restart\n\n" + block, 1)
open(out, "w").write(text)
print(table)
EOF
fi
log "wrote $out"
