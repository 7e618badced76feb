SUMMARY = "What the machine's BSP asks every image to carry"
DESCRIPTION = "MACHINE_EXTRA_RDEPENDS and MACHINE_EXTRA_RRECOMMENDS of the BSP (on Jetson: \
               tegra-redundant-boot with nvbootctrl and setup-nv-boot-control, efivar, \
               tegra-nvfancontrol, the udev and sysctl configurations; on the Pi: its udev rules \
               and kernel modules). core-image pulls them through packagegroup-base, which \
               edgeinfer-image leaves out on purpose (it would add the distro-feature extras \
               too); this packagegroup carries only the machine's list."
HOMEPAGE = "https://example.invalid/edgeinfer"
BUGTRACKER = "https://example.invalid/edgeinfer/issues"
SECTION = "base"
LICENSE = "MIT"

PACKAGE_ARCH = "${MACHINE_ARCH}"

inherit packagegroup

RDEPENDS:${PN} = "${MACHINE_EXTRA_RDEPENDS}"
RRECOMMENDS:${PN} = "${MACHINE_EXTRA_RRECOMMENDS}"
