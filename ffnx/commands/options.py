"""Option parsers shared by commands."""

from __future__ import annotations

import click


def csv_list(ctx, param, value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


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
