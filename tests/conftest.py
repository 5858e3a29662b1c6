"""Shared fixtures: a small user model file and a real exported artifact (session-scoped)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

# MoE lowering by the measured-and-cached rule costs 20-90 s per new layer shape; tests that
# check the measurement force it themselves with a temp cache.
os.environ.setdefault("FFNX_MOE_LOWERING", "rule")
# The attention form (group_query_attention) is timed per decoder export; tests force it
# (tests/passes/test_group_query_attention.py checks the measurement with a fake timer).
os.environ.setdefault("FFNX_ATTENTION", "rule")
# The speed guard times every export (seconds per model); tests/passes/test_speed_guard.py runs
# it for real end to end.
os.environ.setdefault("FFNX_SPEED_GUARD", "off")

USER_MODEL = textwrap.dedent(
    """
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(16, 32)
            self.fc2 = torch.nn.Linear(32, 16)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def build():
        torch.manual_seed(0)
        return Net().eval(), (torch.randn(4, 16),), {"x": {0: "batch"}}

    def broken():
        raise RuntimeError("factory exploded")

    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    def branchy():
        return Branchy(), (torch.randn(4, 8),), {"x": {0: "batch"}}

    def not_a_model():
        return 42
    """
)


@pytest.fixture(scope="session")
def user_model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("user") / "net.py"
    path.write_text(USER_MODEL)
    return path


@pytest.fixture(scope="session")
def mlp_artifact(tmp_path_factory, user_model_file) -> Path:
    """A real artifact exported by the pipeline (no passes: fast and independent of them)."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.user import resolve

    out = tmp_path_factory.mktemp("art") / "mlp"
    ref = f"{user_model_file}:build"
    export_artifact(resolve(ref), out, optimize=False, source=ref)
    return out
