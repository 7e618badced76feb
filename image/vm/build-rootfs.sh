#!/usr/bin/env bash
# Builds the Debian bookworm root filesystem the VM test boots (systemd, cgroup v2, mosquitto),
# as a tarball cached outside the clone. Needs root (debootstrap) and Debian's package mirror.
#
#   image/vm/build-rootfs.sh [CACHE_DIR]     (default ~/.cache/edgeinfer/vm)
#
# The tarball is keyed by this script's hash, so editing the package list rebuilds it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:-$HOME/.cache/edgeinfer/vm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
key=$(sha256sum "$0" | cut -c1-12)
tarball="$cache/rootfs-bookworm-$key.tar"
if [[ -f "$tarball" ]]; then
  echo "$tarball"
  exit 0
fi
for tool in debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing (apt-get install debootstrap)" >&2; exit 1; }
done
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
echo "building VM rootfs in $root (debootstrap from $mirror)" >&2
debootstrap --variant=minbase \
  --include=systemd,systemd-sysv,udev,dbus,linux-image-amd64,mosquitto,mosquitto-clients,procps,kmod \
  bookworm "$root" "$mirror" >&2

# Boot straight to a console-less multi-user system; the test unit writes results to ttyS0.
echo "edgeinfer-vm" > "$root/etc/hostname"
echo "/dev/vda / ext4 rw,relatime 0 1" > "$root/etc/fstab"
# mosquitto on loopback only, no persistence (the daemon's persistent session lives in RAM).
cat > "$root/etc/mosquitto/conf.d/edgeinfer-test.conf" <<'CONF'
listener 1883 127.0.0.1
allow_anonymous true
CONF
# Nothing in the test needs these; they only slow the boot.
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done
# Drop kernel modules the VM never loads (graphics, sound, wireless) to keep the image small.
rm -rf "$root"/usr/lib/modules/*/kernel/{sound,drivers/gpu,drivers/net/wireless,drivers/media,drivers/infiniband}
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc "$root"/usr/share/man "$root"/usr/share/locale

tar -C "$root" -cf "$tarball.tmp" .
mv "$tarball.tmp" "$tarball"
echo "$tarball"
