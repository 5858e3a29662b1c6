"""Graph passes on a KV-cache decoder are verified on a left-padded prefill too, compared where
the attention mask is 1: padded query positions are never read, and exact rewrites (GQA) fill
them their own way; an error at an unpadded position still rolls a pass back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ffnx.graph import verify
from ffnx.passes.optimize import _read_part, manifest_options, optimize_model

pytest.importorskip("transformers")

from tests.models.test_hf_decoder import write_config  # noqa: E402

ATTENTION = ["static_reshape", "fuse_sibling_linears", "canonical_norm", "rotary_embedding",
             "group_query_attention"]  # fmt: skip


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(spec, the exported model.onnx, its manifest): a tiny random Llama, passes off."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf

    root = tmp_path_factory.mktemp("pad")
    spec = load_hf(str(write_config(root / "src", "llama")), cache=True)
    manifest = export_artifact(spec, root / "art", optimize=False, keep_module=True)
    return spec, onnx.load(str(root / "art" / "model.onnx")), manifest


def test_decoder_sample_feeds_include_a_padded_prefill(llama):
    from ffnx.export.pipeline import sample_feeds

    spec, _, _ = llama
    feeds = sample_feeds(spec)
    prefill = feeds[-1]
    assert prefill["past_key_values.0.key"].shape[2] == 0  # past 0: a prompt's first step
    np.testing.assert_array_equal(prefill["attention_mask"], [[0, 0, 0, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(prefill["position_ids"], [[0, 0, 0, 0], [0, 1, 2, 3]])


def test_gqa_is_judged_on_unpadded_positions(llama):
    """With the decoder's outputs known, group_query_attention applies; compared everywhere
    (padded rows included) the same rewrite is rolled back: the padded prefill is exercised."""
    from ffnx.export.pipeline import sample_feeds

    spec, model, manifest = llama
    feeds = sample_feeds(spec)
    opts = manifest_options(manifest)
    assert opts["decoder_outputs"]["presents"] == manifest["decoder"]["present_outputs"]
    _, reports = optimize_model(model, feeds, passes=ATTENTION, options=opts)
    assert [r["status"] for r in reports] == ["applied"] * len(ATTENTION), reports
    _, reports = optimize_model(model, feeds, passes=ATTENTION, options={"max_length": 512})
    gqa = reports[-1]
    assert gqa["status"] == "rolled_back" and "logits" in gqa["reason"], gqa


def test_read_part_keeps_unpadded_positions_only():
    rng = np.random.default_rng(0)
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    feed = {"input_ids": np.zeros((2, 2), np.int64), "attention_mask": mask}
    ref = {"logits": rng.standard_normal((2, 2, 5)), "present.0.key": rng.standard_normal(
        (2, 3, 4, 8)), "other": rng.standard_normal(3)}  # fmt: skip
    opts = {"decoder_outputs": {"logits": "logits", "presents": ["present.0.key"]}}
    tol = verify.Tolerance()

    def judged(got):
        return verify.failures(verify.compare_outputs(*_read_part(ref, got, feed, opts), tol))

    # the query positions are the last 2 of the mask: row 0's are both unpadded here
    got = {k: v.copy() for k, v in ref.items()}
    got["present.0.key"][0, :, :2] = np.nan  # row 0's padded cache positions: never read
    assert judged(got) == []
    got["present.0.key"][0, :, 2] += 1.0  # an unpadded position
    assert judged(got) and judged(got)[0].startswith("present.0.key")
    got = {k: v.copy() for k, v in ref.items()}
    got["logits"][1, 0] += 1.0
    assert judged(got) and judged(got)[0].startswith("logits")
    got = {k: v.copy() for k, v in ref.items()}
    got["other"][0] += 1.0  # outputs a decoder does not name are compared whole
    assert judged(got) and judged(got)[0].startswith("other")
    assert _read_part(ref, got, feed, {}) == (ref, got)  # not a decoder: unchanged
