"""The exporter keeps tiny constants: onnxscript's no-op rules (x + 0 -> x, x * 1 -> x) match
within a tolerance, which dropped an RMSNorm's `+ 1e-12` eps (an all-zero row then gave
0 * inf = NaN where the module gives 0) and would drop a factor of 1.000001."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from ffnx.export.torch_export import export_onnx
from ffnx.models.spec import ModelSpec


class TinyConstants(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, 8))

    def forward(self, x):
        return F.rms_norm(x, (8,), self.w, 1e-12), x * 1.000001


def test_tiny_eps_and_near_one_factors_survive_export(tmp_path):
    x = torch.randn(3, 8)
    x[1] = 0.0  # the row an eps-less norm turns into NaN
    spec = ModelSpec(name="tiny-constants", module=TinyConstants().eval(), inputs={"x": x},
                     output_names=["norm", "scaled"])  # fmt: skip
    path = export_onnx(spec, tmp_path / "model.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Add" in ops and "Mul" in ops
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()}
    )
    with torch.no_grad():
        ref = [t.numpy() for t in spec.module(x)]
    assert np.isfinite(got[0]).all() and not got[0][1].any()
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-6, atol=0)
