#!/usr/bin/env python3
"""Markdown tables from one tools/bench/inference.sh run.

    python tools/bench/inference_report.py OUTDIR > OUTDIR/inference.md

Table 1, per model: tract default (1 thread, f32), the best tract lever measured (2 threads,
or batch 4 per frame where the batch axis is symbolic), onnxruntime (1 and 2 threads) and
the ratios tract / onnxruntime. Medians (p50) in ms. Table 2, for the two models where tract
is furthest behind onnxruntime: each engine's time per operator type (of its own optimized
graph) with its share, and the most expensive nodes. Standard library only.
"""

from __future__ import annotations

import json
import pathlib
import sys

ORDER = ["sensor_cnn", "mobilenet_fixture", "detector_v8_fixture", "mobilenet_v3_small",
         "resnet18", "yolov8n_320", "yolov8n_640"]


def load(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tract_ms(j) -> float | None:
    if not j or not j.get("inference"):
        return None
    return j["inference"]["p50_us"] / 1000.0


def ort_ms(j) -> float | None:
    return j["p50_us"] / 1000.0 if j else None


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "-"
    if v < 0.1:
        return f"{v * 1000:.0f} µs"
    return f"{v:.{digits}f}"


def main(argv: list[str]) -> int:
    out = pathlib.Path(argv[0])
    machine = load(out / "machine.json") or {}
    names = [n for n in ORDER if (out / f"{n}.tract-plain.json").exists()]
    names += sorted({p.name.split(".")[0] for p in out.glob("*.tract-plain.json")} - set(names))
    print(f"Run {machine.get('date', '?')}, {machine.get('mode', '?')} mode, commit "
          f"`{machine.get('commit', '?')}`, {machine.get('cpus', '?')} CPUs "
          f"({machine.get('cpu_model', '?')}), load average at start {machine.get('load', '?')}, binary "
          f"`{machine.get('binary', '?')}`. "
          "Medians (p50) in ms; ratios are tract / onnxruntime (below 1: tract faster).\n")
    print("| model | tract 1 thread | tract 2 threads | tract batch 4 (per frame) | best tract | "
          "onnxruntime 1 thread | onnxruntime 2 threads | tract / ort, 1 thread | best tract / ort 1 thread |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for n in names:
        t1 = tract_ms(load(out / f"{n}.tract-plain.json"))
        t2 = tract_ms(load(out / f"{n}.tract-threads2.json"))
        tb = tract_ms(load(out / f"{n}.tract-batch4.json"))
        o1 = ort_ms(load(out / f"{n}.ort.json"))
        o2 = ort_ms(load(out / f"{n}.ort-threads2.json"))
        levers = {k: v for k, v in (("1 thread", t1), ("2 threads", t2), ("batch 4", tb)) if v}
        best_name, best = min(levers.items(), key=lambda kv: kv[1]) if levers else ("-", None)
        r1 = t1 / o1 if t1 and o1 else None
        rb = best / o1 if best and o1 else None
        ratios[n] = r1
        print(f"| {n} | {fmt(t1)} | {fmt(t2)} | {fmt(tb)} | {best_name} | {fmt(o1)} | {fmt(o2)} | "
              f"{r1:.2f}x | {rb:.2f}x |" if r1 and rb else
              f"| {n} | {fmt(t1)} | {fmt(t2)} | {fmt(tb)} | {best_name} | {fmt(o1)} | {fmt(o2)} | - | - |")
    batch = [n for n in names if (out / f"{n}.ort-batch4.json").exists()]
    if batch:
        print("\nBatching (4 frames per run, per frame), both engines:\n")
        print("| model | tract batch 1 | tract batch 4 | gain | ort batch 1 | ort batch 4 | gain |")
        print("|---|---|---|---|---|---|---|")
        for n in batch:
            t1 = tract_ms(load(out / f"{n}.tract-plain.json"))
            tb = tract_ms(load(out / f"{n}.tract-batch4.json"))
            o1 = ort_ms(load(out / f"{n}.ort.json"))
            ob = load(out / f"{n}.ort-batch4.json")
            ob = ob["p50_us"] / 4000.0 if ob else None
            g = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
            print(f"| {n} | {fmt(t1)} | {fmt(tb)} | {g(t1, tb)} | {fmt(o1)} | {fmt(ob)} | {g(o1, ob)} |")

    worst = sorted((n for n in names if ratios.get(n)), key=lambda n: -ratios[n])[:2]
    for n in worst:
        tp = (load(out / f"{n}.tract.json") or {}).get("profile") or {}
        op = load(out / f"{n}.ort-profile.json") or {}
        print(f"\n### {n}: where the time goes (tract {ratios[n]:.2f}x onnxruntime)\n")
        print(f"Sum of node medians: tract {tp.get('node_total_us', 0) / 1000:.2f} ms over "
              f"{len(tp.get('nodes', []))} plan nodes, onnxruntime {op.get('node_total_us', 0) / 1000:.2f} ms "
              f"over {len(op.get('nodes', []))} nodes (profiled runs: tract {tp.get('runs', '?')}, "
              f"onnxruntime {op.get('runs', '?')}).\n")
        print("| tract op | nodes | ms | share | | onnxruntime op | nodes | ms | share |")
        print("|---|---|---|---|---|---|---|---|---|")
        a, b = tp.get("by_op", [])[:10], op.get("by_op", [])[:10]
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else None
            y = b[i] if i < len(b) else None
            left = f"{x['op']} | {x['nodes']} | {x['us'] / 1000:.2f} | {100 * x['share']:.1f}%" if x else " | | |"
            right = f"{y['op']} | {y['nodes']} | {y['us'] / 1000:.2f} | {100 * y['share']:.1f}%" if y else " | | |"
            print(f"| {left} | | {right} |")
        print("\nMost expensive tract nodes:\n")
        print("| node | op | ms | share |")
        print("|---|---|---|---|")
        for t in tp.get("top", [])[:8]:
            print(f"| `{t['name']}` | {t['op']} | {t['us'] / 1000:.3f} | {100 * t['share']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
