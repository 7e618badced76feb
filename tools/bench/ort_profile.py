#!/usr/bin/env python3
"""onnxruntime's per-node profile of a model, in the shape of `edgeinfer inspect --profile --json`.

    python ort_profile.py --model model.onnx [--runs 20] [--threads 1] [--input-shape x=1,3,224,224]

Runs the model with onnxruntime's built-in profiler (SessionOptions.enable_profiling) on a
deterministic uniform [-1, 1) input, one untimed run first, and prints one JSON object: median
whole-run time (the profiler's `model_run` events), per node the median of its
`<node>_kernel_time` events, and their sum per operator type. The operator types are those
of onnxruntime's optimized graph (e.g. `FusedConv` = Conv + activation), as tract's profile
shows tract's optimized plan: compare the two at the level of the model and of the op
families (convolution, depthwise, element-wise), not node by node.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) + "/../baseline")
from ort_common import input_specs, parse_shape_overrides  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--input-shape", action="append", metavar="NAME=D1,D2,...")
    args = p.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        p.error("--runs and --threads must be >= 1")

    tmp = tempfile.mkdtemp(prefix="ort-profile-")
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tmp, "ort")
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    specs = input_specs(sess, parse_shape_overrides(args.input_shape))
    rng = np.random.default_rng(0)
    feeds = {}
    for s in specs:
        z = s.zeros()
        if z.dtype.kind == "f":
            z = rng.uniform(-1, 1, size=z.shape).astype(z.dtype)
        feeds[s.name] = z
    for _ in range(args.runs + 1):
        sess.run(None, feeds)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    os.rmdir(tmp)

    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    per_node: dict[str, list[float]] = defaultdict(list)
    op_of: dict[str, str] = {}
    order: list[str] = []
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        if name not in op_of:
            order.append(name)
        op_of[name] = e.get("args", {}).get("op_name", "?")
        per_node[name].append(float(e["dur"]))
    # Drop the first (untimed, warm-up) run of every node and of the session.
    runs = runs[1:]
    nodes = []
    for name in order:
        ts = per_node[name][1:] or per_node[name]
        nodes.append({"name": name, "op": op_of[name], "us": statistics.median(ts)})
    total = sum(n["us"] for n in nodes) or 1e-9
    for n in nodes:
        n["share"] = n["us"] / total
    by_op: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for n in nodes:
        by_op[n["op"]][0] += 1
        by_op[n["op"]][1] += n["us"]
    by_op_list = sorted(
        ({"op": k, "nodes": v[0], "us": v[1], "share": v[1] / total} for k, v in by_op.items()),
        key=lambda o: (-o["us"], o["op"]),
    )
    result = {
        "model": args.model,
        "runs": len(runs),
        "threads": args.threads,
        "median_run_us": statistics.median(runs) if runs else None,
        "node_total_us": total,
        "by_op": by_op_list,
        "top": sorted(nodes, key=lambda n: -n["us"])[: args.top],
        "nodes": nodes,
        "ort_version": ort.__version__,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
