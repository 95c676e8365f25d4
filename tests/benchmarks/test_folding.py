"""benchmarks/norm_references.py: the folded model gives the frozen model's logits; train-mode BatchNorm is
what the ``batch`` policy computes for a BatchNorm model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import robustnorm

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "norm_references.py"
spec = importlib.util.spec_from_file_location("norm_references", SCRIPT)
norm_references = importlib.util.module_from_spec(spec)
spec.loader.exec_module(norm_references)


@pytest.mark.parametrize("name", robustnorm.list_models())
def test_folded_model_gives_the_frozen_logits(name: str) -> None:
    model, _ = robustnorm.load_model(name)
    folded = norm_references.fold_norms(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), robustnorm.batch_groups(model, [16], policy="frozen"):
        expected = model(x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, atol=1e-4, rtol=1e-4)


def test_folding_carries_trained_statistics_and_a_conv_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=True), robustnorm.RobustNorm2d(8, p=0.5), nn.ReLU(),
                          nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
    model.train()
    for _ in range(3):  # running statistics away from their initial values
        model(torch.randn(4, 3, 8, 8))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(norm_references.fold_norms(model)(x), model(x), atol=1e-5, rtol=1e-5)


def test_train_mode_batchnorm_matches_the_batch_policy_of_a_batchnorm_model() -> None:
    model = robustnorm.create_model("resnet20", norm="bn").eval()
    reference = norm_references.train_mode_batchnorm(model)
    assert all(m.training for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(type(m) is nn.BatchNorm2d for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), robustnorm.batch_groups(model, [8], policy="batch"):
        expected = model(x)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), expected, atol=1e-4, rtol=1e-4)
