"""ONNX Runtime CPU sessions for checking and timing graphs (one way to open and run them)."""

from __future__ import annotations

import numpy as np
import onnx

from ffnx.errors import VerificationError, first_line
from ffnx.graph.model_io import is_big, session_path


def ort_session(model, threads: int | None = None, prepack: bool = True):
    """An ORT CPU session from an onnx.ModelProto (of any size), bytes or a path (errors ->
    VerificationError).

    Workers spin between the kernels of a run (ORT's default: what a deployed model gets), but
    stop when it ends: otherwise they go on spinning for tens of ms and steal the cores from the
    next session timed (3 sessions of one FFN round-robin ran 2.4x slower than one alone). Every
    timing in ffnx (lowering choices, benchmarks) uses these sessions. prepack=False: no packed
    copy of the weights (a session run once to check outputs: half the memory, faster to make)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures come back as exceptions, which callers word as one line
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        so.intra_op_num_threads = threads
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    try:
        if isinstance(model, onnx.ModelProto) and is_big(model):
            with session_path(model) as path:  # past protobuf's 2 GiB: external data
                return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        line = first_line(e)
        raise VerificationError(f"ONNX Runtime cannot load the graph: {line}") from e


def run_session(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def _cut(graph, outputs):
    """A copy of the onnx-graphsurgeon `graph` whose outputs are `outputs` (by name)."""
    g = graph.copy()
    t = g.tensors()
    g.outputs = [t[o.name] for o in outputs]
    return g, t


def subgraph_inputs(graph, outputs) -> list:
    """The graph inputs (gs tensors) that `outputs` (tensors of the onnx-graphsurgeon `graph`)
    are computed from."""
    g, _ = _cut(graph, outputs)
    g.cleanup(remove_unused_graph_inputs=True)
    names = {x.name for x in g.inputs}
    return [x for x in graph.inputs if x.name in names]


def subgraph_runner(graph, outputs, inputs: list[str]):
    """One ORT session for the part of the onnx-graphsurgeon `graph` that computes `outputs`
    (float32 tensors) from the graph inputs named `inputs` (the rest of the graph is dropped):
    -> run(feeds) -> [arrays of `outputs`]; built once, run on as many feeds as needed."""
    from ffnx.graph.export import export_model

    g, t = _cut(graph, outputs)
    for o in g.outputs:
        o.dtype, o.shape = np.float32, None
    g.inputs = [t[n] for n in inputs]
    g.cleanup()
    sess, names = ort_session(export_model(g), prepack=False), [o.name for o in g.outputs]
    return lambda feeds: sess.run(names, feeds)


def run_subgraph(graph, outputs, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """`subgraph_runner` run once on `feeds`."""
    return subgraph_runner(graph, outputs, list(feeds))(feeds)
