"""Lowering records as metadata_props: one writer (record + finish), one reader (read)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.graph import lowering_meta


def _model() -> onnx.ModelProto:
    x = gs.Variable("x", np.float32, (2, 4))
    y = gs.Variable("y", np.float32, (2, 4))
    return gs.export_onnx(gs.Graph([gs.Node("Relu", "relu", inputs=[x], outputs=[y])], [x], [y]))


def test_records_written_once_per_layer_and_other_keys_kept():
    src = _model()
    src.metadata_props.add(key="author", value="me")
    assert lowering_meta.read(src) == []
    g = gs.import_onnx(src)
    lowering_meta.record(g, "lower_moe", "moe0", "dense", "forced")
    lowering_meta.record(g, "lower_moe", "moe1", "sorted", "rule")
    first = lowering_meta.finish(gs.export_onnx(g), src, g)
    assert [(e["layer"], e["choice"]) for e in lowering_meta.read(first)] == [
        ("moe0", "dense"),
        ("moe1", "sorted"),
    ]
    g2 = gs.import_onnx(first)  # a later pass re-lowers moe0: the newer record replaces it
    lowering_meta.record(g2, "lower_moe", "moe0", "gather", "measured: gather 3 us")
    second = lowering_meta.finish(gs.export_onnx(g2), first, g2)
    assert [(e["layer"], e["choice"]) for e in lowering_meta.read(second)] == [
        ("moe1", "sorted"),
        ("moe0", "gather"),
    ]
    props = {p.key: p.value for p in second.metadata_props}
    assert props["author"] == "me" and set(props) == {"author", lowering_meta.KEY}
    assert json.loads(props[lowering_meta.KEY])[1]["why"] == "measured: gather 3 us"
    onnx.checker.check_model(second)


def test_a_graph_without_records_adds_no_key():
    src = _model()
    g = gs.import_onnx(src)
    out = lowering_meta.finish(gs.export_onnx(g), src, g)
    assert list(out.metadata_props) == [] and lowering_meta.read(out) == []
