"""torch -> ONNX with `torch.onnx.export(dynamo=True)`, quiet, with errors a user can act on."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from ffnx.artifact import write_bytes_atomic
from ffnx.errors import ExportError
from ffnx.export.inputs import output_names
from ffnx.graph import model_io
from ffnx.graph.dim_labels import label_dims
from ffnx.models.spec import ModelSpec

DEFAULT_OPSET = 18  # ORT >= 1.14, TensorRT >= 8.6 and every Jetson TensorRT read it
DATA_DEPENDENT = re.compile(r"data.dependent|GuardOnDataDependent|Could not guard|nonzero", re.I)


def dynamic_shapes(spec: ModelSpec) -> dict[str, dict[int, torch.export.Dim]]:
    """One `Dim` per label, shared by every axis carrying that label."""
    dims: dict[str, torch.export.Dim] = {}
    out = {}
    for name in spec.inputs:
        axes = spec.dynamic.get(name, {})
        out[name] = {}
        for axis, label in axes.items():
            if label not in dims:
                hi = spec.max_dims.get(label)
                dims[label] = torch.export.Dim(_ident(label), min=1, **({"max": hi} if hi else {}))
            out[name][int(axis)] = dims[label]
    return out


def _ident(label: str) -> str:
    s = re.sub(r"\W", "_", label)
    return s if s and not s[0].isdigit() else f"d_{s}"


def _user_frame(text: str) -> str:
    """The innermost user-code frame torch.export reports: 'file:line in fn: code'."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', text)
    frames = [f for f in frames if "/torch/" not in f[0]]
    if not frames:
        return ""
    file, line, fn, code = frames[-1]
    return f" at {Path(file).name}:{line} in {fn}: `{code.strip()}`"


def explain_failure(spec: ModelSpec, err: BaseException) -> str:
    text = f"{err}\n" + "".join(str(c) for c in (err.__cause__, err.__context__) if c is not None)
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    first = lines[0] if lines else type(root).__name__
    if first.endswith(":") and len(lines) > 1:  # a heading ("inconsistencies were found:")
        first = f"{first} {lines[1]}"
    where = _user_frame(text)
    hint = "remove Python-side data-dependent control flow or wrap the block in a torch.library op"
    if "inconsisten" in first or "Constraints violated" in first:
        hint = (
            "the model's code ties a dimension the export keeps dynamic (batch, seq, past) to "
            "another or to a constant; change that code, or export with --no-cache (no past)"
        )
    elif DATA_DEPENDENT.search(text):
        hint = (
            "the forward branches on tensor values; make the control flow tensor-only "
            "(torch.where/torch.cond) or register the block as a custom op"
        )
    elif "Unsupported" in text or "not supported" in text.lower() or "no symbolic" in text.lower():
        hint = (
            "an op has no ONNX translation; register one with torch.onnx custom_translation_table"
        )
    return f"torch.onnx.export of {spec.name!r} failed{where}: {first[:300]} (fix: {hint})"


@contextlib.contextmanager
def quiet():
    """Silence the exporter's prints, warnings and log spam, down to file descriptors 1 and 2
    (torch's log handlers hold the original streams). Errors still raise."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    sink = tempfile.TemporaryFile()
    try:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        sink.close()
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _release_rewriter_state() -> None:
    """Forget the graph onnxscript's module-level rewrite rules matched last. Each rule's
    SimplePatternMatcher keeps its last match and graph, and through them the exported program's
    tensors, which wrap the module's parameters: after `keep_module=False` the weights stayed
    held twice (2.4 GB at Qwen3-0.6B's size). Best effort: onnxscript's internals may change."""
    matcher_module = sys.modules.get("onnxscript.rewriter._matcher")
    kind = getattr(matcher_module, "PatternMatcher", None)
    if kind is None:
        return
    for obj in gc.get_objects():  # the rules sit in tuples, lists and rule sets
        if issubclass(type(obj), kind):  # not isinstance: a dead weakproxy raises
            if hasattr(obj, "_init_match"):  # a fresh, empty match state
                obj._init_match(0)
            if hasattr(obj, "_graph"):
                obj._graph = None


def _exact_no_op_rules() -> None:
    """Make onnxscript's no-op rewrite rules (x + 0, x - 0, x * 1, x / 1 -> x) match only an exact
    0 or 1. Their pattern constants match within abs 1e-8 / rel 1e-5, so the exporter's optimizer
    dropped `+ 1e-12`: an RMSNorm eps (Ergo's) vanished, x * rsqrt(mean(x²)) then gives 0 * inf =
    NaN on an all-zero row where the module gives 0, and x * 1.000001 would lose its factor.
    0 and 1 are exact in every float type, so exact matching keeps every true no-op. Best effort:
    onnxscript's internals may change."""
    try:
        from onnxscript.rewriter.rules.common import _no_op
    except ImportError:
        return
    for rule in getattr(getattr(_no_op, "rules", None), "rules", ()):
        for node in getattr(rule, "_target_pattern", None) or ():
            for pattern in getattr(node, "inputs", ()):
                if hasattr(pattern, "_abs_tol") and hasattr(pattern, "_rel_tol"):
                    pattern._abs_tol = pattern._rel_tol = 0.0


def _label_dims(path: Path, spec: ModelSpec) -> None:
    """The saved graph's dims named by the spec's labels (`ffnx.graph.dim_labels`); the weights,
    inline or external, are not read or rewritten."""
    if not spec.dynamic:
        return
    model = onnx.load(str(path), load_external_data=False)
    if label_dims(model, spec.dynamic):
        write_bytes_atomic(path, model.SerializeToString())


def export_onnx(spec: ModelSpec, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export `spec.module` to `path`; large models get external data beside it (`<name>.data`)."""
    path = Path(path)
    module = spec.module.eval()
    args = tuple(spec.inputs.values())
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    _exact_no_op_rules()
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(spec.inputs),
                output_names=output_names(spec),
                dynamic_shapes=getattr(spec, "export_dynamic_shapes", None)
                or (dynamic_shapes(spec) if spec.dynamic else None),
                opset_version=opset,
                verbose=False,
            )
            program.save(str(path), external_data=nbytes > model_io.LIMIT)
        _label_dims(path, spec)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(explain_failure(spec, e)) from e
    finally:
        _release_rewriter_state()
    return path
