"""MoEfication: a dense FFN as a Mixture of Experts with the same parameters.

Zhang et al. 2022 ("MoEfication: Transformer Feed-forward Layers are Mixtures of Experts"),
Read-ME (Cai et al. 2024). Approximate: only the top-k of E experts run per token.

Split. The H hidden channels go to E experts of H/E channels by balanced k-means on channel
co-activation vectors. On the calibration tokens, A[n, c] = 1 when |h_c| > q_c (h the hidden
activation, a for plain FFNs, act(gate) ⊙ up for gated ones; q_c the channel's |h| quantile at
level 1 - k/E, floored at 0 so a ReLU zero is never active); C = AᵀA / N, and channel c's vector
is C[c] / ||C[c]||: channels that fire together land in one expert.

Experts (exact when every expert runs: the channels are disjoint and act is element-wise):
  fc1[e] = W1[idx_e] [H/E, D] ([gate rows; up rows] for gated FFNs), fc1_bias[e] = b1[idx_e],
  fc2[e] = W2[:, idx_e] [D, H/E]; the down bias is added once, after the FfnxMoE node.

Router. r(x) = x Wrᵀ + br predicts each expert's contribution ||h_e(x) W2_eᵀ|| (the error of
dropping it): ridge least squares on the calibration tokens ("lstsq"), or, data-free, Wr[e] = the
mean of expert e's fc1 rows ("centroid", the paper's similarity router; plain FFNs only).

Routing, in the schema's terms: scoring "topk_softmax" on logits s = r / τ with
routed_scaling_factor = k, so idx = topk(r, k) and w_j = k · softmax(s_idx)_j. MoEfication sums
the selected experts unweighted; τ is set so that s spans at most SPREAD on the calibration
tokens, which makes every w_j = 1 within ~SPREAD (a deviation the reported error includes).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.compress.calibrate import Calibration, LayerStats, ffn_sites
from ffnx.errors import PassError
from ffnx.graph import lowering_meta
from ffnx.graph.export import export_model
from ffnx.graph.ffn_match import FFN
from ffnx.lowering.sparse import act_numpy
from ffnx.plugins.schema import DOMAIN, DOMAIN_VERSION, GATED_ACTIVATION, MOE

SPREAD = 2e-5
ROUTERS = ("lstsq", "centroid")


def balanced_kmeans(v: np.ndarray, k: int, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Labels [n] in [0, k) with exactly n / k rows each, near-minimising Σ ||v_i - c_label||².

    Lloyd iterations whose assignment step is greedy under the capacity: (row, cluster) pairs
    in order of distance, each row to the first cluster with room.
    """
    n = len(v)
    if n % k:
        raise PassError(f"{n} channels do not split into {k} equal experts")
    rng = np.random.default_rng(seed)
    centers = v[rng.choice(n, k, replace=False)]
    labels = np.full(n, -1)
    for _ in range(iters):
        dist = (v * v).sum(1)[:, None] - 2 * v @ centers.T + (centers * centers).sum(1)[None]
        new = _assign(dist, n // k)
        if np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([v[labels == e].mean(0) for e in range(k)])
    return labels


def _assign(dist: np.ndarray, cap: int) -> np.ndarray:
    n, k = dist.shape
    labels, room = np.full(n, -1), np.full(k, cap)
    for flat in np.argsort(dist, axis=None, kind="stable"):
        i, e = divmod(int(flat), k)
        if labels[i] < 0 and room[e] > 0:
            labels[i], room[e] = e, room[e] - 1
    return labels


def hidden_activations(f: FFN, x: np.ndarray) -> np.ndarray:
    """h [N, H] (what fc2 reads) for FFN inputs x [N, D], in float64."""
    x = x.astype(np.float64)
    pre = x @ f.fc1.weight + (0.0 if f.fc1.bias is None else f.fc1.bias)
    a = act_numpy(pre, f.kind)
    if f.gated:
        a = a * (x @ f.up.weight + (0.0 if f.up.bias is None else f.up.bias))
    return a


def coactivation_groups(h: np.ndarray, experts: int, top_k: int, seed: int = 0) -> np.ndarray:
    """idx [E, H/E]: the channels of each expert (sorted), from balanced k-means on C rows."""
    mag = np.abs(h)
    q = np.maximum(np.quantile(mag, 1.0 - top_k / experts, axis=0), 0.0)
    active = (mag > q).astype(np.float64)
    c = active.T @ active / len(active)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    labels = balanced_kmeans(c, experts, seed=seed)
    return np.stack([np.flatnonzero(labels == e) for e in range(experts)])


def expert_norms(h: np.ndarray, w2: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """[N, E]: ||h_e W2_e|| per token, the output each expert adds (w2 is fc2's [H, D])."""
    return np.stack([np.linalg.norm(h[:, g] @ w2[g], axis=1) for g in groups], axis=1)


def fit_router(x, targets, f: FFN, groups, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(Wr [E, D], br [E]) predicting `targets` [N, E] from x [N, D]."""
    if method == "centroid":
        if f.gated:
            raise PassError("the centroid router needs a plain FFN; use --router lstsq")
        w1 = f.fc1.weight.T
        b1 = np.zeros(w1.shape[0]) if f.fc1.bias is None else f.fc1.bias
        return np.stack([w1[g].mean(0) for g in groups]), np.array([b1[g].mean() for g in groups])
    if method != "lstsq":
        raise PassError(f"unknown router {method!r}; choose from {', '.join(ROUTERS)}")
    xa = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
    gram = xa.T @ xa
    ridge = 1e-3 * np.trace(gram) / len(gram)
    sol = np.linalg.solve(gram + ridge * np.eye(len(gram)), xa.T @ targets)
    return sol[:-1].T, sol[-1]


def moefy_layer(f: FFN, st: LayerStats, experts: int, top_k: int, router: str, seed: int = 0):
    """-> (weights for the MoE node and router, layer report)."""
    if not 1 <= top_k <= experts:
        raise PassError(f"--top-k {top_k} must be in [1, --experts {experts}]")
    h = hidden_activations(f, st.x)
    groups = coactivation_groups(h, experts, top_k, seed)
    w1, w2 = f.fc1.weight.T, f.fc2.weight  # [H, D] (gate for gated), [H, D]
    fc1 = np.stack([w1[g] for g in groups])
    b1 = None if f.fc1.bias is None else np.stack([f.fc1.bias[g] for g in groups])
    if f.gated:
        fc1 = np.concatenate([fc1, np.stack([f.up.weight.T[g] for g in groups])], axis=1)
        if b1 is not None or f.up.bias is not None:
            zero = np.zeros(f.hidden)
            bg = f.fc1.bias if f.fc1.bias is not None else zero
            bu = f.up.bias if f.up.bias is not None else zero
            b1 = np.stack([np.concatenate([bg[g], bu[g]]) for g in groups])
    fc2 = np.stack([w2[g].T for g in groups])  # [E, D, H/E]
    norms = expert_norms(h, w2, groups)
    wr, br = fit_router(st.x, norms, f, groups, router)
    r = st.x.astype(np.float64) @ wr.T + br
    tau = max(float((r.max(1) - r.min(1)).max()) / SPREAD, 1e-30)
    chosen = np.argsort(-r, axis=1, kind="stable")[:, :top_k]
    best = np.argsort(-norms, axis=1, kind="stable")[:, :top_k]
    recall = np.mean([len(set(a) & set(b)) / top_k for a, b in zip(chosen, best)])
    kept = np.take_along_axis(norms, chosen, 1).sum() / max(norms.sum(), 1e-30)
    w = {
        "router_weight": (wr / tau).astype(np.float32),
        "router_bias": ((br - br.mean()) / tau).astype(np.float32),
        "fc1_weight": fc1.astype(np.float32),
        "fc1_bias": None if b1 is None else b1.astype(np.float32),
        "fc2_weight": fc2.astype(np.float32),
    }
    report = {
        "ffn": f.y.name,
        "experts": experts,
        "top_k": top_k,
        "expert_width": f.hidden // experts,
        "router": router,
        "router_recall": round(float(recall), 4),
        "output_norm_kept": round(float(kept), 4),
    }
    return w, report


def moefy_model(
    model: onnx.ModelProto,
    calib: Calibration,
    experts: int,
    top_k: int,
    router: str = "lstsq",
    seed: int = 0,
) -> tuple[onnx.ModelProto, dict]:
    """Every calibrated FFN of `model` as an FfnxMoE node (+ router, + down bias)."""
    graph = gs.import_onnx(model)
    sites = [f for f in ffn_sites(graph) if f.kind in ("relu", "gelu", "silu")]
    layers, ffn_params, used = [], 0, 0.0
    for f in sites:
        st = calib.layer(f.act.y.name, f.hidden)
        if st is None:
            raise PassError(
                f"no calibration for the FFN at {f.y.name}; re-run `ffnx calibrate` on this model"
            )
        reason = f.check_internal(graph)
        if reason:
            raise PassError(f"cannot MoEfy the FFN at {f.y.name}: {reason}")
        w, rep = moefy_layer(f, st, experts, top_k, router, seed)
        _rewrite(graph, f, w, experts, top_k)
        n = f.fc1.weight.size * (2 if f.gated else 1) + f.fc2.weight.size
        ffn_params += n
        used += n * top_k / experts + w["router_weight"].size
        layers.append(rep)
    if not layers:
        raise PassError("no FFN with a relu/gelu/silu (or gated) activation to MoEfy")
    graph.cleanup().toposort()
    out = lowering_meta.finish(export_model(graph), model, graph)  # earlier lowerings kept
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend([o for o in model.opset_import if o.domain != DOMAIN])
    out.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    report = {
        "experts": experts,
        "top_k": top_k,
        "router": router,
        "ffn_params_used_per_token": round(used / ffn_params, 4),
        "layers": layers,
    }
    return out, report


def _rewrite(graph: gs.Graph, f: FFN, w: dict, experts: int, top_k: int) -> None:
    """FFN f -> router MatMul/Add, FfnxMoE, and the down bias Add, producing f.y."""
    p = f"{f.fc2.nodes[0].name or f.y.name}/moe"
    x, y = f.x, f.y
    for n in f.nodes:
        n.outputs.clear()

    def const(key: str, value=None) -> gs.Constant:
        return gs.Constant(f"{p}/{key}", np.ascontiguousarray(w[key] if value is None else value))

    def add(op: str, name: str, ins: list, out: gs.Variable, **kw) -> None:
        node_name = f"{p}/{name}" if name else p
        graph.nodes.append(gs.Node(op, node_name, inputs=ins, outputs=[out], **kw))

    scores = gs.Variable(f"{p}/router_matmul", np.float32)
    logits = gs.Variable(f"{p}/router_logits", np.float32)
    add("MatMul", "router", [x, const("router_weight_t", w["router_weight"].T)], scores)
    add("Add", "router_bias", [scores, const("router_bias")], logits)
    b1 = const("fc1_bias") if w["fc1_bias"] is not None else gs.Variable.empty()
    attrs = {
        **MOE.defaults(),
        "num_experts": experts,
        "top_k": top_k,
        "scoring": "topk_softmax",
        "routed_scaling_factor": float(top_k),
        "activation": GATED_ACTIVATION[f.kind] if f.gated else f.kind,
    }
    moe_out = y if f.fc2.bias is None else gs.Variable(f"{p}/output", y.dtype)
    ins = [x, logits, const("fc1_weight"), b1, const("fc2_weight")]
    add(MOE.op_type, "", ins, moe_out, attrs=attrs, domain=DOMAIN)
    if f.fc2.bias is not None:
        add("Add", "down_bias", [moe_out, const("down_bias", f.fc2.bias.astype(np.float32))], y)


def output_error(dense: onnx.ModelProto, moe: onnx.ModelProto, feeds: list[dict]) -> dict:
    """max_abs, relative L2 error and cosine of `moe`'s outputs against `dense` on `feeds`."""
    from ffnx.graph.verify import output_metrics, worst
    from ffnx.lowering import run_model

    ref, got = run_model(dense, feeds), run_model(moe, feeds)
    num = den = dot = nrm = 0.0
    per_output = [{k: output_metrics(r[k], g[k]) for k in r} for r, g in zip(ref, got)]
    for r, g in zip(ref, got):
        for k in r:
            a, b = np.asarray(r[k], np.float64), np.asarray(g[k], np.float64)
            num += float(((a - b) ** 2).sum())
            den += float((a * a).sum())
            dot += float((a * b).sum())
            nrm += float((b * b).sum())
    return {
        "max_abs": worst(per_output)["max_abs"],  # the one comparator's (verify) metrics
        "max_rel": worst(per_output)["max_rel"],
        "rel_l2": (num / den) ** 0.5 if den else 0.0,
        "cosine": dot / (den * nrm) ** 0.5 if den and nrm else 1.0,
    }
