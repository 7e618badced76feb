# Read the drop-in directory, where edgeinfer-rootfs installs the appliance's listener and
# persistence settings (image/overlay/mosquitto/edgeinfer.conf).
do_install:append:edgeinferos() {
    printf '\ninclude_dir %s/mosquitto/conf.d\n' "${sysconfdir}" >> ${D}${sysconfdir}/mosquitto/mosquitto.conf
}
