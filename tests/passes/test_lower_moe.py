"""lower_moe: kept for TensorRT, lowered for ORT to the chosen candidate; the chooser's cache and
decision rule (timings are faked: tests never depend on this machine's speed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from ffnx.graph import lowering_meta
from ffnx.graph.ort import ort_session, run_session
from ffnx.lowering import choose as chooser
from ffnx.lowering import decompose_ffnx_ops, lowering_report
from ffnx.lowering.moe_model import MoEConfig, moe_feeds, moe_model, moe_weights
from ffnx.passes import PassContext
from ffnx.passes.lower_moe import PASS
from ffnx.passes.optimize import optimize_model

CFG = MoEConfig(D=32, H=32, E=4, k=2, normalize=1, bias=True)
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture
def model() -> onnx.ModelProto:
    return moe_model(CFG, moe_weights(CFG))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FFNX_MOE_LOWERING", raising=False)
    monkeypatch.setattr(chooser, "_MEASURED", {})
    return tmp_path / "cache"


def _apply(model, **ctx):
    graph = gs.import_onnx(model)
    res = PASS.apply(graph, PassContext(**ctx))
    graph.cleanup().toposort()
    out = lowering_meta.finish(gs.export_onnx(graph), model, graph)
    return out, res


def _run(model, feeds):
    return run_session(ort_session(model), feeds)["output"]


def test_trt_keeps_the_plugin_node(model):
    out, res = _apply(model, target="trt")
    assert (res.matched, res.applied) == (1, 0)
    assert "TensorRT plugin" in res.skipped[0][1]
    assert [n.op_type for n in out.graph.node] == ["FfnxMoE"]


@pytest.mark.parametrize("choice", ["sorted", "dense", "gather", "ort_moe", "sorted|4|dense"])
def test_ort_lowers_to_the_forced_choice(model, choice):
    out, res = _apply(model, options={"moe_lowering": choice})
    assert (res.matched, res.applied) == (1, 1)
    assert res.notes["layers"]["moe"]["lowering"] == choice
    assert not any(n.domain == "ffnx" for n in out.graph.node)
    assert lowering_report(out) == {"moe": f"{choice} (forced by option moe_lowering)"}
    assert all(n.name.startswith(f"moe/{choice.replace('|', '_')}/") for n in out.graph.node)
    feeds = moe_feeds(CFG, 16)
    ref = _run(decompose_ffnx_ops(model), feeds)
    np.testing.assert_allclose(_run(out, feeds), ref, atol=ATOL, rtol=RTOL)


def test_every_branch_of_an_if_lowering_is_checked(model):
    _, res = _apply(model, options={"moe_lowering": "sorted|4|dense"})
    errors = res.notes["layers"]["moe"]["branches_max_abs"]
    assert sorted(errors) == [1, 4, 5]  # T=1 and both sides of the switch at 4
    assert all(e <= 1e-5 for e in errors.values()), errors


def test_an_if_branch_that_disagrees_falls_back_to_sorted(model, monkeypatch):
    from ffnx.passes import lower_moe

    monkeypatch.setattr(lower_moe, "branch_errors", lambda node, lowering: {1: 0.0, 5: 0.5})
    out, res = _apply(model, options={"moe_lowering": "sorted|4|dense"})
    note = res.notes["layers"]["moe"]
    assert note["lowering"] == "sorted" and "disagreed" in note["why"] and "{5: 0.5}" in note["why"]
    assert lowering_report(out)["moe"].startswith("sorted (sorted: the If sorted|4|dense")


def test_driver_applies_and_verifies(model):
    feeds = [moe_feeds(CFG, T) for T in (1, 16)]
    new, (report,) = optimize_model(
        model, feeds, passes=["lower_moe"], options={"moe_lowering": "dense"}
    )
    assert report["status"] == "applied", report
    assert report["notes"]["layers"]["moe"]["lowering"] == "dense"
    assert lowering_report(new)["moe"].startswith("dense")


def test_driver_keeps_the_contrib_domain(model):
    feeds = [moe_feeds(CFG, 16)]
    new, (report,) = optimize_model(
        model, feeds, passes=["lower_moe"], options={"moe_lowering": "ort_moe"}
    )
    assert report["status"] == "applied", report
    assert any(o.domain == "com.microsoft" for o in new.opset_import)


def test_dynamic_shaped_weights_are_skipped_with_a_reason(model):
    init = next(i for i in model.graph.initializer if i.name == "fc1_weight")
    model.graph.initializer.remove(init)
    model.graph.input.append(
        onnx.helper.make_tensor_value_info("fc1_weight", onnx.TensorProto.FLOAT, ["E", "H1", "D"])
    )
    _, res = _apply(model, options={"moe_lowering": "sorted"})
    assert (res.matched, res.applied) == (1, 0)
    assert "static 3-D shapes" in res.skipped[0][1]


def _fake_timer(table, calls, noisy=False, if_cost=0.99):
    """time_lowerings stand-in: samples from `table[T][candidate]`; an If "a|t|b" costs
    `if_cost` times its branch at T, a candidate missing from the table 10x the slowest (noisy:
    the two halves of the rounds rank the candidates in opposite orders); records each call."""

    def seconds(T, c):
        if "|" not in c:
            return table[T].get(c, 10 * max(table[T].values()))
        a, t, b = c.split("|")
        return if_cost * table[T][a if T <= int(t) else b]

    def fake(cfg, names, tokens, threads=None, skip=None):
        calls.append((tuple(names), tuple(tokens)))
        out = {T: {c: [seconds(T, c)] * 4 for c in names if not skip(T, c)} for T in tokens}
        if noisy:
            for d in out.values():
                n = len(d)
                for i, v in enumerate(d.values()):
                    v[:] = [1.0 + i, 1.0 + i, n - i, n - i]
        return out

    return fake


def test_measured_choice_is_cached(model, cache_dir, monkeypatch):
    from ffnx.lowering import timing

    table = {T: {"sorted": 1.0, "gather": 3.0, "dense": 2.0, "ort_moe": 1.5} for T in (1, 16)}
    calls = []
    monkeypatch.setattr(timing, "time_lowerings", _fake_timer(table, calls))
    for _ in range(2):
        _, res = _apply(model, options={"tokens": [1, 16]})
        assert res.notes["layers"]["moe"]["lowering"] == "sorted"
    assert len(calls) == 1  # measured once, then the cache answers
    (entry,) = json.loads((cache_dir / "lower_moe.json").read_text()).values()
    assert set(entry["timings"]) == {"1", "16"}
    assert res.notes["layers"]["moe"]["timings_ms"]["16"]["dense"] == 2000.0


def test_noisy_timings_use_the_rule_and_are_not_cached(model, cache_dir, monkeypatch):
    from ffnx.lowering import timing

    table = {T: {"sorted": 2.0, "gather": 3.0, "dense": 1.0, "ort_moe": 1.5} for T in (1, 16)}
    monkeypatch.setattr(timing, "time_lowerings", _fake_timer(table, [], noisy=True))
    _, res = _apply(model, options={"tokens": [1, 16]})
    assert res.notes["layers"]["moe"]["lowering"] == chooser.RULE
    assert "too busy" in res.notes["layers"]["moe"]["why"]
    assert not (cache_dir / "lower_moe.json").exists()


BRANCHY = {
    1: {"sorted": 1.0, "gather": 3.0, "dense": 2.0, "ort_moe": 0.5},
    16: {"sorted": 1.0, "gather": 9.0, "dense": 0.5, "ort_moe": 1.0},
}


def test_winners_differing_by_t_give_an_if(model, monkeypatch):
    from ffnx.lowering import timing

    monkeypatch.setattr(timing, "time_lowerings", _fake_timer(BRANCHY, []))
    out, res = _apply(model, options={"tokens": [1, 16]})
    assert res.notes["layers"]["moe"]["lowering"] == "ort_moe|1|dense"
    assert [n.op_type for n in out.graph.node if n.op_type == "If"] == ["If"]
    _, res = _apply(model, options={"tokens": [1, 16], "moe_branch": False})
    assert res.notes["layers"]["moe"]["lowering"] == "ort_moe"  # geometric mean 1.41 vs 2


def _as_decoder(model: onnx.ModelProto) -> onnx.ModelProto:
    """The layer with an (unused) past_key_values input, as a KV-cache decoder graph has."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.input.append(
        onnx.helper.make_tensor_value_info("past_key_values.0.key", onnx.TensorProto.FLOAT, None)
    )
    return m


def test_a_decoder_gets_the_fastest_form_at_one_token_and_no_if(model, monkeypatch):
    from ffnx.lowering import timing

    monkeypatch.setattr(timing, "time_lowerings", _fake_timer(BRANCHY, []))
    out, res = _apply(_as_decoder(model), options={"tokens": [1, 16]})
    note = res.notes["layers"]["moe"]
    assert note["lowering"] == "ort_moe" and note["why"].startswith("decoder: fastest"), note
    assert not [n for n in out.graph.node if n.op_type == "If"]
    _, res = _apply(_as_decoder(model), options={"tokens": [1, 16], "decode": False})
    assert res.notes["layers"]["moe"]["lowering"] == "ort_moe|1|dense"  # the option wins


def test_decode_choice_breaks_ties_at_one_token_by_the_geometric_mean():
    t = {1: {"a": 1.0, "b": 1.03, "c": 2.0}, 16: {"a": 3.0, "b": 1.0, "c": 1.0}}
    assert chooser.decide_decode(t)[0] == "b"  # a and b tie at T=1; b is far better at T=16
    t = {1: {"a": 1.0, "b": 1.2}, 16: {"a": 3.0, "b": 1.0}}
    assert chooser.decide_decode(t)[0] == "a"  # decode speed first, whatever the prompt costs


def test_an_if_that_does_not_pay_for_itself_is_dropped(model, monkeypatch):
    from ffnx.lowering import timing

    monkeypatch.setattr(timing, "time_lowerings", _fake_timer(BRANCHY, [], if_cost=1.8))
    _, res = _apply(model, options={"tokens": [1, 16]})
    note = res.notes["layers"]["moe"]
    assert note["lowering"] == "ort_moe" and "the If (ort_moe|1|dense) timed" in note["why"]


def test_an_if_costing_a_few_microseconds_is_kept(model, monkeypatch):
    """Small layers: the If's fixed cost is a large fraction of the layer at small T, little in
    absolute terms; it is kept where it gains elsewhere (here 1.11x at T=16)."""
    from ffnx.lowering import timing

    small = {T: {c: v * 1e-5 for c, v in d.items()} for T, d in BRANCHY.items()}
    monkeypatch.setattr(timing, "time_lowerings", _fake_timer(small, [], if_cost=1.8))
    _, res = _apply(model, options={"tokens": [1, 16]})
    note = res.notes["layers"]["moe"]
    assert note["lowering"] == "ort_moe|1|dense", note["why"]
    assert "0.56-1.11x as fast as ort_moe" in note["why"]


def test_an_if_pays_only_its_own_launch_where_it_runs_the_single_form():
    assert chooser.branch_at("a|4|b|64|c", 1) == "a" and chooser.branch_at("a|4|b|64|c", 16) == "b"
    assert chooser.branch_at("a|4|b|64|c", 256) == "c" and chooser.branch_at("a", 256) == "a"
    launch = {1: {"a|1|b": 9e-6, "a": 5e-6}, 16: {"a|1|b": 10.4e-6, "a": 10e-6}}
    assert chooser.if_pays(launch, "a|1|b", "a")  # T=1: +4 us of If launch on `a` itself
    other = {1: {"a|1|b": 9e-6, "a": 5e-6}, 16: {"a|1|b": 12e-6, "a": 10e-6}}
    assert not chooser.if_pays(other, "a|1|b", "a")  # T=16 runs `b`, 20 % slower than `a`


def test_segments_ignore_differences_within_the_margin():
    t = {1: {"a": 1.0, "b": 1.04}, 16: {"a": 1.03, "b": 1.0}, 256: {"a": 1.0, "b": 2.0}}
    assert chooser.segments(t) == [("a", 256)]
    t = {
        1: {"a": 1.0, "b": 2.0},
        4: {"a": 1.0, "b": 1.0},
        16: {"a": 2.0, "b": 1.0},
        64: {"a": 3.0, "b": 1.0},
    }
    assert chooser.segments(t) == [("a", 4), ("b", 64)]


def test_segment_ties_go_to_the_closest_to_the_fastest_overall():
    t = {1: {"a": 1.0, "b": 1.01}, 16: {"a": 1.0, "b": 1.0}, 256: {"a": 1.04, "b": 1.0}}
    assert chooser.segments(t) == [("b", 256)]  # a wins T=1 by 1 %, b wins T=256 by 4 %


def test_measurement_off_uses_the_rule(model, monkeypatch):
    _, res = _apply(model, options={"moe_measure": False})
    assert res.notes["layers"]["moe"]["lowering"] == chooser.RULE
    monkeypatch.setenv("FFNX_MOE_LOWERING", "dense")
    _, res = _apply(model, options={"moe_lowering": "gather"})
    assert res.notes["layers"]["moe"] == {"lowering": "dense", "why": "forced by FFNX_MOE_LOWERING"}


def test_quantized_experts_report_their_error(model):
    assert not PASS.is_exact(PassContext(options={"quantize_experts": "int4"}))
    out, res = _apply(model, options={"quantize_experts": "int4", "moe_measure": False})
    note = res.notes["layers"]["moe"]
    assert note["lowering"] == "sorted_int4"
    assert note["quantization_error"]["cosine"] > 0.99
    assert any(n.op_type == "MatMulNBits" for n in out.graph.node)
    assert any(o.domain == "com.microsoft" for o in out.opset_import)


def test_ort_moe_is_not_a_candidate_where_it_does_not_fit():
    from ffnx.lowering.moe_common import MoESite

    cfg = MoEConfig(D=32, H=32, activation="geglu")
    node = next(n for n in gs.import_onnx(moe_model(cfg, moe_weights(cfg))).nodes)
    names, skipped = chooser.applicable(MoESite.of(node))
    assert "ort_moe" not in names and "geglu" in skipped["ort_moe"]


def test_timed_lowerings_take_turns_over_token_batches():
    """The chooser times every candidate on TURNS different batches in turn (different experts
    per call at small T, as in decoding), the same sequence for every candidate."""
    from ffnx.lowering import timing

    seen = []
    call = timing._turns([1, 2, 3], seen.append)
    for _ in range(7):
        call()
    assert seen == [1, 2, 3, 1, 2, 3, 1]
    out = timing.time_lowerings(CFG, ["sorted", "dense"], [1], rounds=2, max_rounds=2)
    assert set(out[1]) == {"sorted", "dense"} and all(len(v) == 2 for v in out[1].values())
