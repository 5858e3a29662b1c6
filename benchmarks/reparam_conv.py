"""Multi-branch conv nets (zoo `repvgg`, `mobileone`): plain export vs ffnx vs torch-side
reparameterization, on ONNX Runtime CPU.

Three graphs of the same network, same inputs, same thread count:
- export: `torch.onnx.export(dynamo=True)` of the training-form module (branches summed);
- ffnx: that graph after ffnx's default exact passes (merge_conv_branches among them);
- torch-reparam: `module.reparameterize()` (every block merged into one Conv in torch), exported.
Timed round-robin with `ffnx.lowering.timing.round_robin` (fastest round counts), so
load from other processes slows every variant alike. Outputs checked against the export's.

    python benchmarks/reparam_conv.py [--size tiny|base] [--batch 1 8] [--threads 2]
                                      [--models repvgg mobileone] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

VARIANTS = ("export", "ffnx", "torch-reparam")


def graphs(name: str, size: str, tmp: Path) -> tuple[dict[str, onnx.ModelProto], object]:
    from ffnx.export.pipeline import sample_feeds
    from ffnx.export.torch_export import export_onnx
    from ffnx.models import zoo
    from ffnx.passes.optimize import optimize_model

    spec = zoo.build(name, size)
    plain = onnx.load(str(export_onnx(spec, tmp / f"{name}.onnx")))
    opt, _ = optimize_model(plain, sample_feeds(spec))
    rspec = copy.copy(spec)
    rspec.module = copy.deepcopy(spec.module).reparameterize()
    rep = onnx.load(str(export_onnx(rspec, tmp / f"{name}.rep.onnx")))
    return {"export": plain, "ffnx": opt, "torch-reparam": rep}, spec


def bench(name: str, args) -> list[dict]:
    from ffnx.graph.ort import ort_session
    from ffnx.lowering.timing import best, round_robin

    with tempfile.TemporaryDirectory() as d:
        models, spec = graphs(name, args.size, Path(d))
    sessions = {k: ort_session(m, args.threads) for k, m in models.items()}
    rows = []
    for b in args.batch:
        x = spec.make_inputs({"batch": b})["pixels"].numpy()
        feeds = {"pixels": x}
        outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
        diff = {k: float(np.abs(o - outs["export"]).max()) for k, o in outs.items()}
        runs = {k: (lambda s=s, f=feeds: s.run(None, f)) for k, s in sessions.items()}
        t = best(round_robin(runs, rounds=args.rounds))
        rows.append({"model": name, "size": args.size, "batch": b, "threads": args.threads,
                     "ms": {k: 1e3 * v for k, v in t.items()},
                     "speedup": {k: t["export"] / v for k, v in t.items()},
                     "max_abs_diff": diff, "nodes": {k: len(m.graph.node)
                                                     for k, m in models.items()}})  # fmt: skip
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "base"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--models", nargs="+", default=["repvgg", "mobileone"])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for name in args.models for r in bench(name, args)]
    print(f"{'model':<10} {'batch':>5} " + " ".join(f"{v:>22}" for v in VARIANTS))
    for r in rows:
        cells = [f"{r['ms'][v]:8.3f} ms {r['speedup'][v]:5.2f}x" for v in VARIANTS]
        print(f"{r['model']:<10} {r['batch']:>5} " + " ".join(f"{c:>22}" for c in cells))
    if args.json:
        from ffnx import artifact

        artifact.write_json_atomic(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
