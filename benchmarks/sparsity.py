"""Batch-1 latency of activation-sparse FFNs on ONNX Runtime CPU versus the dense FFN.

For D=1024, H=4096, a non-gated ReLU FFN and a gated SwiGLU FFN (dense gate), one model per
formulation: the dense FFN (MatMul, act, MatMul: what the exporter emits) and each
`ffnx.lowering.sparse` form of FfnxSparseFFN (dense-masked, gather, compress). Each model
holds --layers independent FFNs on the same input, summed, so the weights do not stay in the
last-level cache between calls (as in a real model); times are per FFN. The per-channel
thresholds are a graph input, set per sparsity level to calibration quantiles of |a| on random
tokens, so one session per form serves every level. All sessions are timed round-robin (each
round runs every (form, level) once for --iters calls), and the median over rounds is reported,
because other processes share the cores.

    python benchmarks/sparsity.py --json out.json --plot out.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder
from ffnx.graph.ort import ort_session as session
from ffnx.lowering.sparse import FORMS, act_numpy, activation, sparse_ffn_node
from ffnx.lowering.sparse import lower_sparse_ffn_nodes as lower

LEVELS = (0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95)
KINDS = {"relu": "non-gated ReLU", "swiglu": "gated SwiGLU (dense gate)"}


def weights(D: int, H: int, act: str, rng) -> dict[str, np.ndarray]:
    """nn.Linear-like init (uniform, fan-in scaled)."""

    def lin(o, i):
        return rng.uniform(-(i**-0.5), i**-0.5, (o, i)).astype(np.float32)

    w = {"w_up": lin(H, D), "w_down": lin(D, H)}
    if act == "swiglu":
        w["w_gate"] = lin(H, D)
    else:
        w["b_up"] = rng.uniform(-(D**-0.5), D**-0.5, H).astype(np.float32)
    return w


def _model(graph: gs.Graph) -> onnx.ModelProto:
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = 9  # readable by older ORT releases too
    del model.opset_import[:]
    model.opset_import.extend(
        [onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("ffnx", 1)]
    )
    return model


def dense_model(layers: list[dict], act: str, D: int) -> onnx.ModelProto:
    """sum_l FFN_l(x), each FFN as the exporter writes it (MatMul on [in, out] weights)."""
    graph = gs.Graph(opset=18)
    x = gs.Variable("hidden", np.float32, ["T", D])
    b = Builder(graph, "dense")
    ys = []
    for w in layers:
        if act == "swiglu":
            a = activation(b, b.matmul(x, b.const(w["w_gate"].T.copy())), act)
            h = b.mul(a, b.matmul(x, b.const(w["w_up"].T.copy())))
        else:
            h = activation(b, b.add(b.matmul(x, b.const(w["w_up"].T.copy())), w["b_up"]), act)
        ys.append(b.matmul(h, b.const(w["w_down"].T.copy())))
    y = b.op("Sum", *ys)
    y.dtype, y.shape = np.float32, ["T", D]
    graph.inputs, graph.outputs = [x], [y]
    return _model(graph)


def sparse_model(layers: list[dict], act: str, D: int, H: int, form: str) -> onnx.ModelProto:
    """sum_l FfnxSparseFFN_l(x) with thresholds_l as graph inputs, lowered to `form`."""
    graph = gs.Graph(opset=18)
    x = gs.Variable("hidden", np.float32, ["T", D])
    thrs, ys = [], []
    for i, w in enumerate(layers):
        thr = gs.Variable(f"thr{i}", np.float32, [H])
        y = gs.Variable(f"y{i}", np.float32, ["T", D])
        w = {**w, "thresholds": thr}
        graph.nodes.append(sparse_ffn_node(x, y, w, f"ffn{i}", activation=act, mode="threshold"))
        thrs.append(thr)
        ys.append(y)
    out = gs.Variable("output", np.float32, ["T", D])
    graph.nodes.append(gs.Node("Sum", "sum", inputs=ys, outputs=[out]))
    graph.inputs, graph.outputs = [x, *thrs], [out]
    return lower(_model(graph), form)


def thresholds(w: dict, act: str, levels, rng, tokens: int = 512) -> dict[float, np.ndarray]:
    """Per-channel quantiles of |a| on random tokens: threshold for each sparsity level."""
    x = rng.standard_normal((tokens, w["w_up"].shape[1]))
    pre = x @ (w["w_gate"] if act == "swiglu" else w["w_up"]).T + w.get("b_up", 0.0)
    mag = np.abs(act_numpy(pre, act))
    return {s: np.quantile(mag, s, axis=0).astype(np.float32) for s in levels}


def bench_kind(act: str, args, rng) -> dict:
    D, H, L = args.dim, args.hidden, args.layers
    layers = [weights(D, H, act, rng) for _ in range(L)]
    thr = [thresholds(w, act, args.levels, rng) for w in layers]
    # Two dense sessions, created first and last: where a session's weights land in memory
    # (e.g. huge pages or not) moves its streaming speed by ~15%, so the dense reference is
    # the pooled median of both, and each is reported.
    dense = dense_model(layers, act, D)
    sessions = {"dense_first": session(dense, args.threads)}
    for form in FORMS:
        sessions[form] = session(sparse_model(layers, act, D, H, form), args.threads)
    sessions["dense_last"] = session(dense, args.threads)
    xs = rng.standard_normal((args.rounds, args.batch, D)).astype(np.float32)
    jobs = [("dense_first", None), ("dense_last", None)]
    jobs += [(f, s) for f in FORMS for s in args.levels]
    times: dict = {j: [] for j in jobs}
    kept: dict = {s: [] for s in args.levels}
    for r in range(args.rounds):
        for form, s in jobs:
            feeds = {"hidden": xs[r]}
            if s is not None:
                feeds.update({f"thr{i}": t[s] for i, t in enumerate(thr)})
            sess = sessions[form]
            sess.run(None, feeds)  # warm this (form, level) after the others evicted it
            t0 = time.perf_counter()
            for _ in range(args.iters):
                sess.run(None, feeds)
            times[(form, s)].append((time.perf_counter() - t0) / args.iters / L)
    for s in args.levels:  # achieved sparsity of the union of kept channels (what is read)
        for r in range(args.rounds):
            w, t = layers[0], thr[0][s]
            pre = xs[r] @ (w["w_gate"] if act == "swiglu" else w["w_up"]).T + w.get("b_up", 0.0)
            kept[s].append(float((np.abs(act_numpy(pre, act)) > t).any(0).mean()))
    first, last = times[("dense_first", None)], times[("dense_last", None)]
    dense_us = float(np.median(first + last) * 1e6)
    rows = []
    for s in args.levels:
        row = {"sparsity": s, "union_kept": float(np.mean(kept[s])), "dense_ffn_us": dense_us}
        row["dense_first_us"] = float(np.median(first) * 1e6)
        row["dense_last_us"] = float(np.median(last) * 1e6)
        for f in FORMS:
            us = float(np.median(times[(f, s)]) * 1e6)
            row[f"{f}_us"] = us
            row[f"{f}_speedup"] = dense_us / us
        rows.append(row)
    return {"kind": KINDS[act], "activation": act, "rows": rows}


def print_table(res: dict) -> None:
    r0 = res["rows"][0]
    print(
        f"\n{res['kind']}: dense FFN {r0['dense_ffn_us']:.0f} us per FFN (session created "
        f"first {r0['dense_first_us']:.0f}, last {r0['dense_last_us']:.0f})"
    )
    print(f"{'sparsity':>8} {'kept':>6} " + " ".join(f"{f + ' us (x)':>18}" for f in FORMS))
    for r in res["rows"]:
        cells = " ".join(f"{r[f + '_us']:>10.0f} ({r[f + '_speedup']:.2f}x)" for f in FORMS)
        print(f"{r['sparsity']:>8.2f} {r['union_kept']:>6.3f} {cells}")


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        s = [r["sparsity"] * 100 for r in res["rows"]]
        ax.axhline(res["rows"][0]["dense_ffn_us"], color="k", ls="--", label="dense FFN")
        for f in FORMS:
            ax.plot(s, [r[f"{f}_us"] for r in res["rows"]], marker="o", label=f"sparse: {f}")
        ax.set_title(res["kind"])
        ax.set_xlabel("activation sparsity (%)")
        ax.set_ylabel("latency per FFN (us)")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2, help="FFNs per model (beat the LLC)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--kinds", default="relu,swiglu")
    ap.add_argument("--levels", default=",".join(str(s) for s in LEVELS))
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a latency-vs-sparsity plot (png) here")
    args = ap.parse_args()
    args.levels = [float(s) for s in args.levels.split(",")]
    rng = np.random.default_rng(0)
    import onnxruntime as ort

    meta = {
        "D": args.dim,
        "H": args.hidden,
        "batch": args.batch,
        "layers": args.layers,
        "threads": args.threads,
        "rounds": args.rounds,
        "iters": args.iters,
        "onnxruntime": ort.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    results = [bench_kind(act, args, rng) for act in args.kinds.split(",")]
    for res in results:
        print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    if args.plot:
        title = (
            f"FfnxSparseFFN on ORT {ort.__version__} CPU, D={args.dim} H={args.hidden}, "
            f"batch {args.batch}, {args.threads} thread(s)"
        )
        plot(results, args.plot, title)


if __name__ == "__main__":
    main()
