"""Fixtures of the service tests: CIFAR-10 images and a small model saved with ``robustnorm.save_model``.

Without CIFAR-10 the tests that need it are skipped, except under CI (``$CI`` set), where they fail (the
``cifar10`` fixture of ``tests/conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from service_support import (
    CIFAR_CLASSES,
    CIFAR_MEAN,
    CIFAR_STD,
    TEST_POLICY,
    Sample,
    read_cifar10_test,
)

import robustnorm

PER_CLASS = 24  # 240 images: plenty for batching tests, quick to read from the archive


@pytest.fixture(scope="session")
def cifar_samples(cifar10: Path) -> list[Sample]:
    """CIFAR-10 test images (JPEG as in the archive, and PNG re-encoded), classes interleaved."""
    samples = read_cifar10_test(cifar10 / "test.tar.gz", PER_CLASS)
    assert len(samples) == PER_CLASS * len(CIFAR_CLASSES), f"{cifar10} holds too few test images"
    return samples


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, cifar_samples: list[Sample]) -> Path:
    """A small RobustNorm ResNet-20 saved with robustnorm.save_model, its population statistics and drift
    calibration estimated on CIFAR-10 images (weights untrained: these tests need real statistics, not
    accuracy)."""
    torch.manual_seed(0)
    model = robustnorm.create_model("resnet20", norm="robustnorm", p=0.2)
    images = torch.stack([sample.pixels() for sample in cifar_samples[:128]])  # few: the CPU is small
    for _, layer in robustnorm.policy_layers(model):  # a cumulative average of batch statistics
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 32):
            model(images[start:start + 32])
    model.eval()
    robustnorm.set_policy(model, TEST_POLICY)
    calibration = robustnorm.calibrate_drift(model, images, batch_sizes=(1, 8, 32))
    card = robustnorm.ModelCard(name="test-resnet20-robustnorm", architecture="resnet20", norm="robustnorm",
                                p=0.2, labels=list(CIFAR_CLASSES), input_size=[3, 32, 32], mean=list(CIFAR_MEAN),
                                std=list(CIFAR_STD), policy=TEST_POLICY, calibration=calibration)
    directory = tmp_path_factory.mktemp("model")
    robustnorm.save_model(model, card, directory)
    return directory
