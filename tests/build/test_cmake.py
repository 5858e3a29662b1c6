"""One CMakeLists for ffnx's native code (issue 12: one toolchain): libffnx_kernels.so, the
kernels OBJECT library and libffnx_trt_plugins.so, with the toolchain's default architectures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ffnx.plugins import toolchain

PLUGINS = Path(toolchain.__file__).parent
CMAKE = PLUGINS / "CMakeLists.txt"


def test_one_cmakelists_for_all_native_code():
    found = sorted(p.relative_to(PLUGINS.parent) for p in PLUGINS.parent.rglob("CMakeLists.txt"))
    assert found == [Path("plugins/CMakeLists.txt")], found
    text = CMAKE.read_text()
    for target in ("ffnx_kernels_objects OBJECT", "ffnx_kernels SHARED", "ffnx_trt_plugins SHARED"):
        assert f"add_library({target}" in text, target


def test_cmake_default_archs_are_the_toolchain_defaults():
    m = re.search(r'set\(CMAKE_CUDA_ARCHITECTURES "([0-9;]+)"\)', CMAKE.read_text())
    assert m and tuple(m.group(1).split(";")) == toolchain.DEFAULT_ARCHS


def test_cmake_configures_both_libraries(tmp_path):
    from tests.build.conftest import HEADERS

    nvcc = toolchain.find_nvcc(required=False)
    if (
        shutil.which("cmake") is None
        or nvcc is None
        or not (HEADERS / "NvInferRuntime.h").is_file()
    ):
        pytest.skip("needs cmake, nvcc and the TensorRT headers")
    build = tmp_path / "b"
    r = subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(build),
                        f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=86",
                        f"-DTRT_INCLUDE_DIR={HEADERS}"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TensorRT 11.1 headers" in r.stdout
    targets = subprocess.run(["cmake", "--build", str(build), "--target", "help"],
                             capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    for t in ("ffnx_kernels", "ffnx_kernels_objects", "ffnx_trt_plugins"):
        assert re.search(rf"\b{t}\b", targets), targets
    # no headers anywhere (none in the system paths here): the one error names the way out
    env = {k: v for k, v in os.environ.items() if k not in ("FFNX_TRT_INCLUDE", "TENSORRT_ROOT")}
    r = subprocess.run(["cmake", "-S", str(PLUGINS), "-B", str(tmp_path / "bad"),
                        f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DTRT_ROOT=/nonexistent"],
                       capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    if r.returncode == 0:
        pytest.skip("this machine has TensorRT headers in a system path")
    assert "-DFFNX_TRT_PLUGINS=OFF" in r.stderr, r.stderr
