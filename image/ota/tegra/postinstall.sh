#!/bin/sh
# SWUpdate post-install (Jetson, L4T UEFI A/B): make the freshly written slot the active boot
# chain, clear its "unbootable" status, request capsule processing on the next boot, and mark
# the update as on trial on /data. Follows OE4T tegra-demo-distro's tegra-swupdate-script.
set -eu
[ "${1:-}" = "postinst" ] || exit 0
current=$(nvbootctrl get-current-slot)
if [ "$current" = "1" ]; then alt=0; status=RootfsStatusSlotA; else alt=1; status=RootfsStatusSlotB; fi
. /usr/bin/uefi_common.func
set_efi_var "$status" 781e084c-a330-417c-b678-38e696380cb9 '\x00\x00\x00\x00'
nvbootctrl set-active-boot-slot "$alt"
/usr/bin/oe4t-set-uefi-OSIndications
/usr/libexec/edgeinfer-ota/edgeinfer-ota pending
