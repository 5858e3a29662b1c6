"""Regression tests for the bugs of issue 12 (each failed before its fix)."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _runtime_example() -> str:
    text = README.read_text()
    section = text.split("### The runtime API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_runtime_example_runs_verbatim(tmp_path):
    """README's runtime example, exec'd as written, after exporting gpt-swiglu."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.zoo import build

    export_artifact(build("gpt-swiglu"), tmp_path / "artifacts" / "gpt-swiglu", optimize=False)
    code = _runtime_example()
    assert 'Engine.load("artifacts/gpt-swiglu")' in code and '["logits"]' in code
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["logits"].shape[:2] == (1, 16)


def test_output_names_from_dict_keys(tmp_path):
    import torch

    from ffnx.export.pipeline import export_artifact
    from ffnx.models.spec import ModelSpec

    class Two(torch.nn.Module):
        def forward(self, x):
            return {"scores": x * 2, "hidden": x + 1}

    spec = ModelSpec("two", Two(), {"x": torch.randn(2, 4)})
    m = export_artifact(spec, tmp_path / "a", optimize=False)
    assert [o["name"] for o in m["outputs"]] == ["scores", "hidden"]


def test_lowering_errors_join_the_ffnx_family():
    from ffnx.errors import FfnxError
    from ffnx.export.moe_hf import Refused
    from ffnx.lowering.moe_common import LoweringError
    from ffnx.lowering.sparse import SparseLoweringError

    for cls in (LoweringError, SparseLoweringError, Refused):
        assert issubclass(cls, FfnxError), cls


def test_escaping_lowering_error_is_one_error_line(monkeypatch, tmp_path, mlp_artifact):
    """A LoweringError escaping a command prints `error: ...` and exits 1 (not 3)."""
    from click.testing import CliRunner

    from ffnx.cli import main
    from ffnx.lowering.moe_common import LoweringError

    def boom(*a, **k):
        raise LoweringError("node moe0: cannot lower")

    monkeypatch.setattr("ffnx.passes.optimize.optimize_model", boom)
    r = CliRunner().invoke(main, ["optimize", str(mlp_artifact)])
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines()[-1] == "error: node moe0: cannot lower"


def test_export_approximate_pass_does_not_quote_other_commands_flags(tmp_path, user_model_file):
    from click.testing import CliRunner

    from ffnx.cli import main

    r = CliRunner().invoke(
        main,
        ["export", f"{user_model_file}:build", "--passes", "ffn_fusion", "-o", str(tmp_path / "a")],
    )
    assert r.exit_code == 1, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error:") and "--max-error" not in line, line


def test_optimize_after_moefy_keeps_the_moefied_graph(tmp_path, mlp_artifact):
    """`ffnx optimize DIR` after `ffnx moefy DIR` starts from the MoEfied model.opt.onnx."""
    import shutil

    import onnx
    from click.testing import CliRunner

    from ffnx import artifact
    from ffnx.cli import main

    d = tmp_path / "a"
    shutil.copytree(mlp_artifact, d)
    runner = CliRunner()
    for args in (["calibrate", str(d)], ["moefy", str(d), "--experts", "4", "--top-k", "2"]):
        r = runner.invoke(main, args)
        assert r.exit_code == 0, (args, r.output)

    def moe_nodes():
        m = onnx.load(str(d / artifact.MODEL_OPT))
        return sum(n.op_type == "FfnxMoE" or "moe" in n.name.lower() for n in m.graph.node)

    before = moe_nodes()
    assert before > 0
    m = artifact.read_manifest(d)  # the MoEfied graph records what it was made from
    want = {n: m["files"][n] for n in (artifact.MODEL, "calibration.npz")}
    assert m["made_from"][artifact.MODEL_OPT] == want
    r = runner.invoke(main, ["optimize", str(d)])
    assert r.exit_code == 1 and "exists; give --force" in r.output  # never replaced silently
    r = runner.invoke(main, ["optimize", str(d), "--force"])
    assert r.exit_code == 0, r.output
    assert moe_nodes() > 0
    assert "moefy" in artifact.read_manifest(d)


def test_run_auto_threads_with_a_plan_uses_trt_without_threads(tmp_path, mlp_artifact, monkeypatch):
    """`ffnx run DIR --backend auto --threads N` with a plan: no TypeError; threads is ORT-only."""
    import shutil

    from click.testing import CliRunner

    from ffnx import artifact
    from ffnx.cli import main
    from ffnx.runtime.backends import trt
    from ffnx.runtime.backends.ort import OrtBackend

    d = tmp_path / "a"
    shutil.copytree(mlp_artifact, d)
    (d / artifact.PLAN).write_bytes(b"fake plan")
    artifact.write_manifest(d, artifact.read_manifest(d))
    seen = {}

    def fake_load(cls, path, plugin_library=None, cuda_graph=False):  # TrtBackend.load's signature
        seen["path"] = path
        backend = OrtBackend.load(str(d / artifact.MODEL))
        backend.name = "trt"
        return backend

    monkeypatch.setattr("ffnx.runtime.engine._trt_usable", lambda: True)
    monkeypatch.setattr(trt.TrtBackend, "load", classmethod(fake_load))
    r = CliRunner().invoke(
        main, ["run", str(d), "--backend", "auto", "--threads", "2", "-o", str(tmp_path / "o")]
    )
    assert r.exit_code == 0, r.output
    assert seen["path"].endswith(artifact.PLAN)


def _scaled_spec(factor: float):
    import torch

    from ffnx.models.spec import ModelSpec

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc1, self.fc2 = torch.nn.Linear(8, 256), torch.nn.Linear(256, 512)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)) * factor)

    return ModelSpec("big", Big().eval(), {"x": torch.randn(16, 8)}, {"x": {0: "batch"}})


def test_export_of_large_activations_passes_verification(tmp_path):
    """Hidden activations * 1e12 (outputs ~1e12): fp32 reordering errors ~1e-7 of the scale."""
    from ffnx.export.pipeline import export_artifact

    m = export_artifact(_scaled_spec(1e12), tmp_path / "a", optimize=False)
    assert m["export"]["verification"][0]["outputs"]["output"]["ref_max"] > 1e11


def test_comparator_scale_aware_and_still_catches_wrong_outputs():
    import numpy as np

    from ffnx.graph import verify

    rng = np.random.default_rng(0)
    ref = (rng.standard_normal((4, 64)) * 1e15).astype(np.float32)
    close = ref * (1 + 1e-7 * rng.standard_normal(ref.shape)).astype(np.float32)
    ok, report = verify.compare({"y": ref}, {"y": close})
    assert ok and report["y"]["max_abs"] > 1e4  # elementwise allclose at atol 1e-4 would fail
    wrong = close.copy()
    wrong[0, 0] += 0.05 * np.abs(ref).max()  # one element off by 5% of the scale
    assert not verify.compare({"y": ref}, {"y": wrong})[0]
    small = rng.standard_normal((4, 64)).astype(np.float32)
    assert not verify.compare({"y": small}, {"y": small + 0.01})[0]
    assert not verify.compare({"y": small}, {"y": -small})[0]


def test_stale_plan_and_graph_are_refused(tmp_path, mlp_artifact, monkeypatch):
    """A plan (or model.opt.onnx) made from an older source file: Engine.load refuses, one line
    naming the command that rebuilds it."""
    import shutil

    import onnx
    import pytest
    from click.testing import CliRunner

    from ffnx import artifact
    from ffnx.cli import main
    from ffnx.errors import ArtifactError
    from ffnx.runtime import Engine

    d = tmp_path / "a"
    shutil.copytree(mlp_artifact, d)
    assert CliRunner().invoke(main, ["optimize", str(d)]).exit_code == 0
    m = artifact.read_manifest(d)
    assert m["made_from"][artifact.MODEL_OPT] == {artifact.MODEL: m["files"][artifact.MODEL]}
    Engine.load(d, backend="ort")  # fresh
    (d / artifact.PLAN).write_bytes(b"fake plan")
    artifact.write_manifest(d, m, {artifact.PLAN: [artifact.MODEL_OPT]})
    # a newer model.opt.onnx (e.g. after moefy or another optimize): the plan is stale
    opt = onnx.load(str(d / artifact.MODEL_OPT))
    opt.doc_string = "newer"
    artifact.write_bytes_atomic(d / artifact.MODEL_OPT, opt.SerializeToString())
    artifact.write_manifest(d, artifact.read_manifest(d))
    monkeypatch.setattr("ffnx.runtime.engine._trt_usable", lambda: True)
    with pytest.raises(
        ArtifactError,
        match=r"model.plan was built from an older model.opt.onnx: "
        r"run `ffnx build .*`",
    ):
        Engine.load(d, backend="trt")
    # a newer model.onnx: model.opt.onnx is stale too
    src = onnx.load(str(d / artifact.MODEL))
    src.doc_string = "re-exported"
    artifact.write_bytes_atomic(d / artifact.MODEL, src.SerializeToString())
    artifact.write_manifest(d, artifact.read_manifest(d))
    r = CliRunner().invoke(main, ["run", str(d), "--backend", "ort"])
    assert r.exit_code == 1
    assert "model.opt.onnx was built from an older model.onnx: run `ffnx optimize" in r.output


def test_trt_target_artifact_runs_on_onnx_runtime(tmp_path):
    """`--target trt` keeps FfnxMoE for the plugin in model.trt.onnx and an ORT-lowered
    model.opt.onnx beside it: Engine.load(backend="ort") runs the artifact."""
    import numpy as np
    import onnx

    from ffnx import artifact
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.zoo import build
    from ffnx.runtime import Engine

    d = tmp_path / "moe"
    m = export_artifact(build("gpt-moe"), d, target="trt")
    assert {artifact.MODEL_TRT, artifact.MODEL_OPT} <= set(m["files"])
    assert m["made_from"][artifact.MODEL_TRT] == {artifact.MODEL: m["files"][artifact.MODEL]}
    trt_graph = onnx.load(str(d / artifact.MODEL_TRT))
    assert any(n.op_type == "FfnxMoE" for n in trt_graph.graph.node)
    assert artifact.model_path(d, m, target="trt").name == artifact.MODEL_TRT
    engine = Engine.load(d, backend="ort")
    ids = np.random.default_rng(0).integers(0, 64, size=(1, 8), dtype=np.int64)
    out = engine.run({"input_ids": ids})["logits"]
    assert out.shape[:2] == (1, 8) and np.isfinite(out).all()


def test_export_option_without_effect_is_a_usage_error(tmp_path, user_model_file):
    from click.testing import CliRunner

    from ffnx.cli import main

    for extra in (["--precision", "fp16"], ["--no-build"]):
        r = CliRunner().invoke(
            main, ["export", f"{user_model_file}:build", "--output", str(tmp_path / "a"), *extra]
        )
        assert r.exit_code == 2 and "only with --target trt" in r.output, r.output
        assert not (tmp_path / "a").exists()


def test_export_output_and_out_alias(tmp_path, user_model_file):
    from click.testing import CliRunner

    from ffnx.cli import main

    for flag in ("--output", "--out", "-o"):
        d = tmp_path / flag.strip("-")
        r = CliRunner().invoke(
            main, ["export", f"{user_model_file}:build", flag, str(d), "--no-optimize"]
        )
        assert r.exit_code == 0, r.output
        assert (d / "manifest.json").exists()


def test_build_workspace_is_mib_like_trtexec(mlp_artifact, monkeypatch):
    from click.testing import CliRunner

    from ffnx.cli import main

    seen = {}

    def fake_build(path, **kw):
        seen.update(kw)
        raise SystemExit(0)  # stop before printing a summary of a build that did not happen

    monkeypatch.setattr("ffnx.build.engine.build_engine", fake_build)
    r = CliRunner().invoke(main, ["build", str(mlp_artifact), "--workspace", "2048"])
    assert seen["workspace_gib"] == 2.0, r.output
    r = CliRunner().invoke(main, ["build", str(mlp_artifact), "--workspace-gib", "1.5"])
    assert seen["workspace_gib"] == 1.5, r.output
    r = CliRunner().invoke(
        main, ["build", str(mlp_artifact), "--workspace", "512", "--workspace-gib", "1"]
    )
    assert r.exit_code == 2 and "not both" in r.output
