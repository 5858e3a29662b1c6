"""`ffnx` command line. Failures print one line and exit non-zero (traceback with --debug)."""

from __future__ import annotations

import sys

import click

from ffnx.errors import FfnxError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class FfnxGroup(click.Group):
    """Turns FfnxError (and anything unexpected) into one line on stderr and an exit code."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """Usage and parameter errors too: one `error:` line (exit 2) instead of click's
        three-line usage block."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except click.ClickException as e:
            hint = ""
            if isinstance(e, click.UsageError) and e.ctx is not None:
                hint = f" (see `{e.ctx.command_path} --help`)"
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

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
    One grammar for every command:
      -o/--output PATH   every file or directory a command writes (--out: alias)
      --force            replace an existing result (refused without it; nothing half-written)
      --json             JSON on stdout instead of tables
      --data FILE.npz    sample inputs: arrays named like the inputs, or name_0, name_1, ...
      --dims label=N,... sizes of dynamic dims by their label, e.g. --dims batch=4,seq=128;
                         labels come from the export (--dynamic input:axis=label) and are
                         listed by `ffnx inspect`; build ranges: --profile label:min,opt,max
    An option that does nothing in its context is a usage error (exit 2); any other failure
    prints one `error:` line and exits 1 (--debug: the traceback).

    \b
    Example:
      ffnx export gpt-swiglu -o artifacts/gpt-swiglu
      ffnx bench artifacts/gpt-swiglu --compare torch --iters 20
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
