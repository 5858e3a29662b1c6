"""Weight-only int4/int8 quantization of expert weights (MoQE) in the layouts ONNX Runtime reads.

Symmetric, block-wise along the input (K) dimension, no zero points (ORT then uses 2^(bits-1)):
  scale_b = max_{k in block b} |W[n, k]| / (2^(bits-1) - 1)
  q[n, k] = clip(round(W[n, k] / scale_b), -2^(bits-1), 2^(bits-1) - 1) + 2^(bits-1)   (uint)
  W~[n, k] = (q[n, k] - 2^(bits-1)) * scale_b
Packing (`com.microsoft::MatMulNBits` B [N, K/block, block*bits/8] and `QMoE` raw weights
[E, N, K*bits/8] are the same bytes): along K, LSB first (int4: element 2i in the low nibble).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = {"int4": 4, "int8": 8}


def stored_bytes_per_weight(scheme: str, block: int = 32) -> float:
    """Bytes a weight takes stored under `scheme`: 4 for fp32, else bits / 8 plus its block's
    fp32 scale (int4, block 32: 0.625)."""
    return 4.0 if scheme == "fp32" else BITS[scheme] / 8 + 4 / block


@dataclass(frozen=True)
class QuantizedWeight:
    """W [..., N, K] quantized: packed uint8 [..., N, K*bits/8], scales fp32 [..., N, K/block]."""

    packed: np.ndarray
    scales: np.ndarray
    bits: int
    block: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 8 // self.bits)

    def dequantize(self) -> np.ndarray:
        q = unpack(self.packed, self.bits).astype(np.float32) - 2 ** (self.bits - 1)
        s = np.repeat(self.scales, self.block, axis=-1)
        return q * s

    def blocked(self) -> np.ndarray:
        """MatMulNBits' B layout [..., N, K/block, block*bits/8] (a view of the same bytes)."""
        nb = self.scales.shape[-1]
        return self.packed.reshape(*self.packed.shape[:-1], nb, -1)


def pick_block(K: int, block: int = 32) -> int | None:
    """The largest power-of-two block <= `block` (and >= 16) that divides K, else None."""
    while block >= 16:
        if K % block == 0:
            return block
        block //= 2
    return None


def quantize(w: np.ndarray, bits: int, block: int = 32) -> QuantizedWeight:
    """Quantize W [..., N, K] along K in blocks of `block` (K % block == 0)."""
    K = w.shape[-1]
    if bits not in (4, 8) or K % block:
        raise ValueError(f"cannot quantize K={K} to {bits} bits in blocks of {block}")
    qmax = 2 ** (bits - 1) - 1
    wb = w.astype(np.float32).reshape(*w.shape[:-1], K // block, block)
    scales = np.abs(wb).max(-1) / qmax
    safe = np.where(scales > 0, scales, 1.0)[..., None]
    q = np.clip(np.rint(wb / safe), -qmax - 1, qmax) + qmax + 1
    q = q.astype(np.uint8).reshape(w.shape)
    return QuantizedWeight(pack(q, bits), scales.astype(np.float32), bits, block)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return np.ascontiguousarray(q)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))


def unpack(p: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return p
    out = np.empty((*p.shape[:-1], p.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = p & 0x0F, p >> 4
    return out


def error_metrics(ref: np.ndarray, got: np.ndarray) -> dict:
    """max abs and cosine of `got` against `ref` (the pass notes and the benchmark report these),
    from the one comparator `ffnx.graph.verify.output_metrics`."""
    from ffnx.graph.verify import output_metrics

    m = output_metrics(np.ravel(ref), np.ravel(got))
    return {"max_abs": m["max_abs"], "cosine": m["cosine"]}
