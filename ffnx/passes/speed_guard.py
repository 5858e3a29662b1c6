"""Never slower: time the optimized graph against the graph the passes started from, drop passes
whose removal is faster.

Greedy, in registry order: for each applied pass p that may be dropped (not `REQUIRED`), the
passes are run again from the input graph without p (and without those already dropped). The
input graph, the current graph and that candidate are timed side by side (ONNX Runtime CPU at
the requested threads, one session each, round-robin rounds as in `ffnx.lowering.timing`), on
the example feeds and on one larger shape set. A candidate replaces the current graph when it is
`faster`: the median over rounds of its paired per-round ratio candidate/current is below
1 - MARGIN averaged over the shape sets and above 1 + MARGIN on none (MARGIN = 2 %), and it won
at least MIN_WINS (75 %) of the rounds, a sign test that keeps the noise of a loaded machine
from dropping passes. After the loop, if the input graph is `faster` than the kept one, every
droppable pass is dropped (the input graph is returned). The report lists every trial.

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

from ffnx.graph.model_io import data_path, digest, is_big

MARGIN = 0.02
RULE = 2  # bump when the decision rule changes: older cached decisions are not reused
MIN_WINS = 0.75  # share of paired rounds a graph must win to count as faster (see `faster`)
# lower_moe turns ffnx ops into forms ORT runs (the runtime has no decomposition of its own);
# cleanup only removes nodes; group_query_attention times itself at decode shapes (a KV-cache
# decoder's example shapes look like prefill). None of them is a candidate for dropping.
REQUIRED = ("cleanup", "lower_moe", "group_query_attention")
# A KV-cache decoder is timed at what its tokens/s is made of, decode steps (one new token on a
# past), not at its example shapes (a short prefill): batch 1 and 4, past 64 and 256.
DECODE_STEPS = ({"batch": 1, "seq": 1, "past": 64}, {"batch": 4, "seq": 1, "past": 256})
OFF = ("off", "0", "false", "no")
BIG = "model past 2 GiB: timing would hold it in memory three times"
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
        return round_robin(runs, rounds=12, max_rounds=20)

    return timer


def paired_ratio(samples: dict, num: str, den: str) -> float:
    """Median over rounds of samples[num][i] / samples[den][i] (one float each: their ratio)."""
    a, b = np.atleast_1d(samples[num]), np.atleast_1d(samples[den])
    n = min(len(a), len(b))
    return float(np.median(a[:n] / b[:n]))


def faster(per: list[dict], a: str, b: str) -> dict:
    """Whether `a` is faster than `b`, from the timings of each shape set: the paired per-round
    ratios a/b have a median below 1 - MARGIN averaged over the sets and above 1 + MARGIN in
    none, and `a` won at least MIN_WINS of all rounds (a sign test: on a loaded machine one
    slow round moves a median, not a majority). -> {faster, ratio per set, wins}."""
    ratios, wins, n = [], 0, 0
    for p in per:
        x, y = np.atleast_1d(p[a]), np.atleast_1d(p[b])
        k = min(len(x), len(y))
        r = x[:k] / y[:k]
        ratios.append(float(np.median(r)))
        wins, n = wins + int((r < 1).sum()), n + k
    ok = np.mean(ratios) < 1 - MARGIN and max(ratios) < 1 + MARGIN and wins >= MIN_WINS * n
    return {"faster": bool(ok), "ratio": [round(r, 4) for r in ratios], "wins": f"{wins}/{n}"}


def _label(feed_shapes: dict[str, list[int]]) -> str:
    """The distinct input shapes of one feed, e.g. '2x8' (three [2, 8] token inputs)."""
    return ",".join(dict.fromkeys("x".join(map(str, s)) for s in feed_shapes.values()))


def cache_file() -> Path:
    root = os.environ.get("FFNX_CACHE_DIR") or Path.home() / ".cache" / "ffnx"
    return Path(root) / "speed_guard.json"


def cache_key(model: onnx.ModelProto, passes: list[str], shapes, threads,
              variant: str | None = None) -> str:  # fmt: skip
    import platform

    import onnxruntime

    sig = {"model": digest(model), "passes": passes,
           "shapes": shapes, "threads": threads, "ort": onnxruntime.__version__,
           "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "rule": RULE}  # fmt: skip
    if variant:  # the graphs are timed after `prepare` (e.g. int4 linears): another decision
        sig["variant"] = variant
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
    prepare: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
    variant: str | None = None,
) -> tuple[onnx.ModelProto, list[dict], dict]:
    """-> (model, pass reports, guard report). `rerun(names)` runs exactly those passes on
    `original`; `feed_sets`: the example feeds and a larger shape set, each timed separately.
    `prepare`: what every graph goes through before it is timed, the input included (`--quantize`:
    its linears to MatMulNBits, so the passes are judged on the graph that will run), named by
    `variant` in the cache key and the report. The guard report: dropped passes, speedup (input
    time / kept graph's time, per shape set), shapes, threads, margin, cached."""
    timer = timer or ort_timer(threads)
    applied = [r["name"] for r in reports if r.get("status") == "applied"]
    shapes = [[{k: list(v.shape) for k, v in f.items()} for f in fs[:1]] for fs in feed_sets]
    labels = [_label(s[0]) for s in shapes]
    key = cache_key(original, applied, shapes, threads, variant) if use_cache else None
    cache = _read_cache() if key else {}
    hit = cache.get(key) if key else None
    base = {"shapes": labels, "threads": threads, "margin": MARGIN, "min_wins": MIN_WINS,
            **({"timed_as": variant} if variant else {})}  # fmt: skip
    # (model, prepared) of the last call's graphs: the input and the current graph are timed in
    # every call, prepared once; `is` finds them (a pair keeps its model referenced)
    kept: list[tuple[onnx.ModelProto, onnx.ModelProto]] = []

    def timed(models: dict[str, onnx.ModelProto]) -> list[dict]:
        pairs = []
        for m in (original, *models.values()):
            hit = next((p for k, p in kept if k is m), None)
            pairs.append((m, hit if hit is not None else prepare(m) if prepare else m))
        kept[:] = pairs
        done = dict(zip(("input", *models), (p for _, p in pairs)))
        return [timer(done, fs) for fs in feed_sets]

    def speed(per: list[dict], name: str) -> dict[str, float]:
        return {lbl: round(1 / paired_ratio(p, name, "input"), 4) for lbl, p in zip(labels, per)}

    model, out = optimized, reports
    if hit is None and not [p for p in applied if p not in REQUIRED]:
        hit, cached = {"dropped": [], "speedup": None, "trials": []}, False  # nothing timed
    elif hit is None:
        dropped, keep, trials = [], list(applied), []
        per = timed({"current": model})
        now = speed(per, "current")
        for name in [p for p in applied if p not in REQUIRED]:
            trial = [p for p in keep if p != name]
            cand, cand_reports = rerun(trial)
            per = timed({"current": model, "candidate": cand})
            verdict = faster(per, "candidate", "current")
            trials.append({"without": name, **verdict})
            if verdict["faster"]:
                dropped.append(name)
                keep, model, out = trial, cand, cand_reports
            now = speed(per, "candidate" if verdict["faster"] else "current")
        droppable = [p for p in keep if p not in REQUIRED]
        back = faster(per, "input", "candidate" if trials and trials[-1]["faster"] else "current")
        if droppable and back["faster"]:
            # Still slower than the graph it started from: keep only the required passes.
            trial = [p for p in keep if p in REQUIRED]
            trials.append({"without": "+".join(droppable), **back})
            model, out = rerun(trial)
            dropped += droppable
            now = speed(timed({"current": model}), "current") if trial else {k: 1.0 for k in labels}
        hit = {"dropped": dropped, "speedup": now, "trials": trials}
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
    return model, out, {**base, "dropped": list(hit["dropped"]), "speedup": hit["speedup"],
                        "trials": hit.get("trials", []), "cached": cached}  # fmt: skip


def decode_step_sets(make: Callable[[dict], list[dict]], max_total: int | None) -> list:
    """The guard's shape sets for a KV-cache decoder: `make(dims)` feeds for each of
    DECODE_STEPS (past shortened to fit `max_total` positions)."""
    sets = []
    for d in DECODE_STEPS:
        past = min(d["past"], (max_total or d["past"] + 1) - d["seq"])
        sets.append(make({**d, "past": past, "total": past + d["seq"]}))
    return sets


def optimize_guarded(model, feeds, larger_feeds=None, threads=None, timer=None,
                     use_cache=True, timing_sets=None, prepare=None, variant=None,
                     **kwargs):  # fmt: skip
    """`optimize_model` (default passes), then `guard`: -> (model, reports, guard report).
    Explicit `passes=` bypasses the guard (the caller asked for exactly those). The guard times
    on `feeds` and `larger_feeds`, or on `timing_sets` when given (a decoder's decode steps:
    `decode_step_sets`); sets the input graph cannot run are left out.

    `model`: a ModelProto or a path. Past model_io.LIMIT (a path with external data beside it)
    there is no guard: it would hold the model three times; a path is then left to the passes
    to load, so that they hold it twice at most."""
    from ffnx.passes.optimize import optimize_model

    skipped = lambda why: {"dropped": [], "speedup": None, "skipped": why}  # noqa: E731
    if isinstance(model, str | Path):
        if data_path(model).exists():
            return *optimize_model(model, feeds, **kwargs), skipped(BIG)
        model = onnx.load(str(model))
    new, reports = optimize_model(model, feeds, **kwargs)
    if kwargs.get("passes"):
        return new, reports, skipped("explicit --passes")
    if is_big(model):
        return new, reports, skipped(BIG)
    rest = {k: v for k, v in kwargs.items() if k not in ("passes", "step")}
    step = kwargs.get("step") or (lambda s: None)
    step("speed guard: timing the optimized graph against its input on ONNX Runtime")

    def rerun(names):
        return optimize_model(model, feeds, passes=names, **rest) if names else (model, [])

    if timing_sets:
        sets = [fs for fs in timing_sets if _runs(model, fs)] or [feeds]
    else:
        if larger_feeds and not _runs(model, larger_feeds):
            larger_feeds = None  # e.g. past a position table the graph does not declare
        sets = [feeds] + ([larger_feeds] if larger_feeds else [])
    return guard(model, new, reports, rerun, sets, threads, timer, use_cache, prepare, variant)


def _runs(model: onnx.ModelProto, feeds: list[dict]) -> bool:
    """Whether ORT runs `model` on `feeds` (the larger shape set is only a guess)."""
    from ffnx.lowering import run_model

    try:
        run_model(model, feeds[:1])
        return True
    except Exception:  # noqa: BLE001 - any ORT failure means: do not time this shape
        return False


def summary(report: dict) -> str:
    """One line for the CLI: what was dropped and the measured ratio."""
    if report.get("skipped"):
        return f"speed guard: skipped ({report['skipped']})"
    sp = report.get("speedup") or {}
    ratios = ", ".join(f"{k.split(':', 1)[-1]} {v:.2f}x" for k, v in sp.items())
    dropped = ", ".join(report.get("dropped") or []) or "nothing"
    cached = " (cached)" if report.get("cached") else ""
    return f"speed guard{cached}: dropped {dropped}; optimized / input graph speed: {ratios}"
