"""FfnxMoE lowerings on ONNX Runtime (CPU) against torch eager and the plain dynamo export.

    python benchmarks/moe.py [--size tiny|zoo|base] [--tokens 1 16 256] [--threads 2]
                             [--rounds 11] [--json out.json]

The layer is the zoo's MoE layer (`ffnx.models.moe.TopKMoE`, HF-Mixtral-style expert loop:
softmax, top-2 of 8, renormalised, SwiGLU experts), at `tiny` (the zoo's tiny gpt-moe layer),
`zoo` (the zoo's base gpt-moe layer) or `base` (Mixtral proportions scaled to fit RAM: D=1024,
H=2816, E=8, k=2; 277 MB of fp32 experts). Per T, every entry is timed round-robin in one
process (`ffnx.lowering.timing.round_robin`), ORT sessions with
`--threads` intra-op threads and no spinning, torch with as many threads; the fastest round
counts (other processes' load only adds time; medians are in the JSON):

  torch            the layer in eager torch (inference_mode)
  dynamo           torch.onnx.export(dynamo=True) of the layer: the per-expert NonZero/Gather/
                   ScatterND graph torch produces
  sorted, gather, dense, ort_moe   the ffnx lowerings (gather skipped where its per-call weight
                   copy exceeds 1 GB)
  default          what the `lower_moe` pass chooses for this layer (its cached measurement)
  *_int4, *_int8   weight-only quantized experts (MatMulNBits / QMoE, int8 activations)
  gemv_roofline    (T=1) ORT MatMul [1, D] x [D, N] fp32 with a >= 64 MB weight
  expert_gemvs     (T=1) all E experts' fc1 and fc2 as 2E GEMVs in a row (no routing, no
                   copies): the bandwidth ORT reaches on matrices of the experts' sizes, the
                   bound for any lowering that reads each active expert's own weights

Reported: ms per call, ratio to the fastest fp32 entry, error against torch (max abs, cosine),
at T=1 the achieved weight bandwidth (k active experts' fp32 weight bytes / latency) against the
roofline and against expert_gemvs, and the quantized entries' speed-up over the fastest fp32
lowering.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffnx.lowering import lowering_report  # noqa: E402
from ffnx.lowering.choose import choose, cpu_name  # noqa: E402
from ffnx.lowering.moe_common import MoESite  # noqa: E402
from ffnx.lowering.moe_model import MoEConfig, moe_model  # noqa: E402
from ffnx.lowering.quantize import error_metrics  # noqa: E402
from ffnx.lowering.timing import (  # noqa: E402
    _turns,
    best,
    lowered_model,
    ort_session,
    round_robin,
    stable,
)
from ffnx.models.moe import TopKMoE  # noqa: E402

SIZES = {"tiny": (64, 128, 8, 2), "zoo": (512, 1024, 8, 2), "base": (1024, 2816, 8, 2)}
FP32 = ("sorted", "per_expert", "gather", "dense", "ort_moe")
QUANT = ("sorted_int4", "qmoe_int4", "sorted_int8", "qmoe_int8")
GATHER_LIMIT = 1 << 30
INPUTS = 4


def layer(size: str, seed: int = 0) -> tuple[TopKMoE, MoEConfig, dict[str, np.ndarray]]:
    D, H, E, k = SIZES[size]
    torch.manual_seed(seed)
    mod = TopKMoE(D, H, E, top_k=k, normalize=True).eval()
    with torch.no_grad():  # router logits of O(1) so that routing is not degenerate
        mod.router.weight.normal_(0, 1 / np.sqrt(D))
    ex = mod.experts
    weights = {
        "fc1_weight": torch.stack([torch.cat([e.gate.weight, e.up.weight]) for e in ex]),
        "fc2_weight": torch.stack([e.down.weight for e in ex]),
        "router_weight": mod.router.weight,
    }
    weights = {n: w.detach().numpy().astype(np.float32) for n, w in weights.items()}
    return mod, MoEConfig(D=D, H=H, E=E, k=k, normalize=1), weights


def dynamo_model(mod: torch.nn.Module, D: int) -> onnx.ModelProto:
    x = torch.randn(4, D)
    prog = torch.onnx.export(
        mod, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("T")},), verbose=False
    )
    return prog.model_proto


def roofline(D: int, threads: int):
    """A session computing x [1, D] @ W [D, N] with W >= 64 MB, and W's bytes."""
    from onnx import TensorProto, helper, numpy_helper

    N = max(1, (64 << 20) // (4 * D) + 1)
    w = np.random.default_rng(0).standard_normal((D, N), dtype=np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    return ort_session(model, threads), w.nbytes


def expert_gemvs(cfg: MoEConfig, weights: dict, threads: int):
    """A session computing x [1, D] @ fc1_e.T and h [1, H] @ fc2_e.T for every expert e in turn
    (2E MatMul nodes on the layer's own weights), and those weights' bytes."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outs = [], [], []
    for e in range(cfg.E):
        for fc, x in (("fc1", "x"), ("fc2", "h")):
            w = np.ascontiguousarray(weights[f"{fc}_weight"][e].T)
            inits.append(numpy_helper.from_array(w, f"{fc}_{e}"))
            nodes.append(helper.make_node("MatMul", [x, f"{fc}_{e}"], [f"{fc}_y{e}"]))
            outs.append(helper.make_tensor_value_info(f"{fc}_y{e}", TensorProto.FLOAT, None))
    ins = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cfg.D]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, cfg.H]),
    ]
    g = helper.make_graph(nodes, "expert_gemvs", ins, outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    return ort_session(model, threads), cfg.E * 4 * (cfg.H1 * cfg.D + cfg.D * cfg.H)


def default_lowering(model: onnx.ModelProto, threads: int):
    """The `lower_moe` pass's choice for the model's first FfnxMoE layer."""
    import onnx_graphsurgeon as gs

    node = next(n for n in gs.import_onnx(model).nodes if n.op == "FfnxMoE")
    return choose(MoESite.of(node), {"threads": threads})


def bench(args) -> dict:
    torch.set_num_threads(args.threads)
    mod, cfg, weights = layer(args.size)
    expert_bytes = 4 * (cfg.H1 * cfg.D + cfg.D * cfg.H)
    t0 = time.time()
    ffnx_model = moe_model(cfg, weights)
    choice = default_lowering(ffnx_model, args.threads)
    default, why = choice.lowering, choice.why
    print(f"default lowering: {default}  ({time.time() - t0:.0f} s to choose)", flush=True)
    models = {"dynamo": dynamo_model(mod, cfg.D)}
    names = list(FP32) + ([] if default in FP32 else ["default"]) + list(QUANT)
    for name in names:
        models[name] = (
            lowered_model(ffnx_model, default, why)
            if name == "default"
            else lowered_model(ffnx_model, name)
        )
    sessions = {n: ort_session(m, args.threads) for n, m in models.items()}
    gemv, gemv_bytes = roofline(cfg.D, args.threads)
    chain, chain_bytes = expert_gemvs(cfg, weights, args.threads)
    out = {
        "size": args.size,
        "config": cfg.signature(),
        "threads": args.threads,
        "default": default,
        "default_why": why,
        "chooser_timings_ms": {
            T: {c: v * 1e3 for c, v in d.items()} for T, d in (choice.timings or {}).items()
        },
        "default_report": lowering_report(models["default" if "default" in models else default]),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
        },
        "expert_bytes": expert_bytes,
        "tokens": {},
    }
    for T in args.tokens:
        # Successive calls take turns over INPUTS token batches: at T=1 they route to different
        # experts, so no call finds its experts' weights still in the cache from the previous one.
        gen = torch.Generator().manual_seed(T)
        xs = [torch.randn(T, cfg.D, generator=gen) for _ in range(INPUTS)]
        feeds = {"hidden": xs[0].numpy()}
        with torch.inference_mode():
            ref = mod(xs[0]).numpy()
        runs = {"torch": _turns(xs, lambda x: _torch_call(mod, x))}
        for n, s in sessions.items():
            if n == "gather" and T * cfg.k * expert_bytes > GATHER_LIMIT:
                continue
            name = s.get_inputs()[0].name
            runs[n] = _turns([{name: x.numpy()} for x in xs], lambda f, s=s: s.run(None, f))
        if T == 1:
            xg = np.ones((1, cfg.D), np.float32)
            runs["gemv_roofline"] = lambda xg=xg: gemv.run(None, {"x": xg})
            hg = {"x": xg, "h": np.ones((1, cfg.H), np.float32)}
            runs["expert_gemvs"] = lambda hg=hg: chain.run(None, hg)
        samples = round_robin(runs, rounds=args.rounds, max_rounds=3 * args.rounds)
        times = best(samples)
        errors = {
            n: error_metrics(
                ref, sessions[n].run(None, {sessions[n].get_inputs()[0].name: feeds["hidden"]})[0]
            )
            for n in runs
            if n in sessions
        }
        out["tokens"][T] = _summarise(
            T, cfg, times, errors, default, expert_bytes, gemv_bytes, chain_bytes
        )
        out["tokens"][T]["median_ms"] = {n: float(np.median(v)) * 1e3 for n, v in samples.items()}
        out["tokens"][T]["stable"] = stable(samples)
        print(f"T={T} done", flush=True)
    return out


def bench_model(args) -> dict:
    """The zoo's gpt-moe model (tiny for --size tiny, else base): torch eager, the plain dynamo
    export, and the ffnx export (captured FfnxMoE nodes) with every layer lowered alike."""
    import tempfile

    import onnx_graphsurgeon as gs

    from ffnx.export.capture import captured
    from ffnx.export.torch_export import export_onnx
    from ffnx.models import zoo

    spec = zoo.build("gpt-moe", "tiny" if args.size == "tiny" else "base")
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(spec, Path(tmp) / "plain.onnx")
        with captured(spec.module, "ort"):
            export_onnx(spec, Path(tmp) / "ffnx.onnx")
        plain, ffnx_model = (onnx.load(str(Path(tmp) / f"{n}.onnx")) for n in ("plain", "ffnx"))
    node = next(n for n in gs.import_onnx(ffnx_model).nodes if n.op == "FfnxMoE")
    default = choose(MoESite.of(node), {"threads": args.threads}).lowering
    models = {"dynamo": plain, **{n: lowered_model(ffnx_model, n) for n in FP32 if n != "gather"}}
    if default not in models:
        models["default"] = lowered_model(ffnx_model, default)
    sessions = {n: ort_session(m, args.threads) for n, m in models.items()}
    max_seq = spec.max_dims.get("seq", 128)
    out = {
        "model": f"gpt-moe ({'tiny' if args.size == 'tiny' else 'base'})",
        "default": default,
        "tokens": {},
    }
    for T in args.tokens:
        seq = min(T, max_seq)
        feeds = {k: v.numpy() for k, v in spec.make_inputs({"batch": T // seq, "seq": seq}).items()}
        inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
        runs = {"torch": lambda inputs=inputs: _torch_call(spec.module, **inputs)}
        runs.update({n: (lambda s=s, f=feeds: s.run(None, f)) for n, s in sessions.items()})
        samples = round_robin(runs, rounds=args.rounds, max_rounds=3 * args.rounds)
        times = best(samples)
        dflt = times.get("default", times.get(default))
        out["tokens"][T] = {
            "ms": {n: t * 1e3 for n, t in times.items()},
            "default_vs_fastest": dflt / min(times.values()),
            "stable": stable(samples),
        }
        print(f"model T={T} done", flush=True)
    return out


def _torch_call(mod, *args, **kwargs):
    with torch.inference_mode():
        return mod(*args, **kwargs)


BOUNDS = ("gemv_roofline", "expert_gemvs")  # reference GEMVs, not lowerings


def _summarise(T, cfg, times, errors, default, expert_bytes, gemv_bytes, chain_bytes) -> dict:
    fp32 = {n: t for n, t in times.items() if n not in QUANT and n not in BOUNDS}
    fastest = min(fp32, key=fp32.get)
    dflt = times.get("default", times.get(default))
    rows = {
        n: {"ms": t * 1e3, "vs_fastest": t / fp32[fastest], **errors.get(n, {})}
        for n, t in times.items()
        if n not in BOUNDS
    }
    res = {"ms": rows, "fastest": fastest, "default_vs_fastest": dflt / fp32[fastest]}
    best_lowering = min((t, n) for n, t in times.items() if n in FP32 or n == "default")
    res["quant_speedup"] = {n: best_lowering[0] / times[n] for n in QUANT if n in times}
    if T == 1:
        roof = gemv_bytes / times["gemv_roofline"]
        active = cfg.k * expert_bytes
        res["roofline_GBps"] = roof / 1e9
        res["bandwidth_GBps"] = {n: active / times[n] / 1e9 for n in fp32}
        res["default_of_roofline"] = active / dflt / roof
        res["expert_gemvs_GBps"] = chain_bytes / times["expert_gemvs"] / 1e9
        res["default_of_expert_gemvs"] = active / dflt / (chain_bytes / times["expert_gemvs"])
    return res


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    cfg = res["config"]
    con.print(
        f"[bold]MoE layer[/] D={cfg['D']} H={cfg['H']} E={cfg['E']} k={cfg['k']} "
        f"{cfg['activation']}, {res['threads']} threads, {res['machine']['cpu']}; "
        f"default = [bold]{res['default']}[/]"
    )
    for T, r in res["tokens"].items():
        t = Table(title=f"T = {T}")
        for col in ("entry", "ms", "x fastest", "max abs", "cosine", "GB/s"):
            t.add_column(col, justify="left" if col == "entry" else "right")
        for name, row in sorted(r["ms"].items(), key=lambda kv: kv[1]["ms"]):
            bw = r.get("bandwidth_GBps", {}).get(name)
            mark = " (default)" if name == "default" or name == res["default"] else ""
            t.add_row(
                name + mark,
                f"{row['ms']:.3f}",
                f"{row['vs_fastest']:.2f}",
                f"{row['max_abs']:.2e}" if "max_abs" in row else "-",
                f"{row['cosine']:.6f}" if "cosine" in row else "-",
                f"{bw:.1f}" if bw else "-",
            )
        con.print(t)
        line = f"default / fastest = {r['default_vs_fastest']:.2f}"
        if "roofline_GBps" in r:
            line += (
                f"; GEMV roofline {r['roofline_GBps']:.1f} GB/s, default reaches "
                f"{r['default_of_roofline']:.0%}; the experts' own GEMVs in a row stream "
                f"{r['expert_gemvs_GBps']:.1f} GB/s, default reaches "
                f"{r['default_of_expert_gemvs']:.0%}"
            )
        qs = ", ".join(f"{n} {v:.2f}x" for n, v in r["quant_speedup"].items())
        con.print(line + f"\nquantized speed-up over the fastest fp32 lowering: {qs}\n")
    if "whole_model" in res:
        m = res["whole_model"]
        t = Table(title=f"whole model: {m['model']}, default = {m['default']} (ms)")
        names = sorted(next(iter(m["tokens"].values()))["ms"])
        for col in ("T", *names, "default / fastest"):
            t.add_column(col, justify="right")
        for T, r in m["tokens"].items():
            t.add_row(
                str(T), *(f"{r['ms'][n]:.3f}" for n in names), f"{r['default_vs_fastest']:.2f}"
            )
        con.print(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--json", type=Path)
    p.add_argument("--model", action="store_true", help="also time the whole zoo gpt-moe model")
    args = p.parse_args(argv)
    res = bench(args)
    if args.model:
        res["whole_model"] = bench_model(args)
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
