"""export_model: a weight that several If branches read is stored once, in the enclosing graph,
and the model computes what graphsurgeon's own export computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder, i64
from ffnx.graph.export import export_model, hoist_branch_initializers
from ffnx.graph.ort import ort_session
from ffnx.lowering import lower_moe_node
from ffnx.lowering.moe_model import MoEConfig, moe_feeds, moe_model, moe_weights

W = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)


def switch_graph(nested: bool) -> gs.Graph:
    """y = If(x.sum() > 0) x @ W else (nested: If(...) x @ W + 1 else x @ W - 1 | x @ W - 1)."""
    x = gs.Variable("x", np.float32, [2, 8])
    g = gs.Graph(inputs=[x], opset=18)
    w = gs.Constant("w", W)
    b = Builder(g, "t")

    def branch(add: float, inner: bool) -> gs.Graph:
        sub = gs.Graph(opset=18)
        sb = Builder(sub, f"b{add}{inner}")
        if inner:
            y = sb.op("If", sb.op("Greater", sb.op("ReduceMax", x, keepdims=0), np.float32(1.0)),
                      then_branch=branch(1.0, False), else_branch=branch(-1.0, False))  # fmt: skip
        else:
            y = sb.op("Add", sb.op("MatMul", x, w), np.float32(add))
        y.dtype = np.float32
        sub.outputs = [y]
        return sub

    cond = b.op("Greater", b.op("ReduceSum", x, i64(0, 1), keepdims=0), np.float32(0.0))
    y = b.op("If", cond, then_branch=branch(1.0, nested), else_branch=branch(-1.0, False))
    y.dtype, y.shape = np.float32, [2, 8]
    g.outputs = [y]
    return g


def _all_inits(graph: onnx.GraphProto) -> list[str]:
    names = [t.name for t in graph.initializer]
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                names += [f"{n.name}/{t}" for t in _all_inits(a.g)]
    return names


def test_branch_weights_are_stored_once_and_the_outputs_are_unchanged():
    for nested in (False, True):
        plain = gs.export_onnx(switch_graph(nested))
        plain.ir_version = max(plain.ir_version, 4)
        assert sum(i.endswith("w") for i in _all_inits(plain.graph)) == (3 if nested else 2)
        ours = export_model(switch_graph(nested))
        assert [t.name for t in ours.graph.initializer if t.name == "w"] == ["w"]
        assert sum(i.endswith("w") for i in _all_inits(ours.graph)) == 1
        onnx.checker.check_model(ours)
        rng = np.random.default_rng(1)
        for x in (rng.standard_normal((2, 8)), -np.abs(rng.standard_normal((2, 8))),
                  np.abs(rng.standard_normal((2, 8))) + 1):  # fmt: skip
            feeds = {"x": x.astype(np.float32)}
            want = ort_session(plain).run(None, feeds)[0]
            np.testing.assert_array_equal(ort_session(ours).run(None, feeds)[0], want)


def test_an_initializer_unlike_the_outer_one_of_its_name_stays_in_its_branch():
    from onnx import helper, numpy_helper

    def branch(value: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Add", ["x", "w"], ["y"])],
            "b",
            [],
            [helper.make_tensor_value_info("y", 1, [2])],
            [numpy_helper.from_array(np.full(2, value, np.float32), "w")],
        )

    outer = helper.make_graph(
        [helper.make_node("If", ["c"], ["z"], then_branch=branch(1.0), else_branch=branch(2.0))],
        "g", [helper.make_tensor_value_info("c", 9, []),
              helper.make_tensor_value_info("x", 1, [2])],
        [helper.make_tensor_value_info("z", 1, [2])])  # fmt: skip
    assert hoist_branch_initializers(outer) == 1
    assert [t.name for t in outer.initializer] == ["w"]
    moved = numpy_helper.to_array(outer.initializer[0]).tolist()
    kept = [numpy_helper.to_array(t).tolist() for a in outer.node[0].attribute
            for t in a.g.initializer]  # fmt: skip
    assert sorted([moved, *kept]) == [[1.0, 1.0], [2.0, 2.0]]  # the other one is not dropped


def _init_bytes(graph: onnx.GraphProto) -> int:
    total = sum(len(t.raw_data) for t in graph.initializer)
    for n in graph.node:
        total += sum(_init_bytes(a.g) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    return total


def test_a_moe_token_count_switch_stores_each_expert_weight_once():
    """sorted|4|per_expert: both branches read fc2[e] (stored once); per_expert's gate and up
    halves of fc1[e] are tensors of their own, sorted's whole fc1[e] another."""
    cfg = MoEConfig(D=16, H=32, E=4, k=2)
    w = moe_weights(cfg)
    fc1, fc2 = w["fc1_weight"].nbytes, w["fc2_weight"].nbytes
    feeds = {T: moe_feeds(cfg, T) for T in (2, 8)}  # each branch of the switch
    stored, outs = {}, {}
    for choice in ("sorted", "sorted|4|per_expert"):
        graph = gs.import_onnx(moe_model(cfg, w))
        for node in [n for n in graph.nodes if n.op == "FfnxMoE"]:
            lower_moe_node(graph, node, choice)
        graph.cleanup().toposort()
        model = export_model(graph)
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        stored[choice] = _init_bytes(model.graph)
        outs[choice] = {T: ort_session(model).run(None, f)[0] for T, f in feeds.items()}
    small = 1024  # routing constants
    assert fc1 + fc2 <= stored["sorted"] < fc1 + fc2 + small
    assert 2 * fc1 + fc2 <= stored["sorted|4|per_expert"] < 2 * fc1 + fc2 + small
    for T in feeds:
        np.testing.assert_allclose(outs["sorted|4|per_expert"][T], outs["sorted"][T], atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
