"""An export lets go of the module's weights: once the module is released (`keep_module=False`
moves it to the meta device), no parameter tensor outlives the export (onnxscript's rewrite
rules would otherwise keep the exported program, and every parameter through it)."""

from __future__ import annotations

import gc
import weakref

from ffnx.export.capture import captured
from ffnx.export.torch_export import export_onnx
from ffnx.models import zoo


def test_parameters_are_freed_after_export_and_release(tmp_path):
    spec = zoo.build(zoo.names()[0], "tiny")
    params = [weakref.ref(p) for p in spec.module.parameters()]
    assert params
    with captured(spec.module, "ort"):
        export_onnx(spec, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").stat().st_size > 0
    spec.module.to("meta")
    gc.collect()
    alive = sum(r() is not None for r in params)
    assert alive == 0, f"{alive} of {len(params)} parameters still held after the export"
