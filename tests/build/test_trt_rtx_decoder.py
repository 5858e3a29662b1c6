"""The KV-cache decoder (`ffnx export hf:DIR --target trt`) for a tiny Llama, Qwen3 and MiniCPM3
(MLA, exported weight-absorbed over its latent cache): a graph TensorRT-RTX's parser takes
(standard ops only), built for real with one optimization profile over batch, seq and past
length, past 0 (prefill) included, plus a decode-only profile."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("transformers")

STANDARD = {"", "ai.onnx"}
MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
           num_key_value_heads=4)  # fmt: skip
CONFIGS = {"minicpm3": MLA}


def _export(tmp_path, model_type: str):
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf
    from tests.models.test_hf_decoder import write_config

    src = write_config(tmp_path / model_type, model_type, num_hidden_layers=1,
                       **CONFIGS.get(model_type, {}))  # fmt: skip
    spec = load_hf(str(src), cache=True)
    out = tmp_path / "art"
    export_artifact(spec, out, target="trt", trt="rtx", force=True)
    return spec, out


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "minicpm3"])
def test_decoder_trt_graph_builds_with_past_zero(tmp_path, rtx, model_type):
    from ffnx.build.engine import build_engine
    from ffnx.graph.ort import ort_session
    from ffnx.models.hf_decoder import cache_geometry, decoder_inputs

    spec, out = _export(tmp_path, model_type)
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["tensorrt_graph_check"]
    assert check["checker"].startswith("TensorRT-RTX"), check  # the real parser took it
    model = onnx.load(str(out / "model.trt.onnx"))
    assert {n.domain for n in model.graph.node} <= STANDARD  # no com.microsoft / ffnx ops
    if model_type == "minicpm3":  # absorbed: no per-step key assembly by slice copies
        assert "ScatterND" not in {n.op_type for n in model.graph.node}

    # past 0 (prefill) runs in the very graph TensorRT gets, equal to the torch wrapper
    feeds = decoder_inputs(cache_geometry(spec.module.model), 2, 4, 0, 256, left_pad=1)
    with torch.no_grad():
        want = spec.module(*feeds.values())[0].numpy()
    got = ort_session(model).run(["logits"], {k: v.numpy() for k, v in feeds.items()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)

    section = build_engine(out, flavour="rtx", compute_capability="86", optimization_level=0,
                           workspace_gib=0.25, profiles=["seq:1,8,64", "past:0,16,128"],
                           extra_profiles=["seq:1,1,1 past:0,64,255"])  # fmt: skip
    prefill, decode = section["optimization_profiles"]
    assert prefill["profiles"]["past"] == [0, 16, 128]
    assert prefill["profiles"]["total"] == [1, 24, 192]  # seq + past
    past = prefill["input_shapes"]["past_key_values.0.key"]
    assert [s[2] for s in past] == [0, 16, 128]
    assert decode["input_shapes"]["attention_mask"] == [[1, 1], [2, 65], [8, 256]]
    assert section["num_optimization_profiles"] == 2
    assert (out / "model.plan").stat().st_size > 0
    if model_type == "llama":  # the defaults: past from 0, total = seq + past
        section = build_engine(out, flavour="rtx", compute_capability="86",
                               optimization_level=0, workspace_gib=0.25)  # fmt: skip
        r = section["profiles"]
        assert r["past"][0] == 0 and r["total"] == [a + b for a, b in zip(r["seq"], r["past"])]
