"""The builder's timing cache: kept in the artifact (`timing.cache`) unless `--timing-cache FILE`
names another file, read before a build and written after it, so a rebuild reuses the kernel
timings of the previous one. The manifest records how many bytes the build read and wrote.

TensorRT-RTX (1.2 and later) has no timing cache: its `create_timing_cache`/`set_timing_cache`
are documented no-ops ("Timing cache operations are no-ops in TensorRT-RTX"), since it
compiles its kernels on the GPU at run time. So RTX builds write none, and `--timing-cache`
with TensorRT-RTX is refused instead of silently doing nothing.
"""

from __future__ import annotations

from pathlib import Path

import ffnx.build.flavour as flavour_mod
from ffnx import artifact
from ffnx.errors import ArtifactError, PassError

DEFAULT_NAME = "timing.cache"
RTX_NOTE = "TensorRT-RTX has no timing cache (its timing-cache calls are no-ops)"


def path_for(trt, directory: Path, explicit: str | Path | None) -> Path | None:
    """The cache file this build uses: `explicit`, else DIR/timing.cache; None on RTX."""
    if flavour_mod.flavour_of(trt) == "rtx":
        if explicit:
            raise PassError(
                f"--timing-cache: {RTX_NOTE}; TensorRT-RTX {trt.__version__} would ignore "
                f"{explicit}: drop the option"
            )
        return None
    return Path(explicit) if explicit else Path(directory) / DEFAULT_NAME


def attach(config, path: Path) -> int:
    """Give `config` the timing cache at `path` (empty when absent); the bytes read."""
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as e:
        raise ArtifactError(f"cannot read timing cache {path}: {e}") from e
    config.set_timing_cache(config.create_timing_cache(data), False)
    return len(data)


def save(config, path: Path) -> int:
    """Write the build's (merged) timing cache to `path` atomically; the bytes written."""
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    artifact.write_bytes_atomic(path, data)
    return len(data)


def record(directory: Path, path: Path | None, read: int | None, written: int | None) -> dict:
    """The manifest's `tensorrt.timing_cache`."""
    if path is None:
        return {"file": None, "note": RTX_NOTE}
    name = path.name if path.parent.resolve() == Path(directory).resolve() else str(path)
    return {"file": name, "read_bytes": read, "written_bytes": written}
