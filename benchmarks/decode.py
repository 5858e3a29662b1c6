"""Token-by-token decode: ffnx's KV-cache decoder (fp32 and int4) on ONNX Runtime against
transformers eager and onnxruntime-genai, with the weight-bandwidth roofline.

    python benchmarks/decode.py [--size tiny|qwen3|qwen3-0.6b] [--arch qwen3 qwen3_moe mixtral
                                 llama mistral gpt_oss deepseek_v3]
                                [--precision fp32 int4] [--runtimes ffnx transformers genai]
                                [--prompt-len 64] [--new-tokens 64] [--batch 1] [--threads 2]
                                [--rounds 3] [--work DIR] [--reuse] [--json out.json]
                                [--plot out.png]

Per architecture: a random-weight checkpoint config is written to --work (`tiny`: hidden 64,
2 layers, vocab 256, for a smoke run; `qwen3`: the issue-14 shape, hidden 512, 8 layers, 8 heads
/ 4 KV heads, vocab 32000; `qwen3-0.6b`: Qwen3-0.6B's shape, 28 layers, vocab 151936, tied
embeddings, 2.4 GB in fp32, written with external data; Llama and Mistral at the same size;
MoE: Qwen3-MoE 16 experts top-2, Mixtral 8 experts top-2, GPT-OSS 8 experts top-2 with its
clamped SwiGLU, sinks and 128-token window layers, DeepSeek-V3 with MLA and 16 grouped experts
top-2 plus a shared one), exported
with `ffnx export hf:DIR` (KV cache, default passes) and, for int4, quantized as `ffnx export
--quantize int4` does (`ffnx.commands.quantize.quantize_artifact`: MatMulNBits block 32, int4
experts where they fit; its token agreement and logits cosine against fp32 are reported). Timed
in one process, every runtime with --threads threads, the same random prompt ids, greedy, EOS
ignored, one warm-up generation each, --rounds timed generations per runtime and precision
interleaved (ffnx fp32, transformers, genai fp32, ffnx int4, genai int4, then the same in
reverse, ...: a slow spell of a shared machine hits every one, and none always runs first) and
the
round with the median decode tokens/s reported (`decode_tok_s_rounds` has them all), and per
compared runtime ffnx's tokens/s over its own in each round and the median of those paired
ratios (`ffnx_over_this_rounds`, `ffnx_over_this_paired`: the machine's speed shifts between
rounds by up to 1.5x here, which cancels within a round); likewise "x fp32" is the median of
each round's int4 (int8) tokens/s over fp32's (`over_fp32_rounds`; `x_fp32_medians` is the
ratio of the median rounds):

  ffnx          `ffnx.runtime.decode_bench.time_decode`
  transformers  `ffnx.commands.bench_decode.torch_decode` (eager, its DynamicCache; fp32 only)
  genai         onnxruntime-genai's model builder at the same precision (`-p fp32|int4 -e cpu`),
                `bench_genai.genai_decode`; "genai does not support <arch>" where it refuses

Reported per row: TTFT, prefill tokens/s, decode tokens/s, inter-token p50/p99, greedy tokens
equal to ffnx's at the same precision, and for ffnx the weight bytes read per step, the achieved
weight bandwidth and its fraction of the GEMV roofline (fp32 MatMul / int4 MatMulNBits whose
weight is as large as the decoder's working set - a step's weights plus, for MoE, the experts
other tokens route to -, at least 4x the last-level cache, at most 512 MiB). The GEMV is
timed in every round beside the runtimes, and the fraction reported is the median of the rounds'
paired fractions: on a shared host both the bandwidth and a cache larger than /sys reports move
between runs (a 128 MiB GEMV measured 48-88 GB/s across runs here). JSON (--json), a table, and a
bar plot of decode tokens/s (--plot, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, head_dim=16),
    "qwen3": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=32000, head_dim=64),
    # Qwen3-0.6B's shape (0.6 B parameters, 2.4 GB in fp32: past protobuf's 2 GiB)
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, vocab_size=151936,
                       head_dim=128, tie_word_embeddings=True, rope_theta=1000000),
}  # fmt: skip
# the latent geometry both DeepSeek benchmarks use (kv_lora_rank, rotary and head widths)
MLA = dict(kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64)
MOE = {
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    # GPT-OSS: clamped-SwiGLU experts with biases, attention sinks, every other layer a
    # 128-token sliding window, YaRN rope (gpt-oss-20b's settings, scaled down)
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=128,
        swiglu_limit=7.0,
        rope_parameters=dict(
            rope_type="yarn",
            factor=32.0,
            original_max_position_embeddings=4096,
            rope_theta=150000.0,
            beta_fast=32.0,
            beta_slow=1.0,
        ),
    ),
    # DeepSeek-V3: MLA (latent KV), 16 routed experts in 4 groups (2 kept), top-2, one shared
    # expert, sigmoid routing; the first layer dense
    "deepseek_v3": dict(
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        q_lora_rank=192,
        **MLA,
    ),
    # DeepSeek-V2(-Lite): MLA with its complex rotary (exported in real arithmetic), 16 routed
    # experts, softmax top-2, one shared expert; the first layer dense
    "deepseek_v2": dict(
        n_routed_experts=16,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        **MLA,
    ),
}
MLA_ARCHS = ("deepseek_v3", "deepseek_v2")
# every architecture --arch takes: dense (Llama, Mistral, Qwen3) and MoE
ARCHS = ("qwen3", "llama", "mistral", *MOE)
RUNTIMES = ("ffnx", "transformers", "genai")


def write_config(directory: Path, arch: str, size: str) -> Path:
    cfg = {"model_type": arch, "max_position_embeddings": 4096, "tie_word_embeddings": False,
           **SIZES[size], **MOE.get(arch, {})}  # fmt: skip
    if arch in ("qwen3_moe", *MLA_ARCHS):  # a multiple of 32, so experts quantize block-wise
        cfg["moe_intermediate_size"] = max(32, cfg["intermediate_size"] // 4 // 32 * 32)
    if arch in ("mixtral", *MLA_ARCHS):
        cfg.pop("head_dim")
    if arch in MLA_ARCHS:  # MLA: every head reads the one latent cache
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def artifacts(src: Path, work: Path, name: str, precisions, reuse: bool = False) -> dict[str, Path]:
    """{precision: artifact dir}: the fp32 export, and a quantized copy per int precision;
    `reuse`: keep the artifacts a previous run left in `work` (their manifests exist)."""
    from ffnx.commands.quantize import quantize_artifact
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf

    fp32 = work / f"{name}-fp32"
    kept = reuse and (fp32 / "manifest.json").exists()
    if not kept:
        export_artifact(load_hf(str(src), cache=True), fp32, force=True, source=f"hf:{src}")
    out = {"fp32": fp32}
    for p in precisions:
        if p != "fp32":
            out[p] = work / f"{name}-{p}"
            if kept and (out[p] / "manifest.json").exists():
                continue
            shutil.rmtree(out[p], ignore_errors=True)
            shutil.copytree(fp32, out[p])
            quantize_artifact(out[p], p)
    return out


def median_by(items: list[dict], key: str) -> dict:
    """The item with the median `key` (the upper one of an even count)."""
    return sorted(items, key=lambda r: r[key])[len(items) // 2]


def median_round(runs: list[dict]) -> dict:
    """The round with the median decode tokens/s, every round's tokens/s beside it."""
    mid = dict(median_by(runs, "decode_tok_s"))
    mid["decode_tok_s_rounds"] = [round(r["decode_tok_s"], 2) for r in runs]
    return mid


def bench_arch(arch: str, a) -> list[dict]:
    import numpy as np

    from ffnx import artifact
    from ffnx.commands import bench_decode as bd
    from ffnx.commands import bench_genai as bg
    from ffnx.models.hf import load_hf
    from ffnx.runtime import Engine
    from ffnx.runtime.decode_bench import gemv_bandwidth, random_prompt, time_decode

    src = write_config(a.work / f"{arch}-{a.size}-src", arch, a.size)
    arts = artifacts(src, a.work, f"{arch}-{a.size}", a.precision, a.reuse)
    model = load_hf(str(src)).module.model
    base = {"arch": arch, "size": a.size}
    timers, setups, refused = {}, {}, {}
    for prec, art in arts.items():
        manifest = artifact.read_manifest(art)
        vocab = int(manifest["decoder"]["vocab"])
        prompt = random_prompt(vocab, a.batch, a.prompt_len)
        engine = Engine.load(art, backend="ort", threads=a.threads)
        timers[prec, "ffnx (ort)"] = partial(time_decode, engine, a.prompt_len, a.new_tokens,
                                             a.batch)  # fmt: skip
        if "transformers" in a.runtimes and prec == "fp32":
            timers[prec, "transformers eager"] = lambda: bd.torch_decode(
                f"hf:{src}", a.prompt_len, a.new_tokens, a.batch, a.threads, model=model
            )
        if "genai" in a.runtimes:
            built = bg.genai_model(str(src), model, prec)
            if isinstance(built, str):
                refused[prec] = built
            else:
                timer = partial(bg.genai_decode, built, prompt, a.new_tokens, a.threads)
                first = timer()  # untimed: where genai fails at run time, it says so here
                if isinstance(first, str):
                    refused[prec] = first
                else:
                    timers[prec, "onnxruntime-genai"] = timer
        # the roofline GEMV (at the artifact's precision, sized like the weights decoding
        # streams) is timed in every round too: a round's fraction pairs a decode with its GEMV
        wb = bd.weight_bytes_per_step(str(art), manifest, a.batch)
        bits = manifest.get("quantize", {}).get("bits")
        gemv_model = bd.gemv_models(bits, bd.roofline_bytes(bd.working_set(wb)))
        timers[prec, "roofline GEMV"] = partial(gemv_bandwidth, *gemv_model, threads=a.threads)
        setups[prec] = (manifest, wb)
    # every precision and runtime in every round, every other round in reverse: a slow spell
    # of the machine hits all of them, none always runs first or last, and a ratio taken
    # within a round (int4 over fp32, ffnx over genai) cancels the machine's drift
    runs = {key: [] for key in timers}
    for i in range(a.rounds):
        order = list(timers.items())
        for key, timer in order[::-1] if i % 2 else order:
            runs[key].append(timer())
    rows = []
    for prec, (manifest, wb) in setups.items():
        rows += _rows(base, prec, manifest, wb, runs, refused.get(prec), a)
    ref = {(r["runtime"], r["precision"]): r for r in rows if "decode_tok_s" in r}
    tf = ref.get(("transformers eager", "fp32"))
    for r in rows:
        if "decode_tok_s" not in r:
            continue
        if tf:
            r["x_transformers"] = r["decode_tok_s"] / tf["decode_tok_s"]
        fp = ref.get((r["runtime"], "fp32"))
        if fp and r["precision"] != "fp32":
            r["x_fp32_medians"] = r["decode_tok_s"] / fp["decode_tok_s"]
            name = r["runtime"]  # this precision over fp32 within each round (the table's)
            paired = [q["decode_tok_s"] / f["decode_tok_s"]
                      for q, f in zip(runs[r["precision"], name], runs["fp32", name])]  # fmt: skip
            r["over_fp32_rounds"] = [round(x, 3) for x in paired]
            r["x_fp32"] = r["over_fp32_paired"] = float(np.median(paired))
    return rows


def _rows(base: dict, prec: str, manifest: dict, wb: dict, runs: dict, refused, a) -> list:
    """One precision's rows from the interleaved rounds: ffnx's (median round, roofline) and
    each compared runtime's with ffnx's tokens/s over its own per round."""
    import numpy as np

    from ffnx.runtime.decode_bench import roofline

    mine = {name: r for (p, name), r in runs.items() if p == prec}
    gemvs = mine.pop("roofline GEMV")
    step = wb["weight_bytes_per_step"]
    fractions = [roofline(step, a.batch / r["decode_tok_s"], g["gemv_gbs"])["roofline_fraction"]
                 for r, g in zip(mine["ffnx (ort)"], gemvs)]  # fmt: skip
    res = {name: median_round(r) for name, r in mine.items()}
    ours = res.pop("ffnx (ort)")
    tokens = ours.pop("tokens")
    gemv = median_by(gemvs, "gemv_gbs")
    row = {**base, "precision": prec, "runtime": "ffnx (ort)", **ours, **wb,
           **roofline(step, a.batch / ours["decode_tok_s"], gemv["gemv_gbs"]),
           "roofline_fraction": float(np.median(fractions)),
           "roofline_fraction_rounds": [round(f, 3) for f in fractions],
           "roofline_gbs_rounds": [round(g["gemv_gbs"], 1) for g in gemvs],
           "roofline_kind": f"{manifest.get('quantize', {}).get('scheme', 'fp32')} GEMV",
           "gemv": gemv}  # fmt: skip
    if "quantize" in manifest:
        row["accuracy_vs_fp32"] = manifest["quantize"]["accuracy"]
    rows = [row] if "ffnx" in a.runtimes else []  # (ffnx always runs: its tokens are the reference)
    for name, r in res.items():
        same = float((r.pop("tokens") == tokens).mean())
        # ffnx over this runtime within each round (the two ran seconds apart): a shift of
        # the machine's speed between rounds cancels in the ratio, not in the medians
        paired = [o["decode_tok_s"] / t["decode_tok_s"]
                  for o, t in zip(mine["ffnx (ort)"], mine[name])]  # fmt: skip
        rows.append({**base, "precision": prec, "runtime": name, **r,
                     "tokens_equal_ffnx": same,
                     "ffnx_over_this_rounds": [round(x, 3) for x in paired],
                     "ffnx_over_this_paired": float(np.median(paired))})  # fmt: skip
    if refused:
        rows.append({**base, "precision": prec, "runtime": "onnxruntime-genai",
                     "unsupported": refused})  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'arch':<10} {'prec':<5} {'runtime':<18} {'TTFT ms':>8} {'prefill':>8} "
            f"{'decode':>8} {'p50 ms':>7} {'p99 ms':>7} {'x tf':>5} {'x fp32':>6} {'GB/s':>6} "
            f"{'roof':>5} {'tok=':>5}")  # fmt: skip
    print(head)
    for r in rows:
        lead = f"{r['arch']:<10} {r['precision']:<5} {r['runtime']:<18}"
        if "unsupported" in r:
            print(f"{lead} {r['unsupported']}")
            continue

        def f(key, fmt, r=r):
            return format(r[key], fmt) if key in r else ""

        print(f"{lead} {f('ttft_ms', '8.2f'):>8} {f('prefill_tok_s', '8.0f'):>8} "
              f"{f('decode_tok_s', '8.1f'):>8} {f('itl_p50_ms', '7.2f'):>7} "
              f"{f('itl_p99_ms', '7.2f'):>7} {f('x_transformers', '5.2f'):>5} "
              f"{f('x_fp32', '6.2f'):>6} {f('achieved_gbs', '6.1f'):>6} "
              f"{f('roofline_fraction', '5.0%'):>5} "
              f"{f('tokens_equal_ffnx', '5.0%'):>5}")  # fmt: skip
    for r in rows:
        if "ffnx_over_this_paired" in r:
            rounds = ", ".join(f"{x:.2f}" for x in r["ffnx_over_this_rounds"])
            print(f"{r['arch']} {r['precision']} ffnx / {r['runtime']} per round: {rounds}; "
                  f"median {r['ffnx_over_this_paired']:.2f}")  # fmt: skip
    for r in rows:
        if "over_fp32_paired" in r:
            rounds = ", ".join(f"{x:.2f}" for x in r["over_fp32_rounds"])
            print(f"{r['arch']} {r['runtime']} {r['precision']} / fp32 per round: {rounds}; "
                  f"median {r['over_fp32_paired']:.2f}")  # fmt: skip
    for r in rows:
        if "accuracy_vs_fp32" in r:
            acc = r["accuracy_vs_fp32"]
            print(f"{r['arch']} {r['precision']} vs fp32: token agreement "
                  f"{acc['token_agreement']:.3f} over {acc['steps']} steps, logits cosine "
                  f"{acc['logits_cosine']:.5f}")  # fmt: skip


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "decode_tok_s" in r]
    archs = list(dict.fromkeys(r["arch"] for r in timed))
    series = list(dict.fromkeys((r["runtime"], r["precision"]) for r in timed))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(archs)), 4))
    for i, (rt, prec) in enumerate(series):
        xs, ys = [], []
        for j, arch in enumerate(archs):
            key = (arch, rt, prec)
            hit = [r for r in timed if (r["arch"], r["runtime"], r["precision"]) == key]
            if hit:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(hit[0]["decode_tok_s"])
        ax.bar(xs, ys, width, label=f"{rt} {prec}")
    ax.set_xticks(range(len(archs)), archs)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--arch", nargs="+", choices=ARCHS, default=["qwen3", "qwen3_moe", "mixtral"])
    ap.add_argument("--precision", nargs="+", choices=["fp32", "int4", "int8"],
                    default=["fp32", "int4"])  # fmt: skip
    ap.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed generations per runtime, interleaved; the median is reported",
    )
    ap.add_argument("--work", type=Path, default=Path("artifacts/decode-bench"))
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="time the artifacts a previous run left in --work (no export)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of decode tokens/s")
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    if "fp32" not in a.precision:
        a.precision = ["fp32", *a.precision]  # the reference of tokens and speedups
    rows = []
    for arch in a.arch:
        rows += bench_arch(arch, a)
    print_table(rows)
    meta = {"size": a.size, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
            "batch": a.batch, "threads": a.threads, "python": sys.version.split()[0]}  # fmt: skip
    if a.json:
        from ffnx.artifact import write_json_atomic

        write_json_atomic(a.json, {"meta": meta, "rows": rows})
    if a.plot:
        plot(rows, a.plot, f"decode, {a.size}: batch {a.batch}, prompt {a.prompt_len}, "
             f"{a.new_tokens} new tokens, {a.threads} threads")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
