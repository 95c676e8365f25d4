"""Reference models the policies' cost is measured against, built from a loaded robustnorm model.

- :func:`fold_norms` (from :mod:`robustnorm.fold`): frozen statistics folded into the convolutions. Each norm
  layer's eval transform ``y = x * scale + shift`` (BatchNorm and RobustNorm alike) goes into the weights and
  bias of the ``nn.Conv2d`` before it, and the layer becomes ``nn.Identity``: the fastest a frozen model can
  run, as an inference compiler would deploy it. Nothing is recorded.
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
from robustnorm.fold import _replace, fold_norms

__all__ = ["fold_norms", "random_model_dir", "train_mode_batchnorm"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


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
