"""int8 quantization of Linear layers: int8 weights (one scale per output row), activations quantized
per row at run time. The weights are quantized by torchao's `quantize_` (Int8DynamicActivation-
Int8WeightConfig) where torchao is installed (`pip install 'hpcml[quant]'`), else by the same
symmetric per-row scheme in plain torch; either way the model dir stores int8 tensors + float32
scales in safetensors and runs through models/int8.Int8Linear, so loading needs neither torchao nor
pickle.

Applied only where it pays. Measured on this project's CPUs (1 thread, Int8Linear vs nn.Linear): a
1024x1024 layer is 3.9x faster at batch 256, 256x256 1.7x, while 128x128 and smaller are slower at
every batch (0.2-0.8x): quantizing a row of activations costs more than the smaller matmul saves. So
a layer is quantized when both its sizes are >= MIN_FEATURES; the others stay float32, and the
report says why for each.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from hpcml.errors import UsageError
from hpcml.models.int8 import SCHEME, Int8Linear, quantize_weight, swap_int8

__all__ = ["MIN_FEATURES", "quantize_int8", "quantizer"]

MIN_FEATURES = 256


def quantizer() -> str:
    """'torchao <version>' when torchao imports here, else 'torch' (the built-in per-row scheme)."""
    try:
        torchao = _torchao()
    except ImportError:
        return "torch"
    return f"torchao {torchao.__version__}"


def _torchao():
    # torchao warns about CUDA-only kernels it cannot load on a CPU build, torch about its pytree use
    logs = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)
    return torchao


def _weights(linear: nn.Linear, use_torchao: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row) of `linear`."""
    if not use_torchao:
        return quantize_weight(linear.weight)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    probe = nn.Sequential(copy.deepcopy(linear))
    quantize_(probe, Int8DynamicActivationInt8WeightConfig())
    w = probe[0].weight
    return w.qdata.detach().clone(), w.scale.detach().reshape(-1).float().clone()


def _decide(name: str, linear: nn.Linear, output: bool) -> str | None:
    """Why `linear` stays float32, or None to quantize it."""
    if min(linear.in_features, linear.out_features) < MIN_FEATURES:
        where = "the output layer, " if output else ""
        return (
            f"{where}{linear.in_features}x{linear.out_features} is below {MIN_FEATURES}x{MIN_FEATURES}: "
            "quantizing each activation row costs more than the int8 matmul saves there"
        )
    return None


def quantize_int8(module: nn.Module) -> tuple[nn.Module, list[dict[str, Any]], list[str], str]:
    """(quantized copy, per-layer report, quantized layer names, quantizer used). A model with no
    Linear layer, or none where int8 pays, is an error: the result would not be an int8 model."""
    linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError("--quantize int8 quantizes Linear layers; this model has none")
    work = copy.deepcopy(module).eval()
    report, chosen = [], []
    for i, (name, linear) in enumerate(linears):
        why = _decide(name, linear, output=i == len(linears) - 1)
        entry = {"layer": name, "shape": [linear.out_features, linear.in_features]}
        report.append({**entry, "dtype": "float32", "why": why} if why else {**entry, "dtype": "int8"})
        if why is None:
            chosen.append(name)
    if not chosen:
        raise UsageError(
            f"--quantize int8: no Linear layer is large enough for int8 to pay (each needs both sizes >= "
            f"{MIN_FEATURES}); the largest is {max(linears, key=lambda nm: nm[1].weight.numel())[0]!r}"
        )
    used = quantizer()
    swap_int8(work, chosen)
    named = dict(work.named_modules())
    with torch.no_grad():
        for name in chosen:
            linear = dict(module.named_modules())[name]
            q, scale = _weights(linear, used.startswith("torchao"))
            named[name].load_state_dict(Int8Linear.from_float(linear, q, scale).state_dict())
    return work, report, chosen, used


__all__ += ["SCHEME"]
