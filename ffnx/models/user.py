"""Resolve a model argument: a zoo name, `pkg.module:factory`, `path/file.py:factory`, or `hf:PATH`.

A factory is called with no arguments and returns a `ModelSpec`, or `(module, inputs)` or
`(module, inputs, dynamic)`, where inputs is a dict name -> tensor or a tuple of tensors (named
after the forward's parameters) and dynamic is {input: {axis: label}}.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import torch

from ffnx.errors import ModelSpecError
from ffnx.models.spec import ModelSpec

DYNAMIC_RE = re.compile(r"^(?P<name>[^:]+):(?P<axes>\d+=[\w.-]+(,\d+=[\w.-]+)*)$")


def parse_dynamic(items: list[str] | tuple[str, ...]) -> dict[str, dict[int, str]]:
    """`["ids:0=batch,1=seq", "mask:0=batch"]` -> {"ids": {0: "batch", 1: "seq"}, "mask": …}"""
    out: dict[str, dict[int, str]] = {}
    for item in items:
        m = DYNAMIC_RE.match(item.strip())
        if not m:
            raise ModelSpecError(
                f"bad --dynamic {item!r}; expected name:axis=label[,axis=label], e.g. x:0=batch"
            )
        axes = out.setdefault(m["name"], {})
        for part in m["axes"].split(","):
            axis, label = part.split("=")
            axes[int(axis)] = label
    return out


def _import_factory(ref: str):
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise ModelSpecError(
            f"bad model spec {ref!r}; expected pkg.module:factory or file.py:factory"
        )
    try:
        if target.endswith(".py") or "/" in target:
            path = Path(target)
            if not path.exists():
                raise ModelSpecError(f"model file {path} does not exist")
            name = f"ffnx_user_{abs(hash(str(path.resolve())))}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelSpecError:
        raise
    except Exception as e:
        raise ModelSpecError(
            f"cannot import {target!r} for {ref!r}: {type(e).__name__}: {e}"
        ) from e
    if not hasattr(module, attr):
        raise ModelSpecError(f"{target!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _name_inputs(module: torch.nn.Module, inputs) -> dict[str, torch.Tensor]:
    if isinstance(inputs, dict):
        return dict(inputs)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) < len(inputs):
        params += [f"input_{i}" for i in range(len(params), len(inputs))]
    return dict(zip(params, inputs))


def load_factory(ref: str, dynamic: dict[str, dict[int, str]] | None = None) -> ModelSpec:
    factory = _import_factory(ref)
    try:
        result = factory()
    except Exception as e:
        raise ModelSpecError(f"factory {ref!r} raised {type(e).__name__}: {e}") from e
    if isinstance(result, ModelSpec):
        spec = result
    elif (
        isinstance(result, tuple)
        and len(result) in (2, 3)
        and isinstance(result[0], torch.nn.Module)
    ):
        module, inputs = result[0], result[1]
        spec = ModelSpec(
            name=ref.rpartition(":")[2],
            module=module.eval(),
            inputs=_name_inputs(module, inputs),
            dynamic=dict(result[2]) if len(result) == 3 else {},
            description=f"user model {ref}",
        )
    else:
        raise ModelSpecError(
            f"factory {ref!r} must return a ModelSpec or (module, inputs[, dynamic]), "
            f"got {type(result).__name__}"
        )
    if dynamic:
        spec.dynamic = {**spec.dynamic, **dynamic}
    unknown = sorted(set(spec.dynamic) - set(spec.inputs))
    if unknown:
        raise ModelSpecError(
            f"--dynamic names unknown input(s) {', '.join(unknown)}; "
            f"inputs are {', '.join(spec.inputs)}"
        )
    for name, axes in spec.dynamic.items():
        rank = spec.inputs[name].dim()
        bad = [a for a in axes if not 0 <= int(a) < rank]
        if bad:
            raise ModelSpecError(f"--dynamic {name}: axis {bad[0]} out of range for rank {rank}")
    return spec


def resolve(
    ref: str, size: str = "tiny", dynamic: dict[str, dict[int, str]] | None = None
) -> ModelSpec:
    """Zoo name, factory reference or `hf:PATH` -> ModelSpec."""
    if ref.startswith("hf:"):
        from ffnx.models.hf import load_hf

        return load_hf(ref[3:], dynamic)
    if ":" in ref:
        return load_factory(ref, dynamic)
    from ffnx.models import zoo

    spec = zoo.build(ref, size)
    if dynamic:
        spec.dynamic = {**spec.dynamic, **dynamic}
    return spec
