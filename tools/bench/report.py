#!/usr/bin/env python3
"""Turns one tools/bench/bench.sh run directory into a markdown report and a latency plot.

Every figure is computed from measurements taken in the same run, and reported next to its
counterpart as a ratio: absolute numbers on a shared 2-core machine move between runs, ratios
much less.
"""
import json
import sys
from pathlib import Path

MODELS = [("sensor_cnn", "sensor 1D-CNN [1,3,128]"), ("mobilenet", "MobileNetV3-small [1,3,224,224]")]
KINDS = ["daemon", "baseline"]


def load(out: Path, name: str):
    p = out / name
    if not p.exists():
        return None
    text = p.read_text().strip()
    # ort_bench prints one JSON line; loadgen writes pretty JSON.
    return json.loads(text.splitlines()[-1] if text.startswith("{\"model\"") else text)


def ms(us):
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def mib(b):
    return f"{b / 1048576:.1f} MiB" if b is not None else "-"


def main():
    out = Path(sys.argv[1])
    machine = json.loads((out / "machine.json").read_text())
    workers = machine["workers"]
    lines = []
    w = lines.append
    w(f"# edgeinfer benchmark ({machine['mode']})")
    w("")
    w(f"{machine['date']}, commit `{machine['commit']}`, {machine['cpus']} CPUs ({machine['cpu_model']}), "
      f"kernel {machine['kernel']}. Daemon: release build, {workers} inference worker(s), raw frames, QoS 1. "
      f"Baseline: `tools/baseline/service.py` (paho-mqtt + onnxruntime, {workers} worker thread(s), "
      "1 intra-op thread each). Same mosquitto, same load generator, same CPUs, one after the other.")
    w("")

    w("## 1. Inference alone (per frame, 1 thread)")
    w("")
    w("| model | tract mean | tract p99 | onnxruntime mean | onnxruntime p99 | tract / onnxruntime |")
    w("|---|---|---|---|---|---|")
    raw = {}
    for m, title in MODELS:
        t = load(out, f"{m}.tract.json")
        o = load(out, f"{m}.ort.json")
        if not t or not o:
            continue
        ti = t["inference"]
        raw[m] = (ti["mean_us"], ti["p99_us"], o["mean_us"], o["p99_us"])
        w(f"| {title} | {ms(ti['mean_us'])} | {ms(ti['p99_us'])} | {ms(o['mean_us'])} | {ms(o['p99_us'])} | "
          f"{ratio(ti['mean_us'], o['mean_us'])} |")
    w("")

    w("## 2. Cold start: process spawn -> first result published (median)")
    w("")
    w("| model | edgeinfer | Python baseline | baseline / edgeinfer |")
    w("|---|---|---|---|")
    for m, title in MODELS:
        d = load(out, f"{m}.daemon.cold.json")
        b = load(out, f"{m}.baseline.cold.json")
        if d and b:
            dm = d["spawn_to_first_result_ms"]["median"]
            bm = b["spawn_to_first_result_ms"]["median"]
            w(f"| {title} | {dm:.0f} ms | {bm:.0f} ms | {ratio(bm, dm)} |")
    w("")

    w("## 3. Memory: RSS after the first frames, and growth over a soak at 70% load")
    w("")
    w("| model | edgeinfer RSS | baseline RSS | baseline / edgeinfer | edgeinfer growth | baseline growth |")
    w("|---|---|---|---|---|---|")
    for m, title in MODELS:
        row = {}
        for k in KINDS:
            r = load(out, f"{m}.{k}.rss.json")
            s = load(out, f"{m}.{k}.soak.json")
            if r and s:
                after = r["service"]["rss_end_bytes"]
                row[k] = (after, s["service"]["rss_end_bytes"] - after, r["received"] + s["received"])
        if len(row) == 2:
            d, b = row["daemon"], row["baseline"]
            w(f"| {title} | {mib(d[0])} | {mib(b[0])} | {ratio(b[0], d[0])} | "
              f"{(d[1]) / 1024:+.0f} KiB over {d[2]} frames | {(b[1]) / 1024:+.0f} KiB over {b[2]} frames |")
    w("")

    w(f"## 4. Saturation throughput ({workers} worker(s), closed loop)")
    w("")
    w("Efficiency: frames/s served divided by what the workers could do with raw inference alone "
      f"({workers} / raw mean time). It shows the overhead of everything around inference.")
    w("")
    w("| model | edgeinfer frames/s | edgeinfer efficiency (vs tract) | edgeinfer CPU per frame | baseline frames/s | baseline efficiency (vs onnxruntime) | baseline CPU per frame | edgeinfer / baseline |")
    w("|---|---|---|---|---|---|---|---|")
    sat = {}
    for m, title in MODELS:
        d = load(out, f"{m}.daemon.sat.json")
        b = load(out, f"{m}.baseline.sat.json")
        if not (d and b and m in raw):
            continue
        tmean, _, omean, _ = raw[m]
        dideal = workers * 1e6 / tmean
        bideal = workers * 1e6 / omean
        sat[m] = (d["served_fps"], b["served_fps"])
        def per_frame(r):
            c = (r.get("service") or {}).get("cpu_seconds")
            return ms(c * 1e6 / r["received"]) if c and r["received"] else "-"

        w(f"| {title} | {d['served_fps']:.0f} | {d['served_fps'] / dideal:.2f} | {per_frame(d)} | {b['served_fps']:.0f} | "
          f"{b['served_fps'] / bideal:.2f} | {per_frame(b)} | {ratio(d['served_fps'], b['served_fps'])} |")
    w("")

    w("## 5. Latency under load (open loop at 50% and 90% of each service's own saturation)")
    w("")
    w("End to end: device publish -> result received, through the broker (all processes share the "
      "machine). Overhead: end-to-end P99 minus the raw inference P99 of the runtime the service uses. "
      "In-service: the service's own report of its time around inference (total - inference: "
      "queueing, decoding, serialization), P99.")
    w("")
    w("| model | load | edgeinfer p50 / p99 | edgeinfer overhead | edgeinfer in-service p99 | baseline p50 / p99 | baseline overhead | baseline in-service p99 | baseline / edgeinfer (p99) |")
    w("|---|---|---|---|---|---|---|---|---|")
    for m, title in MODELS:
        if m not in raw:
            continue
        _, tp99, _, op99 = raw[m]
        for pct in (50, 90):
            d = load(out, f"{m}.daemon.load{pct}.json")
            b = load(out, f"{m}.baseline.load{pct}.json")
            if not (d and b):
                continue
            dl, bl = d["latency_us"], b["latency_us"]
            di = d.get("service_overhead_us", {}).get("p99", 0)
            bi = b.get("service_overhead_us", {}).get("p99", 0)
            w(f"| {title} | {pct}% | {ms(dl['p50'])} / {ms(dl['p99'])} | {ms(max(0, dl['p99'] - tp99))} | {ms(di)} | "
              f"{ms(bl['p50'])} / {ms(bl['p99'])} | {ms(max(0, bl['p99'] - op99))} | {ms(bi)} | {ratio(bl['p99'], dl['p99'])} |")
    w("")

    w("## 6. Inference levers (per frame, mean)")
    w("")
    w("| model | tract default | tract batch 8 | tract 2 threads | tract f16 | onnxruntime 1 thread | onnxruntime 2 threads |")
    w("|---|---|---|---|---|---|---|")
    for m, title in MODELS:
        def t(name):
            r = load(out, f"{m}.{name}.json")
            return ms(r["inference"]["mean_us"]) if r and r.get("inference") else "n/a"

        o1 = load(out, f"{m}.ort.json")
        o2 = load(out, f"{m}.ort-threads2.json")
        w(f"| {title} | {t('tract')} | {t('tract-batch8') if m == 'sensor_cnn' else 'n/a (fixed batch)'} | "
          f"{t('tract-threads2')} | {t('tract-f16')} | {ms(o1['mean_us']) if o1 else '-'} | {ms(o2['mean_us']) if o2 else '-'} |")
    w("")
    plot(out, lines)
    print("\n".join(lines))


def plot(out: Path, lines):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines.append("(matplotlib missing: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (m, title) in zip(axes, MODELS):
        for kind, style in (("daemon", "-"), ("baseline", "--")):
            for pct, color in ((50, "tab:blue"), (90, "tab:red")):
                p = out / f"{m}.{kind}.load{pct}.samples.json"
                if not p.exists():
                    continue
                xs = sorted(json.loads(p.read_text()))
                if not xs:
                    continue
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                name = "edgeinfer" if kind == "daemon" else "Python baseline"
                ax.plot([x / 1000 for x in xs], ys, style, color=color, label=f"{name}, {pct}% load")
        ax.set_xscale("log")
        ax.set_xlabel("end-to-end latency (ms, log)")
        ax.set_ylabel("fraction of frames")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    lines.append("![latency distributions](latency.png)")


if __name__ == "__main__":
    main()
