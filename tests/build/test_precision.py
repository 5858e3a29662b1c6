"""convert_to_fp16: fp16 compute, fp32 norms/softmax/reductions, unchanged I/O, exact structure.

Numerics run under onnx's reference evaluator (fixed seeds); fp16 tolerance rtol/atol 2e-2.
`onnx.checker.check_model(full_check=True)` runs strict type inference, so any dtype mismatch
a conversion leaves behind fails the test.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ffnx.build.precision import KEEP_FP32_OPS, convert_to_fp16, dtype_counts
from ffnx.build.trt_graph_check import elem_types
from ffnx.plugins import schema

RNG = np.random.default_rng(0)
F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def init(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def with_inits(text: str, *inits: onnx.TensorProto) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(inits)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    return ReferenceEvaluator(model).run(None, feeds)


def input_types(model: onnx.ModelProto, op: str) -> list[int]:
    types = elem_types(model)
    return [types[i] for n in model.graph.node if n.op_type == op for i in n.input if i]


BLOCK = """<ir_version: 9, opset_import: ["" : 18]>
g (float[N, 16] x) => (float[N, 16] y) {
    n = LayerNormalization <axis = -1> (x, ln_s, ln_b)
    h = MatMul(n, w1)
    a = Relu(h)
    o = MatMul(a, w2)
    p = Softmax <axis = -1> (o)
    y = Add(p, x)
}"""


def block() -> onnx.ModelProto:
    ln_s = numpy_helper.from_array(np.ones(16, np.float32), "ln_s")
    ln_b = numpy_helper.from_array(np.zeros(16, np.float32), "ln_b")
    return with_inits(BLOCK, ln_s, ln_b, init("w1", 16, 32), init("w2", 32, 16))


def test_matmuls_go_fp16_norm_and_softmax_stay_fp32_io_unchanged():
    ref = block()
    half = convert_to_fp16(ref)
    onnx.checker.check_model(half, full_check=True)
    assert set(input_types(half, "MatMul")) == {F16}
    assert set(input_types(half, "LayerNormalization")) == {F32}
    assert set(input_types(half, "Softmax")) == {F32}
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [F32]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [F32]
    assert dtype_counts(half) == {"float16": 16 * 32 * 2, "float32": 32}  # LN params stay
    x = RNG.standard_normal((5, 16)).astype(np.float32)
    (want,), (got,) = run(ref, x=x), run(half, x=x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    assert ref.graph.initializer[2].data_type == F32  # the input model is not modified


RMS = """<ir_version: 9, opset_import: ["" : 18]>
g (float[N, 16] x) => (float[N, 16] y) {
    h = MatMul(x, w0)
    two = Constant <value = float {2.0}> ()
    eps = Constant <value = float {1e-6}> ()
    sq = Pow(h, two)
    ms = ReduceMean <keepdims = 1> (sq, axes)
    v = Add(ms, eps)
    r = Sqrt(v)
    n = Div(h, r)
    y = MatMul(n, w)
}"""


def test_decomposed_rmsnorm_does_not_overflow_because_its_ops_stay_fp32():
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    w0 = numpy_helper.from_array(np.eye(16, dtype=np.float32) * 400, "w0")
    ref = with_inits(RMS, axes, w0, init("w", 16, 16))
    x = RNG.standard_normal((4, 16)).astype(np.float32)  # h = 400 x: h^2 > 65504 (fp16 max)
    (want,) = run(ref, x=x)
    (got,) = run(convert_to_fp16(ref), x=x)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    (naive,) = run(convert_to_fp16(ref, keep_ops=frozenset()), x=x)
    # fp16 h^2 overflows to inf, h / sqrt(inf) = 0: what keeping Pow/ReduceMean in fp32 avoids
    assert np.abs(naive - want).max() > 0.5
    assert {"Pow", "ReduceMean", "Sqrt", "Softmax", "LayerNormalization"} <= KEEP_FP32_OPS


def test_data_movement_stays_fp32_constants_convert_where_consumed_in_fp16():
    text = """<ir_version: 9, opset_import: ["" : 18]>
    g (float[N, 16] x, int64[N] ids) => (float[N, 16] y, float[N, 8] z) {
        t = Transpose <perm = [1, 0]> (x)
        back = Transpose <perm = [1, 0]> (t)
        y = LayerNormalization <axis = -1> (back, s, b)
        f = Cast <to = 1> (ids)
        c = Constant <value = float[1, 8] {1, 2, 3, 4, 5, 6, 7, 8}> ()
        e = Gather <axis = 0> (table, ids)
        g = Mul(e, c)
        f2 = Unsqueeze(f, one)
        z = Add(g, f2)
    }"""
    s = numpy_helper.from_array(np.ones(16, np.float32), "s")
    b = numpy_helper.from_array(np.zeros(16, np.float32), "b")
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    ref = with_inits(text, s, b, one, init("table", 10, 8))
    half = convert_to_fp16(ref)
    onnx.checker.check_model(half, full_check=True)
    ops = [n.op_type for n in half.graph.node]
    assert ops[:3] == ["Transpose", "Transpose", "LayerNormalization"]  # no cast around them
    cast_ids = next(n for n in half.graph.node if n.op_type == "Cast" and n.input[0] == "ids")
    assert cast_ids.attribute[0].i == F32  # int -> float stays fp32 (positions must not round)
    assert "Constant" not in ops  # its only consumer is fp16: it became an fp16 initializer
    inits = {t.name: t.data_type for t in half.graph.initializer}
    assert inits == {"s": F32, "b": F32, "one": TensorProto.INT64, "c_fp16": F16, "table_fp16": F16}
    assert ops.count("Cast") == 3  # ids -> fp32 (original), f2 -> fp16, z back to fp32
    ids = np.array([3, 0, 9], np.int64)
    x = RNG.standard_normal((3, 16)).astype(np.float32)
    for want, got in zip(run(ref, x=x, ids=ids), run(half, x=x, ids=ids)):
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


def test_initializer_shared_by_fp32_and_fp16_consumers_gets_an_fp16_copy():
    text = """<ir_version: 9, opset_import: ["" : 18]>
    g (float[N, 8] x) => (float[N, 8] y) {
        h = MatMul(x, w)
        k = Softmax(w)
        y = MatMul(h, k)
    }"""
    half = convert_to_fp16(with_inits(text, init("w", 8, 8)))
    onnx.checker.check_model(half, full_check=True)
    inits = {t.name: t.data_type for t in half.graph.initializer}
    assert inits == {"w": F32, "w_fp16": F16}


def test_ffnx_plugin_ports_fp16_except_fp32_only_ones():
    E, H, D = 2, 8, 4
    node = helper.make_node(
        "FfnxMoE",
        ["x", "logits", "fc1", "", "fc2", "", "sbias"],
        ["y"],
        domain=schema.DOMAIN,
        plugin_namespace="ffnx",
        plugin_version="1",
        scoring="sigmoid",
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("x", F32, ["T", D]),
            helper.make_tensor_value_info("logits", F32, ["T", E]),
        ],
        [helper.make_tensor_value_info("y", F32, ["T", D])],
        [init("fc1", E, 2 * H, D), init("fc2", E, D, H), init("sbias", E)],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(schema.DOMAIN, 1)]
    half = convert_to_fp16(helper.make_model(graph, opset_imports=opsets))
    moe = next(n for n in half.graph.node if n.op_type == "FfnxMoE")
    types = elem_types(half)
    casts = {n.output[0]: n.attribute[0].i for n in half.graph.node if n.op_type == "Cast"}
    dtype = {**types, **casts}
    assert [dtype.get(i) for i in moe.input] == [F16, F16, F16, None, F16, None, F32]
    assert moe.input[3] == "" and moe.input[6] == "sbias"
    final = half.graph.node[-1]
    assert final.op_type == "Cast" and final.output[0] == "y" and final.attribute[0].i == F32
