"""convnet1d's pooling layer (PairMaxPool1d) against torch's max_pool1d, and the bench's plain-torch
copy of convnet1d against hpcml's: same function, same gradients, same initial weights."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hpcml.bench.baselines import plain_convnet1d
from hpcml.models.cnn import ConvNet1d, PairMaxPool1d


@pytest.mark.parametrize("length", [40, 41, 2, 7])
def test_pair_max_pool_equals_max_pool1d_values_and_gradients(length):
    torch.manual_seed(length)
    x = torch.randn(6, 5, length)
    x[0, 0, :2] = 1.5  # a tie: max_pool1d's gradient goes to the first of the pair
    x[1, 2, 2 * (length // 2) - 2 : 2 * (length // 2)] = -0.25
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(6, 5, length // 2)
    out_a, out_b = PairMaxPool1d()(a), F.max_pool1d(b, 2)
    out_a.backward(grad)
    out_b.backward(grad)
    assert torch.equal(out_a, out_b)
    assert torch.equal(a.grad, b.grad)
    assert a.grad[0, 0, 0] == grad[0, 0, 0] and a.grad[0, 0, 1] == 0  # the tie, checked directly


def test_pair_max_pool_propagates_nan_and_is_max_pool1d_without_autograd():
    x = torch.tensor([[[1.0, float("nan"), 3.0, 2.0]]], requires_grad=True)
    out = PairMaxPool1d()(x)
    assert torch.isnan(out[0, 0, 0]) and out[0, 0, 1] == 3.0
    pool = PairMaxPool1d()
    assert isinstance(pool, nn.MaxPool1d) and pool.kernel_size == 2  # pruning and export see MaxPool1d
    with torch.no_grad():
        y = torch.randn(3, 4, 10)
        assert torch.equal(pool(y), F.max_pool1d(y, 2))


def test_plain_contender_is_convnet1d_with_the_same_weights_and_gradients():
    torch.manual_seed(3)
    ours = ConvNet1d(input_shape=(40,), num_outputs=10)
    torch.manual_seed(3)
    plain = plain_convnet1d((40,), 10)
    theirs = [p for p in plain.parameters()]
    assert len(theirs) == len(list(ours.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs, strict=True))
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    for m in (ours, plain):
        m.train()
        F.cross_entropy(m(x), y).backward()
    assert torch.equal(ours(x), plain(x))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours.parameters(), theirs, strict=True))
    torch.manual_seed(3)
    with_channels = plain_convnet1d((1, 40), 10)  # data already shaped (N, C, L), as the bench's is
    assert torch.equal(with_channels(x.unsqueeze(1)), plain(x))
