SUMMARY = "edgeinfer appliance image"
DESCRIPTION = "systemd, mosquitto, edgeinfer and the SWUpdate OTA client on a read-only root \
               filesystem in A/B slots, with a persistent /data partition holding \
               /var/lib/edgeinfer (models, spool, state), OTA staging and site configuration."
HOMEPAGE = "https://example.invalid/edgeinfer"
BUGTRACKER = "https://example.invalid/edgeinfer/issues"
SECTION = "images"
LICENSE = "MIT"

inherit core-image

IMAGE_FEATURES += "read-only-rootfs"
IMAGE_LINGUAS = ""

# packagegroup-core-boot brings MACHINE_ESSENTIAL_EXTRA_RDEPENDS; packagegroup-edgeinfer-machine
# brings MACHINE_EXTRA_RDEPENDS/RRECOMMENDS (Jetson's boot control: tegra-redundant-boot,
# nvbootctrl, setup-nv-boot-control, efivar), which core-image's default (packagegroup-base)
# would have carried.
IMAGE_INSTALL = "packagegroup-core-boot \
                 packagegroup-edgeinfer-machine \
                 edgeinfer \
                 edgeinfer-rootfs \
                 mosquitto \
                 ${EDGEINFER_OTA_INSTALL} \
                 ${CORE_IMAGE_EXTRA_INSTALL}"
# The OTA client when meta-swupdate is present (it is in every kas configuration).
EDGEINFER_OTA_INSTALL ?= "${@bb.utils.contains('BBFILE_COLLECTIONS', 'swupdate', 'edgeinfer-ota swupdate', '', d)}"

# Room for what a later version brings in one slot (the bundle must fit the other slot).
IMAGE_ROOTFS_EXTRA_SPACE = "262144"

# Raspberry Pi: each slot boots its own kernel (boot.scr loads /boot/<image> from the slot),
# and the SD card image has the A/B layout; the slot image for bundles is ext4.zst.
IMAGE_INSTALL:append:rpi = " kernel-image libubootenv-bin"
EDGEINFER_ROOTFS_SLOT_SIZE ?= "2048M"
WKS_FILE:rpi = "edgeinfer-rpi-ab.wks.in"
WKS_SEARCH_PATH:prepend := "${EDGEINFER_REPO_DIR}/image/wic:"
IMAGE_FSTYPES:rpi = "wic.bz2 wic.bmap ext4.zst"
