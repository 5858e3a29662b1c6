"""shared_dims: Shape reads of a symbolic dim read the first graph input that holds it."""

from __future__ import annotations

import onnx

from tests.passes.helpers import (
    check_applied,
    check_unchanged,
    model,
    ort_kernels,
    rand,
    skip_reasons,
)

# two caches with one past length P; each "layer" slices the mask to its own cache's length,
# as transformers' eager attention does (mask[..., :past + seq])
LAYERS = """
g (float[B, H, P, 4] k0, float[B, H, P, 8] v1, float[B, T] mask) => (float[B, N] y) {
    zero = Constant <value = int64[1] {0}> ()
    one = Constant <value = int64[1] {1}> ()
    p0 = Shape <start = 2, end = 3> (k0)
    e0 = Add (p0, one)
    m0 = Slice (mask, zero, e0, one)
    p1 = Shape <start = -2, end = -1> (v1)
    e1 = Add (p1, one)
    m1 = Slice (mask, zero, e1, one)
    y = Add (m0, m1)
}
"""
FEEDS = [
    {"k0": rand(1, 2, 5, 4), "v1": rand(1, 2, 5, 8), "mask": rand(1, 9)},
    {"k0": rand(2, 2, 3, 4, seed=1), "v1": rand(2, 2, 3, 8, seed=1), "mask": rand(2, 4)},
]


def _shape_reads(m: onnx.ModelProto) -> list[tuple[str, int, int]]:
    return [(n.input[0], *(a.i for a in n.attribute)) for n in m.graph.node if n.op_type == "Shape"]


def test_each_layer_reads_past_length_from_the_first_cache():
    new, _ = check_applied("shared_dims", model(LAYERS), FEEDS, n_applied=1)
    assert _shape_reads(new) == [("k0", 2, 3), ("k0", 2, 3)]


def test_identical_chains_then_run_once_in_onnx_runtime(tmp_path):
    before = model(LAYERS)
    new, _ = check_applied("shared_dims", before, FEEDS, n_applied=1)
    assert ort_kernels(before, tmp_path)["Slice"] == 2
    assert ort_kernels(new, tmp_path)["Slice"] == 1


def test_dims_no_earlier_input_holds_are_left_alone():
    # v1's past is named Q: a different symbol, so nothing says it equals k0's P
    m = model(LAYERS.replace("float[B, H, P, 8] v1", "float[B, H, Q, 8] v1"))
    rep = check_unchanged("shared_dims", m, FEEDS)
    assert "already the first graph input" in skip_reasons(rep)


def test_unknown_and_integer_dims_are_left_alone():
    unknown = model(LAYERS.replace("float[B, H, P, 8] v1", "float[B, H, ?, 8] v1"))
    assert "not all known" in skip_reasons(check_unchanged("shared_dims", unknown, FEEDS))
    ints = model(
        """
        g (float[B, 4] a, float[B, 4] b, float[B, T] mask) => (float[B, N] y) {
            zero = Constant <value = int64[1] {0}> ()
            one = Constant <value = int64[1] {1}> ()
            w = Shape <start = 1> (b)
            y = Slice (mask, zero, w, one)
        }
        """
    )
    feeds = [{"a": rand(2, 4), "b": rand(2, 4), "mask": rand(2, 6)}]
    assert "integers" in skip_reasons(check_unchanged("shared_dims", ints, feeds))
