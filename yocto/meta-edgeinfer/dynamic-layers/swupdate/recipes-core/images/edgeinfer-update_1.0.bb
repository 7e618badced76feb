SUMMARY = "edgeinfer A/B update bundle (SWUpdate .swu, signed)"
DESCRIPTION = "The root filesystem of edgeinfer-image for the inactive slot (raw ext4 on the \
               Pi, a tarball on Jetson plus the UEFI capsule), a post-install script that puts \
               the new slot on trial, and a CMS-signed sw-description."
HOMEPAGE = "https://example.invalid/edgeinfer"
BUGTRACKER = "https://example.invalid/edgeinfer/issues"
SECTION = "images"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

inherit swupdate
# L4T_VERSION (the capsule's version in sw-description) comes from meta-tegra's class.
EDGEINFER_SWU_CLASSES ?= ""
EDGEINFER_SWU_CLASSES:tegra ?= "l4t_version"
inherit_defer ${EDGEINFER_SWU_CLASSES}

# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext - files come from the repository's image/ directory
FILESEXTRAPATHS:prepend := "${EDGEINFER_REPO_DIR}/image/ota/rpi:"
# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext - files come from the repository's image/ directory
FILESEXTRAPATHS:prepend:tegra := "${EDGEINFER_REPO_DIR}/image/ota/tegra:"
# SRC_URI files go into the bundle as they are (swupdate.bbclass), next to SWUPDATE_IMAGES.
SRC_URI = "file://sw-description \
           file://edgeinfer-ota-postinstall.sh"

# Values of the @@...@@ placeholders in sw-description (image/ota/mkswu.sh fills the same ones
# for the QEMU rehearsal, image/ab/run.sh).
EDGEINFER_IMAGE_VERSION ??= "${DISTRO_VERSION}"
EDGEINFER_HW_BOARD ??= "${MACHINE}"
EDGEINFER_HW_REVISION ??= "1.0"
EDGEINFER_ROOTFS_IMAGE ?= "edgeinfer-image-${MACHINE}.rootfs.ext4.zst"
EDGEINFER_ROOTFS_IMAGE:tegra ?= "edgeinfer-image-${MACHINE}.rootfs.tar.gz"
# Raspberry Pi SD card (image/wic/edgeinfer-rpi-ab.wks.in): root_a, root_b.
EDGEINFER_SLOT_A_DEVICE ?= "/dev/mmcblk0p2"
EDGEINFER_SLOT_B_DEVICE ?= "/dev/mmcblk0p3"
# Jetson: where meta-tegra's boot-efi.mount has the ESP, and the capsule's version (L4T's, as in
# OE4T tegra-demo-distro's tegra-swupdate.inc).
EDGEINFER_TEGRA_CAPSULE_PATH ?= "/boot/efi/EFI/UpdateCapsule/TEGRA_BL.Cap"
EDGEINFER_TEGRA_BOOTLOADER_VERSION ?= "${L4T_VERSION}"

IMAGE_DEPENDS = "edgeinfer-image"
SWUPDATE_IMAGES = "${EDGEINFER_ROOTFS_IMAGE}"
SWUPDATE_IMAGES:append:tegra = " tegra-bl.cap"

# The capsule comes from meta-tegra's tegra-uefi-capsules. A machine override on a variable
# (not bb.utils.contains on MACHINEOVERRIDES, which is colon-separated) adds the dependency.
EDGEINFER_SWU_DEPENDS ?= ""
EDGEINFER_SWU_DEPENDS:tegra ?= "tegra-uefi-capsules:do_deploy"
do_swuimage[depends] += "${EDGEINFER_SWU_DEPENDS}"
