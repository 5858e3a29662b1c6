"""build_engine and TrtBackend.

- Everywhere: how each precision is obtained on TensorRT 10.x (builder flags, calibrator) and
  11.x (fp16 graph, Q/DQ), calibration inputs, and a clear error when TensorRT is missing.
- GPU: ffnx.runtime.cuda and TrtBackend's binding (numpy, DLPack zero-copy, `out=`, CUDA
  graphs, event timing) against a stand-in engine whose enqueue is a device copy.
- GPU + tensorrt: real builds of a small artifact (fp32/fp16; the code path of the installed
  major), run through TrtBackend and compared with numpy; the ffnx plugins when
  FFNX_PLUGIN_LIBRARY points at a built library.
"""

from __future__ import annotations

import json
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ffnx import artifact
from ffnx.build.engine import PrecisionPlan, build_engine, load_calibration, precision_plan
from ffnx.errors import BackendError, InputError, PassError
from ffnx.runtime import cuda
from ffnx.runtime.backends.trt import TrtBackend, cuda_view

requires_gpu = pytest.mark.skipif(cuda.device_count() == 0, reason="needs an NVIDIA GPU")


# ---- precision plans: the TensorRT 10.x and 11.x code paths -------------------------------


@pytest.mark.parametrize(
    "major,precision,qdq,calib,plan",
    [
        (10, "fp32", False, False, PrecisionPlan()),
        (11, "fp32", False, False, PrecisionPlan()),
        (10, "fp16", False, False, PrecisionPlan(flags=("FP16",))),
        (11, "fp16", False, False, PrecisionPlan(convert_fp16=True)),
        (10, "int8", True, False, PrecisionPlan(flags=("INT8", "FP16"))),
        (10, "int8", False, True, PrecisionPlan(flags=("INT8", "FP16"), calibrate=True)),
        (11, "int8", True, False, PrecisionPlan()),  # strongly typed: Q/DQ carry int8
        (10, "fp8", True, False, PrecisionPlan(flags=("FP8", "FP16"))),
        (11, "fp8", True, False, PrecisionPlan()),
    ],
)
def test_precision_plan(major, precision, qdq, calib, plan):
    assert precision_plan(major, precision, qdq, calib) == plan


@pytest.mark.parametrize(
    "major,precision,calib,match",
    [
        (10, "int8", False, "int8 needs calibration data: pass --data"),
        (11, "int8", True, "TensorRT 11.x needs a graph with Q/DQ nodes"),
        (10, "fp8", True, "fp8 needs a graph with Q/DQ nodes"),
        (10, "bf8", False, "choose one of fp32, fp16, int8, fp8"),
    ],
)
def test_precision_plan_refusals(major, precision, calib, match):
    with pytest.raises(PassError, match=match):
        precision_plan(major, precision, False, calib)


def test_load_calibration(tmp_path):
    np.savez(tmp_path / "b0.npz", x=np.ones((2, 8), np.float32))
    np.savez(tmp_path / "b1.npz", x=np.zeros((3, 8), np.float32))
    batches = load_calibration(tmp_path)
    assert [b["x"].shape for b in batches] == [(2, 8), (3, 8)]
    assert load_calibration(tmp_path / "b1.npz")[0]["x"].shape == (3, 8)
    assert load_calibration([{"x": np.ones(1)}])[0]["x"].shape == (1,)
    with pytest.raises(PassError, match="no .npz"):
        load_calibration(tmp_path / "empty")


def mlp_artifact(directory, seed: int = 0):
    """A tiny dynamic-batch MLP artifact written by hand: y = relu(x W1 + b1) W2 + b2."""
    rng = np.random.default_rng(seed)
    w = {
        "w1": rng.standard_normal((8, 16)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(16).astype(np.float32) * 0.1,
        "w2": rng.standard_normal((16, 8)).astype(np.float32) * 0.3,
        "b2": rng.standard_normal(8).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(directory / artifact.MODEL))
    manifest = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 8]}],
        "dynamic": {"x": {"0": "batch"}},
        "dims": {"batch": {"example": 4, "min": 1, "max": 32}},
        "plugins": [],
    }
    artifact.write_manifest(directory, manifest)

    def reference(x):
        return np.maximum(x @ w["w1"] + w["b1"], 0) @ w["w2"] + w["b2"]

    return reference


def test_build_without_tensorrt_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name in ("tensorrt", "tensorrt_rtx"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    monkeypatch.setattr("importlib.import_module", lambda n: no_tensorrt(n))
    mlp_artifact(tmp_path / "a")
    with pytest.raises(BackendError, match="needs a TensorRT builder"):
        build_engine(tmp_path / "a")
    with pytest.raises(BackendError, match="needs TensorRT Enterprise"):
        build_engine(tmp_path / "a", flavour="enterprise")
    with pytest.raises(BackendError, match=r"pip install 'ffnx\[trt-rtx\]'"):
        build_engine(tmp_path / "a", flavour="rtx")
    assert not (tmp_path / "a" / artifact.PLAN).exists()


def test_a_tensorrt_stub_that_fails_to_import_counts_as_absent(monkeypatch):
    from ffnx.build import flavour

    def broken(name):
        if name == "tensorrt":
            raise RuntimeError("stub wheel: libnvinfer.so not found")
        raise ImportError(name)

    monkeypatch.setattr("importlib.import_module", broken)
    with pytest.raises(BackendError, match="none imports here"):
        flavour.import_tensorrt("auto")


# ---- build_engine's orchestration against a recording stand-in for the tensorrt module -----


def fake_tensorrt(version: str, *, parse_ok: bool = True, build_ok: bool = True):
    """Just the API surface build_engine uses; records what it was asked to do."""
    major = int(version.split(".")[0])
    rec = types.SimpleNamespace(flags=[], shapes={}, parsed=None, pools={}, cache=None, vc=None)
    flag_names = ["SPARSE_WEIGHTS", "VERSION_COMPATIBLE"] + (["FP16", "INT8", "FP8"] * (major < 11))

    class ILogger:
        Severity = types.SimpleNamespace(ERROR=1)

        def __init__(self):
            pass

    class IProgressMonitor:
        def __init__(self):
            pass

    class Error:
        def node(self):
            return 3

        def node_name(self):
            return "scatter_3"

        def node_operator(self):
            return "ScatterND"

        def desc(self):
            return "unsupported reduction"

    class Parser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            rec.parsed = onnx.load(path)
            self.network.inputs = [
                types.SimpleNamespace(
                    name=i.name,
                    shape=[d.dim_value or -1 for d in i.type.tensor_type.shape.dim],
                )
                for i in rec.parsed.graph.input
            ]
            return parse_ok

        def get_error(self, i):
            return Error()

    class Network:
        inputs = []
        num_layers = 0  # no plugin layers recorded (network_plugin_layers)

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class Config:
        def set_flag(self, f):
            rec.flags.append(f)

        def set_memory_pool_limit(self, pool, size):
            rec.pools[pool] = size

        def add_optimization_profile(self, p):
            rec.profile_added = True
            return 0

        def create_timing_cache(self, data):
            rec.cache = bytearray(data) + b"+"
            return rec.cache

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: bytes(rec.cache))

        def __setattr__(self, name, value):
            if name == "plugins_to_serialize":
                rec.vc = value
            elif name == "progress_monitor":
                value.phase_start("Building", None, 2)
                value.step_complete("Building", 0)
                value.step_complete("Building", 1)
                value.phase_finish("Building")

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            rec.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            assert flags == 0  # explicit batch (10.x default), strongly typed (11.x only mode)
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if not build_ok:
                self.logger.log(1, "out of tactics")
                return None
            return b"PLAN:" + ",".join(rec.flags).encode()

    trt = types.SimpleNamespace(
        __version__=version,
        BuilderFlag=types.SimpleNamespace(**{n: n for n in flag_names}),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
        ProfilingVerbosity=types.SimpleNamespace(DETAILED="detailed"),
        ILogger=ILogger,
        IProgressMonitor=IProgressMonitor,
        Builder=Builder,
        OnnxParser=Parser,
    )
    return trt, rec


def initializer_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_fp16_build_uses_flags_on_10_and_an_fp16_graph_on_11(tmp_path, monkeypatch, version):
    trt, rec = fake_tensorrt(version)
    monkeypatch.setattr("ffnx.build.engine.import_tensorrt", lambda *a: trt)
    mlp_artifact(tmp_path / "a")
    phases = []
    section = build_engine(
        tmp_path / "a",
        precision="fp16",
        workspace_gib=0.5,
        timing_cache=tmp_path / "t.cache",
        progress=lambda *p: phases.append(p),
    )
    eleven = version.startswith("11")
    assert rec.flags == ([] if eleven else ["FP16"])
    want = {TensorProto.FLOAT16} if eleven else {TensorProto.FLOAT}
    assert initializer_types(rec.parsed) == want  # the graph TensorRT parsed
    assert [i.type.tensor_type.elem_type for i in rec.parsed.graph.input] == [TensorProto.FLOAT]
    assert rec.shapes == {"x": ((1, 8), (4, 8), (32, 8))} and rec.pools == {"workspace": 2**29}
    assert phases == [
        ("Building", 0, 2),
        ("Building", 1, 2),
        ("Building", 2, 2),
        ("Building", 2, 2),
    ]
    assert (tmp_path / "t.cache").read_bytes() == b"+"
    plan = (tmp_path / "a" / artifact.PLAN).read_bytes()
    assert plan == b"PLAN:" + (b"" if eleven else b"FP16")
    manifest = artifact.read_manifest(tmp_path / "a")
    assert manifest["tensorrt"] == section and manifest["versions"]["tensorrt"] == version
    assert manifest["files"][artifact.PLAN] == artifact.sha256(tmp_path / "a" / artifact.PLAN)
    assert section["fp16_graph"] is eleven and section["strongly_typed"] is eleven
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".trt-build")]


def test_plugin_graph_loads_the_library_and_fills_optional_inputs(tmp_path, monkeypatch):
    trt, rec = fake_tensorrt("10.3.0")
    monkeypatch.setattr("ffnx.build.engine.import_tensorrt", lambda *a: trt)
    lib = tmp_path / "libffnx_trt_plugins.so"
    lib.write_bytes(b"not really a library")
    loaded = []
    monkeypatch.setattr(
        "ffnx.plugins.trt_build.load_plugin_library", lambda m, p: loaded.append(p) or lib
    )
    d = tmp_path / "moe"
    mlp_artifact(d)
    model = onnx.load(str(d / artifact.MODEL))
    node = helper.make_node(
        "FfnxSparseFFN",
        ["y", "", "wu", "", "wd"],
        ["z"],
        domain="ffnx",
        mode="topk",
        k=4,
        plugin_namespace="ffnx",
        plugin_version="1",
    )
    model.graph.node.append(node)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((16, 8), np.float32), "wu"),
            numpy_helper.from_array(np.zeros((8, 16), np.float32), "wd"),
        ]
    )
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("ffnx", 1))
    onnx.save(model, str(d / artifact.MODEL))
    section = build_engine(d, version_compatible=True, plugin_library=lib)
    assert loaded == [lib] and rec.vc == [str(lib)]
    assert section["plugin_library_sha256"] == artifact.sha256(lib)
    parsed = next(n for n in rec.parsed.graph.node if n.op_type == "FfnxSparseFFN")
    assert len(parsed.input) == 5 and "" not in parsed.input  # w_gate/b_up: [0] initializers
    assert rec.flags == ["VERSION_COMPATIBLE"]


def test_parser_and_builder_failures_leave_no_plan(tmp_path, monkeypatch):
    mlp_artifact(tmp_path / "a")
    before = artifact.read_manifest(tmp_path / "a")
    trt, _ = fake_tensorrt("11.4.0", parse_ok=False)
    monkeypatch.setattr("ffnx.build.engine.import_tensorrt", lambda *a: trt)
    with pytest.raises(BackendError, match="node 'scatter_3' \\(ScatterND\\): unsupported"):
        build_engine(tmp_path / "a")
    trt, _ = fake_tensorrt("11.4.0", build_ok=False)
    monkeypatch.setattr("ffnx.build.engine.import_tensorrt", lambda *a: trt)
    with pytest.raises(BackendError, match="failed to build the engine: out of tactics"):
        build_engine(tmp_path / "a")
    with pytest.raises(PassError, match="Q/DQ"):
        build_engine(tmp_path / "a", precision="int8")
    assert not (tmp_path / "a" / artifact.PLAN).exists()
    assert artifact.read_manifest(tmp_path / "a") == before


def test_graphs_the_parser_rejects_stop_before_parsing(tmp_path, monkeypatch):
    trt, rec = fake_tensorrt("10.3.0")
    monkeypatch.setattr("ffnx.build.engine.import_tensorrt", lambda *a: trt)
    d = tmp_path / "a"
    mlp_artifact(d)
    model = onnx.load(str(d / artifact.MODEL))
    model.graph.node[-1].output[0] = "y0"
    idx = numpy_helper.from_array(np.zeros((1, 1), np.int64), "idx")
    upd = numpy_helper.from_array(np.zeros((1, 8), np.float32), "upd")
    model.graph.initializer.extend([idx, upd])
    scatter = helper.make_node("ScatterND", ["y0", "idx", "upd"], ["y"], reduction="add")
    model.graph.node.append(scatter)
    onnx.save(model, str(d / artifact.MODEL))
    with pytest.raises(BackendError, match="cannot be parsed by TensorRT: .*reduction='add'"):
        build_engine(d)
    assert rec.parsed is None


# ---- GPU: the CUDA binding and TrtBackend's binding, no TensorRT needed --------------------


@requires_gpu
def test_cuda_binding_copies_times_and_captures():
    cc = cuda.compute_capability()
    assert cc >= (7, 0) and cuda.device_name()
    stream, a, b = cuda.Stream(), cuda.DeviceBuffer(), cuda.DeviceBuffer()
    x = np.arange(1024, dtype=np.float32)
    a.copy_from(x, stream)
    b.ensure(x.nbytes)
    graph = cuda.GraphExec(
        stream, lambda: cuda.memcpy_async(b.ptr, a.ptr, x.nbytes, cuda.D2D, stream.handle)
    )
    start, end = cuda.Event(), cuda.Event()
    start.record(stream)
    graph.launch(stream)
    end.record(stream)
    y = b.copy_to(np.empty_like(x), stream)
    stream.synchronize()
    np.testing.assert_array_equal(y, x)
    assert end.elapsed_ms(start) >= 0


class _CopyEngine:
    """Stand-in for a TensorRT engine: y = x for float32 [batch, 8], batch in 1..16."""

    def __init__(self):
        self.num_io_tensors = 2

    def get_tensor_name(self, i):
        return ("x", "y")[i]

    def get_tensor_mode(self, name):
        return "in" if name == "x" else "out"

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name="FLOAT")

    def get_tensor_shape(self, name):
        return (-1, 8)

    def get_tensor_profile_shape(self, name, profile):
        return [(1, 8), (4, 8), (16, 8)]

    def create_execution_context(self):
        return _CopyContext()


class _CopyContext:
    def __init__(self):
        self.shape, self.addr, self.launches = None, {}, 0

    def set_input_shape(self, name, shape):
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shape

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def get_tensor_address(self, name):
        return self.addr[name]

    def execute_async_v3(self, stream):
        self.launches += 1
        nbytes = int(np.prod(self.shape)) * 4
        cuda.memcpy_async(self.addr["y"], self.addr["x"], nbytes, cuda.D2D, stream)
        return True


def copy_backend(cuda_graph: bool) -> TrtBackend:
    trt = types.SimpleNamespace(TensorIOMode=types.SimpleNamespace(INPUT="in"))
    manifest = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]}
    return TrtBackend(trt, _CopyEngine(), manifest, cuda_graph, "copy.plan")


@requires_gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_backend_binds_numpy_and_checks_profile_and_dtype(cuda_graph):
    be = copy_backend(cuda_graph)
    assert [i.describe() for i in be.inputs] == ["x: float32[batch, 8]"]
    assert [o.describe() for o in be.outputs] == ["y: float32[y.0, 8]"]
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    for _ in range(3):  # graph mode: first run eager + capture, then replays
        np.testing.assert_array_equal(be.run({"x": x})["y"], x)
    x2 = x[:3] * 2
    np.testing.assert_array_equal(be.run({"x": x2})["y"], x2)  # new shape: recapture
    times = be.time_gpu({"x": x}, iters=5, warmup=1)
    assert len(times) == 5 and all(t >= 0 for t in times)
    with pytest.raises(InputError, match=r"outside the engine's profile \(1, 8\)..\(16, 8\)"):
        be.run({"x": np.zeros((17, 8), np.float32)})
    with pytest.raises(InputError, match="is float64, the engine takes float32"):
        be.run({"x": x.astype(np.float64)})
    be.close()


@requires_gpu
def test_backend_binds_torch_cuda_tensors_zero_copy():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    be = copy_backend(cuda_graph=False)
    x = torch.randn(6, 8, device="cuda")
    ptr, shape, dtype, _ = cuda_view(x[2:], be.stream.handle)
    assert (ptr, shape, dtype) == (x[2:].data_ptr(), (4, 8), "float32")
    bf16 = torch.zeros(2, device="cuda", dtype=torch.bfloat16)
    assert cuda_view(bf16, be.stream.handle)[2] == "bfloat16"
    assert cuda_view(x.cpu(), be.stream.handle) is None
    with pytest.raises(InputError, match="contiguous"):
        cuda_view(torch.randn(8, 6, device="cuda").T, be.stream.handle)
    out = torch.empty(6, 8, device="cuda")
    res = be.run({"x": x}, out={"y": out})
    assert res["y"] is out and torch.equal(out, x)
    assert be.context.addr["x"] == x.data_ptr()  # bound in place, no staging copy
    np.testing.assert_array_equal(be.run({"x": x})["y"], x.cpu().numpy())


# ---- GPU + TensorRT: real engines ---------------------------------------------------------


@pytest.fixture
def trt():
    mod = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if cuda.device_count() == 0:
        pytest.skip("needs an NVIDIA GPU")
    return mod


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_build_and_run_an_engine(trt, tmp_path, precision, tol):
    reference = mlp_artifact(tmp_path / "a")
    phases = []
    section = build_engine(
        tmp_path / "a",
        precision=precision,
        timing_cache=tmp_path / "timing.cache",
        profiles=["batch:1,4,16"],
        progress=lambda phase, step, steps: phases.append(phase),
    )
    major = int(trt.__version__.split(".")[0])
    assert section["precision"] == precision and section["strongly_typed"] == (major >= 11)
    if precision == "fp16":
        assert section["fp16_graph"] == (major >= 11)
        assert section["builder_flags"] == ([] if major >= 11 else ["FP16"])
    assert section["profiles"] == {"batch": [1, 4, 16]}
    assert section["input_shapes"] == {"x": [[1, 8], [4, 8], [16, 8]]}
    assert (tmp_path / "timing.cache").stat().st_size > 0 and phases
    manifest = artifact.read_manifest(tmp_path / "a")
    assert manifest["tensorrt"] == section and artifact.PLAN in manifest["files"]
    be = TrtBackend.load(str(tmp_path / "a" / artifact.PLAN))
    x = np.random.default_rng(1).standard_normal((7, 8)).astype(np.float32)
    np.testing.assert_allclose(be.run({"x": x})["y"], reference(x), rtol=tol, atol=tol)
    with pytest.raises(InputError, match="outside the engine's profile"):
        be.run({"x": np.zeros((17, 8), np.float32)})
    assert len(be.time_gpu({"x": x}, iters=3)) == 3


@pytest.mark.gpu
def test_int8_without_calibration_or_qdq_is_refused(trt, tmp_path):
    mlp_artifact(tmp_path / "a")
    major = int(trt.__version__.split(".")[0])
    match = "Q/DQ" if major >= 11 else "calibration data"
    with pytest.raises(PassError, match=match):
        build_engine(tmp_path / "a", precision="int8")
    assert not (tmp_path / "a" / artifact.PLAN).exists()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "groups", [{}, dict(n_group=2, topk_group=1, group_scoring="top2_sum")], ids=["plain", "groups"]
)
def test_moe_plugin_engine_matches_the_reference(trt, tmp_path, groups):
    import os

    if not os.environ.get("FFNX_PLUGIN_LIBRARY"):
        pytest.skip("set FFNX_PLUGIN_LIBRARY to a library built by `ffnx plugins build`")
    torch = pytest.importorskip("torch")
    from ffnx.plugins import reference, schema

    E, H, D, T = 4, 32, 64, 5
    g = torch.Generator().manual_seed(0)
    w = {
        "fc1": torch.randn(E, 2 * H, D, generator=g) * 0.1,
        "fc2": torch.randn(E, D, H, generator=g) * 0.1,
    }
    node = helper.make_node(
        "FfnxMoE",
        ["x", "logits", "fc1", "", "fc2"],
        ["y"],
        domain=schema.DOMAIN,
        num_experts=E,
        top_k=2,
        activation="swiglu",
        **groups,  # group-limited routing: plugin fields n_group, topk_group, group_scoring
        plugin_namespace="ffnx",
        plugin_version="1",
    )
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "moe",
        [
            helper.make_tensor_value_info("x", f32, ["tokens", D]),
            helper.make_tensor_value_info("logits", f32, ["tokens", E]),
        ],
        [helper.make_tensor_value_info("y", f32, ["tokens", D])],
        [numpy_helper.from_array(v.numpy(), k) for k, v in w.items()],
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(schema.DOMAIN, 1)]
    d = tmp_path / "moe"
    d.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(d / artifact.MODEL))
    artifact.write_manifest(
        d,
        {
            "inputs": [
                {"name": "x", "dtype": "float32", "shape": ["tokens", D]},
                {"name": "logits", "dtype": "float32", "shape": ["tokens", E]},
            ],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["tokens", D]}],
            "dims": {"tokens": {"example": T, "min": 1, "max": 64}},
            "plugins": ["FfnxMoE"],
        },
    )
    section = build_engine(d)
    assert section["plugin_library_sha256"]
    be = TrtBackend.load(str(d / artifact.PLAN))
    x, logits = torch.randn(T, D, generator=g), torch.randn(T, E, generator=g)
    got = be.run({"x": x.numpy(), "logits": logits.numpy()})["y"]
    want = reference.moe_reference(
        x, logits, w["fc1"], None, w["fc2"], *[None] * 6, num_experts=E, top_k=2, **groups
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-3)


def test_timing_cache_defaults_to_the_artifact_and_the_rebuild_reads_it(tmp_path, monkeypatch):
    """Enterprise builds keep DIR/timing.cache; the next build creates its cache from it."""
    trt, rec = fake_tensorrt("10.3.0")
    monkeypatch.setattr("ffnx.build.engine.import_tensorrt", lambda *a: trt)
    mlp_artifact(tmp_path / "a")
    first = build_engine(tmp_path / "a")["timing_cache"]
    assert first == {"file": "timing.cache", "read_bytes": 0, "written_bytes": 1}
    second = build_engine(tmp_path / "a")["timing_cache"]
    assert second["read_bytes"] == first["written_bytes"]
    assert bytes(rec.cache) == b"++"  # the fake appends "+" to the bytes it was created from
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "timing.cache" in manifest["files"]


def test_select_profile_switches_to_the_profile_holding_the_shapes():
    """TrtBackend with two optimization profiles picks, per call, one whose ranges fit."""
    from ffnx.errors import InputError
    from ffnx.runtime.backends.trt import TrtBackend

    switched = []
    backend = TrtBackend.__new__(TrtBackend)
    backend.context = types.SimpleNamespace(
        set_optimization_profile_async=lambda k, s: switched.append(k) or True
    )
    backend.stream = types.SimpleNamespace(handle=0)
    backend._profiles = [{"x": ((1, 2), (8, 64))}, {"x": ((1, 1), (1, 1))}]
    backend._profile, backend._bounds = 0, backend._profiles[0]
    backend._select_profile({"x": (4, 16)})
    assert switched == [] and backend._profile == 0
    backend._select_profile({"x": (1, 1)})  # only profile 1 takes seq 1
    assert switched == [1] and backend._bounds == {"x": ((1, 1), (1, 1))}
    backend._select_profile({"x": (1, 1)})  # stays
    assert switched == [1]
    backend._select_profile({"x": (2, 8)})
    assert switched == [1, 0]
    backend._select_profile({"x": (16, 8)})  # fits none: the current bounds report it
    with pytest.raises(InputError, match="outside the engine's profile"):
        backend._check_bounds("x", (16, 8))


def _inspector_trt(engine_json: str | None):
    """A stand-in TensorRT whose runtime deserializes (or, with None, fails like CPU-only RTX)."""

    class ILogger:
        Severity = types.SimpleNamespace(ERROR=1, WARNING=2)

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, plan):
            if engine_json is None:
                self.logger.log(1, "IRuntime::deserializeCudaEngine: Error Code 1: cudaError 35")
                return None
            inspector = types.SimpleNamespace(get_engine_information=lambda fmt: engine_json)
            return types.SimpleNamespace(create_engine_inspector=lambda: inspector)

    formats = types.SimpleNamespace(JSON="json")
    return types.SimpleNamespace(__name__="tensorrt", __version__="10.3.0", ILogger=ILogger,
                                 Runtime=Runtime, LayerInformationFormat=formats)  # fmt: skip


def test_inspector_layers_reads_the_engine_inspector_json():
    from ffnx.build.plan_layers import inspector_layers

    info = {"Layers": [{"Name": "node__symbolic", "LayerType": "PluginV3", "Plugin": "FfnxMoE"},
                       {"Name": "mm", "LayerType": "CaskGemmMatrixMultiply"}]}  # fmt: skip
    layers, why = inspector_layers(_inspector_trt(json.dumps(info)), b"plan")
    assert why == "" and [x["plugin"] for x in layers] == [True, False]
    layers, why = inspector_layers(_inspector_trt(None), b"plan")
    assert layers is None and "cannot deserialize" in why and "cudaError 35" in why
