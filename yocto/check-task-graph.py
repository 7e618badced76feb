#!/usr/bin/env python3
"""Assertions on the task graph of `bitbake -g edgeinfer-image edgeinfer-update`.

    yocto/check-task-graph.py MACHINE task-depends.dot

tools/yocto-check.sh runs it on the graph of each machine. It checks what the A/B update path
needs and what a parse alone does not catch: a recipe that never reaches the image (a dependency
lost to an outright assignment or a wrong override) has no task in the graph, or no path from
the image's do_rootfs to it. Prints the task count on the first line, then one line per check;
exits 1 on any failed check.
"""

import re
import sys
from collections import defaultdict

EDGE = re.compile(r'^"([^"]+)" -> "([^"]+)"')
NODE = re.compile(r'^"([^"]+)" \[label=')


def load(path):
    nodes, edges = set(), defaultdict(set)
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = EDGE.match(line)
            if m:
                edges[m.group(1)].add(m.group(2))
                nodes.update(m.groups())
                continue
            m = NODE.match(line)
            if m:
                nodes.add(m.group(1))
    return nodes, edges


def reachable(edges, start):
    seen, todo = set(), [start]
    while todo:
        t = todo.pop()
        for n in edges.get(t, ()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 64
    machine, path = sys.argv[1], sys.argv[2]
    try:
        nodes, edges = load(path)
    except OSError as e:
        print(f"cannot read {path}: {e}")
        return 1
    tegra = machine.startswith("jetson")
    recipes = {n.rsplit(".", 1)[0] for n in nodes}
    rootfs = reachable(edges, "edgeinfer-image.do_rootfs")
    # The recipes whose packages the image installs: do_rootfs depends on their
    # do_package_write_<type> directly (the RDEPENDS closure of IMAGE_INSTALL); build-time
    # dependencies reach do_rootfs only through other tasks.
    in_image = {t.rsplit(".", 1)[0] for t in edges.get("edgeinfer-image.do_rootfs", ())
                if t.rsplit(".", 1)[1].startswith("do_package_write_")}
    swu = reachable(edges, "edgeinfer-update.do_swuimage")
    checks = []

    def check(what, ok):
        checks.append((what, ok))

    # Both families.
    for r in ("edgeinfer", "edgeinfer-rootfs", "edgeinfer-ota", "swupdate", "packagegroup-edgeinfer-machine"):
        check(f"edgeinfer-image installs {r}", r in in_image)
    # /etc/hwrevision comes from edgeinfer-ota's do_install; its package is in the image.
    check("edgeinfer-image: /etc/hwrevision's recipe (edgeinfer-ota) is packaged into the rootfs",
          any(n.startswith("edgeinfer-ota.do_package") for n in rootfs))
    check("edgeinfer-update: the bundle is made after the image (IMAGE_DEPENDS)", "edgeinfer-image.do_build" in swu
          or "edgeinfer-image.do_image_complete" in swu)
    check("SBOM: edgeinfer-image.do_create_image_sbom_spdx (SPDX 3.0)", "edgeinfer-image.do_create_image_sbom_spdx" in nodes)
    check("CVE scan: edgeinfer-image.do_sbom_cve_check (sbom-cve-check fragment)", "edgeinfer-image.do_sbom_cve_check" in nodes)
    if tegra:
        # tegra-configs builds the udev and sysctl configuration packages; tegra-nv-boot-control-
        # config the template setup-nv-boot-control fills in.
        for r in ("tegra-redundant-boot", "tegra-redundant-boot-base", "setup-nv-boot-control",
                  "tegra-nv-boot-control-config", "efivar", "tegra-nvfancontrol", "tegra-configs"):
            check(f"jetson: edgeinfer-image installs {r} (MACHINE_EXTRA_RDEPENDS / boot control)", r in in_image)
        check("jetson: edgeinfer-update.do_swuimage depends on tegra-uefi-capsules:do_deploy (tegra-bl.cap)",
              "tegra-uefi-capsules.do_deploy" in edges.get("edgeinfer-update.do_swuimage", ()))
    else:
        check("pi: the A/B boot script (rpi-u-boot-scr) is deployed", "rpi-u-boot-scr.do_deploy" in nodes)
        check("pi: U-Boot is built (with edgeinfer-bootscript.cfg)", "u-boot.do_compile" in nodes)
        check("pi: libubootenv (fw_setenv) in the image", "libubootenv" in in_image)
        check("pi: no tegra recipe anywhere", not any(r.startswith("tegra-") for r in recipes))

    print(f"{len(nodes)} tasks, {len(recipes)} recipes; {sum(ok for _, ok in checks)}/{len(checks)} graph checks passed")
    for what, ok in checks:
        print(("ok: " if ok else "FAIL: ") + what)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
