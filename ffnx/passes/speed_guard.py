"""Never slower: time the optimized graph against the graph the passes started from, drop passes
whose removal is faster.

Greedy, in registry order: for each applied pass p that may be dropped (not `REQUIRED`), the
passes are run again from the input graph without p (and without those already dropped). The
input graph, the current graph and that candidate are timed side by side (ONNX Runtime CPU at
the requested threads, one session each, round-robin rounds as in `ffnx.lowering.timing`), on
the example feeds and on one larger shape set. A candidate replaces the current graph when the
median over rounds of its paired per-round ratio candidate/current is below 1 - MARGIN averaged
over the shape sets and above 1 + MARGIN on none (MARGIN = 2 %: two timings of one graph on a
quiet machine differ by less). After the loop, if the kept graph is still slower than the input
graph by more than MARGIN, every droppable pass is dropped (the input graph is returned).

The decisions are cached by the sha256 of the input graph, the passes, the shapes, threads, ORT
version and CPU (JSON in $FFNX_CACHE_DIR or ~/.cache/ffnx, like the MoE lowering choice).
`FFNX_SPEED_GUARD=off` skips the guard (the test suite sets it; one test times for real).
`timer` may be injected (tests): `timer({label: model}, feeds) -> {label: seconds or [seconds
per round]}`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

MARGIN = 0.02
# lower_moe turns ffnx ops into forms ORT runs (the runtime has no decomposition of its own);
# cleanup only removes nodes. Neither is a candidate for dropping.
REQUIRED = ("cleanup", "lower_moe")
OFF = ("off", "0", "false", "no")
Timer = Callable[[dict[str, onnx.ModelProto], list[dict[str, np.ndarray]]], dict]


def enabled() -> bool:
    """False when FFNX_SPEED_GUARD is off/0/false/no."""
    return os.environ.get("FFNX_SPEED_GUARD", "on").strip().lower() not in OFF


def ort_timer(threads: int | None = None) -> Timer:
    """The default timer: round-robin ORT CPU sessions over the feeds (lowering.timing);
    -> {label: [seconds per call, one per round]}."""

    def timer(models: dict[str, onnx.ModelProto], feeds: list[dict]) -> dict[str, list[float]]:
        from ffnx.graph.ort import ort_session
        from ffnx.lowering import runnable
        from ffnx.lowering.timing import _turns, round_robin

        sessions = {k: ort_session(runnable(m), threads) for k, m in models.items()}
        wanted = {k: {i.name for i in s.get_inputs()} for k, s in sessions.items()}
        runs = {
            k: _turns(feeds, lambda f, s=s, w=wanted[k]: s.run(None, {n: f[n] for n in w}))
            for k, s in sessions.items()
        }
        return round_robin(runs, rounds=7, max_rounds=15)

    return timer


def paired_ratio(samples: dict, num: str, den: str) -> float:
    """Median over rounds of samples[num][i] / samples[den][i] (one float each: their ratio)."""
    a, b = np.atleast_1d(samples[num]), np.atleast_1d(samples[den])
    n = min(len(a), len(b))
    return float(np.median(a[:n] / b[:n]))


def cache_file() -> Path:
    root = os.environ.get("FFNX_CACHE_DIR") or Path.home() / ".cache" / "ffnx"
    return Path(root) / "speed_guard.json"


def cache_key(model: onnx.ModelProto, passes: list[str], shapes, threads) -> str:
    import platform

    import onnxruntime

    sig = {"model": hashlib.sha256(model.SerializeToString()).hexdigest(), "passes": passes,
           "shapes": shapes, "threads": threads, "ort": onnxruntime.__version__,
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}  # fmt: skip
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:20]


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: time again


def guard(
    original: onnx.ModelProto,
    optimized: onnx.ModelProto,
    reports: list[dict],
    rerun: Callable[[list[str]], tuple[onnx.ModelProto, list[dict]]],
    feed_sets: list[list[dict[str, np.ndarray]]],
    threads: int | None = None,
    timer: Timer | None = None,
    use_cache: bool = True,
) -> tuple[onnx.ModelProto, list[dict], dict]:
    """-> (model, pass reports, guard report). `rerun(names)` runs exactly those passes on
    `original`; `feed_sets`: the example feeds and a larger shape set, each timed separately.
    The guard report: dropped passes, speedup (input time / kept graph's time, per shape set),
    shapes, threads, margin, cached."""
    timer = timer or ort_timer(threads)
    applied = [r["name"] for r in reports if r.get("status") == "applied"]
    shapes = [[{k: list(v.shape) for k, v in f.items()} for f in fs[:1]] for fs in feed_sets]
    labels = ["x".join("x".join(map(str, v)) for v in s[0].values()) for s in shapes]
    labels = [f"set{i}:{lbl}" for i, lbl in enumerate(labels)]
    key = cache_key(original, applied, shapes, threads) if use_cache else None
    cache = _read_cache() if key else {}
    hit = cache.get(key) if key else None
    base = {"shapes": labels, "threads": threads, "margin": MARGIN}

    def timed(models: dict[str, onnx.ModelProto]) -> list[dict]:
        return [timer({"input": original, **models}, fs) for fs in feed_sets]

    def rel(per: list[dict], num: str, den: str) -> list[float]:
        return [paired_ratio(p, num, den) for p in per]

    model, out = optimized, reports
    if hit is None and not [p for p in applied if p not in REQUIRED]:
        hit, cached = {"dropped": [], "speedup": None}, False  # nothing to drop, nothing timed
    elif hit is None:
        dropped, keep = [], list(applied)
        speed = [1 / r for r in rel(timed({"current": model}), "current", "input")]
        for name in [p for p in applied if p not in REQUIRED]:
            trial = [p for p in keep if p != name]
            cand, cand_reports = rerun(trial)
            per = timed({"current": model, "candidate": cand})
            r = rel(per, "candidate", "current")
            if np.mean(r) < 1 - MARGIN and max(r) < 1 + MARGIN:
                dropped.append(name)
                keep, model, out = trial, cand, cand_reports
                speed = [1 / x for x in rel(per, "candidate", "input")]
            else:
                speed = [1 / x for x in rel(per, "current", "input")]
        droppable = [p for p in keep if p not in REQUIRED]
        if droppable and np.mean(speed) < 1 - MARGIN:
            # Still slower than the graph it started from: keep only the required passes.
            trial = [p for p in keep if p in REQUIRED]
            cand, cand_reports = rerun(trial)
            dropped += droppable
            model, out = cand, cand_reports
            speed = (
                [1 / x for x in rel(timed({"current": model}), "current", "input")]
                if trial
                else [1.0] * len(feed_sets)  # the input graph itself
            )
        hit = {"dropped": dropped, "speedup": dict(zip(labels, map(float, speed)))}
        if key:
            from ffnx import artifact

            cache[key] = hit
            cache_file().parent.mkdir(parents=True, exist_ok=True)
            artifact.write_json_atomic(cache_file(), cache)
        cached = False
    else:
        cached = True
        if hit["dropped"]:
            model, out = rerun([p for p in applied if p not in hit["dropped"]])
    first = {r["name"]: r for r in reports}
    out = list(out) + [
        {**first[n], "status": "dropped_slower", "applied": 0,
         "after": first[n].get("before"),
         "reason": "the graph without it ran faster on ONNX Runtime (speed guard)"}
        for n in hit["dropped"] if n in first
    ]  # fmt: skip
    return model, out, {**base, "dropped": list(hit["dropped"]),
                        "speedup": hit["speedup"], "cached": cached}  # fmt: skip


def optimize_guarded(model, feeds, larger_feeds=None, threads=None, timer=None,
                     use_cache=True, **kwargs):  # fmt: skip
    """`optimize_model` (default passes), then `guard`: -> (model, reports, guard report).
    Explicit `passes=` bypasses the guard (the caller asked for exactly those)."""
    from ffnx.passes.optimize import optimize_model

    new, reports = optimize_model(model, feeds, **kwargs)
    if kwargs.get("passes"):
        return new, reports, {"dropped": [], "speedup": None, "skipped": "explicit --passes"}
    rest = {k: v for k, v in kwargs.items() if k not in ("passes", "step")}
    step = kwargs.get("step") or (lambda s: None)
    step("speed guard: timing the optimized graph against its input on ONNX Runtime")

    def rerun(names):
        return optimize_model(model, feeds, passes=names, **rest) if names else (model, [])

    sets = [feeds] + ([larger_feeds] if larger_feeds else [])
    return guard(model, new, reports, rerun, sets, threads, timer, use_cache)


def summary(report: dict) -> str:
    """One line for the CLI: what was dropped and the measured ratio."""
    if report.get("skipped"):
        return f"speed guard: skipped ({report['skipped']})"
    sp = report.get("speedup") or {}
    ratios = ", ".join(f"{k.split(':', 1)[-1]} {v:.2f}x" for k, v in sp.items())
    dropped = ", ".join(report.get("dropped") or []) or "nothing"
    cached = " (cached)" if report.get("cached") else ""
    return f"speed guard{cached}: dropped {dropped}; optimized / input graph speed: {ratios}"
