"""Reference models the policies' cost is measured against, built from a loaded robustnorm model.

- :func:`fold_norms`: frozen statistics folded into the convolutions. Each norm layer's eval transform
  ``y = x * scale + shift`` (BatchNorm and RobustNorm alike, from the layer's own ``scale_shift``) goes into
  the weights and bias of the ``nn.Conv2d`` before it, and the layer becomes ``nn.Identity``: the fastest
  a frozen model can run, as an inference compiler would deploy it.
- :func:`train_mode_batchnorm`: the same architecture with PyTorch's own ``nn.BatchNorm2d`` in train mode
  (batch statistics, cuDNN/oneDNN kernels), to be run under ``torch.no_grad``: what batch statistics cost
  without the library.
- :func:`random_model_dir`: a saved model of any registered architecture with random weights (speed does not
  depend on the weights), so that the engines can load it like a bundled model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

import robustnorm

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _scale_shift(layer: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's frozen ``y = x * scale + shift``, per channel, in float64."""
    if hasattr(layer, "scale_shift"):  # the library's layers: BatchNorm or RobustNorm statistics
        return layer.scale_shift(*layer.population(torch.float64))
    assert layer.running_mean is not None and layer.running_var is not None
    scale = 1.0 / torch.sqrt(layer.running_var.double() + layer.eps)
    shift = -layer.running_mean.double() * scale
    if layer.affine:
        scale = scale * layer.weight.double()
        shift = shift * layer.weight.double() + layer.bias.double()
    return scale, shift


def _norms_after_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d, str]]:
    """(conv name, conv, norm name) for every norm layer, paired with the convolution registered just before
    it (how the ResNets and the VGG of ``robustnorm.models`` are written: conv, then its norm)."""
    pairs, last_conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = (name, module)
        elif isinstance(module, nn.BatchNorm2d):
            if last_conv is None or last_conv[1].out_channels != module.num_features:
                raise ValueError(f"norm layer {name!r} does not follow a convolution with {module.num_features} "
                                 "output channels; this model cannot be folded")
            pairs.append((last_conv[0], last_conv[1], name))
            last_conv = None
    return pairs


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose norm layers are folded into the convolutions before them."""
    folded = copy.deepcopy(model).eval()
    for conv_name, conv, norm_name in _norms_after_convs(folded):
        norm = folded.get_submodule(norm_name)
        scale, shift = _scale_shift(norm)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                          padding_mode=conv.padding_mode).to(conv.weight.device)
        fused.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        fused.bias.copy_(bias.to(conv.weight.dtype))
        _replace(folded, conv_name, fused)
        _replace(folded, norm_name, nn.Identity())
    return folded


def train_mode_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose norm layers are plain ``nn.BatchNorm2d`` in train mode (the rest in eval
    mode), carrying the layers' parameters; run it under ``torch.no_grad`` (its running buffers still move)."""
    reference = copy.deepcopy(model).eval()
    for name, layer in list(reference.named_modules()):
        if isinstance(layer, nn.BatchNorm2d):
            plain = nn.BatchNorm2d(layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine)
            plain.load_state_dict(layer.state_dict())
            _replace(reference, name, plain.to(layer.running_mean.device).train())
    return reference


def random_model_dir(architecture: str, directory: Path, *, norm: str = "bn", policy: str = "frozen",
                     seed: int = 0) -> Path:
    """Save a randomly initialised ``architecture`` in ``directory`` (``resnet50``: 224x224, 1,000 classes,
    ImageNet normalisation; the CIFAR models: 32x32, 10 classes) and return the directory."""
    torch.manual_seed(seed)
    imagenet = architecture == "resnet50"
    classes = 1000 if imagenet else 10
    kwargs = {"p": 0.2} if norm == "robustnorm" else {}
    model = robustnorm.create_model(architecture, norm=norm, num_classes=classes, **kwargs).eval()
    inputs = {"input_size": [3, 224, 224], "mean": IMAGENET_MEAN, "std": IMAGENET_STD} if imagenet else {}
    card = robustnorm.ModelCard(name=f"random-{architecture}-{norm}", architecture=architecture, norm=norm,
                                p=kwargs.get("p"), labels=[f"class{i}" for i in range(classes)], policy=policy,
                                **inputs)
    robustnorm.save_model(model, card, directory)
    return directory
