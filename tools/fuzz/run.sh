#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (libFuzzer via cargo-fuzz, nightly toolchain).
#
#   tools/fuzz/run.sh [seconds-per-target] [target...]      (default: 60 s, every target)
#
# Each run is capped at 512 MiB RSS (-rss_limit_mb) and 2 GiB per allocation check
# (-malloc_limit_mb=256): a payload that makes the parser allocate without bound fails the run
# like a panic does. Seeds come from tools/fuzz/seeds/<target>; the growing corpus and any
# crash artifacts stay under $FUZZ_DIR (default ~/.cache/edgeinfer/fuzz), outside the repo.
# Exit status: non-zero if any target found a crash, leak, timeout or out-of-memory input.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
shift || true
targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=(config decode_json decode_raw decode_cbor envelope window_assembler decode_jpeg decode_png image_plan topic ota_manifest spool_segment)
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "error: the nightly toolchain is needed (rustup toolchain install nightly)"; exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
work="${FUZZ_DIR:-$HOME/.cache/edgeinfer/fuzz}"
export CARGO_TARGET_DIR="$work/target"
mkdir -p "$work"
echo "== building ${targets[*]}"
for t in "${targets[@]}"; do
  cargo +nightly fuzz build --fuzz-dir "$PWD" --release "$t" >/dev/null
done
failed=()
for t in "${targets[@]}"; do
  corpus="$work/corpus/$t"
  artifacts="$work/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  [[ -d "seeds/$t" ]] && cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true
  echo "== $t: ${secs}s"
  log="$work/$t.log"
  if cargo +nightly fuzz run --fuzz-dir "$PWD" --release "$t" "$corpus" -- \
      -max_total_time="$secs" -rss_limit_mb=512 -malloc_limit_mb=256 -timeout=10 \
      -artifact_prefix="$artifacts" -print_final_stats=1 >"$log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo '?')
    echo "   ok: $runs executions, coverage $cov edges, corpus $(ls "$corpus" | wc -l) inputs"
  else
    echo "   FAILED: see $log and $artifacts"
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" | head -5 || true
    failed+=("$t")
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzzing found problems in: ${failed[*]}"; exit 1
fi
echo "all targets clean"
