"""The one CUDA toolchain: architecture parsing, -gencode flags, nvcc finder, cache dir."""

from __future__ import annotations

import os
import stat

import pytest

from ffnx.errors import BackendError
from ffnx.plugins import build, toolchain, trt_build


@pytest.mark.parametrize(
    ("given", "want"),
    [("sm_87", "87"), ("87", "87"), (87, "87"), ("8.7", "87"), ("compute_90", "90"),
     ("SM_90a", "90a"), (" 120 ", "120")],
)  # fmt: skip
def test_norm_arch_accepts_every_spelling(given, want):
    assert toolchain.norm_arch(given) == want


@pytest.mark.parametrize("bad", ["sm_", "ampere", "9", "sm_87x"])
def test_norm_arch_rejects_with_one_line(bad):
    with pytest.raises(BackendError, match="bad CUDA architecture"):
        toolchain.norm_arch(bad)


def test_parse_archs_dedups_and_keeps_order():
    assert toolchain.parse_archs("sm_90,86,8.6") == ["90", "86"]


def test_gencode_ptx_only_for_the_highest():
    flags = toolchain.gencode(["sm_86", "90"])
    assert flags == ["-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]  # fmt: skip
    assert toolchain.gencode(["87"], ptx=False) == ["-gencode=arch=compute_87,code=sm_87"]


def test_both_builders_share_the_toolchain(tmp_path, monkeypatch):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("NVCC", str(fake))
    assert build.find_nvcc() == str(fake)
    assert trt_build.find_nvcc() == fake
    monkeypatch.setenv("FFNX_PLUGIN_DIR", str(tmp_path / "cache"))
    assert trt_build.default_out_dir() == build.default_out_dir() == tmp_path / "cache"
    assert build.DEFAULT_ARCHS == trt_build.DEFAULT_ARCHS == toolchain.DEFAULT_ARCHS


def test_missing_nvcc_is_one_error(monkeypatch, tmp_path):
    for v in ("NVCC", "CUDACXX", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(toolchain.Path, "glob", lambda self, pat: iter(()))
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        pytest.skip("/usr/local/cuda/bin/nvcc exists")
    assert build.find_nvcc() is None
    with pytest.raises(BackendError, match="nvcc not found"):
        trt_build.find_nvcc()
