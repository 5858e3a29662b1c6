"""Build and load `libffnx_kernels.so`, the CUDA kernels behind the C ABI in
`cuda/ffnx_kernels.h`, with plain nvcc (no CMake needed; target `ffnx_kernels` of the one
`ffnx/plugins/CMakeLists.txt` builds the same library for projects that use CMake).

    lib = load_kernels()            # builds into the cache on first use, checks the ABI version
    lib.ffnx_moe_launch(byref(params), byref(tensors), workspace_ptr, size, stream_ptr)

The cache directory is `$FFNX_PLUGIN_DIR`, else `~/.cache/ffnx/plugins/<hash>/` where the hash
covers the sources, the architectures and the flags, so an edited kernel is rebuilt.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ffnx.errors import BackendError
from ffnx.plugins import toolchain

CUDA_DIR = Path(__file__).parent / "cuda"
HEADER = CUDA_DIR / "ffnx_kernels.h"
LIB_NAME = "libffnx_kernels.so"
DEFAULT_ARCHS = toolchain.DEFAULT_ARCHS
# Hidden visibility plus --exclude-libs: the .so exports the FFNX_API functions and nothing of
# the statically linked CUDA runtime.
FLAGS = ("-O3", "-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--threads", "0")
LINK_FLAGS = ("-shared", "-cudart", "static", "-Xlinker", "--exclude-libs,ALL")


def find_nvcc() -> str | None:
    """The toolchain's nvcc (see toolchain.find_nvcc); None when absent."""
    nvcc = toolchain.find_nvcc(required=False)
    return str(nvcc) if nvcc else None


def abi_version() -> int:
    """FFNX_KERNELS_ABI_VERSION as the header defines it."""
    m = re.search(r"#define\s+FFNX_KERNELS_ABI_VERSION\s+(\d+)", HEADER.read_text())
    if not m:
        raise BackendError(f"{HEADER} defines no FFNX_KERNELS_ABI_VERSION")
    return int(m.group(1))


def sources() -> list[Path]:
    return sorted(CUDA_DIR.glob("*.cu"))


def _gencode(archs) -> list[str]:
    return toolchain.gencode(archs, ptx=False)


def _hash(archs) -> str:
    h = hashlib.sha256()
    for f in sorted([*sources(), *CUDA_DIR.glob("*.cuh"), *CUDA_DIR.glob("*.h")]):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(repr((tuple(archs), FLAGS, LINK_FLAGS)).encode())
    return h.hexdigest()[:16]


def default_out_dir(archs=DEFAULT_ARCHS) -> Path:
    if os.environ.get("FFNX_PLUGIN_DIR"):
        return toolchain.cache_dir()
    return toolchain.cache_dir() / _hash(archs)


def build_kernels(archs=DEFAULT_ARCHS, out_dir=None, verbose: bool = False) -> Path:
    """Compile every `cuda/*.cu` for `archs` (one nvcc call per file, both archs in it, files in
    parallel) and link `libffnx_kernels.so` into out_dir (default: `default_out_dir(archs)`).
    Returns the library's path; raises BackendError when nvcc is missing or compilation fails."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BackendError(toolchain.NVCC_MISSING)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(archs)
    out_dir.mkdir(parents=True, exist_ok=True)
    gencode = _gencode(archs)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        objs = [Path(tmp) / (src.stem + ".o") for src in sources()]

        def compile_one(src: Path, obj: Path) -> None:
            cmd = [nvcc, *FLAGS, *gencode, "-I", str(CUDA_DIR), "-c", str(src), "-o", str(obj)]
            toolchain.run(cmd, f"nvcc on {src.name}", verbose)

        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(compile_one, sources(), objs))
        tmp_lib = Path(tmp) / LIB_NAME
        toolchain.run([nvcc, *LINK_FLAGS, *gencode, *map(str, objs), "-o", str(tmp_lib)],
                      "nvcc link", verbose)  # fmt: skip
        final = out_dir / LIB_NAME
        os.replace(tmp_lib, final)  # atomic: a concurrent loader sees the old or the new file
    return final


def kernels_library_path(build_if_missing: bool = False) -> Path:
    """Path of the cached library for the default archs; builds it when asked and missing."""
    path = default_out_dir() / LIB_NAME
    if path.is_file():
        return path
    if build_if_missing:
        return build_kernels()
    raise BackendError(f"{path} is not built: call ffnx.plugins.build.build_kernels()")


# ---- ctypes mirror of ffnx_kernels.h (keep in the header's field order) ---------------------
_i64, _i32, _f32, _p = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_void_p


class MoEParams(ctypes.Structure):
    _fields_ = [("num_tokens", _i64), ("hidden", _i64), ("inter", _i64), ("num_experts", _i64),
                ("top_k", _i64), ("shared_inter", _i64), ("routing_mode", _i32),
                ("scoring", _i32), ("normalize", _i32), ("activation", _i32),
                ("routed_scaling_factor", _f32), ("dtype", _i32), ("has_fc1_bias", _i32),
                ("has_fc2_bias", _i32), ("has_score_bias", _i32),
                ("has_shared_gate", _i32), ("n_group", _i32), ("topk_group", _i32),
                ("group_scoring", _i32), ("activation_alpha", _f32),
                ("activation_limit", _f32)]  # fmt: skip


class MoETensors(ctypes.Structure):
    _fields_ = [(n, _p) for n in ("hidden", "router_logits", "fc1_weight", "fc1_bias",
                                  "fc2_weight", "fc2_bias", "score_bias", "token_ids",
                                  "hash_table", "shared_fc1_weight", "shared_fc2_weight",
                                  "shared_gate_weight", "output")]  # fmt: skip


class SparseFFNParams(ctypes.Structure):
    _fields_ = [("num_tokens", _i64), ("hidden", _i64), ("inter", _i64), ("k", _i64),
                ("gated", _i32), ("mode", _i32), ("activation", _i32), ("dtype", _i32),
                ("has_b_up", _i32), ("has_b_down", _i32)]  # fmt: skip


class SparseFFNTensors(ctypes.Structure):
    _fields_ = [(n, _p) for n in ("hidden", "w_gate", "w_up", "b_up", "w_down", "b_down",
                                  "thresholds", "output", "w_down_t")]  # fmt: skip


# attribute strings of the schemas -> the header's enum codes
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
ROUTING = {"router": 0, "hash": 1}
SCORING = {"softmax": 0, "topk_softmax": 1, "sigmoid": 2}
GROUP_SCORING = {"top2_sum": 0, "max": 1}
ACTIVATION = {"swiglu": 0, "geglu": 1, "reglu": 2, "gelu": 3, "relu": 4, "silu": 5,
              "clamped_swiglu": 6}  # fmt: skip
SPARSE_MODE = {"threshold": 0, "topk": 1}
EXPORTS = ("ffnx_moe_workspace_size", "ffnx_moe_launch", "ffnx_sparse_ffn_workspace_size",
           "ffnx_sparse_ffn_launch", "ffnx_sparse_ffn_pack_down", "ffnx_status_string",
           "ffnx_kernels_abi_version")  # fmt: skip


def load_kernels(path=None) -> ctypes.CDLL:
    """Load the library (default: the cached build, built if missing), declare the signatures
    and check that its ABI version is the header's; BackendError otherwise."""
    path = Path(path) if path is not None else kernels_library_path(build_if_missing=True)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BackendError(f"cannot load {path}: {e}") from e
    P = ctypes.POINTER
    sigs = {
        "ffnx_moe_workspace_size": (ctypes.c_size_t, [P(MoEParams)]),
        "ffnx_moe_launch": (ctypes.c_int, [P(MoEParams), P(MoETensors), _p, ctypes.c_size_t, _p]),
        "ffnx_sparse_ffn_workspace_size": (ctypes.c_size_t, [P(SparseFFNParams)]),
        "ffnx_sparse_ffn_launch": (
            ctypes.c_int,
            [P(SparseFFNParams), P(SparseFFNTensors), _p, ctypes.c_size_t, _p],
        ),  # fmt: skip
        "ffnx_sparse_ffn_pack_down": (ctypes.c_int, [P(SparseFFNParams), _p, _p, _p]),
        "ffnx_status_string": (ctypes.c_char_p, [ctypes.c_int]),
        "ffnx_kernels_abi_version": (ctypes.c_int, []),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name, None)
        if fn is None:
            raise BackendError(f"{path} does not export {name}: rebuild it")
        fn.restype, fn.argtypes = res, args
    got, want = lib.ffnx_kernels_abi_version(), abi_version()
    if got != want:
        raise BackendError(f"{path} has kernel ABI {got}, the header says {want}: rebuild it")
    return lib


def check_status(lib: ctypes.CDLL, status: int, what: str) -> None:
    """Raise BackendError naming the call and the library's status string."""
    if status != 0:
        raise BackendError(f"{what} failed: {lib.ffnx_status_string(status).decode()}")
