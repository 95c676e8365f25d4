"""Image data: CIFAR-10's constants, loading class-folder datasets, splits, subsets, batching and pixels.

A dataset is a folder, or a ``.tar`` / ``.tar.gz`` archive, of class folders: the class of an image is the
name of the folder directly above it (class folders sit at one depth; stray files elsewhere are skipped).
Images are decoded once with Pillow into one uint8 tensor ``(N, 3, H, W)`` and cached as a ``.npz`` file (no
pickle) under ``$ROBUSTNORM_CACHE`` or ``~/.cache/robustnorm``, keyed by the source's path, size and
modification time.

Everything after loading works on tensors, so it can run on the accelerator (augmentation:
:mod:`robustnorm.augment`), and every random choice takes an explicit ``torch.Generator`` (see
:func:`make_generator`).

Batch statistics depend on which images share a batch, so the split and subset helpers return indices in a
seeded random order: consecutive slices mix the classes (the archives themselves are ordered by class).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
"""Per-channel mean of CIFAR-10's training images in [0, 1]; with :data:`CIFAR10_STD`, what :func:`normalize`
and the model cards use by default."""
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_ENV = "ROBUSTNORM_CIFAR10"
CACHE_ENV = "ROBUSTNORM_CACHE"
SPLIT_SEED = 0
"""The seed of the train / validation split: fixed, so every run holds out the same images."""

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
_CACHE_FORMAT = 1  # bump when the cached arrays change meaning


@dataclass(frozen=True)
class ImageDataset:
    """Decoded images with their labels.

    ``images`` is uint8 ``(N, 3, H, W)``, ``labels`` int64 ``(N,)`` indexing ``classes``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        assert self.images.dtype == torch.uint8 and self.images.ndim == 4, self.images.shape
        assert self.labels.dtype == torch.int64 and self.labels.shape == (self.images.shape[0],)

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """The images at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        return ImageDataset(self.images[index], self.labels[index.to(self.labels.device)], self.classes)

    def to(self, device: torch.device | str) -> ImageDataset:
        """A copy on ``device`` (for example the GPU, so batches are gathered there)."""
        return ImageDataset(self.images.to(device), self.labels.to(device), self.classes)


# ---------------------------------------------------------------------------------------------- loading


def cache_dir() -> Path:
    """Where decoded datasets are cached: ``$ROBUSTNORM_CACHE`` or ``~/.cache/robustnorm``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "robustnorm"


def _is_image(path: PurePosixPath) -> bool:
    hidden = any(part.startswith(".") for part in path.parts)
    return not hidden and path.suffix.lower() in IMAGE_SUFFIXES


def _source_key(path: Path) -> str:
    """Hash of what the decoded arrays depend on: the source's path, size and modification time."""
    digest = hashlib.sha256(f"format={_CACHE_FORMAT}\n{path.resolve()}\n".encode())
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    else:
        stat = path.stat()
        digest.update(f"{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _iter_folder(root: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    for file in sorted(root.rglob("*")):
        relative = PurePosixPath(file.relative_to(root).as_posix())
        if file.is_file() and _is_image(relative):
            yield relative, file.read_bytes()


def _iter_archive(archive: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    # Stream mode ("r|*") reads a .tar.gz front to back once instead of seeking in the gzip stream.
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            relative = PurePosixPath(member.name)
            if member.isfile() and _is_image(relative):
                handle = tar.extractfile(member)
                assert handle is not None
                yield relative, handle.read()


def _order_classes(names: Iterable[str]) -> tuple[str, ...]:
    """Sorted class names, except CIFAR-10's, which keep their canonical index order."""
    found = set(names)
    if found == set(CIFAR10_CLASSES):
        return CIFAR10_CLASSES
    return tuple(sorted(found))


def _decode(files: Iterable[tuple[PurePosixPath, bytes]], source: Path) -> ImageDataset:
    from PIL import Image  # optional dependency (the "data" extra); only needed to decode

    def pixels_of(payload: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(payload)) as image:
            return np.asarray(image.convert("RGB"))

    decoded = [(relative, pixels_of(payload)) for relative, payload in files]
    # Class folders sit at one depth (the top of a folder, or under "train/" in an archive); the most common
    # depth decides, and stray files elsewhere are skipped rather than becoming classes of their own.
    depths = Counter(len(relative.parts) for relative, _ in decoded)
    depth = max(depths, key=lambda d: (depths[d], d)) if depths else 0
    if depth < 2:
        raise ValueError(f"{source}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) inside class folders")
    skipped = [str(relative) for relative, _ in decoded if len(relative.parts) != depth]
    if skipped:
        logger.warning("%s: skipping %d images outside the class folders: %s", source, len(skipped), skipped[:5])
    samples = [(relative.parent.name, relative, pixels) for relative, pixels in decoded if len(relative.parts) == depth]
    first_relative, first_pixels = samples[0][1:]
    for _, relative, pixels in samples:
        if pixels.shape != first_pixels.shape:
            raise ValueError(
                f"{source}: {relative} is {pixels.shape[1]}x{pixels.shape[0]} but {first_relative} is "
                f"{first_pixels.shape[1]}x{first_pixels.shape[0]}; resize the images to one size first"
            )

    classes = _order_classes(name for name, _, _ in samples)
    index_of = {name: i for i, name in enumerate(classes)}
    samples.sort(key=lambda sample: (index_of[sample[0]], sample[1]))
    images = np.stack([pixels for _, _, pixels in samples]).transpose(0, 3, 1, 2)
    labels = np.array([index_of[name] for name, _, _ in samples], dtype=np.int64)
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), classes)


def _read_cache(path: Path) -> ImageDataset:
    with np.load(path, allow_pickle=False) as arrays:
        return ImageDataset(
            torch.from_numpy(arrays["images"]),
            torch.from_numpy(arrays["labels"]),
            tuple(str(name) for name in arrays["classes"]),
        )


def _write_cache(path: Path, dataset: ImageDataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader (another torchrun rank) never sees half a file.
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with partial.open("wb") as handle:
        np.savez(
            handle,
            images=dataset.images.numpy(),
            labels=dataset.labels.numpy(),
            classes=np.array(dataset.classes, dtype=np.str_),
        )
    os.replace(partial, path)


def load_images(path: str | os.PathLike[str], *, cache: bool = True) -> ImageDataset:
    """Load a folder or a ``.tar`` / ``.tar.gz`` archive of class folders.

    Images are ordered by class, then by path. With ``cache`` the decoded arrays are kept in
    :func:`cache_dir` and reused while the source's path, size and modification time stay the same.
    """
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"no dataset at {source}")
    cached = cache_dir() / f"{source.name.split('.')[0]}-{_source_key(source)}.npz"
    if cache and cached.is_file():
        logger.debug("loading %s from cache %s", source, cached)
        return _read_cache(cached)

    files = _iter_folder(source) if source.is_dir() else _iter_archive(source)
    dataset = _decode(files, source)
    logger.info("decoded %d images of %d classes from %s", len(dataset), len(dataset.classes), source)
    if cache:
        _write_cache(cached, dataset)
    return dataset


def find_cifar10() -> Path | None:
    """The CIFAR-10 folder: ``$ROBUSTNORM_CIFAR10``, else ``shared/data/cifar10`` beside a source checkout."""
    configured = os.environ.get(CIFAR10_ENV)
    if configured:
        return Path(configured)
    beside_checkout = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
    return beside_checkout if beside_checkout.is_dir() else None


def load_cifar10(split: str, root: str | os.PathLike[str] | None = None, *, cache: bool = True) -> ImageDataset:
    """CIFAR-10's ``"train"`` (50,000) or ``"test"`` (10,000) images, as ``<root>/<split>.tar.gz``,
    ``<root>/<split>.tar`` or a folder ``<root>/<split>/``; ``root`` defaults to :func:`find_cifar10`."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown CIFAR-10 split {split!r}; use 'train' or 'test'")
    folder = Path(root) if root is not None else find_cifar10()
    if folder is None:
        raise FileNotFoundError(f"CIFAR-10 not found: set {CIFAR10_ENV} to the folder holding {split}.tar.gz")
    for candidate in (folder / f"{split}.tar.gz", folder / f"{split}.tar", folder / split):
        if candidate.exists():
            dataset = load_images(candidate, cache=cache)
            if dataset.classes != CIFAR10_CLASSES:
                raise ValueError(f"{candidate}: classes {dataset.classes} are not CIFAR-10's")
            return dataset
    raise FileNotFoundError(f"no {split}.tar.gz, {split}.tar or {split}/ in {folder}")


# ------------------------------------------------------------------------------------ splits and subsets


def make_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from several non-negative integers (for example seed, stream, epoch) without
    collisions such as seed 1 / epoch 0 against seed 0 / epoch 1."""
    # The key count goes in too: SeedSequence alone would treat (0,) and (0, 0) as the same entropy.
    entropy = [len(keys), *(int(key) for key in keys)]
    seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed)


def _shuffled(indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return indices[torch.randperm(indices.numel(), generator=generator)]


def stratified_split(
    labels: torch.Tensor, n_val: int, seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, val)`` with ``n_val`` validation images, each class in proportion to its size
    (500 per class for CIFAR-10's 5,000), both in a seeded random order."""
    labels = labels.cpu()
    if not 0 < n_val < labels.numel():
        raise ValueError(f"n_val must be between 1 and {labels.numel() - 1}, got {n_val}")
    generator = make_generator(seed)
    classes, counts = labels.unique(return_counts=True)
    # Proportional quotas, rounded by largest remainder so they add up to n_val exactly.
    exact = counts.double() * n_val / labels.numel()
    quotas = exact.floor().long()
    shortfall = n_val - int(quotas.sum())
    quotas[torch.argsort(exact - quotas, descending=True, stable=True)[:shortfall]] += 1

    train_parts, val_parts = [], []
    for cls, quota in zip(classes.tolist(), quotas.tolist(), strict=True):
        members = _shuffled((labels == cls).nonzero().squeeze(1), generator)
        val_parts.append(members[:quota])
        train_parts.append(members[quota:])
    return _shuffled(torch.cat(train_parts), generator), _shuffled(torch.cat(val_parts), generator)


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` images of every class (for example 100 per class: 1,000 CIFAR-10 test
    images), chosen and ordered by ``seed``."""
    labels = labels.cpu()
    generator = make_generator(seed)
    parts = []
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().squeeze(1)
        if members.numel() < per_class:
            raise ValueError(f"class {cls} has {members.numel()} images, fewer than per_class={per_class}")
        parts.append(_shuffled(members, generator)[:per_class])
    return _shuffled(torch.cat(parts), generator)


def cifar10_train_val(
    root: str | os.PathLike[str] | None = None, n_val: int = 5000, *, cache: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10's training archive split into 45,000 training and 5,000 validation images (fixed seed)."""
    full = load_cifar10("train", root, cache=cache)
    train_index, val_index = stratified_split(full.labels, n_val)
    return full.subset(train_index), full.subset(val_index)


# ------------------------------------------------------------------------------------ batches and pixels


def iterate_batches(
    dataset: ImageDataset,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 images, labels)`` batches on ``device``, shuffled by ``generator`` (stored order
    without one).

    ``batch_size`` is the global batch; with ``world_size > 1`` every rank gets its contiguous share of each
    global batch (rank ``r`` the ``r``-th of ``world_size`` near-equal parts), so the ranks together see
    exactly the batches one process would. Gathering happens where the dataset lives: move it to the GPU
    first (:meth:`ImageDataset.to`) to batch on the GPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    n = len(dataset)
    shuffled = generator is not None
    order = torch.randperm(n, generator=generator, device=generator.device) if shuffled else torch.arange(n)
    order = order.to(dataset.images.device)
    target = dataset.images.device if device is None else torch.device(device)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        if drop_last and index.numel() < batch_size:
            return
        index = index.tensor_split(world_size)[rank]
        yield (
            dataset.images[index].to(target, non_blocking=True),
            dataset.labels[index.to(dataset.labels.device)].to(target, non_blocking=True),
        )


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to float32 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.float().div_(255)


def normalize(
    x: torch.Tensor,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` of a float batch ``(N, C, H, W)`` in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
