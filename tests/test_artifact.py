import pytest

from ffnx import artifact
from ffnx.errors import ArtifactError


def _publish(out, text, force, fail=False):
    with artifact.staged_dir(out, force) as stage:
        (stage / "model.onnx").write_text(text)
        if fail:
            raise RuntimeError("half-way failure")
        artifact.write_manifest(stage, {"model": {"name": text}})


def test_staged_dir_publishes_only_complete_artifacts(tmp_path):
    out = tmp_path / "a"
    _publish(out, "v1", force=False)
    assert artifact.read_manifest(out)["model"]["name"] == "v1"
    with pytest.raises(ArtifactError, match="already exists; pass --force"):
        _publish(out, "v2", force=False)
    with pytest.raises(RuntimeError):
        _publish(out, "v2", force=True, fail=True)
    assert (out / "model.onnx").read_text() == "v1"  # old artifact untouched
    _publish(out, "v3", force=True)
    assert (out / "model.onnx").read_text() == "v3"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "a"]
    assert leftovers == []


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "f.bin"
    final.write_bytes(b"old")
    with pytest.raises(ValueError), artifact.atomic_path(final) as tmp:
        tmp.write_bytes(b"new-partial")
        raise ValueError
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_manifest_is_written_last_with_hashes(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"abc")
    m = artifact.write_manifest(tmp_path, {})
    assert m["files"] == {"model.onnx": artifact.sha256(tmp_path / "model.onnx")}
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifact.read_manifest(tmp_path)
