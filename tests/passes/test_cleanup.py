"""cleanup: constant folding, Identity/Dropout and identity-reshape removal, dead nodes."""

from __future__ import annotations

import numpy as np

from tests.passes.helpers import (
    apply,
    check_applied,
    check_unchanged,
    model,
    op_counts,
    rand,
    skip_reasons,
)

X = {"x": rand(2, 5, 8, seed=1)}


def test_folds_constants_and_drops_identity_dropout_dead_nodes():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 4] y) {
            wt = Transpose <perm = [1, 0]> (w)
            h = MatMul (x, wt)
            i = Identity (h)
            d = Dropout (i)
            dead = Relu (x)
            y = Relu (d)
        }
        """,
        {"w": rand(4, 8)},
    )
    new, rep = check_applied("cleanup", m, [X], n_applied=4)
    assert op_counts(new) == {"MatMul": 1, "Relu": 1}
    assert [o.name for o in new.graph.output] == ["y"]


def test_folds_nodes_whose_domain_field_is_unset():
    """torch's exporter leaves the default domain unset (graphsurgeon reads None): standard ops
    all the same (MLA's per-head weights: Reshape, Split and Mul of kv_b_proj's weight)."""
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 4] y) {
            s = Constant <value = int64[3] {2, 8, 4}> ()
            r = Reshape (w, s)
            a, b = Split <axis = 0, num_outputs = 2> (r)
            c = Mul (a, b)
            h = MatMul (x, c)
            y = Relu (h)
        }
        """,
        {"w": rand(8, 8)},
    )
    for n in m.graph.node:
        n.ClearField("domain")
    new, _ = check_applied("cleanup", m, [X])
    assert op_counts(new) == {"MatMul": 1, "Relu": 1}


def test_a_weight_read_twice_is_not_copied_by_folding():
    """Transpose(E) of a tied LM head: folding would store the table twice."""
    m = model(
        """
        g (int64[2, 5] ids) => (float[2, 5, 300] y) {
            e = Gather (emb, ids)
            et = Transpose <perm = [1, 0]> (emb)
            y = MatMul (e, et)
        }
        """,
        {"emb": rand(300, 256)},
    )
    new, _ = apply("cleanup", m, [{"ids": np.arange(10, dtype=np.int64).reshape(2, 5)}])
    assert op_counts(new)["Transpose"] == 1
    assert len(new.graph.initializer) == 1


def test_identity_writing_a_graph_output_keeps_the_output_name():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 8] y, float[2, 5, 8] z) {
            h = Relu (x)
            y = Identity (h)
            z = Sigmoid (h)
        }
        """
    )
    new, _ = check_applied("cleanup", m, [X], n_applied=1)
    assert op_counts(new) == {"Relu": 1, "Sigmoid": 1}
    assert [o.name for o in new.graph.output] == ["y", "z"]
    relu = next(n for n in new.graph.node if n.op_type == "Relu")
    assert list(relu.output) == ["y"]


def test_identity_of_graph_input_to_output_is_kept():
    m = model("g (float[2, 5, 8] x) => (float[2, 5, 8] y) { y = Identity (x) }")
    rep = check_unchanged("cleanup", m, [X])
    assert "no producer to rename" in skip_reasons(rep)


def test_training_dropout_and_read_mask_are_kept():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 8] y, bool[2, 5, 8] mask) {
            r = Constant <value = float {0.0}> ()
            t = Constant <value = bool {1}> ()
            a = Dropout (x, r, t)
            y, mask = Dropout (a)
        }
        """
    )
    rep = check_unchanged("cleanup", m, [X])
    assert rep["matches"] == 0


def test_random_ops_are_not_folded():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 8] y) {
            n = RandomNormal <shape = [2, 5, 8], seed = 1.0> ()
            y = Add (x, n)
        }
        """
    )
    check_unchanged("cleanup", m, [X])


def test_large_generators_are_not_folded():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 8] y) {
            s = Constant <value = int64[2] {512, 512}> ()
            big = ConstantOfShape <value = float[1] {0.5}> (s)
            r = ReduceMean <keepdims = 0> (big)
            y = Add (x, r)
        }
        """
    )
    new, rep = apply("cleanup", m, [X])
    assert "ConstantOfShape" in op_counts(new)


def test_identity_reshape_pair_is_removed():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 8] y) {
            h = Relu (x)
            a = Reshape (h, s1)
            b = Reshape (a, s2)
            y = Sigmoid (b)
        }
        """,
        {"s1": np.array([-1, 8]), "s2": np.array([2, 5, 8])},
    )
    new, _ = check_applied("cleanup", m, [X], n_applied=2)
    assert "Reshape" not in op_counts(new)


def test_reshape_pair_to_another_shape_is_kept():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[5, 2, 8] y) {
            a = Reshape (x, s1)
            y = Reshape (a, s2)
        }
        """,
        {"s1": np.array([-1, 8]), "s2": np.array([5, 2, 8])},
    )
    check_unchanged("cleanup", m, [X])


def test_if_with_constant_condition_is_flattened():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 8] y) {
            c = Constant <value = bool {1}> ()
            y = If (c) <
                then_branch = t () => (float[2, 5, 8] a) { a = Relu (x) },
                else_branch = e () => (float[2, 5, 8] b) { b = Sigmoid (x) }
            >
        }
        """
    )
    new, _ = check_applied("cleanup", m, [X])
    assert op_counts(new) == {"Relu": 1}


def test_graph_with_nothing_to_clean_is_byte_identical():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 4] y) {
            h = MatMul (x, w)
            y = Relu (h)
        }
        """,
        {"w": rand(8, 4)},
    )
    rep = check_unchanged("cleanup", m, [X])
    assert rep["status"] == "no_match"


def _split_of_concat(sizes: tuple[int, int]):
    """y, z = Split(Concat(a[..., :3], b), sizes): the Concat's parts are 3 and 8 wide."""
    return model(
        f"""
        g (float[2, 5, 8] x) => (float[2, 5, {sizes[0]}] y, float[2, 5, {sizes[1]}] z) {{
            a = Relu (x)
            b = Sigmoid (x)
            s = Constant <value = int64[2] {{3, 5}}> ()
            pa, pb = Split <axis = 2> (a, s)
            c = Concat <axis = -1> (pa, b)
            sz = Constant <value = int64[2] {{{sizes[0]}, {sizes[1]}}}> ()
            q, r = Split <axis = -1> (c, sz)
            y = Neg (q)
            z = Tanh (r)
        }}
        """
    )


def test_split_of_a_concat_at_its_seams_reads_the_parts():
    new, _ = check_applied("cleanup", _split_of_concat((3, 8)), [X], n_applied=2)
    assert "Concat" not in op_counts(new)
    assert op_counts(new)["Split"] == 1  # the one making a's first part


def test_split_of_a_concat_elsewhere_is_kept():
    rep = check_unchanged("cleanup", _split_of_concat((4, 7)), [X])
    assert rep["matches"] == 0


def test_split_of_a_concat_writing_a_graph_output_is_kept():
    m = model(
        """
        g (float[2, 5, 8] x) => (float[2, 5, 8] q, float[2, 5, 8] r) {
            a = Relu (x)
            b = Sigmoid (x)
            c = Concat <axis = 2> (a, b)
            q, r = Split <axis = 2, num_outputs = 2> (c)
        }
        """
    )
    rep = check_unchanged("cleanup", m, [X])
    assert "is a graph output" in skip_reasons(rep)


def _split_of_split(outer_axis: int = -1, also_read: bool = False):
    """p, q = Split(relu(x), [3, 5]); q1, q2 = Split(q, [2, 3]) (or along `outer_axis`)."""
    extra, u = ("u = Neg (q)", "2, 5, 5") if also_read else ("u = Neg (p)", "2, 5, 3")
    shape1, shape2 = ("2, 5, 2", "2, 5, 3") if outer_axis in (-1, 2) else ("2, 2, 5", "2, 3, 5")
    return model(
        f"""
        g (float[2, 5, 8] x)
          => (float[2, 5, 3] y, float[{shape1}] z, float[{shape2}] w, float[{u}] u) {{
            a = Relu (x)
            s = Constant <value = int64[2] {{3, 5}}> ()
            p, q = Split <axis = 2> (a, s)
            t = Constant <value = int64[2] {{2, 3}}> ()
            q1, q2 = Split <axis = {outer_axis}> (q, t)
            y = Neg (p)
            z = Tanh (q1)
            w = Sigmoid (q2)
            {extra}
        }}
        """
    )


def test_split_of_a_split_is_one_split_at_all_the_seams():
    new, _ = check_applied("cleanup", _split_of_split(), [X], n_applied=1)
    assert op_counts(new)["Split"] == 1
    split = next(n for n in new.graph.node if n.op_type == "Split")
    sizes = next(i for i in new.graph.initializer if i.name == split.input[1])
    assert np.frombuffer(sizes.raw_data, np.int64).tolist() == [3, 2, 3]


def test_split_of_a_split_along_another_axis_or_of_a_shared_part_is_kept():
    for m in (_split_of_split(outer_axis=1), _split_of_split(also_read=True)):
        assert op_counts(apply("cleanup", m, [X])[0])["Split"] == 2
