"""`hf:PATH`: a local transformers causal LM as a `ModelSpec` (input_ids -> logits).

PATH is a model directory (config.json + safetensors/bin weights, loaded with
`from_pretrained(local_files_only=True)`), a directory holding only config.json, or a bare
config.json file (both: random weights from a fixed seed, `from_config`). Nothing is downloaded:
HF_HUB_OFFLINE is set and remote code is never trusted. The model is loaded in float32, eval,
eager attention; batch and sequence are dynamic. `load_hf(..., cache=True)` (what `ffnx export
hf:DIR` uses unless --no-cache) gives the KV-cache decoder of `ffnx.models.hf_decoder` instead.
MoE blocks are exported as `ffnx::FfnxMoE` by the capture rules (`ffnx.export.moe_capture`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ffnx.errors import ModelSpecError, first_line
from ffnx.models.hf_config import SEED, _config_path, _import_transformers, build_model
from ffnx.models.spec import ModelSpec

MAX_SEQ = 8192  # cap on the exported `seq` dim (the config's max_position_embeddings if smaller)
EXAMPLE = (2, 8)  # example (batch, seq); sizes > 1 so torch.export keeps both dims dynamic


class CausalLMLogits(torch.nn.Module):
    """`input_ids` int64 [batch, seq] -> logits float32 [batch, seq, vocab]."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _load_model(cfg_path: Path, weights: bool) -> torch.nn.Module:
    tf = _import_transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(cfg_path), trust_remote_code=False)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        first = first_line(e)
        raise ModelSpecError(f"hf:{cfg_path}: cannot read the config: {first}") from e
    return build_model(tf.AutoModelForCausalLM, config, cfg_path.parent, weights, "a causal LM")


def _moe_variant(config) -> str:
    k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_top_k", None)
    return f"moe-top{k}" if k else ""


def load_hf(
    path: str,
    dynamic: dict[str, dict[int, str]] | None = None,
    cache: bool = False,
    task: str | None = None,
) -> ModelSpec:
    """`hf:PATH` -> ModelSpec (forward(input_ids) -> logits; batch/seq dynamic).

    cache=True: the KV-cache decoder of `ffnx.models.hf_decoder` (prefill and decode, one graph)."""
    from ffnx.models.hf_tasks import load_task  # other tasks (the config's, or `task`)

    task_spec = load_task(path, dynamic, task)
    if task_spec is not None:
        return task_spec
    cfg_path, weights = _config_path(Path(path).expanduser())
    model = _load_model(cfg_path, weights)
    if cache:
        from ffnx.models.hf_decoder import decoder_spec

        name = cfg_path.parent.name if cfg_path.name == "config.json" else cfg_path.stem
        return decoder_spec(model, name, path, weights, SEED, _moe_variant(model.config), MAX_SEQ)
    config = model.config
    vocab = int(config.get_text_config().vocab_size)
    max_seq = min(int(getattr(config, "max_position_embeddings", MAX_SEQ) or MAX_SEQ), MAX_SEQ)

    def make_inputs(dims: dict[str, int], seed: int = SEED) -> dict[str, torch.Tensor]:
        b, t = dims.get("batch", EXAMPLE[0]), dims.get("seq", EXAMPLE[1])
        g = torch.Generator().manual_seed(seed + b * 7919 + t)
        return {"input_ids": torch.randint(0, vocab, (b, t), generator=g)}

    example = make_inputs({"batch": EXAMPLE[0], "seq": EXAMPLE[1]})
    example["input_ids"][0, 0], example["input_ids"][-1, -1] = 0, vocab - 1  # full id range
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    name = cfg_path.parent.name if cfg_path.name == "config.json" else cfg_path.stem
    spec = ModelSpec(
        name=name or config.model_type,
        module=CausalLMLogits(model).eval(),
        inputs=example,
        dynamic={"input_ids": {0: "batch", 1: "seq"}},
        make_inputs=make_inputs,
        variant=_moe_variant(config),
        description=f"transformers {arch} ({config.model_type}) from {path}"
        + ("" if weights else f", random weights (seed {SEED})"),
        max_dims={"seq": max_seq},
        output_names=["logits"],
    )
    if dynamic:
        spec.dynamic = {**spec.dynamic, **dynamic}
    return spec
