"""trt_graph_check on small ONNX graphs and real torch exports (MoE loop: flagged; MLP: clean)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ffnx.build.trt_graph_check import (
    check_graph,
    has_ffnx_nodes,
    materialize_optional_inputs,
    supported_ops,
)
from ffnx.plugins import schema


def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


HEADER = '<ir_version: 8, opset_import: ["" : 18]>'


def test_supported_list_is_the_parsers_and_names_its_source():
    ops = supported_ops()
    assert {"MatMul", "Gemm", "Softmax", "TopK", "ScatterND", "NonZero", "Gelu"} <= ops
    assert not {"Unique", "Compress", "SequenceAt", "BitwiseAnd"} & ops
    from ffnx.build.trt_graph_check import OPS_FILE

    assert "onnx-tensorrt docs/operators.md" in OPS_FILE.read_text().splitlines()[0]


def test_clean_graph_has_no_problems():
    model = parse(
        HEADER
        + """
        g (float[N, 4] x, float[4, 4] w) => (float[N, 4] y) {
            h = MatMul(x, w)
            y = Relu(h)
        }"""
    )
    assert check_graph(model) == []


@pytest.mark.parametrize("reduction,flagged", [("add", True), ("mul", True), ("none", False)])
def test_scatternd_reduction(reduction, flagged):
    model = parse(
        HEADER
        + f"""
        g (float[4, 2] data, int64[3, 1] idx, float[3, 2] upd) => (float[4, 2] y) {{
            y = ScatterND <reduction = "{reduction}"> (data, idx, upd)
        }}"""
    )
    problems = check_graph(model)
    assert bool(problems) == flagged
    if flagged:
        assert "ScatterND" in problems[0] and reduction in problems[0]


def test_nonzero_on_bool_is_flagged_on_float_is_not():
    bool_from_compare = parse(
        HEADER
        + """
        g (int64[N] idx, int64 e) => (int64[1, M] y) {
            m = Equal(idx, e)
            y = NonZero(m)
        }"""
    )
    bool_input = parse(HEADER + "g (bool[N] m) => (int64[1, M] y) { y = NonZero(m) }")
    float_input = parse(HEADER + "g (float[N] v) => (int64[1, M] y) { y = NonZero(v) }")
    assert any("NonZero on a bool" in p for p in check_graph(bool_from_compare))
    assert any("NonZero on a bool" in p for p in check_graph(bool_input))
    assert check_graph(float_input) == []


def test_unsupported_ops_are_named_with_domain_and_subgraph_location():
    model = parse(
        '<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>'
        + """
        g (float[N] x, bool c, float[N, N] w) => (float[M] y, float[N, N] z) {
            y = If (c) <
                then_branch = t () => (float[M] a) { a, i, r, n = Unique(x) },
                else_branch = e () => (float[M] b) { b = Identity(x) }
            >
            z = com.microsoft.FusedMatMul(w, w)
        }"""
    )
    problems = check_graph(model)
    assert len(problems) == 2
    assert any("then_branch" in p and "Unique" in p for p in problems)
    assert any("com.microsoft::FusedMatMul" in p for p in problems)


def test_local_functions_are_checked_through_their_bodies():
    good = parse(
        '<ir_version: 8, opset_import: ["" : 18, "local" : 1]>'
        + """
        g (float[N] x) => (float[N] y) { y = local.act(x) }
        <domain: "local", opset_import: ["" : 18]> act (a) => (b) { b = Relu(a) }"""
    )
    bad = parse(
        '<ir_version: 8, opset_import: ["" : 18, "local" : 1]>'
        + """
        g (float[N] x) => (float[M] y) { y = local.uniq(x) }
        <domain: "local", opset_import: ["" : 18]> uniq (a) => (b) { b, i, r, n = Unique(a) }"""
    )
    assert check_graph(good) == []
    assert len(check_graph(bad)) == 1 and "Unique" in check_graph(bad)[0]


def moe_node(inputs: list[str], **attrs) -> onnx.NodeProto:
    defaults = {"plugin_namespace": "ffnx", "plugin_version": "1", "num_experts": 2, "top_k": 1}
    defaults.update(attrs)
    defaults = {k: v for k, v in defaults.items() if v is not None}
    return helper.make_node("FfnxMoE", inputs, ["y"], name="moe0", domain="ffnx", **defaults)


def moe_model(node: onnx.NodeProto, dtype=TensorProto.FLOAT16) -> onnx.ModelProto:
    D, H, E = 4, 8, 2
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [
        numpy_helper.from_array(np.zeros((E, 2 * H, D), np_dtype), "fc1"),
        numpy_helper.from_array(np.zeros((E, D, H), np_dtype), "fc2"),
        numpy_helper.from_array(np.zeros(E, np.float32), "sbias"),
        numpy_helper.from_array(np.zeros((E, H), np_dtype), "shared_fc2"),
        numpy_helper.from_array(np.zeros(0, np_dtype), "ffnx_absent"),
    ]
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", dtype, ["T", D]),
            helper.make_tensor_value_info("logits", dtype, ["T", E]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["T"]),
        ],
        [helper.make_tensor_value_info("y", dtype, ["T", D])],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(schema.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_ffnx_nodes_need_plugin_attributes_and_required_inputs():
    ok = moe_model(moe_node(["x", "logits", "fc1", "ffnx_absent", "fc2"]))
    no_attrs = moe_model(
        moe_node(["x", "logits", "fc1"], plugin_namespace=None, plugin_version="2")
    )
    assert has_ffnx_nodes(ok) and check_graph(ok) == []
    problems = check_graph(no_attrs)
    assert len(problems) == 3
    assert any("plugin_namespace=None" in p for p in problems)
    assert any("plugin_version='2'" in p for p in problems)
    assert any("required input 4 (fc2_weight)" in p for p in problems)


def test_ffnx_moe_group_routing_is_checked():
    inputs = ["x", "logits", "fc1", "ffnx_absent", "fc2"]
    good = moe_node(inputs, num_experts=8, top_k=2, n_group=4, topk_group=2)
    assert check_graph(moe_model(good)) == []
    for attrs, why in [
        (dict(num_experts=8, n_group=3, topk_group=1), "not a multiple of n_group=3"),
        (dict(num_experts=128, n_group=64, topk_group=8), "at most 32 groups"),
    ]:
        problems = check_graph(moe_model(moe_node(inputs, **attrs)))
        assert len(problems) == 1 and "group-limited routing" in problems[0], problems
        assert why in problems[0] and "moe0" in problems[0]


def test_inner_empty_optional_inputs_are_flagged_then_materialized():
    # fc1_bias, fc2_bias empty (inner); score_bias given; token_ids, hash_table empty (inner);
    # shared_fc1_weight empty (inner); shared_fc2_weight given; trailing shared_gate empty.
    inputs = ["x", "logits", "fc1", "", "fc2", "", "sbias", "", "", "", "shared_fc2", ""]
    model = moe_model(moe_node(inputs))
    flagged = [p for p in check_graph(model) if "empty name" in p]
    assert [p.split("input ")[1].split(" ")[0] for p in flagged] == ["3", "5", "7", "8", "9"]

    assert materialize_optional_inputs(model) == 5
    node = model.graph.node[0]
    assert len(node.input) == 11 and "" not in node.input  # trailing empty dropped
    inits = {t.name: t for t in model.graph.initializer}
    dtype_of = {i: inits[node.input[i]].data_type for i in (3, 5, 7, 8, 9)}
    assert dtype_of == {
        3: TensorProto.FLOAT16,  # float ports follow hidden's dtype
        5: TensorProto.FLOAT16,
        7: TensorProto.INT64,
        8: TensorProto.INT64,
        9: TensorProto.FLOAT16,
    }
    assert all(list(inits[node.input[i]].dims) == [0] for i in dtype_of)
    assert check_graph(model) == []
    onnx.checker.check_model(model)


def test_materialize_uses_float32_for_fp32_only_ports():
    inputs = ["x", "logits", "fc1", "", "fc2", "", "", "ids", "", "", "", ""]
    model = moe_model(moe_node(inputs))
    model.graph.node[0].input[6] = ""
    model.graph.node[0].input[8] = "ids"  # keep something after score_bias
    materialize_optional_inputs(model)
    node = model.graph.node[0]
    inits = {t.name: t for t in model.graph.initializer}
    assert inits[node.input[6]].data_type == TensorProto.FLOAT  # score_bias: float32 only


# ---- real torch exports -------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported():
    torch = pytest.importorskip("torch")

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    class LoopMoE(torch.nn.Module):
        """Top-1 MoE written the way model code usually is: mask, gather, index_add_."""

        def __init__(self, experts: int = 2):
            super().__init__()
            self.router = torch.nn.Linear(8, experts, bias=False)
            self.up = torch.nn.ModuleList(torch.nn.Linear(8, 16) for _ in range(experts))
            self.down = torch.nn.ModuleList(torch.nn.Linear(16, 8) for _ in range(experts))

        def forward(self, x):
            weight, idx = self.router(x).softmax(-1).topk(1, -1)
            out = torch.zeros_like(x)
            for e in range(len(self.up)):
                tok, slot = torch.where(idx == e)
                y = self.down[e](torch.relu(self.up[e](x[tok])))
                out.index_add_(0, tok, y * weight[tok, slot, None])
            return out

    torch.manual_seed(0)
    dims = {"x": {0: torch.export.Dim("T", max=64)}}

    def export(module):
        prog = torch.onnx.export(
            module.eval(),
            (torch.randn(6, 8),),
            dynamo=True,
            dynamic_shapes=dims,
            verbose=False,
        )
        return prog.model_proto

    return {"mlp": export(MLP()), "moe": export(LoopMoE())}


def test_exported_mlp_passes(exported):
    assert check_graph(exported["mlp"]) == []


def test_exported_moe_loop_is_flagged(exported):
    problems = check_graph(exported["moe"])
    assert any("ScatterND" in p and "'add'" in p for p in problems)
    assert any("NonZero on a bool" in p for p in problems)
