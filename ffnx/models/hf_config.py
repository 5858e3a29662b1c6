"""Locate a local Hugging Face checkpoint and import transformers offline (shared by the
causal-LM path, ffnx.models.hf, and the other tasks, ffnx.models.hf_tasks)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ffnx.errors import ModelSpecError, first_line

WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
SEED = 0  # random weights when the checkpoint has none


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


def build_model(auto, config, model_dir: Path, weights: bool, what: str) -> torch.nn.Module:
    """`auto` (a transformers Auto* class) from the checkpoint's weights, or random weights
    (seed SEED) from `config`; fp32, eager attention. Errors name `what` was being built.

    Fused experts (transformers' `use_experts_implementation`) run as `batched_mm`: each
    (token, expert) pair gathers its expert's weights and multiplies, the same sums as the
    default grouped_mm, whose op torch's ONNX exporter cannot lower. An MoE block that no capture
    rule turns into FfnxMoE then still exports, as standard ops."""
    kwargs = dict(attn_implementation="eager", experts_implementation="batched_mm",
                  dtype=torch.float32)  # fmt: skip
    try:
        if weights:
            model = auto.from_pretrained(
                str(model_dir), config=config, local_files_only=True, trust_remote_code=False,
                **kwargs,
            )  # fmt: skip
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                model = auto.from_config(config, trust_remote_code=False, **kwargs)
    except (ValueError, KeyError, OSError, TypeError, AttributeError) as e:
        # AttributeError: a config transformers' own model code cannot read (e.g. DBRX's
        # attn_config without rope_theta), reported as one line, not an internal error
        first = first_line(e)
        raise ModelSpecError(
            f"hf:{model_dir}: cannot build {what} for model_type "
            f"{getattr(config, 'model_type', '?')!r}: {first}"
        ) from e
    return model.float().eval()
