"""The one CLI grammar every command follows (click / Polygraphy / trtexec habits):

- `-o/--output PATH` for every file or directory a command writes (`--out` is an alias);
- `--json`: a flag, JSON on stdout (tables and progress then stay off stdout);
- `--data FILE.npz`: sample inputs, read by `ffnx.commands.feeds.read_data` (one reader);
- `--dims label=N,...`: sizes of dynamic dims (DIMS_SYNTAX, documented once in README "Dims");
- `--force`: replace an existing result; without it the command refuses before writing;
- an option that does nothing in its context is a usage error (`unused`).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.core import ParameterSource

from ffnx.errors import ArtifactError

DIMS_SYNTAX = (
    "Dynamic dims by label: label=N[,label=N], e.g. batch=4,seq=128 (see README 'Dims' or "
    "`ffnx --help`)."
)


def output_option(help: str, file: bool = True, required: bool = False):
    """`-o/--output` (alias `--out`), stored as `output`."""
    kind = click.Path(dir_okay=not file, file_okay=file)
    return click.option(
        "-o", "--output", "--out", "output", type=kind, required=required, help=help
    )  # fmt: skip


def json_option(help: str = "Print JSON on stdout (no tables)."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def force_option(help: str = "Replace an existing result (refused without it)."):
    return click.option("--force", is_flag=True, help=help)


def data_option(help: str | None = None):
    return click.option(
        "--data",
        type=click.Path(exists=True, dir_okay=False),
        metavar="FILE.npz",
        help=help
        or "Sample inputs: arrays named like the inputs (one sample) or name_0, name_1, ... "
        "(random inputs within the declared dims when not given).",
    )


def parse_dims(ctx, param, value: str | None) -> dict[str, int]:
    """`batch=1,seq=128` -> {"batch": 1, "seq": 128}."""
    out: dict[str, int] = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        name, _, n = part.partition("=")
        if not name.strip() or not n.strip().isdigit():
            raise click.BadParameter(f"{part!r}: expected label=N, e.g. batch=1,seq=128")
        out[name.strip()] = int(n)
    return out


def dims_option(help: str = "Sizes of dynamic dims for random inputs. " + DIMS_SYNTAX):
    return click.option(
        "--dims", callback=parse_dims, default=None, metavar="LABEL=N[,...]", help=help
    )


def given(ctx: click.Context, name: str) -> bool:
    """True when parameter `name` was given on the command line (not its default)."""
    src = ctx.get_parameter_source(name)
    return src is not None and src not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def flag_of(ctx: click.Context, name: str) -> str:
    param = next(p for p in ctx.command.params if p.name == name)
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else param.opts[0]


def unused(ctx: click.Context, when: str, *names: str) -> None:
    """UsageError for the first of `names` given on the command line: it does nothing unless
    `when` (e.g. "with --target trt")."""
    for name in names:
        if given(ctx, name):
            raise click.UsageError(f"{flag_of(ctx, name)} applies only {when}")


def refuse_existing(paths, force: bool, what: str = "") -> None:
    """ArtifactError naming the first existing path unless --force (checked before any work)."""
    if force:
        return
    for p in paths:
        if Path(p).exists():
            by = f" ({what})" if what else ""
            raise ArtifactError(f"{p} exists{by}; give --force to replace it")


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))
