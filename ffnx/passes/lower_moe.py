"""lower_moe: replace each ffnx::FfnxMoE node by the ONNX Runtime lowering chosen for it.

Pattern: one FfnxMoE node. Check: the expert weights have static 3-D shapes. Rewrite: the
lowering `ffnx.lowering.choose` picks for the layer (measured on this machine per shape
signature and cached, or forced by options): `sorted`, `gather`, `dense` (standard ONNX),
`ort_moe` (com.microsoft::MoE), an `If` on the token count between two of them, or with
options["quantize_experts"] = "int4"/"int8" the weight-only quantized `sorted_int4/8`
(MatMulNBits experts) / `qmoe_int4/8` (com.microsoft::QMoE).

Exactness: every float lowering computes the schema's math with the sums reordered (fp32
rounding only). Quantized experts are not exact: `is_exact(ctx)` says so, and the pass notes
give each quantized layer's max abs error and cosine against its fp32 lowering (random inputs).

In a KV-cache decoder (past_key_values inputs) the choice is made for decode steps: the
fastest form at one token per row, no `If` on T (`ffnx.lowering.choose.decide_decode`).

Target "trt" keeps every FfnxMoE node: TensorRT runs it as the ffnx plugin.
The choice per layer goes to `PassResult.notes["layers"]`, to the lowered nodes' names
(`<layer>/<lowering>/...`) and to the model's metadata_props (`ffnx.graph.lowering_meta`;
`ffnx inspect` shows them, `ffnx.lowering.lowering_report` reads them back).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ffnx.graph.opsets import MS_DOMAIN
from ffnx.lowering import LoweringError, lower_moe_node
from ffnx.lowering.choose import RULE, choose
from ffnx.lowering.moe_common import MoESite
from ffnx.passes.base import GraphPass, Match, PassContext, PassResult
from ffnx.plugins.schema import DOMAIN

BRANCH_TOL = 1e-4  # relative max abs error of an If lowering against `sorted` (fp32 reorderings)


class LowerMoE(GraphPass):
    """Lower FfnxMoE nodes to the fastest ONNX Runtime form measured for each layer."""

    name = "lower_moe"

    def match(self, graph: gs.Graph) -> list[Match]:
        return [Match([n]) for n in graph.nodes if n.op == "FfnxMoE" and n.domain == DOMAIN]

    def check(self, graph: gs.Graph, m: Match) -> str | None:
        try:
            m.info["site"] = MoESite.of(m.nodes[0])
        except LoweringError as e:
            return str(e)
        return None

    @staticmethod
    def is_exact(ctx: PassContext) -> bool:
        """False when the options quantize the experts (verify by --max-error then)."""
        return not ctx.options.get("quantize_experts")

    def prepare(self, graph: gs.Graph, ctx: PassContext, matches: list[Match]) -> str | dict:
        if ctx.target == "trt":
            return "kept for the TensorRT plugin (ffnx::FfnxMoE runs as one plugin layer)"
        return {}

    def note(self, res: PassResult, m: Match) -> None:
        res.notes.setdefault("layers", {})[m.nodes[0].name] = m.info["note"]

    def finish(self, graph, ctx: PassContext, res: PassResult, matches, state) -> None:
        if ctx.target == "trt":
            res.notes = {"target": "trt", "kept": [m.nodes[0].name for m in matches]}
            return
        layers = res.notes.get("layers", {})
        if any(_uses_contrib(note["lowering"]) for note in layers.values()):
            graph.import_domains = _with_domain(graph.import_domains, MS_DOMAIN)
        res.notes = {"target": ctx.target, "layers": layers}

    def rewrite(self, graph: gs.Graph, m: Match, ctx: PassContext) -> None:
        site = m.info["site"]
        options = ctx.options
        if "decode" not in options and is_kv_decoder(graph):
            options = {**options, "decode": True}  # no If; fastest at one token per row
        choice = choose(site, options)
        note = {"lowering": choice.lowering, "why": choice.why}
        if choice.timings:
            note["timings_ms"] = {
                str(T): {c: round(v * 1e3, 4) for c, v in d.items()}
                for T, d in choice.timings.items()
            }
        if choice.skipped:
            note["not_applicable"] = choice.skipped
        if ctx.options.get("quantize_experts"):
            note["quantization_error"] = quantization_error(m.nodes[0], choice.lowering)
        elif "|" in choice.lowering:
            # The driver verifies at the sample shapes, which reach one branch of the If: check
            # every branch here, on this layer alone, at the token counts around each switch.
            errors = branch_errors(m.nodes[0], choice.lowering)
            note["branches_max_abs"] = errors
            bad = {T: e for T, e in errors.items() if not e <= BRANCH_TOL}
            if bad:
                note["why"] = f"{RULE}: the If {choice.lowering} disagreed with {RULE} at T={bad}"
                choice.lowering = note["lowering"] = RULE
        lower_moe_node(graph, m.nodes[0], choice.lowering, why=note["why"].split(";")[0])
        m.info["note"] = note


def is_kv_decoder(graph: gs.Graph) -> bool:
    """Whether the graph is a KV-cache decoder (`ffnx export hf:DIR`'s past_key_values.N.*
    inputs): its MoE layers then run mostly one token per row (`choose`'s "decode")."""
    return any(t.name.startswith("past_key_values.") for t in graph.inputs)


def _uses_contrib(lowering: str) -> bool:
    return any(p.startswith(("ort_moe", "qmoe_", "sorted_int")) for p in lowering.split("|"))


def _with_domain(domains, name: str):
    from onnx import helper

    domains = list(domains or [])
    if not any(d.domain == name for d in domains):
        domains.append(helper.make_opsetid(name, 1))
    return domains


def _layer_feeds(model, tokens: int, rng) -> dict[str, np.ndarray]:
    """Random feeds of a one-layer model: N(0, 1) hidden states and logits, valid token ids."""
    feeds = {}
    for vi in model.graph.input:
        dims = [tokens] + [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]
        if vi.name == "token_ids":
            vocab = next(i.dims[0] for i in model.graph.initializer if i.name == "hash_table")
            feeds[vi.name] = rng.integers(0, vocab, dims).astype(np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def quantization_error(node: gs.Node, lowering: str, tokens: int = 64, seed: int = 0) -> dict:
    """max abs and cosine of the quantized lowering against the fp32 `sorted` lowering of the
    same layer (its real weights) on random N(0, 1) hidden states and router logits."""
    from ffnx.lowering.moe_model import site_model
    from ffnx.lowering.quantize import error_metrics
    from ffnx.lowering.timing import lowered_model, ort_session

    model = site_model(node)
    feeds = _layer_feeds(model, tokens, np.random.default_rng(seed))
    ref, got = (
        ort_session(lowered_model(model, c)).run(None, feeds)[0] for c in ("sorted", lowering)
    )
    return error_metrics(ref, got)


def branch_errors(node: gs.Node, lowering: str, seed: int = 0) -> dict[int, float]:
    """{T: max |If lowering - sorted| / max |sorted|} of this layer (its real weights) at T = 1
    and on both sides of every switch of `lowering` ("a|16|b": T = 16 and 17), so that every
    branch of the If is run."""
    from ffnx.graph.verify import output_metrics
    from ffnx.lowering.moe_model import site_model
    from ffnx.lowering.timing import lowered_model, ort_session

    model = site_model(node)
    cuts = [int(p) for p in lowering.split("|")[1::2]]
    points = sorted({1, *cuts, *(c + 1 for c in cuts)})
    ref, got = (ort_session(lowered_model(model, c)) for c in (RULE, lowering))
    rng, out = np.random.default_rng(seed), {}
    for T in points:
        feeds = _layer_feeds(model, T, rng)
        a, b = ref.run(None, feeds)[0], got.run(None, feeds)[0]
        out[T] = output_metrics(a, b)["max_rel"]  # the one comparator's scale-relative error
    return out


PASS = LowerMoE()
