# Boot counting in the environment, for the A/B fallback (image/ota/rpi/bootcount.cfg).
FILESEXTRAPATHS:prepend:edgeinfer := "${EDGEINFER_REPO_DIR}/image/ota/rpi:"
SRC_URI:append:edgeinfer:rpi = " file://bootcount.cfg"
