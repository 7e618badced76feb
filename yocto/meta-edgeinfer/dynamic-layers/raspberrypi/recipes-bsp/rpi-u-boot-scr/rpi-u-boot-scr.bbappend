# The A/B boot script (slot selection, kernel from the slot, boot-count fallback).
FILESEXTRAPATHS:prepend:edgeinferos := "${EDGEINFER_REPO_DIR}/image/ota/rpi:"
