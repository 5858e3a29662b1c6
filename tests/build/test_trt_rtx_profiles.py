"""Real TensorRT-RTX builds (CPU, ahead of time): several optimization profiles, `ffnx inspect`
showing the plan's plugin layers, and plugin libraries that cannot serve a build target. (The
timing cache is an Enterprise feature, tested in test_trt_builder.py: TensorRT-RTX's timing-
cache calls are no-ops.)"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from ffnx.cli import main
from tests.build.test_trt_rtx import export_trt

FAST = dict(optimization_level=0, workspace_gib=0.25, compute_capability="86")


@pytest.fixture(scope="module")
def moe(tmp_path_factory, rtx):
    return export_trt("gpt-moe", tmp_path_factory.mktemp("rtxp") / "gpt-moe")


def test_two_optimization_profiles_built_for_real(moe, plugin_lib):
    from ffnx.build.engine import build_engine

    section = build_engine(moe, profiles=["seq:2,16,64"], extra_profiles=["batch:1,1,1 seq:1,1,1"],
                           plugin_library=plugin_lib, **FAST)  # fmt: skip
    assert section["num_optimization_profiles"] == 2  # what the builder config held
    first, decode = section["optimization_profiles"]
    assert first["input_shapes"]["input_ids"] == [[1, 2], [2, 16], [8, 64]]
    assert decode["input_shapes"]["input_ids"] == [[1, 1], [1, 1], [1, 1]]
    assert (moe / "model.plan").stat().st_size > 0


def test_cli_add_profile_and_inspect_shows_plugin_layers(moe, plugin_lib):
    args = ["build", str(moe), "--trt", "rtx", "--compute-capability", "86",
            "--optimization-level", "0", "--workspace", "256", "--plugin-library",
            str(plugin_lib), "--add-profile", "batch:1,1,1 seq:1,1,1", "--force"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "2 optimization profile(s)" in res.output
    res = CliRunner().invoke(main, ["inspect", str(moe), "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)["plan"]
    layers = plan["plugin_layers"]
    if plan["source"].startswith("IEngineInspector"):  # a GPU deserialized the plan
        assert len(layers) >= 2
    else:  # CPU only: TensorRT-RTX cannot deserialize without a CUDA device
        assert plan["source"] == "build network, checked against the plan bytes"
        assert "cannot deserialize" in plan["note"]
        assert [x["op"] for x in layers] == ["FfnxMoE", "FfnxMoE"]
        assert all(x["in_plan"] and x["layer_type"] == "PLUGIN_V3" for x in layers)
    text = CliRunner().invoke(main, ["inspect", str(moe)]).output
    assert "plan plugin layers" in text and "FfnxMoE" in text


def test_plugin_library_without_code_for_a_build_target_is_refused(moe, plugin_lib, tmp_path):
    from ffnx.build.engine import build_engine
    from ffnx.errors import BackendError

    lib = tmp_path / plugin_lib.name
    shutil.copyfile(plugin_lib, lib)
    meta = json.loads(plugin_lib.with_name(plugin_lib.name + ".json").read_text())
    lib.with_name(lib.name + ".json").write_text(json.dumps({**meta, "archs": ["86"]}))
    before = (moe / "manifest.json").read_bytes()
    with pytest.raises(BackendError, match="cannot run on the build target sm_75"):
        build_engine(moe, plugin_library=lib, **{**FAST, "compute_capability": "75"})
    assert (moe / "manifest.json").read_bytes() == before  # nothing half-written


def test_cli_plugin_library_wrong_path_is_one_error_line(moe):
    res = CliRunner().invoke(main, ["build", str(moe), "--trt", "rtx", "--plugin-library",
                                    "/nonexistent/libffnx_trt_plugins.so"])  # fmt: skip
    assert res.exit_code == 2 and "does not exist" in res.output


@pytest.mark.parametrize(
    ("sidecar", "cc", "needle"),
    [
        ({"tensorrt_headers": "10.3.0"}, "86", "compiled against TensorRT 10.3.0 headers"),
        ({"archs": ["86"]}, "75", "cannot run on the build target sm_75"),
    ],
)
def test_cli_mismatched_plugin_library_is_one_error_line(moe, plugin_lib, tmp_path, sidecar, cc,
                                                         needle):  # fmt: skip
    lib = tmp_path / plugin_lib.name
    shutil.copyfile(plugin_lib, lib)
    meta = json.loads(plugin_lib.with_name(plugin_lib.name + ".json").read_text())
    lib.with_name(lib.name + ".json").write_text(json.dumps({**meta, **sidecar}))
    plan = (moe / "model.plan").read_bytes() if (moe / "model.plan").exists() else None
    args = ["build", str(moe), "--trt", "rtx", "--force", "--compute-capability", cc,
            "--plugin-library", str(lib)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 1 and len(errors) == 1 and needle in errors[0], res.output
    if plan is not None:  # the previous plan is untouched
        assert (moe / "model.plan").read_bytes() == plan
