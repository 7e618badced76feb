#!/usr/bin/env bash
# Checks the systemd files in config/systemd/ against a staged root that looks like the device:
# the unit, sysusers and tmpfiles snippets, the default config, and the binary in /usr/bin.
#
#   tools/check-units.sh [path/to/edgeinfer]
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
install -m 0644 config/systemd/edgeinfer.sysusers "$root/usr/lib/sysusers.d/edgeinfer.conf"
install -m 0644 config/systemd/edgeinfer.tmpfiles "$root/usr/lib/tmpfiles.d/edgeinfer.conf"
install -m 0644 config/edgeinfer.toml "$root/etc/edgeinfer/edgeinfer.toml"

out=$(systemd-analyze verify --root="$root" edgeinfer.service 2>&1 || true)
if [[ -n "$out" ]]; then
  echo "FAIL: systemd-analyze verify:"; echo "$out"; exit 1
fi
echo "ok: systemd-analyze verify edgeinfer.service (no output)"

if command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers --root="$root" --dry-run >/dev/null 2>&1
  echo "ok: systemd-sysusers accepts edgeinfer.conf"
fi

score=$(systemd-analyze security --offline=yes --root="$root" edgeinfer.service 2>&1 | sed -n 's/.*Overall exposure level for edgeinfer.service: \([0-9.]*\).*/\1/p')
[[ -n "$score" ]] || { echo "FAIL: no exposure score"; exit 1; }
echo "ok: systemd-analyze security exposure $score"
awk -v s="$score" 'BEGIN { exit !(s <= 2.5) }' || { echo "FAIL: exposure $score above 2.5"; exit 1; }
