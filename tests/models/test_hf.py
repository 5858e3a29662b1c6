"""`hf:PATH` models: tiny random-weight transformers MoE LMs export through the pipeline with one
FfnxMoE node per MoE layer and match the original (uncaptured) model at T = 1, 16, 256."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from ffnx.errors import ExportError, ModelSpecError
from ffnx.graph.ort import ort_session
from ffnx.models.user import resolve

pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
              tie_word_embeddings=False)  # fmt: skip
MLA = dict(
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
)
CONFIGS = {
    "mixtral": dict(architectures=["MixtralForCausalLM"], num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(architectures=["Qwen2MoeForCausalLM"], num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=48),
    # export-heavy (~15 s each): run with -m slow
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                        n_group=1, topk_group=1,
                        **MLA),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                     n_shared_experts=1, first_k_dense_replace=1),
}  # fmt: skip
FAST = ("mixtral", "qwen2_moe")
TOKENS = ((1, 1), (1, 16), (2, 128))  # T = 1, 16, 256


def write_config(directory, model_type: str, **overrides):
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": model_type, **COMMON, **CONFIGS.get(model_type, {}), **overrides}
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


@pytest.mark.parametrize(
    "model_type", [t if t in FAST else pytest.param(t, marks=pytest.mark.slow) for t in CONFIGS]
)
def test_hf_moe_exports_one_node_per_layer_and_verifies(tmp_path, model_type):
    export_and_verify(tmp_path, model_type)


@pytest.mark.slow
def test_hf_deepseek_v3_group_limited_routing_exports_and_verifies(tmp_path):
    """DeepSeek-V3 / R1 route within groups (n_group=8, topk_group=4); here 4 groups keep 2."""
    export_and_verify(tmp_path, "deepseek_v3", n_routed_experts=16, n_group=4, topk_group=2)


def export_and_verify(tmp_path, model_type: str, **overrides):
    """Export `hf:` through the pipeline: one FfnxMoE per MoE layer, ORT == the original."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.lowering import runnable

    src = write_config(tmp_path / model_type, model_type, **overrides)
    spec = resolve(f"hf:{src}")
    assert spec.variant == "moe-top2" and list(spec.inputs) == ["input_ids"]
    manifest = export_artifact(spec, tmp_path / "art", optimize=False)
    assert manifest["plugins"] == ["FfnxMoE"]
    model = onnx.load(str(tmp_path / "art" / "model.onnx"))
    moe = [n for n in model.graph.node if n.op_type == "FfnxMoE"]
    dense = CONFIGS[model_type].get("first_k_dense_replace", 0)
    assert len(moe) == COMMON["num_hidden_layers"] - dense and {n.domain for n in moe} == {"ffnx"}
    assert not any(n.op_type == "NonZero" for n in model.graph.node)
    sess = ort_session(runnable(model))
    for b, s in TOKENS:  # against the original transformers modules (nothing captured now)
        ids = spec.make_inputs({"batch": b, "seq": s})
        with torch.no_grad():
            ref = spec.module(**ids).numpy()
        got = sess.run(None, {"input_ids": ids["input_ids"].numpy()})[0]
        assert got.shape == (b, s, COMMON["vocab_size"])
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_bare_config_file_gives_seeded_random_weights(tmp_path):
    cfg = write_config(tmp_path / "m", "mixtral", num_hidden_layers=1) / "config.json"
    a, b = resolve(f"hf:{cfg}"), resolve(f"hf:{cfg.parent}")
    assert a.dynamic == {"input_ids": {0: "batch", 1: "seq"}} and a.max_dims == {"seq": 512}
    ids = a.inputs["input_ids"]
    assert ids.dtype == torch.int64 and int(ids.min()) == 0 and int(ids.max()) == 255
    with torch.no_grad():
        assert torch.equal(a.module(ids), b.module(ids))


def test_model_directory_with_weights_loads_them(tmp_path):
    src = resolve(f"hf:{write_config(tmp_path / 'cfg', 'mixtral', num_hidden_layers=1)}")
    with torch.no_grad():
        for p in src.module.parameters():
            p.add_(0.01)
    src.module.model.save_pretrained(tmp_path / "saved")
    loaded = resolve(f"hf:{tmp_path / 'saved'}")
    assert "random weights" not in loaded.description
    ids = src.inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(ids), src.module(ids), rtol=0, atol=0)


def test_missing_paths_are_spec_errors(tmp_path):
    with pytest.raises(ModelSpecError, match="no such directory"):
        resolve(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="no config.json"):
        resolve(f"hf:{tmp_path / 'empty'}")


def test_refused_architecture_fails_export_with_one_line(tmp_path):
    from ffnx.export.pipeline import export_artifact

    src = write_config(tmp_path / "phi", "phimoe", num_hidden_layers=1, num_local_experts=4,
                       num_experts_per_tok=2)  # fmt: skip
    with pytest.raises(ExportError) as info:
        export_artifact(resolve(f"hf:{src}"), tmp_path / "art", optimize=False)
    msg = str(info.value)
    assert "\n" not in msg and "model.model.layers.0.mlp (PhimoeSparseMoeBlock)" in msg
    assert "sparsemixer" in msg and not (tmp_path / "art").exists()
