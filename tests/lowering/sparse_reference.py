"""The FfnxSparseFFN reference (`ffnx.plugins.reference.sparse_ffn_reference`, the one there
is) called on numpy arrays, computed in float64: what the ORT lowering tests compare with."""

from __future__ import annotations

import numpy as np
import torch

from ffnx.plugins.reference import sparse_ffn_reference


def sparse_ffn_np(x, w_up, w_down, *, activation, mode="threshold", thresholds=None, k=0,
                  w_gate=None, b_up=None, b_down=None) -> np.ndarray:  # fmt: skip
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    y = sparse_ffn_reference(t(x), t(w_gate), t(w_up), t(b_up), t(w_down), t(b_down),
                             t(thresholds), mode=mode, k=k, activation=activation)  # fmt: skip
    return y.numpy()
