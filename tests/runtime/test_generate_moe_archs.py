"""Every MoE architecture the export captures, through the KV-cache decoder export and
`Engine.generate`: greedy tokens equal transformers' greedy `generate` over 32 steps at batch 1
and for a left-padded batch of 2 (random tiny weights, re-drawn at fan-in scale so that tokens
vary and every bias, attention sink and routing choice matters). GPT-OSS (clamped SwiGLU experts
with biases, attention sinks, sliding-window layers) and DeepSeek-V3 (MLA latent caches, group-
limited sigmoid routing) included; so are families captured because their router and block
equal a captured one's (DOTS1, MiMo-V2-Flash, Solar Open, EXAONE MoE, MiniCPM5-MoE, Mellum),
MiniMax-M2, Cohere 2 MoE, AFMoE, HY-V3, Laguna and ERNIE 4.5 MoE (their own readers). A MoE
family no capture rule reads exports as standard ops with its experts as `batched_mm`
(ffnx.models.hf_config.build_model). Architectures that cannot be exported fail with one line
naming the module and why."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("transformers")

from tests.runtime.test_generate import hf_greedy  # noqa: E402

STEPS = 32
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
              tie_word_embeddings=False)  # fmt: skip
TWO = dict(num_experts_per_tok=2)
ROUTED = dict(num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
           v_head_dim=16, num_key_value_heads=4)  # fmt: skip
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128,
            rope_theta=150000.0, beta_fast=32.0, beta_slow=1.0)  # fmt: skip

# model_type -> (config overrides, number of FfnxMoE nodes in the plain export)
ARCHS = {
    # sliding window 6 < prompt + 32 steps on every other layer; limit 1.0 makes both clamps bind
    "gpt_oss": (dict(num_local_experts=4, **TWO, head_dim=16, sliding_window=6,
                     swiglu_limit=1.0, rope_parameters=YARN), 2),
    # first layer dense, second MoE; 4 groups of 2 experts, 2 groups kept
    "deepseek_v3": (dict(n_routed_experts=8, **ROUTED, n_shared_experts=1, n_group=4,
                         topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
                         **MLA), 1),
    # DeepSeek-V2: absorbed MLA with its complex rotary in real arithmetic (mla_absorb)
    "deepseek_v2": (dict(n_routed_experts=8, **ROUTED, n_shared_experts=1, **MLA), 2),
    "qwen2_moe": (dict(num_experts=4, **ROUTED, shared_expert_intermediate_size=48), 2),
    "olmoe": (dict(num_experts=4, **TWO), 2),
    "flex_olmo": (dict(num_experts=4, **TWO, pad_token_id=0, bos_token_id=1, eos_token_id=2), 2),
    "granitemoe": (dict(num_local_experts=4, **TWO), 2),
    "granitemoeshared": (dict(num_local_experts=4, **TWO, shared_intermediate_size=32), 2),
    "glm4_moe": (dict(n_routed_experts=8, **ROUTED, n_shared_experts=1,
                      first_k_dense_replace=1, head_dim=16), 1),
    # GLM-4.7-Flash: DeepSeek-V3's MLA and grouped sigmoid routing; first layer dense
    "glm4_moe_lite": (dict(n_routed_experts=8, **ROUTED, n_shared_experts=1, n_group=4,
                           topk_group=2, **MLA), 1),
    "jetmoe": (dict(kv_channels=16, num_local_experts=4, **TWO), 2),  # the FFN MoE only
    # dense MLA (no MoE): absorbed like DeepSeek-V3's (`ffnx.export.mla_absorb`)
    "minicpm3": (dict(**MLA), 0),
    # LongCat-Flash: absorbed MLA (interleaved rotary), two attentions per layer; its MoE's
    # zero-computation (identity) experts fit no FfnxMoE schema: exported through batched_mm
    "longcat_flash": (dict(num_layers=2, **MLA, head_dim=8, n_routed_experts=4, zero_expert_num=2,
                           moe_topk=2, expert_ffn_hidden_size=32, ffn_hidden_size=96), 0),
    # DBRX's own config layout (COMMON not used); clip_qkv as in dbrx-instruct: with None its
    # qkv.clamp(min=None, max=None) stops torch's exporter
    "dbrx": (dict(d_model=64, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=512,
                  attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                  ffn_config=dict(ffn_hidden_size=96, moe_num_experts=4, moe_top_k=2)), 2),
}  # fmt: skip
# Families whose router and block forwards equal a captured one's under another class name
# (moe_hf.HF_ROUTERS / HF_BLOCKS) and families with readers of their own. One config for all
# (keys a family does not know are ignored); the value is the number of FfnxMoE nodes.
LIKE = dict(num_experts=4, num_local_experts=4, n_routed_experts=4, **ROUTED, n_shared_experts=1,
            first_k_dense_replace=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
for _family, _nodes in (("dots1", 1), ("mimo_v2_flash", 1), ("solar_open", 2), ("exaone_moe", 1),
                        ("minicpm5_moe", 1), ("mellum", 2), ("minimax_m2", 2),
                        ("cohere2_moe", 1), ("afmoe", 1), ("hy_v3", 1), ("laguna", 1),
                        ("ernie4_5_moe", 1)):  # fmt: skip
    ARCHS[_family] = (LIKE, _nodes)
# Ergo: RMSNorm eps 1e-12 after attention (kept by `torch_export._exact_no_op_rules`: without it
# a left-padded row decoded NaN); its expert norms fit no capture rule (batched_mm)
ARCHS["ergo"] = (LIKE, 0)
GAIN = {"mellum": 2.0}  # at gain 1 its greedy repeats 4 tokens
FAST = ("gpt_oss", "deepseek_v3", "deepseek_v2", "dots1", "minimax_m2", "ernie4_5_moe")
# the families added since CI's time budget was set run with FFNX_TEST_ALL_ARCHS=1 (~25 s each)
NEW = ("mimo_v2_flash", "solar_open", "exaone_moe", "minicpm5_moe", "mellum", "afmoe",
       "cohere2_moe", "hy_v3", "laguna", "longcat_flash", "ergo")  # fmt: skip
EVERY = pytest.mark.skipif(os.environ.get("FFNX_TEST_ALL_ARCHS") != "1",
                           reason="FFNX_TEST_ALL_ARCHS=1 runs every architecture")  # fmt: skip
PARAMS = [
    a if a in FAST else pytest.param(a, marks=[pytest.mark.slow, *([EVERY] if a in NEW else [])])
    for a in ARCHS
]

DYNAMIC = dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)
# case -> (model_type, config overrides, the one error line export gives)
UNCLIPPED = dict(ARCHS["dbrx"][0], attn_config=dict(kv_n_heads=2, rope_theta=10000.0))
REFUSED = {
    # a rope whose frequencies change with the length: its complex rotary is not rewritten
    "deepseek_v2-dynamic-rope": (
        "deepseek_v2",
        dict(n_routed_experts=8, **ROUTED, n_shared_experts=1, **MLA, rope_parameters=DYNAMIC),
        "cannot export model.model.rotary_emb (DeepseekV2RotaryEmbedding): its complex rotary "
        "(torch.polar) is rewritten in real arithmetic only for rope types with fixed",
    ),
    "dbrx-clip_qkv-none": (
        "dbrx",
        UNCLIPPED,
        # torch 2.13's eager clamp rejects it before the exporter could (hf_refusals says why
        # for a --no-cache export)
        "DbrxForCausalLM: transformers' own forward fails on one token, so there is nothing to "
        "export: torch.clamp: At least one of 'min' or 'max' must not be None",
    ),
    "phimoe": (
        "phimoe",
        dict(num_local_experts=4, **TWO),
        "cannot export MoE block "
        "model.model.layers.0.mlp (PhimoeSparseMoeBlock) as ffnx::FfnxMoE: sparsemixer",
    ),
    "qwen3_next": (
        "qwen3_next",
        dict(num_experts=4, **ROUTED),
        "Qwen3NextConfig: layer types ['linear_attention'] keep recurrent state",
    ),
    "minimax": (
        "minimax",
        dict(num_local_experts=4, **TWO),
        "MiniMaxConfig: layer types ['linear_attention'] keep recurrent state",
    ),
    "jamba": (
        "jamba",
        dict(num_experts=4, **TWO),
        "JambaConfig: layer types ['linear_attention'] keep recurrent state",
    ),
}


def write_config(directory, model_type: str, overrides: dict):
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": model_type, **({} if "d_model" in overrides else COMMON), **overrides}
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def redraw(model: torch.nn.Module, gain: float = 1.0) -> None:
    """Weights ~ N(0, gain²/fan_in), 1-D parameters other than norms' (biases, sinks) ~
    N(0, 0.2): transformers' init (std 0.02, zero biases) makes a tiny model repeat one token.
    A norm is a parameter named `*norm*` or owned by a module whose class is a `*Norm`
    (GPT-2's `ln_1` is a LayerNorm)."""
    norms = {
        f"{m}.{n}".lstrip(".")
        for m, mod in model.named_modules()
        if "Norm" in type(mod).__name__
        for n, _ in mod.named_parameters(recurse=False)
    }
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * gain * p.shape[-1] ** -0.5)
            elif "norm" not in name and name not in norms:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # must change the selection
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """model_type -> (Engine, transformers model, plain export), once per module (passes on)."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf
    from ffnx.runtime import Engine

    made = {}

    def get(model_type: str):
        if model_type not in made:
            root = tmp_path_factory.mktemp(model_type)
            src = write_config(root / "src", model_type, ARCHS[model_type][0])
            spec = load_hf(str(src), cache=True)
            redraw(spec.module.model, gain=GAIN.get(model_type, 1.0))
            export_artifact(spec, root / "art", source=f"hf:{src}")
            plain = onnx.load(str(root / "art" / "model.onnx"), load_external_data=False)
            made[model_type] = (Engine.load(root / "art", backend="ort"), spec.module.model, plain)
        return made[model_type]

    return get


@pytest.mark.parametrize("model_type", PARAMS)
def test_greedy_tokens_equal_transformers_generate(exported, model_type):
    engine, model, plain = exported(model_type)
    moe = [n for n in plain.graph.node if n.op_type == "FfnxMoE"]
    assert len(moe) == ARCHS[model_type][1]
    rng = np.random.default_rng(1)
    one = [rng.integers(3, 256, 6).tolist()]
    got = engine.generate(one, STEPS, ignore_eos=True)
    assert got.shape == (1, STEPS)
    np.testing.assert_array_equal(got, hf_greedy(model, one, STEPS))
    assert len(set(got[0].tolist())) > 4, "greedy repeats a few tokens: the weights test little"
    two = [rng.integers(3, 256, 7).tolist(), rng.integers(3, 256, 4).tolist()]  # left-padded
    got = engine.generate(two, STEPS, ignore_eos=True)
    np.testing.assert_array_equal(got, hf_greedy(model, two, STEPS))


def test_a_moe_block_no_rule_reads_exports_as_batched_mm(tmp_path, monkeypatch):
    """A MoE family no capture rule reads (here Dots1, its reader removed) still exports: its
    fused experts run as transformers' `batched_mm`, standard ops, no FfnxMoE node, and greedy
    decoding equals transformers'."""
    from ffnx.export import moe_hf
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf
    from ffnx.runtime import Engine

    monkeypatch.delitem(moe_hf.HF_BLOCKS, "Dots1MoE")
    src = write_config(tmp_path / "src", "dots1", LIKE)
    spec = load_hf(str(src), cache=True)
    redraw(spec.module.model)
    assert spec.module.model.config._experts_implementation == "batched_mm"
    export_artifact(spec, tmp_path / "art", source=f"hf:{src}")
    plain = onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False)
    assert not any(n.op_type == "FfnxMoE" for n in plain.graph.node)
    engine, model = Engine.load(tmp_path / "art", backend="ort"), spec.module.model
    rows = [[5, 9, 200, 31, 7, 64], [12, 3, 99]]
    np.testing.assert_array_equal(engine.generate(rows, STEPS, ignore_eos=True),
                                  hf_greedy(model, rows, STEPS))  # fmt: skip


def test_gpt_oss_graph_has_sinks_sliding_windows_and_clamped_experts(exported):
    engine, model, plain = exported("gpt_oss")
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    moe = [n for n in plain.graph.node if n.op_type == "FfnxMoE"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in moe[0].attribute}
    assert attrs["activation"] == b"clamped_swiglu" and attrs["scoring"] == b"topk_softmax"
    assert attrs["activation_limit"] == 1.0 and abs(attrs["activation_alpha"] - 1.702) < 1e-6
    assert len(moe[0].input) >= 6 and moe[0].input[3] and moe[0].input[5]  # fc1/fc2 biases
    # a prompt longer than the window: the sliding layer must mask what the full one keeps
    rng = np.random.default_rng(2)
    long = [rng.integers(3, 256, 20).tolist()]
    np.testing.assert_array_equal(engine.generate(long, 8, ignore_eos=True),
                                  hf_greedy(model, long, 8))  # fmt: skip


def test_deepseek_v2_rotary_runs_as_interleaved_rotary_ops(exported):
    """DeepSeek-V2's pair rotary (real arithmetic, `mla_absorb`) fuses into one interleaved
    RotaryEmbedding per q and cached key; its cache is transformers' latent layout."""
    engine, _, _ = exported("deepseek_v2")
    dec = engine.manifest["decoder"]
    assert dec["kv_heads"] == [1, 1] and dec["key_dim"] == [16, 16] and dec["value_dim"] == [8, 8]
    opt = onnx.load(Path(engine.path) / "model.opt.onnx", load_external_data=False)
    rot = [n for n in opt.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rot) == 2 * 2
    assert all({a.name: a.i for a in n.attribute}.get("interleaved") == 1 for n in rot)


def test_longcat_interleaved_rotary_runs_as_rotary_ops(exported):
    """LongCat-Flash rotates interleaved pairs whatever its config says: its absorbed twin runs
    the rotate-half form on de-interleaved projection copies, fused into one RotaryEmbedding per
    q and cached key (two attentions per layer), and greedy tokens equal transformers'."""
    engine, model, _ = exported("longcat_flash")
    opt = onnx.load(Path(engine.path) / "model.opt.onnx", load_external_data=False)
    caches = len(engine.manifest["decoder"]["kv_heads"])
    assert [n.op_type for n in opt.graph.node].count("RotaryEmbedding") == 2 * caches
    rows = [[5, 9, 200, 31, 7, 64], [12, 3, 99]]
    np.testing.assert_array_equal(engine.generate(rows, STEPS, ignore_eos=True),
                                  hf_greedy(model, rows, STEPS))  # fmt: skip


def test_deepseek_v3_decoder_caches_mla_latents(exported):
    engine, model, plain = exported("deepseek_v3")
    dec = engine.manifest["decoder"]
    assert dec["kv_heads"] == [1, 1] and dec["key_dim"] == [16, 16] and dec["value_dim"] == [8, 8]
    # absorbed (`ffnx.export.mla_absorb`): no per-step key assembly by slice copies, and no
    # kv_b_proj [R, H*(N+V)] applied to the cache; its halves are per-head [H, N, R] / [H, R, V]
    assert not any(n.op_type == "ScatterND" for n in plain.graph.node)
    shapes = {tuple(i.dims) for i in plain.graph.initializer}
    assert (16, 4 * (16 + 16)) not in shapes and (4 * (16 + 16), 16) not in shapes
    # its interleaved rotary runs as one RotaryEmbedding per q and cached key (the projections'
    # rotary rows taken de-interleaved), and the query is not concatenated only to be split again
    opt = onnx.load(Path(engine.path) / "model.opt.onnx", load_external_data=False)
    ops = [n.op_type for n in opt.graph.node]
    assert ops.count("RotaryEmbedding") == 2 * 2

    def axis(n):
        return next((a.i for a in n.attribute if a.name == "axis"), 0) % 4  # rank-4 q

    cat = {n.output[0]: axis(n) for n in opt.graph.node if n.op_type == "Concat"}
    assert not any(n.op_type == "Split" and cat.get(n.input[0]) == axis(n) for n in opt.graph.node)


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_architectures_fail_with_one_error_line(tmp_path, case):
    """`ffnx export hf:DIR`: exit 1, one `error:` line naming the module (or config) and why,
    and no artifact directory left behind."""
    from click.testing import CliRunner

    from ffnx.cli import main

    model_type, overrides, want = REFUSED[case]
    src = write_config(tmp_path / "src", model_type, overrides)
    out = tmp_path / "art"
    r = CliRunner().invoke(main, ["export", f"hf:{src}", "--out", str(out)])
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("error:")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and want in lines[0], lines[0]
    assert not (out / "manifest.json").exists()
