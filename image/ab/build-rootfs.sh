#!/usr/bin/env bash
# Builds the Debian bookworm arm64 root file system the A/B rehearsal boots (image/ab/run.sh):
# systemd, udev, mosquitto, Debian's swupdate and libubootenv tools, Debian's arm64 kernel, and
# a small initramfs. Cached as a tarball outside the clone, keyed by this script's hash.
#
#   image/ab/build-rootfs.sh [CACHE_DIR]      (default ~/.cache/edgeinfer/ab); prints the tarball
#
# No arm64 code runs on the host: debootstrap's first stage resolves and downloads the packages,
# every .deb is unpacked with dpkg-deb, and what the maintainer scripts would do is done here
# with host tools that take a --root (systemd-sysusers, systemctl, depmod). Needs root (file
# ownership), debootstrap, busybox-static's arm64 binary comes from the package set.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${1:-$HOME/.cache/edgeinfer/ab}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
key=$(cat "$0" "$here/initramfs-init" | sha256sum | cut -c1-12)
tarball="$cache/rootfs-bookworm-arm64-$key.tar"
if [[ -f "$tarball" ]]; then echo "$tarball"; exit 0; fi
for tool in debootstrap dpkg-deb depmod systemd-sysusers cpio; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing" >&2; exit 1; }
done
mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
echo "building the arm64 rehearsal rootfs in $root (debootstrap --foreign from $mirror)" >&2
mkdir -p "$cache/debs"
debootstrap --foreign --arch=arm64 --variant=minbase --cache-dir="$cache/debs" \
  --include=systemd,systemd-sysv,udev,kmod,procps,e2fsprogs,fdisk,dosfstools,linux-image-arm64,mosquitto,mosquitto-clients,swupdate,libubootenv-tool,busybox-static \
  bookworm "$root" "$mirror" >&2
# Unpack everything the first stage downloaded (it unpacked only the required set).
# (tar keeps /bin, /lib, /sbin as the merged-/usr symlinks debootstrap made.)
for deb in "$root"/var/cache/apt/archives/*.deb; do
  dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$root"
done
rm -rf "$root/debootstrap" "$root"/var/cache/apt/archives/*.deb

# Mount points systemd needs on a read-only root (the foreign first stage leaves /proc a link).
rm -f "$root/proc"
mkdir -p "$root"/{proc,sys,dev,run,tmp}
# What dpkg's maintainer scripts would have done, with host tools.
cp "$root/usr/share/base-passwd/passwd.master" "$root/etc/passwd"
cp "$root/usr/share/base-passwd/group.master" "$root/etc/group"
: > "$root/etc/shadow"; : > "$root/etc/gshadow"; chmod 0640 "$root/etc/shadow" "$root/etc/gshadow"
sed -i 's/^root:\*:/root::/' "$root/etc/passwd"
# Users Debian's postinst scripts create with adduser.
cat > "$root/usr/lib/sysusers.d/rehearsal-debian.conf" <<'EOF'
u mosquitto - "mosquitto" /var/lib/mosquitto /usr/sbin/nologin
u swupdate - "swupdate" /nonexistent /usr/sbin/nologin
g kvm -
g input -
g render -
g sgx -
EOF
systemd-sysusers --root="$root" >&2
ln -sf ../usr/share/zoneinfo/Etc/UTC "$root/etc/localtime"
echo "edgeinfer-ab" > "$root/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost\n' > "$root/etc/hosts"
# A fixed machine id: the root file system is read-only, and an empty one would make systemd
# treat every boot as the first (preset-all).
echo 0123456789abcdef0123456789abcdef > "$root/etc/machine-id"
for unit in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
            getty@tty1.service systemd-timesyncd.service dpkg-db-backup.timer swupdate-usb@.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# Kernel: the Image for U-Boot's booti, and only the modules a QEMU virt machine needs.
kver=$(basename "$root"/lib/modules/*)
cp "$root/boot/vmlinuz-$kver" "$root/boot/Image"
rm -f "$root/boot/vmlinuz-$kver" "$root/boot/System.map-$kver" "$root/vmlinuz" "$root/vmlinuz.old"
depmod -b "$root" "$kver"
keep="virtio_blk virtio_pci virtio_mmio virtio_rng ext4 vfat nls_ascii nls_cp437 nls_iso8859_1 nls_utf8 \
      i6300esb qemu_fw_cfg efivarfs"
mods=$(for m in $keep; do modprobe -d "$root" -S "$kver" --show-depends "$m" 2>/dev/null; done \
  | awk '$1 == "insmod" {print $2}' | sort -u)
[[ -n "$mods" ]] || { echo "error: no module closure for $keep" >&2; exit 1; }
keepdir="$work/modules"
mkdir -p "$keepdir"
for m in $mods; do install -D -m 0644 "$m" "$keepdir/${m#"$root"/}"; done
rm -rf "$root/lib/modules/$kver/kernel"
cp -a "$keepdir/lib/modules/$kver/kernel" "$root/lib/modules/$kver/"
depmod -b "$root" "$kver"

# initramfs: busybox, the storage modules, and an /init that finds root=PARTUUID=... (an MBR
# disk signature and partition number) and switches to it. Debian's kernel has virtio_blk and
# ext4 as modules; the boot script loads /boot/initrd from the slot when it exists.
initramfs="$work/initramfs"
mkdir -p "$initramfs"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$root/usr/bin/busybox" "$initramfs/bin/busybox"
cp -a "$root/lib/modules/$kver" "$initramfs/lib/modules/"
install -m 0755 "$here/initramfs-init" "$initramfs/init"
(cd "$initramfs" && find . | cpio -o -H newc --quiet | gzip -9) > "$root/boot/initrd"

# systemd units only: no SysV scripts (systemctl --root would try to run update-rc.d, an arm64
# binary, to enable them).
rm -rf "$root/etc/init.d" "$root"/etc/rc?.d
# Trim what a test guest never reads.
rm -rf "$root"/usr/share/{doc,man,info,locale,i18n,lintian,bash-completion} "$root"/var/lib/apt/lists/* \
  "$root"/usr/lib/firmware "$root"/boot/config-* \
  "$root"/usr/lib/linux-image-* "$root"/usr/lib/aarch64-linux-gnu/gconv "$root"/usr/lib/udev/hwdb.bin \
  "$root"/usr/lib/udev/hwdb.d "$root"/usr/lib/klibc "$root"/usr/share/initramfs-tools \
  "$root"/usr/bin/perl* "$root"/usr/lib/aarch64-linux-gnu/perl-base "$root"/usr/share/perl5 \
  "$root"/var/cache/debconf "$root"/usr/lib/apt "$root"/usr/bin/apt*
find "$root/usr/share/zoneinfo" -mindepth 1 -maxdepth 1 ! -name Etc ! -name UTC -exec rm -rf {} +
tar -C "$root" -cf "$tarball.tmp" .
mv "$tarball.tmp" "$tarball"
# Older builds (another key) are not used any more.
find "$cache" -maxdepth 1 -name 'rootfs-bookworm-arm64-*.tar' ! -name "$(basename "$tarball")" -delete
echo "$tarball"
