"""Session fixtures for the real TensorRT-RTX tests: the plugin library, compiled once per
source hash into a cache directory (nvcc + TensorRT 11.1 headers), and the RTX module."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEADERS = Path(
    os.environ.get("FFNX_TRT_INCLUDE") or REPO.parent / "shared/third_party/tensorrt/11.1/include"
)


def _sources_hash() -> str:
    from ffnx.plugins import trt_build

    h = hashlib.sha256()
    for p in sorted((trt_build.PLUGINS_DIR).glob("*/*.[ch]*")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def rtx():
    from ffnx.build import flavour

    try:
        return flavour.import_tensorrt("rtx")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"TensorRT-RTX not importable: {e}")


@pytest.fixture(scope="session")
def plugin_lib(rtx) -> Path:
    from ffnx.plugins import trt_build

    if not (HEADERS / "NvInferRuntime.h").is_file():
        pytest.skip(f"TensorRT headers not at {HEADERS}")
    try:
        trt_build.find_nvcc()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no nvcc: {e}")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out = cache / "ffnx" / "test-plugins" / _sources_hash()
    lib = out / trt_build.LIBRARY_NAME
    if not lib.is_file():
        trt_build.build_plugin_library(["86"], HEADERS, out_dir=out)
    return lib
