#!/usr/bin/env bash
# Runs the machine's ceilings and ringmq's standard scenarios in one go, printing everything
# with the commands. Usage: perf/run.sh [SECONDS_PER_SCENARIO] > perf/results/$(date +%F).txt
# Installs fio, iperf3 and sockperf (Debian) if missing. Uses ./perf-scratch on the current
# filesystem (must not be tmpfs) and removes it afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-5}
need=()
for t in fio iperf3 sockperf; do command -v "$t" >/dev/null || need+=("$t"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q
R=./target/release/ringmq
SCRATCH=./perf-scratch
mkdir -p "$SCRATCH"
trap 'rm -rf "$SCRATCH"; pkill -f "sockperf server" || true; pkill -f "iperf3 -s" || true' EXIT

run() { echo; echo "\$ $*"; "$@"; }

echo "# ringmq perf run"
echo "date: $(date -u +%FT%TZ)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
echo "nproc: $(nproc)"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "kernel: $(uname -r)"
echo "filesystem: $(df -T "$SCRATCH" | awk 'NR==2{print $1" "$2}')"

echo; echo "## ceilings"
fio_json() { # NAME ARGS... : runs fio with JSON output, prints the command first
  echo; echo "\$ fio $*"
  fio "$@" --output-format=json > "$SCRATCH/fio.json"
}
for qd in 1 8; do
  fio_json --name=seqwrite-qd$qd --filename="$SCRATCH/fio.dat" --size=1G --bs=64k --rw=write \
    --direct=1 --ioengine=io_uring --iodepth=$qd --runtime="$SECS" --time_based
  python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]["write"]; print("O_DIRECT seq write 64k qd%s: %.1f MB/s" % (sys.argv[2], j["bw_bytes"]/1e6))' "$SCRATCH/fio.json" $qd
done
fio_json --name=fdatasync4k --filename="$SCRATCH/fio-sync.dat" --size=256M --bs=4k --rw=write \
  --direct=1 --ioengine=sync --fdatasync=1 --runtime="$SECS" --time_based
python3 -c '
import json,sys
j=json.load(open(sys.argv[1]))["jobs"][0]
s=j["sync"]["lat_ns"]["percentile"]; w=j["write"]["clat_ns"]["percentile"]
print("fdatasync after a 4k O_DIRECT write: p50 %.0f us p99 %.0f us p99.9 %.0f us; the write: p50 %.0f us p99 %.0f us" % (
  s["50.000000"]/1e3, s["99.000000"]/1e3, s["99.900000"]/1e3, w["50.000000"]/1e3, w["99.000000"]/1e3))' "$SCRATCH/fio.json"
iperf3 -s -D -1 >/dev/null 2>&1; sleep 0.5
run iperf3 -c 127.0.0.1 -t "$SECS" -f g | grep -E "sender|receiver"
sockperf server -i 127.0.0.1 -p 11111 >/dev/null 2>&1 & sleep 0.5
run sockperf ping-pong -i 127.0.0.1 -p 11111 -m 64 -t "$SECS" | grep -E "Summary|percentile 50.000|percentile 99.000|percentile 99.900"
# The floor every latency target is a ratio to: a blocking 64 B ping-pong paced exactly like
# `bench produce --rate` (sleep, then spin the last 200 us), at the rates of the scenarios below.
for rate in 0 1000 10000; do run $R bench floor --rate $rate --seconds "$SECS"; done

echo; echo "## storage (ringmq bench log, no broker)"
for a in "1 1024 always" "8 1024 always" "64 1024 always" "1 1024 never" "1 65536 never" "64 65536 always"; do
  set -- $a
  run $R bench log --dir "$SCRATCH/log" --appenders "$1" --batch-bytes "$2" --fsync "$3" --seconds "$SECS"
done

echo; echo "## broker (ringmq bench produce; broker started per run on $SCRATCH)"
P="$R bench produce --data $SCRATCH/data --seconds $SECS"
run $P --producers 4 --message-bytes 100 --batch 1000 --partitions 4 --fsync never
run $P --producers 8 --message-bytes 1024 --batch 64 --partitions 4 --fsync never
run $P --producers 8 --message-bytes 1024 --batch 64 --partitions 4 --fsync always
run $P --producers 1 --message-bytes 100 --batch 1 --window 1 --partitions 1 --fsync never
run $P --producers 1 --message-bytes 100 --batch 1 --window 1 --partitions 1 --fsync always --rate 1000
run $P --producers 1 --message-bytes 100 --batch 1 --window 1 --partitions 1 --fsync never --rate 1000
run $P --producers 1 --message-bytes 100 --batch 1 --window 1 --partitions 1 --fsync never --rate 10000
run $P --producers 4 --message-bytes 100 --batch 1 --window 16 --partitions 4 --fsync never
run $P --producers 4 --message-bytes 100 --batch 1 --window 16 --partitions 4 --fsync always
run $P --producers 4 --message-bytes 100 --batch 1000 --partitions 4 --fsync never --cores 1
run $P --producers 4 --message-bytes 100 --batch 1000 --partitions 4 --fsync never --cores 2
run $P --producers 8 --message-bytes 1024 --batch 64 --partitions 4 --fsync never --cores 1
run $P --producers 8 --message-bytes 1024 --batch 64 --partitions 4 --fsync never --cores 2

echo; echo "## consume, e2e, queue, fan-out, rebalance"
B="$R bench"
D="--data $SCRATCH/data"
run $B consume $D --consumers 1 --partitions 4 --messages 2000000
run $B consume $D --consumers 2 --partitions 4 --messages 2000000
run $B e2e $D --rate 10000 --seconds "$SECS"
run $B e2e $D --rate 10000 --seconds "$SECS" --fsync always
for n in 1 2 4; do run $B queue $D --consumers $n; done
run $B fanout $D --mode pattern --rate 10000 --seconds "$SECS"
run $B fanout $D --mode pattern --rate 10000 --reject-percent 90 --seconds "$SECS"
for n in 1 10 100; do run $B fanout $D --mode multicast --destinations $n --seconds "$SECS"; done
run $B rebalance $D
