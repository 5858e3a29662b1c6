"""Models past protobuf's 2 GiB (`ffnx.graph.model_io`): checked on small models with the limit
lowered, so the external-data path runs for real (ORT loads it, the passes verify through it)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ffnx.graph import model_io
from ffnx.graph.ort import ort_session


@pytest.fixture
def low_limit(monkeypatch):
    monkeypatch.setattr(model_io, "LIMIT", 100_000)


def two_matmuls(seed: int = 0) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """y = reshape(x @ W1 + (x * x) @ W2, [-1]): 2 x 96 KB of weights and a small shape constant."""
    rng = np.random.default_rng(seed)
    ws = [rng.standard_normal((4, 6000)).astype(np.float32) for _ in range(2)]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"]),
        helper.make_node("Mul", ["x", "x"], ["x2"]),
        helper.make_node("MatMul", ["x2", "W2"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Reshape", ["s", "shape"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w, f"W{i + 1}") for i, w in enumerate(ws)]
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "shape"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                          ["b", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                          ["n"])], inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), ws


def reference(x, ws):
    return (x @ ws[0] + (x * x) @ ws[1]).reshape(-1)


def test_saving_and_hashing_leave_the_model_as_it_was(low_limit, tmp_path):
    m, _ = two_matmuls()
    before = m.SerializeToString()
    model_io.save_model(m, tmp_path / "m.onnx")
    model_io.digest(m)
    model_io.check(m)
    model_io.infer_shapes(m)
    del m.graph.value_info[:]
    assert m.SerializeToString() == before


def test_shape_inference_and_checker_on_a_big_model(low_limit, monkeypatch):
    m, ws = two_matmuls()
    assert model_io.is_big(m)
    monkeypatch.setattr(model_io, "LIMIT", 10**12)
    want = model_io.infer_shapes(m)
    monkeypatch.setattr(model_io, "LIMIT", 100_000)
    got = model_io.infer_shapes(m)
    assert got is m  # in place, no copy of the weights
    for field in ("value_info", "output", "initializer"):
        assert [x.SerializeToString() for x in getattr(got.graph, field)] == [
            x.SerializeToString() for x in getattr(want.graph, field)
        ]
    model_io.check(m)
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    bad.graph.node[0].input[1] = "W9"  # reads a tensor nothing produces
    with pytest.raises(onnx.checker.ValidationError):
        model_io.check(bad)
    assert np.array_equal(numpy_helper.to_array(m.graph.initializer[0]), ws[0])


def test_structure_keeps_shapes_not_values(low_limit):
    m, _ = two_matmuls()
    light = model_io.structure(m)
    assert len(light.SerializeToString()) < 2000
    assert [list(t.dims) for t in light.graph.initializer] == [[4, 6000], [4, 6000], [1]]
    assert list(light.graph.node) == list(m.graph.node)
    assert numpy_helper.to_array(light.graph.initializer[2]).tolist() == [-1]  # small: inline


def test_digest_covers_every_weight_byte(low_limit):
    a, _ = two_matmuls()
    b, _ = two_matmuls()
    assert model_io.digest(a) == model_io.digest(b)
    w = numpy_helper.to_array(b.graph.initializer[1]).copy()
    w[3, 5999] += 1.0
    b.graph.initializer[1].CopyFrom(numpy_helper.from_array(w, "W2"))
    assert model_io.digest(a) != model_io.digest(b)


def test_save_writes_external_data_that_ort_loads(low_limit, tmp_path, monkeypatch):
    m, ws = two_matmuls()
    path = model_io.save_model(m, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").stat().st_size < 2000
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    y = ort_session(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, reference(x, ws), rtol=1e-5, atol=1e-5)
    y = ort_session(m).run(None, {"x": x})[0]  # in memory: through a temporary directory
    np.testing.assert_allclose(y, reference(x, ws), rtol=1e-5, atol=1e-5)
    loaded = onnx.load(str(path))
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[1]), ws[1])
    monkeypatch.setattr(model_io, "LIMIT", 10**12)  # the same name, now small: no stale .data
    model_io.save_model(m, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("as_path", [False, True])
def test_speed_guard_is_skipped_past_the_limit(low_limit, tmp_path, as_path):
    from ffnx.passes.speed_guard import optimize_guarded

    m, ws = two_matmuls()
    src = model_io.save_model(m, tmp_path / "m.onnx") if as_path else m
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    new, reports, guard = optimize_guarded(src, [{"x": x}], timer=lambda *a: pytest.fail("timed"))
    assert "2 GiB" in guard["skipped"] and not guard["dropped"]
    np.testing.assert_allclose(ort_session(new).run(None, {"x": x})[0], reference(x, ws),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_decoder_past_the_limit_exports_optimizes_and_generates(low_limit, tmp_path):
    """A KV-cache decoder whose weights pass the (lowered) limit: exported with external data,
    every pass verified through it, written with external data, greedy == transformers."""
    pytest.importorskip("transformers")
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf
    from ffnx.runtime import Engine
    from tests.models.test_hf_decoder import write_config
    from tests.runtime.test_generate import hf_greedy

    src = write_config(tmp_path / "src", "qwen3")
    spec = load_hf(str(src), cache=True)
    export_artifact(spec, tmp_path / "art", source=f"hf:{src}")
    art = tmp_path / "art"
    manifest = json.loads((art / "manifest.json").read_text())
    assert {"model.onnx.data", "model.opt.onnx.data"} <= set(manifest["files"])
    assert "model.onnx.data" in manifest["made_from"]["model.opt.onnx"]
    applied = {p["name"] for p in manifest["passes"] if p["status"] == "applied"}
    assert {"group_query_attention", "rotary_embedding"} <= applied
    engine = Engine.load(art, backend="ort")
    prompt = [[5, 17, 33, 2, 250, 9]]
    np.testing.assert_array_equal(engine.generate(prompt, 32, ignore_eos=True),
                                  hf_greedy(spec.module.model, prompt, 32))  # fmt: skip
