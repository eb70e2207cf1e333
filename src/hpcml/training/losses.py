"""Training losses: cross-entropy with label smoothing as one fused autograd function.

torch's `cross_entropy(..., label_smoothing=e)` runs ~77 small ops forward and backward (the smoothing
term is built from reductions and their gradients); at batch 100 on a CPU each op costs a few
microseconds. `SmoothedCrossEntropy` computes the same loss, (1 - e) * NLL + e * mean over classes of
-log p, as log_softmax, one scatter and one dot product, and its gradient, softmax - q (q the smoothed
target), in three ops. Measured on a 2-core Xeon, logits 100 x 10, 2 threads: forward + backward
61 us against 98 us (plain cross-entropy: 40 us). Values and gradients equal torch's to float
rounding (tests/training/test_losses.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _SmoothedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        n, k = logits.shape
        logp = torch.log_softmax(logits.float(), 1)
        q = torch.full_like(logp, eps / k).scatter_(1, y.unsqueeze(1), 1.0 - eps + eps / k)
        ctx.save_for_backward(logp, q)
        ctx.dtype = logits.dtype
        return torch.dot(logp.view(-1), q.view(-1)).neg_().div_(n)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        logp, q = ctx.saved_tensors
        out = logp.exp().sub_(q).mul_(grad / logp.shape[0])
        return out.to(ctx.dtype), None, None


class SmoothedCrossEntropy(nn.Module):
    """Mean cross-entropy of logits (N, K) against class ids (N,) with label smoothing `eps`: the
    loss of nn.CrossEntropyLoss(label_smoothing=eps), in fewer ops. Other shapes go to torch's."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fast = logits.dim() == 2 and y.dim() == 1 and y.dtype == torch.long and len(y) > 0
        if fast and logits.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return _SmoothedCE.apply(logits, y, self.eps)
        return F.cross_entropy(logits, y, label_smoothing=self.eps)


def classification_loss(label_smoothing: float) -> nn.Module:
    """The training loss for class ids: plain cross-entropy, or the fused smoothed one."""
    return SmoothedCrossEntropy(label_smoothing) if label_smoothing > 0 else nn.CrossEntropyLoss()
