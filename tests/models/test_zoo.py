"""The zoo: names, ModelSpec contents, determinism, parameter budgets, norms made non-trivial,
MoE layer and expert counts, errors for unknown names and sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ffnx.errors import ModelSpecError
from ffnx.models import zoo
from ffnx.models.moe import MoE
from ffnx.models.norms import RMSNorm

REQUIRED = ["gpt-mlp", "gpt-swiglu", "gpt-geglu", "gpt-moe", "gpt-switch", "gpt-moe-shared",
            "gpt-finegrained", "gpt-hash", "gpt-duo", "gpt-rmsnorm", "gpt-periln", "gpt-lnfree",
            "vit-mlp", "vit-repa", "vit-prepbn", "bert-postln", "paf", "structured"]  # fmt: skip
MOE_NAMES = [n for n in zoo.names() if zoo.ZOO[n].variant.startswith("moe")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is much faster than two that must sync on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny() -> dict:
    return {name: zoo.build(name, "tiny") for name in zoo.names()}


def test_names():
    assert set(REQUIRED) <= set(zoo.names())
    assert len(set(zoo.names())) == len(zoo.names())
    assert {"gpt-moe", "gpt-switch", "gpt-moe-shared", "gpt-finegrained", "gpt-hash",
            "gpt-duo"} <= set(MOE_NAMES)  # fmt: skip


def test_tiny_specs_run_at_example_and_other_shapes(tiny):
    for name, spec in tiny.items():
        assert spec.name == name and not spec.module.training, name
        assert spec.variant and spec.description and spec.params < 1_500_000, name
        if zoo.ZOO[name].family in ("vit", "conv"):
            assert spec.dynamic == {"pixels": {0: "batch"}} and spec.max_dims == {}
            assert spec.inputs["pixels"].shape == (2, 3, 32, 32)
            other = spec.make_inputs({"batch": 1})
            assert other["pixels"].shape == (1, 3, 32, 32)
        else:
            assert spec.dynamic == {"input_ids": {0: "batch", 1: "seq"}}
            assert spec.max_dims == {"seq": 128}
            ids = spec.inputs["input_ids"]
            assert ids.shape == (2, 16) and ids.dtype == torch.int64
            other = spec.make_inputs({"batch": 1, "seq": 7})
            assert other["input_ids"].shape == (1, 7) and int(other["input_ids"].max()) < 512
        with torch.no_grad():
            y0 = spec.module(*spec.inputs.values())
            y1 = spec.module(*other.values())
        assert torch.isfinite(y0).all() and torch.isfinite(y1).all(), name
        assert y0.shape[0] == 2 and y1.shape[0] == 1, name


@pytest.mark.parametrize("name", ["gpt-moe-shared", "gpt-hash", "vit-repa", "gpt-rmsnorm"])
def test_build_is_deterministic(tiny, name):
    a, b = tiny[name], zoo.build(name, "tiny")
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.inputs["input_ids" if "vit" not in name else "pixels"],
                       b.inputs["input_ids" if "vit" not in name else "pixels"])  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(a.module(*a.inputs.values()), b.module(*b.inputs.values()),
                                   rtol=0, atol=0)  # fmt: skip


def test_models_differ_by_seed(tiny):
    a, b = tiny["gpt-swiglu"].module, tiny["gpt-geglu"].module
    assert not torch.equal(a.tok.weight, b.tok.weight)


def test_norms_and_batchnorms_are_non_trivial(tiny):
    bns = 0
    for name, spec in tiny.items():
        for m in spec.module.modules():
            if isinstance(m, nn.BatchNorm1d):
                bns += 1
                assert (m.running_mean != 0).all() and (m.running_var != 1).all(), name
                assert (m.running_var > 0).all() and (m.bias != 0).all(), name
            if isinstance(m, (nn.BatchNorm1d, nn.LayerNorm, RMSNorm)):
                assert (m.weight != 1).all(), name
    assert bns == 2 + (2 * 2 + 1)  # vit-repa: one per FFN; vit-prepbn: 2 per block + final


def test_moe_models_have_moe_layers_and_expert_counts(tiny):
    for name in MOE_NAMES:
        layers = [m for m in tiny[name].module.modules() if isinstance(m, MoE)]
        assert len(layers) >= 2, name
        for m in layers:
            lo, hi = (16, 32) if name == "gpt-finegrained" else (3, 8)
            assert lo <= m.num_experts <= hi, name
            if m.score_bias is not None:
                assert (m.score_bias != 0).all(), name
    shared = next(m for m in tiny["gpt-moe-shared"].module.modules() if isinstance(m, MoE))
    assert (shared.scoring, shared.normalize, shared.routed_scaling_factor) == (
        "sigmoid",
        True,
        2.5,
    )
    assert shared.shared is not None and shared.shared_gate is not None


def test_base_expert_counts_on_meta():
    with torch.device("meta"):
        for name in ("gpt-moe", "gpt-finegrained"):
            model = zoo.ZOO[name].build(zoo.SIZES["base"])
            counts = {m.num_experts for m in model.modules() if isinstance(m, MoE)}
            assert counts == ({32} if name == "gpt-finegrained" else {8})


@pytest.mark.parametrize("size, lo, hi", [("tiny", 50_000, 1_500_000), ("base", 10e6, 100e6)])
def test_param_counts(size, lo, hi):
    for name in zoo.names():
        d = zoo.describe(name, size)
        assert set(d) == {"name", "variant", "params", "description", "size"}
        assert d["name"] == name and d["size"] == size
        assert lo <= d["params"] <= hi, (name, d["params"])


def test_describe_counts_what_build_builds(tiny):
    for name in ("gpt-moe-shared", "vit-repa", "gpt-hash"):
        assert zoo.describe(name)["params"] == tiny[name].params


def test_unknown_name_and_size():
    with pytest.raises(ModelSpecError, match="unknown model 'gpt-nope'") as e:
        zoo.build("gpt-nope")
    assert all(n in str(e.value) for n in zoo.names())
    with pytest.raises(ModelSpecError, match="unknown size 'huge'; sizes: tiny, base"):
        zoo.build("gpt-mlp", "huge")
    with pytest.raises(ModelSpecError, match="unknown model"):
        zoo.describe("nope", "base")
