"""A user's own networks, as a user would write them: plain torch, no hpcml imports. Importable in
every process of a test run (tests/conftest.py puts this folder on PYTHONPATH)."""

import math

from torch import nn


def build(input_shape, num_outputs, width=32):
    """A factory: Linear -> BatchNorm -> ReLU -> Linear (BatchNorm: running stats must survive resume)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, num_outputs),
    )


class TinyNet(nn.Module):
    """A class works as well as a function."""

    def __init__(self, *, input_shape, num_outputs, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh())
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x):
        return self.head(self.body(x))
