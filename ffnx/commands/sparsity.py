"""`ffnx calibrate` and `ffnx moefy`: FFN activation statistics and MoEfication of an artifact."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ffnx.commands import ui
from ffnx.commands.options import dims_option

DATA_HELP = "Inputs (.npz): arrays named like the model inputs, or name_0, name_1, … per sample."


def load_feeds(
    data: str | None, model, manifest: dict, dims: dict, samples: int
) -> tuple[list[dict[str, np.ndarray]], str]:
    """(feeds, where they came from): --data, else random inputs in the declared dims."""
    if data:
        from ffnx.commands.feeds import npz_feeds

        names = [i.name for i in model.graph.input]
        return npz_feeds(data, names, "--data"), f"data:{Path(data).name}"
    from ffnx.commands.feeds import random_feeds

    ui.err.print("[yellow]no --data given: using random inputs within the declared dims[/]")
    return random_feeds(model, manifest, dims, samples), "random"


def _common(f):
    f = click.option("--data", type=click.Path(exists=True, dir_okay=False), help=DATA_HELP)(f)
    f = click.option(
        "--dims", callback=dims_option, default=None, help="Dynamic dim sizes for random inputs."
    )(f)
    return f


@click.command("calibrate", context_settings={"max_content_width": 100})
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@_common
@click.option("--samples", type=int, default=8, show_default=True, help="Random samples.")
@click.option(
    "--max-tokens", type=int, default=4096, show_default=True, help="Tokens kept per layer."
)
def calibrate_cmd(directory, data, dims, samples, max_tokens) -> None:
    """Record each FFN's activation statistics per hidden channel (|a| quantiles, mean, and a
    sample of FFN inputs) for `sparsify_ffn` and `ffnx moefy`.

    Runs the artifact's model (model.opt.onnx when present) on ONNX Runtime and writes
    DIRECTORY/calibration.npz plus a `calibration` entry in the manifest.

    \b
    Example:
      ffnx calibrate artifacts/gpt-relu --data calib.npz
      ffnx calibrate artifacts/gpt-relu --samples 16 --dims batch=4,seq=128
    """
    from ffnx import artifact
    from ffnx.commands.inspect import load_onnx
    from ffnx.compress.calibrate import FILE, calibrate_model

    d = Path(directory)
    manifest = artifact.read_manifest(d)
    src = artifact.model_path(d, manifest)
    model = load_onnx(src)
    feeds, source = load_feeds(data, model, manifest, dims, samples)
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
    rows = []
    for s in calib.layers:
        rows.append(
            [s.tensor, s.activation + (" (gated)" if s.gated else ""), s.D, s.H,
             f"{s.near_zero:.1%}", float(s.mean_abs.mean()),
             float(np.median(s.threshold(0.5))), float(np.median(s.threshold(0.9)))]
        )  # fmt: skip
    cols = ["FFN activation", "act", "D", "H", "|a|≈0", "mean |a|", "t50 (median)", "t90"]
    ui.out.print(ui.table(f"calibration: {calib.tokens:,} tokens ({source})", cols, rows))
    ui.err.print(f"wrote {d / FILE} and the manifest")


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
def moefy_cmd(directory, experts, top_k, router, data, dims, samples, max_error, seed) -> None:
    """Turn each dense FFN into an FfnxMoE with the same parameters (MoEfication): hidden
    channels split into experts by co-activation clustering, a router fitted on the
    calibration tokens, top-k experts per token.

    Needs `ffnx calibrate DIRECTORY` first. Writes model.opt.onnx and a `moefy` entry in the
    manifest with the fraction of FFN parameters used per token and the output error against
    the dense model (on --data, else random inputs).

    \b
    Example:
      ffnx calibrate artifacts/gpt-relu --data calib.npz
      ffnx moefy artifacts/gpt-relu --experts 16 --top-k 4 --data calib.npz --max-error 0.5
    """
    from ffnx import artifact
    from ffnx.commands.inspect import load_onnx
    from ffnx.compress.calibrate import FILE, Calibration
    from ffnx.compress.moefy import moefy_model, output_error
    from ffnx.errors import ArtifactError, PassError

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
        feeds, source = load_feeds(data, model, manifest, dims, samples)
        step(f"measuring the output error against the dense model ({source})")
        report["error"] = output_error(model, new, feeds)
    report.update(source=src.name, error_inputs=source)
    _print(report)
    err = report["error"]["max_abs"]
    if max_error is not None and err > max_error:
        raise PassError(f"moefy refused: max abs error {err:.3g} exceeds --max-error {max_error}")
    artifact.write_bytes_atomic(d / artifact.MODEL_OPT, new.SerializeToString())
    manifest["moefy"] = report
    artifact.write_manifest(d, manifest)
    ui.err.print(f"wrote {d / artifact.MODEL_OPT} and the manifest")


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
