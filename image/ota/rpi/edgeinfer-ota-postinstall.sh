#!/bin/sh
# SWUpdate post-install (U-Boot family: Raspberry Pi, and the QEMU rehearsal in image/ab/): the
# update is recorded as on trial on /data. The slot switch itself is the bootenv section of
# sw-description (edgeinfer_slot, upgrade_available=1, bootcount=0), which SWUpdate applies after
# this script, together with its own ustate=1 ("installed").
set -eu
# sw-description gives it type "postinstall": SWUpdate runs it once, after the images, with no
# argument (a "shellscript" would get preinst, then postinst; only postinst acts).
case "${1:-}" in "" | postinst) ;; *) exit 0 ;; esac
exec "${EDGEINFER_OTA_BIN:-/usr/libexec/edgeinfer-ota/edgeinfer-ota}" pending
