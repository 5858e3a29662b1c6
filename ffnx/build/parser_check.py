"""The graph check of `ffnx export --target trt`: TensorRT's own ONNX parser where one imports.

`check_trt_file(path, flavour)` parses the TensorRT graph (optional plugin inputs filled as
`ffnx build` fills them) with the real `OnnxParser` of `--trt auto|enterprise|rtx`, the ffnx
plugin library loaded when the graph has ffnx nodes. A parse error is one line naming the node
(`ParseError`). Where no TensorRT imports, or the graph needs the plugins and no usable plugin
library is found, the check falls back to `trt_graph_check.check_graph` (the parser's
supported-op list) and says why in the returned record (`checker`, `fallback`).

`parse_network(trt, network, logger, path)` is the one parse call (also used by build_engine):
it turns the parser's errors into one line, `node 'NAME' (OP): description`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

import ffnx.build.flavour as flavour_mod
from ffnx.build.trt_graph_check import check_graph, has_ffnx_nodes, materialize_optional_inputs
from ffnx.errors import BackendError
from ffnx.graph.model_io import save_model

LIST_CHECKER = "supported-op list (ffnx/build/data/trt_supported_ops.txt)"


class ParseError(BackendError):
    """TensorRT's ONNX parser rejected the graph (the message names the node)."""


def capture_logger(trt, level: str = "WARNING"):
    """A TensorRT logger that keeps messages at `level` and above instead of printing them."""
    keep = int(getattr(trt.ILogger.Severity, level))

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg).strip())
            elif int(severity) <= keep:
                self.warnings.append(str(msg).strip())

    return Logger()


def builder_name(trt) -> str:
    rtx = flavour_mod.flavour_of(trt) == "rtx"
    return f"TensorRT{'-RTX' if rtx else ''} {trt.__version__}"


def parse_network(trt, network, logger, path: Path, hint: str = "") -> None:
    """Parse `path` into `network`; ParseError (one line, the failing nodes named) if refused."""
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(path)):
        return
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        name = e.node_name() if hasattr(e, "node_name") else f"#{e.node()}"
        op = e.node_operator() if hasattr(e, "node_operator") else ""
        where = f"node {name!r} ({op})" if e.node() >= 0 else "graph"
        errors.append(f"{where}: {' '.join(e.desc().split())}")
    if not errors:
        errors = logger.errors[-2:] or ["no error was reported"]
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    raise ParseError(
        f"{path.name}: {builder_name(trt)}'s ONNX parser rejects {'; '.join(errors[:3])}{more}"
        + (f"; {hint}" if hint else "")
    )


def _list_check(path: Path, model: onnx.ModelProto, filled: int, why: str) -> dict:
    problems = check_graph(model)
    if problems:
        raise ParseError(
            f"{path.name} is not buildable by TensorRT: {'; '.join(problems[:3])}"
            + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        )
    return {"checker": LIST_CHECKER, "fallback": why, **_counts(path, model, filled)}


def _counts(path: Path, model: onnx.ModelProto, filled: int) -> dict:
    return {
        "checked": path.name,
        "ffnx_nodes": sum(n.domain == "ffnx" for n in model.graph.node),
        "optional_inputs_filled": filled,
    }


def check_trt_file(
    path: str | Path, flavour: str = "auto", plugin_library: str | Path | None = None
) -> dict:
    """Check the TensorRT graph at `path` (see the module doc); the record for the manifest."""
    from ffnx.plugins.trt_build import load_plugin_library

    path = Path(path)
    model = onnx.load(str(path))
    filled = materialize_optional_inputs(model)
    try:
        trt = flavour_mod.import_tensorrt(flavour)
    except BackendError as e:
        return _list_check(path, model, filled, f"no TensorRT parser: {e}")
    needs_plugins = has_ffnx_nodes(model)
    if needs_plugins:
        try:
            load_plugin_library(trt, plugin_library)
        except BackendError as e:
            return _list_check(path, model, filled, f"ffnx plugin library unusable: {e}")
    logger = capture_logger(trt)
    network = trt.Builder(logger).create_network(0)
    with tempfile.TemporaryDirectory(prefix="ffnx-trt-check-") as work:
        staged = Path(work) / path.name
        save_model(model, staged)
        parse_network(trt, network, logger, staged)
    return {
        "checker": f"{builder_name(trt)} ONNX parser",
        "flavour": flavour_mod.flavour_of(trt),
        **_counts(path, model, filled),
        "network_layers": network.num_layers,
        "parser_warnings": sorted(set(logger.warnings)),
    }
