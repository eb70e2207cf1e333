from __future__ import annotations

import math

from torch import nn


class MLP(nn.Sequential):
    """Flatten -> (Linear -> ReLU) x depth -> Linear. Takes any input shape.

    `widths` gives each hidden layer its own width (a pruned model records them) and replaces
    `hidden` and `depth`: `widths=[256, 256]` is the default `hidden=256, depth=2`.
    """

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_outputs: int,
        hidden: int = 256,
        depth: int = 2,
        dropout: float = 0.0,
        widths: list[int] | None = None,
    ):
        if widths is None:
            if hidden <= 0 or depth < 0:
                raise ValueError(f"hidden must be > 0 and depth >= 0 (got hidden={hidden}, depth={depth})")
            widths = [hidden] * depth
        elif any(w <= 0 for w in widths):
            raise ValueError(f"every width must be > 0 (got widths={widths})")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for out in widths:
            layers += [nn.Linear(width, out), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = out
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)
