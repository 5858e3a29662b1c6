"""rotary_embedding: transformers' x*cos + rotate_half(x)*sin -> com.microsoft::RotaryEmbedding.

Synthetic graphs in the form transformers exports (emb = Concat(freqs, freqs), cos/sin
Unsqueeze(1), Slice halves, Neg, Concat): the rewrite equals the graph before it for q in
[B, S, H, D] transposed and for a plain [B, H, S, D] input, per-batch and batch-1 positions;
a partial rotary's slice is rotated; cos tables whose halves differ are left byte-unchanged
with the reason."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.passes.helpers import (
    apply,
    assert_close,
    check_applied,
    check_unchanged,
    op_counts,
    run,
    skip_reasons,
)

H, D = 4, 16


def rotary_graph(transposed: bool = True, rot: int = D, halves_differ: bool = False,
                 cos_batch: str | int = "B", scaling: float | None = None):  # fmt: skip
    """y = x*cos4 + rotate_half(x)*sin4 with cos = Cos(Concat(f, f)) [* scaling], f = pos x
    inv_freq; x = Transpose(q [B,S,H,D]) (transposed) or the input x [B,H,S,D]. rot < D: the
    partial rotary of GPT-NeoX/Phi (only the first `rot` dims rotate)."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    vi = helper.make_tensor_value_info
    half = rot // 2
    inits = {
        "inv_freq": (1.0 / 10000 ** (np.arange(half) * 2 / rot)).astype(np.float32)[None, None],
        "other": np.linspace(0.1, 1.0, half, dtype=np.float32)[None, None],
        "ax1": np.array([1], np.int64),
        "ax2": np.array([2], np.int64),
        "z": np.array([0], np.int64),
        "h": np.array([half], np.int64),
        "r": np.array([rot], np.int64),
        "big": np.array([2**62], np.int64),
        "last": np.array([-1], np.int64),
        "one": np.array([1], np.int64),
        "sc": np.array(scaling or 1.0, np.float32),
    }
    x_in = vi("q", f, ["B", "S", H, D]) if transposed else vi("x", f, ["B", H, "S", D])
    inputs = [x_in, vi("pos", i64, [cos_batch, "S"])]
    nodes = [
        helper.make_node("Cast", ["pos"], ["posf"], to=f),
        helper.make_node("Unsqueeze", ["posf", "last_ax"], ["pos3"]),
        helper.make_node("Mul", ["pos3", "inv_freq"], ["freqs"]),
        helper.make_node(
            "Concat", ["freqs", "other_f" if halves_differ else "freqs"], ["emb"], axis=-1
        ),  # fmt: skip
        helper.make_node("Cos", ["emb"], ["cos0"]),
        helper.make_node("Sin", ["emb"], ["sin0"]),
    ]
    inits["last_ax"] = np.array([-1], np.int64)
    if halves_differ:
        nodes.insert(3, helper.make_node("Mul", ["pos3", "other"], ["other_f"]))
    cos, sin = "cos0", "sin0"
    if scaling is not None:
        nodes += [helper.make_node("Mul", ["cos0", "sc"], ["cos"]),
                  helper.make_node("Mul", ["sin0", "sc"], ["sin"])]  # fmt: skip
        cos, sin = "cos", "sin"
    nodes += [
        helper.make_node("Unsqueeze", [cos, "ax1"], ["cos4"]),
        helper.make_node("Unsqueeze", [sin, "ax1"], ["sin4"]),
    ]
    x = "x"
    if transposed:
        nodes.append(helper.make_node("Transpose", ["q"], ["x"], perm=[0, 2, 1, 3]))
    xr = x
    if rot < D:  # x_rot = x[..., :rot], x_pass = x[..., rot:]
        nodes += [helper.make_node("Slice", [x, "z", "r", "last", "one"], ["xr"]),
                  helper.make_node("Slice", [x, "r", "big", "last", "one"], ["xp"])]  # fmt: skip
        xr = "xr"
    nodes += [
        helper.make_node("Mul", [xr, "cos4"], ["xc"]),
        helper.make_node("Slice", [xr, "z", "h", "last", "one"], ["x1"]),
        helper.make_node("Slice", [xr, "h", "big", "last", "one"], ["x2"]),
        helper.make_node("Neg", ["x2"], ["nx2"]),
        helper.make_node("Concat", ["nx2", "x1"], ["rh"], axis=-1),
        helper.make_node("Mul", ["rh", "sin4"], ["rs"]),
        helper.make_node("Add", ["xc", "rs"], ["yr" if rot < D else "y"]),
    ]
    if rot < D:
        nodes.append(helper.make_node("Concat", ["yr", "xp"], ["y"], axis=-1))
    g = helper.make_graph(nodes, "rotary", inputs, [vi("y", f, ["B", H, "S", D])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(m)
    return onnx.shape_inference.infer_shapes(m)


def feeds(m: onnx.ModelProto, batch: int = 2, seq: int = 3, cos_batch: int | None = None):
    rng = np.random.default_rng(0)
    name = m.graph.input[0].name
    shape = (batch, seq, H, D) if name == "q" else (batch, H, seq, D)
    pos = np.stack([np.arange(5, 5 + seq) - b for b in range(cos_batch or batch)])
    return [{name: rng.standard_normal(shape).astype(np.float32), "pos": pos.astype(np.int64)}]


def test_transposed_q_becomes_one_rotary_op_and_matches():
    m = rotary_graph()
    fd = feeds(m)
    new, rep = apply("rotary_embedding", m, fd)
    assert rep["status"] == "applied", rep
    ops = op_counts(new)
    assert ops["RotaryEmbedding"] == 1 and ops["Neg"] == 0 and ops["Sin"] == 1
    assert_close(run(m, fd[0]), run(new, fd[0]))
    rot = next(n for n in new.graph.node if n.op_type == "RotaryEmbedding")
    assert rot.domain == "com.microsoft"  # reads [B, S, H*D]: no transpose before it
    assert next(n for n in new.graph.node if n.output[0] == rot.input[0]).op_type == "Reshape"


def test_plain_bhsd_input_scaled_tables_and_batch_one_positions():
    m = rotary_graph(transposed=False, scaling=0.75, cos_batch=1)
    fd = feeds(m, batch=3, seq=4, cos_batch=1)
    new, rep = apply("rotary_embedding", m, fd)
    assert rep["status"] == "applied", rep
    assert op_counts(new)["RotaryEmbedding"] == 1
    assert_close(run(m, fd[0]), run(new, fd[0]))
    one = feeds(m, batch=1, seq=1, cos_batch=1)[0]  # a decode step
    assert_close(run(m, one), run(new, one))


def test_partial_rotary_rotates_its_slice():
    """GPT-NeoX/Phi: x[..., :rot] is rotated by the same pattern, x[..., rot:] passes."""
    m = rotary_graph(rot=8)
    fd = feeds(m)
    new, rep = apply("rotary_embedding", m, fd)
    assert rep["status"] == "applied" and op_counts(new)["RotaryEmbedding"] == 1, rep
    assert_close(run(m, fd[0]), run(new, fd[0]))


def test_unmatched_rotary_is_left_unchanged_with_the_reason():
    m = rotary_graph(halves_differ=True)  # cos = Cos(Concat(f, g)): the op would read f twice
    new, rep = apply("rotary_embedding", m, feeds(m))
    assert rep["status"] == "skipped" and rep["applied"] == 0, rep
    assert "Concat of two different halves" in rep["skipped"][0]["reason"]
    assert new.SerializeToString() == m.SerializeToString()


def _exported_rotary(rotate):
    """q [B, S, H, D] -> rotate(x = q transposed to [B, H, S, D], c4, s4), with half-width
    cos/sin [B, 1, S, D/2] scaled like YaRN's attention factor, exported by ffnx's exporter
    with dynamic B and S."""
    import torch

    from tests.passes.helpers import export

    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(D // 2) * 2.0 / D))

        def forward(self, q, pos):
            freqs = pos[..., None].float() * self.inv_freq  # [B, S, D/2]
            c4, s4 = (freqs.cos() * 1.3).unsqueeze(1), (freqs.sin() * 1.3).unsqueeze(1)
            return rotate(q.transpose(1, 2), c4, s4)

    q, pos = torch.randn(2, 5, H, D), torch.arange(5).repeat(2, 1)
    dyn = {"q": {0: "B", 1: "S"}, "pos": {0: "B", 1: "S"}}
    return export(Rotary(), q, pos, dynamic=dyn, names=("q", "pos"))


def _rotary_feeds(shapes) -> list[dict]:
    rng = np.random.default_rng(3)
    return [{"q": rng.standard_normal((b, s, H, D)).astype(np.float32),
             "pos": (np.arange(s)[None] + 7 * np.arange(b)[:, None]).astype(np.int64)}
            for b, s in shapes]  # fmt: skip


def _split_rotary(second_half_ok: bool = True):
    """GPT-OSS's rotary as its modeling code writes it (chunk halves)."""
    import torch

    def rotate(x, c4, s4):
        a, b = torch.chunk(x, 2, dim=-1)
        second = b * c4 + a * s4 if second_half_ok else b * s4 + a * c4
        return torch.cat((a * c4 - b * s4, second), dim=-1)

    return _exported_rotary(rotate)


def test_gpt_oss_split_halves_rotary_becomes_one_op():
    m = _split_rotary()
    new, _ = check_applied("rotary_embedding", m, _rotary_feeds(((2, 5), (1, 9))), n_applied=1)
    ops = op_counts(new)
    assert ops["RotaryEmbedding"] == 1 and "Split" not in ops and "Sub" not in ops


ONES = [{"q": np.ones((1, 3, H, D), np.float32), "pos": np.arange(3)[None]}]


def test_gpt_oss_form_with_the_wrong_pairing_is_left_unchanged():
    rep = check_unchanged("rotary_embedding", _split_rotary(second_half_ok=False), ONES)
    assert "not b*cos + a*sin" in skip_reasons(rep)


def _pair_rotary(second_ok: bool = True):
    """DeepSeek-V2's rotary as `ffnx.export.mla_absorb` writes it in real arithmetic: pairs
    (x[2i], x[2i+1]) times c + is, stacked back interleaved."""
    import torch

    def rotate(x, c4, s4):
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        second = a * s4 + b * c4 if second_ok else a * c4 + b * s4
        return torch.stack((a * c4 - b * s4, second), dim=-1).flatten(3)

    return _exported_rotary(rotate)


def test_interleaved_pair_rotary_becomes_one_interleaved_op():
    m = _pair_rotary()
    new, _ = check_applied("rotary_embedding", m, _rotary_feeds(((2, 5), (1, 1))), n_applied=1)
    ops = op_counts(new)
    assert ops["RotaryEmbedding"] == 1 and "Gather" not in ops and "Sub" not in ops
    rot = next(n for n in new.graph.node if n.op_type == "RotaryEmbedding")
    assert {a.name: a.i for a in rot.attribute}.get("interleaved") == 1


def test_pair_rotary_with_the_wrong_pairing_is_left_unchanged():
    rep = check_unchanged("rotary_embedding", _pair_rotary(second_ok=False), ONES)
    assert "not a*sin + b*cos" in skip_reasons(rep)
