#!/usr/bin/env bash
# The benchmark: edgeinfer against raw tract, raw onnxruntime and the Python baseline service
# (tools/baseline), in one invocation, on the same broker and cores, for the sensor CNN and the
# MobileNet fixtures. Writes JSON per measurement, a markdown report and a latency plot.
#
#   tools/bench/bench.sh [quick|full] [OUTDIR]
#
# quick: short runs (~5 min), for checking the harness; full: the numbers the README reports
# (~20 min). Everything is reported as ratios measured side by side in the same run: this
# machine is shared and noisy, so absolute times move between runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-full}"
out="${2:-bench-results/$(date -u +%Y%m%d-%H%M%S)-$mode}"
mkdir -p "$out"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}"

case "$mode" in
  quick) D=4; SOAK=10; RSS_FRAMES=2000; COLD=3; RUNS_SMALL=300; RUNS_BIG=30 ;;
  full) D=15; SOAK=120; RSS_FRAMES=10000; COLD=7; RUNS_SMALL=2000; RUNS_BIG=200 ;;
  *) echo "usage: $0 [quick|full] [OUTDIR]"; exit 64 ;;
esac

echo "== building release binaries (edgeinfer with the multithread lever, loadgen)"
cargo build --release --locked -q -p edgeinfer -p edgeinfer-loadgen --features edgeinfer/multithread
BIN="$CARGO_TARGET_DIR/release/edgeinfer"
LG="$CARGO_TARGET_DIR/release/edgeinfer-loadgen"

venv="${EDGEINFER_BENCH_VENV:-$HOME/.cache/edgeinfer/bench-venv}"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import onnxruntime, paho.mqtt, matplotlib" 2>/dev/null; then
  echo "== creating the baseline venv in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tools/baseline/requirements.txt
fi
PY="$venv/bin/python"

# A broker of our own on a free port (tools/bench/lib.sh).
source tools/bench/lib.sh
start_broker "$out"
svc=""
cleanup() { [[ -n "$svc" ]] && kill "$svc" 2>/dev/null; kill "$mqpid" 2>/dev/null || true; }
trap cleanup EXIT

ncpu=$(nproc)
workers=$(( ncpu > 1 ? ncpu - 1 : 1 ))
devices=4
git rev-parse --short HEAD > "$out/commit" 2>/dev/null || echo unknown > "$out/commit"
{
  echo "{\"date\": \"$(date -u +%Y-%m-%dT%H:%MZ)\", \"mode\": \"$mode\", \"cpus\": $ncpu, \"workers\": $workers,"
  echo " \"cpu_model\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\","
  echo " \"commit\": \"$(cat "$out/commit")\", \"kernel\": \"$(uname -r)\"}"
} > "$out/machine.json"

daemon_config() { # model fixture dir -> config path
  local fx="$1" cfg="$out/daemon-$(basename "$1").toml"
  { config_head bench; cat <<CONF; } > "$cfg"
[pipelines.bench]
model = "$PWD/$fx/model.onnx"
input = "bench/+/in/+"
output = "bench/{1}/out/{2}"
format = "raw"
max_payload = "2MiB"
workers = $workers
[pipelines.bench.queue]
capacity = 64
CONF
  echo "$cfg"
}

start_service() { # kind fixture -> sets $svc
  local kind="$1" fx="$2"
  if [[ "$kind" == daemon ]]; then
    EDGEINFER_LOG=warn "$BIN" run --config "$(daemon_config "$fx")" > "$out/$kind-$(basename "$fx").log" 2>&1 &
  else
    "$PY" tools/baseline/service.py --broker "$broker" --model "$fx/model.onnx" --input-filter 'bench/+/in/+' \
      --output 'bench/{1}/out/{2}' --format raw --workers "$workers" --queue-capacity 64 \
      > "$out/$kind-$(basename "$fx").log" 2>&1 &
  fi
  svc=$!
  sleep 2
}

served_fps() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['served_fps'])" "$1"; }

for model in sensor_cnn mobilenet; do
  fx="tests/fixtures/models/$model"
  runs=$RUNS_SMALL; [[ "$model" == mobilenet ]] && runs=$RUNS_BIG
  echo "== $model: raw tract and raw onnxruntime, 1 thread"
  "$BIN" inspect "$fx/model.onnx" --runs "$runs" --json > "$out/$model.tract.json"
  "$PY" tools/baseline/ort_bench.py --model "$fx/model.onnx" --runs "$runs" --threads 1 > "$out/$model.ort.json"
  echo "== $model: tract levers"
  "$BIN" inspect "$fx/model.onnx" --runs "$runs" --threads 2 --json > "$out/$model.tract-threads2.json"
  "$BIN" inspect "$fx/model.onnx" --runs $(( runs / 10 + 3 )) --f16 --json > "$out/$model.tract-f16.json"
  if [[ "$model" == sensor_cnn ]]; then
    "$BIN" inspect "$fx/model.onnx" --runs "$runs" --batch 8 --json > "$out/$model.tract-batch8.json"
  fi
  "$PY" tools/baseline/ort_bench.py --model "$fx/model.onnx" --runs "$runs" --threads 2 > "$out/$model.ort-threads2.json"

  for kind in daemon baseline; do
    echo "== $model / $kind: cold start (spawn -> first result)"
    if [[ "$kind" == daemon ]]; then
      cmd=(env EDGEINFER_LOG=warn "$BIN" run --config "$(daemon_config "$fx")")
    else
      cmd=("$PY" tools/baseline/service.py --broker "$broker" --model "$fx/model.onnx" --input-filter 'bench/+/in/+'
           --output 'bench/{1}/out/{2}' --format raw --workers "$workers")
    fi
    "$LG" coldstart --broker "$broker" --fixture "$fx" --repeat "$COLD" --label "$kind" \
      --json "$out/$model.$kind.cold.json" -- "${cmd[@]}"

    start_service "$kind" "$fx"
    echo "== $model / $kind: saturation (closed loop, $devices devices x window 4)"
    "$LG" run --broker "$broker" --fixture "$fx" --devices $devices --window 4 --duration "${D}s" \
      --pid "$svc" --label "$kind saturation" --json "$out/$model.$kind.sat.json" --quiet
    sat=$(served_fps "$out/$model.$kind.sat.json")
    for pct in 50 90; do
      rate=$("$PY" -c "print(max(0.5, $sat * $pct / 100 / $devices))")
      echo "== $model / $kind: open loop at $pct% of saturation ($rate/s per device)"
      "$LG" run --broker "$broker" --fixture "$fx" --devices $devices --rate "$rate" --duration "${D}s" \
        --pid "$svc" --label "$kind $pct%" --json "$out/$model.$kind.load$pct.json" \
        --samples "$out/$model.$kind.load$pct.samples.json" --quiet
    done
    rate=$("$PY" -c "print(max(0.5, $sat * 0.7 / $devices))")
    dur=$("$PY" -c "print(max(2.0, $RSS_FRAMES / ($sat * 0.7)))")
    echo "== $model / $kind: RSS after $RSS_FRAMES frames, then a ${SOAK}s soak"
    "$LG" run --broker "$broker" --fixture "$fx" --devices $devices --rate "$rate" --duration "${dur}s" \
      --pid "$svc" --label "$kind rss" --json "$out/$model.$kind.rss.json" --quiet
    "$LG" run --broker "$broker" --fixture "$fx" --devices $devices --rate "$rate" --duration "${SOAK}s" \
      --pid "$svc" --label "$kind soak" --json "$out/$model.$kind.soak.json" --quiet
    stop_service
  done
done

"$PY" tools/bench/report.py "$out" > "$out/report.md"
echo "== report: $out/report.md (plot: $out/latency.png)"
cat "$out/report.md"
