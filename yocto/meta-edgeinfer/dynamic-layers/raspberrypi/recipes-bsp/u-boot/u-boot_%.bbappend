# What the A/B boot script needs from U-Boot (image/ota/rpi/edgeinfer-bootscript.cfg): it counts
# boots itself (setexpr, itest) and keeps uboot.env with env export/import and fatwrite, so the
# same script runs on the Pi and in the QEMU rehearsal (image/ab/).
FILESEXTRAPATHS:prepend:edgeinferos := "${EDGEINFER_REPO_DIR}/image/ota/rpi:"
SRC_URI:append:edgeinferos:rpi = " file://edgeinfer-bootscript.cfg"
