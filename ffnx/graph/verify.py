"""Numerical comparison used by export, every graph pass and the CLI (explicit tolerances).

The one comparator of ffnx: per output, scale-aware. With scale = max|ref| of that output, an
output passes when

    max|got - ref| <= atol + rtol * scale        (error relative to the output's own scale)

and, when it is a float tensor of more than one element, cosine(got, ref) >= min_cosine.
Elementwise allclose would judge each element against its own magnitude, which rejects correct
fp32 graphs whose outputs reach ~1e15 (reordered sums err by ~1e-7 of the scale, i.e. ~1e8 abs)
and also rejects small elements of a large output; the criterion here does neither. With
rtol=0 it is a plain max-abs bound (approximate passes: --max-error).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ffnx.errors import VerificationError

DEFAULT_ATOL = 1e-4  # fp32: graphs reorder sums; errors ~1e-6 relative per op, deeper models more
DEFAULT_RTOL = 1e-3


@dataclass(frozen=True)
class Tolerance:
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    min_cosine: float = 0.9999


def output_metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref64.shape != got64.shape:
        raise VerificationError(
            f"shape mismatch: expected {list(ref.shape)}, got {list(got.shape)}"
        )
    diff = np.abs(got64 - ref64)
    scale = float(np.abs(ref64).max()) if ref64.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    denom = np.linalg.norm(ref64) * np.linalg.norm(got64)
    cosine = float((ref64 * got64).sum() / denom) if denom > 0 else float(max_abs == 0.0)
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else max_abs,
        "cosine": cosine,
        "ref_max": scale,
    }


def within(ref: np.ndarray, got: np.ndarray, metrics: dict, tol: Tolerance) -> bool:
    """max_abs <= atol + rtol * max|ref| (and cosine >= min_cosine for float tensors)."""
    ok = bool(metrics["max_abs"] <= tol.atol + tol.rtol * metrics["ref_max"])  # NaN fails
    if np.issubdtype(np.asarray(ref).dtype, np.floating) and np.asarray(ref).size > 1:
        ok = ok and metrics["cosine"] >= tol.min_cosine
    return ok


def compare_outputs(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: Tolerance, what: str = "outputs"
) -> dict[str, dict]:
    """Per-output metrics (each with `ok`); raises VerificationError on missing outputs only."""
    missing = sorted(set(ref) - set(got))
    if missing:
        raise VerificationError(f"{what}: missing output(s) {', '.join(missing)}")
    report = {}
    for name, r in ref.items():
        m = output_metrics(r, got[name])
        m["ok"] = within(r, got[name], m, tol)
        report[name] = m
    return report


def compare(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: Tolerance = Tolerance()
) -> tuple[bool, dict[str, dict]]:
    """(all outputs within tol, per-output metrics): the check every ffnx verification uses."""
    report = compare_outputs(ref, got, tol)
    return not failures(report), report


def failures(report: dict[str, dict]) -> list[str]:
    return [
        f"{name}: max_abs={m['max_abs']:.3g} max_rel={m['max_rel']:.3g} cosine={m['cosine']:.6f}"
        for name, m in report.items()
        if not m["ok"]
    ]


def at_positions(outputs: dict[str, np.ndarray], keep: dict[str, tuple[int, np.ndarray]]) -> dict:
    """`outputs` with the outputs named in `keep` cut to the positions it marks: name -> (axis,
    bool [batch, n]) keeps out[b, ..., i at axis, ...] where mask[b, i]. A left-padded decoder
    never reads its padded positions, and exact rewrites may fill those differently."""
    out = dict(outputs)
    for name, (axis, mask) in keep.items():
        if name in out:
            out[name] = np.moveaxis(np.asarray(out[name]), axis, 1)[mask]
    return out


def worst(reports: list[dict[str, dict]]) -> dict:
    """Summary over several shapes: worst max_abs/max_rel, lowest cosine."""
    ms = [m for r in reports for m in r.values()]
    if not ms:
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0}
    return {
        "max_abs": max(m["max_abs"] for m in ms),
        "max_rel": max(m["max_rel"] for m in ms),
        "cosine": min(m["cosine"] for m in ms),
    }
