#!/usr/bin/env python3
"""Raw onnxruntime timing: run a model on zero inputs and print one JSON line of latencies.

    python ort_bench.py --model model.onnx [--runs 200] [--warmup 20] [--threads 1]
                        [--input-shape accel=1,3,128 ...]

Inputs get their concrete shapes as in service.py: a symbolic/unknown leading (batch) dim
becomes 1, other symbolic dims must be given with --input-shape. Only `session.run` is timed
(time.perf_counter_ns around each call); percentiles are numpy's linear interpolation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ort_common import ModelError, input_specs, make_session, parse_shape_overrides  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (inter-op is always 1)")
    p.add_argument(
        "--input-shape", action="append", metavar="NAME=D1,D2,...", help="concrete shape for an input (repeatable)"
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--runs and --threads must be >= 1, --warmup >= 0")

    try:
        overrides = parse_shape_overrides(args.input_shape)
    except ValueError as e:
        p.error(str(e))
    t0 = time.perf_counter_ns()
    try:
        sess = make_session(args.model, threads=args.threads)
        specs = input_specs(sess, overrides)
    except ModelError as e:
        print(f"ort_bench: {e}", file=sys.stderr)
        return 78
    except Exception as e:
        print(f"ort_bench: cannot load {args.model}: {e}", file=sys.stderr)
        return 78
    load_us = (time.perf_counter_ns() - t0) / 1000
    feeds = {s.name: s.zeros() for s in specs}

    for _ in range(args.warmup):
        sess.run(None, feeds)
    times = np.empty(args.runs, dtype=np.int64)
    for i in range(args.runs):
        start = time.perf_counter_ns()
        sess.run(None, feeds)
        times[i] = time.perf_counter_ns() - start
    us = times / 1000.0

    result = {
        "model": args.model,
        "runs": args.runs,
        "threads": args.threads,
        "mean_us": round(float(us.mean()), 1),
        "p50_us": round(float(np.percentile(us, 50)), 1),
        "p90_us": round(float(np.percentile(us, 90)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
        "min_us": round(float(us.min()), 1),
        "max_us": round(float(us.max()), 1),
        "warmup": args.warmup,
        "load_us": round(load_us, 1),
        "inputs": {s.name: {"dtype": s.dtype.name, "shape": list(s.shape)} for s in specs},
        "ort_version": ort.__version__,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
