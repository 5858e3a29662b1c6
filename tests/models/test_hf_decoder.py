"""KV-cache decoder export (`ffnx export hf:DIR`): one graph for prefill and decode, equal to
transformers with its own DynamicCache over a prefill and 4 decode steps at batch 1 and 2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from ffnx.errors import ModelSpecError
from ffnx.graph.ort import ort_session

pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
              tie_word_embeddings=False)  # fmt: skip
ARCHS = {
    "llama": {},
    "qwen3": dict(head_dim=16),
    "mistral": dict(sliding_window=6),  # sliding window shorter than prompt + decode
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, head_dim=16),
}  # fmt: skip
FAST = ("llama", "mixtral")
PARAMS = [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]


def write_config(directory, model_type: str, **overrides):
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": model_type, **COMMON, **ARCHS.get(model_type, {}), **overrides}
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def export_decoder(tmp_path, model_type: str):
    """-> (spec, ORT session of the exported decoder, MoE node count)."""
    from ffnx.export.capture import captured
    from ffnx.export.torch_export import export_onnx
    from ffnx.lowering import runnable
    from ffnx.models.hf import load_hf

    spec = load_hf(str(write_config(tmp_path / model_type, model_type)), cache=True)
    with captured(spec.module, "ort"):
        export_onnx(spec, tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    moe = sum(n.op_type == "FfnxMoE" for n in model.graph.node)
    return spec, ort_session(runnable(model)), moe


@pytest.mark.parametrize("model_type", PARAMS)
def test_decoder_matches_transformers_cache_prefill_and_decode(tmp_path, model_type):
    from transformers import DynamicCache

    spec, sess, moe = export_decoder(tmp_path, model_type)
    assert moe == (2 if model_type in ("mixtral", "qwen3_moe") else 0)
    hf = spec.module.model
    n = spec.module.n_layers
    names = [o.name for o in sess.get_outputs()]
    assert names == spec.output_names
    rng = np.random.default_rng(0)
    for batch in (1, 2):
        ids = rng.integers(0, 256, (batch, 5))
        mask = np.ones((batch, 5), np.int64)
        mask[-1, :2] = 0 if batch == 2 else 1  # the second row left-padded by 2
        cache = DynamicCache()
        pasts = {f"past_key_values.{i}.{k}": np.zeros((batch, 2, 0, 16), np.float32)
                 for i in range(n) for k in ("key", "value")}  # fmt: skip
        step_ids = ids
        for _ in range(5):  # prefill, then 4 decode steps
            pos = np.clip(mask.cumsum(-1) - 1, 0, None)[:, -step_ids.shape[1] :]
            with torch.no_grad():
                t = {
                    k: torch.from_numpy(v)
                    for k, v in (
                        ("input_ids", step_ids),
                        ("attention_mask", mask),
                        ("position_ids", pos),
                    )
                }
                ref = hf(**t, past_key_values=cache, use_cache=True)  # fmt: skip
            got = sess.run(None, {"input_ids": step_ids, "attention_mask": mask,
                                  "position_ids": pos, **pasts})  # fmt: skip
            np.testing.assert_allclose(got[0], ref.logits.numpy(), rtol=1e-3, atol=1e-4)
            for i, layer in enumerate(ref.past_key_values.layers):
                np.testing.assert_allclose(got[1 + 2 * i], layer.keys.numpy(), atol=1e-5)
                np.testing.assert_allclose(got[2 + 2 * i], layer.values.numpy(), atol=1e-5)
            assert got[1].shape[2] == mask.shape[1]
            pasts = dict(zip(pasts, got[1:]))
            step_ids = got[0][:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)


def test_spec_declares_cache_io_and_manifest_fields(tmp_path):
    from ffnx.models.hf import load_hf

    spec = load_hf(str(write_config(tmp_path / "m", "llama", eos_token_id=7)), cache=True)
    assert list(spec.inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert list(spec.inputs)[3:] == [f"past_key_values.{i}.{k}" for i in (0, 1)
                                     for k in ("key", "value")]  # fmt: skip
    assert spec.dynamic["past_key_values.1.value"] == {0: "batch", 2: "past"}
    dec = spec.manifest_extra["decoder"]
    assert dec["eos_token_id"] == [7] and dec["layers"] == 2 and dec["kv_heads"] == [2, 2]
    b, t, p = 2, 3, 5
    assert spec.inputs["attention_mask"].shape == (b, p + t)
    assert spec.inputs["past_key_values.0.key"].shape == (b, 2, p, 16)


def test_no_cache_keeps_the_logits_export(tmp_path):
    from ffnx.models.hf import load_hf

    spec = load_hf(str(write_config(tmp_path / "m", "llama")))
    assert list(spec.inputs) == ["input_ids"] and not hasattr(spec, "manifest_extra")


def test_recurrent_layers_are_refused_with_one_line():
    from transformers import LlamaConfig

    from ffnx.models.hf_decoder import check_cache_layers

    cfg = LlamaConfig(**COMMON)
    cfg.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ModelSpecError, match=r"LlamaConfig: layer types \['linear_attention'\]"):
        check_cache_layers(cfg)


def test_cli_no_cache_export_and_generate_refuses_it(tmp_path):
    from click.testing import CliRunner

    from ffnx import artifact
    from ffnx.cli import main

    src = write_config(tmp_path / "m", "llama", num_hidden_layers=1)
    art = tmp_path / "art"
    r = CliRunner().invoke(main, ["export", f"hf:{src}", "--out", str(art), "--no-cache",
                                  "--no-optimize"], catch_exceptions=False)  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = artifact.read_manifest(art)
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids"] and "decoder" not in manifest
    r = CliRunner().invoke(main, ["generate", str(art), "--prompt-ids", "1,2"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("error: ") and "is not a KV-cache decoder" in lines[0]
