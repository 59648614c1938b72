"""Models by name: torchvision ResNets for ImageNet-sized data, a small CNN for the bundled digits."""

from __future__ import annotations

from torch import nn

from train.data.folders import is_default_data

MODELS = ("resnet50", "resnet18", "small_cnn", "cnn28")


def small_cnn(num_classes: int) -> nn.Module:
    """Conv(3→16, stride 2) BN ReLU, Conv(16→32, stride 2) BN ReLU, global average pool,
    Linear(32→num_classes): 5K parameters and 0.1M multiply-adds per 16×16 image, so the study's
    hundred-odd runs fit in minutes on two CPU cores."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16), *block(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, num_classes))


def cnn28(num_classes: int) -> nn.Module:
    """A CNN sized for 28×28 images (Fashion-MNIST): Conv(3→16) BN ReLU at 28×28, Conv(16→32, stride 2)
    BN ReLU at 14×14, Conv(32→64, stride 2) BN ReLU at 7×7, global average pool, Linear(64→num_classes):
    24K parameters and 2.1M multiply-adds per image."""
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 64, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, num_classes))


def resolve_model_name(model: str, data: str) -> str:
    """"default" is small_cnn on the bundled data and resnet50 elsewhere."""
    if model == "default":
        return "small_cnn" if is_default_data(data) else "resnet50"
    return model


def build_model(name: str, num_classes: int) -> nn.Module:
    """The model called `name` (one of MODELS) with a `num_classes`-way classifier, freshly initialised
    from torch's current RNG state. ResNet-50 zero-initialises the last BN of each residual block, as the
    large-batch recipes do (Goyal et al. 2017)."""
    if name == "small_cnn":
        return small_cnn(num_classes)
    if name == "cnn28":
        return cnn28(num_classes)
    if name in ("resnet50", "resnet18"):
        import torchvision

        return getattr(torchvision.models, name)(num_classes=num_classes, zero_init_residual=True)
    raise ValueError(f"--model must be one of default, {', '.join(MODELS)}, got {name!r}")
