import threading

import numpy as np
import pytest
import torch

from ffnx import artifact
from ffnx.errors import ArtifactError, BackendError, InputError
from ffnx.runtime import Engine


def test_engine_matches_torch(mlp_artifact, user_model_file):
    from ffnx.models.user import resolve

    engine = Engine.load(mlp_artifact)
    assert engine.backend_name == "ort"
    assert [i.describe() for i in engine.inputs] == ["x: float32[batch, 16]"]
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    (y,) = engine.run({"x": x}).values()
    spec = resolve(f"{user_model_file}:build")
    ref = spec.module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_run_is_thread_safe(mlp_artifact):
    engine = Engine.load(mlp_artifact)
    xs = [np.full((2, 16), i, np.float32) for i in range(8)]
    expected = [engine.run({"x": x}) for x in xs]
    got = [None] * len(xs)

    def work(i):
        for _ in range(20):
            got[i] = engine.run({"x": xs[i]})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g in zip(expected, got):
        for k in e:
            np.testing.assert_array_equal(e[k], g[k])


@pytest.mark.parametrize(
    "feeds, message",
    [
        (
            {"y": np.zeros((2, 16), np.float32)},
            "unknown input(s) y; missing input(s) x; expected x: float32[batch, 16]",
        ),
        ({"x": np.zeros((2, 16, 1), np.float32)}, "rank 3"),
        ({"x": np.zeros((2, 15), np.float32)}, "axis 1 must be 16"),
        ({"x": np.zeros((2, 16), np.float64)}, "dtype float64, expected x: float32[batch, 16]"),
        ({"x": np.zeros((0, 16), np.float32)}, "outside [1, None]"),
    ],
)
def test_bad_inputs_have_clear_messages(mlp_artifact, feeds, message):
    engine = Engine.load(mlp_artifact)
    with pytest.raises(InputError) as e:
        engine.run(feeds)
    assert message in str(e.value)


def test_missing_manifest(tmp_path, mlp_artifact):
    d = tmp_path / "incomplete"
    d.mkdir()
    (d / "model.onnx").write_bytes((mlp_artifact / "model.onnx").read_bytes())
    with pytest.raises(ArtifactError, match="no manifest.json: the artifact is incomplete"):
        Engine.load(d)


def test_truncated_model_detected_by_hash(tmp_path, mlp_artifact):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(mlp_artifact, d)
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        Engine.load(d)


def test_corrupted_bare_onnx(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load"):
        Engine.load(p)


def test_unknown_backend_and_missing_plan(mlp_artifact):
    with pytest.raises(BackendError, match="unknown backend"):
        Engine.load(mlp_artifact, backend="tvm")
    with pytest.raises(ArtifactError, match="has no model.plan"):
        Engine.load(mlp_artifact, backend="trt")


def test_manifest_records_everything(mlp_artifact):
    m = artifact.read_manifest(mlp_artifact)
    assert m["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 16]}]
    assert m["outputs"][0]["dtype"] == "float32"
    assert m["export"]["opset"] == 18
    assert len(m["export"]["verification"]) == 2  # example shape and a second shape
    assert {"torch", "onnx", "onnxruntime", "ffnx"} <= set(m["versions"])
    assert m["files"]["model.onnx"] == artifact.sha256(mlp_artifact / "model.onnx")
