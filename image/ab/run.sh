#!/usr/bin/env bash
# The A/B update rehearsal: the update path of the Raspberry Pi images, end to end, in QEMU.
#
#   image/ab/run.sh [path/to/edgeinfer-aarch64]     (as root; EDGEINFER_SKIP_AB=1 skips it in
#                                                    tools/test.sh)
#
# A QEMU arm64 "virt" machine boots Debian's U-Boot (u-boot-qemu, qemu_arm64) from a disk laid
# out like the Pi's SD card: p1 boot (FAT: boot.scr, uboot.env), p2 root_a, p3 root_b, p4 data.
# U-Boot runs the Pi's boot script (image/ota/rpi/boot.cmd.in, compiled with mkimage): slot
# selection, boot counting while upgrade_available=1, altbootcmd past bootlimit, the environment
# kept in uboot.env across reboots and power cuts. The root file systems are Debian bookworm
# arm64 (build-rootfs.sh) with what the Yocto image installs: edgeinfer (the static aarch64
# binary), its unit, health gate, sysusers/tmpfiles and config; edgeinfer-ota with its commit
# and rollback units and SWUpdate drop-in; the /data layout, bind mounts, partition growth and
# hardware watchdog (image/overlay/). Debian's swupdate installs bundles made from the project's
# sw-description (image/ota/rpi/) by image/ota/mkswu.sh with keys from image/keys/gen-dev-keys.sh.
#
# Scenario (one QEMU run per boot; a guest reboot ends the run, -no-reboot):
#   1. slot a, 1.0.0: canary into /var/lib/edgeinfer; install 1.1.0 into slot b; reboot
#   2. slot b on trial: the health gate passes, edgeinfer-ota commits; a downgrade, a bundle of
#      an unknown signer and one for other hardware are refused; the 1.2.0 install starts and
#      the VM is killed while it writes slot a (power cut)
#   3. slot b still boots, committed; 1.2.0 (edgeinfer never healthy; signed with a rotated
#      key the image trusts) installs into slot a; reboot
#   4. slot a on trial, bootlimit times: the gate fails, edgeinfer-ota reboots, U-Boot counts
#   5. past bootlimit U-Boot falls back to slot b (ustate=3); the failure is recorded, no
#      reboot loop; the canary written in boot 1 is still there
#
# The binary must be the aarch64 one (tools/test-aarch64.sh builds it into dist/ within the test
# command): Debian's only U-Boot with a persistent environment and setexpr is the arm64 one
# (the x86 build keeps its environment nowhere and has no setexpr), so the guest is arm64 and
# runs under software emulation. Needs root; installs qemu-system-arm, u-boot-qemu, u-boot-tools,
# mtools, dosfstools, cpio, debootstrap when missing. Artifacts are cached in
# ~/.cache/edgeinfer/ab (the Debian rootfs, keyed by build-rootfs.sh's hash).
#
# Environment: EDGEINFER_AB_BOOTLIMIT (default 1: one failed trial boot, then the fallback; the
# Pi's default is 3), EDGEINFER_AB_TIMEOUT (per boot, default 600 s), EDGEINFER_AB_KEEP=1 keeps
# the work directory (serial logs).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${1:-$repo/dist/edgeinfer-aarch64-unknown-linux-musl}"
cache="${EDGEINFER_AB_CACHE:-$HOME/.cache/edgeinfer/ab}"
bootlimit="${EDGEINFER_AB_BOOTLIMIT:-1}"
boot_timeout="${EDGEINFER_AB_TIMEOUT:-600}"
t0=$(date +%s)
stage_t=$t0
stage() { local now; now=$(date +%s); echo "== [ab] $1: $((now - stage_t)) s"; stage_t=$now; }

if [[ "$(id -u)" -ne 0 ]]; then echo "SKIPPED: the A/B rehearsal needs root (image ownership)"; exit 0; fi
if [[ ! -x "$bin" ]]; then
  if [[ "${EDGEINFER_SKIP_AARCH64:-0}" == 1 ]]; then
    echo "SKIPPED: the A/B rehearsal needs the aarch64 binary, whose build EDGEINFER_SKIP_AARCH64=1 skipped"; exit 0
  fi
  echo "error: $bin not found; build it with: tools/build-static.sh aarch64" >&2; exit 1
fi
if ! file -L "$bin" | grep -q 'ARM aarch64'; then echo "error: $bin is not an aarch64 binary" >&2; exit 1; fi
missing=()
for t in qemu-system-aarch64:qemu-system-arm /usr/lib/u-boot/qemu_arm64/u-boot.bin:u-boot-qemu \
         mkimage:u-boot-tools mkenvimage:u-boot-tools mcopy:mtools mkfs.vfat:dosfstools \
         mkfs.ext4:e2fsprogs sfdisk:fdisk cpio:cpio zstd:zstd debootstrap:debootstrap depmod:kmod openssl:openssl; do
  p="${t%%:*}"
  if [[ "$p" == /* ]]; then [[ -e "$p" ]] || missing+=("${t##*:}"); else command -v "$p" >/dev/null 2>&1 || missing+=("${t##*:}"); fi
done
if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "== installing ${missing[*]} for the A/B rehearsal"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
    echo "SKIPPED: cannot install ${missing[*]}"; exit 0
  fi
fi

base=$("$here/build-rootfs.sh" "$cache")
stage "Debian arm64 root file system ($(basename "$base"))"
work=$(mktemp -d)
if [[ "${EDGEINFER_AB_KEEP:-0}" == 1 ]]; then echo "work directory: $work"; else trap 'rm -rf "$work"' EXIT; fi

# Keys: the release key (ca1) and the key it is rotated to (ca2); every image trusts both CAs.
# A third, untrusted pair signs the bundle that must be refused.
for k in ca1 ca2 foreign; do "$repo/image/keys/gen-dev-keys.sh" "$work/keys/$k" "edgeinfer-ab-$k" >/dev/null; done
cat "$work/keys/ca1/swupdate-ca.pem" "$work/keys/ca2/swupdate-ca.pem" > "$work/keys/trusted-ca.pem"

machine=qemuarm64
rootfs_name="edgeinfer-image-$machine.rootfs.ext4.zst"
# Installs into $1 what the Yocto image installs (recipes edgeinfer, edgeinfer-rootfs,
# edgeinfer-ota, base-files and os-release bbappends), for image version $2; $3 = good|bad.
stage_image() {
  local root="$1" version="$2" kind="$3"
  mkdir -p "$root"
  tar -C "$root" -xf "$base"
  # edgeinfer recipe.
  install -D -m 0755 "$bin" "$root/usr/bin/edgeinfer"
  install -D -m 0644 "$repo/config/systemd/edgeinfer.service" "$root/usr/lib/systemd/system/edgeinfer.service"
  install -D -m 0644 "$repo/config/systemd/edgeinfer-health-gate.service" "$root/usr/lib/systemd/system/edgeinfer-health-gate.service"
  install -D -m 0644 "$repo/config/systemd/edgeinfer.sysusers" "$root/usr/lib/sysusers.d/edgeinfer.conf"
  install -D -m 0644 "$repo/config/systemd/edgeinfer.tmpfiles" "$root/usr/lib/tmpfiles.d/edgeinfer.conf"
  install -D -m 0644 "$repo/daemon/assets/demo/digits.onnx" "$root/usr/share/edgeinfer/models/digits.onnx"
  install -D -m 0644 "$repo/daemon/assets/demo/labels.txt" "$root/usr/share/edgeinfer/models/digits.labels.txt"
  mkdir -p "$root/etc/edgeinfer"
  sed -e 's/^# device_id = .*/device_id = "ab"/' "$repo/config/edgeinfer.toml" > "$root/etc/edgeinfer/edgeinfer.toml"
  if [[ "$kind" == bad ]]; then
    # A release whose configuration names a model the image does not ship: edgeinfer never
    # becomes healthy (validate fails, systemd restarts it until the start limit).
    sed -i 's|^model = "/usr/share/edgeinfer/models/digits.onnx"|model = "/usr/share/edgeinfer/models/digits-v2.onnx"|' "$root/etc/edgeinfer/edgeinfer.toml"
    grep -q 'digits-v2.onnx' "$root/etc/edgeinfer/edgeinfer.toml"
  fi
  systemd-sysusers --root="$root" >/dev/null
  # edgeinfer-rootfs recipe (image/overlay).
  install -D -m 0644 -t "$root/usr/lib/systemd/system" "$repo"/image/overlay/systemd/*.mount \
    "$repo"/image/overlay/systemd/*.service
  install -D -m 0644 "$repo/image/overlay/edgeinfer-data.tmpfiles" "$root/usr/lib/tmpfiles.d/edgeinfer-data.conf"
  install -D -m 0755 "$repo/image/overlay/edgeinfer-grow-data" "$root/usr/libexec/edgeinfer/edgeinfer-grow-data"
  install -D -m 0644 "$repo/image/overlay/systemd/edgeinfer-watchdog.conf" "$root/usr/lib/systemd/system.conf.d/10-edgeinfer-watchdog.conf"
  install -D -m 0644 "$repo/image/overlay/mosquitto/edgeinfer.conf" "$root/etc/mosquitto/conf.d/edgeinfer.conf"
  # The mosquitto bbappend: the main file only includes the drop-in directory.
  printf 'pid_file /run/mosquitto/mosquitto.pid\nlog_dest syslog\ninclude_dir /etc/mosquitto/conf.d\n' > "$root/etc/mosquitto/mosquitto.conf"
  # edgeinfer-ota recipe (U-Boot family).
  install -D -m 0755 "$repo/image/ota/edgeinfer-ota" "$root/usr/libexec/edgeinfer-ota/edgeinfer-ota"
  install -D -m 0755 "$repo/image/ota/swupdate/edgeinfer-swupdate-genconfig" "$root/usr/libexec/edgeinfer-ota/edgeinfer-swupdate-genconfig"
  install -D -m 0644 -t "$root/usr/lib/systemd/system" "$repo/image/ota/edgeinfer-ota-commit.service" "$repo/image/ota/edgeinfer-ota-rollback.service"
  install -D -m 0644 "$repo/image/ota/edgeinfer-health-gate-ota.conf" "$root/usr/lib/systemd/system/edgeinfer-health-gate.service.d/ota.conf"
  install -D -m 0644 "$repo/image/ota/swupdate/swupdate-edgeinfer.conf" "$root/usr/lib/systemd/system/swupdate.service.d/edgeinfer.conf"
  install -D -m 0644 "$repo/image/ota/swupdate/10-edgeinfer" "$root/usr/lib/swupdate/conf.d/10-edgeinfer"
  install -D -m 0644 "$repo/image/ota/swupdate/swupdate.cfg.in" "$root/usr/share/swupdate/swupdate.cfg.in"
  install -D -m 0644 "$work/keys/trusted-ca.pem" "$root/usr/share/swupdate/swupdate-ca.pem"
  install -D -m 0644 /dev/null "$root/etc/edgeinfer-ota/family"; echo uboot > "$root/etc/edgeinfer-ota/family"
  echo "$machine 1.0" > "$root/etc/hwrevision"
  # meta-raspberrypi's fw_env.config: the environment file on the boot partition.
  printf '/boot/uboot.env 0x0000 0x4000\n' > "$root/etc/fw_env.config"
  # base-files bbappend (fstab) and the read-only root with volatile directories (Yocto's
  # read-only-rootfs: /var/volatile tmpfs, volatile-binds for /var/lib).
  cat > "$root/etc/fstab" <<'FSTAB'
/dev/root	/	ext4	ro,noatime	0 1
tmpfs	/tmp	tmpfs	mode=1777,nosuid,nodev	0 0
tmpfs	/var/volatile	tmpfs	mode=0755,nosuid,nodev	0 0
tmpfs	/var/log	tmpfs	mode=0755,nosuid,nodev	0 0
LABEL=data	/data	ext4	defaults,noatime,x-systemd.makefs,x-systemd.growfs	0 2
LABEL=boot	/boot	vfat	defaults,noatime,umask=0077	0 2
FSTAB
  mkdir -p "$root/data" "$root/var/volatile" "$root/var/lib/edgeinfer" "$root/var/lib/mosquitto"
  # os-release bbappend.
  printf 'IMAGE_ID=edgeinfer-image\nIMAGE_VERSION=%s\n' "$version" >> "$root/usr/lib/os-release"
  # Rehearsal only: the emulated volatile-binds, the agent, short gate window, OTA logs on the
  # serial console.
  install -D -m 0644 -t "$root/usr/lib/systemd/system" "$here/guest/var-volatile-lib.service" \
    "$here/guest/edgeinfer-ab-report.service" "$here/guest/edgeinfer-ab-agent.service" \
    "$here/guest/edgeinfer-ab-emergency.service"
  install -D -m 0755 "$here/guest/edgeinfer-ab-agent" "$root/usr/local/bin/edgeinfer-ab-agent"
  mkdir -p "$root/etc/systemd/system/edgeinfer-health-gate.service.d" "$root/etc/systemd/system/edgeinfer-ota-commit.service.d" \
    "$root/etc/systemd/system/edgeinfer-ota-rollback.service.d" "$root/etc/systemd/system/edgeinfer-grow-data.service.d"
  printf '[Service]\nExecStart=\nExecStart=/usr/bin/edgeinfer health --wait --config /etc/edgeinfer/edgeinfer.toml --timeout 60s --window 3s\nStandardOutput=journal+console\nStandardError=journal+console\n' \
    > "$root/etc/systemd/system/edgeinfer-health-gate.service.d/ab.conf"
  # The emulated watchdog counts host time while the emulated CPUs may be starved on a busy
  # host: a longer timeout than the product's 10 s, the same mechanism.
  mkdir -p "$root/etc/systemd/system.conf.d"
  printf '[Manager]\nRuntimeWatchdogSec=60s\n' > "$root/etc/systemd/system.conf.d/ab-watchdog.conf"
  for u in edgeinfer-ota-commit edgeinfer-ota-rollback edgeinfer-grow-data; do
    printf '[Service]\nStandardError=journal+console\n' > "$root/etc/systemd/system/$u.service.d/ab.conf"
  done
  systemctl --root="$root" enable edgeinfer.service edgeinfer-health-gate.service edgeinfer-ota-commit.service \
    mosquitto.service swupdate.service swupdate.socket var-lib-edgeinfer.mount var-lib-mosquitto.mount \
    edgeinfer-grow-data.service var-volatile-lib.service edgeinfer-ab-report.service edgeinfer-ab-agent.service \
    edgeinfer-ab-emergency.service >/dev/null 2>&1
}
# An ext4 image of a staged tree, shrunk to its content (a read-only root needs no free space,
# and every byte is written by the emulated CPU at install time).
make_ext4() {
  local root="$1" out="$2" mb
  mb=$(( $(du -sm "$root" | cut -f1) * 12 / 10 + 32 ))
  mkfs.ext4 -q -F -L rootfs -m 0 -d "$root" "$out" "${mb}M"
  e2fsck -fy "$out" >/dev/null 2>&1 || true
  resize2fs -M "$out" >/dev/null 2>&1
  local blocks bsize
  blocks=$(dumpe2fs -h "$out" 2>/dev/null | sed -n 's/^Block count: *//p')
  bsize=$(dumpe2fs -h "$out" 2>/dev/null | sed -n 's/^Block size: *//p')
  truncate -s $((blocks * bsize)) "$out"
}
swu_vars=(-V "MACHINE=$machine" -V "EDGEINFER_HW_REVISION=1.0" -V "EDGEINFER_ROOTFS_IMAGE=$rootfs_name"
          -V "EDGEINFER_SLOT_A_DEVICE=/dev/vda2" -V "EDGEINFER_SLOT_B_DEVICE=/dev/vda3")
postinst="$repo/image/ota/rpi/edgeinfer-ota-postinstall.sh"
# A bundle: $1 output, $2 version, $3 key directory, $4 rootfs .ext4.zst, $5 board.
bundle() {
  local dir; dir=$(mktemp -d "$work/swu.XXXX")
  ln -s "$4" "$dir/$rootfs_name"
  "$repo/image/ota/mkswu.sh" -o "$1" -s "$repo/image/ota/rpi/sw-description" \
    -k "$3/swupdate-signer.key" -c "$3/swupdate-signer.pem" \
    "${swu_vars[@]}" -V "EDGEINFER_IMAGE_VERSION=$2" -V "EDGEINFER_HW_BOARD=${5:-$machine}" \
    "$postinst" "$dir/$rootfs_name"
}

for v in 1.0.0:good 1.1.0:good 1.2.0:bad; do
  stage_image "$work/stage-${v%%:*}" "${v%%:*}" "${v##*:}"
  make_ext4 "$work/stage-${v%%:*}" "$work/rootfs-${v%%:*}.ext4"
  rm -rf "$work/stage-${v%%:*}"
done
stage "three slot images staged (1.0.0, 1.1.0, 1.2.0 bad; $(( $(stat -c %s "$work/rootfs-1.0.0.ext4") / 1048576 )) MiB each)"

zstd -q -T0 -3 "$work/rootfs-1.1.0.ext4" -o "$work/rootfs-1.1.0.ext4.zst"
zstd -q -T0 -3 "$work/rootfs-1.2.0.ext4" -o "$work/rootfs-1.2.0.ext4.zst"
mkdir -p "$work/bundles"
bundle "$work/bundles/good-1.1.0.swu" 1.1.0 "$work/keys/ca1" "$work/rootfs-1.1.0.ext4.zst"
bundle "$work/bundles/bad-1.2.0.swu" 1.2.0 "$work/keys/ca2" "$work/rootfs-1.2.0.ext4.zst"
# Refused before any image is read: their payload is a placeholder.
echo placeholder | zstd -q > "$work/placeholder.zst"
bundle "$work/bundles/downgrade-1.0.0.swu" 1.0.0 "$work/keys/ca1" "$work/placeholder.zst"
bundle "$work/bundles/foreign-9.0.0.swu" 9.0.0 "$work/keys/foreign" "$work/placeholder.zst"
bundle "$work/bundles/otherhw-9.0.0.swu" 9.0.0 "$work/keys/ca1" "$work/placeholder.zst" raspberrypi4-64
rm -f "$work/rootfs-1.1.0.ext4" "$work/rootfs-1.2.0.ext4" "$work"/rootfs-*.ext4.zst
bundles_mb=$(( $(du -sm "$work/bundles" | cut -f1) + 16 ))
mkfs.ext4 -q -F -L bundles -d "$work/bundles" "$work/bundles.img" "${bundles_mb}M"
stage "bundles signed and packed ($(cd "$work/bundles" && for f in *.swu; do printf '%s %s MiB, ' "$f" $(( $(stat -c %s "$f") / 1048576 )); done))"

# The disk: MBR like the Pi's wic layout; the data partition starts small and the disk has room
# behind it (the first boot grows it).
slot_mb=$(( ($(stat -c %s "$work/rootfs-1.0.0.ext4") / 1048576) * 12 / 10 + 32 ))
data_mb=32 boot_mb=32 free_mb=96
disk="$work/disk.raw"
truncate -s $(( (1 + boot_mb + 2 * slot_mb + data_mb + free_mb) * 1048576 )) "$disk"
sfdisk -q "$disk" <<EOF
label: dos
label-id: 0xed6e1f00
start=1MiB, size=${boot_mb}MiB, type=c, bootable
size=${slot_mb}MiB, type=83
size=${slot_mb}MiB, type=83
size=${data_mb}MiB, type=83
EOF
sed -e 's/@@BOOT_MEDIA@@/virtio/g' -e 's/@@KERNEL_IMAGETYPE@@/Image/g' -e 's/@@KERNEL_BOOTCMD@@/booti/g' \
  "$repo/image/ota/rpi/boot.cmd.in" > "$work/boot.cmd"
mkimage -q -A arm64 -T script -C none -n "edgeinfer A/B boot script" -d "$work/boot.cmd" "$work/boot.scr"
# The provisioned environment: the serial console for the kernel and the rehearsal's boot limit.
printf 'bootlimit=%s\nedgeinfer_extra_bootargs=console=ttyAMA0 quiet loglevel=3 systemd.show_status=0 panic=-1\n' "$bootlimit" \
  > "$work/uboot-env.txt"
mkenvimage -s 0x4000 -o "$work/uboot.env" "$work/uboot-env.txt"
rm -f "$work/boot.vfat"
mkfs.vfat -n boot -C "$work/boot.vfat" $((boot_mb * 1024)) >/dev/null
mcopy -i "$work/boot.vfat" "$work/boot.scr" "$work/uboot.env" ::
mkfs.ext4 -q -F -L data "$work/data.ext4" "${data_mb}M"
part_start() { sfdisk -d "$disk" | sed -n "s|^$disk$1 : start= *\([0-9]*\),.*|\1|p"; }
dd if="$work/boot.vfat" of="$disk" bs=512 seek="$(part_start 1)" conv=notrunc,sparse status=none
dd if="$work/rootfs-1.0.0.ext4" of="$disk" bs=512 seek="$(part_start 2)" conv=notrunc,sparse status=none
dd if="$work/data.ext4" of="$disk" bs=512 seek="$(part_start 4)" conv=notrunc,sparse status=none
rm -f "$work/boot.vfat" "$work/data.ext4" "$work/rootfs-1.0.0.ext4"
stage "disk laid out (boot ${boot_mb} MiB, slots ${slot_mb} MiB, data ${data_mb} MiB + ${free_mb} MiB free)"

# One QEMU run = one boot. Echo the guest's ABTEST lines and the OTA messages.
boots=0
declare -a boot_log=()
run_boot() {
  local step="$1" mode="${2:-}" log start pid
  boots=$((boots + 1))
  log="$work/boot-$boots-$step.log"
  boot_log+=("$log")
  start=$(date +%s)
  qemu-system-aarch64 -machine virt -cpu cortex-a72 -smp 2 -m 1024 -accel tcg,thread=multi,tb-size=512 \
    -bios /usr/lib/u-boot/qemu_arm64/u-boot.bin \
    -drive file="$disk",format=raw,if=virtio \
    -drive file="$work/bundles.img",format=raw,if=virtio,readonly=on \
    -device i6300esb -fw_cfg name=opt/edgeinfer/step,string="$step" \
    -nic none -display none -monitor none -no-reboot -serial file:"$log" &
  pid=$!
  local end=$((start + boot_timeout)) cut=0
  while kill -0 "$pid" 2>/dev/null; do
    if [[ "$mode" == cut ]] && grep -aq "ABTEST cut-power" "$log"; then
      kill -9 "$pid"; cut=1; break
    fi
    if (( $(date +%s) > end )); then kill -9 "$pid"; echo "== [ab] boot $boots ($step) timed out after ${boot_timeout} s"; break; fi
    sleep 0.5
  done
  wait "$pid" 2>/dev/null || true
  grep -a -E "ABTEST|edgeinfer-ota:|edgeinfer: (booting|boot limit)|edgeinfer-grow-data:" "$log" | sed 's/\r$//; s/^/   /' || true
  stage "boot $boots: $step$([[ $cut == 1 ]] && echo ", power cut")"
}
expect() { # $1 description, $2 log, $3 pattern
  if grep -aq -E "$3" "$2"; then echo "ok: $1"; else echo "FAIL: $1"; failed=$((failed + 1)); fi
}
failed=0
stop_after="${EDGEINFER_AB_STOP_AFTER:-0}"  # debugging: stop after this many boots
run_boot first
((stop_after != 1)) || exit 1
expect "boot 1 (slot a, 1.0.0) passed its checks and rebooted into the update" "${boot_log[0]}" "RESULT-first: PASS"
# Slot a's bytes before the interrupted install, to show that the power went while it was being
# overwritten.
slot_a_sum() { dd if="$disk" bs=512 skip="$(part_start 2)" count=$((slot_mb * 2048)) status=none | sha256sum | cut -c1-16; }
sum_before=$(slot_a_sum)
run_boot committed cut
expect "boot 2 (slot b, 1.1.0 committed, refusals) passed its checks" "${boot_log[1]}" "RESULT-committed: PASS"
expect "boot 2 power cut while slot a was being written" "${boot_log[1]}" "ABTEST cut-power"
sum_after=$(slot_a_sum)
if [[ "$sum_after" != "$sum_before" ]]; then echo "ok: slot a was partly overwritten when the power went ($sum_before -> $sum_after)"
else echo "FAIL: slot a unchanged by the interrupted install"; failed=$((failed + 1)); fi
run_boot after-cut
expect "boot 3 (slot b after the power cut, 1.2.0 installed) passed its checks" "${boot_log[2]}" "RESULT-after-cut: PASS"
for i in $(seq "$bootlimit"); do
  run_boot bad
  l="${boot_log[$((boots - 1))]}"
  expect "bad boot $i: slot a, 1.2.0, bootcount $i of $bootlimit" "$l" "ABTEST boot step=bad slot=a version=1.2.0 edgeinfer_slot=a upgrade_available=1 bootcount=$i bootlimit=$bootlimit"
  expect "bad boot $i: the health gate failed and edgeinfer-ota rebooted" "$l" "edgeinfer-ota: edgeinfer is not healthy on the updated slot a: rebooting"
done
run_boot fallback
expect "boot past the limit: U-Boot fell back to slot b" "${boot_log[$((boots - 1))]}" "edgeinfer: boot limit reached, falling back to slot b"
expect "fallback boot (slot b, failure recorded, data kept) passed its checks" "${boot_log[$((boots - 1))]}" "RESULT-fallback: PASS"
echo "== [ab] $boots boots in $(( $(date +%s) - t0 )) s total"
if ((failed)); then
  echo "A/B rehearsal FAILED ($failed); serial logs:"
  for l in "${boot_log[@]}"; do echo "--- $l"; tail -n 60 "$l" | sed 's/\r$//'; done
  exit 1
fi
echo "A/B rehearsal passed"
