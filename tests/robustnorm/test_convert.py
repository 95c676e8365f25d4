"""convert_norms on a torchvision-style ResNet defined here (torchvision itself does not import beside torch 2.13)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustnorm import AdaptiveBatchNorm2d, batch_groups, convert_norms, set_policy


class Bottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck, written out: BatchNorm nested in blocks and in downsample."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TinyTorchvisionResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        downsample = nn.Sequential(nn.Conv2d(8, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.layer1 = nn.Sequential(Bottleneck(8, 8, 2, downsample), Bottleneck(32, 8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layer1(x)), 1))


def trained_resnet() -> TinyTorchvisionResNet:
    torch.manual_seed(0)
    model = TinyTorchvisionResNet().train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32) + 0.5)
    return model.eval()


def test_frozen_conversion_keeps_outputs_keys_and_tensors() -> None:
    original = trained_resnet()
    keys = list(original.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = original(x)
    converted = convert_norms(trained_resnet(), policy="frozen")
    assert list(converted.state_dict()) == keys
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert sum(isinstance(m, AdaptiveBatchNorm2d) for m in converted.modules()) == 8
    with torch.no_grad():
        assert torch.equal(converted(x), expected)


def test_conversion_shares_parameters_and_buffers() -> None:
    model = trained_resnet()
    bn = model.layer1[0].downsample[1]
    weight, running_mean = bn.weight, bn.running_mean
    convert_norms(model)
    assert model.layer1[0].downsample[1].weight is weight
    assert model.layer1[0].downsample[1].running_mean is running_mean


def test_batch_policy_equals_functional_batch_norm_in_training_mode() -> None:
    """Each converted layer under `batch` normalises like F.batch_norm(training=True) on its input."""
    model = convert_norms(trained_resnet(), policy="batch")
    x = torch.randn(6, 3, 32, 32)
    seen = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        expected = F.batch_norm(inputs[0], None, None, module.weight, module.bias, True, 0.0, module.eps)
        seen[module] = torch.allclose(output, expected, atol=1e-5)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, AdaptiveBatchNorm2d)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    assert len(seen) == 8 and all(seen.values())


def test_converted_model_groups_and_policy_switch() -> None:
    model = convert_norms(trained_resnet(), policy="adaptive:3")
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad(), batch_groups(model, [2, 3]) as run:
        model(x)
    assert run.ran == ["blend", "batch"]
    set_policy(model, "frozen")
    with torch.no_grad(), batch_groups(model, [2, 3]) as run:
        model(x)
    assert run.ran == ["frozen", "frozen"]


def test_bare_batchnorm_is_converted() -> None:
    layer = nn.BatchNorm2d(3).eval()
    converted = convert_norms(layer, policy="batch")
    assert isinstance(converted, AdaptiveBatchNorm2d) and str(converted.policy) == "batch"
