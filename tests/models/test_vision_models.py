"""The image families (resnet18/34, mobilenet_v2, mobilenet_v3_small): sizes equal the published
ones, both stems downsample as documented, torchvision's init and layer names, flat and channels_last
inputs, and a too-small image is a named error (in Python and through `hpcml train`, exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hpcml.errors import UsageError
from hpcml.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

VISION = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet34")

# Published at 3x224x224, 1000 classes: parameters and GMACs ("GFLOPS") of torchvision's weight
# tables (`num_params`, `_ops`: MobileNet_V2 / V3_Small / ResNet18 / ResNet34 IMAGENET1K_V1). The
# papers agree: ResNet-18 1.8 and ResNet-34 3.6 GFLOPs (He et al. 2015, multiply-adds), MobileNetV2
# 300M and MobileNetV3-Small 56M MAdds. Written here by hand: never computed by hpcml.
PUBLISHED = {
    "mobilenet_v2": (3_504_872, 0.301),
    "mobilenet_v3_small": (2_542_856, 0.057),
    "resnet18": (11_689_512, 1.814),
    "resnet34": (21_797_672, 3.664),
}


def _on_meta(name: str, shape=(3, 224, 224), outputs=1000, **kw):
    with torch.device("meta"):
        return create_model(name, input_shape=shape, num_outputs=outputs, **kw).eval()


@pytest.mark.parametrize("name", VISION)
def test_params_and_macs_equal_the_published(name):
    model = _on_meta(name)
    # FlopCounterMode counts convolutions and matmuls (2 FLOPs per multiply-add), not BatchNorm,
    # activations (ReLU, hardswish, hardsigmoid), pooling, the squeeze-excitation product or the
    # residual sums: the published figures count the same multiply-adds.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = model(torch.zeros(1, 3, 224, 224, device="meta"))
    assert out.shape == (1, 1000)
    params, gmacs = PUBLISHED[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert counter.get_total_flops() / 2 / 1e9 == pytest.approx(gmacs, rel=0.05)


@pytest.mark.parametrize("name", VISION)
@pytest.mark.parametrize(
    ("stem", "size", "final"), [("imagenet", 224, 7), ("imagenet", 32, 1), ("cifar", 32, 4)]
)
def test_stems_downsample_32x_and_8x(name, stem, size, final):
    model = _on_meta(name, shape=(3, size, size), outputs=10, stem=stem)
    seen = []
    model.avgpool.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape[-2:])))
    model(torch.zeros(2, 3, size, size, device="meta"))
    assert seen == [(final, final)]


@pytest.mark.parametrize("name", VISION)
def test_cifar_stem_keeps_the_parameters_but_resnet_first_conv(name):
    imagenet, cifar = _on_meta(name, shape=(3, 32, 32)), _on_meta(name, shape=(3, 32, 32), stem="cifar")
    diff = sum(p.numel() for p in imagenet.parameters()) - sum(p.numel() for p in cifar.parameters())
    assert diff == (64 * 3 * (49 - 9) if name.startswith("resnet") else 0)  # 7x7 -> 3x3 first conv


def test_layer_names_are_torchvisions():
    """Keys as in torchvision's state dicts (read from its model sources), so its weights can load."""
    keys = {
        "resnet18": ["conv1.weight", "bn1.running_mean", "layer1.1.conv2.weight",
                     "layer2.0.downsample.0.weight", "layer4.1.bn2.bias", "fc.weight"],
        "mobilenet_v2": ["features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight",
                         "features.1.conv.1.weight", "features.1.conv.2.bias", "features.2.conv.0.0.weight",
                         "features.2.conv.2.weight", "features.2.conv.3.running_mean", "features.18.0.weight",
                         "classifier.1.weight"],
        "mobilenet_v3_small": ["features.0.0.weight", "features.1.block.0.0.weight",
                               "features.1.block.1.fc1.weight", "features.1.block.1.fc2.bias",
                               "features.1.block.2.1.running_var", "features.2.block.0.0.weight",
                               "features.11.block.3.0.weight", "features.12.0.weight", "classifier.0.weight",
                               "classifier.3.bias"],
    }  # fmt: skip
    for name, names in keys.items():
        state = _on_meta(name).state_dict()
        assert set(names) <= set(state), name
    assert len(_on_meta("resnet18").state_dict()) == 122  # torchvision's resnet18 state dict: 122 entries


@torch.no_grad()
def test_init_is_torchvisions():
    torch.manual_seed(0)
    res = create_model("resnet18", input_shape=(3, 32, 32), num_outputs=10)
    w = res.layer4[1].conv2.weight  # Kaiming normal, fan_out = 512 x 3 x 3
    assert float(w.std()) == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.02) and abs(float(w.mean())) < 1e-3
    bound = 512**-0.5  # the fc keeps torch's default: uniform in +-1/sqrt(fan_in)
    assert float(res.fc.weight.abs().max()) <= bound and float(res.fc.weight.std()) > 0.8 * bound / 3**0.5
    mob = create_model("mobilenet_v3_small", input_shape=(3, 32, 32), num_outputs=10)
    head = mob.classifier[0]
    assert float(head.weight.std()) == pytest.approx(0.01, rel=0.02) and not head.bias.any()
    for model in (res, mob):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert bool((m.weight == 1).all()) and not m.bias.any()
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                assert not m.bias.any()  # the squeeze-excitation convs


def test_width_rounds_channels_to_multiples_of_8():
    model = create_model("mobilenet_v2", input_shape=(3, 32, 32), num_outputs=10, width=0.35)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert convs[0].out_channels == 16 and convs[-1].out_channels == 1280  # 32 x 0.35 -> 16; last kept
    assert (
        create_model("mobilenet_v2", input_shape=(3, 32, 32), num_outputs=10, width=1.4)
        .features[-1][0]
        .out_channels
        == 1792
    )


@pytest.mark.parametrize(
    ("name", "kw", "shape"),
    [
        ("resnet18", {"stem": "cifar"}, (8, 8)),
        ("resnet34", {}, (3, 32, 40)),
        ("mobilenet_v2", {"stem": "cifar", "width": 0.25}, (3, 16, 16)),
        ("mobilenet_v3_small", {"stem": "cifar", "width": 0.25}, (1, 12, 9)),
    ],
)
def test_flat_4d_and_channels_last_inputs_agree(name, kw, shape):
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape, num_outputs=3, **kw).eval()
    x = torch.randn(4, *shape)
    images = x.reshape(4, -1, *shape[-2:])
    with torch.no_grad():
        out = model(images)
        assert out.shape == (4, 3)
        torch.testing.assert_close(model(x.reshape(4, -1)), out)
        torch.testing.assert_close(model(x), out)  # as given: (B, H, W) for an (H, W) input shape
        model.to(memory_format=torch.channels_last)
        last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
        seen = []
        last_conv.register_forward_hook(
            lambda _m, _a, y: seen.append(y.is_contiguous(memory_format=torch.channels_last))
        )
        torch.testing.assert_close(model(images.contiguous(memory_format=torch.channels_last)), out)
        assert seen == [True]  # still channels_last at the last conv: no reshape of a 4-D input
    model.train()
    model(images).logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", VISION)
def test_too_small_images_name_the_model_stem_and_minimum(name):
    with pytest.raises(UsageError) as err:
        create_model(name, input_shape=(3, 8, 8), num_outputs=2)
    assert str(err.value) == (
        f"model {name}: {name} with stem=imagenet needs images of at least 32x32 (got 8x8); "
        "use --model-kw stem=cifar (8x8 and up) or --image-size"
    )
    create_model(name, input_shape=(3, 8, 8), num_outputs=2, stem="cifar")  # fits
    with pytest.raises(UsageError, match=rf"^model {name}: {name} with stem=cifar needs images of at least "
                       r"8x8 \(got 4x8\); use --image-size$"):  # fmt: skip
        create_model(name, input_shape=(1, 4, 8), num_outputs=2, stem="cifar")
    with pytest.raises(UsageError, match=rf"{name}: stem must be one of 'imagenet', 'cifar', got 'big'"):
        create_model(name, input_shape=(3, 32, 32), num_outputs=2, stem="big")


def test_bad_width_and_dropout():
    with pytest.raises(UsageError, match="model mobilenet_v2: mobilenet_v2: width must be > 0, got 0"):
        create_model("mobilenet_v2", input_shape=(3, 32, 32), num_outputs=2, width=0)
    with pytest.raises(UsageError, match=r"kwargs\.width must be a number, got True"):
        create_model("mobilenet_v3_small", input_shape=(3, 32, 32), num_outputs=2, width=True)
    with pytest.raises(UsageError, match=r"dropout must be in \[0, 1\), got 1"):
        create_model("mobilenet_v3_small", input_shape=(3, 32, 32), num_outputs=2, dropout=1)
    with pytest.raises(UsageError, match="resnet18: resnet18.. got an unexpected keyword argument 'width'"):
        create_model("resnet18", input_shape=(3, 32, 32), num_outputs=2, width=0.5)


def test_models_command_counts_at_a_shape(capsys):
    from hpcml.cli import main

    capsys.readouterr()
    assert main(["models", "--shape", "3,224,224", "--classes", "1000", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shape"] == [3, 224, 224] and doc["classes"] == 1000
    costs = {m["name"]: m.get("cost") for m in doc["models"]}
    for name, (params, gmacs) in PUBLISHED.items():
        assert costs[name]["params"] == params
        assert costs[name]["macs"] / 1e9 == pytest.approx(gmacs, rel=0.05)
    assert costs["mlp"]["params"] == 3 * 224 * 224 * 256 + 256 + 256 * 256 + 256 + 256 * 1000 + 1000
    assert "cnn1d needs inputs of 1 or 2 dims" in costs["cnn1d"]["error"]
    assert main(["models", "--shape", "3,16,16", "--classes", "10", "--model-kw", "stem=cifar"]) == 0
    out = capsys.readouterr().out
    assert "at input 3,16,16, 10 outputs, stem=cifar" in out and "11,173,962" in out  # resnet18, 10 classes
    assert main(["models", "--shape", "3,16,16"]) == 0
    assert "resnet18 with stem=imagenet needs images of at least 32x32 (got 16x16)" in capsys.readouterr().out
    assert main(["models", "--shape", "3,x"]) == 2
    assert "--shape '3,x': give the input shape as positive sizes" in capsys.readouterr().err


def test_train_on_too_small_images_exits_2_naming_the_fix(cli, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / label / f"{i}.png"
            )
    out = tmp_path / "run"
    args = ["--model", "resnet18", "--epochs", "1", "--threads", "1", "--quiet", "--out", str(out)]
    r = cli("train", "--data", str(tmp_path / "imgs"), *args)
    assert r.returncode == 2, r.stderr
    assert (
        "model resnet18: resnet18 with stem=imagenet needs images of at least 32x32 (got 8x8); "
        "use --model-kw stem=cifar (8x8 and up) or --image-size" in r.stderr
    )
    assert "Traceback" not in r.stderr and not (out / "model").exists()
