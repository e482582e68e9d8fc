#!/usr/bin/env bash
# A 3-node cluster on this machine (--cores 1 each): produce to a partition with 3 replicas
# (acknowledged when a majority persisted it) against one with 1 replica, both through their
# leader, alternating in the same session; then partition failover: kill -9 the leader of the
# replicated partition -> first acknowledged produce through a survivor (detection, election,
# leadership gossip and the client's retry included), RUNS times. Usage:
#   perf/replication.sh [SECONDS_PER_RUN] [RUNS] > perf/results/$(date +%F)-replication.txt
# FSYNC=always (default) or never. Uses ./perf-replication on the current filesystem (must not
# be tmpfs), removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
RUNS=${2:-20}
cargo build --release -q
R=./target/release/ringmq
DIR=./perf-replication
rm -rf "$DIR"; mkdir -p "$DIR"
PIDS=(0 0 0)
cleanup() { for p in "${PIDS[@]}"; do [ "$p" != 0 ] && kill -9 "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
BASE=${RINGMQ_PERF_PORT:-19600}
addr() { echo "127.0.0.1:$((BASE + $1))"; }
peer() { echo "127.0.0.1:$((BASE + 100 + $1))"; }
SEEDS="$(peer 1),$(peer 2),$(peer 3)"
ALL="$(addr 1),$(addr 2),$(addr 3)"
FSYNC=${FSYNC:-always}

start() { # NODE
  local n=$1
  $R serve --cores 1 --fsync "$FSYNC" --node-id "$n" --data "$DIR/d$n" --listen "$(addr "$n")" \
    --peer-listen "$(peer "$n")" --seeds "$SEEDS" >>"$DIR/log$n" 2>&1 &
  PIDS[$((n - 1))]=$!
}
wait_formed() {
  for _ in $(seq 1 300); do
    local ok=1
    for n in 1 2 3; do
      $R --server "$(addr "$n")" cluster status --format json 2>/dev/null | python3 -c '
import json,sys; s=json.load(sys.stdin)
sys.exit(0 if s["controller"] and sum(n["alive"] for n in s["nodes"])==3 else 1)' || ok=0
    done
    [ $ok = 1 ] && return 0
    sleep 0.1
  done
  echo "cluster did not form" >&2; exit 1
}
leader_of() { # TOPIC [SERVER]: the leader of partition 0, or 0
  $R --server "${2:-$ALL}" topic describe "$1" --format json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["partitions"][0]["leader"] or 0)' 2>/dev/null || echo 0
}
wait_leader() { # TOPIC
  for _ in $(seq 1 300); do
    local l; l=$(leader_of "$1")
    [ "$l" != 0 ] && [ "$l" != -1 ] && { echo "$l"; return 0; }
    sleep 0.1
  done
  echo "no leader for $1" >&2; exit 1
}
summary() { python3 -c '
import json,sys
j=json.load(sys.stdin); l=j["latency_us"]
print("  %.0f msgs/s, %.2f MB/s, latency us p50 %d p90 %d p99 %d p99.9 %d max %d" % (
  j["msgs_per_s"], j["mb_per_s"], l["p50"], l["p90"], l["p99"], l["p999"], l["max"]))'; }

echo "# ringmq partition replication perf run"
echo "date: $(date -u +%FT%TZ)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
echo "nproc: $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "3 nodes, --cores 1 each, --fsync $FSYNC, on one machine (every replica shares these cores and this disk)"
for n in 1 2 3; do start "$n"; done
wait_formed

$R --server "$ALL" topic create rf1 --partitions 1 --replicas 1 >/dev/null 2>&1
$R --server "$ALL" topic create rf3 --partitions 1 --replicas 3 >/dev/null 2>&1
L1=$(wait_leader rf1); L3=$(wait_leader rf3)
echo "rf1-0 (1 replica) on node $L1; rf3-0 (3 replicas) led by node $L3"
bench() { # TOPIC LEADER ARGS...
  local topic=$1 node=$2; shift 2
  echo "\$ ringmq --server $(addr "$node") bench produce --topic $topic $* --seconds $SECS"
  $R --server "$(addr "$node")" bench produce --topic "$topic" "$@" --seconds "$SECS" --json | summary
}
echo; echo "## one message per request, one in flight"
for round in 1 2 3; do
  bench rf1 "$L1" --producers 1 --batch 1 --window 1
  bench rf3 "$L3" --producers 1 --batch 1 --window 1
done
echo; echo "## batches of 100 x 100 B, 4 producers x 16 in flight"
for round in 1 2 3; do
  bench rf1 "$L1" --producers 4 --batch 100 --window 16
  bench rf3 "$L3" --producers 4 --batch 100 --window 16
done

echo; echo "## partition failover: kill -9 the leader of rf3-0 -> first acknowledged produce"
times=()
for i in $(seq 1 "$RUNS"); do
  L=$(wait_leader rf3)
  SURV="$(addr $(( L % 3 + 1 ))),$(addr $(( (L + 1) % 3 + 1 )))"
  kill -9 "${PIDS[$((L - 1))]}"
  t0=$(date +%s%N)
  echo "failover-$i" | $R --server "$SURV" produce rf3 --partition 0 >/dev/null 2>&1 ||
    { echo "run $i: the produce failed" >&2; exit 1; }
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  times+=("$ms")
  echo "run $i: killed leader node $L; acknowledged through a survivor after $ms ms (now led by $(leader_of rf3 "$SURV"))"
  start "$L"
  wait_formed
done
python3 -c '
import sys
v=sorted(int(x) for x in sys.argv[1:]); n=len(v)
pct=lambda q: v[min(n-1, int(q*n))]
print("partition failover ms over %d runs: p50 %d, p90 %d, p99 %d, min %d, max %d" % (n, pct(0.5), pct(0.9), pct(0.99), v[0], v[-1]))' "${times[@]}"
echo "(the broker defaults: --node-failure-timeout-ms 1000, --election-timeout-ms 1000)"
# Every message acknowledged during the failovers is there once.
got=$($R --server "$ALL" consume rf3 --from earliest --idle-ms 1500 2>/dev/null | grep -c '^failover-' || true)
echo "failover messages readable afterwards: $got of $RUNS"
