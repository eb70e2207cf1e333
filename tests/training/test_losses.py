"""The fused label-smoothed cross-entropy against torch's nn.CrossEntropyLoss(label_smoothing=e)."""

import pytest
import torch
from torch.nn import functional as F

from hpcml.training.losses import SmoothedCrossEntropy, classification_loss


@pytest.mark.parametrize(("n", "k", "eps"), [(100, 10, 0.1), (7, 3, 0.3), (1, 2, 0.05), (64, 1000, 0.1)])
def test_smoothed_cross_entropy_equals_torch_in_value_and_gradient(n, k, eps):
    torch.manual_seed(n + k)
    logits = (torch.randn(n, k) * 4).requires_grad_()
    y = torch.randint(0, k, (n,))
    ours = SmoothedCrossEntropy(eps)(logits, y)
    (g_ours,) = torch.autograd.grad(ours * 3.0, logits)  # an upstream gradient other than 1
    ref = F.cross_entropy(logits, y, label_smoothing=eps)
    (g_ref,) = torch.autograd.grad(ref * 3.0, logits)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-7)


def test_smoothed_cross_entropy_under_bf16_autocast_returns_the_logits_dtype():
    torch.manual_seed(0)
    logits = torch.randn(16, 5, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 5, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SmoothedCrossEntropy(0.1)(logits, y)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    ref = F.cross_entropy(logits.detach().float(), y, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_other_shapes_and_no_smoothing_use_torch():
    assert isinstance(classification_loss(0.0), torch.nn.CrossEntropyLoss)
    logits, y = torch.randn(4, 3, 5), torch.randint(0, 3, (4, 5))  # (N, C, d) targets
    torch.testing.assert_close(
        SmoothedCrossEntropy(0.2)(logits, y), F.cross_entropy(logits, y, label_smoothing=0.2)
    )
