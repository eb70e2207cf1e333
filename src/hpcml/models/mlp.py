from __future__ import annotations

import math

from torch import nn


class MLP(nn.Sequential):
    """Flatten -> (Linear -> ReLU) x depth -> Linear. Takes any input shape."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_outputs: int,
        hidden: int = 256,
        depth: int = 2,
        dropout: float = 0.0,
    ):
        if hidden <= 0 or depth < 0:
            raise ValueError(f"hidden must be > 0 and depth >= 0 (got hidden={hidden}, depth={depth})")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, num_outputs))
        super().__init__(*layers)
