"""Data loading on real CIFAR-10 images: archives and folders, the cache, splits, subsets, augmentation, batches."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robustnorm import data
from robustnorm.augment import crop_flip, crop_flip_params, cutout, cutout_centres, random_crop_flip
from robustnorm.data import (
    CIFAR10_CLASSES,
    ImageDataset,
    balanced_subset,
    iterate_batches,
    load_cifar10,
    load_images,
    make_generator,
    normalize,
    stratified_split,
    to_float,
)


@pytest.fixture(scope="module")
def test_set(cifar10: Path) -> ImageDataset:
    return load_cifar10("test", cifar10)


def first_jpegs(cifar10: Path, count: int) -> list[bytes]:
    """The first ``count`` JPEG files of the test archive, as bytes."""
    payloads = []
    with tarfile.open(cifar10 / "test.tar.gz", mode="r|*") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                handle = tar.extractfile(member)
                assert handle is not None
                payloads.append(handle.read())
                if len(payloads) == count:
                    break
    return payloads


def write_folder(root: Path, layout: dict[str, list[bytes]]) -> None:
    for class_name, payloads in layout.items():
        (root / class_name).mkdir(parents=True)
        for i, payload in enumerate(payloads):
            (root / class_name / f"{i:04d}.jpg").write_bytes(payload)


def test_archive_decodes_every_image_and_is_cached(cifar10: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROBUSTNORM_CACHE", str(tmp_path / "cache"))
    dataset = load_cifar10("test", cifar10)
    assert dataset.images.shape == (10_000, 3, 32, 32) and dataset.images.dtype == torch.uint8
    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.labels.bincount().tolist() == [1000] * 10
    cached = list((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and cached[0].name.startswith("test-")

    with np.load(cached[0], allow_pickle=False) as arrays:  # plain arrays, no pickled objects
        assert sorted(arrays.files) == ["classes", "images", "labels"]

    def no_decoding(*args: object) -> ImageDataset:
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(data, "_decode", no_decoding)
    again = load_cifar10("test", cifar10)
    assert torch.equal(again.images, dataset.images) and torch.equal(again.labels, dataset.labels)
    assert again.classes == dataset.classes


def test_decoded_pixels_match_pillow(cifar10: Path, test_set: ImageDataset) -> None:
    # The archive is ordered by class and file name, so its first file is image 0.
    (payload,) = first_jpegs(cifar10, 1)
    expected = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(test_set.images[0].numpy(), expected)
    assert test_set.labels[0] == 0


def test_folder_and_tar_give_the_same_dataset(cifar10: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROBUSTNORM_CACHE", str(tmp_path / "cache"))
    jpegs = first_jpegs(cifar10, 5)
    root = tmp_path / "folder"
    write_folder(root, {"zebra": jpegs[:2], "apple": jpegs[2:]})
    (root / "apple" / "._0000.jpg").write_bytes(b"not an image")  # hidden files are skipped
    (root / "loose.jpg").write_bytes(jpegs[0])  # in no class folder: skipped
    (root / "apple" / "notes.txt").write_text("not an image either")

    from_folder = load_images(root)
    assert from_folder.classes == ("apple", "zebra")  # sorted when not CIFAR-10's classes
    assert from_folder.labels.tolist() == [0, 0, 0, 1, 1]

    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="images")
    from_tar = load_images(archive)
    assert from_tar.classes == from_folder.classes
    assert torch.equal(from_tar.images, from_folder.images) and torch.equal(from_tar.labels, from_folder.labels)


def test_cache_key_follows_the_modification_time(cifar10: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROBUSTNORM_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "few.tar"
    with tarfile.open(archive, "w") as tar:
        for i, payload in enumerate(first_jpegs(cifar10, 2)):
            info = tarfile.TarInfo(f"few/cat/{i}.jpg")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    load_images(archive)
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_images(archive)
    assert len(list((tmp_path / "cache").glob("few-*.npz"))) == 2
    assert load_images(archive, cache=False).classes == ("cat",)


def test_images_of_different_sizes_are_refused(cifar10: Path, tmp_path: Path) -> None:
    (payload,) = first_jpegs(cifar10, 1)
    small = io.BytesIO()
    Image.open(io.BytesIO(payload)).resize((16, 16)).save(small, format="PNG")
    root = tmp_path / "mixed"
    write_folder(root, {"a": [payload]})
    (root / "b").mkdir()
    (root / "b" / "small.png").write_bytes(small.getvalue())
    with pytest.raises(ValueError, match="resize"):
        load_images(root, cache=False)


def test_missing_split_and_folder_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_cifar10("validation", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"test\.tar\.gz"):
        load_cifar10("test", tmp_path)


def test_stratified_split_is_disjoint_balanced_seeded_and_mixed(test_set: ImageDataset) -> None:
    train, val = stratified_split(test_set.labels, 1000)
    assert train.numel() == 9000 and val.numel() == 1000
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(10_000))
    assert test_set.labels[val].bincount().tolist() == [100] * 10
    again_train, again_val = stratified_split(test_set.labels, 1000)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, stratified_split(test_set.labels, 1000, seed=1)[1])
    # Consecutive images mix the classes (the archive itself is sorted by class).
    assert test_set.labels[val[:32]].unique().numel() >= 6
    assert test_set.labels[train[:32]].unique().numel() >= 6


def test_stratified_split_quotas_add_up_for_unequal_classes() -> None:
    labels = torch.tensor([0] * 7 + [1] * 2 + [2] * 1)
    _, val = stratified_split(labels, 3)
    assert val.numel() == 3 and labels[val].bincount(minlength=3).tolist() == [2, 1, 0]


@pytest.mark.slow
def test_cifar10_train_val_holds_out_5000(cifar10: Path) -> None:
    train, val = data.cifar10_train_val(cifar10)
    assert len(train) == 45_000 and len(val) == 5_000
    assert val.labels.bincount().tolist() == [500] * 10
    assert train.labels.bincount().tolist() == [4500] * 10


def test_balanced_subset(test_set: ImageDataset) -> None:
    subset = balanced_subset(test_set.labels, 100, seed=3)
    assert subset.numel() == 1000 and subset.unique().numel() == 1000
    assert test_set.labels[subset].bincount().tolist() == [100] * 10
    assert torch.equal(subset, balanced_subset(test_set.labels, 100, seed=3))
    assert not torch.equal(subset, balanced_subset(test_set.labels, 100, seed=4))
    assert test_set.labels[subset[:32]].unique().numel() >= 6
    with pytest.raises(ValueError, match="fewer than per_class"):
        balanced_subset(test_set.labels, 1001)


def test_make_generator_separates_its_keys() -> None:
    draw = lambda *keys: torch.rand(4, generator=make_generator(*keys))
    assert torch.equal(draw(0, 1), draw(0, 1))
    assert not torch.equal(draw(0, 1), draw(1, 0))
    assert not torch.equal(draw(0), draw(0, 0))


def reference_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int):
    """The obvious per-image loop."""
    out = torch.empty_like(images)
    height, width = images.shape[2:]
    for i, image in enumerate(images):
        padded = torch.zeros(image.shape[0], height + 2 * padding, width + 2 * padding, dtype=image.dtype)
        padded[:, padding : padding + height, padding : padding + width] = image
        top, left = offsets[i].tolist()
        crop = padded[:, top : top + height, left : left + width]
        out[i] = crop.flip(2) if flips[i] else crop
    return out


def test_crop_flip_matches_a_per_image_reference(test_set: ImageDataset) -> None:
    images = test_set.images[:64]
    offsets, flips = crop_flip_params(64, make_generator(5))
    expected = reference_crop_flip(images, offsets, flips, padding=4)
    assert torch.equal(crop_flip(images, offsets, flips), expected)
    assert torch.equal(crop_flip(to_float(images), offsets, flips), to_float(expected))
    assert 0 < flips.sum() < 64 and offsets.min() == 0 and offsets.max() == 8


def test_crop_flip_corner_cases(test_set: ImageDataset) -> None:
    images = test_set.images[:2]
    centred = crop_flip(images, torch.full((2, 2), 4), torch.tensor([False, True]))
    assert torch.equal(centred[0], images[0]) and torch.equal(centred[1], images[1].flip(2))
    shifted = crop_flip(images, torch.zeros(2, 2, dtype=torch.long), torch.tensor([False, False]))
    assert (shifted[:, :, :4, :] == 0).all() and (shifted[:, :, :, :4] == 0).all()
    assert torch.equal(shifted[:, :, 4:, 4:], images[:, :, :-4, :-4])


def test_random_crop_flip_is_reproducible(test_set: ImageDataset) -> None:
    images = test_set.images[:16]
    first = random_crop_flip(images, make_generator(9))
    assert torch.equal(first, random_crop_flip(images, make_generator(9)))
    assert not torch.equal(first, random_crop_flip(images, make_generator(10)))
    assert first.shape == images.shape and first.dtype == torch.uint8


def reference_cutout(images: torch.Tensor, centres: torch.Tensor, size: int) -> torch.Tensor:
    """The obvious per-image loop: zero rows and columns [centre - size // 2, centre - size // 2 + size)."""
    out = images.clone()
    height, width = images.shape[2:]
    for i, (row, column) in enumerate(centres.tolist()):
        top, left = row - size // 2, column - size // 2
        out[i, :, max(0, top) : max(0, min(height, top + size)), max(0, left) : max(0, min(width, left + size))] = 0
    return out


@pytest.mark.parametrize("size", [1, 8, 16])
def test_cutout_matches_a_per_image_reference(test_set: ImageDataset, size: int) -> None:
    images = test_set.images[:64]
    centres = cutout_centres(64, 32, 32, make_generator(3))
    assert centres.min() == 0 and centres.max() == 31  # corners included: squares get clipped
    expected = reference_cutout(images, centres, size)
    assert torch.equal(cutout(images, centres, size), expected)
    assert torch.equal(cutout(to_float(images), centres, size), to_float(expected))


def test_cutout_zeroes_the_whole_square_inside_and_a_clipped_one_at_a_corner(test_set: ImageDataset) -> None:
    images = torch.full((2, 3, 32, 32), 200, dtype=torch.uint8)
    out = cutout(images, torch.tensor([[16, 16], [0, 31]]), 16)
    assert (out[0, :, 8:24, 8:24] == 0).all() and int((out[0] == 0).sum()) == 3 * 16 * 16
    assert (out[1, :, 0:8, 23:32] == 0).all() and int((out[1] == 0).sum()) == 3 * 8 * 9
    assert torch.equal(cutout(test_set.images[:4], torch.zeros(4, 2, dtype=torch.long), 0), test_set.images[:4])


def test_iterate_batches_covers_everything_once(test_set: ImageDataset) -> None:
    dataset = test_set.subset(torch.arange(0, 10_000, 100))  # 100 images
    batches = list(iterate_batches(dataset, 32, generator=make_generator(1)))
    assert [len(labels) for _, labels in batches] == [32, 32, 32, 4]
    seen = torch.cat([images for images, _ in batches])
    # Every image exactly once: compare sorted flattened images.
    assert torch.equal(seen.flatten(1).sum(1).sort().values, dataset.images.flatten(1).sum(1).sort().values)
    assert not torch.equal(batches[0][1], dataset.labels[:32])  # shuffled
    assert [len(labels) for _, labels in iterate_batches(dataset, 32, drop_last=True)] == [32, 32, 32]
    in_order = next(iterate_batches(dataset, 32))
    assert torch.equal(in_order[0], dataset.images[:32]) and torch.equal(in_order[1], dataset.labels[:32])


def test_rank_shares_make_up_the_global_batch(test_set: ImageDataset) -> None:
    dataset = test_set.subset(torch.arange(64))
    whole = list(iterate_batches(dataset, 16, generator=make_generator(2)))
    shares = [list(iterate_batches(dataset, 16, generator=make_generator(2), rank=r, world_size=2)) for r in (0, 1)]
    for step, (images, labels) in enumerate(whole):
        assert torch.equal(torch.cat([shares[0][step][0], shares[1][step][0]]), images)
        assert torch.equal(torch.cat([shares[0][step][1], shares[1][step][1]]), labels)
    with pytest.raises(ValueError, match="rank"):
        next(iterate_batches(dataset, 16, rank=2, world_size=2))


def test_to_float_and_normalize(test_set: ImageDataset) -> None:
    images = test_set.images[:8]
    x = to_float(images)
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x * 255, images.float())
    with pytest.raises(TypeError):
        to_float(x)
    mean, std = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)
    normalised = normalize(x, mean, std)
    for c in range(3):
        assert torch.allclose(normalised[:, c], (x[:, c] - mean[c]) / std[c])
    cifar_mean = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert torch.allclose(normalize(cifar_mean), torch.zeros(1, 3, 32, 32), atol=1e-6)
