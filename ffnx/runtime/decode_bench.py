"""Decode timing on a KV-cache decoder (numpy + the backend only): time to first token, prefill
and decode tokens/s, inter-token latency percentiles. Tokens are greedy with EOS ignored, so
every run generates exactly `new_tokens` per row; the prompt is random ids (seeded).

Roofline: batch-1 decode reads every weight once per token (an MoE layer: its k routed experts),
so its speed limit is the memory bandwidth a GEMV reaches on this machine. `gemv_bandwidth`
times one ORT GEMV, y [1, N] = x [1, K] @ W, with W larger than the last-level cache, and gives
weight bytes / time; `roofline` gives the decoder's achieved weight bandwidth
(weight bytes read per token / mean inter-token time) and its fraction of that."""

from __future__ import annotations

import time

import numpy as np

from ffnx.runtime.generate import decoder_meta

SETTLE_S = 0.1


def settle() -> None:
    """Pause before a runtime is timed: the runtime timed just before leaves its ORT worker
    threads spinning (onnxruntime-genai's keep spinning after a step, for tens of ms), and on a
    machine with few cores they steal the next one's. Measured on the 2-core host: ffnx's first
    decode steps right after a genai generation took 8-15 ms against 4-5 ms, its prefill 27-44 ms
    against 17-20 ms; after a 0.1 s pause, the same as after its own run. Every timed decode
    (ffnx, transformers, onnxruntime-genai) starts with it."""
    time.sleep(SETTLE_S)


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
    settle()
    for _ in range(warmup):
        for _tok in engine.stream(prompt, min(4, new_tokens), ignore_eos=True):
            pass
    t0 = time.perf_counter()
    times, tokens = [], []
    for tok in engine.stream(prompt, new_tokens, ignore_eos=True):
        times.append(time.perf_counter())
        tokens.append(tok)
    out = decode_stats(times[0] - t0, times, batch, prompt_len)
    out["tokens"] = np.stack(tokens, axis=1)  # [batch, new_tokens]; not JSON (callers pop it)
    return out


def gemv_bandwidth(model: bytes, weight_bytes: int, k: int, threads: int | None = None,
                   seconds: float = 0.5, warmup: int = 3) -> dict:  # fmt: skip
    """Time the one-input GEMV ONNX `model` (x [1, k] float32) on ORT CPU with `threads`:
    the median of runs over `seconds` -> {"gemv_ms", "gemv_gbs": weight_bytes / median}."""
    import onnxruntime as ort

    settle()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    x = {name: np.random.default_rng(0).standard_normal((1, k)).astype(np.float32)}
    for _ in range(warmup):
        sess.run(None, x)
    runs, end = [], time.perf_counter() + seconds
    while len(runs) < 5 or time.perf_counter() < end:
        t = time.perf_counter()
        sess.run(None, x)
        runs.append(time.perf_counter() - t)
    med = float(np.median(runs))
    return {"gemv_ms": med * 1e3, "gemv_gbs": weight_bytes / med / 1e9, "gemv_weight_bytes":
            int(weight_bytes), "gemv_runs": len(runs)}  # fmt: skip


def roofline(weight_bytes_per_step: float, itl_s: float, gemv_gbs: float) -> dict:
    """Achieved weight bandwidth of decode (bytes read per step / mean inter-token time) and its
    fraction of the measured GEMV bandwidth."""
    achieved = weight_bytes_per_step / itl_s / 1e9 if itl_s > 0 else float("inf")
    return {"weight_bytes_per_step": int(weight_bytes_per_step), "achieved_gbs": achieved,
            "roofline_gbs": gemv_gbs, "roofline_fraction": achieved / gemv_gbs}  # fmt: skip
