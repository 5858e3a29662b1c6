"""Which attention form a KV-cache decoder gets on ONNX Runtime: measured on this machine, cached.

Forms: `standard` (the exported ops, caches grown by Concat), `gqa` (GroupQueryAttention, past
and present separate tensors: the op copies the past into the present, as Concat did) and
`gqa_shared` (the same graph, past and present bound to one preallocated max-length buffer per
cache: a step writes only its new rows). The standard graph and the rewritten copy, with their
real weights, each run one decode step (batch 1, seq 1) at past lengths PASTS through an
IOBinding exactly as `ffnx.runtime.generate` drives them; the three are timed round-robin
(`ffnx.lowering.timing.round_robin`, fastest round) at the options' `threads`. The choice is
the fastest by the geometric mean over PASTS; GQA replaces the standard graph only when it is
faster by MARGIN. A result is cached (JSON in $FFNX_CACHE_DIR or ~/.cache/ffnx, keyed by the
graph's ops and weight shapes, threads, ORT version, CPU) only when the first and the second
half of the rounds give the same choice; otherwise RULE is used and measured again next time.

Options (the pass's ctx.options): `attention` forces a form (or "rule"), `attention_measure`
False uses RULE, `threads` the intra-op threads to time with (default: ORT's). The environment
variable FFNX_ATTENTION (a form or "rule") overrides them (CI: timing is slow and noisy).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.graph import model_io
from ffnx.graph.export import export_model

FORMS = ("standard", "gqa", "gqa_shared")
RULE = "gqa_shared"  # without measurement: one fused node per layer, no cache copy per step
PASTS = (64, 256)
MARGIN = 0.03
TIMING_METHOD = 2  # 2: the gqa forms fuse the rotary (gqa_rotary)
_MEASURED: dict[str, tuple[dict, bool]] = {}


@dataclass
class Choice:
    form: str
    why: str
    timings: dict = field(default_factory=dict)  # {past: {form: seconds}}

    def notes(self) -> dict:
        out = {"form": self.form, "why": self.why}
        if self.timings:
            out["timings_ms"] = {str(p): {f: round(v * 1e3, 4) for f, v in d.items()}
                                 for p, d in self.timings.items()}  # fmt: skip
            out["speedup_vs_standard"] = round(speedup(self.timings, self.form), 4)
        return out


def geomean_ratio(timings: dict, form: str, ref: str) -> float:
    return float(np.exp(np.mean([np.log(d[form] / d[ref]) for d in timings.values()])))


def speedup(timings: dict, form: str) -> float:
    """Standard time / `form` time, geometric mean over the past lengths."""
    return 1.0 / geomean_ratio(timings, form, "standard")


def decide(timings: dict) -> tuple[str, str]:
    forms = [f for f in FORMS if all(f in d for d in timings.values())]
    best = min(forms, key=lambda f: geomean_ratio(timings, f, "standard"))
    table = "; ".join(
        f"past={p}: " + ", ".join(f"{f} {v * 1e3:.3g}ms" for f, v in sorted(d.items(),
                                                                           key=lambda kv: kv[1]))
        for p, d in sorted(timings.items())
    )  # fmt: skip
    if best == "standard" or speedup(timings, best) < 1 + MARGIN:
        return "standard", f"standard ops: GQA not faster by {MARGIN:.0%}; {table}"
    return best, f"{best} {speedup(timings, best):.2f}x the standard ops; {table}"


def _model(graph: gs.Graph) -> onnx.ModelProto:
    g = graph.copy()
    g.cleanup().toposort()
    return export_model(g)


def cache_file() -> Path:
    root = os.environ.get("FFNX_CACHE_DIR") or Path.home() / ".cache" / "ffnx"
    return Path(root) / "attention.json"


def cache_key(model: onnx.ModelProto, threads) -> str:
    import onnxruntime

    from ffnx.lowering.choose import cpu_name

    h = hashlib.sha256()
    for n in model.graph.node:
        h.update(f"{n.op_type}/{n.domain};".encode())
    for t in model.graph.initializer:
        h.update(f"{t.data_type}{list(t.dims)};".encode())
    sig = {"method": TIMING_METHOD, "graph": h.hexdigest(), "pasts": PASTS, "threads": threads,
           "ort": onnxruntime.__version__, "cpu": cpu_name(), "cores": os.cpu_count()}  # fmt: skip
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:20]


def step_runner(session, past: int, geometry: dict[str, tuple[int, int]], shared: bool):
    """A callable running one batch-1 decode step at `past` through an IOBinding as the runtime
    does: pasts bound as OrtValues (shared: the same buffer as the present, max = past + 8)."""
    import onnxruntime as ort

    names = [i.name for i in session.get_inputs()]
    outs = [o.name for o in session.get_outputs()]
    by_name = {n: n.replace("past_key_values.", "present.") for n in geometry}
    if all(v in outs for v in by_name.values()):
        presents = by_name
    else:  # pasts and presents in the same order
        presents = dict(
            zip([n for n in names if n in geometry], [o for o in outs if o != "logits"])
        )
    length = past + 8 if shared else past
    bufs = {n: ort.OrtValue.ortvalue_from_numpy(
        np.random.default_rng(0).standard_normal((1, kv, length, d)).astype(np.float32))
        for n, (kv, d) in geometry.items()}  # fmt: skip
    feeds = {"input_ids": np.ones((1, 1), np.int64),
             "attention_mask": np.ones((1, past + 1), np.int64),
             "position_ids": np.full((1, 1), past, np.int64)}  # fmt: skip

    def run():
        io = session.io_binding()
        for k, v in feeds.items():
            io.bind_cpu_input(k, v)
        for n, buf in bufs.items():
            io.bind_ortvalue_input(n, buf)
            if shared:
                io.bind_ortvalue_output(presents[n], buf)
            else:
                io.bind_output(presents[n])
        io.bind_output("logits")
        session.run_with_iobinding(io)
        return io.get_outputs()[0]

    return run


def measure(standard: onnx.ModelProto, gqa: onnx.ModelProto, geometry: dict, threads,
            shared_ok: bool) -> tuple[dict, bool]:  # fmt: skip
    """-> ({past: {form: seconds}}, reproducible), from the cache or measured now."""
    from ffnx import artifact
    from ffnx.graph.ort import ort_session
    from ffnx.lowering import runnable
    from ffnx.lowering.timing import round_robin

    path, key = cache_file(), cache_key(standard, threads)
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return {int(p): v for p, v in cache[key]["timings"].items()}, True
    if key in _MEASURED:
        return _MEASURED[key]
    # timed as ORT runs them: ffnx ops left in the graph (a sparse FFN, an MoE for TensorRT
    # kept unlowered) become their reference decomposition
    s_std, s_gqa = ort_session(runnable(standard), threads), ort_session(runnable(gqa), threads)
    out, halves = {}, ({}, {})
    for past in PASTS:
        runs = {"standard": step_runner(s_std, past, geometry, False),
                "gqa": step_runner(s_gqa, past, geometry, False)}  # fmt: skip
        if shared_ok:
            runs["gqa_shared"] = step_runner(s_gqa, past, geometry, True)
        samples = round_robin(runs, rounds=6, max_rounds=12)
        out[past] = {f: min(v) for f, v in samples.items()}
        for i, h in enumerate(halves):
            h[past] = {f: min(v[: len(v) // 2] if i == 0 else v[len(v) // 2 :])
                       for f, v in samples.items()}  # fmt: skip
    ok = decide(halves[0])[0] == decide(halves[1])[0] == decide(out)[0]
    _MEASURED[key] = out, ok
    if ok:
        cache[key] = {"timings": out, "threads": threads}
        path.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_json_atomic(path, cache)
    return out, ok


def choose(graph: gs.Graph, options: dict, build) -> Choice:
    """The form for this graph; `build(graph)` rewrites a graph into the GQA form in place and
    returns ({past input: (kv_heads, head_dim)}, why the buffer cannot be shared or None)."""
    forced = os.environ.get("FFNX_ATTENTION") or options.get("attention")
    by = "FFNX_ATTENTION" if os.environ.get("FFNX_ATTENTION") else "option attention"
    if forced == "rule" or (not forced and options.get("attention_measure") is False):
        return Choice(RULE, "rule (measurement off): GroupQueryAttention, shared KV buffer")
    if forced:
        if forced not in FORMS:
            from ffnx.errors import PassError

            raise PassError(f"{by}={forced!r}: choose one of {', '.join(FORMS)} or rule")
        return Choice(forced, f"forced by {by}")
    if model_io.is_big_graph(graph):
        return Choice(RULE, "rule: the model is past 2 GiB; timing the forms would hold it in "
                      "memory three times")  # fmt: skip
    copy = graph.copy()
    geometry, shared_why = build(copy)
    inputs = {t.name for t in graph.inputs} - set(geometry)
    if inputs != {"input_ids", "attention_mask", "position_ids"}:
        return Choice(RULE, "rule: not the decoder interface `ffnx export hf:` writes, "
                      "so no decode step to time")  # fmt: skip
    timings, ok = measure(_model(graph), _model(copy), geometry, options.get("threads"),
                          shared_why is None)  # fmt: skip
    if not ok:
        return Choice(RULE, "rule: the machine was too busy for reproducible timings "
                      "(measured again next time)", timings)  # fmt: skip
    form, why = decide(timings)
    return Choice(form, why, timings)
