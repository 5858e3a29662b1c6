"""group_query_attention: the cached attention of a decoder -> com.microsoft::GroupQueryAttention.

Synthetic one-layer graphs in the form transformers' eager attention exports (Concat caches,
repeat_kv, Q.K^T * scale + mask, Softmax, .V): the rewrite equals the graph before it; graphs it
does not fit are left byte-unchanged with the reason; the measured choice and its cache."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ffnx.errors import PassError
from ffnx.graph import lowering_meta
from ffnx.passes import gqa_choice
from ffnx.passes.optimize import optimize_model
from tests.passes.helpers import run

H, KV = 4, 2
MIN = np.finfo(np.float32).min


def attention_graph(D: int = 16, Dv: int | None = None, softcap: bool = False, rep: bool = True,
                    kv: int = KV, tile: bool = False, sinks: bool = False):  # fmt: skip
    """One cached attention layer: inputs q [B,H,S,D], k/v [B,kv,S,D], past_key/value
    [B,kv,P,D], mask [B,1,S,P+S]; outputs o [B,S,H*D] and present_key/value. tile: the heads
    repeated as a tile (head h reads KV head h % kv), not repeat_kv's h // (H/kv). sinks:
    GPT-OSS's per-head sink logit concatenated to the scores, max-shifted, dropped after."""
    Dv = Dv or D
    f = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    inputs = [
        vi("q", f, ["B", H, "S", D]),
        vi("k", f, ["B", kv, "S", D]),
        vi("v", f, ["B", kv, "S", Dv]),
        vi("past_key", f, ["B", kv, "P", D]),
        vi("past_value", f, ["B", kv, "P", Dv]),
        vi("mask", f, ["B", 1, "S", "T"]),
    ]
    outputs = [
        vi("o", f, ["B", "S", H * Dv]),
        vi("present_key", f, ["B", kv, "T", D]),
        vi("present_value", f, ["B", kv, "T", Dv]),
    ]
    c = lambda name, v: numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    inits = [
        c("scale", np.float32(1 / np.sqrt(D))),
        c("ax2", np.array([2], np.int64)),
        c("ax1", np.array([1], np.int64)),
        c("cap", np.float32(5.0)),
        c("flat", np.array([0, 0, H * Dv], np.int64)),
    ]
    nodes = [
        helper.make_node("Concat", ["past_key", "k"], ["present_key"], axis=-2),
        helper.make_node("Concat", ["past_value", "v"], ["present_value"], axis=-2),
    ]

    def repeat(x: str, d: int) -> str:
        if not rep:
            return x
        nodes.extend([
            helper.make_node("Shape", ["q"], [f"{x}_qshape"]),  # the exporter reads B and T
            helper.make_node("Shape", ["mask"], [f"{x}_mshape"]),  # off other tensors too
            helper.make_node("Unsqueeze", [x, "ax1" if tile else "ax2"], [f"{x}_u"]),
            helper.make_node("Gather", [f"{x}_qshape", "i0"], [f"{x}_b"], axis=0),
            helper.make_node("Gather", [f"{x}_mshape", "i3"], [f"{x}_t"], axis=0),
            helper.make_node("Concat", [f"{x}_b", *(("repc", "kvc") if tile else ("kvc", "repc")),
                                        f"{x}_t", f"d{d}"], [f"{x}_eshape"], axis=0),
            helper.make_node("Expand", [f"{x}_u", f"{x}_eshape"], [f"{x}_e"]),
            helper.make_node("Concat", [f"{x}_b", "hc", f"{x}_t", f"d{d}"], [f"{x}_rshape"],
                             axis=0),
            helper.make_node("Reshape", [f"{x}_e", f"{x}_rshape"], [f"{x}_r"]),
        ])  # fmt: skip
        return f"{x}_r"

    inits += [c("i0", np.array([0], np.int64)), c("i3", np.array([3], np.int64)),
              c("kvc", np.array([kv], np.int64)), c("repc", np.array([H // kv], np.int64)),
              c("hc", np.array([H], np.int64))]  # fmt: skip
    inits += [c(f"d{d}", np.array([d], np.int64)) for d in sorted({D, Dv})]
    kx, vx = repeat("present_key", D), repeat("present_value", Dv)
    nodes += [helper.make_node("Transpose", [kx], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["qk"]),
              helper.make_node("Mul", ["qk", "scale"], ["scaled"])]  # fmt: skip
    scores = "scaled"
    if softcap:
        nodes += [helper.make_node("Div", ["scaled", "cap"], ["sd"]),
                  helper.make_node("Tanh", ["sd"], ["st"]),
                  helper.make_node("Mul", ["st", "cap"], ["capped"])]  # fmt: skip
        scores = "capped"
    nodes.append(helper.make_node("Add", [scores, "mask"], ["masked"]))
    if sinks:
        inits += [
            c("sinks", np.linspace(-1, 2, H).astype(np.float32)),
            c("sink_shape", np.array([1, H, 1, 1], np.int64)),
            c("one", np.array([1], np.int64)),
            c("hh", np.array([H], np.int64)),
            c("last", np.array([-1], np.int64)),
            c("zero", np.array([0], np.int64)),
        ]
        nodes += [
            helper.make_node("Reshape", ["sinks", "sink_shape"], ["sinks4"]),
            helper.make_node("Shape", ["q"], ["sq"]),
            helper.make_node("Gather", ["sq", "i0"], ["sb"], axis=0),
            helper.make_node("Gather", ["sq", "i2q"], ["ss"], axis=0),
            helper.make_node("Concat", ["sb", "hh", "ss", "one"], ["sink_x"], axis=0),
            helper.make_node("Expand", ["sinks4", "sink_x"], ["sinkx"]),
            helper.make_node("Concat", ["masked", "sinkx"], ["comb"], axis=-1),
            helper.make_node("ReduceMax", ["comb", "last"], ["cmax"], keepdims=1),
            helper.make_node("Sub", ["comb", "cmax"], ["shifted"]),
            helper.make_node("Softmax", ["shifted"], ["psink"], axis=-1),
            helper.make_node("Slice", ["psink", "zero", "last", "last"], ["p"]),
        ]  # fmt: skip
        inits.append(c("i2q", np.array([2], np.int64)))
    else:
        nodes.append(helper.make_node("Softmax", ["masked"], ["p"], axis=-1))
    nodes += [
              helper.make_node("MatMul", ["p", vx], ["pv"]),
              helper.make_node("Transpose", ["pv"], ["pvt"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["pvt", "flat"], ["o"])]  # fmt: skip
    g = helper.make_graph(nodes, "attn", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(m)
    return onnx.shape_inference.infer_shapes(m)


def feeds(B: int, S: int, P: int, D: int = 16, Dv: int | None = None, kv: int = KV,
          pad: int = 1, seed: int = 0) -> dict[str, np.ndarray]:  # fmt: skip
    """Random q/k/v/pasts and transformers' mask: causal, row 0 left-padded by `pad` keys."""
    g = np.random.default_rng(seed)
    r = lambda *s: g.standard_normal(s).astype(np.float32)  # noqa: E731
    T = P + S
    keep = np.ones((B, T), bool)
    keep[0, :pad] = False
    causal = np.arange(T)[None, :] <= (P + np.arange(S))[:, None]
    mask = np.where(causal[None] & keep[:, None, :], 0, MIN).astype(np.float32)[:, None]
    Dv = Dv or D
    return {"q": r(B, H, S, D), "k": r(B, kv, S, D), "v": r(B, kv, S, Dv),
            "past_key": r(B, kv, P, D), "past_value": r(B, kv, P, Dv), "mask": mask}  # fmt: skip


SHAPES = [(2, 3, 5), (1, 1, 7), (2, 1, 4), (1, 4, 0)]


@pytest.fixture(autouse=True)
def _form(monkeypatch, tmp_path):
    monkeypatch.setenv("FFNX_ATTENTION", "gqa")
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("rep, sinks", [(True, False), (False, False), (True, True)])
def test_rewrite_equals_the_graph_before(rep, sinks):
    kv = KV if rep else H
    m = attention_graph(rep=rep, kv=kv, sinks=sinks)
    fs = [feeds(*s, kv=kv, pad=min(1, s[2]), seed=i) for i, s in enumerate(SHAPES)]
    new, (rep_,) = optimize_model(m, fs[:2], passes=["group_query_attention"])
    assert rep_["status"] == "applied" and rep_["applied"] == 1, rep_
    ops = [n.op_type for n in new.graph.node]
    assert ops.count("GroupQueryAttention") == 1 and "Softmax" not in ops and "Concat" not in ops
    (rec,) = [r for r in lowering_meta.read(new) if r["pass"] == "group_query_attention"]
    assert rec["choice"].endswith("kv_buffer=concat")  # no decoder inputs: not shareable
    (gqa,) = [n for n in new.graph.node if n.op_type == "GroupQueryAttention"]
    assert bool(gqa.input[11]) == sinks  # GPT-OSS's sinks as GQA's head_sink
    for f in fs:  # every shape, prefill (past 0) included
        want, got = run(m, f), run(new, f)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_padding_query_rows_are_the_only_difference():
    """A prompt row whose keys are all masked (left padding at past 0) is the one place the
    forms differ (the docstring's exactness condition); every real row is equal."""
    m = attention_graph()
    new, _ = optimize_model(m, [feeds(2, 3, 5)], passes=["group_query_attention"])
    f = feeds(2, 4, 0, pad=2)
    want, got = run(m, f)["o"], run(new, f)["o"]
    real = np.ones((2, 4), bool)
    real[0, :2] = False
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(softcap=True), "scores reach Softmax through Div"),
        (dict(D=12), "head dim 12 is not a multiple of 8"),
        (dict(D=16, Dv=8), "key dim 16 != value dim 8 (MLA)"),
        (dict(tile=True), "an Unsqueeze that is not repeat_kv"),
    ],
)
def test_unfit_attention_is_left_byte_unchanged_with_the_reason(kwargs, reason):
    m = attention_graph(**kwargs)
    D, Dv = kwargs.get("D", 16), kwargs.get("Dv")
    new, (r,) = optimize_model(m, [feeds(2, 3, 5, D=D, Dv=Dv)], passes=["group_query_attention"])
    assert new.SerializeToString() == m.SerializeToString()
    assert r["status"] == "skipped" and r["applied"] == 0
    assert reason in r["skipped"][0]["reason"], r["skipped"]


def test_graph_without_a_cache_is_byte_unchanged():
    m = attention_graph()
    g = m.graph  # the same attention, but the keys/values are not Concats of past inputs
    for n in g.node:
        if n.op_type == "Concat" and n.output[0] in ("present_key", "present_value"):
            n.op_type, n.input[:] = "Identity", [n.input[1]]
            del n.attribute[:]
    del g.value_info[:]
    m = onnx.shape_inference.infer_shapes(m)
    new, (r,) = optimize_model(m, [feeds(2, 3, 0)], passes=["group_query_attention"])
    assert r["status"] == "no_match" and new.SerializeToString() == m.SerializeToString()


def test_measured_standard_form_leaves_the_graph_byte_unchanged(monkeypatch):
    monkeypatch.setenv("FFNX_ATTENTION", "standard")
    m = attention_graph()
    new, (r,) = optimize_model(m, [feeds(2, 3, 5)], passes=["group_query_attention"])
    assert new.SerializeToString() == m.SerializeToString() and r["status"] == "skipped"
    assert r["notes"]["form"] == "standard"


def test_forced_unknown_form_is_a_pass_error(monkeypatch):
    monkeypatch.setenv("FFNX_ATTENTION", "flash")
    with pytest.raises(PassError, match="FFNX_ATTENTION='flash': choose one of standard"):
        optimize_model(attention_graph(), [feeds(2, 3, 5)], passes=["group_query_attention"])


def test_decide_needs_a_margin_and_takes_the_geometric_mean():
    t = {64: {"standard": 1.0, "gqa": 0.99, "gqa_shared": 0.985},
         256: {"standard": 2.0, "gqa": 1.99, "gqa_shared": 1.98}}  # fmt: skip
    assert gqa_choice.decide(t)[0] == "standard"  # < 3 % faster: not worth a contrib op
    t[256]["gqa_shared"] = 1.2
    form, why = gqa_choice.decide(t)
    assert form == "gqa_shared" and why.startswith("gqa_shared 1.")
    assert abs(gqa_choice.speedup(t, "gqa_shared") - 1 / np.sqrt(0.985 * 0.6)) < 1e-9
    t[256]["gqa"] = 1.5
    del t[64]["gqa_shared"]  # a form not timed at every past (no shareable buffer)
    assert gqa_choice.decide(t)[0] == "gqa"


def test_measure_caches_reproducible_timings_only(monkeypatch, tmp_path):
    import ffnx.lowering.timing as timing

    calls = []

    def fake_round_robin(runs, rounds=7, max_rounds=0, **kw):
        calls.append(sorted(runs))
        base = {"standard": 1.0, "gqa": 0.8, "gqa_shared": 0.7}
        return {k: [base[k]] * 6 for k in runs}

    monkeypatch.setattr(timing, "round_robin", fake_round_robin)
    m = attention_graph()
    key_model = m
    gqa_choice._MEASURED.clear()
    monkeypatch.setattr(gqa_choice, "step_runner", lambda *a: lambda: None)
    out, ok = gqa_choice.measure(key_model, m, {}, 2, True)
    assert ok and len(calls) == len(gqa_choice.PASTS) and calls[0] == ["gqa", "gqa_shared",
                                                                       "standard"]  # fmt: skip
    cached = json.loads(gqa_choice.cache_file().read_text())
    assert len(cached) == 1 and list(cached.values())[0]["threads"] == 2
    gqa_choice._MEASURED.clear()
    again, ok = gqa_choice.measure(key_model, m, {}, 2, True)
    assert ok and again == out and len(calls) == len(gqa_choice.PASTS)  # from the file
    _, ok = gqa_choice.measure(key_model, m, {}, 3, False)  # other threads: measured again
    assert len(calls) == 2 * len(gqa_choice.PASTS) and "gqa_shared" not in calls[-1]
