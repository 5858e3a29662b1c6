"""Load `libffnx_trt_plugins.so` into a TensorRT plugin registry, refusing (with the fix) a
library that cannot work here. The runtime gets the library path as data (the argument, the
artifact's manifest or $FFNX_PLUGIN_LIBRARY); building and locating it is ffnx.plugins'."""

from __future__ import annotations

import ctypes
import json
import platform
from pathlib import Path

import ffnx.runtime.cuda as cuda
from ffnx.errors import BackendError

PLUGIN_NAMESPACE = "ffnx"
PLUGIN_VERSION = "1"
# The plugin creators the library registers: the op types of `ffnx.plugins.schema.OPS` (a test
# checks they agree; the runtime cannot import the schema).
PLUGIN_OPS = ("FfnxMoE", "FfnxSparseFFN")
RTX_HEADER_MAJOR = 11  # TensorRT-RTX 1.x plugins use the 11.x plugin ABI
EXPORTS = ("getCreators", "setLoggerFinder")
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
_loaded: dict[tuple[str, str], Path] = {}


def _elf_machine(path: Path) -> str | None:
    head = path.read_bytes()[:20] if path.stat().st_size >= 20 else b""
    if head[:4] != b"\x7fELF":
        return None
    return ELF_MACHINES.get(int.from_bytes(head[18:20], "little"), f"machine {head[18]}")


def arch_runs(archs: list[str], major: int, minor: int) -> bool:
    """Whether a build for `archs` runs on an sm_<major><minor> GPU: SASS for sm_XY runs on
    sm_XZ with Z >= Y (not for the arch-specific 'a'/'f' targets); the PTX embedded for the
    highest arch is JIT-compiled on any newer GPU."""
    for a in archs:
        am, an = divmod(int(a.rstrip("af")), 10)
        if (am, an) == (major, minor) or (a[-1].isdigit() and am == major and an <= minor):
            return True
    return max(int(a.rstrip("af")) for a in archs) <= major * 10 + minor


def _check_library(path: Path, trt_major: int) -> None:
    """Refuse, with the fix, a library that cannot work here (before TensorRT dlopens it)."""
    machine = _elf_machine(path)
    here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    if machine is None:
        raise BackendError(f"{path} is not a shared library (no ELF header)")
    if machine != here:
        raise BackendError(
            f"{path} was built for {machine}, this machine is {here}: rebuild it here"
        )
    meta_path = path.with_name(path.name + ".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    built = meta.get("tensorrt_headers", "")
    if built and int(built.split(".")[0]) != trt_major:
        raise BackendError(
            f"{path} was compiled against TensorRT {built} headers, but TensorRT {trt_major}.x "
            "is loaded: rebuild with `ffnx plugins build` against this TensorRT"
        )
    if meta.get("archs") and cuda.device_count():
        major, minor = cuda.compute_capability()
        if not arch_runs(meta["archs"], major, minor):
            raise BackendError(
                f"{path} holds code for sm_{', sm_'.join(meta['archs'])}, this GPU is "
                f"sm_{major}{minor}: rebuild with `ffnx plugins build --arch {major}{minor}`"
            )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BackendError(f"cannot load {path}: {e}") from e
    missing = [s for s in EXPORTS if not hasattr(lib, s)]
    if missing:
        raise BackendError(f"{path} does not export {missing}: it is not a TensorRT plugin library")


def load_plugin_library(tensorrt_module, path: str | Path, ops: list[str]) -> Path:
    """Register the ffnx plugin creators with `tensorrt_module` (tensorrt or tensorrt_lean).

    Idempotent per (module, file). Raises BackendError, never crashes, when the file is missing,
    built for another CPU, GPU or TensorRT major, or registers no ffnx creators.
    """
    trt = tensorrt_module
    path = Path(path)
    if not path.is_file():
        raise BackendError(
            f"TensorRT plugin library {path} not found: build it with `ffnx plugins build` "
            "(needs nvcc and TensorRT headers) or set FFNX_PLUGIN_LIBRARY to its path"
        )
    key = (trt.__name__, str(path.resolve()))
    if key in _loaded:
        return _loaded[key]
    major = int(str(trt.__version__).split(".")[0])
    if trt.__name__.split(".")[0] == "tensorrt_rtx":
        major = RTX_HEADER_MAJOR  # TensorRT-RTX 1.x plugins use the 11.x plugin ABI
    _check_library(path, major)
    registry = trt.get_plugin_registry()

    def missing() -> list[str]:
        found = [registry.get_creator(op, PLUGIN_VERSION, PLUGIN_NAMESPACE)
                 for op in ops]  # fmt: skip
        return [op for op, c in zip(ops, found) if c is None]

    if missing():
        if registry.load_library(str(path)) is None:
            raise BackendError(
                f"TensorRT refused to load {path} (see the TensorRT log above); another library "
                "may already register ffnx plugins"
            )
        if missing():
            raise BackendError(
                f"{path} loaded but registers no creator for {', '.join(missing())} "
                f"(namespace {PLUGIN_NAMESPACE!r}, version {PLUGIN_VERSION}): "
                "rebuild it with `ffnx plugins build`"
            )
    _loaded[key] = path
    return path
