"""`ffnx plugins`: op schemas, and the CUDA kernel / TensorRT plugin libraries."""

from __future__ import annotations

import click

from ffnx.commands import ui
from ffnx.commands.options import csv_list


@click.group("plugins", invoke_without_command=True, context_settings={"max_content_width": 100})
@click.option("--schemas", is_flag=True, help="Print the ffnx op schemas (Markdown).")
@click.pass_context
def plugins_cmd(ctx, schemas) -> None:
    """ffnx ops and their native libraries: list the ops, build or locate the libraries.

    \b
    Example:
      ffnx plugins                       # ops, their plugin names and where the libraries are
      ffnx plugins build --arch sm_87    # TensorRT plugin library for a Jetson Orin
      ffnx plugins build --kernels-only  # CUDA kernels only (ctypes-loadable, no TensorRT)
      ffnx plugins path
    """
    if ctx.invoked_subcommand:
        return
    from ffnx.plugins import schema

    if schemas:
        click.echo(schema.schema_markdown())
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


def _print_paths() -> None:
    from ffnx.plugins.build import default_out_dir
    from ffnx.plugins.trt_build import plugin_library_path

    trt = plugin_library_path()
    kernels = default_out_dir()
    ui.out.print(f"TensorRT plugins: {trt} ({'built' if trt.exists() else 'not built'})")
    ui.out.print(f"CUDA kernels:     {kernels} ")


@plugins_cmd.command("build")
@click.option("--arch", callback=csv_list, help="SM architectures, e.g. sm_87,sm_90.")
@click.option("--kernels-only", is_flag=True, help="Only libffnx_kernels.so (no TensorRT).")
@click.option(
    "--trt-include",
    type=click.Path(exists=True, file_okay=False),
    help="TensorRT include dir (default: FFNX_TRT_INCLUDE or a TensorRT install).",
)
@click.option("--out", type=click.Path(file_okay=False), help="Output directory.")
def build_plugins(arch, kernels_only, trt_include, out) -> None:
    """Compile the CUDA kernels (and the TensorRT plugin library) with nvcc."""
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
