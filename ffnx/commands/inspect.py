"""`ffnx inspect`: what an artifact or ONNX file contains."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ffnx.commands import grammar, ui
from ffnx.errors import ArtifactError, first_line


def load_onnx(path: Path):
    import onnx

    from ffnx.graph.model_io import check

    try:
        model = onnx.load(str(path))
        check(model)
    except Exception as e:  # protobuf DecodeError, checker errors: the file is unusable
        line = first_line(e)
        raise ArtifactError(
            f"{path} is not a valid ONNX model (corrupted or truncated?): {line}"
        ) from e
    return model


def _io(values) -> list[dict]:
    import onnx

    return [
        {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
        }
        for v in values
    ]


def describe(path: str | Path) -> dict:
    from ffnx import artifact
    from ffnx.compress.nm_sparsity import report as nm_report
    from ffnx.graph import lowering_meta
    from ffnx.graph.recognize import ffn_variants
    from ffnx.graph.stats import graph_stats, op_histogram

    p = Path(path)
    manifest = artifact.read_manifest(p) if p.is_dir() else {}
    file = artifact.model_path(p, manifest) if p.is_dir() else p
    if not file.exists():
        raise ArtifactError(f"{file} does not exist")
    model = load_onnx(file)
    dims = {k: v.get("example", 1) for k, v in manifest.get("dims", {}).items()}
    info = {
        "file": str(file),
        "inputs": manifest.get("inputs") or _io(model.graph.input),
        "outputs": manifest.get("outputs") or _io(model.graph.output),
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        **graph_stats(model, dims),
        "ops": op_histogram(model),
        "ffn_variants": ffn_variants(model),
        "lowerings": lowering_meta.read(model),
        "sparsity_2_4": [
            {k: w[k] for k in ("weight", "shape", "nm_fraction", "satisfies")}
            for w in nm_report(model)
        ],
    }
    if manifest:
        info["model"] = manifest.get("model", {})
        info["passes"] = [
            {k: p.get(k) for k in ("name", "status", "applied", "reason")}
            for p in manifest.get("passes", [])
        ]
        info["plugins"] = manifest.get("plugins", [])
        if (p / artifact.PLAN).is_file():
            from ffnx.build.plan_layers import describe_plan

            info["plan"] = describe_plan(p, manifest)
    return info


def _print_plan(o, plan: dict) -> None:
    """The TensorRT plan's plugin layers and where that list comes from."""
    o.print(
        f"TensorRT plan: {plan['plan_bytes']:,} bytes (TensorRT {plan.get('built_with')}); "
        f"layers from: {plan['source']}",
        markup=False,
    )
    if plan.get("note"):
        o.print(f"  ({plan['note']})", markup=False)
    rows = [
        [x["name"], x.get("op") or x.get("layer_type", ""), str(x.get("in_plan", True)).lower()]
        for x in plan.get("plugin_layers", [])
    ]
    if rows or plan["source"] != "none":
        o.print(
            ui.table(
                "plan plugin layers", ["layer", "plugin", "in plan"], rows or [["(none)", "", ""]]
            )
        )


@click.command("inspect", context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path(exists=True))
@grammar.json_option("Print everything shown as one JSON object.")
def inspect_cmd(path, as_json) -> None:
    """Show inputs/outputs, op histogram, params, FLOPs, recognised FFN variants, passes applied
    and MoE lowerings of an artifact directory or an .onnx file, and the plugin layers of its
    TensorRT plan (model.plan) when it has one.

    \b
    Example:
      ffnx export gpt-moe -o artifacts/gpt-moe
      ffnx inspect artifacts/gpt-moe
      ffnx inspect artifacts/gpt-moe/model.onnx --json
    """
    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    o = ui.out
    o.print(
        f"[bold]{info['file']}[/]  nodes {info['nodes']:,}  params {info['params']:,}  "
        f"FLOPs {ui.fmt(info['flops'])}  opsets {info['opsets']}"
    )
    o.print(
        ui.table(
            "inputs / outputs",
            ["name", "kind", "dtype", "shape"],
            [[t["name"], "input", t["dtype"], str(t["shape"])] for t in info["inputs"]]
            + [[t["name"], "output", t["dtype"], str(t["shape"])] for t in info["outputs"]],
        )
    )
    o.print(ui.table("ops", ["op", "count"], [[k, v] for k, v in info["ops"].items()]))
    o.print(
        ui.table(
            "recognised",
            ["pattern", "count"],
            [[k, v] for k, v in info["ffn_variants"].items()] or [["(none)", 0]],
        )
    )
    if info.get("passes"):
        o.print(
            ui.table(
                "passes",
                ["pass", "status", "applied", "reason"],
                [
                    [p["name"], p["status"], p["applied"], p.get("reason") or ""]
                    for p in info["passes"]
                ],
            )
        )
    if info.get("plan"):
        _print_plan(o, info["plan"])
    if info["lowerings"]:
        rows = [[e["pass"], e["layer"], e["choice"], e["why"]] for e in info["lowerings"]]
        o.print(ui.table("lowerings (metadata ffnx.lowerings)", ["pass", "layer", "lowering",
                                                                  "why"], rows))  # fmt: skip
    nm = info["sparsity_2_4"]
    ok = [w["weight"] for w in nm if w["satisfies"]]
    o.print(
        f"2:4 weight sparsity: {len(ok)} of {len(nm)} linear weights satisfy it"
        + (f" ({', '.join(ok[:5])}{' …' if len(ok) > 5 else ''})" if ok else "")
        + ("; `ffnx build --sparse-weights` lets TensorRT use them" if ok else "")
    )


COMMANDS = [inspect_cmd]
