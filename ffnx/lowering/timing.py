"""Timing of lowering candidates on this machine (the chooser and `benchmarks/moe.py`).

Candidates are timed round-robin (one batch of runs of each per round), so a machine whose load
changes during the measurement slows every candidate alike; the fastest round counts.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.graph.export import export_model
from ffnx.graph.opsets import set_opsets
from ffnx.graph.ort import ort_session  # sessions that stop spinning after a run
from ffnx.lowering.moe_model import MoEConfig, moe_feeds, moe_model, moe_weights


def lowered_model(model: onnx.ModelProto, choice: str, why: str = "") -> onnx.ModelProto:
    """`model` with every FfnxMoE node lowered to `choice` (opset imports fixed up)."""
    from ffnx.graph.lowering_meta import finish
    from ffnx.lowering import lower_moe_node

    graph = gs.import_onnx(model)
    for node in [n for n in graph.nodes if n.op == "FfnxMoE"]:
        lower_moe_node(graph, node, choice, why)
    graph.cleanup().toposort()
    out = finish(export_model(graph), model, graph)  # metadata kept, `why` recorded
    return set_opsets(out, model.opset_import)


TURNS = 4  # random token batches each timed lowering cycles through


def _turns(items: list, fn: Callable) -> Callable[[], object]:
    """A callable that calls fn(items[0]), fn(items[1]), ... in turn, round and round."""
    it = itertools.cycle(items)
    return lambda: fn(next(it))


def round_robin(
    runs: dict[str, Callable[[], object]],
    rounds: int = 7,
    max_rounds: int = 0,
    min_round_s: float = 0.03,
    pause_s: float = 0.002,
) -> dict[str, list[float]]:
    """Seconds per call of each callable, one sample per round. Each round runs every callable in
    turn: a pause (`pause_s`: the previous one's thread pool goes idle), one untimed call (warms
    the caches), then as many timed calls
    as fill `min_round_s` (calibrated on the warm-up call); the sample is their median (a call
    preempted by another process does not move it). After `rounds` rounds, rounds go on until
    the samples are `stable` or `max_rounds` is reached."""
    reps = {}
    for name, fn in runs.items():
        fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, int(min_round_s / max(time.perf_counter() - t0, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    done = 0
    while done < rounds or (done < max_rounds and not stable(samples)):
        for name, fn in runs.items():
            time.sleep(pause_s)
            fn()
            calls = []
            for _ in range(reps[name]):
                t0 = time.perf_counter()
                fn()
                calls.append(time.perf_counter() - t0)
            samples[name].append(float(np.median(calls)))
        done += 1
    return samples


def best(samples: dict[str, list[float]]) -> dict[str, float]:
    """The fastest round of each: load from other processes only ever adds time, so on a shared
    machine the minimum estimates the quiet-machine latency better than the median."""
    return {name: float(min(v)) for name, v in samples.items()}


def stable(samples: dict[str, list[float]], tol: float = 0.03) -> bool:
    """Whether every minimum is reproducible: the fastest rounds of the first and the second half
    of the rounds agree within `tol` (on a busy machine they do not)."""
    for v in samples.values():
        h = len(v) // 2
        if h == 0 or abs(min(v[:h]) - min(v[h:])) > tol * min(v):
            return False
    return True


def time_lowerings(
    cfg: MoEConfig,
    choices: list[str],
    tokens: list[int],
    threads: int | None = None,
    rounds: int = 7,
    max_rounds: int = 21,
    seed: int = 0,
    skip: Callable[[int, str], bool] | None = None,
) -> dict[int, dict[str, list[float]]]:
    """Per T, the `round_robin` samples (seconds per call) of each lowering of a random
    single-node MoE with `cfg`'s shapes (`skip(T, choice)`: leave that one out at that T)."""
    model = moe_model(cfg, moe_weights(cfg, seed))
    sessions = {c: ort_session(lowered_model(model, c), threads) for c in choices}
    out = {}
    for T in tokens:
        # Successive calls take turns over TURNS random batches: at small T they route to
        # different experts, so a call does not find its experts' weights still in the cache
        # (one fixed batch let the same 2 experts of a 277 MB layer sit partly in L3 and chose
        # `ort_moe` at T=1, which ran 1.28x slower than `sorted` with varying tokens).
        batches = [moe_feeds(cfg, T, seed=T * 1000 + i) for i in range(TURNS)]
        runs = {
            c: _turns(batches, lambda f, s=s: s.run(None, f))
            for c, s in sessions.items()
            if not (skip and skip(T, c))
        }
        out[T] = round_robin(runs, rounds=rounds, max_rounds=max_rounds)
    return out
