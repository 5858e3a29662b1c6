"""A transformers causal LM as one KV-cache decoder graph serving both prefill and decode.

Inputs: `input_ids` int64 [batch, seq], `attention_mask` int64 [batch, total] (total = past +
seq; 1 = real token, 0 = padding), `position_ids` int64 [batch, seq], and per layer N
`past_key_values.N.key` / `.value` float32 [batch, kv_heads, past, head_dim]. Outputs: `logits`
[batch, seq, vocab] and `present.N.key` / `.value` [batch, kv_heads, total, head_dim].

Prefill feeds past of length 0; decode feeds the previous step's presents as the next pasts.
The graph is exact with respect to transformers' own cache (`DynamicCache`): the wrapper rebuilds
a DynamicCache from the flat pasts, calls the model, and returns the concatenated caches, so
the math is the model's eager attention over [past ‖ new] keys and values under its own mask
(causal, sliding-window where the config has one, since every key is kept and masked). Limits,
each raised as one line naming the module: caches that are not plain per-layer key/value
tensors (MLA latent caches of different K and V widths are fine; linear-attention / recurrent
state layers are not), and models whose attention cannot take an explicit attention mask.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ffnx.errors import ModelSpecError, first_line

TOKENIZER = "tokenizer.json"
EXAMPLE = (2, 3, 5)  # example (batch, seq, past); all > 1 so torch.export keeps them dynamic


def past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def cache_argument(model: torch.nn.Module) -> str:
    """The name `model.forward` takes its cache by (transformers >= 5.24: `cache`)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def check_cache_layers(config) -> None:
    """Raise one line where a layer keeps recurrent state instead of a key/value cache."""
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None) or []
    bad = {t for t in layer_types if t not in ("full_attention", "sliding_attention")}
    if bad:
        raise ModelSpecError(
            f"{type(text).__name__}: layer types {sorted(bad)} keep recurrent state, not a "
            "key/value cache; export it with --no-cache"
        )


def cache_geometry(model: torch.nn.Module) -> list[tuple[int, int, int]]:
    """Per layer (kv_heads, key_dim, value_dim) of the cache transformers keeps, read off the
    cache one token through the model leaves (not the config: GPT-2, GPT-BigCode's multi-query,
    Falcon and MLA's latents name or derive their key/value heads and widths differently)."""
    from transformers import DynamicCache

    check_cache_layers(model.config)
    ids = torch.zeros(1, 1, dtype=torch.int64)
    name = type(model).__name__
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                        **{cache_argument(model): DynamicCache()})  # fmt: skip
    except Exception as e:  # transformers' own code: whatever it raises, one line
        raise ModelSpecError(f"{name}: transformers' own forward fails on one token, so there is "
                             f"nothing to export: {first_line(e)}") from e  # fmt: skip
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if not isinstance(cache, DynamicCache) or not cache.layers:
        raise ModelSpecError(f"{name}: keeps no transformers key/value cache "
                             f"({type(cache).__name__}); export it with --no-cache")  # fmt: skip
    geometry = []
    for i, layer in enumerate(cache.layers):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4
                and v.dim() == 4 and k.shape[:3] == v.shape[:3] == (1, k.shape[1], 1)):  # fmt: skip
            raise ModelSpecError(f"{name}: layer {i}'s cache is not a [batch, heads, seq, dim] "
                                 "key/value pair; export it with --no-cache")  # fmt: skip
        geometry.append((int(k.shape[1]), int(k.shape[3]), int(v.shape[3])))
    return geometry


class CausalLMWithCache(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, *pasts) -> (logits, *presents)."""

    def __init__(self, model: torch.nn.Module, n_layers: int):
        super().__init__()
        self.model = model
        self.n_layers = n_layers
        self.cache_arg = cache_argument(model)

    def forward(self, input_ids, attention_mask, position_ids, *pasts):
        from transformers import DynamicCache

        cache = DynamicCache(
            ddp_cache_data=[(pasts[2 * i], pasts[2 * i + 1]) for i in range(self.n_layers)]
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_arg: cache},
        )
        cache = getattr(out, "cache", None) or out.past_key_values
        flat = []
        for layer in cache.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def decoder_inputs(
    geometry: list[tuple[int, int, int]],
    batch: int,
    seq: int,
    past: int,
    vocab: int,
    seed: int = 0,
    left_pad: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs at (batch, seq, past) for a cache of `geometry` (`cache_geometry`); the
    first row left-padded by `left_pad` tokens."""
    g = torch.Generator().manual_seed(seed + 7919 * batch + 31 * seq + past)
    total = past + seq
    mask = torch.ones(batch, total, dtype=torch.int64)
    mask[0, : min(left_pad, total - 1)] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    feeds = {
        "input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
        "attention_mask": mask,
        "position_ids": pos,
    }
    for i, (kv, kd, vd) in enumerate(geometry):
        feeds[f"past_key_values.{i}.key"] = torch.randn(batch, kv, past, kd, generator=g)
        feeds[f"past_key_values.{i}.value"] = torch.randn(batch, kv, past, vd, generator=g)
    return feeds


def dynamic_axes(n_layers: int) -> dict[str, dict[int, str]]:
    dyn = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "seq"},
    }
    for name in past_names(n_layers):
        dyn[name] = {0: "batch", 2: "past"}
    return dyn


def export_dynamic_shapes(n_layers: int) -> tuple:
    """torch.export shapes (positional, in input order): `total` is past + seq (a derived dim
    torch infers), so every axis is `Dim.DYNAMIC` and torch records the relations itself."""
    d = torch.export.Dim.DYNAMIC
    axes = [{a: d for a in v} for v in dynamic_axes(n_layers).values()]
    return (*axes[:3], tuple(axes[3:]))  # forward's *pasts is one positional group


def _token_id(config, attr: str):
    v = getattr(config, attr, None)
    if v is None:
        gen = getattr(config, "get_text_config", lambda: config)()
        v = getattr(gen, attr, None)
    return v


def decoder_spec(model, name: str, source: str, weights: bool, seed: int, variant: str,
                 max_seq: int):  # fmt: skip
    """ModelSpec of the KV-cache decoder (attributes read by export: output_names,
    export_dynamic_shapes, manifest_extra)."""
    from ffnx.models.spec import ModelSpec

    config = model.config
    text = config.get_text_config()
    vocab = int(text.vocab_size)
    geometry = cache_geometry(model)
    n = len(geometry)
    cap = min(int(getattr(text, "max_position_embeddings", max_seq) or max_seq), max_seq)
    b, t, p = EXAMPLE

    def make_inputs(dims: dict[str, int], seed: int = seed) -> dict[str, torch.Tensor]:
        return decoder_inputs(geometry, dims.get("batch", b), dims.get("seq", t),
                              dims.get("past", p), vocab, seed, left_pad=1)  # fmt: skip

    example = make_inputs({})
    example["input_ids"][0, 0], example["input_ids"][-1, -1] = 0, vocab - 1
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    spec = ModelSpec(
        name=name or config.model_type,
        module=CausalLMWithCache(model, n).eval(),
        inputs=example,
        dynamic=dynamic_axes(n),
        make_inputs=make_inputs,
        variant=variant,
        description=f"transformers {arch} ({config.model_type}) KV-cache decoder from {source}"
        + ("" if weights else f", random weights (seed {seed})"),
        max_dims={"seq": cap, "past": cap, "total": cap},
    )
    eos = _token_id(config, "eos_token_id")
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.eos_token_id is not None:
        eos = gen.eos_token_id
    src = Path(source).expanduser()
    tokenizer = (src if src.is_dir() else src.parent) / TOKENIZER
    if tokenizer.is_file():  # copied into the artifact; its sha256 is in the manifest's files
        spec.extra_files = {TOKENIZER: tokenizer}
    # passes are also verified on a prefill (past 0) whose first row is padded at 3 of its 4
    # query positions, compared where the mask is 1 (ffnx.passes.optimize._read_part)
    spec.padded_prefill = lambda: decoder_inputs(geometry, 2, 4, 0, vocab, seed + 3, left_pad=3)
    spec.output_names = ["logits", *present_names(n)]
    spec.export_dynamic_shapes = export_dynamic_shapes(n)
    spec.manifest_extra = {
        "decoder": {
            "layers": n,
            "kv_heads": [g[0] for g in geometry],
            "key_dim": [g[1] for g in geometry],
            "value_dim": [g[2] for g in geometry],
            "vocab": vocab,
            "max_length": cap,
            "eos_token_id": [eos] if isinstance(eos, int) else list(eos or []),
            "pad_token_id": _token_id(config, "pad_token_id"),
            "past_inputs": past_names(n),
            "present_outputs": present_names(n),
            "tokenizer": TOKENIZER if tokenizer.is_file() else None,
        }
    }
    return spec
