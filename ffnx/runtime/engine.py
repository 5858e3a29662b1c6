"""`Engine`: load an artifact (or a bare .onnx), pick a backend, validate feeds, run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ffnx import artifact
from ffnx.errors import ArtifactError, BackendError
from ffnx.runtime.backends.base import Backend, TensorInfo
from ffnx.runtime.validate import validate_feeds

BACKENDS = ("auto", "ort", "trt")
ORT_ONLY = ("threads",)  # CPU thread count: TensorRT runs on the GPU, the option does not apply


def _trt_usable() -> bool:
    return any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_lean"))


class Engine:
    """A loaded model. `run` is thread-safe (backends guarantee it).

    >>> engine = Engine.load("artifacts/gpt-swiglu")
    >>> engine.run({"input_ids": ids})["logits"]
    """

    def __init__(self, backend: Backend, manifest: dict | None = None, path: str = ""):
        self.backend = backend
        self.manifest = manifest or {}
        self.path = path
        declared = {d["name"]: TensorInfo.from_json(d) for d in self.manifest.get("inputs", [])}
        # Prefer the manifest's dim labels (what the user declared) over the file's symbols.
        self.inputs = [declared.get(i.name, i) for i in backend.inputs]
        declared_out = {
            d["name"]: TensorInfo.from_json(d) for d in self.manifest.get("outputs", [])
        }
        self.outputs = [declared_out.get(o.name, o) for o in backend.outputs]
        self.dim_bounds = {
            label: (int(d.get("min", 0)), d.get("max"))
            for label, d in self.manifest.get("dims", {}).items()
        }

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", **options) -> Engine:
        """Load an artifact directory or an .onnx/.plan file.

        backend: "auto" (TensorRT when the artifact has a plan and TensorRT is importable,
        else ONNX Runtime), "ort" or "trt". `options` go to the backend's `load`
        (ORT: threads, device, providers; TRT: plugin_library, cuda_graph).
        """
        if backend not in BACKENDS:
            raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        p = Path(path)
        manifest = None
        if p.is_dir():
            manifest = artifact.read_manifest(p)
            has_plan = artifact.PLAN in manifest.get("files", {})
            if backend == "auto":
                backend = "trt" if has_plan and _trt_usable() else "ort"
            if backend == "trt":
                if not has_plan:
                    raise ArtifactError(f"{p} has no {artifact.PLAN}; run `ffnx build {p}` first")
                file = p / artifact.PLAN
            else:
                file = artifact.model_path(p, manifest)
            artifact.check_integrity(p, manifest, [file.name])
            artifact.check_fresh(p, manifest, file.name)
        elif p.exists():
            file = p
            manifest = artifact.manifest_of_file(p) or None  # its artifact's dims and labels
            if backend == "auto":
                backend = "trt" if p.suffix in (".plan", ".engine") else "ort"
        else:
            raise ArtifactError(f"{p} does not exist")
        if backend == "trt":
            from ffnx.runtime.backends.trt import TrtBackend

            options = {k: v for k, v in options.items() if k not in ORT_ONLY}
            impl = TrtBackend.load(str(file), **options)
        else:
            from ffnx.runtime.backends.ort import OrtBackend

            impl = OrtBackend.load(str(file), **options)
        return cls(impl, manifest, str(p))

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def validate(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feeds checked against the declared inputs (InputError naming what was expected)."""
        return validate_feeds(feeds, self.inputs, self.dim_bounds)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(self.validate(feeds))

    def generate(self, input_ids, max_new_tokens: int, **kwargs) -> np.ndarray:
        """New token ids [batch, n] from a KV-cache decoder artifact (`ffnx export hf:DIR`).

        input_ids: int [batch, seq] or a list of id lists (left-padded here). Keywords:
        temperature=0.0 (greedy), top_k, top_p, seed, eos_token_id (default: the model's),
        ignore_eos. See `ffnx.runtime.generate`."""
        from ffnx.runtime.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids, max_new_tokens: int, **kwargs):
        """Like `generate`, yielding one int64 [batch] array of tokens per step."""
        from ffnx.runtime.generate import stream

        return stream(self, input_ids, max_new_tokens, **kwargs)

    def random_inputs(
        self, dims: dict[str, int] | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Inputs drawn within the declared dims (example sizes unless `dims` overrides)."""
        return random_inputs(self.inputs, self.manifest, dims, seed)


def random_inputs(
    inputs: list[TensorInfo], manifest: dict, dims: dict[str, int] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    decl = manifest.get("dims", {})
    sizes = {k: int(v.get("example", 1)) for k, v in decl.items()}
    sizes.update(dims or {})
    ranges = manifest.get("input_ranges", {})
    feeds = {}
    for info in inputs:
        shape = [d if isinstance(d, int) else sizes.get(d, 1) for d in info.shape]
        dt = np.dtype(info.dtype) if info.dtype != "bfloat16" else np.dtype("float32")
        if np.issubdtype(dt, np.integer):
            lo, hi = ranges.get(info.name, (0, 2))
            feeds[info.name] = rng.integers(lo, hi, size=shape).astype(dt)
        elif dt == np.bool_:
            feeds[info.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            feeds[info.name] = rng.standard_normal(shape).astype(dt)
    return feeds
