"""Lowering choices as structured model metadata: one `metadata_props` key of the ModelProto,
KEY = "ffnx.lowerings", whose value is a JSON list with one entry per lowered layer:

    [{"pass": "lower_moe", "layer": "moe0", "choice": "sorted", "why": "measured: ..."}, ...]

Lowerings rewrite onnx-graphsurgeon graphs, which carry no model metadata, so a choice is
first kept with the graph (`record`, the one writer) and written into the exported model by
`finish(new, src, graph)`: `src`'s metadata_props (every key) plus the graph's records, a newer
record replacing an older one of the same (pass, layer). `read` is the one reader (`ffnx
inspect`, `ffnx.lowering.lowering_report`).
"""

from __future__ import annotations

import json

import onnx
import onnx_graphsurgeon as gs

KEY = "ffnx.lowerings"
_ATTR = "_ffnx_lowerings"  # the records kept on a gs.Graph until it is exported


def record(graph: gs.Graph, pass_name: str, layer: str, choice: str, why: str) -> None:
    """Keep the lowering chosen for `layer` with `graph` (written into the model by `finish`)."""
    entry = {"pass": pass_name, "layer": layer, "choice": choice, "why": why}
    graph.__dict__.setdefault(_ATTR, []).append(entry)


def read(model: onnx.ModelProto) -> list[dict]:
    """The lowering records of `model` (empty when it has none)."""
    for p in model.metadata_props:
        if p.key == KEY:
            return json.loads(p.value)
    return []


def finish(new: onnx.ModelProto, src: onnx.ModelProto | None, graph: gs.Graph) -> onnx.ModelProto:
    """`new` (exported from `graph`, which was imported from `src`) with `src`'s metadata_props
    and the lowering records of `graph` merged into KEY; returns `new`."""
    props = {p.key: p.value for p in (src.metadata_props if src is not None else [])}
    props.update({p.key: p.value for p in new.metadata_props})
    entries = json.loads(props.get(KEY, "[]"))
    for e in graph.__dict__.get(_ATTR, []):
        entries = [o for o in entries if (o["pass"], o["layer"]) != (e["pass"], e["layer"])]
        entries.append(e)
    if entries:
        props[KEY] = json.dumps(entries)
    del new.metadata_props[:]
    for k, v in props.items():
        new.metadata_props.add(key=k, value=v)
    return new
