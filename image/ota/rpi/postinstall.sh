#!/bin/sh
# SWUpdate post-install (Raspberry Pi): the slot switch itself is the bootenv section of
# sw-description (applied after this script); here the update is marked as on trial on /data.
set -eu
[ "${1:-}" = "postinst" ] || exit 0
/usr/libexec/edgeinfer-ota/edgeinfer-ota pending
