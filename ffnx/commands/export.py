"""`ffnx export`: model -> verified, optimized artifact (and TensorRT engine with --target trt)."""

from __future__ import annotations

import click

from ffnx.commands import grammar, ui
from ffnx.commands.options import csv_list, pass_timing_options, trt_flavour_option
from ffnx.commands.quantize import quantize_option


@click.command("export", context_settings={"max_content_width": 100})
@click.argument("model")
@click.option(
    "--output", "-o", "--out", "out", required=True, type=click.Path(file_okay=False),
    help="Artifact dir (--out: alias).",
)  # fmt: skip
@click.option(
    "--size",
    type=click.Choice(["tiny", "base"]),
    default="tiny",
    show_default=True,
    help="Zoo model size.",
)
@click.option(
    "--dynamic",
    multiple=True,
    metavar="NAME:AXIS=LABEL",
    help="Dynamic dims, e.g. input_ids:0=batch,1=seq (repeatable): the labels --dims sizes "
    "(README 'Dims', `ffnx --help`).",
)
@click.option(
    "--task",
    default=None,
    metavar="TASK",
    help="hf:PATH task (default: the config's): causal-lm, feature-extraction, masked-lm, "
    "sequence-classification, image-classification, vision-encoder.",
)
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18).")
@click.option("--force", is_flag=True, help="Replace an existing artifact (only on success).")
@click.option("--atol", type=float, default=None, help="Verification abs tolerance (1e-4).")
@click.option("--rtol", type=float, default=None, help="Verification rel tolerance (1e-3).")
@click.option("--no-optimize", is_flag=True, help="Skip graph passes (no model.opt.onnx).")
@click.option("--passes", callback=csv_list, help="Run only these passes (comma-separated).")
@click.option("--skip", callback=csv_list, help="Skip these passes.")
@quantize_option
@pass_timing_options
@click.option(
    "--target",
    type=click.Choice(["ort", "trt"]),
    default="ort",
    show_default=True,
    help="trt keeps ffnx ops for the plugins, checks the graph, and builds model.plan.",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8", "fp8"]),
    default=None,
    help="TensorRT precision (--target trt only; default fp32).",
)
@click.option(
    "--no-build",
    is_flag=True,
    help="With --target trt: export and check the graph; build later with `ffnx build`.",
)
@trt_flavour_option
@click.option(
    "--no-cache",
    is_flag=True,
    help="hf: causal LMs: export input_ids -> logits without the KV cache (no past inputs).",
)
@grammar.json_option("Print the artifact's manifest as JSON.")
def export_cmd(
    model,
    out,
    size,
    dynamic,
    task,
    opset,
    force,
    atol,
    rtol,
    no_optimize,
    passes,
    skip,
    no_guard,
    threads,
    target,
    precision,
    no_build,
    flavour,
    no_cache,
    quantize,
    as_json,
) -> None:
    """Export MODEL (zoo name, pkg.module:factory, file.py:factory or hf:PATH) to an artifact
    directory, verified against torch at two shapes.

    \b
    Example:
      ffnx export gpt-swiglu -o artifacts/gpt-swiglu
      ffnx export my_model.py:build --dynamic x:0=batch -o artifacts/mine --force --json
      ffnx export hf:./mixtral-tiny -o artifacts/mixtral
      ffnx export hf:./bert-tiny --task masked-lm -o artifacts/bert-mlm
      ffnx export gpt-moe -o artifacts/gpt-moe --target trt --trt rtx --no-build --force
      ffnx export vit-repa -o artifacts/vit-repa --threads 2 --force
      ffnx export hf:./qwen3-tiny -o artifacts/qwen3-int4 --quantize int4 --force
    """
    from ffnx.export.pipeline import export_artifact
    from ffnx.export.torch_export import DEFAULT_OPSET
    from ffnx.graph import verify
    from ffnx.models.user import parse_dynamic, resolve

    if target != "trt":
        given_flags = (("--precision", precision is not None), ("--no-build", no_build),
                       ("--trt", flavour != "auto"))  # fmt: skip
        for flag, given in given_flags:
            if given:
                raise click.UsageError(f"{flag} applies only with --target trt")
    ctx = click.get_current_context()
    if no_optimize:
        grammar.unused(ctx, "without --no-optimize", "passes", "skip", "no_guard", "threads")
    if target == "trt" or passes:
        grammar.unused(ctx, "with the speed guard (default passes, --target ort)", "no_guard")
    if not model.startswith("hf:"):
        grammar.unused(ctx, "with hf:PATH causal LMs", "no_cache")
    if ":" in model:
        grammar.unused(ctx, "with zoo models", "size")
    precision = precision or "fp32"
    if task is not None and not model.startswith("hf:"):
        from ffnx.errors import ModelSpecError

        raise ModelSpecError(f"--task {task}: only for hf:PATH models, not {model!r}")
    if model.startswith("hf:"):
        from ffnx.models.hf import load_hf

        # cache: the KV-cache decoder for causal LMs; other tasks ignore it (ffnx.models.hf_tasks)
        spec = load_hf(model[3:], parse_dynamic(dynamic), cache=not no_cache, task=task)
    else:
        spec = resolve(model, size, parse_dynamic(dynamic))
    tol = verify.Tolerance(
        atol=verify.DEFAULT_ATOL if atol is None else atol,
        rtol=verify.DEFAULT_RTOL if rtol is None else rtol,
    )
    if quantize and (target != "ort" or no_optimize):
        raise click.UsageError("--quantize needs the ORT graph passes (not --target trt, "
                               "--no-optimize)")  # fmt: skip
    if quantize and "decoder" not in getattr(spec, "manifest_extra", {}):
        from ffnx.errors import PassError

        raise PassError(f"--quantize: {spec.name} is not a KV-cache decoder (ffnx export hf:DIR "
                        "of a causal LM, without --no-cache)")  # fmt: skip
    from contextlib import nullcontext

    from ffnx import artifact

    # --quantize: export and quantize in one staging dir, so a failure leaves `out` as it was
    staged = artifact.staged_dir(out, force) if quantize else nullcontext(None)
    with ui.steps(f"exporting {spec.name}") as step, staged as stage:
        manifest = export_artifact(
            spec,
            stage or out,
            opset=opset or DEFAULT_OPSET,
            tol=tol,
            force=force or stage is not None,
            optimize=not no_optimize,
            passes=passes,
            skip=skip or [],
            target=target,
            source=model,
            size=size,
            step=step,
            guard=not no_guard,
            threads=threads,
            trt=flavour,
            keep_module=False,  # its weights are not needed past verification
        )
        if target == "trt" and not no_build:
            from ffnx.build.engine import build_engine

            step("building the TensorRT engine")
            build_engine(out, precision=precision, flavour=flavour)
        if quantize:
            from ffnx.commands.quantize import quantize_artifact

            quantize_artifact(stage, quantize, passes, skip, step)
            manifest = artifact.read_manifest(stage)
    v = manifest["export"]
    ui.err.print(
        f"exported {spec.name} ({manifest['model']['params']:,} params, opset {v['opset']}) to "
        f"{out}; max abs error vs torch {v['max_abs_error']:.2e}"
    )
    check = manifest.get("tensorrt_graph_check")
    if check:  # which checker took the TensorRT graph (the real parser, or the op-list fallback)
        why = f" ({check['fallback']})" if check.get("fallback") else ""
        ui.err.print(f"TensorRT graph check: {check['checker']}{why}", markup=False)
    applied = [p for p in manifest.get("passes", []) if p["status"] == "applied"]
    if applied:
        ui.err.print("passes applied: " + ", ".join(f"{p['name']}×{p['applied']}" for p in applied))
    if "speed_guard" in manifest:
        from ffnx.passes.speed_guard import summary

        ui.err.print(summary(manifest["speed_guard"]))
    if quantize:
        from ffnx.compress.quantize_weights import summary

        ui.err.print(summary(manifest["quantize"]))
    if as_json:
        grammar.echo_json(manifest)


COMMANDS = [export_cmd]
