"""Data: the bundled handwritten digits (scikit-learn ships them, no download), image folders, and the
evaluation preprocessing every stage shares (training, int8 calibration, predict, validate)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from repconv.errors import DataError, OptionError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # torchvision's ImageNet preset: resize 256, crop 224
DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_SEED = 0
DIGITS_VAL_FRACTION = 0.2


def digits_images(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 digits as float images in [0, 1], shape (N, 1, 8, 8), with their labels.

    The split is fixed: a seeded permutation of the 1,797 images, the last 20% for validation.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be train, val or all, got {split!r}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SEED))
    n_val = round(len(y) * DIGITS_VAL_FRACTION)
    idx = {"train": order[:-n_val], "val": order[-n_val:], "all": order}[split]
    return x[idx], y[idx]


def digits(split: str = "train", size: int = 32, mean: Sequence[float] = (0.5, 0.5, 0.5),
           std: Sequence[float] = (0.5, 0.5, 0.5)) -> TensorDataset:
    """Digits resized to ``size`` x ``size``, 3 channels, normalized with ``mean`` / ``std``."""
    x, y = digits_images(split)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return TensorDataset(x.contiguous(), y)


# ---------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val")
_log = logging.getLogger("repconv.data")


def _size(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    size = tuple(int(s) for s in input_size)
    return (size[-2], size[-1]) if len(size) >= 2 else (size[0], size[0])


def eval_transform(input_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                   resize: int | None = None):
    """Resize the short side to ``resize`` (default size / 0.875), center-crop, scale to [0, 1], normalize:
    the usual evaluation preprocessing."""
    from torchvision.transforms import v2

    h, w = _size(input_size)
    return v2.Compose([
        v2.ToImage(), v2.Resize(resize or round(max(h, w) / CROP_FRACTION), antialias=True), v2.CenterCrop((h, w)),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def _usable_images(files: Iterable[Path]) -> list[Path]:
    """Files PIL can open as images; every other file is skipped with one warning line."""
    from PIL import Image, UnidentifiedImageError

    kept = []
    for f in sorted(files):
        if f.name.startswith("."):
            continue
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            _log.warning(f"warning: skipping '{f}': not an image file (suffix '{f.suffix}')")
            continue
        try:
            with Image.open(f) as im:
                im.load()  # decodes it all: a truncated JPEG passes verify() and fails only in training
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            _log.warning(f"warning: skipping '{f}': unreadable image ({type(exc).__name__}: {exc})")
            continue
        kept.append(f)
    return kept


class ImageFiles(Dataset):
    """Images with labels (class index) or without (label -1), read with PIL and preprocessed."""

    def __init__(self, samples: list[tuple[Path, int]], transform, classes: list[str] | None):
        self.samples, self.transform, self.classes = samples, transform, classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as im:
            x = self.transform(im.convert("RGB"))
        return x, label


def _folder_root(root: Path, split: str) -> Path:
    sub = root / split
    return sub if sub.is_dir() else root


def _labeled_folder(root: Path, transform) -> ImageFiles:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"'{root}' has no class subfolders, so it holds no labels",
                        "use ROOT/CLASS/IMAGE.jpg for labels, or distill from the teacher (unlabeled images work)")
    for f in root.iterdir():
        if f.is_file() and not f.name.startswith("."):
            _log.warning(f"warning: skipping '{f}': a labeled folder keeps images in class subfolders")
    samples = [(f, i) for i, c in enumerate(classes)
               for f in _usable_images(p for p in (root / c).rglob("*") if p.is_file())]
    return ImageFiles(samples, transform, classes)


def _unlabeled_folder(root: Path, transform) -> ImageFiles:
    return ImageFiles([(f, -1) for f in _usable_images(p for p in root.rglob("*") if p.is_file())], transform, None)


def make_dataset(source: str | os.PathLike, split: str = "train", input_size: int | Sequence[int] = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 labeled: bool = True, option: str = "data") -> Dataset:
    """The one entry point to data: ``digits`` or a folder, preprocessed for a model's input spec.

    Items are ``(image tensor (3, H, W), label)``; the label is ``-1`` when ``labeled`` is false. ``option``
    names the parameter the source came from, for the error that says it does not exist.
    A folder is an ImageFolder tree (``ROOT/CLASS/*.jpg``, labels) or any folder of images (unlabeled);
    ``ROOT/train`` and ``ROOT/val`` are used for the splits when present. The dataset's ``classes``
    attribute holds the class names (None when unlabeled).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'", f"use one of {', '.join(SPLITS)}")
    if str(source) == "digits":
        h, w = _size(input_size)
        if h != w:
            raise DataError(f"digits are square; input size {h}x{w} is not", "give a square input size")
        ds = digits(split, h, mean, std)
        if not labeled:
            ds = TensorDataset(ds.tensors[0], torch.full_like(ds.tensors[1], -1))
        ds.classes = list(DIGITS_CLASSES) if labeled else None
        return ds
    root = Path(source)
    if not root.is_dir():
        raise OptionError(option, str(source), "is neither 'digits' nor an existing folder", "check the path")
    if split == "val" and not (root / "val").is_dir():
        raise DataError(f"'{root}' has no 'val' subfolder", "give the validation images with {option} DIR",
                        option="val_data")
    folder = _folder_root(root, split)
    transform = eval_transform(input_size, mean, std)
    ds = _labeled_folder(folder, transform) if labeled else _unlabeled_folder(folder, transform)
    if len(ds) == 0:
        raise DataError(f"'{folder}' holds no usable image", "add .jpg/.png images (see the warnings above)")
    return ds


def has_split(source: str | os.PathLike, split: str) -> bool:
    """Whether ``make_dataset(source, split)`` has its own data for ``split`` (digits always does)."""
    return str(source) == "digits" or (Path(source) / split).is_dir()


def calibration_batches(source: str | os.PathLike, spec: tuple, batches: int, batch_size: int,
                        seed: int) -> list[torch.Tensor]:
    """The first ``batches`` shuffled (seeded) batches of ``source``'s training images, labels dropped.

    ``spec`` is ``(input_size, mean, std)``, the model's preprocessing.
    """
    ds = make_dataset(source, "train", *spec, labeled=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    return [x for _, (x, _) in zip(range(batches), loader, strict=False)]
