#!/usr/bin/env bash
# Allocator comparison for the static builds: the same workload on the x86_64 glibc build, the
# static musl build with musl's own malloc, and the static musl build with mimalloc, one after
# the other on one broker. musl's malloc takes a global lock; whether that matters depends on
# how much the daemon allocates per frame, which is what this measures.
#
#   tools/bench/alloc.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-bench-results/$(date -u +%Y%m%d-%H%M%S)-alloc}"
mkdir -p "$out"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}"
D="${ALLOC_BENCH_SECONDS:-10}"

echo "== builds: glibc release, static musl (musl malloc), static musl + mimalloc"
cargo build --release --locked -q -p edgeinfer -p edgeinfer-loadgen --no-default-features
cp "$CARGO_TARGET_DIR/release/edgeinfer" "$out/edgeinfer-glibc"
tools/build-static.sh x86_64 --no-default-features > "$out/build-musl.log" 2>&1
cp dist/edgeinfer-x86_64-unknown-linux-musl "$out/edgeinfer-musl"
tools/build-static.sh x86_64 --no-default-features --features mimalloc > "$out/build-mimalloc.log" 2>&1
cp dist/edgeinfer-x86_64-unknown-linux-musl "$out/edgeinfer-musl-mimalloc"
LG="$CARGO_TARGET_DIR/release/edgeinfer-loadgen"

source tools/bench/lib.sh
start_broker "$out"
svc=""
trap '[[ -n "$svc" ]] && kill "$svc" 2>/dev/null; kill $mqpid 2>/dev/null || true' EXIT

for workers in 1 2; do
  for variant in glibc musl musl-mimalloc; do
    for model in sensor_cnn digits; do
      fx="tests/fixtures/models/$model"
      cfg="$out/$variant-$model-$workers.toml"
      { config_head alloc; cat <<CONF; } > "$cfg"
[pipelines.bench]
model = "$PWD/$fx/model.onnx"
input = "bench/+/in/+"
output = "bench/{1}/out/{2}"
format = "raw"
workers = $workers
[pipelines.bench.queue]
capacity = 64
CONF
      EDGEINFER_LOG=warn "$out/edgeinfer-$variant" run --config "$cfg" > "$out/$variant-$model-$workers.log" 2>&1 &
      svc=$!
      sleep 1.5
      echo "== $variant, $model, $workers worker(s)"
      "$LG" run --broker "127.0.0.1:$port" --fixture "$fx" --devices 4 --window 8 --duration "${D}s" --pid "$svc" \
        --label "$variant $model w$workers" --json "$out/$variant-$model-$workers.json" --quiet
      kill -TERM "$svc"; wait "$svc" 2>/dev/null || true; svc=""
    done
  done
done

python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| model | workers | variant | frames/s | vs glibc | CPU per frame | p99 | RSS |")
print("|---|---|---|---|---|---|---|---|")
for model in ("sensor_cnn", "digits"):
    for w in (1, 2):
        base = None
        for v in ("glibc", "musl", "musl-mimalloc"):
            r = json.loads((out / f"{v}-{model}-{w}.json").read_text())
            fps = r["served_fps"]
            base = base or fps
            cpu = r["service"]["cpu_seconds"] * 1e6 / max(1, r["received"])
            print(f"| {model} | {w} | {v} | {fps:.0f} | {fps / base:.2f}x | {cpu:.0f} µs | "
                  f"{r['latency_us']['p99'] / 1000:.2f} ms | {r['service']['rss_max_bytes'] / 1048576:.1f} MiB |")
PY
