"""`export_artifact`: spec -> verified artifact directory (export, verify, optimize, manifest).

Everything is built in a staging directory; the artifact appears (or replaces the old one, with
--force) only when every step succeeded, and `manifest.json` is its last file.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

import ffnx
from ffnx import artifact
from ffnx.errors import ExportError, VerificationError
from ffnx.export.capture import captured
from ffnx.export.inputs import (
    example_dims,
    inputs_for,
    int_range,
    other_dims,
    to_numpy,
    torch_outputs,
)
from ffnx.export.torch_export import DEFAULT_OPSET, export_onnx
from ffnx.graph import verify
from ffnx.graph.model_io import save_model
from ffnx.graph.ort import ort_session, run_session
from ffnx.models.spec import ModelSpec
from ffnx.runtime.backends.base import TensorInfo

Step = Callable[[str], None]


def tool_versions() -> dict[str, str]:
    out = {"ffnx": ffnx.__version__, "python": platform.python_version()}
    for dist in (
        "torch",
        "onnx",
        "onnxscript",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnx-graphsurgeon",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def io_infos(spec: ModelSpec, model: onnx.ModelProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """Inputs with the spec's dim labels; outputs with the graph's (symbolic) dims."""
    ins = []
    for name, t in spec.inputs.items():
        axes = {int(a): lbl for a, lbl in spec.dynamic.get(name, {}).items()}
        shape = tuple(axes.get(i, int(d)) for i, d in enumerate(t.shape))
        ins.append(TensorInfo(name, _dtype_name(t), shape))
    outs = []
    for o in model.graph.output:
        tt = o.type.tensor_type
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
        )
        outs.append(TensorInfo(o.name, dt, shape))
    return ins, outs


def verify_export(
    spec: ModelSpec, onnx_path: Path, tol: verify.Tolerance, output_names: list[str]
) -> list[dict]:
    """Run torch and ORT at the example shape and at a second shape; raise above tolerance.

    ffnx op nodes (MoE, sparse FFN) are checked through their ONNX decomposition."""
    from ffnx.lowering import runnable

    sess = ort_session(runnable(onnx.load(str(onnx_path))), prepack=False)
    shapes = [example_dims(spec)]
    if spec.dynamic:
        shapes.append(other_dims(spec))
    results = []
    for i, dims in enumerate(shapes):
        feeds = spec.inputs if i == 0 else inputs_for(spec, dims, seed=1)
        ref = torch_outputs(spec.module, feeds, output_names)
        got = run_session(sess, to_numpy(feeds))
        report = verify.compare_outputs(ref, got, tol, what=f"{spec.name} at {dims}")
        results.append({"dims": dims, "outputs": report})
        bad = verify.failures(report)
        if bad:
            raise VerificationError(
                f"ONNX output of {spec.name!r} differs from torch at {dims} "
                f"(max_abs > {tol.atol} + {tol.rtol}*max|ref| or cosine < {tol.min_cosine}): "
                f"{'; '.join(bad)}"
            )
    return results


def base_manifest(spec: ModelSpec, model: onnx.ModelProto, opset: int, source: str) -> dict:
    ins, outs = io_infos(spec, model)
    ex = example_dims(spec)
    return {
        "ffnx_version": ffnx.__version__,
        "model": {
            "name": spec.name,
            "source": source,
            "variant": spec.variant,
            "params": spec.params,
            "description": spec.description,
        },
        "inputs": [i.to_json() for i in ins],
        "outputs": [o.to_json() for o in outs],
        "dynamic": {k: {str(a): lbl for a, lbl in v.items()} for k, v in spec.dynamic.items()},
        "dims": {
            lbl: {"example": n, "min": 1, "max": spec.max_dims.get(lbl)} for lbl, n in ex.items()
        },
        "input_ranges": {
            n: list(int_range(t)) for n, t in spec.inputs.items() if not t.dtype.is_floating_point
        },
        "export": {"exporter": "torch.onnx.export(dynamo=True)", "opset": opset},
        "passes": [],
        "plugins": [],
        "versions": tool_versions(),
    }


def sample_feeds(spec: ModelSpec) -> list[dict[str, np.ndarray]]:
    """Inputs graph passes verify on: the example shape and, when dynamic, a second one; a
    KV-cache decoder adds a left-padded prefill (`padded_prefill`: query positions padded)."""
    feeds = [to_numpy(spec.inputs)]
    if spec.dynamic:
        feeds.append(to_numpy(inputs_for(spec, other_dims(spec), seed=2)))
    if getattr(spec, "padded_prefill", None) is not None:
        feeds.append(to_numpy(spec.padded_prefill()))
    return feeds


def larger_feeds(spec: ModelSpec) -> list[dict[str, np.ndarray]] | None:
    """One larger shape set for the speed guard: every dynamic dim x4 (within its range)."""
    dims = {
        lbl: min(4 * n, spec.max_dims.get(lbl) or 4 * n) for lbl, n in example_dims(spec).items()
    }
    if not dims or dims == example_dims(spec):
        return None
    return [to_numpy(inputs_for(spec, dims, seed=3))]


def decoder_timing_sets(spec: ModelSpec) -> list | None:
    """A KV-cache decoder's speed-guard shape sets (decode steps), None for other models."""
    from ffnx.passes import speed_guard

    if "decoder" not in (getattr(spec, "manifest_extra", None) or {}):
        return None
    make = lambda dims: [to_numpy(inputs_for(spec, dims, seed=3))]  # noqa: E731
    return speed_guard.decode_step_sets(make, spec.max_dims.get("total"))


def export_artifact(
    spec: ModelSpec,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    tol: verify.Tolerance = verify.Tolerance(),
    force: bool = False,
    optimize: bool = True,
    passes: list[str] | None = None,
    skip: list[str] = (),
    target: str = "ort",
    source: str = "",
    size: str = "",
    step: Step = lambda s: None,
    guard: bool = True,
    threads: int | None = None,
    trt: str = "auto",
    keep_module: bool = True,
) -> dict:
    """Export, verify at two shapes, optimize, write the manifest; return the manifest.

    keep_module=False: the torch module's weights are released once verified (moved to the
    meta device), before the graph passes hold the model: the CLI's export of a large model.

    guard: the default passes for ONNX Runtime go through `ffnx.passes.speed_guard` (passes
    whose removal times faster at `threads` are dropped; manifest["speed_guard"] says which).
    threads: the ORT intra-op threads every measured choice times at (the guard, the MoE
    lowering, the attention form); default ORT's."""
    with artifact.staged_dir(out, force) as stage:
        step("exporting with torch.onnx (dynamo)")
        onnx_path = stage / artifact.MODEL
        with captured(spec.module, target) as plugins:
            export_onnx(spec, onnx_path, opset)
            model = onnx.load(str(onnx_path), load_external_data=False)
            manifest = base_manifest(spec, model, opset, source or spec.name)
            manifest["model"]["size"] = size
            manifest.update(getattr(spec, "manifest_extra", {}))  # e.g. the KV-cache decoder
        for fname, src in getattr(spec, "extra_files", {}).items():  # e.g. tokenizer.json
            artifact.write_bytes_atomic(stage / fname, Path(src).read_bytes())
        # Verified against the original modules, not their captured (ffnx-op) twins.
        output_names = [o["name"] for o in manifest["outputs"]]
        step("verifying ONNX Runtime against torch at two shapes")
        checks = verify_export(spec, onnx_path, tol, output_names)
        manifest["plugins"] = sorted(plugins)
        manifest["export"]["verification"] = checks
        manifest["export"]["tolerance"] = {"atol": tol.atol, "rtol": tol.rtol}
        manifest["export"]["max_abs_error"] = verify.worst([c["outputs"] for c in checks])[
            "max_abs"
        ]
        if not keep_module:
            spec.module.to("meta")
        made_from: dict[str, list[str]] = {}
        if optimize:
            from ffnx.passes import speed_guard
            from ffnx.passes.optimize import manifest_options, optimize_file

            def run_passes(dst: str, tgt: str) -> list[dict]:
                step(f"running graph passes ({tgt})")
                kw = dict(
                    passes=passes,
                    skip=skip,
                    target=tgt,
                    tol=tol,
                    step=step,
                    options={**({"threads": threads} if threads else {}),  # choices' timing
                             **manifest_options(getattr(spec, "manifest_extra", None) or {})},
                )  # fmt: skip
                if tgt == "ort" and guard and not passes and speed_guard.enabled():
                    new, reports, manifest["speed_guard"] = speed_guard.optimize_guarded(
                        onnx_path, sample_feeds(spec), larger_feeds(spec),
                        threads=threads, timing_sets=decoder_timing_sets(spec), **kw,
                    )  # fmt: skip
                    save_model(new, stage / dst)
                    return reports
                return optimize_file(onnx_path, stage / dst, sample_feeds(spec), **kw)

            # --target trt: model.trt.onnx for TensorRT (ffnx ops kept for the plugins) and
            # model.opt.onnx lowered for ONNX Runtime beside it, so the artifact runs on both.
            if target == "trt":
                manifest["passes_trt"] = run_passes(artifact.MODEL_TRT, "trt")
                made_from[artifact.MODEL_TRT] = [artifact.MODEL]
            manifest["passes"] = run_passes(artifact.MODEL_OPT, "ort")
            made_from[artifact.MODEL_OPT] = [artifact.MODEL]
        if target == "trt":
            step("checking the graph against TensorRT's ONNX parser")
            manifest["tensorrt_graph_check"] = check_trt_graph(stage, manifest, trt)
        artifact.write_manifest(stage, manifest, made_from)
    return artifact.read_manifest(out)


def check_trt_graph(directory: Path, manifest: dict, trt: str = "auto") -> dict:
    """Fail the export when TensorRT's ONNX parser (`--trt` flavour; else the supported-op
    list) rejects the graph (see ffnx.build.parser_check)."""
    from ffnx.build.parser_check import ParseError, check_trt_file

    files = {"files": {p.name: "" for p in directory.iterdir()}}
    try:
        return check_trt_file(artifact.model_path(directory, files, target="trt"), trt)
    except ParseError as e:
        raise ExportError(str(e)) from e
