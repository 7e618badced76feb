#!/bin/bash
# Runs inside the VM (as root, from edgeinfer-vmtest.service) against the real kernel and
# systemd: starts edgeinfer.service and checks what unit tests cannot. Every check prints
# "VMTEST ok: ..." or "VMTEST FAIL: ..."; the last line is "VMTEST-RESULT: PASS|FAIL".
set -u
out=/dev/ttyS0
fails=0
say() { echo "VMTEST $*" > "$out"; echo "VMTEST $*"; }
ok() { say "ok: $*"; }
fail() { say "FAIL: $*"; fails=$((fails + 1)); }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }
wait_for() { local secs="$1"; shift; for _ in $(seq $((secs * 10))); do "$@" && return 0; sleep 0.1; done; return 1; }

say "kernel $(uname -r), $(systemctl --version | head -1), cgroup $(stat -fc %T /sys/fs/cgroup)"
systemd-sysusers
systemd-tmpfiles --create
systemctl start mosquitto.service

# 1. The unit reaches `active` through READY=1 (Type=notify: not before warm-up).
systemctl start edgeinfer.service
check "edgeinfer.service is active via notify" test "$(systemctl is-active edgeinfer.service)" = active
status=$(systemctl show -p StatusText --value edgeinfer.service)
check "STATUS= reaches systemd ($status)" grep -q "pipeline(s)" <<< "$status"
pid=$(systemctl show -p MainPID --value edgeinfer.service)
check "no warnings at start-up" bash -c "! journalctl -u edgeinfer.service -p warning --no-pager -q | grep -v 'fault hooks' | grep -q ."

# 1b. The A/B commit gate, as installed (User=, sandbox), with a short window for the test: it
# passes on the healthy daemon, and boot-complete.target (which requires it) is reached.
mkdir -p /run/systemd/system/edgeinfer-health-gate.service.d
printf '[Service]\nExecStart=\nExecStart=/usr/bin/edgeinfer health --wait --config /etc/edgeinfer/edgeinfer.toml --timeout 90s --window 2s\n' \
  > /run/systemd/system/edgeinfer-health-gate.service.d/vmtest.conf
systemctl daemon-reload
check "health gate enables into boot-complete.target" systemctl enable edgeinfer-health-gate.service
check "health gate passes on the healthy daemon" systemctl start edgeinfer-health-gate.service
check "boot-complete.target reached" systemctl start boot-complete.target
check "boot-complete.target requires the gate" bash -c "systemctl show -p Requires --value boot-complete.target | grep -q edgeinfer-health-gate.service"

# 2. Privileges as systemd and the daemon left them.
check "runs as user edgeinfer" test "$(stat -c %U /proc/$pid)" = edgeinfer
check "CapEff is 0" grep -q "^CapEff:[[:space:]]*0000000000000000" /proc/$pid/status
check "NoNewPrivs is 1" grep -q "^NoNewPrivs:[[:space:]]*1" /proc/$pid/status

# 3. The delegated cgroup subtree, as the daemon laid it out.
cg=/sys/fs/cgroup/system.slice/edgeinfer.service
check "memory.high written by the daemon" test "$(cat $cg/daemon/memory.high 2>&1)" = 209715200
check "memory.max written by the daemon" test "$(cat $cg/daemon/memory.max 2>&1)" = 268435456
check "inference leaf is threaded" test "$(cat $cg/daemon/inference/cgroup.type 2>&1)" = threaded
check "io leaf is threaded" test "$(cat $cg/daemon/io/cgroup.type 2>&1)" = threaded
workers=$(for t in /proc/$pid/task/*; do [[ "$(cat $t/comm)" == ei-digits-* ]] && basename $t; done)
check "worker threads in daemon/inference" bash -c "for t in $workers; do grep -qx \$t $cg/daemon/inference/cgroup.threads || exit 1; done; [ -n '$workers' ]"
check "process in daemon/" grep -qx "$pid" "$cg/daemon/cgroup.procs"
check "main thread in daemon/io" grep -qx "$pid" "$cg/daemon/io/cgroup.threads"
for t in $workers; do
  check "worker $t pinned to the inference CPU" grep -q "^Cpus_allowed_list:[[:space:]]*1$" /proc/$pid/task/$t/status
done
check "cpuset of the inference leaf" test "$(cat $cg/daemon/inference/cpuset.cpus)" = 1

# 4. A frame in, a result out, through the real broker.
frame='{"seq":1,"data":[0,0,0.3125,0.8125,0.5625,0.0625,0,0,0,0.5,0.9375,0.625,0.875,0.3125,0,0,0,0.6875,0.75,0,0.75,0.5,0,0,0,0.5625,0.625,0,0.5,0.625,0,0,0,0.3125,0.625,0,0.5,0.5,0,0,0,0.1875,0.9375,0.125,0.8125,0.4375,0,0,0,0,0.875,0.875,0.875,0.125,0,0,0,0,0.375,0.8125,0.375,0,0,0]}'
( sleep 1; mosquitto_pub -h 127.0.0.1 -q 1 -t sensors/cam1/digits -m "$frame" ) &
result=$(mosquitto_sub -h 127.0.0.1 -q 1 -t 'edgeinfer/vm/results/digits/#' -C 1 -W 20)
check "result published for a frame" grep -q '"top_k"' <<< "$result"

# 5. Structured journal fields.
sleep 1
journal=$(journalctl -u edgeinfer.service -o json --no-pager)
check "journal has PIPELINE=digits" grep -q '"PIPELINE":"digits"' <<< "$journal"
check "journal has MODEL_VERSION=1" grep -q '"MODEL_VERSION":"1"' <<< "$journal"
check "journal has DEVICE=vm" grep -q '"DEVICE":"vm"' <<< "$journal"

# 6. `systemctl reload` (ExecReload= sends SIGHUP): the model file is unchanged, the daemon
#    answers RELOADING=1 then READY=1 and stays active with the same PID.
check "systemctl reload returns" timeout 30 systemctl reload edgeinfer.service
check "active after reload" test "$(systemctl is-active edgeinfer.service)" = active
check "same process after reload" test "$(systemctl show -p MainPID --value edgeinfer.service)" = "$pid"
check "reload reported the unchanged model" bash -c "journalctl -u edgeinfer.service --no-pager -q | grep -q 'nothing to do'"

# 7. Fault injection (test-only hook): a wedged worker stops the watchdog pings and systemd
#    restarts the service (WatchdogSec=6s in the test drop-in).
restarts_before=$(systemctl show -p NRestarts --value edgeinfer.service)
mosquitto_pub -h 127.0.0.1 -q 1 -t sensors/cam1/digits -m "${frame/\"seq\":1/\"seq\":7}"
wait_for 40 bash -c '[ "$(systemctl show -p NRestarts --value edgeinfer.service)" -gt '"$restarts_before"' ]'
check "watchdog restart after a wedged worker" test "$(systemctl show -p NRestarts --value edgeinfer.service)" -gt "$restarts_before"
check "watchdog timeout in the journal" bash -c "journalctl -u edgeinfer.service --no-pager | grep -q 'Watchdog timeout'"
wait_for 30 bash -c '[ "$(systemctl is-active edgeinfer.service)" = active ]'
check "active again after the restart" test "$(systemctl is-active edgeinfer.service)" = active

if [ "$fails" -eq 0 ]; then echo "VMTEST-RESULT: PASS" > "$out" ; else echo "VMTEST-RESULT: FAIL ($fails)" > "$out"; fi
journalctl -u edgeinfer.service --no-pager -n 40 > "$out" 2>&1
sync
systemctl poweroff --no-block
