"""`hf:PATH` tasks other than the causal LM: encoders, masked LM, classification, vision.

The task comes from `--task` or, by default, from the config: the first `architectures` entry
(`BertModel` -> feature-extraction, `*ForMaskedLM` -> masked-lm, `*ForSequenceClassification`
-> sequence-classification, `*ForImageClassification` -> image-classification, a vision base
model such as `ViTModel` / `ConvNextModel` -> vision-encoder, `*ForCausalLM` / `*LMHeadModel`
-> causal-lm); without `architectures`, a model type transformers knows as a causal LM stays a
causal LM (`ffnx.models.hf`) unless it is an encoder family with a masked LM (BERT) and not
`is_decoder`, a vision config (image_size / num_channels) is a vision encoder,
anything else is a text encoder.

Inputs are named as users feed them: text tasks take `input_ids`, `attention_mask` and, where
the model's forward takes it and the config has token types, `token_type_ids` (int64
[batch, seq], all dynamic); vision tasks take `pixel_values` float32 [batch, C, H, W] (batch
dynamic, H and W the config's image size). Outputs keep the model's names: `last_hidden_state`
(+ `pooler_output` where the model has a pooler) for encoders, `logits` for heads.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ffnx.errors import ModelSpecError, first_line
from ffnx.models.hf_config import SEED, _config_path, _import_transformers, build_model
from ffnx.models.spec import ModelSpec

CAUSAL = "causal-lm"
TEXT_TASKS = ("feature-extraction", "masked-lm", "sequence-classification")
VISION_TASKS = ("image-classification", "vision-encoder")
TASKS = (CAUSAL, *TEXT_TASKS, *VISION_TASKS)
AUTO_CLASS = {
    "feature-extraction": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "image-classification": "AutoModelForImageClassification",
    "vision-encoder": "AutoModel",
}
SUFFIX_TASK = (
    ("ForCausalLM", CAUSAL),
    ("LMHeadModel", CAUSAL),
    ("ForMaskedLM", "masked-lm"),
    ("ForSequenceClassification", "sequence-classification"),
    ("ForImageClassification", "image-classification"),
)
TEXT_EXAMPLE = (2, 8)  # (batch, seq); > 1 so torch.export keeps both dynamic
VISION_BATCH = 2


def _is_vision(config) -> bool:
    return hasattr(config, "num_channels") and hasattr(config, "image_size")


def infer_task(config) -> str:
    """The task the config implies (see the module docstring)."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    for suffix, task in SUFFIX_TASK:
        if arch.endswith(suffix):
            return task
    if arch.endswith("Model"):
        return "vision-encoder" if _is_vision(config) else "feature-extraction"
    from transformers.models.auto import modeling_auto as auto

    causal = config.model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    encoder = config.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES  # BERT family
    if causal and (not encoder or getattr(config, "is_decoder", False)) and not _is_vision(config):
        return CAUSAL
    return "vision-encoder" if _is_vision(config) else "feature-extraction"


def check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise ModelSpecError(f"--task {task!r}: unknown task; expected one of {', '.join(TASKS)}")


class _Outputs(torch.nn.Module):
    """Calls the transformers model with keyword inputs; returns the named outputs in order."""

    def __init__(self, model: torch.nn.Module, input_names: list[str], output_names: list[str]):
        super().__init__()
        self.model, self.input_names, self.output_names = model, input_names, output_names

    def _call(self, **feeds: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        out = self.model(**feeds, return_dict=True)
        return tuple(out[name] for name in self.output_names)


class TextOutputs(_Outputs):
    """(input_ids[, attention_mask[, token_type_ids]]) -> the named outputs."""

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self._call(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        )


class VisionOutputs(_Outputs):
    """pixel_values -> the named outputs."""

    def forward(self, pixel_values):
        return self._call(pixel_values=pixel_values)


def _probe_outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor], task: str) -> list:
    with torch.no_grad():
        out = model(**inputs, return_dict=True)
    if task in ("masked-lm", "sequence-classification", "image-classification"):
        return ["logits"]
    names = ["last_hidden_state"]
    if getattr(out, "pooler_output", None) is not None:
        names.append("pooler_output")
    return names


def _text_inputs(model, config):
    params = inspect.signature(model.forward).parameters
    names = ["input_ids"]
    if "attention_mask" in params:
        names.append("attention_mask")
    if (
        "token_type_ids" in params
        and "attention_mask" in names  # forward order: ids, mask, types
        and int(getattr(config, "type_vocab_size", 0) or 0) > 1
    ):
        names.append("token_type_ids")
    vocab = int(config.vocab_size)
    types = int(getattr(config, "type_vocab_size", 1) or 1)

    def make_inputs(dims: dict[str, int], seed: int = SEED) -> dict[str, torch.Tensor]:
        b, t = dims.get("batch", TEXT_EXAMPLE[0]), dims.get("seq", TEXT_EXAMPLE[1])
        g = torch.Generator().manual_seed(seed + b * 7919 + t)
        feeds = {"input_ids": torch.randint(0, vocab, (b, t), generator=g)}
        if "attention_mask" in names:
            mask = torch.ones(b, t, dtype=torch.int64)
            if b > 1 and t > 2:
                mask[-1, t - t // 4 :] = 0  # last row right-padded, as a tokenizer would
            feeds["attention_mask"] = mask
        if "token_type_ids" in names:
            tt = torch.zeros(b, t, dtype=torch.int64)
            tt[:, t // 2 :] = types - 1 if types > 1 else 0  # sentence pair: second half type 1
            feeds["token_type_ids"] = tt
        return feeds

    dynamic = {n: {0: "batch", 1: "seq"} for n in names}
    return names, make_inputs, dynamic


def _vision_inputs(config):
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    c = int(config.num_channels)

    def make_inputs(dims: dict[str, int], seed: int = SEED) -> dict[str, torch.Tensor]:
        b = dims.get("batch", VISION_BATCH)
        g = torch.Generator().manual_seed(seed + b * 7919)
        return {"pixel_values": torch.randn(b, c, h, w, generator=g)}

    return ["pixel_values"], make_inputs, {"pixel_values": {0: "batch"}}


def load_task(
    path: str, dynamic: dict[str, dict[int, str]] | None, task: str | None
) -> ModelSpec | None:
    """`hf:PATH` for a non-causal-LM task -> ModelSpec; None when the task is the causal LM."""

    check_task(task)
    cfg_path, weights = _config_path(Path(path).expanduser())
    tf = _import_transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(cfg_path), trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        first = first_line(e)
        raise ModelSpecError(f"hf:{cfg_path}: cannot read the config: {first}") from e
    task = task or infer_task(config)
    if task == CAUSAL:
        return None
    if task in VISION_TASKS and not _is_vision(config):
        raise ModelSpecError(f"hf:{path}: --task {task} needs a vision config (image_size)")
    if task in TEXT_TASKS and _is_vision(config) and not hasattr(config, "vocab_size"):
        raise ModelSpecError(f"hf:{path}: --task {task} needs a text config (vocab_size)")
    auto = getattr(tf, AUTO_CLASS[task])
    model = build_model(auto, config, cfg_path.parent, weights, f"a {task} model")
    if task in TEXT_TASKS:
        names, make_inputs, dyn = _text_inputs(model, config)
    else:
        names, make_inputs, dyn = _vision_inputs(config)
    example = make_inputs({})
    if "input_ids" in example:
        example["input_ids"][0, 0], example["input_ids"][-1, -1] = 0, int(config.vocab_size) - 1
    outputs = _probe_outputs(model, example, task)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    name = cfg_path.parent.name if cfg_path.name == "config.json" else cfg_path.stem
    max_seq = int(getattr(config, "max_position_embeddings", 0) or 0)
    spec = ModelSpec(
        name=name or config.model_type,
        module=(TextOutputs if task in TEXT_TASKS else VisionOutputs)(model, names, outputs).eval(),
        inputs=example,
        dynamic=dyn,
        make_inputs=make_inputs,
        description=f"transformers {arch} ({config.model_type}) as {task} from {path}"
        + ("" if weights else f", random weights (seed {SEED})"),
        max_dims={"seq": max_seq} if task in TEXT_TASKS and max_seq else {},
    )
    spec.output_names = outputs
    spec.task = task
    if dynamic:
        spec.dynamic = {**spec.dynamic, **dynamic}
    return spec
