"""Token-by-token decode: ffnx's KV-cache decoder on ONNX Runtime against transformers eager.

    python benchmarks/decode.py [--size tiny|qwen3] [--arch qwen3 qwen3_moe mixtral]
                                [--prompt-len 64] [--new-tokens 64] [--batch 1] [--threads 2]
                                [--work DIR] [--json out.json]

Per architecture: a random-weight checkpoint config is written to --work (`tiny`: hidden 64,
2 layers, vocab 256, for a smoke run; `qwen3`: the issue-14 shape, hidden 512, 8 layers, 8 heads
/ 4 KV heads, vocab 32000), exported with `ffnx export hf:DIR` (KV cache, default passes), and
timed with `ffnx.runtime.decode_bench.time_decode` (greedy, EOS ignored, one warm-up run) and
`ffnx.commands.bench_decode.torch_decode` (transformers with its DynamicCache, same prompt ids),
in one process, torch and ORT each with --threads threads. Reported: TTFT, prefill tokens/s,
decode tokens/s, inter-token p50/p99, and ffnx decode tok/s over transformers'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, head_dim=16),
    "qwen3": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=32000, head_dim=64),
}  # fmt: skip
MOE = {
    "qwen3_moe": dict(num_experts=16, num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
}


def write_config(directory: Path, arch: str, size: str) -> Path:
    cfg = {"model_type": arch, **SIZES[size], "max_position_embeddings": 4096,
           "tie_word_embeddings": False, **MOE.get(arch, {})}  # fmt: skip
    if arch == "qwen3_moe":
        cfg["moe_intermediate_size"] = cfg["intermediate_size"] // 4
    if arch == "mixtral":
        cfg.pop("head_dim")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--arch", nargs="+", default=["qwen3", "qwen3_moe", "mixtral"])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("artifacts/decode-bench"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    from ffnx.commands.bench_decode import torch_decode
    from ffnx.export.pipeline import export_artifact
    from ffnx.models.hf import load_hf
    from ffnx.runtime import Engine
    from ffnx.runtime.decode_bench import time_decode

    rows = []
    for arch in a.arch:
        src = write_config(a.work / f"{arch}-{a.size}-src", arch, a.size)
        art = a.work / f"{arch}-{a.size}"
        export_artifact(load_hf(str(src), cache=True), art, force=True, source=f"hf:{src}")
        engine = Engine.load(art, backend="ort", threads=a.threads)
        ours = time_decode(engine, a.prompt_len, a.new_tokens, a.batch)
        ref = torch_decode(f"hf:{src}", a.prompt_len, a.new_tokens, a.batch, a.threads)
        for name, r in (("ffnx (ort)", ours), ("transformers eager", ref)):
            rows.append({"arch": arch, "size": a.size, "runtime": name, **r})
        rows[-2]["speedup_vs_transformers"] = ours["decode_tok_s"] / ref["decode_tok_s"]
    head = f"{'arch':<11} {'runtime':<19} {'TTFT ms':>8} {'prefill t/s':>11} {'decode t/s':>10} "
    print(head + f"{'ITL p50':>8} {'ITL p99':>8} {'x tf':>6}")
    for r in rows:
        x = f"{r['speedup_vs_transformers']:.2f}" if "speedup_vs_transformers" in r else ""
        print(f"{r['arch']:<11} {r['runtime']:<19} {r['ttft_ms']:>8.2f} "
              f"{r['prefill_tok_s']:>11.0f} {r['decode_tok_s']:>10.1f} {r['itl_p50_ms']:>8.2f} "
              f"{r['itl_p99_ms']:>8.2f} {x:>6}")  # fmt: skip
    if a.json:
        meta = {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "batch": a.batch,
                "threads": a.threads, "python": sys.version.split()[0]}  # fmt: skip
        from ffnx.artifact import write_json_atomic

        write_json_atomic(a.json, {"meta": meta, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
