"""canonical_norm: torch's rsqrt RMSNorm rewritten in the form ONNX Runtime fuses."""

from __future__ import annotations

import torch
from torch import nn

from .helpers import check_applied, check_unchanged, export, feeds_of, model, ort_kernels, rand

NAME = "canonical_norm"
D = 16
FEEDS = feeds_of(rand(2, 3, D, seed=1, lo=-3, hi=3), rand(1, 5, D, seed=2, lo=-3, hi=3))


class RsqrtNorms(nn.Module):
    """Llama's RMSNorm (rsqrt, weight), a per-head q-norm (Qwen3) and a weightless RMSNorm."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(D) + 0.5)
        self.wh = nn.Parameter(torch.rand(4) + 0.5)

    @staticmethod
    def rms(x, eps=1e-6):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def forward(self, x):
        y = self.w * self.rms(x)
        h = self.wh * self.rms(y.reshape(*y.shape[:-1], 4, 4))  # [B, T, heads, head_dim]
        return self.rms(h.reshape(y.shape) + x, 1e-5)


def test_exported_rsqrt_norms_become_one_ort_kernel_each(tmp_path):
    torch.manual_seed(0)
    m = export(RsqrtNorms(), torch.randn(2, 3, D), dynamic={"x": {0: "b", 1: "t"}})
    before = ort_kernels(m, tmp_path)
    assert before["Reciprocal"] == 3  # ORT leaves the rsqrt form unfused
    new, rep = check_applied(NAME, m, FEEDS, n_applied=3)
    after = ort_kernels(new, tmp_path)
    assert "Reciprocal" not in after and after["SimplifiedLayerNormalization"] == 3, after
    assert sum(after.values()) < sum(before.values()) - 12


def test_quotient_form_is_left_byte_identical():
    """x / sqrt(mean(x^2) + eps) * g: already the form ORT fuses."""
    m = model(
        """
        g (float[2, 8] x) => (float[2, 8] y) {
            p = Pow (x, two)
            r = ReduceMean <keepdims = 1> (p, ax)
            a = Add (r, eps)
            s = Sqrt (a)
            d = Div (x, s)
            y = Mul (d, gamma)
        }
        """,
        {
            "two": rand(seed=0) * 0 + 2,
            "ax": __import__("numpy").array([-1]),
            "eps": rand(seed=0) * 0 + 1e-6,
            "gamma": rand(8, seed=3),
        },  # fmt: skip
    )
    assert check_unchanged(NAME, m, [{"x": rand(2, 8)}])["status"] == "no_match"


def test_rsqrt_over_a_non_last_axis_is_left_byte_identical():
    m = model(
        """
        g (float[2, 8] x) => (float[2, 8] y) {
            p = Pow (x, two)
            r = ReduceMean <keepdims = 1> (p, ax)
            a = Add (r, eps)
            s = Sqrt (a)
            q = Reciprocal (s)
            y = Mul (x, q)
        }
        """,
        {
            "two": rand(seed=0) * 0 + 2,
            "ax": __import__("numpy").array([0]),
            "eps": rand(seed=0) * 0 + 1e-6,
        },  # fmt: skip
    )
    check_unchanged(NAME, m, [{"x": rand(2, 8)}])
