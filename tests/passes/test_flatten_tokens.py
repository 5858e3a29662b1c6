"""flatten_tokens: token-wise regions run on [B·N, D] (ORT then fuses MatMul + bias into
Gemm); exact; left alone where nothing would fuse or two token dims are dynamic."""

from __future__ import annotations

import torch
from torch import nn

from ffnx.models import zoo

from .helpers import (
    apply,
    check_applied,
    check_unchanged,
    export,
    feeds_of,
    model,
    ort_kernels,
    rand,
    skip_reasons,
)

NAME = "flatten_tokens"
D, N = 8, 5


class Blocks(nn.Module):
    """Two pre-norm MLP blocks (LN, fc1 + bias, GELU, fc2 + bias, residual), then a mean over
    tokens (outside the region) and a head."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))
        self.fc1 = nn.ModuleList(nn.Linear(D, 4 * D) for _ in range(2))
        self.fc2 = nn.ModuleList(nn.Linear(4 * D, D) for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            x = x + fc2(nn.functional.gelu(fc1(norm(x))))
        return self.head(x.mean(1)), x


def test_mlp_block_runs_flat_and_ort_fuses_the_biases(tmp_path):
    torch.manual_seed(0)
    m = export(Blocks(), torch.randn(2, N, D), dynamic={"x": {0: "b"}})
    feeds = feeds_of(rand(2, N, D, seed=1), rand(3, N, D, seed=2))
    new, rep = check_applied(NAME, m, feeds, n_applied=1, rtol=1e-6, atol=1e-6)
    assert [o.name for o in new.graph.output] == [o.name for o in m.graph.output]
    before, after = ort_kernels(m, tmp_path), ort_kernels(new, tmp_path)
    assert after.get("Gemm", 0) == before.get("Gemm", 0) + 4, after  # fc1, fc2 with biases
    assert after.get("Add", 0) < before.get("Add", 0)


def test_zoo_vit_is_flattened_exactly():
    spec = zoo.build("vit-repa", "tiny")
    m = export(spec.module, spec.inputs["pixels"], dynamic={"pixels": {0: "b"}}, names=("pixels",))
    feeds = [{"pixels": spec.make_inputs({"batch": b}, seed=b)["pixels"].numpy()} for b in (1, 3)]
    for before in ("fold_batchnorm", "reparameterize_ffn", "fuse_sibling_linears"):
        m, _ = apply(before, m, feeds)
    _, rep = check_applied(NAME, m, feeds, n_applied=1, rtol=1e-5, atol=1e-5)
    (region,) = rep["notes"]["regions"]
    assert region["adds_fusable"] > region["reshapes_added"]


def test_left_alone_without_gain_or_with_two_dynamic_token_dims():
    no_bias = model(  # one MatMul, no Add to fuse: a Reshape would only add
        """
        g (float[B, 5, 4] x) => (float[B, 5, 3] y) {
            y = MatMul(x, w)
        }
        """,
        {"w": rand(4, 3)},
    )
    rep = check_unchanged(NAME, no_bias, feeds_of(rand(2, 5, 4, seed=3)))
    assert "0 bias Adds would fuse" in skip_reasons(rep)
    dynamic = model(
        """
        g (float[B, T, 4] x) => (float[B, T, 3] y) {
            h = MatMul(x, w)
            y = Add(h, b)
        }
        """,
        {"w": rand(4, 3), "b": rand(3, seed=1)},
    )
    rep = check_unchanged(NAME, dynamic, feeds_of(rand(2, 5, 4, seed=3)))
    assert "more than one dynamic" in skip_reasons(rep)


def test_large_activations_are_left_alone(monkeypatch):
    from ffnx.passes import flatten_tokens

    torch.manual_seed(0)
    m = export(Blocks(), torch.randn(2, N, D), dynamic={"x": {0: "b"}})
    monkeypatch.setattr(flatten_tokens, "MAX_ELEMENTS", N * 4 * D - 1)  # fc1's output: N x 4D
    rep = check_unchanged(NAME, m, feeds_of(rand(2, N, D, seed=1)))
    assert f"activations of {N * 4 * D} elements per sample" in skip_reasons(rep)


def test_token_mixing_constants_stay_outside():
    pos = model(  # + a [1, 5, 4] position table mixes in the token index: not token-wise
        """
        g (float[B, 5, 4] x) => (float[B, 5, 3] y) {
            p = Add(x, pos)
            h = MatMul(p, w)
            y = Add(h, b)
        }
        """,
        {"pos": rand(1, 5, 4, seed=2), "w": rand(4, 3), "b": rand(3, seed=1)},
    )
    feeds = feeds_of(rand(2, 5, 4, seed=3))
    rep = check_unchanged(NAME, pos, feeds)  # 1 Add to fuse, 2 Reshapes (in and out)
    assert "1 bias Adds would fuse, 2 Reshapes" in skip_reasons(rep)
