"""Never slower: time the optimized graph against the graph the passes started from, drop passes
whose removal is faster.

Greedy, in registry order: for each applied pass p, the passes are run again from the input
graph without p (and without those already dropped); when that graph is faster than the current
one by more than MARGIN (2 %) on every timed shape set, p is dropped. Timing is ONNX Runtime CPU
at the requested threads, on the example feeds and one larger shape set, round-robin as in
`ffnx.lowering.timing` (the fastest round counts). The decisions are cached by the sha256
of the input graph, the passes, the shapes, threads, ORT version and CPU (JSON in
$FFNX_CACHE_DIR or ~/.cache/ffnx, like the MoE lowering choice). `timer` may be injected
(tests): `timer({label: model}, feeds) -> {label: seconds}`.
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
Timer = Callable[[dict[str, onnx.ModelProto], list[dict[str, np.ndarray]]], dict[str, float]]


def ort_timer(threads: int | None = None) -> Timer:
    """The default timer: round-robin ORT CPU sessions over the feeds (lowering.timing)."""

    def timer(models: dict[str, onnx.ModelProto], feeds: list[dict]) -> dict[str, float]:
        from ffnx.graph.ort import ort_session
        from ffnx.lowering import runnable
        from ffnx.lowering.timing import _turns, best, round_robin

        sessions = {k: ort_session(runnable(m), threads) for k, m in models.items()}
        runs = {k: _turns(feeds, lambda f, s=s: s.run(None, f)) for k, s in sessions.items()}
        return best(round_robin(runs, rounds=5, max_rounds=11))

    return timer


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
    `original`; `feed_sets`: the example feeds and a larger shape set, each timed separately."""
    timer = timer or ort_timer(threads)
    applied = [r["name"] for r in reports if r.get("status") == "applied"]
    shapes = [[{k: list(v.shape) for k, v in f.items()} for f in fs[:1]] for fs in feed_sets]
    key = cache_key(original, applied, shapes, threads) if use_cache else None
    cache = json.loads(cache_file().read_text()) if key and cache_file().exists() else {}
    dropped = cache.get(key, {}).get("dropped") if key else None
    ratio = cache.get(key, {}).get("ratio") if key else None

    def seconds(models: dict[str, onnx.ModelProto]) -> dict[str, float]:
        """Summed over the shape sets (each relative to the input graph's time)."""
        per = [timer({"input": original, **models}, fs) for fs in feed_sets]
        return {k: sum(p[k] / p["input"] for p in per) / len(per) for k in models}

    model, out = optimized, reports
    if dropped is None:
        dropped, keep = [], list(applied)
        current = seconds({"current": model})["current"]
        for name in applied:
            trial = [p for p in keep if p != name]
            cand, cand_reports = rerun(trial)
            t = seconds({"candidate": cand})["candidate"]
            if t < current * (1 - MARGIN):
                dropped.append(name)
                keep, model, out, current = trial, cand, cand_reports, t
        ratio = 1.0 / current  # speed-up of the kept passes over the input graph
        if key:
            from ffnx import artifact

            cache[key] = {"dropped": dropped, "ratio": ratio}
            cache_file().parent.mkdir(parents=True, exist_ok=True)
            artifact.write_json_atomic(cache_file(), cache)
    elif dropped:
        model, out = rerun([p for p in applied if p not in dropped])
    out = list(out) + [
        {"name": n, "status": "dropped_slower", "reason": "the graph without it ran faster on ORT"}
        for n in dropped
    ]
    return model, out, {"dropped": dropped, "speedup": ratio, "margin": MARGIN}


def optimize_guarded(model, feeds, larger_feeds=None, threads=None, timer=None,
                     use_cache=True, **kwargs):  # fmt: skip
    """`optimize_model` (default passes), then `guard`: -> (model, reports, guard report).
    Explicit `passes=` bypasses the guard (the caller asked for exactly those)."""
    from ffnx.passes.optimize import optimize_model

    new, reports = optimize_model(model, feeds, **kwargs)
    if kwargs.get("passes"):
        return new, reports, {"dropped": [], "speedup": None, "skipped": "explicit passes"}
    rest = {k: v for k, v in kwargs.items() if k != "passes"}
    rerun = lambda names: (
        optimize_model(model, feeds, passes=names, **rest) if names else (model, [])
    )  # noqa: E731
    sets = [feeds] + ([larger_feeds] if larger_feeds else [])
    return guard(model, new, reports, rerun, sets, threads, timer, use_cache)
