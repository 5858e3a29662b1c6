"""Option parsers shared by commands."""

from __future__ import annotations

import click


def csv_list(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def dims_option(ctx, param, value: str | None) -> dict[str, int]:
    """`batch=1,seq=128` -> {"batch": 1, "seq": 128}."""
    out: dict[str, int] = {}
    for part in (value or "").split(","):
        if not part.strip():
            continue
        name, _, n = part.partition("=")
        if not n.strip().isdigit():
            raise click.BadParameter(f"{part!r}: expected label=int, e.g. batch=1,seq=128")
        out[name.strip()] = int(n)
    return out


TRT_FLAVOURS = ("auto", "enterprise", "rtx")


def trt_flavour_option(f):
    """`--trt auto|enterprise|rtx`, shared by `ffnx build` and `ffnx export --target trt`."""
    return click.option(
        "--trt",
        "flavour",
        type=click.Choice(TRT_FLAVOURS),
        default="auto",
        show_default=True,
        help="TensorRT builder: auto takes Enterprise `tensorrt` first, then `tensorrt_rtx`.",
    )(f)
