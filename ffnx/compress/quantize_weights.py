"""Whole-model weight-only int4/int8: every linear -> `com.microsoft::MatMulNBits` (block 32).

The quantizer is ONNX Runtime's own `matmul_nbits_quantizer` (the field's standard: the
onnxruntime-genai model builder uses it, so ffnx's int4 and genai's int4 hold the same bytes),
symmetric, RTN, block 32 along K, no zero points (ORT then uses 2^(bits-1)):

  w_m     = the element of block b (32 consecutive k of one output n) with the largest |w|
  scale_b = -w_m / 2^(bits-1)      (w_m lands exactly on -2^(bits-1); 16 / 256 levels used)
  q       = clip(round(W / scale_b), -2^(bits-1), 2^(bits-1) - 1) + 2^(bits-1)   (uint, packed
            along K LSB first: `ffnx.lowering.quantize.unpack` reads it)
  y       = x @ W~ (+ bias),   W~[k, n] = (q[k, n] - 2^(bits-1)) * scale_b

Measured on the tiny random Qwen3 of the tests, int4: logits cosine 0.9925 with ORT's scale
against 0.9908 with `ffnx.lowering.quantize`'s max|w| / 7 (15 levels), so ORT's is used; the MoE
experts keep that module's packing (QMoE / MatMulNBits expert lowerings, `lower_moe`).

The rewrite is exact against the graph whose weights are W~ with accuracy_level 0 (fp32
activations); the default 4 also quantizes activations to int8 per block inside the kernel, ORT's
fast CPU path (see `ffnx.lowering.moe_ort.ACCURACY_LEVEL`). Against the fp32 graph it is
approximate: `decoder_accuracy` measures greedy-token agreement and logits cosine.

A linear is a MatMul whose B is a rank-2 fp32 initializer (or the Transpose of one), or a Gemm
with alpha = beta = 1, transA = 0 and constant B and bias (rewritten MatMul + Add first, exact).
Kept fp32: routers (a linear whose output reaches, through Reshape/Cast/Softmax/Sigmoid/Add, a
TopK or the router input of MoE/QMoE: a flipped expert choice costs more than their few bytes
save) and an untied embedding table (a Gather reads one row per token). The LM head is
quantized, tied or not: on the issue's Qwen3 it is 28 % of the weight bytes read per token, so
leaving it fp32 would cap int4 decode near 2.7x fp32.

Tied embeddings (the head is Transpose(E) of the table E [V, K] a Gather reads): the head's
MatMulNBits holds E's rows quantized along K in blocks, which is exactly the layout of
`com.microsoft::GatherBlockQuantized` (gather_axis 0, quantize_axis 1, the same block, no zero
points: 2^(bits-1) in both), so the Gather becomes one reading the head's bytes through two
Reshapes (data [V, K*bits/8], scales [V, K/block]) and the fp32 table is dropped, as
onnxruntime-genai's builder does: Qwen3-0.6B's int4 artifact loses its 622 MB fp32 table. The
embedding rows are then the dequantized W~ (exact against that W~; `decoder_accuracy` measures
the whole against fp32). `share_embedding=False` keeps the fp32 table.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ffnx.graph.export import hoist_branch_initializers
from ffnx.graph.ffn_match import ROUTE_THROUGH
from ffnx.graph.model_io import tensor_bytes
from ffnx.graph.opsets import MS_DOMAIN
from ffnx.lowering.moe_ort import ACCURACY_LEVEL
from ffnx.lowering.quantize import BITS

SCHEMES = tuple(BITS)  # "int4", "int8"


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_router(out: str, consumers: dict[str, list], depth: int = 5) -> bool:
    for node in consumers.get(out, []):
        if node.op_type == "TopK" or (node.op_type in ("MoE", "QMoE") and node.input[1] == out):
            return True
        if depth and node.op_type in ROUTE_THROUGH:
            if any(_is_router(o, consumers, depth - 1) for o in node.output):
                return True
    return False


def _weight(node, inits: dict, producers: dict) -> np.ndarray | str | None:
    """W [K, N] a linear applies (None: not a linear; a string: why it stays fp32)."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        return None
    x, b = node.input[0], node.input[1]
    if x in inits:
        return None
    w = None
    if b in inits:
        w = numpy_helper.to_array(inits[b])
    elif b in producers and producers[b].op_type == "Transpose":
        t = producers[b]
        if t.input[0] in inits and list(_attrs(t).get("perm", [1, 0])) == [1, 0]:
            w = numpy_helper.to_array(inits[t.input[0]]).T
    if w is None or w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        a = _attrs(node)
        if a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0):
            return "Gemm with alpha/beta != 1 or transA"
        if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
            return "Gemm bias is not an initializer"
        w = w.T if a.get("transB", 0) else w
    return w if w.dtype == np.float32 else f"weight dtype {w.dtype}"


def _normalized(model: onnx.ModelProto):
    """-> (copy of model with every quantizable linear as MatMul(x, W [K, N] initializer) [+ Add],
    {name of each of those MatMuls: fp32 bytes of its W}, kept [{node, reason}]). Gemm -> MatMul +
    Add is exact."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in _all_nodes(g):  # If branches (lowered MoE) read outer tensors by name
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    gathered = {n.input[0] for n in g.node if n.op_type == "Gather"
                and _attrs(n).get("axis", 0) == 0 and n.input[0] in inits}  # fmt: skip
    nodes, targets, kept, made, tied = [], {}, [], {}, {}
    for k, node in enumerate(g.node):
        w = _weight(node, inits, producers)
        name = node.name or f"linear_{k}"
        if w is None:
            nodes.append(node)
            continue
        if isinstance(w, str) or _is_router(node.output[0], consumers):
            kept.append({"node": name, "reason": w if isinstance(w, str) else "router"})
            nodes.append(node)
            continue
        b = node.input[1]
        if b not in inits or node.op_type == "Gemm":  # a fresh [K, N] initializer
            b = made.setdefault((b, node.op_type, str(_attrs(node).get("transB", 0))),
                                f"{name}/weight")  # fmt: skip
            if b not in inits:
                inits[b] = numpy_helper.from_array(np.ascontiguousarray(w), b)
                g.initializer.append(inits[b])
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        y = f"{node.output[0]}/matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [y], name=name))
        if bias:
            nodes.append(helper.make_node("Add", [y, bias], list(node.output), name=f"{name}/bias"))
        targets[name] = int(w.nbytes)
        t = producers.get(node.input[1])
        if node.op_type == "MatMul" and t is not None and t.op_type == "Transpose" \
                and t.input[0] in gathered:  # fmt: skip
            tied[y] = t.input[0]  # the head's output -> the embedding table it transposes
    del g.node[:]
    g.node.extend(nodes)
    return out, targets, kept, tied


def share_tied_embedding(g, tied: dict[str, str], bits: int, block: int) -> list[str]:
    """Gather(E) -> GatherBlockQuantized on the bytes of the MatMulNBits head that reads E^T
    (module docstring), for every tied table; -> the tables shared."""
    heads = {n.output[0]: n for n in g.node if n.op_type == "MatMulNBits"}
    inits = {i.name: i for i in g.initializer}
    done = []
    for out, table in tied.items():
        head = heads.get(out)
        if head is None or len(head.input) > 3 and head.input[3]:
            continue  # not quantized, or with zero points (asymmetric)
        a = _attrs(head)
        b, s = inits.get(head.input[1]), inits.get(head.input[2])
        V, K = (int(d) for d in inits[table].dims)
        if b is None or s is None or (a["N"], a["K"], a["bits"]) != (V, K, bits) \
                or a["block_size"] != block:  # fmt: skip
            continue
        new = []
        for n in g.node:
            if n.op_type == "Gather" and n.input[0] == table:
                data = helper.make_node("Reshape", [b.name, _shape(g, f"{table}/q_shape",
                                        [V, K * bits // 8])], [f"{table}/q_data"])  # fmt: skip
                scales = helper.make_node("Reshape", [s.name, _shape(g, f"{table}/s_shape",
                                          [V, K // block])], [f"{table}/q_scales"])  # fmt: skip
                gbq = helper.make_node("GatherBlockQuantized", [data.output[0], n.input[1],
                                       scales.output[0]], list(n.output), name=n.name,
                                       domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                                       block_size=block, bits=bits)  # fmt: skip
                new += [data, scales, gbq]
            else:
                new.append(n)
        del g.node[:]
        g.node.extend(new)
        done.append(table)
    return done


def _shape(g, name: str, dims: list[int]) -> str:
    if not any(i.name == name for i in g.initializer):
        g.initializer.append(numpy_helper.from_array(np.asarray(dims, np.int64), name))
    return name


def quantize_linears(
    model: onnx.ModelProto,
    scheme: str,
    block: int = 32,
    accuracy_level: int = ACCURACY_LEVEL,
    share_embedding: bool = True,
) -> tuple[onnx.ModelProto, dict]:
    """Every linear of `model` -> MatMulNBits (see the module docstring). Returns a new model
    (the input is left as it was; a model without linears comes back byte-identical) and the
    report {scheme, bits, block, accuracy_level, linears, kept_fp32, embedding_shared,
    weight_bytes}."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if scheme not in BITS:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(BITS)}")
    bits = BITS[scheme]
    before = _weight_bytes(model.graph)
    norm, targets, kept, tied = _normalized(model)
    report = {"scheme": scheme, "bits": bits, "block": block, "accuracy_level": accuracy_level,
              "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer (symmetric RTN)",
              "linears": len(targets), "kept_fp32": kept}  # fmt: skip
    if not targets:
        report["weight_bytes"] = {"before": before, "after": before}
        report["linear_bytes"] = {"before": 0, "after": 0}
        return model, report
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, bits=bits,
                                       accuracy_level=accuracy_level)  # fmt: skip
    exclude = []
    for k, n in enumerate(_all_nodes(norm.graph)):  # ORT's quantizer excludes by node name
        if n.op_type == "MatMul" and n.name not in targets:
            n.name = n.name or f"matmul_{k}"
            exclude.append(n.name)
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, log.level = log.level, logging.WARNING
    try:
        q = MatMulNBitsQuantizer(norm, nodes_to_exclude=exclude, algo_config=cfg)
        q.process()
    finally:
        log.setLevel(level)
    out = q.model.model
    hoist_branch_initializers(out.graph)  # a weight both If branches read is quantized per branch
    shared = share_tied_embedding(out.graph, tied, bits, block) if share_embedding else []
    report["embedding_shared"] = shared
    _drop_unused(out.graph)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    done = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
    done -= sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    if done != len(targets):
        raise ValueError(f"internal: {len(targets)} linears planned, {done} quantized")
    report["weight_bytes"] = {"before": before, "after": _weight_bytes(out.graph)}
    inits = {i.name: i for i in out.graph.initializer}
    old = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    report["linear_bytes"] = {"before": sum(targets.values()), "after": sum(
        tensor_bytes(inits[i]) for n in out.graph.node if n.op_type == "MatMulNBits"
        and n.input[1] not in old for i in n.input[1:] if i in inits)}  # fmt: skip
    return out, report


def _all_nodes(g):
    for n in g.node:
        yield n
        for a in n.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                yield from _all_nodes(sub)


def _drop_unused(g) -> None:
    used = {i for n in _all_nodes(g) for i in n.input} | {o.name for o in g.output}
    dead = [n for n in g.node if n.op_type == "Transpose" and n.output[0] not in used]
    for n in dead:  # a Transpose of a now-quantized weight
        g.node.remove(n)
    used = {i for n in _all_nodes(g) for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _weight_bytes(g) -> int:
    return int(sum(tensor_bytes(i) for i in g.initializer))


def _prefill_logits(session, meta: dict, ids: np.ndarray) -> np.ndarray:
    """logits [S, V] of one prompt `ids` [S] run as a single prefill (pasts of length 0)."""
    seq = ids.shape[0]
    feeds = {"input_ids": ids[None].astype(np.int64),
             "attention_mask": np.ones((1, seq), np.int64),
             "position_ids": np.arange(seq, dtype=np.int64)[None]}  # fmt: skip
    for layer in range(int(meta["layers"])):
        h = int(meta["kv_heads"][layer])
        for kind, width in (("key", meta["key_dim"][layer]), ("value", meta["value_dim"][layer])):
            feeds[f"past_key_values.{layer}.{kind}"] = np.zeros((1, h, 0, int(width)), np.float32)
    names = {i.name for i in session.get_inputs()}
    missing = names - set(feeds)
    if missing:
        raise ValueError(f"decoder inputs not known to the accuracy check: {sorted(missing)}")
    return session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][0]


def decoder_accuracy(ref_model, q_model, manifest: dict, steps: int = 64, prompt_len: int = 16,
                     seed: int = 0, threads: int | None = None) -> dict:  # fmt: skip
    """The quantized decoder against the fp32 one on a fixed prompt (`prompt_len` ids drawn with
    `seed`): fp32 generates `steps` greedy tokens; then both run the prompt + those tokens as one
    prefill (teacher forcing) and at each of the `steps` positions

      token_agreement = mean_t [argmax q_logits_t == fp32 token_t]
      logits_cosine   = mean_t cos(q_logits_t, fp32_logits_t)   (and its minimum)

    greedy_identical_prefix: leading tokens the quantized model's own greedy generation shares
    with fp32's (after a first difference the two continuations are unrelated)."""
    from ffnx.graph.ort import ort_session
    from ffnx.runtime.backends.ort import OrtBackend
    from ffnx.runtime.decode_bench import random_prompt
    from ffnx.runtime.engine import Engine

    meta = manifest["decoder"]
    steps = max(1, min(steps, int(meta["max_length"]) - prompt_len))
    prompt = random_prompt(int(meta["vocab"]), 1, prompt_len, seed)
    sessions = [ort_session(m, threads) for m in (ref_model, q_model)]
    ref_e, q_e = (Engine(OrtBackend(s, ""), manifest) for s in sessions)
    ref_tok = ref_e.generate(prompt, steps, ignore_eos=True)[0]
    q_tok = q_e.generate(prompt, steps, ignore_eos=True)[0]
    seq = np.concatenate([prompt[0], ref_tok[:-1]])
    ref_l, q_l = (_prefill_logits(s, meta, seq)[prompt_len - 1 :] for s in sessions)
    r64, q64 = ref_l.astype(np.float64), q_l.astype(np.float64)
    cos = (r64 * q64).sum(-1) / (np.linalg.norm(r64, axis=-1) * np.linalg.norm(q64, axis=-1))
    differ = np.flatnonzero(q_tok != ref_tok)
    return {
        "steps": int(steps),
        "prompt_len": prompt_len,
        "seed": seed,
        "token_agreement": float((q_l.argmax(-1) == ref_tok).mean()),
        "logits_cosine": float(cos.mean()),
        "logits_cosine_min": float(cos.min()),
        "greedy_identical_prefix": int(differ[0]) if differ.size else int(steps),
        "fp32_prefill_agreement": float((ref_l.argmax(-1) == ref_tok).mean()),
    }


def expert_misfits(plain: onnx.ModelProto) -> dict[str, str]:
    """{FfnxMoE node: why its experts cannot be quantized block-wise} (empty: all can)."""
    import onnx_graphsurgeon as gs

    from ffnx.lowering.moe_common import MoESite
    from ffnx.lowering.moe_ort import quant_misfit

    if not any(n.op_type == "FfnxMoE" for n in plain.graph.node):
        return {}
    graph = gs.import_onnx(plain)
    out = {}
    for node in graph.nodes:
        if node.op == "FfnxMoE":
            why = quant_misfit(MoESite.of(node))
            if why:
                out[node.name] = why
    return out


def quantize_decoder(
    plain: onnx.ModelProto, lowered: onnx.ModelProto, manifest: dict, scheme: str, threads=None
) -> tuple[onnx.ModelProto, dict]:
    """`--quantize`: the lowered decoder graph (MoE experts already quantized by `lower_moe`)
    with every linear quantized, and the report: `quantize_linears`' plus the op counts and
    `decoder_accuracy` against `plain`, the fp32 export (model.onnx, verified against torch)."""
    from ffnx.lowering import runnable

    model, report = quantize_linears(lowered, scheme)
    ops = [n.op_type for n in _all_nodes(model.graph)]
    report["ops"] = {op: ops.count(op) for op in ("MatMulNBits", "QMoE", "MatMul") if op in ops}
    misfits = expert_misfits(plain)
    moe = sum(n.op_type == "FfnxMoE" for n in plain.graph.node)
    if moe:
        report["experts"] = {"layers": moe, "scheme": "fp32" if misfits else scheme,
                             "kept_fp32": misfits}  # fmt: skip
    report["reference"] = "model.onnx (the fp32 export)"
    report["accuracy"] = decoder_accuracy(runnable(plain), model, manifest, threads=threads)
    return model, report


def summary(report: dict) -> str:
    """One line for the CLI."""
    a, w = report["accuracy"], report["linear_bytes"]
    return (f"quantized {report['linears']} linears to {report['scheme']} MatMulNBits (block "
            f"{report['block']}; {len(report['kept_fp32'])} kept fp32); their weights "
            f"{w['before'] / 2**20:.1f} -> {w['after'] / 2**20:.1f} MiB; vs fp32 over "
            f"{a['steps']} greedy steps: token agreement {a['token_agreement']:.3f}, logits "
            f"cosine {a['logits_cosine']:.5f} (min {a['logits_cosine_min']:.5f}), identical "
            f"prefix {a['greedy_identical_prefix']}"
            + ("; the tied embedding reads the head's bytes" if report.get("embedding_shared")
               else "")
            + (f"; {folded} per-head products folded into their linears"
               if (folded := report.get("head_products", {}).get("folded")) else "")
            + (f"; MoE experts fp32: {next(iter(e['kept_fp32'].values()))}"
               if (e := report.get("experts")) and e["kept_fp32"] else ""))  # fmt: skip
