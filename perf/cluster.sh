#!/usr/bin/env bash
# A 3-node cluster on this machine (--cores 1 each): produce through the partition's leader
# (direct) against through another node (forwarded), alternating in the same session, and
# controller failover (kill -9 the controller leader -> first successful topic creation on a
# survivor), median of RUNS. Usage:
#   perf/cluster.sh [SECONDS_PER_RUN] [RUNS] > perf/results/$(date +%F)-cluster.txt
# Uses ./perf-cluster on the current filesystem (must not be tmpfs), removed afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
RUNS=${2:-10}
cargo build --release -q
R=./target/release/ringmq
DIR=./perf-cluster
rm -rf "$DIR"; mkdir -p "$DIR"
PIDS=(0 0 0)
cleanup() { for p in "${PIDS[@]}"; do [ "$p" != 0 ] && kill -9 "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
BASE=${RINGMQ_PERF_PORT:-19400}
addr() { echo "127.0.0.1:$((BASE + $1))"; }
peer() { echo "127.0.0.1:$((BASE + 100 + $1))"; }
SEEDS="$(peer 1),$(peer 2),$(peer 3)"
ALL="$(addr 1),$(addr 2),$(addr 3)"
FSYNC=${FSYNC:-always}

start() { # NODE
  local n=$1
  $R serve --cores 1 --fsync "$FSYNC" --node-id "$n" --data "$DIR/d$n" --listen "$(addr "$n")" \
    --peer-listen "$(peer "$n")" --seeds "$SEEDS" >"$DIR/log$n" 2>&1 &
  PIDS[$((n - 1))]=$!
}
controller() { $R --server "$ALL" cluster status --format json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["controller"] or 0)' 2>/dev/null || echo 0; }
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

echo "# ringmq cluster perf run"
echo "date: $(date -u +%FT%TZ)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
echo "nproc: $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "3 nodes, --cores 1 each, --fsync $FSYNC, on one machine"
for n in 1 2 3; do start "$n"; done
wait_formed

echo; echo "## forwarded vs direct (same topic, alternating runs)"
$R --server "$(addr 1)" topic create fw --partitions 1 2>/dev/null
LEADER=$($R --server "$(addr 1)" topic describe fw --format json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["partitions"][0]["leader"])')
OTHER=$(( LEADER % 3 + 1 ))
echo "partition fw-0 is led by node $LEADER; forwarded runs go through node $OTHER"
bench() { # LABEL NODE ARGS...
  local label=$1 node=$2; shift 2
  echo; echo "\$ ringmq --server $(addr "$node") bench produce --topic fw $* --seconds $SECS   # $label"
  $R --server "$(addr "$node")" bench produce --topic fw "$@" --seconds "$SECS" --json
}
for round in 1 2 3; do
  bench direct "$LEADER" --producers 1 --batch 1 --window 1
  bench forwarded "$OTHER" --producers 1 --batch 1 --window 1
done
for round in 1 2; do
  bench direct "$LEADER" --producers 4 --batch 100 --window 16
  bench forwarded "$OTHER" --producers 4 --batch 100 --window 16
done

echo; echo "## controller failover: kill -9 the controller leader -> first topic created on a survivor"
times=()
for i in $(seq 1 "$RUNS"); do
  L=$(controller)
  [ "$L" = 0 ] && { echo "no controller leader" >&2; exit 1; }
  S=$(( L % 3 + 1 ))
  kill -9 "${PIDS[$((L - 1))]}"
  t0=$(date +%s%N)
  $R --server "$(addr "$S")" topic create "failover-$i" --partitions 1 2>/dev/null
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  times+=("$ms")
  echo "run $i: killed node $L, created through node $S after $ms ms"
  start "$L"
  wait_formed
done
python3 -c 'import statistics,sys; v=[int(x) for x in sys.argv[1:]]; print("failover ms: median %d, min %d, max %d over %d runs" % (statistics.median(v), min(v), max(v), len(v)))' "${times[@]}"
