#!/usr/bin/env bash
# The VM test: boots a real kernel with cgroup v2 and systemd (Debian bookworm under QEMU, KVM
# when available, software emulation otherwise), installs the edgeinfer binary with the same
# unit, sysusers, tmpfiles and default config the device image ships, and checks in the guest
# (guest-test.sh): active via notify, the delegated cgroup layout and limits, dropped
# capabilities, a result through mosquitto, structured journal fields, and a watchdog restart
# after a worker is wedged with the test-only fault hook.
#
#   image/vm/run.sh [path/to/edgeinfer]
#
# The binary must be built with `--features fault-hooks` (tools/test.sh builds it that way).
# Needs root (debootstrap, image ownership), qemu-system-x86, debootstrap, e2fsprogs; prints
# SKIPPED and exits 0 when they are missing and cannot be installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${1:-${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}/debug/edgeinfer}"
cache="${EDGEINFER_VM_CACHE:-$HOME/.cache/edgeinfer/vm}"

if [[ "$(id -u)" -ne 0 ]]; then echo "SKIPPED: the VM test needs root (debootstrap)"; exit 0; fi
missing=()
for t in qemu-system-x86_64:qemu-system-x86 debootstrap:debootstrap mkfs.ext4:e2fsprogs; do
  command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t##*:}")
done
if ((${#missing[@]})); then
  echo "== installing ${missing[*]} for the VM test"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
    echo "SKIPPED: cannot install ${missing[*]}"; exit 0
  fi
fi
[[ -x "$bin" ]] || { echo "error: $bin not found; build it with: cargo build -p edgeinfer --features fault-hooks"; exit 1; }

tarball=$("$here/build-rootfs.sh" "$cache")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage="$work/root"
mkdir -p "$stage"
tar -C "$stage" -xf "$tarball"

printf '127.0.0.1 localhost\n::1 localhost\n' > "$stage/etc/hosts"
# What the device image installs (the Yocto recipe installs the same files).
install -D -m 0755 "$bin" "$stage/usr/bin/edgeinfer"
install -D -m 0644 "$repo/config/systemd/edgeinfer.service" "$stage/usr/lib/systemd/system/edgeinfer.service"
install -D -m 0644 "$repo/config/systemd/edgeinfer-health-gate.service" "$stage/usr/lib/systemd/system/edgeinfer-health-gate.service"
install -D -m 0644 "$repo/config/systemd/edgeinfer.sysusers" "$stage/usr/lib/sysusers.d/edgeinfer.conf"
install -D -m 0644 "$repo/config/systemd/edgeinfer.tmpfiles" "$stage/usr/lib/tmpfiles.d/edgeinfer.conf"
install -D -m 0644 "$repo/daemon/assets/demo/digits.onnx" "$stage/usr/share/edgeinfer/models/digits.onnx"
install -D -m 0644 "$repo/daemon/assets/demo/labels.txt" "$stage/usr/share/edgeinfer/models/digits.labels.txt"
# The shipped default config, with a device id and memory limits switched on.
mkdir -p "$stage/etc/edgeinfer"
sed -e 's/^# device_id = .*/device_id = "vm"/' \
    -e 's/^# memory_high = /memory_high = /' \
    -e 's/^# memory_max = /memory_max = /' \
    "$repo/config/edgeinfer.toml" > "$stage/etc/edgeinfer/edgeinfer.toml"
# Test-only: a short watchdog, the fault hook armed on seq 7, debug logs.
mkdir -p "$stage/etc/systemd/system/edgeinfer.service.d"
cat > "$stage/etc/systemd/system/edgeinfer.service.d/vmtest.conf" <<'CONF'
[Service]
WatchdogSec=6s
Environment=EDGEINFER_FAULT_WEDGE_SEQ=7
Environment=EDGEINFER_LOG=debug
CONF
install -D -m 0755 "$here/guest-test.sh" "$stage/usr/local/bin/edgeinfer-vmtest"
install -D -m 0644 "$here/edgeinfer-vmtest.service" "$stage/etc/systemd/system/edgeinfer-vmtest.service"
mkdir -p "$stage/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/edgeinfer-vmtest.service "$stage/etc/systemd/system/multi-user.target.wants/"

kernel=$(ls "$stage"/boot/vmlinuz-* | head -1)
initrd=$(ls "$stage"/boot/initrd.img-* | head -1)
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd"
mkfs.ext4 -q -F -L root -d "$stage" "$work/disk.raw" 1536M

# KVM when it really works (nested virtualization is often half there: probe with a 10 s boot
# of the kernel alone), software emulation otherwise.
accel="tcg"; cpu="max"
if [[ "${EDGEINFER_VM_ACCEL:-auto}" != tcg && -r /dev/kvm && -w /dev/kvm ]]; then
  timeout 10 qemu-system-x86_64 -machine q35,accel=kvm -cpu host -m 256 -kernel "$work/vmlinuz" \
    -append "console=ttyS0 panic=-1" -display none -no-reboot -serial file:"$work/probe.log" >/dev/null 2>&1 || true
  if grep -aq "Linux version" "$work/probe.log" 2>/dev/null; then accel="kvm"; cpu="host"; fi
fi
echo "== booting the VM test ($accel)"
start=$(date +%s)
timeout "${EDGEINFER_VM_TIMEOUT:-900}" qemu-system-x86_64 \
  -machine q35,accel="$accel" -cpu "$cpu" -smp 2 -m 1024 \
  -kernel "$work/vmlinuz" -initrd "$work/initrd" \
  -append "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 panic=-1" \
  -drive file="$work/disk.raw",format=raw,if=virtio \
  -nic none -display none -no-reboot \
  -serial file:"$work/serial.log" || true
echo "== VM finished in $(( $(date +%s) - start ))s"
grep -a "VMTEST" "$work/serial.log" | sed 's/\r$//' || true
if grep -aq "VMTEST-RESULT: PASS" "$work/serial.log"; then
  echo "VM test passed"
else
  echo "VM test FAILED; last serial output:"
  tail -n 80 "$work/serial.log" | sed 's/\r$//'
  exit 1
fi
