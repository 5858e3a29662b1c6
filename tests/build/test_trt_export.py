"""`ffnx export --target trt --trt auto|enterprise|rtx`: the real TensorRT-RTX ONNX parser (with
the ffnx plugin library) is the graph check; the supported-op list is the fallback."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from ffnx.build import parser_check
from ffnx.build.parser_check import ParseError, check_trt_file
from ffnx.cli import main


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_export_trt_option_is_shared_with_build():
    for cmd in ("export", "build"):
        res = _run(cmd, "--help")
        assert "--trt [auto|enterprise|rtx]" in res.output, res.output


def test_export_trt_without_target_trt_is_a_usage_error(tmp_path):
    res = _run("export", "gpt-swiglu", "--out", str(tmp_path / "a"), "--trt", "rtx")
    assert res.exit_code == 2 and "--trt applies only with --target trt" in res.output
    assert not (tmp_path / "a").exists()


def test_export_moe_checked_by_the_real_rtx_parser(tmp_path, rtx, plugin_lib, monkeypatch):
    monkeypatch.setenv("FFNX_PLUGIN_LIBRARY", str(plugin_lib))
    out = tmp_path / "moe"
    res = _run("export", "gpt-moe", "--out", str(out), "--target", "trt", "--trt", "rtx",
               "--no-build")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"TensorRT graph check: TensorRT-RTX {rtx.__version__} ONNX parser" in res.output
    check = json.loads((out / "manifest.json").read_text())["tensorrt_graph_check"]
    assert check["checker"] == f"TensorRT-RTX {rtx.__version__} ONNX parser", check
    assert check["flavour"] == "rtx" and check["ffnx_nodes"] == 2
    assert check["network_layers"] > 0


def test_without_plugin_library_the_op_list_is_the_fallback(tmp_path, rtx, monkeypatch):
    from tests.build.test_trt_rtx import export_trt

    art = export_trt("gpt-moe", tmp_path / "moe")
    monkeypatch.setenv("FFNX_PLUGIN_LIBRARY", str(tmp_path / "absent.so"))
    check = check_trt_file(art / "model.trt.onnx", "rtx")
    assert check["checker"] == parser_check.LIST_CHECKER
    assert "plugin library unusable" in check["fallback"] and "absent.so" in check["fallback"]


def test_without_tensorrt_the_op_list_is_the_fallback(tmp_path, monkeypatch):
    from ffnx.errors import BackendError

    def absent(flavour):
        raise BackendError("building engines needs TensorRT-RTX; none imports here")

    monkeypatch.setattr(parser_check.flavour_mod, "import_tensorrt", absent)
    path = _graph(tmp_path, "Relu")
    check = check_trt_file(path, "rtx")
    assert check["checker"] == parser_check.LIST_CHECKER
    assert "no TensorRT parser" in check["fallback"]
    with pytest.raises(ParseError, match="NoSuchOp is not supported"):
        check_trt_file(_graph(tmp_path, "NoSuchOp"), "rtx")


def _graph(tmp_path, op: str) -> str:
    """x -> op -> y, plus a second node so the failing one is not the only one."""
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node(op, ["h"], ["y"], name="the_bad_node")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w],
    )  # fmt: skip
    path = tmp_path / f"{op}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


def test_real_parser_error_is_one_line_naming_the_node(tmp_path, rtx):
    assert check_trt_file(_graph(tmp_path, "Relu"), "rtx")["checker"].startswith("TensorRT-RTX")
    with pytest.raises(ParseError) as e:
        check_trt_file(_graph(tmp_path, "NoSuchOp"), "rtx")
    msg = str(e.value)
    assert "\n" not in msg and "node 'the_bad_node' (NoSuchOp)" in msg, msg
    assert f"TensorRT-RTX {rtx.__version__}'s ONNX parser rejects" in msg


def test_export_parse_error_is_an_error_line_and_writes_nothing(tmp_path, rtx, monkeypatch):
    """A graph the real parser refuses: `error:` naming the node, exit 1, no artifact."""
    from ffnx.export import pipeline

    real = pipeline.check_trt_graph

    def poisoned(directory, manifest, trt="auto"):
        path = directory / "model.trt.onnx"
        m = onnx.load(str(path))
        m.graph.node[0].op_type = "NoSuchOp"  # what an unsupported op looks like to the parser
        m.graph.node[0].name = "poisoned"
        onnx.save(m, str(path))
        return real(directory, manifest, trt)

    monkeypatch.setattr(pipeline, "check_trt_graph", poisoned)
    out = tmp_path / "sw"
    res = CliRunner().invoke(main, ["export", "gpt-swiglu", "--out", str(out), "--target", "trt",
                                    "--trt", "rtx", "--no-build"])  # fmt: skip
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "node 'poisoned' (NoSuchOp)" in lines[0], res.output
    assert not out.exists()
