"""FFN Fusion (Bercovich et al. 2025, arXiv 2503.18908): run consecutive FFN blocks in parallel.

APPROXIMATE. A run of FFN sub-blocks with nothing between them (e.g. where attention layers
were removed),

    x₁ = x₀ + FFN₁(N₁(x₀)),  x₂ = x₁ + FFN₂(N₂(x₁)),  …,  xₙ = xₙ₋₁ + FFNₙ(Nₙ(xₙ₋₁))

(Nᵢ a LayerNorm/RMSNorm or nothing), becomes

    xₙ = x₀ + Σᵢ FFNᵢ(Nᵢ(x₀))

by making every Nᵢ read x₀; the residual Adds then sum the branch outputs, and the branches
are merged into one wide FFN by `fuse_parallel_ffn`'s exact rewrite, which the driver runs
after this pass (`followed_by`; same activation needed; set options["ffn_fusion_merge"] = False
to keep them as separate branches).
Exact only when FFNᵢ(Nᵢ(xᵢ₋₁)) = FFNᵢ(Nᵢ(x₀)), i.e. when the earlier FFNs barely move the
stream; the paper measures this on calibration data and so does this pass: the error of the
final outputs against the graph before the pass on the calibration feeds is reported in
`notes` (max_abs, max_rel, cosine), and the driver refuses the pass above --max-error.
Conditions: the intermediate residuals x₁ … xₙ₋₁ are read only by the next block.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ffnx.graph.ffn_match import FFN, find_ffns
from ffnx.graph.norm_match import Norm, find_norms
from ffnx.passes.base import GraphPass, Match, PassContext, PassResult
from ffnx.passes.measure import output_error, to_model, try_run


@dataclass
class Block:
    """h = x + ffn(norm(x)): one FFN sub-block of the residual stream."""

    add: gs.Node
    x: gs.Tensor
    ffn: FFN
    norm: Norm | None

    @property
    def h(self) -> gs.Tensor:
        return self.add.outputs[0]

    def readers(self) -> list[gs.Node]:
        """The nodes of this block that read x (besides the residual Add)."""
        nodes = self.norm.nodes if self.norm is not None else self.ffn.nodes
        return [n for n in nodes if any(i is self.x for i in n.inputs)]


def find_blocks(graph: gs.Graph) -> list[Block]:
    norms = {id(n.y): n for n in find_norms(graph)}
    ffns = {id(f.y): f for f in find_ffns(graph)}
    out = []
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or len(add.outputs) != 1:
            continue
        for y, x in (add.inputs, add.inputs[::-1]):
            f = ffns.get(id(y))
            n = norms.get(id(f.x)) if f is not None else None
            if f is not None and (f.x is x or (n is not None and n.x is x)):
                out.append(Block(add, x, f, n if f.x is not x else None))
                break
    return out


def find_runs(blocks: list[Block]) -> list[list[Block]]:
    """Maximal chains of blocks where each block's x is the previous block's output."""
    by_x = {id(b.x): b for b in blocks}
    starts = {id(b.h) for b in blocks}
    runs = []
    for b in blocks:
        if id(b.x) in starts:
            continue  # not the first of its chain
        run_, cur = [b], b
        while id(cur.h) in by_x:
            cur = by_x[id(cur.h)]
            run_.append(cur)
        if len(run_) > 1:
            runs.append(run_)
    return runs


class FFNFusion(GraphPass):
    """Consecutive FFN blocks -> parallel FFN branches on the same input (approximate)."""

    name = "ffn_fusion"
    exact = False
    default = False

    def match(self, graph: gs.Graph) -> list[Match]:
        return [Match([b.add for b in r], {"run": r}) for r in find_runs(find_blocks(graph))]

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        run_ = m.info["run"]
        outs = {id(o) for o in graph.outputs}
        for prev, nxt in zip(run_, run_[1:]):
            allowed = {id(nxt.add)} | {id(n) for n in nxt.readers()}
            if id(prev.h) in outs or any(id(c) not in allowed for c in prev.h.outputs):
                return f"intermediate residual {prev.h.name} is read outside the FFN run"
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        run_ = m.info["run"]
        x0 = run_[0].x
        for b in run_[1:]:
            for n in b.readers():
                for i, t in enumerate(n.inputs):
                    if t is b.x:
                        n.inputs[i] = x0

    def prepare(self, graph: gs.Graph, ctx: PassContext, matches: list[Match]) -> str | dict:
        """The outputs before the pass on the calibration feeds (the error is measured in
        `finish`); a graph ONNX Runtime cannot run is left as it is."""
        if not ctx.feeds or not any(self.check(graph, m) is None for m in matches):
            return {}
        before, why = try_run(to_model(graph), ctx.feeds)
        return why or {"before": before}

    def note(self, res: PassResult, m: Match) -> None:
        res.notes.setdefault("runs", []).append([b.h.name for b in m.info["run"]])

    def finish(self, graph, ctx: PassContext, res: PassResult, matches, state) -> None:
        if state and res.applied:
            res.notes.update(output_error(state["before"], graph, ctx.feeds))

    def followed_by(self, ctx: PassContext) -> tuple[str, ...]:
        """The parallel branches merge into one wide FFN unless options["ffn_fusion_merge"]
        is False."""
        return ("fuse_parallel_ffn",) if ctx.options.get("ffn_fusion_merge", True) else ()


PASS = FFNFusion()
