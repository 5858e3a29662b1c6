"""Every zoo model's graph for `--target trt` holds only ops TensorRT's ONNX parser supports
plus ffnx plugin nodes (MoE models keep one FfnxMoE node per layer; a sparsified FFN keeps its
FfnxSparseFFN node)."""

from __future__ import annotations

import onnx
import pytest

from ffnx.build.trt_graph_check import check_graph, materialize_optional_inputs
from ffnx.models import zoo


def _trt_graph(name: str, tmp_path, passes=None, max_error=None, options=None):
    from ffnx.export.capture import captured
    from ffnx.export.inputs import to_numpy
    from ffnx.export.torch_export import export_onnx
    from ffnx.passes.optimize import optimize_model

    spec = zoo.build(name, "tiny")
    path = tmp_path / "model.onnx"
    with captured(spec.module, "trt"):
        export_onnx(spec, path)
    feeds = [to_numpy(spec.inputs)]
    model, reports = optimize_model(
        onnx.load(str(path)),
        feeds,
        passes=passes,
        target="trt",
        max_error=max_error,
        options=options,
    )
    materialize_optional_inputs(model)
    return model, reports


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_graph_for_trt_is_parsable(tmp_path, name):
    model, reports = _trt_graph(name, tmp_path)
    assert check_graph(model) == []
    moe_nodes = [n for n in model.graph.node if n.op_type == "FfnxMoE"]
    if "moe" in zoo.describe(name, "tiny")["variant"]:
        assert len(moe_nodes) >= 2  # one per MoE layer, kept for the TensorRT plugin
        assert all(n.domain == "ffnx" for n in moe_nodes)
        assert not any(n.op_type in ("NonZero", "ScatterND") for n in model.graph.node)


@pytest.mark.slow
def test_sparsified_graph_for_trt_keeps_the_plugin_node(tmp_path):
    model, reports = _trt_graph(
        "gpt-relu", tmp_path, passes=["sparsify_ffn"], max_error=10.0, options={"sparsity": 0.5}
    )
    sparse = [n for n in model.graph.node if n.op_type == "FfnxSparseFFN"]
    assert len(sparse) == 2 and check_graph(model) == []
