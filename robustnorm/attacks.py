"""L-infinity attacks (FGSM, PGD) on [0, 1] pixels, against the model exactly as deployed.

An attack sees the model only through ``forward(x01) -> logits``: a callable that takes the whole batch in
[0, 1] pixels (before mean/std normalisation) and returns one row of logits per image. The caller wraps the
normalisation, the statistics policy and any batch groups inside it, so the gradient flows through the batch
statistics (an adaptive attack); :func:`robustnorm.scoring.deployed_forward` builds this one::

    def forward(x01):
        with robustnorm.batch_groups(model, sizes=[group_size] * n_groups, policy=policy):
            return model(normalize(x01))

Threat models (docs/architecture.md) are expressed with two boolean masks over the batch:

- ``mask``: the images the attacker may perturb; all others stay bit-for-bit clean. All images for the
  whole-batch threat model, :func:`lone_attacker_mask` for one attacker per batch, :func:`fraction_mask`
  for a fraction f of each batch.
- ``loss_mask``: the images whose loss the attacker maximises. By default the perturbed ones; for
  poisoning (Wu et al. 2023) pass ``~mask``: the attacker's images shift the batch statistics so that the
  *other* images of the batch are misclassified.

Losses are summed (not averaged) over images, so the per-image step does not depend on the batch size. Two
losses: ``"ce"``, cross-entropy, and ``"margin"``, the clamped logit margin ``min(max_{j != y} z_j - z_y,
MARGIN_CAP)`` (Carlini and Wagner 2017). Through batch statistics every image's gradient carries its batchmates'
losses, and the cross-entropy of images already misclassified grows without bound, so it dominates the step and
the summed cross-entropy rises while few more images flip; the clamped margin stops pushing an image once it is
misclassified by ``MARGIN_CAP``, which makes the coupled attack far stronger (docs/results.md, claim B).

Expectation over transformation (EOT), for an attacker who does not know its batchmates: pass
``eot_forward_samples=k`` to :func:`pgd` and, as ``forward``, a :data:`ForwardSampler`: a callable that
takes the attack's generator and returns a fresh :data:`Forward`, for example one that places the attacker's
images in a batch with newly drawn clean images and returns the logits of the attacker's images only. Each
step sums the loss over ``k`` freshly sampled forwards. The rows of a sampled forward's logits must still
match ``x`` (and ``y``, ``loss_mask``); poisoning unknown batchmates is outside this interface.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]
"""``forward(x01) -> logits``: the deployed model on a batch of [0, 1] pixels, one logits row per image."""
ForwardSampler = Callable[[torch.Generator | None], Forward]
"""``sample(generator) -> forward``: draws one forward (for example with random batchmates) for EOT."""
LOSSES = ("ce", "margin")
MARGIN_CAP = 1.0  # logits: how far past the decision boundary the margin loss still pushes an image


# ------------------------------------------------------------------------------------- threat-model masks


def _per_group_mask(n_groups: int, group_size: int, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Bool ``(n_groups * group_size,)`` with exactly ``k`` True at random positions in every group."""
    if n_groups < 1 or group_size < 1:
        raise ValueError(f"need at least one group of at least one image, got {n_groups} x {group_size}")
    draw_on = generator.device if generator is not None else torch.device("cpu")
    chosen = torch.rand(n_groups, group_size, generator=generator, device=draw_on).argsort(dim=1)[:, :k]
    mask = torch.zeros(n_groups, group_size, dtype=torch.bool, device=draw_on)
    return mask.scatter_(1, chosen, True).flatten()


def lone_attacker_mask(n_groups: int, group_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One attacker at a random position in each of ``n_groups`` consecutive groups of ``group_size``
    images: the other ``group_size - 1`` images of every group stay clean."""
    return _per_group_mask(n_groups, group_size, 1, generator)


def fraction_mask(
    n_groups: int, group_size: int, f: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``round(f * group_size)`` attackers at random positions in each group (the fraction actually used is
    that count over ``group_size``; ``f = 1`` is the whole-batch threat model)."""
    if not 0 <= f <= 1:
        raise ValueError(f"the adversarial fraction f must be in [0, 1], got {f}")
    return _per_group_mask(n_groups, group_size, round(f * group_size), generator)


# ----------------------------------------------------------------------------------------------- attacks


def image_losses(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Each image's loss, which the attacks raise: ``"ce"`` or ``"margin"`` (module docstring)."""
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if loss == "margin":
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return (others - true).clamp(max=MARGIN_CAP)
    raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")


def _masks(
    x: torch.Tensor, y: torch.Tensor, eps: float, mask: torch.Tensor | None, loss_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(mask, loss_mask)`` on ``x``'s device, with their defaults filled in."""
    n = x.shape[0]
    if not x.is_floating_point():
        raise TypeError(f"attacks take float pixels in [0, 1], got {x.dtype}; convert with data.to_float")
    if y.shape != (n,):
        raise ValueError(f"y must hold one label per image ({n}), got shape {tuple(y.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mask = torch.ones(n, dtype=torch.bool) if mask is None else mask
    loss_mask = mask if loss_mask is None else loss_mask
    for name, value in (("mask", mask), ("loss_mask", loss_mask)):
        if value.dtype != torch.bool or value.shape != (n,):
            raise ValueError(f"{name} must be a bool tensor of shape ({n},), got {value.dtype} {tuple(value.shape)}")
    if not loss_mask.any():
        raise ValueError("loss_mask selects no image: there is no loss to maximise")
    return mask.to(x.device), loss_mask.to(x.device)


def _loss_gradient(
    forwards: Sequence[Forward], x_adv: torch.Tensor, y: torch.Tensor, loss_mask: torch.Tensor, loss: str = "ce"
) -> torch.Tensor:
    """Gradient, with respect to the pixels, of the summed ``loss`` of the ``loss_mask`` images, summed
    over ``forwards``: one backward per forward, so only one graph is alive at a time (with EOT samples of
    whole batches the graphs of all samples together ran a CPU machine out of memory)."""
    x_adv = x_adv.detach().requires_grad_(True)
    gradient = torch.zeros_like(x_adv)
    with torch.enable_grad():
        for forward in forwards:
            losses = image_losses(forward(x_adv), y, loss)
            gradient += torch.autograd.grad(losses[loss_mask].sum(), x_adv)[0]
    return gradient


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, mask: torch.Tensor) -> torch.Tensor:
    """Into the eps-ball around ``x`` and [0, 1]; images outside ``mask`` are exactly ``x``."""
    inside = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0, 1)
    return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), inside, x)


def fgsm(
    forward: Forward,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    mask: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    loss: str = "ce",
) -> torch.Tensor:
    """Fast gradient sign method: one step of size ``eps`` up the loss gradient's sign.

    ``mask`` (bool per image): which images may be perturbed; ``loss_mask``: whose ``loss`` (``"ce"`` or
    ``"margin"``) is maximised (default ``mask``). Returns detached adversarial images in [0, 1].
    """
    mask, loss_mask = _masks(x, y, eps, mask, loss_mask)
    x = x.detach()
    gradient = _loss_gradient([forward], x, y, loss_mask, loss)
    return _project(x + eps * gradient.sign(), x, eps, mask)


def pgd(
    forward: Forward | ForwardSampler,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    mask: torch.Tensor | None = None,
    loss_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eot_forward_samples: int | None = None,
    loss: str = "ce",
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) in the L-infinity ball of radius ``eps``.

    ``steps`` signed-gradient steps of ``step_size`` (default ``eps / 4``), each projected back into the ball
    and [0, 1], from a uniform random start in the ball when ``random_start`` (drawn with ``generator``).
    ``mask``, ``loss_mask`` and ``loss`` as in :func:`fgsm`. With ``eot_forward_samples=k``, ``forward`` is a
    :data:`ForwardSampler` and every step sums the loss over ``k`` forwards it samples (module docstring).

    Returns the last iterate, detached: with batch statistics one image's loss depends on its batchmates,
    so a per-image "best iterate" would assemble a batch that was never evaluated.
    """
    mask, loss_mask = _masks(x, y, eps, mask, loss_mask)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if eot_forward_samples is not None and eot_forward_samples < 1:
        raise ValueError(f"eot_forward_samples must be >= 1, got {eot_forward_samples}")
    step_size = eps / 4 if step_size is None else step_size
    x = x.detach()
    x_adv = x.clone()
    if eps == 0 or not mask.any():
        return x_adv
    if random_start:
        draw_on = generator.device if generator is not None else x.device
        noise = torch.rand(x.shape, generator=generator, device=draw_on, dtype=x.dtype).to(x.device)
        x_adv = _project(x + (2 * noise - 1) * eps, x, eps, mask)
    for _ in range(steps):
        if eot_forward_samples is None:
            forwards = [forward]
        else:
            forwards = [forward(generator) for _ in range(eot_forward_samples)]
        gradient = _loss_gradient(forwards, x_adv, y, loss_mask, loss)
        x_adv = _project(x_adv + step_size * gradient.sign(), x, eps, mask)
    return x_adv.detach()
