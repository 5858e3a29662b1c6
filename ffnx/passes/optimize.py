"""Run graph passes with verification and rollback; report each pass.

For each selected pass, in registry order: import the current model into onnx-graphsurgeon,
apply the pass; if it applied nothing the model is kept as it was (byte-identical). Otherwise
cleanup + toposort, shape inference, onnx checker, and ORT outputs compared with the model before
the pass on every sample feed. A pass that fails any of these is rolled back and reported with
the reason; it is never silently applied.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ffnx.errors import InputError, PassError, VerificationError, first_line
from ffnx.graph import lowering_meta, model_io, verify
from ffnx.graph.export import export_model
from ffnx.graph.opsets import set_opsets
from ffnx.graph.stats import graph_stats
from ffnx.lowering import run_model
from ffnx.passes import PassContext, by_name, registry


def select_passes(passes: list[str] | None, skip: list[str] = (), target: str = "ort") -> list:
    """Named passes (registry order), else the default ones for `target`; minus `skip`."""
    known = by_name()
    unknown = [p for p in list(passes or []) + list(skip) if p not in known]
    if unknown:
        raise PassError(f"unknown pass(es) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [
        p for p in registry() if (p.name in passes if passes else p.default and target in p.targets)
    ]
    return [p for p in chosen if p.name not in skip]


def _example_dims(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, int]:
    dims: dict[str, int] = {}
    if not feeds:
        return dims
    for vi in model.graph.input:
        arr = feeds[0].get(vi.name)
        if arr is None:
            continue
        for d, n in zip(vi.type.tensor_type.shape.dim, arr.shape):
            if d.HasField("dim_param"):
                dims[d.dim_param] = int(n)
    return dims


def _finish(graph: gs.Graph, opset_imports) -> onnx.ModelProto:
    graph.cleanup().toposort()
    model = export_model(graph)
    set_opsets(model, opset_imports)
    model = model_io.infer_shapes(model)
    model_io.check(model)
    return model


GC_BYTES = 256 << 20  # a graph whose weights pass this is collected at once (~0.1 s a collection)


def _collect(model: onnx.ModelProto) -> None:
    """For a large model, collect a dropped onnx-graphsurgeon graph now: its node/tensor
    reference cycles otherwise keep its weight arrays until the cyclic collector runs."""
    if model_io.data_bytes(model) > GC_BYTES:
        gc.collect()


def apply_pass(p, model: onnx.ModelProto, ctx: PassContext, ref: list[dict], tol: verify.Tolerance):
    """-> (new model or the same object, report dict)."""
    new, report, _ = verified_pass(p, model, ctx, ref, tol)
    return new, report


def verified_pass(p, model: onnx.ModelProto, ctx: PassContext, ref: list[dict],
                  tol: verify.Tolerance) -> tuple[onnx.ModelProto, dict, list[dict]]:  # fmt: skip
    """`apply_pass`, also returning the outputs the result gives on ctx.feeds (`ref` when the
    model is returned unchanged): the next pass's reference, without running the graph again.
    The onnx-graphsurgeon graph is freed before ORT loads the new model (its node/tensor cycles
    wait for the cyclic collector otherwise: at 2.4 GB of weights, ~10 GB held across passes)."""
    dims = _example_dims(model, ctx.feeds)
    before = graph_stats(model, dims)
    graph = gs.import_onnx(model)
    res = p.apply(graph, ctx)
    then = {}
    for name in p.followed_by(ctx) if res.applied else ():
        then[name] = by_name()[name].apply(graph, ctx).applied
    report = {
        "name": p.name,
        "exact": p.exact,
        "matches": res.matched,
        "applied": res.applied,
        "skipped": [{"site": s, "reason": r} for s, r in res.skipped],
        **({"notes": res.notes} if res.notes else {}),
        **({"followed_by": then} if then else {}),
        "before": before,
    }
    if res.applied == 0:
        report.update(status="no_match" if res.matched == 0 else "skipped", after=before)
        del graph
        _collect(model)
        return model, report, ref
    try:
        new = lowering_meta.finish(_finish(graph, model.opset_import), model, graph)
        del graph  # its loaded weights, before ORT holds a copy of the new model
        _collect(model)
        outs = run_model(new, ctx.feeds)
        checks = [verify.compare_outputs(*_read_part(r, o, f, ctx.options), tol, p.name)
                  for r, o, f in zip(ref, outs, ctx.feeds)]  # fmt: skip
    except (
        onnx.checker.ValidationError,
        onnx.shape_inference.InferenceError,
        VerificationError,
    ) as e:
        first = first_line(e)
        report.update(status="rolled_back", reason=f"invalid graph: {first[:300]}", after=before)
        return model, report, ref
    bad = [f for c in checks for f in verify.failures(c)]
    report["error"] = verify.worst(checks)
    if bad:
        report.update(status="rolled_back", reason=f"outputs changed: {bad[0]}", after=before)
        return model, report, ref
    report.update(status="applied", after=graph_stats(new, dims))
    return new, report, outs


def manifest_options(manifest: dict) -> dict:
    """Pass options a manifest implies, for a KV-cache decoder: its `max_length` (the rotary
    tables group_query_attention builds span it) and `decoder_outputs` (what `_read_part`
    compares)."""
    decoder = manifest.get("decoder") or {}
    out = {"max_length": int(decoder["max_length"])} if decoder.get("max_length") else {}
    if decoder.get("present_outputs"):
        out["decoder_outputs"] = {"logits": "logits", "presents": list(decoder["present_outputs"])}
    return out


def _read_part(ref: dict, got: dict, feed: dict, options: dict) -> tuple[dict, dict]:
    """(ref, got) as a pass is judged on them: for a KV-cache decoder, the logits of the
    unpadded query positions and the present rows of unpadded positions (attention_mask 1);
    whatever a left-padded batch never reads may differ between exact graphs (GQA fills padded
    rows its own way). Other graphs: unchanged."""
    outputs = options.get("decoder_outputs")
    if not outputs or "attention_mask" not in feed or "input_ids" not in feed:
        return ref, got
    mask = np.asarray(feed["attention_mask"]) != 0
    keep = {outputs["logits"]: (1, mask[:, -feed["input_ids"].shape[1] :])}
    keep.update({name: (2, mask) for name in outputs["presents"]})
    return verify.at_positions(ref, keep), verify.at_positions(got, keep)


def optimize_model(
    model: onnx.ModelProto | str | Path,
    feeds: list[dict[str, np.ndarray]],
    passes: list[str] | None = None,
    skip: list[str] = (),
    target: str = "ort",
    tol: verify.Tolerance = verify.Tolerance(),
    max_error: float | None = None,
    step: Callable[[str], None] = lambda s: None,
    options: dict | None = None,
) -> tuple[onnx.ModelProto, list[dict]]:
    """Apply the selected passes in registry order; every pass is verified against the model
    before it on `feeds` (each pass's error is measured against its own input graph). A path is
    loaded here, so that the input is freed once a pass replaces it (a large model is held
    twice at most, not three times)."""
    if isinstance(model, str | Path):
        model = onnx.load(str(model))
    if not feeds:
        raise PassError("graph passes need sample inputs to verify against")
    if any(n.domain == "ffnx" for n in model.graph.node):
        from ffnx.graph.onnx_schemas import register_onnx_schemas  # typed checks of ffnx nodes

        register_onnx_schemas()
    ctx = PassContext(feeds=feeds, max_error=max_error, target=target, options=options or {})
    reports = []
    try:
        original = ref = run_model(model, feeds)
    except VerificationError:
        raise
    except Exception as e:  # ONNX Runtime rejects the inputs (shapes or values)
        raise InputError(f"the graph does not run on its sample inputs: {first_line(e)}") from e
    for p in select_passes(passes, skip, target):
        step(f"pass {p.name}")
        exact = p.is_exact(ctx) if hasattr(p, "is_exact") else p.exact  # option-dependent
        if exact:
            new, report, outs = verified_pass(p, model, ctx, ref, tol)
        else:
            # Approximate: judged on the final outputs against the original graph, by --max-error.
            if max_error is None:
                raise PassError(
                    f"{p.name} is approximate: it runs only with a maximum error bound "
                    "(max_error) and calibration inputs"
                )
            new, report, outs = verified_pass(p, model, ctx, original,
                                              approximate_tolerance(max_error))  # fmt: skip
            if report["status"] == "rolled_back":
                raise PassError(
                    f"{p.name} refused: {report['reason']} exceeds the maximum error {max_error}"
                )
        if new is not model:
            model, ref = new, outs
        reports.append(report)
    return model, reports


def approximate_tolerance(max_error: float) -> verify.Tolerance:
    return verify.Tolerance(atol=max_error, rtol=0.0, min_cosine=0.0)


def optimize_file(
    src: str | Path,
    dst: str | Path,
    feeds: list[dict[str, np.ndarray]],
    **kwargs,
) -> list[dict]:
    """Optimize `src` into `dst` (written atomically); return the per-pass reports.
    (`ffnx.passes.speed_guard.optimize_guarded` is the variant that also drops the applied
    passes whose removal times faster on ORT.)"""
    new, reports = optimize_model(src, feeds, **kwargs)
    model_io.save_model(new, dst)
    return reports
