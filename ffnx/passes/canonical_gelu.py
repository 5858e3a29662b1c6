"""Write erf-GELU in the operand order ONNX Runtime fuses into one Gelu (or BiasGelu) kernel.

torch's exporter writes GELU(x) = x · Φ(x) as

    y = x · (0.5 · (1 + erf(x / √2)))          Div, Erf, Add, Mul(0.5, ·), Mul(x, ·)

and ONNX Runtime's GeluFusion (opset < 20, where there is no Gelu op) does not recognise that
order: the five element-wise kernels stay, each a pass over the FFN's widest activation. This
pass regroups the product as

    y = (x · 0.5) · (1 + erf(x / √2))          Div, Erf, Add, Mul(x, 0.5), Mul(·, ·)

which ORT fuses into Gelu, and with the preceding bias Add into BiasGelu (measured on ORT 1.32
CPU: 5 kernels → 1 per GELU FFN, 8–17 % faster tiny GELU models). Other consumers (the
ffn matchers, TensorRT's parser) read a product of factors and see the same GELU.

Exact: scaling by 0.5 commutes with rounding in binary floating point, so both orders give the
same bits (x · a · 0.5 = 0.5 · round(x · a)) unless the product is subnormal. (ORT's fused
Gelu kernel then evaluates erf its own way: fp32-close to the five kernels, not bit-equal.)
Matched only when every intermediate (x/√2, erf, 1 + erf, 0.5 · (1 + erf)) has that one
consumer.
"""

from __future__ import annotations

import math

import onnx_graphsurgeon as gs

from ffnx.graph.ffn_match import close, scalar
from ffnx.graph.tensors import other_input, producer, sole_consumer
from ffnx.passes.base import GraphPass, Match, PassContext


def _next(t: gs.Tensor, graph: gs.Graph, op: str) -> gs.Node | None:
    n = sole_consumer(t, graph)
    return n if n is not None and n.op == op else None


class CanonicalGelu(GraphPass):
    """x·(0.5·(1+erf(x/√2))) regrouped as (x·0.5)·(1+erf(x/√2)), which ORT fuses into Gelu."""

    name = "canonical_gelu"

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        for erf in [n for n in graph.nodes if n.op == "Erf"]:
            div = producer(erf.inputs[0], "Div")
            if div is None or not close(scalar(div.inputs[1]), math.sqrt(2)):
                continue
            if sole_consumer(div.outputs[0], graph) is not erf:
                continue
            x = div.inputs[0]
            add = _next(erf.outputs[0], graph, "Add")
            half = add and _next(add.outputs[0], graph, "Mul")
            final = half and _next(half.outputs[0], graph, "Mul")
            if final is None or not close(scalar(other_input(add, erf.outputs[0])), 1.0):
                continue
            c = other_input(half, add.outputs[0])
            if close(scalar(c), 0.5) and other_input(final, half.outputs[0]) is x:
                info = {"x": x, "half": c, "one_plus_erf": add.outputs[0]}
                out.append(Match([div, erf, add, half, final], info))
        return out

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        half, final = m.nodes[3], m.nodes[4]
        x = m.info["x"]
        scaled = gs.Variable(f"{half.name}/x_half", dtype=x.dtype, shape=x.shape)
        half.inputs.clear()
        half.inputs.extend([x, m.info["half"]])
        half.outputs.clear()
        half.outputs.append(scaled)
        final.inputs.clear()
        final.inputs.extend([scaled, m.info["one_plus_erf"]])


PASS = CanonicalGelu()
