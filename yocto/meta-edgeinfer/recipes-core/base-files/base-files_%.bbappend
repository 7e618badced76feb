# The persistent data partition: "data" on the Pi (image/wic/edgeinfer-rpi-ab.wks.in), the
# L4T user-data partition "UDA" on Jetson. Formatted on first boot if the flash layout left it
# empty (x-systemd.makefs); its file system follows the partition's size (x-systemd.growfs): on
# the Pi, edgeinfer-grow-data.service (edgeinfer-rootfs) first grows the partition to the card.
# nooelint: oelint.vars.noncoreoverride - "tegra" is meta-tegra's machine family override
EDGEINFER_DATA_DEVICE ??= "LABEL=data"
EDGEINFER_DATA_DEVICE:tegra ??= "PARTLABEL=UDA"

do_install:append:edgeinferos() {
    printf '%s\t/data\text4\tdefaults,noatime,x-systemd.makefs,x-systemd.growfs\t0\t2\n' \
        "${EDGEINFER_DATA_DEVICE}" >> ${D}${sysconfdir}/fstab
}

# Raspberry Pi: the shared boot partition holds the U-Boot environment (/boot/uboot.env, see
# meta-raspberrypi's fw_env.config) that SWUpdate and edgeinfer-ota write.
do_install:append:edgeinferos:rpi() {
    printf 'LABEL=boot\t/boot\tvfat\tdefaults,noatime,umask=0077\t0\t2\n' >> ${D}${sysconfdir}/fstab
}
