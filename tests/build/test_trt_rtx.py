"""Real TensorRT-RTX (CPU builder + ONNX parser) with the ffnx plugin library.

Parsing runs in a subprocess, so a parser or plugin abort fails the test instead of killing
pytest. Regression: gpt-moe exported with --target trt aborted in parse_from_file
(TensorRT-RTX's parser dlopens libtensorrt_rtx.so, which the pip wheel lacks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ffnx.build.trt_graph_check import materialize_optional_inputs

HELPER = Path(__file__).with_name("_rtx_parse.py")


def _parse(lib: Path, model_path: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, str(HELPER), str(lib), str(model_path)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    return r.returncode, r.stdout + r.stderr


def export_trt(name: str, out: Path) -> Path:
    """`ffnx export NAME --target trt --no-build` (tiny size) through the library API."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.models import zoo

    export_artifact(zoo.build(name, "tiny"), out, target="trt", force=True, size="tiny")
    return out


@pytest.fixture(scope="module")
def moe_artifact(tmp_path_factory, rtx) -> Path:
    return export_trt("gpt-moe", tmp_path_factory.mktemp("rtx") / "gpt-moe")


def test_gpt_moe_parse_does_not_abort(moe_artifact, plugin_lib, tmp_path):
    trt_graph = moe_artifact / "model.trt.onnx"  # the TensorRT graph beside the ORT one
    model = onnx.load(str(trt_graph if trt_graph.exists() else moe_artifact / "model.opt.onnx"))
    materialize_optional_inputs(model)
    assert sum(n.op_type == "FfnxMoE" for n in model.graph.node) == 2
    onnx.save(model, str(tmp_path / "m.onnx"))
    rc, out = _parse(plugin_lib, tmp_path / "m.onnx")
    assert rc == 0, out
    assert "PARSED True" in out, out


def test_build_engine_rtx_records_flavour_and_targets(moe_artifact, plugin_lib):
    from ffnx.build.engine import build_engine

    section = build_engine(moe_artifact, compute_capability="86,89", optimization_level=0,
                           workspace_gib=0.25, plugin_library=plugin_lib)  # fmt: skip
    assert section["flavour"] == "rtx"
    assert section["compute_capabilities"] == ["86", "89"]
    manifest = json.loads((moe_artifact / "manifest.json").read_text())
    assert manifest["tensorrt"]["flavour"] == "rtx"
    plan = (moe_artifact / "model.plan").read_bytes()
    assert plan.count(b"FfnxMoE") >= 2  # one plugin layer per MoE block


def test_rtx_refuses_unknown_compute_capability(moe_artifact, rtx):
    from ffnx.build.engine import build_engine
    from ffnx.errors import BackendError

    with pytest.raises(BackendError, match="--compute-capability '87'"):
        build_engine(moe_artifact, compute_capability="87")


def _moe_model(path: Path, **attrs) -> Path:
    E, D, H = 4, 8, 16
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((E, 2 * H, D)).astype(np.float32), "fc1"),
        numpy_helper.from_array(rng.standard_normal((E, D, H)).astype(np.float32), "fc2"),
    ]
    node = helper.make_node("FfnxMoE", ["x", "logits", "fc1", "", "fc2"], ["y"], domain="ffnx",
                            **attrs)  # fmt: skip
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, D]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [3, E])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, D])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("ffnx", 1)])  # fmt: skip
    materialize_optional_inputs(model)
    onnx.save(model, str(path))
    return path


def test_attributes_absent_take_the_defaults(plugin_lib, tmp_path):
    rc, out = _parse(plugin_lib, _moe_model(tmp_path / "m.onnx"))
    assert rc == 0 and "PARSED True" in out, out


@pytest.mark.parametrize(
    ("attrs", "needle"),
    [
        ({"top_k": "two"}, "top_k"),  # wrong type (string for an int field)
        ({"top_k": 0}, "top_k"),  # out of range
        ({"routing_mode": "bogus"}, "routing_mode"),
        ({"n_group": 40}, "n_group"),  # out of range: the kernels take at most 32 groups
        ({"scoring": 1.5}, "scoring"),  # wrong type (float for a string field)
    ],
)
def test_bad_attribute_is_a_clean_error_naming_the_field(plugin_lib, tmp_path, attrs, needle):
    rc, out = _parse(plugin_lib, _moe_model(tmp_path / "m.onnx", **attrs))
    assert rc == 0, out  # no abort
    assert "PARSED False" in out, out
    assert needle in out.replace("PARSED False", ""), out


def test_runtime_picks_tensorrt_rtx_for_an_rtx_plan(rtx):
    from ffnx.runtime.backends.trt import import_runtime

    assert import_runtime("rtx").__name__ == "tensorrt_rtx"


@pytest.mark.gpu
def test_rtx_engine_runs_and_matches_ort(moe_artifact, plugin_lib):
    """Needs an RTX-class GPU (SM 8.6/8.9/12.x) and a driver; skipped on CPU machines."""
    from ffnx.build.engine import build_engine
    from ffnx.runtime import Engine, cuda

    if not cuda.device_count():
        pytest.skip("no CUDA GPU")
    major, minor = cuda.compute_capability()
    build_engine(moe_artifact, compute_capability=f"{major}{minor}", plugin_library=plugin_lib)
    trt_engine = Engine.load(moe_artifact, backend="trt", plugin_library=plugin_lib)
    ids = np.random.default_rng(0).integers(0, 256, size=(1, 8), dtype=np.int64)
    feeds = {trt_engine.inputs[0].name: ids}
    got = next(iter(trt_engine.run(feeds).values()))
    want = next(iter(Engine.load(moe_artifact, backend="ort").run(feeds).values()))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_rtx_fp16_and_profile_override(moe_artifact, plugin_lib):
    from ffnx.build.engine import build_engine

    section = build_engine(moe_artifact, precision="fp16", profiles=["seq:1,8,32"],
                           optimization_level=0, workspace_gib=0.25,
                           plugin_library=plugin_lib)  # fmt: skip
    assert section["fp16_graph"] and section["strongly_typed"]  # the 11.x conversion path
    assert section["profiles"]["seq"] == [1, 8, 32]
    assert section["input_shapes"]["input_ids"][2][1] == 32  # max of the overridden range
    # TensorRT-RTX's timing-cache calls are no-ops: no cache file is written or claimed
    assert section["timing_cache"]["file"] is None
    assert not (moe_artifact / "timing.cache").exists()


def test_rtx_refuses_a_timing_cache_it_would_ignore(moe_artifact, tmp_path):
    from ffnx.build.engine import build_engine
    from ffnx.errors import PassError

    with pytest.raises(PassError, match="TensorRT-RTX has no timing cache"):
        build_engine(moe_artifact, timing_cache=tmp_path / "t.cache", flavour="rtx")
    assert not (tmp_path / "t.cache").exists()


def test_rtx_refuses_int8_calibration(moe_artifact, tmp_path):
    from ffnx.build.engine import build_engine
    from ffnx.errors import PassError

    np.savez(tmp_path / "c.npz", input_ids=np.zeros((1, 8), np.int64))
    with pytest.raises(PassError, match="TensorRT-RTX has no int8 calibration"):
        build_engine(moe_artifact, precision="int8", calib=tmp_path / "c.npz", flavour="rtx")


def test_missing_or_mismatched_plugin_library_is_a_clear_error(moe_artifact, plugin_lib, tmp_path):
    import shutil

    from ffnx.build.engine import build_engine
    from ffnx.errors import BackendError

    with pytest.raises(BackendError, match="not found"):
        build_engine(moe_artifact, plugin_library=tmp_path / "nope.so", flavour="rtx")
    foreign = tmp_path / "lib" / plugin_lib.name
    foreign.parent.mkdir()
    shutil.copyfile(plugin_lib, foreign)
    meta = json.loads(plugin_lib.with_name(plugin_lib.name + ".json").read_text())
    foreign.with_name(foreign.name + ".json").write_text(
        json.dumps({**meta, "tensorrt_headers": "10.3.0"})
    )
    with pytest.raises(BackendError, match="compiled against TensorRT 10.3.0 headers"):
        build_engine(moe_artifact, plugin_library=foreign, flavour="rtx")
