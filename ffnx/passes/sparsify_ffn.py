"""sparsify_ffn: activation sparsity — each FFN becomes one ffnx::FfnxSparseFFN node.

APPROXIMATE, opt-in. Pattern (`ffn_match`): y = fc2(a) + b_down with a = act(fc1(x) + b_up),
act relu/gelu/silu, or gated y = fc2(a ⊙ up(x)) with a = act(gate(x)), swiglu/geglu/reglu.
The node computes, per token, a mask m over the H hidden channels and only kept channels
contribute (schema `SPARSE_FFN`):

  threshold (CHESS, Wang et al. 2024): m_c = |a_c| > t_c with t_c the calibration quantile of
      |a_c| at the target sparsity s: each channel is dropped for a fraction s of tokens.
  topk (Lazy Neuron, Li et al. 2023): the k = round((1 - s) H) largest |a_c| of the token.

Gated FFNs keep the gate projection dense (the mask is computed from it); up and down read only
kept channels. Non-gated FFNs need the full up projection for the same reason: only down is
read sparsely, so their speed-up is bounded by 2 (see docs/sparsity.md).

Check: an activation the schema has (not tanh-GELU, not the bilinear GLU), gated FFNs without
gate/up biases (the schema's gated form has none), intermediates used only inside the FFN.

Accuracy: the error of the final outputs against the graph before the pass, on the calibration
feeds (ctx.feeds; thresholds are fitted on the same feeds), goes to `notes`. Options:
  sparsity         target s; without it, the largest s on GRID whose max abs error stays under
                   MARGIN * max_error (binary search: error grows with s)
  sparse_mode      "threshold" (default) | "topk"
  sparse_lowering  "auto" (default: the fastest form measured here per FFN shape), a form of
                   `sparse_lowering.FORMS`, or "node" (keep FfnxSparseFFN; default for trt)
  calibration      a `Calibration` (or its .npz path) recorded on this graph; else one is
                   recorded from ctx.feeds
The driver refuses the pass above --max-error.
"""

from __future__ import annotations

import time

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.compress.calibrate import Calibration, LayerStats, calibrate_model, ffn_sites
from ffnx.errors import PassError
from ffnx.graph import lowering_meta, verify
from ffnx.graph.ffn_match import FFN
from ffnx.graph.ort import ort_session
from ffnx.lowering.sparse import (
    FORMS,
    act_numpy,
    lower_sparse_ffn,
    lower_sparse_ffn_nodes,
    sparse_ffn_model,
    sparse_ffn_node,
)
from ffnx.passes.base import GraphPass, Match, PassContext, PassResult
from ffnx.passes.measure import run, to_model
from ffnx.plugins.schema import GATED_ACTIVATION, SPARSE_FFN

GRID = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
MARGIN = 0.95  # headroom for the rounding of the exact passes the driver also counts


class SparsifyFFN(GraphPass):
    """Activation-sparse FFNs (CHESS thresholds or top-k) as FfnxSparseFFN; approximate."""

    name = "sparsify_ffn"
    exact = False
    default = False

    def match(self, graph: gs.Graph) -> list[Match]:
        return [Match(f.nodes, {"ffn": f}) for f in ffn_sites(graph)]

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        f: FFN = m.info["ffn"]
        if f.kind not in ("relu", "gelu", "silu"):
            return f"activation {f.kind} has no FfnxSparseFFN form (relu, gelu, silu, gated)"
        if f.gated and (f.fc1.bias is not None or f.up.bias is not None):
            return "gated FFN with a gate/up bias: FfnxSparseFFN's gated form has none"
        if f.fc2.weight.shape != (f.hidden, f.fc1.weight.shape[0]):
            return f"down projection {f.fc2.weight.shape} does not map H={f.hidden} back to D"
        return f.check_internal(graph)

    def prepare(self, graph: gs.Graph, ctx: PassContext, matches: list[Match]) -> str | dict:
        """Calibrate the sites that pass `check` and choose the one sparsity level of all of
        them (options["sparsity"], or the largest within --max-error, measured on the final
        outputs); each site's statistics go to its `m.info`."""
        todo = [m for m in matches if self.check(graph, m) is None]
        if not todo:
            return {}
        mode = ctx.options.get("sparse_mode", "threshold")
        if mode not in ("threshold", "topk"):
            raise PassError(f"sparse_mode {mode!r}: expected 'threshold' or 'topk'")
        sites = [m.info["ffn"] for m in todo]
        stats = _stats(graph, sites, ctx)
        before = run(to_model(graph), ctx.feeds)
        errors: dict[float, float] = {}

        def error(s: float) -> float:
            if s not in errors:
                g = graph.copy()
                for f, st in zip(_same_sites(g, sites), stats):
                    _rewrite(g, f, st, s, mode)
                errors[s] = _max_abs(before, run(lower_sparse_ffn_nodes(to_model(g)), ctx.feeds))
            return errors[s]

        level = _level(ctx.options, ctx, error)
        for m, st in zip(todo, stats):
            m.info.update(stats=st, level=level, mode=mode)
        return {"mode": mode, "sparsity": level, "max_abs_error": error(level), "errors": errors}

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        i = m.info
        i["node"] = _rewrite(graph, i["ffn"], i["stats"], i["level"], i["mode"])

    def finish(self, graph, ctx: PassContext, res: PassResult, matches, state) -> None:
        done = [m.info for m in matches if "node" in m.info]
        if not done:
            return
        graph.cleanup()
        res.notes = {
            "mode": state["mode"],
            "sparsity": state["sparsity"],
            "max_abs_error": state["max_abs_error"],
            "errors_by_sparsity": {str(k): v for k, v in sorted(state["errors"].items())},
            "layers": [_layer_note(i["ffn"], i["stats"], i["level"], i["mode"]) for i in done],
        }
        form = ctx.options.get("sparse_lowering", "node" if ctx.target == "trt" else "auto")
        if form != "node":
            nodes, stats = [i["node"] for i in done], [i["stats"] for i in done]
            res.notes["lowering"] = _lower(graph, nodes, stats, form)


def _stats(graph: gs.Graph, sites: list[FFN], ctx: PassContext) -> list[LayerStats]:
    """Calibration of each site: from options["calibration"] when it covers them, else new."""
    calib = ctx.options.get("calibration")
    if isinstance(calib, str):
        calib = Calibration.load(calib)
    if calib is not None:
        found = [calib.layer(f.act.y.name, f.hidden) for f in sites]
        if all(found):
            return found
    if not ctx.feeds:
        raise PassError("sparsify_ffn needs calibration inputs (--calib)")
    calib = calibrate_model(to_model(graph), ctx.feeds)
    return [calib.layer(f.act.y.name, f.hidden) for f in sites]


def _level(opts: dict, ctx: PassContext, error) -> float:
    """The sparsity to apply: options["sparsity"], else the largest GRID level within budget."""
    if opts.get("sparsity") is not None:
        s = float(opts["sparsity"])
        if not 0.0 <= s < 1.0:
            raise PassError(f"sparsity {s} must be in [0, 1)")
        return s
    if ctx.max_error is None:
        raise PassError("sparsify_ffn needs a target sparsity or --max-error")
    budget = MARGIN * ctx.max_error
    grid = sorted(GRID)
    lo, hi = -1, len(grid)  # grid[lo] passes (or none), grid[hi] fails (or none)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if error(grid[mid]) <= budget else (lo, mid)
    if lo < 0:
        raise PassError(
            f"sparsify_ffn refused: even {grid[0]:.0%} sparsity gives max abs error "
            f"{error(grid[0]):.3g} > --max-error {ctx.max_error}"
        )
    return grid[lo]


def _same_sites(g: gs.Graph, sites: list[FFN]) -> list[FFN]:
    """The sites of a graph copy (matched by output tensor name)."""
    by_y = {f.y.name: f for f in ffn_sites(g)}
    return [by_y[f.y.name] for f in sites]


def _rewrite(graph: gs.Graph, f: FFN, st: LayerStats, s: float, mode: str) -> gs.Node:
    """Replace FFN `f` by one FfnxSparseFFN node producing f.y."""
    w = weights(f)
    attrs = {"mode": mode, "activation": GATED_ACTIVATION[f.kind] if f.gated else f.kind}
    if mode == "threshold":
        w["thresholds"] = st.threshold(s)
    else:
        attrs["k"] = max(1, int(round((1.0 - s) * f.hidden)))
    x, y = f.x, f.y
    for n in f.nodes:
        n.outputs.clear()
    node = sparse_ffn_node(x, y, w, _unique(graph, f"{f.fc2.nodes[0].name}/sparse_ffn"), **attrs)
    graph.nodes.append(node)
    return node


def weights(f: FFN) -> dict[str, np.ndarray]:
    """FfnxSparseFFN weights of a matched FFN ([out, in] layouts, as the schema has them)."""
    up = f.up if f.gated else f.fc1
    w = {"w_up": up.weight.T, "w_down": f.fc2.weight.T}
    if f.gated:
        w["w_gate"] = f.fc1.weight.T
    if up.bias is not None and not f.gated:
        w["b_up"] = up.bias
    if f.fc2.bias is not None:
        w["b_down"] = f.fc2.bias
    return {k: np.ascontiguousarray(v) for k, v in w.items()}


def _unique(graph: gs.Graph, name: str) -> str:
    names = {n.name for n in graph.nodes}
    out, i = name, 1
    while out in names:
        out, i = f"{name}_{i}", i + 1
    return out


def _max_abs(before: list[dict], after: list[dict]) -> float:
    """The worst max abs error of the outputs, by the one comparator (`ffnx.graph.verify`)."""
    reports = [{k: verify.output_metrics(r[k], a[k]) for k in r} for r, a in zip(before, after)]
    return verify.worst(reports)["max_abs"]


def kept_fraction(st: LayerStats, w: dict, activation: str, mode: str, s: float) -> float:
    """Fraction of (token, channel) pairs kept on the calibration sample."""
    gated = "w_gate" in w
    pre = st.x.astype(np.float64) @ (w["w_gate"] if gated else w["w_up"]).T.astype(np.float64)
    mag = np.abs(act_numpy(pre + (0.0 if gated else w.get("b_up", 0.0)), activation))
    if mode == "topk":
        return max(1, int(round((1.0 - s) * st.H))) / st.H
    return float((mag > st.threshold(s)).mean())


def _layer_note(f: FFN, st: LayerStats, s: float, mode: str) -> dict:
    act = GATED_ACTIVATION[f.kind] if f.gated else f.kind
    kept = kept_fraction(st, weights(f), act, mode, s)
    return {"ffn": f.y.name, "activation": act, "H": f.hidden, "kept": round(kept, 4)}


def _lower(graph: gs.Graph, nodes: list[gs.Node], stats: list[LayerStats], form: str) -> list:
    """Lower every node to `form`, or ("auto") to the form measured fastest for its shape."""
    if form != "auto" and form not in FORMS:
        raise PassError(f"sparse_lowering {form!r}: expected auto, node or one of {FORMS}")
    chosen: dict[tuple, tuple[str, dict]] = {}
    notes = []
    for node, st in zip(nodes, stats):
        key = (st.D, st.H, node.attrs["activation"], node.attrs["mode"])
        if form == "auto" and key not in chosen:
            chosen[key] = fastest_form(node, st.x)
        pick, timing = chosen[key] if form == "auto" else (form, {})
        lower_sparse_ffn(graph, node, pick)
        why = "measured: " + ", ".join(f"{k} {v:.0f} us" for k, v in timing.items())
        lowering_meta.record(graph, "sparsify_ffn", node.name, pick, why if timing else "forced")
        notes.append({"node": node.name, "form": pick, **({"us": timing} if timing else {})})
    graph.cleanup()
    return notes


def fastest_form(node: gs.Node, x: np.ndarray, rounds: int = 7) -> tuple[str, dict]:
    """(form, {form: median us}) for one FfnxSparseFFN at batch 1, forms timed round-robin on
    the node's own weights and calibration tokens."""

    ports = [p.name for p in SPARSE_FFN.inputs]
    w = {n: np.asarray(t.values) for n, t in zip(ports, node.inputs) if isinstance(t, gs.Constant)}
    model = sparse_ffn_model(w, **node.attrs)
    sessions = {f: ort_session(lower_sparse_ffn_nodes(model, f)) for f in FORMS}
    tokens = x[: max(1, min(len(x), 16))].astype(np.float32)
    times: dict[str, list[float]] = {f: [] for f in FORMS}
    for r in range(rounds):
        feed = {"hidden": tokens[r % len(tokens)][None]}
        for f, sess in sessions.items():
            t0 = time.perf_counter()
            for _ in range(3):
                sess.run(None, feed)
            times[f].append((time.perf_counter() - t0) / 3 * 1e6)
    med = {f: float(np.median(v[1:] if len(v) > 1 else v)) for f, v in times.items()}
    return min(med, key=med.get), med


PASS = SparsifyFFN()
