"""speed_guard: with an injected deterministic timer, a pass whose removal is faster is dropped
(and reported), a pass that helps is kept, explicit passes bypass the guard, and the decision is
cached (a second run does not time again)."""

from __future__ import annotations

from ffnx.passes import speed_guard
from tests.passes.helpers import bn_params, model, op_counts, rand

C = 4


def _model():
    return model(f"""g (float[1, {C}, 8, 8] x) => (float[1, {C}, 8, 8] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w3, b3)
        n = BatchNormalization(x, bn_g, bn_b, bn_m, bn_v)
        y = Add(a, n) }}""", {"w3": rand(C, C, 3, 3), "b3": rand(C), **bn_params(C)})  # fmt: skip


def _feeds(n=8):
    return [{"x": rand(1, C, n, n, seed=s)} for s in range(2)]


def fake_timer(slow_name: str, calls: list):
    """Seconds = 1 per node, +10 per node whose name contains `slow_name` (what one pass
    writes), so that pass 'is slower'; deterministic."""

    def timer(models, feeds):
        calls.append(sorted(models))
        return {k: len(m.graph.node) + 10.0 * sum(slow_name in n.name for n in m.graph.node)
                for k, m in models.items()}  # fmt: skip

    return timer


def test_slower_pass_is_dropped_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path))
    m, calls = _model(), []
    # merge_conv_branches' Conv is made slow -> the pass is dropped.
    slow = fake_timer("merged_conv", calls)
    new, reports, g = speed_guard.optimize_guarded(m, _feeds(), timer=slow)
    assert "merge_conv_branches" in g["dropped"]
    assert {"name": "merge_conv_branches", "status": "dropped_slower"}.items() <= next(
        r for r in reports if r["name"] == "merge_conv_branches"
        and r["status"] == "dropped_slower").items()  # fmt: skip
    assert op_counts(new)["Add"] >= 1 and g["speedup"] is not None and calls
    # cached: the same input and passes are not timed again
    calls.clear()
    _, _, g2 = speed_guard.optimize_guarded(m, _feeds(), timer=fake_timer("merged_conv", calls))
    assert g2["dropped"] == g["dropped"] and calls == []


def test_faster_pass_is_kept_and_explicit_passes_bypass(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path))
    m, calls = _model(), []
    new, reports, g = speed_guard.optimize_guarded(m, _feeds(), larger_feeds=_feeds(16)[:1],
                                                   timer=fake_timer("nothing", calls))  # fmt: skip
    assert g["dropped"] == [] and op_counts(new) == {"Conv": 1} and g["speedup"] > 1.0
    calls.clear()
    new, _, g = speed_guard.optimize_guarded(m, _feeds(), passes=["fold_batchnorm"],
                                             timer=fake_timer("nothing", calls))  # fmt: skip
    assert calls == [] and g["dropped"] == [] and op_counts(new)["Mul"] == 1
