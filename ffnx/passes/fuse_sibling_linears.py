"""Merge linear layers that read the same input into one MatMul on concatenated weights + Split.

Pattern: n >= 2 linears y_i = x·W_i [+ b_i] (MatMul + bias Add, or Gemm) on the same tensor x:
the Q, K and V projections of attention, RePaViT's kept and idle FFN branches after
`reparameterize_ffn`, the parallel heads of multi-branch blocks.

Rewrite: h = x·[W_1 | ... | W_n] + [b_1; ...; b_n] (a missing bias is zeros), then
(y_1, ..., y_n) = Split(h, [N_1, ..., N_n], axis=-1); every reader of y_i reads the Split part.

Exact: every element of y_i is the same dot product over the same row of x, and adding a zero
bias is exact. Conditions: the weights (and biases) constant, of one dtype and input width; each
pre-bias product read only by its bias Add.

Left alone: MoE routers (a product reaching a TopK or a MoE node's router input), which int4
keeps fp32, and the input projections of FFNs (fc1, and up when gated). ORT fuses fc1's bias Add
into its GELU (BiasGelu), which a merged Add would undo, and a gated pair is `fuse_gate_up`'s;
parallel FFNs are `fuse_parallel_ffn`'s, which runs before.

Speed: applied only where it removes kernel launches. n products with b bias Adds (n + b
kernels) become MatMul [+ Add] + Split: 3 kernels instead of 6 for biased Q, K, V. A product
whose output only a last-axis Split reads (MLA's kv_a_proj_with_mqa -> [latent | rotary key])
counts its Split too, merged into the new one (cleanup's split of a split), so MLA's query and
kv projections, 2 products + 1 Split, become 1 + 1 (and int4 quantizes x once, not twice). Two
linears without biases and no such Split would stay at 2 kernels plus the Split's copy, which
measured slower on ORT CPU (see `fuse_gate_up`): such sites are skipped.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ffnx.graph.algebra import merge_linears
from ffnx.graph.ffn_match import (
    ROUTE_THROUGH,
    Linear,
    find_ffns,
    last_axis,
    linear_at,
    split_sizes,
    used_outside,
)
from ffnx.passes.base import GraphPass, Match, PassContext
from ffnx.passes.cleanup import merge_split_of_split, split_of_split


def split_again(lin: Linear, graph: gs.Graph) -> bool:
    """lin's output is read only by a last-axis Split of known sizes (`rewrite` merges that
    Split into the merged product's one: cleanup's split of a split)."""
    readers = list(lin.y.outputs)
    return (len(readers) == 1 and readers[0].op == "Split" and lin.y not in graph.outputs
            and last_axis(readers[0].attrs.get("axis", 0), lin.y)
            and split_sizes(readers[0]) is not None)  # fmt: skip


def routes(t: gs.Tensor, depth: int = 5) -> bool:
    """t reaches a TopK or a MoE node's router input through element-wise/shape ops: a router,
    which int4 quantization keeps fp32 (ffnx.compress.quantize_weights) and so must stay its
    own product."""
    for n in t.outputs:
        if n.op == "TopK" or (n.op in ("MoE", "QMoE", "FfnxMoE") and len(n.inputs) > 1
                              and n.inputs[1] is t):  # fmt: skip
            return True
        if depth and n.op in ROUTE_THROUGH and any(routes(o, depth - 1) for o in n.outputs):
            return True
    return False


def kernels_saved(linears: list[Linear], graph: gs.Graph) -> int:
    """Kernel launches the merge removes: n products + b bias Adds + s Splits of their outputs
    -> MatMul [+ Add] + Split."""
    biased = sum(lin.bias is not None for lin in linears)
    splits = sum(split_again(lin, graph) for lin in linears)
    return len(linears) + biased + splits - (2 + (biased > 0))


class FuseSiblingLinears(GraphPass):
    """Linears on the same input (Q/K/V, RePaViT branches) -> one MatMul on [W_1 | ...] + Split."""

    name = "fuse_sibling_linears"

    def match(self, graph: gs.Graph) -> list[Match]:
        out = []
        ffn_inputs = {id(lin.nodes[0]) for f in find_ffns(graph) for lin in (f.fc1, f.up) if lin}
        for x in graph.tensors().values():
            readers = [n for n in x.outputs if n.op in ("MatMul", "Gemm") and n.inputs[0] is x]
            linears = [lin for n in readers if (lin := linear_at(n, graph)) is not None]
            if len(linears) >= 2:
                info = {"x": x, "linears": linears, "ffn_inputs": ffn_inputs}
                out.append(Match([lin.nodes[0] for lin in linears], info))
        return out

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        linears: list[Linear] = m.info["linears"]
        linears = [lin for lin in linears if id(lin.nodes[0]) not in m.info["ffn_inputs"]
                   and not routes(lin.y)]  # fmt: skip
        if len(linears) < 2:
            return (
                "FFN input projections (fc1/up) are left to ORT's bias fusion and "
                "fuse_gate_up, routers to stay fp32 under int4"
            )
        dtypes = {lin.weight.dtype for lin in linears}
        if len(dtypes) != 1:
            return f"weight dtypes differ ({sorted(map(str, dtypes))})"
        if len({lin.weight.shape[0] for lin in linears}) != 1:
            return "input widths differ"
        for lin in linears:
            if reason := used_outside(lin.nodes, [lin.y], graph):
                return reason
        if kernels_saved(linears, graph) < 1:
            return "no kernel launch saved (two linears without bias): the Split would only add"
        m.info["linears"] = linears
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        linears = m.info["linears"]
        again = [next(iter(lin.y.outputs)) for lin in linears if split_again(lin, graph)]
        merge_linears(graph, self.name, linears)
        for outer in again:  # its input is now a part of the merged product's Split
            if (inner := split_of_split(outer, graph)) is not None:
                merge_split_of_split(outer, inner)

    def note(self, res, m: Match) -> None:
        res.notes.setdefault("merged", []).append(len(m.info["linears"]))


PASS = FuseSiblingLinears()
