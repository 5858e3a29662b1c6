"""reparameterize_ffn: channel-idle FFNs (RePaViT)."""

from __future__ import annotations

import numpy as np

from ffnx.passes import optimize
from tests.passes.helpers import (
    assert_close,
    check_applied,
    check_unchanged,
    model,
    op_counts,
    rand,
    run,
    skip_reasons,
    torch_model,
    zoo_model,
)

TOK = {"x": rand(2, 5, 8, seed=2)}
W = {"w1": rand(8, 8, seed=1), "b1": rand(8, seed=2), "w2": rand(8, 8, seed=3), "b2": rand(8)}


def idle_ffn(parts: str, extra_out: str = "", consts: str = "") -> str:
    """fc1 -> `parts` (defines c from h) -> fc2 -> y; hidden width 8."""
    return f"""
        g (float[2, 5, 8] x) => (float[2, 5, 8] y{extra_out}) {{
            {consts}
            p = MatMul (x, w1)
            h = Add (p, b1)
            {parts}
            q = MatMul (c, w2)
            y = Add (q, b2)
        }}
    """


SPLIT = """
    i, a = Split <axis = -1> (h, sizes)
    r = Relu (a)
    c = Concat <axis = -1> (i, r)
"""


def test_exported_repa_ffn_in_residual_becomes_narrow_ffn_plus_one_linear():
    m, feeds = torch_model("repa_residual")
    folded, _ = optimize.optimize_model(m, feeds, passes=["fold_batchnorm"])
    new, rep = check_applied("reparameterize_ffn", folded, feeds, 1)
    assert rep["after"]["flops"] < 0.6 * rep["before"]["flops"]
    ops = op_counts(new)
    assert not {"Slice", "Concat", "BatchNormalization"} & set(ops)
    assert ops["MatMul"] == 3  # fc1 (active 8 of 32), fc2 (8 rows), x·(I + W1i·W2i)
    assert ops["Add"] == op_counts(folded)["Add"]  # residual absorbed, one bias added
    for f in feeds:
        assert_close(run(m, f), run(new, f))


def test_exported_repa_ffn_after_layernorm_keeps_the_residual_add():
    m, feeds = torch_model("repa_ln")
    folded, _ = optimize.optimize_model(m, feeds, passes=["fold_batchnorm"])
    new, rep = check_applied("reparameterize_ffn", folded, feeds, 1)
    assert op_counts(new)["MatMul"] == 3 and "Concat" not in op_counts(new)


def test_zoo_vit_repa_default_pipeline_reparameterizes_every_ffn():
    m, feeds = zoo_model("vit-repa")
    new, reports = optimize.optimize_model(m, feeds)
    rep = {r["name"]: r for r in reports}
    assert rep["fold_batchnorm"]["notes"] == {"after": 2}
    assert rep["reparameterize_ffn"]["applied"] == 2
    assert not {"Slice", "Concat", "BatchNormalization"} & set(op_counts(new))
    flops = (
        rep["reparameterize_ffn"]["before"]["flops"],
        rep["reparameterize_ffn"]["after"]["flops"],
    )
    assert flops[1] < 0.7 * flops[0]
    for f in feeds:
        assert_close(run(m, f), run(new, f), 1e-4, 1e-4)  # 2 ViT blocks after 4 passes


def test_split_form_with_idle_part_first():
    m = model(idle_ffn(SPLIT), {**W, "sizes": np.array([6, 2])})
    new, rep = check_applied("reparameterize_ffn", m, [TOK], 1)
    assert op_counts(new) == {"MatMul": 3, "Add": 3, "Relu": 1}
    w1a = next(i for i in new.graph.initializer if tuple(i.dims) == (8, 2))
    assert w1a is not None  # the narrow fc1 reads 2 active channels


def test_all_idle_ffn_is_one_linear():
    parts = """
        i = Slice (h, st, en, ax)
        j = Slice (h, en, big, ax)
        c = Concat <axis = -1> (j, i)
    """
    inits = {**W, "st": np.array([0]), "en": np.array([3]), "big": np.array([99]), "ax": [-1]}
    inits["ax"] = np.array([-1])
    new, _ = check_applied("reparameterize_ffn", model(idle_ffn(parts), inits), [TOK], 1)
    assert op_counts(new) == {"MatMul": 1, "Add": 1}


def test_hidden_read_outside_the_ffn_is_skipped():
    m = model(
        idle_ffn(SPLIT + "z = Identity (h)", ", float[2, 5, 8] z"), {**W, "sizes": np.array([6, 2])}
    )
    rep = check_unchanged("reparameterize_ffn", m, [TOK])
    assert "used outside" in skip_reasons(rep)


def test_strided_slice_is_skipped():
    parts = """
        i = Slice (h, st, en, ax, two)
        a = Slice (h, en, big, ax)
        r = Relu (a)
        c = Concat <axis = -1> (i, r)
    """
    inits = {**W, "st": np.array([0]), "en": np.array([4]), "big": np.array([8]),
             "ax": np.array([-1]), "two": np.array([2])}  # fmt: skip
    inits["w2"] = rand(6, 8, seed=5)
    rep = check_unchanged("reparameterize_ffn", model(idle_ffn(parts), inits), [TOK])
    assert "last-axis range" in skip_reasons(rep)


def test_weights_that_are_graph_inputs_are_not_matched():
    text = idle_ffn(SPLIT).replace("(float[2, 5, 8] x)", "(float[2, 5, 8] x, float[8, 8] w1)")
    m = model(text, {**{k: v for k, v in W.items() if k != "w1"}, "sizes": np.array([6, 2])})
    check_unchanged("reparameterize_ffn", m, [{**TOK, "w1": rand(8, 8, seed=9)}])


def test_plain_ffn_is_byte_identical():
    m, feeds = torch_model("mlp")
    assert check_unchanged("reparameterize_ffn", m, feeds)["status"] == "no_match"
