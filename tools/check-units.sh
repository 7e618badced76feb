#!/usr/bin/env bash
# Checks the systemd files in config/systemd/ against a staged root that looks like the device:
# the unit, sysusers and tmpfiles snippets, the default config, and the binary in /usr/bin.
#
#   tools/check-units.sh [path/to/edgeinfer [SRC[:/DEST] ...]]
#
# - `systemd-analyze verify` must print nothing (it exits 0 even on unknown keys, so any output
#   is treated as a failure);
# - `systemd-sysusers --dry-run` must accept the sysusers snippet;
# - `systemd-analyze security --offline` reports the exposure score, which must stay <= 2.5.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "SKIPPED: systemd-analyze not installed (Debian package: systemd)"
  exit 0
fi
bin="${1:-${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}/debug/edgeinfer}"
[[ -x "$bin" ]] || { echo "error: $bin not found; build it first (cargo build -p edgeinfer)"; exit 1; }

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d" "$root/etc/edgeinfer"
# The unit's dependencies (targets, mosquitto.service is optional) come from this host's systemd.
if [[ -d /usr/lib/systemd/system ]]; then cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"; fi
mkdir -p "$root/usr/lib/systemd/system"
install -m 0755 "$bin" "$root/usr/bin/edgeinfer"
# ExecReload= uses /bin/kill, which every image has (busybox or util-linux).
mkdir -p "$root/bin"
install -m 0755 "$( [[ -x /bin/kill ]] && echo /bin/kill || echo /usr/bin/kill )" "$root/bin/kill"
install -m 0644 config/systemd/edgeinfer.service "$root/usr/lib/systemd/system/edgeinfer.service"
install -m 0644 config/systemd/edgeinfer-health-gate.service "$root/usr/lib/systemd/system/edgeinfer-health-gate.service"
install -m 0644 config/systemd/edgeinfer.sysusers "$root/usr/lib/sysusers.d/edgeinfer.conf"
install -m 0644 config/systemd/edgeinfer.tmpfiles "$root/usr/lib/tmpfiles.d/edgeinfer.conf"
install -m 0644 config/edgeinfer.toml "$root/etc/edgeinfer/edgeinfer.toml"

# Files from elsewhere that the image installs with ours (image/ota/: the OTA commit units and
# their helper), given as extra arguments SRC[:/ABSOLUTE/DEST]; without a DEST, SRC is a unit for
# /usr/lib/systemd/system. Every unit among them is verified too.
units=(edgeinfer.service edgeinfer-health-gate.service)
for extra in "${@:2}"; do
  src="${extra%%:*}"; dest="${extra#*:}"
  [[ "$dest" == "$extra" ]] && dest="/usr/lib/systemd/system/$(basename "$src")"
  mode=0644; [[ -x "$src" ]] && mode=0755
  install -D -m "$mode" "$src" "$root$dest"
  if [[ "$dest" == /usr/lib/systemd/system/*.service ]]; then units+=("$(basename "$dest")"); fi
done

for unit in "${units[@]}"; do
  out=$(systemd-analyze verify --root="$root" "$unit" 2>&1 || true)
  if [[ -n "$out" ]]; then
    echo "FAIL: systemd-analyze verify $unit:"; echo "$out"; exit 1
  fi
  echo "ok: systemd-analyze verify $unit (no output)"
done

if command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers --root="$root" --dry-run >/dev/null 2>&1
  echo "ok: systemd-sysusers accepts edgeinfer.conf"
fi

for unit in edgeinfer.service edgeinfer-health-gate.service; do
  score=$(systemd-analyze security --offline=yes --root="$root" "$unit" 2>&1 | sed -n "s/.*Overall exposure level for $unit: \([0-9.]*\).*/\1/p")
  [[ -n "$score" ]] || { echo "FAIL: no exposure score for $unit"; exit 1; }
  echo "ok: systemd-analyze security $unit exposure $score"
  awk -v s="$score" 'BEGIN { exit !(s <= 2.5) }' || { echo "FAIL: $unit exposure $score above 2.5"; exit 1; }
done
