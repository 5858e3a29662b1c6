"""Running a graph under construction on ONNX Runtime: what approximate passes measure with.

`output_error` compares the graph's outputs with reference outputs by `verify`'s comparator.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.errors import VerificationError, first_line
from ffnx.graph.export import export_model


def to_model(graph: gs.Graph, extra_outputs: list[str] = ()) -> onnx.ModelProto:
    """A runnable copy of `graph` (cleaned, sorted), optionally exposing more tensors."""
    g = graph.copy()
    tensors = g.tensors()
    exposed = {t.name for t in list(g.inputs) + list(g.outputs)}
    for name in dict.fromkeys(extra_outputs):
        if name in exposed:
            continue
        t = tensors[name]
        t.dtype = t.dtype if t.dtype is not None else np.float32
        g.outputs.append(t)
    g.cleanup().toposort()
    return export_model(g)


def run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[dict]:
    from ffnx.lowering import run_model  # the driver's runner (lowers ffnx ops)

    return run_model(model, feeds)


def try_run(model: onnx.ModelProto, feeds: list[dict]) -> tuple[list[dict] | None, str | None]:
    """(outputs, None), or (None, why) when ONNX Runtime cannot load or run the model on the
    feeds (unknown ops, missing inputs): approximate passes then skip instead of crashing."""
    try:
        return run(model, feeds), None
    except (VerificationError, RuntimeError, ValueError) as e:
        line = first_line(e)
        return None, f"cannot run the graph on the calibration feeds: {line[:200]}"


def output_error(before: list[dict], graph: gs.Graph, feeds: list[dict]) -> dict:
    """Worst max_abs / max_rel and lowest cosine of `graph`'s outputs against `before` (or
    {"measure_error": why}; the driver's own verification then judges the graph)."""
    from ffnx.graph import verify

    after, why = try_run(to_model(graph), feeds)
    if after is None:
        return {"measure_error": why}
    tol = verify.Tolerance()
    return verify.worst([verify.compare_outputs(r, a, tol) for r, a in zip(before, after)])
