"""The TensorRT plugin sources compile against real TensorRT headers, and the library they build
exports only TensorRT's plugin entry points and needs no TensorRT library.

Headers: $FFNX_TRT_INCLUDE (one dir, or several separated by ':' to check e.g. 10.x and 11.x),
else a system TensorRT install. No installable PyPI wheel ships them: `tensorrt-cu13-bindings`
holds the Python extension only, `tensorrt-lean-cu13-libs` only libnvinfer_lean.so and
libnvinfer_vc_plugin.so. NVIDIA/TensorRT's `include/` (GitHub) or a TensorRT tarball/image do.
The library test links a stub of the kernel C ABI, so it checks the plugin code and the build,
not the kernels.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import types
from pathlib import Path

import pytest

from ffnx.errors import BackendError
from ffnx.plugins import trt_build

TRT_DIR = trt_build.PLUGINS_DIR / "trt"
STUB = r"""
#include "ffnx_kernels.h"
extern "C" {
size_t ffnx_moe_workspace_size(const ffnx_moe_params*) { return 256; }
int ffnx_moe_launch(const ffnx_moe_params*, const ffnx_moe_tensors*, void*, size_t, void*) {
  return FFNX_ERR_UNSUPPORTED;
}
size_t ffnx_sparse_ffn_workspace_size(const ffnx_sparse_ffn_params*) { return 256; }
int ffnx_sparse_ffn_launch(const ffnx_sparse_ffn_params*, const ffnx_sparse_ffn_tensors*, void*,
                           size_t, void*) {
  return FFNX_ERR_UNSUPPORTED;
}
const char* ffnx_status_string(int) { return "stub"; }
}
"""


def include_dirs() -> list[Path]:
    env = os.environ.get("FFNX_TRT_INCLUDE", "")
    dirs = [Path(p) for p in env.split(os.pathsep) if p] if env else []
    if not dirs:  # the system's headers, then both majors beside the checkout (11.1, 10.3)
        dirs = [trt_build.find_trt_include()] if trt_build.find_trt_include() else []
        dirs += [trt_build.REPO_HEADERS / v / "include" for v in ("11.1", "10.3")]
    found = [d for d in dirs if (d / "NvInferRuntime.h").is_file()]
    return [d for i, d in enumerate(found) if d.resolve() not in {x.resolve() for x in found[:i]}]


INCLUDES = include_dirs()
needs_headers = pytest.mark.skipif(
    not INCLUDES,
    reason="TensorRT headers not found: set FFNX_TRT_INCLUDE=/path/to/TensorRT/include (no PyPI "
    "wheel ships them; NVIDIA/TensorRT's include/ on GitHub does)",
)


def toolchain() -> tuple[Path, str]:
    try:
        nvcc = trt_build.find_nvcc()
    except BackendError as e:
        pytest.skip(str(e))
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++) on PATH")
    return nvcc, os.environ.get("CXX", "g++")


@needs_headers
@pytest.mark.parametrize("include", INCLUDES, ids=lambda p: trt_build.header_version(p).__str__())
def test_plugin_sources_compile_cleanly(include):
    nvcc, cxx = toolchain()
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Wpedantic", "-Werror"]
    cmd += ["-I", str(trt_build.PLUGINS_DIR / "cuda"), "-isystem", str(include)]
    cmd += ["-isystem", str(trt_build.cuda_include_dir(nvcc))]
    sources = sorted(str(p) for p in TRT_DIR.glob("*.cpp"))
    assert len(sources) >= 3
    proc = subprocess.run([*cmd, *sources], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    if not INCLUDES:
        pytest.skip("TensorRT headers not found (set FFNX_TRT_INCLUDE)")
    toolchain()
    tmp = tmp_path_factory.mktemp("plugins")
    stub = tmp / "stub_kernels.cpp"  # host-only: nvcc hands it to the C++ compiler
    stub.write_text(STUB)
    return trt_build.build_plugin_library(
        ["80"], INCLUDES[0], None, tmp / "out", kernel_sources=[stub]
    )


def test_library_exports_only_the_plugin_entry_points(library):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils nm not available")
    out = subprocess.run([nm, "-D", "--defined-only", str(library)], capture_output=True, text=True)
    exported = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert exported == {"getCreators", "setLoggerFinder"}
    dyn = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
    needed = [ln.split("[")[1].rstrip("]") for ln in dyn.splitlines() if "(NEEDED)" in ln]
    assert not [n for n in needed if "nvinfer" in n or "cudart" in n], needed


def test_library_registers_two_creators_and_records_its_build(library):
    lib = ctypes.CDLL(str(library))
    lib.getCreators.restype = ctypes.c_void_p
    n = ctypes.c_int32(-1)
    assert lib.getCreators(ctypes.byref(n)) and n.value == 2  # FfnxMoE, FfnxSparseFFN
    lib.setLoggerFinder(None)  # a null finder is ignored, not dereferenced
    meta = json.loads(library.with_name(library.name + ".json").read_text())
    major = trt_build.header_version(INCLUDES[0])[0]
    assert meta["archs"] == ["80"] and meta["tensorrt_headers"].startswith(f"{major}.")


def fake_tensorrt(version: str, creators: bool, loads: bool = True):
    calls = []

    class Registry:
        def get_creator(self, name, version, namespace):
            return object() if creators and calls else None

        def load_library(self, path):
            calls.append(path)
            return object() if loads else None

    registry = Registry()
    mod = types.SimpleNamespace(__name__=f"fake_trt_{version}_{creators}_{loads}")
    mod.__version__, mod.get_plugin_registry = version, lambda: registry
    return mod, calls


def test_load_plugin_library_checks_before_and_after_loading(library):
    major = trt_build.header_version(INCLUDES[0])[0]
    other = 10 if major != 10 else 11
    wrong, calls = fake_tensorrt(f"{other}.0.0", creators=True)
    with pytest.raises(BackendError, match=f"compiled against TensorRT {major}.*rebuild"):
        trt_build.load_plugin_library(wrong, library)
    assert calls == []  # refused before TensorRT saw the file

    empty, calls = fake_tensorrt(f"{major}.1.0", creators=False)
    with pytest.raises(BackendError, match="registers no creator for FfnxMoE, FfnxSparseFFN"):
        trt_build.load_plugin_library(empty, library)
    assert calls == [str(library)]

    refused, _ = fake_tensorrt(f"{major}.2.0", creators=False, loads=False)
    with pytest.raises(BackendError, match="TensorRT refused to load"):
        trt_build.load_plugin_library(refused, library)

    good, calls = fake_tensorrt(f"{major}.3.0", creators=True)
    assert trt_build.load_plugin_library(good, library) == library
    assert trt_build.load_plugin_library(good, library) == library and len(calls) == 1


def test_missing_or_foreign_library_is_a_clear_error(tmp_path):
    trt, _ = fake_tensorrt("11.0.0", creators=True)
    with pytest.raises(BackendError, match="not found: build it with `ffnx plugins build`"):
        trt_build.load_plugin_library(trt, tmp_path / "libffnx_trt_plugins.so")
    not_elf = tmp_path / "libnot.so"
    not_elf.write_bytes(b"#!/bin/sh\n" * 4)
    with pytest.raises(BackendError, match="not a shared library"):
        trt_build.load_plugin_library(trt, not_elf)
    arm = tmp_path / "libarm.so"
    arm.write_bytes(b"\x7fELF" + bytes(14) + (183).to_bytes(2, "little") + bytes(40))
    if trt_build.platform.machine() in ("x86_64", "AMD64"):
        with pytest.raises(BackendError, match="built for aarch64"):
            trt_build.load_plugin_library(trt, arm)


@pytest.mark.parametrize(
    "archs,cc,ok",
    [
        (["80"], (8, 6), True),  # sm_80 SASS runs on sm_86
        (["87"], (8, 6), False),
        (["80", "90"], (8, 9), True),
        (["86"], (9, 0), True),  # PTX of the highest arch JITs forward
        (["90a"], (9, 0), True),
        (["90a"], (10, 0), True),  # the build embeds compute_90 PTX (not 90a)
        (["120"], (8, 7), False),
    ],
)
def test_arch_compatibility(archs, cc, ok):
    assert trt_build.arch_runs(archs, *cc) is ok
