SUMMARY = "A/B update glue for edgeinfer appliances: SWUpdate configuration and slot commit"
DESCRIPTION = "Commits the booted slot after boot-complete.target (which requires edgeinfer's \
               health gate), falls back when an update is unhealthy, and configures SWUpdate \
               (slot selection, hawkBit, signature key) per machine family."
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

S = "${UNPACKDIR}"

inherit systemd

# How slots are switched and committed: U-Boot environment on the Pi, UEFI + nvbootctrl on Jetson.
EDGEINFER_OTA_FAMILY ??= "uboot"
EDGEINFER_OTA_FAMILY:tegra ??= "tegra"
# The public half of the bundle signing key (image/keys/gen-dev-keys.sh for development).
SWUPDATE_PUBLIC_KEY ??= ""

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
    if [ -n "${SWUPDATE_PUBLIC_KEY}" ] && [ -e "${SWUPDATE_PUBLIC_KEY}" ]; then
        install -m 0644 ${SWUPDATE_PUBLIC_KEY} ${D}${datadir}/swupdate/swupdate.pem
    else
        bbwarn "SWUPDATE_PUBLIC_KEY unset or missing: the image will refuse every bundle (run image/keys/gen-dev-keys.sh)"
    fi
}

PACKAGE_ARCH = "${MACHINE_ARCH}"
FILES:${PN} += "${systemd_system_unitdir} ${nonarch_libdir}/swupdate ${datadir}/swupdate"
RDEPENDS:${PN} = "swupdate"
RDEPENDS:${PN}:append:rpi = " libubootenv-bin"
