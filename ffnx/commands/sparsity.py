"""`ffnx calibrate` and `ffnx moefy`: FFN activation statistics and MoEfication of an artifact."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ffnx.commands import grammar, ui
from ffnx.commands.feeds import sample_feeds


def _common(f):
    for opt in (
        grammar.json_option(),
        grammar.force_option(),
        grammar.dims_option(),
        grammar.data_option(),
    ):
        f = opt(f)
    return f


def _random_only(ctx: click.Context) -> None:
    if ctx.params.get("data"):
        grammar.unused(ctx, "without --data (random inputs)", "samples", "dims")


@click.command("calibrate", context_settings={"max_content_width": 100})
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@_common
@click.option("--samples", type=int, default=8, show_default=True, help="Random samples.")
@click.option(
    "--max-tokens", type=int, default=4096, show_default=True, help="Tokens kept per layer."
)
@click.pass_context
def calibrate_cmd(ctx, directory, data, dims, as_json, force, samples, max_tokens) -> None:
    """Record each FFN's activation statistics per hidden channel (|a| quantiles, mean, and a
    sample of FFN inputs) for `sparsify_ffn` and `ffnx moefy`.

    Runs the artifact's model (model.opt.onnx when present) on ONNX Runtime and writes
    DIRECTORY/calibration.npz plus a `calibration` entry in the manifest (--force replaces an
    existing calibration).

    \b
    Example:
      ffnx export gpt-relu -o artifacts/gpt-relu --no-optimize
      ffnx calibrate artifacts/gpt-relu --samples 16 --dims batch=4,seq=32
      ffnx calibrate artifacts/gpt-relu --data calib.npz --force --json
    """
    from ffnx import artifact
    from ffnx.commands.inspect import load_onnx
    from ffnx.compress.calibrate import FILE, calibrate_model

    _random_only(ctx)
    d = Path(directory)
    manifest = artifact.read_manifest(d)
    grammar.refuse_existing([d / FILE], force, "from an earlier `ffnx calibrate`")
    src = artifact.model_path(d, manifest)
    model = load_onnx(src)
    feeds, source = sample_feeds(data, model, manifest, dims, samples)
    with ui.steps("calibrating") as step:
        step(f"running {src.name} on {len(feeds)} sample(s) with FFN activations exposed")
        calib = calibrate_model(model, feeds, max_tokens=max_tokens)
    artifact.write_bytes_atomic(d / FILE, calib.to_bytes())
    manifest["calibration"] = {
        "file": FILE,
        "model": src.name,
        "model_sha256": artifact.sha256(src),
        "source": source,
        **calib.meta(),
    }
    artifact.write_manifest(d, manifest)
    ui.err.print(f"wrote {d / FILE} and the manifest")
    if as_json:
        grammar.echo_json(manifest["calibration"])
        return
    rows = []
    for s in calib.layers:
        rows.append(
            [s.tensor, s.activation + (" (gated)" if s.gated else ""), s.D, s.H,
             f"{s.near_zero:.1%}", float(s.mean_abs.mean()),
             float(np.median(s.threshold(0.5))), float(np.median(s.threshold(0.9)))]
        )  # fmt: skip
    cols = ["FFN activation", "act", "D", "H", "|a|≈0", "mean |a|", "t50 (median)", "t90"]
    ui.out.print(ui.table(f"calibration: {calib.tokens:,} tokens ({source})", cols, rows))


@click.command("moefy", context_settings={"max_content_width": 100})
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--experts", type=int, required=True, help="Experts per FFN (divides H).")
@click.option("--top-k", type=int, required=True, help="Experts run per token.")
@click.option(
    "--router",
    type=click.Choice(["lstsq", "centroid"]),
    default="lstsq",
    show_default=True,
    help="lstsq: fit on calibration tokens; centroid: mean fc1 row per expert (data-free).",
)
@_common
@click.option("--samples", type=int, default=2, show_default=True, help="Random samples.")
@click.option("--max-error", type=float, help="Refuse above this max abs output error.")
@click.option("--seed", type=int, default=0, show_default=True, help="k-means seed.")
@click.pass_context
def moefy_cmd(
    ctx, directory, experts, top_k, router, data, dims, as_json, force, samples, max_error, seed
) -> None:
    """Turn each dense FFN into an FfnxMoE with the same parameters (MoEfication): hidden
    channels split into experts by co-activation clustering, a router fitted on the
    calibration tokens, top-k experts per token.

    Needs `ffnx calibrate DIRECTORY` first. Writes model.opt.onnx (--force when one exists) and
    a `moefy` entry in the manifest with the fraction of FFN parameters used per token and the
    output error against the dense model (on --data, else random inputs).

    \b
    Example:
      ffnx export gpt-relu -o artifacts/gpt-relu --no-optimize
      ffnx calibrate artifacts/gpt-relu --data calib.npz
      ffnx moefy artifacts/gpt-relu --experts 4 --top-k 2 --data calib.npz --max-error 5
    """
    from ffnx import artifact
    from ffnx.commands.inspect import load_onnx
    from ffnx.compress.calibrate import FILE, Calibration
    from ffnx.compress.moefy import moefy_model, output_error
    from ffnx.errors import ArtifactError, PassError
    from ffnx.graph.model_io import save_model

    _random_only(ctx)
    d = Path(directory)
    manifest = artifact.read_manifest(d)
    entry = manifest.get("calibration")
    if not entry or not (d / FILE).exists():
        raise ArtifactError(f"{d} has no calibration: run `ffnx calibrate {d}` first")
    src = d / entry["model"]
    if not src.exists() or artifact.sha256(src) != entry["model_sha256"]:
        raise ArtifactError(
            f"{src} changed since `ffnx calibrate` (moefy or optimize rewrote it): re-run "
            f"`ffnx optimize {d}` if needed, then `ffnx calibrate {d}`"
        )
    model = load_onnx(src)
    with ui.steps("moefying") as step:
        step(f"clustering {experts} experts per FFN and fitting {router} routers")
        new, report = moefy_model(model, Calibration.load(d / FILE), experts, top_k, router, seed)
        grammar.refuse_existing([d / artifact.MODEL_OPT], force, "moefy would replace it")
        feeds, source = sample_feeds(data, model, manifest, dims, samples)
        step(f"measuring the output error against the dense model ({source})")
        report["error"] = output_error(model, new, feeds)
    report.update(source=src.name, error_inputs=source)
    if not as_json:
        _print(report)
    err = report["error"]["max_abs"]
    if max_error is not None and err > max_error:
        raise PassError(f"moefy refused: max abs error {err:.3g} exceeds --max-error {max_error}")
    save_model(new, d / artifact.MODEL_OPT)
    manifest["moefy"] = report
    made = {artifact.MODEL_OPT: [artifact.MODEL, FILE]}  # a plan built before is now stale
    artifact.write_manifest(d, manifest, made)
    ui.err.print(f"wrote {d / artifact.MODEL_OPT} and the manifest")
    if as_json:
        grammar.echo_json(report)


def _print(report: dict) -> None:
    rows = [
        [r["ffn"], r["experts"], r["expert_width"], r["top_k"], r["router_recall"],
         r["output_norm_kept"]]
        for r in report["layers"]
    ]  # fmt: skip
    cols = ["FFN", "experts", "width", "top-k", "router recall", "output norm kept"]
    e = report["error"]
    ui.out.print(ui.table("moefy", cols, rows))
    ui.out.print(
        f"FFN parameters used per token: {report['ffn_params_used_per_token']:.1%}; output error "
        f"vs dense: max abs {e['max_abs']:.3g}, relative L2 {e['rel_l2']:.3g}, "
        f"cosine {e['cosine']:.5f}"
    )


COMMANDS = [calibrate_cmd, moefy_cmd]
