#!/usr/bin/env python3
"""int8 in tract against f32 and onnxruntime: which quantized forms load, how they compute, how
accurate and how fast, side by side in one run.

    python tools/bench/int8.py EDGEINFER_BIN OUTDIR [--runs N] [--bench-models DIR]

For each float model (the fixtures sensor_cnn and detector_v8, and mobilenet_v3_small from the
benchmark set when --bench-models is given) it makes, with onnxruntime.quantization
(quantize_static, per tensor, u8 activations, i8 weights, 16 calibration inputs):
  qdq        QDQ format (QuantizeLinear/DequantizeLinear around float ops), every op
  qlinear    QOperator format, only Conv and MatMul (QLinearConv / QLinearMatMul: ONNX ops)
  qcontrib   QOperator format, every op (brings onnxruntime's contrib ops: QGemm, QLinearAdd...)
(the committed fixtures sensor_cnn_q* / detector_v8_q* are the same recipes). Then per variant:
`edgeinfer inspect --json --dump` (load, matrix products in integers vs float, p50, outputs on
the sample input) and onnxruntime (p50, outputs on the same input). Accuracy: max |x - f32
reference| / max(1, |f32 reference|) on that input, for tract and for onnxruntime.
Prints a markdown table. Needs numpy and onnxruntime (its quantization tools included).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

ROOT = pathlib.Path(__file__).resolve().parents[2]
DT = {"f32": np.float32, "i64": np.int64, "u8": np.uint8, "i8": np.int8}


def ort_session(path: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_time(sess, feeds, runs):
    sess.run(None, feeds)
    t = []
    for _ in range(runs):
        s = time.perf_counter()
        sess.run(None, feeds)
        t.append(time.perf_counter() - s)
    return float(np.median(t)) * 1e3


def quantize(src: pathlib.Path, dst: pathlib.Path, fmt: str, op_types, calib):
    name = ort_session(str(src)).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x} for x in calib])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(src), str(dst), Reader(),
                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    op_types_to_quantize=op_types, per_channel=False,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def dev(a, ref):
    worst = 0.0
    for x, y in zip(a, ref):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        worst = max(worst, float(np.abs(x - y).max()) / max(1.0, float(np.abs(y).max())))
    return worst


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("bin")
    p.add_argument("out")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--bench-models")
    a = p.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    models = {"sensor_cnn": ROOT / "tests/fixtures/models/sensor_cnn/model.onnx",
              "detector_v8": ROOT / "tests/fixtures/models/detector_v8/model.onnx"}
    if a.bench_models:
        models["mobilenet_v3_small"] = pathlib.Path(a.bench_models) / "mobilenet_v3_small/model.onnx"
    print("| model | variant | loads in tract | products int / float | tract p50 ms | ort p50 ms | "
          "tract / ort | tract error vs f32 | ort error vs f32 | tract vs tract f32 speed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name, f32 in models.items():
        shape = [d if isinstance(d, int) else 1 for d in ort_session(str(f32)).get_inputs()[0].shape]
        calib = [rng.uniform(-1, 1, size=shape).astype(np.float32) for _ in range(16)]
        variants = {"f32": f32}
        for v, fmt, ops in (("qdq", "qdq", None), ("qlinear", "qlinear", ["Conv", "MatMul"]),
                            ("qcontrib", "qlinear", None)):
            dst = out / f"{name}.{v}.onnx"
            quantize(f32, dst, fmt, ops, calib)
            variants[v] = dst
        ref = None
        tract_f32_ms = None
        for v, path in variants.items():
            d = out / f"{name}.{v}"
            r = subprocess.run([a.bin, "inspect", str(path), "--runs", str(a.runs), "--json", "--dump", str(d)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                err = (r.stderr.strip().splitlines() or ["?"])[0]
                print(f"| {name} | {v} | no: {err.replace('|', '/')[:160]} | | | | | | | |")
                continue
            j = json.loads(r.stdout)
            spec = j["inputs"][0]
            x = np.frombuffer((d / f"input.{spec['name']}.bin").read_bytes(), DT[spec["dtype"]]).reshape(spec["shape"])
            tract_out = [np.frombuffer((d / f"output.{o['name'].replace('/', '_')}.bin").read_bytes(),
                                       DT[o["dtype"]]).reshape(o["shape"]) for o in j["outputs"]]
            sess = ort_session(str(path))
            feeds = {spec["name"]: x}
            ort_out = sess.run(None, feeds)
            if v == "f32":
                ref = ort_out
                tract_f32_ms = j["inference"]["p50_us"] / 1e3
            ort_ms = ort_time(sess, feeds, a.runs)
            t_ms = j["inference"]["p50_us"] / 1e3
            ar = j["arithmetic"]
            print(f"| {name} | {v} | yes | {ar['integer']} / {ar['f32'] + ar['f16']} | {t_ms:.3f} | {ort_ms:.3f} | "
                  f"{t_ms / ort_ms:.2f}x | {dev(tract_out, ref):.1e} | {dev(ort_out, ref):.1e} | "
                  f"{t_ms / tract_f32_ms:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
