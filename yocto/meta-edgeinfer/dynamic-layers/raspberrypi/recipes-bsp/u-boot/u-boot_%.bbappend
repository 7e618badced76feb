# Boot counting in the environment, for the A/B fallback (image/ota/rpi/bootcount.cfg).
FILESEXTRAPATHS:prepend:edgeinferos := "${EDGEINFER_REPO_DIR}/image/ota/rpi:"
SRC_URI:append:edgeinferos:rpi = " file://bootcount.cfg"
