"""Every zoo model (tiny) exports, verifies against torch at two shapes, and goes through the
default pass pipeline with every applied pass verified."""

from __future__ import annotations

import pytest

from ffnx import artifact
from ffnx.models import zoo


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_exports_and_verifies(tmp_path, name):
    from ffnx.export.pipeline import export_artifact

    spec = zoo.build(name, "tiny")
    manifest = export_artifact(spec, tmp_path / name, source=name, size="tiny")
    checks = manifest["export"]["verification"]
    assert len(checks) == 2 and checks[0]["dims"] != checks[1]["dims"]
    for check in checks:
        for out in check["outputs"].values():
            assert out["ok"] and out["cosine"] > 0.9999
    assert {"model.onnx", "model.opt.onnx"} <= set(manifest["files"])
    statuses = {p["name"]: p["status"] for p in manifest["passes"]}
    assert "rolled_back" not in statuses.values(), manifest["passes"]
    artifact.check_integrity(tmp_path / name, manifest)
