"""Token generation on a KV-cache decoder artifact (`ffnx export hf:DIR`); numpy + the backend only.

One graph serves prefill and decode: step 0 feeds the (left-padded) prompts with pasts of length
0; each later step feeds one token per row and the previous step's presents as the pasts. On ONNX
Runtime every step runs through an IOBinding: the presents stay ORT-owned `OrtValue`s and are
bound as the next step's pasts, so no cache tensor is copied to or from numpy (the graph's
Concat writes each new cache once). A graph whose attention is GroupQueryAttention with a
shareable cache (a `kv_buffer=shared` lowering record in the model metadata, written by the
`group_query_attention` pass) gets one [batch, kv_heads, prompt + max_new_tokens, dim] buffer
per cache, allocated once and bound as both the past and the present of every step: each step
writes only its new rows in place. Only the last position's logits come back to the host.

Positions are `cumsum(attention_mask) - 1` (0 on padding), the convention of transformers'
`generate`, so left-padded rows produce the tokens they would alone. Sampling: temperature 0 is
greedy (argmax, first index on ties); otherwise logits / temperature, then top-k, then top-p
(smallest set of tokens whose probability reaches p), then one draw from a seeded generator.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import numpy as np

from ffnx.errors import InputError

LOWERINGS_KEY = "ffnx.lowerings"  # ffnx.graph.lowering_meta.KEY (the runtime cannot import it)


def decoder_meta(engine) -> dict:
    meta = engine.manifest.get("decoder")
    if not meta:
        raise InputError(
            f"{engine.path or 'this model'} is not a KV-cache decoder; export it with "
            "`ffnx export hf:DIR` (without --no-cache)"
        )
    return meta


def pad_prompts(prompts, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (a 2-D int array or a list of id lists) -> left-padded ids and attention mask."""
    if isinstance(prompts, np.ndarray):
        if prompts.ndim == 1:
            prompts = prompts[None]
        if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer):
            raise InputError(f"input_ids must be int [batch, seq], got {prompts.dtype} "
                             f"{list(prompts.shape)}")  # fmt: skip
        rows = [list(r) for r in prompts]
    else:
        prompts = list(prompts)
        if prompts and isinstance(prompts[0], int | np.integer):
            prompts = [prompts]  # one flat prompt
        rows = [list(r) for r in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = np.asarray(r, dtype=np.int64)
        mask[i, width - len(r) :] = 1
    return ids, mask


def sample(logits: np.ndarray, temperature: float, top_k, top_p, rng) -> np.ndarray:
    """[B, V] float logits -> [B] int64 tokens (see the module docstring)."""
    if temperature <= 0:
        return logits.argmax(-1).astype(np.int64)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sp = np.take_along_axis(p, order, -1)
        keep_sorted = (np.cumsum(sp, -1) - sp) < top_p  # the token crossing p is kept
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1).astype(np.int64)


def kv_buffer(session) -> str:
    """ "shared" when the graph's caches may be one buffer bound as past and present (see the
    module docstring), else "concat"."""
    try:
        records = json.loads(session.get_modelmeta().custom_metadata_map.get(LOWERINGS_KEY, "[]"))
    except Exception:  # a backend without model metadata, or unreadable records
        return "concat"
    for r in records:
        if r.get("pass") == "group_query_attention" and "kv_buffer=shared" in r.get("choice", ""):
            return "shared"
    return "concat"


class _OrtStepper:
    """Runs decoder steps through IOBinding; presents stay `OrtValue`s. With `max_len` (a
    shared-buffer graph) every cache is one preallocated buffer of that length, bound once with
    one IOBinding that every step reuses: a step binds only its three small inputs and the
    logits array (reused while the shape is the same), so the Python work per token is a few
    calls."""

    def __init__(self, session, meta: dict, batch: int = 1, max_len: int | None = None):
        import onnxruntime as ort

        self.ort = ort
        self.session = session
        self.pasts = meta["past_inputs"]
        self.presents = meta["present_outputs"]
        self.vocab = int(meta["vocab"])
        self.cache = None  # OrtValues of the last presents
        self.io = None
        self.logits = None  # (numpy array, OrtValue) the shared-buffer path writes into
        self.token = {}  # decode-step input_ids / position_ids: (numpy array, OrtValue)
        if max_len is not None:
            self.host = []  # the numpy memory the OrtValues wrap, kept alive with them
            for layer in range(int(meta["layers"])):
                h = int(meta["kv_heads"][layer])
                for width in (meta["key_dim"][layer], meta["value_dim"][layer]):
                    self.host.append(np.zeros((batch, h, max_len, int(width)), np.float32))
            self.io = session.io_binding()
            for past, present, host in zip(self.pasts, self.presents, self.host):
                buf = ort.OrtValue.ortvalue_from_numpy(host)
                self.io.bind_ortvalue_input(past, buf)
                self.io.bind_ortvalue_output(present, buf)

    def _shared_step(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        io = self.io
        if feeds["input_ids"].shape[1] == 1:  # a decode step: ids and positions are written
            if not self.token:  # into [batch, 1] arrays bound once (the mask grows: bound)
                for k in ("input_ids", "position_ids"):
                    arr = np.empty_like(feeds[k], np.int64)
                    self.token[k] = (arr, self.ort.OrtValue.ortvalue_from_numpy(arr))
                    io.bind_ortvalue_input(k, self.token[k][1])
            for k in ("input_ids", "position_ids"):
                self.token[k][0][...] = feeds[k]
            io.bind_cpu_input("attention_mask", np.ascontiguousarray(feeds["attention_mask"]))
        else:
            for k, v in feeds.items():
                io.bind_cpu_input(k, np.ascontiguousarray(v))
        shape = (*feeds["input_ids"].shape, self.vocab)
        if self.logits is None or self.logits[0].shape != shape:
            arr = np.empty(shape, np.float32)
            self.logits = (arr, self.ort.OrtValue.ortvalue_from_numpy(arr))
            io.bind_ortvalue_output("logits", self.logits[1])
        self.session.run_with_iobinding(io)
        return self.logits[0][:, -1, :]  # a view: valid until the next step overwrites it

    def step(self, feeds: dict[str, np.ndarray], empty_pasts: dict[str, np.ndarray]) -> np.ndarray:
        if self.io is not None:
            return self._shared_step(feeds)
        io = self.session.io_binding()
        for k, v in feeds.items():
            io.bind_cpu_input(k, np.ascontiguousarray(v))
        io.bind_output("logits")
        for i, name in enumerate(self.pasts):
            if self.cache is None:
                io.bind_cpu_input(name, empty_pasts[name])
            else:
                io.bind_ortvalue_input(name, self.cache[i])
        for name in self.presents:
            io.bind_output(name)
        self.session.run_with_iobinding(io)
        outs = io.get_outputs()
        self.cache = outs[1:]
        return outs[0].numpy()[:, -1, :]


class _PlainStepper:
    """Any backend with `run(feeds) -> outputs` (TensorRT): presents round-trip through numpy."""

    def __init__(self, backend, meta: dict):
        self.backend = backend
        self.pasts = meta["past_inputs"]
        self.presents = meta["present_outputs"]
        self.cache = None

    def step(self, feeds, empty_pasts) -> np.ndarray:
        full = dict(feeds)
        for i, name in enumerate(self.pasts):
            full[name] = empty_pasts[name] if self.cache is None else self.cache[i]
        out = self.backend.run(full)
        self.cache = [out[n] for n in self.presents]
        return out["logits"][:, -1, :]


def stream(
    engine,
    input_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    ignore_eos: bool = False,
) -> Iterator[np.ndarray]:
    """Yield one int64 [batch] array of new tokens per step; rows that finished (hit EOS) yield
    the pad id; stops after `max_new_tokens` or when every row finished (unless ignore_eos)."""
    meta = decoder_meta(engine)
    eos = (meta.get("eos_token_id") or []) if eos_token_id is None else eos_token_id
    eos = [int(eos)] if isinstance(eos, int | np.integer) else [int(e) for e in eos]
    vocab, cap = int(meta["vocab"]), int(meta["max_length"])
    # padding is masked, so any id in the vocabulary will do: the model's pad id, else its
    # first EOS, else 0 (configs do name ids past their vocabulary)
    pad = next((int(c) for c in (meta.get("pad_token_id"), *eos[:1])
                if c is not None and 0 <= int(c) < vocab), 0)  # fmt: skip
    ids, mask = pad_prompts(input_ids, pad)
    if ids.min() < 0 or ids.max() >= vocab:
        lo, hi = int(ids.min()), int(ids.max())
        raise InputError(f"token ids must be in [0, {vocab}); got {lo}..{hi}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if ids.shape[1] + max_new_tokens > cap:
        raise InputError(f"prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's maximum length {cap}")  # fmt: skip
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1):
        raise InputError("temperature must be >= 0 and top_p in (0, 1]")
    batch = ids.shape[0]
    empty = {}
    for layer in range(int(meta["layers"])):
        h = int(meta["kv_heads"][layer])
        for kind, width in (("key", meta["key_dim"][layer]), ("value", meta["value_dim"][layer])):
            shape = (batch, h, 0, int(width))
            empty[f"past_key_values.{layer}.{kind}"] = np.zeros(shape, np.float32)
    session = getattr(engine.backend, "session", None)
    if session is not None and hasattr(session, "io_binding"):
        shared = kv_buffer(session) == "shared"
        max_len = ids.shape[1] + max_new_tokens if shared else None
        stepper = _OrtStepper(session, meta, batch, max_len)
    else:
        stepper = _PlainStepper(engine.backend, meta)
    rng = np.random.default_rng(seed)
    done = np.zeros(batch, dtype=bool)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for _ in range(max_new_tokens):
        logits = stepper.step(feeds, empty)
        tok = sample(logits, temperature, top_k, top_p, rng)
        tok = np.where(done, pad, tok)
        yield tok
        if not ignore_eos and eos:
            done |= np.isin(tok, eos)
            if done.all():
                return
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        # every row's mask gained a 1, so its position (mask count - 1) grows by one
        feeds = {"input_ids": tok[:, None], "attention_mask": mask,
                 "position_ids": feeds["position_ids"][:, -1:] + 1}  # fmt: skip


def generate(engine, input_ids, max_new_tokens: int, **kwargs) -> np.ndarray:
    """int64 [batch, n] of new tokens, n <= max_new_tokens (== with ignore_eos=True)."""
    steps = list(stream(engine, input_ids, max_new_tokens, **kwargs))
    return np.stack(steps, axis=1)
