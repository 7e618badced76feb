# edgeinfer's SWUpdate build configuration: signed bundles, hawkBit (suricatta), the handlers
# the A/B bundles use, and the bootloader interface of the machine family.
FILESEXTRAPATHS:prepend:edgeinfer := "${EDGEINFER_REPO_DIR}/image/ota/swupdate:"
SRC_URI:append:edgeinfer = " file://edgeinfer.cfg"
SRC_URI:append:edgeinfer:rpi = " file://edgeinfer-uboot.cfg"
SRC_URI:append:edgeinfer:tegra = " file://edgeinfer-tegra.cfg"
