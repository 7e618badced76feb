SUMMARY = "Edge inference daemon: MQTT frames in, tract ONNX inference, results out"
DESCRIPTION = "edgeinfer runs ONNX models (tract, pure Rust) on frames that sensors \
               publish over MQTT and publishes results, health and metrics: a hardened \
               systemd Type=notify service with a health gate for A/B update commits."
HOMEPAGE = "https://example.invalid/edgeinfer"
BUGTRACKER = "https://example.invalid/edgeinfer/issues"
SECTION = "console/network"
# LICENSE: the workspace's (Apache-2.0) and every license of the crates linked into the static
# binary, generated from Cargo.lock/cargo metadata by tools/yocto-crates.py (CI checks drift).
require ${BPN}-licenses.inc
LIC_FILES_CHKSUM = "file://LICENSE;md5=9c906197621ff6c11095fe41415ecad6"
CVE_PRODUCT = "edgeinfer"

SRC_URI = "git://example.invalid/edgeinfer.git;protocol=https;branch=main"
# A release pins a commit of the repository; kas builds of a checkout use externalsrc instead
# (kas/include/edgeinfer-common.yml), with the same crates (Cargo.lock -> edgeinfer-crates.inc).
SRCREV = "fdf1699e8fbb52742fbcf01630c2924d9a52fa7c"

require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# A workspace: build the daemon package against the workspace's Cargo.lock.
CARGO_SRC_DIR = "daemon"
CARGO_LOCK_PATH = "${S}/Cargo.lock"
# Optional features come from PACKAGECONFIG only; the default feature (`demo`: an in-process
# MQTT broker and simulated sensors) stays out of device images. `fault-hooks` is test-only and
# deliberately not offered.
CARGO_BUILD_FLAGS += "--no-default-features"
PACKAGECONFIG ??= ""
PACKAGECONFIG[demo] = "--features demo"
PACKAGECONFIG[mimalloc] = "--features mimalloc"
PACKAGECONFIG[multithread] = "--features multithread"

# A static service user (not DynamicUser=): its state on /data must keep one owner across A/B
# updates, so the uid/gid are fixed by the distro (EDGEINFER_UID) and created at image build
# time (the root filesystem is read-only; sysusers could not add it at boot).
EDGEINFER_UID ??= "930"
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system --gid ${EDGEINFER_UID} edgeinfer"
USERADD_PARAM:${PN} = "--system --uid ${EDGEINFER_UID} --gid edgeinfer \
                       --home-dir ${localstatedir}/lib/edgeinfer --no-create-home \
                       --shell ${base_sbindir}/nologin \
                       --comment 'edgeinfer inference daemon' edgeinfer"

SYSTEMD_PACKAGES = "${PN}"
SYSTEMD_SERVICE:${PN} = "edgeinfer.service edgeinfer-health-gate.service"
SYSTEMD_AUTO_ENABLE = "enable"

# The same files the VM test boots and tools/check-units.sh verifies (config/).
do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/config/systemd/edgeinfer.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/config/systemd/edgeinfer-health-gate.service ${D}${systemd_system_unitdir}/
    install -d ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/config/systemd/edgeinfer.sysusers ${D}${nonarch_libdir}/sysusers.d/edgeinfer.conf
    install -m 0644 ${S}/config/systemd/edgeinfer.tmpfiles ${D}${nonarch_libdir}/tmpfiles.d/edgeinfer.conf
    install -d ${D}${sysconfdir}/edgeinfer
    install -m 0644 ${S}/config/edgeinfer.toml ${D}${sysconfdir}/edgeinfer/edgeinfer.toml
    # The model the default configuration serves (the bundled demo model); fleets replace it
    # over MQTT OTA into the state directory on /data.
    install -d ${D}${datadir}/edgeinfer/models
    install -m 0644 ${S}/daemon/assets/demo/digits.onnx ${D}${datadir}/edgeinfer/models/digits.onnx
    install -m 0644 ${S}/daemon/assets/demo/labels.txt ${D}${datadir}/edgeinfer/models/digits.labels.txt
}

FILES:${PN} += "${nonarch_libdir}/sysusers.d/edgeinfer.conf \
                ${nonarch_libdir}/tmpfiles.d/edgeinfer.conf"
CONFFILES:${PN} = "${sysconfdir}/edgeinfer/edgeinfer.toml"
RRECOMMENDS:${PN} = "mosquitto"
