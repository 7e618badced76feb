# edgeinfer's SWUpdate build configuration: signed bundles, hawkBit (suricatta), the handlers
# the A/B bundles use, and the bootloader interface of the machine family.
FILESEXTRAPATHS:prepend:edgeinferos := "${EDGEINFER_REPO_DIR}/image/ota/swupdate:"
SRC_URI:append:edgeinferos = " file://edgeinfer.cfg"
SRC_URI:append:edgeinferos:rpi = " file://edgeinfer-uboot.cfg"
SRC_URI:append:edgeinferos:tegra = " file://edgeinfer-tegra.cfg"
