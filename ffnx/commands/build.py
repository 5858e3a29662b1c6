"""`ffnx build`: artifact -> TensorRT engine (model.plan)."""

from __future__ import annotations

import click

from ffnx.commands import grammar, ui
from ffnx.commands.options import trt_flavour_option


@click.command("build", context_settings={"max_content_width": 100})
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8", "fp8"]),
    default="fp32",
    show_default=True,
)
@click.option("--sparse-weights", is_flag=True, help="Let TensorRT use 2:4 sparse weights.")
@click.option(
    "--version-compatible",
    is_flag=True,
    help="Build a version-compatible plan (runs on the lean runtime).",
)
@click.option(
    "--workspace",
    "workspace_mib",
    type=float,
    default=None,
    help="Builder workspace limit in MiB (as trtexec --memPoolSize=workspace:N).",
)
@click.option("--workspace-gib", type=float, default=None, help="The same limit in GiB.")
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False),
    help="Timing cache file (default: PATH/timing.cache, reused by the next build; "
    "TensorRT Enterprise only).",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    metavar="LABEL:MIN,OPT,MAX",
    help="Override a dynamic dim's range by its label, e.g. seq:1,128,2048 (repeatable; "
    "labels: README 'Dims', `ffnx --help`).",
)
@click.option(
    "--add-profile",
    "extra_profiles",
    multiple=True,
    metavar="'LABEL:MIN,OPT,MAX ...'",
    help="One more optimization profile: the defaults with these ranges (repeatable).",
)
@grammar.data_option(
    "int8 calibration inputs (TensorRT 10.x without Q/DQ): arrays named like the inputs, or "
    "name_0, name_1, ... (one batch each)."
)
@grammar.force_option("Replace an existing model.plan (refused without it).")
@grammar.json_option("Print the manifest's new tensorrt section as JSON.")
@trt_flavour_option
@click.option(
    "--compute-capability",
    metavar="CC[,CC...]",
    help="TensorRT-RTX build targets, e.g. 86,89 (default: TensorRT-RTX's default).",
)
@click.option(
    "--optimization-level",
    type=click.IntRange(0, 5),
    default=None,
    help="Builder optimization level (lower builds faster).",
)
@click.option(
    "--plugin-library",
    type=click.Path(exists=True, dir_okay=False),
    help="libffnx_trt_plugins.so (default: `ffnx plugins path`).",
)
def build_cmd(
    path,
    precision,
    sparse_weights,
    version_compatible,
    workspace_mib,
    workspace_gib,
    timing_cache,
    profiles,
    extra_profiles,
    data,
    force,
    as_json,
    flavour,
    compute_capability,
    optimization_level,
    plugin_library,
) -> None:
    """Build a TensorRT engine from an artifact (needs TensorRT and a GPU).

    Optimization profiles come from the manifest's dynamic dims unless --profile is given; the
    ffnx plugin library is loaded before parsing when the graph has ffnx ops.

    \b
    Example:
      ffnx build artifacts/gpt-moe --precision fp16 --profile seq:1,128,2048
      ffnx build artifacts/gpt-moe --precision fp16 --workspace 512 --force --json
      ffnx build artifacts/gpt-moe --trt rtx --compute-capability 86,89 --force
      ffnx build artifacts/gpt-swiglu --trt rtx --add-profile 'batch:1,1,1 seq:1,1,1'
    """
    from pathlib import Path

    from ffnx import artifact
    from ffnx.build.engine import build_engine
    from ffnx.commands.feeds import read_data

    ctx = click.get_current_context()
    if precision != "int8":
        grammar.unused(ctx, "with --precision int8 (calibration)", "data")
    if flavour == "enterprise":
        grammar.unused(ctx, "with TensorRT-RTX (--trt rtx|auto)", "compute_capability")
    if workspace_mib is not None and workspace_gib is not None:
        raise click.UsageError("give --workspace (MiB) or --workspace-gib, not both")
    if workspace_mib is not None:
        workspace_gib = workspace_mib / 1024
    grammar.refuse_existing([Path(path) / artifact.PLAN], force, "from an earlier build")
    calib = None
    if data:
        calib = read_data(data, [i["name"] for i in artifact.read_manifest(path)["inputs"]])
    with ui.bar("building TensorRT engine") as tick:
        section = build_engine(
            path,
            precision=precision,
            sparse_weights=sparse_weights,
            version_compatible=version_compatible,
            workspace_gib=workspace_gib,
            timing_cache=timing_cache,
            profiles=list(profiles) or None,
            extra_profiles=list(extra_profiles) or None,
            calib=calib,
            plugin_library=plugin_library,
            flavour=flavour,
            compute_capability=compute_capability,
            optimization_level=optimization_level,
            progress=lambda phase, step, steps: tick(step / steps if steps else 0.0),
        )
    ui.err.print(
        f"built {path}/model.plan with TensorRT{'-RTX' if section['flavour'] == 'rtx' else ''} "
        f"{section['version']} "
        f"({precision}, {len(section['optimization_profiles'])} optimization profile(s)) in "
        f"{section['build_seconds']} s" + _cache_note(section["timing_cache"])
    )
    if as_json:
        grammar.echo_json(section)


def _cache_note(cache: dict) -> str:
    if not cache.get("file"):
        return ""
    return f"; timing cache {cache['file']} (read {cache['read_bytes']} B)"


COMMANDS = [build_cmd]
