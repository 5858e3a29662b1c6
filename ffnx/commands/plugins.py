"""`ffnx plugins`: op schemas, and the CUDA kernel / TensorRT plugin libraries."""

from __future__ import annotations

import click

from ffnx.commands import grammar, ui
from ffnx.commands.options import csv_list


@click.group("plugins", invoke_without_command=True, context_settings={"max_content_width": 100})
@click.option("--schemas", is_flag=True, help="Print the ffnx op schemas (Markdown).")
@grammar.json_option("Print the ops and the library paths as JSON.")
@click.pass_context
def plugins_cmd(ctx, schemas, as_json) -> None:
    """ffnx ops and their native libraries: list the ops, build or locate the libraries.

    \b
    Example:
      ffnx plugins                       # ops, their plugin names and where the libraries are
      ffnx plugins --json
      ffnx plugins --schemas             # the op schemas as Markdown
      ffnx plugins build --arch sm_87    # TensorRT plugin library for a Jetson Orin
      ffnx plugins build --kernels-only  # CUDA kernels only (ctypes-loadable, no TensorRT)
      ffnx plugins path
      ffnx plugins path --kernels
    """
    if ctx.invoked_subcommand:
        grammar.unused(ctx, "without a subcommand", "schemas", "as_json")
        return
    from ffnx.plugins import schema

    if schemas:
        grammar.unused(ctx, "without --schemas (Markdown)", "as_json")
        click.echo(schema.schema_markdown())
        return
    if as_json:
        grammar.echo_json(_listing())
        return
    rows = [
        [
            f"{schema.DOMAIN}::{s.op_type}",
            f"{schema.PLUGIN_NAMESPACE}::{s.op_type} v{schema.PLUGIN_VERSION}",
            len(s.inputs),
            len(s.attributes),
        ]
        for s in schema.OPS.values()
    ]
    ui.out.print(
        ui.table("ffnx ops", ["ONNX node", "TensorRT plugin", "inputs", "attributes"], rows)
    )
    _print_paths()


def _paths() -> dict:
    from ffnx.plugins.build import LIB_NAME, default_out_dir
    from ffnx.plugins.trt_build import plugin_library_path

    trt, kernels = plugin_library_path(), default_out_dir() / LIB_NAME
    return {"trt_plugins": str(trt), "trt_plugins_built": trt.exists(),
            "kernels": str(kernels), "kernels_built": kernels.exists()}  # fmt: skip


def _listing() -> dict:
    from ffnx.plugins import schema

    ops = [{"op": f"{schema.DOMAIN}::{s.op_type}",
            "plugin": f"{schema.PLUGIN_NAMESPACE}::{s.op_type}", "version": schema.PLUGIN_VERSION,
            "inputs": [p.name for p in s.inputs], "attributes": [a.name for a in s.attributes]}
           for s in schema.OPS.values()]  # fmt: skip
    return {"ops": ops, **_paths()}


def _print_paths() -> None:
    p = _paths()
    built = {True: "built", False: "not built"}
    ui.out.print(f"TensorRT plugins: {p['trt_plugins']} ({built[p['trt_plugins_built']]})")
    ui.out.print(f"CUDA kernels:     {p['kernels']} ({built[p['kernels_built']]})")


@plugins_cmd.command("build")
@click.option("--arch", callback=csv_list, help="SM architectures, e.g. sm_87,sm_90.")
@click.option("--kernels-only", is_flag=True, help="Only libffnx_kernels.so (no TensorRT).")
@click.option(
    "--trt-include",
    type=click.Path(exists=True, file_okay=False),
    help="TensorRT include dir (default: FFNX_TRT_INCLUDE or a TensorRT install).",
)
@grammar.output_option("Output directory (default: `ffnx plugins path`'s).", file=False)
@click.pass_context
def build_plugins(ctx, arch, kernels_only, trt_include, output) -> None:
    """Compile the CUDA kernels (and the TensorRT plugin library) with nvcc; prints the path."""
    out = output
    if kernels_only:
        grammar.unused(ctx, "without --kernels-only (the TensorRT plugin library)", "trt_include")
    with ui.steps("compiling") as step:
        if kernels_only:
            from ffnx.plugins.build import DEFAULT_ARCHS, build_kernels

            step("nvcc: CUDA kernels")
            path = build_kernels(tuple(arch) if arch else DEFAULT_ARCHS, out_dir=out)
        else:
            from ffnx.plugins.trt_build import build_plugin_library

            step("nvcc: TensorRT plugin library")
            path = build_plugin_library(arch, trt_include=trt_include, out_dir=out)
    click.echo(str(path))


@plugins_cmd.command("path")
@click.option("--kernels", is_flag=True, help="The kernels library instead of the plugins.")
def plugins_path(kernels) -> None:
    """Print where the plugin (or kernel) library is looked for."""
    if kernels:
        from ffnx.plugins.build import LIB_NAME, default_out_dir

        click.echo(str(default_out_dir() / LIB_NAME))
    else:
        from ffnx.plugins.trt_build import plugin_library_path

        click.echo(str(plugin_library_path()))


COMMANDS = [plugins_cmd]
