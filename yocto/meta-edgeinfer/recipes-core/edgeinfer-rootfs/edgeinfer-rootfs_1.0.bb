SUMMARY = "edgeinfer appliance root filesystem configuration: persistent /data layout"
DESCRIPTION = "Bind mounts of the services' state onto the persistent data partition and its \
               layout, from image/overlay of the edgeinfer repository."
HOMEPAGE = "https://example.invalid/edgeinfer"
BUGTRACKER = "https://example.invalid/edgeinfer/issues"
SECTION = "base"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext - files come from the repository's image/ directory
FILESEXTRAPATHS:prepend := "${EDGEINFER_REPO_DIR}/image/overlay:"
SRC_URI = "file://systemd/var-lib-edgeinfer.mount \
           file://systemd/var-lib-mosquitto.mount \
           file://edgeinfer-data.tmpfiles \
           file://mosquitto/edgeinfer.conf"

S = "${UNPACKDIR}"

inherit systemd allarch

SYSTEMD_SERVICE:${PN} = "var-lib-edgeinfer.mount var-lib-mosquitto.mount"

do_install() {
    install -d ${D}${systemd_system_unitdir} ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/systemd/var-lib-edgeinfer.mount ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/var-lib-mosquitto.mount ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/edgeinfer-data.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/edgeinfer-data.conf
    install -d ${D}${sysconfdir}/mosquitto/conf.d
    install -m 0644 ${S}/mosquitto/edgeinfer.conf ${D}${sysconfdir}/mosquitto/conf.d/edgeinfer.conf
}

FILES:${PN} += "${nonarch_libdir}/tmpfiles.d/edgeinfer-data.conf"
