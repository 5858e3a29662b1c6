"""TensorRT-RTX's runtime cache for a plan: the kernels TensorRT-RTX compiles on the GPU at run
time (it builds ahead of time on CPU and specializes on the device), kept between loads.

TensorRT-RTX has no builder timing cache (its timing-cache calls are no-ops); what it reuses is
an `IRuntimeCache` attached to the execution context through an `IRuntimeConfig`
(`engine.create_runtime_config()`, `config.create_runtime_cache()`, `cache.deserialize(blob)`,
`config.set_runtime_cache(cache)`, `engine.create_execution_context(config)`). A serialized
cache is valid only for the same TensorRT-RTX version, GPU, driver major and OS (deserialize
returns False otherwise, leaving the cache empty), so it lives outside the artifact:
`$FFNX_RUNTIME_CACHE_DIR`, else `$XDG_CACHE_HOME` (or ~/.cache)/ffnx/runtime-cache, one file per
plan (named by the plan's sha256 from the manifest). It is read at `Engine.load` and written
back, atomically, at `close()`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from ffnx import artifact


def cache_dir() -> Path:
    if os.environ.get("FFNX_RUNTIME_CACHE_DIR"):
        return Path(os.environ["FFNX_RUNTIME_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "ffnx" / "runtime-cache"


def cache_path(plan: Path, manifest: dict) -> Path:
    digest = manifest.get("files", {}).get(plan.name)
    if not digest:
        digest = hashlib.sha256(plan.read_bytes()).hexdigest()
    return cache_dir() / f"{digest[:32]}.cache"


class RuntimeCache:
    """The runtime config (with its cache) for one engine; `save()` writes the cache back."""

    def __init__(self, engine, path: Path):
        self.path = path
        self.config = engine.create_runtime_config()
        self.cache = self.config.create_runtime_cache()
        self.loaded = 0  # bytes of a compatible cache loaded at start
        if path.is_file():
            blob = path.read_bytes()
            if self.cache.deserialize(blob):
                self.loaded = len(blob)
        self.config.set_runtime_cache(self.cache)

    def save(self) -> int:
        """Write the cache (atomically); the bytes written, 0 when it could not be written."""
        data = bytes(memoryview(self.cache.serialize()))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            artifact.write_bytes_atomic(self.path, data)
        except OSError as e:  # a read-only cache dir must not fail the caller's close()
            warnings.warn(f"TensorRT-RTX runtime cache not saved to {self.path}: {e}", stacklevel=2)
            return 0
        return len(data)


def open_for(trt, engine, plan: Path, manifest: dict) -> RuntimeCache | None:
    """A RuntimeCache for TensorRT-RTX engines that offer one; None for other TensorRTs."""
    if trt.__name__.split(".")[0] != "tensorrt_rtx" or not hasattr(engine, "create_runtime_config"):
        return None
    return RuntimeCache(engine, cache_path(plan, manifest))
