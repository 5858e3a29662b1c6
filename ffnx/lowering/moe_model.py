"""Single-node FfnxMoE models with random weights: what the lowering chooser times, and what the
tests and `benchmarks/moe.py` lower and compare.

The model has inputs hidden [T, D] and router_logits [T, E] (token_ids [T] for hash routing),
weights as initializers, and one `ffnx::FfnxMoE` node. With a "router_weight" [E, D] among the
weights, the logits are computed in the graph (hidden @ router_weight.T) instead of fed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ffnx.plugins.schema import (
    CLAMPED_ATTRS,
    CLAMPED_DEFAULTS,
    CLAMPED_SWIGLU,
    DOMAIN,
    DOMAIN_VERSION,
    GATED_ACTIVATIONS,
    GROUP_ATTRS,
    MOE,
)


@dataclass(frozen=True)
class MoEConfig:
    D: int = 16
    H: int = 8
    E: int = 4
    k: int = 2
    activation: str = "swiglu"
    scoring: str = "softmax"
    normalize: int = 0
    routed_scaling_factor: float = 1.0
    bias: bool = False  # fc1/fc2 biases
    score_bias: bool = False
    hash: bool = False  # routing_mode="hash" with a [V, k] table
    vocab: int = 64
    shared: int = 0  # shared-expert width Hs (0: none)
    shared_gate: bool = False
    n_group: int = 1  # group-limited routing when > 1 (schema MOE)
    topk_group: int = 0
    group_scoring: str = "top2_sum"
    activation_alpha: float = CLAMPED_DEFAULTS["activation_alpha"]  # clamped_swiglu only
    activation_limit: float = CLAMPED_DEFAULTS["activation_limit"]

    @property
    def H1(self) -> int:
        return 2 * self.H if self.activation in GATED_ACTIVATIONS else self.H

    def signature(self) -> dict:
        """The fields as a dict; without the group ones when n_group = 1 and alpha / limit unless
        clamped_swiglu (older cache keys)."""
        out = asdict(self)
        if self.n_group == 1:
            for name in GROUP_ATTRS:
                del out[name]
        if self.activation != CLAMPED_SWIGLU:
            for name in CLAMPED_ATTRS:
                del out[name]
        return out


def moe_weights(cfg: MoEConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights scaled so activations stay O(1) (fp32 comparisons stay meaningful)."""
    rng = np.random.default_rng(seed)
    E, D, H, H1 = cfg.E, cfg.D, cfg.H, cfg.H1

    def rand(*shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    w = {"fc1_weight": rand(E, H1, D, fan_in=D), "fc2_weight": rand(E, D, H, fan_in=H)}
    if cfg.bias:
        w["fc1_bias"], w["fc2_bias"] = rand(E, H1, fan_in=4), rand(E, D, fan_in=4)
    if cfg.score_bias:
        w["score_bias"] = rand(E, fan_in=16)
    if cfg.hash:
        w["hash_table"] = np.stack([rng.permutation(E)[: cfg.k] for _ in range(cfg.vocab)])
        w["hash_table"][:, :] %= max(E - 1, 1)  # expert E-1 is never chosen (an empty expert)
    if cfg.shared:
        hs1 = 2 * cfg.shared if cfg.activation in GATED_ACTIVATIONS else cfg.shared
        w["shared_fc1_weight"] = rand(hs1, D, fan_in=D)
        w["shared_fc2_weight"] = rand(D, cfg.shared, fan_in=cfg.shared)
        if cfg.shared_gate:
            w["shared_gate_weight"] = rand(1, D, fan_in=D)
    return w


def moe_model(
    cfg: MoEConfig, weights: dict[str, np.ndarray], opset: int = 18, name: str = "moe"
) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("hidden", onnx.TensorProto.FLOAT, ["T", cfg.D])]
    feed_names = {"hidden"}
    if cfg.hash:
        inputs.append(helper.make_tensor_value_info("token_ids", onnx.TensorProto.INT64, ["T"]))
        feed_names.add("token_ids")
    elif "router_weight" not in weights:
        inputs.append(
            helper.make_tensor_value_info("router_logits", onnx.TensorProto.FLOAT, ["T", cfg.E])
        )
    nodes = []
    if "router_weight" in weights:
        nodes.append(
            helper.make_node(
                "Gemm", ["hidden", "router_weight"], ["router_logits"], name="router", transB=1
            )
        )
    if not cfg.hash:
        feed_names.add("router_logits")
    order = [p.name for p in MOE.inputs]
    present = feed_names | set(weights) - {"router_weight"}
    last = max(i for i, n in enumerate(order) if n in present)
    groups = {a: getattr(cfg, a) for a in GROUP_ATTRS} if cfg.n_group > 1 else {}
    if cfg.activation == CLAMPED_SWIGLU:
        groups.update({a: float(getattr(cfg, a)) for a in CLAMPED_ATTRS})
    node = helper.make_node(
        "FfnxMoE",
        [n if n in present else "" for n in order[: last + 1]],
        ["output"],
        name=name,
        domain=DOMAIN,
        num_experts=cfg.E,
        top_k=cfg.k,
        routing_mode="hash" if cfg.hash else "router",
        scoring=cfg.scoring,
        normalize=cfg.normalize,
        routed_scaling_factor=float(cfg.routed_scaling_factor),
        activation=cfg.activation,
        **groups,
        plugin_namespace="ffnx",
        plugin_version="1",
    )
    out = helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["T", cfg.D])
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    graph = helper.make_graph([*nodes, node], "moe", inputs, [out], inits)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
    )


def moe_feeds(cfg: MoEConfig, T: int, seed: int = 1, uneven: bool = False) -> dict[str, np.ndarray]:
    """Random inputs for T tokens; `uneven`: expert 0 is preferred and expert E-1 never chosen."""
    rng = np.random.default_rng(seed)
    feeds = {"hidden": rng.standard_normal((T, cfg.D)).astype(np.float32)}
    if cfg.hash:
        feeds["token_ids"] = rng.integers(0, cfg.vocab, T).astype(np.int64)
        return feeds
    logits = rng.standard_normal((T, cfg.E)).astype(np.float32)
    if uneven:
        logits[:, 0] += 2.0
        logits[:, -1] = -30.0
    feeds["router_logits"] = logits
    return feeds


def site_model(node) -> onnx.ModelProto:
    """A float32 single-node model of one FfnxMoE gs node with its constant inputs (its hidden,
    router_logits and token_ids become graph inputs named as in `moe_model`)."""
    import onnx_graphsurgeon as gs

    from ffnx.graph.tensors import const

    names = [p.name for p in MOE.inputs]
    feeds = {"hidden": np.float32, "router_logits": np.float32, "token_ids": np.int64}
    inputs, ins = [], []
    for name, t in zip(names, node.inputs):
        if name in feeds and t.name:
            last = [t.shape[-1]] if t.shape and name != "token_ids" else []
            v = gs.Variable(name, dtype=feeds[name], shape=["T", *last])
            inputs.append(v)
            ins.append(v)
        elif t.name:
            v = const(t)
            if v is None:
                raise ValueError(f"{node.name}: input {name} is not constant")
            ins.append(gs.Constant(name, v.astype(np.float32) if v.dtype.kind == "f" else v))
        else:
            ins.append(gs.Variable.empty())
    out = gs.Variable("output", dtype=np.float32)
    graph = gs.Graph(
        nodes=[gs.Node("FfnxMoE", node.name, dict(node.attrs), ins, [out], DOMAIN)],
        inputs=inputs,
        outputs=[out],
        opset=18,
    )
    model = gs.export_onnx(graph)
    model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model
