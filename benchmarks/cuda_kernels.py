"""Benchmark the ffnx CUDA kernels against torch baselines, with the device's own ceilings.

    python benchmarks/cuda_kernels.py [--json out.json] [--small]

MoE (Mixtral-like: D=4096, H=14336, E=8, k=2, fp16, SwiGLU; --small: D=2048, H=7168) at
T in {1, 16, 256, 4096}: ffnx kernels, a torch per-expert loop, a torch padded bmm over experts
(capacity = the busiest expert's count), and torch._grouped_mm when this torch has it. Sparse
FFN (gated SiLU, same D/H, threshold mode) at 0/50/80/90/95 % per-token sparsity against the
dense torch FFN at T=1 and T=16.

Ceilings measured in the same run: copy bandwidth (device-to-device copy of 1 GiB, bytes read +
written) and a dense cuBLAS GEMM with the MoE's FLOPs (x [T*k, D] @ [D, 2H], then @ [H, D]).
Small T reports bandwidth (bytes of the experts actually routed to, once) against the copy
bandwidth; large T reports TFLOP/s against that GEMM. Times are the median over repetitions of
CUDA-graph replays (10 calls per graph) measured with CUDA events; paths that cannot be captured
(the per-expert loop synchronises on the host) run eagerly and are marked so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ffnx.plugins import build  # noqa: E402
from tests.gpu import launchers  # noqa: E402

CALLS_PER_GRAPH, REPS = 10, 15


def timed(fn, reps=REPS, graph=True) -> tuple[float, str]:
    """Median milliseconds per call; ('graph' | 'eager')."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    run, mode, per = fn, "eager", 1
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
                for _ in range(CALLS_PER_GRAPH):
                    fn()
            torch.cuda.synchronize()
            run, mode, per = g.replay, "graph", CALLS_PER_GRAPH
            run()
        except Exception:  # not capturable (host syncs): time it eagerly
            torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / per)
    return statistics.median(times), mode


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy, bytes read + written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = timed(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


# ---- MoE ------------------------------------------------------------------------------------
def route(logits, k):
    w, idx = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return w, idx


def swiglu(h):
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def torch_loop(x, logits, w1, w2, k):
    w, idx = route(logits, k)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel():
            y = swiglu(x[tok] @ w1[e].T) @ w2[e].T
            out.index_add_(0, tok, y.float() * w[tok, slot, None])
    return out.to(x.dtype)


def sort_by_expert(idx, E):
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    return order, counts


def torch_bmm(x, logits, w1, w2, k):
    E = w1.shape[0]
    w, idx = route(logits, k)
    order, counts = sort_by_expert(idx, E)
    cap = int(counts.max())  # host sync: the capacity
    starts = torch.cumsum(counts, 0) - counts
    e_sorted = idx.flatten()[order]
    rank = torch.arange(order.numel(), device=x.device) - starts[e_sorted]
    xp = torch.zeros(E, cap, x.shape[1], dtype=x.dtype, device=x.device)
    xp[e_sorted, rank] = x[order // k]
    yp = torch.bmm(swiglu(torch.bmm(xp, w1.transpose(1, 2))), w2.transpose(1, 2))
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, order // k, yp[e_sorted, rank].float() * w.flatten()[order, None])
    return out.to(x.dtype)


def torch_grouped(x, logits, w1, w2, k):
    E = w1.shape[0]
    w, idx = route(logits, k)
    order, counts = sort_by_expert(idx, E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // k].to(w1.dtype)
    h = swiglu(torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs))
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, order // k, y.float() * w.flatten()[order, None])
    return out.to(x.dtype)


def bench_moe(lib, D, H, E, k, Ts, copy_gbs, only_ffnx=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    w1 = (torch.randn(E, 2 * H, D, device="cuda", generator=g) / D**0.5).half()
    w2 = (torch.randn(E, D, H, device="cuda", generator=g) / H**0.5).half()
    grouped_dtype = None
    if hasattr(torch, "_grouped_mm") and not only_ffnx:
        for dt in (torch.float16, torch.bfloat16):
            try:
                a = torch.randn(64, D, device="cuda", dtype=dt)
                b = torch.randn(2, 128, D, device="cuda", dtype=dt).transpose(1, 2)
                torch._grouped_mm(a, b, offs=torch.tensor([32, 64], device="cuda",
                                                          dtype=torch.int32))  # fmt: skip
                grouped_dtype = dt
                break
            except Exception as e:  # noqa: BLE001 - report why the baseline is absent
                print(f"torch._grouped_mm {dt}: {type(e).__name__}: {str(e)[:100]}")
    gw = None
    if grouped_dtype is torch.bfloat16:
        gw = (w1.bfloat16(), w2.bfloat16())
    return [
        r for T in Ts for r in moe_at(lib, T, w1, w2, k, gw, grouped_dtype, copy_gbs, g, only_ffnx)
    ]


def dense_gemm_ms(M, D, H) -> float:
    """cuBLAS time of the MoE's FLOPs as dense GEMMs: [M, D] @ [D, 2H] and [M, H] @ [H, D]."""
    xa = torch.randn(M, D, device="cuda", dtype=torch.half)
    ha = torch.randn(M, H, device="cuda", dtype=torch.half)
    wd1 = torch.randn(D, 2 * H, device="cuda", dtype=torch.half)
    wd2 = torch.randn(H, D, device="cuda", dtype=torch.half)
    return timed(lambda: (xa @ wd1, ha @ wd2))[0]


def moe_at(lib, T, w1, w2, k, gw, grouped_dtype, copy_gbs, g, only_ffnx):
    E, H2, D = w1.shape
    H = H2 // 2
    x = torch.randn(T, D, device="cuda", generator=g).half()
    logits = torch.randn(T, E, device="cuda", generator=g).half()
    out = torch.empty_like(x)
    args = (x, logits, w1, None, w2, None, None, None, None, None, None, None)
    p = build.MoEParams(T, D, H, E, k, 0, 0, 0, 0, 0, 1.0, 1, 0, 0, 0, 0)
    ws = torch.empty(lib.ffnx_moe_workspace_size(p), dtype=torch.uint8, device="cuda")

    def ours():
        return launchers.moe_forward(lib, *args, num_experts=E, top_k=k, out=out, workspace=ws)

    ref = torch_loop(x, logits, w1, w2, k).float()
    err = (ours().float() - ref).abs().max().item() / ref.abs().max().item()
    active = int(torch.unique(route(logits, k)[1]).numel())
    flops, bytes_ = 6 * T * k * D * H, active * 3 * D * H * 2 + 2 * T * D * 2
    dense_ms = dense_gemm_ms(T * k, D, H)
    cases = {
        "ffnx": (ours, True),
        "torch loop": (lambda: torch_loop(x, logits, w1, w2, k), False),
        "torch bmm (padded)": (lambda: torch_bmm(x, logits, w1, w2, k), False),
    }
    if only_ffnx:
        cases = {"ffnx": cases["ffnx"]}
    if grouped_dtype is not None:
        a1, a2 = gw if gw else (w1, w2)
        name = "torch._grouped_mm" + (" (bf16)" if gw else "")
        cases[name] = (lambda: torch_grouped(x, logits, a1, a2, k), False)
    rows = []
    for name, (fn, graph) in cases.items():
        ms, mode = timed(fn, graph=graph)
        rows.append(dict(op="moe", T=T, impl=name, ms=ms, mode=mode, tflops=flops / ms / 1e9,
                         gbs=bytes_ / ms / 1e6, pct_copy_bw=100 * bytes_ / ms / 1e6 / copy_gbs,
                         pct_dense_gemm=100 * dense_ms / ms, dense_gemm_ms=dense_ms,
                         active_experts=active,
                         max_rel_err=err if name == "ffnx" else None))  # fmt: skip
        print(fmt_row(rows[-1]), flush=True)
    return rows


# ---- sparse FFN -----------------------------------------------------------------------------
def bench_sparse(lib, D, H, Ts, sparsities, copy_gbs):
    g = torch.Generator(device="cuda").manual_seed(1)
    wg = (torch.randn(H, D, device="cuda", generator=g) / D**0.5).half()
    wu = (torch.randn(H, D, device="cuda", generator=g) / D**0.5).half()
    wd = (torch.randn(D, H, device="cuda", generator=g) / H**0.5).half()
    wdt = launchers.pack_down(lib, wd)
    return [r for T in Ts for r in sparse_at(lib, T, wg, wu, wd, wdt, sparsities, copy_gbs, g)]


def sparse_at(lib, T, wg, wu, wd, wdt, sparsities, copy_gbs, g):
    from ffnx.plugins.reference import sparse_ffn_reference

    H, D = wg.shape
    x = torch.randn(T, D, device="cuda", generator=g).half()
    out = torch.empty_like(x)
    dense_ms, _ = timed(lambda: (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T)
    rows = [dict(op="sparse_ffn", T=T, impl="torch dense", sparsity=None, ms=dense_ms,
                 gbs=3 * H * D * 2 / dense_ms / 1e6, union_active=1.0)]  # fmt: skip
    print(fmt_row(rows[-1]), flush=True)
    a = F.silu(x.float() @ wg.float().T).abs()
    p = launchers.sparse_ffn_params(x, wg, wu, None, None, mode="threshold", k=0, activation="silu")
    ws = torch.empty(lib.ffnx_sparse_ffn_workspace_size(p), dtype=torch.uint8, device="cuda")
    for s in sparsities:
        cut = -1.0 if s == 0 else float(a.flatten().quantile(s))
        thr = torch.full((H,), cut, device="cuda")
        union = (a > thr).any(0).float().mean().item()
        args = (x, wg, wu, None, wd, None, thr)

        def ours(args=args):
            return launchers.sparse_ffn_forward(lib, *args, mode="threshold", activation="silu",
                                            w_down_t=wdt, out=out, workspace=ws)  # fmt: skip

        ref = sparse_ffn_reference(*args, mode="threshold", activation="silu").float()
        err = (ours().float() - ref).abs().max().item() / ref.abs().max().item()
        ms, mode = timed(ours)
        bytes_ = (1 + 2 * union) * H * D * 2
        rows.append(dict(op="sparse_ffn", T=T, impl="ffnx", sparsity=s, ms=ms, mode=mode,
                         union_active=union, gbs=bytes_ / ms / 1e6,
                         pct_copy_bw=100 * bytes_ / ms / 1e6 / copy_gbs,
                         speedup_vs_dense=dense_ms / ms, max_rel_err=err))  # fmt: skip
        print(fmt_row(rows[-1]), flush=True)
    return rows


def fmt_row(r) -> str:
    if r["op"] == "moe":
        extra = f"{r['gbs']:8.0f} GB/s ({r['pct_copy_bw']:5.1f}% copy) {r['tflops']:7.1f} TFLOP/s "
        extra += f"({r['pct_dense_gemm']:5.1f}% dense cuBLAS {r['dense_gemm_ms']:.3f} ms)"
    else:
        sp = "dense" if r["sparsity"] is None else f"{100 * r['sparsity']:.0f}%"
        extra = f"sparsity {sp:>5} union {100 * r['union_active']:5.1f}% {r['gbs']:7.0f} GB/s"
        if "speedup_vs_dense" in r:
            extra += f" ({r['pct_copy_bw']:5.1f}% copy)  x{r['speedup_vs_dense']:.2f} vs dense"
    err = f"  err {r['max_rel_err']:.1e}" if r.get("max_rel_err") is not None else ""
    mode = r.get("mode", "graph")
    return f"{r['op']:10} T={r['T']:<5} {r['impl']:26} {r['ms']:9.4f} ms [{mode}] {extra}{err}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write all rows and ceilings here")
    ap.add_argument("--small", action="store_true", help="D=2048, H=7168")
    ap.add_argument("--lib", type=Path, help="prebuilt libffnx_kernels.so")
    ap.add_argument("--moe-T", type=int, nargs="*", default=[1, 16, 256, 4096])
    ap.add_argument("--sparse-T", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--only-ffnx", action="store_true", help="skip the torch MoE baselines")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    lib = build.load_kernels(args.lib)
    D, H = (2048, 7168) if args.small else (4096, 14336)
    dev = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth()
    print(f"device: {dev}; torch {torch.__version__}; copy bandwidth {copy_gbs:.0f} GB/s")
    print(f"MoE: D={D} H={H} E=8 k=2 fp16 swiglu; sparse FFN: D={D} H={H} gated silu fp16")
    rows = bench_moe(lib, D, H, 8, 2, args.moe_T, copy_gbs, args.only_ffnx)
    rows += bench_sparse(lib, D, H, args.sparse_T, (0.0, 0.5, 0.8, 0.9, 0.95), copy_gbs)
    print("\n" + "\n".join(fmt_row(r) for r in rows))
    if args.json:
        args.json.write_text(json.dumps(dict(device=dev, torch=torch.__version__, D=D, H=H,
                                             copy_gbs=copy_gbs, rows=rows), indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
