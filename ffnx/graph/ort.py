"""ONNX Runtime CPU sessions for checking and timing graphs (one way to open and run them)."""

from __future__ import annotations

import numpy as np

from ffnx.errors import VerificationError


def ort_session(model, threads: int | None = None):
    """An ORT CPU session from an onnx.ModelProto, bytes or a path (errors -> VerificationError).

    Workers spin between the kernels of a run (ORT's default: what a deployed model gets), but
    stop when it ends: otherwise they go on spinning for tens of ms and steal the cores from the
    next session timed (3 sessions of one FFN round-robin ran 2.4x slower than one alone). Every
    timing in ffnx (lowering choices, benchmarks) uses these sessions."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if threads:
        so.intra_op_num_threads = threads
    src = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VerificationError(f"ONNX Runtime cannot load the graph: {line}") from e


def run_session(sess, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    return dict(zip(names, sess.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def subgraph_inputs(graph, outputs) -> list:
    """The graph inputs (gs tensors) that `outputs` (tensors of the onnx-graphsurgeon `graph`)
    are computed from."""
    g = graph.copy()
    t = g.tensors()
    g.outputs = [t[o.name] for o in outputs]
    g.cleanup(remove_unused_graph_inputs=True)
    names = {x.name for x in g.inputs}
    return [x for x in graph.inputs if x.name in names]


def run_subgraph(graph, outputs, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate the part of the onnx-graphsurgeon `graph` that computes `outputs` (float32
    tensors) from the graph inputs named in `feeds` (the rest of the graph is dropped) on ORT."""
    from ffnx.graph.export import export_model

    g = graph.copy()
    t = g.tensors()
    g.outputs = [t[o.name] for o in outputs]
    for o in g.outputs:
        o.dtype, o.shape = np.float32, None
    g.inputs = [t[n] for n in feeds]
    g.cleanup()
    return ort_session(export_model(g)).run([o.name for o in g.outputs], feeds)
