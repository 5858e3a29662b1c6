"""Optimization profiles: (min, opt, max) per dynamic-dim label, then per-input shapes.

A TensorRT engine with dynamic inputs needs, for each of them, the smallest, the tuned-for and
the largest shape. ffnx states them per *label* (the manifest's `dims`: "batch", "seq", ...)
and expands them onto every input axis carrying that label, so axes that share a label share
bounds. Defaults from the manifest: min = its min (1), opt = its example size, max = its max;
a label without a max gets max = DEFAULT_MAX_FACTOR * opt. `--profile name:min,opt,max`
overrides one label.

KV-cache decoders (a manifest with a "decoder" section, ffnx.models.hf_decoder): `past` starts
at 0 (prefill feeds an empty cache; the graph takes it: TensorRT-RTX builds it and ORT verifies
it), and `total` (the attention mask's length) is derived, `seq + past` at min, opt and max (so
each of the three profile points is a shape the graph can run), unless `--profile total:...`
names it.

Several profiles: `profile_sets(manifest, overrides, extra)` returns profile 0 (the defaults
with `overrides`) followed by one profile per entry of `extra`, each a list of overrides on
top of the defaults (`--add-profile "seq:1,1,1 past:0,256,511"`). TensorRT picks, per call,
a profile whose ranges hold the input shapes (ffnx.runtime.backends.trt).
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
    decoder = manifest.get("decoder") and {"seq", "past", "total"} <= set(ranges)
    if decoder:
        p = ranges["past"]
        ranges["past"] = DimRange("past", 0, p.opt, p.max)
    given = set()
    for o in overrides or []:
        r = parse_profile(o) if isinstance(o, str) else o
        if r.label not in ranges:
            known = ", ".join(ranges) or "none"
            raise PassError(
                f"--profile names {r.label!r}, which is no dynamic dim (known: {known})"
            )
        ranges[r.label] = r
        given.add(r.label)
    if decoder and "total" not in given:
        s, p = ranges["seq"], ranges["past"]
        ranges["total"] = DimRange("total", s.min + p.min, s.opt + p.opt, s.max + p.max)
    return ranges


def split_profile(text: str) -> list[str]:
    """'seq:1,1,1 past:0,64,512' (spaces or ';' between labels) -> one override per label."""
    parts = [p for p in text.replace(";", " ").split() if p]
    if not parts:
        raise PassError("--add-profile needs at least one LABEL:MIN,OPT,MAX")
    return parts


def profile_sets(
    manifest: dict,
    overrides: list[DimRange | str] | None = None,
    extra: list[list[DimRange | str] | str] | None = None,
) -> list[dict[str, DimRange]]:
    """Profile 0 (defaults + overrides), then one per `extra` entry (defaults + its overrides)."""
    sets = [dim_ranges(manifest, overrides)]
    for e in extra or []:
        sets.append(dim_ranges(manifest, split_profile(e) if isinstance(e, str) else e))
    return sets


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


def add_profiles(builder, network, config, shape_sets: list[dict]) -> tuple[list[dict], object]:
    """One TensorRT optimization profile per entry of `shape_sets` (input -> (min, opt, max)
    shapes, see input_shapes) over every dynamic network input; returns the shapes each used
    and profile 0 (the int8 calibration profile), None when no input is dynamic."""
    from ffnx.errors import BackendError

    dynamic = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t for t in dynamic if -1 in tuple(t.shape)]
    used_sets, first = [], None
    for shapes in shape_sets:
        used, profile = {}, builder.create_optimization_profile()
        for inp in dynamic:
            if inp.name not in shapes:
                raise BackendError(
                    f"input {inp.name!r} has dynamic shape {tuple(inp.shape)} but the manifest "
                    "declares no dims for it; pass --profile LABEL:min,opt,max"
                )
            lo, opt, hi = shapes[inp.name]
            if len(lo) != len(inp.shape):
                raise BackendError(f"input {inp.name!r}: manifest rank {len(lo)} != graph rank")
            profile.set_shape(inp.name, lo, opt, hi)
            used[inp.name] = [list(lo), list(opt), list(hi)]
        if used:
            if config.add_optimization_profile(profile) < 0:
                raise BackendError(f"TensorRT refused optimization profile {used}")
            used_sets.append(used)
            first = first or profile
    return used_sets, first
