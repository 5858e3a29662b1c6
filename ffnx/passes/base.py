"""The shape of a graph pass: `match` (pattern), `check` (exactness, with a reason), `rewrite`.

Passes work on onnx-graphsurgeon graphs. The driver (ffnx.passes.optimize) gives each pass a
fresh graph, calls `apply`, and afterwards runs cleanup, shape inference, the onnx checker and
numerical verification against the graph before the pass; a failing pass is rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class Match:
    """One candidate site: the nodes involved plus whatever `rewrite` needs."""

    nodes: list[gs.Node]
    info: dict = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{n.op}({n.name})" for n in self.nodes[:4])


@dataclass
class PassContext:
    """What a pass may read besides the graph.

    feeds: sample inputs (calibration data for approximate passes).
    max_error: approximate passes refuse above this max abs error of the final outputs.
    target: "ort" or "trt" (lowering passes choose by it).
    """

    feeds: list[dict[str, np.ndarray]] = field(default_factory=list)
    max_error: float | None = None
    target: str = "ort"
    options: dict = field(default_factory=dict)


@dataclass
class PassResult:
    matched: int = 0
    applied: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (site, reason)
    notes: dict = field(default_factory=dict)  # pass-specific measurements (errors, choices)


class GraphPass:
    """Subclass, set `name`, write the docstring (math + exactness condition), implement
    `match`/`check`/`rewrite`. Override `apply` only when sites interact (e.g. calibration).

    `iterate = True` when one rewrite changes the sites the next one sees (merging sums,
    narrowing FFNs): `apply` then rewrites the first site that passes `check`, cleans the graph
    up and matches again, until no site passes (at most `max_rounds` rewrites); the sites left
    are reported as skipped with their reasons."""

    name: str = ""
    exact: bool = True  # False: approximate, opt-in, needs calibration feeds and --max-error
    default: bool = True  # runs in the default pipeline ...
    targets: tuple[str, ...] = ("ort", "trt")  # ... for these targets (where it measured faster)
    iterate: bool = False  # match again after every rewrite (see the class docstring)
    max_rounds: int = 256

    def match(self, graph: gs.Graph) -> list[Match]:
        raise NotImplementedError

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        """None when the rewrite is exact for this match, else the reason it is skipped."""
        return None

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        raise NotImplementedError

    def apply(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.iterate:
            return self._apply_iterating(graph, ctx)
        res = PassResult()
        matches = self.match(graph)
        state = self.prepare(graph, ctx, matches)
        refused = state if isinstance(state, str) else state.get("refuse")
        for m in matches:
            res.matched += 1
            reason = refused or self.check(graph, m)
            if reason:
                res.skipped.append((m.describe(), reason))
                continue
            self.rewrite(graph, m, ctx)
            res.applied += 1
            self.note(res, m)
        self.finish(graph, ctx, res, matches, None if isinstance(state, str) else state)
        return res

    def prepare(self, graph: gs.Graph, ctx: PassContext, matches: list[Match]) -> str | dict:
        """Before the first site: a reason that skips every site (the target, no calibration
        feeds), or shared state for `finish` (e.g. reference outputs; a "refuse" key skips
        every site with that reason and still reaches `finish`); calibration passes store
        per-site values in `m.info` here."""
        return {}

    def finish(self, graph, ctx: PassContext, res: PassResult, matches, state) -> None:
        """After the last site: graph-wide bookkeeping (opset imports, measured error, notes);
        `state` is what `prepare` returned, None when it refused with a reason string."""

    def _apply_iterating(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        res = PassResult()
        for _ in range(self.max_rounds):
            sites = [(m, self.check(graph, m)) for m in self.match(graph)]
            todo = next((m for m, reason in sites if not reason), None)
            if todo is None:
                res.matched += len(sites)
                res.skipped += [(m.describe(), reason) for m, reason in sites]
                break
            self.rewrite(graph, todo, ctx)
            graph.cleanup()  # drop the replaced nodes before matching again
            res.matched += 1
            res.applied += 1
            self.note(res, todo)
        return res

    def followed_by(self, ctx: PassContext) -> tuple[str, ...]:
        """Passes the driver runs on the graph right after this one applied (by name), e.g.
        an exact merge that the rewrite makes possible."""
        return ()

    def note(self, res: PassResult, m: Match) -> None:
        """Record what an applied match did in `res.notes` (optional)."""

    @property
    def summary(self) -> str:
        doc = (self.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""
