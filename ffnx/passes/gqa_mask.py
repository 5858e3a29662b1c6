"""The attention bias group_query_attention feeds GQA: the padding alone where the model's mask
adds nothing inside GQA's own causal region.

transformers builds each layer's additive mask M [B|1, 1, S, T] (T = P + S keys, P cached) from
attention_mask with a few dozen small ops per step (aranges, comparisons, GatherND, Expand,
Where, the past length from the cache shapes). GQA masks causally itself: with seqlens_k =
T - 1 for every row and S queries, query s sees keys t <= P + s and never reads the bias
elsewhere. So M may be replaced by

    M'[b, 0, s, t] = 0 if attention_mask[b, t] != 0 else v      (v: M's masked value)

(built from attention_mask in 5 ops: Cast, Where, Unsqueeze, Concat, Expand; S is GQA's own) exactly
when M equals M' on the causal region C = {(s, t): t <= P + s}. That is checked by evaluating
M's own subgraph on ONNX Runtime, not assumed from its pattern:

- M must be computed from attention_mask, and from input_ids / past inputs through their shapes
  only (a mask reading position_ids or token values is left as it is);
- on probes — decode steps (S = 1) at T = 1, 2, 9, 64 and the decoder's maximum length, prompts
  S = T = 1, 4, 11 and a prompt after a cache (S = 3, T = 10), two rows each, attention_mask with
  left padding and with random holes — M restricted to C must be M' there. A sliding window or
  a chunked mask shorter than the maximum length masks keys inside C at T = maximum length, so
  it fails the check (that layer keeps its own mask, as Mistral's and GPT-OSS's window layers
  do); a mask that is not per key (ALiBi-like values, softcaps) fails it too.

Then GQA computes the same softmax over the same scores plus the same bias on every key it
reads. Not replaced without a maximum length (the longest probe), or when any condition fails;
the reason is in the pass notes (`mask`).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.builder import Builder, i64

PROBE_DECODE_T = (1, 2, 9, 64)  # and the maximum length
PROBE_PROMPTS = ((1, 1), (4, 4), (11, 11), (3, 10))  # (S, T)


def _ancestors(t: gs.Tensor) -> dict[int, gs.Node]:
    """The nodes `t` is computed by (id -> node)."""
    nodes: dict[int, gs.Node] = {}
    stack = [t]
    while stack:
        for n in stack.pop().inputs:
            if id(n) not in nodes:
                nodes[id(n)] = n
                stack.extend(n.inputs)
    return nodes


def _probes(max_len: int) -> list[tuple[int, int]]:
    return [(1, t) for t in (*PROBE_DECODE_T, max_len)] + list(PROBE_PROMPTS)


def _attention_mask(T: int, S: int, rng) -> np.ndarray:
    """Two rows: left padding, and random holes; the S new tokens are real (ones)."""
    m = np.ones((2, T), np.int64)
    P = T - S
    m[0, : P // 2] = 0
    m[1, :P] = rng.integers(0, 2, P)
    return m


def check(graph: gs.Graph, mask: gs.Tensor, max_len: int | None) -> float | str:
    """M's masked value v when the padding-only bias M' is exact for `mask` M (see the
    module docstring), else why not."""
    from ffnx.graph.ort import subgraph_inputs, subgraph_runner

    if not max_len:
        return "no maximum length to probe the mask at"
    needed = subgraph_inputs(graph, [mask])
    names = {t.name for t in needed}
    if "attention_mask" not in names:
        return "the mask does not read attention_mask"
    anc = _ancestors(mask)
    for t in needed:
        if t.name == "attention_mask":
            continue
        if t.name != "input_ids" and not t.name.startswith("past_key_values."):
            return f"the mask reads {t.name}"
        if any(n.op != "Shape" for n in t.outputs if id(n) in anc):
            return f"the mask reads the values of {t.name}, not only its shape"
    run = subgraph_runner(graph, [mask], [t.name for t in needed])
    rng = np.random.default_rng(0)
    masked = None
    for S, T in _probes(int(max_len)):
        am = _attention_mask(T, S, rng)
        feeds = {"attention_mask": am}
        for t in needed:
            if t.name == "input_ids":
                feeds[t.name] = np.zeros((2, S), np.int64)
            elif t.name != "attention_mask":
                kv, d = t.shape[1], t.shape[3]
                feeds[t.name] = np.zeros((2, int(kv), T - S, int(d)), np.float32)
        (m,) = run(feeds)
        m = np.asarray(m)
        if m.shape != (2, 1, S, T):
            return f"the mask is {list(m.shape)} at B=2, S={S}, T={T}, not [B, 1, S, T]"
        causal = np.arange(T)[None, :] <= (T - S + np.arange(S))[:, None]  # [S, T]
        region = m[:, 0][:, causal]  # [B, |C|]
        keep = np.broadcast_to(am[:, None, :] != 0, (2, S, T))[:, causal]
        if not np.all(region[keep] == 0):
            return f"the mask hides unpadded causal keys at S={S}, T={T} (a window or chunks)"
        hidden = region[~keep]
        if hidden.size:
            v = np.unique(hidden)
            if v.size != 1 or v[0] > -1e30 or (masked is not None and v[0] != masked):
                return f"padded keys get {v[:3].tolist()}, not one large negative value"
            masked = float(v[0])
    return masked if masked is not None else float(np.finfo(np.float32).min)


def padding_bias(graph: gs.Graph, value: float, seq: gs.Tensor | None = None) -> gs.Tensor:
    """M' [B, 1, S, T] from attention_mask [B, T] and input_ids [B, S] (module docstring);
    `seq`: S as a [1] int64 tensor the caller has already (else read from input_ids)."""
    names = {t.name: t for t in graph.inputs}
    b = Builder(graph, "group_query_attention/padding_bias")
    keep = b.op("Cast", names["attention_mask"], to=9)  # bool
    bias = b.op("Where", keep, np.float32(0.0).reshape(()), np.float32(value).reshape(()))
    if seq is None:
        seq = b.op("Shape", names["input_ids"], start=1, end=2)
    return b.op("Expand", b.op("Unsqueeze", bias, i64(1, 2)),
                b.op("Concat", i64(1, 1), seq, i64(1), axis=0))  # fmt: skip
