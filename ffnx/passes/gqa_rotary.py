"""Rotary into GroupQueryAttention: the `rotary_embedding` pass's RotaryEmbedding nodes before a
GQA become the op's own rotary (do_rotary = 1), fed the graph's position_ids.

After `rotary_embedding`, each of q and k reaches GQA as

    q' = RotaryEmbedding(q, r, C, S)   q [B, S, H*D], r [B, S] rows of C, S [rows, D/2]

with C and S computed every step from position_ids (the model's own rope: cos/sin of
positions x inv_freq, any scaling), C[r[b, s]] = f(position_ids[b, s]). GQA with do_rotary
computes, per (b, s, head), the same rotate-half map with cos_cache[p], sin_cache[p] at
p = position_ids[b, s] (its position_ids input; measured on the CPU kernel of ORT 1.32, the
oldest version the pass fuses with (MIN_ORT): equal to the unfused graph for left-padded
prompts and decode steps, tests/runtime/test_generate.py). So the rewrite tabulates f once, for
every position the model can take:

    cos_cache = C evaluated with position_ids = [[0, 1, ..., L-1]]   [L, D/2], sin likewise

(L = the decoder's maximum length, `options["max_length"]`), by running the graph's own C/S
subgraph on ONNX Runtime, and feeds GQA q, k, cos_cache, sin_cache and position_ids.

Exact when C and S are an elementwise function of position_ids: checked, not assumed — the
subgraph must read no graph input but position_ids, and C evaluated on a random [2, 5]
position_ids must equal the table's rows at those positions (a rope that depends on the
longest position, like dynamic NTK scaling, fails it). Then both graphs compute the same
products per element (the kernel's multiply-add aside). Not fused (the separate
RotaryEmbedding stays, the reason in the pass notes): no maximum length, C/S reading other
inputs or not elementwise, a rotary over part of the head (GQA's fused rotary rotates the
whole head here), an interleaved rotary.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.tensors import const, producer

MIN_ORT = (1, 32)  # GQA's per-row position_ids verified from this ONNX Runtime on
CHECK_POSITIONS = np.array([[3, 0, 7, 1, 2], [9, 4, 4, 11, 5]], np.int64)  # any order, repeats


def _runner(graph: gs.Graph, outputs: list[gs.Tensor]):
    """run(position_ids) -> `outputs` computed from position_ids alone, or why they need
    another graph input."""
    from ffnx.graph.ort import subgraph_inputs, subgraph_runner

    other = [t.name for t in subgraph_inputs(graph, outputs) if t.name != "position_ids"]
    if other:
        return f"the rotary cos/sin read {other[0]}, not only position_ids"
    run = subgraph_runner(graph, outputs, ["position_ids"])
    return lambda positions: run({"position_ids": positions})


def _row_ids(t: gs.Tensor) -> bool:
    """t is the `rotary_embedding` pass's row index Expand(Reshape(Range(0, rows, 1)))."""
    ex = producer(t, "Expand")
    rs = producer(ex.inputs[0], "Reshape") if ex is not None else None
    rg = producer(rs.inputs[0], "Range") if rs is not None else None
    if rg is None:
        return False
    start, delta = const(rg.inputs[0]), const(rg.inputs[2])
    return start is not None and delta is not None and int(start) == 0 and int(delta) == 1


def rotary_of(t: gs.Tensor) -> gs.Node | None:
    """The com.microsoft::RotaryEmbedding writing `t` as the `rotary_embedding` pass builds it
    (rotate-half over the whole head, rows b*S + s of its cos/sin)."""
    n = producer(t, "RotaryEmbedding")
    if n is None or n.attrs.get("interleaved", 0) or n.attrs.get("rotary_embedding_dim", 0):
        return None
    return n if len(n.inputs) == 4 and _row_ids(n.inputs[1]) else None


def _tabulate(graph: gs.Graph, rot: gs.Node, max_len: int):
    """(cos_cache, sin_cache) or why not (see the module docstring)."""
    run = _runner(graph, [rot.inputs[2], rot.inputs[3]])
    if isinstance(run, str):
        return run
    full = run(np.arange(max_len, dtype=np.int64)[None, :])
    cos, sin = (np.asarray(x, np.float32).reshape(max_len, -1) for x in full)
    idx = CHECK_POSITIONS.reshape(-1)
    for got, table in zip(run(CHECK_POSITIONS), (cos, sin)):
        got = np.asarray(got, np.float32)
        if got.shape != (idx.size, table.shape[1]) or not np.array_equal(got, table[idx]):
            return "the rotary cos/sin are not an elementwise function of position_ids"
    return cos, sin


def tables(graph: gs.Graph, rot: gs.Node, max_len: int | None,
           cache: dict) -> tuple[np.ndarray, np.ndarray] | str:  # fmt: skip
    """(cos_cache, sin_cache) [max_len, D/2] float32 for `rot`'s C and S, or why not
    (see the module docstring); `cache` keeps them per (C, S) pair."""
    key = (rot.inputs[2].name, rot.inputs[3].name)
    if key not in cache:
        import onnxruntime

        version = tuple(int(v) for v in onnxruntime.__version__.split(".")[:2])
        if not max_len:
            cache[key] = "no maximum length for the rotary tables (options max_length)"
        elif version < MIN_ORT:
            cache[key] = (f"ONNX Runtime {onnxruntime.__version__}: GQA's per-row position_ids "
                          f"verified from {'.'.join(map(str, MIN_ORT))}")  # fmt: skip
        elif "position_ids" not in {t.name for t in graph.inputs}:
            cache[key] = "no position_ids input"
        else:
            cache[key] = _tabulate(graph, rot, int(max_len))
    return cache[key]
