"""Latency of ffnx's graph passes on every zoo model: plain export vs ffnx vs onnxslim.

For each zoo model, three variants of the same network on ONNX Runtime CPU:
- export: model.onnx as `torch.onnx.export(dynamo=True)` writes it (onnxscript's optimizer has
  already folded constants and BN after Conv/Gemm) — the baseline;
- ffnx: model.opt.onnx, after ffnx's default exact passes (`export_artifact`);
- onnxslim: `onnxslim.slim(model.onnx)`, a general-purpose ONNX graph simplifier.

All sessions use the same thread count and the same inputs, at each --batch. Latency is the
median per-call wall time, measured round-robin: every round runs each session for a few calls,
the starting session rotating per round, so load from other processes spreads evenly. Each
variant gets two sessions, created in mirrored order (export, ffnx, onnxslim, onnxslim, ffnx,
export), and its latency is the mean of their medians: where a session's weights land in memory
moves a memory-bound model by up to ~7 % between sessions of the same graph, and the mirrored
pair cancels the creation-order part of that. ORT sessions stop their workers spinning after
each run (`session.force_spinning_stop`), so one session does not slow down the next.
Outputs of ffnx and onnxslim are checked against the export's (max |diff| in the JSON).

    python benchmarks/passes.py [--size tiny|base] [--batch 1 8] [--models vit-repa ...]
                                [--seconds 4] [--threads 2] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

VARIANTS = ("export", "ffnx", "onnxslim")
ROOT = Path(__file__).resolve().parents[1]


def artifacts(name: str, size: str, out: Path, force: bool = False) -> dict:
    """Export + optimize `name` (cached in out/size/name) and slim its export; paths, passes."""
    from ffnx import artifact
    from ffnx.export.pipeline import export_artifact
    from ffnx.models import zoo

    spec = zoo.build(name, size)
    d = out / size / name
    if force or not (d / artifact.MODEL_OPT).exists():
        export_artifact(spec, d, force=True, source=name, size=size)
    slim = d / "model.slim.onnx"
    if force or not slim.exists():
        import onnxslim

        with contextlib.redirect_stdout(io.StringIO()):
            model = onnxslim.slim(onnx.load(str(d / artifact.MODEL)))
        onnx.save(model, str(slim))
    manifest = artifact.read_manifest(d)
    passes = {p["name"]: p["applied"] for p in manifest["passes"] if p.get("status") == "applied"}
    paths = {"export": d / artifact.MODEL, "ffnx": d / artifact.MODEL_OPT, "onnxslim": slim}
    return {"spec": spec, "paths": paths, "passes": passes, "manifest_passes": manifest["passes"]}


def session(path: Path, threads: int):
    """An ORT CPU session that stops spinning after each run (`ffnx.graph.verify.ort_session`);
    ffnx-domain nodes (if any remain) run as their decomposition."""
    from ffnx.graph.ort import ort_session
    from ffnx.lowering import runnable

    return ort_session(runnable(onnx.load(str(path))), threads)


def feeds_for(spec, batch: int) -> dict[str, np.ndarray]:
    from ffnx.export.inputs import to_numpy

    dims = {"batch": batch}
    inputs = spec.make_inputs(dims) if spec.make_inputs else spec.inputs
    return to_numpy(inputs)


def interleaved(sessions: dict, feeds: dict, seconds: float, per_turn: int = 3) -> dict:
    """p50/p90 ms per variant, timing round-robin turns of `per_turn` calls for `seconds`.
    `sessions` maps (variant, copy) to a session; a variant's figures are the mean over copies."""
    runs = {v: (lambda s=s: s.run(None, feeds)) for v, s in sessions.items()}
    for fn in runs.values():  # warmup: allocations, kernel selection
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {v: [] for v in runs}
    order, start, rnd = list(runs), time.perf_counter(), 0
    while time.perf_counter() - start < seconds or rnd < 3:
        for v in order[rnd % len(order) :] + order[: rnd % len(order)]:
            for _ in range(per_turn):
                t0 = time.perf_counter()
                runs[v]()
                times[v].append(time.perf_counter() - t0)
        rnd += 1
    out: dict[str, dict] = {}
    for (v, _copy), ts in times.items():
        ms = np.asarray(ts) * 1e3
        o = out.setdefault(v, {"p50_ms": 0.0, "p90_ms": 0.0, "calls": 0, "copies_p50_ms": []})
        o["copies_p50_ms"].append(float(np.median(ms)))
        o["p90_ms"] += float(np.percentile(ms, 90))
        o["calls"] += int(ms.size)
    for o in out.values():
        n = len(o["copies_p50_ms"])
        o["p50_ms"], o["p90_ms"] = float(np.mean(o["copies_p50_ms"])), o["p90_ms"] / n
    return out


def max_abs(sessions: dict, feeds: dict) -> dict[str, float]:
    first = {v: s for (v, _), s in reversed(list(sessions.items()))}
    ref = first["export"].run(None, feeds)
    out = {}
    for v in VARIANTS[1:]:
        got = first[v].run(None, feeds)
        out[v] = max(float(np.abs(np.asarray(a, np.float64) - b).max()) for a, b in zip(got, ref))
    return out


def bench_model(name: str, args) -> list[dict]:
    art = artifacts(name, args.size, Path(args.out), args.force)
    order = list(VARIANTS) + list(VARIANTS)[::-1]  # mirrored: see the module docstring
    sessions = {(v, i): session(art["paths"][v], args.threads) for i, v in enumerate(order)}
    rows = []
    for b in args.batch:
        feeds = feeds_for(art["spec"], b)
        lat = interleaved(sessions, feeds, args.seconds)
        rows.append({
            "model": name,
            "batch": b,
            "latency": lat,
            "speedup": {v: lat["export"]["p50_ms"] / lat[v]["p50_ms"] for v in VARIANTS[1:]},
            "max_abs": max_abs(sessions, feeds),
            "nodes": {v: len(onnx.load(str(p), load_external_data=False).graph.node)
                      for v, p in art["paths"].items()},
            "passes": art["passes"],
        })  # fmt: skip
    return rows


def print_table(rows: list[dict], failed: dict[str, str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("model", "batch", "export ms", "ffnx ms", "slim ms", "ffnx x", "slim x",
                "nodes e/f/s", "passes applied"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("model", "passes applied") else "right")
    for r in rows:
        lat, sp, n = r["latency"], r["speedup"], r["nodes"]
        passes = ", ".join(f"{k}:{v}" for k, v in r["passes"].items() if k != "cleanup") or "-"
        t.add_row(r["model"], str(r["batch"]),
                  *(f"{lat[v]['p50_ms']:.3f}" for v in VARIANTS),
                  _ratio(sp["ffnx"]), _ratio(sp["onnxslim"]),
                  f"{n['export']}/{n['ffnx']}/{n['onnxslim']}", passes)  # fmt: skip
    Console(width=160).print(t)
    print("x = export p50 / variant p50 (>1: faster than the plain export)")
    for name, err in failed.items():
        print(f"{name}: not measured: {err}")


def _ratio(x: float) -> str:
    color = "green" if x >= 1.03 else "red" if x <= 0.97 else "white"
    return f"[{color}]{x:.2f}[/{color}]"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    by = {(r["model"], r["batch"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 0.7 * len(models) * len(batches)), 4.5))
    width = 0.8 / (2 * len(batches))
    x = np.arange(len(models))
    for i, b in enumerate(batches):
        for j, v in enumerate(VARIANTS[1:]):
            ys = [by[(m, b)]["speedup"][v] if (m, b) in by else np.nan for m in models]
            ax.bar(x + (2 * i + j - len(batches) + 0.5) * width, ys, width,
                   label=f"{v} batch {b}", alpha=0.9 if v == "ffnx" else 0.5)  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, models, rotation=40, ha="right")
    ax.set_ylabel("speedup over plain export (p50)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=len(batches))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=("tiny", "base"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--models", nargs="+", help="zoo names (default: every zoo model)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing budget per model+batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench-results" / "passes"), help="artifact cache")
    p.add_argument("--force", action="store_true", help="re-export even when cached")
    p.add_argument("--json")
    p.add_argument("--plot")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from ffnx.models import zoo

    args = parse(argv)
    rows, failed = [], {}
    for name in args.models or zoo.names():
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            rows += bench_model(name, args)
        except Exception as e:  # one model failing to export must not hide the others' numbers
            failed[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    title = (f"ORT CPU, {args.threads} threads, zoo size {args.size}, onnxruntime "
             f"{importlib.metadata.version('onnxruntime')}")  # fmt: skip
    print_table(rows, failed, title)
    if args.json:
        meta = {"size": args.size, "threads": args.threads, "batches": args.batch,
                "machine": platform.platform(), "processor": platform.processor(),
                "versions": {d: importlib.metadata.version(d)
                             for d in ("onnxruntime", "onnxslim", "onnx", "torch")}}  # fmt: skip
        Path(args.json).write_text(
            json.dumps({**meta, "results": rows, "failed": failed}, indent=1)
        )
    if args.plot and rows:
        plot(rows, args.plot, title)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
