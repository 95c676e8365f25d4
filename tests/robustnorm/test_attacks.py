"""FGSM and PGD on real CIFAR-10 images against small models defined here, with and without batch statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustnorm
from robustnorm.attacks import MARGIN_CAP, Forward, fgsm, fraction_mask, image_losses, lone_attacker_mask, pgd
from robustnorm.data import balanced_subset, load_cifar10, make_generator, normalize, to_float

EPS = 8 / 255


@pytest.fixture(scope="module")
def images(cifar10: Path) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_cifar10("test", cifar10)
    index = balanced_subset(test.labels, 4, seed=1)  # 40 images, mixed classes
    return to_float(test.images[index[:32]]), test.labels[index[:32]]


class BatchStatNet(nn.Module):
    """Conv, then normalisation with the statistics of the whole batch (couples the images), ReLU, linear."""

    def __init__(self, batch_statistics: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 15 * 15, 10)
        self.batch_statistics = batch_statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(normalize(x))
        if self.batch_statistics:
            h = F.batch_norm(h, None, None, training=True)
        return self.fc(F.relu(h).flatten(1))


def loss_of(forward: Forward, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    with torch.no_grad():
        losses = F.cross_entropy(forward(x), y, reduction="none")
    return float((losses if rows is None else losses[rows]).sum())


def deployed(model: nn.Module, group_size: int) -> Forward:
    """The model as served: AdaptiveBatchNorm2d with batch statistics, each group of images on its own."""

    def forward(x01: torch.Tensor) -> torch.Tensor:
        with robustnorm.batch_groups(model, sizes=[group_size] * (x01.shape[0] // group_size)):
            return model(normalize(x01))

    return forward


def served_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), robustnorm.AdaptiveBatchNorm2d(8, policy="batch"), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 15 * 15, 10))
    return model.eval()


# ---------------------------------------------------------------------------------------------- masks


def test_lone_attacker_mask_has_one_attacker_per_group() -> None:
    mask = lone_attacker_mask(50, 8, make_generator(0))
    assert mask.shape == (400,) and mask.dtype == torch.bool
    assert mask.view(50, 8).sum(dim=1).tolist() == [1] * 50
    positions = mask.view(50, 8).float().argmax(dim=1)
    assert positions.unique().numel() > 1  # not always the same slot
    assert torch.equal(mask, lone_attacker_mask(50, 8, make_generator(0)))


def test_fraction_mask_counts() -> None:
    mask = fraction_mask(10, 32, 0.25, make_generator(0))
    assert mask.view(10, 32).sum(dim=1).tolist() == [8] * 10
    assert not fraction_mask(3, 4, 0.0).any() and fraction_mask(3, 4, 1.0).all()
    with pytest.raises(ValueError, match="fraction"):
        fraction_mask(3, 4, 1.5)


# -------------------------------------------------------------------------------------------- attacks


def test_fgsm_is_one_signed_gradient_step(images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    torch.manual_seed(0)
    weight = torch.randn(10, 3 * 32 * 32) * 0.01
    forward = lambda z: z.flatten(1) @ weight.T
    gradient = (F.softmax(forward(x), dim=1) - F.one_hot(y, 10).float()) @ weight  # d CE / d x, per image
    expected = (x + EPS * gradient.view_as(x).sign()).clamp(0, 1)
    assert torch.allclose(fgsm(forward, x, y, EPS), expected)


def test_pgd_respects_eps_and_pixel_range_and_beats_fgsm(images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    forward = BatchStatNet()
    clean = loss_of(forward, x, y)
    x_fgsm = fgsm(forward, x, y, EPS)
    x_pgd = pgd(forward, x, y, EPS, steps=10, generator=make_generator(0))
    for x_adv in (x_fgsm, x_pgd):
        assert not x_adv.requires_grad
        assert (x_adv - x).abs().max() <= EPS + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert clean < loss_of(forward, x_fgsm, y) <= loss_of(forward, x_pgd, y)
    with torch.no_grad():
        accuracy = lambda z: float((forward(z).argmax(1) == y).float().mean())
    assert accuracy(x_pgd) <= accuracy(x_fgsm) <= accuracy(x)
    # Reproducible from the generator; a different random start gives a different result.
    assert torch.equal(x_pgd, pgd(forward, x, y, EPS, steps=10, generator=make_generator(0)))
    assert not torch.equal(x_pgd, pgd(forward, x, y, EPS, steps=10, generator=make_generator(1)))


def test_masked_out_images_stay_exactly_clean(images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    forward = BatchStatNet()  # batch statistics: the loss does have a gradient on the other images
    mask = fraction_mask(4, 8, 0.5, make_generator(3))
    for x_adv in (fgsm(forward, x, y, EPS, mask=mask), pgd(forward, x, y, EPS, steps=3, mask=mask)):
        assert torch.equal(x_adv[~mask], x[~mask])
        assert (x_adv[mask] != x[mask]).flatten(1).any(dim=1).all()


def test_lone_attacker_batches_hold_n_minus_1_clean_images(images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    groups, n = 4, 8
    forward = deployed(served_model(), n)
    mask = lone_attacker_mask(groups, n, make_generator(0))
    x_adv = pgd(forward, x, y, EPS, steps=5, mask=mask, generator=make_generator(0))
    unchanged = (x_adv == x).flatten(1).all(dim=1).view(groups, n)
    assert unchanged.sum(dim=1).tolist() == [n - 1] * groups
    assert torch.equal(~unchanged.flatten(), mask)
    assert loss_of(forward, x_adv, y, mask) > loss_of(forward, x, y, mask)


def test_poisoning_raises_the_loss_of_the_other_images_only_through_batch_statistics(
    images: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, y = images
    mask = fraction_mask(4, 8, 0.25, make_generator(2))
    victims = ~mask
    coupled = deployed(served_model(), 8)
    attack = lambda steps: pgd(coupled, x, y, 1.0, steps=steps, step_size=0.1, mask=mask, loss_mask=victims,
                               generator=make_generator(0))
    poisoned, random_start = attack(10), attack(0)
    assert torch.equal(poisoned[victims], x[victims])
    victims_loss = lambda z: loss_of(coupled, z, y, victims)
    assert victims_loss(poisoned) > max(victims_loss(x), victims_loss(random_start)) + 1.0

    # With per-image statistics the attackers cannot reach the others at all.
    independent = BatchStatNet(batch_statistics=False)
    x_adv = pgd(independent, x, y, 1.0, steps=10, mask=mask, loss_mask=victims, generator=make_generator(0))
    assert loss_of(independent, x_adv, y, victims) == pytest.approx(loss_of(independent, x, y, victims), rel=1e-6)


def test_eot_samples_a_fresh_forward_for_every_gradient(images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    pool, attackers, labels = x[8:], x[:4], y[:4]
    n = 8
    model = served_model()
    samples = []

    def sample(generator: torch.Generator | None) -> Forward:
        """Each attacker first in a batch of n - 1 clean images drawn from the pool."""
        draw = torch.randint(0, pool.shape[0], (attackers.shape[0], n - 1), generator=generator)
        samples.append(draw)

        def forward(z: torch.Tensor) -> torch.Tensor:
            batch = torch.cat([z.unsqueeze(1), pool[draw]], dim=1).flatten(0, 1)
            return deployed(model, n)(batch).view(-1, n, 10)[:, 0]

        return forward

    x_adv = pgd(sample, attackers, labels, EPS, steps=3, generator=make_generator(0), eot_forward_samples=2)
    assert len(samples) == 6 and not torch.equal(samples[0], samples[1])
    assert (x_adv - attackers).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    unseen = [sample(make_generator(100 + i)) for i in range(8)]  # batchmates the attack never saw
    expected_loss = lambda z: sum(loss_of(f, z, labels) for f in unseen)
    assert expected_loss(x_adv) > expected_loss(attackers)


def test_the_margin_loss_is_the_clamped_logit_margin() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.5, 0.2]])
    y = torch.tensor([0, 0, 0])
    assert image_losses(logits, y, "margin").tolist() == [-1.0, MARGIN_CAP, 0.5]
    assert torch.allclose(image_losses(logits, y, "ce"), F.cross_entropy(logits, y, reduction="none"))
    with pytest.raises(ValueError, match="unknown loss"):
        image_losses(logits, y, "hinge")


def test_the_margin_attack_stops_pushing_images_misclassified_past_the_cap(
        images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    model = BatchStatNet(batch_statistics=False)  # images do not interact: each gradient is its own loss's
    with torch.no_grad():
        margins = image_losses(model(x), y, "margin")
    past = margins >= MARGIN_CAP
    assert past.any() and (~past).any(), "the random model should misclassify some images by more than the cap"
    x_adv = x.clone().requires_grad_(True)
    gradient = torch.autograd.grad(image_losses(model(x_adv), y, "margin").sum(), x_adv)[0]
    assert torch.all(gradient[past] == 0) and torch.all(gradient[~past].flatten(1).abs().sum(dim=1) > 0)
    x_margin = pgd(model, x, y, EPS, steps=5, generator=make_generator(0), loss="margin")
    assert (x_margin - x).abs().max() <= EPS + 1e-6 and x_margin.min() >= 0 and x_margin.max() <= 1
    with torch.no_grad():
        assert (model(x_margin).argmax(dim=1) == y).sum() <= (model(x).argmax(dim=1) == y).sum()


def test_degenerate_and_invalid_inputs(images: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = images
    forward = BatchStatNet()
    assert torch.equal(pgd(forward, x, y, 0.0), x)
    nobody = torch.zeros(32, dtype=torch.bool)
    assert torch.equal(pgd(forward, x, y, EPS, mask=nobody, loss_mask=~nobody), x)
    with pytest.raises(ValueError, match="loss_mask selects no image"):
        pgd(forward, x, y, EPS, loss_mask=nobody)
    with pytest.raises(ValueError, match="bool tensor"):
        fgsm(forward, x, y, EPS, mask=torch.ones(32))
    with pytest.raises(TypeError, match="float pixels"):
        fgsm(forward, (x * 255).to(torch.uint8), y, EPS)
    with pytest.raises(ValueError, match="one label per image"):
        fgsm(forward, x, y[:3], EPS)
