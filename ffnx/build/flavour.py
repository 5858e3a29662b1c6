"""Which TensorRT builds the engine: Enterprise (`tensorrt`, 10.x/11.x) or TensorRT-RTX
(`tensorrt_rtx`, 1.x: builds ahead of time on CPU for GeForce/RTX PRO GPUs).

`auto` takes whatever builder imports, Enterprise first. An import that fails for any reason
(the `tensorrt` pip stub that cannot find its libraries, a missing CUDA library) counts as
absent. TensorRT-RTX is strongly typed like 11.x, so precision follows the 11.x path.

TensorRT-RTX's ONNX parser dlopens `libtensorrt_rtx.so` (the unversioned development name)
the first time it imports a plugin node; the pip wheel ships only `libtensorrt_rtx.so.1`, the
dlopen throws inside a noexcept function of the parser and the process dies in
`std::terminate` ("terminate called without an active exception"). The parser's RPATH is
`$ORIGIN`, so `ensure_rtx_parser_library` adds the symlink next to the wheel's library (or
refuses with the command that does) before any parse.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ffnx.errors import BackendError

FLAVOURS = ("auto", "enterprise", "rtx")
MODULES = {"enterprise": "tensorrt", "rtx": "tensorrt_rtx"}
RTX_LIB = "libtensorrt_rtx.so"


def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a stub or broken install is an absent TensorRT
        return None


def import_tensorrt(flavour: str = "auto"):
    """The TensorRT module for `flavour` ("auto" | "enterprise" | "rtx")."""
    if flavour not in FLAVOURS:
        raise BackendError(f"--trt {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    order = ["enterprise", "rtx"] if flavour == "auto" else [flavour]
    for f in order:
        mod = _try_import(MODULES[f])
        if mod is not None:
            if f == "rtx":
                ensure_rtx_parser_library(mod)
            return mod
    wanted = {
        "auto": "a TensorRT builder (pip install tensorrt on a server/Jetson, or "
        "'ffnx[trt-rtx]' for TensorRT-RTX)",
        "enterprise": "TensorRT Enterprise (pip install tensorrt, or an nvcr.io/nvidia/tensorrt "
        "image; the lean runtime cannot build)",
        "rtx": "TensorRT-RTX (pip install 'ffnx[trt-rtx]')",
    }[flavour]
    raise BackendError(f"building engines needs {wanted}; none imports here")


def flavour_of(trt) -> str:
    name = getattr(trt, "__name__", "tensorrt")
    return "rtx" if name.split(".")[0] == "tensorrt_rtx" else "enterprise"


def strongly_typed_major(trt) -> int:
    """The TensorRT major whose precision rules apply (RTX behaves as 11.x)."""
    if flavour_of(trt) == "rtx":
        return 11
    return int(str(trt.__version__).split(".")[0])


def ensure_rtx_parser_library(trt) -> None:
    """Make `libtensorrt_rtx.so` resolvable from the parser's directory (see module doc)."""
    try:
        libs = importlib.import_module("tensorrt_rtx_libs")
    except Exception:  # noqa: BLE001 - a tarball install has its own layout
        return
    d = Path(libs.__file__).parent
    link = d / RTX_LIB
    if link.exists():
        return
    versioned = sorted(d.glob(RTX_LIB + ".*"))
    if not versioned:
        return
    try:
        tmp = d / f".{RTX_LIB}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(versioned[0].name)
        os.replace(tmp, link)
    except OSError as e:
        raise BackendError(
            f"TensorRT-RTX's ONNX parser needs {link} (it aborts the process without it) and it "
            f"cannot be created ({e.strerror}): run `ln -s {versioned[0].name} {link}`"
        ) from e


def compute_capabilities(trt, spec: str | None) -> list:
    """'86,89' (or 'sm_86,sm_89') -> trt.ComputeCapability members; None -> [] (the default).

    Only TensorRT-RTX takes build targets; Enterprise builds for the GPU it runs on.
    """
    if not spec:
        return []
    if flavour_of(trt) != "rtx":
        raise BackendError(
            "--compute-capability needs TensorRT-RTX (--trt rtx): TensorRT "
            "Enterprise builds for the GPU it runs on"
        )
    known = sorted(m[2:] for m in dir(trt.ComputeCapability) if m.startswith("SM"))
    out = []
    for part in str(spec).split(","):
        p = part.strip().lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
        if p not in known:
            raise BackendError(
                f"--compute-capability {part.strip()!r}: TensorRT-RTX "
                f"{trt.__version__} targets {', '.join(known)}"
            )
        out.append(getattr(trt.ComputeCapability, f"SM{p}"))
    return out


def set_compute_capabilities(config, caps: list) -> list[str]:
    """Set the builder config's targets; the names recorded in the manifest."""
    if not caps:
        return []
    config.num_compute_capabilities = len(caps)
    for i, c in enumerate(caps):
        config.set_compute_capability(c, i)
    return [c.name.removeprefix("SM") for c in caps]
