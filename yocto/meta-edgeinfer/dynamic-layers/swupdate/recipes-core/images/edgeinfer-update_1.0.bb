SUMMARY = "edgeinfer A/B update bundle (SWUpdate .swu, signed)"
DESCRIPTION = "The root filesystem of edgeinfer-image for the inactive slot (raw ext4 on the \
               Pi, a tarball on Jetson plus the UEFI capsule), a post-install script that puts \
               the new slot on trial, and a signed sw-description."
HOMEPAGE = "https://example.invalid/edgeinfer"
BUGTRACKER = "https://example.invalid/edgeinfer/issues"
SECTION = "images"
LICENSE = "MIT"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

inherit swupdate

# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext - files come from the repository's image/ directory
FILESEXTRAPATHS:prepend := "${EDGEINFER_REPO_DIR}/image/ota/rpi:"
# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext - files come from the repository's image/ directory
FILESEXTRAPATHS:prepend:tegra := "${EDGEINFER_REPO_DIR}/image/ota/tegra:"
SRC_URI = "file://sw-description \
           file://postinstall.sh;subdir=scripts"

EDGEINFER_IMAGE_VERSION ??= "${DISTRO_VERSION}"
EDGEINFER_ROOTFS_IMAGE ?= "edgeinfer-image-${MACHINE}.rootfs.ext4.gz"
EDGEINFER_ROOTFS_IMAGE:tegra ?= "edgeinfer-image-${MACHINE}.rootfs.tar.gz"

IMAGE_DEPENDS = "edgeinfer-image"
SWUPDATE_IMAGES = "${EDGEINFER_ROOTFS_IMAGE} edgeinfer-ota-postinstall.sh"
SWUPDATE_IMAGES:append:tegra = " tegra-bl.cap"
do_swuimage[depends] += "${@bb.utils.contains('MACHINEOVERRIDES', 'tegra', 'tegra-uefi-capsules:do_deploy', '', d)}"

do_copy_postinstall() {
    install -m 0755 ${UNPACKDIR}/scripts/postinstall.sh ${WORKDIR}/edgeinfer-ota-postinstall.sh
}
do_copy_postinstall[doc] = "Puts the post-install script where swupdate.bbclass collects SWUPDATE_IMAGES"
addtask copy_postinstall after do_unpack before do_swuimage
