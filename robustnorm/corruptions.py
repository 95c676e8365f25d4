"""Common image corruptions on float batches in [0, 1], shape ``(N, C, H, W)``, for distribution-shift tests.

The project's own implementations, after the CIFAR-10-C corruptions of Hendrycks & Dietterich (2019), whose
severity levels 1 to 5 the registry follows. Every function returns a new tensor in [0, 1] on the input's
device; only :func:`gaussian_noise` is random, and it takes an explicit generator. :func:`jpeg` round-trips
every image through Pillow on the CPU.

    x_shifted = corrupt("gaussian_blur", x, severity=3)
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def _check_pixels(x: torch.Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float batch (N, C, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}")


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add independent Gaussian noise of standard deviation ``sigma`` to every pixel."""
    _check_pixels(x)
    draw_on = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=draw_on, dtype=x.dtype).to(x.device)
    return (x + sigma * noise).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur with a Gaussian of standard deviation ``sigma`` pixels (separable; kernel radius ``ceil(3 sigma)``;
    borders extended by repeating the edge pixels)."""
    _check_pixels(x)
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    blurred = F.conv2d(rows, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return blurred.clamp_(0, 1)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale every pixel's distance from its image's per-channel mean by ``factor`` (< 1 lowers contrast)."""
    _check_pixels(x)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp_(0, 1)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode every image as a JPEG of ``quality`` (1 to 100) with Pillow and decode it again."""
    from PIL import Image  # optional dependency (the "data" extra)

    _check_pixels(x)
    if x.shape[1] != 3:
        raise ValueError(f"jpeg expects RGB images (3 channels), got {x.shape[1]}")
    pixels = (x.detach() * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
        buffer.seek(0)
        with Image.open(buffer) as reread:
            decoded.append(np.asarray(reread.convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(device=x.device, dtype=x.dtype).div_(255)


@dataclass(frozen=True)
class Corruption:
    """A registered corruption: its function and the parameter value of each severity 1..5."""

    name: str
    parameter: str
    levels: tuple[float, ...]
    apply: Callable[[torch.Tensor, float, torch.Generator | None], torch.Tensor]

    def __call__(self, x: torch.Tensor, severity: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if not 1 <= severity <= len(self.levels):
            raise ValueError(f"severity of {self.name} must be 1..{len(self.levels)}, got {severity}")
        return self.apply(x, self.levels[severity - 1], generator)


CORRUPTIONS: dict[str, Corruption] = {
    corruption.name: corruption
    for corruption in (
        Corruption("gaussian_noise", "sigma", (0.04, 0.06, 0.08, 0.09, 0.10), gaussian_noise),
        Corruption("gaussian_blur", "sigma", (0.4, 0.6, 0.7, 0.8, 1.0), lambda x, v, _: gaussian_blur(x, v)),
        Corruption("contrast", "factor", (0.75, 0.5, 0.4, 0.3, 0.15), lambda x, v, _: contrast(x, v)),
        Corruption("jpeg", "quality", (80, 65, 58, 50, 40), lambda x, v, _: jpeg(x, int(v))),
    )
}


def get_corruption(name: str) -> Corruption:
    """The registered corruption called ``name``; ``ValueError`` listing the valid names otherwise."""
    key = name.lower()
    if key not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid names are {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[key]


def corrupt(
    name: str, x: torch.Tensor, severity: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1 to 5) to a float batch in [0, 1]."""
    return get_corruption(name)(x, severity, generator)
