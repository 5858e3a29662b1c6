"""`ffnx bench DIR --decode [--compare torch,genai]`: token-by-token generation timing of the
artifact, optionally against transformers (torch eager, its own KV cache) and onnxruntime-genai
(`ffnx.commands.bench_genai`) on the checkpoint the artifact was exported from, the same prompt
ids, new tokens and threads; plus the weight-bandwidth roofline measured in the same run."""

from __future__ import annotations

import inspect
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from ffnx.commands import ui
from ffnx.commands.bench_genai import genai_decode, genai_model
from ffnx.errors import ArtifactError
from ffnx.lowering.quantize import stored_bytes_per_weight

COMPARE = ("torch", "genai")
# what each comparison imports, and the ffnx extra that installs it
NEEDS = [
    ("torch", "transformers", "transformers", "hf"),
    ("genai", "onnxruntime_genai", "onnxruntime-genai", "bench"),
]
COLUMNS = ["runtime", "TTFT ms", "prefill tok/s", "decode tok/s", "ITL p50 ms", "ITL p99 ms",
           "peak RSS MiB", "weight GB/s", "of roofline", "tokens = ffnx"]  # fmt: skip
KEYS = ["ttft_ms", "prefill_tok_s", "decode_tok_s", "itl_p50_ms", "itl_p99_ms", "peak_rss_mib"]


def parse_compare(value: str | None) -> list[str]:
    """--compare torch | genai | torch,genai -> the list (a bad name: one `error:` line)."""
    from ffnx.errors import InputError

    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    bad = [n for n in names if n not in COMPARE]
    if bad:
        raise InputError(f"--compare {value!r}: choose from {', '.join(COMPARE)} (comma-separated)")
    for name, module, dist, extra in NEEDS:  # before any timing: one line, not a mid-run crash
        if name in names and find_spec(module) is None:
            raise InputError(f"--compare {name} needs {dist}: pip install 'ffnx[{extra}]'")
    return names


def hf_source(engine) -> str:
    source = engine.manifest.get("model", {}).get("source", "")
    if not source.startswith("hf:"):
        raise ArtifactError(f"--compare torch/genai needs an hf: export; this is from {source!r}")
    return source[3:]


def torch_decode(source: str, prompt_len: int, new_tokens: int, batch: int, threads, seed=0,
                 model=None) -> dict:  # fmt: skip
    """transformers eager: prefill, then greedy steps on its DynamicCache (same prompt ids)."""
    import torch

    from ffnx.models.hf import load_hf
    from ffnx.runtime.decode_bench import decode_stats, random_prompt, settle

    if not source.startswith("hf:"):
        raise ArtifactError(f"--compare torch needs an hf: export; this artifact is from {source}")
    if threads:
        torch.set_num_threads(threads)
    model = model or load_hf(source[3:]).module.model
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    vocab = int(model.config.get_text_config().vocab_size)
    ids = torch.from_numpy(random_prompt(vocab, batch, prompt_len, seed))

    def run(n: int) -> tuple[float, list[float], list]:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            times, toks = [], []
            for _ in range(n):
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter())
                toks.append(tok[:, 0].numpy())
                if len(times) == n:
                    break
                past = getattr(out, "cache", None) or out.past_key_values
                out = model(input_ids=tok, use_cache=True, **{arg: past})
        return times[0] - t0, times, toks

    settle()
    run(min(4, new_tokens))
    ttft, times, toks = run(new_tokens)
    return {**decode_stats(ttft, times, batch, prompt_len), "tokens": np.stack(toks, axis=1)}


def _graph_bytes(g, outer: dict | None = None) -> int:
    """Initializer bytes a run of graph `g` reads: its own and its enclosing graphs' (`outer`)
    that its nodes read; an If (a lowered MoE layer's token-count switch) runs one branch,
    counted as the larger (a weight both branches read, stored once in the enclosing graph:
    `ffnx.graph.export`, is counted once)."""
    from ffnx.graph.model_io import tensor_bytes

    inits = {**(outer or {}), **{i.name: i for i in g.initializer}}
    here = {i for n in g.node for i in n.input}
    total = sum(tensor_bytes(inits[name]) for name in here if name in inits)
    for n in g.node:
        subs = [a.g for a in n.attribute if a.HasField("g")]
        if subs:
            rest = {k: v for k, v in inits.items() if k not in here}
            sizes = [_graph_bytes(sub, rest) for sub in subs]
            total += max(sizes) if n.op_type == "If" else sum(sizes)
    return total


def weight_bytes_per_step(directory: str, manifest: dict, batch: int) -> dict:
    """Weight bytes one decode step reads: every initializer of the graph ORT runs (of an If,
    the larger branch), less the
    embedding table (a Gather reads `batch` rows; unless tied: also the lm_head's weight, read
    whole) and the rotary cos/sin tables of a GQA with
    fused rotary (likewise), less the experts no token routes to: per MoE
    layer (E experts, top-k, from model.onnx's FfnxMoE) the expected unread fraction under
    uniform routing, (1 - k/E)^batch, of its expert bytes in the run graph (fp32, or int4/int8
    bits + one fp32 scale per 32 with --quantize)."""
    import onnx

    from ffnx import artifact
    from ffnx.graph.model_io import tensor_bytes

    d = Path(directory)
    run = onnx.load(str(artifact.model_path(d, manifest)), load_external_data=False)
    inits = {i.name: i for i in run.graph.initializer}
    total = _graph_bytes(run.graph)
    embed = rotary = 0
    other_reads = {i for n in run.graph.node if n.op_type != "Gather" for i in n.input}
    for n in run.graph.node:
        table = n.input[0] if n.op_type == "Gather" else ""
        if table in inits and len(inits[table].dims) == 2 and table not in other_reads:
            t = inits[table]  # (a tied lm_head reads the table whole: not subtracted)
            embed += tensor_bytes(t) - batch * tensor_bytes(t) // int(t.dims[0])
        if n.op_type == "GroupQueryAttention":  # fused rotary: one table row per position
            for name in set(n.input[7:9]) & set(inits):
                t = inits.pop(name)  # shared by every layer: counted once
                rotary += tensor_bytes(t) - batch * tensor_bytes(t) // int(t.dims[0])
    q = manifest.get("quantize", {})
    scheme = q.get("experts", {}).get("scheme", "fp32") if q else "fp32"
    per_param = stored_bytes_per_weight(scheme)
    unread = 0.0
    plain = d / artifact.MODEL
    if plain.exists():
        p = onnx.load(str(plain), load_external_data=False)
        pinit = {i.name: i for i in p.graph.initializer}
        for n in p.graph.node:
            if n.op_type != "FfnxMoE":
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            weights = [n.input[i] for i in (2, 4) if len(n.input) > i and n.input[i] in pinit]
            params = sum(int(np.prod(pinit[w].dims)) for w in weights)
            e = int(pinit[weights[0]].dims[0]) if weights else 1
            k = int(attrs.get("top_k", 2))
            unread += (1 - min(k, e) / e) ** batch * params * per_param
    return {"weight_bytes_per_step": total - embed - rotary - unread,
            "weight_bytes_total": total, "embedding_bytes_unread": embed,
            "rotary_table_bytes_unread": rotary, "expert_bytes_unread": unread}  # fmt: skip


def _llc_bytes() -> int:
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        v = f.read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(v[-1:], 1)
        sizes.append(int(v.rstrip("KMG")) * mult)
    return max(sizes, default=32 * 2**20)


def gemv_models(bits: int | None, target_bytes: int | None = None) -> tuple[bytes, int, int]:
    """(ONNX GEMV model, its weight bytes, K): y [1, N] = x [1, K] @ W with W of `target_bytes`
    (default `roofline_bytes()`: 4x the last-level cache, at least 64 MiB) - fp32 MatMul (bits
    None) or MatMulNBits int4/int8 (block 32, accuracy level 4, random codes: the bytes read are
    what counts)."""
    from onnx import TensorProto, helper, numpy_helper

    target = target_bytes or roofline_bytes()
    k = 4096
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if bits is None:
        n = max(1, target // (4 * k))
        w = rng.standard_normal((k, n), dtype=np.float32)
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        inits, nbytes = [numpy_helper.from_array(w, "w")], w.nbytes
        opsets = [helper.make_opsetid("", 18)]
    else:
        n = max(1, int(target // (k * (bits / 8 + 4 / 32))))
        codes = rng.integers(0, 256, (n, k // 32, 32 * bits // 8), dtype=np.uint8)
        scales = (rng.random(n * k // 32, dtype=np.float32) * 0.01).astype(np.float32)
        node = helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft",
                                K=k, N=n, bits=bits, block_size=32, accuracy_level=4)  # fmt: skip
        inits = [numpy_helper.from_array(codes, "b"), numpy_helper.from_array(scales, "s")]
        nbytes = codes.nbytes + scales.nbytes
        opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    g = helper.make_graph([node], "gemv", [x], [y], inits)
    return helper.make_model(g, opset_imports=opsets).SerializeToString(), int(nbytes), k


GEMV_CAP = 512 << 20  # bytes: a roofline GEMV's weight is never larger (memory, set-up time)


def working_set(wb: dict) -> int:
    """Weight bytes a run of decode steps streams, from `weight_bytes_per_step`'s report: one
    step's, plus the experts other steps route to (every expert is read within a few tokens)."""
    return int(wb["weight_bytes_per_step"] + wb.get("expert_bytes_unread", 0))


def roofline_bytes(working_set_bytes: int | None = None) -> int:
    """The roofline GEMV's weight size: at least 4x the last-level cache (64 MiB or more) and
    at least the decoder's working set (`working_set`), up to GEMV_CAP - so a cache larger than
    /sys reports (a VM's) favours neither side."""
    return int(max(4 * _llc_bytes(), 64 * 2**20, min(int(working_set_bytes or 0), GEMV_CAP)))


def measure_rooflines(manifest: dict, threads, working_set_bytes: int | None = None) -> dict:
    """{"fp32": gemv_bandwidth, and "int4"/"int8" for quantized artifacts}, the GEMV sized by
    `roofline_bytes(working_set_bytes)`."""
    from ffnx.runtime.decode_bench import gemv_bandwidth

    size = roofline_bytes(working_set_bytes)
    out = {}
    bits = manifest.get("quantize", {}).get("bits")
    if bits:
        model = gemv_models(bits, size)
        out[manifest["quantize"]["scheme"]] = gemv_bandwidth(*model, threads=threads)
    out["fp32"] = gemv_bandwidth(*gemv_models(None, size), threads=threads)
    return out


def bench_decode(engine, path, compare, prompt_len, new_tokens, batch, threads,
                 table: bool = True) -> list[dict]:  # fmt: skip
    """Every row's fields (and the roofline in the first, ffnx's); `table` off with
    `ffnx bench --json` (JSON only on stdout)."""
    from ffnx.bench import peak_rss_mib
    from ffnx.runtime.decode_bench import random_prompt, roofline, time_decode

    compare = parse_compare(compare) if isinstance(compare, str | type(None)) else compare
    ours = time_decode(engine, prompt_len, new_tokens, batch)
    ref_tokens = ours.pop("tokens")
    scheme = engine.manifest.get("quantize", {}).get("scheme", "fp32")
    results = [{"runtime": f"ffnx ({engine.backend_name})", "precision": scheme, **ours,
                "peak_rss_mib": peak_rss_mib()}]  # fmt: skip
    model = None
    if compare:
        from ffnx.models.hf import load_hf

        model = load_hf(hf_source(engine)).module.model
    if "torch" in compare:
        source = engine.manifest.get("model", {}).get("source", "")
        r = torch_decode(source, prompt_len, new_tokens, batch, threads, model=model)
        results.append({"runtime": "transformers (torch eager)", "precision": "fp32", **r,
                        "peak_rss_mib": peak_rss_mib()})  # fmt: skip
    if "genai" in compare:
        precision = scheme  # fp32, int4, int8: the builder's -p (int: block 32, symmetric, acc. 4)
        with ui.steps("onnxruntime-genai: building its model (cached)"):
            built = genai_model(hf_source(engine), model, precision)
        if isinstance(built, str):
            ui.err.print(built)
            results.append({"runtime": "onnxruntime-genai", "precision": precision,
                            "unsupported": built})  # fmt: skip
        else:
            vocab = int(engine.manifest["decoder"]["vocab"])
            r = genai_decode(built, random_prompt(vocab, batch, prompt_len), new_tokens, threads)
            if isinstance(r, str):
                ui.err.print(r)
                results.append({"runtime": "onnxruntime-genai", "precision": precision,
                                "unsupported": r})  # fmt: skip
            else:
                results.append({"runtime": "onnxruntime-genai", "precision": precision,
                                **r, "peak_rss_mib": peak_rss_mib(),
                                "genai_model": str(built)})  # fmt: skip
    for r in results[1:]:
        if "tokens" in r:
            toks = r.pop("tokens")
            r["tokens_equal_ffnx"] = float((toks == ref_tokens).mean())
            r["decode_speedup_of_ffnx"] = results[0]["decode_tok_s"] / r["decode_tok_s"]
    wb = weight_bytes_per_step(engine.path or path, engine.manifest, batch)
    with ui.steps("measuring the GEMV bandwidth roofline"):
        gemv = measure_rooflines(engine.manifest, threads, working_set(wb))
    roof = gemv.get(scheme, gemv["fp32"])["gemv_gbs"]
    itl = batch / results[0]["decode_tok_s"]
    results[0].update(roofline(wb["weight_bytes_per_step"], itl, roof), **wb,
                      roofline_kind=f"{scheme} GEMV" if scheme in gemv else "fp32 GEMV",
                      gemv=gemv, threads=threads)  # fmt: skip
    if table:
        _print(engine, path, results, prompt_len, new_tokens, batch, threads)
    return results


def _label(r: dict) -> str:
    """The table's runtime label: "ffnx (ort, int4)", "onnxruntime-genai (int4)"."""
    rt, prec = r["runtime"], r["precision"]
    return f"{rt[:-1]}, {prec})" if rt.endswith(")") else f"{rt} ({prec})"


def _print(engine, path, results, prompt_len, new_tokens, batch, threads) -> None:
    rows = []
    for r in results:
        if "unsupported" in r:
            rows.append([_label(r), r["unsupported"],
                         *[""] * (len(COLUMNS) - 2)])  # fmt: skip
            continue
        frac, same = r.get("roofline_fraction"), r.get("tokens_equal_ffnx")
        rows.append([_label(r), *(r[k] for k in KEYS),
                     f"{r['achieved_gbs']:.1f}" if "achieved_gbs" in r else "",
                     f"{frac:.0%}" if frac is not None else "",
                     f"{same:.0%}" if same is not None else ""])  # fmt: skip
    name = engine.manifest.get("model", {}).get("name", path)
    title = (f"{name}  decode: batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, "
             f"greedy, threads {threads or 'default'}")  # fmt: skip
    ui.out.print(ui.table(title, COLUMNS, rows))
    r = results[0]
    g = ", ".join(f"{k} {v['gemv_gbs']:.1f} GB/s" for k, v in r["gemv"].items())
    ui.out.print(f"roofline: GEMV {g} (weights {r['gemv']['fp32']['gemv_weight_bytes'] / 2**20:.0f}"
                 f" MiB > last-level cache); decode reads {r['weight_bytes_per_step'] / 2**20:.1f} "
                 f"MiB of weights per step -> {r['achieved_gbs']:.1f} GB/s = "
                 f"{r['roofline_fraction']:.0%} of the {r['roofline_kind']} roofline")  # fmt: skip
