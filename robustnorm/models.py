"""Model architectures with a pluggable normalization layer: CIFAR ResNets (depth 6n+2), a VGG-style net, and
ImageNet's ResNet-50 (torchvision's module names, so its state dicts load).

The norm layer is chosen by name from a small registry (``bn``, ``robustnorm``, ``none``), by class, or by a
``functools.partial``; ``create_model`` builds an architecture by name.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import Tensor, nn

from .layers import AdaptiveBatchNorm2d, RobustNorm2d

NormFactory = Callable[[int], nn.Module]
NormSpec = str | type | functools.partial | None


class _NoNorm(nn.Identity):
    """No normalization (``norm="none"``); takes the channel count to fit the norm-layer signature."""

    def __init__(self, num_features: int) -> None:
        super().__init__()


_NORM_LAYERS: dict[str, type[nn.Module]] = {
    "bn": AdaptiveBatchNorm2d,
    "robustnorm": RobustNorm2d,
    "none": _NoNorm,
}


def list_norms() -> list[str]:
    return sorted(_NORM_LAYERS)


def get_norm_layer(norm: NormSpec, **kwargs: object) -> NormFactory:
    """A factory ``f(num_features) -> nn.Module`` from a registry name, a class or a partial."""
    if norm is None:
        norm = "none"
    if isinstance(norm, str):
        key = norm.lower()
        if key not in _NORM_LAYERS:
            raise ValueError(f"unknown norm layer {norm!r}; valid names are {list_norms()}")
        layer = _NORM_LAYERS[key]
        if layer is not RobustNorm2d:
            kwargs = {k: v for k, v in kwargs.items() if k != "p"}
        if layer is _NoNorm:
            kwargs = {}
        return functools.partial(layer, **kwargs) if kwargs else layer
    if isinstance(norm, (type, functools.partial)):
        return functools.partial(norm, **kwargs) if kwargs else norm
    raise ValueError(f"norm must be a name in {list_norms()}, a class or a partial, got {norm!r}")


def create_norm(norm: NormSpec, num_features: int, **kwargs: object) -> nn.Module:
    return get_norm_layer(norm, **kwargs)(num_features)


class BasicBlock(nn.Module):
    """The two-convolution residual block of CIFAR ResNets; a 1x1 convolution shortcut when shapes change."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          norm(channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 images (He et al. 2016, section 4.2): depth 6n+2, widths 16, 32, 64."""

    def __init__(self, depth: int, norm: NormFactory, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = norm(16)
        self.relu = nn.ReLU(inplace=True)
        layers, in_channels = [], 16
        for stage, channels in enumerate((16, 32, 64)):
            stage_blocks = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                stage_blocks.append(BasicBlock(in_channels, channels, stride, norm))
                in_channels = channels
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class CifarVGG(nn.Module):
    """VGG-11 style net for 32x32 images: 3x3 convolutions, each followed by the norm layer and ReLU."""

    def __init__(self, norm: NormFactory, num_classes: int = 10, config: tuple = _VGG11) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(in_channels, item, 3, padding=1, bias=False), norm(item), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


class Bottleneck(nn.Module):
    """ResNet v1.5's bottleneck block (stride on the 3x3 convolution); module names as in torchvision."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            norm(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """ResNet for 224x224 images (He et al. 2016, table 1) with bottleneck blocks: ``layers=(3, 4, 6, 3)`` is
    ResNet-50. Module names follow ``torchvision.models.resnet`` so that its checkpoints load unchanged."""

    def __init__(self, layers: tuple[int, ...], norm: NormFactory, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages, in_channels = [], 64
        for stage, (blocks, channels) in enumerate(zip(layers, (64, 128, 256, 512))):
            stage_blocks = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                stage_blocks.append(Bottleneck(in_channels, channels, stride, norm))
                in_channels = channels * Bottleneck.expansion
            stages.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": functools.partial(CifarResNet, 20),
    "resnet32": functools.partial(CifarResNet, 32),
    "resnet44": functools.partial(CifarResNet, 44),
    "resnet56": functools.partial(CifarResNet, 56),
    "resnet50": functools.partial(ImageNetResNet, (3, 4, 6, 3)),
    "vgg11": CifarVGG,
}


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def create_model(name: str, norm: NormSpec = "bn", num_classes: int = 10, **norm_kwargs: object) -> nn.Module:
    """Build architecture ``name`` with ``norm`` layers (``bn``, ``robustnorm`` (takes ``p``), ``none``).

    ``num_classes`` defaults to CIFAR-10's 10, also for ``resnet50``: pass 1000 for ImageNet's head."""
    key = name.lower()
    if key not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; valid names are {list_architectures()}")
    return _ARCHITECTURES[key](norm=get_norm_layer(norm, **norm_kwargs), num_classes=num_classes)
