"""A user's own network for `hpcml train --model mynets:build` (run from examples/, or with examples/
on PYTHONPATH). Plain torch; hpcml calls build(input_shape=..., num_outputs=..., **--model-kw)."""

import math

from torch import nn


def build(input_shape, num_outputs, width=64):
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        nn.BatchNorm1d(width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, num_outputs),
    )
