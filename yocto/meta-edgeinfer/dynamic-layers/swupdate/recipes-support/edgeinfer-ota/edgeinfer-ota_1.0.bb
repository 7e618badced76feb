SUMMARY = "A/B update glue for edgeinfer appliances: SWUpdate configuration and slot commit"
DESCRIPTION = "Commits the booted slot after boot-complete.target (which requires edgeinfer's \
               health gate), falls back when an update is unhealthy, records outcomes on /data, \
               and configures SWUpdate (slot selection, downgrade floor, CMS trust anchors, \
               hardware revision, hawkBit) per machine family."
HOMEPAGE = "https://example.invalid/edgeinfer"
BUGTRACKER = "https://example.invalid/edgeinfer/issues"
SECTION = "admin"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext - files come from the repository's image/ directory
FILESEXTRAPATHS:prepend := "${EDGEINFER_REPO_DIR}/image/ota:"
SRC_URI = "file://edgeinfer-ota \
           file://edgeinfer-ota-commit.service \
           file://edgeinfer-ota-rollback.service \
           file://edgeinfer-health-gate-ota.conf \
           file://swupdate/swupdate.cfg.in \
           file://swupdate/edgeinfer-swupdate-genconfig \
           file://swupdate/10-edgeinfer \
           file://swupdate/swupdate-edgeinfer.conf"
SRC_URI:append:tegra = " \
    file://tegra/swupdate-edgeinfer-tegra.conf \
    file://tegra/nv-update-verifier-edgeinfer.conf \
"

S = "${UNPACKDIR}"

inherit systemd

# How slots are switched and committed: U-Boot environment on the Pi, UEFI capsule + nvbootctrl
# on Jetson.
EDGEINFER_OTA_FAMILY ??= "uboot"
EDGEINFER_OTA_FAMILY:tegra ??= "tegra"
# /etc/hwrevision: SWUpdate refuses a bundle whose sw-description has no entry for this board and
# revision (the edgeinfer-update recipe writes the same two values into it).
EDGEINFER_HW_BOARD ??= "${MACHINE}"
EDGEINFER_HW_REVISION ??= "1.0"
# The CA certificates bundles must chain to (CMS signatures; image/keys/gen-dev-keys.sh makes a
# development CA). Several files may be listed: that is how the signing key is rotated.
SWUPDATE_CA_CERTS ??= ""

SYSTEMD_SERVICE:${PN} = "edgeinfer-ota-commit.service"

do_install() {
    install -d ${D}${libexecdir}/edgeinfer-ota ${D}${systemd_system_unitdir}
    install -m 0755 ${S}/edgeinfer-ota ${D}${libexecdir}/edgeinfer-ota/
    install -m 0755 ${S}/swupdate/edgeinfer-swupdate-genconfig ${D}${libexecdir}/edgeinfer-ota/
    install -m 0644 ${S}/edgeinfer-ota-commit.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/edgeinfer-ota-rollback.service ${D}${systemd_system_unitdir}/
    install -d ${D}${systemd_system_unitdir}/edgeinfer-health-gate.service.d
    install -m 0644 ${S}/edgeinfer-health-gate-ota.conf \
        ${D}${systemd_system_unitdir}/edgeinfer-health-gate.service.d/ota.conf
    install -d ${D}${systemd_system_unitdir}/swupdate.service.d
    install -m 0644 ${S}/swupdate/swupdate-edgeinfer.conf ${D}${systemd_system_unitdir}/swupdate.service.d/edgeinfer.conf
    install -d ${D}${nonarch_libdir}/swupdate/conf.d ${D}${datadir}/swupdate ${D}${sysconfdir}/edgeinfer-ota
    install -m 0644 ${S}/swupdate/10-edgeinfer ${D}${nonarch_libdir}/swupdate/conf.d/
    install -m 0644 ${S}/swupdate/swupdate.cfg.in ${D}${datadir}/swupdate/
    echo "${EDGEINFER_OTA_FAMILY}" > ${D}${sysconfdir}/edgeinfer-ota/family
    echo "${EDGEINFER_HW_BOARD} ${EDGEINFER_HW_REVISION}" > ${D}${sysconfdir}/hwrevision
    : > ${D}${datadir}/swupdate/swupdate-ca.pem
    for ca in ${SWUPDATE_CA_CERTS}; do
        [ -e "$ca" ] || bbfatal "SWUPDATE_CA_CERTS: $ca does not exist (image/keys/gen-dev-keys.sh makes a development CA)"
        cat "$ca" >> ${D}${datadir}/swupdate/swupdate-ca.pem
    done
    [ -s ${D}${datadir}/swupdate/swupdate-ca.pem ] || \
        bbwarn "SWUPDATE_CA_CERTS is empty: the image will refuse every bundle (run image/keys/gen-dev-keys.sh)"
}

do_install:append:tegra() {
    install -m 0644 ${S}/tegra/swupdate-edgeinfer-tegra.conf ${D}${systemd_system_unitdir}/swupdate.service.d/edgeinfer-tegra.conf
    install -d ${D}${systemd_system_unitdir}/nv_update_verifier.service.d
    install -m 0644 ${S}/tegra/nv-update-verifier-edgeinfer.conf \
        ${D}${systemd_system_unitdir}/nv_update_verifier.service.d/edgeinfer.conf
}

PACKAGE_ARCH = "${MACHINE_ARCH}"
FILES:${PN} += "${systemd_system_unitdir} ${nonarch_libdir}/swupdate ${datadir}/swupdate"
CONFFILES:${PN} = "${sysconfdir}/hwrevision"
RDEPENDS:${PN} = "swupdate swupdate-client"
RDEPENDS:${PN}:append:rpi = " libubootenv-bin"
# nvbootctrl (tegra-redundant-boot-base) and uefi_common.func / the ESP mount
# (setup-nv-boot-control), which the post-install script and the commit use.
RDEPENDS:${PN}:append:tegra = " tegra-redundant-boot tegra-redundant-boot-base setup-nv-boot-control setup-nv-boot-control-service"
