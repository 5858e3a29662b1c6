"""`ffnx bench DIR --decode`: token-by-token generation timing, optionally against transformers
(torch eager, its own KV cache) on the checkpoint the artifact was exported from."""

from __future__ import annotations

import inspect
import time

from ffnx.commands import ui
from ffnx.errors import ArtifactError

COLUMNS = ["runtime", "TTFT ms", "prefill tok/s", "decode tok/s", "ITL p50 ms", "ITL p99 ms",
           "peak RSS MiB"]  # fmt: skip


def torch_decode(source: str, prompt_len: int, new_tokens: int, batch: int, threads, seed=0):
    """transformers eager: prefill, then greedy steps on its DynamicCache (same prompt ids)."""
    import torch

    from ffnx.models.hf import load_hf
    from ffnx.runtime.decode_bench import decode_stats, random_prompt

    if not source.startswith("hf:"):
        raise ArtifactError(f"--compare torch needs an hf: export; this artifact is from {source}")
    if threads:
        torch.set_num_threads(threads)
    model = load_hf(source[3:]).module.model
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.from_numpy(random_prompt(vocab, batch, prompt_len, seed))

    def run(n: int) -> tuple[float, list[float]]:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            times = []
            for _ in range(n):
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter())
                if len(times) == n:
                    break
                past = getattr(out, "cache", None) or out.past_key_values
                out = model(input_ids=tok, use_cache=True, **{arg: past})
        return times[0] - t0, times

    run(min(4, new_tokens))
    ttft, times = run(new_tokens)
    return decode_stats(ttft, times, batch, prompt_len)


def bench_decode(
    engine, path, compare, prompt_len, new_tokens, batch, threads, table: bool = True
) -> list[dict]:
    from ffnx.bench import peak_rss_mib
    from ffnx.runtime.decode_bench import time_decode

    results = [{"runtime": f"ffnx ({engine.backend_name})",
                **time_decode(engine, prompt_len, new_tokens, batch), "peak_rss_mib":
                peak_rss_mib()}]  # fmt: skip
    if compare == "torch":
        source = engine.manifest.get("model", {}).get("source", "")
        r = torch_decode(source, prompt_len, new_tokens, batch, threads)
        results.append({"runtime": "transformers (torch eager)", **r,
                        "peak_rss_mib": peak_rss_mib()})  # fmt: skip
    keys = ["ttft_ms", "prefill_tok_s", "decode_tok_s", "itl_p50_ms", "itl_p99_ms", "peak_rss_mib"]
    rows = [[r["runtime"], *(r[k] for k in keys)] for r in results]
    name = engine.manifest.get("model", {}).get("name", path)
    title = f"{name}  decode: batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, greedy"
    if table:  # off with `ffnx bench --json` (JSON only on stdout)
        ui.out.print(ui.table(title, COLUMNS, rows))
    return results
