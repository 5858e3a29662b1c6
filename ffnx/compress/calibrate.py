"""Activation statistics of every FFN, per hidden channel, from running the graph on ORT.

For each FFN that `ffn_match.find_ffns` recognises (y = fc2(a) or, gated, y = fc2(a ⊙ up(x))
with a = act(fc1(x))), a copy of the model exposes a and the FFN input x as extra outputs; ORT
runs it on the calibration feeds and a uniform sample of at most `max_tokens` tokens is kept:

  quantiles [Q, H]  |a_c| at `levels` (0, 0.01, …, 1): the per-channel CDF. The CHESS threshold
                    of channel c for target sparsity s is its quantile at level s.
  mean_abs  [H]     mean |a_c|
  x         [N, D]  the sampled FFN inputs: moefy recomputes activations from them to build
                    co-activation statistics and fit routers.

`Calibration.save` writes one .npz (arrays plus a JSON `meta` string; no pickle) that the CLI
stores as `calibration.npz` beside the artifact.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.errors import PassError
from ffnx.graph.ffn_match import FFN, find_ffns
from ffnx.graph.ort import ort_session

LEVELS = np.round(np.linspace(0.0, 1.0, 101), 2)
FILE = "calibration.npz"


@dataclass
class LayerStats:
    """Statistics of one FFN; `tensor` (a) and `input` (x) name the graph tensors."""

    key: str
    tensor: str
    input: str
    activation: str
    gated: bool
    D: int
    H: int
    quantiles: np.ndarray  # [Q, H] of |a|
    mean_abs: np.ndarray  # [H]
    x: np.ndarray  # [N, D]

    def threshold(self, sparsity: float, levels: np.ndarray = LEVELS) -> np.ndarray:
        """Per-channel |a| threshold keeping a fraction 1 - sparsity of calibration tokens."""
        q = np.clip(sparsity, 0.0, 1.0) * (len(levels) - 1)
        lo = int(np.floor(q))
        hi = min(lo + 1, len(levels) - 1)
        t = self.quantiles[lo] + (q - lo) * (self.quantiles[hi] - self.quantiles[lo])
        return t.astype(np.float32)

    @property
    def near_zero(self) -> float:
        """Fraction of (token, channel) activations with |a| <= 1e-6 (natural sparsity)."""
        below = (self.quantiles <= 1e-6).sum(0) - 1  # levels at or below the zero crossing
        return float(np.clip(below, 0, None).mean() / (len(LEVELS) - 1))

    def meta(self) -> dict:
        return {
            "key": self.key,
            "tensor": self.tensor,
            "input": self.input,
            "activation": self.activation,
            "gated": self.gated,
            "D": self.D,
            "H": self.H,
            "near_zero": round(self.near_zero, 4),
        }


@dataclass
class Calibration:
    layers: list[LayerStats]
    tokens: int  # tokens the first FFN saw (before sampling)
    levels: np.ndarray = field(default_factory=lambda: LEVELS.copy())

    def layer(self, tensor: str, H: int) -> LayerStats | None:
        return next((s for s in self.layers if s.tensor == tensor and s.H == H), None)

    def meta(self) -> dict:
        sampled = int(self.layers[0].x.shape[0]) if self.layers else 0
        return {
            "tokens": self.tokens,
            "sampled_tokens": sampled,
            "layers": [s.meta() for s in self.layers],
        }

    def to_bytes(self) -> bytes:
        arrays = {"levels": self.levels, "meta": np.array(json.dumps(self.meta()))}
        for s in self.layers:
            arrays.update(
                {
                    f"{s.key}.quantiles": s.quantiles,
                    f"{s.key}.mean_abs": s.mean_abs,
                    f"{s.key}.x": s.x,
                }
            )
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        try:
            data = np.load(path, allow_pickle=False)
            meta = json.loads(str(data["meta"]))
            layers = [
                LayerStats(
                    key=m["key"],
                    tensor=m["tensor"],
                    input=m["input"],
                    activation=m["activation"],
                    gated=bool(m["gated"]),
                    D=int(m["D"]),
                    H=int(m["H"]),
                    quantiles=data[f"{m['key']}.quantiles"],
                    mean_abs=data[f"{m['key']}.mean_abs"],
                    x=data[f"{m['key']}.x"],
                )
                for m in meta["layers"]
            ]
            return cls(layers, int(meta["tokens"]), data["levels"])
        except (OSError, KeyError, ValueError) as e:
            raise PassError(f"cannot read calibration {path}: {e} (re-run `ffnx calibrate`)") from e


def ffn_sites(graph: gs.Graph) -> list[FFN]:
    """The FFNs calibration and the sparsity passes work on (ffn_match's, with an activation)."""
    return [f for f in find_ffns(graph) if f.act is not None]


def calibrate_model(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    max_tokens: int = 4096,
    seed: int = 0,
) -> Calibration:
    """Statistics of every FFN of `model` on `feeds` (see the module docstring)."""
    if not feeds:
        raise PassError("calibration needs at least one input sample")
    sites = ffn_sites(gs.import_onnx(model))
    if not sites:
        raise PassError("no FFN (Linear -> activation -> Linear) found in the graph to calibrate")
    names = [(f.act.y.name, f.x.name) for f in sites]
    runs = run_with_outputs(model, feeds, [n for pair in names for n in pair])
    rng = np.random.default_rng(seed)
    per_feed = max(1, -(-max_tokens // len(feeds)))
    layers, tokens = [], 0
    for i, (f, (a_name, x_name)) in enumerate(zip(sites, names)):
        H, D = f.hidden, f.fc1.weight.shape[0]
        a_rows, x_rows = [], []
        for out in runs:  # a and x share rows (tokens); layers may see different token counts
            a, x = out[a_name].reshape(-1, H), out[x_name].reshape(-1, D)
            pick = np.sort(rng.choice(len(a), size=min(len(a), per_feed), replace=False))
            a_rows.append(a[pick])
            x_rows.append(x[pick])
            tokens += len(a) if i == 0 else 0
        mag = np.abs(np.concatenate(a_rows).astype(np.float32))
        layers.append(
            LayerStats(
                key=f"l{i}",
                tensor=a_name,
                input=x_name,
                activation=f.kind,
                gated=f.gated,
                D=D,
                H=H,
                quantiles=np.quantile(mag, LEVELS, axis=0).astype(np.float32),
                mean_abs=mag.mean(0),
                x=np.concatenate(x_rows).astype(np.float32),
            )
        )
    return Calibration(layers, tokens)


def run_with_outputs(
    model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], names: list[str]
) -> list[dict[str, np.ndarray]]:
    """ORT outputs `names` (any intermediate tensors) of `model` for each feed."""
    from ffnx.lowering import runnable

    m = onnx.ModelProto()
    m.CopyFrom(runnable(_lowered(model)))
    have = {o.name for o in m.graph.output}
    # No type on the extra outputs: ORT takes each from its producer (fp16 graphs too).
    m.graph.output.extend(
        onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have
    )
    sess = ort_session(m)
    wanted = {i.name for i in sess.get_inputs()}
    return [
        dict(zip(names, sess.run(names, {k: v for k, v in f.items() if k in wanted})))
        for f in feeds
    ]


def _lowered(model: onnx.ModelProto) -> onnx.ModelProto:
    from ffnx.lowering.sparse import lower_sparse_ffn_nodes

    return lower_sparse_ffn_nodes(model)
