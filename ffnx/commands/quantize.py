"""`--quantize int4|int8` for KV-cache decoders, shared by `ffnx optimize` and `ffnx export`:
every linear -> com.microsoft::MatMulNBits (`ffnx.compress.quantize_weights`), MoE experts
through `lower_moe`'s quantized lowerings (QMoE / MatMulNBits experts), and the accuracy against
the fp32 export (token agreement, logits cosine) in the CLI output and the manifest."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click

from ffnx.errors import PassError


def quantize_scheme(ctx, param, value: str | None) -> str | None:
    """--quantize's parser: a bad value is one `error:` line (PassError), exit 1."""
    from ffnx.compress.quantize_weights import SCHEMES

    if value is not None and value not in SCHEMES:
        raise PassError(f"--quantize {value!r}: choose one of {', '.join(SCHEMES)}")
    return value


QUANTIZE_HELP = (
    "KV-cache decoders: every linear -> MatMulNBits int4/int8 (block 32), MoE experts "
    "QMoE/MatMulNBits; token agreement and logits cosine vs fp32 reported."
)


def quantize_option(f):
    return click.option("--quantize", callback=quantize_scheme, metavar="int4|int8",
                        help=QUANTIZE_HELP)(f)  # fmt: skip


def check(p: Path, manifest: dict, scheme: str, experts, target: str, passes, max_error, plain):
    """--quantize applies to KV-cache decoder artifacts on ORT; -> (the max error lower_moe's
    quantized experts are held to (none given: unbounded; the token agreement is the measure),
    the experts' scheme: `scheme`, or None (fp32) when some layer's cannot be quantized)."""
    from ffnx.compress.quantize_weights import expert_misfits
    from ffnx.passes import registry

    if not p.is_dir() or "decoder" not in manifest:
        raise PassError(f"--quantize needs a KV-cache decoder artifact (ffnx export hf:DIR), not "
                        f"{p}; for MoE experts alone use --quantize-experts")  # fmt: skip
    if experts and experts != scheme:
        raise click.UsageError(f"--quantize {scheme} and --quantize-experts {experts} disagree")
    if target != "ort":
        raise click.UsageError("--quantize makes com.microsoft::MatMulNBits: --target ort only")
    approx = [q.name for q in registry() if not q.exact and q.name in (passes or [])]
    if approx and max_error is None:
        raise click.UsageError(f"--passes {','.join(approx)} is approximate: give --max-error")
    bound = float("inf") if max_error is None else max_error
    return bound, (None if expert_misfits(plain) else scheme)


def fold_for_scheme(model, scheme: str, passes=None, skip=()):
    """`fold_head_products` judged at `scheme`'s stored bytes per weight: a per-head product
    that stays fp32 (MLA's W_uk, W_uv) folds into its linear where the quantized linear then
    stores less -> (model, the pass report; None when --passes / --skip leave the pass out)."""
    from ffnx.graph import verify
    from ffnx.lowering.quantize import stored_bytes_per_weight
    from ffnx.passes import PassContext
    from ffnx.passes.optimize import apply_pass, select_passes

    chosen = [p for p in select_passes(passes, skip or ()) if p.name == "fold_head_products"]
    if not chosen:
        return model, None
    ctx = PassContext(options={"bytes_per_weight": stored_bytes_per_weight(scheme)})
    return apply_pass(chosen[0], model, ctx, [], verify.Tolerance())


def quantized_linears(model, scheme: str, passes=None, skip=()):
    """The graph as `--quantize` runs it: `fold_for_scheme`, then every linear quantized."""
    from ffnx.compress.quantize_weights import quantize_linears

    return quantize_linears(fold_for_scheme(model, scheme, passes, skip)[0], scheme)[0]


def quantize_lowered(plain, lowered, manifest: dict, scheme: str, passes=None, skip=()):
    """`quantize_decoder` of the lowered graph after `fold_for_scheme` -> (model, report with
    the fold's `head_products`: sites folded and why the others were not)."""
    from ffnx.compress.quantize_weights import quantize_decoder

    lowered, fold = fold_for_scheme(lowered, scheme, passes, skip)
    model, report = quantize_decoder(plain, lowered, manifest, scheme)
    if fold is not None:
        report["head_products"] = {"folded": fold["applied"], "skipped": fold["skipped"]}
    return model, report


def quantize_artifact(directory, scheme: str, passes=None, skip=(), step=lambda s: None) -> dict:
    """`ffnx export --quantize`: the just-exported fp32 artifact -> int4/int8 in place. Dense
    decoders quantize model.opt.onnx; MoE ones rerun the passes from model.onnx with quantized
    expert lowerings, under the speed guard timing every graph with its linears quantized too
    (`quantized_guard`). Returns the `quantize` report (also written to the manifest)."""
    from ffnx import artifact
    from ffnx.commands.inspect import load_onnx
    from ffnx.graph.model_io import save_model

    directory = Path(directory)
    manifest = artifact.read_manifest(directory)
    plain = load_onnx(directory / artifact.MODEL)
    _, experts = check(directory, manifest, scheme, None, "ort", passes, None, plain)
    if experts:
        lowered, manifest["passes"], guard = quantized_guard(
            plain, manifest, experts, passes, skip, step
        )
        manifest.pop("speed_guard", None)  # the fp32 guard's, not this graph's
        if guard is not None:
            manifest["speed_guard"] = guard
    else:
        lowered = load_onnx(directory / artifact.MODEL_OPT)
    step(f"quantizing linears to {scheme}, measuring token agreement")
    new, manifest["quantize"] = quantize_lowered(plain, lowered, manifest, scheme, passes, skip)
    save_model(new, directory / artifact.MODEL_OPT)
    artifact.write_manifest(directory, manifest, {artifact.MODEL_OPT: [artifact.MODEL]})
    return manifest["quantize"]


def quantized_guard(plain, manifest: dict, experts: str, passes=None, skip=(), step=None):
    """The passes from the fp32 export with `experts` lowerings (QMoE / MatMulNBits experts) ->
    (graph, pass reports, guard report or None). Without explicit --passes and with the guard
    on, `speed_guard` times each candidate at decode steps with its linears quantized as
    `quantize_decoder` will quantize them (`prepare`), so a pass is judged on the graph that
    runs; the decision is cached under the scheme's name."""
    from ffnx.commands.feeds import random_feeds
    from ffnx.passes import speed_guard
    from ffnx.passes.optimize import manifest_options, optimize_model

    feeds = random_feeds(plain, manifest, {}, samples=2)
    kw = dict(passes=passes, skip=skip or [], max_error=float("inf"), step=step or (lambda s: None),
              options={"quantize_experts": experts, **manifest_options(manifest)})  # fmt: skip
    if passes or not speed_guard.enabled():
        return (*optimize_model(plain, feeds, **kw), None)
    total = (manifest.get("dims", {}).get("total") or {}).get("max")
    make = lambda dims: random_feeds(plain, manifest, dims, 1)  # noqa: E731
    return speed_guard.optimize_guarded(
        plain, feeds, timing_sets=speed_guard.decode_step_sets(make, total),
        prepare=partial(quantized_linears, scheme=experts, passes=passes, skip=skip or ()),
        variant=experts, **kw,
    )  # fmt: skip
