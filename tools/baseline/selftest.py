#!/usr/bin/env python3
"""End-to-end check of service.py against a private mosquitto and the fixture models.

    python selftest.py [--mosquitto /usr/sbin/mosquitto] [--keep-logs]

Starts mosquitto on a free loopback port (never 1883), runs service.py as a child process and
checks, with a real paho client:
  1. sensor_cnn, raw, 2 workers: the 8 samples on bench/d0/in/<n> give results on
     bench/d0/out/<n> matching samples/<n>/output.logits.bin (max|a-ref| <= 1e-4*max(1,max|ref|)),
     plus a wrong-size frame that is rejected without disturbing anything;
  2. sensor_cnn, json: nested and flat `data`, seq/ts echoed, each reject reason counted;
  3. mobilenet, raw: both samples;
  4. drop-oldest: `slow` model, queue capacity 4, a burst of 100 frames -> drops counted and
     received = served + dropped;
  5. SIGTERM drain: `slow` model, 300 queued frames, SIGTERM -> every frame taken in is served,
     results still arrive after the signal, frames arriving after it are counted as
     dropped.shutdown, exit code 0, summary printed.
Prints `N passed, N failed` last; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MODELS = REPO / "tests" / "fixtures" / "models"
SERVICE = HERE / "service.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, binary: str, workdir: Path):
        self.port = free_port()
        assert self.port != 1883
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n")
        self.log = open(workdir / "mosquitto.log", "w")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


class Results:
    """A subscriber collecting (topic, decoded JSON, arrival time) from bench/+/out/#."""

    def __init__(self, port: int, filt: str = "bench/+/out/#"):
        self.msgs: queue.Queue = queue.Queue()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"selftest-sub-{os.getpid()}")
        subscribed = threading.Event()
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(filt, qos=1)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.c.on_message = lambda c, u, m: self.msgs.put((m.topic, json.loads(m.payload), time.monotonic()))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("result subscriber: no SUBACK")

    def take(self, n: int, timeout: float = 20.0) -> list:
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.msgs.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                break
        return out

    def drain(self, quiet: float = 1.0) -> list:
        out = []
        while True:
            try:
                out.append(self.msgs.get(timeout=quiet))
            except queue.Empty:
                return out

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


class Publisher:
    def __init__(self, port: int):
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"selftest-pub-{os.getpid()}")
        self.c.max_inflight_messages_set(100)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def send(self, topic: str, payload, qos: int = 1):
        return self.c.publish(topic, payload, qos=qos)

    def send_all(self, items, qos: int = 1):
        infos = [self.send(t, p, qos) for t, p in items]
        for i in infos:
            i.wait_for_publish(30)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def start_service(py, port, logdir, name, model, fmt="raw", filt="bench/+/in/+", extra=()):
    """The baseline service on fixture `model`, results on bench/{1}/out/{2}."""
    return ServiceProc(
        py,
        port,
        logdir,
        name,
        "--model",
        str(MODELS / model / "model.onnx"),
        "--input-filter",
        filt,
        "--output",
        "bench/{1}/out/{2}",
        "--format",
        fmt,
        *extra,
    )


class ServiceProc:
    def __init__(self, python: str, port: int, logdir: Path, name: str, *args: str):
        self.stderr = open(logdir / f"service-{name}.log", "w")
        cmd = [python, str(SERVICE), "--broker", f"127.0.0.1:{port}", *args]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready_s = None

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self, timeout: float = 30.0) -> bool:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return False
        self.ready_s = time.monotonic() - self.t0
        return line == "ready"

    def stop(self, timeout: float = 30.0) -> tuple[int, dict]:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        summary = {}
        while True:
            try:
                line = self.lines.get(timeout=2)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("summary "):
                summary = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
        self.stderr.close()
        return rc, summary


def close_enough(got: list, ref: np.ndarray) -> tuple[bool, float]:
    a = np.asarray(got, dtype=np.float64)
    if a.shape != ref.ravel().shape:
        return False, float("inf")
    err = float(np.max(np.abs(a - ref.ravel())))
    return err <= 1e-4 * max(1.0, float(np.max(np.abs(ref)))), err


def samples(case: str, input_name: str, output_name: str):
    d = MODELS / case / "samples"
    return [
        (
            (d / s / f"input.{input_name}.bin").read_bytes(),
            np.fromfile(d / s / f"output.{output_name}.bin", dtype="<f4").astype(np.float64),
        )
        for s in sorted(os.listdir(d))
    ]


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, what: str):
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1


def test_raw_sensor(ck, py, port, logdir):
    print("[1] sensor_cnn raw, 2 workers")
    res, pub = Results(port), Publisher(port)
    svc = start_service(py, port, logdir, "raw", "sensor_cnn", extra=["--workers", "2"])
    ck.check(svc.wait_ready(), f"ready printed ({svc.ready_s:.2f}s after start)")
    smp = samples("sensor_cnn", "accel", "logits")
    pub.send_all([("bench/d0/in/bad", b"\x00" * 1535)] + [(f"bench/d0/in/{i}", x) for i, (x, _) in enumerate(smp)])
    got = {t: m for t, m, _ in res.take(len(smp))}
    for i, (_, ref) in enumerate(smp):
        m = got.get(f"bench/d0/out/{i}")
        if m is None:
            ck.check(False, f"sample {i}: no result")
            continue
        ok, err = close_enough(m["outputs"][0]["data"], ref)
        shape_ok = m["outputs"][0]["shape"] == [1, 4] and m["outputs"][0]["name"] == "logits"
        timing = m["timing_us"]
        ck.check(
            ok
            and shape_ok
            and m["topic"] == f"bench/d0/in/{i}"
            and "seq" not in m
            and timing["total"] >= timing["inference"] >= 0,
            f"sample {i}: max err {err:.2e}, timing_us {timing}",
        )
    rc, s = svc.stop()
    ck.check(
        rc == 0
        and s.get("received") == 9
        and s.get("served") == 8
        and s.get("rejected.wrong_size") == 1
        and s.get("dropped") == 0,
        f"exit {rc}, summary {s}",
    )
    res.close()
    pub.close()


def test_json_sensor(ck, py, port, logdir):
    print("[2] sensor_cnn json")
    res, pub = Results(port), Publisher(port)
    svc = start_service(py, port, logdir, "json", "sensor_cnn", fmt="json", filt="bench/+/in/#", extra=["--log-level", "debug"])
    ck.check(svc.wait_ready(), "ready printed")
    smp = samples("sensor_cnn", "accel", "logits")
    good = []
    for i, (x, _) in enumerate(smp):
        arr = np.frombuffer(x, dtype="<f4").reshape(1, 3, 128)
        data = arr.tolist() if i % 2 == 0 else arr.ravel().tolist()  # nested and flat
        good.append((f"bench/d1/in/x/{i}", json.dumps({"seq": 100 + i, "ts": 1764270000123.5 + i, "data": data})))
    bad = [
        ("bench/d1/in/bad/malformed", b"{not json"),
        ("bench/d1/in/bad/nodata", json.dumps({"seq": 1})),
        ("bench/d1/in/bad/shape", json.dumps({"data": [0.0] * 383})),
        ("bench/d1/in/bad/ragged", json.dumps({"data": [[0.0] * 128, [0.0] * 127]})),
        ("bench/d1/in/bad/dtype", json.dumps({"data": ["a"] * 384})),
        ("bench/d1/in/bad/nan", b'{"data": [' + b",".join([b"NaN"] + [b"0"] * 383) + b"]}"),
        ("bench/d1/in/bad/empty", b""),
    ]
    pub.send_all(bad + good)
    got = {t: m for t, m, _ in res.take(len(good))}
    for i, (_, ref) in enumerate(smp):
        m = got.get(f"bench/d1/out/x/{i}")
        if m is None:
            ck.check(False, f"sample {i}: no result")
            continue
        ok, err = close_enough(m["outputs"][0]["data"], ref)
        ck.check(
            ok and m["seq"] == 100 + i and m["ts"] == 1764270000123.5 + i,
            f"sample {i} ({'nested' if i % 2 == 0 else 'flat'}): max err {err:.2e}, seq {m['seq']}",
        )
    rc, s = svc.stop()
    want = {
        "rejected.malformed": 2,
        "rejected.wrong_shape": 2,
        "rejected.wrong_dtype": 1,
        "rejected.non_finite": 1,
        "rejected.empty": 1,
        "served": 8,
        "received": 15,
    }
    ck.check(rc == 0 and all(s.get(k) == v for k, v in want.items()), f"exit {rc}, summary {s}")
    res.close()
    pub.close()


def test_mobilenet(ck, py, port, logdir):
    print("[3] mobilenet raw")
    res, pub = Results(port), Publisher(port)
    svc = start_service(py, port, logdir, "mobilenet", "mobilenet")
    ck.check(svc.wait_ready(), f"ready printed ({svc.ready_s:.2f}s after start)")
    smp = samples("mobilenet", "image", "logits")
    pub.send_all([(f"bench/cam/in/{i}", x) for i, (x, _) in enumerate(smp)])
    got = {t: m for t, m, _ in res.take(len(smp))}
    for i, (_, ref) in enumerate(smp):
        m = got.get(f"bench/cam/out/{i}")
        if m is None:
            ck.check(False, f"sample {i}: no result")
            continue
        ok, err = close_enough(m["outputs"][0]["data"], ref)
        ck.check(
            ok and m["outputs"][0]["shape"] == [1, 1000], f"sample {i}: max err {err:.2e}, timing_us {m['timing_us']}"
        )
    rc, s = svc.stop()
    ck.check(rc == 0 and s.get("served") == 2, f"exit {rc}, summary {s}")
    res.close()
    pub.close()


def test_drop_oldest(ck, py, port, logdir):
    print("[4] drop-oldest (slow model, queue capacity 4, burst of 100)")
    res, pub = Results(port), Publisher(port)
    svc = start_service(py, port, logdir, "drop", "slow", extra=["--queue-capacity", "4"])
    ck.check(svc.wait_ready(), "ready printed")
    x = (MODELS / "slow/samples/000/input.x.bin").read_bytes()
    pub.send_all([(f"bench/d2/in/{i}", x) for i in range(100)])
    time.sleep(0.5)
    got = res.drain(1.0)
    rc, s = svc.stop()
    last = max(int(t.rsplit("/", 1)[1]) for t, _, _ in got) if got else -1
    ck.check(
        rc == 0
        and s.get("dropped.queue_full", 0) > 0
        and s["received"] == s["served"] + s["dropped"]
        and s["served"] == len(got)
        and last == 99,
        f"exit {rc}, {len(got)} results (newest frame 99 served: {last == 99}), summary {s}",
    )
    res.close()
    pub.close()


def test_sigterm_drain(ck, py, port, logdir):
    print("[5] SIGTERM drain (slow model, 300 frames queued)")
    res, pub = Results(port), Publisher(port)
    svc = start_service(py, port, logdir, "drain", "slow", extra=["--queue-capacity", "1000"])
    ck.check(svc.wait_ready(), "ready printed")
    x = (MODELS / "slow/samples/000/input.x.bin").read_bytes()
    pub.send_all([(f"bench/d3/in/{i}", x) for i in range(300)])
    before = len(res.take(1, timeout=10))  # the service is busy
    t_sig = time.monotonic()
    rc, s = svc.stop(timeout=60)
    got = res.drain(1.0)
    after_sig = sum(1 for _, _, t in got if t > t_sig)
    total = before + len(got)
    # Frames the broker still delivers after the signal are dropped (counted as dropped.shutdown);
    # everything queued before it must be served.
    ck.check(
        rc == 0
        and s.get("served") == total
        and after_sig > 0
        and s.get("received") == 300 == s["served"] + s.get("dropped.shutdown", 0)
        and s.get("dropped.queue_full", 0) == 0,
        f"exit {rc}, {total} results ({after_sig} after SIGTERM), summary {s}",
    )
    res.close()
    pub.close()


def main() -> int:
    p = argparse.ArgumentParser(description="end-to-end test of service.py")
    p.add_argument("--mosquitto", default=shutil.which("mosquitto") or "/usr/sbin/mosquitto")
    p.add_argument("--keep-logs", action="store_true")
    args = p.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="baseline-selftest-"))
    broker = Broker(args.mosquitto, logdir)
    print(f"mosquitto on 127.0.0.1:{broker.port}, logs in {logdir}")
    ck = Checker()
    try:
        for t in (test_raw_sensor, test_json_sensor, test_mobilenet, test_drop_oldest, test_sigterm_drain):
            try:
                t(ck, sys.executable, broker.port, logdir)
            except Exception as e:  # a broken step fails, the rest still run
                ck.check(False, f"{t.__name__}: {type(e).__name__}: {e}")
    finally:
        broker.stop()
    if not args.keep_logs and ck.failed == 0:
        shutil.rmtree(logdir, ignore_errors=True)
    print(f"{ck.passed} passed, {ck.failed} failed")
    return 1 if ck.failed else 0


if __name__ == "__main__":
    sys.exit(main())
