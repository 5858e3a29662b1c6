"""A graph's symbolic dims renamed to the model's own labels (batch, seq, past, total).

torch.export names every dynamic dim it cannot prove equal to another one with a fresh symbol
(`s30`, `s73`, ...): a KV-cache decoder whose layers slice the mask to their own cache length
gets one "past" symbol per layer, although the decoder feeds every cache the same past length
and its manifest says so. Nothing reading the graph can then tell that the layers' shape
computations are the same (see `ffnx.passes.shared_dims`).

`label_dims` renames, in the graph's inputs, outputs and value_info, each symbol that a labelled
input axis carries to that label, also inside expressions (`s30 + s70` -> `past + seq`): the
graph's interface then states the artifact's contract, the one its manifest records. A symbol
two different labels would claim (torch proved those axes equal) keeps its name.
"""

from __future__ import annotations

import re

import onnx


def _symbols(model: onnx.ModelProto, labels: dict[str, dict[int, str]]) -> dict[str, str]:
    """torch's symbol -> label, from the labelled axes of the graph inputs."""
    claims: dict[str, set[str]] = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for axis, label in labels.get(vi.name, {}).items():
            if int(axis) < len(dims) and dims[int(axis)].dim_param:
                claims.setdefault(dims[int(axis)].dim_param, set()).add(label)
    return {sym: next(iter(ls)) for sym, ls in claims.items() if len(ls) == 1}


def label_dims(model: onnx.ModelProto, labels: dict[str, dict[int, str]]) -> int:
    """Rename in place; the number of dims whose name changed."""
    rename = {s: lbl for s, lbl in _symbols(model, labels).items() if s != lbl}
    if not rename:
        return 0
    names = sorted(rename, key=len, reverse=True)
    word = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    changed = 0
    g = model.graph
    for vi in (*g.input, *g.output, *g.value_info):
        if not vi.type.HasField("tensor_type"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                new = word.sub(lambda m: rename[m.group(0)], d.dim_param)
                changed += new != d.dim_param
                d.dim_param = new
    return changed
