"""The base driver loop of a declared pass rule: match / check / rewrite, `iterate`, `prepare`
(a blanket reason or shared state) and `finish`."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.passes.base import GraphPass, Match, PassContext


def _chain(n: int) -> gs.Graph:
    """x -> Relu -> Relu -> ... (n nodes) -> y."""
    x = gs.Variable("x", np.float32, [2])
    t, nodes = x, []
    for i in range(n):
        out = gs.Variable(f"t{i}", np.float32, [2])
        nodes.append(gs.Node("Relu", f"relu{i}", inputs=[t], outputs=[out]))
        t = out
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[t], opset=17)


class DropDoubleRelu(GraphPass):
    """Relu(Relu(x)) -> Relu(x): one rewrite makes the next site (iterates)."""

    name = "drop_double_relu"
    iterate = True

    def match(self, graph):
        def after_relu(n):
            return bool(n.inputs[0].inputs) and n.inputs[0].inputs[0].op == "Relu"

        return [Match([n]) for n in graph.nodes if n.op == "Relu" and after_relu(n)]

    def check(self, graph, m):
        reads_relu0 = m.nodes[0].inputs[0].inputs[0].name == "relu0"
        return "keeps relu0" if reads_relu0 and self.keep else None

    keep = False

    def rewrite(self, graph, m, ctx):
        n = m.nodes[0]
        n.inputs[0] = n.inputs[0].inputs[0].inputs[0]

    def note(self, res, m):
        res.notes["n"] = res.notes.get("n", 0) + 1


def test_iterate_rewrites_until_no_site_passes():
    g = _chain(4)
    res = DropDoubleRelu().apply(g, PassContext())
    assert [n.op for n in g.nodes] == ["Relu"] and res.applied == 3 and res.notes == {"n": 3}
    assert res.skipped == []


def test_iterate_reports_the_sites_left_with_their_reason():
    p = DropDoubleRelu()
    p.keep = True
    g = _chain(3)
    res = p.apply(g, PassContext())
    assert res.applied == 1 and [s[1] for s in res.skipped] == ["keeps relu0"]
    assert len(g.nodes) == 2


def test_iterate_stops_at_max_rounds():
    p = DropDoubleRelu()
    p.max_rounds = 2
    res = p.apply(_chain(6), PassContext())
    assert res.applied == 2


class Calibrated(GraphPass):
    """Rewrites every Relu after `prepare`; refuses without feeds."""

    name = "calibrated"

    def match(self, graph):
        return [Match([n]) for n in graph.nodes if n.op == "Relu"]

    def prepare(self, graph, ctx, matches):
        if not ctx.feeds:
            return "no calibration feeds"
        for m in matches:
            m.info["alpha"] = 0.5
        return {"seen": len(matches)}

    def rewrite(self, graph, m, ctx):
        m.nodes[0].op, m.nodes[0].attrs = "LeakyRelu", {"alpha": m.info["alpha"]}

    def finish(self, graph, ctx, res, matches, state):
        res.notes["state"] = state


def test_prepare_refusal_skips_every_site_and_finish_sees_none():
    g = _chain(2)
    res = Calibrated().apply(g, PassContext())
    assert res.matched == 2 and res.applied == 0
    assert [r for _, r in res.skipped] == ["no calibration feeds"] * 2
    assert res.notes == {"state": None} and [n.op for n in g.nodes] == ["Relu", "Relu"]


def test_prepare_state_reaches_rewrite_and_finish():
    g = _chain(2)
    res = Calibrated().apply(g, PassContext(feeds=[{"x": np.ones(2, np.float32)}]))
    assert res.applied == 2 and res.notes == {"state": {"seen": 2}}
    assert [n.attrs["alpha"] for n in g.nodes] == [0.5, 0.5]
