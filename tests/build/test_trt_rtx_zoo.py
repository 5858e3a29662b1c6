"""Every zoo model (tiny) -> `--target trt` graph -> real TensorRT-RTX parse with the ffnx
plugins -> real engine (CPU ahead-of-time build, SM86); MoE and sparse models keep their
plugin layers in the plan: the plugin layers of the parsed network (ffnx.build.plan_layers,
what `ffnx inspect` shows without a GPU), each found in the plan bytes by its layer name and
creator name. Set FFNX_RTX_TABLE=FILE to write build seconds, plan size, plugin layers and
TensorRT warnings per model (JSON lines)."""

from __future__ import annotations

import json
import os
import time

import pytest

from ffnx.models import zoo
from tests.build.test_trt_target_zoo import _trt_graph


def _build(trt, lib, model, spec):
    from ffnx.build.plan_layers import network_plugin_layers
    from ffnx.export.inputs import to_numpy

    warnings: list[str] = []

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                warnings.append(msg)

    logger = Logger()
    trt.get_plugin_registry().load_library(str(lib))
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString())
    assert ok, [parser.get_error(i).desc() for i in range(parser.num_errors)]
    layers = network_plugin_layers(trt, network, model)
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # as `ffnx build`
    config.builder_optimization_level = 0
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 28)
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM86, 0)
    profile = builder.create_optimization_profile()
    for name, arr in to_numpy(spec.inputs).items():
        profile.set_shape(name, arr.shape, arr.shape, arr.shape)
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    assert plan is not None, warnings
    plan = bytes(memoryview(plan))
    for layer in layers:  # every plugin layer of the network made it into the plan
        assert layer["name"].encode() in plan and layer["op"].encode() in plan, layer
    return plan, seconds, warnings, layers


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_builds_a_real_rtx_engine(tmp_path, rtx, plugin_lib, name):
    model, _ = _trt_graph(name, tmp_path)
    spec = zoo.build(name, "tiny")
    ffnx_ops = sorted({n.op_type for n in model.graph.node if n.domain == "ffnx"})
    plan, seconds, warnings, found = _build(rtx, plugin_lib, model, spec)
    layers = {op: sum(x["op"] == op for x in found) for op in ffnx_ops}
    n_nodes = {op: sum(n.op_type == op for n in model.graph.node) for op in ffnx_ops}
    assert layers == n_nodes  # one plugin layer per ffnx node
    if os.environ.get("FFNX_RTX_TABLE"):
        row = {"model": name, "build_s": round(seconds, 2), "plan_bytes": len(plan),
               "plugins": layers, "warnings": sorted(set(warnings))}  # fmt: skip
        with open(os.environ["FFNX_RTX_TABLE"], "a") as f:
            f.write(json.dumps(row) + "\n")


def _graph_of(spec, tmp_path, **optimize_kw):
    import onnx

    from ffnx.build.trt_graph_check import materialize_optional_inputs
    from ffnx.export.capture import captured
    from ffnx.export.inputs import to_numpy
    from ffnx.export.torch_export import export_onnx
    from ffnx.passes.optimize import optimize_model

    path = tmp_path / "model.onnx"
    with captured(spec.module, "trt"):
        export_onnx(spec, path)
    model, _ = optimize_model(onnx.load(str(path)), [to_numpy(spec.inputs)], target="trt",
                              **optimize_kw)  # fmt: skip
    materialize_optional_inputs(model)
    return model


def test_transformers_mixtral_builds_with_moe_plugin_layers(tmp_path, rtx, plugin_lib):
    pytest.importorskip("transformers")
    from ffnx.models.user import resolve
    from tests.models.test_hf import write_config

    cfg = write_config(tmp_path / "cfg", "mixtral", num_hidden_layers=2)
    spec = resolve(f"hf:{cfg}")
    model = _graph_of(spec, tmp_path)
    _, _, _, found = _build(rtx, plugin_lib, model, spec)
    assert [x["op"] for x in found] == ["FfnxMoE", "FfnxMoE"]


def test_sparsified_model_builds_with_sparse_plugin_layers(tmp_path, rtx, plugin_lib):
    spec = zoo.build("gpt-relu", "tiny")
    model = _graph_of(spec, tmp_path, passes=["sparsify_ffn"], max_error=10.0,
                      options={"sparsity": 0.5})  # fmt: skip
    assert sum(n.op_type == "FfnxSparseFFN" for n in model.graph.node) == 2
    _, _, _, found = _build(rtx, plugin_lib, model, spec)
    assert [x["op"] for x in found] == ["FfnxSparseFFN", "FfnxSparseFFN"]
