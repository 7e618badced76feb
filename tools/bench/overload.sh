#!/usr/bin/env bash
# Overload benchmark: goodput and P99 of served frames at 1x, 2x, 3x and 5x the saturation rate,
# with adaptive overload control on and off, in one invocation on the same broker and cores.
#
#   tools/bench/overload.sh [quick|full] [OUTDIR]
#
# Model: the `slow` fixture (tiny payload, ~25 ms of convolutions), one worker, so the broker and
# the load generator have the other core and the daemon's inference is the bottleneck. Both
# configurations have the same SLO (P99 arrival -> result <= OBJECTIVE) and the same 64-frame
# drop_oldest queue; "off" only sets overload.adaptive = false. Saturation is measured first
# (closed loop); offered rates are multiples of it. Writes JSON per run and overload.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-full}"
out="${2:-bench-results/$(date -u +%Y%m%d-%H%M%S)-overload-$mode}"
mkdir -p "$out"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}"
case "$mode" in
  quick) D=5 ;;
  full) D=20 ;;
  *) echo "usage: $0 [quick|full] [OUTDIR]"; exit 64 ;;
esac
OBJECTIVE_MS="${OBJECTIVE_MS:-250}"
DEVICES=4

echo "== building release binaries (edgeinfer, loadgen)"
cargo build --release --locked -q -p edgeinfer -p edgeinfer-loadgen
BIN="$CARGO_TARGET_DIR/release/edgeinfer"
LG="$CARGO_TARGET_DIR/release/edgeinfer-loadgen"

source tools/bench/lib.sh
start_broker "$out"
svc=""
cleanup() { [[ -n "$svc" ]] && kill "$svc" 2>/dev/null; kill "$mqpid" 2>/dev/null || true; }
trap cleanup EXIT

fx="tests/fixtures/models/slow"
git rev-parse --short HEAD > "$out/commit" 2>/dev/null || echo unknown > "$out/commit"

start_daemon() { # adaptive(true|false) label [fixture] [max_batch]
  local cfg="$out/daemon-$2.toml" model="${3:-$fx}" batch="${4:-1}"
  { config_head bench; cat <<CONF; } > "$cfg"
[pipelines.bench]
model = "$PWD/$model/model.onnx"
input = "bench/+/in/+"
output = "bench/{1}/out/{2}"
format = "raw"
workers = 1
max_batch = $batch
[pipelines.bench.queue]
capacity = 64
policy = "drop_oldest"
[pipelines.bench.slo]
latency = "${OBJECTIVE_MS}ms"
latency_quantile = 0.99
latency_window = "5m"
[pipelines.bench.overload]
adaptive = $1
CONF
  EDGEINFER_LOG=warn "$BIN" run --config "$cfg" > "$out/daemon-$2.log" 2>&1 &
  svc=$!
  sleep 2
}

echo "== saturation: closed loop, $DEVICES devices x window 2, adaptive control off"
start_daemon false sat
"$LG" run --broker "$broker" --fixture "$fx" --devices $DEVICES --window 2 --duration "${D}s" \
  --pid "$svc" --label saturation --json "$out/sat.json" --quiet
stop_service
sat=$(python3 -c "import json; print(json.load(open('$out/sat.json'))['served_fps'])")
echo "   saturation: $sat frames/s"

for mult in 1 2 3 5; do
  for ctl in on off; do
    adaptive=true; [[ $ctl == off ]] && adaptive=false
    rate=$(python3 -c "print($sat * $mult / $DEVICES)")
    echo "== ${mult}x saturation ($rate/s per device), adaptive control $ctl"
    start_daemon "$adaptive" "$mult-$ctl"
    "$LG" run --broker "$broker" --fixture "$fx" --devices $DEVICES --rate "$rate" --duration "${D}s" \
      --timeout 10s --pid "$svc" --label "${mult}x $ctl" --json "$out/load-$mult-$ctl.json" --quiet
    stop_service
  done
done

# Micro-batching lever: saturation of the sensor CNN (symbolic batch axis) with one frame per
# inference and with up to 8, closed loop with enough frames outstanding to fill batches.
cnn="tests/fixtures/models/sensor_cnn"
for b in 1 8; do
  echo "== micro-batching: sensor_cnn saturation, max_batch = $b"
  start_daemon false "batch$b" "$cnn" "$b"
  "$LG" run --broker "$broker" --fixture "$cnn" --devices $DEVICES --window 16 --duration "${D}s" \
    --pid "$svc" --label "batch $b" --json "$out/batch-$b.json" --quiet
  stop_service
done

python3 - "$out" "$sat" "$OBJECTIVE_MS" "$D" > "$out/overload.md" <<'PY'
import json, sys, os, datetime
out, sat, objective, dur = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
commit = open(os.path.join(out, "commit")).read().strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"Overload benchmark, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, commit {commit}, "
      f"{os.cpu_count()} CPUs ({cpu}); `slow` fixture, 1 worker, 4 devices, {dur} s per run, "
      f"SLO P99 <= {objective:.0f} ms, queue 64 drop_oldest. Saturation {sat:.1f} frames/s.\n")
print("| offered | control | offered fps | goodput fps | goodput / saturation | served P50 ms | served P99 ms | P99 / objective | not served |")
print("|---|---|---|---|---|---|---|---|---|")
for mult in (1, 2, 3, 5):
    for ctl in ("on", "off"):
        r = json.load(open(os.path.join(out, f"load-{mult}-{ctl}.json")))
        lat = r["latency_us"]
        p99 = lat["p99"] / 1000
        sent = r["sent"]
        lost = r["lost"]
        print(f"| {mult}x | {ctl} | {r['offered_fps']:.1f} | {r['served_fps']:.1f} | {r['served_fps']/sat:.2f} | "
              f"{lat['p50']/1000:.1f} | {p99:.1f} | {p99/objective:.2f} | {100*lost/max(sent,1):.1f}% |")
b1 = json.load(open(os.path.join(out, "batch-1.json")))
b8 = json.load(open(os.path.join(out, "batch-8.json")))
print(f"\nMicro-batching (sensor CNN, 1 worker, closed loop 4 x 16 outstanding): max_batch 1: "
      f"{b1['served_fps']:.0f} frames/s (CPU {100*(b1.get('service') or {}).get('cpu_utilization', 0):.0f}%), max_batch 8: "
      f"{b8['served_fps']:.0f} frames/s (CPU {100*(b8.get('service') or {}).get('cpu_utilization', 0):.0f}%): "
      f"{b8['served_fps']/max(b1['served_fps'], 1e-9):.2f}x.")
PY
echo "== report: $out/overload.md"
cat "$out/overload.md"
