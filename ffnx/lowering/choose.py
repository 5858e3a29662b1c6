"""Which lowering each FfnxMoE layer gets on ONNX Runtime: measured on this machine, cached.

Design. The fastest lowering depends on the expert shapes, the token count T, the ORT build and
the CPU (benchmarks/moe.py: e.g. `dense` wins small layers at large T, `sorted`/`ort_moe` win
large layers), so no fixed rule holds everywhere. For each (shape signature, ORT version, CPU,
threads) the applicable candidates are timed once at T in POINTS on a random-weight copy of the
layer, round-robin, fastest round (other processes' load only adds time). A result is
reproducible when the decision it gives stays within 2 * MARGIN of the fastest by the first and
by the second half of the rounds alone; only such results are cached (JSON in $FFNX_CACHE_DIR
or ~/.cache/ffnx): on a machine too busy for that, RULE is used and measured again next time.
A candidate within MARGIN of the fastest at a point counts as a winner there; the fewest
segments of consecutive points that one candidate wins give the choice: one candidate, or an
`If` on T between the segments' candidates ("a|16|b": a for T <= 16, else b), timed against
the best single candidate and kept where it pays (`if_pays`). Options (the
pass's `ctx.options`):
  moe_lowering       force a lowering (a name, or {node name: name})
  quantize_experts   "int4" | "int8": choose among the quantized candidates only
  tokens             the token counts the model will run at (measure only those)
  moe_measure        False: no measurement, use RULE
  moe_branch         False: no `If`; one candidate, best geometric mean over the points
  decode             True (the lower_moe pass sets it for a KV-cache decoder): no `If`; the
                     candidates within MARGIN of the fastest at the smallest T (a decode step)
                     and, among them, the best geometric mean over all points (`decide_decode`)
  threads            intra-op threads to time with (default: ORT's, all cores)
The environment variable FFNX_MOE_LOWERING (a lowering name, or "rule") overrides them all:
for CI, where timing is slow and noisy and any exact lowering will do.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffnx.lowering.moe_common import MoESite
from ffnx.lowering.moe_model import MoEConfig
from ffnx.lowering.moe_ort import ort_moe_misfit, qmoe_misfit, quant_misfit

POINTS = (1, 4, 16, 64, 128, 256)
MARGIN = 0.05
RULE = "sorted"  # without measurement: exact routed FLOPs and bytes, fine at every T measured
GATHER_MAX_BYTES = 256 << 20  # `gather` copies T*k experts' weights per call: skip it beyond this
# An If costs a subgraph launch, a fixed ~7-13 us per call on ORT CPU here (gpt-moe tiny's
# layer: 20 % of it at T=1, 16 % at T=16). A whole model hardly notices (that model ran 3 %
# slower at T=16 and 13 % faster at T=128 with the If than without). See `if_pays`.
IF_COST_S = 20e-6
TIMING_METHOD = 3  # bump when the timing changes: cached choices made the old way are stale
_MEASURED: dict[str, tuple[dict, bool]] = {}  # this process's measurements, stable or not


@dataclass
class Choice:
    lowering: str
    why: str
    timings: dict | None = None  # {T: {candidate: seconds}}
    skipped: dict | None = None  # {candidate: reason}


def config_of(s: MoESite) -> MoEConfig:
    """The layer's shape signature as a MoEConfig (random weights of it time like the layer)."""
    a, ins = s.attrs, s.inputs
    shared = ins["shared_fc2_weight"].shape[1] if ins["shared_fc2_weight"] is not None else 0
    vocab = ins["hash_table"].shape[0] if ins["hash_table"] is not None else 64
    return MoEConfig(
        D=s.D,
        H=s.H,
        E=s.E,
        k=s.k,
        activation=s.activation,
        scoring=str(a["scoring"]),
        normalize=int(a["normalize"]),
        routed_scaling_factor=float(a["routed_scaling_factor"]),
        bias=ins["fc1_bias"] is not None or ins["fc2_bias"] is not None,
        score_bias=ins["score_bias"] is not None,
        hash=a["routing_mode"] == "hash",
        vocab=int(vocab),
        shared=int(shared),
        shared_gate=ins["shared_gate_weight"] is not None,
        n_group=int(a["n_group"]),
        topk_group=int(a["topk_group"]),
        group_scoring=str(a["group_scoring"]),
    )


def applicable(s: MoESite, quantize: str | None = None) -> tuple[list[str], dict[str, str]]:
    """-> (candidates that can lower this layer, {candidate: why not} for the others)."""
    skipped = {}
    if quantize:
        misfit = quant_misfit(s)
        if misfit:
            return [], {f"*_{quantize}": misfit}
        names = [f"sorted_{quantize}"]
        fused = qmoe_misfit(s)
        if fused:
            skipped[f"qmoe_{quantize}"] = fused
        else:
            names.append(f"qmoe_{quantize}")
        return names, skipped
    names = ["sorted", "per_expert", "gather", "dense"]
    misfit = ort_moe_misfit(s)
    if misfit:
        skipped["ort_moe"] = misfit
    else:
        names.append("ort_moe")
    return names, skipped


def segments(timings: dict[int, dict[str, float]], margin: float = MARGIN) -> list[tuple[str, int]]:
    """Fewest (candidate, last T) segments covering the points in order, each candidate within
    `margin` of the fastest at every point of its segment (greedy interval cover: optimal);
    among candidates covering as far, the one closest to the fastest over those points
    (geometric mean of the ratios)."""
    points = sorted(timings)
    ok = [
        {c for c, t in timings[p].items() if t <= (1 + margin) * min(timings[p].values())}
        for p in points
    ]

    def reach(c: str, i: int) -> int:
        while i < len(points) and c in ok[i]:
            i += 1
        return i

    def spread(c: str, i: int, j: int) -> float:  # geometric mean of c's ratios to the fastest
        return float(
            np.mean([np.log(timings[p][c] / min(timings[p].values())) for p in points[i:j]])
        )

    out, i = [], 0
    while i < len(points):
        best = min(ok[i], key=lambda c: (-reach(c, i), spread(c, i, reach(c, i))))  # noqa: B023
        j = reach(best, i)
        out.append((best, points[j - 1]))
        i = j
    return out


def near_best(
    segs: list[tuple[str, int]], timings: dict[int, dict[str, float]], tol: float
) -> bool:
    """Whether each point's segment candidate is within `tol` of the fastest there."""
    for T, d in timings.items():
        c = next((c for c, last in segs if T <= last), segs[-1][0])
        if d[c] > (1 + tol) * min(d.values()):
            return False
    return True


def timing_table(timings: dict[int, dict[str, float]]) -> str:
    """ "T=1: a 0.07ms, b 0.09ms; T=4: ..." (each point's candidates, fastest first)."""
    return "; ".join(
        f"T={T}: "
        + ", ".join(
            f"{c} {v * 1e3:.3g}ms" for c, v in sorted(timings[T].items(), key=lambda kv: kv[1])
        )
        for T in sorted(timings)
    )


def decide(timings: dict[int, dict[str, float]], branch: bool = True) -> tuple[str, str]:
    """-> (lowering, why) from measured timings."""
    segs = segments(timings)
    table = timing_table(timings)
    if len(segs) == 1:
        return segs[0][0], f"fastest (within {MARGIN:.0%}) at every T measured; {table}"
    if not branch:
        everywhere = set.intersection(*(set(v) for v in timings.values()))
        geo = {
            c: float(
                np.exp(np.mean([np.log(timings[T][c] / min(timings[T].values())) for T in timings]))
            )
            for c in everywhere
        }
        best = min(geo, key=geo.get)
        return best, f"best geometric mean ({geo[best]:.2f}x the fastest), no If; {table}"
    choice = "|".join(f"{c}|{T}" for c, T in segs[:-1]) + f"|{segs[-1][0]}"
    return choice, f"If on T: {choice}; {table}"


def decide_decode(timings: dict[int, dict[str, float]]) -> tuple[str, str]:
    """-> (lowering, why) for a KV-cache decoder: every generated token runs the layer at the
    smallest T (one token per row) and the prompt runs it once, so the choice is the fastest at
    that T (within MARGIN), ties broken by the geometric mean over all points. No `If`: its
    launch is paid at every step (measured on DeepSeek-V3's int4 bench decoder: 527 tok/s
    with `qmoe_int4|64|sorted_int4` against 606 with `qmoe_int4` alone), and its branches keep
    two copies of the expert weights."""
    T0 = min(timings)
    fast = min(timings[T0].values())
    near = [c for c, v in timings[T0].items() if v <= (1 + MARGIN) * fast]
    everywhere = [c for c in near if all(c in timings[T] for T in timings)]

    def geo(c: str) -> float:
        return float(np.exp(np.mean([np.log(d[c] / min(d.values())) for d in timings.values()])))

    best = min(everywhere or near, key=geo if everywhere else lambda c: timings[T0][c])
    return best, (f"decoder: fastest (within {MARGIN:.0%}) at T={T0}, no If; "
                  f"{timing_table(timings)}")  # fmt: skip


def branch_at(choice: str, T: int) -> str:
    """The form an If lowering "a|16|b|64|c" runs at T tokens (the choice itself if no If)."""
    parts = choice.split("|")
    for i in range(0, len(parts) - 1, 2):
        if T <= int(parts[i + 1]):
            return parts[i]
    return parts[-1]


def if_pays(pair: dict[int, dict[str, float]], lowering: str, single: str) -> bool:
    """Whether the If `lowering` may replace `single`: at every T it is within MARGIN of it or,
    where it runs `single` itself (the difference being the If's own launch), within MARGIN
    plus IF_COST_S. Where it runs another form, that form must hold up on its own."""
    for T, d in pair.items():
        allowed = (1 + MARGIN) * d[single]
        if branch_at(lowering, T) == single:
            allowed += IF_COST_S
        if d[lowering] > allowed:
            return False
    return True


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_file() -> Path:
    root = os.environ.get("FFNX_CACHE_DIR") or Path.home() / ".cache" / "ffnx"
    return Path(root) / "lower_moe.json"


def cache_key(cfg: MoEConfig, names: list[str], points: list[int], threads: int | None) -> str:
    import onnxruntime

    sig = {
        "method": TIMING_METHOD,
        "cfg": cfg.signature(),
        "candidates": names,
        "points": points,
        "threads": threads,
        "ort": onnxruntime.__version__,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
    }
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:20]


def measure(cfg: MoEConfig, names: list[str], points: list[int], threads: int | None):
    """-> ({T: {candidate: seconds}}, reproducible), from the cache or measured now.

    Reproducible: the decision from all rounds is within 2 * MARGIN of the fastest at every
    point by the first and by the second half of the rounds alone (close candidates may swap
    places between halves: either is fine); only reproducible measurements are cached.
    `gather` is timed only where its per-call weight copy stays small."""
    from ffnx import artifact
    from ffnx.lowering.timing import time_lowerings

    path, key = cache_file(), cache_key(cfg, names, points, threads)
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key in cache:
        return {int(T): v for T, v in cache[key]["timings"].items()}, True
    if key in _MEASURED:  # not cached (not reproducible), but once per process is enough
        return _MEASURED[key]
    expert_bytes = 4 * (cfg.H1 * cfg.D + cfg.D * cfg.H)
    samples = time_lowerings(
        cfg,
        names,
        points,
        threads,
        skip=lambda T, c: c == "gather" and T * cfg.k * expert_bytes > GATHER_MAX_BYTES,
    )
    halves = [
        {
            T: {c: min(v[: len(v) // 2] if first else v[len(v) // 2 :]) for c, v in d.items()}
            for T, d in samples.items()
        }
        for first in (True, False)
    ]
    out = {T: {c: min(v) for c, v in d.items()} for T, d in samples.items()}
    ok = all(near_best(segments(out), h, 2 * MARGIN) for h in halves)
    _MEASURED[key] = out, ok
    if ok:
        cache[key] = {"config": cfg.signature(), "threads": threads, "timings": out}
        path.parent.mkdir(parents=True, exist_ok=True)
        artifact.write_json_atomic(path, cache)
    return out, ok


def choose(s: MoESite, options: dict) -> Choice:
    env = os.environ.get("FFNX_MOE_LOWERING")
    if env:
        options = {
            **options,
            **({"moe_measure": False} if env == "rule" else {"moe_lowering": env}),
        }
    forced = options.get("moe_lowering")
    if isinstance(forced, dict):
        forced = forced.get(s.node.name)
    if forced:
        by = "FFNX_MOE_LOWERING" if env else "option moe_lowering"
        return Choice(forced, f"forced by {by}")
    names, skipped = applicable(s, options.get("quantize_experts"))
    if not names:
        raise ValueError(f"{s.node.name}: no lowering applies: {skipped}")
    if len(names) == 1:
        return Choice(names[0], "only applicable candidate", skipped=skipped)
    if options.get("moe_measure", True) is False:
        rule = RULE if RULE in names else names[0]
        return Choice(rule, "rule (measurement off): the sorted form", skipped=skipped)
    return _measured(s, names, skipped, options)


def _measured(s: MoESite, names: list[str], skipped: dict, options: dict) -> Choice:
    points = sorted(int(t) for t in np.atleast_1d(options.get("tokens", POINTS)))
    cfg, threads = config_of(s), options.get("threads")
    timings, ok = measure(cfg, names, points, threads)
    rule = RULE if RULE in names else names[0]
    if not ok:
        why = "rule: the machine was too busy for reproducible timings (measured again next time)"
        return Choice(rule, why, timings, skipped)
    if options.get("decode"):
        return Choice(*decide_decode(timings), timings, skipped)
    lowering, why = decide(timings, options.get("moe_branch", True))
    if "|" in lowering:  # the If costs a subgraph launch: keep it only where it pays
        single, _ = decide(timings, branch=False)
        pair, ok = measure(cfg, [lowering, single], points, threads)
        gain = [pair[T][single] / pair[T][lowering] for T in points]
        if not ok or not if_pays(pair, lowering, single) or max(gain) < 1 + MARGIN:
            why = f"{single}: the If ({lowering}) timed {min(gain):.2f}-{max(gain):.2f}x as fast"
            return Choice(single, f"{why}; {decide(timings, branch=False)[1]}", timings, skipped)
        extra = lowering.count("|") // 2 * s.E * s.weight_bytes() / 2**20
        why = (
            f"{why}; the If timed {min(gain):.2f}-{max(gain):.2f}x as fast as {single} and keeps"
            f" one expert-weight copy per branch (+{extra:.0f} MB)"
        )
    return Choice(lowering, why, timings, skipped)
