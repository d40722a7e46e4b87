"""The search's data: the training and held-out sets it reads, and lists of image batches from them."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from repconv.convert.graph import device_of
from repconv.errors import DataError


def load_data(data, val_data, meta, *, labeled: bool = False):
    """(train set, held-out set): datasets pass through; ``digits`` or a folder is read with the model's input
    spec; the held-out set is ``val_data``, else the data's ``val`` split, else the last 20% of ``data``."""
    from repconv.data import has_split, make_dataset

    def read(src, split, labeled=labeled):
        if not isinstance(src, (str, os.PathLike)):
            return src
        if labeled:  # held-out data: with labels when the folder has classes, to report accuracy too
            try:
                return make_dataset(src, split, meta.input_size[-2:], meta.mean, meta.std, labeled=True)
            except DataError:
                pass
        return make_dataset(src, split, meta.input_size[-2:], meta.mean, meta.std, labeled=False)

    train = read(data, "train")
    if val_data is not None:
        val = read(val_data, "val" if isinstance(val_data, (str, os.PathLike)) and has_split(val_data, "val")
                   else "train", True)
    elif isinstance(data, (str, os.PathLike)) and has_split(data, "val"):
        val = read(data, "val", True)
    else:
        n = len(train)
        cut = max(1, n - max(1, n // 5))
        train, val = torch.utils.data.Subset(train, range(cut)), torch.utils.data.Subset(train, range(cut, n))
    if len(train) == 0 or len(val) == 0:
        raise DataError("the search data holds no images (or too few to keep some for held-out scoring)",
                        "give a folder with images (ROOT/*.jpg or ROOT/train + ROOT/val)")
    return train, val


def image_list(ds, limit: int | None, batch_size: int) -> list[torch.Tensor]:
    """The first ``limit`` images of ``ds`` (all: None) as batches of ``batch_size``, labels dropped."""
    from repconv.train.local import image_batches

    out, n = [], 0
    for x in image_batches(ds, batch_size):
        if limit is not None and n >= limit:
            break
        if limit is not None:
            x = x[: limit - n]
        out.append(x)
        n += len(x)
    return out


def batches_on(model: nn.Module, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``batches`` on the device of ``model``'s weights."""
    return [x.to(device_of(model)) for x in batches]
