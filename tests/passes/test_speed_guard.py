"""speed_guard: with an injected deterministic timer, a pass whose removal is faster is dropped
(and reported), a pass that helps is kept, a graph still slower than its input falls back to it,
explicit passes bypass the guard, and the decision is cached (a second run does not time again).
One test runs the real ORT timing end to end through `ffnx export` / `ffnx optimize`."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

from ffnx.passes import speed_guard
from tests.passes.helpers import bn_params, model, op_counts, rand

C = 4


def _model():
    return model(f"""g (float[N, {C}, 8, 8] x) => (float[N, {C}, 8, 8] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w3, b3)
        n = BatchNormalization(x, bn_g, bn_b, bn_m, bn_v)
        y = Add(a, n) }}""", {"w3": rand(C, C, 3, 3), "b3": rand(C), **bn_params(C)})  # fmt: skip


def _feeds(n=8, batch=1):
    return [{"x": rand(batch, C, n, n, seed=s)} for s in range(2)]


def fake_timer(slow_name: str, calls: list, per_node: float = 1.0):
    """Seconds = per_node per node, +10 per node whose name contains `slow_name` (what one pass
    writes), so that pass 'is slower'; the input graph always 1 s per node; deterministic."""

    def timer(models, feeds):
        calls.append(sorted(models))
        return {k: (1.0 if k == "input" else per_node) * len(m.graph.node)
                + 10.0 * sum(slow_name in n.name for n in m.graph.node)
                for k, m in models.items()}  # fmt: skip

    return timer


def test_slower_pass_is_dropped_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path))
    m, calls = _model(), []
    # merge_conv_branches' Conv is made slow -> the pass is dropped.
    slow = fake_timer("merged_conv", calls)
    new, reports, g = speed_guard.optimize_guarded(m, _feeds(), timer=slow)
    assert "merge_conv_branches" in g["dropped"] and g["cached"] is False
    assert {"name": "merge_conv_branches", "status": "dropped_slower"}.items() <= next(
        r for r in reports if r["name"] == "merge_conv_branches"
        and r["status"] == "dropped_slower").items()  # fmt: skip
    assert op_counts(new)["Add"] >= 1 and g["speedup"] and calls
    assert "merge_conv_branches" in speed_guard.summary(g)
    # cached: the same input and passes are not timed again
    calls.clear()
    _, _, g2 = speed_guard.optimize_guarded(m, _feeds(), timer=fake_timer("merged_conv", calls))
    assert g2["dropped"] == g["dropped"] and calls == [] and g2["cached"] is True


def test_prepared_graphs_are_timed_and_cached_apart(tmp_path, monkeypatch):
    """`prepare` (--quantize: linears to MatMulNBits) is applied to every graph timed, the input
    included, each once per call; the decision is cached under its `variant`, apart from the
    unprepared one. Here prepare makes the merged Conv slow, so only the prepared guard drops
    merge_conv_branches."""
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path))
    m, seen, prepared = _model(), [], []

    def prepare(g):
        prepared.append(g)
        out = onnx.ModelProto()
        out.CopyFrom(g)
        for n in out.graph.node:
            n.name = f"{n.name}/int4"
        return out

    def timer(models, feeds):
        seen.append({k: all(n.name.endswith("/int4") for n in g.graph.node) for k, g in
                     models.items()})  # fmt: skip
        return (
            fake_timer("merged_conv", [])(models, feeds)
            if all(seen[-1].values())
            else {k: float(len(g.graph.node)) for k, g in models.items()}
        )

    _, _, plain = speed_guard.optimize_guarded(m, _feeds(), timer=timer)
    assert plain["dropped"] == [] and "timed_as" not in plain
    seen.clear()
    _, _, q = speed_guard.optimize_guarded(m, _feeds(), timer=timer, prepare=prepare,
                                           variant="int4")  # fmt: skip
    assert "merge_conv_branches" in q["dropped"] and q["timed_as"] == "int4" and not q["cached"]
    assert seen and all(all(v.values()) for v in seen)  # every graph timed was prepared
    assert sum(g is m for g in prepared) == 1  # the input prepared once
    _, _, again = speed_guard.optimize_guarded(m, _feeds(), timer=timer)
    assert again["cached"] and again["dropped"] == []  # the unprepared decision stands apart


def test_faster_pass_is_kept_and_explicit_passes_bypass(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path))
    m, calls = _model(), []
    new, reports, g = speed_guard.optimize_guarded(m, _feeds(), larger_feeds=_feeds(batch=4)[:1],
                                                   timer=fake_timer("nothing", calls))  # fmt: skip
    assert g["dropped"] == [] and op_counts(new) == {"Conv": 1}
    assert g["shapes"] == ["1x4x8x8", "4x4x8x8"] and all(v > 1.0 for v in g["speedup"].values())
    assert not any(r["status"] == "dropped_slower" for r in reports)
    calls.clear()
    new, _, g = speed_guard.optimize_guarded(m, _feeds(), passes=["fold_batchnorm"],
                                             timer=fake_timer("nothing", calls))  # fmt: skip
    assert calls == [] and g["dropped"] == [] and op_counts(new)["Mul"] == 1


def test_larger_shape_the_graph_cannot_run_is_not_timed(tmp_path, monkeypatch):
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path))
    _, _, g = speed_guard.optimize_guarded(_model(), _feeds(), larger_feeds=_feeds(16)[:1],
                                           timer=fake_timer("nothing", []))  # fmt: skip
    assert g["shapes"] == ["1x4x8x8"] and list(g["speedup"]) == ["1x4x8x8"]


def test_still_slower_than_input_falls_back_to_it(tmp_path, monkeypatch):
    """Every optimized graph costs 10 s per node (the input 1 s): no single removal helps
    enough on its own, and the guard returns the input graph with every pass dropped."""
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path))
    m = _model()
    new, reports, g = speed_guard.optimize_guarded(
        m, _feeds(), timer=fake_timer("nothing", [], per_node=10.0), use_cache=False
    )
    assert new.SerializeToString() == m.SerializeToString()
    assert "merge_conv_branches" in g["dropped"] and set(g["speedup"].values()) == {1.0}


def test_paired_ratio_is_the_median_of_round_ratios():
    s = {"a": [1.0, 2.0, 10.0], "b": [1.0, 1.0, 1.0]}
    assert speed_guard.paired_ratio(s, "a", "b") == 2.0
    assert speed_guard.paired_ratio({"a": 3.0, "b": 1.5}, "a", "b") == 2.0


def test_faster_needs_the_median_and_most_rounds():
    """A sign test over paired rounds: a graph 10 % faster in every round is faster; one faster
    in 2 of 4 rounds (noise) is not, even with a median below the margin; one much slower on
    one shape set is not, whatever the other set says."""
    steady = {"a": [0.9] * 4, "b": [1.0] * 4}
    assert speed_guard.faster([steady], "a", "b")["faster"]
    assert not speed_guard.faster([steady], "b", "a")["faster"]
    noisy = {"a": [0.5, 0.5, 1.1, 1.1], "b": [1.0] * 4}
    assert not speed_guard.faster([noisy], "a", "b")["faster"]
    slower_once = {"a": [1.1] * 4, "b": [1.0] * 4}
    v = speed_guard.faster([{"a": [0.5] * 4, "b": [1.0] * 4}, slower_once], "a", "b")
    assert not v["faster"] and v["ratio"] == [0.5, 1.1] and v["wins"] == "4/8"


def test_disabled_by_env(monkeypatch):
    for v in ("off", "0", "False"):
        monkeypatch.setenv("FFNX_SPEED_GUARD", v)
        assert not speed_guard.enabled()
    monkeypatch.setenv("FFNX_SPEED_GUARD", "on")
    assert speed_guard.enabled()


CONV_BN = """
import torch

class Rep(torch.nn.Module):  # RepVGG-style: 3x3 + 1x1 branches summed (merge_conv_branches)
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(4, 8, 1)

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))

def build():
    torch.manual_seed(0)
    return Rep().eval(), (torch.randn(2, 4, 8, 8),), {"x": {0: "batch"}}
"""


def test_real_timing_end_to_end_export_and_optimize(tmp_path, monkeypatch):
    """The real ORT timer, on a tiny two-branch conv: `ffnx export` records the guard in the
    manifest and prints its line; a second export hits the cache; `ffnx optimize` on a file runs
    it too and `--no-guard` skips it."""
    from ffnx.cli import main

    monkeypatch.setenv("FFNX_SPEED_GUARD", "on")
    monkeypatch.setenv("FFNX_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "net.py").write_text(CONV_BN)
    ref, out = f"{tmp_path / 'net.py'}:build", tmp_path / "art"
    r = CliRunner().invoke(main, ["export", ref, "--out", str(out), "--threads", "1"])
    assert r.exit_code == 0, r.output
    g = json.loads((out / "manifest.json").read_text())["speed_guard"]
    assert g["threads"] == 1 and g["cached"] is False and g["margin"] == speed_guard.MARGIN
    assert g["shapes"] == ["2x4x8x8", "8x4x8x8"] and set(g["speedup"]) == set(g["shapes"])
    assert g["trials"] and all(
        {"without", "faster", "ratio", "wins"} <= set(t) for t in g["trials"]
    )
    assert all(0.2 < v < 5.0 for v in g["speedup"].values())
    assert "speed guard" in r.output
    r = CliRunner().invoke(main, ["export", ref, "--out", str(out), "--threads", "1", "--force"])
    assert r.exit_code == 0, r.output
    g2 = json.loads((out / "manifest.json").read_text())["speed_guard"]
    assert g2["cached"] is True and g2["dropped"] == g["dropped"]
    r = CliRunner().invoke(main, ["optimize", str(out), "--threads", "1", "--force"])
    assert r.exit_code == 0 and "speed guard" in r.output, r.output
    g3 = json.loads((out / "manifest.json").read_text())["speed_guard"]
    assert g3["threads"] == 1 and g3["shapes"][0] == "2x4x8x8"
    src, dst = out / "model.onnx", tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(dst), "--threads", "1"])
    assert r.exit_code == 0 and "speed guard" in r.output, r.output
    onnx.checker.check_model(onnx.load(str(dst)))
    r = CliRunner().invoke(main, ["optimize", str(src), "-o", str(dst), "--no-guard", "--force"])
    assert r.exit_code == 0 and "speed guard" not in r.output, r.output


@pytest.mark.parametrize("cmd", ["export", "optimize"])
def test_threads_must_be_positive(cmd, tmp_path, user_model_file):
    from ffnx.cli import main

    src = f"{user_model_file}:build" if cmd == "export" else str(user_model_file)
    args = [cmd, src, "--threads", "0"] + (
        ["--out", str(tmp_path / "a")] if cmd == "export" else []
    )
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "--threads" in r.output and not (tmp_path / "a").exists()


def test_threads_reach_the_measured_choices(tmp_path, monkeypatch):
    """export --threads N: the passes' options carry N (the MoE lowering and attention choices
    time at the artifact's threads, not at ORT's default)."""
    from ffnx.export.pipeline import export_artifact
    from ffnx.models import zoo
    from ffnx.passes import optimize

    seen = []
    real = optimize.optimize_model

    def spy(*a, **kw):
        seen.append((kw.get("options") or {}).get("threads"))
        return real(*a, **kw)

    monkeypatch.setattr(optimize, "optimize_model", spy)
    export_artifact(zoo.build("gpt-mlp", "tiny"), tmp_path / "a", threads=1, guard=False)
    assert seen == [1]
