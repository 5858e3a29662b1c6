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


def pass_timing_options(f):
    """`--no-guard` and `--threads`, shared by `ffnx export` and `ffnx optimize`."""
    f = click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=None,
        help="ORT CPU threads measured choices time at (speed guard, MoE lowering, attention).",
    )(f)
    return click.option(
        "--no-guard",
        is_flag=True,
        help="Keep every default pass even where the graph without it times faster on ORT.",
    )(f)
