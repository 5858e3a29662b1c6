"""ffnx::moe: the exported node's format, the ONNX schema registration, torch.export, numerics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from ffnx.export.moe_op import MoEOpModule
from ffnx.export.torch_export import export_onnx
from ffnx.graph.onnx_schemas import register_onnx_schemas
from ffnx.graph.ort import ort_session
from ffnx.models.spec import ModelSpec
from ffnx.plugins.schema import MOE

E, D, H = 4, 8, 16


def _module(scoring="softmax", shared=False, biases=False, hash_routing=False, groups=False,
            seed=0):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    w = {"fc1_weight": r(E, 2 * H, D), "fc2_weight": r(E, D, H)}
    attrs = dict(num_experts=E, top_k=2, scoring=scoring, activation="swiglu")
    if biases:
        w.update(fc1_bias=r(E, 2 * H), fc2_bias=r(E, D))
    if scoring == "sigmoid":
        w["score_bias"] = r(E)
        attrs.update(normalize=1, routed_scaling_factor=2.5)
    if groups:  # 2 groups of 2 experts, keep 1: both experts of the best group
        attrs.update(n_group=2, topk_group=1, group_scoring="top2_sum")
    if shared:
        w.update(
            shared_fc1_weight=r(2 * H, D), shared_fc2_weight=r(D, H), shared_gate_weight=r(1, D)
        )
    if hash_routing:
        w["hash_table"] = torch.randint(0, E, (32, 2), generator=g)
        attrs.update(routing_mode="hash")
        return MoEOpModule(w, attrs).eval()
    return MoEOpModule(w, attrs, router_weight=r(E, D)).eval()


def _spec(m: MoEOpModule, hash_routing=False) -> ModelSpec:
    inputs = {"hidden": torch.randn(2, 5, D)}
    dynamic = {"hidden": {0: "batch", 1: "seq"}}
    if hash_routing:
        inputs["token_ids"] = torch.randint(0, 32, (2, 5))
        dynamic["token_ids"] = {0: "batch", 1: "seq"}
    return ModelSpec("moe", m, inputs, dynamic)


CASES = {
    "softmax": dict(),
    "topk_softmax+bias": dict(scoring="topk_softmax", biases=True),
    "sigmoid+shared": dict(scoring="sigmoid", shared=True),
    "hash": dict(hash_routing=True),
    "sigmoid+groups": dict(scoring="sigmoid", groups=True),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (module, exported ModelProto); each case exported once for all tests here."""
    cache = {}

    def get(case: str):
        if case not in cache:
            m = _module(**CASES[case])
            path = tmp_path_factory.mktemp(case.replace("+", "_")) / "m.onnx"
            export_onnx(_spec(m, case == "hash"), path)
            cache[case] = m, onnx.load(str(path))
        m, model = cache[case]
        return m, onnx.ModelProto.FromString(model.SerializeToString())

    return get


def _attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def test_node_format(exported):
    _, model = exported("sigmoid+shared")
    moe = [n for n in model.graph.node if n.op_type == MOE.op_type]
    assert len(moe) == 1 and moe[0].domain == "ffnx"
    assert {(o.domain, o.version) for o in model.opset_import} >= {("ffnx", 1)}
    names = list(moe[0].input)
    assert len(names) == len(MOE.inputs)
    absent = {"fc1_bias", "fc2_bias", "token_ids", "hash_table"}
    for port, name in zip(MOE.inputs, names):
        assert (name == "") == (port.name in absent), port.name
    # router logits come from a plain MatMul on the block input
    router = next(n for n in model.graph.node if names[1] in n.output)
    assert router.op_type == "MatMul" and router.input[0] == names[0]
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert inits[names[2]] == (E, 2 * H, D) and inits[names[4]] == (E, D, H)
    assert _attrs(moe[0]) == {
        "num_experts": E, "top_k": 2, "routing_mode": "router", "scoring": "sigmoid",
        "normalize": 1, "routed_scaling_factor": 2.5, "activation": "swiglu",
        "plugin_namespace": "ffnx", "plugin_version": "1",
    }  # fmt: skip
    dims = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq", D]


def test_group_attributes_are_written_when_grouped(exported):
    moe = next(n for n in exported("sigmoid+groups")[1].graph.node if n.domain == "ffnx")
    attrs = _attrs(moe)
    assert (attrs["n_group"], attrs["topk_group"], attrs["group_scoring"]) == (2, 1, "top2_sum")
    assert "n_group" not in _attrs(next(n for n in exported("softmax")[1].graph.node
                                        if n.domain == "ffnx"))  # fmt: skip


def test_invalid_group_attributes_fail_at_construction():
    w = {"fc1_weight": torch.zeros(E, 2 * H, D), "fc2_weight": torch.zeros(E, D, H)}
    with pytest.raises(ValueError, match="num_experts=4 is not a multiple of n_group=3"):
        MoEOpModule(w, dict(num_experts=E, top_k=1, n_group=3, topk_group=1))


def test_trailing_absent_inputs_are_dropped(exported):
    moe = next(n for n in exported("softmax")[1].graph.node if n.domain == "ffnx")
    assert list(moe.input)[3:] == ["", moe.input[4]] and len(moe.input) == 5


def test_onnx_schema_registration_is_idempotent_and_checks(exported):
    register_onnx_schemas()
    register_onnx_schemas()
    assert onnx.defs.get_schema("FfnxMoE", 1, "ffnx").name == "FfnxMoE"
    model = exported("topk_softmax+bias")[1]
    onnx.checker.check_model(model, full_check=True)
    node = next(n for n in model.graph.node if n.domain == "ffnx")
    # make the node's output an untyped intermediate, so only the schema can type it
    model.graph.node.append(onnx.helper.make_node("Relu", [node.output[0]], ["y"]))
    del model.graph.value_info[:], model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    vi = next(v for v in inferred.graph.value_info if v.name == node.output[0])
    assert vi.type == model.graph.input[0].type
    bad = onnx.helper.make_node(
        MOE.op_type, list(node.input), ["z"], domain="ffnx", capacity=2
    )  # an attribute the schema does not have
    with pytest.raises(onnx.checker.ValidationError, match="capacity"):
        ctx = onnx.checker.C.CheckerContext()
        ctx.ir_version = model.ir_version
        ctx.opset_imports = {o.domain: o.version for o in model.opset_import}
        onnx.checker.check_node(bad, ctx)


def test_torch_export_keeps_one_op():
    m = _module()
    ep = torch.export.export(m, (torch.randn(3, 7, D),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("ffnx.moe.default") == 1


@pytest.mark.parametrize("case", CASES)
def test_ort_matches_torch(exported, case):
    """ORT (decomposed node) == torch eager (moe_reference) at T = 1, 16, 256, fp32."""
    from ffnx.lowering import runnable

    m, model = exported(case)
    sess = ort_session(runnable(model))
    g = torch.Generator().manual_seed(0)
    for shape in ((1, 1), (2, 8), (4, 64)):
        feeds = {"hidden": torch.randn(*shape, D, generator=g)}
        if case == "hash":
            feeds["token_ids"] = torch.randint(0, 32, shape, generator=g)
        with torch.no_grad():
            ref = m(*feeds.values()).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
