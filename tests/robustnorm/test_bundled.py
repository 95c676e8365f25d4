"""The bundled CIFAR-10 models: clean accuracy on a fixed, class-balanced 1,000-image test subset, and a
PGD sanity check (the project's attack must break an undefended frozen BatchNorm model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import robustnorm
from robustnorm.data import balanced_subset, load_cifar10, to_float
from robustnorm.evaluation.cells import Cell
from robustnorm.evaluation.run import run_cell
from robustnorm.scoring import accuracy

FLOORS = {"cifar10-resnet20-bn": 0.88, "cifar10-resnet20-robustnorm": 0.87}


def bundled(name: str) -> tuple[torch.nn.Module, robustnorm.ModelCard]:
    # Both models ship in the package: a renamed or missing one must fail these tests, not skip them.
    assert name in robustnorm.list_models(), f"{name} is not among the bundled models {robustnorm.list_models()}"
    return robustnorm.load_model(name)


@pytest.fixture(scope="module")
def test_subset(cifar10: Path) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_cifar10("test", cifar10)
    subset = test.subset(balanced_subset(test.labels, 100, seed=0))
    return to_float(subset.images), subset.labels


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_bundled_model_reaches_its_clean_accuracy(name: str, test_subset: tuple) -> None:
    model, card = bundled(name)
    x, y = test_subset
    assert accuracy(model, card, x, y, "frozen", 100) >= FLOORS[name]


def test_pgd_breaks_the_frozen_batchnorm_model(test_subset: tuple) -> None:
    model, card = bundled("cifar10-resnet20-bn")
    x, y = test_subset
    record = run_cell(model, card, x[:200], y[:200], Cell.parse("frozen", 1, "whole", "pgd", 8, "adaptive"), steps=20)
    assert record.robust_accuracy < 0.05


def test_default_model_is_listed_and_loads_in_eval_mode() -> None:
    assert robustnorm.list_models(), "at least one model must be bundled for the service to start"
    default = robustnorm.DEFAULT_MODEL if robustnorm.DEFAULT_MODEL in robustnorm.list_models() \
        else robustnorm.list_models()[0]
    model, card = robustnorm.load_model(default)
    assert not model.training and card.labels and len(card.version) == 12
