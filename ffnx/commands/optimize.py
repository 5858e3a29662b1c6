"""`ffnx optimize`: run graph passes on an artifact or any ONNX file."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click
import numpy as np

from ffnx.commands import grammar, ui
from ffnx.commands.feeds import explained_random_inputs, random_feeds, sample_feeds
from ffnx.commands.options import csv_list, pass_timing_options
from ffnx.commands.quantize import quantize_option

SPARSIFY = ("sparsity", "sparse_mode", "sparse_lowering")


def _check_usage(ctx: click.Context, src, out, passes, target, data, as_json) -> None:
    """Usage errors for options that would do nothing in this invocation."""
    p = ctx.params
    if src and Path(src).is_dir():
        grammar.unused(ctx, "with an .onnx SRC (a directory is updated in place)", "out")
    elif src and not out:
        raise click.UsageError("-o/--output is required when SRC is an .onnx file")
    if data:
        grammar.unused(ctx, "without --data (random inputs)", "dims")
    if "sparsify_ffn" not in (passes or []):
        grammar.unused(ctx, "with --passes sparsify_ffn", *SPARSIFY)
    if target == "trt":
        grammar.unused(ctx, "with --target ort (TensorRT keeps FfnxMoE for its plugin)",
                       "quantize_experts")  # fmt: skip
    from ffnx.passes import by_name

    known = by_name()
    approximate = (
        p.get("quantize_experts")
        or p.get("quantize")
        or any(n in known and not known[n].exact for n in passes or [])
    )
    if not approximate:
        grammar.unused(ctx, "with an approximate pass (--passes) or --quantize-experts",
                       "max_error")  # fmt: skip
    if as_json:
        grammar.unused(ctx, "without --json (the JSON report has every reason)", "explain")
    if target == "trt" or passes:
        grammar.unused(ctx, "with the speed guard (default passes, --target ort)", "no_guard")


def _larger(model, manifest: dict, feeds: list[dict]) -> list[dict[str, np.ndarray]] | None:
    """The speed guard's larger shape set: every dynamic dim of the first feed x4 (within the
    manifest's max), random inputs; None for a graph without dynamic dims."""

    dims = {}
    for vi in model.graph.input:
        arr = feeds[0].get(vi.name)
        for d, n in zip(vi.type.tensor_type.shape.dim, getattr(arr, "shape", ())):
            if d.HasField("dim_param") and d.dim_param:
                hi = (manifest.get("dims", {}).get(d.dim_param) or {}).get("max")
                dims[d.dim_param] = min(4 * int(n), hi or 4 * int(n))
    if not dims:
        return None
    return random_feeds(model, manifest, dims, samples=1)


def _print_passes(reports: list[dict]) -> None:
    rows = []
    for r in reports:
        b, a = r["before"], r.get("after", r["before"])
        err = r.get("error", {}).get("max_abs")
        rows.append(
            [
                r["name"],
                r["status"],
                r["matches"],
                r["applied"],
                f"{b['nodes']}→{a['nodes']}",
                f"{b['params']:,}→{a['params']:,}",
                f"{ui.fmt(b['flops'])}→{ui.fmt(a['flops'])}",
                err,
                r.get("reason", ""),
            ]
        )
    ui.out.print(
        ui.table(
            "graph passes",
            [
                "pass",
                "status",
                "matches",
                "applied",
                "nodes",
                "params",
                "FLOPs",
                "max abs err",
                "reason",
            ],
            rows,
        )
    )


def _explain(reports: list[dict]) -> None:
    for r in reports:
        for s in r.get("skipped", []):
            ui.out.print(f"{r['name']}: skipped {s['site']}: {s['reason']}")
        for k, v in r.get("notes", {}).items():
            ui.out.print(f"{r['name']}: {k}: {v}")


@click.command("optimize", context_settings={"max_content_width": 100})
@click.argument("src", type=click.Path(exists=True), required=False)
@click.option(
    "-o", "--output", "--out", "out", type=click.Path(dir_okay=False),
    help="Output .onnx (for an .onnx SRC; --out: alias).",
)  # fmt: skip
@grammar.force_option("Replace an existing -o file or the artifact's model.opt.onnx.")
@grammar.json_option("Print the pass reports (or --list-passes) as JSON.")
@click.option("--passes", callback=csv_list, help="Run only these passes, in registry order.")
@click.option("--skip", callback=csv_list, help="Skip these passes.")
@click.option("--list-passes", is_flag=True, help="Print the registered passes and exit.")
@grammar.data_option(
    "Sample inputs for verification and calibration: arrays named like the inputs, or name_0, "
    "name_1, ... (else 2 random samples within the declared dims)."
)
@click.option("--max-error", type=float, help="Limit for approximate passes (max abs error).")
@grammar.dims_option()
@click.option("--target", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option(
    "--quantize-experts",
    type=click.Choice(["int4", "int8"]),
    default=None,
    help="Weight-only low-bit MoE experts (accuracy reported).",
)
@quantize_option
@click.option(
    "--sparsity",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="sparsify_ffn: target activation sparsity (else the sparsest under --max-error).",
)
@click.option(
    "--sparse-mode",
    type=click.Choice(["threshold", "topk"]),
    default=None,
    help="sparsify_ffn: CHESS per-channel thresholds or Lazy-Neuron top-k.",
)
@click.option(
    "--sparse-lowering",
    type=click.Choice(["auto", "dense", "gather", "compress", "node"]),
    default=None,
    help="sparsify_ffn: ORT formulation (auto = fastest measured).",
)
@click.option("--explain", is_flag=True, help="Say why each candidate was skipped.")
@pass_timing_options
@click.pass_context
def optimize_cmd(
    ctx,
    src,
    out,
    force,
    as_json,
    passes,
    skip,
    list_passes,
    data,
    max_error,
    dims,
    target,
    quantize_experts,
    quantize,
    sparsity,
    sparse_mode,
    sparse_lowering,
    explain,
    no_guard,
    threads,
) -> None:
    """Rewrite an ONNX graph with ffnx's passes, each verified against the graph before it.

    SRC is an artifact directory (model.onnx -> model.opt.onnx, manifest updated; --force when
    model.opt.onnx exists) or an .onnx file (-o required).

    \b
    Example:
      ffnx export vit-repa -o artifacts/vit-repa --no-optimize
      ffnx optimize artifacts/vit-repa --threads 2
      ffnx optimize artifacts/vit-repa/model.onnx -o model.opt.onnx --skip fuse_gate_up --json
      ffnx export gpt-mlp -o artifacts/gpt-mlp --no-optimize
      ffnx optimize artifacts/gpt-mlp --passes ffn_fusion --data calib.npz --max-error 1 --force
      ffnx optimize artifacts/gpt-mlp --passes sparsify_ffn --sparsity 0.5 --max-error 5 --force
      ffnx optimize --list-passes
      ffnx export hf:./qwen3-tiny -o artifacts/qwen3 --force
      ffnx optimize artifacts/qwen3 --quantize int4 --force
    """
    from ffnx.passes import registry

    if list_passes:
        if as_json:
            grammar.echo_json(
                [{"name": p.name, "exact": p.exact, "default": p.default,
                  "targets": list(p.targets), "summary": p.summary} for p in registry()]
            )  # fmt: skip
            return
        rows = [
            [
                p.name,
                "exact" if p.exact else "approximate",
                ", ".join(p.targets) if p.default else "no (--passes)",
                p.summary,
            ]
            for p in registry()
        ]
        ui.out.print(
            ui.table("passes (registry order)", ["pass", "kind", "default for", "what"], rows)
        )
        return
    if not src:
        raise click.UsageError("SRC is required (or --list-passes)")
    _check_usage(ctx, src, out, passes, target, data, as_json)
    from ffnx import artifact
    from ffnx.commands.inspect import load_onnx
    from ffnx.passes import speed_guard
    from ffnx.passes.optimize import manifest_options, optimize_model

    p = Path(src)
    manifest = artifact.read_manifest(p) if p.is_dir() else artifact.manifest_of_file(p)
    # After `ffnx moefy` the current graph is model.opt.onnx (the MoEfied one): the passes start
    # from it, so the MoE layers the manifest describes are kept (model.onnx would discard them).
    keep_moefied = p.is_dir() and "moefy" in manifest
    start = (artifact.MODEL_OPT if keep_moefied else artifact.MODEL) if p.is_dir() else ""
    grammar.refuse_existing([p / artifact.MODEL_OPT if p.is_dir() else out], force)
    model = load_onnx(p / start if p.is_dir() else p)
    if quantize:  # experts through lower_moe's quantized forms, linears after the passes
        from ffnx.commands.quantize import check

        max_error, quantize_experts = check(p, manifest, quantize, quantize_experts, target,
                                            passes, max_error, model)  # fmt: skip
        if not quantize_experts and max_error == float("inf"):
            max_error = None  # no approximate pass left
    feeds, source = sample_feeds(data, model, manifest, dims, samples=2)
    opts = {
        k: v
        for k, v in {
            "quantize_experts": quantize_experts,
            "sparsity": sparsity,
            "sparse_mode": sparse_mode,
            "sparse_lowering": sparse_lowering,
        }.items()
        if v is not None
    }
    if p.is_dir() and (p / "calibration.npz").exists():
        opts["calibration"] = str(p / "calibration.npz")
    if threads:
        opts.setdefault("threads", threads)  # the lowering and attention choices time at them
    opts.update(manifest_options(manifest))
    kw = dict(passes=passes, skip=skip or [], target=target, max_error=max_error, options=opts)
    guarded = target == "ort" and not passes and not no_guard and speed_guard.enabled()
    timed_as = {}
    if quantize:  # the guard times every graph with its linears quantized, as they will run
        from ffnx.commands.quantize import quantized_linears

        prepare = partial(quantized_linears, scheme=quantize, passes=passes, skip=skip or ())
        timed_as = dict(prepare=prepare, variant=quantize)
    with ui.steps("optimizing") as step, explained_random_inputs("optimize", source == "random"):
        if guarded:
            larger = _larger(model, manifest, feeds)
            sets = None
            if "decoder" in manifest:  # timed at decode steps (see speed_guard.DECODE_STEPS)
                total = (manifest.get("dims", {}).get("total") or {}).get("max")
                make = lambda dims: random_feeds(model, manifest, dims, 1)  # noqa: E731
                sets = speed_guard.decode_step_sets(make, total)
            new, reports, guard = speed_guard.optimize_guarded(
                model, feeds, larger, threads=threads, step=step, timing_sets=sets, **timed_as,
                **kw,
            )  # fmt: skip
        else:
            new, reports = optimize_model(model, feeds, step=step, **kw)
    if not as_json:
        _print_passes(reports)
    if guarded:
        ui.err.print(speed_guard.summary(guard))
        if p.is_dir():
            manifest["speed_guard"] = guard
    if explain:
        _explain(reports)
    if quantize:
        from ffnx.commands.quantize import quantize_lowered
        from ffnx.compress.quantize_weights import summary

        with ui.steps(f"quantizing linears to {quantize}, measuring token agreement"):
            new, manifest["quantize"] = quantize_lowered(
                model, new, manifest, quantize, passes, skip or ()
            )
        ui.err.print(summary(manifest["quantize"]))
    elif p.is_dir():
        manifest.pop("quantize", None)
    from ffnx.graph.model_io import save_model

    if p.is_dir():
        save_model(new, p / artifact.MODEL_OPT)
        manifest["passes"] = (manifest.get("passes", []) if keep_moefied else []) + reports
        # moefied: model.opt.onnx keeps the provenance it had (model.onnx via moefy)
        made = None if keep_moefied else {artifact.MODEL_OPT: [artifact.MODEL]}
        artifact.write_manifest(p, manifest, made)
        ui.err.print(f"updated {p / artifact.MODEL_OPT} and the manifest")
    else:
        save_model(new, out)
        ui.err.print(f"wrote {out}")
    if as_json:
        written = str(p / artifact.MODEL_OPT) if p.is_dir() else out
        grammar.echo_json({"output": written, "passes": reports,
                           **({"speed_guard": guard} if guarded else {}),
                           **({"quantize": manifest["quantize"]} if quantize else {})})  # fmt: skip


COMMANDS = [optimize_cmd]
