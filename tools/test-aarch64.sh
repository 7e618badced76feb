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
# `-cpu max`: an ARMv8.2+ CPU with FP16 arithmetic, as a Raspberry Pi 5 (Cortex-A76) or a Jetson
# Orin (A78AE) has, so the f16 kernels run (correctness only: emulated timings mean nothing).
export QEMU_CPU=max
tests=(models:: routing::many_devices malformed::malformed_frames lifecycle::health_is_retained
  cli::validate_reports cli::inspect_describes engine::auto_precision)

# 1. f32, as on a Pi 4 or any CPU without FP16: ARM kernels round differently from onnxruntime's
#    x86 ones; 1e-4 relative holds for the fixtures (checked), the same bar as on x86.
#    precision = "auto" picks f32 here: tract (and so edgeinfer) detects FP16 from the
#    `asimdhp` flag of /proc/cpuinfo, and qemu-user 7.2 shows the host's /proc/cpuinfo; on a
#    Pi 5 or an Orin the flag is there and auto goes on to the f16 self-check.
echo "== aarch64 under qemu -cpu max, precision = \"f32\": outputs within 1e-4 of onnxruntime"
EDGEINFER_TEST_PRECISION=f32 EDGEINFER_TOLERANCE="${EDGEINFER_TOLERANCE:-1e-4}" \
  EDGEINFER_EXPECT_PRECISION=f32 \
  cargo test --locked -p edgeinfer-tests --test integration -- --test-threads 2 "${tests[@]}"

# 2. precision = "f16" on the FP16 CPU: every fixture's f16 outputs against the same
#    onnxruntime (f32) references, within config::engine::F16_TOLERANCE (5e-2 x max(1,
#    |reference|); MobileNetV3 measured 3.3e-2, the others within 2e-2).
echo "== aarch64 under qemu -cpu max, precision = \"f16\": outputs within 5e-2 of onnxruntime"
EDGEINFER_TEST_PRECISION=f16 EDGEINFER_TOLERANCE=5e-2 \
  cargo test --locked -p edgeinfer-tests --test integration -- --test-threads 2 models::
