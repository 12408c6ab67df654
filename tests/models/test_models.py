"""Model definitions: parameter counts (torchvision's for ResNet-18/50) and forward shapes."""
import pytest
import torch
from torch import nn

from sparsekern.models import MODELS, WideResNet, get_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, kwargs, expected", [
    ("mlp", {}, 266_610),                                  # 784-300-100-10
    ("lenet5", {}, 61_706),                                # 32x32 classic LeNet-5
    ("lenet5", {"image_size": 28}, 61_706),                # 28x28 padded to the same shapes
    ("resnet20", {}, 269_722),                             # option A (He et al.: 0.27M)
    ("resnet20", {"shortcut": "B"}, 272_474),
    ("resnet32", {}, 464_154),                             # 0.46M
    ("wrn-22-2", {}, 1_079_642),
    ("resnet18", {"num_classes": 1000}, 11_689_512),       # torchvision.models.resnet18
    ("resnet50", {"num_classes": 1000}, 25_557_032),       # torchvision.models.resnet50
])
def test_param_counts(name, kwargs, expected):
    assert n_params(get_model(name, **kwargs)) == expected


def test_wide_resnet_matches_published_wrn_28_10():
    # The reference WRN-28-10 for CIFAR-10 has 36,479,194 parameters; this checks the WRN builder.
    assert n_params(WideResNet(28, 10)) == 36_479_194


@pytest.mark.parametrize("name, shape", [("mlp", (2, 1, 28, 28)), ("lenet5", (2, 1, 32, 32)),
                                         ("resnet20", (2, 3, 32, 32)), ("wrn-22-2", (2, 3, 32, 32)),
                                         ("resnet18", (1, 3, 64, 64))])
def test_forward_shapes(name, shape):
    model = get_model(name, num_classes=7, in_channels=shape[1], image_size=shape[-1])
    assert model(torch.randn(shape)).shape == (shape[0], 7)


def test_lenet_on_upsampled_digits_and_registry_errors():
    assert get_model("lenet5", in_channels=1, image_size=28)(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert get_model("lenet5", image_size=28, padding=0).fc1.in_features == 256  # rigl_tf2's LeNet-5
    with pytest.raises(ValueError, match="too small"):
        get_model("lenet5", image_size=8)
    with pytest.raises(ValueError, match="must be one of"):
        get_model("vgg16")
    assert get_model("WRN_22_2") is not None and set(MODELS) >= {"mlp", "lenet5", "resnet32", "resnet50"}


def test_only_groups_one_convs():
    for name in MODELS:
        if name in ("resnet50", "convnext-tiny"):
            continue  # resnet50: resnet18's block code, slower to build; ConvNeXt: below
        assert all(m.groups == 1 for m in get_model(name).modules() if isinstance(m, nn.Conv2d))


def test_convnext_tiny_matches_the_published_model_and_keeps_depthwise_convs_dense():
    import sparsekern
    model = get_model("convnext-tiny", 1000)
    assert sum(p.numel() for p in model.parameters()) == 28_589_128  # ConvNeXt-T, torchvision/timm
    small = sparsekern.models.ConvNeXt(10, depths=(1, 1), dims=(8, 16))
    x = torch.randn(2, 3, 32, 32)
    assert small(x).shape == (2, 10)
    sparsekern.sparsify(small, 0.5, "uniform", init="dense")
    kinds = [type(m).__name__ for m in small.modules()]
    assert kinds.count("SparseLinear") == 5 and kinds.count("SparseConv2d") == 2  # pointwise + head; stem + down
    assert all(m.groups == m.in_channels for m in small.modules() if type(m) is nn.Conv2d)  # depthwise, dense
    small(x).sum().backward()
