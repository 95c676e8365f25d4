"""ResNet-50 (``create_model("resnet50")``): torchvision's module names and sizes, so its state dicts load.

torchvision is not imported: its key layout is written down here. ``torchvision.models.resnet50()`` has 320
state-dict entries (161 parameters, 53 BatchNorm layers x 3 buffers) and 25,557,032 parameters.
"""

from __future__ import annotations

import re

import torch

import robustnorm

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCKS = {1: 3, 2: 4, 3: 6, 4: 3}


def torchvision_resnet50_keys() -> set[str]:
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{b}" for b in _BN[1:-1].split("|")}
    for stage, blocks in _BLOCKS.items():
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            for k in (1, 2, 3):
                keys.add(f"{prefix}.conv{k}.weight")
                keys |= {f"{prefix}.bn{k}.{b}" for b in _BN[1:-1].split("|")}
            if block == 0:
                keys.add(f"{prefix}.downsample.0.weight")
                keys |= {f"{prefix}.downsample.1.{b}" for b in _BN[1:-1].split("|")}
    return keys


def test_resnet50_state_dict_has_torchvisions_keys_and_shapes() -> None:
    model = robustnorm.create_model("resnet50", norm="bn", num_classes=1000)
    state = model.state_dict()
    assert set(state) == torchvision_resnet50_keys()
    assert len(state) == 320
    pattern = re.compile(rf"^(conv1\.weight|bn1\.{_BN}|fc\.(weight|bias)|layer[1-4]\.\d+\.(conv[123]\.weight|"
                         rf"bn[123]\.{_BN}|downsample\.0\.weight|downsample\.1\.{_BN}))$")
    assert all(pattern.match(key) for key in state)
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: the stride sits on the 3x3
    assert state["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert state["fc.weight"].shape == (1000, 2048)


def test_resnet50_forward_and_norm_choice() -> None:
    model = robustnorm.create_model("resnet50", norm="robustnorm", num_classes=5, p=1.0).eval()
    assert len(robustnorm.policy_layers(model)) == 53
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    assert model.layer2[0].conv2.stride == (2, 2)
