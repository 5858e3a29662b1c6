"""Decode timing on a KV-cache decoder (numpy + the backend only): time to first token, prefill
and decode tokens/s, inter-token latency percentiles. Tokens are greedy with EOS ignored, so
every run generates exactly `new_tokens` per row; the prompt is random ids (seeded)."""

from __future__ import annotations

import time

import numpy as np

from ffnx.runtime.generate import decoder_meta


def decode_stats(ttft_s: float, token_times_s: list[float], batch: int, prompt_len: int) -> dict:
    """From the first token's latency and each later token's arrival time (s) -> the report."""
    itl = np.diff(np.asarray(token_times_s)) if len(token_times_s) > 1 else np.zeros(1)
    return {
        "ttft_ms": ttft_s * 1e3,
        "prefill_tok_s": batch * prompt_len / ttft_s,
        "decode_tok_s": batch / float(itl.mean()) if itl.mean() > 0 else float("inf"),
        "itl_p50_ms": float(np.percentile(itl, 50)) * 1e3,
        "itl_p99_ms": float(np.percentile(itl, 99)) * 1e3,
        "new_tokens": len(token_times_s),
    }


def random_prompt(vocab: int, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, prompt_len), dtype=np.int64)


def time_decode(engine, prompt_len: int, new_tokens: int, batch: int = 1, seed: int = 0,
                warmup: int = 1) -> dict:  # fmt: skip
    """One timed greedy generation after `warmup` short ones; see `decode_stats`."""
    prompt = random_prompt(int(decoder_meta(engine)["vocab"]), batch, prompt_len, seed)
    for _ in range(warmup):
        for _tok in engine.stream(prompt, min(4, new_tokens), ignore_eos=True):
            pass
    t0 = time.perf_counter()
    times = []
    for _tok in engine.stream(prompt, new_tokens, ignore_eos=True):
        times.append(time.perf_counter())
    return decode_stats(times[0] - t0, times, batch, prompt_len)
