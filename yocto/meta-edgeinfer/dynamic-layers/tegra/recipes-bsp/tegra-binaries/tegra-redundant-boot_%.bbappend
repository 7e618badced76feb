# nv_update_verifier.service marks every boot successful as soon as multi-user.target is
# reached. On edgeinfer images only a healthy boot may do that: edgeinfer-ota commit runs
# `nvbootctrl verify` after boot-complete.target (which requires edgeinfer's health gate).
SYSTEMD_AUTO_ENABLE:${PN}:edgeinferos = "disable"
