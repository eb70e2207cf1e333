import numpy as np
import pytest
import torch

from hpcml.errors import UsageError
from hpcml.models import create_model, default_model_for, list_models


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", (20,)),
        ("mlp", (1, 8, 8)),
        ("cnn1d", (1, 40)),
        ("cnn1d", (40,)),
        ("cnn2d", (1, 8, 8)),
        ("cnn2d", (3, 16, 16)),
    ],
)
def test_forward_backward(name, shape):
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape, num_outputs=7)
    x = torch.randn(5, *shape)
    out = model(x)
    assert out.shape == (5, 7)
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_registry_and_defaults():
    assert list_models() == [
        "mlp", "cnn1d", "convnet1d", "cnn2d", "mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet34"
    ]  # fmt: skip
    assert default_model_for("sequence") == "convnet1d"
    assert default_model_for("image") == "cnn2d"
    assert default_model_for("tabular") == "mlp"
    assert create_model("cnn1d", input_shape=(1, 40), num_outputs=10).head.in_features == 64 * 5
    net = create_model("convnet1d", input_shape=(40,), num_outputs=10)
    # five 3-wide convs (32 channels, no bias) + BatchNorm, two pools (40 -> 10), linear head
    convs = 3 * 32 + 4 * 3 * 32 * 32
    assert sum(p.numel() for p in net.parameters()) == convs + 5 * 2 * 32 + (32 * 10 * 10 + 10)
    assert net(torch.zeros(3, 40)).shape == (3, 10)


def test_bad_model_inputs():
    valid = "mlp, cnn1d, convnet1d, cnn2d, mobilenet_v2, mobilenet_v3_small, resnet18, resnet34, or"
    with pytest.raises(UsageError, match=f"unknown model 'resnet'; valid: {valid}"):
        create_model("resnet", input_shape=(4,), num_outputs=2)
    with pytest.raises(UsageError, match="cnn2d needs inputs of 2 or 3 dims"):
        create_model("cnn2d", input_shape=(40,), num_outputs=2)
    with pytest.raises(UsageError, match="unexpected keyword argument 'widht'"):
        create_model("mlp", input_shape=(4,), num_outputs=2, widht=3)
    with pytest.raises(UsageError, match=r"model mlp: kwargs\.hidden must be a whole number, got 64\.0"):
        create_model("mlp", input_shape=(4,), num_outputs=2, hidden=64.0)
    with pytest.raises(UsageError, match=r"model cnn1d: kwargs\.channels must be a whole number, got True"):
        create_model("cnn1d", input_shape=(1, 40), num_outputs=2, channels=True)


def _model(name, shape, **kw):
    from hpcml.models.io import Model

    module = create_model(name, input_shape=shape, num_outputs=10, **kw)
    meta = {"architecture": name, "input_shape": list(shape), "classes": [str(i) for i in range(10)],
            "preprocessing": {"method": "none", "shift": [0.0], "scale": [1.0]}}  # fmt: skip
    return Model(module, meta)


def test_predict_rows_follow_the_widest_activation():
    """Rows per forward by default: 2 MiB over the widest layer output of one row (4 bytes a value),
    clamped to 64..65,536; the predictions do not depend on it."""
    from hpcml.models.io import PREDICT_CACHE_BYTES

    assert _model("mlp", (32,), hidden=512).predict_rows == PREDICT_CACHE_BYTES // (4 * 512) == 1024
    assert _model("mlp", (32,), hidden=16).predict_rows == 2**21 // (4 * 32)  # the input is widest
    assert _model("convnet1d", (1, 40)).predict_rows == 2**21 // (4 * 32 * 40)  # 32 channels x 40
    assert _model("mlp", (3, 300, 300), hidden=8).predict_rows == 64  # 270,000 inputs a row: the floor
    m = _model("mlp", (32,), hidden=512)
    x = np.random.default_rng(0).normal(size=(3000, 32)).astype(np.float32)
    np.testing.assert_array_equal(m.predict(x), m.predict(x, batch_size=3000))
