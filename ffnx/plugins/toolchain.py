"""The one CUDA toolchain for the kernels library (build.py), the TensorRT plugin library
(trt_build.py) and CMake (the one ffnx/plugins/CMakeLists.txt builds both libraries, from the
same $CUDACXX, with DEFAULT_ARCHS as its default CMAKE_CUDA_ARCHITECTURES):
the nvcc finder, SM architecture parsing (`sm_87`, `87`, `8.7`, `compute_90`, `90a`), the
default architectures, -gencode flags, the cache directory, and running a compiler.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from ffnx.errors import BackendError

# Ampere, Ampere GA10x, Orin, Ada, Hopper: used when no GPU tells us which one we are on.
DEFAULT_ARCHS = ("80", "86", "87", "89", "90")
NVCC_MISSING = "nvcc not found: install the CUDA toolkit or set NVCC (or CUDACXX, CUDA_HOME)"


def find_nvcc(required: bool = True) -> Path | None:
    """nvcc from $NVCC, $CUDACXX, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin,
    then the newest /usr/local/cuda-*/bin. None (or BackendError when `required`) if absent."""
    cands = [os.environ.get("NVCC"), os.environ.get("CUDACXX")]
    cands += [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH")
              if os.environ.get(v)]  # fmt: skip
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    cands += [str(p) for p in sorted(Path("/usr/local").glob("cuda-*/bin/nvcc"), reverse=True)]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    if required:
        raise BackendError(NVCC_MISSING)
    return None


def cuda_include_dir(nvcc: Path) -> Path:
    """The toolkit's include dir (cuda_runtime_api.h): $CUDA_HOME, nvcc's toolkit (through a
    symlink), /usr/local/cuda."""
    roots = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    roots += [Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")]
    for root in roots:
        for inc in [root / "include", *sorted(root.glob("targets/*/include"))]:
            if (inc / "cuda_runtime_api.h").is_file():
                return inc
    raise BackendError(f"cuda_runtime_api.h not found for {nvcc}: set CUDA_HOME to the toolkit")


def norm_arch(a: str | int) -> str:
    """'sm_87', '87', '8.7', 'compute_90', 'sm_90a' -> '87', '87', '87', '90', '90a'."""
    s = str(a).strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
    if not re.fullmatch(r"\d{2,3}[af]?", s):
        raise BackendError(f"bad CUDA architecture {a!r}: use e.g. 87, sm_90 or 8.6")
    return s


def parse_archs(archs) -> list[str]:
    """A list (or one comma-separated string) of architectures, normalized, order kept."""
    if isinstance(archs, str):
        archs = archs.split(",")
    out: list[str] = []
    for a in archs:
        n = norm_arch(a)
        if n not in out:
            out.append(n)
    return out


def default_archs() -> list[str]:
    """This machine's GPU, else DEFAULT_ARCHS."""
    from ffnx.runtime import cuda

    if cuda.device_count():
        major, minor = cuda.compute_capability(0)
        return [f"{major}{minor}"]
    return list(DEFAULT_ARCHS)


def gencode(archs, ptx: bool = True) -> list[str]:
    """SASS for every arch; with `ptx`, also PTX of the highest (JIT-compiled on newer GPUs)."""
    archs = parse_archs(archs)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if ptx:
        top = max(archs, key=lambda a: int(a.rstrip("af"))).rstrip("af")
        flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def cache_dir() -> Path:
    """$FFNX_PLUGIN_DIR, else $XDG_CACHE_HOME (or ~/.cache)/ffnx/plugins."""
    if os.environ.get("FFNX_PLUGIN_DIR"):
        return Path(os.environ["FFNX_PLUGIN_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "ffnx" / "plugins"


def run(cmd: list[str], what: str, verbose: bool = False) -> None:
    """Run a compiler; BackendError quoting the first error lines when it fails."""
    if verbose:
        print(" ".join(map(str, cmd)), flush=True)
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if verbose and (proc.stdout or proc.stderr):
        print(proc.stdout + proc.stderr, flush=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()] or lines
        raise BackendError(f"{what} failed: {' | '.join(errors[:5])}")
