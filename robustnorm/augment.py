"""On-device augmentation of image batches: random crop with zero padding, horizontal flip, Cutout.

Contract: every function is vectorised over the batch (uint8 or float images ``(N, C, H, W)``) and runs where
the images are; random draws take an explicit ``torch.Generator`` (:func:`robustnorm.data.make_generator`) and
are drawn on the generator's device, separately from their use (``*_params``, ``*_centres``), so that a global
batch's draws can be sliced among the ranks of a distributed run.
"""

from __future__ import annotations

import torch


def crop_flip_params(
    n: int,
    generator: torch.Generator | None = None,
    padding: int = 4,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(offsets, flips)`` for :func:`crop_flip`: int64 ``(n, 2)`` crop corners (row, column) in the
    padded image, in ``[0, 2 * padding]``, and bool ``(n,)`` horizontal flips.

    Drawn on the generator's device, then moved to ``device``.
    """
    draw_on = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=draw_on)
    flips = torch.randint(0, 2, (n,), generator=generator, device=draw_on).bool()
    return _draws_to(offsets, device or draw_on), _draws_to(flips, device or draw_on)


def _draws_to(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Random draws moved to ``device`` without waiting for it: a blocking copy from pageable host memory
    synchronises the CUDA stream, which would stall a training loop once per step."""
    if values.device.type == "cpu" and torch.device(device).type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels, crop it back to its size at ``offsets``, and mirror it
    left-right where ``flips``; one gather for the whole batch (uint8 or float images)."""
    n, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    offsets, flips = offsets.to(images.device), flips.to(images.device)
    rows = offsets[:, :1] + torch.arange(height, device=images.device)
    columns = torch.arange(width, device=images.device).expand(n, width)
    columns = torch.where(flips[:, None], columns.flip(1), columns) + offsets[:, 1:]
    return padded[
        torch.arange(n, device=images.device)[:, None, None, None],
        torch.arange(channels, device=images.device)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


def cutout_centres(n: int, height: int, width: int, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Random ``(n, 2)`` int64 centres (row, column) for :func:`cutout`, uniform over the image, drawn on the
    generator's device, then moved to ``device``."""
    draw_on = generator.device if generator is not None else torch.device("cpu")
    rows = torch.randint(0, height, (n,), generator=generator, device=draw_on)
    columns = torch.randint(0, width, (n,), generator=generator, device=draw_on)
    return _draws_to(torch.stack([rows, columns], dim=1), device or draw_on)


def cutout(images: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square of each image around its centre, clipped at the borders (DeVries and
    Taylor 2017: "Improved Regularization of Convolutional Neural Networks with Cutout")."""
    height, width = images.shape[2:]
    centres = centres.to(images.device)
    start = centres - size // 2  # (n, 2): the square's first row and column, possibly outside the image
    rows = torch.arange(height, device=images.device)[None, :] - start[:, :1]
    columns = torch.arange(width, device=images.device)[None, :] - start[:, 1:]
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((columns >= 0) & (columns < size))[:, None, :]
    return images.masked_fill(inside[:, None], 0)


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator | None = None, padding: int = 4
) -> torch.Tensor:
    """Random crop with ``padding``-pixel zero padding and random horizontal flip of a batch."""
    offsets, flips = crop_flip_params(images.shape[0], generator, padding, images.device)
    return crop_flip(images, offsets, flips, padding)
