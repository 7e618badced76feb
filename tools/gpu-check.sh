#!/usr/bin/env bash
# The CUDA backend on a machine with an NVIDIA GPU: every fixture model and every benchmark
# model on tract-cuda vs tract on the CPU vs onnxruntime (CPU), with agreement and speed.
# This is the script that measures what the development machine (no GPU) cannot.
#
#   tools/gpu-check.sh [RUNS] [MODEL.onnx ...]       (default: 20 runs; every fixture, plus the
#                                                      benchmark models when they are cached)
#
# Needs: an NVIDIA driver (libcuda.so from the driver), and the CUDA runtime libraries that
# cudarc loads at run time: cudart, cuBLAS, cuDNN and NVRTC. Where they are not installed
# system-wide (Jetson: JetPack has them), the script installs NVIDIA's PyPI wheels into its venv
# (nvidia-cuda-runtime, nvidia-cublas, nvidia-cudnn-cu13, nvidia-cuda-nvrtc: CUDA 13, matching
# the `cuda` feature's cuda-13000) and points the dynamic loader at their lib directories.
# On JetPack 6 (CUDA 12.6) build with EDGEINFER_CUDA_FEATURE=cuda-12060 instead.
#
# Per model it prints: plan nodes on GPU/CPU, p50 per engine, and the largest deviation between
# each pair of engines on the same (sample) input, relative to max(1, max |reference|).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
shift || true
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}"
feature="${EDGEINFER_CUDA_FEATURE:-cuda}"
out="${EDGEINFER_GPU_OUT:-bench-results/$(date -u +%Y%m%d-%H%M%S)-gpu}"
mkdir -p "$out"

echo "== building edgeinfer with --features $feature (glibc: cudarc loads the CUDA libraries at run time)"
cargo build --release --locked -q -p edgeinfer --bin edgeinfer --features "$feature"
BIN="$CARGO_TARGET_DIR/release/edgeinfer"

venv="${EDGEINFER_GPU_VENV:-$HOME/.cache/edgeinfer/gpu-venv}"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import onnxruntime, numpy" 2>/dev/null; then
  echo "== creating $venv (onnxruntime, numpy)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q onnxruntime numpy
fi
PY="$venv/bin/python"

# The CUDA libraries: system-wide when ldconfig knows them, else NVIDIA's wheels in the venv.
have_lib() { ldconfig -p 2>/dev/null | grep -q "$1"; }
if ! { have_lib libcudart.so && have_lib libcublas.so && have_lib libcudnn.so && have_lib libnvrtc.so; }; then
  if ! "$PY" -c "import nvidia" 2>/dev/null; then
    echo "== installing the CUDA 13 runtime wheels (cudart, cuBLAS, cuDNN, NVRTC) into $venv"
    "$venv/bin/pip" install -q nvidia-cuda-runtime nvidia-cublas nvidia-cudnn-cu13 nvidia-cuda-nvrtc
  fi
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  libdirs=$(find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
  export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "== LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/== GPU: /' || echo "== nvidia-smi not found"

models=("$@")
if [[ ${#models[@]} -eq 0 ]]; then
  for d in tests/fixtures/models/*/; do
    [[ -f "$d/model.onnx" ]] || continue
    grep -q expect_error "$d/meta.json" 2>/dev/null && continue
    models+=("$d/model.onnx")
  done
  bench="${EDGEINFER_BENCH_MODELS:-}"
  if [[ -n "$bench" && -d "$bench" ]]; then
    for m in mobilenet_v3_small resnet18 yolov8n_320 yolov8n_640; do
      [[ -f "$bench/$m/model.onnx" ]] && models+=("$bench/$m/model.onnx")
    done
  fi
fi

printf '%-28s %-9s %10s %10s %10s %9s %9s %9s\n' model "gpu/cpu" "cuda ms" "cpu ms" "ort ms" "cuda~cpu" "cuda~ort" "cpu~ort"
for m in "${models[@]}"; do
  name=$(basename "$(dirname "$m")")
  shapes=()
  [[ "$name" == dynamic_hw ]] && shapes=(--input-shape images=1,3,64,64)
  d="$out/$name"
  mkdir -p "$d/cpu" "$d/cuda"
  if ! "$BIN" inspect "$m" "${shapes[@]}" --runs "$runs" --json --dump "$d/cpu" > "$d/cpu.json" 2> "$d/cpu.err"; then
    printf '%-28s cpu plan failed: %s\n' "$name" "$(tail -1 "$d/cpu.err")"; continue
  fi
  if ! "$BIN" inspect "$m" "${shapes[@]}" --cuda --runs "$runs" --json --dump "$d/cuda" > "$d/cuda.json" 2> "$d/cuda.err"; then
    printf '%-28s cuda plan failed: %s\n' "$name" "$(grep -m1 error "$d/cuda.err" || tail -1 "$d/cuda.err")"; continue
  fi
  "$PY" - "$m" "$d" "$runs" <<'PY'
import json, sys, time, pathlib
import numpy as np, onnxruntime as ort
model, d, runs = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
cpu, cuda = json.loads((d / "cpu.json").read_text()), json.loads((d / "cuda.json").read_text())
DT = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i64": np.int64, "i32": np.int32,
      "u8": np.uint8, "i8": np.int8, "bool": np.bool_}
def load(sub, kind, spec):
    p = d / sub / f"{kind}.{spec['name'].replace('/', '_')}.bin"
    return np.frombuffer(p.read_bytes(), dtype=DT[spec["dtype"]]).reshape(spec["shape"])
feeds = {s["name"]: load("cpu", "input", s) for s in cpu["inputs"]}
so = ort.SessionOptions(); so.intra_op_num_threads = 1
sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
ref = sess.run([o["name"] for o in cpu["outputs"]], feeds)
t = []
for _ in range(runs + 1):
    s = time.perf_counter(); sess.run(None, feeds); t.append(time.perf_counter() - s)
ort_ms = float(np.median(t[1:])) * 1e3
def dev(a, b):
    worst = 0.0
    for x, y in zip(a, b):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x - y).max()) / max(1.0, float(np.abs(y).max())))
    return worst
c = [load("cpu", "output", o) for o in cpu["outputs"]]
g = [load("cuda", "output", o) for o in cuda["outputs"]]
pl = cuda.get("placement") or {}
name = pathlib.Path(model).parent.name
print(f"{name:<28} {str(pl.get('gpu_nodes', '?')) + '/' + str(pl.get('cpu_nodes', '?')):<9} "
      f"{cuda['inference']['p50_us'] / 1e3:>10.3f} {cpu['inference']['p50_us'] / 1e3:>10.3f} {ort_ms:>10.3f} "
      f"{dev(g, c):>9.1e} {dev(g, ref):>9.1e} {dev(c, ref):>9.1e}")
PY
done
echo "== outputs, timings and logs under $out"
