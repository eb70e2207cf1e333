"""Structured pruning on module shapes alone (no training): conv nets with pooling, BatchNorm chains,
and the layers it must refuse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hpcml.errors import UsageError
from hpcml.inference.prune import prune_module
from hpcml.models.chain import resize
from hpcml.models.registry import create_model


def _prune(module, fraction, arch="x:y", kwargs=None, shape=(1, 40), outputs=3):
    return prune_module(
        module.eval(), fraction=fraction, architecture=arch, kwargs=kwargs or {}, input_shape=shape,
        num_outputs=outputs,
    )  # fmt: skip


def test_cnn2d_pruned_equals_the_original_with_dropped_channels_silenced():
    torch.manual_seed(0)
    model = create_model("cnn2d", input_shape=(8, 8), num_outputs=10, channels=8).eval()
    pruned = _prune(model, 0.5, "cnn2d", {"channels": 8}, (8, 8), 10)
    assert pruned.kwargs == {"widths": [4, 8, 8]}
    assert dict(pruned.module.state_dict().items()).keys() == model.state_dict().keys()
    x = torch.randn(16, 8, 8)
    with torch.no_grad():
        for layer in pruned.layers:  # zero the rows (and biases) of the dropped channels
            conv = model.get_submodule(layer["layer"])
            keep = torch.topk(conv.weight.flatten(1).norm(dim=1), layer["after"]).indices
            drop = torch.ones(conv.weight.shape[0], dtype=torch.bool)
            drop[keep] = False
            conv.weight[drop], conv.bias[drop] = 0, 0
        torch.testing.assert_close(pruned.module(x), model(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_chain_keeps_its_statistics_and_flatten_blocks():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(1, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.MaxPool1d(2), nn.Flatten(),
        nn.Linear(8 * 19, 16), nn.ReLU(), nn.Linear(16, 3),
    ).eval()  # fmt: skip
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(5, 1, 40)
    same = _prune(net, 0.01)  # keeps every unit: must compute exactly what the original does
    torch.testing.assert_close(same.module(x), net(x))
    half = _prune(net, 0.5)
    assert half.pruned_widths == {"0": 4, "5": 8}
    assert half.module[1].num_features == 4 and half.module[5].in_features == 4 * 19
    rebuilt = copy.deepcopy(net)  # what the loader does with model.json's pruned_widths
    resize(rebuilt, half.pruned_widths)
    rebuilt.load_state_dict(half.module.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), half.module(x))


@pytest.mark.parametrize(
    ("net", "message"),
    [
        (
            nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)),
            r"through layer '1' \(LayerNorm\)",
        ),
        (nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.Flatten(), nn.Linear(8, 2)), "grouped convolution"),
        (nn.Sequential(nn.Linear(4, 2)), "only its output layer"),
    ],
)
def test_unsafe_chains_are_refused_naming_the_layer(net, message):
    with pytest.raises(UsageError, match=message):
        _prune(net, 0.5)
