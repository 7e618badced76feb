#!/usr/bin/env bash
# The static aarch64 device build, end to end under user-mode emulation: builds
# dist/edgeinfer-aarch64-unknown-linux-musl (tools/build-static.sh) and runs the integration tests
# that do not depend on host timing or /proc layout against it, through qemu-aarch64-static:
# every fixture model against the onnxruntime references, routing, malformed frames, health
# and Last Will, validate and inspect. Functional only: emulated timings mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}"
if ! command -v qemu-aarch64-static >/dev/null 2>&1; then
  echo "== installing qemu-user-static"
  apt-get install -y -qq qemu-user-static >/dev/null
fi
tools/build-static.sh aarch64
export EDGEINFER_BIN="$PWD/dist/edgeinfer-aarch64-unknown-linux-musl"
export EDGEINFER_RUNNER=qemu-aarch64-static
# ARM kernels round differently from onnxruntime's x86 ones; 1e-4 relative holds for the
# fixtures (checked), so keep the same bar.
export EDGEINFER_TOLERANCE="${EDGEINFER_TOLERANCE:-1e-4}"
cargo test --locked -p edgeinfer-tests --test integration -- --test-threads 2 \
  models:: routing::many_devices malformed::malformed_frames lifecycle::health_is_retained \
  cli::validate_reports cli::inspect_describes
