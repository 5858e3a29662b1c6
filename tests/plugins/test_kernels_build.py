"""The CUDA kernels compile for every target architecture and export exactly the C ABI.

Needs nvcc (skipped without it), no GPU: loading the library and calling its host-only entry
points (ABI version, status strings, workspace sizes) needs no device either.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ffnx.plugins import build


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or NVCC to run the kernel build test)")
    return build.build_kernels(archs=("sm_87", "sm_90"), out_dir=tmp_path_factory.mktemp("k"))


def header_functions() -> set[str]:
    text = build.HEADER.read_text()
    return set(re.findall(r"FFNX_API\s+[\w\s\*]+?\b(ffnx_\w+)\s*\(", text))


def test_header_functions_are_the_ones_build_declares():
    assert header_functions() == set(build.EXPORTS)


def test_exports_match_header(library):
    if shutil.which("nm") is None:
        pytest.skip("nm not found")
    out = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert exported == header_functions()


def test_both_architectures_are_embedded(library):
    cuobjdump = Path(os.path.realpath(build.find_nvcc())).parent / "cuobjdump"
    if not cuobjdump.is_file():
        pytest.skip("cuobjdump not found next to nvcc")
    out = subprocess.run([cuobjdump, "--list-elf", str(library)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cuobjdump unusable: {out.stderr.strip()[:80]}")
    assert "sm_87" in out.stdout and "sm_90" in out.stdout


def test_load_checks_abi_and_host_entry_points(library):
    lib = build.load_kernels(library)
    assert lib.ffnx_kernels_abi_version() == build.abi_version() == 4
    assert lib.ffnx_status_string(3) == b"workspace too small"
    p = build.MoEParams(16, 64, 32, 4, 2, 0, 0, 0, 0, 0, 1.0, 1, 0, 0, 0, 0)
    assert lib.ffnx_moe_workspace_size(p) >= 16 * 2 * (32 * 2 + 64 * 4)
    p.activation = build.ACTIVATION["clamped_swiglu"]  # GPT-OSS (ABI 4): an MoE activation
    p.activation_alpha, p.activation_limit = 1.702, 7.0
    assert lib.ffnx_moe_workspace_size(p) > 0
    p.activation = 7  # no such activation
    assert lib.ffnx_moe_workspace_size(p) == 0
    p.activation, p.top_k = 0, 5  # more than E: invalid, size 0
    assert lib.ffnx_moe_workspace_size(p) == 0
    s = build.SparseFFNParams(4, 64, 128, 8, 1, 1, 5, 1, 0, 0)
    assert lib.ffnx_sparse_ffn_workspace_size(s) > 0
    s.activation = build.ACTIVATION["clamped_swiglu"]  # FfnxMoE only
    assert lib.ffnx_sparse_ffn_workspace_size(s) == 0
    s.activation, s.has_b_up = 5, 1  # gated FFNs take no b_up (schema)
    assert lib.ffnx_sparse_ffn_workspace_size(s) == 0


def test_compile_error_is_one_clear_line(tmp_path, monkeypatch):
    if build.find_nvcc() is None:
        pytest.skip("nvcc not found")
    bad = tmp_path / "cuda"
    bad.mkdir()
    for f in build.CUDA_DIR.iterdir():
        if f.suffix in (".h", ".cuh"):
            (bad / f.name).write_text(f.read_text())
    (bad / "broken.cu").write_text("int f() { return undeclared_name; }\n")
    monkeypatch.setattr(build, "CUDA_DIR", bad)
    with pytest.raises(build.BackendError, match=r"nvcc on broken\.cu failed: .*undeclared_name"):
        build.build_kernels(archs=("sm_90",), out_dir=tmp_path / "out")


def test_missing_nvcc_is_a_backend_error(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(build.BackendError, match="nvcc not found"):
        build.build_kernels(out_dir=tmp_path)
