"""`ModelSpec`: what every model source (zoo, user factory, transformers) hands to export."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class ModelSpec:
    """A torch module plus how to call it.

    inputs: example inputs by forward-argument name, in forward order.
    dynamic: per input, {axis: label}; axes sharing a label must be equal at run time.
    make_inputs: optional `dims -> inputs` (dims maps labels to sizes) for other shapes; when
        absent, export derives them from `inputs` (floats ~ N(0,1), ints in the example's range).
    """

    name: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    make_inputs: Callable[[dict[str, int]], dict[str, torch.Tensor]] | None = None
    variant: str = ""  # FFN variant, e.g. "swiglu", "moe-top2", "repa"
    description: str = ""
    max_dims: dict[str, int] = field(default_factory=dict)  # upper bound per label (pos. tables)
    # Graph output names, in forward-output order (e.g. ["logits"]); None: derived at export
    # from the forward's dict keys / ModelOutput fields, else "output" / "output_<i>".
    output_names: list[str] | None = None

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())
