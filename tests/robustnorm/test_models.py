"""Architectures: registry, depth 6n+2 ResNets, norm choice, forward shapes."""

from __future__ import annotations

import pytest
import torch

import robustnorm
from robustnorm import AdaptiveBatchNorm2d, RobustNorm2d, create_model


def test_registry_lists_cifar_resnets_and_vgg() -> None:
    assert robustnorm.list_architectures() == ["resnet20", "resnet32", "resnet44", "resnet50", "resnet56", "vgg11"]
    with pytest.raises(ValueError, match="valid names"):
        create_model("resnet18")


@pytest.mark.parametrize("name, convs", [("resnet20", 19), ("resnet32", 31), ("resnet56", 55)])
def test_resnet_depth(name: str, convs: int) -> None:
    model = create_model(name, norm="bn")
    three_by_three = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(three_by_three) == convs  # plus the fc layer: depth 6n+2


@pytest.mark.parametrize("name", ["resnet20", "vgg11"])
@pytest.mark.parametrize("norm, layer", [("bn", AdaptiveBatchNorm2d), ("robustnorm", RobustNorm2d), ("none", None)])
def test_norm_choice_and_shapes(name: str, norm: str, layer: type | None) -> None:
    model = create_model(name, norm=norm, num_classes=7, p=1.0).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if layer is None:
        assert not norms
    else:
        assert norms and all(type(m) is layer for m in norms)
        if layer is RobustNorm2d:
            assert all(m.p == 1.0 for m in norms)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
