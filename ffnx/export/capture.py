"""Module swaps scoped to one export: blocks stock export cannot handle become ffnx ops.

A capture rule is a function `(name, module, target) -> replacement | None`; a replacement is a
torch module with the same numerics whose forward emits one ffnx op node at export time (and
names the op type it needs in `ffnx_op_type`), or computes the same function in a cheaper exact
form of standard ops (`mla_absorb`), or in a form torch's exporter takes (`mpt_alibi`). The
rules are one explicit list, `default_rules()` (rule modules do not register themselves by
import side effect, and import nothing from here). Rules are tried in order on every submodule
(outermost first; a replaced module's children are not visited). The original modules are put
back when the export finishes, whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

CaptureRule = Callable[[str, torch.nn.Module, str], torch.nn.Module | None]


def default_rules() -> tuple[CaptureRule, ...]:
    """The capture rules, in the order they are tried (imported here, when an export runs, to
    keep `capture` import-light)."""
    from ffnx.export.hf_refusals import refuse_unexportable
    from ffnx.export.mla_absorb import absorb_mla, real_rotary
    from ffnx.export.moe_capture import capture_moe
    from ffnx.export.mpt_alibi import key_length_alibi

    return (capture_moe, refuse_unexportable, absorb_mla, real_rotary, key_length_alibi)


def _plan(
    root: torch.nn.Module, target: str, rules: tuple[CaptureRule, ...]
) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    swaps: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []

    def visit(prefix: str, mod: torch.nn.Module) -> None:
        for child_name, child in mod.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            new = next(
                (r for r in (rule(full, child, target) for rule in rules) if r is not None), None
            )
            if new is not None:
                swaps.append((mod, child_name, new))
            else:
                visit(full, child)

    visit("", root)
    return swaps


@contextlib.contextmanager
def captured(
    root: torch.nn.Module, target: str = "ort", rules: tuple[CaptureRule, ...] | None = None
) -> Iterator[set[str]]:
    """Swap every block a rule matches (`rules`, default `default_rules()`) for its ffnx-op
    twin; yield the set of op types used."""
    swaps = _plan(root, target, default_rules() if rules is None else tuple(rules))
    originals = []
    ops: set[str] = set()
    try:
        for parent, name, new in swaps:
            originals.append((parent, name, getattr(parent, name)))
            setattr(parent, name, new)
            if getattr(new, "ffnx_op_type", None):  # a standard-op twin needs no plugin
                ops.add(new.ffnx_op_type)
        yield ops
    finally:
        for parent, name, old in reversed(originals):
            setattr(parent, name, old)
