SUMMARY = "edgeinfer appliance root filesystem configuration: persistent /data layout"
DESCRIPTION = "Bind mounts of the services' state onto the persistent data partition and its \
               layout, the data partition's growth to the medium, and the hardware watchdog, \
               from image/overlay of the edgeinfer repository."
HOMEPAGE = "https://example.invalid/edgeinfer"
BUGTRACKER = "https://example.invalid/edgeinfer/issues"
SECTION = "base"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext - files come from the repository's image/ directory
FILESEXTRAPATHS:prepend := "${EDGEINFER_REPO_DIR}/image/overlay:"
SRC_URI = "file://systemd/var-lib-edgeinfer.mount \
           file://systemd/var-lib-mosquitto.mount \
           file://systemd/edgeinfer-data-layout.service \
           file://systemd/edgeinfer-grow-data.service \
           file://systemd/edgeinfer-watchdog.conf \
           file://edgeinfer-grow-data \
           file://edgeinfer-data.tmpfiles \
           file://mosquitto/edgeinfer.conf"

S = "${UNPACKDIR}"

inherit systemd

SYSTEMD_SERVICE:${PN} = "var-lib-edgeinfer.mount var-lib-mosquitto.mount"
# Growing the data partition: the Pi's wic layout makes it 256 MiB. On Jetson the flash layout
# sizes UDA itself.
SYSTEMD_SERVICE:${PN}:append:rpi = " edgeinfer-grow-data.service"

do_install() {
    install -d ${D}${systemd_system_unitdir} ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/systemd/var-lib-edgeinfer.mount ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/var-lib-mosquitto.mount ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/edgeinfer-data-layout.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/edgeinfer-grow-data.service ${D}${systemd_system_unitdir}/
    install -d ${D}${libexecdir}/edgeinfer ${D}${systemd_unitdir}/system.conf.d
    install -m 0755 ${S}/edgeinfer-grow-data ${D}${libexecdir}/edgeinfer/
    install -m 0644 ${S}/systemd/edgeinfer-watchdog.conf ${D}${systemd_unitdir}/system.conf.d/10-edgeinfer-watchdog.conf
    install -m 0644 ${S}/edgeinfer-data.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/edgeinfer-data.conf
    install -d ${D}${sysconfdir}/mosquitto/conf.d
    install -m 0644 ${S}/mosquitto/edgeinfer.conf ${D}${sysconfdir}/mosquitto/conf.d/edgeinfer.conf
}

# The grow service is enabled on the Pi only.
PACKAGE_ARCH = "${MACHINE_ARCH}"
FILES:${PN} += "${nonarch_libdir}/tmpfiles.d/edgeinfer-data.conf ${systemd_unitdir}/system.conf.d \
                ${libexecdir}/edgeinfer"

RDEPENDS:${PN}:append:rpi = " util-linux-sfdisk util-linux-partx util-linux-blkid util-linux-flock"
