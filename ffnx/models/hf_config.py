"""Locate a local Hugging Face checkpoint and import transformers offline (shared by the
causal-LM path, ffnx.models.hf, and the other tasks, ffnx.models.hf_tasks)."""

from __future__ import annotations

import os
from pathlib import Path

from ffnx.errors import ModelSpecError

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")


def _config_path(path: Path) -> tuple[Path, bool]:
    """-> (config.json, has_weights)."""
    if path.is_file():
        if path.suffix != ".json":
            raise ModelSpecError(f"hf:{path}: expected a model directory or a config.json file")
        return path, False
    if not path.is_dir():
        raise ModelSpecError(f"hf:{path}: no such directory or config.json (nothing is downloaded)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelSpecError(f"hf:{path}: directory has no config.json")
    return cfg, any(any(path.glob(p)) for p in WEIGHT_FILES)


def _import_transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as e:
        raise ModelSpecError(
            "hf: models need transformers: pip install 'ffnx[hf]' (transformers>=4.46)"
        ) from e
    return transformers
