"""FfnxMoE lowerings against a numpy reference of the schema's math (fp32, fixed seeds)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from ffnx.graph import lowering_meta
from ffnx.graph.ort import ort_session, run_session
from ffnx.lowering import LoweringError, candidates, decompose_ffnx_ops, lower_moe_node
from ffnx.lowering.moe_model import MoEConfig, moe_feeds, moe_model, moe_weights

ATOL, RTOL = 1e-5, 1e-4  # fp32: the lowerings only reorder sums
TOKENS = (1, 16, 256)


def _act(h: np.ndarray, act: str) -> np.ndarray:
    base = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}.get(act, act)
    g, u = np.split(h, 2, axis=-1) if act in ("swiglu", "geglu", "reglu") else (h, 1.0)
    if base == "relu":
        a = np.maximum(g, 0)
    elif base == "silu":
        a = g / (1 + np.exp(-g))
    else:
        a = 0.5 * g * (1 + _erf(g / np.sqrt(2)))
    return a * u


def _erf(x: np.ndarray) -> np.ndarray:
    from math import erf

    return np.frompyfunc(erf, 1, 1)(x).astype(np.float64)


def moe_numpy(cfg: MoEConfig, w: dict, feeds: dict) -> np.ndarray:
    """The schema's math in float64, expert by expert."""
    x = feeds["hidden"].astype(np.float64)
    T, k = x.shape[0], cfg.k
    if cfg.hash:
        idx = w["hash_table"][feeds["token_ids"]]
        gate = np.full((T, k), cfg.routed_scaling_factor / k)
    else:
        s = feeds["router_logits"].astype(np.float64)
        if cfg.scoring == "softmax":
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            sel = p + w.get("score_bias", 0.0)  # ERNIE 4.5's selection bias
            idx = np.argsort(-group_limit(cfg, sel), 1, kind="stable")[:, :k]
            gate = np.take_along_axis(p, idx, 1)
        elif cfg.scoring == "topk_softmax":
            idx = np.argsort(-group_limit(cfg, s), 1, kind="stable")[:, :k]
            v = np.take_along_axis(s, idx, 1)
            gate = np.exp(v - v.max(1, keepdims=True))
            gate /= gate.sum(1, keepdims=True)
        else:
            p = 1 / (1 + np.exp(-s))
            sel = p + w.get("score_bias", 0.0)
            idx = np.argsort(-group_limit(cfg, sel), 1, kind="stable")[:, :k]
            gate = np.take_along_axis(p, idx, 1)
        if cfg.normalize:
            gate = gate / gate.sum(1, keepdims=True)
        gate = gate * cfg.routed_scaling_factor
    b1 = w.get("fc1_bias", np.zeros((cfg.E, cfg.H1)))
    b2 = w.get("fc2_bias", np.zeros((cfg.E, cfg.D)))
    y = np.zeros_like(x)
    for e in range(cfg.E):
        tok, slot = np.nonzero(idx == e)
        h = _act(x[tok] @ w["fc1_weight"][e].T + b1[e], cfg.activation)
        np.add.at(y, tok, gate[tok, slot, None] * (h @ w["fc2_weight"][e].T + b2[e]))
    if cfg.shared:
        ys = _act(x @ w["shared_fc1_weight"].T, cfg.activation) @ w["shared_fc2_weight"].T
        if cfg.shared_gate:
            ys = ys / (1 + np.exp(-(x @ w["shared_gate_weight"].T)))
        y += ys
    return y


def group_limit(cfg: MoEConfig, sel: np.ndarray) -> np.ndarray:
    """Selection scores with the experts outside each token's topk_group best groups at -inf."""
    n, tg = cfg.n_group, cfg.topk_group or cfg.n_group
    if n == 1:
        return sel
    g = sel.reshape(len(sel), n, -1)
    top = -np.sort(-g, axis=2)[:, :, : 2 if cfg.group_scoring == "top2_sum" else 1]
    best = np.argsort(-top.sum(2), 1, kind="stable")[:, :tg]
    keep = np.zeros(g.shape[:2], bool)
    np.put_along_axis(keep, best, True, 1)
    return np.where(keep[:, :, None], g, -np.inf).reshape(sel.shape)


def lowered(model: onnx.ModelProto, choice: str) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    for node in [n for n in graph.nodes if n.op == "FfnxMoE"]:
        lower_moe_node(graph, node, choice, why="test")
    graph.cleanup().toposort()
    out = lowering_meta.finish(gs.export_onnx(graph), model, graph)
    del out.opset_import[:]
    out.opset_import.extend([o for o in model.opset_import if o.domain != "ffnx"])
    out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return out


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return run_session(ort_session(model), feeds)["output"]


C = MoEConfig
CONFIGS = {
    "softmax-swiglu-k2": C(),
    "softmax-norm-scale-bias": C(normalize=1, routed_scaling_factor=2.5, bias=True),
    "topk_softmax-geglu-k1": C(scoring="topk_softmax", activation="geglu", k=1),
    "sigmoid-scorebias-norm-k4": C(
        E=8,
        k=4,
        scoring="sigmoid",
        score_bias=True,
        normalize=1,
        routed_scaling_factor=1.5,
        activation="reglu",
    ),
    "sigmoid-nonorm-silu": C(scoring="sigmoid", activation="silu"),
    "softmax-scorebias-norm-shared": C(E=8, k=2, score_bias=True, normalize=1, shared=8),
    "softmax-gelu-bias": C(activation="gelu", bias=True),
    "relu-shared-gate": C(activation="relu", shared=12, shared_gate=True),
    "swiglu-shared-nogate-E1": C(E=1, k=1, shared=8),
    "hash-k2": C(hash=True, E=6, routed_scaling_factor=2.0),
    "hash-k1-shared": C(hash=True, k=1, shared=8, activation="geglu"),
    # group-limited routing: DeepSeek-V3 (sigmoid + bias, top2_sum), V2 (softmax, max)
    "group-v3-sigmoid-top2": C(
        E=16,
        k=4,
        scoring="sigmoid",
        score_bias=True,
        normalize=1,
        routed_scaling_factor=2.5,
        n_group=4,
        topk_group=2,
        shared=8,
    ),
    "group-v2-softmax-max": C(E=8, k=2, n_group=4, topk_group=1, group_scoring="max", bias=True),
    "group-topk_softmax-max": C(
        E=12, k=3, scoring="topk_softmax", n_group=3, topk_group=2, group_scoring="max"
    ),
}
PLAIN_FORMS = (
    "sorted",
    "per_expert",
    "gather",
    "dense",
    "sorted|8|dense",
    "gather|1|per_expert",
)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plain_forms_match_numpy(name):
    cfg = CONFIGS[name]
    w = moe_weights(cfg, seed=0)
    model = moe_model(cfg, w)
    cases = [moe_feeds(cfg, T, seed=T, uneven=uneven) for T in TOKENS for uneven in (False, True)]
    refs = [moe_numpy(cfg, w, feeds) for feeds in cases]
    for form in PLAIN_FORMS:
        lm = lowered(model, form)
        assert not any(n.domain for n in lm.graph.node), form
        sess = ort_session(lm)
        for feeds, ref in zip(cases, refs):
            got = run_session(sess, feeds)["output"]
            T = len(feeds["hidden"])
            np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL, err_msg=f"{form} T={T}")


def test_decompose_replaces_every_ffnx_node():
    cfg = CONFIGS["softmax-norm-scale-bias"]
    w = moe_weights(cfg)
    model = decompose_ffnx_ops(moe_model(cfg, w))
    assert {o.domain for o in model.opset_import} == {""}
    assert not any(n.domain for n in model.graph.node)
    onnx.checker.check_model(model)
    feeds = moe_feeds(cfg, 16)
    np.testing.assert_allclose(run(model, feeds), moe_numpy(cfg, w, feeds), atol=ATOL, rtol=RTOL)


def test_dynamic_weights_are_gathered_at_run_time():
    cfg = CONFIGS["softmax-norm-scale-bias"]
    w = moe_weights(cfg)
    model = moe_model(cfg, w)
    for init in [i for i in model.graph.initializer if i.name in ("fc1_weight", "fc2_bias")]:
        model.graph.initializer.remove(init)
        model.graph.input.append(
            onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, list(init.dims))
        )
    feeds = {**moe_feeds(cfg, 16), "fc1_weight": w["fc1_weight"], "fc2_bias": w["fc2_bias"]}
    for form in ("sorted", "per_expert", "gather", "dense"):
        got = run(lowered(model, form), feeds)
        np.testing.assert_allclose(got, moe_numpy(cfg, w, feeds), atol=ATOL, rtol=RTOL)


def test_lowered_layer_is_named_and_documented():
    src = moe_model(C(), moe_weights(C()))
    src.metadata_props.add(key="other", value="kept")
    model = lowered(src, "dense")
    assert all(n.name.startswith("moe/dense/") for n in model.graph.node)
    assert lowering_meta.read(model) == [
        {"pass": "lower_moe", "layer": "moe", "choice": "dense", "why": "test"}
    ]
    assert {p.key: p.value for p in model.metadata_props}["other"] == "kept"
    assert not model.graph.doc_string  # structured metadata only
    again = lowered(model, "dense")  # nothing left to lower: the record is carried, not doubled
    assert lowering_meta.read(again) == lowering_meta.read(model)


def test_candidates_are_listed():
    assert {"sorted", "per_expert", "gather", "dense"} <= set(candidates())


def test_matches_the_torch_reference():
    torch = pytest.importorskip("torch")
    from ffnx.plugins.reference import moe_reference

    for name in ("sigmoid-scorebias-norm-k4", "hash-k1-shared", "relu-shared-gate"):
        cfg = CONFIGS[name]
        w = moe_weights(cfg)
        feeds = moe_feeds(cfg, 16)
        t = {k: torch.from_numpy(v) for k, v in {**w, **feeds}.items()}
        ref = moe_reference(
            t["hidden"],
            t.get("router_logits"),
            t["fc1_weight"],
            t.get("fc1_bias"),
            t["fc2_weight"],
            t.get("fc2_bias"),
            t.get("score_bias"),
            t.get("token_ids"),
            t.get("hash_table"),
            t.get("shared_fc1_weight"),
            t.get("shared_fc2_weight"),
            t.get("shared_gate_weight"),
            num_experts=cfg.E,
            top_k=cfg.k,
            routing_mode="hash" if cfg.hash else "router",
            scoring=cfg.scoring,
            normalize=cfg.normalize,
            routed_scaling_factor=cfg.routed_scaling_factor,
            activation=cfg.activation,
        ).numpy()
        got = run(decompose_ffnx_ops(moe_model(cfg, w)), feeds)
        np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL, err_msg=name)


# com.microsoft::MoE computes the schema's math exactly where it fits (fp32 rounding only).
ORT_CONFIGS = {
    "softmax-swiglu": C(D=32, H=32),
    "softmax-norm-scale-bias": C(D=32, H=32, normalize=1, bias=True, routed_scaling_factor=2.0),
    "topk_softmax-silu-k1": C(D=32, H=16, scoring="topk_softmax", k=1, activation="silu"),
    "sigmoid-relu-k4": C(D=32, H=32, E=8, k=4, scoring="sigmoid", activation="relu"),
    "sigmoid-norm-shared-gate": C(
        D=32, H=32, scoring="sigmoid", normalize=1, shared=16, shared_gate=True
    ),
}


@pytest.mark.parametrize("name", list(ORT_CONFIGS))
def test_ort_moe_matches_numpy(name):
    cfg = ORT_CONFIGS[name]
    w = moe_weights(cfg)
    model = moe_model(cfg, w)
    for form in ("ort_moe", "ort_moe|4|dense"):
        lm = lowered(model, form)
        for T in TOKENS:
            feeds = moe_feeds(cfg, T, seed=T, uneven=T == 16)
            np.testing.assert_allclose(
                run(lm, feeds),
                moe_numpy(cfg, w, feeds),
                atol=ATOL,
                rtol=RTOL,
                err_msg=f"{form} T={T}",
            )


def _dequantized(w: dict, form: str, bits: int) -> dict:
    """The weights the quantized lowering effectively uses (QMoE quantizes interleaved rows)."""
    from ffnx.lowering.moe_ort import _interleave
    from ffnx.lowering.quantize import pick_block, quantize

    fc1, fc2 = w["fc1_weight"], w["fc2_weight"]
    E, H1, D = fc1.shape
    if form.startswith("qmoe"):
        block = min(pick_block(D), pick_block(fc2.shape[2]))
        gated = H1 == 2 * fc2.shape[2]
        q1 = quantize(_interleave(fc1, gated), bits, block).dequantize()
        if gated:  # back to [gate; up] rows
            q1 = np.concatenate([q1[:, 0::2], q1[:, 1::2]], axis=1)
        q2 = quantize(fc2, bits, block).dequantize()
    else:
        q1 = quantize(fc1, bits, pick_block(D)).dequantize()
        q2 = quantize(fc2, bits, pick_block(fc2.shape[2])).dequantize()
    return {**w, "fc1_weight": q1, "fc2_weight": q2}


# routings QMoE's own top-k cannot compute: passed to it precomputed (router_weights)
PRECOMPUTED = {
    "group-v3-sigmoid-top2-shared": C(
        D=32, H=32, E=16, k=4, scoring="sigmoid", score_bias=True, normalize=1,
        routed_scaling_factor=2.5, n_group=4, topk_group=2, group_scoring="top2_sum", shared=16,
    ),
    "sigmoid-scorebias-nonorm-silu": C(
        D=32, H=32, E=8, k=2, scoring="sigmoid", score_bias=True, activation="silu"
    ),
    "hash-k1-scale": C(D=32, H=32, hash=True, k=1, routed_scaling_factor=2.0),
    # ERNIE 4.5: softmax with a selection bias
    "softmax-scorebias-norm": C(D=32, H=32, E=8, k=2, score_bias=True, normalize=1),
    "group-softmax-max-nonorm": C(D=32, H=32, E=8, k=2, n_group=4, topk_group=2,
                                  group_scoring="max", routed_scaling_factor=1.5),
    "group-topk_softmax": C(D=32, H=32, E=8, k=2, n_group=4, topk_group=2,
                            scoring="topk_softmax"),
}  # fmt: skip


@pytest.mark.parametrize("form", ["sorted_int4", "qmoe_int4", "sorted_int8", "qmoe_int8"])
@pytest.mark.parametrize(
    "name", ["softmax-swiglu", "sigmoid-relu-k4", "softmax-norm-scale-bias", *PRECOMPUTED]
)
def test_quantized_experts_compute_with_the_dequantized_weights(form, name):
    cfg = {**ORT_CONFIGS, **PRECOMPUTED}[name]
    w = moe_weights(cfg)
    lm = lowered(moe_model(cfg, w), form)
    wq = _dequantized(w, form, 4 if "int4" in form else 8)
    for T in TOKENS:
        feeds = moe_feeds(cfg, T, seed=T)
        got, ref = run(lm, feeds), moe_numpy(cfg, wq, feeds)
        scale = np.abs(ref).max()
        # int8 activations (accuracy_level 4) add their own rounding: ~1 % of the output scale
        np.testing.assert_allclose(got, ref, atol=2e-2 * scale, rtol=0, err_msg=f"T={T}")
        cos = (got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref)
        assert cos > 0.999, (T, cos)


@pytest.mark.parametrize("name", ["softmax-swiglu", "sigmoid-relu-k4"])
def test_qmoe_takes_unnormalised_scores_as_router_weights(name):
    """normalize=0 under QMoE: the scores go in as router_weights (no TopK / ReduceSum / Mul
    restoring them); the numbers are checked by the test above."""
    cfg = ORT_CONFIGS[name]
    lm = lowered(moe_model(cfg, moe_weights(cfg)), "qmoe_int4")
    ops = [n.op_type for n in lm.graph.node]
    assert "TopK" not in ops and "ReduceSum" not in ops, ops
    (q,) = [n for n in lm.graph.node if n.op_type == "QMoE"]
    score = {"softmax": "Softmax", "sigmoid": "Sigmoid"}[cfg.scoring]
    assert [n.op_type for n in lm.graph.node if n.output[0] == q.input[14]] == [score]
    a = {x.name: x.i for x in q.attribute}
    assert a["normalize_routing_weights"] == 0


@pytest.mark.parametrize(
    "name,scatter", [("group-v3-sigmoid-top2-shared", 0), ("sigmoid-scorebias-nonorm-silu", 0),
                     ("softmax-scorebias-norm", 0), ("hash-k1-scale", 1)],
)  # fmt: skip
def test_qmoe_chooses_by_selection_scores_where_a_router_decides(name, scatter):
    """score_bias / group-limited routers: QMoE gets the selection scores and a weights row,
    no scatter of a precomputed routing (hash tables keep it); numbers: the test above."""
    cfg = PRECOMPUTED[name]
    lm = lowered(moe_model(cfg, moe_weights(cfg)), "qmoe_int4")
    ops = [n.op_type for n in lm.graph.node]
    assert ops.count("ScatterElements") == scatter, ops
    assert ops.count("TopK") == ("hash" not in name) * (cfg.normalize + 2 * (cfg.n_group > 1))


@pytest.mark.parametrize(
    "cfg,why",
    [
        (C(hash=True), "hash routing"),
        (C(scoring="sigmoid", score_bias=True), "score_bias"),
        (C(activation="geglu"), "activation geglu"),
        (C(activation="gelu"), "activation gelu"),
    ],
)
def test_ort_moe_refuses_what_it_cannot_express(cfg, why):
    with pytest.raises(LoweringError, match=why):
        lowered(moe_model(cfg, moe_weights(cfg)), "ort_moe")


def test_quantization_needs_multiples_of_16():
    cfg = C(D=24, H=8)
    with pytest.raises(LoweringError, match="multiples of 16"):
        lowered(moe_model(cfg, moe_weights(cfg)), "sorted_int4")


def test_quantize_round_trip():
    from ffnx.lowering.quantize import pack, quantize, unpack

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 8, 64)).astype(np.float32)
    for bits in (4, 8):
        q = quantize(w, bits, 32)
        assert q.packed.shape == (3, 8, 64 * bits // 8) and q.scales.shape == (3, 8, 2)
        assert q.blocked().shape == (3, 8, 2, 32 * bits // 8)
        step = q.scales.repeat(32, axis=-1)
        assert np.all(np.abs(q.dequantize() - w) <= 0.5 * step + 1e-7)
        codes = rng.integers(0, 2**bits, (5, 64)).astype(np.uint8)
        np.testing.assert_array_equal(unpack(pack(codes, bits), bits), codes)


def test_decompose_handles_sparse_ffn_nodes():
    from ffnx.lowering.sparse import sparse_ffn_model
    from tests.lowering.sparse_reference import sparse_ffn_np as sparse_ffn_reference

    rng = np.random.default_rng(0)
    w = {
        "w_up": rng.standard_normal((32, 16)).astype(np.float32) / 4,
        "w_down": rng.standard_normal((16, 32)).astype(np.float32) / 6,
        "thresholds": np.full(32, 0.3, np.float32),
    }
    model = decompose_ffnx_ops(sparse_ffn_model(w, activation="relu", mode="threshold"))
    assert not any(n.domain for n in model.graph.node)
    x = rng.standard_normal((16, 16)).astype(np.float32)
    ref = sparse_ffn_reference(
        x, w["w_up"], w["w_down"], activation="relu", thresholds=w["thresholds"]
    )
    np.testing.assert_allclose(run(model, {"hidden": x}), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("form", ["sorted", "dense", "ort_moe", "sorted|4|gather"])
def test_leading_dims_are_kept(form):
    cfg = CONFIGS["softmax-norm-scale-bias"]
    w = moe_weights(cfg)
    model = moe_model(cfg, w)
    for vi in [*model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        last = dims[-1].dim_value
        del dims[:]
        vi.type.tensor_type.shape.CopyFrom(
            onnx.helper.make_tensor_type_proto(
                onnx.TensorProto.FLOAT, ["B", "S", last]
            ).tensor_type.shape
        )
    feeds = moe_feeds(cfg, 12)
    got = run(lowered(model, form), {k: v.reshape(3, 4, -1) for k, v in feeds.items()})
    assert got.shape == (3, 4, cfg.D)
    np.testing.assert_allclose(got.reshape(12, -1), moe_numpy(cfg, w, feeds), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("form", ["sorted", "dense", "gather", "ort_moe", "sorted_int8"])
def test_fp16_models_are_computed_in_fp32(form):
    cfg = MoEConfig(D=32, H=32, bias=True)
    w = {k: v.astype(np.float16) for k, v in moe_weights(cfg).items()}
    model = moe_model(cfg, w)
    for vi in [*model.graph.input, *model.graph.output]:
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    feeds = {k: v.astype(np.float16) for k, v in moe_feeds(cfg, 16).items()}
    got = run(lowered(model, form), feeds)
    assert got.dtype == np.float16
    ref = moe_numpy(cfg, {k: v.astype(np.float32) for k, v in w.items()}, feeds)
    np.testing.assert_allclose(got, ref, atol=2e-2 if "int8" in form else 5e-3, rtol=1e-2)


# Group-limited routing (schema n_group / topk_group / group_scoring)
GROUP_CONFIGS = [n for n in CONFIGS if n.startswith("group-")]


@pytest.mark.parametrize("name", GROUP_CONFIGS)
def test_group_limiting_changes_the_choice(name):
    """The group configs above are tested where the groups matter: without them (n_group=1)
    the top-k picks other experts for some tokens, so the outputs differ."""
    from dataclasses import replace

    cfg = CONFIGS[name]
    w = moe_weights(cfg)
    for T in TOKENS[1:]:
        feeds = moe_feeds(cfg, T, seed=T)
        free = moe_numpy(replace(cfg, n_group=1, topk_group=0), w, feeds)
        assert not np.allclose(moe_numpy(cfg, w, feeds), free, atol=1e-3), T


@pytest.mark.parametrize("name", GROUP_CONFIGS)
def test_group_routing_matches_the_torch_reference(name):
    torch = pytest.importorskip("torch")
    from ffnx.plugins.reference import moe_reference
    from ffnx.plugins.schema import MOE

    cfg = CONFIGS[name]
    w = moe_weights(cfg)
    feeds = moe_feeds(cfg, 256, seed=3)
    t = {k: torch.from_numpy(v) for k, v in {**w, **feeds}.items()}
    args = [t.get(p.name) for p in MOE.inputs]
    ref = moe_reference(
        *args, num_experts=cfg.E, top_k=cfg.k, scoring=cfg.scoring, normalize=cfg.normalize,
        routed_scaling_factor=cfg.routed_scaling_factor, activation=cfg.activation,
        n_group=cfg.n_group, topk_group=cfg.topk_group, group_scoring=cfg.group_scoring,
    ).numpy()  # fmt: skip
    np.testing.assert_allclose(ref, moe_numpy(cfg, w, feeds), atol=ATOL, rtol=RTOL)
    got = run(decompose_ffnx_ops(moe_model(cfg, w)), feeds)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=RTOL)


GROUP_ORT = C(D=32, H=32, E=8, k=2, n_group=4, topk_group=2, group_scoring="max")


def test_ort_moe_refuses_group_routing():
    with pytest.raises(LoweringError, match=r"group-limited routing \(n_group=4, topk_group=2\)"):
        lowered(moe_model(GROUP_ORT, moe_weights(GROUP_ORT)), "ort_moe")


def test_qmoe_takes_a_foreign_routing_as_selection_and_weights():
    """Group-limited softmax routing: one QMoE node choosing by the group-masked scores
    (router_probs) and weighting by a row of weights (router_weights), with
    normalize_routing_weights = 0; a top-k-then-softmax one gets R = w at the routed experts,
    -inf elsewhere, as both."""
    m = lowered(moe_model(GROUP_ORT, moe_weights(GROUP_ORT)), "qmoe_int4")
    (q,) = [n for n in m.graph.node if n.op_type == "QMoE"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in q.attribute}
    assert attrs["normalize_routing_weights"] == 0 and q.input[1] != q.input[14]
    assert [n.op_type for n in m.graph.node].count("ScatterElements") == 0
    cfg = C(D=32, H=32, E=8, k=2, n_group=4, topk_group=2, scoring="topk_softmax")
    m = lowered(moe_model(cfg, moe_weights(cfg)), "qmoe_int4")
    (q,) = [n for n in m.graph.node if n.op_type == "QMoE"]
    assert q.input[1] == q.input[14]
    assert [n.op_type for n in m.graph.node].count("ScatterElements") == 1


def test_qmoe_refuses_a_hash_table_naming_an_expert_twice():
    cfg = C(D=32, H=32, E=4, k=2, hash=True, vocab=8)
    w = moe_weights(cfg)
    w["hash_table"] = np.array([[0, 1], [2, 2]] * 4, np.int64)
    with pytest.raises(LoweringError, match="names an expert twice"):
        lowered(moe_model(cfg, w), "qmoe_int4")
    lowered(moe_model(cfg, w), "sorted_int4")  # the sorted form counts it twice, as it should


def test_chooser_skips_fused_candidates_for_group_routing():
    from ffnx.lowering.choose import applicable, config_of
    from ffnx.lowering.moe_common import MoESite

    graph = gs.import_onnx(moe_model(GROUP_ORT, moe_weights(GROUP_ORT)))
    site = MoESite.of(next(n for n in graph.nodes if n.op == "FfnxMoE"))
    names, skipped = applicable(site)
    assert names == ["sorted", "per_expert", "gather", "dense"]
    assert "group-limited" in skipped["ort_moe"]
    names, skipped = applicable(site, "int8")
    assert names == ["sorted_int8", "qmoe_int8"] and not skipped  # QMoE: routing precomputed
    assert config_of(site) == GROUP_ORT  # timed with the same routing
    assert "n_group" in GROUP_ORT.signature() and "n_group" not in C().signature()


@pytest.mark.parametrize("bits", [4, 8])
def test_sorted_nbits_with_group_routing(bits):
    w = moe_weights(GROUP_ORT)
    lm = lowered(moe_model(GROUP_ORT, w), f"sorted_int{bits}")
    wq = _dequantized(w, "sorted", bits)
    for T in TOKENS:
        feeds = moe_feeds(GROUP_ORT, T, seed=T)
        got, ref = run(lm, feeds), moe_numpy(GROUP_ORT, wq, feeds)
        np.testing.assert_allclose(got, ref, atol=2e-2 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize(
    "cfg,why",
    [
        (C(E=6, n_group=4, topk_group=2), "num_experts=6 is not a multiple of n_group=4"),
        (C(E=8, n_group=4, topk_group=5), r"topk_group=5 must be in \[1, n_group=4\]"),
        (C(E=8, k=4, n_group=4, topk_group=1), "top_k=4 exceeds the 2 experts"),
        (C(E=4, k=1, n_group=4, topk_group=2), "top2_sum' needs >= 2 experts per group"),
    ],
)
def test_invalid_group_attributes_are_refused(cfg, why):
    with pytest.raises(LoweringError, match=why):
        lowered(moe_model(cfg, moe_weights(cfg)), "sorted")


def test_sorted_holds_each_expert_weight_once():
    """Per-expert constants own their data: a view would keep a whole stacked [E, ...] copy
    alive per expert (E^2 memory: a 32-expert base model ran out of 24 GB that way)."""
    cfg = C()
    graph = gs.import_onnx(moe_model(cfg, moe_weights(cfg)))
    lower_moe_node(graph, next(n for n in graph.nodes if n.op == "FfnxMoE"), "sorted")
    experts = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    per_expert = [
        t for t in experts if t.name.rsplit("/", 1)[-1].startswith(("fc1_weight", "fc2_weight"))
    ]
    assert len(per_expert) == 2 * cfg.E
    for t in per_expert:
        v = t.values
        assert v.base is None or v.base.nbytes == v.nbytes, t.name
