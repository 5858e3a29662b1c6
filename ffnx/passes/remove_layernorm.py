"""Replace every LayerNorm/RMSNorm by a fixed scale (LN-free GPT-2, Heimersheim 2024,
arXiv 2409.13710).

APPROXIMATE. A norm divides each token by its own scale σ(x) = √(var(x) + ε) (RMSNorm:
√(mean(x²) + ε)). Replacing σ(x) by its average over calibration tokens, s = E_tokens[σ(x)],
measured at that norm's input on the calibration feeds, gives

    LayerNorm:  y = (x − mean(x)) · (γ / s) + β        (the mean subtraction is kept: cheap)
    RMSNorm:    y = x · (γ / s) + β                     (a stream made zero-mean, e.g. by
                                                         `layernorm_to_rmsnorm`, is one)

which removes the per-token reduction and division. Exact only when every token's σ equals s;
the error of the final outputs against the graph before the pass on the calibration feeds is
reported in `notes` (max_abs, max_rel, cosine, the scales), and the driver refuses the pass
above --max-error. All norms are calibrated on the original graph in one run. Conditions:
constant γ, β; calibration feeds are given.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder
from ffnx.graph.norm_match import Norm, find_norms
from ffnx.passes.base import GraphPass, Match, PassContext, PassResult
from ffnx.passes.measure import output_error, to_model, try_run


def token_scales(norm: Norm, xs: list[np.ndarray]) -> float:
    """Mean over all calibration tokens of the norm's per-token divisor."""
    vals = []
    for x in xs:
        x = np.asarray(x, np.float64)
        c = x - x.mean(-1, keepdims=True) if norm.kind == "layernorm" else x
        vals.append(np.sqrt((c * c).mean(-1) + norm.eps).reshape(-1))
    return float(np.concatenate(vals).mean())


class RemoveLayerNorm(GraphPass):
    """Every LayerNorm/RMSNorm -> a fixed, calibrated scale (approximate)."""

    name = "remove_layernorm"
    exact = False
    default = False

    def match(self, graph: gs.Graph) -> list[Match]:
        return [Match(n.nodes[:1], {"norm": n}) for n in find_norms(graph)]

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        n: Norm = m.info["norm"]
        b, s = Builder(graph, self.name), m.info["scale"]
        dt = n.gamma.dtype if n.gamma is not None else np.float32
        width = n.gamma.size if n.gamma is not None else None
        gamma = n.gamma.astype(np.float64) if n.gamma is not None else np.ones(width or 1)
        x = n.x
        if n.kind == "layernorm":
            axes = b.const(np.array([-1], np.int64), "axes")
            mean = (
                b.op("ReduceMean", x, axes, keepdims=1)
                if graph.opset >= 18
                else b.op("ReduceMean", x, axes=[-1], keepdims=1)
            )
            x = b.op("Sub", x, mean)
        y = b.op("Mul", x, b.const((gamma / s).astype(dt), "gamma_over_s"))
        if n.beta is not None:
            y = b.op("Add", y, b.const(n.beta.astype(dt), "beta"))
        n.nodes[-1].outputs.clear()
        b.redirect(y, n.y)

    def prepare(self, graph: gs.Graph, ctx: PassContext, matches: list[Match]) -> str | dict:
        """Calibrate every norm on the graph before the pass (all are rewritten, then the
        error of the final outputs is measured in `finish`)."""
        if not matches:
            return {}
        if not ctx.feeds:
            return "no calibration feeds"
        names = list(dict.fromkeys(m.info["norm"].x.name for m in matches))
        outs, why = try_run(to_model(graph, names), ctx.feeds)
        if why:
            return why
        outs = [{**f, **o} for f, o in zip(ctx.feeds, outs)]
        final = {t.name for t in graph.outputs}
        before = [{k: v for k, v in o.items() if k in final} for o in outs]
        scales = {}
        for m in matches:
            n: Norm = m.info["norm"]
            m.info["scale"] = token_scales(n, [o[n.x.name] for o in outs])
            scales[n.y.name] = round(m.info["scale"], 6)
        return {"before": before, "scales": scales}

    def finish(self, graph, ctx: PassContext, res: PassResult, matches, state) -> None:
        if state:
            error = output_error(state["before"], graph, ctx.feeds)
            res.notes.update(error, scales=state["scales"])


PASS = RemoveLayerNorm()
