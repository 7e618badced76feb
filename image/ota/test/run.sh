#!/usr/bin/env bash
# Tests of the A/B update scripts without a board (part of tools/test.sh; seconds):
#   1. shellcheck on every shell script of the OTA path and the rehearsal;
#   2. the device scripts run under dash (stricter than bash; they all `set -eu`) against STUBS of
#      nvbootctrl, efivar, systemctl and meta-tegra's uefi_common.func (image/ota/test/stubs/,
#      each named STUB in its header) and the real libubootenv tools (fw_printenv/fw_setenv) on
#      an environment file in U-Boot's format: slot on trial, commit, rollback, fallback,
#      interrupted install, Jetson post-install, SWUpdate configuration;
#   3. the bundles: image/ota/mkswu.sh builds them from both sw-description files with keys from
#      image/keys/gen-dev-keys.sh and Debian's swupdate checks them (-c): accepted for the right
#      board, revision and version, refused as a downgrade, for another board or from a signer
#      outside the trusted CAs; and after a key rotation (two CAs trusted) both signers pass.
# With EDGEINFER_YOCTO_MIRRORS holding meta-tegra.git, the Jetson post-install also runs against
# meta-tegra's own uefi_common.func at the commit kas locks.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
ota="$repo/image/ota"

need() {
  local missing=() t
  for t in "$@"; do command -v "${t%%:*}" >/dev/null 2>&1 || [[ -x "/usr/sbin/${t%%:*}" ]] || missing+=("${t##*:}"); done
  ((${#missing[@]})) || return 0
  echo "== installing ${missing[*]} for the OTA script tests"
  local sudo=""; [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
need shellcheck:shellcheck dash:dash swupdate:swupdate cpio:cpio openssl:openssl zstd:zstd \
  fw_setenv:libubootenv-tool mkenvimage:u-boot-tools

fails=0
ok() { echo "ok: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }

# 1. shellcheck (POSIX sh scripts as sh, the rest as bash).
sh_scripts=("$ota/edgeinfer-ota" "$ota/swupdate/edgeinfer-swupdate-genconfig" "$ota/rpi/edgeinfer-ota-postinstall.sh"
            "$ota/tegra/edgeinfer-ota-postinstall.sh" "$repo/image/overlay/edgeinfer-grow-data"
            "$repo/image/ab/initramfs-init" "$here"/stubs/{nvbootctrl,systemctl,efivar})
bash_scripts=("$ota/mkswu.sh" "$repo/image/keys/gen-dev-keys.sh" "$repo/image/ab/run.sh" "$repo/image/ab/build-rootfs.sh"
              "$repo/image/ab/guest/edgeinfer-ab-agent" "$here/run.sh" "$repo/tools/yocto-check.sh"
              "$repo/image/hawkbit/pin-images.sh")
if out=$(shellcheck -s sh -e SC3043 "${sh_scripts[@]}" 2>&1) && out2=$(shellcheck -s bash "${bash_scripts[@]}" 2>&1); then
  ok "shellcheck clean on ${#sh_scripts[@]} sh and ${#bash_scripts[@]} bash scripts ($(shellcheck --version | sed -n 's/^version: //p'))"
else
  fail "shellcheck:"; echo "${out:-}${out2:-}"
fi

# 2. The device scripts under dash against stubs.
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
# libubootenv's tools as installed, on $t/uboot.env (meta-raspberrypi's fw_env.config, another
# path); every environment write is logged to count them.
mkdir -p "$t/bin"
printf '%s 0x0000 0x4000\n' "$t/uboot.env" > "$t/fw_env.config"
cat > "$t/bin/fw_printenv" <<WRAP
#!/bin/sh
exec $(command -v fw_printenv) -c $t/fw_env.config "\$@"
WRAP
cat > "$t/bin/fw_setenv" <<WRAP
#!/bin/sh
if [ "\$1" = -s ]; then echo "fw_setenv -s \$(tr '\\n' ';' < "\$2")" >> "\$STUB_LOG"; else echo "fw_setenv \$*" >> "\$STUB_LOG"; fi
exec $(command -v fw_setenv) -c $t/fw_env.config "\$@"
WRAP
chmod +x "$t/bin/fw_printenv" "$t/bin/fw_setenv"
export PATH="$t/bin:$here/stubs:$PATH" STUB_LOG="$t/log" STUB_SLOT=0
export EDGEINFER_OTA_DATA="$t/data/ota" EDGEINFER_OTA_FAMILY_FILE="$t/family" EDGEINFER_OTA_CMDLINE="$t/cmdline"
export EDGEINFER_OTA_BOOT_ID="$t/boot_id" EDGEINFER_OTA_BIN="$t/edgeinfer-ota" TMPDIR="$t"
# The scripts as installed: run by dash, whatever their #! line says.
printf '#!/bin/sh\nexec dash %s "$@"\n' "$ota/edgeinfer-ota" > "$t/edgeinfer-ota"; chmod +x "$t/edgeinfer-ota"
eo() { dash "$ota/edgeinfer-ota" "$@"; }
boot() { # a new boot: $1 = family, $2 = booted slot a|b
  echo "$1" > "$t/family"; cat /proc/sys/kernel/random/uuid > "$t/boot_id"
  echo "console=ttyAMA0 root=PARTUUID=x ro edgeinfer.slot=$2" > "$t/cmdline"
  if [[ "$2" == b ]]; then STUB_SLOT=1; else STUB_SLOT=0; fi
  : > "$t/log"
}
# The U-Boot environment as a boot script or SWUpdate left it: NAME=VALUE lines.
setenv() { printf '%s\n' "$@" > "$t/env.txt"; mkenvimage -s 0x4000 -o "$t/uboot.env" "$t/env.txt"; }
envhas() { fw_printenv | grep -qx "$1"; }
reset() { rm -rf "$t/data" "$t/log"; setenv bootlimit=3; : > "$t/log"; }
has() { grep -q -- "$2" "$1"; }

# U-Boot family: a good update from a to b.
reset; boot uboot a
check "uboot: post-install as SWUpdate runs it (no argument) records slot b on trial" bash -c "dash '$ota/rpi/edgeinfer-ota-postinstall.sh' 2>/dev/null && grep -qx slot=b '$t/data/ota/pending'"
rm -rf "$t/data"
check "uboot: post-install as a shellscript's preinst phase does nothing" bash -c "dash '$ota/rpi/edgeinfer-ota-postinstall.sh' preinst && [ ! -e '$t/data/ota/pending' ]"
dash "$ota/rpi/edgeinfer-ota-postinstall.sh" postinst 2>/dev/null
setenv bootlimit=3 edgeinfer_slot=b upgrade_available=1 bootcount=0 ustate=1   # what SWUpdate's bootenv wrote
check "uboot: the install boot is not on trial" eo not-on-trial
fw_setenv bootcount 1; boot uboot b   # the boot script counted
check "uboot: slot b is on trial at the next boot" eo on-trial
check "uboot: not-on-trial says no (ExecCondition skips swupdate.service)" bash -c "! dash '$ota/edgeinfer-ota' not-on-trial"
check "uboot: commit succeeds" eo commit
check "uboot: commit writes the environment once (upgrade_available 0, bootcount 0, ustate 2)" \
  bash -c "[ \$(grep -c fw_setenv '$t/log') = 1 ] && grep -q 'upgrade_available=0;bootcount=0;ustate=2;' '$t/log'"
check "uboot: ... and libubootenv reads it back" bash -c "fw_printenv | grep -qx upgrade_available=0 && fw_printenv | grep -qx ustate=2 && fw_printenv | grep -qx bootcount=0"
check "uboot: outcome success on slot b, marker gone" bash -c "grep -qx result=success '$t/data/ota/outcome' && grep -qx slot=b '$t/data/ota/outcome' && [ ! -e '$t/data/ota/pending' ]"
boot uboot b
check "uboot: commit on a committed slot writes nothing (no flash wear per boot)" bash -c "dash '$ota/edgeinfer-ota' commit 2>/dev/null && ! grep -q fw_setenv '$t/log'"
check "uboot: rollback on a committed slot does not reboot" bash -c "dash '$ota/edgeinfer-ota' rollback 2>/dev/null && ! grep -q reboot '$t/log'"
# A bad update from b to a: trial boots reboot; after U-Boot's fallback, nothing reboots.
boot uboot b; dash "$ota/rpi/edgeinfer-ota-postinstall.sh" postinst 2>/dev/null
setenv edgeinfer_slot=a upgrade_available=1 bootcount=0 ustate=1
boot uboot a
check "uboot: rollback on the trial slot reboots" bash -c "dash '$ota/edgeinfer-ota' rollback 2>/dev/null && grep -q 'systemctl --no-block reboot' '$t/log'"
setenv edgeinfer_slot=b upgrade_available=0 bootcount=0 ustate=3   # what altbootcmd left
boot uboot b
check "uboot: after the fallback, rollback does not reboot (no reboot loop on an unhealthy old slot)" \
  bash -c "dash '$ota/edgeinfer-ota' rollback 2>/dev/null && ! grep -q reboot '$t/log'"
check "uboot: the fallback is recorded as failed for slot a, marker gone" \
  bash -c "grep -qx result=failed '$t/data/ota/outcome' && grep -qx slot=a '$t/data/ota/outcome' && [ ! -e '$t/data/ota/pending' ]"
# An install cut before SWUpdate switched the environment.
reset; boot uboot a; dash "$ota/rpi/edgeinfer-ota-postinstall.sh" postinst 2>/dev/null
setenv upgrade_available=0 recovery_status=in_progress
boot uboot a
check "uboot: an interrupted install is recorded as such and not rebooted for" \
  bash -c "dash '$ota/edgeinfer-ota' commit 2>/dev/null && grep -qx result=interrupted '$t/data/ota/outcome' && ! grep -q reboot '$t/log'"
# The marker of the current boot (install just done) is left alone.
reset; boot uboot a; dash "$ota/rpi/edgeinfer-ota-postinstall.sh" postinst 2>/dev/null
check "uboot: commit in the install boot keeps the new marker" bash -c "dash '$ota/edgeinfer-ota' commit 2>/dev/null && [ -e '$t/data/ota/pending' ]"

# Jetson family.
reset; boot tegra a
mkdir -p "$t/esp"; head -c 4096 /dev/urandom > "$t/esp/TEGRA_BL.Cap"
export EDGEINFER_OTA_CAPSULE="$t/esp/TEGRA_BL.Cap" EDGEINFER_OTA_UEFI_COMMON="$here/stubs/uefi_common.func"
unset RUNTIME_DIRECTORY
check "tegra: post-install runs under dash with set -eu (uefi_common.func's \$4 and \$RUNTIME_DIRECTORY), no argument as SWUpdate runs it" \
  dash "$ota/tegra/edgeinfer-ota-postinstall.sh"
check "tegra: post-install clears slot B's unbootable status" has "$t/log" "efivar write 781e084c-a330-417c-b678-38e696380cb9-RootfsStatusSlotB 00000000"
check "tegra: post-install requests the capsule update (OsIndications)" has "$t/log" "efivar write 8be4df61-93ca-11d2-aa0d-00e098032b8c-OsIndications 0400000000000000"
check "tegra: post-install does not switch the boot slot itself" bash -c "! grep -q set-active-boot-slot '$t/log'"
check "tegra: post-install records slot b on trial" grep -qx slot=b "$t/data/ota/pending"
if mirror="${EDGEINFER_YOCTO_MIRRORS:-}" && [[ -n "$mirror" && -d "$mirror/meta-tegra.git" ]]; then
  rev=$(sed -n '/meta-tegra:/,/commit:/s/ *commit: *//p' "$repo/yocto/kas/jetson-orin-nano-devkit.lock.yml")
  if git -c safe.directory='*' --git-dir="$mirror/meta-tegra.git" show "$rev:recipes-bsp/tools/setup-nv-boot-control/uefi_common.func.in" > "$t/uefi_common.func" 2>/dev/null; then
    : > "$t/log"; rm -f "$t/data/ota/pending"
    check "tegra: post-install also runs with meta-tegra's uefi_common.func (${rev:0:12})" \
      env EDGEINFER_OTA_UEFI_COMMON="$t/uefi_common.func" dash "$ota/tegra/edgeinfer-ota-postinstall.sh" postinst
    check "tegra: ... and writes the same variables" has "$t/log" "RootfsStatusSlotB 00000000"
  fi
fi
rm -f "$EDGEINFER_OTA_CAPSULE"
check "tegra: post-install fails when the capsule is not on the ESP" bash -c "! dash '$ota/tegra/edgeinfer-ota-postinstall.sh' postinst 2>/dev/null"
echo capsule > "$EDGEINFER_OTA_CAPSULE"
boot tegra b
check "tegra: slot b on trial after the capsule switched (nv_update_verifier skipped)" bash -c "dash '$ota/edgeinfer-ota' on-trial && ! dash '$ota/edgeinfer-ota' not-on-trial"
check "tegra: commit runs nvbootctrl verify" bash -c "dash '$ota/edgeinfer-ota' commit 2>/dev/null && grep -q 'nvbootctrl verify' '$t/log'"
check "tegra: after the commit nv_update_verifier runs again on every boot" eo not-on-trial
check "tegra: outcome success recorded, unreported" bash -c "grep -qx result=success '$t/data/ota/outcome' && grep -qx reported=0 '$t/data/ota/outcome'"
# Fallback on Jetson: marker for b, UEFI back on a.
boot tegra a; dash "$ota/tegra/edgeinfer-ota-postinstall.sh" postinst 2>/dev/null
boot tegra a
check "tegra: after a fallback, rollback does not reboot and records the failure" \
  bash -c "dash '$ota/edgeinfer-ota' rollback 2>/dev/null && ! grep -q reboot '$t/log' && grep -qx result=failed '$t/data/ota/outcome'"

# SWUpdate's runtime configuration.
export EDGEINFER_OTA_RUN="$t/run" EDGEINFER_OTA_SHARE="$ota/swupdate" EDGEINFER_OTA_OS_RELEASE="$t/os-release"
printf 'ID=edgeinferos\nVERSION_ID=0.1.0\nIMAGE_VERSION=1.4.2\n' > "$t/os-release"
boot uboot a
check "genconfig (uboot) runs under dash" dash "$ota/swupdate/edgeinfer-swupdate-genconfig"
check "genconfig: bootloader uboot, install to slot b, downgrade floor 1.4.2" \
  bash -c "grep -q 'bootloader = \"uboot\"' '$t/run/swupdate.cfg' && grep -q 'select = \"stable,to_b\"' '$t/run/swupdate.cfg' && grep -q 'no-downgrading = \"1.4.2\"' '$t/run/swupdate.cfg'"
check "genconfig: no hawkBit configured, no suricatta" test -z "$(cat "$t/run/suricatta-args")"
boot tegra b
printf 'HAWKBIT_URL=https://hawkbit.example.com\nHAWKBIT_TARGET_TOKEN=t0k3n\n' > "$t/data/ota/hawkbit.env"
printf 'result=success\nslot=b\nat=now\nreported=0\n' > "$t/data/ota/outcome"
check "genconfig (tegra) runs under dash" dash "$ota/swupdate/edgeinfer-swupdate-genconfig"
check "genconfig (tegra): bootloader none, install to slot a, hawkBit URL and token" \
  bash -c "grep -q 'bootloader = \"none\"' '$t/run/swupdate.cfg' && grep -q 'select = \"stable,to_a\"' '$t/run/swupdate.cfg' && grep -q 'url = \"https://hawkbit.example.com\"' '$t/run/swupdate.cfg' && grep -q 't0k3n' '$t/run/swupdate.cfg'"
check "genconfig (tegra): the outcome goes to hawkBit once (-c 2)" bash -c "grep -qx -- '-p 300 -c 2' '$t/run/suricatta-args' && grep -qx reported=1 '$t/data/ota/outcome'"
dash "$ota/swupdate/edgeinfer-swupdate-genconfig"
check "genconfig (tegra): ... and not again" grep -qx -- '-p 300' "$t/run/suricatta-args"

# 3. Bundles from the project's sw-description files, checked by Debian's swupdate.
for k in old new foreign; do "$repo/image/keys/gen-dev-keys.sh" "$t/keys/$k" "edgeinfer-test-$k" >/dev/null; done
cat "$t/keys/old/swupdate-ca.pem" "$t/keys/new/swupdate-ca.pem" > "$t/keys/trusted.pem"
head -c 65536 /dev/urandom > "$t/rootfs.img"
# Payloads SWUpdate's check mode can stream through the handlers: a zstd image and a tarball.
zstd -q -c "$t/rootfs.img" > "$t/rootfs.img.zst"
tar -C "$t" -czf "$t/rootfs.tar.gz" rootfs.img
bundle() { # $1 family, $2 out, $3 version, $4 key, $5 board
  local d; d=$(mktemp -d "$t/b.XXXX")
  cp "$ota/$1/edgeinfer-ota-postinstall.sh" "$d/"
  if [[ "$1" == tegra ]]; then
    cp "$t/rootfs.tar.gz" "$d/rootfs.tar.gz"; cp "$t/rootfs.img" "$d/tegra-bl.cap"
    "$ota/mkswu.sh" -o "$2" -s "$ota/tegra/sw-description" -k "$t/keys/$4/swupdate-signer.key" -c "$t/keys/$4/swupdate-signer.pem" \
      -V "EDGEINFER_IMAGE_VERSION=$3" -V MACHINE=jetson-orin-nano-devkit -V "EDGEINFER_HW_BOARD=$5" -V EDGEINFER_HW_REVISION=1.0 \
      -V EDGEINFER_ROOTFS_IMAGE=rootfs.tar.gz -V EDGEINFER_TEGRA_CAPSULE_PATH=/boot/efi/EFI/UpdateCapsule/TEGRA_BL.Cap \
      -V EDGEINFER_TEGRA_BOOTLOADER_VERSION=39.2.0 "$d/edgeinfer-ota-postinstall.sh" "$d/rootfs.tar.gz" "$d/tegra-bl.cap"
  else
    cp "$t/rootfs.img.zst" "$d/rootfs.ext4.zst"
    "$ota/mkswu.sh" -o "$2" -s "$ota/rpi/sw-description" -k "$t/keys/$4/swupdate-signer.key" -c "$t/keys/$4/swupdate-signer.pem" \
      -V "EDGEINFER_IMAGE_VERSION=$3" -V MACHINE=raspberrypi4-64 -V "EDGEINFER_HW_BOARD=$5" -V EDGEINFER_HW_REVISION=1.0 \
      -V EDGEINFER_ROOTFS_IMAGE=rootfs.ext4.zst -V EDGEINFER_SLOT_A_DEVICE=/dev/mmcblk0p2 -V EDGEINFER_SLOT_B_DEVICE=/dev/mmcblk0p3 \
      "$d/edgeinfer-ota-postinstall.sh" "$d/rootfs.ext4.zst"
  fi
}
# The verdict is read from the log: Debian's swupdate 2022.12 sometimes exits 1 after "SWUpdate
# was successful" in check mode (a race at shutdown), so its exit status proves nothing.
swcheck() { # $1 bundle, $2 board, $3 select, $4 running version, $5 CA file; prints SWUpdate's log
  swupdate -c -i "$1" -k "$5" --cert-purpose codeSigning -H "$2:1.0" -e "stable,$3" -N "$4" -l 4 2>&1
}
export -f swcheck
for fam in rpi:raspberrypi4-64:to_b tegra:jetson-orin-nano-devkit:to_a; do
  IFS=: read -r f board sel <<< "$fam"
  bundle "$f" "$t/$f-good.swu" 1.2.0 old "$board"
  bundle "$f" "$t/$f-rotated.swu" 1.2.0 new "$board"
  bundle "$f" "$t/$f-down.swu" 1.0.0 old "$board"
  bundle "$f" "$t/$f-foreign.swu" 1.2.0 foreign "$board"
  check "$f: bundle accepted for $board 1.0 on top of 1.1.0 ($sel)" bash -c "swcheck '$t/$f-good.swu' '$board' '$sel' 1.1.0 '$t/keys/trusted.pem' | grep -q 'SWUpdate was successful'"
  check "$f: bundle signed with the rotated key accepted (two CAs trusted)" bash -c "swcheck '$t/$f-rotated.swu' '$board' '$sel' 1.1.0 '$t/keys/trusted.pem' | grep -q 'SWUpdate was successful'"
  check "$f: rotated key refused by an image that trusts only the old CA" bash -c "swcheck '$t/$f-rotated.swu' '$board' '$sel' 1.1.0 '$t/keys/old/swupdate-ca.pem' | grep -q 'Authentication of all signatures failed'"
  check "$f: downgrade refused" bash -c "swcheck '$t/$f-down.swu' '$board' '$sel' 1.1.0 '$t/keys/trusted.pem' | grep -q 'No downgrading allowed'"
  check "$f: unknown signer refused" bash -c "swcheck '$t/$f-foreign.swu' '$board' '$sel' 1.1.0 '$t/keys/trusted.pem' | grep -q 'Authentication of all signatures failed'"
  check "$f: other board refused (/etc/hwrevision)" bash -c "swcheck '$t/$f-good.swu' other-board '$sel' 1.1.0 '$t/keys/trusted.pem' | grep -q 'HW compatibility not found'"
  check "$f: board without /etc/hwrevision entry for revision 2.0 refused" bash -c "swupdate -c -i '$t/$f-good.swu' -k '$t/keys/trusted.pem' --cert-purpose codeSigning -H '$board:2.0' -e 'stable,$sel' -l 4 2>&1 | grep -q 'SW not compatible with hardware'"
done

if ((fails)); then echo "OTA script tests: $fails FAILED"; exit 1; fi
echo "OTA script tests passed"
