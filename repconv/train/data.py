"""Datasets: the bundled handwritten digits (scikit-learn ships them, no download) and image folders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

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
