#!/bin/sh
# SWUpdate post-install (Jetson, L4T UEFI A/B), after OE4T tegra-demo-distro's
# tegra-swupdate-script: the bootloader capsule is on the ESP, so ask UEFI to process it at the
# next boot (OsIndications) and clear the "unbootable" status of the slot just written. The
# capsule update itself switches boot chain and root file system to that slot: no
# `nvbootctrl set-active-boot-slot` here (that would switch a second time). Then the update is
# recorded as on trial on /data.
#
# meta-tegra's uefi_common.func reads its 4th argument and $RUNTIME_DIRECTORY: both are given,
# since SWUpdate runs this with `set -eu` semantics (unset variables abort).
set -eu
# sw-description gives it type "postinstall": SWUpdate runs it once, after the images, with no
# argument (a "shellscript" would get preinst, then postinst; only postinst acts).
case "${1:-}" in "" | postinst) ;; *) exit 0 ;; esac
common=${EDGEINFER_OTA_UEFI_COMMON:-/usr/bin/uefi_common.func}
capsule=${EDGEINFER_OTA_CAPSULE:-/boot/efi/EFI/UpdateCapsule/TEGRA_BL.Cap}
RUNTIME_DIRECTORY=${RUNTIME_DIRECTORY:-}

if [ ! -s "$capsule" ]; then
    echo "edgeinfer-ota: $capsule missing: the ESP is not mounted at /boot/efi or the bundle has no capsule" >&2
    exit 1
fi
if [ "$(nvbootctrl get-current-slot)" = 1 ]; then status=RootfsStatusSlotA; else status=RootfsStatusSlotB; fi
# shellcheck source=/dev/null
. "$common"
# Values as printf %b octal escapes (\0ddd): POSIX, so they mean the same bytes whichever shell
# /bin/sh is (dash's printf has no \x escapes; tegra-demo-distro passes \x00).
set_efi_var "$status" 781e084c-a330-417c-b678-38e696380cb9 '\0000\0000\0000\0000' ""
set_efi_var OsIndications 8be4df61-93ca-11d2-aa0d-00e098032b8c '\0004\0000\0000\0000\0000\0000\0000\0000' ""
exec "${EDGEINFER_OTA_BIN:-/usr/libexec/edgeinfer-ota/edgeinfer-ota}" pending
