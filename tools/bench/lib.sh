# Shared by the benchmark scripts (sourced): a mosquitto of our own on a free loopback port.
#
#   start_broker OUTDIR   -> sets $port, $broker ("127.0.0.1:$port") and $mqpid
#
# Nagle is off on the broker's sockets: a latency benchmark otherwise measures TCP's 40 ms
# delayed-ACK stalls. The caller kills $mqpid on exit.
start_broker() {
  local out="$1"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$out/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
max_queued_messages 100000
max_inflight_messages 1000
$( [[ "$(id -u)" -eq 0 ]] && echo "user root" )
CONF
  mosquitto -c "$out/mosquitto.conf" > "$out/mosquitto.log" 2>&1 &
  mqpid=$!
  sleep 0.5
  broker="127.0.0.1:$port"
}

# The common head of a benchmark daemon config: device, our broker, a fresh session per start
# (a persistent one would replay frames queued for it while another service was measured), root
# allowed (benchmarks often run as root in containers). Pipelines follow.
config_head() { # device_id
  cat <<CONF
device_id = "$1"
[broker]
port = $port
clean_session = true
[system]
allow_root = true
CONF
}

# Stops the service under test ($svc) with SIGTERM (a clean drain) and waits for it.
stop_service() {
  kill -TERM "$svc" 2>/dev/null || true
  wait "$svc" 2>/dev/null || true
  svc=""
}
