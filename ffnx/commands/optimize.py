"""`ffnx optimize`: run graph passes on an artifact or any ONNX file."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ffnx.commands import ui
from ffnx.commands.options import csv_list, dims_option
from ffnx.errors import PassError


def _calib(path: str | None, model, manifest: dict, dims: dict) -> list[dict[str, np.ndarray]]:
    """Calibration/verification feeds: --calib npz (arrays by input name, or name_0, name_1 …
    for several samples), else random inputs within the declared dims (with a warning)."""
    if path:
        try:
            data = dict(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise PassError(f"cannot read --calib {path}: {e}") from e
        names = [i.name for i in model.graph.input]
        if all(n in data for n in names):
            return [{n: data[n] for n in names}]
        samples = []
        for k in range(len(data)):
            s = {n: data.get(f"{n}_{k}") for n in names}
            if any(v is None for v in s.values()):
                break
            samples.append(s)
        if not samples:
            raise PassError(f"--calib {path} has arrays {sorted(data)}; expected {names}")
        return samples
    from ffnx.runtime.backends.base import TensorInfo
    from ffnx.runtime.engine import random_inputs

    ui.err.print("[yellow]no --calib given: verifying on random inputs within the declared dims[/]")
    infos = [TensorInfo.from_json(i) for i in manifest.get("inputs", [])] or _infos(model)
    return [random_inputs(infos, manifest, dims, seed=s) for s in (0, 1)]


def _infos(model):
    import onnx

    from ffnx.runtime.backends.base import TensorInfo

    out = []
    for v in model.graph.input:
        tt = v.type.tensor_type
        out.append(
            TensorInfo(
                v.name,
                onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name,
                tuple(d.dim_param or d.dim_value for d in tt.shape.dim),
            )
        )
    return out


def _print_passes(reports: list[dict]) -> None:
    rows = []
    for r in reports:
        b, a = r["before"], r.get("after", r["before"])
        err = r.get("error", {}).get("max_abs")
        rows.append(
            [
                r["name"],
                r["status"],
                r["matches"],
                r["applied"],
                f"{b['nodes']}→{a['nodes']}",
                f"{b['params']:,}→{a['params']:,}",
                f"{ui.fmt(b['flops'])}→{ui.fmt(a['flops'])}",
                err,
                r.get("reason", ""),
            ]
        )
    ui.out.print(
        ui.table(
            "graph passes",
            [
                "pass",
                "status",
                "matches",
                "applied",
                "nodes",
                "params",
                "FLOPs",
                "max abs err",
                "reason",
            ],
            rows,
        )
    )


def _explain(reports: list[dict]) -> None:
    for r in reports:
        for s in r.get("skipped", []):
            ui.out.print(f"{r['name']}: skipped {s['site']}: {s['reason']}")
        for k, v in r.get("notes", {}).items():
            ui.out.print(f"{r['name']}: {k}: {v}")


@click.command("optimize", context_settings={"max_content_width": 100})
@click.argument("src", type=click.Path(exists=True), required=False)
@click.option("-o", "--out", type=click.Path(dir_okay=False), help="Output .onnx (file input).")
@click.option("--passes", callback=csv_list, help="Run only these passes, in registry order.")
@click.option("--skip", callback=csv_list, help="Skip these passes.")
@click.option("--list-passes", is_flag=True, help="Print the registered passes and exit.")
@click.option(
    "--calib",
    type=click.Path(exists=True, dir_okay=False),
    help="Sample inputs (.npz) for verification and calibration.",
)
@click.option("--max-error", type=float, help="Limit for approximate passes (max abs error).")
@click.option(
    "--dims", callback=dims_option, default=None, help="Dynamic dim sizes for random inputs."
)
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option(
    "--quantize-experts",
    type=click.Choice(["int4", "int8"]),
    default=None,
    help="Weight-only low-bit MoE experts (accuracy reported).",
)
@click.option("--explain", is_flag=True, help="Say why each candidate was skipped.")
def optimize_cmd(
    src, out, passes, skip, list_passes, calib, max_error, dims, target, quantize_experts, explain
) -> None:
    """Rewrite an ONNX graph with ffnx's passes, each verified against the graph before it.

    SRC is an artifact directory (model.onnx -> model.opt.onnx, manifest updated) or an .onnx
    file (-o required).

    \b
    Example:
      ffnx optimize artifacts/vit-repa
      ffnx optimize model.onnx -o model.opt.onnx --skip fuse_gate_up
      ffnx optimize artifacts/gpt-mlp --passes ffn_fusion --calib calib.npz --max-error 1e-2
      ffnx optimize --list-passes
    """
    from ffnx.export.passes import registry

    if list_passes:
        rows = [
            [p.name, "exact" if p.exact else "approximate", "yes" if p.default else "no", p.summary]
            for p in registry()
        ]
        ui.out.print(ui.table("passes (registry order)", ["pass", "kind", "default", "what"], rows))
        return
    if not src:
        raise click.UsageError("SRC is required (or --list-passes)")
    from ffnx import artifact
    from ffnx.commands.inspect import load_onnx
    from ffnx.export.optimize import optimize_model

    p = Path(src)
    manifest = artifact.read_manifest(p) if p.is_dir() else {}
    model = load_onnx(p / artifact.MODEL if p.is_dir() else p)
    if not p.is_dir() and not out:
        raise click.UsageError("-o/--out is required when SRC is an .onnx file")
    feeds = _calib(calib, model, manifest, dims)
    opts = {"quantize_experts": quantize_experts} if quantize_experts else {}
    with ui.steps("optimizing") as step:
        new, reports = optimize_model(
            model,
            feeds,
            passes=passes,
            skip=skip or [],
            target=target,
            max_error=max_error,
            step=step,
            options=opts,
        )
    _print_passes(reports)
    if explain:
        _explain(reports)
    if p.is_dir():
        artifact.write_bytes_atomic(p / artifact.MODEL_OPT, new.SerializeToString())
        manifest["passes"] = reports
        artifact.write_manifest(p, manifest)
        ui.err.print(f"updated {p / artifact.MODEL_OPT} and the manifest")
    else:
        artifact.write_bytes_atomic(out, new.SerializeToString())
        ui.err.print(f"wrote {out}")


COMMANDS = [optimize_cmd]
