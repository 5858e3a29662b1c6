"""Dense decoder architectures beyond Llama / Qwen3 / Mistral, through the KV-cache decoder
export and `Engine.generate`: greedy tokens equal transformers' greedy `generate` over 32 steps
at batch 1 and for a left-padded batch of 2 (random tiny weights re-drawn at fan-in scale, biases
non-zero). They differ in what the export has to get right: configs that do not name their
key/value heads the Llama way (GPT-2's MHA, GPT-BigCode's multi-query, Falcon's `num_kv_heads`,
GPT-NeoX's and Phi's partial rotary), sliding-window layers (Gemma 2/3, Cohere 2, OLMo 3, GPT-Neo
local attention), ALiBi (BLOOM), learned positions (GPT-2, OPT), parallel attention + MLP blocks
(GPT-J, Falcon), soft-capped logits (Gemma 2), QK norms (OLMo 2, Gemma 3), Gemma 3n's AltUp
streams and per-layer inputs, Ministral's sliding layers, MPT's ALiBi table. CI runs two of
them; `FFNX_TEST_ALL_ARCHS=1` runs all."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from tests.runtime.test_generate import STEPS, hf_greedy  # noqa: E402
from tests.runtime.test_generate_moe_archs import COMMON, EVERY, redraw  # noqa: E402

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
SMALL = dict(vocab_size=256, **IDS)

# model_type -> the whole config (without model_type); COMMON is the Llama-style layout
ARCHS = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, **SMALL),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, multi_query=True,
                        **SMALL),
    "gemma3_text": dict(COMMON, head_dim=16, sliding_window=6, **IDS),
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, rotary_pct=0.25, **SMALL),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   new_decoder_architecture=True, num_kv_heads=2, **SMALL),
    "phi": dict(COMMON, partial_rotary_factor=0.5, **IDS),
    "phi3": dict(COMMON, **IDS),
    "gemma2": dict(COMMON, head_dim=16, sliding_window=6, **IDS),
    "cohere2": dict(COMMON, sliding_window=6, **IDS),
    "olmo2": dict(COMMON, **IDS),
    "olmo3": dict(COMMON, sliding_window=6, **IDS),
    "qwen2": dict(COMMON, **IDS),
    "granite": dict(COMMON, **IDS),
    "stablelm": dict(COMMON, partial_rotary_factor=0.25, **IDS),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, **SMALL),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, **SMALL),
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                word_embed_proj_dim=64, **SMALL),
    "gpt_neo": dict(hidden_size=64, num_layers=2, num_heads=4, window_size=6,
                    attention_types=[[["global", "local"], 1]], **SMALL),
    # Gemma 3n: AltUp streams, LAuReL, per-layer inputs, a sliding layer; sparsity off
    "gemma3n_text": dict(COMMON, head_dim=16, vocab_size_per_layer_input=256,
                         hidden_size_per_layer_input=8, sliding_window=6,
                         layer_types=["sliding_attention", "full_attention"],
                         num_kv_shared_layers=0, laurel_rank=8, altup_num_inputs=4,
                         activation_sparsity_pattern=[0.0, 0.0], **IDS),
    "ministral": dict(COMMON, head_dim=16, sliding_window=6,
                      layer_types=["sliding_attention", "full_attention"], **IDS),
    # MPT: ALiBi sliced by the key length (`ffnx.export.mpt_alibi`); tied embeddings, 4 layers
    "mpt": dict(d_model=64, n_layers=4, n_heads=4, expansion_ratio=2, max_seq_len=512, **SMALL),
}  # fmt: skip
# at gain 3 Gemma 3n's greedy repeats one token (1.0: three), MPT's three
GAIN = {"gemma3n_text": 0.5, "mpt": 1.0}
# CI runs these (the suite's time budget); FFNX_TEST_ALL_ARCHS=1 runs every one (~20 s each)
FAST = ("gpt_bigcode", "gemma3_text")
PARAMS = [a if a in FAST else pytest.param(a, marks=[EVERY, pytest.mark.slow]) for a in ARCHS]


def write_config(directory, model_type: str, config: dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type, **config}))
    return directory


def export(tmp_path, model_type: str, config: dict):
    """-> (Engine, transformers model) of the exported KV-cache decoder (passes on)."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf
    from ffnx.runtime import Engine

    src = write_config(tmp_path / "src", model_type, config)
    spec = load_hf(str(src), cache=True)
    # at gain 1 GPT-2 and BLOOM repeat one token
    redraw(spec.module.model, gain=GAIN.get(model_type, 3.0))
    export_artifact(spec, tmp_path / "art", source=f"hf:{src}")
    return Engine.load(tmp_path / "art", backend="ort"), spec.module.model


@pytest.mark.parametrize("model_type", PARAMS)
def test_greedy_tokens_equal_transformers_generate(tmp_path, model_type):
    engine, model = export(tmp_path, model_type, ARCHS[model_type])
    rng = np.random.default_rng(1)
    one = [rng.integers(3, 256, 6).tolist()]
    got = engine.generate(one, STEPS, ignore_eos=True)
    np.testing.assert_array_equal(got, hf_greedy(model, one, STEPS))
    assert len(set(got[0].tolist())) > 4, "greedy repeats a few tokens: the weights test little"
    two = [rng.integers(3, 256, 7).tolist(), rng.integers(3, 256, 4).tolist()]  # left-padded
    np.testing.assert_array_equal(engine.generate(two, STEPS, ignore_eos=True),
                                  hf_greedy(model, two, STEPS))  # fmt: skip


def test_cache_geometry_is_read_off_the_model_not_the_config(tmp_path):
    """GPT-BigCode's multi-query cache has one key/value head, which its config does not name
    (`multi_query`), and a stray `num_key_value_heads` does not mislead it."""
    from ffnx.models.hf import load_hf

    config = dict(ARCHS["gpt_bigcode"], num_key_value_heads=2)
    spec = load_hf(str(write_config(tmp_path / "src", "gpt_bigcode", config)), cache=True)
    dec = spec.manifest_extra["decoder"]
    assert dec["kv_heads"] == [1, 1] and dec["key_dim"] == [16, 16] == dec["value_dim"]
    assert spec.inputs["past_key_values.0.key"].shape[1:] == (1, 5, 16)


def test_pad_and_eos_ids_past_the_vocabulary_pad_with_a_valid_id(tmp_path):
    """transformers' default GPT-2 config names BOS / EOS 50256; with a 256-token vocabulary
    the runtime must still left-pad a batch (padding is masked, so any valid id will do)."""
    config = {k: v for k, v in ARCHS["gpt2"].items() if k not in IDS}
    engine, model = export(tmp_path, "gpt2", config)
    assert engine.manifest["decoder"]["eos_token_id"] == [50256]
    two = [[5, 6, 7, 8, 9], [10, 11]]
    np.testing.assert_array_equal(engine.generate(two, 8, ignore_eos=True),
                                  hf_greedy(model, two, 8))  # fmt: skip
