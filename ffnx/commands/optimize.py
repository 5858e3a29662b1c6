"""`ffnx optimize`: run graph passes on an artifact or any ONNX file."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ffnx.commands import ui
from ffnx.commands.options import csv_list, dims_option


def _calib(path: str | None, model, manifest: dict, dims: dict) -> list[dict[str, np.ndarray]]:
    """Calibration/verification feeds: --calib npz (arrays by input name, or name_0, name_1 …
    for several samples), else random inputs within the declared dims (with a warning)."""
    if path:
        from ffnx.commands.feeds import npz_feeds

        return npz_feeds(path, [i.name for i in model.graph.input], "--calib")
    from ffnx.commands.feeds import random_feeds

    ui.err.print("[yellow]no --calib given: verifying on random inputs within the declared dims[/]")
    return random_feeds(model, manifest, dims, samples=2)


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
@click.option(
    "--sparsity",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="sparsify_ffn: target activation sparsity (else the sparsest under --max-error).",
)
@click.option(
    "--sparse-mode",
    type=click.Choice(["threshold", "topk"]),
    default=None,
    help="sparsify_ffn: CHESS per-channel thresholds or Lazy-Neuron top-k.",
)
@click.option(
    "--sparse-lowering",
    type=click.Choice(["auto", "dense", "gather", "compress", "node"]),
    default=None,
    help="sparsify_ffn: ORT formulation (auto = fastest measured).",
)
@click.option("--explain", is_flag=True, help="Say why each candidate was skipped.")
def optimize_cmd(
    src,
    out,
    passes,
    skip,
    list_passes,
    calib,
    max_error,
    dims,
    target,
    quantize_experts,
    sparsity,
    sparse_mode,
    sparse_lowering,
    explain,
) -> None:
    """Rewrite an ONNX graph with ffnx's passes, each verified against the graph before it.

    SRC is an artifact directory (model.onnx -> model.opt.onnx, manifest updated) or an .onnx
    file (-o required).

    \b
    Example:
      ffnx optimize artifacts/vit-repa
      ffnx optimize model.onnx -o model.opt.onnx --skip fuse_gate_up
      ffnx optimize artifacts/gpt-mlp --passes ffn_fusion --calib calib.npz --max-error 1e-2
      ffnx optimize artifacts/gpt-relu --passes sparsify_ffn --sparsity 0.9 --max-error 0.05
      ffnx optimize --list-passes
    """
    from ffnx.passes import registry

    if list_passes:
        rows = [
            [
                p.name,
                "exact" if p.exact else "approximate",
                ", ".join(p.targets) if p.default else "no (--passes)",
                p.summary,
            ]
            for p in registry()
        ]
        ui.out.print(
            ui.table("passes (registry order)", ["pass", "kind", "default for", "what"], rows)
        )
        return
    if not src:
        raise click.UsageError("SRC is required (or --list-passes)")
    from ffnx import artifact
    from ffnx.commands.inspect import load_onnx
    from ffnx.passes.optimize import optimize_model

    p = Path(src)
    manifest = artifact.read_manifest(p) if p.is_dir() else {}
    # After `ffnx moefy` the current graph is model.opt.onnx (the MoEfied one): the passes start
    # from it, so the MoE layers the manifest describes are kept (model.onnx would discard them).
    keep_moefied = p.is_dir() and "moefy" in manifest
    start = (artifact.MODEL_OPT if keep_moefied else artifact.MODEL) if p.is_dir() else ""
    model = load_onnx(p / start if p.is_dir() else p)
    if not p.is_dir() and not out:
        raise click.UsageError("-o/--out is required when SRC is an .onnx file")
    feeds = _calib(calib, model, manifest, dims)
    opts = {
        k: v
        for k, v in {
            "quantize_experts": quantize_experts,
            "sparsity": sparsity,
            "sparse_mode": sparse_mode,
            "sparse_lowering": sparse_lowering,
        }.items()
        if v is not None
    }
    if p.is_dir() and (p / "calibration.npz").exists():
        opts["calibration"] = str(p / "calibration.npz")
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
        manifest["passes"] = (manifest.get("passes", []) if keep_moefied else []) + reports
        # moefied: model.opt.onnx keeps the provenance it had (model.onnx via moefy)
        made = None if keep_moefied else {artifact.MODEL_OPT: [artifact.MODEL]}
        artifact.write_manifest(p, manifest, made)
        ui.err.print(f"updated {p / artifact.MODEL_OPT} and the manifest")
    else:
        artifact.write_bytes_atomic(out, new.SerializeToString())
        ui.err.print(f"wrote {out}")


COMMANDS = [optimize_cmd]
