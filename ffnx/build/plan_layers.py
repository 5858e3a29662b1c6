"""Which layers a TensorRT plan holds, the ffnx plugin layers above all (`ffnx inspect DIR`).

Sources, most faithful first:
1. `IEngineInspector` JSON (`ProfilingVerbosity.DETAILED`, which `ffnx build` sets): the
   engine's own layers after fusion. It needs the plan deserialized, and deserializing needs
   a CUDA device: TensorRT-RTX 1.7 on a CPU-only machine fails in `deserialize_cuda_engine`
   (`cudaError 35: CUDA driver version is insufficient`), so this works only on a GPU.
2. Without one: the plugin layers of the network `ffnx build` handed to the builder (the
   parsed `INetworkDefinition`; TensorRT never fuses a plugin layer into another layer), which
   the build records in the manifest (`tensorrt.plugin_layers`), each checked here against the
   plan bytes: the plan must hold the layer's name and its plugin's creator name. A recorded
   layer missing from the plan is reported as missing, never assumed.
"""

from __future__ import annotations

import json
from pathlib import Path

PLUGIN_TYPES = ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")


def network_plugin_layers(trt, network, model) -> list[dict]:
    """Plugin layers of a parsed network: name, plugin op (the ONNX node the parser named the
    layer after) and layer type."""
    ops = {n.name: n.op_type for n in model.graph.node}
    out = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = getattr(layer.type, "name", str(layer.type))
        if kind in PLUGIN_TYPES:
            out.append({"name": layer.name, "op": ops.get(layer.name, "?"), "layer_type": kind})
    return out


def inspector_layers(trt, plan: bytes) -> tuple[list[dict] | None, str]:
    """(layers, "") from IEngineInspector JSON, or (None, why) when the plan cannot be
    deserialized here."""
    from ffnx.build.parser_check import capture_logger

    logger = capture_logger(trt, "ERROR")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        why = logger.errors[0] if logger.errors else "deserialize_cuda_engine returned None"
        return None, f"{trt.__name__} {trt.__version__} cannot deserialize the plan here: {why}"
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = []
    for entry in info.get("Layers", []):
        if isinstance(entry, str):  # LAYER_NAMES_ONLY plans list bare names
            entry = {"Name": entry}
        text = json.dumps(entry)
        layers.append(
            {
                "name": entry.get("Name", "?"),
                "layer_type": entry.get("LayerType", "?"),
                "plugin": "Plugin" in str(entry.get("LayerType", "")) or "Ffnx" in text,
            }
        )
    return layers, ""


def describe_plan(directory: str | Path, manifest: dict) -> dict:
    """The plan's layers for `ffnx inspect`: source, plugin layers, and why a better source
    was not available."""
    d = Path(directory)
    plan = (d / "model.plan").read_bytes()
    section = manifest.get("tensorrt", {})
    out = {"plan_bytes": len(plan), "built_with": section.get("version")}
    why = _try_inspector(section, plan, out)
    if why is None:
        return out
    recorded = section.get("plugin_layers")
    if recorded is None:
        out.update(source="none", note=f"{why}; the manifest records no plugin layers "
                   "(built before ffnx recorded them: rebuild with `ffnx build`)")  # fmt: skip
        return out
    layers = [{**r, "in_plan": r["name"].encode() in plan and r["op"].encode() in plan}
              for r in recorded]  # fmt: skip
    out.update(source="build network, checked against the plan bytes", note=why,
               plugin_layers=layers, layers=section.get("network_layers"))  # fmt: skip
    return out


def _try_inspector(section: dict, plan: bytes, out: dict) -> str | None:
    """Fill `out` from the engine inspector; None on success, else why not."""
    from ffnx.build.flavour import import_tensorrt
    from ffnx.errors import FfnxError
    from ffnx.plugins.trt_build import load_plugin_library

    try:
        trt = import_tensorrt(section.get("flavour") or "auto")
        if section.get("plugin_library"):
            load_plugin_library(trt, section["plugin_library"])
    except FfnxError as e:
        return f"engine inspector unavailable: {e}"
    layers, why = inspector_layers(trt, plan)
    if layers is None:
        return why
    out.update(source="IEngineInspector (JSON)", layers=len(layers),
               plugin_layers=[x for x in layers if x["plugin"]])  # fmt: skip
    return None
