#!/usr/bin/env bash
# Inference speed of camera-class models: tract (edgeinfer inspect) against onnxruntime, one
# model after the other in one run, with per-op profiles of both. Writes JSON per measurement
# and OUTDIR/inference.md (tools/bench/inference_report.py), the tables of
# docs/performance/inference.md.
#
#   tools/bench/inference.sh [quick|full] [OUTDIR] [MODEL ...]
#
# Models: the fixtures sensor_cnn, mobilenet and detector_v8, and the benchmark architectures
# tools/bench/models.py exports with random weights (MobileNetV3-small, ResNet-18, YOLOv8n at
# 320 and 640, and a YOLOv8n with [batch, 3, height, width] for batching). The exported models
# are large, so they are generated here on first use and cached outside the repository
# ($EDGEINFER_BENCH_MODELS, default ~/.cache/edgeinfer/bench-models/<hash of models.py>), with
# the fixtures' pinned torch environment (tests/fixtures/models/requirements.txt) in
# $EDGEINFER_MODELS_VENV. Nothing is downloaded at run time beyond those pip installs.
#
# Per model: tract 1 thread f32 (with --profile: the per-node table), tract 2 threads, tract
# batch 4 (models with a symbolic batch axis; time per frame), onnxruntime 1 and 2 threads, and
# onnxruntime's own profile. Only ratios within one run mean anything on this shared machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
mode="${1:-full}"
out="${2:-bench-results/$(date -u +%Y%m%d-%H%M%S)-inference-$mode}"
shift $(( $# >= 2 ? 2 : $# ))
mkdir -p "$out"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}"

case "$mode" in
  quick) SMALL=200; MID=20; BIG=5 ;;
  full) SMALL=2000; MID=100; BIG=20 ;;
  *) echo "usage: $0 [quick|full] [OUTDIR] [MODEL ...]"; exit 64 ;;
esac

if [[ -n "${EDGEINFER_BIN:-}" ]]; then
  BIN="$EDGEINFER_BIN"   # a binary built elsewhere (say which profile in the report)
else
  echo "== building the release binary"
  cargo build --release --locked -q -p edgeinfer --bin edgeinfer
  BIN="$CARGO_TARGET_DIR/release/edgeinfer"
fi

venv="${EDGEINFER_BENCH_VENV:-$HOME/.cache/edgeinfer/bench-venv}"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import onnxruntime, numpy" 2>/dev/null; then
  echo "== creating the baseline venv in $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tools/baseline/requirements.txt
fi
PY="$venv/bin/python"

hash=$(sha256sum tools/bench/models.py tests/fixtures/models/requirements.txt | sha256sum | cut -c1-12)
models="${EDGEINFER_BENCH_MODELS:-$HOME/.cache/edgeinfer/bench-models/$hash}"
if [[ ! -f "$models/.complete" ]]; then
  mvenv="${EDGEINFER_MODELS_VENV:-$HOME/.cache/edgeinfer/models-venv}"
  if [[ ! -x "$mvenv/bin/python" ]] || ! "$mvenv/bin/python" -c "import torch, torchvision, onnx" 2>/dev/null; then
    echo "== creating the model-export venv in $mvenv (torch, torchvision, onnx: large)"
    python3 -m venv "$mvenv"
    "$mvenv/bin/pip" install -q -r tests/fixtures/models/requirements.txt
  fi
  echo "== exporting the benchmark models into $models"
  "$mvenv/bin/python" tools/bench/models.py "$models"
  touch "$models/.complete"
fi

git rev-parse --short HEAD > "$out/commit" 2>/dev/null || echo unknown > "$out/commit"
{
  echo "{\"date\": \"$(date -u +%Y-%m-%dT%H:%MZ)\", \"mode\": \"$mode\", \"cpus\": $(nproc),"
  echo " \"cpu_model\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\","
  echo " \"commit\": \"$(cat "$out/commit")\", \"kernel\": \"$(uname -r)\", \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\","
  echo " \"binary\": \"$BIN\"}"
} > "$out/machine.json"

# name path runs [batchable]
all=(
  "sensor_cnn tests/fixtures/models/sensor_cnn/model.onnx $SMALL batch"
  "mobilenet_fixture tests/fixtures/models/mobilenet/model.onnx $MID"
  "detector_v8_fixture tests/fixtures/models/detector_v8/model.onnx $MID"
  "mobilenet_v3_small $models/mobilenet_v3_small_dyn/model.onnx $MID batch"
  "resnet18 $models/resnet18/model.onnx $BIG"
  "yolov8n_320 $models/yolov8n_320/model.onnx $BIG"
  "yolov8n_640 $models/yolov8n_640/model.onnx $BIG"
)
want=("$@")
for entry in "${all[@]}"; do
  read -r name path runs batch <<<"$entry"
  if [[ ${#want[@]} -gt 0 && ! " ${want[*]} " == *" $name "* ]]; then continue; fi
  echo "== $name: tract (1 thread, per-node profile), onnxruntime (1 thread, per-node profile)"
  "$BIN" inspect "$path" --runs "$runs" --profile --top 15 --json > "$out/$name.tract.json"
  "$PY" tools/bench/ort_profile.py --model "$path" --runs "$runs" --top 15 > "$out/$name.ort-profile.json"
  echo "== $name: levers (tract 2 threads; onnxruntime 1 and 2 threads without the profiler)"
  "$BIN" inspect "$path" --runs "$runs" --threads 2 --json > "$out/$name.tract-threads2.json"
  "$PY" tools/baseline/ort_bench.py --model "$path" --runs "$runs" --threads 1 > "$out/$name.ort.json"
  "$PY" tools/baseline/ort_bench.py --model "$path" --runs "$runs" --threads 2 > "$out/$name.ort-threads2.json"
  # The plain tract time again, without the profiler's timers, right after onnxruntime's: the
  # ratio in the report uses these two.
  "$BIN" inspect "$path" --runs "$runs" --json > "$out/$name.tract-plain.json"
  if [[ "${batch:-}" == batch ]]; then
    echo "== $name: batch 4 (per frame)"
    "$BIN" inspect "$path" --runs $(( runs / 4 + 2 )) --batch 4 --json > "$out/$name.tract-batch4.json"
    shape=$("$PY" -c "import json,sys; i=json.load(open(sys.argv[1]))['inputs'][0]; print(i['name'] + '=' + ','.join(['4'] + [str(d) for d in i['shape'][1:]]))" "$out/$name.tract.json")
    "$PY" tools/baseline/ort_bench.py --model "$path" --runs $(( runs / 4 + 2 )) --threads 1 --input-shape "$shape" > "$out/$name.ort-batch4.json"
  fi
done

"$PY" tools/bench/inference_report.py "$out" > "$out/inference.md"
echo "== report: $out/inference.md"
cat "$out/inference.md"
