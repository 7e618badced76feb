#!/usr/bin/env python3
"""Python baseline for the edgeinfer benchmark: the MQTT inference service a team would write
with paho-mqtt + onnxruntime instead of running the daemon.

Same job, same topics and payloads as one edgeinfer pipeline (docs/messages.md): subscribe to an
input filter, validate each frame (raw tensor bytes or JSON), queue it in one bounded queue
(drop-oldest when full, counted), run it on N worker threads that each own a single-threaded
onnxruntime session, and publish a JSON result to an output topic built from the input topic's
wildcard captures.

    python service.py --broker 127.0.0.1:1883 --model model.onnx \
        --input-filter 'bench/+/in/+' --output 'bench/{1}/out/{2}' --format raw --workers 2

stdout carries exactly two kinds of line, for a harness: `ready` (connected and the input
subscription acknowledged) and, on exit, one `summary ...` line. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ort_common import ModelError, input_specs, make_session, parse_shape_overrides  # noqa: E402

log = logging.getLogger("baseline")

# numpy dtype -> the daemon's dtype names (result messages).
DTYPE_NAMES = {
    "float32": "f32",
    "float64": "f64",
    "float16": "f16",
    "int8": "i8",
    "int16": "i16",
    "int32": "i32",
    "int64": "i64",
    "uint8": "u8",
    "uint16": "u16",
    "uint32": "u32",
    "uint64": "u64",
    "bool": "bool",
}


# --------------------------------------------------------------------------------------------
# Topics


class TopicFilter:
    """An MQTT filter whose `+` / `#` wildcards are captures `{1}`, `{2}`... (like the daemon)."""

    def __init__(self, text: str):
        if not text:
            raise ValueError("empty topic filter")
        self.text = text
        self.levels = text.split("/")
        for i, lvl in enumerate(self.levels):
            if "#" in lvl and (lvl != "#" or i != len(self.levels) - 1):
                raise ValueError(f"filter {text!r}: '#' must be a whole, last level")
            if "+" in lvl and lvl != "+":
                raise ValueError(f"filter {text!r}: '+' must be a whole level")
        self.wildcards = sum(1 for lvl in self.levels if lvl in ("+", "#"))

    def match(self, topic: str) -> list[str] | None:
        """The captures if `topic` matches, else None. `#` captures the rest (slashes kept)."""
        parts = topic.split("/")
        caps = []
        for i, lvl in enumerate(self.levels):
            if lvl == "#":
                caps.append("/".join(parts[i:]))
                return caps
            if i >= len(parts):
                return None
            if lvl == "+":
                caps.append(parts[i])
            elif lvl != parts[i]:
                return None
        return caps if len(parts) == len(self.levels) else None


class OutputTemplate:
    PLACEHOLDER = re.compile(r"\{(\d+)\}")

    def __init__(self, text: str, wildcards: int):
        if not text or "+" in text or "#" in text:
            raise ValueError(f"output topic {text!r}: must be non-empty and without wildcards")
        for m in self.PLACEHOLDER.finditer(text):
            n = int(m.group(1))
            if not 1 <= n <= wildcards:
                raise ValueError(f"output topic {text!r}: {{{n}}} but the input filter has {wildcards} wildcard(s)")
        self.text = text

    def render(self, caps: list[str]) -> str:
        return self.PLACEHOLDER.sub(lambda m: caps[int(m.group(1)) - 1], self.text)


# --------------------------------------------------------------------------------------------
# Frame decoding (validation happens here, on the MQTT thread, before anything is queued)


class Reject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Decoder:
    def __init__(self, specs, fmt: str, allow_nan: bool, max_payload: int):
        self.specs = specs
        self.by_name = {s.name: s for s in specs}
        self.fmt = fmt
        self.allow_nan = allow_nan
        self.max_payload = max_payload

    def decode(self, payload: bytes):
        """-> (inputs dict, seq or None, ts or None); raises Reject."""
        if len(payload) == 0:
            raise Reject("empty", "zero-length payload")
        if self.max_payload and len(payload) > self.max_payload:
            raise Reject("oversized", f"{len(payload)} bytes > max {self.max_payload}")
        if self.fmt == "raw":
            return self._raw(payload), None, None
        return self._json(payload)

    def _check_finite(self, spec, arr):
        if not self.allow_nan and spec.dtype.kind == "f" and not np.isfinite(arr).all():
            raise Reject("non_finite", f"NaN or infinity in input {spec.name!r}")

    def _raw(self, payload: bytes):
        spec = self.specs[0]
        if len(payload) != spec.nbytes:
            raise Reject(
                "wrong_size",
                f"expected {spec.nbytes} bytes ({spec.dtype.name} {list(spec.shape)} little-endian "
                f"for input {spec.name!r}), got {len(payload)}",
            )
        arr = np.frombuffer(payload, dtype=spec.dtype).reshape(spec.shape)
        if arr.dtype.byteorder not in ("=", "|"):
            arr = arr.astype(spec.dtype.newbyteorder("="))
        self._check_finite(spec, arr)
        return {spec.name: arr}

    def _json(self, payload: bytes):
        try:
            obj = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise Reject("malformed", f"invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise Reject("malformed", "frame is not a JSON object")
        seq = obj.get("seq")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
            raise Reject("malformed", f"seq must be an unsigned integer, got {seq!r}")
        ts = obj.get("ts")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
            raise Reject("malformed", f"ts must be a number, got {ts!r}")
        if "data" in obj:
            if len(self.specs) != 1:
                raise Reject("malformed", "`data` given for a multi-input model: use `inputs`")
            spec = self.specs[0]
            return {spec.name: self._tensor(spec, obj["data"])}, seq, ts
        if "inputs" in obj:
            given = obj["inputs"]
            if not isinstance(given, dict):
                raise Reject("malformed", "`inputs` must be an object of name -> array")
            if set(given) != set(self.by_name):
                raise Reject("malformed", f"`inputs` names {sorted(given)}, model inputs are {sorted(self.by_name)}")
            return {n: self._tensor(self.by_name[n], v) for n, v in given.items()}, seq, ts
        raise Reject("malformed", "missing `data` (or `inputs`)")

    def _tensor(self, spec, value):
        if not isinstance(value, list):
            raise Reject("wrong_shape", f"input {spec.name!r}: expected an array")
        try:
            arr = np.array(value)
        except (ValueError, OverflowError, TypeError):
            raise Reject("wrong_shape", f"input {spec.name!r}: ragged array") from None
        kind = arr.dtype.kind
        if kind not in "biuf":
            raise Reject("wrong_dtype", f"input {spec.name!r}: non-numeric values ({arr.dtype})")
        if arr.size != spec.count or (arr.ndim != 1 and arr.shape != spec.shape):
            raise Reject(
                "wrong_shape",
                f"input {spec.name!r}: got shape {list(arr.shape)}, expected {list(spec.shape)} "
                f"or {spec.count} flat values",
            )
        target = spec.dtype.newbyteorder("=")
        tk = target.kind
        if tk == "f":
            self._check_finite(spec, arr)
            with np.errstate(over="ignore"):
                out = arr.astype(target)
            if kind == "f" and np.isfinite(arr).all():
                self._check_finite(spec, out)  # overflowed the narrower float type
        elif tk in "iu":
            if kind == "f" and not (np.isfinite(arr).all() and (arr == np.trunc(arr)).all()):
                raise Reject("wrong_dtype", f"input {spec.name!r}: non-integer value for {target.name}")
            info = np.iinfo(target)
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise Reject("wrong_dtype", f"input {spec.name!r}: value out of range for {target.name}")
            out = arr.astype(target)
        else:  # bool
            if not np.isin(arr, (0, 1)).all():
                raise Reject("wrong_dtype", f"input {spec.name!r}: bool input takes true/false or 0/1")
            out = arr.astype(target)
        return out.reshape(spec.shape)


# --------------------------------------------------------------------------------------------
# The service


class Frame:
    __slots__ = ("topic", "out_topic", "inputs", "seq", "ts", "number", "recv_ns")

    def __init__(self, topic, out_topic, inputs, seq, ts, number, recv_ns):
        self.topic = topic
        self.out_topic = out_topic
        self.inputs = inputs
        self.seq = seq
        self.ts = ts
        self.number = number
        self.recv_ns = recv_ns


class Service:
    def __init__(self, args):
        self.args = args
        self.filter = TopicFilter(args.input_filter)
        self.output = OutputTemplate(args.output, self.filter.wildcards)
        self.qos = args.qos

        # Load one session per worker up front, each warmed up once (as the daemon does before
        # it reports ready).
        overrides = parse_shape_overrides(args.input_shape)
        t0 = time.perf_counter()
        self.sessions = [make_session(args.model, threads=1) for _ in range(args.workers)]
        self.specs = input_specs(self.sessions[0], overrides)
        if args.format == "raw" and len(self.specs) != 1:
            raise ModelError(f"format raw needs a single-input model; this one has {len(self.specs)} inputs")
        warm = {s.name: s.zeros() for s in self.specs}
        for sess in self.sessions:
            sess.run(None, warm)
        self.output_names = [o.name for o in self.sessions[0].get_outputs()]
        log.info(
            "model %s loaded (%d session(s), warmed up) in %.1f ms; inputs: %s; outputs: %s",
            args.model,
            len(self.sessions),
            (time.perf_counter() - t0) * 1e3,
            ", ".join(s.describe() for s in self.specs),
            ", ".join(self.output_names),
        )
        self.decoder = Decoder(self.specs, args.format, args.allow_nan, args.max_payload)

        self.queue: queue.Queue = queue.Queue(maxsize=args.queue_capacity)
        self.enqueue_lock = threading.Lock()
        self.stopping = False

        self.stats_lock = threading.Lock()
        self.received = 0
        self.served = 0
        self.rejected: Counter = Counter()
        self.dropped: Counter = Counter()  # queue_full, shutdown
        self.failed: Counter = Counter()  # inference_error, publish_error
        self.pending_publishes = 0  # handed to paho, not yet acknowledged (QoS 1) / written (QoS 0)
        self.frame_counter = 0

        self.ready_printed = False
        self.sub_mid = None
        self.stop_event = threading.Event()

        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=args.client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)  # unbounded: results are never dropped by paho
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_disconnect = self.on_disconnect
        self.client.on_message = self.on_message
        self.client.on_publish = self.on_publish

    # ---- MQTT callbacks (paho network thread) ----

    def on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("connection refused by broker: %s", reason_code)
            return
        log.info("connected to %s:%d (session_present=%s)", self.args.host, self.args.port, flags.session_present)
        # paho leaves Nagle's algorithm on; small results would then wait for the broker's
        # delayed ACK (up to ~40 ms). Turned off so the baseline is as tuned as the daemon.
        sock = client.socket()
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as e:
                log.warning("cannot set TCP_NODELAY: %s", e)
        if not self.stopping:
            rc, mid = client.subscribe(self.filter.text, qos=self.qos)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                log.error("subscribe to %s failed: %s", self.filter.text, mqtt.error_string(rc))
            self.sub_mid = mid

    def on_subscribe(self, client, userdata, mid, reason_code_list, properties):
        if mid != self.sub_mid:
            return
        if any(rc.is_failure for rc in reason_code_list):
            log.error("broker refused subscription %s: %s", self.filter.text, reason_code_list)
            return
        log.info("subscribed to %s (qos %d)", self.filter.text, self.qos)
        if not self.ready_printed:
            self.ready_printed = True
            print("ready", flush=True)

    def on_disconnect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("disconnected from broker: %s (paho reconnects)", reason_code)

    def on_publish(self, client, userdata, mid, reason_code, properties):
        with self.stats_lock:
            self.pending_publishes -= 1

    def on_message(self, client, userdata, msg):
        recv_ns = time.perf_counter_ns()
        # Never let an exception escape: it would stop paho's network thread.
        try:
            self._on_message(msg, recv_ns)
        except Exception:  # pragma: no cover - defensive
            log.exception("unexpected error handling a frame on %s", msg.topic)
            with self.stats_lock:
                self.rejected["internal"] += 1

    def _on_message(self, msg, recv_ns):
        topic = msg.topic
        with self.stats_lock:
            self.received += 1
        if self.stopping:
            with self.stats_lock:
                self.dropped["shutdown"] += 1
            return
        caps = self.filter.match(topic)
        if caps is None:
            with self.stats_lock:
                self.rejected["unrouted"] += 1
            log.debug("frame on %s does not match %s", topic, self.filter.text)
            return
        try:
            inputs, seq, ts = self.decoder.decode(msg.payload)
        except Reject as r:
            with self.stats_lock:
                self.rejected[r.reason] += 1
            log.debug("rejected frame on %s: %s: %s", topic, r.reason, r.detail)
            return
        self.frame_counter += 1  # only this thread touches it
        frame = Frame(topic, self.output.render(caps), inputs, seq, ts, self.frame_counter, recv_ns)
        with self.enqueue_lock:
            if self.stopping:
                with self.stats_lock:
                    self.dropped["shutdown"] += 1
                return
            while True:
                try:
                    self.queue.put_nowait(frame)
                    break
                except queue.Full:
                    try:
                        self.queue.get_nowait()  # drop the oldest: freshest data wins
                        with self.stats_lock:
                            self.dropped["queue_full"] += 1
                    except queue.Empty:
                        pass

    # ---- workers ----

    def worker(self, index: int, sess: ort.InferenceSession):
        name = threading.current_thread().name
        while True:
            frame = self.queue.get()
            if frame is None:
                log.debug("%s: done", name)
                return
            t_start = time.perf_counter_ns()
            try:
                outs = sess.run(None, frame.inputs)
            except Exception as e:
                with self.stats_lock:
                    self.failed["inference_error"] += 1
                log.warning("%s: inference failed for frame on %s: %s", name, frame.topic, e)
                continue
            t_inf = time.perf_counter_ns()
            outputs = []
            for oname, arr in zip(self.output_names, outs, strict=True):
                arr = np.asarray(arr)
                data = arr.ravel().tolist()
                if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    data = [v if np.isfinite(v) else None for v in data]  # JSON has no NaN
                outputs.append(
                    {
                        "name": oname,
                        "dtype": DTYPE_NAMES.get(arr.dtype.name, arr.dtype.name),
                        "shape": list(arr.shape),
                        "data": data,
                    }
                )
            outputs_json = json.dumps(outputs, separators=(",", ":"), allow_nan=False)
            head = {"topic": frame.topic, "frame": frame.number}
            if frame.seq is not None:
                head["seq"] = frame.seq
            if frame.ts is not None:
                head["ts"] = frame.ts
            t_total = time.perf_counter_ns()
            head["timing_us"] = {
                "queue": (t_start - frame.recv_ns) // 1000,
                "inference": (t_inf - t_start) // 1000,
                "total": (t_total - frame.recv_ns) // 1000,
            }
            payload = json.dumps(head, separators=(",", ":"))[:-1] + ',"outputs":' + outputs_json + "}"
            with self.stats_lock:
                self.pending_publishes += 1
            info = self.client.publish(frame.out_topic, payload, qos=self.qos)
            if info.rc == mqtt.MQTT_ERR_SUCCESS or (info.rc == mqtt.MQTT_ERR_NO_CONN and self.qos > 0):
                # NO_CONN with QoS>0: paho keeps the message and sends it after reconnecting.
                with self.stats_lock:
                    self.served += 1
            else:
                with self.stats_lock:
                    self.pending_publishes -= 1
                    self.failed["publish_error"] += 1
                log.warning("%s: publish to %s failed: %s", name, frame.out_topic, mqtt.error_string(info.rc))

    # ---- lifecycle ----

    def summary(self) -> str:
        with self.stats_lock:
            rej = sum(self.rejected.values())
            drop = sum(self.dropped.values())
            fail = sum(self.failed.values())
            parts = [
                f"received={self.received}",
                f"served={self.served}",
                f"dropped={drop}",
                f"rejected={rej}",
                f"failed={fail}",
                f"queued={self.queue.qsize()}",
            ]
            for label, c in (("dropped", self.dropped), ("rejected", self.rejected), ("failed", self.failed)):
                parts += [f"{label}.{k}={v}" for k, v in sorted(c.items())]
        return "summary " + " ".join(parts)

    def run(self) -> int:
        workers = [
            threading.Thread(target=self.worker, args=(i, s), name=f"worker-{i}", daemon=True)
            for i, s in enumerate(self.sessions)
        ]
        for t in workers:
            t.start()
        self.client.connect_async(self.args.host, self.args.port, keepalive=30)
        self.client.loop_start()

        while not self.stop_event.wait(0.5):
            pass

        # 1. stop intake: nothing is queued after this point; ask the broker to stop sending.
        log.info("stopping: serving %d queued frame(s), grace %.1fs", self.queue.qsize(), self.args.grace)
        with self.enqueue_lock:
            self.stopping = True
        if self.client.is_connected():
            self.client.unsubscribe(self.filter.text)
        deadline = time.monotonic() + self.args.grace

        # 2. let the workers finish what is queued (one end marker per worker, after the frames).
        for _ in workers:
            try:
                self.queue.put(None, timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Full:
                break  # grace over with frames still queued: counted below
        for t in workers:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in workers):
            left = 0
            while True:
                try:
                    if self.queue.get_nowait() is not None:
                        left += 1
                except queue.Empty:
                    break
            with self.stats_lock:
                self.dropped["shutdown"] += left
            log.warning("grace period over: %d queued frame(s) not served", left)

        # 3. wait until the broker has the results (PUBACK for QoS 1), then disconnect.
        pub_deadline = time.monotonic() + 5.0
        while time.monotonic() < pub_deadline:
            with self.stats_lock:
                if self.pending_publishes <= 0:
                    break
            time.sleep(0.01)
        else:
            log.warning("%d result(s) not acknowledged by the broker at exit", self.pending_publishes)
        self.client.disconnect()
        self.client.loop_stop()
        print(self.summary(), flush=True)
        return 0


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, 1883
    host = host.strip("[]")  # [::1]:1883
    try:
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --broker {text!r}: expected HOST:PORT") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (default %(default)s)")
    p.add_argument("--client-id", default=f"baseline-{os.getpid()}")
    p.add_argument("--model", required=True, help="ONNX model file")
    p.add_argument("--input-filter", required=True, help="MQTT filter, e.g. 'bench/+/in/+'")
    p.add_argument(
        "--output",
        required=True,
        help="result topic; {1}, {2}... = what each wildcard matched, e.g. 'bench/{1}/out/{2}'",
    )
    p.add_argument("--format", choices=("raw", "json"), default="raw")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--queue-capacity", type=int, default=32)
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=1)
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D1,D2,...",
        help="concrete shape for an input with symbolic dims (a symbolic batch dim defaults to 1)",
    )
    p.add_argument("--max-payload", type=int, default=0, help="reject larger frames (bytes; 0 = no limit)")
    p.add_argument("--allow-nan", action="store_true", help="accept NaN/inf in float inputs (default: reject)")
    p.add_argument("--grace", type=float, default=10.0, help="seconds to serve queued frames on SIGTERM")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = p.parse_args(argv)
    if args.workers < 1 or args.queue_capacity < 1:
        p.error("--workers and --queue-capacity must be >= 1")
    try:
        args.host, args.port = parse_broker(args.broker)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))

    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s"
    )
    try:
        svc = Service(args)
    except (ValueError, ModelError) as e:
        log.error("%s", e)
        return 78 if isinstance(e, ModelError) else 64
    except Exception as e:  # onnxruntime load errors and the like
        log.error("cannot load model %s: %s", args.model, e)
        return 78

    def on_signal(signum, frame):
        if svc.stop_event.is_set():
            log.warning("second signal: exiting now")
            print(svc.summary(), flush=True)
            os._exit(1)
        svc.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return svc.run()


if __name__ == "__main__":
    sys.exit(main())
