"""`ffnx` command line. Failures print one line and exit non-zero (traceback with --debug)."""

from __future__ import annotations

import sys

import click

from ffnx.errors import FfnxError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FfnxGroup(click.Group):
    """Turns FfnxError (and anything unexpected) into one line on stderr and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except FfnxError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            click.echo(
                f"internal error: {type(e).__name__}: {line} (re-run with --debug)", err=True
            )
            ctx.exit(3)


@click.group(cls=FfnxGroup, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show tracebacks on failure.")
@click.version_option(package_name="ffnx")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """ffnx: PyTorch FFN-variant models (gated, MoE, sparse, reparameterizable) to ONNX Runtime
    and TensorRT.

    \b
    Example:
      ffnx export gpt-swiglu --out artifacts/gpt-swiglu
      ffnx bench artifacts/gpt-swiglu --compare torch
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from ffnx.commands import (
        build,
        export,
        generate,
        inspect,
        models,
        optimize,
        plugins,
        run,
        sparsity,
    )

    for mod in (models, export, optimize, build, run, generate, inspect, plugins, sparsity):
        for cmd in mod.COMMANDS:
            main.add_command(cmd)


_register()


if __name__ == "__main__":
    sys.exit(main())
