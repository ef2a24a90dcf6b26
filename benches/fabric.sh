#!/usr/bin/env bash
# Reproduces the fabric figures in BENCHMARKS.md: dase dnode (memory namespace,
# one runtime thread, pinned to CPU 0) served to dase bench (pinned to CPU 1),
# each shape run REPS times for RUNTIME seconds with --ceiling; prints the
# median run of each shape as a markdown row.
#   benches/fabric.sh [RUNTIME=10] [REPS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${1:-10}
REPS=${2:-3}
cargo build --release -q -p dase-tools
BIN=build/release/dase
PORT=$((20000 + RANDOM % 20000))
NQN=nqn.2026-11.io.dase:bench
taskset -c 0 "$BIN" dnode --threads 1 --listen 127.0.0.1:$PORT --nqn $NQN --namespace memory --size 4G --log warn >/dev/null &
DNODE=$!
trap 'kill $DNODE 2>/dev/null; wait $DNODE 2>/dev/null || true' EXIT
sleep 1
URI=nvme-tcp://127.0.0.1:$PORT/$NQN/1
# Lay the data down once so reads hit written pages.
"$BIN" bench --filename "$URI" --rw write --bs 1m --iodepth 8 --size 4g >/dev/null
echo "| shape | IOPS | bandwidth | mean lat (us) | p99 (us) | ceiling IOPS | of ceiling | bench core-s/M IO | target core-s/M IO |"
echo "|---|---|---|---|---|---|---|---|---|"
for shape in "randread 4k 32" "randread 4k 1" "read 128k 16" "write 128k 16"; do
  set -- $shape
  rows=()
  for _ in $(seq "$REPS"); do
    json=$("$BIN" bench --cpus_allowed 1 --filename "$URI" --rw "$1" --bs "$2" --iodepth "$3" \
      --runtime "$RUNTIME" --time_based --ramp_time 1 --ceiling --output-format json)
    rows+=("$(python3 -c '
import json,sys
d=json.loads(sys.stdin.read()); j=d["jobs"][0]; op="write" if "write" in sys.argv[1] else "read"
s=j[op]; c=d["dase"]["ceiling"]; cpu=d["dase"]["cpu"]
ci=c[op+"_iops"] if sys.argv[3]!="1" else 1e6/c["qd1_read_round_trip_us"]
print(s["iops"], s["bw_bytes"], s["clat_ns"]["mean"]/1e3, s["clat_ns"]["percentile"]["99.000000"]/1e3, ci, s["iops"]/ci, cpu["bench_core_s_per_million_ios"], cpu["target_core_s_per_million_ios"] or 0)
' "$1" "$2" "$3" <<<"$json")")
  done
  # Median by IOPS.
  med=$(printf '%s\n' "${rows[@]}" | sort -g -k1 | sed -n "$(( (REPS + 1) / 2 ))p")
  read -r iops bw lat p99 ci frac bcpu tcpu <<<"$med"
  printf '| %s %s QD%s | %.0fK | %.2f GiB/s | %.1f | %.1f | %.0fK | %.0f%% | %.2f | %.2f |\n' \
    "$1" "$2" "$3" "$(echo "$iops/1000" | bc -l)" "$(echo "$bw/1073741824" | bc -l)" "$lat" "$p99" \
    "$(echo "$ci/1000" | bc -l)" "$(echo "$frac*100" | bc -l)" "$bcpu" "$tcpu"
done
