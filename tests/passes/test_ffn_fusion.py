"""ffn_fusion (approximate): consecutive FFN blocks become parallel branches on the run's input;
the error is measured and reported, and the driver refuses it above --max-error."""

from __future__ import annotations

import onnx_graphsurgeon as gs
import pytest
import torch
from torch import nn

from ffnx.errors import PassError
from ffnx.graph.ffn_match import find_ffns
from ffnx.models.attention import SelfAttention
from ffnx.models.ffn import GatedFFN, Mlp
from ffnx.passes.optimize import optimize_model, select_passes

from .helpers import apply, check_unchanged, export, model, op_counts, rand, skip_reasons

NAME = "ffn_fusion"
D = 16


class Stack(nn.Module):
    """Pre-LN layers where some attention sub-blocks were removed (the FFN Fusion setting):
    A F F F A G G  ->  runs F F F (GELU MLPs) and G G (SwiGLU), each after an attention block.
    Down projections are scaled by 0.1 so each block moves the stream a little, as in trained
    models (the approximation is then small but not zero)."""

    LAYOUT = "AFFFAGG"

    def __init__(self):
        super().__init__()
        make = {"A": lambda: SelfAttention(D, 2, causal=True), "F": lambda: Mlp(D, 32),
                "G": lambda: GatedFFN(D, 24, "swiglu")}  # fmt: skip
        self.mods = nn.ModuleList(make[c]() for c in self.LAYOUT)
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in self.LAYOUT)
        with torch.no_grad():
            for n in self.norms:
                n.weight.normal_(1.0, 0.2)
                n.bias.normal_(0.0, 0.1)
            for m in self.mods:
                for name, p in m.named_parameters():
                    if name.startswith(("fc2", "down")):
                        p.mul_(0.1)
        self.final = nn.LayerNorm(D)

    def forward(self, x):
        for m, n in zip(self.mods, self.norms):
            x = x + m(n(x))
        return self.final(x)


FEEDS = [{"x": rand(2, 7, D, seed=1, lo=-2, hi=2)}, {"x": rand(1, 12, D, seed=2, lo=-2, hi=2)}]


@pytest.fixture(scope="module")
def stack():
    torch.manual_seed(0)
    return export(Stack(), torch.randn(2, 8, D), dynamic={"x": {0: "b", 1: "t"}})


def test_applies_under_loose_max_error_and_reports_it(stack):
    new, rep = apply(NAME, stack, FEEDS, max_error=0.05)
    assert rep["status"] == "applied" and rep["applied"] == 2, rep
    notes = rep["notes"]
    assert [len(r) for r in notes["runs"]] == [3, 2] and rep["followed_by"] == {
        "fuse_parallel_ffn": 2
    }
    assert 1e-5 < notes["max_abs"] < 0.05 and 0.9999 < notes["cosine"] < 1.0
    assert notes["max_abs"] == pytest.approx(rep["error"]["max_abs"], rel=1e-3)
    # each run is one wide FFN on one affine-free LayerNorm of the run's input
    assert sorted(f.hidden for f in find_ffns(gs.import_onnx(new))) == [48, 96]
    before, after = op_counts(stack), op_counts(new)
    assert after["LayerNormalization"] == before["LayerNormalization"] - 3
    assert after["MatMul"] == before["MatMul"] - 7  # 3 + 2 FFNs -> 2 (gated: 3 MatMuls each)


def test_branches_kept_without_merge(stack):
    new, rep = apply(NAME, stack, FEEDS, max_error=0.05, options={"ffn_fusion_merge": False})
    assert rep["status"] == "applied" and "followed_by" not in rep
    assert op_counts(new) == op_counts(stack)  # only the norms' inputs were rewired
    merged, reports = optimize_model(new, FEEDS, passes=["fuse_parallel_ffn"])
    assert reports[0]["applied"] == 2


def test_refused_under_tight_max_error(stack):
    with pytest.raises(PassError, match=r"ffn_fusion refused: outputs changed: .* max_abs=.*"
                                        r"exceeds the maximum error 1e-06"):  # fmt: skip
        optimize_model(stack, FEEDS, passes=[NAME], max_error=1e-6)


def test_needs_max_error_and_is_not_default(stack):
    with pytest.raises(PassError, match="ffn_fusion is approximate: it runs only with a maximum"):
        optimize_model(stack, FEEDS, passes=[NAME])
    assert NAME not in [p.name for p in select_passes(None)]


RUN = """
agraph (float[N, 8] x) => (float[N, 8] y{outputs})
{{
    a1 = MatMul(x, w1)
    r1 = Relu(a1)
    f1 = MatMul(r1, w2)
    h1 = Add(x, f1)
    a2 = MatMul(h1, v1)
    r2 = Relu(a2)
    f2 = MatMul(r2, v2)
    h2 = Add(h1, f2)
    {tail}
}}
"""


def _run(outputs="", tail="y = Identity(h2)"):
    """Two FFN blocks without norms (x + FFN(x)), the second reading the first's output."""
    inits = {"w1": rand(8, 12), "w2": rand(12, 8, seed=1, lo=-0.1, hi=0.1),
             "v1": rand(8, 12, seed=2), "v2": rand(12, 8, seed=3, lo=-0.1, hi=0.1)}  # fmt: skip
    return model(RUN.format(outputs=outputs, tail=tail), inits)


def test_norm_free_run():
    m = _run()
    feeds = [{"x": rand(5, 8, seed=4)}]
    new, rep = apply(NAME, m, feeds, max_error=1.0)
    assert rep["status"] == "applied" and rep["notes"]["max_abs"] > 0
    (ffn,) = find_ffns(gs.import_onnx(new))
    assert ffn.hidden == 24 and ffn.x.name == "x" and ffn.kind == "relu"


def test_intermediate_residual_read_elsewhere():
    m = _run(outputs=", float[N, 8] z", tail="y = Identity(h2)\n    z = Neg(h1)")
    rep = check_unchanged(NAME, m, [{"x": rand(5, 8, seed=4)}], max_error=1.0)
    assert "intermediate residual h1 is read outside the FFN run" in skip_reasons(rep)


def test_unmatched_graph_unchanged():
    """One FFN block, then an attention-like mixer, then another FFN block: no run."""
    text = RUN.replace(
        "a2 = MatMul(h1, v1)",
        "t = Transpose(h1)\n    m = MatMul(h1, t)\n    k = MatMul(m, h1)\n    a2 = MatMul(k, v1)",
    )
    text = text.replace("h2 = Add(h1, f2)", "h2 = Add(k, f2)")
    m = model(text.format(outputs="", tail="y = Identity(h2)"),
              {"w1": rand(8, 12), "w2": rand(12, 8, seed=1), "v1": rand(8, 12, seed=2),
               "v2": rand(12, 8, seed=3)})  # fmt: skip
    rep = check_unchanged(NAME, m, [{"x": rand(5, 8, seed=4)}], max_error=1.0)
    assert rep["status"] == "no_match" and rep["matches"] == 0
