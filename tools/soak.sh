#!/usr/bin/env bash
# Soak test (not in CI): hours of mixed load with periodic broker restarts and model swaps.
#
#   tools/soak.sh [duration] [rate-per-device] [devices]      (default: 1h 25 4)
#   SOAK_RESTART_EVERY=300 SOAK_SWAP_EVERY=420 tools/soak.sh 1h
#
# - a persistent mosquitto (sessions survive its restarts) on a free loopback port, restarted
#   with SIGTERM every SOAK_RESTART_EVERY seconds;
# - the release daemon with two pipelines (digits classifier on JSON frames, sensor CNN on raw
#   frames) and a state directory (spool on); its digits model is replaced every
#   SOAK_SWAP_EVERY seconds by digits_v2 and back (atomic rename: a hot swap);
# - loadgen with persistent sessions offering `rate` frames/s per device to each pipeline,
#   counting results by (device, seq); a result later than 120 s counts as lost;
# - RSS sampled every 10 s.
# Verdict: "unexplained losses" = frames without a result that the daemon's own counters do not
# account for (rejected, dropped with a reason, failed). Must be 0. RSS growth after the first
# 10 minutes must stay under 4 MiB. Writes bench-results/soak-<date>/{summary.md,rss.csv,...}.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
duration="${1:-1h}"
rate="${2:-25}"
devices="${3:-4}"
restart_every="${SOAK_RESTART_EVERY:-300}"
swap_every="${SOAK_SWAP_EVERY:-420}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/edgeinfer/target}"
secs=$(python3 -c "
import re,sys
m=re.fullmatch(r'(\d+)(s|m|h)?','$duration'); n=int(m[1]); print(n*{'s':1,'m':60,'h':3600,None:1}[m[2]])")

echo "== building release edgeinfer and loadgen"
cargo build --release --locked -q -p edgeinfer -p edgeinfer-loadgen
EI="$CARGO_TARGET_DIR/release/edgeinfer"
LG="$CARGO_TARGET_DIR/release/edgeinfer-loadgen"
out="$root/bench-results/soak-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/mq"
cat > "$work/mq/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $work/mq/
autosave_interval 30
set_tcp_nodelay true
max_queued_messages 200000
max_inflight_messages 1000
$( [[ "$(id -u)" -eq 0 ]] && echo "user root" )
CONF
start_mq() { mosquitto -c "$work/mq/mosquitto.conf" >>"$out/mosquitto.log" 2>&1 & mqpid=$!; sleep 0.5; }
start_mq

fx="$root/tests/fixtures/models"
mkdir -p "$work/models" "$work/state"
cp "$fx/digits/model.onnx" "$work/models/digits.onnx"
cat > "$work/edgeinfer.toml" <<CONF
device_id = "soak"
[broker]
port = $port
[metrics]
listen = "127.0.0.1:$mport"
[system]
allow_root = true
state_dir = "$work/state"
[pipelines.digits]
model = "$work/models/digits.onnx"
input = "soakd/+/in/+"
output = "soakd/{1}/out/{2}"
format = "json"
probation = "0s"
[pipelines.digits.queue]
capacity = 256
[pipelines.sensor]
model = "$fx/sensor_cnn/model.onnx"
input = "soaks/+/in/+"
output = "soaks/{1}/out/{2}"
format = "raw"
[pipelines.sensor.queue]
capacity = 256
CONF
"$EI" validate --config "$work/edgeinfer.toml"
EDGEINFER_LOG=info "$EI" run --config "$work/edgeinfer.toml" >"$out/daemon.log" 2>&1 &
ei=$!; pids+=("$ei")
sleep 1

lg_common=(--broker "127.0.0.1:$port" --persistent --duration "${secs}s" --timeout 120s
           --rate "$rate" --devices "$devices" --quiet --pid "$ei")
"$LG" run "${lg_common[@]}" --fixture "$fx/digits" --format json --prefix soakd \
  --label digits --json "$out/digits.json" >"$out/loadgen-digits.log" 2>&1 &
lgd=$!; pids+=("$lgd")
"$LG" run "${lg_common[@]}" --fixture "$fx/sensor_cnn" --format raw --prefix soaks \
  --label sensor --json "$out/sensor.json" >"$out/loadgen-sensor.log" 2>&1 &
lgs=$!; pids+=("$lgs")

echo "t_s,rss_kib" > "$out/rss.csv"
start=$(date +%s); restarts=0; swaps=0; v=1
next_restart=$restart_every; next_swap=$swap_every
echo "== soak: ${secs}s, ${rate} frames/s x ${devices} devices x 2 pipelines; broker restart every ${restart_every}s, model swap every ${swap_every}s; results in $out"
while kill -0 "$lgd" 2>/dev/null || kill -0 "$lgs" 2>/dev/null; do
  sleep 10
  t=$(( $(date +%s) - start ))
  echo "$t,$(awk '/^VmRSS/ {print $2}' /proc/$ei/status)" >> "$out/rss.csv"
  if (( t >= next_restart && t < secs )); then
    kill -TERM "$mqpid"; wait "$mqpid" 2>/dev/null || true; start_mq
    restarts=$((restarts + 1)); next_restart=$((next_restart + restart_every))
    echo "   [${t}s] broker restarted ($restarts)"
  fi
  if (( t >= next_swap && t < secs )); then
    if [[ $v == 1 ]]; then src="$fx/digits_v2/model.onnx"; v=2; else src="$fx/digits/model.onnx"; v=1; fi
    cp "$src" "$work/models/.digits.onnx.new" && mv "$work/models/.digits.onnx.new" "$work/models/digits.onnx"
    swaps=$((swaps + 1)); next_swap=$((next_swap + swap_every))
    echo "   [${t}s] model swapped to v$v ($swaps)"
  fi
done
wait "$lgd" || true; wait "$lgs" || true
curl -s "http://127.0.0.1:$mport/metrics" > "$out/metrics.prom" || true
kill -TERM "$ei"; wait "$ei" || true

python3 - "$out" "$restarts" "$swaps" "$secs" "$rate" "$devices" <<'PY'
import json, sys, re, pathlib
out, restarts, swaps, secs, rate, devices = sys.argv[1:]
o = pathlib.Path(out)
rep = {k: json.loads((o / f"{k}.json").read_text()) for k in ("digits", "sensor")}
prom = (o / "metrics.prom").read_text() if (o / "metrics.prom").exists() else ""
def counter(name, **labels):
    tot = 0.0
    for line in prom.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            tot += float(line.rsplit(" ", 1)[1])
    return tot
rss = [tuple(map(int, l.split(","))) for l in (o / "rss.csv").read_text().splitlines()[1:] if l]
after = [r for t, r in rss if t >= 600] or [r for _, r in rss]
growth_kib = (after[-1] - after[0]) if after else 0
rows, unexplained = [], 0
for k, r in rep.items():
    accounted = (counter("edgeinfer_frames_rejected_total", pipeline=k)
                 + counter("edgeinfer_frames_dropped_total", pipeline=k)
                 + counter("edgeinfer_frames_failed_total", pipeline=k))
    # Redelivered duplicates are dropped with reason "duplicate" but their first copy was served.
    dup = counter("edgeinfer_frames_dropped_total", pipeline=k, reason="duplicate")
    lost = int(r["lost"])
    u = max(0, lost - int(accounted - dup))
    unexplained += u
    rows.append(f"| {k} | {r['sent']} | {r['received']} | {lost} | {int(accounted - dup)} | {u} | {r.get('unexpected', 0)} | {r['latency_us']['p99'] if 'latency_us' in r else '-'} |")
verdict = "PASS" if unexplained == 0 and growth_kib < 4096 else "FAIL"
md = f"""# Soak run ({verdict})

{secs} s, {rate} frames/s x {devices} devices x 2 pipelines; {restarts} broker restarts
(SIGTERM, persistent sessions), {swaps} hot model swaps.

| pipeline | sent | results | lost | accounted by daemon counters | unexplained | repeats | p99 µs |
|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

RSS: start {rss[0][1] if rss else '-'} KiB, after 10 min {after[0] if after else '-'} KiB, end {after[-1] if after else '-'} KiB,
max {max(r for _, r in rss) if rss else '-'} KiB; growth after warm-up {growth_kib} KiB.
"""
(o / "summary.md").write_text(md)
print(md)
sys.exit(0 if verdict == "PASS" else 1)
PY
