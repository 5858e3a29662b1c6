"""Build, locate and load `libffnx_trt_plugins.so`: the IPluginV3 plugins (trt/*.cpp) and the
CUDA kernels they call (cuda/*.cu) in one self-contained library.

The library links no TensorRT library (the plugins use only TensorRT's virtual interfaces)
and the CUDA runtime statically, and it exports only `getCreators` and `setLoggerFinder`
(like TensorRT's libnvinfer_vc_plugin). So one file serves `IPluginRegistry.load_library`,
`trtexec --dynamicPlugins`, plans built version-compatible, and the lean runtime. It is
compiled against one TensorRT major's headers and for a list of SM architectures; a JSON
sidecar records both, and `load_plugin_library` refuses a library that cannot run here.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ffnx.errors import BackendError
from ffnx.plugins import schema, toolchain
from ffnx.plugins.toolchain import cuda_include_dir, find_nvcc
from ffnx.runtime import plugin_library as _runtime_library
from ffnx.runtime.plugin_library import EXPORTS, arch_runs  # noqa: F401  (re-exported)

PLUGINS_DIR = Path(__file__).parent
LIBRARY_NAME = "libffnx_trt_plugins.so"
DEFAULT_ARCHS = toolchain.DEFAULT_ARCHS
VERSION_SCRIPT = "{\n  global:\n    getCreators;\n    setLoggerFinder;\n  local: *;\n};\n"
TRT_INCLUDE_DIRS = (
    "/usr/include/x86_64-linux-gnu",
    "/usr/include/aarch64-linux-gnu",  # JetPack / L4T
    "/usr/local/tensorrt/include",
    "/opt/tensorrt/include",
    "/usr/src/tensorrt/include",
    "/usr/include",
)
RTX_HEADER_MAJOR = _runtime_library.RTX_HEADER_MAJOR
# TensorRT's public headers beside a source checkout (../shared/third_party/tensorrt/<ver>/)
REPO_HEADERS = PLUGINS_DIR.parents[1].parent / "shared" / "third_party" / "tensorrt"


def plugin_library_path() -> Path:
    """Where the library is loaded from: $FFNX_PLUGIN_LIBRARY, else the default build dir."""
    if os.environ.get("FFNX_PLUGIN_LIBRARY"):
        return Path(os.environ["FFNX_PLUGIN_LIBRARY"])
    return default_out_dir() / LIBRARY_NAME


def default_out_dir() -> Path:
    return toolchain.cache_dir()


def find_trt_include(explicit: str | Path | None = None) -> Path | None:
    """A directory holding NvInferRuntime.h: explicit, $FFNX_TRT_INCLUDE, $TRT_ROOT/include,
    then the system locations (x86_64 and aarch64/Jetson packages, tarball installs)."""
    cands = [explicit, os.environ.get("FFNX_TRT_INCLUDE")]
    cands += [os.path.join(os.environ[v], "include") for v in ("TRT_ROOT", "TENSORRT_ROOT")
              if os.environ.get(v)]  # fmt: skip
    cands += list(TRT_INCLUDE_DIRS)
    cands.append(REPO_HEADERS / "11.1" / "include")  # CI: headers beside the checkout
    for c in cands:
        if c and (Path(c) / "NvInferRuntime.h").is_file():
            return Path(c)
    return None


def header_version(include: Path) -> tuple[int, int, int]:
    """TensorRT version the headers declare (NvInferVersion.h; 10.x and 11.x spellings)."""
    text = (include / "NvInferVersion.h").read_text(errors="replace")

    def num(*names: str) -> int:
        for n in names:
            m = re.search(rf"#define\s+{n}\s+(\d+)", text)
            if m:
                return int(m.group(1))
        return 0

    return (
        num("TRT_MAJOR_ENTERPRISE", "NV_TENSORRT_MAJOR"),
        num("TRT_MINOR_ENTERPRISE", "NV_TENSORRT_MINOR"),
        num("TRT_PATCH_ENTERPRISE", "NV_TENSORRT_PATCH"),
    )


def build_plugin_library(
    archs: list[str] | None = None,
    trt_include: str | Path | None = None,
    trt_lib: str | Path | None = None,
    out_dir: str | Path | None = None,
    *,
    kernel_sources: list[str | Path] | None = None,
    jobs: int | None = None,
) -> Path:
    """Compile trt/*.cpp and the kernels (default: cuda/*.cu) into out_dir/libffnx_trt_plugins.so.

    archs: SM architectures ("87", "sm_90"); default: this machine's GPU, else DEFAULT_ARCHS.
    trt_include: TensorRT headers (default: find_trt_include()). trt_lib is accepted for
    symmetry with CMake but unused: the library links no TensorRT library.
    Returns the library path; writes it atomically, plus a `.json` sidecar with the archs and
    the TensorRT header version.
    """
    del trt_lib
    include = find_trt_include(trt_include)
    if include is None:
        raise BackendError(
            "TensorRT headers (NvInferRuntime.h) not found: install TensorRT's development "
            "files (libnvinfer-dev, a TensorRT tarball, or an nvcr.io TensorRT image) and pass "
            "--trt-include DIR or set FFNX_TRT_INCLUDE"
        )
    nvcc = find_nvcc()
    archs = toolchain.parse_archs(archs or toolchain.default_archs())
    kernels = sorted((PLUGINS_DIR / "cuda").glob("*.cu"))
    if kernel_sources is not None:
        kernels = [Path(k) for k in kernel_sources]
    if not kernels:
        raise BackendError(f"no CUDA kernel sources (*.cu) in {PLUGINS_DIR / 'cuda'}")
    out = Path(out_dir) if out_dir else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    gencode = toolchain.gencode(archs)
    with tempfile.TemporaryDirectory(prefix="ffnx-plugins-") as tmp:
        commands = _compile_commands(nvcc, include, gencode, kernels, Path(tmp))
        with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
            for f in [pool.submit(toolchain.run, c, w) for c, w in commands]:
                f.result()
        (Path(tmp) / "exports.map").write_text(VERSION_SCRIPT)
        lib = Path(tmp) / LIBRARY_NAME
        link = [str(nvcc), "-shared", "-cudart", "static", *gencode, "-o", str(lib)]
        link += sorted(str(p) for p in Path(tmp).glob("*.o"))
        link += ["-Xlinker", f"--version-script={tmp}/exports.map", "-Xlinker", "--no-undefined"]
        link += ["-Xlinker", f"-soname={LIBRARY_NAME}"]
        toolchain.run(link, "linking the plugin library")
        final = out / LIBRARY_NAME
        staged = out / f".{LIBRARY_NAME}.tmp"
        shutil.copyfile(lib, staged)
        os.replace(staged, final)
    meta = {
        "archs": archs,
        "tensorrt_headers": ".".join(map(str, header_version(include))),
        "machine": platform.machine(),
        "kernels": [k.name for k in kernels],
    }
    (out / f"{LIBRARY_NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return final


def _compile_commands(
    nvcc: Path, include: Path, gencode: list[str], kernels: list[Path], tmp: Path
) -> list[tuple[list[str], str]]:
    host = ["-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    incs = ["-I", str(PLUGINS_DIR / "cuda"), "-isystem", str(include)]
    incs += ["-isystem", str(cuda_include_dir(nvcc))]
    cxx = os.environ.get("CXX", "g++")
    commands = []
    for src in kernels:
        cmd = [str(nvcc), "-std=c++17", "-O3", "-Xcompiler", ",".join(host), *gencode, *incs]
        commands.append(
            ([*cmd, "-c", str(src), "-o", str(tmp / f"{src.stem}.cu.o")], f"compiling {src.name}")
        )
    for src in sorted((PLUGINS_DIR / "trt").glob("*.cpp")):
        cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", *host, *incs]
        commands.append(
            ([*cmd, "-c", str(src), "-o", str(tmp / f"{src.stem}.o")], f"compiling {src.name}")
        )
    return commands


def load_plugin_library(tensorrt_module, path: str | Path | None = None) -> Path:
    """Register the ffnx plugin creators with `tensorrt_module` (default path:
    plugin_library_path()); the loading and its checks live in ffnx.runtime.plugin_library."""
    return _runtime_library.load_plugin_library(
        tensorrt_module, Path(path) if path else plugin_library_path(), list(schema.OPS)
    )
