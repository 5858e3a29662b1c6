"""Optimization profiles: (min, opt, max) per dynamic-dim label, then per-input shapes.

A TensorRT engine with dynamic inputs needs, for each of them, the smallest, the tuned-for and
the largest shape. ffnx states them per *label* (the manifest's `dims`: "batch", "seq", ...)
and expands them onto every input axis carrying that label, so axes that share a label share
bounds. Defaults from the manifest: min = its min (1), opt = its example size, max = its max;
a label without a max gets max = DEFAULT_MAX_FACTOR * opt. `--profile name:min,opt,max`
overrides one label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ffnx.errors import PassError

DEFAULT_MAX_FACTOR = 4
_SPEC = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*[:=]\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*$")


@dataclass(frozen=True)
class DimRange:
    label: str
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 0 <= self.min <= self.opt <= self.max or self.max == 0:
            raise PassError(
                f"profile for {self.label!r} needs 0 <= min <= opt <= max and max > 0, "
                f"got {self.min},{self.opt},{self.max}"
            )

    def to_json(self) -> list[int]:
        return [self.min, self.opt, self.max]


def parse_profile(text: str) -> DimRange:
    """'seq:1,128,2048' -> DimRange('seq', 1, 128, 2048)."""
    m = _SPEC.match(text)
    if not m:
        raise PassError(f"--profile {text!r}: expected name:min,opt,max (e.g. seq:1,128,2048)")
    return DimRange(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))


def dim_ranges(
    manifest: dict, overrides: list[DimRange | str] | None = None
) -> dict[str, DimRange]:
    """Per-label ranges from the manifest's `dims`, with `overrides` replacing labels."""
    ranges = {}
    for label, d in manifest.get("dims", {}).items():
        opt = int(d.get("example") or 1)
        lo = int(d.get("min") if d.get("min") is not None else 1)
        hi = d.get("max")
        hi = int(hi) if hi is not None else max(opt, 1) * DEFAULT_MAX_FACTOR
        ranges[label] = DimRange(label, min(lo, opt), opt, max(hi, opt))
    for o in overrides or []:
        r = parse_profile(o) if isinstance(o, str) else o
        if r.label not in ranges:
            known = ", ".join(ranges) or "none"
            raise PassError(
                f"--profile names {r.label!r}, which is no dynamic dim (known: {known})"
            )
        ranges[r.label] = r
    return ranges


def input_shapes(
    manifest: dict, ranges: dict[str, DimRange]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of every manifest input that has a dynamic dim."""
    out = {}
    for info in manifest.get("inputs", []):
        shape = info["shape"]
        labels = [d for d in shape if isinstance(d, str)]
        if not labels:
            continue
        missing = [lbl for lbl in labels if lbl not in ranges]
        if missing:
            raise PassError(
                f"input {info['name']!r} has dynamic dims {missing} with no range in the "
                "manifest; pass --profile LABEL:min,opt,max"
            )
        out[info["name"]] = tuple(
            tuple(d if isinstance(d, int) else getattr(ranges[d], k) for d in shape)
            for k in ("min", "opt", "max")
        )
    return out
