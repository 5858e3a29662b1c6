"""Op schemas: the single source that export, graph passes, ORT lowerings, CUDA kernels and the
TensorRT plugins all read. Pure Python data (no torch/onnx import), so the runtime can use it.

Naming: TensorRT's ONNX parser maps an unknown node to a plugin by ``op_type`` plus the node
attributes ``plugin_version`` / ``plugin_namespace`` and ignores the domain
(onnx-tensorrt ``builtin_op_importers.cpp``: ``importFallbackPluginImporter``). ONNX Runtime
dispatches on (domain, op_type). So every ffnx node carries domain ``ffnx``, an op_type that
collides with no ONNX or com.microsoft op (``FfnxMoE``, not ``MoE``) and both plugin attributes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ffnx.runtime.plugin_library import PLUGIN_NAMESPACE, PLUGIN_VERSION  # noqa: F401

DOMAIN = "ffnx"
DOMAIN_VERSION = 1


@dataclass(frozen=True)
class Port:
    name: str
    shape: str  # symbolic, e.g. "[T, D]"; "*" means any number of leading dims
    dtypes: tuple[str, ...]
    doc: str
    optional: bool = False


@dataclass(frozen=True)
class Attr:
    name: str
    kind: str  # "int" | "float" | "string"
    default: object
    doc: str
    choices: tuple = ()


@dataclass(frozen=True)
class OpSchema:
    op_type: str
    doc: str
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attributes: tuple[Attr, ...] = field(default_factory=tuple)

    def input_index(self, name: str) -> int:
        return [p.name for p in self.inputs].index(name)

    def attr(self, name: str) -> Attr:
        return {a.name: a for a in self.attributes}[name]

    def defaults(self) -> dict:
        return {a.name: a.default for a in self.attributes}


FLOAT = ("float32", "float16", "bfloat16")
PLUGIN_ATTRS = (
    Attr("plugin_namespace", "string", PLUGIN_NAMESPACE, "TensorRT plugin namespace"),
    Attr("plugin_version", "string", PLUGIN_VERSION, "TensorRT plugin version"),
)

# Activations. Gated ones read fc1 rows [0, H) as gate and [H, 2H) as up (not interleaved):
#   swiglu: silu(g) * u   geglu: gelu(g) * u (erf)   reglu: relu(g) * u
#   clamped_swiglu (GPT-OSS, FfnxMoE only): g' = min(g, limit), u' = clamp(u, -limit, limit),
#     g' * sigmoid(alpha * g') * (u' + 1); alpha, limit = attributes activation_alpha /
#     activation_limit. act(0, 0) = 0 * sigmoid(0) * 1 = 0 (for limit >= 0), so zero padding
#     stays exact.
# The one activation table: a gated activation -> the activation of its gate, and back.
BASE_ACTIVATION = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
GATED_ACTIVATION = {base: gated for gated, base in BASE_ACTIVATION.items()}
CLAMPED_SWIGLU = "clamped_swiglu"
CLAMPED_DEFAULTS = {"activation_alpha": 1.702, "activation_limit": 7.0}  # GPT-OSS's
CLAMPED_ATTRS = tuple(CLAMPED_DEFAULTS)
GATED_ACTIVATIONS = tuple(BASE_ACTIVATION) + (CLAMPED_SWIGLU,)
ACTIVATIONS = tuple(BASE_ACTIVATION) + ("gelu", "relu", "silu")  # every op's (FfnxSparseFFN)
MOE_ACTIVATIONS = ACTIVATIONS + (CLAMPED_SWIGLU,)  # FfnxMoE's
GROUP_SCORINGS = ("top2_sum", "max")

MOE = OpSchema(
    op_type="FfnxMoE",
    doc=(
        "Mixture-of-Experts FFN, one node per MoE layer.\n"
        "Routing (routing_mode='router'): s = router_logits [T, E].\n"
        "  scoring='softmax':       p = softmax(s); idx = topk(p + score_bias, k); w = p[idx]\n"
        "  scoring='topk_softmax':  idx = topk(s, k); w = softmax(s[idx])\n"
        "  scoring='sigmoid':       p = sigmoid(s); idx = topk(p + score_bias, k); w = p[idx]\n"
        "  normalize=1: w = w / sum(w) (before scaling); then w *= routed_scaling_factor.\n"
        "Routing (routing_mode='hash'): idx = hash_table[token_ids] [T, k]; w = 1/k each.\n"
        "Group-limited routing (router mode, n_group > 1; DeepSeek-V2/V3, R1): idx is chosen\n"
        "from the selection scores sel (softmax, sigmoid: p + score_bias; topk_softmax: s)\n"
        "restricted to the best groups. The E experts form n_group contiguous groups of\n"
        "G = E/n_group; a group's score is the sum of its two largest sel (group_scoring=\n"
        "'top2_sum', DeepSeek-V3) or its largest sel ('max', DeepSeek-V2 group_limited_greedy);\n"
        "the topk_group best groups (0: all) are kept, every other expert's sel becomes -inf,\n"
        "then idx = topk(sel, k) as above. w still comes from the unmasked p (topk_softmax:\n"
        "softmax(s[idx])). Needs E % n_group == 0, 1 <= topk_group <= n_group,\n"
        "k <= topk_group * G, and G >= 2 for top2_sum. Exporters write the three group\n"
        "attributes only when n_group > 1.\n"
        "Experts: h_e = act(x @ fc1_weight[e].T + fc1_bias[e]); y_e = h_e @ fc2_weight[e].T + "
        "fc2_bias[e]. Output y = sum_j w_j * y_{idx_j} + shared(x), where shared is one dense FFN "
        "with the same activation (several shared experts are concatenated into one wide FFN) "
        "optionally scaled by sigmoid(x @ shared_gate_weight.T).\n"
        "Heterogeneous expert widths (Duo-LLM small/big, skip) are zero-padded to the widest "
        "expert: act(0) = 0 for every activation here, so padding is exact; a skip expert is "
        "all-zero.\n"
        "activation='clamped_swiglu' (GPT-OSS): with gate g and up u the two halves of h,\n"
        "  g' = min(g, limit), u' = min(max(u, -limit), limit), act = g' * sigmoid(alpha * g')"
        " * (u' + 1)\n"
        "(alpha = activation_alpha, limit = activation_limit; exporters write both only for this\n"
        "activation)."
    ),
    inputs=(
        Port("hidden", "[*, D]", FLOAT, "token hidden states"),
        Port("router_logits", "[*, E]", FLOAT, "router logits (empty for hash routing)", True),
        Port("fc1_weight", "[E, H1, D]", FLOAT, "H1 = 2H for gated activations ([gate; up])"),
        Port("fc1_bias", "[E, H1]", FLOAT, "", True),
        Port("fc2_weight", "[E, D, H]", FLOAT, "down projection"),
        Port("fc2_bias", "[E, D]", FLOAT, "", True),
        Port("score_bias", "[E]", ("float32",), "selection-only bias (softmax, sigmoid)", True),
        Port("token_ids", "[*]", ("int64",), "token ids (hash routing)", True),
        Port("hash_table", "[V, k]", ("int64",), "expert ids per token id (hash routing)", True),
        Port("shared_fc1_weight", "[Hs1, D]", FLOAT, "shared experts' fc1 (concatenated)", True),
        Port("shared_fc2_weight", "[D, Hs]", FLOAT, "shared experts' fc2 (stacked)", True),
        Port("shared_gate_weight", "[1, D]", FLOAT, "sigmoid gate on the shared output", True),
    ),
    outputs=(Port("output", "[*, D]", FLOAT, "same shape and dtype as hidden"),),
    attributes=(
        Attr("num_experts", "int", 0, "E"),
        Attr("top_k", "int", 2, "experts per token"),
        Attr("routing_mode", "string", "router", "", ("router", "hash")),
        Attr("scoring", "string", "softmax", "", ("softmax", "topk_softmax", "sigmoid")),
        Attr("normalize", "int", 0, "renormalise the top-k weights to sum 1", (0, 1)),
        Attr("routed_scaling_factor", "float", 1.0, "multiplies the routing weights"),
        Attr("activation", "string", "swiglu", "", MOE_ACTIVATIONS),
        Attr("n_group", "int", 1, "expert groups (group-limited routing when > 1)"),
        Attr("topk_group", "int", 0, "groups kept per token (0: all)"),
        Attr("group_scoring", "string", "top2_sum", "a group's score", GROUP_SCORINGS),
        Attr(
            "activation_alpha",
            "float",
            CLAMPED_DEFAULTS["activation_alpha"],
            "clamped_swiglu: alpha in g * sigmoid(alpha * g)",
        ),
        Attr(
            "activation_limit",
            "float",
            CLAMPED_DEFAULTS["activation_limit"],
            "clamped_swiglu: gate <= limit, |up| <= limit",
        ),
        *PLUGIN_ATTRS,
    ),
)
GROUP_ATTRS = ("n_group", "topk_group", "group_scoring")


def written_attrs(attrs: dict) -> list[str]:
    """The FfnxMoE attribute names an exporter writes for `attrs` (schema defaults for missing
    ones): the group attributes only for n_group > 1, alpha / limit only for clamped_swiglu, so
    every other node is as before they existed."""
    a = {**MOE.defaults(), **attrs}
    skip = set() if int(a["n_group"]) > 1 else set(GROUP_ATTRS)
    if a["activation"] != CLAMPED_SWIGLU:
        skip |= set(CLAMPED_ATTRS)
    return [x.name for x in MOE.attributes if x.name not in skip]


def group_limited(attrs: dict) -> bool:
    """Whether FfnxMoE attributes restrict the choice to some groups (n_group > 1 and
    0 < topk_group < n_group); n_group = 1, topk_group = 0 or topk_group = n_group keep all."""
    n, tg = int(attrs.get("n_group", 1)), int(attrs.get("topk_group", 0))
    return n > 1 and 0 < tg < n


def group_error(attrs: dict) -> str | None:
    """Why FfnxMoE attributes (schema defaults for missing ones; num_experts must be the real E)
    are not a valid group routing, or None. n_group = 1 (no groups) is always valid."""
    a = {**MOE.defaults(), **attrs}
    n, tg, E, k = (int(a[x]) for x in ("n_group", "topk_group", "num_experts", "top_k"))
    if n < 1:
        return f"n_group={n} must be >= 1"
    if n == 1:
        return None
    tg = tg or n
    if a["routing_mode"] != "router":
        return f"n_group={n} needs routing_mode='router'"
    if a["group_scoring"] not in GROUP_SCORINGS:
        return f"group_scoring {a['group_scoring']!r} is not one of {GROUP_SCORINGS}"
    if E % n:
        return f"num_experts={E} is not a multiple of n_group={n}"
    if not 1 <= tg <= n:
        return f"topk_group={tg} must be in [1, n_group={n}]"
    if k > tg * (E // n):
        return f"top_k={k} exceeds the {tg * (E // n)} experts of topk_group={tg} groups"
    if a["group_scoring"] == "top2_sum" and E // n < 2:
        return f"group_scoring='top2_sum' needs >= 2 experts per group, got {E // n}"
    return None


SPARSE_FFN = OpSchema(
    op_type="FfnxSparseFFN",
    doc=(
        "Activation-sparse FFN, one node per FFN.\n"
        "Gated: a = act(x @ w_gate.T); non-gated: a = act(x @ w_up.T + b_up).\n"
        "mode='threshold' (CHESS): keep channel c where |a_c| > thresholds[c].\n"
        "mode='topk' (Lazy Neuron): keep the k largest |a_c| per token.\n"
        "Gated: y = (mask * a * (x @ w_up.T)) @ w_down.T + b_down; only kept rows of w_up and "
        "columns of w_down are read. Non-gated: y = (mask * a) @ w_down.T + b_down."
    ),
    inputs=(
        Port("hidden", "[*, D]", FLOAT, "token hidden states"),
        Port("w_gate", "[H, D]", FLOAT, "gate projection (gated FFNs)", True),
        Port("w_up", "[H, D]", FLOAT, "up projection"),
        Port("b_up", "[H]", FLOAT, "", True),
        Port("w_down", "[D, H]", FLOAT, "down projection"),
        Port("b_down", "[D]", FLOAT, "", True),
        Port("thresholds", "[H]", ("float32",), "per-channel |activation| thresholds", True),
    ),
    outputs=(Port("output", "[*, D]", FLOAT, "same shape and dtype as hidden"),),
    attributes=(
        Attr("mode", "string", "threshold", "", ("threshold", "topk")),
        Attr("k", "int", 0, "kept channels per token (mode='topk')"),
        Attr("activation", "string", "relu", "", ACTIVATIONS),
        *PLUGIN_ATTRS,
    ),
)

OPS: dict[str, OpSchema] = {s.op_type: s for s in (MOE, SPARSE_FFN)}


def schema_markdown() -> str:
    """Render every schema as Markdown (docs and `ffnx plugins --schemas`)."""
    out = []
    for s in OPS.values():
        out.append(
            f"## `{DOMAIN}::{s.op_type}`\n\n{s.doc}\n\n"
            "| input | shape | dtypes | |\n|---|---|---|---|"
        )
        for p in s.inputs:
            opt = " (optional)" if p.optional else ""
            out.append(f"| {p.name}{opt} | {p.shape} | {', '.join(p.dtypes)} | {p.doc} |")
        out.append("\n| attribute | kind | default | |\n|---|---|---|---|")
        for a in s.attributes:
            ch = f" one of {a.choices}" if a.choices else ""
            out.append(f"| {a.name} | {a.kind} | {a.default!r} | {a.doc}{ch} |")
        out.append("")
    return "\n".join(out)
