#!/usr/bin/env bash
# The test command (README "Quick start", and what .ci/run calls): installs what the tests need
# on Debian (mosquitto), then runs formatting, lints, unit and integration tests.
#
#   tools/test.sh            everything
#   tools/test.sh --quick    skip fmt/clippy
#
# Builds go to $CARGO_TARGET_DIR (default: ~/.cache/edgeinfer/target, outside the clone, so
# repeated runs and CI on the same machine reuse them).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[[ "${1:-}" == "--quick" ]] && quick=1

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Time per stage, printed as each one ends and again at exit (also when a stage fails), so a slow
# CI run shows where its time went.
stage_times=()
stage_name=""
stage_start=0
stage() {
  local now
  now=$(date +%s)
  if [[ -n "$stage_name" ]]; then
    stage_times+=("$(printf '%6ss  %s' "$((now - stage_start))" "$stage_name")")
  fi
  stage_name="$1"
  stage_start=$now
  if [[ -n "$1" ]]; then
    echo "== $1"
  fi
}
stage_report() {
  stage ""
  echo "== time per stage"
  printf '%s\n' "${stage_times[@]}"
}
trap stage_report EXIT

need_pkg() {
  local bin="$1" pkg="$2"
  if ! command -v "$bin" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$bin" ]]; then
    echo "== installing $pkg (needed by the tests)"
    local sudo=""
    [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  fi
}
stage "install what the tests need (Debian packages)"
need_pkg mosquitto mosquitto
# promtool (from Debian's prometheus package) is the reference checker of the metrics endpoint's
# exposition format; the integration test also parses it with a Rust parser.
need_pkg promtool prometheus

# mosquitto is started per test on a free port; the packaged system services are not needed (and
# would hold ports 1883 and 9090), so stop them if the install started them.
for svc in mosquitto prometheus; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" 2>/dev/null || true
  fi
done

start=$(date +%s)
if [[ $quick -eq 0 ]]; then
  stage "cargo fmt --check"
  cargo fmt --all -- --check
  # Every clippy pass includes the `cuda` feature (tract-cuda: checked, not linked, no GPU
  # needed), so all passes share one feature set for tract and tract is checked once; the
  # feature-off paths are compiled by the test build below.
  stage "cargo clippy (all targets, with the CUDA backend, -D warnings)"
  cargo clippy --workspace --all-targets --locked --features edgeinfer/cuda -- -D warnings
  stage "cargo clippy (device build: no demo broker; and with the test-only fault hooks)"
  cargo clippy -p edgeinfer --no-default-features --features multithread,mimalloc,cuda \
    --all-targets --locked -- -D warnings
  cargo clippy -p edgeinfer --features fault-hooks,cuda --all-targets --locked -- -D warnings
fi
stage "module graph: no import cycles among daemon modules (tools/check-modules.py)"
python3 tools/check-modules.py
stage "build the daemon binary used by the integration tests (with the test-only fault hooks)"
cargo build -p edgeinfer --bins --locked --features fault-hooks
cargo build -p edgeinfer-ota --locked
stage "systemd unit, sysusers and tmpfiles files"
tools/check-units.sh "$CARGO_TARGET_DIR/debug/edgeinfer" \
  image/ota/edgeinfer-ota-commit.service image/ota/edgeinfer-ota-rollback.service \
  image/ota/edgeinfer-ota:/usr/libexec/edgeinfer-ota/edgeinfer-ota \
  image/ota/edgeinfer-health-gate-ota.conf:/usr/lib/systemd/system/edgeinfer-health-gate.service.d/ota.conf
stage "Yocto crates and licenses includes match Cargo.lock"
python3 tools/yocto-crates.py --check
stage "A/B update scripts: shellcheck, dash against stubs, bundles checked by swupdate (image/ota/test/run.sh)"
image/ota/test/run.sh
stage "Yocto layer: oelint; parse + task-graph assertions where EDGEINFER_YOCTO_MIRRORS has the layers (tools/yocto-check.sh)"
tools/yocto-check.sh
stage "tests (unit + integration against a real mosquitto)"
cargo test --workspace --locked -- --test-threads "${TEST_THREADS:-4}"
if [[ "${EDGEINFER_SKIP_AARCH64:-0}" != 1 ]]; then
  stage "static aarch64 build, end to end under qemu-aarch64-static (EDGEINFER_SKIP_AARCH64=1 skips)"
  tools/test-aarch64.sh
fi
if [[ "${EDGEINFER_SKIP_VM:-0}" != 1 ]]; then
  stage "VM test: real kernel, cgroup v2 and systemd (image/vm/run.sh; EDGEINFER_SKIP_VM=1 skips)"
  image/vm/run.sh "$CARGO_TARGET_DIR/debug/edgeinfer"
fi
if [[ "${EDGEINFER_SKIP_AB:-0}" != 1 ]]; then
  stage "A/B update rehearsal: U-Boot + SWUpdate in QEMU arm64 (image/ab/run.sh; EDGEINFER_SKIP_AB=1 skips)"
  image/ab/run.sh "$PWD/dist/edgeinfer-aarch64-unknown-linux-musl"
fi
stage ""
echo "== all tests passed in $(( $(date +%s) - start ))s"
